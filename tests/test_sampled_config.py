"""The sampled head's rule (hfsoftmax/heads/sampled_config.py): one expected table of the
effective settings per head x sampler x preset, the flags as overrides of one setting each,
validation, serialisation, the legacy table, and the docs generated from it."""
from __future__ import annotations

import dataclasses
import re
import subprocess
import sys

import pytest

from hfsoftmax.engine.config import parse_args
from hfsoftmax.heads.sampled_config import (FIELDS, PRESET_NAMES, SampledRule, legacy_rule,
                                            markdown_table, rule_from_args)
from paramserver.optim import SGDConfig
from tests.ps_utils import ROOT

COLS = ("row_lr_mult", "row_momentum", "row_nesterov", "row_catchup_decay", "max_norm_rows",
        "renorm_rows", "logq", "random_share", "fresh_rows")
# preset, head, sampler -> the rule's values in COLS order, at --momentum 0.9 ("10" is
# 1 / (1 - 0.9)); the README's defaults table is generated from the same presets.
EXPECTED = {
    ("default", "cosface", "annoy"): (10.0, 0.0, False, True, 1.0, 0.0, "sample", 0.0, 32768),
    ("default", "arcface", "hnsw"): (10.0, 0.0, False, True, 1.0, 0.0, "sample", 0.0, 32768),
    ("default", "cosface", "random"): (10.0, 0.0, False, True, 1.0, 0.0, "off", 0.0, 0),
    ("default", "arcface", "random"): (10.0, 0.0, False, True, 1.0, 0.0, "off", 0.0, 0),
    ("default", "linear", "faiss"): (10.0, 0.0, False, False, 0.0, 0.0, "off", 0.0, 0),
    ("default", "linear", "random"): (10.0, 0.0, False, False, 0.0, 0.0, "off", 0.0, 0),
    ("paper", "cosface", "annoy"): (1.0, 0.9, False, False, 0.0, 0.0, "off", 0.0, 0),
    ("paper", "cosface", "random"): (1.0, 0.9, False, False, 0.0, 0.0, "off", 0.0, 0),
    ("paper", "linear", "exact"): (1.0, 0.9, False, False, 0.0, 0.0, "off", 0.0, 0),
    ("paper", "linear", "random"): (1.0, 0.9, False, False, 0.0, 0.0, "off", 0.0, 0),
}
# flags given alone (cosface + annoy unless the flags say otherwise) -> (the preset and
# --momentum they are compared with, the values that change: every other setting stays the
# preset's), or the error's words
OVERRIDES = {
    ("--row-momentum", "0.9"): "--row-momentum 0.9 with --row-catchup-decay.*"
                               "--no-row-catchup-decay.*--sampled-rule paper",
    ("--row-momentum", "0.9", "--head", "linear", "--margin", "0"):
        ("default", 0.9, {"row_momentum": 0.9, "row_lr_mult": 1.0}),
    ("--row-momentum", "0.9", "--no-row-catchup-decay"):
        ("default", 0.9, {"row_momentum": 0.9, "row_lr_mult": 1.0,
                          "row_catchup_decay": False}),
    ("--renorm-rows", "1"): ("default", 0.9, {"renorm_rows": 1.0, "max_norm_rows": 0.0}),
    ("--max-norm-rows", "2"): ("default", 0.9, {"max_norm_rows": 2.0}),
    ("--fresh-rows", "0"): ("default", 0.9, {"fresh_rows": 0}),
    # fresh rows do not depend on --sample-num or --interval (no hidden cliff)
    ("--sample-num", "400", "--interval", "100"): ("default", 0.9, {}),
    ("--logq", "random", "--random-share", "0.3"):
        ("default", 0.9, {"logq": "random", "random_share": 0.3}),
    ("--row-lr-mult", "3"): ("default", 0.9, {"row_lr_mult": 3.0}),
    ("--momentum", "0.5"): ("default", 0.5, {}),  # auto: 1 / (1 - 0.5) = 2, as the preset
    ("--sampled-rule", "paper", "--logq", "sample"): ("paper", 0.9, {"logq": "sample"}),
    ("--sampled-rule", "paper", "--row-nesterov"): ("paper", 0.9, {"row_nesterov": True}),
}


def _resolve(preset, head, sampler):
    return SampledRule.resolve(head=head, sampler=sampler, preset=preset, momentum=0.9)


@pytest.mark.parametrize("key", sorted(EXPECTED))
def test_each_head_sampler_and_preset_resolves_to_the_expected_table(key):
    preset, head, sampler = key
    rule = _resolve(preset, head, sampler)
    got = tuple(getattr(rule, c) for c in COLS)
    assert got == pytest.approx(EXPECTED[key]), dict(zip(COLS, got))
    # and the trainer's flags give the same rule
    argv = ["--train-rec", "x", "--sampled", "--head", head, "--sampler", sampler,
            "--sampled-rule", preset] + (["--margin", "0"] if head == "linear" else [])
    assert rule_from_args(parse_args(argv)) == rule


