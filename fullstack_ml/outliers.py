"""Outliers: rows unlike the training data.

- `row_outliers`: the profile stage's EDA. A PyOD detector scores every training row; the
  rows over Tukey's far-out fence of those scores are outliers, each listed with the features
  furthest from typical.
- `fit_detector`: the detector the bento ships (`runtime.outliers.Detector`). Candidates in
  input space (Mahalanobis, PyOD's ECOD and IsolationForest) and model space (max softmax,
  energy, PyOD's kNN on the penultimate layer) are fitted on train and measured by AUROC
  between val and shifted copies of val (`shifted`); the best one the runtime can score
  (numpy alone, microseconds a record) ships, its threshold set on val at `target_fpr`.
"""

import time
from collections.abc import Callable, Mapping, Sequence
from typing import Any

import numpy as np
import pandas as pd

from fullstack_ml.runtime.outliers import (
    FLOAT_MAX,
    Detector,
    conformal_rank,
    energy,
    mahalanobis,
    max_softmax,
)

SERVED = ("mahalanobis", "max_softmax", "energy")  # what `runtime.outliers` can score
NOT_SERVED = "measured only: PyOD's scoring needs the training rows and ms per call"
Views = dict[str, np.ndarray]  # "x" encoded records, "logits", "features" (penultimate)


# --- EDA (profile stage) ---------------------------------------------------------------


def feature_matrix(frame: pd.DataFrame, numeric: list[str], categorical: list[str]) -> np.ndarray:
    """Rows as numbers a detector takes: numeric features with gaps filled by the median,
    categorical ones as their value's share of the rows (a rare value is small)."""
    columns = []
    for name in numeric:
        values = pd.to_numeric(frame[name], errors="coerce").to_numpy("float64", na_value=np.nan)
        median = float(np.nan_to_num(np.nanmedian(values))) if len(values) else 0.0
        columns.append(np.where(np.isnan(values), median, values))
    for name in categorical:
        text = frame[name].astype("string").fillna("<missing>")
        share = text.value_counts(normalize=True).to_dict()
        columns.append(text.map(share).astype("float64").fillna(0.0).to_numpy())
    return np.column_stack(columns) if columns else np.zeros((len(frame), 0))


def far_out_fence(scores: np.ndarray, fence: float) -> float:
    """Tukey's fence on the scores: Q3 + fence x IQR (3: "far out")."""
    q1, q3 = np.quantile(scores, [0.25, 0.75])
    return float(q3 + fence * (q3 - q1))


def oddest_features(
    row: np.ndarray, names: list[str], median: np.ndarray, scale: np.ndarray, top: int = 3
) -> list[dict[str, Any]]:
    """The features of `row` furthest from the train median, in robust z-scores
    (|value - median| / scale, scale the IQR / 1.349 or, where it is 0, the std or 1)."""
    z = np.abs(row - median) / scale
    order = np.argsort(-z, kind="stable")[:top]
    return [
        {"feature": names[i], "value": float(row[i]), "median": float(median[i]), "z": float(z[i])}
        for i in order
        if z[i] > 0
    ]


def robust_scale(x: np.ndarray) -> np.ndarray:
    q1, q3 = np.quantile(x, [0.25, 0.75], axis=0)
    scale = (q3 - q1) / 1.349
    std = x.std(axis=0)
    return np.where(scale > 0, scale, np.where(std > 0, std, 1.0))


def row_outliers(
    train: pd.DataFrame,
    numeric: list[str],
    categorical: list[str],
    detector: Any,
    fence: float,
    top: int,
    max_fit_rows: int,
    seed: int = 0,
) -> dict[str, Any]:
    """Score every row of `train` with `detector` (a PyOD detector: fit, decision_function),
    fitted on at most `max_fit_rows` of them (a seeded sample); the rows over the far-out
    fence are outliers. Returns the detector's name, the fence, the count and rate of
    outliers and the `top` rows (row number, score, the features furthest from typical)."""
    x = feature_matrix(train, numeric, categorical)
    names = [*numeric, *categorical]
    if len(x) > max_fit_rows:
        fit = np.random.default_rng(seed).choice(len(x), max_fit_rows, replace=False)
        detector.fit(x[np.sort(fit)])
        scores = np.concatenate(
            [detector.decision_function(x[i : i + 65536]) for i in range(0, len(x), 65536)]
        )
    else:
        detector.fit(x)
        scores = np.asarray(detector.decision_scores_, dtype=np.float64)
    threshold = far_out_fence(scores, fence)
    over = scores > threshold
    median, scale = np.median(x, axis=0), robust_scale(x)
    order = np.argsort(-scores, kind="stable")[:top]
    return {
        "detector": type(detector).__name__,
        "rows": len(x),
        "fence": fence,
        "threshold": threshold,
        "outliers": int(over.sum()),
        "rate": float(over.mean()) if len(x) else 0.0,
        "top": [
            {
                "row": int(i),
                "score": float(scores[i]),
                "outlier": bool(over[i]),
                "features": oddest_features(x[i], names, median, scale),
            }
            for i in order
        ],
    }


