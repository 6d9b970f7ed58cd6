"""Feature extraction: embeddings of face images from any training checkpoint.

Each image's embedding is InsightFace's "accuracy-flip" one: the backbone's output for the
image plus its output for the horizontally flipped image, summed and L2-normalised. Two
inputs are supported: an image list (``relative/path label`` lines under a prefix folder;
row ``i`` of the output is line ``i``) and a verification ``.bin`` (row ``i`` is image ``i``
of the file; the pair labels are written beside the features).

>>> model = load_backbone("checkpoints/last.pth")          # the trainer's checkpoint dict
>>> feats = extract_filelist(model, "val.lst", prefix="images")   # float32 (N, D), unit rows

Command line (``scripts/extract_feat.sh`` wraps it)::

    python -m hfsoftmax.extract --load-path ckpt.pth --filelist val.lst --prefix images \\
        --out feats.npy
    python -m hfsoftmax.extract --load-path ckpt.pth --bin lfw.bin --out lfw.npy
    # -> lfw.npy (features) and lfw_issame.npy (pair labels)
"""
from __future__ import annotations

import argparse
import logging
import os
import pickle  # only for its exception type: .bin files are read by a restricted loader
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Iterable, Sequence

import numpy as np
import torch
import torch.nn as nn

from evaluation import l2_normalize
from evaluation.report import issame_path

from .fileio import atomic_write

logger = logging.getLogger(__name__)

__all__ = ["resolve_device", "load_checkpoint_args", "load_backbone", "embed_batches",
           "VerificationSet", "load_verification_set", "extract_verification",
           "extract_filelist", "save_npy", "issame_path", "main"]

DEFAULT_BATCH_SIZE = 64
# Errors caused by the user's files or flags: the CLIs print them without a traceback.
USER_ERRORS = (ValueError, FileNotFoundError, pickle.UnpicklingError)


def resolve_device(device: str | torch.device | None = None) -> torch.device:
    """``None``/``"auto"``: CUDA when available, else CPU; otherwise the named device.

    Asking for CUDA on a machine without it raises ``ValueError`` instead of failing later.
    """
    if device is None or str(device) == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        dev = torch.device(device)
    except (RuntimeError, TypeError) as e:
        raise ValueError(f"invalid device {device!r} ({e}); use auto, cpu, cuda or cuda:N") \
            from None
    if dev.type == "cuda" and not torch.cuda.is_available():
        raise ValueError(f"device {device!r} requested but CUDA is not available on this "
                         "machine; use --device cpu (or auto)")
    return dev


def _strip_prefix(state: dict, prefix: str = "module.") -> dict:
    # DistributedDataParallel prefixes every key with "module."; a backbone saved through
    # the wrapper still loads.
    if state and all(k.startswith(prefix) for k in state):
        return {k[len(prefix):]: v for k, v in state.items()}
    return state


def load_checkpoint_args(path: str | os.PathLike) -> tuple[dict, dict]:
    """``(state_dict, args)`` of a checkpoint, read with ``torch.load(weights_only=True)``.

    A trainer checkpoint is a dict with ``model`` (the backbone's state_dict) and ``args``
    (incl. ``arch`` and ``embedding_size``); a bare backbone state_dict gives ``args == {}``.
    """
    path = os.fspath(path)
    if not os.path.isfile(path):
        raise FileNotFoundError(f"checkpoint not found: {path}")
    try:
        ckpt = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:  # pickle errors, truncated zip, refused globals ...
        raise ValueError(f"{path}: not a loadable checkpoint with torch.load(weights_only=True) "
                         f"({type(e).__name__}: {e})") from None
    if not isinstance(ckpt, dict):
        raise ValueError(f"{path}: expected a checkpoint dict, got {type(ckpt).__name__}")
    if "model" in ckpt:
        state, args = ckpt["model"], ckpt.get("args") or {}
        logger.info("%s: checkpoint of step %s, epoch %s", path, ckpt.get("step", "?"),
                    ckpt.get("epoch", "?"))
        if not isinstance(state, dict):
            raise ValueError(f"{path}: ckpt['model'] must be a backbone state_dict, got "
                             f"{type(state).__name__}")
        if not isinstance(args, dict):
            raise ValueError(f"{path}: ckpt['args'] must be a dict, got {type(args).__name__}")
    elif ckpt and all(isinstance(v, torch.Tensor) for v in ckpt.values()):
        state, args = ckpt, {}
    else:
        raise ValueError(f"{path}: neither a trainer checkpoint (keys 'model', 'args') nor a "
                         f"state_dict; keys: {sorted(map(str, ckpt))[:10]}")
    return _strip_prefix(state), args


