"""The outlier detector: its scores against the libraries', its candidates and choice, the
conformal threshold, and the validate stage's gate on the test split's outlier count."""

import json
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
from scipy.special import logsumexp, softmax
from sklearn.covariance import LedoitWolf

from fullstack_ml.gates import exceedances
from fullstack_ml.outliers import fit_detector, shifted
from fullstack_ml.runtime.outliers import (
    DETECTOR_FILE,
    Detector,
    conformal_rank,
    load_detector,
)
from fullstack_ml.stage import StageError
from stages.validate import outlier_gate


def detector(kind: str, **fields: object) -> Detector:
    return Detector(kind, 1.0, 10, 10, 0.1, [1.0], **fields)


def test_scores_equal_the_libraries_formulas() -> None:
    rng = np.random.default_rng(0)
    x, logits = rng.normal(size=(50, 6)), rng.normal(size=(50, 4)) * 3
    cov = LedoitWolf().fit(x)
    maha = detector("mahalanobis", mean=cov.location_.tolist(), precision=cov.precision_.tolist())
    np.testing.assert_allclose(maha.score(x, logits) ** 2, cov.mahalanobis(x), rtol=1e-9)
    msp = detector("max_softmax").score(x, logits)
    np.testing.assert_allclose(msp, 1 - softmax(logits, axis=1).max(1), rtol=1e-9)
    np.testing.assert_allclose(detector("energy").score(x, logits), -logsumexp(logits, axis=1))


def test_scores_are_finite_on_values_that_overflow() -> None:
    """A record at float32's limits (what the service accepts) scores the largest float: an
    outlier, and a number a JSON answer can carry."""
    maha = detector("mahalanobis", mean=[0.0, 0.0], precision=[[1.0, 0.0], [0.0, 1.0]])
    huge = np.full((1, 2), 1e200)
    got = maha.score(huge, np.zeros((1, 3)))
    assert np.isfinite(got).all() and maha.flags(got).all()
    inf = detector("energy").score(huge, np.array([[np.inf, 0.0, 0.0]]))
    assert np.isfinite(inf).all()
    with pytest.raises(ValueError, match="unknown detector kind 'nope'"):
        detector("nope").score(huge, np.zeros((1, 3)))


def test_a_saved_detector_loads_and_a_missing_one_is_named(tmp_path: Path) -> None:
    saved = detector("energy")
    (tmp_path / DETECTOR_FILE).write_text(json.dumps(saved.to_dict()))
    assert load_detector(tmp_path).to_dict() == saved.to_dict()
    with pytest.raises(FileNotFoundError, match=r"outliers.json: no outlier detector"):
        load_detector(tmp_path / "elsewhere")


def test_the_conformal_threshold_flags_the_target_rate_of_new_rows() -> None:
    """Over many draws of exchangeable val and test scores, the share of test rows over the
    rank-th smallest val score is (n + 1 - rank) / (n + 1) <= target_fpr on average."""
    assert conformal_rank(270, 0.01) == 269 and conformal_rank(50, 0.01) == 51
    rng = np.random.default_rng(1)
    n, target = 270, 0.01
    rank = conformal_rank(n, target)
    rates = []
    for _ in range(2000):
        val, test = rng.normal(size=n), rng.normal(size=270)
        rates.append((test > np.sort(val)[rank - 1]).mean())
    expected = (n + 1 - rank) / (n + 1)
    assert expected <= target
    assert abs(np.mean(rates) - expected) < 0.001  # sd of the mean: ~0.0001


def test_the_outlier_gate_fails_rarely_on_exchangeable_rows_and_always_on_shifted_ones() -> None:
    """`gates.exceedances` at 95%: its false-failure rate on test rows like val is at most
    5% (measured over 4000 draws), and a test split with a tenth of its rows shifted fails."""
    rng = np.random.default_rng(2)
    n, m, rank = 270, 270, conformal_rank(270, 0.01)
    failed = 0
    for _ in range(4000):
        threshold = np.sort(rng.normal(size=n))[rank - 1]
        count = int((rng.normal(size=m) > threshold).sum())
        failed += exceedances(count, m, rank, n, 0.95)["over"]
    assert failed / 4000 <= 0.05 + 0.01  # + 3 sd of the estimate
    assert exceedances(27, m, rank, n, 0.999)["over"]
    assert not exceedances(0, m, rank, n, 0.999)["over"]
    assert exceedances(5, m, 51, 50, 0.999) == {"expected": 0.0, "pvalue": 1.0, "over": False}


