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
    img = open_checked(data, spec)
    img = ImageOps.exif_transpose(img)  # a phone's portrait photo stands up
    out = np.asarray(fit(to_mode(img, spec.mode), spec.size, spec.resize), dtype=np.uint8)
    return out.reshape(spec.size[1], spec.size[0], spec.channels)
