"""The built-in synthetic set: determinism, layout, balanced verification pairs, families."""
import io
import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from hfsoftmax.data.insightface import InsightFaceRecDataset
from hfsoftmax.data.recordio import image_format
from hfsoftmax.data.synthetic import SyntheticConfig, _pair_spec, make_synthetic, rewrite_pairs
from hfsoftmax.data.verification import load_bin

ROOT = Path(__file__).resolve().parents[1]
FILES = ["train.rec", "train.idx", "heldout.rec", "heldout.idx", "property", "synthetic.bin"]
SMALL = dict(num_classes=40, images_per_class=4, seed=7, heldout_per_class=2, family_size=5,
             num_pairs=40)


@pytest.fixture(scope="module")
def small_set(tmp_path_factory):
    out = tmp_path_factory.mktemp("syn") / "a"
    summary = make_synthetic(out, workers=2, **SMALL)
    return out, summary


def test_deterministic_bytes_any_worker_count(small_set, tmp_path):
    out, _ = small_set
    make_synthetic(tmp_path / "b", workers=1, **SMALL)
    for name in FILES:
        assert (out / name).read_bytes() == (tmp_path / "b" / name).read_bytes(), name
    make_synthetic(tmp_path / "c", workers=1, **dict(SMALL, seed=8))
    assert (out / "train.rec").read_bytes() != (tmp_path / "c" / "train.rec").read_bytes()


def test_layout_reads_as_insightface(small_set):
    out, summary = small_set
    assert (out / "property").read_text() == "40,112,112"
    train = InsightFaceRecDataset(out)
    held = InsightFaceRecDataset(out, split="heldout")
    assert train.num_classes == held.num_classes == 40
    assert len(train) == 160 and len(held) == 80
    assert train.labels().tolist() == np.repeat(np.arange(40), 4).tolist()
    assert held.labels().tolist() == np.repeat(np.arange(40), 2).tolist()
    assert train.identity_ranges()[3] == (13, 17)
    data, _ = train.read_raw(0)
    assert image_format(data) == "jpg"
    assert Image.open(io.BytesIO(data)).size == (112, 112)
    x, y = train[5]
    assert x.shape == (3, 112, 112) and y == 1
    # held-out images are other images than the training ones
    assert set(held.read_raw(i)[0] for i in range(80)).isdisjoint(
        train.read_raw(i)[0] for i in range(160))
    assert summary["train_images"] == 160 and summary["same_pairs"] == 20


def test_verification_pairs_balanced_and_held_out(small_set):
    out, _ = small_set
    bins, issame = load_bin(out / "synthetic.bin")
    assert len(bins) == 80 and len(issame) == 40
    assert sum(issame) == 20 and issame[0] is True
    # every 10-fold split of the pairs is balanced too
    assert all(sum(issame[f * 4:(f + 1) * 4]) == 2 for f in range(10))
    cfg = SyntheticConfig(**SMALL)
    same_family_diff = 0
    for i, s in enumerate(issame):
        (fa, ca), (fb, cb) = _pair_spec(cfg, i)
        assert ca >= cfg.num_classes and cb >= cfg.num_classes  # not training identities
        assert (ca == cb) == s
        if not s and fa == fb:
            same_family_diff += 1
    assert same_family_diff == 10  # half of the different pairs are look-alikes
    # same pairs are two different images of one identity
    assert all(bins[2 * i] != bins[2 * i + 1] for i in range(40))


def _ncm(out, res=16):
    """Nearest-class-mean on downsampled pixels: held-out top-1 and its errors' families."""
    def feats(split):
        ds = InsightFaceRecDataset(out, split=split)
        xs, ys = [], []
        for i in range(len(ds)):
            b, lab = ds.read_raw(i)
            im = Image.open(io.BytesIO(b)).convert("RGB").resize((res, res), Image.BILINEAR)
            x = np.asarray(im, np.float32).ravel()
            xs.append((x - x.mean()) / (x.std() + 1e-6))
            ys.append(lab)
        return np.array(xs), np.array(ys)
    xt, yt = feats("train")
    xh, yh = feats("heldout")
    means = np.stack([xt[yt == c].mean(0) for c in range(yt.max() + 1)])
    pred = ((xh[:, None] - means[None]) ** 2).sum(-1).argmin(1)
    dm = ((means[:, None] - means[None]) ** 2).sum(-1)
    np.fill_diagonal(dm, np.inf)
    return (pred == yh).mean(), pred, yh, dm.argmin(1)