# --- the shipped detector (compress stage) --------------------------------------------


def shifted(
    val: pd.DataFrame,
    train: pd.DataFrame,
    numeric: list[str],
    categorical: list[str],
    seed: int = 0,
    images: dict[str, dict[str, Any]] | None = None,
) -> dict[str, pd.DataFrame]:
    """Copies of `val` no longer like train, one per kind of shift a table meets:
    `out_of_range` (one numeric feature per row past train's range by 0.5-2 ranges),
    `swapped` (the numeric columns in another order: a schema mix-up), `noise` (Gaussian
    noise of each feature's train std), `unseen_category` (every categorical feature a value
    train never had); and an image set (`images`: `Schema.images`, the features' values
    curated files): `image_noise` (Gaussian noise of 64 grey levels), `inverted` (negatives),
    `rotated` (a quarter turn; upside down where the image is not square)."""
    rng = np.random.default_rng(seed)
    out: dict[str, pd.DataFrame] = {}
    if images:
        pixels = {c: [decoded(v, image) for v in val[c]] for c, image in images.items()}
        for name, change in (
            ("image_noise", lambda p: p + rng.normal(0, 64, p.shape)),
            ("inverted", lambda p: 255 - p.astype(np.int16)),
            ("rotated", lambda p: np.rot90(p) if p.shape[0] == p.shape[1] else p[::-1]),
        ):
            out[name] = val.assign(
                **{
                    c: [np.clip(change(p), 0, 255).astype(np.uint8) for p in pixels[c]]
                    for c in images
                }
            )
    if numeric:
        x = train[numeric].apply(pd.to_numeric, errors="coerce")
        low, high, std = x.min().to_numpy(), x.max().to_numpy(), x.std().fillna(0).to_numpy()
        span = np.where(high - low > 0, high - low, 1.0)
        values = val[numeric].apply(pd.to_numeric, errors="coerce").to_numpy("float64")
        pushed = values.copy()
        col = rng.integers(0, len(numeric), len(val))
        up = rng.random(len(val)) < 0.5
        far = rng.uniform(0.5, 2.0, len(val)) * span[col]
        pushed[np.arange(len(val)), col] = np.where(up, high[col] + far, low[col] - far)
        out["out_of_range"] = val.assign(**dict(zip(numeric, pushed.T, strict=True)))
        if len(numeric) > 1:
            order = np.roll(np.arange(len(numeric)), 1 + rng.integers(0, len(numeric) - 1))
            swapped = values[:, order]
            out["swapped"] = val.assign(**dict(zip(numeric, swapped.T, strict=True)))
        noisy = values + rng.normal(size=values.shape) * std
        out["noise"] = val.assign(**dict(zip(numeric, noisy.T, strict=True)))
    if categorical:
        out["unseen_category"] = val.assign(**{c: "<unseen>" for c in categorical})
    return out


def decoded(value: Any, image: dict[str, Any]) -> np.ndarray:
    """A curated image (`image`: its `Schema.images` entry) as uint8 (H, W, C)."""
    from fullstack_ml.images import curated_spec, decode

    return decode(bytes(value), curated_spec(image))


def auroc(inliers: np.ndarray, outliers: np.ndarray) -> float:
    """Area under the ROC curve of scores telling `outliers` (positives) from `inliers`."""
    from sklearn.metrics import roc_auc_score

    y = np.r_[np.zeros(len(inliers)), np.ones(len(outliers))]
    return float(roc_auc_score(y, np.r_[inliers, outliers]))


CANDIDATES = ("mahalanobis", "ecod", "iforest", "max_softmax", "energy", "knn_penultimate")
MODEL_SPACE = {"max_softmax", "energy"}  # need a classifier's logits
# Mahalanobis ships a width x width precision matrix (in outliers.json, read by every
# worker): 1024 inputs are 1M numbers, 20 MB of JSON. Wider inputs (a 64x64 RGB image is
# 12,288) are left to the model-space candidates.
MAHALANOBIS_MAX_WIDTH = 1024


