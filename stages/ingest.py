"""ingest: read the configured source, type and check it, write train/val/test splits.

Writes `data/curated/{train,val,test}.parquet` and `data/curated/schema.json` (column
types, feature kinds, task, classes, train vocabularies and ranges, row counts).
Fails, leaving the previous output untouched, on a bad source or a failed quality gate.
"""

import io
import json
import logging
import os
from functools import partial
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import pyarrow as pa
from omegaconf import DictConfig, OmegaConf
from sklearn.model_selection import train_test_split

from stages.common import StageError, atomic_dir, bounded_ray_data, run, write_json

log = logging.getLogger("stages.ingest")
OUT_DIR = Path("data/curated")
SPLITS = ("train", "val", "test")
TYPES = ("number", "integer", "string", "boolean", "datetime")
STRATEGIES = ("random", "stratified", "time", "group")
BLOCK_BYTES = 64 << 20  # engine=ray: source bytes per block
MAX_CLASSES = 20  # an integer target with more distinct values is inferred as regression


def infer_type(values: pd.Series) -> str:
    """The schema type of a column as read: one of TYPES."""
    if pd.api.types.is_bool_dtype(values):
        return "boolean"
    if pd.api.types.is_integer_dtype(values):
        return "integer"
    if pd.api.types.is_numeric_dtype(values):
        return "number"
    if pd.api.types.is_datetime64_any_dtype(values):
        return "datetime"
    return "string"


def cast(values: pd.Series, kind: str) -> pd.Series:
    """`values` as `kind`; a value that cannot be converted becomes missing."""
    if kind in ("number", "integer"):
        out = pd.to_numeric(values, errors="coerce")
        if kind == "integer":
            out = out.where(out.isna() | (out == out.round()))
        return out.astype("float64") if out.isna().any() or kind == "number" else out
    if kind == "datetime":
        return pd.to_datetime(values, errors="coerce")
    if kind == "boolean":
        words = {"true": True, "1": True, "yes": True, "false": False, "0": False, "no": False}
        return values.map(lambda v: words.get(str(v).strip().lower()) if pd.notna(v) else None)
    return values.where(values.isna(), values.astype(str))


def apply_types(
    df: pd.DataFrame, declared: dict[str, str] | None, source: str, bad_rows: str
) -> tuple[pd.DataFrame, dict[str, str], int]:
    """Check and convert the columns to the declared schema (`data.columns`).

    Returns:
        The typed table, every column's type and the rows dropped as unparseable.
    """
    types = {c: infer_type(df[c]) for c in df.columns}
    bad = pd.Series(False, index=df.index)
    for column, kind in (declared or {}).items():
        if kind not in TYPES:
            raise StageError(f"data.columns.{column}: unknown type {kind!r} ({' | '.join(TYPES)})")
        if column not in df.columns:
            raise StageError(f"{source}: column {column!r} declared in data.columns is missing")
        converted = cast(df[column], kind)
        wrong = converted.isna() & df[column].notna()
        if wrong.any() and bad_rows == "fail":
            first = df.loc[wrong, column].iloc[0]
            raise StageError(
                f"{source}: column {column!r}: {int(wrong.sum())} values are not {kind}"
                f" (first: {first!r}); fix them or set data.bad_rows=drop"
            )
        df[column], types[column], bad = converted, kind, bad | wrong
    return df[~bad].reset_index(drop=True), types, int(bad.sum())


def infer_task(target: pd.Series, declared: str | None, name: str) -> str:
    """classification or regression: as declared, else from the target's values."""
    integral = bool((target == target.round()).all()) if is_number(target.dtype) else False
    return decide_task(declared, target.dtype, integral, target.nunique(), name)


def is_number(dtype: Any) -> bool:
    return pd.api.types.is_numeric_dtype(dtype) and not pd.api.types.is_bool_dtype(dtype)


