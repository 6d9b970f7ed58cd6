"""The sampled head's rules, in one place: how its selected rows are updated and how its
softmax over a selection is corrected.

Nine settings make the rule (each also a trainer flag, ``--row-momentum`` for
``row_momentum`` and so on):

* the rows' SGD: ``row_lr_mult`` (their LR over the backbone's), ``row_momentum``,
  ``row_nesterov``, ``row_catchup_decay`` (weight decay on every row every step, kept lazily),
  ``max_norm_rows`` (a cap on updated rows' norms), ``renorm_rows`` (every updated row set
  to a norm);
* the selection's correction: ``logq`` (``sample``: per-sample log-Q; ``random``: the
  random top-up's log-Q; ``off``), ``random_share`` (share of free slots for uniformly random
  classes), ``fresh_rows`` (rows changed since the last index rebuild searched exactly).

A *preset* (``--sampled-rule``) gives every setting an explicit value, per head family
(margin heads ``cosface``/``arcface``, or ``linear``) and per selection kind (an index, or
the ``random`` sampler); a flag given overrides its setting only, never another one, except
that ``renorm_rows`` and ``max_norm_rows`` exclude each other (one given non-zero replaces
the preset's other). Conflicts are errors that name the fix. The one formula a preset may
use is ``row_lr_mult: "auto"`` = ``(1 - row_momentum) / (1 - momentum)``: a row gradient then
moves its row as far in all as momentum SGD moves a parameter (10 at momentum 0.9).

Why the ``default`` preset's values (measured in ``benchmarks/ACCURACY.md``): rows take each
gradient's whole momentum displacement at once (lazy momentum lands a sampled row's
momentum tail hundreds of steps late); margin heads' rows are decayed every step as the
full softmax decays them and capped at norm 1 (sparse, lumpy updates inflate norms and a
row's step on its direction is ``lr/|w|^2``); an index-selecting margin head corrects its
softmax per sample and searches the rows changed since the last rebuild beside its index.
The linear head's logits scale with row norms, so it keeps its norms free and uncorrected.
``paper`` is the rule of the HF-Softmax paper's released code: the backbone's lazy momentum
on the rows at the backbone's LR, lazy weight decay, no norm rule, no correction.

>>> rule = SampledRule.resolve(head="cosface", sampler="annoy")            # the default
>>> rule.row_catchup_decay, rule.max_norm_rows, rule.logq
(True, 1.0, 'sample')
>>> rule.sgd(lr=0.1, weight_decay=5e-4).lr    # the rows' SGD settings
1.0000000000000002
"""
from __future__ import annotations

import argparse
import dataclasses
import math
from dataclasses import dataclass, field
from typing import Any, Mapping

from paramserver.optim import SGDConfig

from ..engine import argtypes

__all__ = ["SampledRule", "PRESETS", "PRESET_NAMES", "DEFAULT_PRESET", "LOGQ_MODES",
           "MARGIN_HEADS", "FIELDS", "add_arguments", "given_overrides", "legacy_rule",
           "preset_table", "markdown_table"]

MARGIN_HEADS = ("cosface", "arcface")
LOGQ_MODES = ("sample", "random", "off")
DEFAULT_PRESET = "default"


def _nonneg(name: str, v: Any) -> float:
    if isinstance(v, bool) or not isinstance(v, (int, float)) or not math.isfinite(v) or v < 0:
        raise ValueError(f"--{name.replace('_', '-')} must be a finite number >= 0, got {v!r}")
    return float(v)


def _meta(help_: str, *, sgd: str | None = None, kind: str = "float") -> dict:
    """A field's flag metadata: its help text, the :class:`SGDConfig` field it feeds (if
    any) and how the flag parses (``float``, ``int``, ``bool``, ``unit``, ``logq``,
    ``lr_mult``)."""
    return {"help": help_, "sgd": sgd, "kind": kind}


