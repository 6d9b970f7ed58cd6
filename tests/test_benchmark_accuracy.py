"""Smoke run of benchmarks/accuracy.py (--preset quick): the JSON it prints and writes.

A real run end to end (synthetic set, the trainer with the full, annoy, faiss and random
heads, verification and held-out top-1); tiny sizes, so the figures themselves are noise:
the test checks structure and sanity, not accuracy targets.
"""
import json
import os
import subprocess
import sys

import pytest

from tests.bench_utils import ROOT, import_benchmark

SCRIPT = ROOT / "benchmarks" / "accuracy.py"


def _run(*args, timeout=600):
    env = dict(os.environ, OMP_NUM_THREADS="1")
    return subprocess.run([sys.executable, str(SCRIPT), *args], cwd=ROOT, env=env,
                          capture_output=True, text=True, timeout=timeout)


@pytest.mark.timeout(600)
def test_quick_preset_writes_one_json_with_every_method(tmp_path):
    out = tmp_path / "accuracy_quick.json"
    proc = _run("--preset", "quick", "--work-dir", str(tmp_path / "work"), "--out", str(out))
    assert proc.returncode == 0, proc.stderr[-3000:]
    printed = json.loads(proc.stdout)           # stdout is exactly one JSON object
    written = json.loads(out.read_text())
    assert printed == written

    cfg = written["config"]
    assert cfg["preset"] == "quick" and cfg["sample_num"] == 30 and cfg["steps"] == 6
    assert written["dataset"]["config"]["num_classes"] == cfg["num_classes"] == 60
    assert set(written["runs"]) == {"cosface/full", "cosface/annoy", "cosface/faiss",
                                    "cosface/random"}
    for key, run in written["runs"].items():
        assert "error" not in run, (key, run.get("error"))
        assert run["final_step"] == cfg["steps"]
        ver = run["verification"]
        assert ver["pairs"] == cfg["pairs"]
        assert 0.0 <= ver["accuracy"] <= 1.0 and 0.0 <= ver["auc"] <= 1.0
        assert len(ver["fold_accuracies"]) == 10
        for kind in ("same", "lookalike", "other"):
            assert 0.0 <= ver[f"accuracy_{kind}"] <= 1.0
        assert 0.0 <= ver["threshold"] <= 4.0
        assert -1.0 <= ver["cos_lookalike"] <= 1.0 and -1.0 <= ver["cos_same"] <= 1.0
        assert -1.0 <= run["best_other_row_cos"] <= 1.0 and -1.0 <= run["own_row_cos"] <= 1.0
        assert run["own_row_cos_gap"] == pytest.approx(
            run["own_row_cos"] - run["best_other_row_cos"], abs=2e-4)
        assert sum(ver["fold_accuracies"]) / 10 == pytest.approx(ver["accuracy"], abs=1e-4)
        assert 0.0 <= run["top1"] <= run["top1_family"] <= 1.0
        assert run["top1_images"] == cfg["num_classes"] * cfg["heldout_per_class"]
        assert run["train_wall_s"] > 0 and run["train_cpu_s"] >= 0
        assert run["final_loss"] > 0 and 0.0 <= run["final_train_acc"] <= 1.0
        assert run["row_norm"]["max"] >= run["row_norm"]["mean"] >= run["row_norm"]["min"] > 0
        assert 0.0 <= run["errors_in_family"] <= 1.0
        assert 0.0 <= run["image_top10_wrong_in_family"] <= 1.0
        assert 0.0 <= run["row_top10_in_family"] <= 1.0
        assert run["in_family_chance"] == pytest.approx(4 / 59, abs=1e-6)
        # the trainer really trained what the key says
        argv = run["trainer_argv"]
        assert argv[argv.index("--head") + 1] == "cosface"
        if run["method"] == "full":
            assert "--sampled" not in argv and "recall_at10_mean" not in run
        else:
            assert argv[argv.index("--sampler") + 1] == run["method"]
            assert argv[argv.index("--sample-num") + 1] == "30"
            assert 0.0 <= run["recall_at10_mean"] <= 1.0
        if run["method"] in ("annoy", "faiss"):
            assert 0.0 < run["index_recall_at10_fresh"] <= 1.0
        else:
            assert "index_recall_at10_fresh" not in run
    cmp = written["comparison"]["cosface"]
    pairs = [("full", "random")] + [(h, r) for h in ("annoy", "faiss") for r in ("full", "random")]
    for hf, ref in pairs:
        d = cmp[f"{hf}_minus_{ref}"]
        a, b = written["runs"][f"cosface/{hf}"], written["runs"][f"cosface/{ref}"]
        assert d["top1_pts"] == pytest.approx(100 * (a["top1"] - b["top1"]), abs=0.01)
        folds = [100 * (x - y) for x, y in zip(a["verification"]["fold_accuracies"],
                                               b["verification"]["fold_accuracies"])]
        mean = sum(folds) / 10
        se = (sum((f - mean) ** 2 for f in folds) / 9) ** 0.5 / 10 ** 0.5
        assert d["verification_se_pts"] == pytest.approx(se, abs=0.006)
    for hf in ("annoy", "faiss"):
        assert set(cmp[f"{hf}_meets_target"]) == {"verification", "top1"}

    # --resume with the same configuration measures nothing again
    again = _run("--preset", "quick", "--work-dir", str(tmp_path / "work"), "--out", str(out),
                 "--resume")
    assert again.returncode == 0, again.stderr[-3000:]
    assert json.loads(again.stdout)["runs"] == written["runs"]
    assert "=== cosface/full: training" not in again.stderr

    # --eval-only re-evaluates the same checkpoints: the same figures, nothing trained
    ev = _run("--preset", "quick", "--work-dir", str(tmp_path / "work"), "--out", str(out),
              "--eval-only")
    assert ev.returncode == 0, ev.stderr[-3000:]
    assert ": training" not in ev.stderr and "re-evaluating" in ev.stderr
    for key, run in json.loads(ev.stdout)["runs"].items():
        old = written["runs"][key]
        for fig in ("top1", "top1_family", "row_top10_in_family"):
            assert run[fig] == old[fig], (key, fig)
        assert run["verification"]["accuracy"] == old["verification"]["accuracy"]
    # ... and may score them on more verification pairs (an evaluation-only setting: the
    # set's .bin is rewritten, its training records kept); training settings may not change
    rec = next((tmp_path / "work").glob("synthetic_*/train.rec"))
    mtime = rec.stat().st_mtime_ns
    ev = _run("--preset", "quick", "--work-dir", str(tmp_path / "work"), "--out", str(out),
              "--eval-only", "--pairs", "80")
    assert ev.returncode == 0, ev.stderr[-3000:]
    assert ": training" not in ev.stderr and "re-evaluated with new pairs" in ev.stderr
    more = json.loads(ev.stdout)
    assert more["config"]["pairs"] == 80 and rec.stat().st_mtime_ns == mtime
    for key, run in more["runs"].items():
        assert run["verification"]["pairs"] == 80
        assert run["top1"] == written["runs"][key]["top1"]
    bad = _run("--preset", "quick", "--work-dir", str(tmp_path / "work"), "--out", str(out),
               "--eval-only", "--pairs", "80", "--steps", "7")
    assert bad.returncode != 0 and "differs in steps" in bad.stderr
    assert "only pairs, top1_images may change" in bad.stderr

    # --merge: methods measured by two processes combine into one result (comparisons too)
    parts = []
    for i, keys in enumerate((("cosface/full", "cosface/annoy"),
                              ("cosface/random", "cosface/faiss"))):
        part = dict(written, runs={k: written["runs"][k] for k in keys},
                    comparison={}, total_wall_s=10.0 * (i + 1))
        parts.append(tmp_path / f"part{i}.json")
        parts[-1].write_text(json.dumps(part))
    merged_out = tmp_path / "merged.json"
    mg = _run("--preset", "quick", "--merge", *map(str, parts), "--out", str(merged_out))
    assert mg.returncode == 0, mg.stderr[-3000:]
    merged = json.loads(merged_out.read_text())
    assert merged["runs"] == written["runs"]
    assert merged["comparison"] == written["comparison"]
    assert merged["total_wall_s"] == 20.0 and len(merged["parts"]) == 2
    # a part with full/random runs only may differ in the settings only HF methods use
    hf_free = dict(written, runs={k: written["runs"][k] for k in ("cosface/full",
                                                                  "cosface/random")})
    hf_free["config"] = dict(written["config"], interval=7, fresh_rows=123)
    del hf_free["config"]["row_lr_mult"]   # an output older than the setting: measured at 1
    hf_part = dict(written, runs={k: written["runs"][k] for k in ("cosface/annoy",
                                                                  "cosface/faiss")})
    parts2 = [tmp_path / "hf_free.json", tmp_path / "hf.json"]
    parts2[0].write_text(json.dumps(hf_free))
    parts2[1].write_text(json.dumps(hf_part))
    mg = _run("--preset", "quick", "--merge", *map(str, parts2), "--out", str(merged_out))
    assert mg.returncode == 0, mg.stderr[-3000:]
    merged = json.loads(merged_out.read_text())
    assert merged["config"] == written["config"] and merged["runs"] == written["runs"]
    # a full-softmax-only part may also differ in the sampled head's settings
    full_only = dict(written, runs={"cosface/full": written["runs"]["cosface/full"]})
    full_only["config"] = {k: v for k, v in written["config"].items() if k != "renorm_rows"}
    rest = dict(written, runs={k: v for k, v in written["runs"].items() if k != "cosface/full"})
    parts3 = [tmp_path / "full_only.json", tmp_path / "rest.json"]
    parts3[0].write_text(json.dumps(full_only))
    parts3[1].write_text(json.dumps(rest))
    mg = _run("--preset", "quick", "--merge", *map(str, parts3), "--out", str(merged_out))
    assert mg.returncode == 0, mg.stderr[-3000:]
    assert json.loads(merged_out.read_text())["runs"] == written["runs"]
    # ... named first or last beside a random part of another sample_num: the merged
    # configuration is the random part's (e.g. the sampled head over all classes vs full)
    random_only = dict(written, runs={"cosface/random": written["runs"]["cosface/random"]})
    random_only["config"] = dict(written["config"], sample_num=written["config"]["sample_num"] + 1)
    parts4 = [tmp_path / "random_only.json"]
    parts4[0].write_text(json.dumps(random_only))
    for order in ([parts3[0], parts4[0]], [parts4[0], parts3[0]]):
        mg = _run("--preset", "quick", "--merge", *map(str, order), "--out", str(merged_out))
        assert mg.returncode == 0, mg.stderr[-3000:]
        merged = json.loads(merged_out.read_text())
        assert merged["config"] == random_only["config"]
        assert sorted(merged["runs"]) == ["cosface/full", "cosface/random"]
    # ... and be re-evaluated (--eval-only checks only the settings its runs depend on)
    ev = _run("--preset", "quick", "--work-dir", str(tmp_path / "work"), "--out",
              str(parts3[0]), "--methods", "full", "--eval-only")
    assert ev.returncode == 0 and "re-evaluating" in ev.stderr, ev.stderr[-3000:]
    assert json.loads(ev.stdout)["runs"]["cosface/full"]["top1"] == \
        written["runs"]["cosface/full"]["top1"]
    rest["config"] = dict(written["config"], renorm_rows=2.0)  # an HF part may not differ
    parts3[1].write_text(json.dumps(rest))
    parts3.append(tmp_path / "hf2.json")
    parts3[2].write_text(json.dumps(hf_part))
    bad = _run("--preset", "quick", "--merge", *map(str, parts3), "--out", str(merged_out))
    assert bad.returncode != 0 and "differs in renorm_rows" in bad.stderr
    other = json.loads(parts[1].read_text())
    other["config"]["steps"] += 1
    parts[1].write_text(json.dumps(other))
    bad = _run("--preset", "quick", "--merge", *map(str, parts), "--out", str(merged_out))
    assert bad.returncode != 0 and "differs in steps" in bad.stderr


