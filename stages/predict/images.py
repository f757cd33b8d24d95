"""Image sets as predict's input, for a model with an image feature: a folder of image files (at
any depth: a folder per class, train/val/test folders, or the files alone), a glob of them, one
image file, or a manifest (a CSV or Parquet table whose `path` column names each file,
relative to the manifest); local or on object storage (s3://...), through fsspec as the table
sources are.

Files are read and decoded `predict.batch_rows` at a time (a batch's bytes and pixels in
memory, never the whole set's), each by the model's ImageSpec: a file that cannot be read or
decoded is a rejected row with its path and the reason, never the end of the run (the reject
rate gate decides). Each answer's `path` is the file's path relative to the folder (a glob:
to the folder before its first wildcard; a manifest: as the manifest writes it), as ingest
writes curated paths. Files without an image's suffix are skipped, as ingest skips them.
"""

import logging
import posixpath
from collections.abc import Iterator, Mapping
from concurrent.futures import ThreadPoolExecutor
from typing import Any, NamedTuple

import numpy as np
import pandas as pd
from omegaconf import DictConfig, OmegaConf

from fullstack_ml.images import SUFFIXES
from fullstack_ml.sources import SUFFIXES as TABLE_SUFFIXES
from fullstack_ml.sources import open_url, storage_problem
from fullstack_ml.stage import StageError
from stages.predict.score import Runtime, Scored, Scoring, check_columns, score_part

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


def read_files(
    pool: ThreadPoolExecutor, fs: Any, paths: list[str | None], remote: bool
) -> tuple[list[bytes | None], np.ndarray]:
    """Each file's bytes (None where unreadable) and per file the reason it is refused
    (None: read)."""

    def read(path: str | None) -> bytes | str:
        if path is None:
            return "no path (a missing value)"
        try:
            return fs.cat_file(path)
        except Exception as err:  # noqa: BLE001  any read failure is the file's reason
            return f"unreadable: {storage_problem(err, remote)}"

    got = list(pool.map(read, paths))
    reasons = np.array([g if isinstance(g, str) else None for g in got], dtype=object)
    return [None if isinstance(g, str) else g for g in got], reasons


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

    def parts() -> Iterator[Scored]:
        with ThreadPoolExecutor(READERS) as pool:
            for i in range(0, len(files.paths), rt.size):
                data, reasons = read_files(
                    pool, files.fs, files.paths[i : i + rt.size], files.remote
                )
                part = pd.DataFrame({PATH: files.names[i : i + rt.size], feature: data})
                yield (*score_part(part, rt, reasons), None)

    return Scoring(source, [PATH], "files", parts())


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

    def parts() -> Iterator[Scored]:
        with ThreadPoolExecutor(READERS) as pool:
            for frame in frames:
                for i in range(0, len(frame), rt.size):
                    part = frame.iloc[i : i + rt.size].reset_index(drop=True)
                    paths = [
                        None if pd.isna(p) else posixpath.join(base, str(p)) for p in part[PATH]
                    ]
                    data, reasons = read_files(pool, fs, paths, remote)
                    yield (*score_part(part.assign(**{feature: data}), rt, reasons), None)

    return Scoring(source, ids, "files", parts())
