import numpy as np
import pandas as pd

from fullstack_ml.card import files_sha256
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