def test_bad_flags_are_named():
    proc = _run("--preset", "quick", "--methods", "full,bogus")
    assert proc.returncode == 2 and "bogus" in proc.stderr and "annoy" in proc.stderr
    proc = _run("--preset", "quick", "--sample-num", "4")
    assert proc.returncode == 2 and "sample_num 4" in proc.stderr


def test_pair_kind_accuracy_follows_the_synthetic_layout():
    """Pairs 0, 2, ... are same identity, 1, 5, ... look-alikes, 3, 7, ... two families."""
    import numpy as np

    accuracy = import_benchmark("accuracy")
    dist = np.array([0.1, 0.5, 0.2, 2.0, 0.3, 1.5, 1.0, 0.9])
    same = np.arange(8) % 2 == 0
    got = accuracy.pair_kind_accuracy(dist, same, 0.8)
    assert got == {"threshold": 0.8, "accuracy_same": 0.75, "accuracy_lookalike": 0.5,
                   "accuracy_other": 1.0,
                   # cosine = 1 - squared L2 / 2 of unit vectors, averaged per kind
                   "cos_same": 0.8, "cos_lookalike": 0.5, "cos_other": 0.275}


def test_own_row_cosines_takes_the_best_row_that_is_not_the_label():
    import numpy as np

    accuracy = import_benchmark("accuracy")
    rows = np.array([[1.0, 0.0], [0.0, 2.0], [-3.0, 0.0]])   # norms differ: cosines, not dots
    feats = np.array([[3.0, 4.0], [-3.0, -4.0]])             # unit: +-(0.6, 0.8)
    labels = np.array([0, 2])
    # image 0: its label ranks second, so class 1 is its best other; image 1: its label
    # ranks first, so class 0 (second) is
    top = np.array([[1, 0, 2], [2, 0, 1]])
    got = accuracy.own_row_cosines(feats, rows, labels, top)
    own, other = (0.6 + 0.6) / 2, (0.8 - 0.6) / 2
    assert got == {"own_row_cos": pytest.approx(own), "best_other_row_cos": pytest.approx(other),
                   "own_row_cos_gap": pytest.approx(own - other)}


