"""Start a run from pretrained backbone weights (``--init-from``), and freeze them for a while
(``--freeze-backbone-steps``).

``--init-from`` is not ``--resume``: it takes the *backbone's* weights only, from

- a checkpoint of this project (its ``model``; the run's settings, optimizer, step and
  classifier are not taken),
- a plain ``state_dict`` file (``torch.save(model.state_dict())``; a ``module.`` prefix of
  DDP is removed; a dict holding it under ``state_dict_backbone`` / ``state_dict`` /
  ``backbone`` is unwrapped),
- arcface_torch's ``backbone.pth`` of an IResNet or MobileFaceNet, renamed by the documented
  tables of :mod:`hfsoftmax.models.keymap`,

and starts a new run at step 0 with a fresh classifier, or with the rows of ``--init-rows
FILE`` (:func:`init_rows`: a ``.npy`` or ``.safetensors`` matrix of all rows, as
``python -m paramserver.export`` writes it, or a one-file row snapshot). Every file is
read with ``torch.load(weights_only=True)``. What does not fit is reported by name: keys the
model has and the file lacks (missing), keys the file has and the model lacks (unexpected),
and tensors whose shapes differ (with both shapes and the file's own key name); any of them
is an error unless ``--init-strict false``, which loads what fits and logs the rest.

A resumed run never re-initialises: ``--init-from`` is a start-only setting
(:data:`~hfsoftmax.engine.config.START_ONLY`), not restored from a checkpoint, and refused
together with ``--resume``.

>>> report = load_backbone_weights(backbone, "backbone.pth", strict=True)
>>> print(report.describe())
"""
from __future__ import annotations

import logging
import os
from dataclasses import dataclass, field

import torch
from torch import nn

from .. import distributed as hd
from ..models.keymap import detect_layout, mobilefacenet_scale, strip_prefix, to_ours

__all__ = ["InitReport", "read_backbone_state", "load_backbone_weights", "BackboneFreeze",
           "init_backbone_from_args", "rows_file_reader", "init_rows"]

logger = logging.getLogger(__name__)

_WRAPPERS = ("model", "state_dict_backbone", "state_dict", "backbone")
_LIST_MAX = 12  # names shown per kind of problem in a message (the counts are always exact)


def read_backbone_state(path: str | os.PathLike) -> tuple[dict, dict]:
    """``(state_dict, info)`` of a backbone file: ``info`` has ``kind`` (``hfsoftmax
    checkpoint`` or ``state_dict``) and, for our checkpoints, its ``args`` and ``step``.
    Raises ``ValueError`` naming the file for anything that is not a dict of tensors."""
    path = os.fspath(path)
    if not os.path.isfile(path):
        raise FileNotFoundError(f"--init-from file not found: {path}")
    try:
        obj = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:  # truncated, not a torch file, objects weights_only refuses
        first = (str(e).strip().splitlines() or [type(e).__name__])[0][:200]
        raise ValueError(f"{path}: not readable with torch.load(weights_only=True) "
                         f"({type(e).__name__}: {first})") from None
    if not isinstance(obj, dict):
        raise ValueError(f"{path}: expected a state_dict (a dict of tensors) or a checkpoint "
                         f"dict, got {type(obj).__name__}")
    info: dict = {"kind": "state_dict"}
    if not all(isinstance(v, torch.Tensor) for v in obj.values()):
        inner = next((k for k in _WRAPPERS if isinstance(obj.get(k), dict)), None)
        if inner is None:
            raise ValueError(f"{path}: neither a state_dict nor a checkpoint holding one under "
                             f"{', '.join(map(repr, _WRAPPERS))}; its keys: "
                             f"{sorted(map(str, obj))[:10]}")
        if inner == "model" and "args" in obj:
            info = {"kind": "hfsoftmax checkpoint", "args": obj.get("args") or {},
                    "step": obj.get("step")}
        obj = obj[inner]
        bad = [str(k) for k, v in obj.items() if not isinstance(v, torch.Tensor)]
        if bad:
            raise ValueError(f"{path}: {inner!r} holds non-tensor entries ({bad[:5]}); not a "
                             "backbone state_dict")
    if not obj:
        raise ValueError(f"{path}: the state_dict is empty")
    return strip_prefix(obj), info


