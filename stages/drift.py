"""whylogs profiles and drift scores, shared by the profile stage and the service.

Only whylogs and pandas: the service imports this module inside the bento.
"""

import json
import logging
import os
from functools import cache
from pathlib import Path
from typing import Any

os.environ.setdefault("WHYLOGS_NO_ANALYTICS", "1")  # before the first whylogs import

import numpy as np  # noqa: E402
import pandas as pd  # noqa: E402
import whylogs as why  # noqa: E402
from whylogs.core import DatasetProfileView  # noqa: E402
from whylogs.core.metrics.metrics import MetricConfig  # noqa: E402
from whylogs.core.schema import DatasetSchema  # noqa: E402
from whylogs.viz.drift.column_drift_algorithms import ChiSquare, calculate_drift_scores  # noqa: E402

logging.getLogger("whylogs").setLevel(logging.WARNING)  # INFO logs a line per column read
# Large enough to keep the numeric sketches exact on moderate splits, so drift is reproducible.
KLL_K = 4096
CATEGORIES = ("NO_DRIFT", "POSSIBLE_DRIFT", "DRIFT")  # drift_category, in order of severity


def profile_frame(df: pd.DataFrame) -> DatasetProfileView:
    schema = DatasetSchema(default_configs=MetricConfig(kll_k_large=KLL_K))
    return why.log(pandas=df, schema=schema).view()


def load_profile(path: Path) -> DatasetProfileView:
    """A profile saved as `.bin` (read-only files, such as DVC cache links, work too)."""
    return DatasetProfileView.deserialize(Path(path).read_bytes())


def drift_scores(
    view: DatasetProfileView, reference: DatasetProfileView, target: str | None = None
) -> dict[str, Any]:
    """Per-column drift of `view` against `reference`: KS for numeric columns, Chi-square for
    the target; each with p-value, statistic and category (NO_DRIFT, POSSIBLE_DRIFT, DRIFT).
    Columns of `reference` missing from `view` are left out."""
    scores = calculate_drift_scores(
        target_view=view,
        reference_view=reference,
        drift_map={target: ChiSquare()} if target else None,
        with_thresholds=True,
    )
    present = set(view.get_columns())
    return {c: s for c, s in json.loads(json.dumps(scores, default=float)).items() if c in present}


@cache
def cached_profile(path: str) -> DatasetProfileView:
    return load_profile(Path(path))


def window_drift(rows: np.ndarray, columns: list[str], reference: str) -> dict[str, Any]:
    """Drift scores of `rows` (named `columns`) against the profile in the file `reference`;
    the service calls it in a helper process."""
    view = profile_frame(pd.DataFrame(rows, columns=columns))
    return drift_scores(view, cached_profile(reference))


def drifted(scores: dict[str, Any]) -> list[str]:
    return sorted(c for c, s in scores.items() if s and s["drift_category"] == "DRIFT")
