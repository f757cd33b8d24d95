"""Images as a feature kind (issue 34): the ways a user lays out an image set, the hashes that
find duplicates, and the checks on an image set's classes. Decoding a file lives in
`runtime.images` (the bento ships it); it is re-exported here.
"""

import hashlib
import io
import re
from collections.abc import Iterable, Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import pyarrow as pa
from PIL import Image

from fullstack_ml.runtime.images import (  # noqa: F401  re-exported: one import for stages
    FORMATS,
    RESIZE,
    STATS,
    BadImage,
    ImageSpec,
    decode,
    fit,
    image_stats,
    open_checked,
    pixels_of,
    stat_columns,
    to_mode,
)

SUFFIXES = frozenset({".png", ".jpg", ".jpeg", ".webp", ".gif", ".bmp", ".tif", ".tiff"})
SPLIT_FOLDERS = ("train", "val", "test")
PHASH_BITS = 8  # a pHash is PHASH_BITS x PHASH_BITS bits
NEAR_PAIRS = 1 << 22  # hash pairs compared at once (32 MiB of XORs; 256 rows of 16,000)


def content_hash(data: bytes) -> str:
    """sha256 of the file's bytes: equal files, exact duplicates."""
    return hashlib.sha256(data).hexdigest()


def perceptual_hashes(pixels: Sequence[np.ndarray]) -> list[str]:
    """imagehash's pHash (`imagehash.phash`, its hex string) of decoded images, the DCTs
    and medians of all at once (imagehash's one image at a time took 0.25 ms a 64x64 image
    here; this, 0.1): near-duplicates differ in a few of its 64 bits (re-encoded, resized
    or slightly edited copies of one picture)."""
    import scipy.fftpack

    if not len(pixels):
        return []
    side = PHASH_BITS * 4  # imagehash's highfreq_factor
    small = np.stack(
        [
            np.asarray(
                Image.fromarray(p.squeeze(-1) if p.shape[-1] == 1 else p)
                .convert("L")
                .resize((side, side), Image.Resampling.LANCZOS)
            )
            for p in pixels
        ]
    )
    dct = scipy.fftpack.dct(scipy.fftpack.dct(small, axis=1), axis=2)
    low = dct[:, :PHASH_BITS, :PHASH_BITS].reshape(len(small), -1)
    bits = low > np.median(low, axis=1, keepdims=True)
    return [row.tobytes().hex() for row in np.packbits(bits, axis=1)]