def decide_task(
    declared: str | None, dtype: Any, integral: bool, distinct: int | None, name: str
) -> str:
    """The declared task, checked, or: text labels and up to MAX_CLASSES distinct integers
    are classes, other numbers a regression target (`distinct` None: too many to count)."""
    if declared is not None:
        if declared not in ("classification", "regression"):
            raise StageError(f"data.task: {declared!r} is not classification | regression")
        if declared == "regression" and not is_number(dtype):
            raise StageError(f"target column {name!r} is {dtype}, not numeric (data.task)")
        return declared
    if not is_number(dtype):
        return "classification"
    few = distinct is not None and distinct <= MAX_CLASSES
    return "classification" if integral and few else "regression"


def feature_columns(
    df: pd.DataFrame, cfg: DictConfig, types: dict[str, str], source: str
) -> tuple[list[str], list[str]]:
    """The numeric and categorical feature columns (`data.features`, `data.categorical`)."""
    target, split_column = cfg.target, cfg.split.column
    if cfg.features is not None:
        features = list(cfg.features)
        for c in features:
            if c not in df.columns:
                raise StageError(f"{source}: feature column {c!r} (data.features) not found")
    else:
        features = [c for c in df.columns if c not in (target, split_column)]
        features = [c for c in features if types[c] != "datetime"]
    if cfg.categorical is not None:
        categorical = list(cfg.categorical)
        for c in categorical:
            if c not in features:
                raise StageError(f"data.categorical: {c!r} is not a feature column")
    else:
        categorical = [c for c in features if types[c] in ("string", "boolean")]
    for c in features:
        if types[c] == "datetime" or (types[c] == "string" and c not in categorical):
            raise StageError(
                f"{source}: feature column {c!r} is {types[c]}: list it in data.categorical,"
                " declare it a number in data.columns, or leave it out of data.features"
            )
    if not features:
        raise StageError(f"{source}: no feature columns besides the target {target!r}")
    return [c for c in features if c not in categorical], categorical


def kept_columns(
    numeric: list[str], categorical: list[str], target: str, split_column: str | None
) -> list[str]:
    """The curated columns: features, the target and the split column (if any)."""
    keep = [*numeric, *categorical, target]
    return keep + [split_column] if split_column and split_column not in keep else keep


def curated_columns(
    df: pd.DataFrame, numeric: list[str], categorical: list[str], keep: list[str]
) -> pd.DataFrame:
    """`keep` of `df`, numeric features as float64 and categorical ones as strings."""
    for c in numeric:
        df[c] = df[c].astype("float64")
    for c in categorical:
        df[c] = cast(df[c], "string")
    return df[keep]


def check_target(df: pd.DataFrame, target: str, source: str, bad_rows: str) -> pd.DataFrame:
    """The table without rows missing the target (data.bad_rows=drop), or a StageError."""
    if target not in df.columns:
        raise StageError(f"{source}: target column {target!r} not found (data.target)")
    missing = df[target].isna()
    if missing.any() and bad_rows == "fail":
        raise StageError(
            f"{source}: target column {target!r} has {int(missing.sum())} missing values;"
            " set data.bad_rows=drop to drop those rows"
        )
    return df[~missing].reset_index(drop=True)


def check_quality(
    df: pd.DataFrame, features: list[str], target: str, quality: DictConfig, source: str
) -> int:
    """Duplicate rows and label leakage gates (`data.quality`); returns the duplicates."""
    duplicates = int(df.duplicated().sum())
    leaking = [c for c in features if quality.fail_on_leakage and leaks(df[c], df[target])]
    quality_gates(duplicates, len(df), leaking, target, quality, source)
    return duplicates


def quality_gates(
    duplicates: int, rows: int, leaking: list[str], target: str, quality: DictConfig, source: str
) -> None:
    if duplicates > quality.max_duplicate_rows * rows:
        raise StageError(
            f"{source}: {duplicates} duplicate rows ({duplicates / rows:.1%}) exceed"
            f" data.quality.max_duplicate_rows={quality.max_duplicate_rows}"
        )
    if quality.fail_on_leakage and leaking:
        raise StageError(
            f"{source}: feature {leaking[0]!r} is a copy of the target {target!r} (label"
            " leakage); drop it or set data.quality.fail_on_leakage=false"
        )


