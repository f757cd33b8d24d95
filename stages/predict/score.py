"""The service's answers for a part of the input: each row's features checked and typed as the
service would (the reason it would refuse a row), the scored rows answered by the runtime.
An image feature's values (a file's bytes, or pixels already decoded) are decoded here one by
one by the model's ImageSpec, so that a bad image rejects its own row, not its batch."""

import logging
from collections.abc import Iterable, Iterator
from dataclasses import replace
from pathlib import Path
from typing import TYPE_CHECKING, Any, NamedTuple

import numpy as np
import pandas as pd

from fullstack_ml.runtime.engine import Engine, load_engine, softmax
from fullstack_ml.runtime.meta import read_meta
from fullstack_ml.runtime.outliers import Detector, load_detector
from fullstack_ml.runtime.preprocess import Preprocessor, image_spec
from fullstack_ml.stage import StageError

if TYPE_CHECKING:
    from fullstack_ml.runtime.images import ImageSpec

log = logging.getLogger("stages.predict")
OUTLIER_COLUMNS = ["outlier", "outlier_score"]  # the bento's outlier detector's answers


def check_batch(
    frame: pd.DataFrame, pre: Preprocessor, max_pixels: int, reasons: np.ndarray | None = None
) -> tuple[dict[str, Any], np.ndarray]:
    """The model's features of `frame` typed as in training (feature -> array; an image
    feature: uint8 pixels, rows x H x W x C), and per row the reason the service would refuse
    it (None: the row is scored), the first failing feature's. `max_pixels`: the most pixels
    an image's header may give (the service's `serve.max_pixels`). `reasons`: rows already
    refused (an image file that could not be read), kept."""
    if reasons is None:
        reasons = np.full(len(frame), None, dtype=object)
    typed = {}
    for name, (low, high) in zip(pre.numeric, pre.limits(), strict=True):
        raw = frame[name]
        if pd.api.types.is_bool_dtype(raw):  # true/false is no number to the service either
            values, text = np.full(len(raw), np.nan), raw.notna().to_numpy()
        elif pd.api.types.is_numeric_dtype(raw):
            values, text = raw.to_numpy(dtype="float64", na_value=np.nan), None
        else:  # text (a CSV column, say): numbers in it are numbers
            values = pd.to_numeric(raw, errors="coerce").to_numpy(dtype="float64", na_value=np.nan)
            text = raw.notna().to_numpy() & np.isnan(values)
        with np.errstate(invalid="ignore"):
            outside = (values < low) | (values > high)
        checks = [(np.isinf(values), "not finite"), (outside & ~np.isinf(values), "")]
        for bad, why in [(text, "not a number"), *checks]:
            if bad is not None and bad.any():
                why = why or f"outside the model's range [{low:.4g}, {high:.4g}]"
                reasons[bad & (reasons == None)] = f"{name}: {why}"  # noqa: E711  elementwise
        typed[name] = values
    for name in pre.categorical:  # any value is a category; an unseen one counts as unknown
        raw = frame[name]
        typed[name] = raw.where(raw.isna(), raw.astype(str)).to_numpy(dtype=object)
    for name, image in pre.images.items():
        spec = replace(image_spec(image), max_pixels=max_pixels)  # the service's spec
        typed[name] = decode_images(frame[name], spec, reasons)
    return typed, reasons


def decode_images(values: pd.Series, spec: "ImageSpec", reasons: np.ndarray) -> np.ndarray:
    """An image feature's values as uint8 pixels (rows x H x W x C, zeros on refused rows),
    decoded by `spec`; a bad image's row gets BadImage's one-line reason (the image is the
    row's file: no feature name before it). Rows refused already are not decoded."""
    from fullstack_ml.runtime.images import BadImage, decode  # Pillow: only where images are

    width, height = spec.size
    pixels = np.zeros((len(values), height, width, spec.channels), dtype=np.uint8)
    for i, value in enumerate(values):
        if reasons[i] is not None:
            continue
        if isinstance(value, np.ndarray):  # decoded already (the Preprocessor takes these)
            if value.shape != pixels.shape[1:] or value.dtype != np.uint8:
                reasons[i] = (
                    f"pixels of shape {value.shape} {value.dtype}, not {pixels.shape[1:]} uint8"
                )
            else:
                pixels[i] = value
        elif isinstance(value, bytes | bytearray | memoryview):
            try:
                pixels[i] = decode(bytes(value), spec)
            except BadImage as err:
                reasons[i] = image_reason(err)
        elif pd.api.types.is_scalar(value) and pd.isna(value):
            reasons[i] = "no image (a missing value)"
        else:  # a CSV's text, say: not the file's bytes
            reasons[i] = f"not an image's bytes but {type(value).__name__}"
    return pixels


def image_reason(err: Exception) -> str:
    """BadImage's one line, naming predict's pixel limit: the shared decoder names ingest's
    key (`data.image.max_pixels`), while predict's limit is `predict.max_pixels`."""
    return str(err).replace("data.image.max_pixels", "predict.max_pixels")


def encoded(pre: Preprocessor, typed: dict[str, Any], size: int) -> Iterator[np.ndarray]:
    """Typed rows (`check_batch`'s) encoded `size` rows at a time, each batch's arrays in
    cache (1M rows of 64 features: 0.28 s in batches of 1024 against 1.06 s in parts of
    131,072 rows, 3.3 s at once)."""
    rows = len(next(iter(typed.values())))
    for i in range(0, rows, size):
        yield pre.encode({k: v[i : i + size] for k, v in typed.items()})


