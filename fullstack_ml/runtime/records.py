"""The service's request and response types (pydantic): a record of the model's features,
as the preprocessing fitted with the model bounds them, and the predictions; `Answers`
makes the second of the first."""

import base64
import binascii
from collections import Counter
from collections.abc import Callable
from dataclasses import replace
from operator import attrgetter
from typing import Annotated, Any

import numpy as np
from pydantic import AfterValidator, BaseModel, BeforeValidator, ConfigDict, Field, create_model
from pydantic_core import PydanticCustomError

from fullstack_ml.runtime.engine import softmax
from fullstack_ml.runtime.images import BadImage, ImageSpec, decode, image_stats, stat_columns
from fullstack_ml.runtime.outliers import Detector
from fullstack_ml.runtime.preprocess import Preprocessor, image_spec


# Numeric features: a JSON number or null (missing: imputed as in training) that the model's
# float32 input can hold (`Preprocessor.limits`); strings, booleans, NaN, infinities and
# numbers out of that range are 400s naming the field. Categorical features: a string or null
# (a value unseen in training counts as unknown). Every feature is required.
def number(low: float, high: float) -> Any:
    """A finite JSON number from `low` to `high` (no string, no boolean)."""
    return Annotated[float, Field(strict=True, allow_inf_nan=False, ge=low, le=high)]


Category = Annotated[str, Field(strict=True)]


# Image features: the encoded file (PNG, JPEG, WebP, ...) as base64 text, decoded and checked
# while the request is validated (`runtime.images`: the header's pixel count against
# `serve.max_pixels` before any decoding), so a bad image is a 400 naming its record and field.
def image(spec: ImageSpec) -> Any:
    """A base64 image that validates to its decoded uint8 pixels (H, W, C) by `spec`."""

    def decoded(text: str) -> np.ndarray:
        try:
            data = base64.b64decode(text, validate=True)
        except (binascii.Error, ValueError):
            raise PydanticCustomError("image_not_base64", "not base64 text") from None
        try:
            return decode(data, spec)
        except BadImage as err:
            kind = "image_too_large" if "max_pixels" in str(err) else "image_invalid"
            raise PydanticCustomError(kind, str(err).replace("data.image.", "serve.")) from None

    schema = {"contentEncoding": "base64", "contentMediaType": "image/*"}
    return Annotated[str, Field(strict=True, json_schema_extra=schema), AfterValidator(decoded)]


# Each feature is a field named f0, f1, ... with the feature's name as its alias: a record,
# its spec and its errors use the real names, and any column name works, `sepal.length`
# (an attribute path to attrgetter), `_id` (private in pydantic) or `model_config` alike.
def field_names(features: list[str]) -> dict[str, str]:
    """Feature name -> the record's field name."""
    return {name: f"f{i}" for i, name in enumerate(features)}


def record_model(
    pre: Preprocessor, features: list[str], max_pixels: int = 50_000_000
) -> type[BaseModel]:
    """`Record`: one value per feature of `features`, each required, no other key; an image
    feature's header may give at most `max_pixels` (`serve.max_pixels`)."""
    fields = field_names(features)
    return create_model(
        "Record",
        __config__=ConfigDict(extra="forbid"),
        **{
            fields[name]: (number(low, high) | None, Field(alias=name))
            for name, (low, high) in zip(pre.numeric, pre.limits(), strict=True)
        },
        **{fields[name]: (Category | None, Field(alias=name)) for name in pre.categorical},
        **{
            fields[name]: (
                image(replace(image_spec(entry), max_pixels=max_pixels, min_size=1)),
                Field(alias=name),
            )
            for name, entry in pre.images.items()
        },
    )


def feature_getter(features: list[str]) -> Callable[[Any], tuple[Any, ...]]:
    """A record's values in the order of `features` (a tuple, for one feature too)."""
    names = list(field_names(features).values())
    return attrgetter(*names) if len(names) > 1 else lambda r: (r.f0,)


def one_or_many(value: Any) -> Any:
    """A single record (a JSON object) is a list of one."""
    return [value] if isinstance(value, dict) else value


def predict_request(
    record: type[BaseModel], max_records: int, observe: Callable[[int], object]
) -> type[BaseModel]:
    """`PredictRequest`: its `records`, one `record` or a list of 1 to `max_records`;
    `observe` gets the number of records of each valid request."""

    def observe_records(records: list[Any]) -> list[Any]:
        observe(len(records))
        return records

    class PredictRequest(BaseModel):
        """`records`: one record, or a list of 1 to `serve.max_records` records."""

        model_config = ConfigDict(extra="forbid")
        records: Annotated[
            list[record],  # type: ignore[valid-type]
            # The schema says a list (BentoML's clients cannot encode a union); an object passes.
            BeforeValidator(one_or_many),
            Field(
                min_length=1,
                max_length=max_records,
                description="A list of records, or one record (an object): feature -> number",
            ),
            AfterValidator(observe_records),
        ]

    return PredictRequest


