"""benchmarks/accuracy.py: a smoke run (--quick) end to end, and its pieces.

A real run (synthetic set, the trainer with the configs full, hf_annoy, hf_faiss and random,
verification and held-out top-1); tiny sizes, so the figures themselves are noise: the test
checks structure and sanity, not accuracy targets. That the benchmark declares no trainer
flag and runs the trainer's own configs is checked on its command lines.
"""
import json
import os
import subprocess
import sys

import numpy as np
import pytest

from tests.bench_utils import ROOT, import_benchmark

SCRIPT = ROOT / "benchmarks" / "accuracy.py"


def _run(*args, timeout=600):
    env = dict(os.environ, OMP_NUM_THREADS="1")
    return subprocess.run([sys.executable, str(SCRIPT), *args], cwd=ROOT, env=env,
                          capture_output=True, text=True, timeout=timeout)


def _check_run(key, run, cfg):
    assert "error" not in run, (key, run.get("error"))
    assert run["final_step"] == 6
    ver = run["verification"]
    assert ver["pairs"] == cfg["pairs"]
    assert 0.0 <= ver["accuracy"] <= 1.0 and 0.0 <= ver["auc"] <= 1.0
    assert len(ver["fold_accuracies"]) == 10
    for kind in ("same", "lookalike", "other"):
        assert 0.0 <= ver[f"accuracy_{kind}"] <= 1.0
    for proto in ("lookalike_pairs", "random_pairs"):  # half the same pairs each + 10 pairs
        assert run[proto]["pairs"] == cfg["pairs"] // 2
        assert len(run[proto]["fold_accuracies"]) == 10
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
    # the trainer ran the method's own config, and recorded what it resolved
    argv, settings = run["trainer_argv"], run["settings"]
    cfg_files = argv[argv.index("--config") + 1:argv.index("--train-rec")]
    assert [os.path.basename(c) for c in cfg_files] == [
        "recipe_3ep.yaml", import_benchmark("accuracy").METHODS[run["method"]], "quick.yaml"]
    assert settings["head"] == "cosface" and settings["scale"] == 30
    if run["method"] == "full":
        assert not settings["sampled"] and "recall_at10_mean" not in run
    else:
        assert settings["sampler"] == run["method"] and settings["sample_num"] == 30
        assert 0.0 <= run["recall_at10_mean"] <= 1.0
        # the rule as the trainer resolved it (its defaults: cap + every-step decay)
        assert (settings["max_norm_rows"], settings["row_catchup_decay"]) == (1.0, True)
        assert settings["logq"] == ("off" if run["method"] == "random" else "sample")
    if run["method"] in ("annoy", "faiss"):
        assert 0.0 < run["index_recall_at10_fresh"] <= 1.0
    else:
        assert "index_recall_at10_fresh" not in run