def test_log_q_flags_reach_the_sampled_runs_they_are_for():
    """--logq-correction goes to the sampled methods (HF and random); --logq-per-sample /
    --no-logq-per-sample to the HF methods only, and unset the trainer's default decides
    (on for margin heads unless --logq-correction, off for the linear head); the config
    records what the trainer resolved for the HF runs."""
    acc = import_benchmark("accuracy")
    from hfsoftmax.engine.config import parse_args
    from hfsoftmax.train import logq_per_sample

    def flags(args, method, head="cosface"):
        argv = acc.trainer_argv(args, method, head, "x")
        return [a for a in argv if "logq" in a]

    cases = (([], True, [], []),
             (["--no-logq-per-sample"], False, ["--no-logq-per-sample"], []),
             (["--logq-correction"], False, ["--logq-correction"], ["--logq-correction"]),
             (["--logq-correction", "--logq-per-sample"], True,
              ["--logq-correction", "--logq-per-sample"], ["--logq-correction"]))
    for extra, per_sample, hf, random in cases:
        args = acc.resolve_args(["--preset", "quick", *extra])
        assert acc.config_of(args)["logq_per_sample"] is per_sample
        assert acc.config_of(args)["logq_correction"] is ("--logq-correction" in extra)
        assert flags(args, "annoy") == flags(args, "faiss") == hf
        assert flags(args, "random") == random and flags(args, "full") == []
        run = parse_args(acc.trainer_argv(args, "annoy", "cosface", "x"))
        assert logq_per_sample(run) is per_sample
    # the linear head: off unless asked for; per head where the heads differ
    args = acc.resolve_args(["--preset", "quick", "--heads", "linear"])
    assert flags(args, "annoy", "linear") == [] and acc.config_of(args)["logq_per_sample"] is False
    args = acc.resolve_args(["--preset", "quick", "--heads", "linear", "cosface"])
    assert acc.config_of(args)["logq_per_sample"] == {"linear": False, "cosface": True}
    args = acc.resolve_args(["--preset", "quick", "--heads", "linear", "--logq-per-sample"])
    assert flags(args, "annoy", "linear") == ["--logq-per-sample"]
    assert acc.config_of(args)["logq_per_sample"] is True
    assert acc.stored_config({"config": {}})["logq_per_sample"] is False  # older outputs


