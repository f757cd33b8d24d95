"""profile: whylogs profiles of the curated splits, data-quality constraints, drift.

Writes `reports/profile/{train,val,test}.bin` (whylogs profiles), `constraints.json`,
`drift.json` and `report.html` (self-contained), and `metrics/profile.json`.
Fails, writing nothing, when a constraint is violated on a split.

A split (one Parquet file or a folder of part files) is read in record batches: each batch
is profiled and the profiles merged, so memory does not grow with rows. Set-membership
checks (class labels, categories seen in train, `in_set`) are counted exactly with pyarrow
alongside; whylogs' frequent items are approximate.
"""

import html
import json
import logging
import math
import os
from collections.abc import Callable, Iterable, Iterator, Mapping
from contextlib import contextmanager, nullcontext
from dataclasses import dataclass, field
from functools import partial
from pathlib import Path
from typing import Any

os.environ.setdefault("WHYLOGS_NO_ANALYTICS", "1")  # before the first whylogs import

import pandas as pd  # noqa: E402
import pyarrow as pa  # noqa: E402
import pyarrow.compute as pc  # noqa: E402
import pyarrow.dataset as pds  # noqa: E402
from omegaconf import DictConfig, OmegaConf  # noqa: E402
from whylogs.core.constraints import ConstraintsBuilder  # noqa: E402
from whylogs.core.constraints.factories import (  # noqa: E402
    is_in_range,
    mean_between_range,
    no_missing_values,
)

from stages.common import (  # noqa: E402
    StageError,
    atomic_dir,
    bounded_ray_data,
    read_json,
    run,
    write_atomic,
    write_json,
)
from stages.drift import DatasetProfileView, drift_scores, drifted, json_safe, profile_frame  # noqa: E402
from stages.ingest import OUT_DIR as DATA_DIR  # noqa: E402
from stages.ingest import SPLITS  # noqa: E402

log = logging.getLogger("stages.profile")
OUT_DIR = Path("reports/profile")
METRICS = Path("metrics/profile.json")
BATCH_ROWS = 65_536  # default rows per record batch (profile.batch_rows)
EXAMPLES = 5  # values outside a set kept as examples, per check and split
DECLARED = {  # check -> the keys it takes besides column and check
    "in_range": {"min", "max"},  # whylogs is_in_range
    "mean_between": {"min", "max"},  # whylogs mean_between_range
    "no_missing": set(),  # whylogs no_missing_values
    "in_set": {"values"},  # counted exactly with pyarrow: frequent items are estimates
}

# A split: a Parquet file or folder of part files, a frame, or a callable yielding batches.
Batches = Iterable[pa.RecordBatch | pa.Table | pd.DataFrame]
SplitSource = str | os.PathLike | pd.DataFrame | Callable[[], Batches]


@dataclass(frozen=True)
class Schema:
    """What the profile stage reads of `schema.json`."""

    features: list[str]
    kinds: dict[str, str]  # feature -> numeric | categorical (or another kind ingest names)
    nullable: set[str]
    categories: dict[str, list[Any]]  # the train vocabulary of categorical features
    target: str
    task: str  # classification | regression
    classes: list[Any]

    @property
    def columns(self) -> list[str]:
        return [*self.features, self.target]

    @property
    def categorical(self) -> list[str]:
        return [c for c in self.features if self.kinds[c] == "categorical"]

    def kind(self, column: str) -> str:
        if column == self.target:
            return "categorical" if self.task == "classification" else "numeric"
        return self.kinds.get(column, "numeric")


