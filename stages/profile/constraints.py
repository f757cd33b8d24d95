"""Data-quality constraints: generated from `schema.json` and declared in
`profile.constraints`, checked on each split's profile (whylogs) or exact counts."""

import json
import logging
import math
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass
from functools import partial
from typing import Any

from fullstack_ml.gates import rate_over
from fullstack_ml.images import stat_columns_of
from fullstack_ml.runtime import whylogs_compat  # noqa: F401  before whylogs: it patches it

# isort: split
from whylogs.core.constraints import ConstraintsBuilder
from whylogs.core.constraints.factories import (
    is_in_range,
    mean_between_range,
    no_missing_values,
)

from fullstack_ml.runtime.drift import json_safe
from fullstack_ml.schema import Schema
from fullstack_ml.stage import StageError
from stages.profile.batches import SetCheck, SplitProfile

log = logging.getLogger("stages.profile")
DECLARED = {  # check -> the keys it takes besides column and check
    "in_range": {"min", "max"},  # whylogs is_in_range
    "mean_between": {"min", "max"},  # whylogs mean_between_range
    "no_missing": set(),  # whylogs no_missing_values
    "in_set": {"values"},  # counted exactly with pyarrow: frequent items are estimates
}


@dataclass
class Check:
    """One constraint: a whylogs factory checked on a split's profile, or an exact count
    of values outside a set (`rate` above `max_rate` fails)."""

    name: str
    column: str
    source: str  # the config key or schema.json entry it comes from
    splits: tuple[str, ...]
    factory: Callable[[], Any] | None = None  # a whylogs MetricConstraint, made per split
    shown: tuple[str, ...] = ()  # summary keys shown as the observed value
    set_check: SetCheck | None = None
    max_rate: float = 0.0


def _number(value: Any, key: str) -> float:
    if isinstance(value, bool) or not isinstance(value, (int, float)) or math.isnan(value):
        raise StageError(f"{key}: {value!r} is not a number")
    return value


def _declared_check(i: int, entry: Any, schema: Schema, splits: tuple[str, ...]) -> Check:
    key = f"profile.constraints.declared[{i}]"
    if not isinstance(entry, Mapping) or "column" not in entry or "check" not in entry:
        raise StageError(f"{key}: expected {{column: ..., check: ..., ...}}, got {entry!r}")
    column, check = entry["column"], entry["check"]
    if check not in DECLARED:
        raise StageError(f"{key}: unknown check {check!r} ({' | '.join(DECLARED)})")
    stats = {c for columns in stat_columns_of(schema.images).values() for c in columns}
    if column not in schema.columns and column not in stats:
        raise StageError(
            f"{key}: unknown column {column!r} (not in schema.json, nor an image's statistics)"
        )
    takes = DECLARED[check]
    extra, missing = set(entry) - takes - {"column", "check"}, takes - set(entry)
    if extra or missing:
        wanted = ", ".join(sorted(takes)) or "no other keys"
        raise StageError(
            f"{key}: check {check} takes {wanted}"
            + (f"; unknown {sorted(extra)}" if extra else "")
            + (f"; missing {sorted(missing)}" if missing else "")
        )
    source = f"{key} ({check})"
    if check == "no_missing":
        make = partial(no_missing_values, column)
        return Check(make().name, column, source, splits, make, ("counts/null",))
    if check == "in_set":
        values = entry["values"]
        if not isinstance(values, (list, tuple)) or not values:
            raise StageError(f"{key}: values must be a non-empty list, got {values!r}")
        if not all(isinstance(v, (str, int, float, bool)) for v in values):
            raise StageError(f"{key}: values must be strings or numbers, got {values!r}")
        shown = ", ".join(map(str, values[:10])) + (", ..." if len(values) > 10 else "")
        name = f"{column} values in {{{shown}}}"
        return Check(name, column, source, splits, set_check=SetCheck(column, tuple(values)))
    lo, hi = _number(entry["min"], f"{key}.min"), _number(entry["max"], f"{key}.max")
    if lo > hi:
        raise StageError(f"{key}: min {lo} is above max {hi}")
    kind = "numeric" if column in stats else schema.kind(column)
    if kind != "numeric":
        raise StageError(f"{key}: check {check} needs a numeric column; {column!r} is {kind}")
    if check == "in_range":
        make = partial(is_in_range, column, lo, hi, skip_missing=False)
        shown = ("distribution/min", "distribution/max")
    else:
        make = partial(mean_between_range, column, lo, hi, skip_missing=False)
        shown = ("distribution/mean",)
    return Check(make().name, column, source, splits, make, shown)