def candidates(
    train: Views, task: str, seed: int = 0, names: Sequence[str] = CANDIDATES
) -> dict[str, Callable[[Views], Any]]:
    """The candidate detectors `names` (of `CANDIDATES`) that apply, fitted on `train`:
    name -> scores of a `Views`. Those in `SERVED` return (scores, the Detector's fitted
    fields). PyOD is imported only for its detectors (1.5-2 s here)."""
    if unknown := [n for n in names if n not in CANDIDATES]:
        known = ", ".join(CANDIDATES)
        raise ValueError(f"candidates: unknown {unknown[0]!r} (one of {known})")
    out: dict[str, Callable[[Views], Any]] = {}
    if "mahalanobis" in names and train["x"].shape[1] <= MAHALANOBIS_MAX_WIDTH:
        from sklearn.covariance import LedoitWolf

        cov = LedoitWolf().fit(train["x"])  # shrunk: constant pixels make the sample's singular
        mean, precision = cov.location_, cov.precision_
        fitted = {"mean": mean.tolist(), "precision": precision.tolist()}
        out["mahalanobis"] = lambda v: (mahalanobis(v["x"], mean, precision), fitted)
    if "ecod" in names:
        from pyod.models.ecod import ECOD

        ecod = ECOD().fit(train["x"])
        out["ecod"] = lambda v: ecod.decision_function(v["x"])
    if "iforest" in names:
        from pyod.models.iforest import IForest

        iforest = IForest(random_state=seed).fit(train["x"])
        out["iforest"] = lambda v: iforest.decision_function(v["x"])
    if task == "classification":
        if "max_softmax" in names:
            out["max_softmax"] = lambda v: (max_softmax(v["logits"]), {})
        if "energy" in names:
            out["energy"] = lambda v: (energy(v["logits"]), {})
    if "knn_penultimate" in names and "features" in train:
        from pyod.models.knn import KNN

        knn = KNN(n_neighbors=5).fit(train["features"])
        out["knn_penultimate"] = lambda v: knn.decision_function(v["features"])
    return out


def per_row_us(score: Callable[[Views], Any], one: Views, budget_s: float = 0.02) -> float:
    """Median microseconds to score one record (3 to 50 times, for about `budget_s`)."""
    times: list[float] = []
    while len(times) < 3 or (len(times) < 50 and sum(times) < budget_s):
        start = time.perf_counter()
        score(one)
        times.append(time.perf_counter() - start)
    return float(np.median(times) * 1e6)


def fit_detector(
    train: Views,
    val: Views,
    shifts: Mapping[str, Views],
    task: str,
    target_fpr: float,
    seed: int = 0,
    names: Sequence[str] = CANDIDATES,
) -> tuple[Detector, dict[str, Any]]:
    """Measure every candidate (AUROC of val against each shift, cost per record), ship the
    served kind with the highest mean AUROC (ties: the first in `SERVED`), its threshold the
    conformal order statistic of the val scores at `target_fpr`. Returns the detector and
    the report of every candidate."""
    if not shifts:
        raise ValueError("no shift to measure the candidates on (no feature to shift)")
    report: dict[str, Any] = {}
    fitted: dict[str, dict] = {}
    val_scores: dict[str, np.ndarray] = {}
    one = {k: v[:1] for k, v in val.items()}
    measured = candidates(train, task, seed, names)
    if not any(n in SERVED for n in measured):
        served = [n for n in SERVED if task == "classification" or n not in MODEL_SPACE]
        raise ValueError(f"candidates: none the runtime serves; add one of {', '.join(served)}")
    for name, score in measured.items():

        def scores(views: Views, score=score) -> np.ndarray:
            got = score(views)
            return np.asarray(got[0] if isinstance(got, tuple) else got, dtype=np.float64)

        if name in SERVED:
            fitted[name] = score(train)[1] if name == "mahalanobis" else {}
        val_scores[name] = scores(val)
        per_shift = {s: auroc(val_scores[name], scores(v)) for s, v in shifts.items()}
        report[name] = {
            "auroc": per_shift,
            "mean_auroc": float(np.mean(list(per_shift.values()))),
            "us_per_record": per_row_us(scores, one),
            "served": name in SERVED,
            **({} if name in SERVED else {"why_not_served": NOT_SERVED}),
        }
    served = [n for n in SERVED if n in report]
    best = max(served, key=lambda n: (report[n]["mean_auroc"], -served.index(n)))
    s = np.sort(val_scores[best])
    rank = conformal_rank(len(s), target_fpr)
    threshold = float(s[rank - 1]) if rank <= len(s) else FLOAT_MAX
    # the histogram's buckets: val's median, 90th and 99th percentiles (rounded), the
    # threshold itself (a bucket edge: the outlier share reads off the histogram) and 2-8x it
    buckets = {float(f"{b:.6g}") for b in np.quantile(s, [0.5, 0.9, 0.99])}
    if rank <= len(s):
        buckets |= {threshold * f for f in (1, 2, 4, 8)} if threshold > 0 else {threshold}
    detector = Detector(
        best, threshold, rank, len(s), target_fpr, sorted(buckets), **fitted.get(best, {})
    )
    return detector, {"chosen": best, "candidates": report}
