"""The trainer in one process: flags, learning, checkpoints, NaN, and exact resume against a
real parameter-server process."""
from __future__ import annotations

import csv
import json
import math
import os

import numpy as np
import pytest
import torch

from hfsoftmax.engine.config import parse_args
from hfsoftmax.engine.data import ShardedBatchSampler
from hfsoftmax.engine.schedule import StepSchedule
from hfsoftmax.heads.factory import build_head_from_args, neighbour_slots_per_sample
from hfsoftmax.heads.sampled_config import rule_from_args
from hfsoftmax.train import main, run, stored_settings
from paramserver.snapshot import read_snapshot
from tests.ps_utils import running_server

pytestmark = pytest.mark.timeout(300)

torch.set_num_threads(1)

# 40 identities x 4 images; batch 16 -> 10 steps per epoch.
TINY = ["--arch", "convnet-s", "--embedding-size", "32", "--batch-size", "16", "--workers",
        "0", "--threads", "1", "--print-freq", "2", "--head", "cosface", "--scale", "16",
        "--margin", "0.1", "--lr", "0.1"]


def read_csv(path):
    with open(path, newline="") as f:
        return list(csv.DictReader(f))


# ---------------------------------------------------------------------------- flags
@pytest.mark.parametrize("argv,match", [
    ([], "no training data"),
    (["--train-rec", "x", "--train-filelist", "y"], "not both"),
    (["--train-rec", "x", "--arch", "resnet9"], "unknown --arch 'resnet9'.*ir50"),
    (["--train-rec", "x", "--ps", "tcp://127.0.0.1:1"], "add --sampled"),
    (["--train-rec", "x", "--lr-steps", "5", "3"], "ascending"),
    (["--train-rec", "x", "--head", "linear", "--margin", "0.3"], "margin head"),
    (["--train-rec", "x", "--sampled", "--num-classes", "10", "--sample-num", "20"],
     "exceeds --num-classes"),
    (["--train-rec", "x", "--device", "tpu"], "--device"),
    (["--train-rec", "x", "--gamma", "0"], "--gamma"),
])
def test_bad_flags_are_rejected_with_the_fix(argv, match):
    with pytest.raises(ValueError, match=match):
        parse_args(argv)


def test_missing_val_bins_are_named():
    with pytest.raises(ValueError, match="nope.bin"):
        parse_args(["--train-rec", "x", "--val-bins", "nope.bin"])


def test_argparse_rejects_bad_choices(capsys):
    with pytest.raises(SystemExit):
        parse_args(["--train-rec", "x", "--sampler", "lsh"])
    assert "invalid choice: 'lsh'" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        parse_args(["--train-rec", "x", "--batch-size", "0"])


def test_yaml_config_is_overridden_by_the_command_line(tmp_path):
    cfg = tmp_path / "c.yaml"
    cfg.write_text("train-rec: /data/ms1m\nsampled: true\nsample_num: 5000\nlr: 0.05\n"
                   "lr-steps: [8, 12]\nps: tcp://10.0.0.1:5570,tcp://10.0.0.2:5570\n")
    args = parse_args(["--config", str(cfg), "--lr", "0.2"])
    assert args.train_rec == "/data/ms1m" and args.sampled and args.sample_num == 5000
    assert args.lr == 0.2 and args.lr_steps == [8.0, 12.0]
    assert args.ps == ["tcp://10.0.0.1:5570", "tcp://10.0.0.2:5570"]
    cfg.write_text("train-rec: x\nlearning_rate: 0.1\n")
    with pytest.raises(ValueError, match="unknown setting 'learning_rate'.*lr-steps"):
        parse_args(["--config", str(cfg)])
    cfg.write_text("train-rec: x\nsampler: lsh\n")
    with pytest.raises(ValueError, match="bad value 'lsh' for sampler"):
        parse_args(["--config", str(cfg)])


def test_help_documents_every_flag(capsys):
    with pytest.raises(SystemExit):
        parse_args(["--help"])
    out = capsys.readouterr().out
    for flag in ("--arch", "--embedding-size", "--head", "--sampled", "--sampler",
                 "--sample-num", "--interval", "--ntrees", "--num-classes", "--train-rec",
                 "--train-filelist", "--train-prefix", "--val-bins", "--batch-size", "--lr",
                 "--lr-steps", "--gamma", "--epochs", "--max-steps", "--momentum",
                 "--weight-decay", "--workers", "--save-path", "--resume", "--ps", "--device",
                 "--amp", "--seed", "--config", "--dist-backend"):
        assert flag in out


# ---------------------------------------------------------------------------- pieces
def test_sharded_batches_of_two_ranks_are_the_single_process_batches():
    one = ShardedBatchSampler(100, 8, 0, 1, seed=3)
    two = [ShardedBatchSampler(100, 4, r, 2, seed=3) for r in range(2)]
    for s in [one, *two]:
        s.set_epoch(2)
    for b1, b20, b21 in zip(one, *two):
        assert b1 == b20 + b21
    assert len(one) == len(two[0]) == 12  # 100 // 8, the last partial batch dropped
    other_epoch = ShardedBatchSampler(100, 8, 0, 1, seed=3)
    assert next(iter(other_epoch)) != next(iter(one))  # epoch 0 vs epoch 2
    one.set_epoch(2, start_batch=5)
    full = ShardedBatchSampler(100, 8, 0, 1, seed=3)
    full.set_epoch(2)
    assert list(one) == list(full)[5:]
    with pytest.raises(ValueError, match="fewer than one global batch"):
        ShardedBatchSampler(10, 8, 0, 2)