def score(
    engine: Engine,
    pre: Preprocessor,
    meta: dict[str, Any],
    batches: Iterable[np.ndarray],
    detector: Detector,
) -> pd.DataFrame:
    """The service's answers for encoded rows (`batches`, each one model call): `label` and
    `proba_<class>` per class (classification), or `value` (regression), then `outlier` and
    `outlier_score` (the bento's outlier detector)."""
    outs, scores = [], []
    for x in batches:
        outs.append(engine(x))
        scores.append(detector.score(x, outs[-1]))
    out, odd = np.concatenate(outs), np.concatenate(scores)
    flags = {"outlier": detector.flags(odd), "outlier_score": odd}
    if meta["task"] == "regression":
        value = out[:, 0].astype("float64") * pre.target_std + pre.target_mean
        return pd.DataFrame({"value": value, **flags})
    probs = softmax(out).astype("float64")
    classes = meta["classes"]
    answer = {"label": np.asarray(classes)[probs.argmax(1)]}
    answer |= {f"proba_{c}": probs[:, i] for i, c in enumerate(classes)}
    return pd.DataFrame(answer | flags)


def answer_columns(meta: dict[str, Any]) -> list[str]:
    if meta["task"] == "regression":
        return ["value", *OUTLIER_COLUMNS]
    return ["label", *(f"proba_{c}" for c in meta["classes"]), *OUTLIER_COLUMNS]


class Runtime(NamedTuple):
    """The service's runtime for one model, loaded once per process (or Ray actor)."""

    meta: dict[str, Any]
    pre: Preprocessor
    engine: Engine
    size: int  # rows per model call
    ids: list[str]
    detector: Detector
    max_pixels: int  # the most an image's header may give (serve.max_pixels, the service's)


def load_runtime(
    model: Path,
    serving: dict | None,
    size: int,
    ids: list[str],
    runtime: str,
    threads: int,
    max_pixels: int,
) -> Runtime:
    """The model on `runtime` (`predict.runtime`, the server's), with `threads` intra-op
    threads (the server's, so that Inductor compiles the server's kernels; an actor: 1);
    images refused past `max_pixels` (`predict.max_pixels`, the server's)."""
    meta = read_meta(model)
    pre = Preprocessor.from_dict(meta["preprocessing"])
    try:
        engine = load_engine(model, serving, pre.width, runtime, threads, log, batch=size)
    except ValueError as err:
        raise StageError(f"predict.runtime: {err}") from None
    try:
        detector = load_detector(model)
    except FileNotFoundError as err:
        raise StageError(str(err)) from None
    return Runtime(meta, pre, engine, size, ids, detector, max_pixels)


def score_part(
    part: pd.DataFrame, rt: Runtime, reasons: np.ndarray | None = None
) -> tuple[pd.DataFrame, np.ndarray, dict[str, np.ndarray]]:
    """A part's rows answered as the service would, in order: a frame of the id columns
    and the answers (missing on rejected rows), the reason per row (None: scored), and the
    scored rows' columns that drift is measured on (`drift_columns`). `reasons`: rows
    refused before (see `check_batch`)."""
    typed, reasons = check_batch(part, rt.pre, rt.max_pixels, reasons)
    ok = reasons == None  # noqa: E711  elementwise
    good = typed if ok.all() else {k: v[ok] for k, v in typed.items()}
    batches = encoded(rt.pre, good, rt.size) if ok.any() else []
    return answer_part(part, batches, ok, rt), reasons, drift_columns(good, rt.pre)


def answer_part(
    part: pd.DataFrame, batches: Iterable[np.ndarray], ok: np.ndarray, rt: Runtime
) -> pd.DataFrame:
    """The id columns of `part` and the answers for its `ok` rows (`batches`: them
    encoded), missing on the others."""
    frame = part[rt.ids].reset_index(drop=True)
    if not ok.any():
        return frame.reindex(columns=[*rt.ids, *answer_columns(rt.meta)])
    answers = score(rt.engine, rt.pre, rt.meta, batches, rt.detector)
    answers.index = np.flatnonzero(ok)  # rejected rows: missing answers
    return frame.join(answers) if len(frame.columns) else answers.reindex(frame.index)


def drift_columns(typed: dict[str, np.ndarray], pre: Preprocessor) -> dict[str, np.ndarray]:
    """The columns the training profile has for `typed` features: numeric and categorical
    features as they are, an image feature as its statistics per image, `<feature>.<stat>`
    (`runtime.images.image_stats`: brightness, contrast, sharpness...; as the profile stage
    profiles them), not its pixels."""
    out = {k: v for k, v in typed.items() if k not in pre.images}
    if pre.images:
        from fullstack_ml.runtime.images import image_stats  # Pillow: only where images are

        for name in pre.images:
            out |= {f"{name}.{stat}": v for stat, v in image_stats(typed[name]).items()}
    return out


# a part's answers (ids and answers), reasons, typed features for drift, their sample keys
Scored = tuple[pd.DataFrame, np.ndarray, dict[str, np.ndarray], np.ndarray | None]


class Scoring(NamedTuple):
    """An input being scored: its name for messages, the columns copied to each answer
    (none: `row`, the input's row number, is added), what one of its rows is (a row, a
    file) and its scored parts, in order."""

    source: str
    ids: list[str]
    unit: str  # rows | files
    parts: Iterator[Scored]


def check_columns(
    columns: Any, meta: dict[str, Any], ids: list[str], source: str, given: Any = ()
) -> None:
    """A StageError naming the first feature or id column missing from `columns`
    (`given`: features the caller supplies itself, an image set's images)."""
    for column in [*(f for f in meta["features"] if f not in given), *ids]:
        if column not in columns:
            what = "id column" if column in ids else "feature"
            raise StageError(f"{source}: {what} {column!r} missing (the model needs it)")