@pytest.mark.timeout(600)
def test_quick_run_writes_one_json_with_every_method(tmp_path):
    out = tmp_path / "accuracy_quick.json"
    work = ["--quick", "--work-dir", str(tmp_path / "work")]
    proc = _run(*work, "--out", str(out))
    assert proc.returncode == 0, proc.stderr[-3000:]
    printed = json.loads(proc.stdout)           # stdout is exactly one JSON object
    written = json.loads(out.read_text())
    assert printed == written
    cfg = written["config"]
    assert cfg["quick"] and cfg["sample_rate"] == 0.5 and cfg["num_classes"] == 60
    assert written["dataset"]["config"]["num_classes"] == 60
    assert set(written["runs"]) == {"full", "annoy", "faiss", "random"}
    for key, run in written["runs"].items():
        _check_run(key, run, cfg)
    cmp = written["comparison"]
    pairs = [("full", "random")] + [(h, r) for h in ("annoy", "faiss") for r in ("full", "random")]
    for hf, ref in pairs:
        d = cmp[f"{hf}_minus_{ref}"]
        a, b = written["runs"][hf], written["runs"][ref]
        assert d["top1_pts"] == pytest.approx(100 * (a["top1"] - b["top1"]), abs=0.01)
        assert d["lookalike_pairs_pts"] == pytest.approx(
            100 * (a["lookalike_pairs"]["accuracy"] - b["lookalike_pairs"]["accuracy"]),
            abs=0.01)
        assert d["lookalike_pts"] == pytest.approx(
            100 * (a["verification"]["accuracy_lookalike"] -
                   b["verification"]["accuracy_lookalike"]), abs=0.01)
        folds = [100 * (x - y) for x, y in zip(a["verification"]["fold_accuracies"],
                                               b["verification"]["fold_accuracies"])]
        mean = sum(folds) / 10
        se = (sum((f - mean) ** 2 for f in folds) / 9) ** 0.5 / 10 ** 0.5
        assert d["verification_se_pts"] == pytest.approx(se, abs=0.006)
    for hf in ("annoy", "faiss"):
        assert set(cmp[f"{hf}_meets_target"]) == {"verification", "top1",
                                                  "above_random_both_protocols"}

    # --table: the per-set rows of ACCURACY.md and the README, from the same figures
    table = _run("--table", str(out))
    assert table.returncode == 0, table.stderr[-2000:]
    rows = [r for r in table.stdout.splitlines() if r.startswith("| synthetic")]
    assert [r.split(" | ")[1] for r in rows] == ["look-alike pairs", "random pairs"]
    first = rows[0].split(" | ")
    assert first[2] == f"{100 * written['runs']['full']['lookalike_pairs']['accuracy']:.2f}"
    d = cmp["annoy_minus_random"]
    assert first[6].startswith(f"{d['lookalike_pairs_pts']:+.2f} +- ")
    d = cmp["annoy_minus_full"]
    assert first[8].startswith(f"{d['lookalike_pairs_pts']:+.2f} +- ")
    minutes = first[10].rstrip(" |").split(" / ")
    assert minutes[0] == f"{written['runs']['full']['train_wall_s'] / 60:.0f}"

    # --resume with the same configuration measures nothing again
    again = _run(*work, "--out", str(out), "--resume")
    assert again.returncode == 0, again.stderr[-3000:]
    assert json.loads(again.stdout)["runs"] == written["runs"]
    assert "=== full: training" not in again.stderr

    # --eval-only re-evaluates the same checkpoints: the same figures, nothing trained
    ev = _run(*work, "--out", str(out), "--eval-only")
    assert ev.returncode == 0, ev.stderr[-3000:]
    assert ": training" not in ev.stderr and "re-evaluating" in ev.stderr
    for key, run in json.loads(ev.stdout)["runs"].items():
        old = written["runs"][key]
        for fig in ("top1", "top1_family", "row_top10_in_family"):
            assert run[fig] == old[fig], (key, fig)
        assert run["verification"]["accuracy"] == old["verification"]["accuracy"]
    # ... and may score them on more verification pairs (the .bin is rewritten, the
    # training records kept); training settings may not change
    rec = next((tmp_path / "work").glob("synthetic_*/train.rec"))
    mtime = rec.stat().st_mtime_ns
    ev = _run(*work, "--out", str(out), "--eval-only", "--pairs", "80")
    assert ev.returncode == 0, ev.stderr[-3000:]
    assert ": training" not in ev.stderr and "re-evaluated with new pairs" in ev.stderr
    more = json.loads(ev.stdout)
    assert more["config"]["pairs"] == 80 and rec.stat().st_mtime_ns == mtime
    for key, run in more["runs"].items():
        assert run["verification"]["pairs"] == 80
        assert run["top1"] == written["runs"][key]["top1"]
    bad = _run(*work, "--out", str(out), "--eval-only", "--pairs", "80", "--train-seed", "7")
    assert bad.returncode != 0 and "differs in train_seed" in bad.stderr
    assert "only pairs, top1_images may change" in bad.stderr

    # --merge: methods measured by two processes combine into one result (comparisons too)
    parts = []
    for i, keys in enumerate((("full", "annoy"), ("random", "faiss"))):
        part = dict(written, runs={k: written["runs"][k] for k in keys}, comparison={},
                    total_wall_s=10.0 * (i + 1))
        parts.append(tmp_path / f"part{i}.json")
        parts[-1].write_text(json.dumps(part))
    merged_out = tmp_path / "merged.json"
    mg = _run("--merge", *map(str, parts), "--out", str(merged_out))
    assert mg.returncode == 0, mg.stderr[-3000:]
    merged = json.loads(merged_out.read_text())
    assert merged["runs"] == written["runs"] and merged["comparison"] == written["comparison"]
    assert merged["total_wall_s"] == 20.0 and len(merged["parts"]) == 2
    # a full-softmax-only part may differ in the sampled methods' size, named in any order
    full_only = dict(written, runs={"full": written["runs"]["full"]})
    full_only["config"] = dict(written["config"], sample_rate=0.25)
    rest = dict(written, runs={k: v for k, v in written["runs"].items() if k != "full"})
    parts2 = [tmp_path / "full_only.json", tmp_path / "rest.json"]
    parts2[0].write_text(json.dumps(full_only))
    parts2[1].write_text(json.dumps(rest))
    for order in (parts2, parts2[::-1]):
        mg = _run("--merge", *map(str, order), "--out", str(merged_out))
        assert mg.returncode == 0, mg.stderr[-3000:]
        merged = json.loads(merged_out.read_text())
        assert merged["runs"] == written["runs"] and merged["config"] == written["config"]
    # ... a part with sampled runs may not
    other = json.loads(parts[1].read_text())
    other["config"]["sample_rate"] = 0.25
    parts[1].write_text(json.dumps(other))
    bad = _run("--merge", *map(str, parts), "--out", str(merged_out))
    assert bad.returncode != 0 and "differs in sample_rate" in bad.stderr


