"""The trainer with ``--row-store dist`` (the sampled head's rows sharded over the ranks):
2 torchrun processes (gloo) write one rows file per rank, resume from them, and end where
one process at twice the batch ends; a resume with another number of ranks is refused
naming ``paramserver.reshard``, which makes it go; the flags that cannot go with
``--row-store dist`` exit with code 2.

The settings are ``tests/test_train_dist.py``'s (``convnet-s-gn``: per-sample
normalisation; the linear head; no augmentation; synchronous copy refreshes), so the only
difference between the runs is where the rows live; the data is conftest's ``tiny_rec``
(40 identities x 4 images). The head's arithmetic itself (margin heads, log-Q, the
every-step decay, a selection on one rank only) is tested backbone-free in
``tests/test_rowstore_dist.py``.
"""
from __future__ import annotations

import csv
import re
import shutil
from types import SimpleNamespace

import numpy as np
import pytest
import torch

from hfsoftmax.rowstore_dist import DistRowStore
from hfsoftmax.train import main
from paramserver.reshard import reshard
from paramserver.snapshot import read_snapshot
from tests.test_train_dist import COMMON, assert_close_runs, torchrun

pytestmark = pytest.mark.timeout(300)

HALF, STEPS = 4, 8
DIST = ["--sampled", "--row-store", "dist", "--sample-num", "24", "--interval", "3",
        "--no-background-rebuild", "--recall-every", "4", "--sampled-rule", "paper"]


def rows_files(folder) -> list[str]:
    return sorted(p.name for p in folder.iterdir() if p.name.startswith("rows_step"))


def shard_files(*names: str, world: int = 2) -> list[str]:
    """Every rank's file of each snapshot in ``names``, sorted."""
    return sorted({f"{n}.{r:05d}-of-{world:05d}" for n in names for r in range(world)})


def joined_rows(folder, name: str, world: int):
    """The rows of snapshot ``name`` in ``folder``, its ``world`` shard files joined in
    rank order (weight, momentum, step), as ``assert_close_runs`` reads a table."""
    files = [name] if world == 1 else [f"{name}.{r:05d}-of-{world:05d}" for r in range(world)]
    tables = [read_snapshot(folder / f)[0]["classifier"] for f in files]
    assert len({t.updates for t in tables}) == 1, "the shards are of different steps"
    return SimpleNamespace(weight=np.concatenate([t.weight for t in tables]),
                           momentum=np.concatenate([t.momentum for t in tables]),
                           updates=tables[0].updates)


def heldout_top1(folder) -> dict[int, float]:
    with open(folder / "val.csv", newline="") as f:
        return {int(r["step"]): float(r["acc"]) for r in csv.DictReader(f)
                if r["name"] == "heldout_top1"}