def test_step_schedule():
    s = StepSchedule.from_epochs(0.1, [1, 1.5], steps_per_epoch=100, gamma=0.1,
                                 warmup_steps=10)
    assert s.milestones == [100, 150]
    assert math.isclose(s.lr_at(0), 0.01) and math.isclose(s.lr_at(9), 0.1)
    assert s.lr_at(99) == 0.1 and math.isclose(s.lr_at(100), 0.01)
    assert math.isclose(s.lr_at(150), 0.001)


# ---------------------------------------------------------------------------- training
def test_full_softmax_run_learns_and_writes_outputs(tiny_rec, tmp_path):
    out = tmp_path / "run"
    assert main(["--train-rec", str(tiny_rec), *TINY, "--max-steps", "30",
                 "--save-path", str(out)]) == 0
    rows = read_csv(out / "metrics.csv")
    assert [int(r["step"]) for r in rows][-1] == 30
    first, last = rows[0], rows[-1]
    # 40 classes: chance is 2.5% accuracy and loss ~ ln(40) + margin effects.
    assert float(last["loss"]) < 0.5 * float(first["loss"])
    assert float(last["acc"]) > max(0.5, float(first["acc"]) + 0.3)
    assert all(float(r["img_s"]) > 0 for r in rows)
    ckpt = torch.load(out / "last.pth", weights_only=True)
    assert ckpt["step"] == 30 and ckpt["epoch"] == 3 and ckpt["ps_snapshot"] is None
    assert ckpt["args"]["arch"] == "convnet-s" and ckpt["args"]["embedding_size"] == 32
    assert ckpt["args"]["num_classes"] == 40
    assert ckpt["head"]["weight"].shape == (40, 32)
    assert set(ckpt) >= {"model", "head", "optimizer", "lr_scheduler", "step", "epoch",
                         "args", "ps_snapshot"}
    assert list((out / "tb").iterdir()), "no TensorBoard events written"
    assert "step 30/30" in (out / "train.log").read_text()
    assert json.loads((out / "args.json").read_text())["max_steps"] == 30


def test_nan_loss_stops_with_the_step(tiny_rec, tmp_path):
    with pytest.raises(FloatingPointError, match=r"step=\d+"):
        main(["--train-rec", str(tiny_rec), *TINY, "--head", "linear", "--margin", "0",
              "--lr", "1e30", "--momentum", "0", "--max-steps", "20",
              "--save-path", str(tmp_path / "nan")])


def _state(path, rows_dir=None):
    ckpt = torch.load(os.path.join(path, "last.pth"), weights_only=True)
    tables, _ = read_snapshot(os.path.join(rows_dir or path, ckpt["ps_snapshot"]))
    return ckpt, tables["classifier"]


def _assert_same_training_state(a, b):
    (ca, ta), (cb, tb) = a, b
    assert ca["step"] == cb["step"]
    for k, v in ca["model"].items():
        torch.testing.assert_close(cb["model"][k], v, rtol=0, atol=0, msg=k)
    oa, ob = ca["optimizer"]["state"], cb["optimizer"]["state"]
    assert oa.keys() == ob.keys() and len(oa) > 0
    for k in oa:
        torch.testing.assert_close(ob[k]["momentum_buffer"], oa[k]["momentum_buffer"],
                                   rtol=0, atol=0)
    assert ta.updates == tb.updates == ca["step"]
    np.testing.assert_array_equal(ta.weight, tb.weight)
    np.testing.assert_array_equal(ta.momentum, tb.momentum)
    assert np.abs(ta.momentum).max() > 0        # the rows' momentum really was restored
    assert ca["rng"] == cb["rng"]
    assert ca["head"]["_extra_state"] == cb["head"]["_extra_state"]


@pytest.mark.parametrize("store", ["paramserver", "local"])
def test_resume_continues_exactly(tiny_rec, tmp_path, store):
    """12 steps straight == 6 steps, stop, --resume, 6 more (across an epoch end at step 10):
    backbone, SGD momentum, and the classifier rows + momentum (the parameter server's
    snapshot) are bit-identical. Exact needs a reproducible index: synchronous rebuilds
    every 3 steps, the checkpoint at a multiple of that. The rows take the paper's lazy
    momentum here, so that a momentum buffer is restored too."""
    hf = ["--sampled", "--sampler", "exact", "--sample-num", "24", "--interval", "3",
          "--no-background-rebuild", "--recall-every", "0", "--sampled-rule", "paper"]
    runs = {}
    for name in ("straight", "split"):
        out = str(tmp_path / name)
        if store == "paramserver":
            with running_server() as (proc, address):
                ps = ["--ps", address]
                if name == "straight":
                    assert main(["--train-rec", str(tiny_rec), *TINY, *hf, *ps,
                                 "--max-steps", "12", "--save-path", out]) == 0
                else:
                    assert main(["--train-rec", str(tiny_rec), *TINY, *hf, *ps,
                                 "--max-steps", "6", "--save-path", out]) == 0
                    assert _state(out, proc.snapshot_dir)[0]["step"] == 6
                    # Stored args rebuild the run; the new --max-steps and the runtime
                    # flags (--ps: never taken from a checkpoint) are given.
                    assert main(["--resume", out, "--max-steps", "12", *ps, "--threads",
                                 "1", "--workers", "0"]) == 0
                runs[name] = _state(out, proc.snapshot_dir)
        else:
            if name == "straight":
                assert main(["--train-rec", str(tiny_rec), *TINY, *hf, "--max-steps", "12",
                             "--save-path", out]) == 0
            else:
                assert main(["--train-rec", str(tiny_rec), *TINY, *hf, "--max-steps", "6",
                             "--save-path", out]) == 0
                assert main(["--resume", os.path.join(out, "last.pth"), "--max-steps",
                             "12", "--threads", "1", "--workers", "0"]) == 0
            runs[name] = _state(out)
    _assert_same_training_state(runs["straight"], runs["split"])
    # The split run's metrics continue where it stopped.
    steps = [int(r["step"]) for r in read_csv(tmp_path / "split" / "metrics.csv")]
    assert steps == sorted(steps) and steps[-1] == 12


