"""IJB-B/C 1:1 verification: alignment, the pooling order (media, then template), the
TPR@FPR table against a naive per-pair, per-template re-implementation, and whole runs on
a small IJB-format set built here (a model that separates identities: TPR near 1; one whose
features carry no identity: near chance)."""
from __future__ import annotations

import json
import os
import subprocess
import sys

import numpy as np
import pytest
import torch

from evaluation.ijb import (TARGET_FPRS, evaluate_ijb, image_features, read_pairs, roc,
                            template_features, tpr_at_fpr)
from hfsoftmax.data.align import ARCFACE_112, align_face, similarity_transform, warp_affine
from hfsoftmax.eval_ijb import evaluate_model_ijb, main, read_ijb_meta
from tests.ijb_data import make_ijb

pytestmark = pytest.mark.timeout(300)
torch.set_num_threads(1)
ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


# ---------------------------------------------------------------------------- alignment
def test_similarity_transform_recovers_a_known_one():
    rng = np.random.default_rng(0)
    a, s = 0.4, 1.7
    m = np.array([[s * np.cos(a), -s * np.sin(a), 12.5], [s * np.sin(a), s * np.cos(a), -3.0]])
    src = rng.uniform(0, 100, (5, 2))
    assert np.allclose(similarity_transform(src, src @ m[:, :2].T + m[:, 2]), m, atol=1e-10)
    mirrored = src * [-1, 1]  # the best similarity is not a reflection
    got = similarity_transform(src, mirrored)
    assert np.linalg.det(got[:, :2]) > 0
    with pytest.raises(ValueError, match="coincide"):
        similarity_transform(np.ones((5, 2)), src)


def test_warp_is_bilinear_with_integer_pixel_centres():
    rng = np.random.default_rng(1)
    img = rng.uniform(0, 255, (40, 50, 3)).astype(np.uint8)
    m = np.array([[0.9, -0.2, 4.3], [0.2, 0.9, -2.6]])
    out = warp_affine(img, m, (30, 20)).astype(float)
    inv = np.linalg.inv(np.vstack([m, [0, 0, 1]]))
    p = img.astype(float)
    for y in range(20):
        for x in range(30):
            u, v = inv[:2] @ [x, y, 1]
            x0, y0 = int(np.floor(u)), int(np.floor(v))
            if 0 <= x0 < 49 and 0 <= y0 < 39:
                fx, fy = u - x0, v - y0
                ref = ((1 - fx) * (1 - fy) * p[y0, x0] + fx * (1 - fy) * p[y0, x0 + 1]
                       + (1 - fx) * fy * p[y0 + 1, x0] + fx * fy * p[y0 + 1, x0 + 1])
                assert np.abs(out[y, x] - ref).max() <= 1.0 + 1e-6, (x, y)  # uint8 rounding


def test_alignment_undoes_the_placement(tmp_path):
    make_ijb(tmp_path, num_ids=2, templates_per_id=1, media_per_template=1,
             images_per_media=2, impostors=1)
    meta = read_ijb_meta(tmp_path, "IJBC")
    from PIL import Image

    crops = [align_face(Image.open(tmp_path / "loose_crop" / n), meta.landmarks[i])
             for i, n in enumerate(meta.names)]
    same = np.abs(crops[0][8:-8, 8:-8].astype(float) - crops[1][8:-8, 8:-8]).mean()
    other = np.abs(crops[0][8:-8, 8:-8].astype(float) - crops[2][8:-8, 8:-8]).mean()
    assert same < 12 < 40 < other


# ---------------------------------------------------------------------------- metrics
def naive_template(feats, templates, medias, t):
    by_media = {}
    for f, tt, m in zip(feats, templates, medias):
        if tt == t:
            by_media.setdefault(m, []).append(f)
    total = sum(np.mean(v, axis=0) for v in by_media.values())
    return total / np.linalg.norm(total)


def naive_table(feats, templates, medias, t1, t2, labels):
    scores = np.array([naive_template(feats, templates, medias, a)
                       @ naive_template(feats, templates, medias, b) for a, b in zip(t1, t2)])
    pos, neg = labels.sum(), (1 - labels).sum()
    points = [(0.0, 0.0)]
    for thr in sorted(set(scores.tolist()), reverse=True):
        acc = scores >= thr
        points.append(((acc & (labels == 0)).sum() / neg, (acc & (labels == 1)).sum() / pos))
    table = []
    for x in TARGET_FPRS:
        best, tpr = None, None
        for f, t in points:  # the closest FPR; ties: the later point (InsightFace's rule)
            if best is None or abs(f - x) <= best:
                best, tpr = abs(f - x), t
        table.append(tpr)
    return scores, table


