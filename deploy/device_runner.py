"""Score records with the device artifact (`make device`: model.onnx, preprocess.json,
schema.json) and nothing else: Python with numpy and onnxruntime (and Pillow for an image
model), no torch, no fullstack-ml.

    python -m venv bare && bare/bin/pip install onnxruntime numpy
    bare/bin/pip install pillow==<release>  # an image model: preprocess.json's "pillow"
    bare/bin/python models/device/runner.py models/device < records.jsonl > answers.jsonl
    bare/bin/python models/device/runner.py models/device photos/ extra.png > answers.jsonl

Records: each input line is one record, a JSON object of feature -> value (null: missing),
as the service's /predict takes; an image feature's value is the file (PNG, JPEG, WebP,
GIF, BMP, TIFF) in base64, as in the service's JSON requests. Files: for a model whose one
feature is an image, the image files and folders named after the artifact's folder are
scored instead of stdin (a folder: its files of those suffixes, recursively, sorted), each
answer with its `path` first: a device holds files, not base64 in JSON.
Each output line is an answer, as /predict_proba gives (classification: label and class
probabilities) or /predict (regression: value).

An image is decoded as the service decodes it (`fullstack_ml/runtime/images.py`, of which
this is the minimum, proved equal by tests/test_device.py): only those formats; at most
`MAX_PIXELS` by its header, before decoding; not animated; EXIF orientation applied; 16-bit
grey scaled to 8 bits, transparency composited on white; converted to the schema's mode;
fitted to its size (pad: aspect kept in black borders, crop: the centre, stretch); scaled
to 0-1, normalised by the train split's mean and std per channel, laid out (C, H, W).
Pillow: install the release preprocess.json names (`pillow`, an image model's only); its
resizing changed between releases (answers 3e-4 apart), so on another the runner warns.
A bad record or file: one line on stderr naming the line (or file) and the field, exit 1;
the answers of the batches (`BATCH` records) before its own are written already.
"""

import base64
import binascii
import io
import json
import sys
import warnings
from collections.abc import Iterator
from itertools import islice
from pathlib import Path

import numpy as np

FORMATS = ("PNG", "JPEG", "WEBP", "GIF", "BMP", "TIFF")  # what Pillow may open
SUFFIXES = {".png", ".jpg", ".jpeg", ".webp", ".gif", ".bmp", ".tif", ".tiff"}
MAX_PIXELS = 16_777_216  # width x height from the header: the service's serve.max_pixels
BATCH = 256


class BadRecord(ValueError):
    """A record or file that cannot be scored; the message names it and the field."""


def encode(records: list[dict], pre: dict) -> np.ndarray:
    """The training preprocessing: numbers imputed (median) and standardised, categories
    one-hot over the train vocabulary (slot 0: unknown or missing), then the images'
    values (`checked` decoded them: `pixels`)."""
    width = len(pre["numeric"]) + sum(len(pre["vocab"][c]) + 1 for c in pre["categorical"])
    sizes = {n: i["channels"] * i["size"][0] * i["size"][1] for n, i in pre["images"].items()}
    x = np.zeros((len(records), width + sum(sizes.values())), dtype=np.float32)
    for i, name in enumerate(pre["numeric"]):
        values = np.array([r[name] for r in records], dtype=np.float64)  # None -> nan
        values = np.where(np.isnan(values), pre["median"][i], values)
        x[:, i] = (values - pre["mean"][i]) / pre["std"][i]
    offset = len(pre["numeric"])
    for name in pre["categorical"]:
        slots = {value: k + 1 for k, value in enumerate(pre["vocab"][name])}
        for row, record in enumerate(records):
            x[row, offset + slots.get(record[name], 0)] = 1.0
        offset += len(pre["vocab"][name]) + 1
    for name in pre["images"]:
        x[:, offset : offset + sizes[name]] = np.stack([r[name] for r in records])
        offset += sizes[name]
    return x


