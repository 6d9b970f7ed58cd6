"""tools/rec2img.py and tools/split_train_val.py, run as a user runs them (subprocesses)."""
import hashlib
import io
import json
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import torch
from PIL import Image

from hfsoftmax.data.filelist import ImageListDataset, read_list
from hfsoftmax.data.insightface import InsightFaceRecDataset
from hfsoftmax.data.recordio import IRHeader, RecordIOReader, RecordIOWriter, pack

ROOT = Path(__file__).resolve().parents[1]


def rec2img(*args, cwd=None):
    return subprocess.run([sys.executable, str(ROOT / "tools" / "rec2img.py"), "--no-progress",
                           *map(str, args)], capture_output=True, text=True, timeout=120,
                          cwd=cwd or ROOT)


def test_extracts_fixture_with_manifest_md5s(shared_fixtures, tmp_path):
    src = shared_fixtures / "insightface-rec"
    manifest = json.loads((src / "manifest.json").read_text())
    out = tmp_path / "out"
    # run from another folder: the script finds the package itself
    r = rec2img("--in-folder", src, "--out-folder", out, "--val-ratio", "0.25", "--workers",
                2, cwd=tmp_path)
    assert r.returncode == 0, r.stderr
    assert "42 written, 0 already complete" in r.stderr
    for rec in manifest["records"]:
        f = out / str(rec["label"]) / f"{rec['idx']}.jpg"
        assert hashlib.md5(f.read_bytes()).hexdigest() == rec["md5"]
    assert sorted(p.name for p in out.iterdir() if p.is_dir()) == sorted(map(str, range(12)))
    assert not list(out.rglob("*.tmp-*")) and not list(out.rglob("*.tmp"))  # no temp files left
    train, val = read_list(out / "train.lst"), read_list(out / "val.lst")
    assert sorted(train + val) == sorted((f"{r['label']}/{r['idx']}.jpg", r["label"])
                                         for r in manifest["records"])
    for c in range(12):  # per class: round(0.25 n) val images, at least one train image
        n = sum(1 for r in manifest["records"] if r["label"] == c)
        assert sum(1 for _, lab in val if lab == c) == min(int(0.25 * n + 0.5), n - 1)
    # the extracted files read as the .rec does, image for image
    rec_ds = InsightFaceRecDataset(src)
    lst_ds = ImageListDataset(out / "train.lst", out)
    key_to_index = {k: i for i, k in enumerate(rec_ds.keys)}
    for j in (0, 7, len(lst_ds) - 1):
        rel, label = lst_ds.items[j]
        x, y = lst_ds[j]
        x2, y2 = rec_ds[key_to_index[int(Path(rel).stem)]]
        assert y == y2 == label and torch.equal(x, x2)
    # the split is deterministic: a second extraction elsewhere gives identical lists
    r2 = rec2img("--in-folder", src, "--out-folder", tmp_path / "o2", "--val-ratio", "0.25")
    assert r2.returncode == 0, r2.stderr
    assert (tmp_path / "o2" / "val.lst").read_text() == (out / "val.lst").read_text()


def test_rerun_skips_finished_and_repairs_partial(shared_fixtures, tmp_path):
    src = shared_fixtures / "insightface-rec"
    out = tmp_path / "out"
    assert rec2img("--in-folder", src, "--out-folder", out).returncode == 0
    victim, partial = out / "0" / "1.jpg", out / "3" / "15.jpg"
    victim.unlink()
    good = partial.read_bytes()
    partial.write_bytes(good[:100])  # as if an older tool was interrupted
    untouched = out / "4" / "20.jpg"
    mtime = untouched.stat().st_mtime_ns
    r = rec2img("--in-folder", src, "--out-folder", out, "--workers", 2)
    assert r.returncode == 0, r.stderr
    assert "2 written, 40 already complete" in r.stderr
    assert victim.exists() and partial.read_bytes() == good
    assert untouched.stat().st_mtime_ns == mtime


def test_png_records_keep_format(tmp_path):
    d = tmp_path / "rec"
    d.mkdir()
    arr = np.random.default_rng(1).integers(0, 256, (112, 112, 3), dtype=np.uint8)
    buf = io.BytesIO()
    Image.fromarray(arr).save(buf, format="PNG")
    png = buf.getvalue()
    with RecordIOWriter(d / "train.rec", d / "train.idx") as w:
        w.write_idx(0, pack(IRHeader(2, [2, 3], 0, 0), b""))
        w.write_idx(1, pack(IRHeader(2, [0.0, 1.0], 1, 0), png))  # array label
        w.write_idx(2, pack(IRHeader(2, [1, 2], 0, 0), b""))
    (d / "property").write_text("1,112,112")
    r = rec2img("--in-folder", d, "--out-folder", tmp_path / "out")
    assert r.returncode == 0, r.stderr
    assert (tmp_path / "out" / "0" / "1.png").read_bytes() == png


