"""The long-tailed synthetic set and the accuracy-set contract it shares: the size law, the
default synthetic bytes kept, determinism, layout, pair kinds, the folder rules."""
import hashlib
import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import PIL
import pytest

from hfsoftmax.data.accuracy_set import prepare_set, read_set_info
from hfsoftmax.data.insightface import InsightFaceRecDataset
from hfsoftmax.data.synthetic import (SyntheticConfig, _pair_spec, class_sizes, make_synthetic,
                                      size_law_pmf)
from hfsoftmax.data.verification import load_bin

ROOT = Path(__file__).resolve().parents[1]
FILES = ["train.rec", "train.idx", "heldout.rec", "heldout.idx", "property", "longtail.bin"]
LT = dict(num_classes=60, images_per_class=20, seed=3, heldout_per_class=1, family_size=4,
          num_pairs=24, size_law="powerlaw", size_alpha=2.0, min_images=2)

# sha256 of the files the synthetic set had before the size law existed (commit b60d7c7,
# Pillow 13.0.0) for test_data_synthetic.py's SMALL arguments
SMALL = dict(num_classes=40, images_per_class=4, seed=7, heldout_per_class=2, family_size=5,
             num_pairs=40)
SMALL_SHA256 = {
    "train.rec": "c0052295ffd5352421b667b2ae513aa887a72056d03523542a2dae59819450b6",
    "train.idx": "06175886779d0bc30b50e23225debd3bd4f1b401d0f14b3c7a3ef7224adf255f",
    "heldout.rec": "2dac7b7df947f9491fb16683ee7a8c476ed0cd1240ef32f5cac447853a91180a",
    "heldout.idx": "be383a6de76a00991026c579ee4328f4e6aa25d53cd929b590264b1681624e2a",
    "property": "144a72db28b62629319f4e64789a03842ee356b1ce61b059996850f27927f75c",
    "synthetic.bin": "75a616f21029212cfaf73408f1f30284f8f9c340df5bf660683da5f8a1206ab9",
}


@pytest.fixture(scope="module")
def lt_set(tmp_path_factory):
    out = tmp_path_factory.mktemp("lt") / "a"
    return out, make_synthetic(out, workers=2, **LT)


@pytest.mark.skipif(PIL.__version__ != "13.0.0", reason="the pinned bytes are Pillow 13.0.0's "
                    "JPEG encoder's (requirements.txt); another Pillow encodes other bytes")
def test_default_synthetic_bytes_unchanged(tmp_path):
    """The constant-size default writes what the set wrote before class sizes could vary."""
    make_synthetic(tmp_path / "s", workers=2, **SMALL)
    got = {n: hashlib.sha256((tmp_path / "s" / n).read_bytes()).hexdigest()
           for n in SMALL_SHA256}
    assert got == SMALL_SHA256
    meta = json.loads((tmp_path / "s" / "synthetic.json").read_text())
    assert meta["config"] == SMALL | {"identity_deviation": 0.18, "noise": 6.0}  # as before
    assert meta["set"] == "synthetic" and meta["class_size"] == [4] * 40


def test_size_law_shape():
    """Counts of each size follow C * P(k) within one class; min and max are respected."""
    cfg = SyntheticConfig(num_classes=5000, images_per_class=50, size_law="powerlaw",
                          size_alpha=2.0, min_images=2)
    sizes = class_sizes(cfg)
    k, p = size_law_pmf(cfg)
    counts = np.bincount(sizes, minlength=51)[2:]
    assert np.all(np.abs(counts - 5000 * p) <= 1), (counts, 5000 * p)
    assert sizes.min() == 2 and sizes.max() == 50
    assert 5.4 < sizes.mean() < 5.8 and abs(sizes.mean() - (k * p).sum()) < 0.05
    assert np.median(sizes) == 3 and np.mean(sizes == 2) > 0.39  # many with few images
    # a seed shuffles which class gets which size, not the histogram
    other = class_sizes(SyntheticConfig(**dict(vars(cfg), seed=1)))
    assert np.array_equal(np.sort(other), np.sort(sizes)) and not np.array_equal(other, sizes)
    steep = class_sizes(SyntheticConfig(**dict(vars(cfg), size_alpha=3.0)))
    assert steep.mean() < sizes.mean() and steep.min() == 2
    with pytest.raises(ValueError, match="min_images must lie in"):
        SyntheticConfig(**dict(vars(cfg), min_images=60)).validate()
    with pytest.raises(ValueError, match="size_law='powerlaw' only"):
        SyntheticConfig(min_images=3).validate()
    with pytest.raises(ValueError, match="Invalid size_law 'zipf'"):
        SyntheticConfig(size_law="zipf").validate()
    with pytest.raises(ValueError, match="must be <= 100000, got 1000000"):
        SyntheticConfig(**dict(vars(cfg), images_per_class=10**6)).validate()


def test_deterministic_bytes_any_worker_count(lt_set, tmp_path):
    out, _ = lt_set
    make_synthetic(tmp_path / "b", workers=1, **LT)
    for name in FILES:
        assert (out / name).read_bytes() == (tmp_path / "b" / name).read_bytes(), name
    make_synthetic(tmp_path / "c", workers=1, **dict(LT, seed=4))
    assert (out / "train.rec").read_bytes() != (tmp_path / "c" / "train.rec").read_bytes()


