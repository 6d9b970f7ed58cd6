"""IJB-B / IJB-C 1:1 verification of a backbone: read the standard meta files and loose crops,
align, embed, then score with :mod:`evaluation.ijb` (torch-free: pooling and TPR@FPR).

    python -m hfsoftmax.eval_ijb --load-path runs/x/best.pth --ijb-dir /data/IJB_release/IJBC \\
        --target IJBC --out-dir runs/x/ijbc          # scripts/eval_ijb.sh wraps it

``--ijb-dir`` is the folder of InsightFace's IJB release: ``meta/<t>_face_tid_mid.txt``
(``image template media`` per image), ``meta/<t>_template_pair_label.txt`` (``template1
template2 label`` per pair), ``meta/<t>_name_5pts_score.txt`` (``image`` + 5 landmarks +
detector score per image, the same images in the same order) and ``loose_crop/<image>``,
with ``<t>`` = ``ijbc`` or ``ijbb``. Each crop is aligned to 112x112 by its five landmarks
(:func:`hfsoftmax.data.align.align_face`), embedded with and without a horizontal flip
(raw embeddings: the test modes decide about norms), and the features are combined by the
test modes (``--no-flip``, ``--no-norm-score``, ``--no-detector-score``; the defaults are
InsightFace's: flip-sum, keep the norm, weight by the detector score).

Writes ``<out>/<target>.json`` (the TPR at FPR = 1e-6 .. 1e-1 table, AUC, counts, modes,
checkpoint), ``<out>/<target>_roc.png``, ``<out>/<target>_scores.npy`` (one score per pair, in
the pair list's order) and, with ``--save-features``, ``<target>_features.npz`` (raw
embeddings of the images and their flips, detector scores) to re-score other modes with
:mod:`evaluation.ijb` without a GPU. Prints the table.
"""
from __future__ import annotations

import argparse
import logging
import os
import sys
from typing import Sequence

import numpy as np
import torch
from torch import nn

from evaluation import write_ijb_report
from evaluation.ijb import (evaluate_ijb, format_ijb_table, image_features, read_landmarks,
                            read_pairs, read_template_media)

from .extract import USER_ERRORS, add_model_args, load_backbone, resolve_device, save_npy
from .fileio import atomic_write

__all__ = ["IJBMeta", "read_ijb_meta", "AlignedCrops", "embed_with_flip", "main"]

logger = logging.getLogger(__name__)

TARGETS = ("IJBC", "IJBB")


class IJBMeta:
    """The meta files of one IJB target, checked against each other."""

    def __init__(self, root: str, target: str):
        if target not in TARGETS:
            raise ValueError(f"--target must be one of {', '.join(TARGETS)}, got {target!r}")
        t = target.lower()
        meta = os.path.join(root, "meta")
        self.root, self.target = root, target
        self.crops = os.path.join(root, "loose_crop")
        names, self.templates, self.medias = read_template_media(
            os.path.join(meta, f"{t}_face_tid_mid.txt"))
        lm_names, self.landmarks, self.scores = read_landmarks(
            os.path.join(meta, f"{t}_name_5pts_score.txt"))
        if names != lm_names:
            diff = next((i for i, (a, b) in enumerate(zip(names, lm_names)) if a != b),
                        min(len(names), len(lm_names)))
            raise ValueError(f"{meta}: {t}_face_tid_mid.txt ({len(names)} images) and "
                             f"{t}_name_5pts_score.txt ({len(lm_names)}) must list the same "
                             f"images in the same order; they differ at line {diff + 1}")
        self.names = names
        self.t1, self.t2, self.labels = read_pairs(
            os.path.join(meta, f"{t}_template_pair_label.txt"))
        if not os.path.isdir(self.crops):
            raise FileNotFoundError(f"image folder not found: {self.crops}")


def read_ijb_meta(root: str | os.PathLike, target: str = "IJBC") -> IJBMeta:
    return IJBMeta(os.fspath(root), target)


class AlignedCrops(torch.utils.data.Dataset):
    """Aligned 112x112 crops of the listed images, normalised as in training."""

    def __init__(self, folder: str, names: Sequence[str], landmarks: np.ndarray):
        self.folder, self.names, self.landmarks = folder, list(names), landmarks

    def __len__(self) -> int:
        return len(self.names)

    def __getitem__(self, i: int) -> torch.Tensor:
        from PIL import Image

        from .data.align import align_face
        from .data.image import decode_image
        from .data.transforms import normalize_uint8

        path = os.path.join(self.folder, self.names[i])
        try:
            with open(path, "rb") as f:
                data = f.read()
        except OSError as e:
            raise ValueError(f"{path}: cannot read ({e.strerror})") from None
        img: Image.Image = decode_image(data, path, size=None)
        crop = align_face(img, self.landmarks[i])
        return normalize_uint8(crop[None])[0]


