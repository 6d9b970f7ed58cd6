"""Backbone files of other projects, read into this project's backbones by renaming keys.

InsightFace's ``recognition/arcface_torch`` saves a backbone as a plain ``state_dict``
(``backbone.pth``). Its IResNet and MobileFaceNet compute what our ``ir*`` and
``mobilefacenet`` compute, in the same order, under other module names; so a file of theirs
loads into ours by renaming keys (the tensors are used as they are). The tables below are
the whole mapping; :func:`detect_layout` tells the layouts apart by keys only theirs have,
and :func:`to_ours` renames. Keys no rule covers keep their name, so the loader reports them
as unexpected instead of dropping them silently.

**IResNet** (``iresnet18/34/50/100`` there, ``ir18/34/50/100`` here; both have the same
blocks: BN, conv3x3, BN, PReLU, conv3x3 with the stride, BN, and a 1x1 conv + BN shortcut on
the first block of each stage):

============================  ==================================  ==========================
arcface_torch                 ours                                what
============================  ==================================  ==========================
``conv1.*``                   ``stem.0.*``                        3x3 stem conv
``bn1.*``                     ``stem.1.*``                        stem BN
``prelu.*``                   ``stem.2.*``                        stem PReLU
``layerS.B.<name>.*``         ``layerS.B.<name>.*`` (same)        S = 1..4; name in bn1,
                                                                  conv1, bn2, prelu, conv2,
                                                                  bn3, downsample.0/1
``bn2.*``                     ``embedding.0.*``                   BN2d on the 7x7 map
``dropout``                   (no weights)                        dropout=0 in our ir*
``fc.*``                      ``embedding.2.*``                   Linear(512*7*7, E)
``features.*``                ``embedding.3.*``                   BN1d, weight fixed at 1
============================  ==================================  ==========================

**MobileFaceNet** (``mbf`` there). Theirs is built by ``MobileFaceNet(blocks=(1, 4, 6, 2),
scale=S)``; ``scale=1`` is the paper's network and has exactly our ``mobilefacenet``'s
shapes. Its stage ``layers.N`` is either one strided ``DepthWise`` block or a ``Residual``
stack of them; ours is one flat list ``blocks.*`` of the same 15 bottlenecks:

==================================  =================================  ==================
arcface_torch                       ours                               what
==================================  =================================  ==================
``layers.0.layers.K.*``             ``stem.0.K.*``                     conv3x3/2, BN, PReLU
``layers.1.layers.K.*``             ``stem.1.K.*``                     depthwise 3x3
``layers.2.layers.J.layers.K.*``    ``blocks.0.body.J.K.*``            DepthWise, stride 2
``layers.3.layers.R.layers.J...``   ``blocks.(1+R).body.J.K.*``        Residual x4
``layers.4.layers.J.layers.K.*``    ``blocks.5.body.J.K.*``            DepthWise, stride 2
``layers.5.layers.R.layers.J...``   ``blocks.(6+R).body.J.K.*``        Residual x6
``layers.6.layers.J.layers.K.*``    ``blocks.12.body.J.K.*``           DepthWise, stride 2
``layers.7.layers.R.layers.J...``   ``blocks.(13+R).body.J.K.*``       Residual x2
``conv_sep.layers.K.*``             ``conv_sep.K.*``                   1x1 to 512
``features.layers.0.layers.K.*``    ``gdconv.K.*``                     GDConv 7x7 + BN
``features.layers.2.weight``        ``embedding.1.weight``             Linear(512, E)
``features.layers.3.*``             ``embedding.2.*``                  BN1d
==================================  =================================  ==================

(J: 0 expand 1x1, 1 depthwise 3x3, 2 project 1x1; K: 0 conv, 1 BN, 2 PReLU.)

What no renaming can fix: arcface_torch's *default* ``mbf`` is ``scale=2``, and there the
widths do not all scale: the stem's second conv is grouped (64 groups of 2 channels, weight
``(128, 2, 3, 3)``) where ours is depthwise, and the bottlenecks' expanded widths stay at
128/256/512 while their inputs double. Such a file is reported key by key as shape
mismatches (:func:`mobilefacenet_scale` names the scale for the message); only ``scale=1``
files load into ``mobilefacenet``. ``blocks`` other than ``(1, 4, 6, 2)`` give missing or
unexpected keys, also reported.

>>> layout = detect_layout(state)            # "arcface-iresnet", "arcface-mbf" or "hfsoftmax"
>>> ours, origin = to_ours(state, layout)    # origin[our_key] == their key
"""
from __future__ import annotations

import re
from typing import Callable, Mapping

__all__ = ["LAYOUTS", "detect_layout", "to_ours", "mobilefacenet_scale", "IRESNET_TOP",
           "MBF_STAGES", "strip_prefix"]

LAYOUTS = ("hfsoftmax", "arcface-iresnet", "arcface-mbf")