def leaks(x: pd.Series, y: pd.Series, probe: int = 10_000) -> bool:
    """`x` equals the target, or (a target of few values) maps to it one to one. Checked
    on the first `probe` rows first: a copy is a copy on any subset, and most features
    are ruled out there."""
    if len(y) > probe and not leaks(x.iloc[:probe], y.iloc[:probe], probe):
        return False
    distinct = y.nunique()
    if x.nunique() != distinct:
        return False
    if x.astype(str).equals(y.astype(str)):
        return True
    if distinct > len(y) // 2:
        return False
    return len(pd.DataFrame({"x": x.astype(str), "y": y}).drop_duplicates()) == distinct


def check_unknown_categories(
    parts: dict[str, pd.DataFrame], categorical: list[str], max_rate: float
) -> None:
    """Fail when val or test has too many values of a categorical feature unseen in train."""
    for c in categorical:
        known = set(parts["train"][c].dropna())
        for name in ("val", "test"):
            values = parts[name][c].dropna()
            unknown_gate(
                name, c, float((~values.isin(known)).mean()) if len(values) else 0.0, max_rate
            )


def unknown_gate(split: str, column: str, rate: float, max_rate: float) -> None:
    if rate > max_rate:
        raise StageError(
            f"{split} split, column {column!r}: {rate:.1%} of values are categories unseen"
            f" in train, over data.quality.max_unknown_categories={max_rate}"
        )


def check_split(split: DictConfig | dict, columns: list[str]) -> None:
    """StageError naming the `data.split` key that is wrong."""
    strategy, column = split["strategy"], split.get("column")
    val_size, test_size = split["val_size"], split["test_size"]
    if not (0 < val_size < 1 and 0 < test_size < 1 and val_size + test_size < 1):
        raise StageError(
            f"data.split: val_size={val_size} and test_size={test_size} must be in (0, 1) "
            "and sum to less than 1"
        )
    if strategy not in STRATEGIES:
        raise StageError(f"data.split.strategy: {strategy!r} is not {' | '.join(STRATEGIES)}")
    if strategy in ("time", "group") and column not in columns:
        raise StageError(f"data.split.column: {column!r} is not a column ({strategy} split)")


def split_table(
    df: pd.DataFrame, target: str, split: DictConfig | dict, seed: int, task: str
) -> dict[str, pd.DataFrame]:
    """Seeded train/val/test split by `split.strategy`.

    random and stratified (on a classification target) shuffle rows; time puts the oldest
    rows in train and the newest in test; group keeps each group in one split.
    """
    check_split(split, list(df.columns))
    strategy, column = split["strategy"], split.get("column")
    val_size, test_size = split["val_size"], split["test_size"]
    n = len(df)
    if strategy == "time":
        order = np.argsort(df[column].to_numpy(), kind="stable")
        n_test, n_val = round(test_size * n), round(val_size * n)
        idx = np.split(order, [n - n_test - n_val, n - n_test])
    elif strategy == "group":
        groups = df[column].astype(str)
        names = np.random.default_rng(seed).permutation(groups.unique())
        cumulative = groups.value_counts().reindex(names).cumsum().to_numpy() / n
        where = np.where(
            cumulative <= test_size, 2, np.where(cumulative <= test_size + val_size, 1, 0)
        )
        assign = groups.map(dict(zip(names, where, strict=True))).to_numpy()
        idx = [np.flatnonzero(assign == k) for k in range(3)]
    else:
        stratify = strategy == "stratified" and task == "classification"
        try:
            rest, test = train_test_split(
                np.arange(n),
                test_size=test_size,
                random_state=seed,
                stratify=df[target] if stratify else None,
            )
            train, val = train_test_split(
                rest,
                test_size=val_size / (1 - test_size),
                random_state=seed,
                stratify=df[target].iloc[rest] if stratify else None,
            )
        except ValueError as err:
            raise StageError(f"data.split: cannot split {n} rows: {err}") from None
        idx = [train, val, test]
    parts = {name: df.iloc[i].reset_index(drop=True) for name, i in zip(SPLITS, idx, strict=True)}
    for name, part in parts.items():
        if part.empty:
            raise StageError(f"data.split: the {name} split of {n} rows is empty ({strategy})")
    return parts