def test_clear_errors_for_missing_and_corrupt_input(shared_fixtures, tmp_path):
    r = rec2img("--in-folder", tmp_path / "nope", "--out-folder", tmp_path / "o")
    assert r.returncode == 1 and "folder not found" in r.stderr and "Traceback" not in r.stderr
    src = tmp_path / "rec"
    shutil.copytree(shared_fixtures / "insightface-rec", src)
    for p in src.iterdir():
        p.chmod(0o644)
    rec = src / "train.rec"
    off = RecordIOReader(rec, src / "train.idx").offset(9)
    data = bytearray(rec.read_bytes())
    data[off:off + 4] = b"\0\0\0\0"
    rec.write_bytes(bytes(data))
    r = rec2img("--in-folder", src, "--out-folder", tmp_path / "o")
    assert r.returncode == 1 and "Traceback" not in r.stderr
    assert "record 9 of" in r.stderr and "bad magic" in r.stderr
    assert "--skip-corrupt" in r.stderr
    r = rec2img("--in-folder", src, "--out-folder", tmp_path / "o", "--skip-corrupt")
    assert r.returncode == 0, r.stderr
    assert "1 corrupt skipped" in r.stderr and "record 9" in r.stderr
    listed = read_list(tmp_path / "o" / "train.lst")
    assert len(listed) == 41 and not any(rel.endswith("/9.jpg") for rel, _ in listed)
    r = rec2img("--in-folder", src, "--out-folder", tmp_path / "o", "--val-ratio", "1.5")
    assert r.returncode == 1 and "--val-ratio must be in [0, 1)" in r.stderr


def test_verify_catches_undecodable_image(tmp_path):
    d = tmp_path / "rec"
    d.mkdir()
    with RecordIOWriter(d / "train.rec", d / "train.idx") as w:
        w.write_idx(0, pack(IRHeader(0, 0.0, 0, 0), b"\xff\xd8\xff\xe0 truncated jpeg"))
    (d / "property").write_text("1,112,112")
    r = rec2img("--in-folder", d, "--out-folder", tmp_path / "o", "--verify")
    assert r.returncode == 1 and "record 0 of" in r.stderr and "undecodable" in r.stderr


def test_split_train_val_tool(tmp_path):
    lines = [f"c{c}/img {k}.jpg {c}" for c in range(5) for k in range(10)]
    (tmp_path / "all.lst").write_text("\n".join(lines) + "\n")
    cmd = [sys.executable, str(ROOT / "tools" / "split_train_val.py"), "--list",
           str(tmp_path / "all.lst"), "--val-ratio", "0.2", "--seed", "5"]
    r = subprocess.run(cmd, capture_output=True, text=True, timeout=60, cwd=tmp_path)
    assert r.returncode == 0, r.stderr
    train, val = read_list(tmp_path / "train.lst"), read_list(tmp_path / "val.lst")
    assert len(train) == 40 and len(val) == 10
    assert sorted(train + val) == sorted(read_list(tmp_path / "all.lst"))
    assert all(sum(1 for _, lab in val if lab == c) == 2 for c in range(5))
    # same split from shuffled input lines
    (tmp_path / "shuf.lst").write_text("\n".join(reversed(lines)) + "\n")
    cmd2 = cmd[:3] + [str(tmp_path / "shuf.lst"), *cmd[4:], "--val-out",
                      str(tmp_path / "v2.lst"), "--train-out", str(tmp_path / "t2.lst")]
    assert subprocess.run(cmd2, capture_output=True, timeout=60).returncode == 0
    assert set(read_list(tmp_path / "v2.lst")) == set(val)
    (tmp_path / "bad.lst").write_text("a.jpg 0\nb.jpg minus\n")
    r = subprocess.run(cmd[:3] + [str(tmp_path / "bad.lst"), "--val-ratio", "0.1"],
                       capture_output=True, text=True, timeout=60)
    assert r.returncode == 1 and "bad.lst:2" in r.stderr


# -- the manifest: what a folder was extracted from ------------------------------------------

def make_rec(folder, labels, seed):
    """A small InsightFace set of JPEGs (one per label, keys 1..n) with identity records."""
    folder.mkdir(parents=True)
    rng = np.random.default_rng(seed)
    n, ids = len(labels), sorted(set(labels))
    images = {}
    with RecordIOWriter(folder / "train.rec", folder / "train.idx") as w:
        w.write_idx(0, pack(IRHeader(2, [n + 1, n + 1 + len(ids)], 0, 0), b""))
        for key, lab in enumerate(labels, 1):
            buf = io.BytesIO()
            Image.fromarray(rng.integers(0, 256, (112, 112, 3), dtype=np.uint8)).save(
                buf, format="JPEG", quality=90)
            images[f"{lab}/{key}.jpg"] = buf.getvalue()
            w.write_idx(key, pack(IRHeader(0, float(lab), key, 0), buf.getvalue()))
        for j, c in enumerate(ids):
            w.write_idx(n + 1 + j, pack(IRHeader(2, [1, 2], 0, 0), b""))
    (folder / "property").write_text(f"{len(ids)},112,112")
    return images


def files_under(out):
    return {str(p.relative_to(out)): p.read_bytes() for p in out.rglob("*.jpg")}


