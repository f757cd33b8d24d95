"""Image sets as predict's input, for a model with an image feature: a folder of image files (at
any depth: a folder per class, train/val/test folders, or the files alone), a glob of them, one
image file, or a manifest (a CSV or Parquet table whose `path` column names each file,
relative to the manifest); local or on object storage (s3://...), through fsspec as the table
sources are.

Files are read, decoded and encoded `predict.batch_rows` at a time by a process pool over all
cores, a few batches ahead of the model, which runs in this process (a few batches' bytes,
pixels and encoded rows in memory, never the whole set's); each file is decoded by the
model's ImageSpec, as the service decodes it: a file that cannot be read or
decoded is a rejected row with its path and the reason, never the end of the run (the reject
rate gate decides). Each answer's `path` is the file's path relative to the folder (a glob:
to the folder before its first wildcard; a manifest: as the manifest writes it), as ingest
writes curated paths. Files without an image's suffix are skipped, as ingest skips them.
"""

import logging
import multiprocessing
import os
import posixpath
from collections import deque
from collections.abc import Iterator, Mapping
from concurrent.futures import ProcessPoolExecutor, ThreadPoolExecutor
from dataclasses import replace
from typing import TYPE_CHECKING, Any, NamedTuple

import numpy as np
import pandas as pd
from omegaconf import DictConfig, OmegaConf

from fullstack_ml.images import SUFFIXES
from fullstack_ml.runtime.preprocess import Preprocessor, image_spec
from fullstack_ml.sources import SUFFIXES as TABLE_SUFFIXES
from fullstack_ml.sources import open_url, storage_problem
from fullstack_ml.stage import StageError
from stages.predict.score import (
    Runtime,
    Scored,
    Scoring,
    answer_part,
    check_columns,
    image_reason,
    score_part,
)

if TYPE_CHECKING:
    from fullstack_ml.runtime.images import ImageSpec

log = logging.getLogger("stages.predict")
PATH = "path"  # a manifest's column of files; each answer's file
# files read at once: object storage answers each GET in tens of ms, so a batch's reads
# overlap; a local disk reads either way
READERS = 8


class ImageFiles(NamedTuple):
    """The image files an input names."""

    fs: Any  # fsspec filesystem
    paths: list[str]  # in `fs`, in name order
    names: list[str]  # relative to the input's folder: each answer's `path`
    remote: bool


def suffix(path: str) -> str:
    return posixpath.splitext(path)[1].lower()


def glob_base(pattern: str) -> str:
    """The folder of a glob before its first wildcard: `a/b/*/*.png` -> `a/b`."""
    parts = pattern.split("/")
    first = next(i for i, p in enumerate(parts) if any(c in p for c in "*?["))
    return "/".join(parts[:first])


def storage_options(cfg: Mapping[str, Any]) -> dict:
    """The input's fsspec options as a plain dict."""
    options = cfg.get("storage_options")
    return (
        OmegaConf.to_container(options) if isinstance(options, DictConfig) else dict(options or {})
    )


def find_files(cfg: Mapping[str, Any], options: dict, key: str) -> ImageFiles | None:
    """The image files `cfg.path` names: a folder holding image files (at any depth), a glob
    matching some, or one image file. None where it names a table (a CSV, Parquet or JSON
    lines file or glob, a partitioned Parquet folder; a manifest is one): the table
    sources read it."""
    if cfg.get("source") != "file" or not cfg.get("path"):
        return None
    path = str(cfg["path"])
    fs, root = open_url(path, options, key)
    remote = "://" in path and not path.startswith("file://")
    folder = False
    try:
        if any(c in root for c in "*?["):
            matched = fs.glob(root, detail=True)
            found = [p for p, info in matched.items() if info.get("type") != "directory"]
            base = glob_base(root)
        elif fs.isdir(root):
            found, base, folder = fs.find(root), root, True
        elif suffix(root) in SUFFIXES:
            if not fs.exists(root):
                raise StageError(f"{path}: not found")
            found, base = [root], posixpath.dirname(root)
        else:
            return None
    except StageError:
        raise
    except Exception as err:  # noqa: BLE001  any listing failure, named in one line
        raise StageError(f"{path}: {storage_problem(err, remote)}") from None
    images = sorted(p for p in found if suffix(p) in SUFFIXES)
    if not images:
        if folder and not any(suffix(p) in TABLE_SUFFIXES for p in found):
            raise StageError(f"{path}: no image file ({', '.join(sorted(SUFFIXES))}) in it")
        return None
    if skipped := len(found) - len(images):
        log.info("%s: %d files skipped, not images by their suffix", path, skipped)
    return ImageFiles(fs, images, [posixpath.relpath(p, base) for p in images], remote)