@dataclass
class InitReport:
    """What :func:`load_backbone_weights` did: ``loaded`` tensors; ``missing`` (model keys
    the file lacks), ``unexpected`` (file keys the model lacks, named as in the file),
    ``mismatched`` ``(our key, file key, file shape, model shape)``, ``nonfinite`` (file keys
    holding NaN/inf; never loaded)."""

    source: str
    layout: str
    loaded: int = 0
    missing: list[str] = field(default_factory=list)
    unexpected: list[str] = field(default_factory=list)
    mismatched: list[tuple[str, str, tuple, tuple]] = field(default_factory=list)
    nonfinite: list[str] = field(default_factory=list)
    hint: str = ""

    @property
    def ok(self) -> bool:
        return not (self.missing or self.unexpected or self.mismatched or self.nonfinite)

    def describe(self) -> str:
        """One line per kind of problem, each naming the keys (the first 12) and the count."""
        def names(items):
            more = f" ... (+{len(items) - _LIST_MAX} more)" if len(items) > _LIST_MAX else ""
            return ", ".join(items[:_LIST_MAX]) + more

        lines = [f"{self.source} ({self.layout} layout): {self.loaded} tensors loaded"]
        if self.mismatched:
            lines.append(f"  {len(self.mismatched)} shape mismatch(es): " + names(
                [f"{ours} (file {theirs}: {tuple(a)} vs model {tuple(b)})" if ours != theirs
                 else f"{ours} (file {tuple(a)} vs model {tuple(b)})"
                 for ours, theirs, a, b in self.mismatched]))
        if self.missing:
            lines.append(f"  {len(self.missing)} missing (in the model, not in the file): "
                         + names(self.missing))
        if self.unexpected:
            lines.append(f"  {len(self.unexpected)} unexpected (in the file, not in the "
                         "model): " + names(self.unexpected))
        if self.nonfinite:
            lines.append(f"  {len(self.nonfinite)} tensor(s) hold NaN or inf: "
                         + names(self.nonfinite))
        if self.hint and not self.ok:
            lines.append(f"  hint: {self.hint}")
        return "\n".join(lines)


def _hint(state: dict, layout: str, info: dict, mismatched) -> str:
    """What a mismatch probably means, for the message."""
    args = info.get("args") or {}
    if layout == "arcface-mbf":
        scale = mobilefacenet_scale(state)
        if scale and scale != 1:
            return (f"the file is arcface_torch's MobileFaceNet at scale={scale} (its default "
                    "'mbf' is 2): its grouped stem conv and fixed bottleneck widths differ "
                    "from our mobilefacenet (the paper's width, scale=1), which no key "
                    "renaming can fix; only scale=1 files load")
    for ours, _, a, b in mismatched:
        if ours.startswith("embedding.") and ours.endswith("weight") and len(a) == 2:
            return f"the file's embedding size is {a[0]}: pass --embedding-size {a[0]}"
    if args.get("arch"):
        return (f"the file is a checkpoint of --arch {args['arch']} --embedding-size "
                f"{args.get('embedding_size')}")
    return ""


def load_backbone_weights(model: nn.Module, source: str | os.PathLike | dict, *,
                          strict: bool = True) -> InitReport:
    """Copy the backbone weights of ``source`` (a file, see the module docstring, or a
    state_dict) into ``model``. ``strict``: raise ``ValueError`` with
    :meth:`InitReport.describe` if anything does not fit, before changing the model;
    otherwise load every tensor that fits and return the report."""
    if isinstance(source, dict):
        state, info, name = strip_prefix(source), {"kind": "state_dict"}, "state_dict"
    else:
        state, info = read_backbone_state(source)
        name = os.fspath(source)
    layout = detect_layout(state)
    renamed, origin = to_ours(state, layout)
    own = model.state_dict()
    report = InitReport(source=name, layout=layout)
    fit = {}
    for key, value in renamed.items():
        if key not in own:
            report.unexpected.append(origin[key])
        elif tuple(value.shape) != tuple(own[key].shape):
            report.mismatched.append((key, origin[key], tuple(value.shape),
                                      tuple(own[key].shape)))
        elif value.is_floating_point() and not torch.isfinite(value).all():
            report.nonfinite.append(origin[key])
        else:
            fit[key] = value
    report.missing = [k for k in own if k not in renamed]
    report.hint = _hint(state, layout, info, report.mismatched)
    if strict and not report.ok:
        raise ValueError("backbone weights do not fit: " + report.describe()
                         + "\n  (--init-strict false loads the tensors that fit)")
    missing = model.load_state_dict(fit, strict=False).missing_keys
    report.loaded = len(own) - len(missing)
    return report


