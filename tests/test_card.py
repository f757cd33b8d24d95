import base64
import dataclasses
import io
import json
import re
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
from PIL import Image

from fullstack_ml.card import evaluation_section, files_sha256
from fullstack_ml.charts import histogram_svg, sketch_histogram
from fullstack_ml.runtime.drift import profile_frame


def test_histograms_come_from_the_sketch_and_match_the_rows() -> None:
    rng = np.random.default_rng(0)
    values = np.concatenate([rng.normal(0, 1, 30_000), rng.normal(5, 0.5, 10_000)])
    frame = pd.DataFrame({"x": values, "s": ["a"] * len(values)})
    hist = sketch_histogram(profile_frame(frame), "x", bins=20)
    exact, edges = np.histogram(values, bins=20, range=(values.min(), values.max()))
    assert np.allclose(hist["edges"], edges)
    # KLL's rank error (about 1% of the rows) per bin edge, at 40k rows
    assert np.abs(np.array(hist["counts"]) - exact).max() < 0.02 * len(values)
    assert sum(hist["counts"]) == len(values)
    assert sketch_histogram(profile_frame(frame), "s") is None  # strings: no distribution
    svg = histogram_svg(hist)
    assert svg.count("<rect") == 20 and "<title>" in svg


def test_data_digest_follows_names_and_bytes(tmp_path) -> None:
    (tmp_path / "a").mkdir()
    (tmp_path / "a/train.parquet").write_bytes(b"1")
    first = files_sha256(tmp_path)
    assert files_sha256(tmp_path) == first
    (tmp_path / "a/train.parquet").write_bytes(b"2")
    assert files_sha256(tmp_path) != first


def test_a_regression_model_gets_an_error_histogram_not_a_cell_per_value() -> None:
    """A value per test row made a confusion table of rows x rows cells (26 MB at 450 rows)."""
    rng = np.random.default_rng(1)
    actual = rng.normal(size=450)
    predicted = actual + rng.normal(0, 0.1, size=450)
    pairs = [
        {"actual": str(a), "predicted": str(p)} for a, p in zip(actual, predicted, strict=True)
    ]
    facts = {"metrics": {"eval": {"rmse": 0.1}}, "confusion": pairs}
    section = evaluation_section(facts | {"schema": {"task": "regression"}})
    counts = [int(t.rsplit(": ", 1)[1]) for t in re.findall(r"<title>([^<]*)</title>", section)]
    assert len(counts) == 20 and sum(counts) == 450
    assert "Confusion" not in section and len(section) < 10_000
    labels = [{"actual": str(i % 3), "predicted": str(i % 2)} for i in range(30)]
    facts = {"metrics": {"eval": {"accuracy": 0.5}}, "confusion": labels}
    assert "Confusion" in evaluation_section(facts | {"schema": {"task": "classification"}})


