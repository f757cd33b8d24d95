"""Reading a split in record batches and profiling it: each batch is profiled with whylogs
and the profiles merged, so memory does not grow with rows; set-membership checks are
counted exactly with pyarrow alongside (whylogs' frequent items are approximate)."""

import json
import logging
import multiprocessing
import os
from collections.abc import Callable, Iterable, Iterator, Mapping
from concurrent.futures import ProcessPoolExecutor
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pandas as pd
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.dataset as pds
from google.protobuf.internal.decoder import _DecodeVarint32
from google.protobuf.internal.encoder import _VarintBytes

from fullstack_ml.runtime import whylogs_compat  # noqa: F401  before whylogs: it patches it

# isort: split
from whylogs.core.proto import ChunkHeader, ChunkMessage, DatasetProfileHeader, DatasetSegmentHeader
from whylogs.core.view.dataset_profile_view import WHYLOGS_MAGIC_HEADER_BYTES

from fullstack_ml.images import BadImage, profiled_columns, stat_columns_of, with_image_stats
from fullstack_ml.progress import track
from fullstack_ml.runtime.drift import (
    DatasetProfileView,
    json_safe,
    new_profile,
    profile_frame,
    reproducible,
)
from fullstack_ml.stage import StageError

log = logging.getLogger("stages.profile")

BATCH_ROWS = 65_536  # default rows per record batch (profile.batch_rows)
PARALLEL_ROWS = 100_000  # profile.processes=null: from this many rows, a process per core
EXAMPLES = 5  # values outside a set kept as examples, per check and split

Batches = Iterable[pa.RecordBatch | pa.Table | pd.DataFrame]
SplitSource = str | os.PathLike | pd.DataFrame | Callable[[], Batches]
Images = Mapping[str, Mapping[str, Any]]  # `Schema.images`: image feature -> size, mode...


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


def iter_batches(
    source: SplitSource, batch_rows: int = BATCH_ROWS, columns: list[str] | None = None
) -> Iterator[pa.Table]:
    """The record batches of a split (a frame is cut into batches too); of a Parquet path,
    only `columns` (None: all)."""
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
        for batch in dataset.to_batches(columns=columns, batch_size=batch_rows):
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


def check_counts(batch: pa.Table, checks: Iterable[SetCheck]) -> SplitProfile:
    """A batch's set-check counts (no profile); `checks` on columns it lacks are skipped."""
    counts = {}
    for check in checks:
        if check.column in batch.column_names:
            n, bad, examples = outside(batch.column(check.column), check.values)
            counts[check.key] = {"values": n, "outside": bad, "examples": examples}
    return SplitProfile(None, batch.num_rows, counts)


def profiled_frame(
    batch: pa.Table, images: Images | None, where: str | None, first_row: int = 0
) -> pd.DataFrame:
    """What is profiled of a batch: its columns, each image feature's followed by its
    statistics (`fullstack_ml.images.with_image_stats`). A bad image is a StageError naming
    `where` (the split's file or name), the column and the row."""
    try:
        return batch_frame(with_image_stats(batch, images or {}, first_row))
    except BadImage as err:
        raise StageError(f"{where or 'split'}: {err}") from None


def profile_batch(
    batch: pa.Table, checks: Iterable[SetCheck], images: Images | None = None
) -> SplitProfile:
    """One batch profiled, with its set-check counts."""
    part = check_counts(batch, checks)
    part.view = profile_frame(profiled_frame(batch, images, None))
    return part


def _profile_block(
    batch: pa.Table, checks: list[SetCheck], images: Images | None = None
) -> pa.Table:
    """Ray Data map_batches function: a block's profile and counts, serialized."""
    part = profile_batch(batch, checks, images)
    counts = json.dumps(json_safe(part.counts), default=str)
    return pa.table({"profile": [part.view.serialize()], "rows": [part.rows], "counts": [counts]})


def source_rows(source: SplitSource) -> int | None:
    """The row count of a frame or a Parquet path (from its metadata); None for a stream."""
    if isinstance(source, pd.DataFrame):
        return len(source)
    if callable(source) or not Path(source).exists():
        return None
    return pds.dataset(Path(source), format="parquet").count_rows()


