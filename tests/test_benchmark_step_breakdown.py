"""benchmarks/step_breakdown.py and device_select.py: smoke runs at tiny sizes (the JSON's
structure, never timings) and the projection's arithmetic on given parts."""
import argparse
import json
import os
import subprocess
import sys

import pytest

from tests.bench_utils import ROOT, import_benchmark

PARTS_TODAY = {"forward", "features_to_host", "host_select", "pull", "rows_to_device_pageable",
               "head", "push_in_backward", "backward_and_optimizer", "telemetry_amortised",
               "syncs"}


def test_quick_run_writes_the_projection(tmp_path):
    out = tmp_path / "sb.json"
    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONPATH=str(ROOT))
    proc = subprocess.run([sys.executable, str(ROOT / "benchmarks" / "step_breakdown.py"),
                           "--quick", "--out", str(out)], cwd=ROOT, env=env,
                          capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    res = json.loads(out.read_text())
    assert res == json.loads(proc.stdout) and res["quick"] is True
    proj = res["projection"]
    for key in ("gpu_only_ms", "today_ms", "new_path_ms", "target_met", "assumptions",
                "new_path_if_ms"):
        assert key in proj, key
    assert set(proj["today_parts_ms"]) == PARTS_TODAY
    assert proj["today_ms"] == pytest.approx(sum(proj["today_parts_ms"].values()), abs=0.05)
    assert proj["new_path_ms"] == pytest.approx(sum(proj["new_path_parts_ms"].values()),
                                                abs=0.05)
    m = res["measured"]
    for part in ("data_ms", "forward_ms", "backward_ms", "optimizer_ms"):
        assert m["backbone"][part] >= 0
    assert {"pull_ms", "push_ms", "telemetry_ms", "local_pull_ms", "local_push_ms"} \
        <= set(m["rows"])
    assert proj["dist_store_ms"] == pytest.approx(sum(proj["dist_store_parts_ms"].values()),
                                                  abs=0.05)

    # --reproject: the same projection from the saved measurements, and with another
    # backbone figure only the backbone's parts move
    again = subprocess.run([sys.executable, str(ROOT / "benchmarks" / "step_breakdown.py"),
                            "--reproject", str(out), "--out", "", "--gpu-backbone-ms", "240"],
                           cwd=ROOT, env=env, capture_output=True, text=True, timeout=120)
    assert again.returncode == 0, again.stderr[-3000:]
    re = json.loads(again.stdout)
    assert re["measured"] == m and re["reprojected"]["command"].endswith(str(out))
    assert re["projection"]["gpu_only_ms"] == pytest.approx(proj["gpu_only_ms"] + 120, abs=0.05)
    assert re["projection"]["today_parts_ms"]["pull"] == proj["today_parts_ms"]["pull"]
    assert {"device_select_ms", "device_topk_ms", "host_rule_target_ms", "note_ms"} <= \
        set(m["selection"])
    assert "faiss" in m["selection"]["host"] and m["head"]["head_ms"] > 0


def _measured(push_ms):
    sel = {"classes": 1000, "host": {"annoy": {"select_ms": 300.0, "scale_rule": "log"}},
           "host_rule_ms": 2.0, "host_rule_target_ms": 3.0, "device_topk_ms": 50.0,
           "note_ms": 9.0}
    return {"device": "cpu", "backbone": {"batch": 8, "backbone": "ir50"},
            "head": {"head_ms": 99.0}, "selection": sel,
            "rows": {"rows": 1000, "pull_ms": 10.0, "push_ms": push_ms, "telemetry_ms": 100.0,
                     "local_pull_ms": 2.0, "local_push_ms": 30.0}}


def test_projection_overlaps_the_push_with_the_backward_only_on_the_new_path():
    sb = import_benchmark("step_breakdown")
    args = argparse.Namespace(num_classes=1000, dim=512, batch=256, sample_num=8000,
                              today_sampler="annoy", recall_every=200, syncs_today=8,
                              syncs_new=2)
    a = dict(sb.gpu_model.ASSUMED, backbone_ms=120.0)
    quiet, slow = sb.project(_measured(20.0), args, a), sb.project(_measured(200.0), args, a)
    assert quiet["gpu_only_ms"] == pytest.approx(120 + sb.gpu_model.head_ms(256, 8000, 512),
                                                 abs=0.01)
    # a 20 ms push hides behind the 80 ms backward; a 200 ms one does not
    assert quiet["new_path_parts_ms"]["max(backward_and_optimizer, push_and_note)"] == 80.0
    assert slow["new_path_ms"] - quiet["new_path_ms"] == pytest.approx(
        slow["push_and_note_ms"] - 80.0, abs=0.05)
    # the what-ifs replace only the row store's figures
    assert slow["new_path_if_ms"] == quiet["new_path_if_ms"]
    assert quiet["new_path_if_ms"]["rows_on_the_devices_no_pull_no_push"] == pytest.approx(
        quiet["new_path_ms"] - 10.0, abs=0.05)  # the 10 ms pull gone; the push was hidden
    # the dist store: its in-process pull and push, whatever the server's figures
    assert slow["dist_store_ms"] == quiet["dist_store_ms"]
    assert quiet["dist_store_parts_ms"]["pull"] == 2.0
    assert quiet["dist_store_ms"] == pytest.approx(quiet["new_path_ms"] - 8.0, abs=0.05)
    assert quiet["dist_store_vs_gpu_only"] == pytest.approx(
        quiet["dist_store_ms"] / quiet["gpu_only_ms"], abs=0.01)
    # today the push is serial: +180 ms of push is +180 ms of step
    assert slow["today_ms"] - quiet["today_ms"] == pytest.approx(180.0, abs=0.05)
    assert quiet["today_parts_ms"]["host_select"] == pytest.approx(298.0 + 3.0, abs=0.01)
    with pytest.raises(SystemExit, match="--today-sampler 'hnsw' was not measured"):
        sb.project(_measured(1.0), argparse.Namespace(**{**vars(args),
                                                         "today_sampler": "hnsw"}), a)


def test_device_select_quick_run_agrees_with_exact(capsys):
    ds = import_benchmark("device_select")
    res = ds.main(["--num-rows", "3000", "--dim", "16", "--batch", "32", "--sample-num",
                   "300", "--backends", "device,exact", "--repeats", "1", "--threads", "1"])
    dev, exact = res["results"]
    assert dev["recall@10"] == exact["recall@10"] == 1.0
    assert dev["neighbours_selected"] == exact["neighbours_selected"] > 0
    assert {"device_part_ms", "host_part_ms", "gpu_device_part_ms"} <= set(dev)
    assert json.loads(capsys.readouterr().out)["num_rows"] == 3000