def parse_schema(schema: dict[str, Any]) -> Schema:
    """`schema.json` as written by ingest; a feature without `kind` is numeric unless its
    dtype is a string, category or boolean, one without `nullable` is not nullable."""
    try:
        features = [f if isinstance(f, dict) else {"name": f} for f in schema["features"]]
        target = schema["target"]["name"]
    except (KeyError, TypeError) as err:
        raise StageError(f"schema.json: missing or malformed key {err}") from None
    non_numeric = ("object", "str", "string", "category", "bool", "boolean")
    kinds = {
        f["name"]: f.get("kind") or ("categorical" if f.get("dtype") in non_numeric else "numeric")
        for f in features
    }
    classes = list(schema.get("classes") or [])
    return Schema(
        features=[f["name"] for f in features],
        kinds=kinds,
        nullable={f["name"] for f in features if f.get("nullable")},
        categories={
            f["name"]: list(f["categories"])
            for f in features
            if kinds[f["name"]] == "categorical" and f.get("categories") is not None
        },
        target=target,
        task=schema.get("task") or ("classification" if classes else "regression"),
        classes=classes,
    )


# ---------------------------------------------------------------- reading and profiling


def batch_frame(batch: pa.RecordBatch | pa.Table) -> pd.DataFrame:
    """A record batch as pandas with the same dtypes whatever its nulls: integers as Int64
    and booleans as boolean (plain pandas turns them into float and object when a batch
    holds a null), dictionary-encoded columns decoded."""

    def dtype(t: pa.DataType) -> Any:
        if pa.types.is_integer(t) and t != pa.uint64():  # uint64 may not fit in Int64
            return pd.Int64Dtype()
        if pa.types.is_boolean(t):
            return pd.BooleanDtype()
        return None

    if isinstance(batch, pa.RecordBatch):
        batch = pa.Table.from_batches([batch])
    decoded = [
        c.cast(c.type.value_type) if pa.types.is_dictionary(c.type) else c for c in batch.columns
    ]
    return pa.table(decoded, names=batch.column_names).to_pandas(types_mapper=dtype)


def iter_batches(source: SplitSource, batch_rows: int = BATCH_ROWS) -> Iterator[pa.Table]:
    """The record batches of a split (a frame is cut into batches too)."""
    if isinstance(source, pd.DataFrame):
        try:
            table = pa.Table.from_pandas(source, preserve_index=False)
        except (pa.ArrowInvalid, pa.ArrowTypeError) as err:
            raise StageError(f"cannot profile the frame: {err}") from None
        for batch in table.to_batches(max_chunksize=batch_rows):
            yield pa.Table.from_batches([batch])
        return
    if callable(source):
        for batch in source():
            if isinstance(batch, pd.DataFrame):
                yield from iter_batches(batch, batch_rows)
            else:
                yield pa.Table.from_batches([batch]) if isinstance(batch, pa.RecordBatch) else batch
        return
    path = Path(source)
    if not path.exists():
        raise StageError(f"{path}: not found (run `dvc repro ingest` first)")
    try:
        dataset = pds.dataset(path, format="parquet")
        if path.is_dir():  # parts may differ: an all-null column is written as type null
            schemas = [f.physical_schema for f in dataset.get_fragments()]
            if schemas:
                unified = pa.unify_schemas(schemas, promote_options="permissive")
                dataset = pds.dataset(path, format="parquet", schema=unified)
        for batch in dataset.to_batches(batch_size=batch_rows):
            yield pa.Table.from_batches([batch])
    except (pa.ArrowInvalid, pa.ArrowTypeError, OSError) as err:
        raise StageError(f"{path}: cannot read as Parquet: {err}") from None


@dataclass(frozen=True)
class SetCheck:
    """Count the non-null values of `column` outside `values`."""

    column: str
    values: tuple[Any, ...]

    @property
    def key(self) -> str:
        return json.dumps([self.column, list(self.values)], default=str)


def outside(column: pa.ChunkedArray | pa.Array, values: tuple[Any, ...]) -> tuple[int, int, list]:
    """(non-null values, values not in `values`, a few of those) of an Arrow column. Values
    compare in the column's type where `values` cast to it, else as strings."""
    if pa.types.is_dictionary(column.type):
        column = column.cast(column.type.value_type)
    valid = column.drop_null()
    try:
        value_set = pa.array(list(values)).cast(valid.type)
    except (pa.ArrowInvalid, pa.ArrowTypeError, pa.ArrowNotImplementedError):
        valid = valid.cast(pa.string())
        value_set = pa.array([str(v) for v in values], pa.string())
    if pa.types.is_floating(valid.type):
        valid = valid.filter(pc.invert(pc.is_nan(valid)))  # NaN is missing, not a value
    unknown = valid.filter(pc.invert(pc.is_in(valid, value_set=value_set)))
    examples = pc.unique(unknown).slice(0, EXAMPLES).to_pylist() if len(unknown) else []
    return len(valid), len(unknown), examples


