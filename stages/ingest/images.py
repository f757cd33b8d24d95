"""ingest of an image set (`data=images`): every file decoded by `data.image`
(`fullstack_ml.images`), checked, deduplicated and split; the curated splits hold each image
as PNG bytes of the decoded pixels with its source path and content hash.

`data.bad_files: fail` (the default) stops at the first bad file, naming it and why;
`drop` drops bad files, exact duplicates and val/test near-duplicates of train images, lists
each in `data/curated/rejected.csv` (path, reason), and fails only when the bad files' rate
is over `data.image.max_bad_rate` by its lower 95% bound.

Issue 34's first part: the later stages do not take an image schema yet (profile stops
naming the feature kind).
"""

import io
import logging
import os
import tempfile
from concurrent.futures import ProcessPoolExecutor
from functools import partial
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
from omegaconf import DictConfig, OmegaConf
from PIL import Image

from fullstack_ml.gates import rate_over
from fullstack_ml.images import (
    SPLIT_FOLDERS,
    SUFFIXES,
    BadImage,
    ImageSpec,
    class_problems,
    content_hash,
    decode,
    find_images,
    near_duplicates,
    perceptual_hash,
    render_digits,
)
from fullstack_ml.sources import open_url, storage_problem
from fullstack_ml.stage import StageError
from stages.ingest.split import split_rows

log = logging.getLogger("stages.ingest")
REMOTE_BATCH = 256  # files of an object store read at once (memory: their bytes)
POOL_FROM = 2000  # files: fewer decode faster here than a pool starts (about 0.3 s)


def image_spec(cfg: DictConfig) -> ImageSpec:
    try:
        return ImageSpec(
            size=tuple(cfg.size),
            mode=cfg.mode,
            resize=cfg.resize,
            max_pixels=cfg.max_pixels,
            min_size=cfg.min_size,
            animated=cfg.animated,
        )
    except (ValueError, TypeError) as err:
        raise StageError(str(err)) from None


def png(pixels: np.ndarray) -> bytes:
    out = io.BytesIO()
    Image.fromarray(pixels.squeeze(-1) if pixels.shape[-1] == 1 else pixels).save(out, "PNG")
    return out.getvalue()


def curate(path: str, spec: ImageSpec) -> tuple[str, str, bytes] | str:
    """One local file: its content hash, pHash and the PNG of its decoded pixels, or why it
    is bad (one line)."""
    try:
        data = Path(path).read_bytes()
    except OSError as err:
        return f"unreadable: {err.strerror or err}"
    return curate_bytes(data, spec)


def curate_bytes(data: bytes, spec: ImageSpec) -> tuple[str, str, bytes] | str:
    """`curate` of a file's bytes."""
    try:
        pixels = decode(data, spec)
    except BadImage as err:
        return str(err)
    return content_hash(data), perceptual_hash(pixels), png(pixels)


def fetch_remote(fs: Any, keys: list[str], spec: ImageSpec) -> list:
    """`curate` of the files at `keys` in the object store `fs`: read `REMOTE_BATCH` at a
    time, concurrently (fsspec's `cat`; one open per file took 0.4-0.8 s against moto here),
    then decoded."""
    out: list = []
    for start in range(0, len(keys), REMOTE_BATCH):
        batch = keys[start : start + REMOTE_BATCH]
        got = fs.cat(batch, on_error="return")
        for key in batch:
            data = got.get(key)
            if isinstance(data, bytes):
                out.append(curate_bytes(data, spec))
            else:
                out.append(f"unreadable: {storage_problem(data, remote=True)}")
    return out