def test_row_store_flags_reach_the_sampled_runs_and_bad_pairs_are_named():
    """--max-norm-rows and --catchup-decay go to HF and random (resolved by the trainer as
    a cap with the renorm off, every-step decay), never to the full softmax; the config
    records them, older outputs read as off; a cap beside a renorm, or the catch-up beside
    a momentum, is refused naming the fix."""
    acc = import_benchmark("accuracy")
    from hfsoftmax.engine.config import parse_args
    from hfsoftmax.train import renorm_rows

    args = acc.resolve_args(["--preset", "quick", "--renorm-rows", "0", "--max-norm-rows",
                             "1.5", "--row-momentum", "0", "--catchup-decay"])
    for method in ("annoy", "random"):
        run = parse_args(acc.trainer_argv(args, method, "cosface", "x"))
        assert (run.max_norm_rows, renorm_rows(run), run.row_catchup_decay) == (1.5, 0, True)
    full = parse_args(acc.trainer_argv(args, "full", "cosface", "x"))
    assert (full.max_norm_rows, full.row_catchup_decay) == (None, None)
    assert acc.config_of(args)["max_norm_rows"] == 1.5 and acc.config_of(args)["catchup_decay"]
    assert acc.stored_config({"config": {}})["max_norm_rows"] == 0.0
    # the issue preset's rule (cap + every-step decay); a renorm or a row momentum given
    # turns the cap or the decay off, as the trainer's defaults do
    issue = acc.resolve_args([])
    assert (issue.renorm_rows, issue.max_norm_rows, issue.catchup_decay) == (0.0, 1.0, True)
    old = acc.resolve_args(["--renorm-rows", "1", "--row-momentum", "0.9"])
    assert (old.renorm_rows, old.max_norm_rows, old.catchup_decay) == (1.0, 0.0, False)
    run = parse_args(acc.trainer_argv(old, "annoy", "cosface", "x"))
    assert (renorm_rows(run), run.max_norm_rows, run.row_catchup_decay) == (1.0, 0.0, False)
    assert acc.resolve_args(["--preset", "quick", "--max-norm-rows", "1"]).renorm_rows == 0
    proc = _run("--preset", "quick", "--max-norm-rows", "1", "--renorm-rows", "1")
    assert proc.returncode == 2 and "add --renorm-rows 0" in proc.stderr
    proc = _run("--preset", "quick", "--catchup-decay")
    assert proc.returncode == 2 and "needs --row-momentum 0 (got 0.9)" in proc.stderr
    proc = _run("--row-momentum", "0.9", "--catchup-decay")
    assert proc.returncode == 2 and "needs --row-momentum 0 (got 0.9)" in proc.stderr


def test_train_seed_repeats_training_on_the_same_set():
    """--train-seed reaches the trainer (default: --seed) without changing the set, is
    recorded, and outputs that predate it read as trained with their --seed."""
    acc = import_benchmark("accuracy")

    def trainer_seed(args):
        argv = acc.trainer_argv(args, "annoy", "cosface", "x")
        return argv[argv.index("--seed") + 1]

    same = acc.resolve_args(["--preset", "issue", "--seed", "1"])
    other = acc.resolve_args(["--preset", "issue", "--seed", "1", "--train-seed", "3"])
    assert trainer_seed(same) == "1" and trainer_seed(other) == "3"
    assert same.data == other.data and same.data.endswith("_s1")
    assert acc.config_of(other)["train_seed"] == 3 and acc.config_of(other)["seed"] == 1
    assert acc.stored_config({"config": {"seed": 2}})["train_seed"] == 2
    assert acc.config_diff(acc.config_of(same), acc.config_of(other)) == ["train_seed"]
