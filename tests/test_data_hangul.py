"""The Hangul glyph set: jamo arithmetic, look-alike definitions, disjoint split,
determinism, layout, pair kinds, fonts. Needs the Korean fonts (CI installs them:
`apt-get install -y fonts-nanum fonts-baekmuk fonts-unfonts-core`)."""
import io
import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from hfsoftmax.data.accuracy_set import read_set_info
from hfsoftmax.data.hangul import (FIRST, NUM_SYLLABLES, HangulConfig, _lookalikes, jamo,
                                   make_hangul, pair_syllables, shared_jamo, split_syllables)
from hfsoftmax.data.hangul_render import APT_COMMAND, find_fonts, render_syllable
from hfsoftmax.data.insightface import InsightFaceRecDataset
from hfsoftmax.data.verification import load_bin

ROOT = Path(__file__).resolve().parents[1]
FILES = ["train.rec", "train.idx", "heldout.rec", "heldout.idx", "property", "hangul.bin"]
SMALL = dict(num_classes=40, images_per_class=2, heldout_per_class=1, num_verify_classes=300,
             num_pairs=24, seed=5)


@pytest.fixture(scope="module")
def fonts():
    try:
        return find_fonts()
    except FileNotFoundError as e:  # fail, not skip: CI installs the fonts (.ci/run)
        pytest.fail(str(e))


@pytest.fixture(scope="module")
def small_set(fonts, tmp_path_factory):
    out = tmp_path_factory.mktemp("hangul") / "a"
    return out, make_hangul(out, workers=2, **SMALL)


def test_jamo_arithmetic_and_lookalikes():
    s = ord("한") - FIRST
    assert jamo(s) == (18, 0, 4)  # ㅎ ㅏ ㄴ
    assert chr(FIRST + (18 * 21 + 0) * 28 + 4) == "한" and NUM_SYLLABLES == 11172
    assert shared_jamo(s, ord("하") - FIRST) == 2 and shared_jamo(s, ord("흔") - FIRST) == 2
    assert shared_jamo(s, ord("국") - FIRST) == 0 and shared_jamo(s, ord("각") - FIRST) == 1
    assert shared_jamo(s, ord("할") - FIRST) == 2
    every = np.arange(NUM_SYLLABLES)
    near = _lookalikes(every)
    assert {n.size for n in near} == {18 + 20 + 27}
    assert all(np.all(shared_jamo(s, near[s]) == 2) for s in (0, s, NUM_SYLLABLES - 1))


def test_split_disjoint_and_pairs_follow_definitions():
    cfg = HangulConfig(**SMALL)
    pool, train = split_syllables(cfg)
    assert pool.size == 300 and train.size == 40
    assert not set(pool.tolist()) & set(train.tolist())
    # a larger training set keeps the verification syllables and extends the classes
    pool2, train2 = split_syllables(HangulConfig(**dict(SMALL, num_classes=400)))
    assert np.array_equal(pool, pool2) and np.array_equal(train, train2[:40])
    pairs, kinds = pair_syllables(HangulConfig(**dict(SMALL, num_pairs=400)))
    shared = shared_jamo(pairs[:, 0], pairs[:, 1])
    kinds = np.array(kinds)
    assert np.all(np.isin(pairs, pool))
    assert np.all(pairs[kinds == "same", 0] == pairs[kinds == "same", 1])
    assert np.all(shared[kinds == "lookalike"] == 2)
    assert np.all(shared[kinds == "other"] <= 1)
    assert (kinds == "same").sum() == 200 and (kinds == "lookalike").sum() == 100
    with pytest.raises(ValueError, match="exceeds the 11172 syllables"):
        HangulConfig(num_classes=10000, num_verify_classes=1200).validate()
    with pytest.raises(ValueError, match="num_pairs must be even"):
        HangulConfig(num_pairs=5).validate()


def test_deterministic_bytes_any_worker_count(small_set, tmp_path):
    out, _ = small_set
    make_hangul(tmp_path / "b", workers=1, **SMALL)
    for name in FILES:
        assert (out / name).read_bytes() == (tmp_path / "b" / name).read_bytes(), name
    make_hangul(tmp_path / "c", workers=1, **dict(SMALL, seed=6))
    assert (out / "train.rec").read_bytes() != (tmp_path / "c" / "train.rec").read_bytes()