@pytest.fixture(scope="module")
def image_build(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """An image set's curated splits and profile (the stages' files, in a build's layout):
    3 classes of 6 pictures, one file of them empty and dropped by ingest."""
    from test_ingest import image_set, images_cfg

    from fullstack_ml.stage import compose
    from stages.ingest import ingest
    from stages.profile import profile

    work = tmp_path_factory.mktemp("card-images")
    root = image_set(work / "set", per_class=6)
    (root / "star/zero.png").write_bytes(b"")
    ingest(
        images_cfg(root, "data.bad_files=drop", "data.image.max_bad_rate=0.5"),
        0,
        work / "data/curated",
    )
    curated = work / "data/curated"
    splits = {s: curated / f"{s}.parquet" for s in ("train", "val", "test")}
    schema = json.loads((curated / "schema.json").read_text())
    cfg = compose(["data=images"]).profile
    profile(splits, schema, cfg, work / "reports/profile", rejected=curated / "rejected.csv")
    (work / "params.yaml").write_text("seed: 0\n")
    return work


def test_an_image_set_gets_thumbnails_class_balance_and_its_statistics_as_features(
    image_build: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The card of an image set (the profile stage's files, in a build's layout): each
    class's thumbnails inline as PNG data URIs (its CSP allows them), the class balance,
    the image's statistics charted as features (not the column of PNG bytes), and the
    files ingest rejected, counted by reason, among the limits."""
    from fullstack_ml.card import gather, render

    monkeypatch.chdir(image_build)
    facts = gather(None, None)
    names = [f["name"] for f in facts["features"]]
    assert names[0] == "image" and "image.hue_mean" in names and len(names) == 1 + 7
    page = render(facts)
    assert "img-src data:" in page.split("</head>")[0]
    sources = re.findall(r'<img src="data:image/png;base64,([^"]+)"', page)
    train = facts["classes"]["train"]
    assert page.count("<img") == len(sources) == sum(min(n, 5) for n in train.values())
    for src in sources:
        with Image.open(io.BytesIO(base64.b64decode(src))) as img:
            assert img.format == "PNG" and img.size == (48, 48)  # thumbnails of 64x64
    assert "Class balance (3 classes)" in page and "1 features" in page
    assert "<b>image.saturation_mean</b>" in page and "<b>image</b>" not in page
    assert "Ingest rejected 1 image files (empty file 1)." in page
    assert "64x64, mode RGB (every image decoded and resized by ingest: pad)" in page
    assert facts["confused"] == [] and "Most confused" not in page  # no model evaluated yet


def test_the_test_images_a_model_gets_wrong_are_shown_surest_first_with_their_labels(
    image_build: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A ConvNet whose head is biased to call every picture a star, scored by evaluate:
    the card shows each test image that is no star, named by its source path, its true and
    predicted class and that class's probability, the surest first, with its thumbnail
    (the curated test image's). None for a model that got every test image right, nor for
    one of a table."""
    import shutil

    import torch
    from omegaconf import OmegaConf

    from fullstack_ml.card import confused_images, gather, render
    from fullstack_ml.curated import read_schema
    from fullstack_ml.images import thumbnail_png
    from fullstack_ml.model import build_network, num_outputs, preprocessor, save_fp32
    from fullstack_ml.paths import CONFUSION
    from fullstack_ml.stage import compose
    from stages.evaluate import evaluate
    from stages.train import model_meta

    shutil.copytree(image_build, tmp_path, dirs_exist_ok=True)
    monkeypatch.chdir(tmp_path)
    curated = Path("data/curated")
    schema = read_schema(curated)
    test = pd.read_parquet(curated / "test.parquet")
    cfg = compose(["data=images", "model=cnn_tiny"])
    meta = model_meta(
        schema,
        pd.read_parquet(curated / "train.parquet"),
        OmegaConf.to_container(cfg.model, resolve=True),
        OmegaConf.to_container(cfg.train, resolve=True),
    )
    torch.manual_seed(0)
    pre = preprocessor(meta)
    model = build_network(cfg.model, pre.width, num_outputs(meta), pre.image_shape)
    head = [m for m in model.modules() if isinstance(m, torch.nn.Linear)][-1]
    with torch.no_grad():
        head.bias[schema.classes.index("star")] += 3.0
    save_fp32(model, Path("models/fp32"), meta)
    _, confusion = evaluate(Path("models/fp32"), test)
    assert (confusion["predicted"] == "star").all()  # the bias holds on every test image
    CONFUSION.parent.mkdir()
    confusion.to_csv(CONFUSION, index=False)

    facts = gather(None, None)
    shown = facts["confused"]
    wrong = test.index[test["label"] != "star"]
    assert 0 < len(wrong) <= 16 and sorted(c["row"] for c in shown) == list(wrong)
    probabilities = [c["probability"] for c in shown]
    assert probabilities == sorted(probabilities, reverse=True)
    page = render(facts)
    assert f"{len(wrong)} of the {len(wrong)} misclassified" in page
    for c in shown:
        row = test.loc[c["row"]]
        assert c["path"] == row["path"] and c["actual"] == row["label"] == row["path"].split("/")[0]
        assert c["probability"] == confusion.loc[c["row"], "probability"] > 1 / 3
        thumbnail = base64.b64encode(thumbnail_png(row["image"])).decode()
        assert c["images"] == {"image": thumbnail}
        cell = page.split(f"data-row='{c['row']}'>", 1)[1].split("</div>", 1)[0]
        assert f'src="data:image/png;base64,{thumbnail}"' in cell
        assert f"<code>{row['path']}</code>" in cell
        assert f"true {row['label']}, predicted star ({c['probability']:.3f})" in cell
    assert page.count("data-row=") == len(wrong)
    classes = [
        f"{a} taken for star ({n})" for a, n in test.loc[wrong, "label"].value_counts().items()
    ]
    assert all(c in page for c in classes)
    assert [
        c["row"] for c in confused_images(facts["confusion"], schema, curated / "test.parquet", 1)
    ] == [shown[0]["row"]]

    tabular = dataclasses.replace(schema, images={})
    assert confused_images(facts["confusion"], tabular, curated / "test.parquet") == []
    confusion.assign(predicted=confusion["actual"]).to_csv(CONFUSION, index=False)
    facts = gather(None, None)
    assert facts["confused"] == [] and "Most confused" not in render(facts)