def load_backbone(path: str | os.PathLike, device: str | torch.device | None = None, *,
                  arch: str | None = None, embedding_size: int | None = None) -> nn.Module:
    """The backbone of a training checkpoint, weights loaded, in eval mode on ``device``.

    The architecture and embedding size come from ``ckpt['args']``; ``arch`` /
    ``embedding_size`` must agree with them when both are present and are needed for a bare
    state_dict (ours, or arcface_torch's IResNet / MobileFaceNet ``backbone.pth``, whose
    keys :mod:`hfsoftmax.models.keymap` renames).
    """
    from hfsoftmax.models import build_backbone
    from hfsoftmax.models.keymap import to_ours

    state, args = load_checkpoint_args(path)
    state, _ = to_ours(state)  # arcface_torch's backbone.pth: keys renamed (models/keymap.py)
    ck_arch, ck_dim = args.get("arch"), args.get("embedding_size")
    if arch is not None and ck_arch is not None and arch != ck_arch:
        raise ValueError(f"{path}: the checkpoint was trained with arch {ck_arch!r} but "
                         f"{arch!r} was requested; pass --arch {ck_arch} or omit it")
    if embedding_size is not None and ck_dim is not None and int(embedding_size) != int(ck_dim):
        raise ValueError(f"{path}: the checkpoint has embedding_size {ck_dim} but "
                         f"{embedding_size} was requested")
    arch = arch or ck_arch
    dim = embedding_size if embedding_size is not None else ck_dim
    if arch is None or dim is None:
        raise ValueError(f"{path}: cannot tell the backbone (args.arch={ck_arch!r}, "
                         f"args.embedding_size={ck_dim!r}); pass --arch and --embedding-size")
    model = build_backbone(arch, embedding_size=int(dim))
    try:
        model.load_state_dict(state, strict=True)
    except RuntimeError as e:
        raise ValueError(f"{path}: weights do not fit backbone {arch!r} with embedding_size "
                         f"{dim}: {e}") from None
    logger.info("loaded %s (arch=%s, embedding_size=%s)", path, arch, dim)
    return model.to(resolve_device(device)).eval()


def _model_device(model: nn.Module) -> torch.device:
    for p in model.parameters():
        return p.device
    return torch.device("cpu")


@torch.no_grad()
def embed_batches(model: nn.Module, batches: Iterable[torch.Tensor], *, flip: bool = True,
                  device: str | torch.device | None = None, total: int | None = None,
                  progress: bool = False, desc: str = "extract") -> np.ndarray:
    """Embeddings of image batches, L2-normalised, float32 (N, D): normalised float
    ``(B, 3, H, W)``, or uint8 ``(B, H, W, 3)`` pixels, normalised on the device after the
    copy (the trainer's path: :func:`~hfsoftmax.data.transforms.normalize_batch`).

    With ``flip`` each image's embedding is ``f(x) + f(hflip(x))`` before normalisation
    (InsightFace's accuracy-flip). The model is put in eval mode for the call and its
    previous mode restored afterwards (the trainer calls this between steps). ``device``
    defaults to the model's. ``total`` is the number of images, for the progress bar.
    """
    from tqdm import tqdm

    from hfsoftmax.data.transforms import normalize_batch

    dev = _model_device(model) if device is None else resolve_device(device)
    was_training = model.training
    model.eval()
    chunks = []
    try:
        with tqdm(total=total, desc=desc, unit="img", disable=not progress,
                  file=sys.stderr) as bar:
            for x in batches:
                x = x.to(dev, non_blocking=True)
                if x.dtype == torch.uint8:
                    x = normalize_batch(x)
                out = model(x).double()
                if flip:
                    out = out + model(torch.flip(x, dims=[3])).double()
                chunks.append(out.cpu().numpy())
                bar.update(x.shape[0])
    finally:
        model.train(was_training)
    if not chunks:
        raise ValueError("no images to embed")
    emb = np.concatenate(chunks)
    if not np.isfinite(emb).all():
        raise FloatingPointError("the model produced NaN or inf embeddings; the checkpoint is "
                                 "broken or training diverged")
    return l2_normalize(emb).astype(np.float32)