@dataclass(frozen=True)
class SampledRule:
    """One resolved rule of the sampled head (every value explicit); see the module doc.

    Build it with :meth:`resolve` (preset + overrides, validated) or :meth:`from_dict` (a
    stored one); :meth:`to_dict` is what checkpoints and ``args.json`` store,
    :meth:`sgd` the rows' :class:`paramserver.SGDConfig`, :meth:`describe` the log line.
    """

    row_lr_mult: float | str = field(default="auto", metadata=_meta(
        "the rows' LR over --lr (and its schedule); auto: (1 - row momentum) / (1 - "
        "--momentum), a row gradient moving its row as far in all as momentum SGD would",
        kind="lr_mult"))
    row_momentum: float = field(default=0.0, metadata=_meta(
        "momentum of the rows' SGD. It is lazy: a row's momentum moves only when the row "
        "is pushed, so a gradient's momentum tail lands hundreds of steps late; 0 with "
        "row LR x 1/(1 - momentum) gives each gradient its whole displacement at once",
        sgd="momentum"))
    row_nesterov: bool = field(default=False, metadata=_meta(
        "Nesterov momentum for the rows' SGD (needs --row-momentum > 0)", sgd="nesterov",
        kind="bool"))
    row_catchup_decay: bool = field(default=False, metadata=_meta(
        "decay every row every step by 1 - lr * --weight-decay, as a dense SGD (the full "
        "softmax) does, kept lazily: a pushed row first takes the decay of the steps it "
        "missed (needs --row-momentum 0). Off: weight decay acts on a row only in the steps "
        "it is pushed", sgd="catchup_decay", kind="bool"))
    max_norm_rows: float = field(default=0.0, metadata=_meta(
        "after each step, scale the updated rows whose L2 norm exceeds this down to it (a "
        "cap, as nn.Embedding's max_norm; 0: off; margin heads only). Given non-zero, it "
        "replaces the preset's --renorm-rows", sgd="max_norm"))
    renorm_rows: float = field(default=0.0, metadata=_meta(
        "after each step, rescale every updated row to this L2 norm (0: off; margin heads "
        "only). Given non-zero, it replaces the preset's --max-norm-rows", sgd="renorm"))
    logq: str = field(default="off", metadata=_meta(
        "log-Q correction of the sampled softmax: sample (per sample: every selected class "
        "but a sample's label and its own nearest classes stands for the classes left out "
        "for it), random (only the random classes stand for those left out: use with "
        "--random-share > 0 or --sampler random), off (the paper's plain rule)",
        kind="logq"))
    random_share: float = field(default=0.0, metadata=_meta(
        "share (0 to 1) of the slots left after the batch's labels that go to uniformly "
        "random classes; the nearest classes take the rest", kind="unit"))
    fresh_rows: int = field(default=0, metadata=_meta(
        "keep up to this many rows changed since the last index rebuild and search them "
        "exactly beside the index, so the selection does not go stale between rebuilds "
        "(0: off; the index is rebuilt early when they fill). Costs a (batch x D) x "
        "(D x rows) product per step", kind="int"))

    # ------------------------------------------------------------------ build
    @classmethod
    def resolve(cls, *, head: str, sampler: str, preset: str = DEFAULT_PRESET,
                overrides: Mapping[str, Any] | None = None,
                momentum: float = 0.9) -> "SampledRule":
        """The preset's values for ``head`` x ``sampler``, with ``overrides`` (field ->
        value, only the settings the user gave) applied and ``row_lr_mult: "auto"``
        resolved with the backbone's ``momentum``; validated (:meth:`validate`)."""
        if preset not in PRESETS:
            raise ValueError(f"unknown --sampled-rule {preset!r}; valid: "
                             f"{', '.join(PRESET_NAMES)}")
        values = PRESETS[preset][_family(head, sampler)].to_dict()
        given = dict(overrides or {})
        unknown = sorted(set(given) - set(FIELDS))
        if unknown:
            raise ValueError(f"unknown sampled-head settings {unknown}; valid: "
                             f"{', '.join(FIELDS)}")
        for a, b in (("renorm_rows", "max_norm_rows"), ("max_norm_rows", "renorm_rows")):
            if given.get(a) and b not in given:  # they exclude each other
                values[b] = 0.0
        values.update(given)
        if values["row_lr_mult"] == "auto":
            _nonneg("row_momentum", values["row_momentum"])
            if not 0 <= momentum < 1:
                raise ValueError(f"--momentum {momentum} leaves the rows' automatic LR "
                                 "multiplier (1 - row momentum) / (1 - momentum) undefined; "
                                 "give --row-lr-mult")
            values["row_lr_mult"] = (1.0 - values["row_momentum"]) / (1.0 - momentum)
        rule = cls(**values)
        rule.validate(head=head, sampler=sampler)
        return rule

    @classmethod
    def from_dict(cls, d: Mapping[str, Any]) -> "SampledRule":
        """A rule stored by :meth:`to_dict` (unknown keys are an error)."""
        unknown = sorted(set(d) - set(FIELDS))
        if unknown:
            raise ValueError(f"unknown sampled-head settings {unknown}; valid: "
                             f"{', '.join(FIELDS)}")
        return cls(**{k: d[k] for k in FIELDS if k in d})

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    # ------------------------------------------------------------------ check
    def validate(self, *, head: str | None = None, sampler: str | None = None) -> None:
        """Raise ``ValueError`` naming the first bad or conflicting setting and the fix."""
        if isinstance(self.row_lr_mult, str):
            raise ValueError(f"row_lr_mult {self.row_lr_mult!r} is not resolved; build the "
                             "rule with SampledRule.resolve")
        if not self.row_lr_mult > 0 or not math.isfinite(self.row_lr_mult):
            raise ValueError(f"--row-lr-mult must be a finite number > 0, got "
                             f"{self.row_lr_mult!r}")
        for name in ("row_momentum", "max_norm_rows", "renorm_rows"):
            _nonneg(name, getattr(self, name))
        for name in ("row_catchup_decay", "row_nesterov"):
            if not isinstance(getattr(self, name), bool):
                raise ValueError(f"--{name.replace('_', '-')} must be true or false, got "
                                 f"{getattr(self, name)!r}")
        if self.logq not in LOGQ_MODES:
            raise ValueError(f"--logq must be one of {', '.join(LOGQ_MODES)}, got "
                             f"{self.logq!r}")
        if isinstance(self.random_share, bool) or not 0 <= self.random_share <= 1:
            raise ValueError(f"--random-share must be a number from 0 to 1, got "
                             f"{self.random_share!r}")
        if isinstance(self.fresh_rows, bool) or not isinstance(self.fresh_rows, int) \
                or self.fresh_rows < 0:
            raise ValueError(f"--fresh-rows must be an integer >= 0, got {self.fresh_rows!r}")
        if self.renorm_rows and self.max_norm_rows:
            raise ValueError(f"--renorm-rows {self.renorm_rows} sets every updated row to "
                             f"that norm, --max-norm-rows {self.max_norm_rows} only caps "
                             "them: give one of them (the other 0)")
        if self.row_catchup_decay and self.row_momentum:
            raise ValueError(f"--row-momentum {self.row_momentum} with --row-catchup-decay: "
                             "the every-step decay is exact only without row momentum; add "
                             "--no-row-catchup-decay (or --sampled-rule paper, the paper's "
                             "lazy momentum), or drop --row-momentum")
        try:  # whatever else the rows' SGD refuses (e.g. Nesterov without momentum)
            self.sgd(lr=0.1, weight_decay=0.0)
        except ValueError as e:
            sgd_flags = ", ".join(f"--{f.name.replace('_', '-')}" for f in
                                  dataclasses.fields(self) if f.metadata.get("sgd"))
            raise ValueError(f"the rows' SGD settings ({sgd_flags}) do not fit together: "
                             f"{e}") from None
        if head == "linear":
            for flag, v in (("--renorm-rows", self.renorm_rows),
                            ("--max-norm-rows", self.max_norm_rows)):
                if v:
                    raise ValueError(f"{flag} {v} would change the linear head's logits "
                                     "(they scale with the row norms); use it with --head "
                                     "cosface or arcface, or set it to 0")

    # ------------------------------------------------------------------ use
    def sgd(self, *, lr: float, weight_decay: float) -> SGDConfig:
        """The rows' :class:`paramserver.SGDConfig` at the backbone's ``lr`` (times
        ``row_lr_mult``) and ``weight_decay``: every field with an ``sgd`` name in its
        metadata goes to that SGDConfig field."""
        values = {f.metadata["sgd"]: getattr(self, f.name)
                  for f in dataclasses.fields(self) if f.metadata.get("sgd")}
        return SGDConfig(lr=lr * self.row_lr_mult, weight_decay=weight_decay, **values)

    def describe(self, weight_decay: float) -> str:
        """The start-up log line's words for this rule."""
        return (f"rows: SGD lr x{self.row_lr_mult:g}, momentum {self.row_momentum:g}, weight "
                f"decay {weight_decay:g} ({'every step' if self.row_catchup_decay else 'lazy'})"
                f", max norm {self.max_norm_rows or 'off'}, renorm {self.renorm_rows or 'off'};"
                f" selection: log-Q {self.logq}, random share {self.random_share:g}, fresh "
                f"rows {self.fresh_rows}")


