"""Reading `data/curated`, what ingest wrote, for every stage that consumes it."""

from pathlib import Path

import pandas as pd

from fullstack_ml.paths import DATA_DIR, split_file
from fullstack_ml.schema import Schema, parse_schema
from fullstack_ml.stage import StageError, read_json


def split_path(name: str, data_dir: Path = DATA_DIR) -> Path:
    """A curated split's path (a Parquet file, or a folder of part files); a missing one is
    a StageError naming it."""
    path = split_file(name, data_dir)
    if not path.exists():
        raise StageError(f"{path}: not found (run `dvc repro ingest` first)")
    return path


def load_split(name: str, data_dir: Path = DATA_DIR) -> pd.DataFrame:
    """One curated split, read whole."""
    return pd.read_parquet(split_path(name, data_dir))


def read_schema(data_dir: Path = DATA_DIR) -> Schema:
    """`schema.json` of `data_dir`, parsed."""
    path = Path(data_dir) / "schema.json"
    return parse_schema(read_json(path), str(path))


def read_splits(
    data_dir: Path, fit_rows: int
) -> tuple[dict[str, pd.DataFrame | Path], pd.DataFrame]:
    """The train and val splits (frames, or the folders Ray Data streams) and the train rows
    a preprocessing is fitted on (all of a frame, the first `fit_rows` of a folder)."""
    import pyarrow.dataset

    splits: dict[str, pd.DataFrame | Path] = {}
    for name in ("train", "val"):
        path = split_path(name, data_dir)
        splits[name] = path if path.is_dir() else pd.read_parquet(path)
    train = splits["train"]
    if isinstance(train, Path):
        return splits, pyarrow.dataset.dataset(train).head(fit_rows).to_pandas()
    return splits, train