def build_schema(
    parts: dict[str, pd.DataFrame],
    types: dict[str, str],
    numeric: list[str],
    categorical: list[str],
    target: str,
    task: str,
) -> dict[str, Any]:
    """What later stages and the service know of the data (data/curated/schema.json)."""
    train, whole = parts["train"], pd.concat(parts.values())
    features = []
    for c in [c for c in train.columns if c in numeric or c in categorical]:
        entry = {"name": c, "dtype": str(train[c].dtype), "type": types[c]}
        entry["nullable"] = bool(whole[c].isna().any())
        if c in numeric:
            entry.update(kind="numeric", min=float(train[c].min()), max=float(train[c].max()))
        else:
            entry.update(kind="categorical", categories=sorted(train[c].dropna().unique().tolist()))
        features.append(entry)
    classes = sorted(whole[target].unique().tolist()) if task == "classification" else []
    return {
        "task": task,
        "features": features,
        "target": {"name": target, "dtype": str(train[target].dtype)},
        "classes": classes,
        "columns": types,  # the inferred or declared schema: copy it into data.columns
        "rows": {name: len(part) for name, part in parts.items()},
    }


def prepare(data_cfg: DictConfig, seed: int) -> tuple[dict[str, pd.DataFrame], dict[str, Any]]:
    """Read, type, check and split the source: the splits and their schema."""
    bad_rows = data_cfg.bad_rows
    if bad_rows not in ("fail", "drop"):
        raise StageError(f"data.bad_rows: {bad_rows!r} is not fail | drop")
    from stages.sources import read_source  # fsspec, SQLAlchemy: only ingest needs them

    table = read_source(data_cfg, seed)
    source, df = table.name, table.frame
    log.info("read %s: %d rows x %d columns", source, *df.shape)
    df.columns = [str(c) for c in df.columns]
    declared = OmegaConf.to_container(data_cfg.columns) if data_cfg.columns else None
    df, types, unparsed = apply_types(df, declared, source, bad_rows)
    typed_rows = len(df)
    df = check_target(df, data_cfg.target, source, bad_rows)
    dropped = table.bad_rows + unparsed + typed_rows - len(df)
    if df.empty:
        raise StageError(f"{source}: no data rows left")
    target = data_cfg.target
    task = infer_task(df[target], data_cfg.task, target)
    numeric, categorical = feature_columns(df, data_cfg, types, source)
    keep = kept_columns(numeric, categorical, target, data_cfg.split.column)
    df = curated_columns(df, numeric, categorical, keep)
    duplicates = check_quality(df, numeric + categorical, target, data_cfg.quality, source)
    parts = split_table(df, target, data_cfg.split, seed, task)
    check_unknown_categories(parts, categorical, data_cfg.quality.max_unknown_categories)
    schema = build_schema(parts, types, numeric, categorical, target, task)
    split = {"strategy": data_cfg.split.strategy, "column": data_cfg.split.column}
    schema = {"source": source, **schema, "dropped_rows": dropped, "duplicate_rows": duplicates}
    return parts, {**schema, "split": split}


def ingest(
    data_cfg: DictConfig, seed: int, out_dir: Path = OUT_DIR, address: str | None = None
) -> dict[str, Any]:
    """Read, check and split the source into `out_dir`; returns the schema.

    `data.engine=ray` runs it on Ray Data (`address`: a cluster to join, None for local).
    """
    if data_cfg.get("engine", "pandas") == "ray":
        return ingest_ray(data_cfg, seed, out_dir, address)
    if data_cfg.get("engine", "pandas") != "pandas":
        raise StageError(f"data.engine: {data_cfg.engine!r} is not pandas | ray")
    parts, schema = prepare(data_cfg, seed)
    with atomic_dir(out_dir) as tmp:
        for name, part in parts.items():
            part.to_parquet(tmp / f"{name}.parquet", index=False)
        write_json(tmp / "schema.json", schema)
    log.info(
        "wrote %s: %s rows, %d features, %s%s",
        out_dir,
        "/".join(str(len(p)) for p in parts.values()),
        len(schema["features"]),
        schema["task"],
        f", {schema['dropped_rows']} bad rows dropped" if schema["dropped_rows"] else "",
    )
    return schema


