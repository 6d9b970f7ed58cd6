"""A tiny InsightFace-layout training set for the trainer's tests (written with the
project's own RecordIO writer): ``num_classes`` identities, each a random coarse colour
pattern, ``per_class`` noisy JPEG variants of it. Learnable in a few dozen steps."""
from __future__ import annotations

import io
import os

import numpy as np


def make_tiny_rec(folder: str | os.PathLike, num_classes: int = 16, per_class: int = 8,
                  seed: int = 0, noise: float = 20.0) -> str:
    """Write ``train.rec``/``train.idx``/``property`` into ``folder``; returns the folder."""
    from PIL import Image

    from hfsoftmax.data.recordio import IRHeader, RecordIOWriter, pack

    folder = os.fspath(folder)
    os.makedirs(folder, exist_ok=True)
    rng = np.random.default_rng(seed)
    protos = rng.uniform(0, 255, (num_classes, 7, 7, 3))
    n_img = num_classes * per_class
    with RecordIOWriter(os.path.join(folder, "train.rec"),
                        os.path.join(folder, "train.idx")) as w:
        first_id = n_img + 1
        w.write_idx(0, pack(IRHeader(2, [first_id, first_id + num_classes], 0, 0), b""))
        key = 1
        for c in range(num_classes):
            base = np.kron(protos[c], np.ones((16, 16, 1)))
            for _ in range(per_class):
                img = np.clip(base + rng.normal(0, noise, base.shape), 0, 255).astype(np.uint8)
                buf = io.BytesIO()
                Image.fromarray(img).save(buf, format="JPEG", quality=90)
                w.write_idx(key, pack(IRHeader(0, float(c), key, 0), buf.getvalue()))
                key += 1
        for c in range(num_classes):
            a = 1 + c * per_class
            w.write_idx(first_id + c, pack(IRHeader(2, [a, a + per_class], 0, 0), b""))
    with open(os.path.join(folder, "property"), "w") as f:
        f.write(f"{num_classes},112,112")
    return folder