def test_resume_refuses_to_change_the_model(tiny_rec, tmp_path):
    out = str(tmp_path / "r")
    assert main(["--train-rec", str(tiny_rec), *TINY, "--max-steps", "2",
                 "--save-path", out]) == 0
    with pytest.raises(ValueError, match="--arch='convnet-s'.*'ir18'"):
        parse_args(["--resume", out, "--arch", "ir18"])
    with pytest.raises(ValueError, match="no last.pth"):
        parse_args(["--resume", str(tmp_path)])


def test_fresh_run_refuses_a_server_table_with_history(tiny_rec, tmp_path):
    hf = ["--sampled", "--sampler", "random", "--sample-num", "24"]
    with running_server() as (_, address):
        assert main(["--train-rec", str(tiny_rec), *TINY, *hf, "--ps", address,
                     "--max-steps", "2", "--save-path", str(tmp_path / "a")]) == 0
        with pytest.raises(ValueError, match="already taken 2 steps.*--ps-table"):
            run(parse_args(["--train-rec", str(tiny_rec), *TINY, *hf, "--ps", address,
                            "--max-steps", "2", "--save-path", str(tmp_path / "b")]))
        # A new table name on the same server is a fresh run.
        assert main(["--train-rec", str(tiny_rec), *TINY, *hf, "--ps", address,
                     "--ps-table", "run2", "--max-steps", "2",
                     "--save-path", str(tmp_path / "c")]) == 0


def test_sampled_run_with_annoy_learns(tiny_rec, tmp_path):
    out = tmp_path / "hf"
    assert main(["--train-rec", str(tiny_rec), *TINY, "--sampled", "--sampler", "annoy",
                 "--ntrees", "5", "--sample-num", "20", "--interval", "5",
                 "--recall-every", "5", "--max-steps", "30", "--save-path", str(out)]) == 0
    rows = read_csv(out / "metrics.csv")
    assert float(rows[-1]["loss"]) < 0.5 * float(rows[0]["loss"])
    recalls = [float(r["recall"]) for r in rows if r["recall"]]
    assert recalls and all(0.0 <= x <= 1.0 for x in recalls)
    assert any(r["rebuild_s"] for r in rows)
    ckpt = torch.load(out / "last.pth", weights_only=True)
    # named relative to the run folder (a copied folder resumes from its own rows)
    assert not os.path.isabs(ckpt["ps_snapshot"]) and (out / ckpt["ps_snapshot"]).is_file()
    # Only the snapshot the checkpoint names is kept.
    assert [p.name for p in out.glob("rows_step*")] == [ckpt["ps_snapshot"]]


def test_sampled_run_with_the_device_sampler_learns(tiny_rec, tmp_path):
    """--sampler device (exact top-k over a copy of the rows on the features' device, the
    default on a GPU) trains on the CPU through the same code."""
    out = tmp_path / "dev"
    assert main(["--train-rec", str(tiny_rec), *TINY, "--sampled", "--sampler", "device",
                 "--sample-num", "20", "--interval", "5", "--recall-every", "5",
                 "--max-steps", "30", "--save-path", str(out)]) == 0
    rows = read_csv(out / "metrics.csv")
    assert float(rows[-1]["loss"]) < 0.5 * float(rows[0]["loss"])
    recalls = [float(r["recall"]) for r in rows if r["recall"]]
    assert recalls and all(0.0 < x <= 1.0 for x in recalls)
    assert "device sampler: copy of 40 x 32 rows" in (out / "train.log").read_text()