def random_set(seed, n=90, d=6, ntemplates=15):
    rng = np.random.default_rng(seed)
    templates = rng.integers(1, ntemplates + 1, n)
    templates[:ntemplates] = np.arange(1, ntemplates + 1)  # every template has an image
    medias = rng.integers(100, 110, n)
    feats = rng.normal(size=(n, d)) + np.eye(d)[templates % d] * 2
    t1 = rng.integers(1, ntemplates + 1, 400)
    t2 = rng.integers(1, ntemplates + 1, 400)
    labels = (t1 % 3 == t2 % 3).astype(np.int64)
    return feats, templates, medias, t1, t2, labels


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_table_equals_a_naive_per_pair_per_template_computation(seed):
    feats, templates, medias, t1, t2, labels = random_set(seed)
    result, scores = evaluate_ijb(feats, templates, medias, t1, t2, labels)
    ref_scores, ref_table = naive_table(feats, templates, medias, t1, t2, labels)
    assert np.allclose(scores, ref_scores, atol=1e-12)
    assert result.tprs == ref_table  # exactly: the same counts over the same pairs
    assert result.num_pairs == 400 and result.num_templates == 15


def test_tied_scores_and_the_closest_point_rule():
    # ties within a label and across labels; 4 impostors: FPRs are exact quarters
    scores = np.array([0.9, 0.9, 0.8, 0.7, 0.7, 0.6, 0.5, 0.4, 0.1])
    labels = np.array([1, 0, 1, 1, 0, 1, 0, 0, 1])
    fpr, tpr, thr = roc(scores, labels)
    assert thr[0] == np.inf and list(thr[1:]) == [0.9, 0.8, 0.7, 0.6, 0.5, 0.4, 0.1]
    assert list(fpr) == [0, 0.25, 0.25, 0.5, 0.5, 0.75, 1.0, 1.0]
    assert list(tpr) == [0, 0.2, 0.4, 0.6, 0.8, 0.8, 0.8, 1.0]
    # on a point: the highest TPR at that FPR; 0.375, as close to 0.25 as to 0.5: the
    # later point; 0.6: the nearer 0.5; 1e-6: the start
    assert tpr_at_fpr(fpr, tpr, [0.25, 0.375, 0.6, 1e-6, 0.9]) == [0.4, 0.8, 0.8, 0.0, 1.0]


def test_media_are_pooled_before_templates():
    a, b = np.array([1.0, 0.0]), np.array([0.0, 1.0])
    feats = np.stack([a, a, a, b])
    tids, tf = template_features(feats, [7, 7, 7, 7], [1, 1, 1, 2])
    assert tids.tolist() == [7]
    assert np.allclose(tf[0], [2 ** -0.5, 2 ** -0.5])  # mean per media, then sum
    flat = (3 * a + b) / np.linalg.norm(3 * a + b)
    assert not np.allclose(tf[0], flat)
    # the same media id in two templates is pooled within each template
    tids, tf = template_features(feats, [7, 7, 8, 8], [1, 1, 1, 2])
    assert np.allclose(tf[1], [2 ** -0.5, 2 ** -0.5]) and np.allclose(tf[0], a)


def test_test_modes():
    rng = np.random.default_rng(3)
    e, ef, s = rng.normal(size=(4, 3)), rng.normal(size=(4, 3)), rng.uniform(0.5, 1, 4)
    assert np.allclose(image_features(e, ef, s), (e + ef) * s[:, None])
    assert np.allclose(image_features(e, None, s, flip=False, norm=False, detector=False),
                       e / np.linalg.norm(e, axis=1, keepdims=True))
    with pytest.raises(ValueError, match="detector score"):
        image_features(e, ef, None)


# ---------------------------------------------------------------------------- whole runs
class Separates(torch.nn.Module):
    """The aligned crop's coarse colour pattern (what makes an identity here), centred."""

    def forward(self, x):
        f = torch.nn.functional.adaptive_avg_pool2d(x, 7).flatten(1)
        return f - f.mean(1, keepdim=True)


class NoIdentity(torch.nn.Module):
    """Random features: nothing of the image in them."""

    def __init__(self):
        super().__init__()
        self.g = torch.Generator().manual_seed(0)

    def forward(self, x):
        return torch.randn(x.shape[0], 16, generator=self.g)


@pytest.fixture(scope="module")
def ijb(tmp_path_factory):
    root = tmp_path_factory.mktemp("IJBC")
    info = make_ijb(root, impostors=400)
    return root, info


def test_a_model_that_separates_identities_scores_near_1_and_noise_near_chance(ijb):
    root, info = ijb
    meta = read_ijb_meta(root, "IJBC")
    assert len(meta.names) == info["images"] == 144
    good, _, _ = evaluate_model_ijb(Separates(), meta, batch_size=32)
    assert min(good.tprs) > 0.95 and good.auc > 0.99
    bad, _, _ = evaluate_model_ijb(NoIdentity(), meta, batch_size=32)
    at = bad.tpr_at_fpr
    assert at[0.1] < 0.3 and at[1e-2] < 0.15 and 0.35 < bad.auc < 0.65


