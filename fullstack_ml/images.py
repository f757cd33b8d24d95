"""Images as a feature kind (issue 34, its first part): a file's bytes decoded with Pillow
into the fixed size and mode a model takes, with the checks that name what is wrong with a
bad file, the hashes that find duplicates, and the ways a user lays out an image set.

Decoding: only the formats in `FORMATS` (Pillow is told, so a file of another kind is refused
whatever its suffix); the pixel limit is checked on the header's size, before any pixel is
decoded; EXIF orientation applied; 16-bit, palette, alpha and CMYK images converted; then
resized to `ImageSpec.size` by padding, cropping or stretching.
Animated images: `ImageSpec.animated` is `fail` (the default: a model of single images
should not silently see one frame of a clip) or `first` (the first frame).
"""

import hashlib
import io
import re
import warnings
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pandas as pd
from PIL import Image, ImageOps, UnidentifiedImageError

FORMATS = ("PNG", "JPEG", "WEBP", "GIF", "BMP", "TIFF")
SUFFIXES = frozenset({".png", ".jpg", ".jpeg", ".webp", ".gif", ".bmp", ".tif", ".tiff"})
SPLIT_FOLDERS = ("train", "val", "test")
RESIZE = ("pad", "crop", "stretch")
BACKGROUND = 255  # what transparent pixels become (white, as a browser shows them)


class BadImage(ValueError):
    """A file that is no usable image; the message says why, in one line."""


@dataclass(frozen=True)
class ImageSpec:
    """What every image becomes: `size` (width, height) in `mode` (RGB or L)."""

    size: tuple[int, int] = (64, 64)
    mode: str = "RGB"
    resize: str = "pad"  # pad (keep the aspect, black borders) | crop (centre) | stretch
    max_pixels: int = 50_000_000  # width x height, from the header, before decoding
    min_size: int = 8  # the shorter side, in pixels
    animated: str = "fail"  # fail | first (frame)

    def __post_init__(self) -> None:
        if self.mode not in ("RGB", "L"):
            raise ValueError(f"data.image.mode: {self.mode!r} is not RGB | L")
        if self.resize not in RESIZE:
            raise ValueError(f"data.image.resize: {self.resize!r} is not {' | '.join(RESIZE)}")
        if self.animated not in ("fail", "first"):
            raise ValueError(f"data.image.animated: {self.animated!r} is not fail | first")

    @property
    def channels(self) -> int:
        return 3 if self.mode == "RGB" else 1


def open_checked(data: bytes, spec: ImageSpec) -> Image.Image:
    """The image in `data`, decoded and checked (BadImage naming the reason otherwise)."""
    if not data:
        raise BadImage("empty file (0 bytes)")
    with warnings.catch_warnings():  # Pillow warns past 89 MP: the limit below decides
        warnings.simplefilter("ignore", Image.DecompressionBombWarning)
        try:
            img = Image.open(io.BytesIO(data), formats=FORMATS)
        except UnidentifiedImageError:
            raise BadImage(f"not an image (none of {', '.join(FORMATS)})") from None
        except Image.DecompressionBombError as err:  # Pillow's own limit, 2 x 89 MP
            found = re.search(r"\((\d+) pixels\)", str(err))
            pixels = f"{int(found.group(1)):,} pixels" if found else "its size"
            raise BadImage(
                f"{pixels}, over data.image.max_pixels {spec.max_pixels:,} and Pillow's"
                f" limit {2 * Image.MAX_IMAGE_PIXELS:,} (read from the header, not decoded)"
            ) from None
        except (OSError, SyntaxError, ValueError) as err:
            raise BadImage(f"unreadable: {one_line(err)}") from None
        width, height = img.size  # the header's: nothing decoded yet
        if width * height > spec.max_pixels:
            raise BadImage(
                f"{width}x{height} is {width * height:,} pixels, over data.image.max_pixels"
                f" {spec.max_pixels:,} (read from the header, not decoded)"
            )
        if min(width, height) < spec.min_size:
            raise BadImage(f"{width}x{height}: under data.image.min_size {spec.min_size}")
        frames = getattr(img, "n_frames", 1)
        if frames > 1 and spec.animated == "fail":
            raise BadImage(f"animated ({frames} frames); data.image.animated=first takes one")
        try:
            img.load()  # the first frame
        except (OSError, SyntaxError, ValueError) as err:
            raise BadImage(f"truncated or corrupt: {one_line(err)}") from None
    return img


def one_line(err: BaseException) -> str:
    return (str(err).strip().splitlines() or [type(err).__name__])[0]


def to_mode(img: Image.Image, mode: str) -> Image.Image:
    """`img` in `mode` (RGB or L): 16- and 32-bit greys scaled to 8 bits, alpha (and a
    palette's transparency) composited on white, CMYK and the rest converted by Pillow."""
    if img.mode in ("I;16", "I;16B", "I;16L", "I", "F"):
        grey = np.asarray(img, dtype=np.float64)
        if img.mode != "F":  # 16 bits of grey (PNG's 16-bit opens as I or I;16)
            grey = grey / 257.0
        img = Image.fromarray(np.clip(np.rint(grey), 0, 255).astype(np.uint8), "L")
    if img.mode == "P" and "transparency" in img.info or img.mode == "PA":
        img = img.convert("RGBA")
    if img.mode in ("RGBA", "LA", "La", "RGBa"):
        img = img.convert("RGBA")
        back = Image.new("RGBA", img.size, (BACKGROUND,) * 3 + (255,))
        img = Image.alpha_composite(back, img)
    return img.convert(mode)


def fit(img: Image.Image, size: tuple[int, int], how: str) -> Image.Image:
    """`img` at `size`: `pad` keeps the aspect ratio in black borders, `crop` fills and cuts
    the centre, `stretch` ignores the aspect ratio."""
    resample = Image.Resampling.BILINEAR
    if how == "stretch":
        return img.resize(size, resample)
    if how == "crop":
        return ImageOps.fit(img, size, resample)
    return ImageOps.pad(img, size, resample, color=0)


def decode(data: bytes, spec: ImageSpec) -> np.ndarray:
    """`data` (a file's bytes) as a uint8 array (height, width, channels) by `spec`."""
    img = open_checked(data, spec)
    img = ImageOps.exif_transpose(img)  # a phone's portrait photo stands up
    out = np.asarray(fit(to_mode(img, spec.mode), spec.size, spec.resize), dtype=np.uint8)
    return out.reshape(spec.size[1], spec.size[0], spec.channels)


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