def test_verification_keeps_the_best_checkpoint(tiny_rec, tmp_path, shared_fixtures):
    out = tmp_path / "val"
    bin_path = str(shared_fixtures / "verification-py2.bin")
    hf = ["--sampled", "--sampler", "random", "--sample-num", "24"]
    assert main(["--train-rec", str(tiny_rec), *TINY, *hf, "--max-steps", "12",
                 "--val-every", "6", "--val-bins", bin_path, "--save-path", str(out)]) == 0
    rows = read_csv(out / "val.csv")
    assert [(int(r["step"]), r["name"]) for r in rows] == [
        (6, "verification-py2"), (6, "mean"), (12, "verification-py2"), (12, "mean")]
    accs = [float(r["acc"]) for r in rows if r["name"] != "mean"]
    assert all(0.0 <= a <= 1.0 for a in accs)
    best = torch.load(out / "best.pth", weights_only=True)
    assert best["best"] == max(accs)
    assert best["step"] == (6 if accs[0] >= accs[1] else 12)
    assert (out / "val" / "verification-py2.json").is_file()
    assert (out / "val" / "verification-py2_roc.png").is_file()
    # Resuming keeps the row snapshot best.pth names, and the best accuracy so far.
    assert main(["--resume", str(out), "--max-steps", "14", "--val-every", "0"]) == 0
    assert (out / torch.load(out / "best.pth", weights_only=True)["ps_snapshot"]).is_file()
    assert (out / torch.load(out / "last.pth", weights_only=True)["ps_snapshot"]).is_file()
    assert torch.load(out / "last.pth", weights_only=True)["best"] >= max(accs)


def test_a_fresh_run_does_not_overwrite_an_earlier_one(tiny_rec, tmp_path):
    out = str(tmp_path / "r")
    assert main(["--train-rec", str(tiny_rec), *TINY, "--max-steps", "1",
                 "--save-path", out]) == 0
    with pytest.raises(ValueError, match="already holds a run.*--resume"):
        parse_args(["--train-rec", str(tiny_rec), *TINY, "--save-path", out])
    assert main(["--train-rec", str(tiny_rec), *TINY, "--save-path", out]) == 2


def test_amp_runs_on_cpu_and_cuda_is_not_required(tiny_rec, tmp_path):
    out = tmp_path / "amp"
    assert main(["--train-rec", str(tiny_rec), *TINY, "--amp", "--max-steps", "4",
                 "--sampled", "--sampler", "random", "--sample-num", "24",
                 "--save-path", str(out)]) == 0
    rows = read_csv(out / "metrics.csv")
    assert all(math.isfinite(float(r["loss"])) for r in rows)
    if not torch.cuda.is_available():
        with pytest.raises(ValueError, match="CUDA is not available.*--device cpu"):
            run(parse_args(["--train-rec", str(tiny_rec), *TINY, "--device", "cuda",
                            "--save-path", str(tmp_path / "cuda")]))


def test_learns_the_synthetic_set(tmp_path):
    """The built-in synthetic set (families of look-alike identities): a 1-process CPU run with
    the sampled head clearly improves loss and training accuracy within 80 steps."""
    from hfsoftmax.data.synthetic import make_synthetic

    data = tmp_path / "syn"
    make_synthetic(data, num_classes=100, images_per_class=12, seed=0, num_pairs=0,
                   heldout_per_class=1, workers=1)
    out = tmp_path / "run"
    assert main(["--train-rec", str(data), "--arch", "convnet-s", "--embedding-size", "64",
                 "--batch-size", "32", "--workers", "0", "--threads", "1", "--head",
                 "linear", "--lr", "0.1",
                 "--warmup-steps", "10", "--sampled", "--sampler", "hnsw", "--sample-num",
                 "40", "--interval", "20", "--print-freq", "10", "--max-steps", "80",
                 "--save-path", str(out)]) == 0
    rows = read_csv(out / "metrics.csv")
    first, last = rows[0], rows[-1]
    assert int(last["step"]) == 80
    assert float(last["loss"]) < 0.6 * float(first["loss"]), (first, last)
    # measured: loss 3.23 -> 1.03, accuracy 0.10 -> 0.62 over the 40 selected classes
    assert float(last["acc"]) > float(first["acc"]) + 0.3, (first, last)


def build(argv):
    """``(head, store)`` of the trainer's flags ``argv``, as ``run`` builds them."""
    args = parse_args(argv)
    return build_head_from_args(args, 40, rule_from_args(args) if args.sampled else None)


def test_index_runs_in_its_own_process_with_a_parameter_server(tiny_rec):
    """With --ps the sampler's index lives in a child process that reads the rows from the
    server (the trainer never holds W); --no-sampler-process keeps it in the trainer."""
    from hfsoftmax.samplers.process import ProcessSampler

    hf = ["--sampled", "--sampler", "exact", "--sample-num", "24"]
    with running_server() as (_, address):
        for extra, expect_process in (([], True), (["--no-sampler-process"], False)):
            head, store = build(["--train-rec", str(tiny_rec), *TINY, *hf, "--ps", address,
                                 "--ps-table", f"t{int(expect_process)}", *extra])
            try:
                assert isinstance(head.sampler, ProcessSampler) is expect_process
                feats, labels = torch.randn(8, 32), torch.arange(8)
                head.sampler.rebuild(head.rowstore.read_all())
                ids, target = head.sampler.select(feats, labels, 24)
                assert len(set(ids.tolist())) == 24 and torch.equal(ids[target], labels)
            finally:
                head.sampler.close()
                store.close()  # worker id 0 belongs to this store's connection
    # Without a server the rows are in the trainer anyway: no index process by default.
    head, _ = build(["--train-rec", str(tiny_rec), *TINY, *hf])
    assert not isinstance(head.sampler, ProcessSampler)
    head.sampler.close()