@dataclass
class SplitProfile:
    """A split's merged whylogs profile and its exact set-check counts."""

    view: DatasetProfileView | None = None
    rows: int = 0
    counts: dict[str, dict[str, Any]] = field(default_factory=dict)  # SetCheck.key -> counts

    def merge(self, other: "SplitProfile") -> "SplitProfile":
        view = other.view if self.view is None else self.view
        if self.view is not None and other.view is not None:
            view = self.view.merge(other.view)
        counts = {k: dict(v) for k, v in self.counts.items()}
        for key, c in other.counts.items():
            mine = counts.setdefault(key, {"values": 0, "outside": 0, "examples": []})
            mine["values"] += c["values"]
            mine["outside"] += c["outside"]
            seen = mine["examples"]
            mine["examples"] = (
                seen + [e for e in c["examples"] if e not in seen][: EXAMPLES - len(seen)]
            )
        return SplitProfile(view, self.rows + other.rows, counts)

    def outside(self, check: SetCheck) -> dict[str, Any]:
        c = self.counts.get(check.key) or {"values": 0, "outside": 0, "examples": []}
        return {**c, "rate": c["outside"] / c["values"] if c["values"] else 0.0}


def profile_batch(batch: pa.Table, checks: Iterable[SetCheck]) -> SplitProfile:
    """One batch profiled; `checks` on columns the batch lacks are skipped."""
    counts = {}
    for check in checks:
        if check.column in batch.column_names:
            n, bad, examples = outside(batch.column(check.column), check.values)
            counts[check.key] = {"values": n, "outside": bad, "examples": examples}
    return SplitProfile(profile_frame(batch_frame(batch)), batch.num_rows, counts)


def _profile_block(batch: pa.Table, checks: list[SetCheck]) -> pa.Table:
    """Ray Data map_batches function: a block's profile and counts, serialized."""
    part = profile_batch(batch, checks)
    counts = json.dumps(json_safe(part.counts), default=str)
    return pa.table({"profile": [part.view.serialize()], "rows": [part.rows], "counts": [counts]})


def profile_split(
    source: SplitSource,
    checks: Iterable[SetCheck] = (),
    batch_rows: int = BATCH_ROWS,
    engine: str = "pandas",
) -> SplitProfile:
    """Profile a split batch by batch and merge; `engine="ray"` profiles the Parquet blocks
    of a path in parallel with Ray Data (other sources are profiled here)."""
    checks = list(checks)
    if engine == "ray" and isinstance(source, (str, os.PathLike)):
        return _profile_split_ray(Path(source), checks, batch_rows)
    if engine not in ("pandas", "ray"):
        raise StageError(f"engine: unknown engine {engine!r} (pandas | ray)")
    merged = SplitProfile()
    for batch in iter_batches(source, batch_rows):
        merged = merged.merge(profile_batch(batch, checks))
    return merged


@contextmanager
def ray_running() -> Iterator[None]:
    """A private local Ray while the block runs; a Ray already running is used and kept."""
    import ray
    import ray.data

    if ray.is_initialized():
        bounded_ray_data()
        yield
        return
    ray.init(
        num_cpus=os.cpu_count() or 2,
        include_dashboard=False,
        logging_level=logging.ERROR,
        configure_logging=True,
    )
    try:
        bounded_ray_data()
        yield
    finally:
        ray.shutdown()


