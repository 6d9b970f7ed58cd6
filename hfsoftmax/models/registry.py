"""The backbone registry: one name -> one constructor, as torchvision's ``models/_api.py``.

>>> from hfsoftmax.models import build_backbone
>>> net = build_backbone("ir50", embedding_size=512)
"""
from __future__ import annotations

from typing import Callable

import torch.nn as nn

__all__ = ["register_backbone", "build_backbone", "list_backbones", "head_defaults"]

# name -> constructor(embedding_size: int) -> nn.Module
_BACKBONES: dict[str, Callable[..., nn.Module]] = {}
# name -> the margin heads' scale and margins that backbone trains with by default
_HEAD_DEFAULTS: dict[str, dict] = {}


def register_backbone(name: str, head_defaults: dict | None = None) -> Callable:
    """Decorator registering ``fn(embedding_size=...) -> nn.Module`` under ``name``.

    ``head_defaults`` (e.g. ``{"scale": 30.0, "cosface": 0.2}``): the margin heads' scale
    and per-head margin the trainer uses with this backbone when ``--scale`` / ``--margin``
    are not given (a small network may not train at the heads' own 64 / 0.35). A name
    registered twice raises ``ValueError`` (two modules claiming one name is a bug).
    """
    def wrap(fn: Callable[..., nn.Module]) -> Callable[..., nn.Module]:
        if name in _BACKBONES:
            raise ValueError(f"backbone {name!r} is already registered (by "
                             f"{_BACKBONES[name].__module__}.{_BACKBONES[name].__name__})")
        _BACKBONES[name] = fn
        if head_defaults:
            _HEAD_DEFAULTS[name] = dict(head_defaults)
        return fn
    return wrap


def head_defaults(name: str) -> dict:
    """The margin heads' default ``scale`` and per-head margins (``cosface``, ``arcface``)
    of backbone ``name``; empty where the heads' own defaults apply."""
    _load_builtin()
    return dict(_HEAD_DEFAULTS.get(name, {}))


def list_backbones() -> list[str]:
    """The registered backbone names, sorted."""
    _load_builtin()
    return sorted(_BACKBONES)


def build_backbone(name: str, embedding_size: int = 256) -> nn.Module:
    """The backbone ``name`` mapping (B, 3, 112, 112) images in [-1, 1] to (B, embedding_size).

    Unknown names raise ``ValueError`` listing the valid ones.
    """
    _load_builtin()
    if name not in _BACKBONES:
        raise ValueError(f"unknown backbone {name!r}; valid: {', '.join(sorted(_BACKBONES))}")
    if isinstance(embedding_size, bool) or not isinstance(embedding_size, int) \
            or embedding_size <= 0:
        raise ValueError(f"embedding_size must be a positive integer, got {embedding_size!r}")
    return _BACKBONES[name](embedding_size=embedding_size)


def _load_builtin() -> None:
    # The modules register themselves on import; importing here (not at package import)
    # keeps the registry free of import cycles.
    from . import convnet, iresnet, mobilefacenet, resnet  # noqa: F401