def test_identity_signal_and_look_alike_families(small_set):
    """Identities are recognisable at 16x16, and each class's nearest class (by mean image)
    is in its own family: hard negatives exist where a nearest-class sampler looks."""
    out, _ = small_set
    fam = np.array(json.loads((out / "synthetic.json").read_text())["class_family"])
    assert np.bincount(fam).tolist() == [5] * 8
    acc, pred, yh, nearest = _ncm(out)
    assert acc > 0.5  # chance is 1/40
    assert np.mean(fam[nearest] == fam) > 0.9
    wrong = pred != yh
    assert wrong.sum() == 0 or np.mean(fam[pred[wrong]] == fam[yh[wrong]]) > 0.8


def test_cli_writes_once_then_skips(tmp_path):
    out = tmp_path / "cli"
    cmd = [sys.executable, str(ROOT / "datasets" / "prepare_synthetic.py"), "--out", str(out),
           "--num-classes", "6", "--images-per-class", "2", "--pairs", "4", "--seed", "1",
           "--workers", "1", "--no-progress"]
    first = subprocess.run(cmd, capture_output=True, text=True, timeout=120, cwd=tmp_path)
    assert first.returncode == 0, first.stderr
    assert json.loads(first.stdout)["train_images"] == 12
    mtime = (out / "train.rec").stat().st_mtime_ns
    again = subprocess.run(cmd, capture_output=True, text=True, timeout=120, cwd=tmp_path)
    assert again.returncode == 0 and "already holds" in again.stderr
    assert (out / "train.rec").stat().st_mtime_ns == mtime
    more = subprocess.run(cmd[:-3] + ["--pairs", "8"] + cmd[-3:], capture_output=True,
                          text=True, timeout=120, cwd=tmp_path)
    assert more.returncode == 0 and "synthetic.bin only" in more.stderr, more.stderr
    assert json.loads(more.stdout)["pairs"] == 8
    assert (out / "train.rec").stat().st_mtime_ns == mtime
    bad = subprocess.run(cmd[:-1] + ["--pairs", "3"], capture_output=True, text=True,
                         timeout=120, cwd=tmp_path)
    assert bad.returncode == 2 and "num_pairs must be even" in bad.stderr


def test_more_pairs_rewrite_only_the_bin(small_set, tmp_path, monkeypatch):
    """A prepared set asked for another pair count gets the .bin a fresh set of that count
    has, byte for byte, and keeps its training records (not rendered again)."""
    out, _ = small_set
    copy = tmp_path / "copy"
    copy.mkdir()
    for name in FILES + ["synthetic.json"]:
        (copy / name).write_bytes((out / name).read_bytes())
    mtime = (copy / "train.rec").stat().st_mtime_ns
    summary = rewrite_pairs(copy, 80, workers=1)
    assert summary["pairs"] == 80 and summary["same_pairs"] == 40
    fresh = tmp_path / "fresh"
    make_synthetic(fresh, workers=1, **dict(SMALL, num_pairs=80))
    for name in FILES:
        assert (copy / name).read_bytes() == (fresh / name).read_bytes(), name
    assert (copy / "train.rec").stat().st_mtime_ns == mtime
    assert len(load_bin(copy / "synthetic.bin")[1]) == 80
    meta = json.loads((copy / "synthetic.json").read_text())
    assert meta["config"]["num_pairs"] == 80 and len(meta["class_family"]) == SMALL["num_classes"]
    # a crash between the .bin and synthetic.json: the set matches no pair count exactly, so
    # it is not taken as prepared, and its pairs are rewritten (only) on the next call
    import hfsoftmax.data.synthetic as syn

    def crash(*a, **k):  # the new .bin is written, then the process dies
        real_dump(*a, **k)
        raise OSError("killed")

    real_dump = syn.dump_bin
    with monkeypatch.context() as m:
        m.setattr(syn, "dump_bin", crash)
        with pytest.raises(OSError, match="killed"):
            rewrite_pairs(copy, 40, workers=1)
    for n in (40, 80):
        cfg = SyntheticConfig(**dict(SMALL, num_pairs=n))
        assert not syn._already_prepared(str(copy), cfg)
        assert syn._already_prepared(str(copy), cfg, but_pairs=True)
    rewrite_pairs(copy, 80, workers=1)
    assert (copy / "synthetic.bin").read_bytes() == (fresh / "synthetic.bin").read_bytes()
    assert syn._already_prepared(str(copy), SyntheticConfig(**dict(SMALL, num_pairs=80)))
    with pytest.raises(ValueError, match="no prepared synthetic set"):
        rewrite_pairs(tmp_path / "nothing", 80)
    with pytest.raises(ValueError, match="num_pairs must be even"):
        rewrite_pairs(copy, 81)