# -- data.engine=ray: one streaming pass over the source on Ray Data --------------------------


def ray_source(data_cfg: DictConfig, seed: int) -> tuple[Any, str, pd.DataFrame]:
    """The source as a Ray dataset of raw blocks, its name and an empty frame of its columns.

    Local CSV files are cut into byte ranges of about BLOCK_BYTES that tasks read in
    parallel (Ray's CSV reader reads a file whole); Parquet and JSON lines go through Ray's
    readers. Other sources, and bad_rows=drop, are read whole (read_source), then handed
    to Ray.
    """
    import glob

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
        read = {"parquet": ray.data.read_parquet, "jsonl": partial(ray.data.read_json, lines=True)}
        if kind in read:
            ds = read[kind](files)
            return ds, path, frame_of(ds.schema().base_schema)
    from stages.sources import read_source

    table = read_source(data_cfg, seed)
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


def read_csv_ranges(items: dict[str, np.ndarray]) -> pa.Table:
    rows = [dict(zip(items, values, strict=True)) for values in zip(*items.values(), strict=True)]
    try:
        return pa.concat_tables([read_csv_range(r) for r in rows])
    except pa.ArrowInvalid as err:
        raise StageError(f"{rows[0]['path']}: cannot read as csv: {err}") from None


def assign_splits(
    df: pd.DataFrame, split: dict[str, Any], seed: int, cuts: tuple[Any, Any] | None
) -> np.ndarray:
    """0/1/2 (train/val/test) per row, from a seeded hash of the row (or of its group), or
    by time against `cuts`: the same row gets the same split in any block."""
    if split["strategy"] == "time":
        t = df[split["column"]].to_numpy()
        return (t > cuts[0]).astype(np.int8) + (t > cuts[1]).astype(np.int8)
    keys = df[[split["column"]]] if split["strategy"] == "group" else df
    h = pd.util.hash_pandas_object(keys, index=False, hash_key=f"{seed:016d}"[:16]).to_numpy()
    u = (h >> np.uint64(11)).astype(np.float64) / float(1 << 53)
    test, val = split["test_size"], split["val_size"]
    return np.where(u < test, 2, np.where(u < test + val, 1, 0)).astype(np.int8)


def process_block(batch: Any, spec: dict[str, Any]) -> pd.DataFrame:
    """Type, check, split and write one block (a pyarrow table); returns its statistics
    (one row of JSON) and the row hashes (for the duplicate count)."""
    import uuid

    df = batch.to_pandas()  # numpy-backed dtypes, as in the pandas path
    df.columns = [str(c) for c in df.columns]
    df, _, unparsed = apply_types(df, spec["declared"], spec["source"], spec["bad_rows"])
    typed = len(df)
    df = check_target(df, spec["target"], spec["source"], spec["bad_rows"])
    df = curated_columns(df, spec["numeric"], spec["categorical"], spec["keep"])
    where = assign_splits(df, spec["split"], spec["seed"], spec["cuts"])
    stats: dict[str, Any] = {"dropped": unparsed + typed - len(df), "rows": {}, "min": {}}
    stats.update(max={}, nulls={c: int(df[c].isna().sum()) for c in spec["features"]})
    stats["categories"] = {}
    name = f"part-{uuid.uuid4().hex}.parquet"
    for k, split in enumerate(SPLITS):
        part = df[where == k]
        stats["rows"][split] = len(part)
        stats["categories"][split] = {
            c: part[c].value_counts().to_dict() for c in spec["categorical"]
        }
        if split == "train":
            present = [c for c in spec["numeric"] if part[c].notna().any()]
            stats["min"] = {c: float(part[c].min()) for c in present}
            stats["max"] = {c: float(part[c].max()) for c in present}
        if len(part):
            folder = Path(spec["out"]) / f"{split}.parquet"
            folder.mkdir(exist_ok=True)
            part.to_parquet(folder / name, index=False)
    y = df[spec["target"]]
    counts = y.value_counts()  # as [value, count] pairs: JSON keeps the values' types
    stats["targets"] = [[v, int(n)] for v, n in counts.items()] if len(counts) <= 1000 else None
    stats["integral"] = bool(pd.api.types.is_numeric_dtype(y) and (y == y.round()).all())
    stats["leaks"] = [c for c in spec["features"] if len(df) and leaks(df[c], y)]
    hashes = pd.util.hash_pandas_object(df, index=False).to_numpy()
    return pd.DataFrame({"stats": [json.dumps(stats, default=str)], "hashes": [hashes]})


