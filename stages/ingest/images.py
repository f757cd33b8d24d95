"""ingest of an image set (`data=images`): every file decoded by `data.image`
(`fullstack_ml.images`), checked, deduplicated and split; the curated splits hold each image
(`stored`: the file's own bytes when it is a PNG, JPEG or WebP at the size already, else the
PNG of its decoded pixels) with its source path and content hash.

`data.bad_files: fail` (the default) stops at the first bad file, naming it and why;
`drop` drops bad files, exact duplicates and val/test near-duplicates of train images, lists
each in `data/curated/rejected.csv` (path, reason), and fails only when the bad files' rate
is over `data.image.max_bad_rate` by its lower 95% bound.

Memory is bounded: files are curated a chunk at a time (`batch_rows`) into Parquet shards (by
a process per core, or by Ray Data tasks with `data.engine=ray`), the checks run on the
hashes alone, and the splits are written shard by shard.
"""

import io
import logging
import os
import pickle
import shutil
import tempfile
from collections import deque
from collections.abc import Iterator
from concurrent.futures import ProcessPoolExecutor
from contextlib import ExitStack
from functools import partial
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import pyarrow as pa
import pyarrow.parquet as pq
from omegaconf import DictConfig, OmegaConf
from PIL import Image

from fullstack_ml.gates import rate_over
from fullstack_ml.images import (
    REJECTED,
    SPLIT_FOLDERS,
    SUFFIXES,
    BadImage,
    ImageSpec,
    class_problems,
    content_hash,
    find_images,
    image_stats,
    near_duplicates,
    open_checked,
    perceptual_hashes,
    pixels_of,
    render_digits,
    stat_columns,
)
from fullstack_ml.paths import split_file
from fullstack_ml.sources import open_url, storage_problem
from fullstack_ml.stage import StageError, atomic_dir, write_json
from stages.ingest.split import split_rows

log = logging.getLogger("stages.ingest")
REMOTE_BATCH = 256  # files of an object store read at once (memory: their bytes)
POOL_FROM = 2000  # files: fewer decode faster here than a pool starts (about 0.3 s)
TASK = 64  # files a pool worker curates at once (their statistics computed together)
CHUNK = 4096  # files curated at once at most, a Parquet shard each
ROW_GROUP = 4096  # rows of a curated split's Parquet row group at most
BATCH_BYTES = 32 << 20  # decoded pixels of a chunk or a row group: what ingest holds of them
KEPT = ("PNG", "JPEG", "WEBP")  # formats curated as the file's own bytes (`stored`)


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


def stored(data: bytes, img: Image.Image, pixels: np.ndarray, spec: ImageSpec) -> bytes:
    """The curated value of a file (`img`: as `open_checked` opened it): its own bytes when
    it is one frame of PNG, JPEG or WebP (what the service takes) at the size already, else
    the PNG of its decoded pixels. Decoding either by the schema gives `pixels` again;
    re-encoding took 0.47 of the 0.75 ms a 64x64 file cost here."""
    if img.format in KEPT and img.size == spec.size and getattr(img, "n_frames", 1) == 1:
        return data
    return png(pixels)


def read_file(path: str) -> bytes | str:
    """A local file's bytes, or why it is unreadable (one line)."""
    try:
        return Path(path).read_bytes()
    except OSError as err:
        return f"unreadable: {err.strerror or err}"


def curate_bytes(data: bytes | str, spec: ImageSpec) -> tuple | str:
    """A file's content hash, curated value (`stored`) and decoded pixels, or why it is bad
    (one line; `data` may be that already)."""
    if isinstance(data, str):
        return data
    try:
        img = open_checked(data, spec)
        pixels = pixels_of(img, spec)
    except BadImage as err:
        return str(err)
    return content_hash(data), stored(data, img, pixels, spec), pixels


