"""The device artifact (`make device`, the device stage): model.onnx, preprocess.json,
schema.json and runner.py, which score records in a bare virtualenv holding only
onnxruntime and numpy (and Pillow, for an image model's records or files), as the PT2E
program does; an image decoded by the runner as `runtime.images` and the Preprocessor do."""

import ast
import base64
import importlib.util
import io
import json
import shutil
import subprocess
import sys
from pathlib import Path
from types import ModuleType

import numpy as np
import onnx
import pandas as pd
import PIL
import pytest
from PIL import Image
from test_pipeline_images import repo  # noqa: F401  the images one-liner's run (shared)

from fullstack_ml.model import encode_split, predict_logits
from fullstack_ml.paths import DEVICE_RUNNER
from fullstack_ml.runtime.engine import softmax
from fullstack_ml.runtime.preprocess import Preprocessor
from fullstack_ml.runtime.program import load_program
from fullstack_ml.stage import ROOT, StageError
from stages.device import device


@pytest.fixture(scope="module")
def artifact(bento: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The device artifact of the session bento's compressed model."""
    work = bento.parent.parent
    out = tmp_path_factory.mktemp("device") / "device"
    device(work / "int8", work / "schema.json", out)
    return out


def test_the_artifact_is_the_qdq_onnx_program_and_its_json(artifact: Path, bento: Path) -> None:
    assert sorted(p.name for p in artifact.iterdir()) == [
        "model.onnx",
        "preprocess.json",
        "runner.py",
        "schema.json",
    ]
    ops = {node.op_type for node in onnx.load(artifact / "model.onnx").graph.node}
    assert {"QuantizeLinear", "DequantizeLinear"} <= ops  # INT8 kept, not decomposed
    pre = json.loads((artifact / "preprocess.json").read_text())
    meta = json.loads((bento.parent.parent / "int8/model.json").read_text())
    assert pre["features"] == meta["features"] and pre["classes"] == meta["classes"]
    assert pre["mean"] == meta["preprocessing"]["mean"] and pre["input"] == "x"


def test_without_model_onnx_the_stage_fails_naming_the_file(tmp_path: Path, bento: Path) -> None:
    work = bento.parent.parent
    (tmp_path / "model").mkdir()
    (tmp_path / "model/model.json").write_bytes((work / "int8/model.json").read_bytes())
    (tmp_path / "out").mkdir()
    (tmp_path / "out/kept").write_text("an earlier artifact")
    with pytest.raises(StageError, match=r"model/model.onnx: not found .*compress.runtimes"):
        device(tmp_path / "model", work / "schema.json", tmp_path / "out")
    assert (tmp_path / "out/kept").read_text() == "an earlier artifact"


@pytest.fixture(scope="module")
def bare(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The python of a virtualenv of its own, without this project or torch: onnxruntime,
    numpy and the Pillow release that decodes here, as the runner's docstring and the README
    say (installed by uv, as pip would)."""
    bare = tmp_path_factory.mktemp("bare") / "venv"
    uv = Path(sys.executable).parent / "uv"  # a dependency of this project; pip took 20 s more
    subprocess.run([uv, "venv", "-q", "--python", sys.executable, bare], check=True)
    pillow = f"pillow=={PIL.__version__}"  # another resizes otherwise (stages/device.py)
    python = ["--python", str(bare / "bin/python")]
    install = [uv, "pip", "install", "-q", *python, "onnxruntime", "numpy", pillow]
    subprocess.run(install, check=True, capture_output=True)
    listed = subprocess.run(
        [uv, "pip", "list", *python, "--format=json"], check=True, capture_output=True, text=True
    )
    installed = {p["name"].lower() for p in json.loads(listed.stdout)}
    assert "torch" not in installed and "fullstack-ml" not in installed
    return bare / "bin/python"


@pytest.mark.slow
def test_the_runner_scores_in_a_bare_virtualenv_as_the_pt2e_program(
    artifact: Path, bento: Path, curated: Path, tmp_path: Path, bare: Path
) -> None:
    """runner.py in the bare virtualenv on the test split's records."""
    test = pd.read_parquet(curated / "test.parquet")
    meta = json.loads((bento.parent.parent / "int8/model.json").read_text())
    test.loc[test.index[0], meta["features"][0]] = None  # missing: imputed, as the service does
    records = test[meta["features"]].to_dict("records")
    stdin = "".join(json.dumps(r) + "\n" for r in records)
    run = subprocess.run(
        [bare, artifact / "runner.py", artifact],
        input=stdin,
        capture_output=True,
        text=True,
        cwd=tmp_path,
    )
    assert run.returncode == 0, run.stderr[-2000:]
    answers = [json.loads(line) for line in run.stdout.splitlines()]
    logits = predict_logits(
        load_program(bento.parent.parent / "int8/model.pt2"), encode_split(test, meta)[0]
    )
    want = [meta["classes"][i] for i in logits.argmax(1)]
    assert [a["label"] for a in answers] == want
    got = np.array([[a["probabilities"][str(c)] for c in meta["classes"]] for a in answers])
    assert np.abs(got - softmax(logits)).max() <= 0.01  # compress.runtime_tolerance


# ---------------------------------------------------------------------------- images
def load_runner() -> ModuleType:
    spec = importlib.util.spec_from_file_location("device_runner", ROOT / DEVICE_RUNNER)
    runner = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(runner)
    return runner


def encoded(img: Image.Image, fmt: str = "PNG", **options: object) -> bytes:
    out = io.BytesIO()
    img.save(out, fmt, **options)
    return out.getvalue()


def varied_images() -> dict[str, bytes]:
    """Files of each mode the runtime converts, in odd sizes and shapes, and formats."""
    rng = np.random.default_rng(0)
    rgb = Image.fromarray(rng.integers(0, 256, (23, 37, 3), dtype=np.uint8), "RGB")
    alpha = Image.fromarray(np.tile(np.arange(31, dtype=np.uint8) * 8, (30, 1)), "L")
    rgba = rgb.resize((31, 30)).convert("RGBA")
    rgba.putalpha(alpha)
    grey16 = Image.fromarray(rng.integers(0, 65536, (19, 11), dtype=np.uint16))
    exif = Image.Exif()
    exif[0x0112] = 6  # orientation: rotated a quarter turn (a phone's portrait photo)
    return {
        "RGB wide": encoded(rgb),
        "L tall": encoded(rgb.convert("L").transpose(Image.Transpose.TRANSPOSE)),
        "RGBA": encoded(rgba),
        "LA": encoded(rgba.convert("LA")),
        "P": encoded(rgb.convert("P")),
        "P transparent": encoded(rgb.convert("P"), transparency=3),
        "I;16": encoded(grey16),
        "JPEG EXIF-rotated": encoded(rgb.resize((41, 17)), "JPEG", exif=exif),
        "CMYK JPEG": encoded(rgb.convert("CMYK"), "JPEG"),
        "WebP": encoded(rgb.resize((9, 50)), "WEBP"),
        "GIF": encoded(rgb.resize((5, 3)), "GIF"),
    }


def test_the_runner_imports_only_numpy_onnxruntime_pillow_and_the_standard_library() -> None:
    """What a device installs (the bare virtualenv below proves it, as a slow test)."""
    tree = ast.parse((ROOT / DEVICE_RUNNER).read_text())
    names = {a.name for n in ast.walk(tree) if isinstance(n, ast.Import) for a in n.names}
    names |= {n.module for n in ast.walk(tree) if isinstance(n, ast.ImportFrom)}
    assert {n.split(".")[0] for n in names} - set(sys.stdlib_module_names) == {
        "numpy",
        "onnxruntime",
        "PIL",
    }


@pytest.mark.parametrize("mode", ["RGB", "L"])
@pytest.mark.parametrize("resize", ["pad", "crop", "stretch"])
def test_the_runner_decodes_images_as_the_runtime_and_the_preprocessor(
    mode: str, resize: str
) -> None:
    """The runner's standalone decode (Pillow and numpy, no fullstack_ml) gives the values
    `runtime.images.decode` and `Preprocessor.encode_images` give, bit for bit."""
    channels = 3 if mode == "RGB" else 1
    image = {"size": [16, 12], "mode": mode, "channels": channels, "resize": resize}
    image |= {"mean": [0.45, 0.5, 0.55][:channels], "std": [0.2, 0.25, 0.3][:channels]}
    files = varied_images()
    want = Preprocessor([], [], images={"image": image}).encode_images("image", files.values())
    runner = load_runner()
    for (name, data), row in zip(files.items(), want, strict=True):
        np.testing.assert_array_equal(runner.pixels(data, image), row, err_msg=name)


def test_the_runner_names_the_line_and_the_field_of_a_bad_image() -> None:
    runner = load_runner()
    image = {"size": [8, 8], "mode": "L", "channels": 1, "mean": [0.5], "std": [0.2]}
    pre = {"features": ["image"], "images": {"image": {**image, "resize": "pad"}}}
    frames = [Image.new("L", (9, 9), v) for v in (0, 255)]
    animated = encoded(frames[0], "GIF", save_all=True, append_images=frames[1:])
    noise = np.random.default_rng(0).integers(0, 256, (32, 32), dtype=np.uint8)
    png = encoded(Image.fromarray(noise))
    bad = {
        "not base64 text": "%%%",
        r"not an image \(none of PNG, JPEG, WEBP": base64.b64encode(b"GIF89 no image").decode(),
        "animated": base64.b64encode(animated).decode(),
        "4097x4097 is over 16,777,216 pixels": base64.b64encode(
            encoded(Image.new("1", (4097, 4097)))
        ).decode(),
        "image file is truncated": base64.b64encode(png[: len(png) // 2]).decode(),
        "not base64 text of an image file": 7,
    }
    for why, value in bad.items():
        with pytest.raises(runner.BadRecord, match=rf"^line 3: image: .*{why}"):
            runner.checked("line 3", {"image": value}, pre)
    with pytest.raises(runner.BadRecord, match=r"^line 4: image: missing$"):
        runner.checked("line 4", {"picture": png}, pre)


@pytest.mark.slow
def test_an_image_models_artifact_scores_base64_records_and_files_as_the_preprocessor(
    repo: Path,  # noqa: F811  the fixture imported above
    bare: Path,
    tmp_path: Path,
) -> None:
    """The images one-liner's own `models/device` (written by its device stage): the ONNX
    input is the image's C x H x W values; runner.py in the bare virtualenv scores the user's
    original files (mixed sizes, modes, formats) sent as base64 lines, or named as a folder
    and a file, with the answers of the Preprocessor and ONNX Runtime in process; a bad image
    stops it with one line naming the line and the field."""
    import onnxruntime as ort

    artifact = repo / "models/device"
    pre = json.loads((artifact / "preprocess.json").read_text())
    image = pre["images"]["image"]
    assert pre["pillow"] == PIL.__version__
    graph = onnx.load(artifact / "model.onnx").graph
    width = graph.input[0].type.tensor_type.shape.dim[1].dim_value
    assert width == image["channels"] * image["size"][0] * image["size"][1]
    folder = repo / "data/raw/shapes/circle"
    files = [*sorted(folder.iterdir())[:8], repo / "data/raw/shapes/square/000.png"]
    stdin = "".join(
        json.dumps({"image": base64.b64encode(f.read_bytes()).decode()}) + "\n" for f in files
    )
    runner = [bare, artifact / "runner.py", artifact]
    run = subprocess.run(runner, input=stdin, capture_output=True, text=True, cwd=tmp_path)
    assert run.returncode == 0 and not run.stderr, run.stderr[-2000:]
    answers = [json.loads(line) for line in run.stdout.splitlines()]
    meta = json.loads((repo / "models/compressed/model.json").read_text())
    x = Preprocessor.from_dict(meta["preprocessing"]).encode(
        {"image": [f.read_bytes() for f in files]}
    )
    logits = ort.InferenceSession(artifact / "model.onnx").run(None, {"x": x})[0]
    got = np.array([[a["probabilities"][c] for c in meta["classes"]] for a in answers])
    np.testing.assert_allclose(got, softmax(logits), rtol=0, atol=1e-5)
    assert [a["label"] for a in answers] == [meta["classes"][i] for i in logits.argmax(1)]

    named = subprocess.run([*runner, folder, files[-1]], capture_output=True, text=True, check=True)
    by_path = {a.pop("path"): a for a in map(json.loads, named.stdout.splitlines())}
    assert list(by_path) == [str(f) for f in sorted(folder.iterdir())] + [str(files[-1])]
    assert [by_path[str(f)] for f in files] == answers

    bad = stdin.splitlines()[0] + "\n" + json.dumps({"image": base64.b64encode(b"no").decode()})
    run = subprocess.run(runner, input=bad, capture_output=True, text=True)
    assert run.returncode == 1 and len(run.stdout.splitlines()) == 0
    assert (
        run.stderr.strip()
        == "runner: line 2: image: not an image (none of PNG, JPEG, WEBP, GIF, BMP, TIFF)"
    )

    other = tmp_path / "other"
    shutil.copytree(artifact, other)
    (other / "preprocess.json").write_text(json.dumps({**pre, "pillow": "9.0.0"}))
    run = subprocess.run(
        [bare, other / "runner.py", other, files[0]], capture_output=True, text=True
    )
    assert run.returncode == 0 and json.loads(run.stdout)["label"] == answers[0]["label"]
    warning = f"runner: warning: Pillow {PIL.__version__} here, Pillow 9.0.0 decoded for the model"
    assert run.stderr.strip() == warning
