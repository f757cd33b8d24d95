"""The outlier detector the bento ships: a score per record, from the encoded record or the
model's logits, and the threshold set on the val split (`fullstack_ml.outliers` fits and
chooses it; the compress stage writes it beside the model as `outliers.json`).

numpy only: the service, the predict stage and the validate stage score with it.
"""

import json
import math
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

DETECTOR_FILE = "outliers.json"
FLOAT_MAX = float(np.finfo(np.float64).max)


def mahalanobis(x: np.ndarray, mean: np.ndarray, precision: np.ndarray) -> np.ndarray:
    """Distance of each row of `x` from `mean` under the precision matrix (inverse covariance)."""
    d = x - mean  # a matrix product, then a row sum: 10x the speed of one einsum at batch 28
    return np.sqrt(np.maximum(((d @ precision) * d).sum(1), 0.0))


def max_softmax(logits: np.ndarray) -> np.ndarray:
    """1 - the top class's probability (higher: less sure)."""
    z = logits - logits.max(1, keepdims=True)
    e = np.exp(z)
    return 1.0 - 1.0 / e.sum(1)


def energy(logits: np.ndarray) -> np.ndarray:
    """The energy score, -logsumexp(logits) (higher: less like training data)."""
    top = logits.max(1)
    return -(top + np.log(np.exp(logits - top[:, None]).sum(1)))


@dataclass
class Detector:
    """`kind`: mahalanobis (the encoded record), max_softmax or energy (the logits). A record
    scoring over `threshold` is an outlier. `rank` of `val_rows`: the threshold is the
    `rank`-th smallest val score (what the validate stage's gate reasons from)."""

    kind: str
    threshold: float
    rank: int
    val_rows: int
    target_fpr: float
    buckets: list[float]  # of the Prometheus histogram of scores
    mean: list[float] = field(default_factory=list)
    precision: list[list[float]] = field(default_factory=list)

    def __post_init__(self) -> None:
        self._mean = np.asarray(self.mean, dtype=np.float64)
        self._precision = np.asarray(self.precision, dtype=np.float64)

    def score(self, x: np.ndarray, logits: np.ndarray) -> np.ndarray:
        """Float64 scores of encoded records `x` whose model outputs are `logits` (finite:
        an overflow is the largest float, an outlier, never a NaN in a JSON answer)."""
        with np.errstate(over="ignore", invalid="ignore"):
            got = self._score(x, logits)
        return np.nan_to_num(got, nan=FLOAT_MAX, posinf=FLOAT_MAX, neginf=-FLOAT_MAX)

    def _score(self, x: np.ndarray, logits: np.ndarray) -> np.ndarray:
        if self.kind == "mahalanobis":
            return mahalanobis(x.astype(np.float64), self._mean, self._precision)
        if self.kind == "max_softmax":
            return max_softmax(logits.astype(np.float64))
        if self.kind == "energy":
            return energy(logits.astype(np.float64))
        raise ValueError(f"{DETECTOR_FILE}: unknown detector kind {self.kind!r}")

    def flags(self, scores: np.ndarray) -> np.ndarray:
        return scores > self.threshold

    def to_dict(self) -> dict[str, Any]:
        return {k: v for k, v in asdict(self).items() if not k.startswith("_")}


def load_detector(model_dir: Path) -> Detector:
    """The detector saved with the model; a clear error when the model has none (a model
    compressed before outlier detection existed: run the compress stage again)."""
    path = Path(model_dir) / DETECTOR_FILE
    if not path.is_file():
        raise FileNotFoundError(f"{path}: no outlier detector (rerun `dvc repro compress`)")
    return Detector(**json.loads(path.read_text()))


def conformal_rank(n: int, target_fpr: float) -> int:
    """The order statistic of `n` val scores that flags at most `target_fpr` of new rows
    from the same distribution, in expectation: ceil((n + 1)(1 - target_fpr)) (conformal
    prediction's quantile); n + 1 (nothing flagged) when there are too few rows."""
    return min(math.ceil((n + 1) * (1 - target_fpr)), n + 1)