def test_layout_and_contract(lt_set):
    out, summary = lt_set
    info = read_set_info(out)
    sizes = class_sizes(SyntheticConfig(**LT))
    assert info["set"] == "longtail" and info["bin_path"] == str(out / "longtail.bin")
    assert info["class_size"].tolist() == sizes.tolist()
    assert info["train_images"] == summary["train_images"] == sizes.sum()
    assert (out / "property").read_text() == "60,112,112"
    train = InsightFaceRecDataset(out)
    held = InsightFaceRecDataset(out, split="heldout")
    assert len(train) == sizes.sum() and len(held) == 60
    assert train.labels().tolist() == np.repeat(np.arange(60), sizes).tolist()
    assert held.labels().tolist() == list(range(60))
    starts = np.concatenate([[1], 1 + np.cumsum(sizes)])
    assert train.identity_ranges()[7] == (starts[7], starts[8])
    x, y = train[int(sizes[0])]  # the first image of class 1
    assert x.shape == (3, 112, 112) and y == 1
    assert np.bincount(info["class_family"]).tolist() == [4] * 15


def test_pair_kinds_match_the_pairs(lt_set):
    out, _ = lt_set
    info = read_set_info(out)
    bins, issame = load_bin(info["bin_path"])
    kinds = info["pair_kind"]
    assert len(bins) == 48 and issame == [k == "same" for k in kinds]
    assert (kinds == "lookalike").sum() == (kinds == "other").sum() == 6
    cfg = SyntheticConfig(**LT)
    for i, kind in enumerate(kinds):
        (fa, ca), (fb, cb) = _pair_spec(cfg, i)
        assert min(ca, cb) >= cfg.num_classes  # identities not in training
        assert (ca == cb) == (kind == "same")
        assert (fa == fb and ca != cb) == (kind == "lookalike")
        assert (fa != fb) == (kind == "other")


def test_legacy_synthetic_json_reads_by_index(tmp_path):
    """A synthetic folder from before the contract (no set/bin/pair_kind) reads the same way,
    its pair kinds from the index rule; an interrupted prepare is refused by name."""
    make_synthetic(tmp_path / "s", workers=1, num_classes=6, images_per_class=2, num_pairs=8,
                   family_size=3, seed=0)
    meta = json.loads((tmp_path / "s" / "synthetic.json").read_text())
    new = read_set_info(tmp_path / "s")
    legacy = {k: meta[k] for k in ("format_version", "config", "workers", "train_images",
                                   "heldout_images", "pairs", "same_pairs", "families",
                                   "seconds", "images_per_s", "class_family")}
    (tmp_path / "s" / "synthetic.json").write_text(json.dumps(legacy))
    old = read_set_info(tmp_path / "s")
    assert old["pair_kind"].tolist() == new["pair_kind"].tolist() == ["same", "lookalike",
                                                                      "same", "other"] * 2
    assert old["class_size"].tolist() == [2] * 6 and old["set"] == "synthetic"
    (tmp_path / "s" / "synthetic.json").write_text(json.dumps(dict(meta, complete=False)))
    with pytest.raises(ValueError, match="incomplete.*prepare_synthetic.py"):
        read_set_info(tmp_path / "s")
    with pytest.raises(ValueError, match="no accuracy-set metadata.*prepare_hangul.py"):
        read_set_info(tmp_path)


def _cli(out, *extra, cwd):
    cmd = [sys.executable, str(ROOT / "datasets" / "prepare_longtail.py"), "--out", str(out),
           "--num-classes", "8", "--max-images", "6", "--pairs", "4", "--seed", "1",
           "--workers", "1", "--no-progress", *extra]
    return subprocess.run(cmd, capture_output=True, text=True, timeout=120, cwd=cwd)


def test_cli_once_then_skips_and_guards_other_sets(tmp_path):
    out = tmp_path / "cli"
    first = _cli(out, cwd=tmp_path)
    assert first.returncode == 0, first.stderr
    summary = json.loads(first.stdout)
    assert summary["set"] == "longtail" and summary["class_size_max"] <= 6
    mtime = (out / "train.rec").stat().st_mtime_ns
    again = _cli(out, cwd=tmp_path)
    assert again.returncode == 0 and "already holds" in again.stderr
    assert (out / "train.rec").stat().st_mtime_ns == mtime
    # another set's folder is refused naming it; --force replaces it
    syn = [sys.executable, str(ROOT / "datasets" / "prepare_synthetic.py"), "--out", str(out),
           "--num-classes", "4", "--images-per-class", "2", "--pairs", "4", "--workers", "1",
           "--no-progress"]
    refused = subprocess.run(syn, capture_output=True, text=True, timeout=120, cwd=tmp_path)
    assert refused.returncode == 2 and "holds the 'longtail' set" in refused.stderr
    assert (out / "train.rec").stat().st_mtime_ns == mtime
    forced = subprocess.run(syn + ["--force"], capture_output=True, text=True, timeout=120,
                            cwd=tmp_path)
    assert forced.returncode == 0, forced.stderr
    assert not (out / "longtail.json").exists() and not (out / "longtail.bin").exists()
    assert read_set_info(out)["set"] == "synthetic"
    # a user's InsightFace folder (a train.rec without metadata) is not overwritten
    (out / "synthetic.json").unlink()
    mine = _cli(out, cwd=tmp_path)
    assert mine.returncode == 2 and "no prepare script wrote" in mine.stderr
    # the benchmark's entry: a set by name, the script's arguments
    summary = prepare_set("longtail", ["--out", str(tmp_path / "api"), "--num-classes", "5",
                                       "--max-images", "4", "--pairs", "4", "--workers", "1",
                                       "--no-progress"])
    assert summary["set"] == "longtail" and read_set_info(tmp_path / "api")["num_classes"] == 5
    with pytest.raises(ValueError, match="Unknown accuracy set 'faces'; valid: \\['hangul'"):
        prepare_set("faces", [])
    bad = _cli(tmp_path / "bad", "--min-images", "9", cwd=tmp_path)
    assert bad.returncode == 2 and "min_images must lie in [1, images_per_class=6]" in bad.stderr
