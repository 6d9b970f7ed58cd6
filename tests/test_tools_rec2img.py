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