class Outlier(BaseModel):
    outlier: bool  # the record is unlike the training data (its score is over the threshold)
    outlier_score: float  # the shipped detector's score (`runtime.outliers`; higher: odder)


class Label(Outlier):
    label: int | str


class Value(Outlier):
    value: float  # a regression model's prediction


class LabelProbabilities(Label):
    probabilities: dict[str, float]  # class label -> probability


class Answers:
    """Records (of `record_model`) to the service's answers: encoded by the training
    preprocessing, run by `engine` (`engine.load_engine`), scored by the outlier `detector`,
    decoded. `seen` gets the numeric features of each batch and its outlier flags (the drift
    window), `count` each label's count, `observe` the outlier scores and flags (Prometheus)."""

    def __init__(
        self,
        engine: Callable[[np.ndarray], np.ndarray],
        pre: Preprocessor,
        meta: dict[str, Any],
        detector: Detector,
        seen: Callable[[np.ndarray, np.ndarray], None],
        count: Callable[[str, int], None],
        observe: Callable[[np.ndarray, np.ndarray], None],
    ) -> None:
        self.engine, self.pre, self.detector = engine, pre, detector
        self.seen, self.count, self.observe = seen, count, observe
        self.features, self.classes = meta["features"], meta["classes"]
        self.classify = meta["task"] == "classification"
        self.values = feature_getter(self.features)

    def outputs(self, records: list[Any]) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """The model's outputs on raw records, their outlier scores and flags."""
        columns = dict(
            zip(self.features, zip(*map(self.values, records), strict=True), strict=True)
        )
        x = self.pre.encode(columns)
        out = self.engine(x)
        scores = self.detector.score(x, out)
        flags = self.detector.flags(scores)
        self.observe(scores, flags)
        numeric = [columns[f] for f in self.pre.numeric]
        for name in self.pre.images:  # an image's statistics, as the profile has them
            numeric += image_stats(np.stack(columns[name])).values()
        rows = np.array(numeric, dtype=np.float32).T if numeric else np.empty((len(x), 0))
        self.seen(rows, flags)
        return out, scores, flags

    def probabilities(self, records: list[Any]) -> tuple[np.ndarray, list[dict[str, Any]]]:
        """Class probabilities, and each record's outlier fields."""
        out, scores, flags = self.outputs(records)
        probs = softmax(out)
        for index, n in Counter(probs.argmax(1).tolist()).items():
            self.count(str(self.classes[index]), n)
        return probs, outlier_fields(scores, flags)

    def labels(self, records: list[Any]) -> list[Label | Value]:
        """Per record its label, or for a regression model its value."""
        if not self.classify:
            out, scores, flags = self.outputs(records)
            values = out[:, 0] * self.pre.target_std + self.pre.target_mean
            self.count("value", len(values))
            return [
                Value(value=v, **o)
                for v, o in zip(values.tolist(), outlier_fields(scores, flags), strict=True)
            ]
        probs, odd = self.probabilities(records)
        return [
            Label(label=self.classes[i], **o) for i, o in zip(probs.argmax(1), odd, strict=True)
        ]

    def labels_probabilities(self, records: list[Any]) -> list[LabelProbabilities]:
        probs, odd = self.probabilities(records)
        names = [str(c) for c in self.classes]
        return [
            LabelProbabilities(
                label=self.classes[best], probabilities=dict(zip(names, p, strict=True)), **o
            )
            for best, p, o in zip(probs.argmax(1).tolist(), probs.tolist(), odd, strict=True)
        ]


def monitored(pre: Preprocessor) -> list[str]:
    """The columns of the served drift window (`Answers.outputs`' `seen`): the numeric
    features, then each image feature's statistics (`runtime.images.stat_columns`)."""
    images = [c for name, i in pre.images.items() for c in stat_columns(name, i["mode"])]
    return [*pre.numeric, *images]


def outlier_fields(scores: np.ndarray, flags: np.ndarray) -> list[dict[str, Any]]:
    return [
        {"outlier": f, "outlier_score": s}
        for f, s in zip(flags.tolist(), scores.tolist(), strict=True)
    ]