def merge_stats(rows: list[dict[str, Any]]) -> dict[str, Any]:
    """The blocks' statistics added up."""
    total: dict[str, Any] = {"dropped": 0, "rows": dict.fromkeys(SPLITS, 0), "min": {}, "max": {}}
    total.update(nulls={}, categories={s: {} for s in SPLITS}, targets={}, integral=True)
    total["leaks"] = None
    for s in rows:
        total["dropped"] += s["dropped"]
        for split in SPLITS:
            total["rows"][split] += s["rows"][split]
            for c, counts in s["categories"][split].items():
                merged = total["categories"][split].setdefault(c, {})
                for value, n in counts.items():
                    merged[value] = merged.get(value, 0) + n
        for c, v in s["min"].items():
            total["min"][c] = min(v, total["min"].get(c, v))
        for c, v in s["max"].items():
            total["max"][c] = max(v, total["max"].get(c, v))
        for c, n in s["nulls"].items():
            total["nulls"][c] = total["nulls"].get(c, 0) + n
        if s["targets"] is None or total["targets"] is None:
            total["targets"] = None
        else:
            for value, n in s["targets"]:
                total["targets"][value] = total["targets"].get(value, 0) + n
        total["integral"] &= s["integral"]
        leaking = set(s["leaks"])
        total["leaks"] = leaking if total["leaks"] is None else total["leaks"] & leaking
    return total


def ingest_ray(
    data_cfg: DictConfig, seed: int, out_dir: Path, address: str | None = None
) -> dict[str, Any]:
    """`ingest` on Ray Data: read, type, check, split and write each block in parallel, in
    one streaming pass; splits are folders of Parquet parts. Stratified splits are random
    here (a seeded hash of each row); a time split reads its column once more for the cuts.
    """
    import ray

    if data_cfg.bad_rows not in ("fail", "drop"):
        raise StageError(f"data.bad_rows: {data_cfg.bad_rows!r} is not fail | drop")
    if ray.is_initialized():
        return ray_pass(data_cfg, seed, out_dir)
    ray.init(address=address, include_dashboard=False, logging_level=logging.ERROR)
    try:
        return ray_pass(data_cfg, seed, out_dir)
    finally:
        ray.shutdown()


