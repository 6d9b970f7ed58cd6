"""The projection half of ``benchmarks/step_breakdown.py``: one step of the target
configuration on a GPU, from the parts that script measured and the stated figures of
``gpu_model.py`` (see that script's docstring for what each path means). Pure functions,
apart from ``_reproject``'s file reading and writing; a module beside the scripts, not one."""
from __future__ import annotations

import datetime
import json
import math

import gpu_model

__all__ = ["scale", "project"]


def scale(ms: float, rule: str, n: int, target: int) -> float:
    """``ms`` measured at ``n`` rows, scaled to ``target`` rows by ``rule``."""
    factor = {"log": math.log(target) / math.log(n), "sqrt": math.sqrt(target / n),
              "linear": target / n, "const": 1.0}[rule]
    return ms * factor


# --------------------------------------------------------------------------- projection
def project(m: dict, args, a: dict) -> dict:
    """One step of the target configuration on the GPU, in ms, from the measured parts
    ``m`` and the assumptions ``a`` (see the module docstring). Pure: tested on its own."""
    from hfsoftmax.samplers.selection import neighbour_slots, neighbours_per_sample

    N, D, B, S = args.num_classes, args.dim, args.batch, args.sample_num
    on_gpu = m["device"] == "cuda"
    bb, sel, rw = m["backbone"], m["selection"], m["rows"]
    n = sel["classes"]
    if on_gpu and bb["batch"] == B:
        fwd, bwd = bb["forward_ms"], bb["backward_ms"] + bb["optimizer_ms"]
    else:
        fwd = a["backbone_ms"] * a["forward_share"]
        bwd = a["backbone_ms"] - fwd
    head = m["head"]["head_ms"] if on_gpu else gpu_model.head_ms(B, S, D, a)
    select_dev = (scale(sel["device_topk_ms"], "linear", n, N) if on_gpu
                  else gpu_model.select_ms(N, D, B, 2, a))
    rows_bytes = S * D * 4

    def copy(key, pinned, nbytes):
        return rw[key] if on_gpu else gpu_model.copy_ms(nbytes, pinned, a)

    feat_copy = copy("features_d2h_ms", False, B * D * 4) + a["sync_ms"]
    today_sampler = args.today_sampler
    host = sel["host"].get(today_sampler)
    if host is None:
        raise SystemExit(f"--today-sampler {today_sampler!r} was not measured; add it to "
                         f"--samplers (measured: {', '.join(sel['host']) or 'none'})")
    query = max(host["select_ms"] - sel["host_rule_ms"], 0.0)
    host_select = scale(query, host["scale_rule"], n, N) + sel["host_rule_target_ms"]
    telemetry_today = scale(rw["telemetry_ms"], "linear", rw["rows"], N) / args.recall_every
    note = sel["note_ms"] if on_gpu else gpu_model.note_ms(S, D, a)
    push_today = copy("grad_d2h_pageable_ms", False, rows_bytes) + rw["push_ms"]
    parts_today = {
        "forward": fwd, "features_to_host": feat_copy, "host_select": host_select,
        "pull": rw["pull_ms"], "rows_to_device_pageable": copy("rows_h2d_pageable_ms", False,
                                                               rows_bytes),
        "head": head, "push_in_backward": push_today, "backward_and_optimizer": bwd,
        "telemetry_amortised": telemetry_today, "syncs": a["sync_ms"] * args.syncs_today}
    # labels + the most neighbours a batch can need, out (one sync); the selection back in
    k_max = neighbours_per_sample(neighbour_slots(S, 1), B, 1.25)
    ids_copies = gpu_model.copy_ms(B * (1 + k_max) * 8, False, a) + \
        gpu_model.copy_ms((S + B) * 8, True, a)

    def new_path(pull: float, push: float) -> dict:
        push_new = copy("grad_d2h_pinned_ms", True, rows_bytes) + push + note
        return {
            "forward": fwd, "device_select": select_dev,
            "host_rule_on_ids": sel["host_rule_target_ms"], "ids_copies": ids_copies,
            "pull": pull, "rows_to_device_pinned": copy("rows_h2d_pinned_ms", True, rows_bytes),
            "head": head, "max(backward_and_optimizer, push_and_note)": max(bwd, push_new),
            "telemetry_amortised": select_dev / args.recall_every,
            "syncs": a["sync_ms"] * args.syncs_new}

    parts_new = new_path(rw["pull_ms"], rw["push_ms"])
    push_new = copy("grad_d2h_pinned_ms", True, rows_bytes) + rw["push_ms"] + note
    # what the new path would be with other row-store figures: the server (12 ms
    # pull, ~47 ms push), and none on the critical path (rows kept on the devices)
    what_if = {"issue_server_pull_12_push_47": sum(new_path(12.0, 47.0).values()),
               "rows_on_the_devices_no_pull_no_push": sum(new_path(0.0, 0.0).values())}
    # --row-store dist (one GPU: one shard of all N rows): the rows stay in this process
    # (a paramserver.Table on the host, the same SGD) and its device copy serves the
    # selection; the pull and push are in-process (measured), the push beside the backward
    # as on the new path. W GPUs: S / W rows each, plus an all-gather of the features and
    # an all-reduce of the softmax normaliser (not counted: W = 1)
    parts_dist = (new_path(rw["local_pull_ms"], rw["local_push_ms"])
                  if "local_push_ms" in rw else None)
    gpu_only = fwd + bwd + head
    today, new = sum(parts_today.values()), sum(parts_new.values())
    dist = sum(parts_dist.values()) if parts_dist else None
    return {
        "config": {"backbone": bb["backbone"] if on_gpu and bb["batch"] == B
                   else "ir50 (its GPU time assumed)", "batch": B, "num_classes": N,
                   "sample_num": S, "dim": D, "today_sampler": today_sampler,
                   "recall_every": args.recall_every},
        "gpu_only_ms": round(gpu_only, 2), "today_ms": round(today, 2),
        "new_path_ms": round(new, 2), "today_vs_gpu_only": round(today / gpu_only, 2),
        "new_vs_gpu_only": round(new / gpu_only, 2), "target_ratio": 1.2,
        "target_met": bool(new <= 1.2 * gpu_only),
        "today_parts_ms": _rounded(parts_today), "new_path_parts_ms": _rounded(parts_new),
        "push_and_note_ms": round(push_new, 2),
        **({"dist_store_ms": round(dist, 2),
            "dist_store_vs_gpu_only": round(dist / gpu_only, 2),
            "dist_store_target_met": bool(dist <= 1.2 * gpu_only),
            "dist_store_parts_ms": _rounded(parts_dist)} if parts_dist else {}),
        "new_path_if_ms": {k: round(v, 2) for k, v in what_if.items()},
        "new_path_if_vs_gpu_only": {k: round(v / (fwd + bwd + head), 2)
                                    for k, v in what_if.items()},
        "other_host_samplers_today_ms": {
            name: round(today - host_select + scale(max(h["select_ms"] - sel["host_rule_ms"], 0),
                                                    h["scale_rule"], n, N)
                        + sel["host_rule_target_ms"], 2) for name, h in sel["host"].items()},
        "assumptions": [
            f"GPU figures from gpu_model.py ({a['gpu']})" if not on_gpu else
            "GPU parts measured on this GPU",
            f"backbone forward + backward + SGD {a['backbone_ms']} ms (the issue's ~120 ms of "
            f"GPU work for ir50 at batch 256), forward {a['forward_share']:.2f} of it"
            if not (on_gpu and bb["batch"] == B) else "backbone measured at the target batch",
            "data loading keeps up in worker processes and its pinned copy overlaps compute: 0",
            f"host samplers measured at {n} rows on this host and scaled to {N} "
            "(annoy, hnsw: log N; faiss IVF: sqrt N; exact: N); the rule's host work measured "
            f"at {N} classes",
            "pull and push measured against a real parameter-server process on this host; "
            "their cost follows S x D, not N",
            f"recall telemetry: today exact search over all rows read from the server on the "
            f"CPU (measured at {rw['rows']} rows, scaled by N) every {args.recall_every} "
            "steps; new path: the same top-k on the device copy",
            "new path: the push (and the note of the pushed rows) overlaps the backbone's "
            "backward, modelled as max(backward, push): the overlap itself is not built here",
            "dist store (--row-store dist, one GPU): the new path with the pull and push "
            "of the rows held in the trainer's process (measured here, no server); W > 1 "
            "divides them by W and adds an all-gather of B x D features and an all-reduce "
            "of B normalisers (not counted)",
            f"host-device syncs: {args.syncs_today} today (the issue counts 8-15), "
            f"{args.syncs_new} on the new path (the selection's ids, the loss check), "
            f"{a['sync_ms']} ms each beyond the host work they expose",
        ],
    }


def _reproject(args) -> dict:
    """``--reproject``: the projection of an earlier output recomputed from its saved
    measurements and configuration (the syncs and backbone figure from this command line)."""
    try:
        with open(args.reproject, encoding="utf-8") as f:
            old = json.load(f)
        m, cfg = old["measured"], old["projection"]["config"]
    except (OSError, ValueError, KeyError) as e:
        raise SystemExit(f"--reproject {args.reproject}: not an output of this benchmark "
                         f"({e})") from None
    for key in ("num_classes", "dim", "batch", "sample_num", "today_sampler", "recall_every"):
        setattr(args, key, cfg[key])
    a = dict(old.get("gpu_assumptions") or gpu_model.ASSUMED, backbone_ms=args.gpu_backbone_ms)
    result = dict(old, gpu_assumptions=a, projection=project(m, args, a),
                  reprojected={"date": datetime.date.today().isoformat(),
                               "command": "python benchmarks/step_breakdown.py --reproject "
                                          f"{args.reproject}"})
    if args.out:
        from hfsoftmax.fileio import write_json
        write_json(args.out, result, indent=1)
    print(json.dumps(result, indent=1))
    return result


def _rounded(parts: dict) -> dict:
    return {k: round(v, 2) for k, v in parts.items()}
