"""An image's bytes decoded with Pillow into the fixed size and mode a model takes, with the
checks that name what is wrong with a bad file: what ingest, the service and batch scoring
share (numpy and Pillow only, so the bento ships it).

Decoding: only the formats in `FORMATS` (Pillow is told, so a file of another kind is refused
whatever its suffix); the pixel limit is checked on the header's size, before any pixel is
decoded; EXIF orientation applied; 16-bit, palette, alpha and CMYK images converted; then
resized to `ImageSpec.size` by padding, cropping or stretching.
Animated images: `ImageSpec.animated` is `fail` (the default: a model of single images
should not silently see one frame of a clip) or `first` (the first frame).
"""

import io
import re
import warnings
from dataclasses import dataclass

import numpy as np
from PIL import Image, ImageOps, UnidentifiedImageError

FORMATS = ("PNG", "JPEG", "WEBP", "GIF", "BMP", "TIFF")
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
    return pixels_of(open_checked(data, spec), spec)


def pixels_of(img: Image.Image, spec: ImageSpec) -> np.ndarray:
    """An image `open_checked` gave as a uint8 array (height, width, channels) by `spec`."""
    img = ImageOps.exif_transpose(img)  # a phone's portrait photo stands up
    out = np.asarray(fit(to_mode(img, spec.mode), spec.size, spec.resize), dtype=np.uint8)
    return out.reshape(spec.size[1], spec.size[0], spec.channels)


# --- statistics per image (profile, drift) ----------------------------------------------
# Computed here with numpy, not with whylogs' image extra (`whylogs.extras.image_metric`):
# that logs one PIL image at a time (an HSV conversion, EXIF and a submetric update per value
# in Python: 19 ms a 64x64 RGB image here, against 0.07 ms for `image_stats` in a batch; 1 us
# a 16x16 grey one) into a metric of its own that whylogs' KS and Chi-square drift do not
# score, while the served drift monitor takes numbers. As numeric columns named
# `<feature>.<stat>` (`stat_columns`), an image's statistics go through the profile, the
# constraints, drift and the outlier EDA like any numeric feature. The images are already
# at the schema's size (the thumbnail the extra wants first). Scale: 0-255, as Pillow's HSV
# (`Image.convert("HSV")`), which whylogs' extra uses too.
STATS = {
    "L": ("brightness_mean", "brightness_std", "sharpness"),
    "RGB": (
        "brightness_mean",
        "brightness_std",
        "sharpness",
        "saturation_mean",
        "saturation_std",
        "hue_mean",
        "hue_std",
    ),
}  # per mode; a grey image has no hue or saturation (Pillow's are 0: constant columns)


STATS_CHUNK_PIXELS = 65_536  # pixels of the images `image_stats` takes at once


def stat_columns(feature: str, mode: str) -> list[str]:
    """The columns of an image feature's statistics in profiles: `<feature>.<stat>`."""
    return [f"{feature}.{stat}" for stat in STATS[mode]]


def image_stats(pixels: np.ndarray) -> dict[str, np.ndarray]:
    """Per image of a batch of uint8 pixels (N, H, W, C), C 1 (L) or 3 (RGB), float64 arrays
    of N by `STATS[mode]`: brightness (HSV's value: the grey level, or max(R, G, B)) mean and
    standard deviation (contrast), sharpness (the mean absolute difference of neighbouring
    pixels' brightness: blur lowers it, noise raises it) and, for RGB, saturation and hue
    (Pillow's HSV, unrounded: within 1 of it) mean and standard deviation."""
    if pixels.ndim != 4 or pixels.shape[-1] not in (1, 3) or pixels.dtype != np.uint8:
        raise ValueError(
            f"image_stats: pixels {pixels.dtype} {pixels.shape}, not uint8 (N, H, W, 1 or 3)"
        )
    names = STATS["L" if pixels.shape[-1] == 1 else "RGB"]
    out = {name: np.empty(len(pixels)) for name in names}
    # a few images at a time: the float32 temporaries of a whole batch left the cache (a
    # batch of 256 64x64 images: 4 MB each) and would grow with profile.batch_rows
    step = max(1, STATS_CHUNK_PIXELS // max(pixels.shape[1] * pixels.shape[2], 1))
    for start in range(0, len(pixels), step):
        for name, values in _stats(pixels[start : start + step]).items():
            out[name][start : start + step] = values
    return out


def _stats(pixels: np.ndarray) -> dict[str, np.ndarray]:
    n = len(pixels)
    if pixels.shape[-1] == 1:
        value = pixels[..., 0]
    else:
        value = np.maximum(np.maximum(pixels[..., 0], pixels[..., 1]), pixels[..., 2])
    v = value.astype(np.int16)
    across = np.abs(np.diff(v, axis=2)).reshape(n, -1).sum(axis=1, dtype=np.int64)
    down = np.abs(np.diff(v, axis=1)).reshape(n, -1).sum(axis=1, dtype=np.int64)
    pairs = max(v.shape[1] * (v.shape[2] - 1) + (v.shape[1] - 1) * v.shape[2], 1)
    out = {"sharpness": (across + down) / pairs}
    out["brightness_mean"], out["brightness_std"] = _mean_std(value.reshape(n, -1))
    if pixels.shape[-1] == 3:
        saturation, hue = _saturation_hue(pixels.reshape(n, -1, 3))
        out["saturation_mean"], out["saturation_std"] = _mean_std(saturation)
        out["hue_mean"], out["hue_std"] = _mean_std(hue)
    return out


def _mean_std(x: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Per row: the mean and the population standard deviation, as float64, from float32
    sums (numpy's pairwise; float64 took twice the time) of the values less the row's first
    (the variance is the same; E[x^2] - E[x]^2 of float32 values near 255 would lose it)."""
    x = x.astype(np.float32)
    first = x[:, 0].copy()
    x -= first[:, None]
    shift = x.mean(axis=1)
    var = np.maximum(np.square(x).mean(axis=1) - shift * shift, 0)
    return (first + shift).astype(np.float64), np.sqrt(var).astype(np.float64)


def _saturation_hue(rgb: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """(N, H*W) saturation and hue, 0-255, of uint8 RGB (N, H*W, 3) as Pillow's rgb2hsv
    computes them (grey pixels have 0 for both), branch-free: masks multiplied in, in
    float32 planes (np.where on a mask: 70 us a 64x64 image here; this, 40)."""
    r, g, b = (rgb[..., k].astype(np.float32) for k in range(3))
    high = np.maximum(np.maximum(r, g), b)
    spread = high - np.minimum(np.minimum(r, g), b)
    saturation = spread * (np.float32(255) / np.maximum(high, 1))
    red = (r == high).astype(np.float32)
    green = (g == high).astype(np.float32) * (1 - red)  # the highest, and red is not
    blue = 1 - red - green
    turn = red * (g - b) + green * (2 * spread + b - r) + blue * (4 * spread + r - g)
    hue = turn * (np.float32(255 / 6) / np.maximum(spread, 1))
    hue += np.float32(255) * (hue < 0)
    return saturation, hue