def test_index_threads_reach_the_index_process(tiny_rec, monkeypatch):
    """--index-threads N sets the index process's OpenMP threads (what keeps a rebuild from
    competing with the trainer); without an index process it is an error naming the fix."""
    monkeypatch.setenv("OMP_NUM_THREADS", "7")  # the trainer's own setting must not leak
    hf = ["--sampled", "--sampler", "faiss", "--sample-num", "24", "--index-threads", "1"]
    head, _ = build(["--train-rec", str(tiny_rec), *TINY, *hf, "--sampler-process"])
    try:
        with open(f"/proc/{head.sampler.pid}/environ", "rb") as f:
            env = dict(kv.split(b"=", 1) for kv in f.read().split(b"\0") if b"=" in kv)
        assert env.get(b"OMP_NUM_THREADS") == b"1", env.get(b"OMP_NUM_THREADS")
    finally:
        head.sampler.close()
    with pytest.raises(ValueError, match="--index-threads 1 applies to the index process"):
        build(["--train-rec", str(tiny_rec), *TINY, *hf, "--no-sampler-process"])


def test_fresh_rows_and_random_share_reach_the_sampler(tiny_rec):
    """--fresh-rows and --random-share configure the sampler the head selects with (in the
    trainer and in an index process); out-of-range values are refused by the parser."""
    hf = ["--sampled", "--sampler", "exact", "--sample-num", "24", "--fresh-rows", "30",
          "--random-share", "0.25"]
    for extra in ([], ["--sampler-process"]):
        head, _ = build(["--train-rec", str(tiny_rec), *TINY, *hf, *extra])
        try:
            assert head.sampler.fresh.capacity == 30 and head.sampler.random_share == 0.25
        finally:
            head.sampler.close()
    for bad in (["--random-share", "1.5"], ["--fresh-rows", "-1"]):
        with pytest.raises(SystemExit):
            parse_args(["--train-rec", str(tiny_rec), *TINY, "--sampled", *bad])


def test_logq_reaches_the_head_and_needs_the_sampled_head(tiny_rec):
    """--logq random turns on the sampled head's log-Q correction of the random classes,
    --logq sample its per-sample form, the default for a margin head with an index (off for
    random sampling and the linear head); the stored settings keep it resolved; the full
    head refuses it."""
    hf = ["--sampled", "--sampler", "random", "--sample-num", "24"]
    index = ["--sampled", "--sampler", "exact", "--sample-num", "24"]
    linear = ["--head", "linear", "--margin", "0"]
    for base, extra, want, stored in (
            (hf, [], False, "off"),            # random sampling: Partial FC's rule
            (hf, ["--logq", "random"], True, "random"),
            (hf, ["--logq", "sample"], "sample", "sample"),
            (index, [], "sample", "sample"),   # the default for a margin head with an index
            (index, ["--logq", "random"], True, "random"),  # asked for the random top-up's
            (index, ["--logq", "off"], False, "off"),       # the paper's rule
            (index, ["--sampled-rule", "paper"], False, "off"),
            (index + linear, [], False, "off")):            # the linear head: off
        argv = ["--train-rec", str(tiny_rec), *TINY, *base, *extra]
        head, _ = build(argv)
        try:
            assert head.logq == want and type(head.logq) is type(want), (base, extra)
            args = parse_args(argv)
            assert stored_settings(args, rule_from_args(args))["logq"] == stored
        finally:
            head.sampler.close()
    with pytest.raises(ValueError, match="--logq sample applies to the sampled head"):
        parse_args(["--train-rec", str(tiny_rec), *TINY, "--logq", "sample"])


def test_sampler_opt_reaches_the_backend_and_bad_keys_are_named(tiny_rec):
    """--sampler-opt KEY=VALUE sets a backend option (typed), in the trainer and in an index
    process; an unknown key or one the trainer's own flags own is a clear error."""
    from hfsoftmax.engine.config import parse_key_values

    assert parse_key_values(["nprobe=32", "x=0.5", "t=true", "index_type=ivf"]) == \
        {"nprobe": 32, "x": 0.5, "t": True, "index_type": "ivf"}
    hf = ["--sampled", "--sampler", "faiss", "--sample-num", "24"]
    head, _ = build(["--train-rec", str(tiny_rec), *TINY, *hf, "--sampler-opt", "nprobe=3"])
    assert head.sampler.nprobe == 3
    head.sampler.close()
    for extra, match in ((["--sampler-opt", "bogus=1"], "bogus=1: not an option of the faiss"),
                         (["--sampler-opt", "bogus=1", "--sampler-process"],
                          "bogus=1: not an option of the faiss"),
                         (["--sampler-opt", "interval=3"], "set by the trainer's own flags")):
        with pytest.raises(ValueError, match=match):
            build(["--train-rec", str(tiny_rec), *TINY, *hf, *extra])
    with pytest.raises(SystemExit):
        parse_args(["--train-rec", str(tiny_rec), *TINY, *hf, "--sampler-opt", "nprobe"])


