"""The preprocessing fitted on the train split and saved with the model: raw feature values
(numbers with gaps, category strings) to the float32 matrix the network takes.

Numeric features: missing values imputed with the train median, then standardised.
Categorical features: one-hot over the train vocabulary (the most frequent
`max_categories` values), with slot 0 for unknown or missing values.
Image features (the encoded file's bytes, or pixels already decoded by `runtime.images`):
decoded to the schema's size and mode, scaled to 0-1, normalised by the train split's
per-channel mean and std (from `schema.json`), laid out channels first (C, H, W) and
flattened, after the other features: a ConvNet reshapes them (`image_shape`).
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

    from fullstack_ml.runtime.images import ImageSpec


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
    images: dict[str, dict[str, Any]] = field(default_factory=dict)  # `Schema.images`

    @property
    def width(self) -> int:
        """Columns of the encoded matrix."""
        return (
            len(self.numeric)
            + sum(len(self.vocab[c]) + 1 for c in self.categorical)
            + sum(int(np.prod(image_shape(i))) for i in self.images.values())
        )

    @property
    def image_shape(self) -> tuple[int, int, int] | None:
        """(channels, height, width) of the one image feature; None without one."""
        shapes = [image_shape(i) for i in self.images.values()]
        return shapes[0] if len(shapes) == 1 else None

    def encode(self, columns: "Mapping[str, Sequence[Any] | pd.Series]") -> np.ndarray:
        """Encode raw feature columns (feature -> values; None/NaN is missing) to float32."""
        rows = len(columns[(self.numeric or self.categorical or list(self.images))[0]])
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
        for name, image in self.images.items():
            size = int(np.prod(image_shape(image)))
            out[:, offset : offset + size] = self.encode_images(name, columns[name])
            offset += size
        return out

    def encode_images(self, name: str, values: "Sequence[Any] | pd.Series") -> np.ndarray:
        """Images (encoded bytes or decoded uint8 pixels) of feature `name` as normalised
        float32 rows of C x H x W values.

        Raises:
            BadImage: a value that is no usable image, saying why.
        """
        from fullstack_ml.runtime.images import decode  # Pillow: only where images are

        image = self.images[name]
        spec = image_spec(image)
        pixels = np.stack(
            [v if isinstance(v, np.ndarray) else decode(bytes(v), spec) for v in values]
        )
        x = pixels.astype(np.float32) * np.float32(1 / 255)
        x -= np.asarray(image["mean"], dtype=np.float32)
        x /= np.asarray(image["std"], dtype=np.float32)
        return x.transpose(0, 3, 1, 2).reshape(len(x), -1)

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
        return self.encode({c: df[c] for c in (*self.numeric, *self.categorical, *self.images)})

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


def image_shape(image: Mapping[str, Any]) -> tuple[int, int, int]:
    """(channels, height, width) of an image feature (`Schema.images`' entry)."""
    width, height = image["size"]
    return int(image["channels"]), int(height), int(width)


def image_spec(image: Mapping[str, Any]) -> "ImageSpec":
    """The decoding of an image feature (`Schema.images`' entry)."""
    from fullstack_ml.runtime.images import ImageSpec

    # min_size 1: curated images are already at the size; a service request is checked by
    # the service's own spec
    return ImageSpec(
        size=tuple(image["size"]), mode=image["mode"], resize=image["resize"], min_size=1
    )


def fit_preprocessor(
    train: "pd.DataFrame",
    numeric: list[str],
    categorical: list[str],
    max_categories: int = 50,
    target: "pd.Series | None" = None,
    images: Mapping[str, Mapping[str, Any]] | None = None,
) -> Preprocessor:
    """Fit on the train split only; `target` (a regression target) is standardised too.
    `images`: image features' `Schema.images` entries (their statistics come from ingest)."""
    pre = Preprocessor(list(numeric), list(categorical))
    pre.images = {name: dict(image) for name, image in (images or {}).items()}
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
