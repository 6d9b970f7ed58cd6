"""A small IJB-format set for the tests: synthetic identities (a coarse colour pattern in
the aligned 112x112 frame), each image the identity's face placed into a larger loose crop
by a random similarity transform, with the five landmarks where that transform puts the
template's, a detector score, templates of several media of several images, and a pair
list of genuine and impostor template pairs. Layout and file formats as InsightFace's IJB
release (meta/ + loose_crop/)."""
from __future__ import annotations

import io
import os

import numpy as np

CANVAS = 150


def make_ijb(root: str | os.PathLike, num_ids: int = 12, templates_per_id: int = 3,
             media_per_template: int = 2, images_per_media: int = 2, impostors: int = 200,
             seed: int = 0, target: str = "ijbc") -> dict:
    """Write the set into ``root``; returns its counts and the per-image identity."""
    from PIL import Image

    from hfsoftmax.data.align import ARCFACE_112, warp_affine

    root = os.fspath(root)
    os.makedirs(os.path.join(root, "meta"), exist_ok=True)
    os.makedirs(os.path.join(root, "loose_crop"), exist_ok=True)
    rng = np.random.default_rng(seed)
    faces = [np.kron(rng.uniform(0, 255, (7, 7, 3)), np.ones((16, 16, 1)))
             for _ in range(num_ids)]
    tid_mid, lmk, ident, template_id = [], [], [], {}
    n, media = 0, 1000
    for i in range(num_ids):
        for t in range(templates_per_id):
            tid = 1 + i * templates_per_id + t
            template_id[tid] = i
            for _ in range(media_per_template):
                media += 1
                for _ in range(images_per_media):
                    n += 1
                    ang, s = rng.uniform(-0.3, 0.3), rng.uniform(0.8, 1.1)
                    m = np.array([[s * np.cos(ang), -s * np.sin(ang), 0.0],
                                  [s * np.sin(ang), s * np.cos(ang), 0.0]])
                    m[:, 2] = CANVAS / 2 - m[:, :2] @ np.array([56.0, 56.0]) + \
                        rng.uniform(-8, 8, 2)
                    face = np.clip(faces[i] + rng.normal(0, 6, faces[i].shape), 0, 255)
                    loose = warp_affine(face.astype(np.uint8), m, (CANVAS, CANVAS))
                    name = f"{n}.jpg"
                    buf = io.BytesIO()
                    Image.fromarray(loose).save(buf, format="JPEG", quality=95)
                    with open(os.path.join(root, "loose_crop", name), "wb") as f:
                        f.write(buf.getvalue())
                    pts = ARCFACE_112 @ m[:, :2].T + m[:, 2] + rng.normal(0, 0.5, (5, 2))
                    tid_mid.append(f"{name} {tid} {media}\n")
                    lmk.append(name + " " + " ".join(f"{v:.4f}" for v in pts.reshape(-1))
                               + f" {rng.uniform(0.6, 1.0):.5f}\n")
                    ident.append(i)
    tids = sorted(template_id)
    pairs = set()
    for a in tids:
        for b in tids:
            if a < b and template_id[a] == template_id[b]:
                pairs.add((a, b, 1))
    while len(pairs) < len([p for p in pairs if p[2]]) + impostors:
        a, b = rng.choice(tids, 2, replace=False)
        if template_id[a] != template_id[b]:
            pairs.add((int(a), int(b), 0))
    pairs = sorted(pairs)
    order = rng.permutation(len(pairs))
    with open(os.path.join(root, "meta", f"{target}_face_tid_mid.txt"), "w") as f:
        f.writelines(tid_mid)
    with open(os.path.join(root, "meta", f"{target}_name_5pts_score.txt"), "w") as f:
        f.writelines(lmk)
    with open(os.path.join(root, "meta", f"{target}_template_pair_label.txt"), "w") as f:
        f.writelines(f"{pairs[k][0]} {pairs[k][1]} {pairs[k][2]}\n" for k in order)
    return {"images": n, "templates": len(tids), "pairs": len(pairs),
            "genuine": sum(p[2] for p in pairs), "identity": ident}