def with_statistics(results: list) -> list:
    """`curate_bytes`' results with each image's pixels replaced by its pHash, per-channel
    sums then sums of squares (0-1 scale: train's mean and std add up from them) and
    statistics (`image_stats`, in `STATS` order: profile reads them, not the pixels), all
    computed for the images at once: (sha256, phash, stored, sums, statistics)."""
    good = [k for k, got in enumerate(results) if not isinstance(got, str)]
    if not good:
        return results
    pixels = np.stack([results[k][2] for k in good])
    hashes = perceptual_hashes(pixels)
    flat = pixels.reshape(len(good), -1, pixels.shape[-1])
    sums = flat.sum(1, dtype=np.int64) / 255.0
    squares = np.einsum("npc,npc->nc", flat, flat, dtype=np.int64) / 255.0**2
    stats = np.stack(list(image_stats(pixels).values()), axis=1)
    out = list(results)
    for i, k in enumerate(good):
        pair = (*sums[i].tolist(), *squares[i].tolist())
        out[k] = (results[k][0], hashes[i], results[k][1], pair, tuple(stats[i].tolist()))
    return out


def fetch_remote(fs: Any, keys: list[str], spec: ImageSpec) -> list:
    """`curate_bytes` of the files at `keys` in the object store `fs`: read `REMOTE_BATCH` at a
    time, concurrently (fsspec's `cat`; one open per file took 0.4-0.8 s against moto here),
    then decoded."""
    out: list = []
    for start in range(0, len(keys), REMOTE_BATCH):
        batch = keys[start : start + REMOTE_BATCH]
        got = fs.cat(batch, on_error="return")
        for key in batch:
            data = got.get(key)
            if not isinstance(data, bytes):
                data = f"unreadable: {storage_problem(data, remote=True)}"
            out.append(curate_bytes(data, spec))
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


def curate_chunk(paths: list[str], spec: ImageSpec, remote: tuple | None = None) -> list:
    """`curate_bytes` of local `paths`, or of keys in an object store (`remote`: its URL and
    storage options), `with_statistics`."""
    if remote is None:
        return with_statistics([curate_bytes(read_file(p), spec) for p in paths])
    fs, _ = open_url(remote[0], remote[1], "data")
    return with_statistics(fetch_remote(fs, paths, spec))