#: arcface_torch IResNet's top-level modules -> ours (the ``layerS`` stages keep their names).
IRESNET_TOP = {"conv1": "stem.0", "bn1": "stem.1", "prelu": "stem.2", "bn2": "embedding.0",
               "fc": "embedding.2", "features": "embedding.3"}

#: arcface_torch MobileFaceNet's ``layers.N`` (N >= 2) -> (kind, index of its first block
#: in our ``blocks``): a strided ``DepthWise`` block, or a ``Residual`` stack.
MBF_STAGES = {2: ("depthwise", 0), 3: ("residual", 1), 4: ("depthwise", 5),
              5: ("residual", 6), 6: ("depthwise", 12), 7: ("residual", 13)}

_MBF_FIXED = {"layers.0.layers.": "stem.0.", "layers.1.layers.": "stem.1.",
              "conv_sep.layers.": "conv_sep.", "features.layers.0.layers.": "gdconv.",
              "features.layers.2.": "embedding.1.", "features.layers.3.": "embedding.2."}
_MBF_DW = re.compile(r"layers\.(\d+)\.layers\.(\d+)\.layers\.(\d+)\.(.+)")
_MBF_RES = re.compile(r"layers\.(\d+)\.layers\.(\d+)\.layers\.(\d+)\.layers\.(\d+)\.(.+)")

# keys only each layout has (all of them must be present)
_SIGNATURES = {
    "arcface-iresnet": ("conv1.weight", "layer1.0.conv1.weight", "fc.weight",
                        "features.running_mean"),
    "arcface-mbf": ("layers.0.layers.0.weight", "conv_sep.layers.0.weight",
                    "features.layers.2.weight"),
}


def strip_prefix(state: Mapping, prefix: str = "module.") -> dict:
    """``state`` without the ``module.`` prefix DistributedDataParallel / DataParallel put on
    every key (arcface_torch's checkpoints of a wrapped model have it)."""
    keys = list(state)
    if keys and all(isinstance(k, str) and k.startswith(prefix) for k in keys):
        return {k[len(prefix):]: v for k, v in state.items()}
    return dict(state)


def detect_layout(state: Mapping) -> str:
    """Which key layout ``state`` is in: one of :data:`LAYOUTS` (``hfsoftmax`` for anything
    that is not recognisably arcface_torch's; the loader then reports what does not fit)."""
    for layout, keys in _SIGNATURES.items():
        if all(k in state for k in keys):
            return layout
    return "hfsoftmax"


def _iresnet_key(key: str) -> str | None:
    head, sep, rest = key.partition(".")
    if head in IRESNET_TOP and sep:
        return f"{IRESNET_TOP[head]}.{rest}"
    if re.fullmatch(r"layer[1-4]", head):
        return key
    return None


def _mbf_key(key: str) -> str | None:
    for theirs, ours in _MBF_FIXED.items():
        if key.startswith(theirs):
            return ours + key[len(theirs):]
    m = _MBF_RES.fullmatch(key)
    if m and MBF_STAGES.get(int(m[1]), ("",))[0] == "residual":
        first = MBF_STAGES[int(m[1])][1]
        return f"blocks.{first + int(m[2])}.body.{m[3]}.{m[4]}.{m[5]}"
    m = _MBF_DW.fullmatch(key)
    if m and MBF_STAGES.get(int(m[1]), ("",))[0] == "depthwise":
        return f"blocks.{MBF_STAGES[int(m[1])][1]}.body.{m[2]}.{m[3]}.{m[4]}"
    return None


_RENAMERS: dict[str, Callable[[str], str | None]] = {"arcface-iresnet": _iresnet_key,
                                                      "arcface-mbf": _mbf_key}


def to_ours(state: Mapping, layout: str | None = None) -> tuple[dict, dict]:
    """``(renamed state, origin)``: ``state`` with keys in our layout, and ``origin[new key]``
    = the key it had in the file (for messages). ``layout`` None: :func:`detect_layout`.
    A key no rule covers keeps its name (it is reported as unexpected by the loader)."""
    state = strip_prefix(state)
    layout = detect_layout(state) if layout is None else layout
    if layout not in LAYOUTS:
        raise ValueError(f"unknown key layout {layout!r}; valid: {', '.join(LAYOUTS)}")
    if layout == "hfsoftmax":
        return dict(state), {k: k for k in state}
    rename = _RENAMERS[layout]
    out, origin = {}, {}
    for key, value in state.items():
        new = rename(key) or key
        if new in out:  # two rules onto one key would be a bug in the tables above
            raise ValueError(f"keys {origin[new]!r} and {key!r} both map to {new!r}")
        out[new], origin[new] = value, key
    return out, origin


def mobilefacenet_scale(state: Mapping) -> int | None:
    """arcface_torch MobileFaceNet's ``scale`` from its stem conv (64 x scale channels), or
    None when ``state`` is not that layout."""
    w = strip_prefix(state).get("layers.0.layers.0.weight")
    if w is None or not hasattr(w, "shape") or len(w.shape) != 4 or w.shape[0] % 64:
        return None
    return int(w.shape[0]) // 64