def init_backbone_from_args(args, backbone: nn.Module) -> InitReport:
    """The trainer's ``--init-from`` / ``--init-strict``: load, log the report (a warning
    for every problem when not strict)."""
    report = load_backbone_weights(backbone, args.init_from, strict=args.init_strict)
    if report.ok:
        logger.info("--init-from %s: %d backbone tensors loaded (%s layout, nothing missing, "
                    "unexpected or mismatched); the classifier starts fresh",
                    args.init_from, report.loaded, report.layout)
    else:
        logger.warning("--init-from with --init-strict false: %s", report.describe())
    return report


class BackboneFreeze:
    """Keeps the backbone's weights (and its BatchNorm statistics) unchanged for the first
    ``steps`` optimizer steps of a run, then lets them train, so a fresh classifier can
    settle against pretrained features before its large first gradients reach them.

    While frozen: the backbone runs in eval mode (a forward pre-hook; BN uses and keeps its
    running statistics) and an optimizer pre-step hook drops the backbone's gradients, so
    SGD applies neither gradient, momentum nor weight decay to it. Without DDP the backbone
    also stops requiring gradients (its backward is skipped); under DDP it keeps them, as
    DDP's reducer expects every parameter's gradient. A post-step hook counts the steps
    (starting from the resumed step) and unfreezes at ``steps``.
    """

    def __init__(self, backbone: nn.Module, optimizer: torch.optim.Optimizer, steps: int,
                 start_step: int = 0, *, skip_backward: bool = True):
        self.backbone, self.steps, self.step = backbone, int(steps), int(start_step)
        self.params = [p for p in backbone.parameters() if p.requires_grad]
        self.skip_backward = skip_backward
        self.frozen = self.step < self.steps
        self._hooks = [optimizer.register_step_pre_hook(self._drop_grads),
                       optimizer.register_step_post_hook(self._count),
                       backbone.register_forward_pre_hook(self._eval_while_frozen)]
        if self.frozen:
            if skip_backward:
                for p in self.params:
                    p.requires_grad_(False)
            logger.info("backbone frozen for steps %d -> %d (--freeze-backbone-steps)",
                        self.step, self.steps)

    def _eval_while_frozen(self, module, inputs):
        if self.frozen and module.training:
            module.eval()

    def _drop_grads(self, optimizer, args, kwargs):
        if self.frozen:
            for p in self.params:
                p.grad = None

    def _count(self, optimizer, args, kwargs):
        self.step += 1
        if self.frozen and self.step >= self.steps:
            self.frozen = False
            for p in self.params:
                p.requires_grad_(True)
            self.backbone.train()
            logger.info("backbone unfrozen after step %d", self.step)

    def remove(self) -> None:
        """Take the hooks off (the backbone trains from now on)."""
        for h in self._hooks:
            h.remove()
        if self.frozen:
            self.frozen = False
            for p in self.params:
                p.requires_grad_(True)


_ROW_CHUNK = 65536