def profile_split(
    source: SplitSource,
    checks: Iterable[SetCheck] = (),
    batch_rows: int = BATCH_ROWS,
    engine: str = "pandas",
    name: str | None = "split",
    columns: list[str] | None = None,
    images: Images | None = None,
) -> SplitProfile:
    """Profile a split batch by batch and merge; `engine="ray"` profiles the Parquet blocks
    of a path in parallel with Ray Data (other sources are profiled here). The progress
    (`fullstack_ml.progress`) is labelled `profile <name>`, None: not shown. `columns`: of a
    Parquet path, profile only those. `images` (`Schema.images`): image features, profiled
    with their statistics (`profiled_frame`)."""
    checks = list(checks)
    if engine == "ray" and isinstance(source, (str, os.PathLike)):
        return _profile_split_ray(Path(source), checks, batch_rows, images)
    if engine not in ("pandas", "ray"):
        raise StageError(f"engine: unknown engine {engine!r} (pandas | ray)")
    # One profile tracks every batch: a new profile per batch and a merge cost 0.26 s per
    # batch of 65,536 rows x 51 columns here (whylogs deep-copies each column's metric
    # configs), 3 s of 11 s at 1M rows; the sketches are those of the whole split at once.
    profile, merged = new_profile(), SplitProfile()
    batches = iter_batches(source, batch_rows, columns)
    if name is not None:
        batches = track(batches, source_rows(source), f"profile {name}", "row", log, len)
    where = str(source) if isinstance(source, (str, os.PathLike)) else f"{name or ''} split"
    for batch in batches:
        profile.track(pandas=profiled_frame(batch, images, where, merged.rows))
        merged = merged.merge(check_counts(batch, checks))
    if merged.rows:
        merged.view = reproducible(profile.view())
    return merged


def profile_splits(
    splits: Mapping[str, SplitSource],
    checks: Iterable[SetCheck] = (),
    batch_rows: int = BATCH_ROWS,
    processes: int | None = None,
    images: Images | None = None,
) -> dict[str, SplitProfile]:
    """Every split profiled here (the pandas engine), in `processes` processes side by side
    where every split is a Parquet path with the same columns (None: one per core from
    PARALLEL_ROWS rows in all, else one). The columns are dealt out among the processes,
    each profiling every row of its own: whylogs tracks each column on its own, so the
    joined profiles are one process's (tests/test_profile.py). 1M rows x 51 columns on 2
    cores: 11.4 s -> 6.3 s. The extra processes are forked: spawned, each would import
    whylogs and pyarrow again. `images`: as `profile_split`'s (an image feature's column
    and its statistics go to one process)."""
    checks = list(checks)
    columns = profiled_columns(shared_columns(splits), images or {})
    if processes is None:
        rows = sum(source_rows(s) or 0 for s in splits.values()) if columns else 0
        processes = len(os.sched_getaffinity(0)) if rows >= PARALLEL_ROWS else 1
    groups = [g for g in (columns[k::processes] for k in range(processes)) if g]
    if len(groups) < 2 or "fork" not in multiprocessing.get_all_start_methods():
        return {
            n: profile_split(s, checks, batch_rows, name=n, images=images)
            for n, s in splits.items()
        }
    fork = multiprocessing.get_context("fork")
    with ProcessPoolExecutor(len(groups) - 1, mp_context=fork) as pool:
        others = [
            pool.submit(_profile_columns, splits, checks, batch_rows, group, images)
            for group in groups[1:]
        ]
        parts = [
            {
                n: profile_split(s, checks, batch_rows, name=n, columns=groups[0], images=images)
                for n, s in splits.items()
            }
        ]
        parts += [{n: _loaded(p) for n, p in f.result().items()} for f in others]
    stats = stat_columns_of(images or {})
    order = [c for column in columns for c in (column, *stats.get(column, ()))]
    return {name: _joined([p[name] for p in parts], order) for name in splits}


