"""Images as a feature kind (issue 34): the ways a user lays out an image set, the hashes that
find duplicates, and the checks on an image set's classes. Decoding a file lives in
`runtime.images` (the bento ships it); it is re-exported here.
"""

import hashlib
from collections.abc import Iterable
from pathlib import Path

import numpy as np
import pandas as pd
from PIL import Image

from fullstack_ml.runtime.images import (  # noqa: F401  re-exported: one import for stages
    FORMATS,
    RESIZE,
    BadImage,
    ImageSpec,
    decode,
    fit,
    open_checked,
    to_mode,
)

SUFFIXES = frozenset({".png", ".jpg", ".jpeg", ".webp", ".gif", ".bmp", ".tif", ".tiff"})
SPLIT_FOLDERS = ("train", "val", "test")


def content_hash(data: bytes) -> str:
    """sha256 of the file's bytes: equal files, exact duplicates."""
    return hashlib.sha256(data).hexdigest()


def perceptual_hash(pixels: np.ndarray) -> str:
    """pHash (imagehash) of a decoded image: near-duplicates differ in a few of its 64 bits
    (re-encoded, resized or slightly edited copies of one picture)."""
    import imagehash

    return str(imagehash.phash(Image.fromarray(pixels.squeeze())))


def near_duplicates(
    hashes: pd.DataFrame, against: str = "train", max_distance: int = 4
) -> pd.DataFrame:
    """Rows of `hashes` (columns path, split, phash) outside the `against` split whose pHash
    is within `max_distance` bits of one in it: the test images a model has, in effect, seen
    (3% of CIFAR-10's test images, 10% of CIFAR-100's). Columns path, split, match, distance."""
    ref = hashes[hashes["split"] == against]
    other = hashes[hashes["split"] != against]
    if ref.empty or other.empty:
        return pd.DataFrame(columns=["path", "split", "match", "distance"])
    bits = lambda h: np.unpackbits(  # noqa: E731  64 bits per hash
        np.frombuffer(bytes.fromhex("".join(h)), np.uint8).reshape(len(h), -1), axis=1
    )
    a, b = bits(list(other["phash"])), bits(list(ref["phash"]))
    distance = (a[:, None, :] != b[None, :, :]).sum(2)  # other x train
    best = distance.argmin(1)
    near = distance[np.arange(len(other)), best] <= max_distance
    return pd.DataFrame(
        {
            "path": other["path"].to_numpy()[near],
            "split": other["split"].to_numpy()[near],
            "match": ref["path"].to_numpy()[best[near]],
            "distance": distance[np.arange(len(other)), best][near],
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