def test_two_ranks_write_a_shard_each_resume_and_equal_one_process(tiny_rec, tmp_path,
                                                                    capsys, shared_fixtures):
    one, two = tmp_path / "one", tmp_path / "two"
    val = ["--val-rec", str(tiny_rec), "--val-every", "2"]
    # verification on rank 0 only decides best.pth, which every rank's shard must join
    bins = ["--val-bins", str(shared_fixtures / "verification-py2.bin")]
    # one process at batch 16: a world of one is one shard, a single rows file
    assert main(["--train-rec", str(tiny_rec), *COMMON, *DIST, *val, "--batch-size", "16",
                 "--save-path", str(one)]) == 0
    assert rows_files(one) == ["rows_step000000008.safetensors"]
    # two processes at batch 8, stopped half-way: one rows file per rank
    proc = torchrun(2, ["--train-rec", str(tiny_rec), *COMMON, *DIST, *val, *bins,
                        "--batch-size", "8", "--max-steps", str(HALF),
                        "--save-path", str(two), "--dist-backend", "gloo"])
    assert "2 process(es) x batch 8" in proc.stderr and "rows sharded over the ranks" in \
        proc.stderr
    half = "rows_step000000004.safetensors"
    best = torch.load(two / "best.pth", weights_only=True)
    assert best["ps_kind"] == "dist" and best["step"] in (2, HALF)
    assert rows_files(two) == shard_files(half, best["ps_snapshot"])
    ckpt = torch.load(two / "last.pth", weights_only=True)
    assert (ckpt["step"], ckpt["ps_snapshot"], ckpt["ps_kind"]) == (HALF, half, "dist")
    saved = joined_rows(two, half, 2)
    assert saved.updates == HALF and np.abs(saved.momentum).max() > 1e-3
    # every rank's shard reads back as it was saved (the restore the resume makes)
    for r in range(2):
        store = DistRowStore(40, 32, rank=r, world=2)
        store.restore(two / half)
        np.testing.assert_array_equal(store.read_shard(), saved.weight[store.start:store.stop])
        np.testing.assert_array_equal(store.table.momentum,
                                      saved.momentum[store.start:store.stop])
        assert store.table.updates == HALF
    # resumed to the end, with the fused backward this time (the head's collectives inside
    # DDP's backward; the first half split it): the step counter goes on, the old shards
    # are pruned
    proc = torchrun(2, ["--resume", str(two), "--row-store", "dist", "--max-steps", str(STEPS),
                        "--dist-backend", "gloo", "--no-split-backward"])
    assert "fused backward" in proc.stderr
    assert f"at step {HALF}" in proc.stderr and f"steps {HALF} -> {STEPS}" in proc.stderr
    end = "rows_step000000008.safetensors"
    best = torch.load(two / "best.pth", weights_only=True)
    assert rows_files(two) == shard_files(end, best["ps_snapshot"])
    a = torch.load(one / "last.pth", weights_only=True)
    b = torch.load(two / "last.pth", weights_only=True)
    assert b["ps_kind"] == "dist" and b["ps_snapshot"] == end
    # 2 ranks (stopped and resumed) = 1 process at twice the batch: backbone, its SGD
    # momentum, the rows and their momentum
    assert_close_runs((a, joined_rows(one, end, 1)), (b, joined_rows(two, end, 2)))
    # the held-out top-1 (rank 0 gathers every shard's rows) is the one process's
    top_a, top_b = heldout_top1(one), heldout_top1(two)
    assert sorted(top_a) == sorted(top_b) == [2, 4, 6, 8]
    assert all(abs(top_a[s] - top_b[s]) <= 1 / 160 for s in top_a), (top_a, top_b)
    # another number of ranks: refused naming the tool, after which the run goes on
    w1 = tmp_path / "w1"
    shutil.copytree(two, w1)
    resume_w1 = ["--resume", str(w1), "--row-store", "dist", "--max-steps", str(STEPS + 1)]
    capsys.readouterr()
    assert main(resume_w1) == 2
    assert f"python -m paramserver.reshard {w1 / end} --shards 1" in capsys.readouterr().err
    reshard(str(w1 / end), 1, out=str(w1 / end))
    assert main(resume_w1) == 0
    assert torch.load(w1 / "last.pth", weights_only=True)["step"] == STEPS + 1


@pytest.mark.parametrize("argv,match", [
    (["--row-store", "dist"], "--row-store dist holds the sampled head's rows; add --sampled"),
    (["--sampled", "--row-store", "dist", "--ps", "tcp://127.0.0.1:1"],
     "--row-store dist keeps the rows in the trainer, but --ps tcp://127.0.0.1:1"),
    (["--sampled", "--row-store", "dist", "--sampler", "annoy"],
     "--sampler annoy searches an index.*--row-store dist.*use --sampler device"),
    (["--sampled", "--row-store", "dist", "--sampler-process"],
     "--sampler-process.*--row-store dist has no index.*drop --sampler-process"),
    (["--sampled", "--row-store", "server"], "--row-store server needs.*add --ps"),
    (["--sampled", "--row-store", "local", "--ps", "tcp://127.0.0.1:1"],
     "--row-store local keeps the rows in the trainer.*use --row-store server"),
])
def test_row_store_flags_that_do_not_fit_exit_2_naming_the_flag(argv, match, tiny_rec,
                                                                 tmp_path, capsys):
    assert main(["--train-rec", str(tiny_rec), *argv, "--save-path",
                 str(tmp_path / "r")]) == 2
    err = capsys.readouterr().err
    assert err.startswith("hfsoftmax-train: error: ") and len(err.splitlines()) == 1
    assert re.search(match, err), err
    assert not (tmp_path / "r").exists()