def shared_columns(splits: Mapping[str, SplitSource]) -> list[str]:
    """The columns of the splits where each is a Parquet path and all have the same; else []."""
    if not all(isinstance(s, (str, os.PathLike)) and Path(s).exists() for s in splits.values()):
        return []
    try:
        names = {
            tuple(pds.dataset(Path(s), format="parquet").schema.names) for s in splits.values()
        }
    except (pa.ArrowInvalid, OSError):
        return []  # profile_split names the file that is not Parquet
    return list(names.pop()) if len(names) == 1 else []


def _profile_columns(
    splits: Mapping[str, SplitSource],
    checks: list[SetCheck],
    batch_rows: int,
    columns: list[str],
    images: Images | None,
) -> dict[str, tuple[bytes | None, int, dict[str, Any]]]:
    """In a forked process: `columns` of every split profiled, the views serialized."""
    parts = {
        n: profile_split(s, checks, batch_rows, name=None, columns=columns, images=images)
        for n, s in splits.items()
    }
    return {n: (p.view and p.view.serialize(), p.rows, p.counts) for n, p in parts.items()}


def _loaded(part: tuple[bytes | None, int, dict[str, Any]]) -> SplitProfile:
    view, rows, counts = part
    return SplitProfile(view and DatasetProfileView.deserialize(view), rows, counts)


def _joined(parts: list[SplitProfile], columns: list[str]) -> SplitProfile:
    """The profiles of the same rows' column groups as one, its columns in `columns` order."""
    first = parts[0]
    if first.view is None:
        return first
    views = {}
    for part in parts:
        views.update(part.view.get_columns())
    view = DatasetProfileView(
        columns={c: views[c] for c in columns},
        dataset_timestamp=first.view.dataset_timestamp,
        creation_timestamp=first.view.creation_timestamp,
        metrics=first.view._metrics,  # noqa: SLF001  dataset-level metrics, none by default
        metadata=first.view._metadata,  # noqa: SLF001
    )
    counts = {k: v for part in parts for k, v in part.counts.items()}
    return SplitProfile(view, first.rows, counts)


@contextmanager
def ray_data(address: str | None = None) -> Iterator[None]:
    """Ray (`ray_session`) while the block runs, Ray Data bounded in memory."""
    from fullstack_ml import ray_session

    with ray_session.session(address):
        ray_session.bounded_ray_data()
        yield


def _profile_split_ray(
    path: Path, checks: list[SetCheck], batch_rows: int, images: Images | None = None
) -> SplitProfile:
    import ray.data

    if not path.exists():
        raise StageError(f"{path}: not found (run `dvc repro ingest` first)")
    merged = SplitProfile()
    with ray_data():
        try:
            blocks = ray.data.read_parquet(str(path)).map_batches(
                _profile_block,
                fn_kwargs={"checks": checks, "images": dict(images or {})},
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


def profile_bytes(view: DatasetProfileView) -> bytes:
    """`view.serialize()` with every protobuf map written in key order. whylogs writes maps
    in the order of protobuf's (upb) hash tables, which differs from process to process, so
    the same profile gave other bytes on each run; the messages and their sizes are the
    same, so the file's offsets stay valid and whylogs reads it as before."""

    def delimited(at: int, cls: type) -> tuple[Any, int]:
        size, at = _DecodeVarint32(data, at)
        message = cls()
        message.ParseFromString(data[at : at + size])
        return message, at + size

    def write(message: Any) -> bytes:
        body = message.SerializeToString(deterministic=True)
        return _VarintBytes(len(body)) + body

    data = view.serialize()
    at = len(WHYLOGS_MAGIC_HEADER_BYTES)
    out = [data[:at]]
    for cls in (DatasetSegmentHeader, DatasetProfileHeader):
        message, at = delimited(at, cls)
        out.append(write(message))
    while at < len(data):
        header, at = delimited(at, ChunkHeader)
        chunk = ChunkMessage()
        chunk.ParseFromString(data[at : at + header.length])
        out += [write(header), chunk.SerializeToString(deterministic=True)]
        at += header.length
    return b"".join(out)