def test_row_momentum_and_lr_mult_reach_the_rows_through_the_schedule(tiny_rec, tmp_path):
    """The rows' SGD: by default no lazy momentum at LR x (1-0)/(1-momentum); explicit
    --row-momentum / --row-lr-mult win; the LR schedule reaches the rows times the
    multiplier (the snapshot written at the end holds the decayed LR); a checkpoint written
    before these settings resumes with the rows it had (the backbone's momentum, LR x1); the
    full head refuses them (its rows are torch parameters)."""
    hf = ["--sampled", "--sampler", "random", "--sample-num", "24", "--renorm-rows", "1",
          "--no-row-catchup-decay"]
    for extra, momentum, lr in (([], 0.0, 1.0),                       # 0.1 x 10
                                (["--momentum", "0.5"], 0.0, 0.2),     # 0.1 x 2
                                (["--row-momentum", "0.9"], 0.9, 0.1),  # lazy momentum, x1
                                (["--sampled-rule", "paper"], 0.9, 0.1),  # the paper's rule
                                (["--row-momentum", "0.5", "--row-lr-mult", "3"], 0.5, 0.3)):
        _, store = build(["--train-rec", str(tiny_rec), *TINY, *hf, *extra])
        assert store.optim.momentum == momentum and store.optim.lr == pytest.approx(lr), extra
    save = tmp_path / "run"
    main(["--train-rec", str(tiny_rec), *TINY, *hf, "--row-momentum", "0.5", "--row-lr-mult",
          "4", "--max-steps", "4", "--lr-steps", "0.01", "--gamma", "0.1", "--save-path",
          str(save), "--device", "cpu"])
    tables, _ = read_snapshot(next(save.glob("rows_step*.safetensors")))
    optim = next(iter(tables.values())).optim
    assert optim.momentum == 0.5 and optim.lr == pytest.approx(0.1 * 0.1 * 4)
    ckpt = torch.load(save / "last.pth", weights_only=True)
    del ckpt["args"]["row_momentum"], ckpt["args"]["row_lr_mult"]
    torch.save(ckpt, save / "old.pth")
    args = parse_args(["--resume", str(save / "old.pth")])
    assert args.row_momentum == args.momentum == 0.9 and args.row_lr_mult == 1.0
    for flag in (["--row-momentum", "0"], ["--row-lr-mult", "2"]):
        with pytest.raises(ValueError, match=f"{flag[0]} .* applies to the sampled head"):
            parse_args(["--train-rec", str(tiny_rec), *TINY, *flag])
    with pytest.raises(ValueError, match="give --row-lr-mult"):
        parse_args(["--train-rec", str(tiny_rec), *TINY, *hf, "--momentum", "1"])
    for bad in (["--row-lr-mult", "0"], ["--row-momentum", "-1"], ["--row-lr-mult", "nan"]):
        with pytest.raises(SystemExit):
            parse_args(["--train-rec", str(tiny_rec), *TINY, *hf, *bad])


def test_renorm_and_cap_reach_the_row_store_and_are_refused_where_they_mean_nothing(tiny_rec):
    """--renorm-rows and --max-norm-rows reach the row store; given non-zero, one replaces
    the preset's other; both at once, on the linear head or on the full head: an error
    naming the flag."""
    hf = ["--sampled", "--sampler", "random", "--sample-num", "24", "--head", "cosface"]
    _, store = build(["--train-rec", str(tiny_rec), *TINY, *hf, "--renorm-rows", "1"])
    assert (store.optim.renorm, store.optim.max_norm) == (1.0, 0.0)
    _, store = build(["--train-rec", str(tiny_rec), *TINY, *hf, "--max-norm-rows", "2",
                      "--row-catchup-decay"])
    assert (store.optim.max_norm, store.optim.renorm, store.optim.catchup_decay) == (2, 0, True)
    linear = TINY[:TINY.index("--head")] + TINY[TINY.index("--lr"):]  # no scale/margin
    for flag in ("--renorm-rows", "--max-norm-rows"):
        with pytest.raises(ValueError, match=f"{flag} 1.0 would change the linear head"):
            parse_args(["--train-rec", str(tiny_rec), *linear, *hf, flag, "1", "--head",
                        "linear"])
        with pytest.raises(ValueError, match=f"{flag} 1.0 applies to the sampled head"):
            parse_args(["--train-rec", str(tiny_rec), *TINY, flag, "1"])
    with pytest.raises(ValueError, match="--renorm-rows 1.0 .* --max-norm-rows 1.0 .* one of"):
        parse_args(["--train-rec", str(tiny_rec), *TINY, *hf, "--max-norm-rows", "1",
                    "--renorm-rows", "1"])


def test_row_catchup_decay_reaches_the_rows_and_needs_momentum_0(tiny_rec, tmp_path):
    """--row-catchup-decay: the row store decays every row every step (a run's snapshot
    holds the setting, and rows never selected shrank by the steps' decay); refused with
    lazy momentum (naming the fix) and on the full head."""
    hf = ["--sampled", "--sampler", "random", "--sample-num", "24", "--head", "cosface",
          "--max-norm-rows", "0"]
    _, store = build(["--train-rec", str(tiny_rec), *TINY, *hf, "--no-row-catchup-decay"])
    assert not store.optim.catchup_decay
    save = tmp_path / "run"
    main(["--train-rec", str(tiny_rec), *TINY, *hf, "--row-catchup-decay", "--max-steps", "3",
          "--weight-decay", "0.01", "--save-path", str(save), "--device", "cpu"])
    table = next(iter(read_snapshot(next(save.glob("rows_step*.safetensors")))[0].values()))
    assert table.optim.catchup_decay and table.updates == 3
    lr = table.optim.lr
    from paramserver.table import init_rows
    init = init_rows("normal", 0, 40, table.dim, 0.01, 0)
    decayed = init * np.float32(1 - lr * 0.01) ** 3  # a row no step selected
    never = np.flatnonzero(np.isclose(table.weight, decayed, rtol=1e-6, atol=0).all(axis=1))
    assert 0 < never.size < 40, never  # 24 of 40 classes a step: some rows were never picked
    assert not (table.weight == init).all(axis=1).any()  # and none kept its initial value
    with pytest.raises(ValueError, match="--row-momentum 0.9 with --row-catchup-decay.*"
                                         "--no-row-catchup-decay"):
        parse_args(["--train-rec", str(tiny_rec), *TINY, *hf, "--row-catchup-decay",
                    "--row-momentum", "0.9"])
    with pytest.raises(ValueError, match="--row-catchup-decay True applies to the sampled"):
        parse_args(["--train-rec", str(tiny_rec), *TINY, "--row-catchup-decay"])


