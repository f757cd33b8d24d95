"""Typing the source's columns: declared or inferred types, features, target and task."""

from typing import Any

import pandas as pd
from omegaconf import DictConfig

from fullstack_ml.stage import StageError

TYPES = ("number", "integer", "string", "boolean", "datetime")
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
    if not bad.any():  # the usual case: no copy (a copy of 1M x 50 took about 1 s here)
        return df, types, 0
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
    are classes, other numbers a regression target (`distinct` None: too many to count).
    A classification target needs two classes at least."""
    if declared is not None:
        if declared not in ("classification", "regression"):
            raise StageError(f"data.task: {declared!r} is not classification | regression")
        if declared == "regression" and not is_number(dtype):
            raise StageError(f"target column {name!r} is {dtype}, not numeric (data.task)")
        task = declared
    elif not is_number(dtype):
        task = "classification"
    else:
        few = distinct is not None and distinct <= MAX_CLASSES
        task = "classification" if integral and few else "regression"
    if task == "classification" and distinct is not None and distinct < 2:
        raise StageError(
            f"target column {name!r} has {distinct} class: a classifier needs two at least"
            " (data.target)"
        )
    return task


def numbers_with_text(values: pd.Series) -> tuple[int, Any] | None:
    """(values that are not numbers, the first of them) of a text column whose distinct
    values are numbers, more than MAX_CLASSES of them (a few number codes stay a category)
    and 90% at least; None for any other column."""
    distinct = pd.unique(values.to_numpy())
    distinct = pd.Series(distinct[~pd.isna(distinct)])
    numbers = int(pd.to_numeric(distinct, errors="coerce").notna().sum())
    if numbers <= MAX_CLASSES or numbers < 0.9 * len(distinct) or numbers == len(distinct):
        return None
    bad = values.notna() & pd.to_numeric(values, errors="coerce").isna()
    return int(bad.sum()), values[bad].iloc[0]


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
        declared = set(cfg.columns or {})
        for c in categorical:
            if types[c] == "string" and c not in declared and (bad := numbers_with_text(df[c])):
                raise StageError(
                    f"{source}: column {c!r} holds numbers but {bad[0]} values are not (first:"
                    f" {bad[1]!r}): declare it in data.columns as number (data.bad_rows=drop"
                    " drops those rows) or as string to keep it a category"
                )
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
    """`keep` of `df`, numeric features as float64 and categorical ones as strings.

    Columns already so are left as they are, and so is `df` when it holds just `keep`:
    each column replaced splits pandas' blocks, which the split's `take` then merges
    again, and a selection copies every column (together 3 s of a 20 s ingest of 1M rows
    x 51 columns here)."""
    for c in numeric:
        if df[c].dtype != "float64":
            df[c] = df[c].astype("float64")
    for c in categorical:
        if pd.api.types.infer_dtype(df[c], skipna=True) not in ("string", "empty"):
            df[c] = cast(df[c], "string")
    return df if list(df.columns) == keep else df[keep]


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
    return df[~missing].reset_index(drop=True) if missing.any() else df