def list_remote(url: str, options: dict) -> pd.DataFrame:
    """The images under an fsspec URL prefix (`s3://bucket/set/`), laid out as a local set:
    `<label>/*` or `{train,val,test}/<label>/*` below it. Columns path (the store's key, as
    `fs.find` gives it), label, split."""
    fs, root = open_url(url, options, "data")
    root = root.rstrip("/")
    try:
        found = sorted(fs.find(root))
    except Exception as err:  # noqa: BLE001  s3fs and botocore raise many kinds
        raise StageError(f"data.path: {url}: {storage_problem(err, remote=True)}") from None
    rows = []
    for key in found:
        parts = key[len(root) :].strip("/").split("/")
        if Path(key).suffix.lower() not in SUFFIXES or len(parts) < 2:
            continue  # not an image, or not in a class folder
        split = parts[0] if parts[0] in SPLIT_FOLDERS and len(parts) > 2 else None
        label = parts[1] if split else parts[0]
        rows.append((key, label, split))
    if not rows:
        raise StageError(f"data.path: {url}: no class folder holds an image file")
    return pd.DataFrame(rows, columns=["path", "label", "split"])


def read_images(
    listed: pd.DataFrame,
    spec: ImageSpec,
    fail: bool,
    base: Path | str,
    options: dict | None = None,
) -> tuple[pd.DataFrame, list]:
    """Each listed file decoded (a process per core from `POOL_FROM` files): a frame of path
    (relative to `base`), label, split, sha256, phash, image (PNG bytes), and the rejected
    files (path, reason); a StageError on the first with `fail`."""
    paths, relative_to = [str(p) for p in listed["path"]], base
    if isinstance(base, str):  # an object store's URL prefix: `paths` are its keys
        fs, relative_to = open_url(base, options or {}, "data")
        results = fetch_remote(fs, paths, spec)
    elif len(paths) >= POOL_FROM:
        with ProcessPoolExecutor(os.cpu_count() or 1) as pool:
            results = list(pool.map(partial(curate, spec=spec), paths, chunksize=64))
    else:
        results = [curate(p, spec) for p in paths]
    rows, rejected = [], []
    listed = listed.assign(path=[os.path.relpath(p, relative_to) for p in paths])
    for (path, label, split), got in zip(
        listed[["path", "label", "split"]].itertuples(index=False), results, strict=True
    ):
        if isinstance(got, str):
            if fail:
                where = base / path if isinstance(base, Path) else f"{base}/{path}"
                raise StageError(f"{where}: {got} (data.bad_files=drop skips it)")
            rejected.append((path, got))
        else:
            rows.append((path, label, split, *got))
    columns = ["path", "label", "split", "sha256", "phash", "image"]
    return pd.DataFrame(rows, columns=columns), rejected


def drop_duplicates(frame: pd.DataFrame, fail: bool, rejected: list) -> pd.DataFrame:
    """Exact duplicates (same bytes) after their first: a StageError with `fail` (naming
    both files), else dropped; the same bytes under two labels fail either way."""
    first = frame.drop_duplicates("sha256")
    if len(first) == len(frame):
        return frame
    dupes = frame[frame.duplicated("sha256")]
    original = first.set_index("sha256")
    for path, sha, label in dupes[["path", "sha256", "label"]].itertuples(index=False):
        same = original.loc[sha]
        if same["label"] != label:
            raise StageError(f"{path}: the same file as {same['path']} with another label")
        if fail:
            raise StageError(f"{path}: a duplicate of {same['path']} (data.bad_files=drop)")
        rejected.append((path, f"duplicate of {same['path']}"))
    return first


def assign_splits(frame: pd.DataFrame, split: DictConfig, seed: int) -> pd.DataFrame:
    """The split folders' splits where the set had them, else a seeded stratified split."""
    if frame["split"].notna().all():
        return frame
    if frame["split"].notna().any():
        raise StageError("data.path: some images are in train/val/test folders, others not")
    idx = split_rows(frame, "label", OmegaConf.to_container(split), seed, "classification")
    names = np.empty(len(frame), dtype=object)
    for name, rows in zip(("train", "val", "test"), idx, strict=True):
        names[rows] = name
    return frame.assign(split=names)