FIELDS: tuple[str, ...] = tuple(f.name for f in dataclasses.fields(SampledRule))


def _preset(**values) -> SampledRule:
    """A preset entry: every field explicit (a missing one is a bug here, not a default)."""
    missing = set(FIELDS) - set(values)
    if missing:
        raise TypeError(f"preset entry misses {sorted(missing)}")
    return SampledRule(**values)


_RULE_DEFAULT = dict(row_lr_mult="auto", row_momentum=0.0, row_nesterov=False, renorm_rows=0.0,
                     random_share=0.0)
_PAPER = _preset(row_lr_mult=1.0, row_momentum=0.9, row_nesterov=False,
                 row_catchup_decay=False, max_norm_rows=0.0, renorm_rows=0.0, logq="off",
                 random_share=0.0, fresh_rows=0)
#: preset -> (head family, selection kind) -> rule. Families: "margin" (cosface, arcface),
#: "linear"; kinds: "index" (annoy, hnsw, faiss, exact), "random".
PRESETS: dict[str, dict[tuple[str, str], SampledRule]] = {
    "default": {
        ("margin", "index"): _preset(**_RULE_DEFAULT, row_catchup_decay=True,
                                     max_norm_rows=1.0, logq="sample", fresh_rows=32768),
        ("margin", "random"): _preset(**_RULE_DEFAULT, row_catchup_decay=True,
                                      max_norm_rows=1.0, logq="off", fresh_rows=0),
        ("linear", "index"): _preset(**_RULE_DEFAULT, row_catchup_decay=False,
                                     max_norm_rows=0.0, logq="off", fresh_rows=0),
        ("linear", "random"): _preset(**_RULE_DEFAULT, row_catchup_decay=False,
                                      max_norm_rows=0.0, logq="off", fresh_rows=0),
    },
    "paper": {key: _PAPER for key in (("margin", "index"), ("margin", "random"),
                                      ("linear", "index"), ("linear", "random"))},
}
PRESET_NAMES = tuple(PRESETS)