@dataclass
class VerificationSet:
    """A decoded verification ``.bin``: ``images`` uint8 (2P, H, W, 3), ``issame`` bool (P,)."""

    name: str
    path: str
    images: np.ndarray
    issame: np.ndarray

    @property
    def num_pairs(self) -> int:
        return int(self.issame.shape[0])


def load_verification_set(path: str | os.PathLike, image_size=(112, 112),
                          name: str | None = None) -> VerificationSet:
    """Load and decode a ``.bin`` once (the trainer keeps it for periodic evaluation)."""
    from hfsoftmax.data.verification import decode_pairs, load_bin

    path = os.fspath(path)
    bins, issame = load_bin(path)
    images = decode_pairs(bins, image_size=tuple(image_size), source=path)
    return VerificationSet(name=name or Path(path).stem, path=path, images=images,
                           issame=np.asarray(issame, dtype=bool))


def _uint8_batches(images: np.ndarray, batch_size: int):
    # uint8 (B, H, W, 3): embed_batches normalises them on the model's device
    for start in range(0, images.shape[0], batch_size):
        yield torch.from_numpy(np.ascontiguousarray(images[start:start + batch_size]))


def _check_batch_size(batch_size: int) -> int:
    if isinstance(batch_size, bool) or not isinstance(batch_size, (int, np.integer)) \
            or batch_size < 1:
        raise ValueError(f"batch_size must be a positive integer, got {batch_size!r}")
    return int(batch_size)


def extract_verification(model: nn.Module, vset: VerificationSet | str | os.PathLike, *,
                         batch_size: int = DEFAULT_BATCH_SIZE, flip: bool = True,
                         device=None, progress: bool = False) -> tuple[np.ndarray, np.ndarray]:
    """``(features (2P, D) float32, issame (P,) bool)`` of a verification set or ``.bin`` path."""
    batch_size = _check_batch_size(batch_size)
    if not isinstance(vset, VerificationSet):
        vset = load_verification_set(vset)
    feats = embed_batches(model, _uint8_batches(vset.images, batch_size), flip=flip,
                          device=device, total=vset.images.shape[0], progress=progress,
                          desc=vset.name)
    return feats, vset.issame


def extract_filelist(model: nn.Module, filelist: str | os.PathLike,
                     prefix: str | os.PathLike | None = None, *,
                     batch_size: int = DEFAULT_BATCH_SIZE, flip: bool = True, device=None,
                     num_workers: int = 0, progress: bool = False,
                     decoder: str = "torchvision") -> np.ndarray:
    """Features (N, D) float32 of the images of an image list, in the list's order.

    The trainer's data path: the loader decodes to uint8 (``decoder``: torchvision.io or
    PIL, the same pixels), pinned where the model is on a GPU; normalisation on the
    device."""
    from torch.utils.data import DataLoader

    from hfsoftmax.data.filelist import ImageListDataset
    from hfsoftmax.data.uint8 import Uint8Images, collate_uint8

    batch_size = _check_batch_size(batch_size)
    ds = Uint8Images(ImageListDataset(filelist, prefix), decoder=decoder)
    dev = _model_device(model) if device is None else resolve_device(device)
    loader = DataLoader(ds, batch_size=batch_size, shuffle=False, num_workers=num_workers,
                        collate_fn=collate_uint8, pin_memory=dev.type == "cuda")
    return embed_batches(model, (x for x, _, _ in loader), flip=flip, device=dev,
                         total=len(ds), progress=progress, desc=Path(filelist).name)