def prepare_images(
    data_cfg: DictConfig, seed: int
) -> tuple[dict[str, pd.DataFrame], dict, list[tuple[str, str]]]:
    """The curated splits of the image set at `data.path`, their schema, and the rejected
    files (path, reason)."""
    cfg, fail = data_cfg.image, data_cfg.bad_files == "fail"
    if data_cfg.bad_files not in ("fail", "drop"):
        raise StageError(f"data.bad_files: {data_cfg.bad_files!r} is not fail | drop")
    spec = image_spec(cfg)
    with tempfile.TemporaryDirectory(prefix="digits-images-") as tmp:
        path = data_cfg.path
        if data_cfg.source == "digits_images":  # rendered here: nothing to download
            render_digits(Path(tmp))
            path = tmp
        options = dict(data_cfg.get("storage_options") or {})
        if "://" in str(path):  # an object store prefix (s3://...), through fsspec
            listed, base = list_remote(str(path), options), str(path).rstrip("/")
        else:
            try:
                listed = find_images(path, cfg.label_column, cfg.path_column)
            except (FileNotFoundError, ValueError) as err:
                raise StageError(str(err)) from None
            base = Path(path).parent if Path(path).is_file() else Path(path)
            if any(c in str(path) for c in "*?["):
                base = Path()
        frame, rejected = read_images(listed, spec, fail, base, options)
    bad = len(rejected)
    if bad and rate_over(bad, len(listed), cfg.max_bad_rate):
        raise StageError(
            f"data.path: {bad} of {len(listed)} files are bad, over data.image.max_bad_rate"
            f" {cfg.max_bad_rate} (first: {rejected[0][0]}: {rejected[0][1]})"
        )
    frame = drop_duplicates(frame, fail, rejected)
    if problems := class_problems(frame["label"]):
        raise StageError(f"data.path: {problems[0]}")
    frame = assign_splits(frame, data_cfg.split, seed)
    near = near_duplicates(frame[["path", "split", "phash"]], "train", cfg.near_duplicate_bits)
    if len(near):
        path, match = near.iloc[0]["path"], near.iloc[0]["match"]
        if fail:
            raise StageError(
                f"{path}: a near-duplicate of train's {match} ({len(near)} val/test images"
                " are: a leak; data.bad_files=drop drops them)"
            )
        rejected += [
            (p, f"near-duplicate of train's {m}")
            for p, m in near[["path", "match"]].itertuples(index=False)
        ]
        frame = frame[~frame["path"].isin(set(near["path"]))]
    parts = {
        name: frame[frame["split"] == name].drop(columns=["split", "phash"]).reset_index(drop=True)
        for name in ("train", "val", "test")
    }
    if any(part.empty for part in parts.values()):
        raise StageError(f"data.path: a split is empty ({ {k: len(v) for k, v in parts.items()} })")
    schema = image_schema(parts, spec, data_cfg, rejected)
    log.info("images: %d kept, %d rejected", len(frame), len(rejected))
    return parts, schema, rejected


def image_schema(
    parts: dict[str, pd.DataFrame], spec: ImageSpec, data_cfg: DictConfig, rejected: list
) -> dict[str, Any]:
    """schema.json for an image set: the image feature's size, channels and per-channel mean
    and std on train (the normalisation), the classes and the rows per split."""
    train = np.stack([np.asarray(Image.open(io.BytesIO(b))) for b in parts["train"]["image"]])
    train = train.reshape(len(train), -1, spec.channels).astype(np.float64) / 255.0
    return {
        "source": str(data_cfg.path),
        "task": "classification",
        "features": [
            {
                "name": "image",
                "kind": "image",
                "size": list(spec.size),
                "mode": spec.mode,
                "channels": spec.channels,
                "mean": train.mean((0, 1)).round(6).tolist(),
                "std": train.std((0, 1)).round(6).tolist(),
                "resize": spec.resize,
            }
        ],
        "target": {"name": "label", "dtype": "object"},
        "classes": sorted(parts["train"]["label"].unique().tolist()),
        "rows": {name: len(part) for name, part in parts.items()},
        "rejected_files": len(rejected),
    }


def rejected_frame(rejected: list[tuple[str, str]]) -> pd.DataFrame:
    return pd.DataFrame(rejected, columns=["path", "reason"])
