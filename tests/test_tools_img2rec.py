"""tools/img2rec.py: an image folder or list packed with the project's RecordIO writer, read
back by the trainer's reader and by tools/rec2img.py byte for byte; resuming after a
kill; refusals; the flat layout; and the trainer's --train-folder."""
from __future__ import annotations

import io
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from hfsoftmax.data.folder import scan_image_folder
from hfsoftmax.data.insightface import InsightFaceRecDataset
from hfsoftmax.data.recordio import MAGIC

pytestmark = pytest.mark.timeout(300)
ROOT = Path(__file__).resolve().parents[1]


def tool(name, *args):
    return subprocess.run([sys.executable, str(ROOT / "tools" / f"{name}.py"), "--no-progress",
                           *map(str, args)], capture_output=True, text=True, timeout=240,
                          env={**os.environ, "PYTHONPATH": str(ROOT)})


def encoded(seed, fmt="JPEG", size=112):
    rng = np.random.default_rng(seed)
    base = np.kron(rng.uniform(0, 255, (7, 7, 3)), np.ones((size // 7, size // 7, 1)))
    buf = io.BytesIO()
    Image.fromarray(base.astype(np.uint8)).save(buf, format=fmt)
    return buf.getvalue()


def with_magic(png: bytes) -> bytes:
    """A PNG with MXNet's magic word after its end, at a 4-byte aligned place of the record
    payload (24-byte header + image): the writer must split the record there."""
    pad = (-(24 + len(png))) % 4
    data = png + b"\0" * pad + MAGIC.to_bytes(4, "little") + b"tail"
    assert (24 + data.index(MAGIC.to_bytes(4, "little"))) % 4 == 0
    return data


@pytest.fixture()
def folder(tmp_path):
    root = tmp_path / "faces"
    files = {"alice": [("a1.jpg", encoded(1)), ("a2.jpg", encoded(2)), ("a3.jpg", encoded(3))],
             "bob": [("b1.png", encoded(4, "PNG")), ("b2.png", with_magic(encoded(5, "PNG")))],
             "carol": [("10.jpg", encoded(6)), ("2.jpg", encoded(7)), ("3.jpeg", encoded(8))]}
    for cls, items in files.items():
        (root / cls).mkdir(parents=True)
        for name, data in items:
            (root / cls / name).write_bytes(data)
    (root / "bob" / "notes.txt").write_text("not an image")
    return root


def read_all(folder):
    return {n: (folder / n).read_bytes() for n in ("train.rec", "train.idx", "property",
                                                   "img2rec.lst")}


def test_image_folder_round_trips_through_rec2img_byte_exact(folder, tmp_path):
    rec = tmp_path / "rec"
    r = tool("img2rec", "--image-folder", folder, "--out-folder", rec)
    assert r.returncode == 0, r.stderr
    ds = InsightFaceRecDataset(rec)
    assert len(ds) == 8 and ds.num_classes == 3
    assert ds.labels().tolist() == [0, 0, 0, 1, 1, 2, 2, 2]
    assert ds.identity_ranges() == [(1, 4), (4, 6), (6, 9)]
    assert (rec / "classes.txt").read_text().split() == ["alice", "bob", "carol"]
    listed = [line.split() for line in (rec / "img2rec.lst").read_text().splitlines()]
    assert [p for p, _ in listed][5:] == ["carol/2.jpg", "carol/3.jpeg", "carol/10.jpg"]
    man = json.loads((rec / "img2rec.json").read_text())
    assert man["complete"] and man["counts"]["records"] == 8

    out = tmp_path / "images"
    r = tool("rec2img", "--in-folder", rec, "--out-folder", out)
    assert r.returncode == 0, r.stderr
    extracted = sorted(p for p in out.rglob("*") if p.is_file() and p.parent != out)
    assert len(extracted) == 8
    for key, (rel, label) in enumerate(listed, 1):
        ext = ".jpg" if rel.endswith((".jpg", ".jpeg")) else ".png"
        assert (out / label / f"{key}{ext}").read_bytes() == (folder / rel).read_bytes(), rel
    # the extracted folder (numbered classes and files) packs into the very same bytes
    again = tmp_path / "again"
    assert tool("img2rec", "--image-folder", out, "--out-folder", again).returncode == 0
    first, second = read_all(rec), read_all(again)
    for name in ("train.rec", "train.idx", "property"):
        assert first[name] == second[name], name


def test_workers_and_lists_give_the_same_bytes(folder, tmp_path):
    assert tool("img2rec", "--image-folder", folder, "--out-folder", tmp_path / "one"
                ).returncode == 0
    assert tool("img2rec", "--image-folder", folder, "--out-folder", tmp_path / "two",
                "--workers", "2", "--commit-every", "3").returncode == 0
    assert read_all(tmp_path / "one") == read_all(tmp_path / "two")
    items, _ = scan_image_folder(folder)
    (tmp_path / "all.lst").write_text("".join(f"{r} {lab}\n" for r, lab in reversed(items)))
    r = tool("img2rec", "--list", tmp_path / "all.lst", "--prefix", folder, "--out-folder",
             tmp_path / "lst")
    assert r.returncode == 0, r.stderr
    ds = InsightFaceRecDataset(tmp_path / "lst")
    assert ds.labels().tolist() == [0, 0, 0, 1, 1, 2, 2, 2]  # grouped by label


def test_an_interrupted_packing_resumes_to_the_same_bytes(folder, tmp_path):
    sys.path.insert(0, str(ROOT / "tools"))
    import img2rec

    clean = tmp_path / "clean"
    img2rec.run(str(clean), image_folder=str(folder), progress=False)
    out = tmp_path / "out"
    commits = []

    def crash(man):
        commits.append(man["progress"]["records"])
        if len(commits) == 3:
            raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        img2rec.run(str(out), image_folder=str(folder), commit_every=2, progress=False,
                    on_commit=crash)
    assert commits == [0, 2, 4] and not (out / "train.rec").exists()
    for name in img2rec.PARTIAL.values():  # what a kill leaves after the last commit
        with open(out / name, "ab") as f:
            f.write(b"garbage written after the commit")
    counts = img2rec.run(str(out), image_folder=str(folder), progress=False)
    assert counts["records"] == 8
    assert read_all(out) == read_all(clean)
    assert not any((out / n).exists() for n in img2rec.PARTIAL.values())
    assert img2rec.run(str(out), image_folder=str(folder), progress=False)["written_now"] == 0


@pytest.mark.skipif(not hasattr(os, "mkfifo"), reason="needs a named pipe")
def test_a_killed_img2rec_process_resumes(tmp_path):
    """The 31st image is a named pipe: reading it blocks, so the run is killed (SIGKILL)
    deterministically after committing images 1..30; the re-run finishes the job."""
    src = tmp_path / "src"
    src.mkdir()
    lines = []
    for i in range(40):
        (src / f"{i}.jpg").write_bytes(encoded(i, size=28))
        lines.append(f"{i}.jpg {i // 4}\n")
    (src / "all.lst").write_text("".join(lines))
    assert tool("img2rec", "--list", src / "all.lst", "--out-folder", tmp_path / "clean",
                "--image-size", "28", "28").returncode == 0
    (src / "30.jpg").unlink()
    os.mkfifo(src / "30.jpg")
    out = tmp_path / "out"
    cmd = [sys.executable, str(ROOT / "tools" / "img2rec.py"), "--no-progress", "--list",
           str(src / "all.lst"), "--out-folder", str(out), "--commit-every", "5",
           "--image-size", "28", "28"]
    proc = subprocess.Popen(cmd, env={**os.environ, "PYTHONPATH": str(ROOT)},
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        deadline = time.time() + 60
        while time.time() < deadline:
            try:
                man = json.loads((out / "img2rec.json").read_text())
                if man["progress"]["records"] >= 30:
                    break
            except (OSError, ValueError, KeyError):
                pass
            time.sleep(0.05)
        assert proc.poll() is None, "img2rec ended before it was killed"
        proc.send_signal(signal.SIGKILL)
        proc.wait(10)
    finally:
        if proc.poll() is None:
            proc.kill()
    assert man["complete"] is False and man["progress"]["records"] == 30
    (src / "30.jpg").unlink()
    (src / "30.jpg").write_bytes(encoded(30, size=28))
    r = tool("img2rec", "--list", src / "all.lst", "--out-folder", out,
             "--commit-every", "5", "--image-size", "28", "28")
    assert r.returncode == 0, r.stderr
    assert "resuming" in r.stderr
    assert read_all(out) == read_all(tmp_path / "clean")


def test_refusals_and_skipped_images(folder, tmp_path):
    out = tmp_path / "out"
    assert tool("img2rec", "--image-folder", folder, "--out-folder", out).returncode == 0
    other = tmp_path / "other"
    (other / "x").mkdir(parents=True)
    (other / "x" / "1.jpg").write_bytes(encoded(9))
    r = tool("img2rec", "--image-folder", other, "--out-folder", out)
    assert r.returncode == 2 and "already holds the packing of" in r.stderr
    assert tool("img2rec", "--image-folder", other, "--out-folder", out, "--overwrite"
                ).returncode == 0
    assert len(InsightFaceRecDataset(out)) == 1
    r = tool("img2rec", "--image-folder", folder, "--out-folder", folder / "rec")
    assert r.returncode == 2 and "inside --image-folder" in r.stderr
    (folder / "bob" / "b3.jpg").write_bytes(b"\xff\xd8\xff" + b"x" * 10)  # truncated JPEG
    (folder / "carol" / "4.jpg").write_bytes(b"this is text")
    r = tool("img2rec", "--image-folder", folder, "--out-folder", tmp_path / "o2")
    assert r.returncode == 2 and "b3.jpg: an image header PIL cannot read" in r.stderr
    r = tool("img2rec", "--image-folder", folder, "--out-folder", tmp_path / "o3",
             "--skip-corrupt", "--verify")
    assert r.returncode == 0, r.stderr
    assert "4.jpg: not a JPEG/PNG/BMP/GIF/WebP image" in r.stderr
    man = json.loads((tmp_path / "o3" / "img2rec.json").read_text())
    assert man["counts"]["skipped"] == 2 and man["counts"]["records"] == 8


def test_a_set_too_large_for_float32_counts_is_written_flat(folder, tmp_path, monkeypatch):
    sys.path.insert(0, str(ROOT / "tools"))
    import img2rec

    monkeypatch.setattr(img2rec, "FLOAT32_EXACT", 8)  # 8 images + 3 classes + 1 > 8
    img2rec.run(str(tmp_path / "flat"), image_folder=str(folder), progress=False)
    ds = InsightFaceRecDataset(tmp_path / "flat")
    assert ds.layout.identity_keys is None and ds.keys == list(range(8))
    assert ds.labels().tolist() == [0, 0, 0, 1, 1, 2, 2, 2]
    first = (tmp_path / "flat" / "img2rec.lst").read_text().split()[0]
    assert ds.read_raw(0)[0] == (folder / first).read_bytes()


def test_the_trainer_takes_an_image_folder(folder, tmp_path):
    from hfsoftmax.train import main

    args = ["--train-folder", str(folder), "--arch", "convnet-s", "--embedding-size", "8",
            "--batch-size", "4", "--workers", "0", "--threads", "1", "--max-steps", "2",
            "--head", "linear", "--save-path", str(tmp_path / "run")]
    assert main(args) == 0
    assert main([*args[:2], "--train-rec", str(folder), *args[2:]]) == 2


def test_val_ratio_holds_images_out_for_the_trainers_val_filelist(folder, tmp_path):
    from hfsoftmax.data.filelist import ImageListDataset, read_list

    out = tmp_path / "rec"
    r = tool("img2rec", "--image-folder", folder, "--out-folder", out, "--val-ratio", "0.4")
    assert r.returncode == 0, r.stderr
    val = read_list(out / "val.lst")
    packed = read_list(out / "img2rec.lst")
    assert len(val) == 3 and len(packed) == 5  # round(0.4 * n) per class: 1 of 3, 1 of 2, 1 of 3
    assert {lab for _, lab in val} == {0, 1, 2} and not set(val) & set(packed)
    assert len(InsightFaceRecDataset(out)) == 5 and InsightFaceRecDataset(out).num_classes == 3
    assert len(ImageListDataset(out / "val.lst", prefix=folder)) == 3
