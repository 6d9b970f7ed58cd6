"""Export a trained backbone for deployment: its weights alone, TorchScript and ONNX, each
checked against the torch model on the same images.

    python -m hfsoftmax.export --load-path runs/x/best.pth --out-dir export/
    python -m hfsoftmax.export --load-path backbone.pth --arch ir50 --embedding-size 512 \\
        --out-dir export/ --check-images val.lst          # arcface_torch's file, real images

writes into ``--out-dir``:

- ``backbone.pt``: the backbone's ``state_dict`` only (no classifier, optimizer or run
  settings), loadable with ``torch.load(weights_only=True)`` into ``build_backbone(arch,
  embedding_size)`` (the two are in ``export.json``);
- ``backbone.torchscript.pt``: ``torch.jit.trace`` of the backbone in eval mode
  (``torch.jit.load`` needs no hfsoftmax; recent torch marks TorchScript deprecated, the
  file still loads);
- ``backbone.onnx``: ONNX at opset :data:`DEFAULT_OPSET` (``--opset``), input ``input``
  float32 ``(batch, 3, 112, 112)`` with a dynamic batch axis, output ``embedding`` float32
  ``(batch, E)``. Written by torch's TorchScript-based exporter (``dynamo=False``: the
  torch.export-based one needs the ``onnxscript`` package), which needs ``onnx``;
- ``export.json``: arch, embedding size, source, opset, the input's normalisation, torch /
  onnx / onnxruntime versions and every check's largest absolute difference.

The input is an RGB 112x112 face crop normalised as in training, ``(x / 255 - 0.5) / 0.5``;
the output is the raw embedding (not L2-normalised, no flip: a caller that wants
InsightFace's accuracy-flip sums the outputs of the image and its mirror and normalises).

Checks (unless ``--no-check``): each exported form runs on the same images as the torch
model (eval mode, CPU, float32) at every ``--check-batch-sizes`` (default 1 and 7, so the
dynamic batch axis is exercised at a size the export never saw); the largest absolute
difference must be at most ``--atol`` (1e-4), else the command fails (exit 1) naming the
format, the batch size and the difference. ``--check-images`` takes an image list or an
image folder; without it the images are seeded random noise in [-1, 1].
Every file is written to a temporary name and renamed.
"""
from __future__ import annotations

import argparse
import io
import logging
import os
import sys
import warnings
from typing import Sequence

import numpy as np
import torch
from torch import nn

from .extract import USER_ERRORS, load_backbone
from .fileio import atomic_write, write_json

__all__ = ["FORMATS", "DEFAULT_OPSET", "export_backbone", "check_exports", "check_images",
           "main"]

logger = logging.getLogger(__name__)

FORMATS = ("pt", "torchscript", "onnx")
FILES = {"pt": "backbone.pt", "torchscript": "backbone.torchscript.pt", "onnx": "backbone.onnx"}
DEFAULT_OPSET = 17
INPUT_SHAPE = (3, 112, 112)


class ExportCheckError(RuntimeError):
    """An exported model's output differs from the torch model's by more than the tolerance."""


def _save_state(model: nn.Module, path: str) -> None:
    with atomic_write(path) as f:
        torch.save({k: v.detach().cpu().clone() for k, v in model.state_dict().items()}, f)


def _save_torchscript(model: nn.Module, path: str, example: torch.Tensor) -> None:
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message=r".*torch\.jit.*deprecated", category=Warning)
        traced = torch.jit.trace(model, example)
        buf = io.BytesIO()
        torch.jit.save(traced, buf)
    with atomic_write(path) as f:
        f.write(buf.getvalue())


def _save_onnx(model: nn.Module, path: str, example: torch.Tensor, opset: int) -> None:
    try:
        import onnx  # noqa: F401  (torch's exporter needs it)
    except ImportError:
        raise ValueError("ONNX export needs the onnx package: pip install onnx (and "
                         "onnxruntime for the check)") from None
    buf = io.BytesIO()
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message=r".*legacy TorchScript-based ONNX.*")
        warnings.filterwarnings("ignore", category=DeprecationWarning)
        torch.onnx.export(model, (example,), buf, dynamo=False, opset_version=int(opset),
                          input_names=["input"], output_names=["embedding"],
                          dynamic_axes={"input": {0: "batch"}, "embedding": {0: "batch"}},
                          do_constant_folding=True)
    with atomic_write(path) as f:
        f.write(buf.getvalue())