def _profile_split_ray(path: Path, checks: list[SetCheck], batch_rows: int) -> SplitProfile:
    import ray.data

    if not path.exists():
        raise StageError(f"{path}: not found (run `dvc repro ingest` first)")
    merged = SplitProfile()
    with ray_running():
        try:
            blocks = ray.data.read_parquet(str(path)).map_batches(
                _profile_block,
                fn_kwargs={"checks": checks},
                batch_format="pyarrow",
                batch_size=batch_rows,
            )
            for row in blocks.iter_rows():
                part = SplitProfile(
                    DatasetProfileView.deserialize(row["profile"]),
                    int(row["rows"]),
                    json.loads(row["counts"]),
                )
                merged = merged.merge(part)
        except Exception as err:  # Ray wraps what failed in its tasks; one line names the file
            msg = next(iter(str(err).strip().splitlines()), type(err).__name__)
            raise StageError(f"{path}: Ray Data could not profile it: {msg}") from None
    return merged


# ---------------------------------------------------------------- constraints


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
    if column not in schema.columns:
        raise StageError(f"{key}: unknown column {column!r} (not in schema.json)")
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
    if schema.kind(column) != "numeric":
        raise StageError(
            f"{key}: check {check} needs a numeric column; {column!r} is {schema.kind(column)}"
        )
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
                f"{c} values unseen in train at most {max_unknown:.2%}",
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
                passed = (
                    counts["rate"] <= check.max_rate if check.max_rate else not counts["outside"]
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


# ---------------------------------------------------------------- report


def column_summary(view: DatasetProfileView, column: str, kind: str) -> dict[str, Any]:
    """What the report shows of one column: counts, and the numeric distribution or the
    distinct estimate and top values."""
    s = view.get_column(column).to_summary_dict()
    out: dict[str, Any] = {"count": s.get("counts/n", 0), "missing": s.get("counts/null", 0)}
    if kind == "numeric":
        for key in ("mean", "stddev", "min", "q_25", "median", "q_75", "max"):
            out[key] = json_safe(s.get(f"distribution/{key}"))
    else:
        out["distinct"] = json_safe(s.get("cardinality/est"))
        items = s.get("frequent_items/frequent_strings") or []
        out["top"] = [[i.value, int(i.est)] for i in items[:5]]
    return out


def _fmt(value: Any) -> str:
    if value is None:
        return "-"
    if isinstance(value, float):
        return f"{value:.4g}"
    return html.escape(str(value))


def render_html(
    summaries: dict[str, dict[str, dict[str, Any]]],
    constraints: list[dict[str, Any]],
    drift: dict[str, dict[str, Any]],
    schema: Schema,
) -> str:
    """One self-contained page (no scripts, no network): a summary per split and column
    (`summaries`: split -> rows and column -> `column_summary`), the drift of each split
    against train, and the constraints with their observed values."""
    esc = html.escape
    parts = []
    for split, summary in summaries.items():
        columns = summary["columns"]
        parts.append(f"<h2 id='split-{esc(split)}'>Split {esc(split)}: {summary['rows']} rows</h2>")
        numeric = [c for c in columns if schema.kind(c) == "numeric"]
        categorical = [c for c in columns if schema.kind(c) != "numeric"]
        if numeric:
            keys = ("count", "missing", "mean", "stddev", "min", "q_25", "median", "q_75", "max")
            head = "".join(f"<th>{k}</th>" for k in keys)
            body = "".join(
                f"<tr><td>{esc(c)}</td>"
                + "".join(f"<td>{_fmt(columns[c].get(k))}</td>" for k in keys)
                + "</tr>"
                for c in numeric
            )
            parts.append(
                f"<h3>Numeric columns</h3><table><tr><th>column</th>{head}</tr>{body}</table>"
            )
        if categorical:
            body = []
            for c in categorical:
                s = columns[c]
                top = ", ".join(f"{esc(str(v))} ({n})" for v, n in s["top"])
                unseen = s.get("unseen")
                unseen_cell = (
                    "-" if unseen is None else f"{unseen['rate']:.2%} ({unseen['outside']})"
                )
                body.append(
                    f"<tr><td>{esc(c)}</td><td>{s['count']}</td><td>{s['missing']}</td>"
                    f"<td>{_fmt(s['distinct'])}</td><td>{top or '-'}</td>"
                    f"<td>{unseen_cell}</td></tr>"
                )
            parts.append(
                "<h3>Categorical and other columns</h3><table><tr><th>column</th><th>count</th>"
                "<th>missing</th><th>distinct (est.)</th><th>top values (est. count)</th>"
                f"<th>unseen in train / unknown class</th></tr>{''.join(body)}</table>"
            )
    colour = {"NO_DRIFT": "#d7f2d7", "POSSIBLE_DRIFT": "#fff2b3", "DRIFT": "#f7c6c6"}
    if drift:
        head = "".join(
            f"<th>{esc(s)} algorithm</th><th>{esc(s)} p-value</th><th>{esc(s)} category</th>"
            for s in drift
        )
        body = []
        for col in next(iter(drift.values())):
            cells = []
            for scores in drift.values():
                s = scores.get(col) or {}
                cat = s.get("drift_category") or "UNKNOWN"
                p = "-" if s.get("pvalue") is None else f"{s['pvalue']:.4g}"
                cells.append(
                    f"<td>{esc(s.get('algorithm') or '-')}</td><td>{p}</td>"
                    f"<td style='background:{colour.get(cat, '#eee')}'>{cat}</td>"
                )
            body.append(f"<tr><td>{esc(col)}</td>{''.join(cells)}</tr>")
        parts.append(
            "<h2>Drift against train</h2>"
            f"<table><tr><th>column</th>{head}</tr>{''.join(body)}</table>"
        )
    failed = [r for r in constraints if not r["passed"]]
    rows = "".join(
        f"<tr class='{'ok' if r['passed'] else 'bad'}'><td>{esc(r['split'])}</td>"
        f"<td>{esc(r['constraint'])}</td><td>{esc(json.dumps(r['observed'], default=str))}</td>"
        f"<td>{'passed' if r['passed'] else 'FAILED'}</td><td>{esc(r['source'])}</td></tr>"
        for r in sorted(constraints, key=lambda r: r["passed"])
    )
    parts.append(
        f"<h2>Constraints: {len(constraints) - len(failed)} passed, {len(failed)} failed</h2>"
        f"<details{' open' if failed else ''}><summary>every constraint with its observed value"
        "</summary><table><tr><th>split</th><th>constraint</th><th>observed</th><th>result</th>"
        f"<th>from</th></tr>{rows}</table></details>"
    )
    nav = " | ".join(f"<a href='#split-{esc(s)}'>{esc(s)}</a>" for s in summaries)
    return (
        "<!DOCTYPE html><html><head><meta charset='utf-8'><title>Data profile</title><style>"
        "body{font-family:sans-serif}table{border-collapse:collapse;margin-bottom:1em}"
        "td,th{border:1px solid #ccc;padding:2px 6px;font-size:13px}"
        "tr.bad td{background:#f7c6c6}</style></head><body>"
        f"<h1>Data profile</h1><p>{nav}</p>{''.join(parts)}</body></html>"
    )


# ---------------------------------------------------------------- the stage


def profile(
    splits: Mapping[str, SplitSource],
    schema: dict[str, Any],
    cfg: DictConfig,
    out_dir: Path,
    engine: str = "pandas",
) -> dict[str, Any]:
    """Profile every split, check constraints, score drift against train, write `out_dir`.

    Args:
        splits: split name -> a Parquet file or folder of part files, a frame, or a
            callable yielding record batches or frames; must include "train".
        schema: the parsed `schema.json`.
        cfg: the `profile` config section.
        out_dir: replaced, on success only, by the profiles and reports.
        engine: "pandas" (batches one after another here) or "ray" (Ray Data tasks).

    Returns:
        The summary written to the metrics file.
    """
    if "train" not in splits:
        raise StageError("profile: no train split (drift and constraints are against it)")
    parsed = parse_schema(schema)
    constraints = OmegaConf.to_container(cfg.constraints, resolve=True)
    checks = build_checks(constraints, parsed, splits)  # a bad key fails before profiling
    set_checks = {c.set_check for c in checks if c.set_check} | set(vocabulary_checks(parsed))
    batch_rows = int(cfg.get("batch_rows") or BATCH_ROWS)
    profiles = {}
    with ray_running() if engine == "ray" else nullcontext():  # one Ray for all the splits
        for name, source in splits.items():
            profiles[name] = profile_split(source, set_checks, batch_rows, engine)
    for name, source in splits.items():
        if profiles[name].view is None:
            where = f" ({source})" if isinstance(source, (str, os.PathLike)) else ""
            raise StageError(f"{name} split{where}: no data")
        missing = [c for c in parsed.columns if profiles[name].view.get_column(c) is None]
        if missing:
            raise StageError(f"{name} split: column {missing[0]!r} of schema.json is missing")
        log.info("profiled %s: %d rows", name, profiles[name].rows)
    report = check_constraints(checks, profiles)
    raise_on_failures(report)
    log.info("constraints: %d passed on %s", len(report), ", ".join(profiles))
    views = {name: p.view for name, p in profiles.items()}
    categorical = parsed.categorical
    target = parsed.target if parsed.task == "classification" else None
    drift = {
        s: drift_scores(views[s], views["train"], target, categorical)
        for s in splits
        if s != "train"
    }
    for split, scores in drift.items():
        log.info(
            "drift %s vs train: %d of %d columns DRIFT %s",
            split,
            len(drifted(scores)),
            len(scores),
            drifted(scores) or "",
        )
    bad = {s: drifted(d) for s, d in drift.items() if drifted(d)}
    if cfg.drift.fail_on_drift and bad:
        raise StageError(f"drift against train (profile.drift.fail_on_drift): {bad}")
    vocab = {c.column: c for c in vocabulary_checks(parsed)}
    summaries: dict[str, dict[str, Any]] = {}
    for name, prof in profiles.items():
        columns = {c: column_summary(prof.view, c, parsed.kind(c)) for c in parsed.columns}
        for c, check in vocab.items():
            columns[c]["unseen"] = prof.outside(check)
        summaries[name] = {"rows": prof.rows, "columns": columns}
    with atomic_dir(out_dir) as tmp:
        for name, view in views.items():
            (tmp / f"{name}.bin").write_bytes(view.serialize())
        write_json(tmp / "constraints.json", report)
        write_json(tmp / "drift.json", drift)
        write_atomic(tmp / "report.html", render_html(summaries, report, drift, parsed))
    summary = {
        "rows": {name: p.rows for name, p in profiles.items()},
        "constraints_passed": len(report),
        "drifted_columns": {s: len(drifted(d)) for s, d in drift.items()},
    }
    if parsed.categories:  # the rate of values unseen in train, per categorical feature
        summary["unseen_categories"] = {
            name: {c: round(p.outside(vocab[c])["rate"], 6) for c in parsed.categories}
            for name, p in profiles.items()
            if name != "train"
        }
    return summary


def split_path(name: str, data_dir: Path = DATA_DIR) -> Path:
    """A curated split: `<name>.parquet`, a file or a folder of part files."""
    path = Path(data_dir) / f"{name}.parquet"
    if not path.exists():
        raise StageError(f"{path}: not found (run `dvc repro ingest` first)")
    return path


def main(cfg: DictConfig) -> None:
    schema = read_json(DATA_DIR / "schema.json")
    splits = {name: split_path(name) for name in SPLITS}
    engine = OmegaConf.select(cfg, "data.engine", default="pandas") or "pandas"
    address = OmegaConf.select(cfg, "cluster.address")
    if engine == "ray" and address:  # join the cluster; profile() reuses a running Ray
        import ray

        ray.init(address=address, include_dashboard=False, logging_level=logging.ERROR)
    summary = profile(splits, schema, cfg.profile, OUT_DIR, engine=engine)
    write_json(METRICS, summary)
    log.info("wrote %s (profiles, constraints, drift, report.html), %s", OUT_DIR, METRICS)


if __name__ == "__main__":
    run(main)