def image_feature(rt: Runtime, source: str) -> str:
    """The model's one image feature, which an image set's files feed."""
    images = list(rt.pre.images)
    if len(images) != 1:
        raise StageError(f"{source}: the model takes {len(images)} images per row, not one")
    return images[0]


def read_file(fs: Any, path: str | None, remote: bool) -> bytes | str:
    """A file's bytes, or the reason it cannot be read."""
    if path is None:
        return "no path (a missing value)"
    try:
        return fs.cat_file(path)
    except Exception as err:  # noqa: BLE001  any read failure is the file's reason
        return f"unreadable: {storage_problem(err, remote)}"


def decode_files(
    spec: "ImageSpec",
    pre: Preprocessor | None,
    fs: Any,
    paths: list[str | None],
    data: list[bytes | str] | None,
) -> tuple[np.ndarray | None, np.ndarray, dict[str, np.ndarray], np.ndarray | None]:
    """In a pool's process: files read (`paths` through `fs`; or `data`, read already: each
    a file's bytes or the reason it is unreadable) and decoded by `spec`. Returns the reason
    per file (None: decoded), the decoded images' statistics (`image_stats`, batched), which
    drift samples, and either, given `pre` (a model of the image alone), the decoded images
    encoded for the model (`pre.encode`: the service's preprocessing, here rather than in the
    process that runs the model: 0.2 ms of CPU a 64x64 image), or else the pixels of every
    file (N x H x W x C uint8, zeros where refused): (pixels, reasons, statistics, encoded)."""
    from fullstack_ml.runtime.images import BadImage, decode, image_stats

    if data is None:
        data = [read_file(fs, p, remote=False) for p in paths]
    width, height = spec.size
    pixels = np.zeros((len(data), height, width, spec.channels), dtype=np.uint8)
    reasons = np.full(len(data), None, dtype=object)
    for i, got in enumerate(data):
        if isinstance(got, str):
            reasons[i] = got
            continue
        try:
            pixels[i] = decode(got, spec)
        except BadImage as err:
            reasons[i] = image_reason(err)
    good = pixels[reasons == None]  # noqa: E711  elementwise
    x = pre.encode({next(iter(pre.images)): good}) if pre is not None and len(good) else None
    return None if pre else pixels, reasons, image_stats(good), x