def _family(head: str, sampler: str) -> tuple[str, str]:
    return ("margin" if head in MARGIN_HEADS else "linear",
            "random" if sampler == "random" else "index")


# ---------------------------------------------------------------------- flags
def _parse_lr_mult(s: str) -> float | str:
    if s == "auto":
        return s
    v = float(s)
    if not math.isfinite(v) or v <= 0:
        raise argparse.ArgumentTypeError(f"must be a finite number > 0 or auto, got {s}")
    return v


_PARSERS = {"lr_mult": _parse_lr_mult, "float": argtypes.nonneg_float,
            "unit": argtypes.unit_float, "int": argtypes.nonneg_int}


def _fmt(v: Any) -> str:
    return f"{v:g}" if isinstance(v, float) else str(v).lower() if isinstance(v, bool) \
        else str(v)


def _default_words(name: str) -> str:
    """How the presets set ``name``: 'default preset: cosface/arcface X (random sampler Y),
    linear Z; paper: W' (only the distinct values)."""
    parts = []
    for preset, table in PRESETS.items():
        by = {key: _fmt(getattr(rule, name)) for key, rule in table.items()}
        if len(set(by.values())) == 1:
            parts.append(f"{preset}: {next(iter(by.values()))}")
            continue
        words = []
        for fam, label in (("margin", "cosface/arcface"), ("linear", "linear")):
            idx, rnd = by[(fam, "index")], by[(fam, "random")]
            words.append(f"{label} {idx}" if idx == rnd else
                         f"{label} {idx} (random sampler {rnd})")
        parts.append(f"{preset}: " + ", ".join(words))
    return "; ".join(parts)


def add_arguments(group) -> None:
    """Add ``--sampled-rule`` and one flag per rule field to an argparse group. Their
    defaults are None (= the preset's value); the help states each preset's value."""
    group.add_argument("--sampled-rule", choices=PRESET_NAMES, default=DEFAULT_PRESET,
                       help="the sampled head's preset rule (the rows' SGD and the "
                            "selection's correction; see hfsoftmax/heads/sampled_config.py); "
                            "the flags below override single settings")
    for f in dataclasses.fields(SampledRule):
        flag = "--" + f.name.replace("_", "-")
        text = f"{f.metadata['help']} [by --sampled-rule: {_default_words(f.name)}]"
        kind = f.metadata["kind"]
        if kind == "bool":
            group.add_argument(flag, action=argparse.BooleanOptionalAction, default=None,
                               help=text)
        elif kind == "logq":
            group.add_argument(flag, choices=LOGQ_MODES, default=None, help=text)
        else:
            group.add_argument(flag, type=_PARSERS[kind], default=None, help=text)


