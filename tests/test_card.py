import json
import re

import numpy as np
import pandas as pd

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


def test_an_image_set_gets_thumbnails_class_balance_and_its_statistics_as_features(
    tmp_path, monkeypatch
) -> None:
    """The card of an image set (the profile stage's files, in a build's layout): each
    class's thumbnails inline as PNG data URIs (its CSP allows them), the class balance,
    the image's statistics charted as features (not the column of PNG bytes), and the
    files ingest rejected, counted by reason, among the limits."""
    import base64
    import io

    from PIL import Image
    from test_ingest import image_set, images_cfg

    from fullstack_ml.card import gather, render
    from fullstack_ml.stage import compose
    from stages.ingest import ingest
    from stages.profile import profile

    root = image_set(tmp_path / "set", per_class=6)
    (root / "star/zero.png").write_bytes(b"")
    ingest(
        images_cfg(root, "data.bad_files=drop", "data.image.max_bad_rate=0.5"),
        0,
        tmp_path / "data/curated",
    )
    curated = tmp_path / "data/curated"
    splits = {s: curated / f"{s}.parquet" for s in ("train", "val", "test")}
    schema = json.loads((curated / "schema.json").read_text())
    cfg = compose(["data=images"]).profile
    profile(splits, schema, cfg, tmp_path / "reports/profile", rejected=curated / "rejected.csv")
    (tmp_path / "params.yaml").write_text("seed: 0\n")
    monkeypatch.chdir(tmp_path)
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
