"""Held-out top-1 during training (--val-filelist / --val-rec): the chunked computation
against a direct argmax, and the trainer's logged value against a direct computation from
the checkpoint's backbone and rows, on the synthetic demo set's held-out images."""
from __future__ import annotations

import csv
import os

import numpy as np
import pytest
import torch

import hfsoftmax.engine.validate_top1 as vt
from hfsoftmax.extract import load_backbone
from hfsoftmax.rowstore import LocalRowStore
from hfsoftmax.train import main
from paramserver.snapshot import read_snapshot

pytestmark = pytest.mark.timeout(300)
torch.set_num_threads(1)


@pytest.mark.parametrize("cosine", [True, False])
def test_chunked_top1_is_the_direct_argmax(cosine, monkeypatch):
    rng = np.random.default_rng(0)
    store = LocalRowStore(5000, 8, seed=1)
    store.set_rows(np.arange(5000), rng.normal(size=(5000, 8)).astype(np.float32)
                   * rng.uniform(0.5, 2.0, size=(5000, 1)).astype(np.float32))
    feats = torch.from_numpy(rng.normal(size=(300, 8)).astype(np.float32))
    w = store.read_all().astype(np.float64)
    f = feats.numpy().astype(np.float64)
    if cosine:
        w /= np.linalg.norm(w, axis=1, keepdims=True)
        f /= np.linalg.norm(f, axis=1, keepdims=True)
    best = (f @ w.T).argmax(1)
    labels = torch.from_numpy(np.where(rng.random(300) < 0.5, best, rng.integers(0, 5000, 300)))
    expected = int((torch.from_numpy(best) == labels).sum())
    assert 100 < expected < 300
    monkeypatch.setattr(vt, "BLOCK_ELEMENTS", 1000)  # blocks of images, not only row chunks
    got = vt.top1_of(feats, labels, vt.iter_rows(None, store, chunk_rows=777), cosine=cosine)
    assert got == expected


@pytest.fixture(scope="module")
def demo(tmp_path_factory):
    """The demo's synthetic set, small: 24 identities, 8 training and 3 held-out images each;
    the held-out images also extracted to an image list (tools/rec2img.py)."""
    from hfsoftmax.data.synthetic import make_synthetic
    from tools import rec2img

    root = tmp_path_factory.mktemp("demo")
    data = root / "synthetic"
    make_synthetic(data, num_classes=24, images_per_class=8, heldout_per_class=3,
                   family_size=4, num_pairs=20, workers=1)
    rec2img.run(str(data), str(root / "heldout"), split="heldout", progress=False)
    return data, root / "heldout" / "train.lst"


ARGS = ["--arch", "convnet-s", "--embedding-size", "16", "--batch-size", "24", "--workers",
        "0", "--threads", "1", "--print-freq", "4", "--lr", "0.1", "--max-steps", "16",
        "--val-every", "8", "--head", "cosface", "--scale", "16", "--margin", "0.1"]


def logged_top1(run_dir):
    with open(os.path.join(run_dir, "val.csv"), newline="") as f:
        return {int(r["step"]): float(r["acc"]) for r in csv.DictReader(f)
                if r["name"] == "heldout_top1"}


def direct_top1(ckpt_path, rows, image_list=None, rec=None):
    """Top-1 computed here: the checkpoint's backbone on the held-out images (eval, no flip),
    cosine against every row, numpy argmax in float64."""
    from hfsoftmax.data.filelist import ImageListDataset
    from hfsoftmax.data.insightface import InsightFaceRecDataset

    net = load_backbone(ckpt_path, "cpu")
    ds = ImageListDataset(image_list) if rec is None else InsightFaceRecDataset(
        rec, split="heldout")
    x = torch.stack([ds[i][0] for i in range(len(ds))])
    labels = np.array([ds[i][1] for i in range(len(ds))])
    with torch.no_grad():
        f = net(x).double().numpy()
    w = rows.astype(np.float64)
    f /= np.linalg.norm(f, axis=1, keepdims=True)
    w /= np.linalg.norm(w, axis=1, keepdims=True)
    return float(np.mean((f @ w.T).argmax(1) == labels)), len(ds)


def test_val_filelist_top1_of_a_sampled_run_is_the_checkpoints(demo, tmp_path):
    data, heldout_list = demo
    out = str(tmp_path / "hf")
    assert main(["--train-rec", str(data), *ARGS, "--sampled", "--sampler", "exact",
                 "--sample-num", "24", "--no-background-rebuild", "--recall-every", "0",
                 "--val-filelist", str(heldout_list), "--save-path", out]) == 0
    logged = logged_top1(out)
    assert sorted(logged) == [8, 16]
    ckpt = torch.load(os.path.join(out, "last.pth"), weights_only=True)
    tables, _ = read_snapshot(os.path.join(out, ckpt["ps_snapshot"]))
    value, n = direct_top1(os.path.join(out, "last.pth"), tables["classifier"].weight,
                           image_list=heldout_list)
    assert n == 72 and logged[16] == value
    assert value > 2 / 24  # it learned something (chance: 1/24)


def test_val_rec_top1_of_a_full_softmax_run_is_the_checkpoints(demo, tmp_path):
    data, _ = demo
    out = str(tmp_path / "full")
    assert main(["--train-rec", str(data), *ARGS, "--val-rec",
                 str(data / "heldout.rec"), "--save-path", out]) == 0
    ckpt = torch.load(os.path.join(out, "last.pth"), weights_only=True)
    value, n = direct_top1(os.path.join(out, "last.pth"), ckpt["head"]["weight"].numpy(),
                           rec=str(data))
    assert logged_top1(out)[16] == value


def test_val_flags_are_checked(demo, tmp_path, capsys):
    data, heldout_list = demo
    base = ["--train-rec", str(data), *ARGS, "--save-path", str(tmp_path / "x")]
    assert main([*base, "--val-rec", str(data / "nope.rec")]) == 2
    assert "nope.rec not found" in capsys.readouterr().err
    assert main([*base, "--val-filelist", str(heldout_list), "--val-rec", str(data)]) == 2
    assert main([*base, "--val-prefix", str(data)]) == 2
    bad = tmp_path / "bad.lst"
    bad.write_text("0/1.jpg 99\n")
    assert main([*base, "--val-filelist", str(bad)]) == 2
    assert "label 99 >= num_classes=24" in capsys.readouterr().err