@pytest.mark.parametrize("flags", list(OVERRIDES), ids=" ".join)
def test_a_flag_given_overrides_its_setting_only(flags):
    base = ["--train-rec", "x", "--sampled"]
    if isinstance(OVERRIDES[flags], str):
        with pytest.raises(ValueError, match=OVERRIDES[flags]):
            parse_args(base + list(flags))
        return
    preset, momentum, want = OVERRIDES[flags]
    args = parse_args(base + list(flags))
    preset_rule = SampledRule.resolve(head=args.head, sampler=args.sampler, preset=preset,
                                      momentum=momentum)
    got = rule_from_args(args).to_dict()
    changed = {k: v for k, v in got.items() if v != getattr(preset_rule, k)}
    assert changed == pytest.approx(want) and set(changed) == set(want), changed
    if "--momentum" in flags:
        assert got["row_lr_mult"] == pytest.approx(2.0)


def test_rule_round_trips_and_feeds_the_rows_sgd_by_its_field_metadata():
    rule = _resolve("default", "cosface", "annoy")
    assert SampledRule.from_dict(rule.to_dict()) == rule
    with pytest.raises(ValueError, match="unknown sampled-head settings.*'bogus'"):
        SampledRule.from_dict({**rule.to_dict(), "bogus": 1})
    sgd = rule.sgd(lr=0.1, weight_decay=5e-4)
    assert sgd.to_dict() == {"lr": pytest.approx(1.0), "momentum": 0.0, "weight_decay": 5e-4,
                             "nesterov": False, "renorm": 0.0, "max_norm": 1.0,
                             "catchup_decay": True}
    # every SGD field the rule feeds is an SGDConfig field (one name each)
    fed = {f.metadata["sgd"] for f in dataclasses.fields(SampledRule) if f.metadata["sgd"]}
    assert fed <= {f.name for f in dataclasses.fields(SGDConfig)}
    assert tuple(FIELDS) == COLS


@pytest.mark.parametrize("bad,match", [
    ({"renorm_rows": 1.0, "max_norm_rows": 1.0}, "one of them"),
    ({"logq": "both"}, "--logq must be one of sample, random, off"),
    ({"random_share": 1.5}, "--random-share must be a number from 0 to 1"),
    ({"fresh_rows": -3}, "--fresh-rows must be an integer >= 0"),
    ({"row_momentum": float("nan"), "row_catchup_decay": False}, "--row-momentum"),
    ({"row_lr_mult": 0.0}, "--row-lr-mult must be a finite number > 0"),
    ({"row_nesterov": True}, "rows' SGD settings .*--row-nesterov.* needs momentum > 0"),
])
def test_bad_settings_are_named(bad, match):
    with pytest.raises(ValueError, match=match):
        SampledRule.resolve(head="cosface", sampler="annoy", overrides=bad)
    with pytest.raises(ValueError, match="unknown --sampled-rule 'fast'.*default, paper"):
        SampledRule.resolve(head="cosface", sampler="annoy", preset="fast")


def test_legacy_rule_fills_what_older_checkpoints_ran_with():
    before = {"head": "cosface", "sampler": "annoy", "momentum": 0.9, "interval": 100,
              "sample_num": 200, "sampled": True}
    assert legacy_rule(before) == {"row_momentum": 0.9, "row_lr_mult": 1.0,
                                   "row_nesterov": False,
                                   "renorm_rows": 0.0, "max_norm_rows": 0.0,
                                   "row_catchup_decay": False, "fresh_rows": 0,
                                   "logq": "off", "random_share": 0.0}
    at_05ca052 = {**before, "row_momentum": 0.0, "row_lr_mult": 10.0, "renorm_rows": 0.0,
                  "max_norm_rows": 1.0, "row_catchup_decay": True, "fresh_rows": None,
                  "logq_per_sample": True, "logq_correction": False, "random_share": 0.0}
    got = legacy_rule(at_05ca052)
    assert (got["fresh_rows"], got["logq"], got["row_lr_mult"]) == (20000, "sample", 10.0)
    big = {**at_05ca052, "sample_num": 1000}       # 100 x 1000 > 32768: it was off then
    assert legacy_rule(big)["fresh_rows"] == 0


def test_help_shows_effective_defaults_and_never_default_none():
    out = subprocess.run([sys.executable, "-m", "hfsoftmax.train", "--help"],
                         capture_output=True, text=True, cwd=ROOT, timeout=120, check=True).stdout
    assert "(default: None)" not in out
    flat = re.sub(r"\s+", " ", out)
    for name in FIELDS:  # each rule flag states every preset's value
        assert f"--{name.replace('_', '-')}" in flat
    assert "[by --sampled-rule: default: cosface/arcface true, linear false; paper: false]" \
        in flat
    assert "cosface/arcface 32768 (random sampler 0), linear 0; paper: 0" in flat


def test_readme_defaults_table_is_the_generated_one():
    readme = (ROOT / "README.md").read_text()
    assert markdown_table() in readme, ("README.md's table of the sampled head's defaults "
                                        "is out of date: paste the output of `python -m "
                                        "hfsoftmax.heads.sampled_config`")
    assert set(PRESET_NAMES) == {"default", "paper"}


def test_the_sampler_defaults_to_device_selection_on_a_gpu(monkeypatch):
    """annoy on the CPU; the device sampler where the run's device is a GPU (an explicit
    --sampler always wins)."""
    import torch

    base = ["--train-rec", "x", "--sampled"]
    assert parse_args(base + ["--device", "cpu"]).sampler == "annoy"
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    assert parse_args(base).sampler == "device"                  # --device auto
    assert parse_args(base + ["--device", "cpu"]).sampler == "annoy"
    assert parse_args(base + ["--sampler", "hnsw"]).sampler == "hnsw"
    rule = rule_from_args(parse_args(base))  # an index-selecting sampler's rule
    assert rule.logq == "sample"
