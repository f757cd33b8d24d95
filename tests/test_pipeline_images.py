"""End to end on an image set a user made: `dvc exp run -S data=images -S data.path=<folder>`
in a temporary git repo (a ConvNet by default, INT8, a bento), then the bento served over
HTTP taking JSON, multipart and raw image bodies; and a folder with bad files, each named."""

import base64
import io
import json
import os
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import requests
from PIL import Image, ImageDraw
from test_pipeline import SHRUNK, exp_run, new_repo, sh

from fullstack_ml.bento import serve_bento

pytestmark = pytest.mark.slow
CLASSES = ("circle", "square", "triangle")
IMAGES = ["data=images", "data.path=data/raw/shapes"]  # the README's one-liner
# Shrunk as tests/test_pipeline.py's runs, and smaller images (the one-liner's default is
# 64x64): the test is of the path, not of accuracy.
SMALL = [*SHRUNK, "data.image.size=[32,32]", "compress.compile=false", "distil.epochs=2"]


def shape(kind: str, rng: np.random.Generator) -> Image.Image:
    """A shape of `kind` in a random colour, size and place over random waves and three
    random lines, in a random size, aspect and mode (RGB, L, RGBA or P): what a user's folder
    holds. (Over plain backgrounds or gradients, some val images had a train image within
    pHash's 4 bits: ingest refuses them as a leak. Random low frequencies spread the hashes.)"""
    width, height = (int(v) for v in rng.integers(24, 72, 2))
    yy, xx = np.mgrid[0:height, 0:width] / np.array([height, width])[:, None, None]
    back = np.full((height, width, 3), 60.0)
    for _ in range(4):  # waves of random direction, length and colour
        fy, fx = rng.uniform(-3, 3, 2)
        wave = np.cos(2 * np.pi * (fy * yy + fx * xx) + rng.uniform(0, 2 * np.pi))
        back += wave[..., None] * rng.uniform(-30, 30, 3)
    img = Image.fromarray(np.clip(back, 0, 255).astype(np.uint8), "RGB")
    draw = ImageDraw.Draw(img)
    for _ in range(3):
        ends = [tuple(rng.uniform(0, [width, height])) for _ in range(2)]
        draw.line(ends, fill=tuple(int(v) for v in rng.integers(0, 256, 3)), width=2)
    size = min(width, height) * rng.uniform(0.35, 0.8)
    x0, y0 = rng.uniform(0, width - size), rng.uniform(0, height - size)
    colour = tuple(int(v) for v in rng.integers(120, 256, 3))
    if kind == "circle":
        draw.ellipse([x0, y0, x0 + size, y0 + size], fill=colour)
    elif kind == "square":
        draw.rectangle([x0, y0, x0 + size, y0 + size], fill=colour)
    else:
        draw.polygon([(x0, y0 + size), (x0 + size, y0 + size), (x0 + size / 2, y0)], fill=colour)
    return img.convert(str(rng.choice(["RGB", "RGB", "L", "RGBA", "P"])))


def write_shapes(root: Path, per_class: int, seed: int = 0) -> list[Path]:
    """`root/<class>/<i>.<png|jpg|webp>`: a folder per class, formats mixed."""
    rng = np.random.default_rng(seed)
    files = []
    for kind in CLASSES:
        for i in range(per_class):
            img = shape(kind, rng)
            fmt = ["png", "jpg", "webp"][i % 3]
            if fmt == "jpg" and img.mode not in ("RGB", "L"):
                img = img.convert("RGB")
            path = root / kind / f"{i:03d}.{fmt}"
            path.parent.mkdir(parents=True, exist_ok=True)
            img.save(path, quality=90) if fmt != "png" else img.save(path)
            files.append(path)
    return files


def png(img: Image.Image) -> bytes:
    out = io.BytesIO()
    img.save(out, "PNG")
    return out.getvalue()