def test_cli_and_script_write_the_reports(ijb, tmp_path):
    from hfsoftmax.models import build_backbone

    root, info = ijb
    torch.manual_seed(0)
    ckpt = tmp_path / "last.pth"
    torch.save({"model": build_backbone("convnet-s", 8).state_dict(),
                "args": {"arch": "convnet-s", "embedding_size": 8}}, ckpt)
    out = tmp_path / "out"
    assert main(["--load-path", str(ckpt), "--ijb-dir", str(root), "--out-dir", str(out),
                 "--workers", "0", "--no-progress", "--save-features"]) == 0
    report = json.loads((out / "ijbc.json").read_text())
    assert set(report["table"]) == {"1e-06", "1e-05", "0.0001", "0.001", "0.01", "0.1"}
    assert report["num_pairs"] == info["pairs"] and report["num_genuine"] == info["genuine"]
    assert report["modes"] == {"flip": True, "norm": True, "detector": True}
    assert (out / "ijbc_roc.png").stat().st_size > 1000
    scores = np.load(out / "ijbc_scores.npy")
    t1, t2, _ = read_pairs(root / "meta" / "ijbc_template_pair_label.txt")
    assert scores.shape == t1.shape
    # the saved features re-score torch-free to the same numbers
    z = np.load(out / "ijbc_features.npz")
    _, labels = None, read_pairs(root / "meta" / "ijbc_template_pair_label.txt")[2]
    again, s2 = evaluate_ijb(image_features(z["emb"], z["emb_flip"], z["detector_scores"]),
                             z["templates"], z["medias"], t1, t2, labels)
    assert again.tprs == [report["table"][f"{t:g}"] for t in TARGET_FPRS]
    r = subprocess.run(["sh", os.path.join(ROOT, "scripts", "eval_ijb.sh"), str(ckpt),
                        str(root), str(tmp_path / "sh"), "IJBC", "--workers", "0",
                        "--no-progress", "--no-detector-score"],
                       capture_output=True, text=True, timeout=240,
                       env={**os.environ, "PYTHON": sys.executable})
    assert r.returncode == 0, r.stderr
    assert "1e-06" in r.stdout and (tmp_path / "sh" / "ijbc.json").is_file()


def test_inconsistent_meta_files_exit_2(ijb, tmp_path, capsys):
    import shutil

    root, _ = ijb
    bad = tmp_path / "bad"
    shutil.copytree(root, bad)
    ckpt = tmp_path / "c.pth"
    from hfsoftmax.models import build_backbone
    torch.save({"model": build_backbone("convnet-s", 8).state_dict(),
                "args": {"arch": "convnet-s", "embedding_size": 8}}, ckpt)
    pairs = bad / "meta" / "ijbc_template_pair_label.txt"
    pairs.write_text(pairs.read_text() + "1 9999 0\n")
    base = ["--load-path", str(ckpt), "--ijb-dir", str(bad), "--workers", "0",
            "--out-dir", str(tmp_path / "o")]
    assert main(base) == 2
    assert "template 9999" in capsys.readouterr().err
    lm = bad / "meta" / "ijbc_name_5pts_score.txt"
    lines = lm.read_text().splitlines(keepends=True)
    lm.write_text("".join([lines[1], lines[0], *lines[2:]]))
    assert main(base) == 2
    assert "differ at line 1" in capsys.readouterr().err
    lm.write_text("1.jpg 1 2 3\n")
    assert main(base) == 2
    assert "ijbc_name_5pts_score.txt:1: expected 'image_name' then 10" in capsys.readouterr().err


def test_ijb_metrics_never_import_torch():
    code = ("import sys, numpy as np; from evaluation.ijb import evaluate_ijb; "
            "r = np.random.default_rng(0); "
            "evaluate_ijb(r.normal(size=(20, 4)), np.arange(20) % 5, np.arange(20), "
            "[0, 1, 2, 3], [1, 2, 3, 4], [1, 0, 1, 0]); "
            "bad = [m for m in ('torch', 'hfsoftmax') if m in sys.modules]; assert not bad, bad")
    subprocess.run([sys.executable, "-c", code], check=True, cwd=ROOT, timeout=60)


def test_eval_ijb_sh_without_arguments_prints_its_usage():
    r = subprocess.run(["sh", os.path.join(ROOT, "scripts", "eval_ijb.sh"), "a", "b"],
                       capture_output=True, text=True, timeout=30,
                       env={**os.environ, "PYTHON": "false"})
    assert r.returncode == 2 and r.stdout == "" and "usage:" in r.stderr