def given_overrides(args: argparse.Namespace) -> dict[str, Any]:
    """The rule settings set in ``args`` (not None): flags, YAML or a checkpoint's."""
    return {k: getattr(args, k) for k in FIELDS if getattr(args, k, None) is not None}


def rule_from_args(args: argparse.Namespace) -> SampledRule:
    """The resolved rule of parsed trainer ``args`` (``--sampled-rule`` + overrides)."""
    return SampledRule.resolve(head=args.head, sampler=args.sampler, preset=args.sampled_rule,
                               overrides=given_overrides(args), momentum=args.momentum)


# ---------------------------------------------------------------------- old checkpoints
#: What a checkpoint written before a setting existed ran with (the rows took the
#: backbone's momentum at its LR; no norm rule, every-step decay, fresh rows or correction).
LEGACY_VALUES = {"row_lr_mult": 1.0, "row_nesterov": False, "renorm_rows": 0.0,
                 "max_norm_rows": 0.0,
                 "row_catchup_decay": False, "fresh_rows": 0, "logq": "off",
                 "random_share": 0.0}
#: Before this module, fresh rows defaulted to --interval x --sample-num up to this many.
LEGACY_FRESH_ROWS_MAX = 32768


def legacy_rule(stored: Mapping[str, Any]) -> dict[str, Any]:
    """The rule settings of a checkpoint's stored ``args`` written before this module
    (flat flags: ``row_momentum``, ..., ``logq_correction``, ``logq_per_sample``), as
    explicit values of :data:`FIELDS`; a checkpoint that already stores them is returned
    as it is."""
    out = {k: stored[k] for k in FIELDS if stored.get(k) is not None}
    if "logq" not in out:
        if stored.get("logq_per_sample"):
            out["logq"] = "sample"
        elif stored.get("logq_correction"):
            out["logq"] = "random"
    if "fresh_rows" not in out and "fresh_rows" in stored and "row_catchup_decay" in stored:
        # stored as None by the trainer of 308503f..05ca052: its automatic size then
        auto = (int(stored.get("interval", 100)) * int(stored.get("sample_num", 1000))
                if stored.get("head") in MARGIN_HEADS and stored.get("sampler") != "random"
                else 0)
        out["fresh_rows"] = auto if auto <= LEGACY_FRESH_ROWS_MAX else 0
    out.setdefault("row_momentum", stored.get("momentum", 0.9))
    for k, v in LEGACY_VALUES.items():
        out.setdefault(k, v)
    return out


# ---------------------------------------------------------------------- docs
HEAD_SAMPLER_CASES = (("cosface", "annoy"), ("cosface", "random"), ("linear", "annoy"),
                      ("linear", "random"))


def preset_table(momentum: float = 0.9) -> list[dict[str, Any]]:
    """Every preset x head family x selection kind, resolved at the backbone's
    ``momentum``: what the README's defaults table shows."""
    rows = []
    for preset in PRESET_NAMES:
        for head, sampler in HEAD_SAMPLER_CASES:
            rule = SampledRule.resolve(head=head, sampler=sampler, preset=preset,
                                       momentum=momentum)
            rows.append({"preset": preset, "head": head, "sampler": sampler,
                         **rule.to_dict()})
    return rows


def markdown_table(momentum: float = 0.9) -> str:
    """:func:`preset_table` as a Markdown table (``python -m
    hfsoftmax.heads.sampled_config`` prints it; a test checks the README holds it)."""
    head = ["preset", "head", "sampler", *FIELDS]
    lines = ["| " + " | ".join(f"`{h}`" if h in FIELDS else h for h in head) + " |",
             "| " + " | ".join("---" for _ in head) + " |"]
    for row in preset_table(momentum):
        cells = [row["preset"],
                 "cosface, arcface" if row["head"] == "cosface" else row["head"],
                 "random" if row["sampler"] == "random" else "annoy, hnsw, faiss, exact"]
        cells += [_fmt(row[k]) for k in FIELDS]
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


if __name__ == "__main__":
    print(markdown_table())