def pixels(data: bytes, image: dict) -> np.ndarray:
    """An image file's bytes as the model's normalised (C, H, W) values, flattened, by the
    schema's `image` entry (`runtime/images.py`'s decode, then `Preprocessor.encode_images`).

    Raises:
        ValueError: no usable image, saying why in one line.
    """
    from PIL import Image, ImageOps, UnidentifiedImageError

    with warnings.catch_warnings():  # Pillow warns past 89 MP: MAX_PIXELS decides
        warnings.simplefilter("ignore", Image.DecompressionBombWarning)
        try:
            img = Image.open(io.BytesIO(data), formats=FORMATS)
            if img.width * img.height > MAX_PIXELS:
                raise ValueError(f"{img.width}x{img.height} is over {MAX_PIXELS:,} pixels")
            if getattr(img, "n_frames", 1) > 1:
                raise ValueError(f"animated ({img.n_frames} frames)")
            img.load()
        except UnidentifiedImageError:
            raise ValueError(f"not an image (none of {', '.join(FORMATS)})") from None
        except (OSError, SyntaxError, ValueError, Image.DecompressionBombError) as err:
            raise ValueError((str(err).strip().splitlines() or [type(err).__name__])[0]) from None
    img = ImageOps.exif_transpose(img)
    if img.mode in ("I;16", "I;16B", "I;16L", "I", "F"):  # 16 bits of grey: 8 bits
        grey = np.asarray(img, dtype=np.float64) / (1.0 if img.mode == "F" else 257.0)
        img = Image.fromarray(np.clip(np.rint(grey), 0, 255).astype(np.uint8), "L")
    if (
        img.mode in ("PA", "RGBA", "LA", "La", "RGBa")
        or img.mode == "P"
        and "transparency" in img.info
    ):
        back = Image.new("RGBA", img.size, (255, 255, 255, 255))  # transparent: white
        img = Image.alpha_composite(back, img.convert("RGBA"))
    size, how = tuple(image["size"]), image["resize"]
    img = img.convert(image["mode"])
    if how == "stretch":
        img = img.resize(size, Image.Resampling.BILINEAR)
    elif how == "crop":
        img = ImageOps.fit(img, size, Image.Resampling.BILINEAR)
    else:
        img = ImageOps.pad(img, size, Image.Resampling.BILINEAR, color=0)
    x = np.asarray(img, dtype=np.uint8).reshape(size[1], size[0], -1).astype(np.float32)
    x *= np.float32(1 / 255)
    x -= np.asarray(image["mean"], dtype=np.float32)
    x /= np.asarray(image["std"], dtype=np.float32)
    return x.transpose(2, 0, 1).ravel()


def answers(outputs: np.ndarray, pre: dict) -> list[dict]:
    if pre["task"] == "regression":
        return [{"value": float(v * pre["target_std"] + pre["target_mean"])} for v in outputs[:, 0]]
    z = np.exp(outputs - outputs.max(axis=1, keepdims=True))
    probs = z / z.sum(axis=1, keepdims=True)
    names = [str(c) for c in pre["classes"]]
    return [
        {
            "label": pre["classes"][p.argmax()],
            "probabilities": dict(zip(names, p.tolist(), strict=True)),
        }
        for p in probs
    ]


def checked(where: str, record: object, pre: dict) -> dict:
    """`record` with its images' bytes decoded to values (BadRecord naming `where` and the
    field otherwise): a file's `Path`, or base64 text."""
    if not isinstance(record, dict):
        raise BadRecord(f"{where}: not a JSON object of feature -> value")
    for name in pre["features"]:
        if name not in record:
            raise BadRecord(f"{where}: {name}: missing")
    out = dict(record)
    for name, image in pre["images"].items():
        try:
            value = record[name]
            if isinstance(value, Path):
                data = value.read_bytes()
            elif isinstance(value, str):
                data = base64.b64decode(value, validate=True)
            else:
                raise ValueError("not base64 text of an image file")
            out[name] = pixels(data, image)
        except (binascii.Error, OSError, ValueError) as err:
            reason = "not base64 text" if isinstance(err, binascii.Error) else str(err)
            raise BadRecord(f"{where}: {name}: {reason}") from None
    return out


def from_stdin() -> Iterator[tuple[str, dict]]:
    for n, line in enumerate(sys.stdin, 1):
        if line.strip():
            try:
                yield f"line {n}", json.loads(line)
            except json.JSONDecodeError as err:
                raise BadRecord(f"line {n}: not JSON ({err})") from None


def from_files(args: list[str], pre: dict) -> Iterator[tuple[str, dict]]:
    if list(pre["images"]) != pre["features"] or len(pre["features"]) != 1:
        raise BadRecord(f"files: the model takes {pre['features']}, not one image: use stdin")
    for arg in map(Path, args):
        found = sorted(arg.rglob("*")) if arg.is_dir() else [arg]  # a file named: any suffix
        for path in found:
            if path is arg or path.suffix.lower() in SUFFIXES and path.is_file():
                yield str(path), {pre["features"][0]: path}


def main(argv: list[str]) -> None:
    import onnxruntime as ort

    folder = Path(argv[0] if argv else ".")
    pre = json.loads((folder / "preprocess.json").read_text())
    pre.setdefault("images", {})  # an artifact of a model without images may lack it
    session = ort.InferenceSession(str(folder / "model.onnx"))
    if pre["images"]:
        from PIL import __version__ as pillow

        if pre.get("pillow", pillow) != pillow:
            built = f"Pillow {pre['pillow']} decoded for the model"
            print(f"runner: warning: Pillow {pillow} here, {built}", file=sys.stderr)
    items = from_files(argv[1:], pre) if argv[1:] else from_stdin()
    try:
        while batch := list(islice(items, BATCH)):
            x = encode([checked(where, record, pre) for where, record in batch], pre)
            outputs = session.run(None, {pre["input"]: x})[0]
            for (where, _), answer in zip(batch, answers(outputs, pre), strict=True):
                print(json.dumps({"path": where, **answer} if argv[1:] else answer))
    except BadRecord as err:
        print(f"runner: {err}", file=sys.stderr)
        sys.exit(1)


if __name__ == "__main__":
    main(sys.argv[1:])
