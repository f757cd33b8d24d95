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
