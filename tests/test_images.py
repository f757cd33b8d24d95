"""Images as a feature kind (fullstack_ml.images): decoding by the spec, each bad file named
by its reason, duplicates and near-duplicates, and the layouts of an image set."""

import io
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
from PIL import Image

from fullstack_ml.images import (
    BadImage,
    ImageSpec,
    class_problems,
    content_hash,
    decode,
    find_images,
    near_duplicates,
    perceptual_hashes,
)

SPEC = ImageSpec(size=(16, 16), mode="RGB")


def encoded(img: Image.Image, fmt: str, **kw: object) -> bytes:
    out = io.BytesIO()
    img.save(out, fmt, **kw)
    return out.getvalue()


def picture(width: int = 40, height: int = 20, seed: int = 0) -> Image.Image:
    """A photo-like RGB image: a smooth gradient and a bright block on the left."""
    rng = np.random.default_rng(seed)
    x = np.linspace(0, 200, width)[None, :, None] + np.zeros((height, 1, 3))
    x[:, : width // 4] = 250
    x += rng.normal(0, 3, x.shape)
    return Image.fromarray(np.clip(x, 0, 255).astype(np.uint8), "RGB")


@pytest.mark.parametrize("fmt", ["PNG", "JPEG", "WEBP", "BMP", "TIFF"])
def test_every_format_decodes_to_the_specs_size_and_mode(fmt: str) -> None:
    got = decode(encoded(picture(), fmt), SPEC)
    assert got.shape == (16, 16, 3) and got.dtype == np.uint8
    grey = decode(encoded(picture(), fmt), ImageSpec(size=(8, 12), mode="L"))
    assert grey.shape == (12, 8, 1)


def test_pad_crop_and_stretch_resize_as_named() -> None:
    wide = picture(40, 20)
    pad = decode(encoded(wide, "PNG"), ImageSpec(size=(16, 16), resize="pad"))
    assert (pad[:4] == 0).all() and (pad[-4:] == 0).all() and pad[8].max() > 0  # borders
    crop = decode(encoded(wide, "PNG"), ImageSpec(size=(16, 16), resize="crop"))
    assert crop[:, 0].mean() < 200  # the bright left quarter is cut off
    stretch = decode(encoded(wide, "PNG"), ImageSpec(size=(16, 16), resize="stretch"))
    assert stretch[:, 0].mean() > 240 and (stretch[0] > 0).any()  # all of it, no border


def test_exif_orientation_is_applied() -> None:
    """A portrait photo stored landscape with EXIF Orientation 6 (rotate 90) stands up."""
    exif = Image.Exif()
    exif[0x0112] = 6
    data = encoded(picture(40, 20), "JPEG", exif=exif)
    got = decode(data, ImageSpec(size=(20, 40), mode="L", resize="stretch"))
    assert got.shape == (40, 20, 1)
    assert got[:10].mean() > 200 > got[-10:].mean()  # the bright left block is now on top


def test_16_bit_palette_alpha_and_cmyk_images_convert() -> None:
    deep = Image.fromarray((np.arange(400).reshape(20, 20) * 160).astype(np.uint16), "I;16")
    grey = decode(encoded(deep, "PNG"), ImageSpec(size=(20, 20), mode="L"))
    assert grey.max() > 240 and grey.min() == 0  # 16 bits scaled to 8, not clipped
    clear = Image.new("RGBA", (20, 20), (0, 0, 0, 0))
    assert (decode(encoded(clear, "PNG"), SPEC)[2:14, 2:14] == 255).all()  # alpha: on white
    palette = picture().convert("P", palette=Image.Palette.ADAPTIVE)
    palette.info["transparency"] = 0
    assert decode(encoded(palette, "PNG", transparency=0), SPEC).shape == (16, 16, 3)
    cmyk = picture().convert("CMYK")
    rgb = decode(encoded(cmyk, "JPEG"), SPEC)
    assert abs(rgb.astype(int) - decode(encoded(picture(), "JPEG"), SPEC)).mean() < 12


def test_each_bad_file_is_named_by_its_reason(tmp_path: Path) -> None:
    png = encoded(picture(), "PNG")
    cases = {
        b"": "empty file",
        b"name,label\nx,1\n": "not an image",
        png[: len(png) // 2]: "truncated or corrupt",
        encoded(picture(6, 6), "PNG"): "under data.image.min_size 8",
    }
    for data, reason in cases.items():
        with pytest.raises(BadImage, match=reason):
            decode(data, SPEC)


def test_the_pixel_limit_is_read_from_the_header_before_decoding() -> None:
    """A file whose header claims 20000 x 20000 but holds a few bytes of data: refused on the
    header's size (decoding it would first fail as truncated)."""
    header = encoded(Image.new("L", (20000, 20000)), "PNG")[:200]  # header + a little data
    with pytest.raises(BadImage, match=r"400,000,000 pixels, over data.image.max_pixels"):
        decode(header, SPEC)
    small = ImageSpec(size=(16, 16), max_pixels=100)
    with pytest.raises(BadImage, match="over data.image.max_pixels 100"):
        decode(encoded(picture(), "PNG"), small)


def test_animated_images_fail_by_default_or_give_their_first_frame() -> None:
    frames = [Image.new("RGB", (20, 20), c) for c in ((255, 0, 0), (0, 0, 255))]
    gif = encoded(frames[0], "GIF", save_all=True, append_images=frames[1:])
    with pytest.raises(BadImage, match=r"animated \(2 frames\)"):
        decode(gif, SPEC)
    first = decode(gif, ImageSpec(size=(16, 16), animated="first", resize="stretch"))
    assert first[..., 0].mean() > 200 > first[..., 2].mean()  # red, the first frame
    with pytest.raises(ValueError, match="data.image.animated: 'all'"):
        ImageSpec(animated="all")


def shapes(seed: int, size: int = 128) -> Image.Image:
    """A picture with structure (pHash reads its low frequencies): random boxes and discs."""
    from PIL import ImageDraw

    rng = np.random.default_rng(seed)
    img = Image.new("RGB", (size, size), tuple(int(c) for c in rng.integers(0, 255, 3)))
    draw = ImageDraw.Draw(img)
    for _ in range(6):
        x0, y0 = rng.integers(0, size * 3 // 4, 2)
        box = (
            int(x0),
            int(y0),
            int(x0 + rng.integers(10, size // 2)),
            int(y0 + rng.integers(10, size // 2)),
        )
        colour = tuple(int(c) for c in rng.integers(0, 255, 3))
        (draw.ellipse if rng.random() < 0.5 else draw.rectangle)(box, fill=colour)
    return img


def test_duplicates_exact_by_content_and_near_by_perceptual_hash() -> None:
    """A re-encoded, resized copy of a training image in test is found (and named with its
    match); other pictures are not."""
    a = shapes(0)
    assert content_hash(encoded(a, "PNG")) == content_hash(encoded(a, "PNG"))
    assert content_hash(encoded(a, "PNG")) != content_hash(encoded(a, "JPEG", quality=70))
    spec = ImageSpec(size=(64, 64), resize="stretch")
    files = {
        "train/a.png": encoded(a, "PNG"),
        "train/b.png": encoded(shapes(1), "PNG"),
        "test/a.jpg": encoded(a.resize((100, 100)), "JPEG", quality=70),  # a copy
        "test/c.png": encoded(shapes(2), "PNG"),
    }
    hashes = pd.DataFrame(
        {
            "path": list(files),
            "split": [p.split("/")[0] for p in files],
            "phash": perceptual_hashes([decode(data, spec) for data in files.values()]),
        }
    )
    near = near_duplicates(hashes)
    assert near["path"].tolist() == ["test/a.jpg"] and near["match"].tolist() == ["train/a.png"]


def test_perceptual_hashes_are_imagehashs_phash() -> None:
    """The batched pHash equals imagehash's, one image at a time, on RGB and grey images
    of several sizes (grey ones as (H, W, 1), as decoding gives them)."""
    import imagehash

    spec_rgb, spec_grey = ImageSpec(size=(64, 64)), ImageSpec(size=(40, 24), mode="L")
    pixels = [decode(encoded(shapes(k), "PNG"), spec_rgb) for k in range(12)]
    pixels += [decode(encoded(shapes(k), "JPEG"), spec_grey) for k in range(12, 20)]
    expected = [str(imagehash.phash(Image.fromarray(p.squeeze()))) for p in pixels]
    assert perceptual_hashes(pixels[:12]) + perceptual_hashes(pixels[12:]) == expected
    assert len(set(expected)) == len(expected) and perceptual_hashes([]) == []


def write(path: Path, img: Image.Image, fmt: str = "PNG") -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(encoded(img, fmt))


def test_a_folder_per_class_split_folders_a_manifest_and_a_glob(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    for label in ("cat", "dog"):
        for i in range(3):
            write(tmp_path / "flat" / label / f"{i}.png", picture(seed=i))
    (tmp_path / "flat/cat/notes.txt").write_text("not an image: skipped")
    flat = find_images(tmp_path / "flat")
    assert sorted(flat["label"].value_counts().items()) == [("cat", 3), ("dog", 3)]
    assert flat["split"].isna().all()
    for split in ("train", "val", "test"):
        write(tmp_path / "split" / split / "cat" / "0.jpg", picture(), "JPEG")
    assert sorted(find_images(tmp_path / "split")["split"]) == ["test", "train", "val"]
    pd.DataFrame({"file": ["flat/cat/0.png"], "kind": ["cat"], "extra": [1]}).to_csv(
        tmp_path / "m.csv", index=False
    )
    listed = find_images(tmp_path / "m.csv", label_column="kind", path_column="file")
    assert listed["path"][0] == tmp_path / "flat/cat/0.png" and listed["extra"][0] == 1
    monkeypatch.chdir(tmp_path)
    assert len(find_images("flat/*/*.png")) == 6
    with pytest.raises(FileNotFoundError, match="no image file matches"):
        find_images("flat/*/*.webp")
    with pytest.raises(ValueError, match="column 'label' missing"):
        find_images(tmp_path / "m.csv", path_column="file")


def test_a_single_class_or_a_class_of_one_image_is_named() -> None:
    assert class_problems(["a", "a", "b", "b"]) == []
    assert class_problems(["a", "a"]) == ["a single class (a): nothing to tell apart"]
    assert class_problems(["a", "a", "b"]) == ["class 'b': one image"]