def ray_pass(data_cfg: DictConfig, seed: int, out_dir: Path) -> dict[str, Any]:
    """`ingest_ray` on a running Ray."""
    bounded_ray_data()
    ds, source, sample = ray_source(data_cfg, seed)
    sample.columns = [str(c) for c in sample.columns]
    declared = OmegaConf.to_container(data_cfg.columns) if data_cfg.columns else None
    sample, types, _ = apply_types(sample, declared, source, data_cfg.bad_rows)
    check_target(sample, data_cfg.target, source, data_cfg.bad_rows)
    numeric, categorical = feature_columns(sample, data_cfg, types, source)
    split = OmegaConf.to_container(data_cfg.split)
    check_split(split, list(sample.columns))
    cuts = None
    if split["strategy"] == "time":
        t = ds.select_columns([split["column"]]).to_pandas()[split["column"]]
        cuts = tuple(
            t.quantile([1 - split["val_size"] - split["test_size"], 1 - split["test_size"]])
        )
    keep = kept_columns(numeric, categorical, data_cfg.target, split["column"])
    with atomic_dir(out_dir) as tmp:
        spec = {
            "declared": declared,
            "source": source,
            "bad_rows": data_cfg.bad_rows,
            "target": data_cfg.target,
            "numeric": numeric,
            "categorical": categorical,
            "features": numeric + categorical,
            "keep": keep,
            "split": split,
            "seed": seed,
            "cuts": cuts,
            "out": str(tmp.resolve()),
        }
        try:
            blocks = ds.map_batches(
                process_block, fn_kwargs={"spec": spec}, batch_format="pyarrow", batch_size=None
            ).take_all()
        except Exception as err:  # a StageError raised in a block arrives wrapped
            raise stage_error(err) from None
        stats = merge_stats([json.loads(b["stats"]) for b in blocks])
        n = sum(stats["rows"].values())
        if n == 0:
            raise StageError(f"{source}: no data rows left")
        hashes = np.concatenate([b["hashes"] for b in blocks])
        duplicates = n - len(np.unique(hashes))
        quality = data_cfg.quality
        leaking = sorted(stats["leaks"])
        quality_gates(duplicates, n, leaking, data_cfg.target, quality, source)
        for name, rows in stats["rows"].items():
            if rows == 0:
                raise StageError(f"data.split: the {name} split of {n} rows is empty")
        train_categories = stats["categories"]["train"]
        for c in categorical:
            known = train_categories.get(c, {})
            for name in ("val", "test"):
                counts = stats["categories"][name].get(c, {})
                unseen = sum(v for k, v in counts.items() if k not in known)
                rate = unseen / max(sum(counts.values()), 1)
                unknown_gate(name, c, rate, quality.max_unknown_categories)
        target_dtype = sample[data_cfg.target].dtype
        distinct = None if stats["targets"] is None else len(stats["targets"])
        task = decide_task(
            data_cfg.task, target_dtype, stats["integral"], distinct, data_cfg.target
        )
        if task == "classification" and stats["targets"] is None:
            raise StageError(f"target column {data_cfg.target!r}: over 1000 classes (data.task)")
        classes = sorted(stats["targets"]) if task == "classification" else []
        features = []
        for c in numeric + categorical:
            entry = {"name": c, "type": types[c], "nullable": stats["nulls"].get(c, 0) > 0}
            if c in numeric:
                entry.update(
                    dtype="float64",
                    kind="numeric",
                    min=stats["min"].get(c),
                    max=stats["max"].get(c),
                )
            else:
                entry.update(
                    dtype="object",
                    kind="categorical",
                    categories=sorted(train_categories.get(c, {})),
                )
            features.append(entry)
        schema = {
            "source": source,
            "task": task,
            "features": features,
            "target": {"name": data_cfg.target, "dtype": str(target_dtype)},
            "classes": classes,
            "columns": types,
            "rows": stats["rows"],
            "dropped_rows": stats["dropped"],
            "duplicate_rows": duplicates,
            "split": {"strategy": split["strategy"], "column": split["column"]},
            "engine": "ray",
        }
        write_json(tmp / "schema.json", schema)
    log.info(
        "wrote %s with Ray Data: %s rows, %s",
        out_dir,
        "/".join(map(str, stats["rows"].values())),
        task,
    )
    return schema


def stage_error(err: BaseException) -> BaseException:
    """The StageError raised in a Ray task, from the error that reaches the driver (which
    carries the task's traceback as text), or the error itself."""
    prefix = f"{StageError.__module__}.{StageError.__name__}: "
    for line in str(err).splitlines():
        if line.strip().startswith(prefix):
            return StageError(line.strip().removeprefix(prefix))
    return err


def load_split(name: str, data_dir: Path = OUT_DIR) -> pd.DataFrame:
    """One curated split (a Parquet file or folder); a missing one is a StageError naming it."""
    path = Path(data_dir) / f"{name}.parquet"
    if not path.exists():
        raise StageError(f"{path}: not found (run `dvc repro ingest` first)")
    return pd.read_parquet(path)


def main(cfg: DictConfig) -> None:
    ingest(cfg.data, cfg.seed, OUT_DIR, cfg.cluster.address)


if __name__ == "__main__":
    run(main)
