"""The preprocessing fitted on the train split and saved with the model: raw feature values
(numbers with gaps, category strings) to the float32 matrix the network takes.

Numeric features: missing values imputed with the train median, then standardised.
Categorical features: one-hot over the train vocabulary (the most frequent
`max_categories` values), with slot 0 for unknown or missing values.
Depends on numpy and pandas alone: the BentoML service applies it too. pandas is imported
where categories are encoded (and where fitting), so that a model of numbers alone serves
without it (0.5 s of the `bentoml serve` supervisor's and each worker's start).
"""

from collections.abc import Mapping, Sequence
from dataclasses import asdict, dataclass, field
from typing import TYPE_CHECKING, Any

import numpy as np

if TYPE_CHECKING:
    import pandas as pd


@dataclass
class Preprocessor:
    numeric: list[str]
    categorical: list[str]
    median: list[float] = field(default_factory=list)
    mean: list[float] = field(default_factory=list)
    std: list[float] = field(default_factory=list)
    vocab: dict[str, list[str]] = field(default_factory=dict)
    target_mean: float = 0.0  # regression targets are standardised for training
    target_std: float = 1.0

    @property
    def width(self) -> int:
        """Columns of the encoded matrix."""
        return len(self.numeric) + sum(len(self.vocab[c]) + 1 for c in self.categorical)

    def encode(self, columns: "Mapping[str, Sequence[Any] | pd.Series]") -> np.ndarray:
        """Encode raw feature columns (feature -> values; None/NaN is missing) to float32."""
        rows = len(columns[(self.numeric or self.categorical)[0]])
        out = np.zeros((rows, self.width), dtype=np.float32)
        if self.numeric:  # in place: the same values as (where(nan, median, x) - mean) / std
            x = np.stack([as_float(columns[c]) for c in self.numeric], axis=1)
            np.copyto(x, np.asarray(self.median), where=np.isnan(x))
            x -= np.asarray(self.mean)
            x /= np.asarray(self.std)
            out[:, : len(self.numeric)] = x
        offset = len(self.numeric)
        if self.categorical:
            import pandas as pd
        for name in self.categorical:
            codes = pd.Categorical(columns[name], categories=self.vocab[name]).codes + 1
            out[np.arange(rows), offset + codes] = 1.0
            offset += len(self.vocab[name]) + 1
        return out

    def limits(self) -> list[tuple[float, float]]:
        """Per numeric feature, the least and greatest value the network's float32 input can
        hold both as sent and standardised (`(x - mean) / std`): 1e39, or 1e38 over a std of
        0.1, would reach it as infinity. The service refuses values outside, as 400s."""
        top = float(np.finfo(np.float32).max)
        return [
            (max(-top, mean - top * std), min(top, mean + top * std))
            for mean, std in zip(self.mean, self.std, strict=True)
        ]

    def encode_frame(self, df: "pd.DataFrame") -> np.ndarray:
        return self.encode({c: df[c] for c in (*self.numeric, *self.categorical)})

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> "Preprocessor":
        return cls(**data)


def as_float(values: "Sequence[Any] | pd.Series") -> np.ndarray:
    """Values as float64 with NaN for missing (None, pandas NA)."""
    if hasattr(values, "to_numpy"):  # a pandas Series (or Index)
        return values.to_numpy(dtype="float64", na_value=np.nan)
    return np.asarray(values, dtype="float64")  # an array of float64 as it is


def fit_preprocessor(
    train: "pd.DataFrame",
    numeric: list[str],
    categorical: list[str],
    max_categories: int = 50,
    target: "pd.Series | None" = None,
) -> Preprocessor:
    """Fit on the train split only; `target` (a regression target) is standardised too."""
    pre = Preprocessor(list(numeric), list(categorical))
    if numeric:
        x = np.stack([as_float(train[c]) for c in numeric], axis=1)
        median = np.nanmedian(x, axis=0) if len(x) else np.zeros(len(numeric))
        median = np.nan_to_num(median)  # a column with no values at all imputes 0
        x = np.where(np.isnan(x), median, x)
        std = x.std(axis=0)
        std[std < 1e-8] = 1.0
        pre.median, pre.mean, pre.std = median.tolist(), x.mean(axis=0).tolist(), std.tolist()
    for name in categorical:
        counts = train[name].dropna().astype(str).value_counts(sort=False)
        top = counts.sort_index().sort_values(ascending=False, kind="stable")[:max_categories]
        pre.vocab[name] = sorted(top.index.tolist())
    if target is not None:
        y = target.to_numpy(dtype="float64")
        pre.target_mean, pre.target_std = float(y.mean()), float(y.std()) or 1.0
    return pre