def test_the_rule_reaches_store_and_sampler_and_checkpoints_keep_it_resolved(tiny_rec,
                                                                           tmp_path):
    """What the resolved rule (tests/test_sampled_config.py: the table) builds: the row
    store's SGD and the sampler's fresh rows, per head, sampler and preset, flags
    overriding one setting each; a checkpoint keeps the rule as it ran, so a resumed run
    keeps it whatever the presets say later."""
    linear = TINY[:TINY.index("--head")] + TINY[TINY.index("--lr"):]
    hf = ["--sampled", "--sample-num", "16", "--interval", "2"]
    exact = ["--sampler", "exact"]
    #        base,  extra,                                       renorm, cap, decay, fresh
    cases = ((TINY, exact, 0.0, 1.0, True, 40),   # 32768 rows, at most the 40 classes
             (TINY, [*exact, "--head", "arcface"], 0.0, 1.0, True, 40),
             (TINY, ["--sampler", "random"], 0.0, 1.0, True, None),
             (TINY, [*exact, "--fresh-rows", "0"], 0.0, 1.0, True, None),
             (TINY, [*exact, "--renorm-rows", "1"], 1.0, 0.0, True, 40),
             (TINY, [*exact, "--max-norm-rows", "0"], 0.0, 0.0, True, 40),
             (TINY, [*exact, "--no-row-catchup-decay"], 0.0, 1.0, False, 40),
             (TINY, [*exact, "--fresh-rows", "5"], 0.0, 1.0, True, 5),
             (TINY, [*exact, "--interval", "2049"], 0.0, 1.0, True, 40),  # no cliff
             (TINY, [*exact, "--sampled-rule", "paper"], 0.0, 0.0, False, None),
             (linear, [*exact, "--head", "linear"], 0.0, 0.0, False, None))
    for base, extra, renorm, cap, decay, fresh in cases:
        head, store = build(["--train-rec", str(tiny_rec), *base, *hf, *extra])
        try:
            optim = store.table.optim
            assert (optim.renorm, optim.max_norm, optim.catchup_decay) == (renorm, cap, decay), \
                extra
            assert (head.sampler.fresh and head.sampler.fresh.capacity) == fresh, extra
        finally:
            head.sampler.close()
    save = tmp_path / "run"
    main(["--train-rec", str(tiny_rec), *TINY, *hf, *exact, "--max-steps", "2",
          "--save-path", str(save), "--device", "cpu"])
    ckpt = torch.load(save / "last.pth", weights_only=True)
    want = {"row_momentum": 0.0, "row_lr_mult": pytest.approx(10.0), "renorm_rows": 0.0,
            "max_norm_rows": 1.0, "row_catchup_decay": True, "fresh_rows": 32768,
            "logq": "sample", "random_share": 0.0}
    assert {k: ckpt["args"][k] for k in want} == want
    assert json.loads((save / "args.json").read_text())["max_norm_rows"] == 1.0
    args = parse_args(["--resume", str(save / "last.pth")])
    assert {k: getattr(args, k) for k in want} == want
    # a flag given on resume overrides the stored rule, one setting only
    args = parse_args(["--resume", str(save / "last.pth"), "--fresh-rows", "7"])
    assert rule_from_args(args).fresh_rows == 7 and rule_from_args(args).max_norm_rows == 1.0


def test_small_nets_default_to_a_smaller_scale_and_margin_stored_resolved(tiny_rec, tmp_path):
    """convnet-s: s 30, m 0.2 unless --scale/--margin say otherwise (other backbones keep
    the heads' 64 / 0.35 / 0.5); the checkpoint stores the values it ran with, and one from
    before (scale and margin None) resumes at the heads' own defaults."""
    from hfsoftmax.heads.factory import logit_kwargs

    base = ["--train-rec", str(tiny_rec), "--head", "cosface"]
    assert logit_kwargs(parse_args(base + ["--arch", "convnet-s"])) == \
        {"logit": "cosface", "s": 30.0, "m": 0.2}
    assert logit_kwargs(parse_args(base + ["--arch", "ir18"])) == {"logit": "cosface"}
    assert logit_kwargs(parse_args(base + ["--arch", "convnet-s", "--margin", "0.35"])) == \
        {"logit": "cosface", "s": 30.0, "m": 0.35}
    assert logit_kwargs(parse_args(base + ["--arch", "convnet-s-gn", "--head", "arcface"])) \
        == {"logit": "arcface", "s": 30.0, "m": 0.2}
    save = tmp_path / "run"
    small = TINY[:TINY.index("--scale")] + TINY[TINY.index("--lr"):]  # no scale/margin
    assert main(["--train-rec", str(tiny_rec), *small, "--max-steps", "1",
                 "--save-path", str(save)]) == 0
    ckpt = torch.load(save / "last.pth", weights_only=True)
    assert (ckpt["args"]["scale"], ckpt["args"]["margin"]) == (30.0, 0.2)
    assert "cosface s=30 m=0.2" in (save / "train.log").read_text()
    ckpt["args"].update(scale=None, margin=None)
    torch.save(ckpt, save / "old.pth")
    old = parse_args(["--resume", str(save / "old.pth")])
    assert (old.scale, old.margin) == (64.0, 0.35)