def batch_rows(spec: ImageSpec, most: int) -> int:
    """Images of `spec`'s size in a chunk or row group: `BATCH_BYTES` of pixels, at most
    `most` (64x64 RGB: 2,730)."""
    return max(1, min(most, BATCH_BYTES // (spec.size[0] * spec.size[1] * spec.channels)))


def curated_chunks(
    paths: list[str], spec: ImageSpec, remote: tuple | None, engine: str
) -> Iterator[list]:
    """`curate_chunk` of each chunk (`batch_rows`) of `paths` in order: with `engine` ray, in
    Ray Data tasks (the Ray `ingest` joined); else a process per core from `POOL_FROM` files,
    the next chunk decoding while the caller writes this one (two chunks in memory at most)."""
    size = batch_rows(spec, CHUNK)
    chunks = [paths[i : i + size] for i in range(0, len(paths), size)]
    if engine == "ray":
        yield from ray_chunks(chunks, spec, remote)
    elif len(paths) < POOL_FROM or remote is not None:
        yield from (curate_chunk(chunk, spec, remote) for chunk in chunks)
    else:
        with ProcessPoolExecutor(os.cpu_count() or 1) as pool:
            pending: deque = deque()
            curate = partial(curate_chunk, spec=spec)
            for chunk in chunks:  # in tasks of `TASK` files
                tasks = [chunk[i : i + TASK] for i in range(0, len(chunk), TASK)]
                pending.append(pool.map(curate, tasks))
                if len(pending) > 1:
                    yield [got for task in pending.popleft() for got in task]
            while pending:
                yield [got for task in pending.popleft() for got in task]


def ray_chunks(chunks: list[list[str]], spec: ImageSpec, remote: tuple | None) -> Iterator[list]:
    """`curate_chunk` of each chunk as a Ray Data task, the results streamed back in order
    (Ray Data's backpressure bounds what is in flight)."""
    import ray.data

    from fullstack_ml.ray_session import bounded_ray_data

    bounded_ray_data()
    options = ray.data.DataContext.get_current().execution_options
    ordered, options.preserve_order = options.preserve_order, True
    try:
        items = [{"chunk": k, "paths": chunk} for k, chunk in enumerate(chunks)]
        ds = ray.data.from_items(items, override_num_blocks=len(items)).map(
            lambda row: {"results": pickle.dumps(curate_chunk(list(row["paths"]), spec, remote))}
        )
        for row in ds.iter_rows():  # pickled: a chunk's results mix reasons and tuples
            yield pickle.loads(row["results"])
    finally:
        options.preserve_order = ordered


def read_images(
    listed: pd.DataFrame,
    spec: ImageSpec,
    fail: bool,
    base: Path | str,
    shards: Path,
    options: dict | None = None,
    engine: str = "pandas",
) -> tuple[pd.DataFrame, list]:
    """Each listed file decoded, a chunk (`batch_rows`) at a time, their curated values in a
    Parquet shard per chunk in `shards` (columns path, label, sha256, image and the image's
    statistics, `image.<stat>`): a frame of path
    (relative to `base`), label, split, sha256, phash, shard, row and sums (no images), and
    the rejected files (path, reason); a StageError on the first with `fail`. (`shard`,
    `row`: where its curated value is; `sum<c>`, `square<c>`: `curate_bytes`' sums.)"""
    paths = [str(p) for p in listed["path"]]
    remote = (base, options or {}) if isinstance(base, str) else None
    relative_to = open_url(base, options or {}, "data")[1] if remote else base
    listed = listed.assign(path=[os.path.relpath(p, relative_to) for p in paths])
    stats = stat_columns("image", spec.mode)
    columns = ["path", "label", "split", "sha256", "phash", "shard", "row"]
    columns += [f"{kind}{c}" for kind in ("sum", "square") for c in range(spec.channels)]
    frames, rejected = [], []
    size = batch_rows(spec, CHUNK)
    for k, results in enumerate(curated_chunks(paths, spec, remote, engine)):
        part = listed.iloc[k * size : (k + 1) * size]
        kept: dict[str, list] = {c: [] for c in ("path", "label", "sha256", "image", *stats)}
        rows = []
        for (path, label, split), got in zip(
            part[["path", "label", "split"]].itertuples(index=False), results, strict=True
        ):
            if isinstance(got, str):
                if fail:
                    where = base / path if isinstance(base, Path) else f"{base}/{path}"
                    raise StageError(f"{where}: {got} (data.bad_files=drop skips it)")
                rejected.append((path, got))
                continue
            sha, phash, image, sums, values = got
            rows.append((path, label, split, sha, phash, k, len(rows), *sums))
            for key, value in zip(kept, (path, label, sha, image, *values), strict=True):
                kept[key].append(value)
        pq.write_table(pa.table(kept), shards / f"{k:06d}.parquet")
        # Arrow-backed strings: 200,000 files' hashes and paths in tens of MB, not hundreds
        types = dict.fromkeys(columns[:5], "string[pyarrow]") | dict.fromkeys(columns[5:7], int)
        frames.append(
            pd.DataFrame(rows, columns=columns).astype(types | dict.fromkeys(columns[7:], float))
        )
    return pd.concat(frames, ignore_index=True), rejected


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


def ingest_images(
    data_cfg: DictConfig, seed: int, out_dir: Path, address: str | None = None
) -> dict[str, Any]:
    """The curated splits of the image set at `data.path` written to `out_dir` (with
    schema.json and `REJECTED`, all or nothing); returns the schema. Memory: the listing and
    the hashes, not the images (they pass through shards in `out_dir`'s temporary twin)."""
    cfg, fail = data_cfg.image, data_cfg.bad_files == "fail"
    if data_cfg.bad_files not in ("fail", "drop"):
        raise StageError(f"data.bad_files: {data_cfg.bad_files!r} is not fail | drop")
    spec, engine = image_spec(cfg), data_cfg.get("engine", "pandas")
    if engine not in ("pandas", "ray"):
        raise StageError(f"data.engine: {engine!r} is not pandas | ray")
    with ExitStack() as stack:
        tmp = stack.enter_context(atomic_dir(out_dir))
        shards = tmp / ".shards"
        shards.mkdir()
        path = data_cfg.path
        if data_cfg.source == "digits_images":  # rendered here: nothing to download
            path = stack.enter_context(tempfile.TemporaryDirectory(prefix="digits-images-"))
            render_digits(Path(path))
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
        if engine == "ray":
            from fullstack_ml import ray_session

            stack.enter_context(ray_session.session(address))
        frame, rejected = read_images(listed, spec, fail, base, shards, options, engine)
        frame = select(frame, rejected, len(listed), data_cfg, seed)
        schema = image_schema(frame, spec, data_cfg, rejected)
        write_images(frame, shards, tmp, spec)
        shutil.rmtree(shards)
        rejected_frame(rejected).to_csv(tmp / REJECTED, index=False)
        write_json(tmp / "schema.json", schema)
    log.info("images: %d kept, %d rejected", len(frame), len(rejected))
    return schema


def select(
    frame: pd.DataFrame, rejected: list, listed: int, data_cfg: DictConfig, seed: int
) -> pd.DataFrame:
    """The curated files (`read_images`' frame) that are kept, each with its split: the
    bad-file rate, exact duplicates, the classes and near-duplicates across splits checked
    (what is dropped is added to `rejected`)."""
    cfg, fail = data_cfg.image, data_cfg.bad_files == "fail"
    bad = len(rejected)
    if bad and rate_over(bad, listed, cfg.max_bad_rate):
        raise StageError(
            f"data.path: {bad} of {listed} files are bad, over data.image.max_bad_rate"
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
    rows = {name: int((frame["split"] == name).sum()) for name in SPLIT_FOLDERS}
    if not all(rows.values()):
        raise StageError(f"data.path: a split is empty ({rows})")
    return frame


def write_images(frame: pd.DataFrame, shards: Path, out: Path, spec: ImageSpec) -> None:
    """The rows of `frame` (kept, in order, with their split) taken from their shards and
    written to `<split>.parquet` in `out` (`read_images`' shard columns), in row groups
    of `batch_rows(spec, ROW_GROUP)` rows: the same bytes however the files were chunked."""
    group = batch_rows(spec, ROW_GROUP)
    writers: dict[str, pq.ParquetWriter] = {}
    held = {name: pa.table({}) for name in SPLIT_FOLDERS}

    def write(name: str, table: pa.Table) -> None:
        if name not in writers:
            path = split_file(name, out)
            writers[name] = pq.ParquetWriter(path, table.schema, use_dictionary=["label"])
        writers[name].write_table(table, row_group_size=group)

    try:
        for k, rows in frame.groupby("shard", sort=True):
            table = pq.read_table(shards / f"{k:06d}.parquet", use_threads=False)
            for name in SPLIT_FOLDERS:
                part = table.take(rows.loc[rows["split"] == name, "row"].to_numpy())
                part = pa.concat_tables([held[name], part]) if held[name].num_rows else part
                whole = part.num_rows // group * group
                if whole:  # full row groups out, the rest held
                    write(name, part.slice(0, whole))
                held[name] = part.slice(whole)
            pa.default_memory_pool().release_unused()  # mimalloc kept each shard's pages
        for name, part in held.items():
            write(name, part)
    finally:
        for writer in writers.values():
            writer.close()


def image_schema(
    frame: pd.DataFrame, spec: ImageSpec, data_cfg: DictConfig, rejected: list
) -> dict[str, Any]:
    """schema.json for an image set: the image feature's size, channels and per-channel mean
    and std on train (the normalisation, from each image's sums), the classes and the rows
    per split."""
    train = frame[frame["split"] == "train"]
    channels = range(spec.channels)
    sums = train[[f"sum{c}" for c in channels]].sum().to_numpy()
    squares = train[[f"square{c}" for c in channels]].sum().to_numpy()
    count = len(train) * spec.size[0] * spec.size[1]
    mean = sums / count
    std = np.sqrt(np.maximum(squares / count - mean * mean, 0))
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
                "mean": mean.round(6).tolist(),
                "std": std.round(6).tolist(),
                "resize": spec.resize,
            }
        ],
        "target": {"name": "label", "dtype": "object"},
        "classes": sorted(train["label"].unique().tolist()),
        "rows": {name: int((frame["split"] == name).sum()) for name in SPLIT_FOLDERS},
        "rejected_files": len(rejected),
    }


def rejected_frame(rejected: list[tuple[str, str]]) -> pd.DataFrame:
    return pd.DataFrame(rejected, columns=["path", "reason"])
