"""Ray Data sources (ingest and predict with engine=ray): a source as a Ray dataset of
blocks, and the one-line errors of tasks that failed."""

# isort: off
from fullstack_ml import ray_session  # noqa: F401  sets Ray's environment before Ray loads
# isort: on

import glob
import io
import os
from functools import partial
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import pyarrow as pa
from omegaconf import DictConfig

from fullstack_ml.sources import read_source
from fullstack_ml.stage import StageError

BLOCK_BYTES = 64 << 20  # source bytes per block of a local CSV file


def ray_source(data_cfg: DictConfig, seed: int, key: str = "data") -> tuple[Any, str, pd.DataFrame]:
    """The source as a Ray dataset of raw blocks, its name and an empty frame of its columns.

    Local CSV files are cut into byte ranges of about BLOCK_BYTES and local Parquet files
    into row groups, which tasks read in parallel (Ray's readers read a file whole: memory
    grows with the file); Parquet folders and JSON lines go through Ray's readers. Other
    sources, and bad_rows=drop, are read whole (read_source; `key` names the config in its
    messages), then handed to Ray.
    """
    import ray.data

    path, fmt = str(data_cfg.get("path") or ""), data_cfg.get("format", "auto")
    local = data_cfg.source == "file" and "://" not in path
    files = sorted(glob.glob(path)) if local and any(c in path for c in "*?[") else [path]
    suffix = Path(files[0]).suffix.lower() if files else ""
    kind = fmt if fmt != "auto" else {".csv": "csv", ".jsonl": "jsonl"}.get(suffix, "parquet")
    if local and files and all(Path(f).exists() for f in files) and data_cfg.bad_rows == "fail":
        if kind == "csv":
            ranges = csv_ranges(files, BLOCK_BYTES)
            try:  # the types of the first rows (about 1 MiB, whole lines)
                first = ranges[0]
                end = min(first["end"], first["start"] + (1 << 20))
                with open(first["path"], "rb") as f:
                    f.seek(end)
                    end += len(f.readline()) if end < first["end"] else 0
                head = read_csv_range({**first, "end": end})
            except (pa.ArrowInvalid, IndexError) as err:
                raise StageError(f"{path}: cannot read as csv: {err}") from None
            ds = ray.data.from_items(ranges, override_num_blocks=len(ranges))
            return ds.map_batches(read_csv_ranges, batch_size=1), path, frame_of(head.schema)
        if kind == "parquet" and all(Path(f).is_file() for f in files):
            import pyarrow.parquet as pq

            try:  # a block per row group: Ray's reader reads a file whole
                pieces = [
                    {"path": f, "group": g}
                    for f in files
                    for g in range(pq.ParquetFile(f).metadata.num_row_groups)
                ]
                schema = pq.read_schema(files[0])
            except (pa.ArrowInvalid, OSError) as err:
                raise StageError(f"{path}: cannot read as parquet: {err}") from None
            ds = ray.data.from_items(pieces, override_num_blocks=max(len(pieces), 1))
            return ds.map_batches(read_row_groups, batch_size=1), path, frame_of(schema)
        read = {"parquet": ray.data.read_parquet, "jsonl": partial(ray.data.read_json, lines=True)}
        if kind in read:
            ds = read[kind](files)
            return ds, path, frame_of(ds.schema().base_schema)
    table = read_source(data_cfg, seed, key)
    return ray.data.from_pandas(table.frame), table.name, table.frame.iloc[:0]


def frame_of(schema: pa.Schema) -> pd.DataFrame:
    """An empty frame of `schema`, with the dtypes pandas gives a table read from it."""
    return schema.empty_table().to_pandas()


def csv_ranges(files: list[str], size: int) -> list[dict[str, Any]]:
    """Byte ranges of about `size` bytes ending at a line end, each with its file's header
    line (a field holding a line break would be cut: read such files with engine=pandas)."""
    ranges = []
    for name in files:
        total = os.path.getsize(name)
        with open(name, "rb") as f:
            header = f.readline()
            start = f.tell()
            while start < total:
                f.seek(min(start + size, total))
                f.readline()
                end = min(f.tell(), total)
                ranges.append({"path": name, "header": header, "start": start, "end": end})
                start = end
    return ranges


def read_csv_range(item: dict[str, Any]) -> pa.Table:
    """One range of a CSV file; empty fields are missing values, as in stages.sources."""
    import pyarrow.csv

    with open(item["path"], "rb") as f:
        f.seek(item["start"])
        data = f.read(item["end"] - item["start"])
    options = pyarrow.csv.ConvertOptions(strings_can_be_null=True)
    return pyarrow.csv.read_csv(io.BytesIO(item["header"] + data), convert_options=options)


def read_row_groups(items: dict[str, np.ndarray]) -> pa.Table:
    """The row groups `items` names (path, group), as one table."""
    import pyarrow.parquet as pq

    pairs = zip(items["path"], items["group"], strict=True)
    return pa.concat_tables([pq.ParquetFile(p).read_row_group(int(g)) for p, g in pairs])


def read_csv_ranges(items: dict[str, np.ndarray]) -> pa.Table:
    rows = [dict(zip(items, values, strict=True)) for values in zip(*items.values(), strict=True)]
    try:
        return pa.concat_tables([read_csv_range(r) for r in rows])
    except pa.ArrowInvalid as err:
        raise StageError(f"{rows[0]['path']}: cannot read as csv: {err}") from None


def stage_error(err: BaseException) -> BaseException:
    """The StageError raised in a Ray task, from the error that reaches the driver (which
    carries the task's traceback as text), or the error itself."""
    prefix = f"{StageError.__module__}.{StageError.__name__}: "
    for line in str(err).splitlines():
        if line.strip().startswith(prefix):
            return StageError(line.strip().removeprefix(prefix))
    return err