@torch.no_grad()
def embed_with_flip(model: nn.Module, dataset, *, batch_size: int = 128, workers: int = 0,
                    device=None, progress: bool = False) -> tuple[np.ndarray, np.ndarray]:
    """Raw embeddings (N, D) float32 of the images and of their mirror images."""
    from tqdm import tqdm

    dev = resolve_device(device)
    model = model.to(dev).eval()
    loader = torch.utils.data.DataLoader(dataset, batch_size=batch_size, shuffle=False,
                                         num_workers=workers)
    plain, flipped = [], []
    for x in tqdm(loader, total=len(loader), desc="ijb", disable=not progress,
                  file=sys.stderr):
        x = x.to(dev, non_blocking=True)
        plain.append(model(x).float().cpu().numpy())
        flipped.append(model(torch.flip(x, dims=[3])).float().cpu().numpy())
    return np.concatenate(plain), np.concatenate(flipped)


def evaluate_model_ijb(model: nn.Module, meta: IJBMeta, *, batch_size: int = 128,
                       workers: int = 0, device=None, flip: bool = True, norm: bool = True,
                       detector: bool = True, progress: bool = False):
    """``(IJBResult, pair scores, (emb, emb_flip))`` of ``model`` on ``meta``'s target."""
    emb, emb_flip = embed_with_flip(model, AlignedCrops(meta.crops, meta.names, meta.landmarks),
                                    batch_size=batch_size, workers=workers, device=device,
                                    progress=progress)
    feats = image_features(emb, emb_flip, meta.scores, flip=flip, norm=norm,
                           detector=detector)
    modes = {"flip": flip, "norm": norm, "detector": detector}
    result, scores = evaluate_ijb(feats, meta.templates, meta.medias, meta.t1, meta.t2,
                                  meta.labels, modes=modes)
    return result, scores, (emb, emb_flip)


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m hfsoftmax.eval_ijb",
                                description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    add_model_args(p)
    p.add_argument("--ijb-dir", required=True,
                   help="folder with meta/ and loose_crop/ (InsightFace's IJB release)")
    p.add_argument("--target", choices=TARGETS, default="IJBC", help="IJBC or IJBB")
    p.add_argument("--out-dir", default=None,
                   help="reports (default: <checkpoint folder>/<target lower-case>)")
    p.add_argument("--workers", type=int, default=4, help="image loading processes")
    p.add_argument("--no-norm-score", dest="norm", action="store_false",
                   help="L2-normalise each image's feature before pooling (mode N0)")
    p.add_argument("--no-detector-score", dest="detector", action="store_false",
                   help="do not weight features by the detector score (mode D0)")
    p.add_argument("--save-features", action="store_true",
                   help="also write <target>_features.npz (raw embeddings, flips, scores)")
    return p


def main(argv: Sequence[str] | None = None) -> int:
    """Console entry; exit 2 for unusable input (named in one line)."""
    args = build_parser().parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(message)s")
    try:
        if args.batch_size < 1 or args.workers < 0:
            raise ValueError("--batch-size must be >= 1 and --workers >= 0")
        meta = read_ijb_meta(args.ijb_dir, args.target)
        out = args.out_dir or os.path.join(os.path.dirname(os.path.abspath(args.load_path)),
                                           args.target.lower())
        device = resolve_device(args.device)
        model = load_backbone(args.load_path, device, arch=args.arch,
                              embedding_size=args.embedding_size)
        logger.info("%s: %d images, %d templates' pairs (%d genuine)", args.target,
                    len(meta.names), len(meta.labels), int(meta.labels.sum()))
        result, scores, (emb, emb_flip) = evaluate_model_ijb(
            model, meta, batch_size=args.batch_size, workers=args.workers, device=device,
            flip=args.flip, norm=args.norm, detector=args.detector, progress=args.progress)
    except USER_ERRORS as e:
        print(f"eval_ijb: error: {e}", file=sys.stderr)
        return 2
    name = args.target.lower()
    write_ijb_report(result, out, name, checkpoint=os.path.abspath(args.load_path),
                     ijb_dir=os.path.abspath(args.ijb_dir), num_images=len(meta.names))
    save_npy(os.path.join(out, f"{name}_scores.npy"), scores)
    if args.save_features:
        with atomic_write(os.path.join(out, f"{name}_features.npz")) as f:
            np.savez(f, emb=emb, emb_flip=emb_flip, detector_scores=meta.scores,
                     templates=meta.templates, medias=meta.medias)
    print(format_ijb_table({f"{name} ({'F' if args.flip else '-'}"
                            f"{'N' if args.norm else '-'}{'D' if args.detector else '-'})":
                            result}))
    print(f"reports: {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
