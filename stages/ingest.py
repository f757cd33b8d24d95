"""ingest: read the configured source, check it, write typed train/val/test splits.

Writes `data/curated/{train,val,test}.parquet` and `data/curated/schema.json`.
"""

import logging
from pathlib import Path
from typing import Any

import pandas as pd
from omegaconf import DictConfig
from sklearn.model_selection import train_test_split

from stages.common import StageError, atomic_dir, run, write_json

log = logging.getLogger("stages.ingest")
OUT_DIR = Path("data/curated")
SPLITS = ("train", "val", "test")


def load_digits_frame() -> pd.DataFrame:
    """The handwritten digits bundled with scikit-learn (no network needed)."""
    from sklearn.datasets import load_digits

    return load_digits(as_frame=True).frame


def read_table(path: Path, fmt: str = "auto") -> pd.DataFrame:
    """A CSV or Parquet file as a DataFrame; any read problem is a StageError naming the file."""
    path = Path(path)
    if fmt == "auto":
        fmt = {".csv": "csv", ".parquet": "parquet", ".pq": "parquet"}.get(path.suffix.lower(), "")
    if fmt not in ("csv", "parquet"):
        raise StageError(f"{path}: unknown format {fmt!r}; set data.format to csv or parquet")
    if not path.is_file():
        raise StageError(f"{path}: file not found (data.path)")
    try:
        df = pd.read_csv(path) if fmt == "csv" else pd.read_parquet(path)
    except Exception as err:  # pandas/pyarrow raise many types; all mean "unreadable"
        msg = str(err).splitlines()[0] if str(err) else type(err).__name__
        raise StageError(f"{path}: cannot read as {fmt}: {msg}") from None
    if df.empty:
        raise StageError(f"{path}: no data rows")
    return df


def load_source(data_cfg: DictConfig) -> pd.DataFrame:
    """The raw table named by `data.source`."""
    if data_cfg.source == "digits":
        return load_digits_frame()
    if data_cfg.source == "file":
        return read_table(Path(data_cfg.path), data_cfg.get("format", "auto"))
    raise StageError(f"data.source: unknown source {data_cfg.source!r} (digits | file)")


def check_table(df: pd.DataFrame, target: str, source: str) -> None:
    """Raise StageError when the target is missing or features are not numeric."""
    if target not in df.columns:
        raise StageError(f"{source}: target column {target!r} not found (data.target)")
    if df[target].isna().any():
        n = int(df[target].isna().sum())
        raise StageError(f"{source}: target column {target!r} has {n} missing values")
    features = [c for c in df.columns if c != target]
    if not features:
        raise StageError(f"{source}: no feature columns besides the target {target!r}")
    for col in features:
        if not pd.api.types.is_numeric_dtype(df[col]) or pd.api.types.is_bool_dtype(df[col]):
            raise StageError(f"{source}: feature column {col!r} is {df[col].dtype}, not numeric")


def split_table(
    df: pd.DataFrame, target: str, val_size: float, test_size: float, stratify: bool, seed: int
) -> dict[str, pd.DataFrame]:
    """Seeded train/val/test split; stratified on the target when asked."""
    if not (0 < val_size < 1 and 0 < test_size < 1 and val_size + test_size < 1):
        raise StageError(
            f"data.split: val_size={val_size} and test_size={test_size} must be in (0, 1) "
            "and sum to less than 1"
        )
    try:
        rest, test = train_test_split(
            df, test_size=test_size, random_state=seed, stratify=df[target] if stratify else None
        )
        train, val = train_test_split(
            rest,
            test_size=val_size / (1 - test_size),
            random_state=seed,
            stratify=rest[target] if stratify else None,
        )
    except ValueError as err:
        raise StageError(f"data.split: cannot split {len(df)} rows: {err}") from None
    return {
        name: part.reset_index(drop=True)
        for name, part in zip(SPLITS, (train, val, test), strict=True)
    }


def build_schema(df: pd.DataFrame, target: str, source: str) -> dict[str, Any]:
    """Feature names and dtypes, target name and dtype, and the sorted class labels."""
    classes = sorted(df[target].unique().tolist())
    return {
        "source": source,
        "features": [{"name": c, "dtype": str(df[c].dtype)} for c in df.columns if c != target],
        "target": {"name": target, "dtype": str(df[target].dtype)},
        "classes": classes,
    }


def ingest(data_cfg: DictConfig, seed: int, out_dir: Path = OUT_DIR) -> dict[str, Any]:
    """Read, check and split the source into `out_dir`; returns the schema."""
    source = "digits (scikit-learn)" if data_cfg.source == "digits" else str(data_cfg.get("path"))
    log.info("reading %s", source)
    df = load_source(data_cfg)
    target = data_cfg.target
    check_table(df, target, source)
    df.columns = [str(c) for c in df.columns]
    log.info("read %d rows x %d columns", len(df), df.shape[1])
    split = data_cfg.split
    parts = split_table(df, target, split.val_size, split.test_size, split.stratify, seed)
    schema = build_schema(df, target, source)
    schema["rows"] = {name: len(part) for name, part in parts.items()}
    with atomic_dir(out_dir) as tmp:
        for name, part in parts.items():
            part.to_parquet(tmp / f"{name}.parquet", index=False)
        write_json(tmp / "schema.json", schema)
    log.info(
        "wrote %s: %s rows, %d features, %d classes",
        out_dir,
        "/".join(str(len(p)) for p in parts.values()),
        len(schema["features"]),
        len(schema["classes"]),
    )
    return schema


def load_split(name: str, data_dir: Path = OUT_DIR) -> pd.DataFrame:
    """One curated split; a missing file is a StageError naming it."""
    path = Path(data_dir) / f"{name}.parquet"
    if not path.is_file():
        raise StageError(f"{path}: not found (run `dvc repro ingest` first)")
    return pd.read_parquet(path)


def main(cfg: DictConfig) -> None:
    ingest(cfg.data, cfg.seed)


if __name__ == "__main__":
    run(main)