def make_env(tmp_path_factory: pytest.TempPathFactory) -> dict:
    """The environment of a `dvc` run here: the venv's tools, a BentoML store of its own."""
    home = tmp_path_factory.mktemp("bentoml")
    bin_dir = Path(sys.executable).parent
    return {**os.environ, "PATH": f"{bin_dir}:{os.environ['PATH']}", "BENTOML_HOME": str(home)}


@pytest.fixture(scope="module")
def env(tmp_path_factory: pytest.TempPathFactory) -> dict:
    return make_env(tmp_path_factory)


def start_run(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, subprocess.Popen]:
    """The one-liner on a folder of 3 x 70 generated images, shrunk, started in a temporary
    repo (conftest's `images_run` starts it with the first test of this file's half)."""
    env = make_env(tmp_path_factory)
    repo = new_repo(tmp_path_factory, env)
    write_shapes(repo / "data/raw/shapes", 70)
    sh(["git", "add", "data/raw/shapes"], repo, env)
    sh(["git", "-c", "user.name=t", "-c", "user.email=t@t", "commit", "-qm", "images"], repo, env)
    with (repo.parent / "images.log").open("w") as log:
        cmd = exp_run([*IMAGES, *SMALL])
        proc = subprocess.Popen(cmd, cwd=repo, env=env, stdout=log, stderr=subprocess.STDOUT)
    return repo, proc


@pytest.fixture(scope="module")
def repo(images_run: tuple[Path, subprocess.Popen]) -> Path:
    """The one-liner's repo, once its run (started early: `start_run`) has succeeded."""
    repo, proc = images_run
    if proc.wait() != 0:
        log = (repo.parent / "images.log").read_text()[-4000:]
        pytest.fail(f"dvc exp run (images) exited {proc.returncode}:\n{log}")
    return repo


@pytest.fixture(scope="module")
def server(repo: Path) -> Iterator[str]:
    info = json.loads((repo / "dist/bento.json").read_text())
    with serve_bento(repo / "dist" / info["file"]) as served:
        yield served.url


def test_the_one_liner_trains_a_convnet_and_ships_it_in_int8(repo: Path) -> None:
    params = (repo / "params.yaml").read_text()
    assert "fullstack_ml.model.ConvNet" in params  # data=images selects cnn_small
    meta = json.loads((repo / "models/fp32/model.json").read_text())
    assert meta["preprocessing"]["images"]["image"]["size"] == [32, 32]
    assert meta["classes"] == list(CLASSES)
    details = json.loads((repo / "reports/compress.json").read_text())
    assert details["compressed"]["int8_layers"]["conv"][0] >= 1  # INT8 convolutions
    validate = json.loads((repo / "metrics/validate.json").read_text())
    assert (
        validate["answers_checked"]
        == json.loads((repo / "data/curated/schema.json").read_text())["rows"]["test"]
    )
    assert validate["error_rate"] == 0


def test_images_are_answered_alike_as_json_multipart_and_raw_bodies(
    repo: Path, server: str
) -> None:
    test = pd.read_parquet(repo / "data/curated/test.parquet").head(3)
    answers = pd.read_parquet(repo / "data/predictions/predictions.parquet").head(3)
    records = [{"image": base64.b64encode(b).decode()} for b in test["image"]]
    as_json = requests.post(f"{server}/predict", json={"records": records}, timeout=60)
    assert as_json.status_code == 200, as_json.text
    labels = [a["label"] for a in as_json.json()]
    assert labels == list(answers["label"])  # batch scoring answers as the service does
    files = [("file", (f"{i}.png", b, "image/png")) for i, b in enumerate(test["image"])]
    multipart = requests.post(f"{server}/predict_proba", files=files, timeout=60)
    assert multipart.status_code == 200, multipart.text
    assert [a["label"] for a in multipart.json()] == labels
    raw = requests.post(
        f"{server}/predict",
        data=test["image"].iloc[0],
        headers={"Content-Type": "image/png"},
        timeout=60,
    )
    assert raw.status_code == 200 and raw.json()[0]["label"] == labels[0], raw.text


