"""whylogs profiles and drift scores, shared by the profile stage and the service.

Only whylogs and pandas: it ships in the bento, where the service's drift helper process
imports it (`drift_pool`).
"""

import logging
import math
from collections.abc import Iterable
from datetime import UTC, datetime
from functools import cache
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd

from fullstack_ml.runtime import whylogs_compat  # noqa: F401  before whylogs: it patches it

# isort: split
from whylogs.core import DatasetProfile, DatasetProfileView
from whylogs.core.metrics.metrics import MetricConfig
from whylogs.core.schema import DatasetSchema

logging.getLogger("whylogs").setLevel(logging.WARNING)  # INFO logs a line per column read
# Large enough to keep the numeric sketches exact on moderate splits, so drift is reproducible.
KLL_K = 4096
EPOCH = datetime(1970, 1, 1, tzinfo=UTC)


def new_profile() -> DatasetProfile:
    """An empty whylogs profile with this project's schema: `.track(pandas=...)` each part
    of a table in turn, then `reproducible(profile.view())`."""
    return DatasetProfile(schema=DatasetSchema(default_configs=MetricConfig(kll_k_large=KLL_K)))


def profile_frame(df: pd.DataFrame) -> DatasetProfileView:
    """The whylogs profile of an in-memory frame (profiles of parts merge with `.merge`)."""
    profile = new_profile()
    profile.track(pandas=df)
    return reproducible(profile.view())


def reproducible(view: DatasetProfileView) -> DatasetProfileView:
    """`view` without what whylogs stamps on each profile (creation and dataset times, a
    random trace id in its metadata): the same rows give the same bytes."""
    return DatasetProfileView(
        columns=view.get_columns(),
        dataset_timestamp=EPOCH,
        creation_timestamp=EPOCH,
        metrics=view._metrics,  # noqa: SLF001  no public accessor; dataset-level metrics
        metadata={"whylogs.version": view._metadata.get("whylogs.version", "")},  # noqa: SLF001
    )


def load_profile(path: Path) -> DatasetProfileView:
    """A profile saved as `.bin` (read-only files, such as DVC cache links, work too)."""
    return DatasetProfileView.deserialize(Path(path).read_bytes())


def drift_scores(
    view: DatasetProfileView,
    reference: DatasetProfileView,
    target: str | None = None,
    categorical: Iterable[str] = (),
) -> dict[str, Any]:
    """Per-column drift of `view` against `reference`: Chi-square on the frequent items for
    `target` and the `categorical` columns, KS for the other columns (Chi-square for string
    columns, which have no numeric distribution); each with p-value, statistic and category
    (NO_DRIFT, POSSIBLE_DRIFT, DRIFT, from the p-value adjusted for the columns scored
    together: `holm`). A column that cannot be scored (no values on one side, say) scores
    None. Columns of `reference` missing from `view` are left out."""
    # imported here, not with the module: it imports scipy.stats and whylogs.viz (1 s here),
    # which the package and report stages and the serving worker, which only read profiles,
    # do not need
    from whylogs.viz.drift.column_drift_algorithms import KS, ChiSquare

    chi_square = {*categorical, *([target] if target else [])}
    scores: dict[str, Any] = {}
    for name, column in view.get_columns().items():
        ref = reference.get_column(name)
        if ref is None:
            continue
        algorithms = [ChiSquare()] if name in chi_square else [KS(), ChiSquare()]
        score = None
        for algorithm in algorithms:
            try:
                score = algorithm.calculate(column, ref, with_thresholds=True)
            except (ArithmeticError, ValueError, TypeError):  # degenerate sketches
                score = None
            if score is not None:
                break
        scores[name] = json_safe(score.to_dict()) if score is not None else None
        if scores[name] is not None and scores[name].get("pvalue") is None:
            scores[name] = None
    return holm(scores)


def holm(scores: dict[str, Any]) -> dict[str, Any]:
    """`scores` with Holm-adjusted p-values (`pvalue_adjusted`) over the columns scored
    together, and each `drift_category` set from them by whylogs' thresholds (DRIFT below
    0.05, POSSIBLE_DRIFT below 0.15): one test per column at 0.05 would call 3 of 64
    unchanged columns drifted; Holm keeps the chance of any false call at 5%."""
    names = [n for n, s in scores.items() if s is not None]
    p = np.array([scores[n]["pvalue"] for n in names], dtype=float)
    order = np.argsort(p, kind="stable")
    m = len(p)
    adjusted = np.empty(m)
    adjusted[order] = np.minimum(1, np.maximum.accumulate((m - np.arange(m)) * p[order]))
    for name, value in zip(names, adjusted.tolist(), strict=True):
        category = "DRIFT" if value < 0.05 else "POSSIBLE_DRIFT" if value < 0.15 else "NO_DRIFT"
        scores[name] = {**scores[name], "pvalue_adjusted": value, "drift_category": category}
    return scores


def json_safe(value: Any) -> Any:
    """`value` as plain JSON: numpy scalars as Python numbers, NaN and infinities as None."""
    if isinstance(value, dict):
        return {k: json_safe(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [json_safe(v) for v in value]
    if isinstance(value, (float, np.floating)):
        return float(value) if math.isfinite(value) else None
    if isinstance(value, np.integer):
        return int(value)
    return value


@cache
def cached_profile(path: str) -> DatasetProfileView:
    return load_profile(Path(path))


def window_drift(rows: np.ndarray, columns: list[str], reference: str) -> dict[str, Any]:
    """Drift scores of `rows` (named `columns`) against the profile in the file `reference`;
    the service calls it in a helper process (`drift_pool`)."""
    view = profile_frame(pd.DataFrame(rows, columns=columns))
    return drift_scores(view, cached_profile(reference))