def test_validate_fails_naming_the_outlier_count_and_the_target(tmp_path: Path) -> None:
    saved = Detector("mahalanobis", 3.0, 269, 270, 0.01, [3.0], [0.0], [[1.0]])
    (tmp_path / DETECTOR_FILE).write_text(json.dumps(saved.to_dict()))
    ok = outlier_gate(3, 270, tmp_path, 0.999)
    assert ok["outliers"] == 3 and not ok["over"] and 1.9 < ok["expected"] < 2.1
    with pytest.raises(StageError, match=r"30 of 270 test rows flagged.*target_fpr=0.01"):
        outlier_gate(30, 270, tmp_path, 0.999)


def table(rows: int, seed: int) -> pd.DataFrame:
    rng = np.random.default_rng(seed)
    age = rng.normal(40, 10, rows)
    return pd.DataFrame(
        {
            "age": age,
            "income": age * 1000 + rng.normal(0, 2000, rows),
            "city": rng.choice(["a", "b", "c"], rows),
        }
    )


def test_shifts_of_a_table_are_unlike_train() -> None:
    train, val = table(500, 0), table(100, 1)
    got = shifted(val, train, ["age", "income"], ["city"], seed=0)
    assert set(got) == {"out_of_range", "swapped", "noise", "unseen_category"}
    pushed = got["out_of_range"][["age", "income"]]
    outside = (pushed < train[["age", "income"]].min()) | (pushed > train[["age", "income"]].max())
    assert outside.sum(axis=1).eq(1).all()  # exactly one feature per row
    assert got["swapped"]["age"].equals(val["income"])  # two columns: exchanged
    assert (got["unseen_category"]["city"] == "<unseen>").all()
    assert len(shifted(val, train, ["age"], [], seed=0)) == 2  # no swap of one column


def test_the_detector_is_chosen_by_measurement_and_flags_the_target_rate_on_val() -> None:
    """Every candidate is measured on every shift; a served one ships with its threshold at
    the conformal rank of val's scores (an input-space table with no model: logits carry no
    information here, so the Mahalanobis distance wins)."""
    rng = np.random.default_rng(3)
    train, val = rng.normal(size=(600, 4)), rng.normal(size=(300, 4))
    views = {"x": train, "logits": rng.normal(size=(600, 3)), "features": train[:, :2]}
    vval = {"x": val, "logits": rng.normal(size=(300, 3)), "features": val[:, :2]}
    far = val + 6
    shifts = {"far": {"x": far, "logits": rng.normal(size=(300, 3)), "features": far[:, :2]}}
    chosen, report = fit_detector(views, vval, shifts, "classification", 0.05)
    assert set(report["candidates"]) == {
        "mahalanobis",
        "ecod",
        "iforest",
        "max_softmax",
        "energy",
        "knn_penultimate",
    }
    assert report["chosen"] == chosen.kind == "mahalanobis"
    assert report["candidates"]["mahalanobis"]["auroc"]["far"] > 0.99
    assert 0.4 < report["candidates"]["max_softmax"]["auroc"]["far"] < 0.6  # noise logits
    assert not report["candidates"]["ecod"]["served"]
    flagged = chosen.flags(chosen.score(val, vval["logits"])).sum()
    assert flagged == 300 - chosen.rank  # the rank-th smallest is the last one not flagged
    assert chosen.buckets == sorted(chosen.buckets) and chosen.threshold in chosen.buckets
    regression, _ = fit_detector(views, vval, shifts, "regression", 0.05)
    assert regression.kind == "mahalanobis"


def test_too_few_val_rows_for_the_target_rate_set_no_threshold() -> None:
    """27 val rows (wine's) cannot show a 1% rate: the conformal rank is past the last row,
    and the detector flags nothing rather than more than the target (compress warns)."""
    rng = np.random.default_rng(4)
    train, val = rng.normal(size=(100, 3)), rng.normal(size=(27, 3))
    views = {"x": train, "logits": train}
    shifts = {"far": {"x": val + 9, "logits": val}}
    chosen, _ = fit_detector(views, {"x": val, "logits": val}, shifts, "regression", 0.01)
    assert chosen.rank == 28 and chosen.val_rows == 27
    assert not chosen.flags(chosen.score(val + 9, val)).any()


def test_candidates_are_chosen_by_config_and_one_must_be_servable() -> None:
    rng = np.random.default_rng(5)
    train, val = rng.normal(size=(200, 3)), rng.normal(size=(100, 3))
    views = {"x": train, "logits": train}
    shifts = {"far": {"x": val + 9, "logits": val}}
    val_views = {"x": val, "logits": val}
    fast = ["mahalanobis", "energy"]
    _, report = fit_detector(views, val_views, shifts, "classification", 0.05, names=fast)
    assert list(report["candidates"]) == fast
    with pytest.raises(ValueError, match="candidates: unknown 'lof'"):
        fit_detector(views, val_views, shifts, "classification", 0.05, names=["lof"])
    with pytest.raises(ValueError, match="candidates: none the runtime serves; add one of maha"):
        fit_detector(views, val_views, shifts, "regression", 0.05, names=["ecod", "energy"])
