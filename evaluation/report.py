"""Verification reports: a JSON file, a ROC plot (PNG) and a plain-text table.

>>> from evaluation import evaluate, write_report, format_table
>>> # result = evaluate(embeddings, issame); write_report(result, "out/lfw", name="lfw")
"""
from __future__ import annotations

import io
import json
import logging
import os
import tempfile
from pathlib import Path
from typing import Mapping

from .verification import VerificationResult

logger = logging.getLogger(__name__)


def atomic_write_bytes(path: Path, data: bytes) -> None:
    """Write ``data`` to ``path`` via a temp file in the same folder, fsync, make it 0644
    and rename."""
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        os.chmod(tmp, 0o644)  # world-readable, as a plain open() would make it (not mkstemp's 0600)
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.unlink(tmp)
        raise


def write_json_report(result: VerificationResult, path: str | os.PathLike, **extra) -> Path:
    """Write ``result`` (plus ``extra`` keys such as name, model, bin path) as JSON, atomically."""
    path = Path(path)
    payload = {**extra, **result.to_dict()}
    atomic_write_bytes(path, (json.dumps(payload, indent=2) + "\n").encode())
    return path


def save_roc_png(result: VerificationResult, path: str | os.PathLike, title: str = "") -> Path:
    """Plot the fold-averaged ROC (TPR vs FPR, log-scaled FPR) to a PNG, atomically."""
    import matplotlib

    matplotlib.use("Agg")  # headless: no display on servers and CI
    import matplotlib.pyplot as plt
    import numpy as np

    path = Path(path)
    fpr = np.asarray(result.fpr)
    tpr = np.asarray(result.tpr)
    fig, ax = plt.subplots(figsize=(5, 4), dpi=100)
    try:
        ax.plot(fpr, tpr, lw=1.5, label=f"acc {100 * result.accuracy:.2f}%  AUC {result.auc:.4f}")
        ax.set_xscale("symlog", linthresh=1e-3)
        ax.set_xlim(0, 1)
        ax.set_ylim(0, 1.01)
        ax.set_xlabel("false positive rate")
        ax.set_ylabel("true positive rate")
        ax.set_title(title or "ROC")
        ax.grid(True, which="both", alpha=0.3)
        ax.legend(loc="lower right")
        fig.tight_layout()
        png = io.BytesIO()
        fig.savefig(png, format="png")
        atomic_write_bytes(path, png.getvalue())
    finally:
        plt.close(fig)
    return path


def write_report(result: VerificationResult, out_dir: str | os.PathLike, name: str,
                 **extra) -> dict[str, Path]:
    """Write ``<out_dir>/<name>.json`` and ``<out_dir>/<name>_roc.png``; return both paths."""
    out_dir = Path(out_dir)
    json_path = write_json_report(result, out_dir / f"{name}.json", name=name, **extra)
    png_path = save_roc_png(result, out_dir / f"{name}_roc.png", title=f"ROC: {name}")
    logger.info("wrote %s and %s", json_path, png_path)
    return {"json": json_path, "roc": png_path}


def issame_path(features_path: str | os.PathLike) -> Path:
    """Where the pair labels of a ``.bin``'s features go: ``lfw.npy`` -> ``lfw_issame.npy``."""
    p = Path(features_path)
    stem = p.name[:-4] if p.name.endswith(".npy") else p.name
    return p.with_name(f"{stem}_issame.npy")


TABLE_HEADER = ("name", "pairs", "accuracy (%)", "VAL@FAR (%)", "FAR (%)", "threshold")


def table_row(name: str, result: VerificationResult) -> tuple[str, ...]:
    """One table row; the numbers are formatted here once, so callers can compare strings."""
    return (name, str(result.num_pairs),
            f"{100 * result.accuracy:.2f} ± {100 * result.accuracy_std:.2f}",
            f"{100 * result.val:.2f} ± {100 * result.val_std:.2f}",
            f"{100 * result.far:.3f}", f"{result.best_threshold:.2f}")


def format_table(results: Mapping[str, VerificationResult]) -> str:
    """A fixed-width text table of ``{name: result}`` (name, pairs, acc mean ± std, VAL@FAR,
    achieved FAR, best threshold), ready to print."""
    far_targets = {r.far_target for r in results.values()}
    header = list(TABLE_HEADER)
    if len(far_targets) == 1:
        header[3] = f"VAL@FAR={next(iter(far_targets)):g} (%)"
    rows = [tuple(header)] + [table_row(n, r) for n, r in results.items()]
    widths = [max(len(row[i]) for row in rows) for i in range(len(header))]
    lines = ["  ".join(cell.ljust(w) for cell, w in zip(row, widths)).rstrip() for row in rows]
    lines.insert(1, "  ".join("-" * w for w in widths))
    return "\n".join(lines)


def write_ijb_report(result, out_dir: str | os.PathLike, name: str, **extra) -> dict[str, Path]:
    """An IJB result (:class:`evaluation.ijb.IJBResult`): ``<name>.json`` (the TPR@FPR
    table, counts, AUC, modes, a log-spaced ROC sample and ``extra``) and ``<name>_roc.png``
    (TPR against log FPR from 1e-6, as InsightFace plots it), both written atomically."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import numpy as np

    out_dir = Path(out_dir)
    json_path = out_dir / f"{name}.json"
    atomic_write_bytes(json_path, (json.dumps({"name": name, **extra, **result.to_dict()},
                                              indent=2) + "\n").encode())
    fpr, tpr = np.asarray(result.fpr), np.asarray(result.tpr)
    fig, ax = plt.subplots(figsize=(5, 4), dpi=100)
    try:
        keep = fpr > 0
        ax.plot(fpr[keep], tpr[keep], lw=1.5, drawstyle="steps-post",
                label=f"{name} (AUC {100 * result.auc:.2f}%)")
        ax.set_xscale("log")
        ax.set_xlim(1e-6, 1.0)
        ax.set_ylim(0.0, 1.01)
        ax.set_xlabel("false positive rate")
        ax.set_ylabel("true positive rate")
        ax.set_title(f"ROC: {name} ({result.num_pairs} pairs)")
        ax.grid(True, which="both", alpha=0.3)
        ax.legend(loc="lower right")
        fig.tight_layout()
        png = io.BytesIO()
        fig.savefig(png, format="png")
        png_path = out_dir / f"{name}_roc.png"
        atomic_write_bytes(png_path, png.getvalue())
    finally:
        plt.close(fig)
    logger.info("wrote %s and %s", json_path, png_path)
    return {"json": json_path, "roc": png_path}