def test_layout_and_metadata(small_set):
    out, summary = small_set
    info = read_set_info(out)
    meta = json.loads((out / "hangul.json").read_text())
    assert info["set"] == "hangul" and info["num_classes"] == 40 and summary["pairs"] == 24
    train = InsightFaceRecDataset(out)
    held = InsightFaceRecDataset(out, split="heldout")
    assert train.num_classes == held.num_classes == 40
    assert train.labels().tolist() == np.repeat(np.arange(40), 2).tolist()
    assert held.labels().tolist() == list(range(40))
    data, _ = train.read_raw(0)
    assert Image.open(io.BytesIO(data)).size == (112, 112)
    x, y = held[3]
    assert x.shape == (3, 112, 112) and y == 3
    # class order = the split's; family = initial * 21 + medial
    _, syllables = split_syllables(HangulConfig(**SMALL))
    assert meta["class_syllable"] == [chr(FIRST + s) for s in syllables]
    ini, med, _ = jamo(syllables)
    assert info["class_family"].tolist() == (ini * 21 + med).tolist()
    assert [f["file"] for f in meta["fonts"]] == [Path(p).name for p in find_fonts()]
    assert all(len(f["sha256"]) == 64 for f in meta["fonts"]) and meta["versions"]["pillow"]
    # held-out images are other images than the training ones
    assert {held.read_raw(i)[0] for i in range(40)}.isdisjoint(
        train.read_raw(i)[0] for i in range(80))


def test_pairs_in_the_bin_match_their_kinds(small_set):
    out, _ = small_set
    info = read_set_info(out)
    meta = json.loads((out / "hangul.json").read_text())
    bins, issame = load_bin(info["bin_path"])
    kinds = info["pair_kind"].tolist()
    assert len(bins) == 48 and issame == [k == "same" for k in kinds]
    trained = set(meta["class_syllable"])
    for (a, b), kind in zip(meta["pair_syllables"], kinds):
        assert a not in trained and b not in trained  # never trained on
        n = int(shared_jamo(ord(a) - FIRST, ord(b) - FIRST))
        assert {"same": n == 3, "lookalike": n == 2, "other": n <= 1}[kind], (a, b, kind)
    assert all(bins[2 * i] != bins[2 * i + 1] for i in range(24))  # two images, same or not


def test_font_errors(fonts, tmp_path):
    with pytest.raises(FileNotFoundError, match="no Korean font found.*" + APT_COMMAND):
        find_fonts(dirs=(str(tmp_path),))
    with pytest.raises(FileNotFoundError, match="'nope.ttf'.*not found"):
        find_fonts(("nope.ttf",))
    # baekmuk's dotum draws only the 2,350 common syllables: named, not a blank image
    dotum = find_fonts(("dotum.ttf",))
    assert render_syllable("한", dotum, np.random.default_rng(0), 8.0)[:2] == b"\xff\xd8"
    with pytest.raises(ValueError, match="dotum.ttf has no glyph for '뷁'"):
        render_syllable("뷁", dotum, np.random.default_rng(0), 8.0)


def test_cli_once_then_skips(fonts, tmp_path):
    out = tmp_path / "cli"
    cmd = [sys.executable, str(ROOT / "datasets" / "prepare_hangul.py"), "--out", str(out),
           "--num-classes", "6", "--images-per-class", "2", "--verify-classes", "200",
           "--pairs", "4", "--fonts", "NanumGothic.ttf,UnBatang.ttf", "--workers", "1",
           "--no-progress"]
    first = subprocess.run(cmd, capture_output=True, text=True, timeout=120, cwd=tmp_path)
    assert first.returncode == 0, first.stderr
    summary = json.loads(first.stdout)
    assert summary["train_images"] == 12 and len(summary["fonts"]) == 2
    mtime = (out / "train.rec").stat().st_mtime_ns
    again = subprocess.run(cmd, capture_output=True, text=True, timeout=120, cwd=tmp_path)
    assert again.returncode == 0 and "already holds" in again.stderr
    assert (out / "train.rec").stat().st_mtime_ns == mtime
    other = subprocess.run(cmd + ["--fonts", "UnBatang.ttf"],
                           capture_output=True, text=True, timeout=120, cwd=tmp_path)
    assert other.returncode == 0 and (out / "train.rec").stat().st_mtime_ns != mtime
    bad = subprocess.run(cmd + ["--fonts", "nope.ttf"], capture_output=True, text=True,
                         timeout=120, cwd=tmp_path)
    assert bad.returncode == 2 and APT_COMMAND in bad.stderr
    syn = [sys.executable, str(ROOT / "datasets" / "prepare_synthetic.py"), "--out", str(out),
           "--num-classes", "4", "--images-per-class", "2", "--pairs", "4", "--no-progress"]
    refused = subprocess.run(syn, capture_output=True, text=True, timeout=120, cwd=tmp_path)
    assert refused.returncode == 2 and "holds the 'hangul' set" in refused.stderr