def near_duplicates(
    hashes: pd.DataFrame, against: str = "train", max_distance: int = 4
) -> pd.DataFrame:
    """Rows of `hashes` (columns path, split, phash) outside the `against` split whose pHash
    is within `max_distance` bits of one in it: the test images a model has, in effect, seen
    (3% of CIFAR-10's test images, 10% of CIFAR-100's). Columns path, split, match, distance.
    Hashes compare as 64-bit integers (XOR, popcount), `NEAR_PAIRS` pairs at a time: a
    bit array of every pair took 31 GiB at 50,000 images."""
    ref = hashes[hashes["split"] == against]
    other = hashes[hashes["split"] != against]
    if ref.empty or other.empty:
        return pd.DataFrame(columns=["path", "split", "match", "distance"])
    as_int = lambda h: np.array([int(x, 16) for x in h], dtype=np.uint64)  # noqa: E731
    a, b = as_int(other["phash"]), as_int(ref["phash"])
    best = np.empty(len(a), dtype=np.int64)
    distance = np.empty(len(a), dtype=np.int64)
    rows = max(1, NEAR_PAIRS // len(b))
    for start in range(0, len(a), rows):
        bits = np.bitwise_count(a[start : start + rows, None] ^ b[None, :])
        best[start : start + rows] = bits.argmin(1)
        distance[start : start + rows] = bits.min(1)
    near = distance <= max_distance
    return pd.DataFrame(
        {
            "path": other["path"].to_numpy()[near],
            "split": other["split"].to_numpy()[near],
            "match": ref["path"].to_numpy()[best[near]],
            "distance": distance[near],
        }
    )


def find_images(
    path: str | Path, label_column: str = "label", path_column: str = "path"
) -> pd.DataFrame:
    """The images of an image set, with their label and split (None: to be split): columns
    path, label, split. `path` is one of:
    - a folder per class (`root/<label>/*`), or `root/{train,val,test}/<label>/*` (its splits);
    - a manifest, CSV or Parquet, with `path_column` (relative to the manifest) and
      `label_column`, other columns kept;
    - a glob (`root/*/*.png`): each file's label is its folder's name.
    Files whose suffix is not an image's are skipped, as ImageFolder does."""
    text = str(path)
    if any(c in text for c in "*?["):
        files = sorted(p for p in Path().glob(text) if p.suffix.lower() in SUFFIXES)
        if not files:
            raise FileNotFoundError(f"data.path: {text}: no image file matches")
        return pd.DataFrame({"path": files, "label": [p.parent.name for p in files], "split": None})
    root = Path(path)
    if root.is_file():
        return manifest_images(root, label_column, path_column)
    if not root.is_dir():
        raise FileNotFoundError(f"data.path: {root}: not found")
    splits = [s for s in SPLIT_FOLDERS if (root / s).is_dir()]
    if splits:
        return pd.concat([class_folders(root / s, s) for s in splits], ignore_index=True)
    return class_folders(root, None)


def class_folders(root: Path, split: str | None) -> pd.DataFrame:
    """`root/<label>/*` (nested folders inside a class count as the class's)."""
    rows = [
        (f, folder.name)
        for folder in sorted(p for p in root.iterdir() if p.is_dir())
        for f in sorted(folder.rglob("*"))
        if f.is_file() and f.suffix.lower() in SUFFIXES
    ]
    if not rows:
        raise FileNotFoundError(f"data.path: {root}: no class folder holds an image file")
    paths, labels = zip(*rows, strict=True)
    return pd.DataFrame({"path": list(paths), "label": list(labels), "split": split})


def manifest_images(manifest: Path, label_column: str, path_column: str) -> pd.DataFrame:
    suffix = manifest.suffix.lower()
    if suffix == ".csv":
        frame = pd.read_csv(manifest)
    elif suffix in (".parquet", ".pq"):
        frame = pd.read_parquet(manifest)
    else:
        raise ValueError(f"data.path: {manifest}: a manifest is .csv or .parquet")
    for column in (path_column, label_column):
        if column not in frame.columns:
            raise ValueError(f"{manifest}: column {column!r} missing (data.image.{column}_column)")
    frame = frame.rename(columns={path_column: "path", label_column: "label"})
    frame["path"] = [manifest.parent / p for p in frame["path"].astype(str)]
    if "split" not in frame.columns:
        frame["split"] = None
    return frame


def class_problems(labels: Iterable[str]) -> list[str]:
    """What makes a labelled image set untrainable: one class overall, or a class with a
    single image (none can go to both train and a check split)."""
    counts = pd.Series(list(labels)).value_counts()
    problems = []
    if len(counts) < 2:
        problems.append(
            f"a single class ({', '.join(map(str, counts.index)) or 'none'}): nothing to tell apart"
        )
    problems += [f"class {c!r}: one image" for c, n in counts.items() if n < 2]
    return problems


def render_digits(folder: Path) -> int:
    """scikit-learn's bundled digits (1797 8x8 images, 16 grey levels) written as PNG files,
    `folder/<label>/<index>.png`: an image set that needs no download. Returns the count."""
    from sklearn.datasets import load_digits

    digits = load_digits()
    for i, (pixels, label) in enumerate(zip(digits.images, digits.target, strict=True)):
        path = folder / str(label) / f"{i:04d}.png"
        path.parent.mkdir(parents=True, exist_ok=True)
        grey = np.rint(pixels * (255 / 16)).astype(np.uint8)
        Image.fromarray(grey, "L").save(path, "PNG")
    return len(digits.target)


# --- profiling an image set (profile stage, build report) -------------------------------

REJECTED = "rejected.csv"  # beside the curated splits: the files ingest dropped (path, reason)
# What ingest keeps of each file beside its pixels: where it came from, not what it shows.
# Unique per row, they are not profiled (their frequent items and drift would be noise).
FILE_COLUMNS = ("path", "sha256", "phash")
THUMBNAIL = 48  # a report thumbnail's longest side (a photo-like 64x64 PNG: 6.5 -> 2.8 KB)
DECODE_CHUNK = 1024  # images decoded at once when profiling (64x64 RGB: 12 MB of pixels)


def stat_columns_of(images: Mapping[str, Mapping[str, Any]]) -> dict[str, list[str]]:
    """Image feature -> the columns of its statistics in profiles (`runtime.images.STATS`
    of its mode), from `Schema.images`."""
    return {name: stat_columns(name, image["mode"]) for name, image in images.items()}


def profiled_columns(columns: list[str], images: Mapping[str, Mapping[str, Any]]) -> list[str]:
    """The columns of a split that are profiled: of an image set, all but `FILE_COLUMNS`."""
    return [c for c in columns if not images or c not in FILE_COLUMNS]


def with_image_stats(
    table: pa.Table, images: Mapping[str, Mapping[str, Any]], first_row: int = 0
) -> pa.Table:
    """`table` with each image feature's column (encoded images) followed by its statistics
    (`runtime.images.image_stats`; NaN where the image is missing; the curated splits have
    them from ingest), and without `FILE_COLUMNS`; a table without image features as it is.
    `first_row`: the table's first row in its split (for messages).

    Raises:
        BadImage: a value that is no image of the schema's size and mode, naming its column
            and row.
    """
    if not images:
        return table
    table = table.drop_columns([c for c in FILE_COLUMNS if c in table.column_names])
    for name, image in images.items():
        if name not in table.column_names:
            continue  # the profile names the missing column
        if set(stat_columns(name, image["mode"])) <= set(table.column_names):
            continue  # computed by ingest (curated splits)
        spec = curated_spec(image)
        values = table.column(name).to_pylist()
        present = [i for i, v in enumerate(values) if v is not None]
        columns = {stat: np.full(len(values), np.nan) for stat in STATS[spec.mode]}
        shape = (spec.size[1], spec.size[0], spec.channels)
        for start in range(0, len(present), DECODE_CHUNK):  # pixels of a chunk at a time
            rows = present[start : start + DECODE_CHUNK]
            pixels = np.empty((len(rows), *shape), np.uint8)
            for k, i in enumerate(rows):
                try:
                    pixels[k] = decode(bytes(values[i]), spec)
                except BadImage as err:
                    raise BadImage(f"column {name!r}, row {first_row + i}: {err}") from None
            for stat, got in image_stats(pixels).items():
                columns[stat][rows] = got
        at = table.column_names.index(name) + 1
        for offset, (stat, column) in enumerate(columns.items()):
            table = table.add_column(at + offset, f"{name}.{stat}", pa.array(column))
    return table


def curated_spec(image: Mapping[str, Any]) -> ImageSpec:
    """The decoding of an image feature's curated values (`Schema.images`' entry), as
    `runtime.preprocess.image_spec` (not imported: the stages reading this module would
    depend on it): min_size 1, the images are at the size already."""
    return ImageSpec(
        size=tuple(image["size"]), mode=image["mode"], resize=image["resize"], min_size=1
    )


def thumbnail_png(data: bytes, side: int = THUMBNAIL) -> bytes:
    """An encoded image as PNG bytes at most `side` pixels on its longer side: the bytes as
    they are when they are a PNG that small already (as the digits' 16x16)."""
    with Image.open(io.BytesIO(data)) as img:
        if img.format == "PNG" and max(img.size) <= side:
            return data
        img.load()
        small = img.copy()
    small.thumbnail((side, side), Image.Resampling.BILINEAR)
    out = io.BytesIO()
    small.save(out, "PNG")
    return out.getvalue()


def rejection_kind(reason: str) -> str:
    """A rejected file's reason (ingest's `rejected.csv`) without its particulars (the
    other file, sizes, the decoder's words): what the reports count files by."""
    for kind, pattern in REJECTION_KINDS:
        if re.search(pattern, reason):
            return kind
    return re.split(r"[:(;]", reason, maxsplit=1)[0].strip() or reason


REJECTION_KINDS = (  # the reasons ingest and `runtime.images` write, by their fixed words
    ("near-duplicate of a train image", r"^near-duplicate of "),
    ("duplicate", r"^duplicate of "),
    ("over data.image.max_pixels", r"over data\.image\.max_pixels"),
    ("under data.image.min_size", r"under data\.image\.min_size"),
    ("animated", r"^animated "),
)


def feature_caption(feature: Mapping[str, Any]) -> str:
    """An image feature of the profile's `images.json` in words, as the profile and build
    reports say it above its thumbnails: its size, its mode and how ingest resized it."""
    width, height = feature["size"]
    return (
        f"{width}x{height}, mode {feature['mode']} (every image decoded and resized by ingest:"
        f" {feature['resize']})"
    )