def test_another_source_is_refused_unless_overwrite(shared_fixtures, tmp_path):
    a = shared_fixtures / "insightface-rec"
    b = tmp_path / "b"
    b_images = make_rec(b, [0, 0, 1], seed=3)  # 0/1.jpg and 0/2.jpg collide with a's names
    out = tmp_path / "out"
    assert rec2img("--in-folder", a, "--out-folder", out).returncode == 0
    man = json.loads((out / "rec2img.json").read_text())
    assert man["complete"] is True and man["source"]["rec"] == str(a / "train.rec")
    assert man["source"]["size"] == (a / "train.rec").stat().st_size
    assert man["source"]["mtime_ns"] == (a / "train.rec").stat().st_mtime_ns
    assert len(man["source"]["fingerprint"]) == 64 and man["counts"]["written"] == 42
    before = files_under(out)
    assert len(before) == 42
    r = rec2img("--in-folder", b, "--out-folder", out)
    assert r.returncode == 2 and "Traceback" not in r.stderr
    assert str(a / "train.rec") in r.stderr and str(b / "train.rec") in r.stderr
    assert "--overwrite" in r.stderr
    assert files_under(out) == before  # nothing touched
    assert json.loads((out / "rec2img.json").read_text()) == man
    # an interrupted extraction of a is another source's too
    (out / "rec2img.json").write_text(json.dumps(dict(man, complete=False)))
    assert rec2img("--in-folder", b, "--out-folder", out).returncode == 2
    # --overwrite: a's extraction is deleted, b's is all there is (other files are kept)
    (out / "notes.txt").write_text("mine")
    r = rec2img("--in-folder", b, "--out-folder", out, "--overwrite")
    assert r.returncode == 0, r.stderr
    assert "3 written, 0 already complete" in r.stderr
    assert files_under(out) == b_images
    assert sorted(p.name for p in out.iterdir()) == ["0", "1", "notes.txt", "rec2img.json",
                                                    "train.lst", "val.lst"]
    assert sorted(read_list(out / "train.lst")) == [("0/1.jpg", 0), ("0/2.jpg", 0),
                                                    ("1/3.jpg", 1)]
    man_b = json.loads((out / "rec2img.json").read_text())
    assert man_b["source"]["rec"] == str(b / "train.rec") and man_b["complete"] is True


def test_same_source_again_is_a_no_op(shared_fixtures, tmp_path):
    src = tmp_path / "src"
    shutil.copytree(shared_fixtures / "insightface-rec", src)
    out = tmp_path / "out"
    assert rec2img("--in-folder", src, "--out-folder", out, "--val-ratio", "0.2").returncode == 0
    val_02 = len(read_list(out / "val.lst"))
    stamps = {p: p.stat().st_mtime_ns for p in out.rglob("*") if p.is_file()}
    r = rec2img("--in-folder", src, "--out-folder", out, "--val-ratio", "0.2")
    assert r.returncode == 0, r.stderr
    assert "0 written, 42 already complete" in r.stderr
    assert {p: p.stat().st_mtime_ns for p in out.rglob("*") if p.is_file()} == stamps
    # the same .rec moved elsewhere (same size and fingerprint) is the same source
    moved = tmp_path / "moved"
    src.rename(moved)
    r = rec2img("--in-folder", moved, "--out-folder", out, "--val-ratio", "0.2")
    assert r.returncode == 0 and "0 written, 42 already complete" in r.stderr
    # other options: the images are kept, the lists and the manifest follow the options
    r = rec2img("--in-folder", moved, "--out-folder", out, "--val-ratio", "0.5")
    assert r.returncode == 0 and "0 written, 42 already complete" in r.stderr
    assert json.loads((out / "rec2img.json").read_text())["options"]["val_ratio"] == 0.5
    assert len(read_list(out / "val.lst")) > val_02 > 0


def test_folder_without_manifest_is_redone(shared_fixtures, tmp_path):
    # as an older rec2img left it after extracting another set: a file under one of this
    # set's names, of the right size but other bytes, must not be taken as done
    src = shared_fixtures / "insightface-rec"
    out = tmp_path / "out"
    assert rec2img("--in-folder", src, "--out-folder", out).returncode == 0
    good = (out / "0" / "1.jpg").read_bytes()
    (out / "rec2img.json").unlink()
    (out / "0" / "1.jpg").write_bytes(bytes(len(good)))
    r = rec2img("--in-folder", src, "--out-folder", out)
    assert r.returncode == 0, r.stderr
    assert "42 written, 0 already complete" in r.stderr and "no rec2img.json" in r.stderr
    assert (out / "0" / "1.jpg").read_bytes() == good
    assert json.loads((out / "rec2img.json").read_text())["complete"] is True
    # an unreadable manifest: refused (exit 2) unless --overwrite
    (out / "rec2img.json").write_text("{not json")
    r = rec2img("--in-folder", src, "--out-folder", out)
    assert r.returncode == 2 and "not a rec2img manifest" in r.stderr
    r = rec2img("--in-folder", src, "--out-folder", out, "--overwrite")
    assert r.returncode == 0 and "42 written" in r.stderr