def test_the_benchmark_declares_no_trainer_flag_and_runs_the_configs():
    """Every trainer setting of a run comes from benchmarks/configs (or --trainer-args);
    the benchmark adds only the data, the seeds, the save path and the sampled size."""
    acc = import_benchmark("accuracy")
    from hfsoftmax.engine.flags import build_parser

    trainer_flags = {o for a in build_parser()._actions for o in a.option_strings}
    own = {o for a in acc.build_parser()._actions for o in a.option_strings} - {"-h", "--help"}
    assert own & trainer_flags <= {"--seed", "--resume"}, own & trainer_flags
    args = acc.resolve_args(["--trainer-args", "--scale 64 --margin 0.35"])
    argv = acc.trainer_argv(args, "annoy", "x")
    set_here = [a for a in argv if a.startswith("--")]
    assert set_here == ["--config", "--train-rec", "--seed", "--save-path", "--sample-num",
                        "--scale", "--margin"]
    assert argv[argv.index("--sample-num") + 1] == "200"  # 1 % of 20,000 classes
    assert argv[-4:] == ["--scale", "64", "--margin", "0.35"]  # the ablation's flags last
    assert "--sample-num" not in acc.trainer_argv(args, "full", "x")
    mins = acc.resolve_args(["--sample-rate", "min"])
    argv = acc.trainer_argv(mins, "random", "x")
    assert argv[argv.index("--sample-num") + 1] == "64"  # the recipe's batch
    for cfg in acc.METHODS.values():
        assert (acc.CONFIGS / cfg).is_file()


def test_bad_flags_are_named():
    proc = _run("--quick", "--methods", "full,bogus")
    assert proc.returncode == 2 and "bogus" in proc.stderr and "annoy" in proc.stderr
    for rate in ("0", "2", "x"):
        proc = _run("--quick", "--sample-rate", rate)
        assert proc.returncode == 2 and "--sample-rate" in proc.stderr


def test_pair_kind_accuracy_reads_each_pairs_kind():
    ev = import_benchmark("accuracy_eval")
    dist = np.array([0.1, 0.5, 0.2, 2.0, 0.3, 1.5, 1.0, 0.9])
    same = np.arange(8) % 2 == 0
    kinds = np.array(["same", "lookalike", "same", "other"] * 2)
    got = ev.pair_kind_accuracy(dist, same, 0.8, kinds)
    assert got == {"threshold": 0.8, "accuracy_same": 0.75, "accuracy_lookalike": 0.5,
                   "accuracy_other": 1.0,
                   # cosine = 1 - squared L2 / 2 of unit vectors, averaged per kind
                   "cos_same": 0.8, "cos_lookalike": 0.5, "cos_other": 0.275}


def test_the_two_protocols_split_the_same_pairs_and_keep_their_kind():
    ev = import_benchmark("accuracy_eval")
    kinds = np.array(["same", "lookalike", "same", "other"] * 5)
    got = ev.protocol_pairs(kinds)
    assert got["lookalike_pairs"].tolist() == [0, 1, 4, 5, 8, 9, 12, 13, 16, 17]
    assert got["random_pairs"].tolist() == [2, 3, 6, 7, 10, 11, 14, 15, 18, 19]
    assert set(got["lookalike_pairs"]) | set(got["random_pairs"]) == set(range(20))


def test_own_row_cosines_takes_the_best_row_that_is_not_the_label():
    ev = import_benchmark("accuracy_eval")
    rows = np.array([[1.0, 0.0], [0.0, 2.0], [-3.0, 0.0]])   # norms differ: cosines, not dots
    feats = np.array([[3.0, 4.0], [-3.0, -4.0]])             # unit: +-(0.6, 0.8)
    labels = np.array([0, 2])
    # image 0: its label ranks second, so class 1 is its best other; image 1: its label
    # ranks first, so class 0 (second) is
    top = np.array([[1, 0, 2], [2, 0, 1]])
    got = ev.own_row_cosines(feats, rows, labels, top)
    own, other = (0.6 + 0.6) / 2, (0.8 - 0.6) / 2
    assert got == {"own_row_cos": pytest.approx(own), "best_other_row_cos": pytest.approx(other),
                   "own_row_cos_gap": pytest.approx(own - other)}


def test_train_seed_repeats_training_on_the_same_set():
    """--train-seed reaches the trainer (default: --seed) without changing the set."""
    acc = import_benchmark("accuracy")

    def trainer_seed(args):
        argv = acc.trainer_argv(args, "annoy", "x")
        return argv[argv.index("--seed") + 1]

    same = acc.resolve_args(["--seed", "1"])
    other = acc.resolve_args(["--seed", "1", "--train-seed", "3"])
    assert trainer_seed(same) == "1" and trainer_seed(other) == "3"
    assert same.data == other.data and same.data.endswith("_s1")
    assert acc.config_of(other)["train_seed"] == 3 and acc.config_of(other)["seed"] == 1
    assert acc.config_diff(acc.config_of(same), acc.config_of(other)) == ["train_seed"]
