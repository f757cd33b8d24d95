"""engine=pandas: the input streamed and scored part by part in this process."""

import logging
from collections.abc import Iterator
from itertools import chain

import pandas as pd
from omegaconf import DictConfig

from fullstack_ml.sources import iter_source
from fullstack_ml.stage import StageError
from stages.predict.images import (
    file_parts,
    find_files,
    is_manifest,
    manifest_parts,
    storage_options,
)
from stages.predict.model import Model
from stages.predict.score import Runtime, Scoring, check_columns, score_part

log = logging.getLogger("stages.predict")


def local_parts(cfg: DictConfig, model: Model, rt: Runtime, seed: int) -> Scoring:
    """engine=pandas: the input streamed and scored part by part in this process; for a
    model with an image feature, an image folder, glob or manifest (`images`) too."""
    options = storage_options(cfg.input)
    if rt.pre.images and (files := find_files(cfg.input, options, "predict.input")):
        log.info("scoring %s with %s", cfg.input.path, model.name)
        return file_parts(str(cfg.input.path), files, rt)
    source, frames = iter_source(cfg.input, seed, "predict.input", text=rt.pre.numeric)
    first = next(frames, None)
    if first is None or first.empty:
        raise StageError(f"{source}: no data rows")
    log.info("scoring %s with %s", source, model.name)
    if is_manifest(first.columns, rt.pre.images):
        return manifest_parts(source, first.columns, chain([first], frames), rt, options)
    check_columns(first.columns, rt.meta, rt.ids, source)
    parts: Iterator[pd.DataFrame] = chain([first], frames)
    if rt.pre.images:  # decoded `batch_rows` at a time, not a Parquet batch's 65,536 images
        parts = (p.iloc[i : i + rt.size] for p in parts for i in range(0, len(p), rt.size))
    return Scoring(source, rt.ids, "rows", ((*score_part(p, rt), None) for p in parts))