def check_images(source: str | None, count: int, seed: int = 0) -> torch.Tensor:
    """``count`` normalised images (N, 3, 112, 112) for the checks: the first ones of an
    image list (paths relative to its folder) or image folder, else seeded noise."""
    if count < 1:
        raise ValueError(f"--check-count must be >= 1, got {count}")
    if source is None:
        g = torch.Generator().manual_seed(seed)
        return torch.rand((count, *INPUT_SHAPE), generator=g) * 2 - 1
    from .data.filelist import ImageListDataset
    from .data.transforms import eval_transform

    if os.path.isdir(source):
        from .data.folder import ImageFolderDataset
        ds = ImageFolderDataset(source, transform=eval_transform())
    else:
        ds = ImageListDataset(source, transform=eval_transform())
    images = [ds[i][0] for i in range(min(count, len(ds)))]
    while len(images) < count:  # a short list: cycle it (batch 7 from 3 images)
        images.append(images[len(images) % len(ds)])
    return torch.stack(images)


def _runner(fmt: str, path: str):
    """A function images (numpy) -> embeddings (numpy) for an exported TorchScript or ONNX
    file."""
    if fmt == "torchscript":
        with warnings.catch_warnings():
            warnings.filterwarnings("ignore", message=r".*torch\.jit.*deprecated")
            ts = torch.jit.load(path, map_location="cpu").eval()
        return lambda x: ts(torch.from_numpy(x)).detach().numpy()
    try:
        import onnxruntime as ort
    except ImportError:
        raise ValueError("the ONNX check needs onnxruntime: pip install onnxruntime (or "
                         "--no-check)") from None
    opts = ort.SessionOptions()
    opts.log_severity_level = 3
    sess = ort.InferenceSession(path, opts, providers=["CPUExecutionProvider"])
    return lambda x: sess.run(["embedding"], {"input": x})[0]


def check_exports(model: nn.Module, files: dict[str, str], images: torch.Tensor,
                  batch_sizes: Sequence[int], rebuild=None) -> dict[str, dict[str, float]]:
    """Largest |exported - torch| per format and batch size, on ``images`` cycled to each
    batch size. ``rebuild()`` makes a fresh backbone for the ``pt`` check (its state_dict
    loaded back)."""
    model = model.eval()
    result: dict[str, dict[str, float]] = {}
    for fmt, path in files.items():
        if fmt == "pt":
            if rebuild is None:
                continue
            twin = rebuild().eval()
            twin.load_state_dict(torch.load(path, map_location="cpu", weights_only=True))
            run = lambda x, t=twin: t(torch.from_numpy(x)).detach().numpy()  # noqa: E731
        else:
            run = _runner(fmt, path)
        result[fmt] = {}
        for b in batch_sizes:
            idx = [i % images.shape[0] for i in range(b)]
            x = images[idx].contiguous()
            with torch.no_grad():
                ref = model(x).numpy()
            out = run(x.numpy())
            if out.shape != ref.shape:
                raise ExportCheckError(f"{fmt} at batch {b}: output shape {out.shape}, torch "
                                       f"gives {ref.shape}")
            result[fmt][str(b)] = float(np.max(np.abs(out.astype(np.float64) - ref)))
    return result