def test_bad_image_requests_are_4xx_naming_the_part(server: str) -> None:
    good = png(Image.new("RGB", (40, 40), (200, 10, 10)))
    corrupt = requests.post(
        f"{server}/predict",
        files=[
            ("first", ("a.png", good, "image/png")),
            ("second", ("b.png", b"\x89PNG junk", "image/png")),
        ],
        timeout=60,
    )
    assert corrupt.status_code == 400 and "second" in corrupt.text, corrupt.text
    huge = png(Image.new("L", (5000, 4000)))  # 20 MP over serve.max_pixels' 16.8 MP
    big = requests.post(
        f"{server}/predict", files={"photo": ("big.png", huge, "image/png")}, timeout=60
    )
    assert big.status_code == 413 and "photo" in big.text and "max_pixels" in big.text
    text = requests.post(
        f"{server}/predict", data=b"hello", headers={"Content-Type": "text/plain"}, timeout=60
    )
    assert text.status_code == 415
    truncated = base64.b64encode(good[: len(good) // 2]).decode()
    bad_json = requests.post(
        f"{server}/predict", json={"records": [{"image": truncated}]}, timeout=60
    )
    assert bad_json.status_code == 400 and "image" in bad_json.text, bad_json.text
    records = [
        {"image": base64.b64encode(good).decode()},
        {"image": base64.b64encode(huge).decode()},
    ]
    big_json = requests.post(f"{server}/predict", json={"records": records}, timeout=60)
    assert big_json.status_code == 413, big_json.text  # the header's size, as in multipart
    (detail,) = big_json.json()["detail"]
    assert detail["type"] == "image_too_large" and detail["loc"][-3:] == ["records", 1, "image"]


def test_a_folder_with_bad_files_names_each(
    tmp_path_factory: pytest.TempPathFactory, env: dict
) -> None:
    repo = new_repo(tmp_path_factory, env)
    root = repo / "data/raw/shapes"
    write_shapes(root, 20, seed=1)
    (root / "circle/empty.png").write_bytes(b"")
    (root / "square/notes.jpg").write_text("not an image")
    good = (root / "triangle/002.webp").read_bytes()
    (root / "triangle/cut.png").write_bytes(png(Image.open(io.BytesIO(good)))[:200])
    sh(["git", "add", "data/raw/shapes"], repo, env)
    sh(["git", "-c", "user.name=t", "-c", "user.email=t@t", "commit", "-qm", "images"], repo, env)
    failed = sh(exp_run(IMAGES), repo, env, check=False)
    assert failed.returncode != 0
    assert "circle/empty.png" in failed.stderr + failed.stdout  # the first bad file, named
    # dropped instead: only the ingest stage, each bad file listed with its reason
    sh([*exp_run([*IMAGES, "data.bad_files=drop"]), "ingest"], repo, env)
    rejected = pd.read_csv(repo / "data/curated/rejected.csv")
    named = dict(zip(rejected["path"], rejected["reason"], strict=True))
    assert {"circle/empty.png", "square/notes.jpg", "triangle/cut.png"} <= set(named)
    assert "empty" in named["circle/empty.png"] and "not an image" in named["square/notes.jpg"]


def test_schemathesis_finds_no_server_error_on_the_image_service(
    server: str, tmp_path: Path
) -> None:
    """The image model's spec (JSON base64 records, multipart parts, raw image bodies)
    fuzzed with schemathesis' checks: no 5xx, no answer outside the spec. All checks but
    `positive_data_acceptance`: no schema can say which bytes decode as an image, so bytes a
    schema allows (an empty string) are rightly refused as 400s."""
    st = [Path(sys.executable).parent / "st", "run", f"{server}/docs.json", "--url", server]
    options = ["--checks", "all", "--exclude-checks", "positive_data_acceptance"]
    options += ["--max-examples", "15", "--seed", "1", "--no-color"]
    result = subprocess.run([*st, *options], capture_output=True, text=True, cwd=tmp_path)
    assert result.returncode == 0, result.stdout[-5000:]
    assert "Test cases:" in result.stdout