def rows_file_reader(path: str | os.PathLike, shape: tuple[int, int]):
    """``read(a, b) -> float32 rows [a, b)`` of a rows file whose matrix must have exactly
    ``shape`` (checked from the file's header before any row is read): a ``.npy`` array, or
    a ``.safetensors`` tensor named ``weight`` (``paramserver.export``) or ``<table>/weight``
    (a one-file parameter-server snapshot)."""
    path = os.fspath(path)
    if not os.path.isfile(path):
        raise FileNotFoundError(f"--init-rows file not found: {path}")
    if path.endswith(".npy"):
        import numpy as np

        try:
            arr = np.load(path, mmap_mode="r", allow_pickle=False)
        except ValueError as e:
            raise ValueError(f"{path}: not a numeric .npy array ({e})") from None
        got, dtype, read = tuple(arr.shape), str(arr.dtype), lambda a, b: arr[a:b]
    elif path.endswith(".safetensors"):
        from safetensors import SafetensorError, safe_open

        try:
            f = safe_open(path, framework="numpy")
        except (SafetensorError, OSError) as e:
            raise ValueError(f"{path}: not a readable safetensors file ({e})") from None
        keys = [k for k in f.keys() if k == "weight" or k.endswith("/weight")]
        if len(keys) != 1:
            raise ValueError(f"{path}: expected one tensor 'weight' (or '<table>/weight'), "
                             f"found {sorted(f.keys())[:10]}")
        sl = f.get_slice(keys[0])
        got, dtype = tuple(sl.get_shape()), {"F32": "float32"}.get(sl.get_dtype(),
                                                                     sl.get_dtype())
        read = lambda a, b: sl[a:b]  # noqa: E731
    else:
        raise ValueError(f"--init-rows {path}: expected a .npy or .safetensors file")
    if got != tuple(shape) or dtype != "float32":
        raise ValueError(f"{path} holds {dtype} {got}; this run's classifier is float32 "
                         f"{tuple(shape)} (--num-classes x --embedding-size)")
    return read


def init_rows(head: nn.Module, store, path: str | os.PathLike) -> int:
    """Copy every row of ``path`` into the classifier (the row store's ``set_rows``, or the
    full head's weight) in chunks; momentum stays zero. Returns the number of rows. A
    non-finite value is refused naming its row."""
    import numpy as np

    rows = store.num_rows if store is not None else head.weight.shape[0]
    dim = store.dim if store is not None else head.weight.shape[1]
    read = rows_file_reader(path, (rows, dim))
    for a in range(0, rows, _ROW_CHUNK):
        b = min(rows, a + _ROW_CHUNK)
        block = np.ascontiguousarray(read(a, b), dtype=np.float32)
        if not np.isfinite(block).all():
            bad = a + int(np.flatnonzero(~np.isfinite(block).all(axis=1))[0])
            raise ValueError(f"{os.fspath(path)}: row {bad} is not finite (NaN or inf)")
        if store is not None:
            store.set_rows(np.arange(a, b, dtype=np.int64), block)
        else:
            with torch.no_grad():
                head.weight[a:b].copy_(torch.from_numpy(block))
    logger.info("--init-rows %s: %d x %d classifier rows loaded", os.fspath(path), rows, dim)
    return rows


def apply_start_weights(args, backbone: nn.Module, head: nn.Module, store, optimizer,
                        step: int, world: int) -> None:
    """What a run starts from besides its checkpoint: ``--init-from`` (backbone weights) and
    ``--init-rows`` (classifier rows) for a new run (never on ``--resume``: a resumed run
    continues itself), and ``--freeze-backbone-steps`` (counted from ``step``). Errors are
    the user's to fix: :class:`~hfsoftmax.engine.config.UsageError` naming the flag."""
    from .config import UsageError

    if not args.resume:
        for flag, value, load in (
                ("--init-from", args.init_from, lambda: init_backbone_from_args(args, backbone)),
                ("--init-rows", args.init_rows, lambda: init_rows(head, store, args.init_rows))):
            if not value or (flag == "--init-rows" and store is not None and args.ps
                             and not hd.is_main()):  # a shared server: rank 0 sets the rows
                continue
            try:
                load()
            except (ValueError, OSError) as e:
                raise UsageError(f"{flag} {value}: {e}") from None
    if args.freeze_backbone_steps:
        BackboneFreeze(backbone, optimizer, args.freeze_backbone_steps, step,
                       skip_backward=world == 1)
