"""The predict stage on image files: a folder, a glob or a manifest scored as the runtime
answers each image, every bad file rejected with its path and reason, the reject rate gate,
drift on the images' statistics, and an s3:// prefix."""

import io
import json
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import torch
from omegaconf import DictConfig
from PIL import Image, ImageOps
from servers import S3Server, s3_env

from fullstack_ml.paths import COMPRESS_DETAILS, COMPRESSED_DIR, DATA_DIR, REFERENCE_PROFILE
from fullstack_ml.stage import StageError, compose

pytestmark = pytest.mark.slow  # a model trained and compressed for the module

# digits rendered as 16x16 grey PNGs, a ConvNet trained briefly and compressed without the
# report's extras: the test is of scoring image files, not of accuracy
PIPELINE = [
    "data=digits_images",
    "train.epochs=2",
    "~compress.pipelines",
    "compress.compile=false",
    "compress.runtimes=[]",
    "compress.batch_sizes=[1,256]",
    "compress.latency_repeats=2",
    "compress.max_accuracy_drop=100",
    "compress.fallback.max_layers=0",
    "outliers.candidates=[mahalanobis,max_softmax,energy]",
]
GOOD = 12  # good files of each test's folder


@pytest.fixture(scope="module")
def pipeline(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A folder laid out as the stages write it (curated splits and schema, the compressed
    model, its serving plan, the training profile), made once by the real stages: predict
    with `predict.bento=null` run in it scores with that model."""
    from fullstack_ml.model import encode_split, load_fp32
    from fullstack_ml.runtime.drift import profile_frame
    from fullstack_ml.runtime.images import image_stats
    from stages.compress import compress
    from stages.ingest import ingest
    from stages.train import train

    work = tmp_path_factory.mktemp("predict-images")
    cfg = compose(PIPELINE)
    curated, fp32 = work / DATA_DIR, work / "models/fp32"
    ingest(cfg.data, cfg.seed, curated)
    train(cfg, curated, fp32)
    _, meta = load_fp32(fp32)
    frames = {s: pd.read_parquet(curated / f"{s}.parquet") for s in ("train", "val", "test")}
    val_x, _ = encode_split(frames["val"], meta)
    test_xy = encode_split(frames["test"], meta)
    outliers = (frames, cfg.outliers)
    result = compress(fp32, val_x, test_xy, cfg.compress, work / COMPRESSED_DIR, outliers=outliers)
    (work / COMPRESS_DETAILS).parent.mkdir(parents=True, exist_ok=True)
    (work / COMPRESS_DETAILS).write_text(json.dumps({"serving": result["serving"]}))
    # the training profile of the images' statistics, as the profile stage names them
    pixels = np.stack([np.asarray(Image.open(io.BytesIO(b))) for b in frames["train"]["image"]])
    stats = image_stats(pixels[..., None])
    reference = profile_frame(pd.DataFrame({f"image.{k}": v for k, v in stats.items()}))
    (work / REFERENCE_PROFILE).parent.mkdir(parents=True)
    (work / REFERENCE_PROFILE).write_bytes(reference.serialize())
    return work


@pytest.fixture
def in_pipeline(pipeline: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    monkeypatch.chdir(pipeline)
    return pipeline


def config(out: Path, path: str | Path, *overrides: str) -> DictConfig:
    """The predict config on `path` with the pipeline's model, writing into `out`."""
    return compose(
        [
            f"predict.input.path={path}",
            f"predict.output={out / 'predictions.csv'}",
            f"predict.rejects={out / 'rejects.csv'}",
            *overrides,
        ]
    ).predict


def split_images(pipeline: Path, count: int = GOOD) -> list[Image.Image]:
    """The first `count` images of the test split, decoded."""
    frame = pd.read_parquet(pipeline / DATA_DIR / "test.parquet").head(count)
    return [Image.open(io.BytesIO(b)) for b in frame["image"]]


def write_files(root: Path, images: list[Image.Image]) -> list[Path]:
    """Half the images as PNG at the root, half as larger RGB JPEG in `more/`: files the
    model's spec converts and resizes."""
    files = []
    for i, img in enumerate(images):
        if i % 2:
            path = root / "more" / f"{i:02d}.jpg"
            path.parent.mkdir(parents=True, exist_ok=True)
            img.convert("RGB").resize((40, 40)).save(path, "JPEG", quality=95)
        else:
            path = root / f"{i:02d}.png"
            path.parent.mkdir(parents=True, exist_ok=True)
            img.save(path, "PNG")
        files.append(path)
    return files


def write_bad_files(root: Path, good: Path) -> dict[str, str]:
    """A truncated PNG, an empty file and a text file named .png: path -> reason's start."""
    data = good.read_bytes()
    (root / "truncated.png").write_bytes(data[: len(data) // 2])
    (root / "empty.png").write_bytes(b"")
    (root / "notes.png").write_text("not a picture\n")
    return {
        "empty.png": "empty file (0 bytes)",
        "notes.png": "not an image (none of PNG, JPEG",
        "truncated.png": "truncated or corrupt:",
    }


# the pixels an image's header may give in the folder test (predict.max_pixels, the server's
# serve.max_pixels by default): its 40x40 JPEG files pass, a 64x64 one does not
MAX_PIXELS = 3000


def runtime_answers(pipeline: Path, files: list[Path]) -> tuple[np.ndarray, np.ndarray]:
    """The classes and probabilities of the runtime for `files` computed directly: the
    model's Preprocessor on the files' bytes, then the compressed program, eager."""
    from fullstack_ml.runtime.engine import softmax
    from fullstack_ml.runtime.meta import read_meta
    from fullstack_ml.runtime.preprocess import Preprocessor
    from fullstack_ml.runtime.program import load_runner

    model = pipeline / COMPRESSED_DIR
    meta = read_meta(model)
    pre = Preprocessor.from_dict(meta["preprocessing"])
    x = pre.encode({"image": [f.read_bytes() for f in files]})
    with torch.inference_mode():
        logits = load_runner(model, None, pre.width)(torch.from_numpy(x)).numpy()
    probs = softmax(logits).astype("float64")
    return np.asarray(meta["classes"])[probs.argmax(1)], probs


def test_a_folder_of_image_files_is_scored_as_the_runtime_answers_each(
    in_pipeline: Path, tmp_path: Path
) -> None:
    """A folder without class subfolders (and one nested folder), PNG and JPEG: each
    answer's `path` is relative to the folder; a truncated, an empty, a non-image file and
    one over the server's pixel limit are rejected with BadImage's reason while the others
    are scored; a file without an image's suffix is skipped; drift is measured on the
    images' statistics."""
    from stages.predict import predict

    root = tmp_path / "new"
    files = write_files(root, split_images(in_pipeline))
    bad = write_bad_files(root, files[0])
    Image.new("L", (64, 64)).save(root / "large.png")
    bad["large.png"] = "64x64 is 4,096 pixels, over"
    (root / "README.txt").write_text("skipped: not an image by its suffix\n")
    limits = ["predict.max_reject_rate=0.5", "predict.batch_rows=5"]
    cfg = config(tmp_path / "out", root, *limits, f"predict.max_pixels={MAX_PIXELS}")
    assert compose().predict.max_pixels == compose().serve.max_pixels
    result = predict(cfg, seed=0)
    figures = result["metrics"]
    assert (figures["rows"], figures["predicted"], figures["rejected"]) == (GOOD + 4, GOOD, 4)
    got = pd.read_csv(tmp_path / "out/predictions.csv", dtype={"label": str})
    names = [str(f.relative_to(root)) for f in files]
    assert sorted(got["path"]) == sorted(names) and "more/01.jpg" in names
    got = got.set_index("path").loc[names]
    labels, probs = runtime_answers(in_pipeline, files)
    assert got["label"].tolist() == labels.tolist()
    classes = [c.removeprefix("proba_") for c in got.columns if c.startswith("proba_")]
    np.testing.assert_allclose(got[[f"proba_{c}" for c in classes]], probs, atol=1e-5)
    assert got["outlier"].dtype == bool and figures["outliers"] == int(got["outlier"].sum())
    rejects = pd.read_csv(tmp_path / "out/rejects.csv")
    assert rejects.columns.tolist() == ["path", "reason"]
    found = dict(zip(rejects["path"], rejects["reason"], strict=True))
    assert found.keys() == bad.keys()
    for path, start in bad.items():
        assert found[path].startswith(start), found[path]
    assert "over predict.max_pixels 3,000" in found["large.png"]  # predict's key, not ingest's
    assert "image.brightness_mean" in result["drift"] and result["sampled"] == GOOD
    assert "image" not in result["drift"]  # the pixels are not profiled, their statistics are


def test_a_glob_and_a_manifest_name_the_files_to_score(in_pipeline: Path, tmp_path: Path) -> None:
    """A glob's paths are relative to its folder before the wildcard; a manifest's as it
    writes them, with its other columns as ids and a listed file that is missing rejected."""
    from stages.predict import predict

    root = tmp_path / "new"
    files = write_files(root, split_images(in_pipeline))
    out = tmp_path / "out"
    predict(config(out, f"{root}/*/*.jpg"), seed=0)
    jpegs = pd.read_csv(out / "predictions.csv")["path"].tolist()
    assert jpegs == sorted(str(f.relative_to(root)) for f in files if f.suffix == ".jpg")
    listed = [str(f.relative_to(root)) for f in files[:5]] + ["gone.png"]
    manifest = pd.DataFrame({"path": listed, "order_id": range(100, 106), "label": "?"})
    manifest.to_parquet(root / "manifest.parquet")
    ids = ["predict.id_columns=[order_id]", "predict.max_reject_rate=0.5"]
    cfg = config(out, root / "manifest.parquet", *ids)
    figures = predict(cfg, seed=0)["metrics"]
    assert (figures["predicted"], figures["rejected"]) == (5, 1)
    got = pd.read_csv(out / "predictions.csv", dtype={"label": str})
    assert got.columns[:3].tolist() == ["path", "order_id", "label"]
    assert got["path"].tolist() == listed[:5] and got["order_id"].tolist() == list(range(100, 105))
    assert got["label"].tolist() == runtime_answers(in_pipeline, files[:5])[0].tolist()
    rejects = pd.read_csv(out / "rejects.csv")
    assert rejects.to_dict("records") == [
        {"path": "gone.png", "order_id": 105, "reason": "unreadable: not found"}
    ]


def test_the_reject_rate_gate_fails_in_one_line_and_writes_nothing(
    in_pipeline: Path, tmp_path: Path
) -> None:
    from stages.predict import predict

    root = tmp_path / "new"
    files = write_files(root, split_images(in_pipeline, 4))
    write_bad_files(root, files[0])
    out = tmp_path / "out"
    with pytest.raises(StageError) as err:
        predict(config(out, root), seed=0)
    message = str(err.value)
    assert "\n" not in message
    assert message.startswith(f"{root}: 3 of 7 files rejected (42.86%, at least ")
    assert "predict.max_reject_rate=0.01" in message
    assert not out.exists() or not list(out.iterdir())


def test_drift_of_scored_images_fails_the_run_on_its_limit(
    in_pipeline: Path, tmp_path: Path
) -> None:
    """Negatives of the digits (white strokes on black become black on white): their
    brightness drifts from training's, and predict.max_drifted_features=0 fails naming it."""
    from stages.predict import predict

    root = tmp_path / "new"
    write_files(root, [ImageOps.invert(img.convert("L")) for img in split_images(in_pipeline, 60)])
    cfg = config(tmp_path / "out", root, "predict.max_drifted_features=0")
    with pytest.raises(StageError, match=r"features drifted from training .*image\.brightness"):
        predict(cfg, seed=0)


def test_image_files_are_refused_by_the_ray_engine_before_ray_starts(
    in_pipeline: Path, tmp_path: Path
) -> None:
    from stages.predict import predict

    root = tmp_path / "new"
    write_files(root, split_images(in_pipeline, 2))
    with pytest.raises(StageError, match=r"image files; predict.engine=ray scores tables"):
        predict(config(tmp_path / "out", root, "predict.engine=ray"), seed=0)


def test_an_s3_prefix_of_image_files_is_scored(
    in_pipeline: Path, tmp_path: Path, s3_server: S3Server, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The same answers for files under an s3:// prefix as for the local folder (the
    files read through fsspec, credentials from the environment); a missing prefix is
    named in one line."""
    import boto3

    from stages.predict import predict

    root = tmp_path / "new"
    files = write_files(root, split_images(in_pipeline, 6))
    keys = {"aws_access_key_id": s3_server.key_id, "aws_secret_access_key": s3_server.secret}
    s3 = boto3.session.Session(**keys).client("s3", endpoint_url=s3_server.endpoint)
    for f in files:
        s3.put_object(
            Bucket=s3_server.bucket, Key=f"new/{f.relative_to(root)}", Body=f.read_bytes()
        )
    s3_env(monkeypatch, s3_server)
    predict(config(tmp_path / "local", root), seed=0)
    predict(config(tmp_path / "s3", f"s3://{s3_server.bucket}/new"), seed=0)
    local = pd.read_csv(tmp_path / "local/predictions.csv")
    remote = pd.read_csv(tmp_path / "s3/predictions.csv")
    pd.testing.assert_frame_equal(remote, local)
    assert remote["path"].tolist() == sorted(str(f.relative_to(root)) for f in files)
    with pytest.raises(StageError, match=r"^s3://.*/nothing-here.png: not found$"):
        predict(config(tmp_path / "s3", f"s3://{s3_server.bucket}/nothing-here.png"), seed=0)


def test_a_table_of_encoded_images_is_scored_row_by_row(in_pipeline: Path, tmp_path: Path) -> None:
    """The curated test split itself (PNG bytes in an `image` column: the DVC stage's
    default input), scored as tables are, with `row` numbers; a row whose bytes are no
    image is rejected, the others scored."""
    from stages.predict import predict

    frame = pd.read_parquet(in_pipeline / DATA_DIR / "test.parquet").head(20)
    frame.loc[3, "image"] = b"GIF89a but no more"
    frame.to_parquet(tmp_path / "input.parquet")
    cfg = config(tmp_path / "out", tmp_path / "input.parquet", "predict.max_reject_rate=0.5")
    figures = predict(cfg, seed=0)["metrics"]
    assert (figures["predicted"], figures["rejected"]) == (19, 1)
    rejects = pd.read_csv(tmp_path / "out/rejects.csv")
    assert rejects["row"].tolist() == [3] and rejects["reason"][0].startswith("not an image")
    got = pd.read_csv(tmp_path / "out/predictions.csv", dtype={"label": str})
    assert got["row"].tolist() == [i for i in range(20) if i != 3]