def save_npy(path: str | os.PathLike, array: np.ndarray) -> Path:
    """``np.save`` atomically (temp file in the same folder, fsync, rename)."""
    path = Path(path)
    with atomic_write(path) as f:
        np.save(f, array)
    return path


def add_model_args(parser: argparse.ArgumentParser) -> None:
    """The flags shared by ``hfsoftmax.extract`` and ``hfsoftmax.eval``."""
    parser.add_argument("--load-path", required=True,
                        help="checkpoint written by training (dict with 'model' and 'args')")
    parser.add_argument("--arch", default=None,
                        help="backbone name; taken from the checkpoint's args when omitted "
                             "(must match them when given)")
    parser.add_argument("--embedding-size", type=int, default=None,
                        help="embedding size; from the checkpoint's args when omitted")
    parser.add_argument("--batch-size", type=int, default=DEFAULT_BATCH_SIZE,
                        help=f"images per forward pass (default {DEFAULT_BATCH_SIZE})")
    parser.add_argument("--device", default="auto",
                        help="auto (cuda if available, else cpu), cpu, cuda or cuda:N")
    parser.add_argument("--no-flip", dest="flip", action="store_false",
                        help="embed the image only (default: image + horizontal flip)")
    parser.add_argument("--no-progress", dest="progress", action="store_false",
                        help="hide the progress bar")


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="python -m hfsoftmax.extract",
        description="Write L2-normalised (image + flip) embeddings of an image list or a "
                    "verification .bin to a .npy file.")
    add_model_args(p)
    src = p.add_mutually_exclusive_group(required=True)
    src.add_argument("--filelist", help="image list: 'relative/path label' lines")
    src.add_argument("--bin", dest="bin_path", help="verification .bin (lfw.bin, ...); the pair "
                     "labels go to <out>_issame.npy")
    p.add_argument("--prefix", default=None,
                   help="folder the list's paths are relative to (default: the list's folder)")
    p.add_argument("--out", default="features.npy", help="output .npy (default features.npy)")
    p.add_argument("--workers", type=int, default=0, help="DataLoader workers for --filelist")
    p.add_argument("--decoder", choices=("torchvision", "pil"), default="torchvision",
                   help="JPEG decoder for --filelist (the same pixels; torchvision.io measured "
                        "faster: benchmarks/README.md, Data)")
    return p


def main(argv: Sequence[str] | None = None) -> int:
    """Console entry ``hfsoftmax-extract``."""
    args = build_parser().parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(message)s")
    if args.prefix is not None and args.filelist is None:
        raise SystemExit("error: --prefix goes with --filelist")
    try:
        device = resolve_device(args.device)
        model = load_backbone(args.load_path, device, arch=args.arch,
                              embedding_size=args.embedding_size)
        if args.filelist is not None:
            feats = extract_filelist(model, args.filelist, args.prefix,
                                     batch_size=args.batch_size, flip=args.flip, device=device,
                                     num_workers=args.workers, progress=args.progress,
                                     decoder=args.decoder)
            out = save_npy(args.out, feats)
        else:
            feats, issame = extract_verification(model, args.bin_path, batch_size=args.batch_size,
                                                 flip=args.flip, device=device,
                                                 progress=args.progress)
            out = save_npy(args.out, feats)
            logger.info("wrote pair labels to %s", save_npy(issame_path(out), issame))
    except USER_ERRORS as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    print(f"wrote {feats.shape[0]} x {feats.shape[1]} features to {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