def decoded_parts(
    parts: Iterator[tuple[pd.DataFrame, list[str | None]]],
    files: ImageFiles,
    rt: Runtime,
    feature: str,
) -> Iterator[Scored]:
    """Each part (its rows, their files' paths) scored: the files read, decoded and encoded
    by a process pool over every core, `workers` parts ahead of the one the model scores
    here (memory: about `workers + 1` parts' bytes, pixels and encoded rows). Object storage
    is read here by threads (its GETs wait on the network), local files in the pool. A model
    that takes more than the image gets the pixels, checked with its other features here."""
    spec = replace(image_spec(rt.pre.images[feature]), max_pixels=rt.max_pixels)
    alone = list(rt.meta["features"]) == [feature]
    workers = len(os.sched_getaffinity(0))
    # fork: a worker starts at once (spawn imports the stage again: 1.5 s of CPU each) and
    # runs Pillow and numpy only, never the torch the parent loaded
    pool = ProcessPoolExecutor(workers, mp_context=multiprocessing.get_context("fork"))
    readers = ThreadPoolExecutor(READERS)
    pending: deque = deque()

    def answered() -> Scored:
        part, task = pending.popleft()
        pixels, reasons, stats, x = task.result()
        if not alone:
            return (*score_part(part.assign(**{feature: list(pixels)}), rt, reasons), None)
        frame = answer_part(part, [] if x is None else [x], reasons == None, rt)  # noqa: E711
        return frame, reasons, {f"{feature}.{k}": v for k, v in stats.items()}, None

    try:
        for part, paths in parts:
            fs, data = files.fs, None
            if files.remote:
                fs, data = None, list(readers.map(lambda p: read_file(files.fs, p, True), paths))
            task = pool.submit(decode_files, spec, rt.pre if alone else None, fs, paths, data)
            pending.append((part, task))
            if len(pending) > workers:
                yield answered()
        while pending:
            yield answered()
    finally:
        pool.shutdown(cancel_futures=True)
        readers.shutdown(cancel_futures=True)


def file_parts(source: str, files: ImageFiles, rt: Runtime) -> Scoring:
    """A folder's or glob's image files scored `rt.size` at a time; each answer carries its
    file's `path`."""
    feature = image_feature(rt, source)
    if set(rt.ids) - {PATH}:  # a folder's files have nothing but their path
        raise StageError(
            f"predict.id_columns: {source} is image files; their answers carry `path` alone "
            "(a manifest's columns can be ids)"
        )
    others = [f for f in rt.meta["features"] if f != feature]
    if others:
        raise StageError(f"{source}: the model also needs {others}; give a manifest with them")
    rt = rt._replace(ids=[PATH])
    log.info("scoring %d image files of %s", len(files.paths), source)

    parts = (
        (pd.DataFrame({PATH: files.names[i : i + rt.size]}), files.paths[i : i + rt.size])
        for i in range(0, len(files.paths), rt.size)
    )
    return Scoring(source, [PATH], "files", decoded_parts(parts, files, rt, feature))


def is_manifest(columns: Any, images: Any) -> bool:
    """A table naming image files (a `path` column, none of the `images` features) for a
    model with image features."""
    return bool(images) and PATH in columns and not any(f in columns for f in images)


def manifest_parts(
    source: str, columns: Any, frames: Iterator[pd.DataFrame], rt: Runtime, options: dict
) -> Scoring:
    """A manifest's rows scored `rt.size` at a time, each with the image file its `path`
    names (relative to the manifest, or absolute); answers carry `path` and the id columns,
    and the manifest's columns give any other feature the model takes."""
    feature = image_feature(rt, source)
    ids = [PATH, *(c for c in rt.ids if c != PATH)]
    check_columns(columns, rt.meta, ids, source, given=[feature])
    fs, root = open_url(source, options, "predict.input")
    if any(c in root for c in "*?["):  # whose folder would its paths be relative to?
        raise StageError(f"{source}: a manifest of image files is one file, not a glob")
    remote = "://" in source and not source.startswith("file://")
    base = root if fs.isdir(root) else posixpath.dirname(root)  # a partitioned one: itself
    rt = rt._replace(ids=ids)
    log.info("scoring the image files that %s lists", source)

    def parts() -> Iterator[tuple[pd.DataFrame, list[str | None]]]:
        for frame in frames:
            for i in range(0, len(frame), rt.size):
                part = frame.iloc[i : i + rt.size].reset_index(drop=True)
                yield (
                    part,
                    [None if pd.isna(p) else posixpath.join(base, str(p)) for p in part[PATH]],
                )

    return Scoring(
        source, ids, "files", decoded_parts(parts(), ImageFiles(fs, [], [], remote), rt, feature)
    )