def build_checks(constraints: dict[str, Any], schema: Schema, splits: Iterable[str]) -> list[Check]:
    """The constraints of the `profile.constraints` config and of `schema.json`.

    Raises:
        StageError: a malformed key, naming it.
    """
    known = tuple(splits)
    splits = tuple(constraints.get("splits") or known)
    for s in splits:
        if s not in known:
            raise StageError(
                f"profile.constraints.splits: unknown split {s!r} ({', '.join(known)})"
            )
    checks: list[Check] = []
    if constraints.get("no_missing_values"):
        checks += [
            Check(
                f"{c} has no missing values",
                c,
                "profile.constraints.no_missing_values (schema.json: not nullable)",
                splits,
                partial(no_missing_values, c),
                ("counts/null",),
            )
            for c in schema.columns
            if c not in schema.nullable
        ]
    if constraints.get("feature_range") is not None:
        key = "profile.constraints.feature_range"
        bounds = constraints["feature_range"]
        if not isinstance(bounds, (list, tuple)) or len(bounds) != 2:
            raise StageError(f"{key}: expected [min, max] or null, got {bounds!r}")
        lo, hi = (_number(b, key) for b in bounds)
        checks += [
            Check(
                is_in_range(c, lo, hi).name,
                c,
                key,
                splits,
                partial(is_in_range, c, lo, hi, skip_missing=False),
                ("distribution/min", "distribution/max"),
            )
            for c in schema.features
            if schema.kind(c) == "numeric"
        ]
    if constraints.get("target_in_classes") and schema.task == "classification":
        checks.append(
            Check(
                f"{schema.target} values in the {len(schema.classes)} known classes",
                schema.target,
                "profile.constraints.target_in_classes (schema.json: classes)",
                splits,
                set_check=SetCheck(schema.target, tuple(schema.classes)),
            )
        )
    max_unknown = constraints.get("max_unknown_categories")
    if max_unknown is not None:
        key = "profile.constraints.max_unknown_categories"
        if not 0 <= _number(max_unknown, key) <= 1:
            raise StageError(f"{key}: {max_unknown} is not a rate in [0, 1]")
        checks += [
            Check(
                f"{c} values unseen in train at most {max_unknown:.2%} (its lower 95% bound)",
                c,
                f"{key} (schema.json: categories)",
                tuple(s for s in splits if s != "train"),  # train is the vocabulary
                set_check=SetCheck(c, tuple(vocab)),
                max_rate=float(max_unknown),
            )
            for c, vocab in schema.categories.items()
        ]
    declared = constraints.get("declared") or []
    if not isinstance(declared, (list, tuple)):
        raise StageError(f"profile.constraints.declared: expected a list, got {declared!r}")
    checks += [_declared_check(i, e, schema, splits) for i, e in enumerate(declared)]
    return checks


def vocabulary_checks(schema: Schema) -> list[SetCheck]:
    """Counted on every split for the report: categories unseen in train, unknown classes."""
    checks = [SetCheck(c, tuple(v)) for c, v in schema.categories.items()]
    if schema.task == "classification" and schema.classes:
        checks.append(SetCheck(schema.target, tuple(schema.classes)))
    return checks


def check_constraints(checks: list[Check], profiles: dict[str, SplitProfile]) -> list[dict]:
    """Evaluate `checks` on the splits they name.

    Returns:
        One entry per constraint and split: split, constraint, column, source, passed,
        observed value.
    """
    report = []
    for split, prof in profiles.items():
        mine = [c for c in checks if split in c.splits]
        builder = ConstraintsBuilder(dataset_profile_view=prof.view)
        for check in mine:
            if check.factory is not None:
                builder.add_constraint(check.factory(), ignore_missing=True)
        results = {}
        if any(c.factory is not None for c in mine):
            results = {
                r.name: bool(r.passed) for r in builder.build().generate_constraints_report()
            }
        seen = set()
        for check in mine:
            if check.name in seen:  # the same constraint from two keys
                continue
            seen.add(check.name)
            if check.set_check is not None:
                counts = prof.outside(check.set_check)
                observed: Any = {
                    "outside": counts["outside"],
                    "rate": round(counts["rate"], 6),
                    "examples": counts["examples"],
                }
                # a rate fails on evidence: its lower 95% bound over the limit (2 unseen of
                # 27 rows is 7.4%, and no evidence of a rate over 5%); no limit: none may be
                passed = (
                    not rate_over(counts["outside"], counts["values"], check.max_rate)
                    if check.max_rate
                    else not counts["outside"]
                )
            else:
                summary = prof.view.get_column(check.column).to_summary_dict()
                values = [json_safe(summary.get(k)) for k in check.shown]
                observed = values if len(values) > 1 else values[0]
                passed = results.get(check.name, False)
            report.append(
                {
                    "split": split,
                    "constraint": check.name,
                    "column": check.column,
                    "source": check.source,
                    "passed": passed,
                    "observed": observed,
                }
            )
    return report


def raise_on_failures(report: list[dict[str, Any]]) -> None:
    """Log every failed constraint; raise one line naming the count and the first."""
    failed = [r for r in report if not r["passed"]]
    if not failed:
        return
    for r in failed:
        log.error("FAILED on %s: %s (observed %s)", r["split"], r["constraint"], r["observed"])
    first = failed[0]
    split = first["split"]
    n = sum(r["split"] == split for r in failed)
    m = sum(r["split"] == split for r in report)
    others = {}
    for r in failed:
        if r["split"] != split:
            others[r["split"]] = others.get(r["split"], 0) + 1
    also = f" (also {', '.join(f'{k} on {s}' for s, k in others.items())})" if others else ""
    raise StageError(
        f"{n} of {m} profile.constraints failed on the {split} split{also}, first: "
        f"{first['constraint']} (observed {json.dumps(first['observed'], default=str)})"
    )