def test_a_rule_field_reaches_the_server_through_its_metadata_alone(tiny_rec):
    """--row-nesterov was added to the rule by one field in sampled_config.py (its SGD
    metadata names SGDConfig.nesterov): the trainer's flag, the rule, the client and the
    server's set_optimizer carry it with no code of their own."""
    hf = ["--sampled", "--sampler", "random", "--sample-num", "24"]
    with running_server() as (_, address):
        _, store = build(["--train-rec", str(tiny_rec), *TINY, *hf, "--ps", address,
                          "--sampled-rule", "paper", "--row-nesterov"])
        try:
            assert store.info()["optimizer"]["nesterov"] is True
            assert store.info()["optimizer"]["momentum"] == 0.9
        finally:
            store.close()


def test_checkpoints_before_the_rule_resume_with_what_they_ran(tiny_rec, tmp_path):
    """The legacy table: a checkpoint whose args predate a rule setting resumes with the
    value it ran with (renorm, cap, every-step decay, fresh rows, log-Q off; the rows took
    the backbone's momentum at LR x1); the trainer of 308503f..05ca052 stored fresh rows
    unresolved (None: --interval x --sample-num up to 32768 then), and the two log-Q flags."""
    hf = ["--sampled", "--sample-num", "16", "--interval", "2", "--sampler", "exact"]
    save = tmp_path / "run"
    main(["--train-rec", str(tiny_rec), *TINY, *hf, "--max-steps", "2",
          "--save-path", str(save), "--device", "cpu"])
    ckpt = torch.load(save / "last.pth", weights_only=True)
    for key in ("logq", "random_share"):
        del ckpt["args"][key]
    ckpt["args"].update(fresh_rows=None, logq_per_sample=True, logq_correction=False)
    torch.save(ckpt, save / "05ca052.pth")
    args = parse_args(["--resume", str(save / "05ca052.pth")])
    rule = rule_from_args(args)
    assert (rule.fresh_rows, rule.logq, rule.max_norm_rows, rule.row_catchup_decay) == \
        (32, "sample", 1.0, True)
    for key in ("renorm_rows", "max_norm_rows", "row_catchup_decay", "fresh_rows",
                "logq_per_sample", "logq_correction", "row_momentum", "row_lr_mult"):
        del ckpt["args"][key]
    torch.save(ckpt, save / "old.pth")
    rule = rule_from_args(parse_args(["--resume", str(save / "old.pth")]))
    assert (rule.renorm_rows, rule.max_norm_rows, rule.row_catchup_decay, rule.fresh_rows,
            rule.logq, rule.row_momentum, rule.row_lr_mult) == \
        (0.0, 0.0, False, 0, "off", 0.9, 1.0)


def test_neighbour_slots_per_sample_is_what_the_selection_leaves_each_sample():
    """(sample_num - labels of the global batch - random share) / global batch; None where
    no index selects classes."""
    def slots(argv, world=1):
        args = parse_args(argv)
        return neighbour_slots_per_sample(args, rule_from_args(args) if args.sampled else None,
                                          world)

    base = ["--train-rec", "x", "--batch-size", "64", "--sampled", "--sample-num", "200"]
    # the benchmark's 1%: 136 slots for 64 samples; 5%: 936
    assert slots(base) == pytest.approx(136 / 64)
    five = base[:-1] + ["1000"]
    assert slots(five) == pytest.approx(936 / 64)
    # two processes: the sampled head selects over the all-gathered batch of 128
    assert slots(base, world=2) == pytest.approx(72 / 128)
    assert slots(base + ["--random-share", "0.5"]) == pytest.approx(68 / 64)
    assert slots(base + ["--sampler", "random"]) is None
    assert slots(["--train-rec", "x"]) is None


def test_the_log_warns_when_fresh_rows_will_fill_within_an_interval(tiny_rec, tmp_path):
    """--fresh-rows smaller than the rows one interval can change: the index rebuilds early;
    the start-up log says so and names the fix."""
    save = tmp_path / "run"
    assert main(["--train-rec", str(tiny_rec), *TINY, "--sampled", "--sampler", "exact",
                 "--sample-num", "20", "--interval", "10", "--fresh-rows", "30",
                 "--max-steps", "1", "--save-path", str(save)]) == 0
    log = (save / "train.log").read_text()
    assert "up to 200 rows change per interval" in log and "about every 1 steps" in log
    assert "raise --fresh-rows, or set it to 0" in log