def export_backbone(model: nn.Module, out_dir: str | os.PathLike, *,
                    formats: Sequence[str] = FORMATS, opset: int = DEFAULT_OPSET,
                    images: torch.Tensor | None = None, batch_sizes: Sequence[int] = (1, 7),
                    atol: float = 1e-4, meta: dict | None = None, rebuild=None) -> dict:
    """Write the ``formats`` of ``model`` (a backbone, moved to the CPU in eval mode) into
    ``out_dir``, check them on ``images`` (None: no check) and write ``export.json``;
    returns its content. Raises :class:`ExportCheckError` (after writing ``export.json``
    with ``"ok": false``) when a difference exceeds ``atol``."""
    bad = [f for f in formats if f not in FORMATS]
    if bad or not formats:
        raise ValueError(f"unknown export format(s) {bad or formats}; valid: "
                         f"{', '.join(FORMATS)}")
    out_dir = os.fspath(out_dir)
    os.makedirs(out_dir, exist_ok=True)
    model = model.cpu().float().eval()
    example = torch.zeros((2, *INPUT_SHAPE))
    files = {f: os.path.join(out_dir, FILES[f]) for f in formats}
    if "pt" in files:
        _save_state(model, files["pt"])
    if "torchscript" in files:
        _save_torchscript(model, files["torchscript"], example)
    if "onnx" in files:
        _save_onnx(model, files["onnx"], example, opset)
    versions = {"torch": torch.__version__}
    for mod in ("onnx", "onnxruntime"):
        try:
            versions[mod] = __import__(mod).__version__
        except ImportError:
            pass
    manifest = {**(meta or {}), "files": {f: FILES[f] for f in formats},
                "opset": int(opset) if "onnx" in files else None,
                "input": {"name": "input", "shape": ["batch", *INPUT_SHAPE],
                          "dtype": "float32", "color": "RGB",
                          "normalization": "(x / 255 - 0.5) / 0.5"},
                "output": {"name": "embedding", "normalized": False, "flip": False},
                "versions": versions, "atol": atol, "checks": None, "ok": None}
    if images is not None:
        diffs = check_exports(model, files, images, batch_sizes, rebuild)
        manifest["checks"] = diffs
        worst = [(f, b, d) for f, per in diffs.items() for b, d in per.items() if d > atol]
        manifest["ok"] = not worst
        write_json(os.path.join(out_dir, "export.json"), manifest, indent=2)
        if worst:
            f, b, d = max(worst, key=lambda w: w[2])
            raise ExportCheckError(f"{f} export differs from the torch model by {d:.3g} at "
                                   f"batch {b} (tolerance --atol {atol:g}); see "
                                   f"{os.path.join(out_dir, 'export.json')}")
    else:
        write_json(os.path.join(out_dir, "export.json"), manifest, indent=2)
    return manifest


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m hfsoftmax.export",
                                description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--load-path", required=True,
                   help="a training checkpoint, a backbone state_dict, or arcface_torch's "
                        "backbone.pth (the last two need --arch and --embedding-size)")
    p.add_argument("--arch", default=None, help="backbone name (default: the checkpoint's)")
    p.add_argument("--embedding-size", type=int, default=None,
                   help="embedding size (default: the checkpoint's)")
    p.add_argument("--out-dir", required=True, help="folder for the exported files")
    p.add_argument("--formats", nargs="+", choices=FORMATS, default=list(FORMATS),
                   help="what to write (default: all)")
    p.add_argument("--opset", type=int, default=DEFAULT_OPSET,
                   help=f"ONNX opset (default {DEFAULT_OPSET})")
    p.add_argument("--check-images", default=None, metavar="LIST_OR_FOLDER",
                   help="images for the checks: an image list or an image folder (default: "
                        "seeded noise)")
    p.add_argument("--check-count", type=int, default=8, help="images for the checks")
    p.add_argument("--check-batch-sizes", type=int, nargs="+", default=[1, 7],
                   help="batch sizes checked (default 1 7)")
    p.add_argument("--atol", type=float, default=1e-4,
                   help="largest |exported - torch| accepted (default 1e-4, float32)")
    p.add_argument("--no-check", dest="check", action="store_false",
                   help="write the files without running them")
    return p


def main(argv: Sequence[str] | None = None) -> int:
    """Console entry; exit 2 for unusable input, 1 when a check fails."""
    args = build_parser().parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(message)s")
    try:
        if args.opset < 9 or args.opset > 20:
            raise ValueError(f"--opset {args.opset}: torch's exporter writes opsets 9..20")
        if any(b < 1 or b > 4096 for b in args.check_batch_sizes):
            raise ValueError(f"--check-batch-sizes must be 1..4096, got "
                             f"{args.check_batch_sizes}")
        if not 0 < args.atol < 1:
            raise ValueError(f"--atol must be in (0, 1), got {args.atol}")
        model = load_backbone(args.load_path, "cpu", arch=args.arch,
                              embedding_size=args.embedding_size)
        from .extract import load_checkpoint_args
        from .models import build_backbone

        _, ck_args = load_checkpoint_args(args.load_path)
        arch = args.arch or ck_args.get("arch")
        dim = int(args.embedding_size or ck_args.get("embedding_size"))
        images = check_images(args.check_images, args.check_count) if args.check else None
        manifest = export_backbone(
            model, args.out_dir, formats=args.formats, opset=args.opset, images=images,
            batch_sizes=args.check_batch_sizes, atol=args.atol,
            meta={"arch": arch, "embedding_size": dim,
                  "source": os.path.abspath(args.load_path),
                  "check_images": args.check_images or "seeded noise"},
            rebuild=lambda: build_backbone(arch, dim))
    except ExportCheckError as e:
        print(f"export: check failed: {e}", file=sys.stderr)
        return 1
    except USER_ERRORS as e:
        print(f"export: error: {e}", file=sys.stderr)
        return 2
    for fmt, name in manifest["files"].items():
        checks = (manifest["checks"] or {}).get(fmt)
        worst = f"max |diff| {max(checks.values()):.2e}" if checks else "not checked"
        print(f"{fmt:12s} {os.path.join(args.out_dir, name)}  ({worst})")
    print(f"manifest     {os.path.join(args.out_dir, 'export.json')}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
