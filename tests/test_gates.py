"""The statistics the gates decide on (fullstack_ml.gates): each bound holds as often as it
says, one row or one noisy window does not fail a gate, a real regression does."""

import numpy as np
import pytest
from scipy import stats

from fullstack_ml.gates import (
    budget_verdict,
    missed_slos,
    paired_drop,
    paired_error_drop,
    quantile_bounds,
    rate_bounds,
    rate_over,
    slowdown,
    window_rates,
)
from fullstack_ml.runtime.drift import holm
from fullstack_ml.stage import compose


def test_rate_bounds_are_clopper_pearson_and_a_few_rows_of_a_small_sample_are_no_evidence() -> None:
    assert rate_bounds(0, 540, 0.975)[1] == pytest.approx(1 - 0.025 ** (1 / 540))
    assert rate_bounds(540, 540, 0.975)[0] == pytest.approx(0.025 ** (1 / 540))
    low, high = rate_bounds(3, 100, 0.95)
    ci = stats.binomtest(3, 100).proportion_ci(0.90, method="exact")  # two one-sided 95%
    assert (low, high) == pytest.approx((ci.low, ci.high))
    assert not rate_over(1, 10, 0.01)  # one bad row of ten: 10%, but no evidence of > 1%
    assert rate_over(3, 10, 0.01)
    assert rate_over(11_000, 1_000_000, 0.01)  # 1.1% of a million: evidence
    assert not rate_over(10_100, 1_000_000, 0.01)


def test_quantile_bounds_cover_the_true_quantile_as_often_as_they_say() -> None:
    rng = np.random.default_rng(0)
    true_p99 = stats.expon.ppf(0.99)
    misses = sum(
        quantile_bounds(rng.exponential(size=2000), 0.99, 0.95)[0] > true_p99 for _ in range(400)
    )
    assert misses / 400 <= 0.05 + 3 * np.sqrt(0.05 * 0.95 / 400)
    low, high = quantile_bounds(np.arange(1.0, 101.0), 0.5, 0.99)
    assert 35 < low < 50 < high < 65


def test_a_noisy_two_fold_slowdown_of_a_millisecond_is_not_a_regression_but_25x_is() -> None:
    rng = np.random.default_rng(1)
    before = rng.lognormal(np.log(1.0), 0.3, 400)
    noisy = rng.lognormal(np.log(2.4), 0.3, 400)  # a busy core: 2.4x, +1.4 ms
    sticky = rng.lognormal(np.log(25.0), 0.2, 400)  # BentoML's adaptive batching after a burst
    slo = compose().serve.slo
    assert slowdown(before, noisy)["ratio_low"] > slo.max_after_burst_ratio
    assert slowdown(before, noisy)["diff_low"] < slo.min_after_burst_ms
    slow = slowdown(before, sticky)
    assert slow["ratio_low"] > 20 and slow["diff_low"] > 20
    assert slowdown(before, sticky) == slow  # seeded: the same samples, the same verdict


def test_window_rates_count_completions_per_whole_window() -> None:
    finished = np.concatenate([np.linspace(0, 0.999, 100), np.linspace(1, 1.999, 300), [2.1]])
    assert window_rates(finished, 1.0).tolist() == [100.0, 300.0]


def figures(**changes: float) -> dict:
    good = {"p99_ms": 10.0, "p99_low_ms": 9.0, "rps": 1000.0, "rps_high": 1100.0}
    good |= {"error_rate": 0.0, "burst_error_rate": 0.0}
    good |= {"after_burst_ratio": 1.0, "after_burst_ratio_low": 0.9}
    good |= {"after_burst_diff_ms": 0.0, "after_burst_diff_low_ms": -0.1}
    return good | changes


def test_the_release_gate_fails_on_its_bounds_not_on_its_point_estimates() -> None:
    slo = compose().serve.slo
    assert missed_slos(figures(), slo) == []
    # 2.4x slower by the medians and even by the bound, but only 1.4 ms: noise on 2 cores
    noise = figures(after_burst_ratio=2.4, after_burst_ratio_low=2.1)
    assert missed_slos(noise | {"after_burst_diff_low_ms": 1.4}, slo) == []
    sticky = figures(after_burst_ratio=25.3, after_burst_ratio_low=24.1)
    sticky |= {"after_burst_diff_ms": 24.0, "after_burst_diff_low_ms": 23.2}
    assert missed_slos(sticky, slo) == [
        f"serve.slo: lone requests 25.30x (+24.00 ms) slower {slo.settle_s} s after a burst than"
        " before it: at least 24.10x and +23.20 ms at 99% confidence"
        f" (> {slo.max_after_burst_ratio}x and > {slo.min_after_burst_ms} ms)"
    ]
    # a p99 over the SLO whose lower bound is within it: not evidence
    assert missed_slos(figures(p99_ms=260.0, p99_low_ms=240.0), slo) == []
    assert missed_slos(figures(p99_ms=300.0, p99_low_ms=280.0), slo) == [
        f"serve.slo: p99 300.0 ms > {slo.p99_ms} (at least 280.0 ms at 99% confidence)"
    ]
    assert missed_slos(figures(rps=90.0, rps_high=80.0), slo) == [
        f"serve.slo: throughput 90.0/s < {slo.min_rps} (at most 80.0/s at 99% confidence)"
    ]
    failed = missed_slos(figures(burst_error_rate=0.5), slo)
    assert failed == ["serve.slo: error rate 0.5000 in the burst > 0.0"]


def right(n: int, wrong: list[int]) -> np.ndarray:
    out = np.ones(n, bool)
    out[wrong] = False
    return out


def test_a_small_table_cannot_resolve_a_one_point_budget_and_says_so() -> None:
    fp32, int8 = right(54, []), right(54, [7])  # wine's val+test: one row is 1.85 points
    drop = paired_drop(fp32, int8)
    assert (drop["lost"], drop["won"], drop["rows"]) == (1, 0, 54)
    assert drop["drop"] == pytest.approx(100 / 54)
    assert drop["drop_low"] < 1.0 < drop["drop_high"]
    assert drop["resolution"] > 1.0  # even no disagreement could not show 1 point
    assert budget_verdict(drop, 1.0) == "unresolvable"
    assert budget_verdict(paired_drop(fp32, fp32), 1.0) == "unresolvable"


def test_only_disagreeing_rows_count_and_enough_rows_decide_both_ways() -> None:
    n = 540  # digits' val+test
    agree = paired_drop(right(n, [3, 9]), right(n, [3, 9]))  # the same two mistakes
    assert agree["drop"] == 0 and agree["drop_high"] < 1.0
    assert budget_verdict(agree, 1.0) == "within"
    swapped = paired_drop(right(n, [3, 9]), right(n, [4, 10]))  # lost 2, won 2
    assert swapped["drop"] == 0 and budget_verdict(swapped, 1.0) == "undecided"
    broken = paired_drop(right(n, []), right(n, list(range(0, n, 3))))  # one in three lost
    assert broken["drop_low"] > 25 and budget_verdict(broken, 1.0) == "over"


def test_an_exact_bound_on_the_drop_holds_as_often_as_it_says() -> None:
    rng = np.random.default_rng(2)
    n, lost_rate, won_rate = 300, 0.02, 0.005  # a true drop of 1.5 points
    misses = 0
    for _ in range(500):
        u = rng.random(n)
        fp32 = np.ones(n, bool)
        fp32[u > 1 - won_rate] = False  # FP32 wrong, INT8 right
        int8 = np.ones(n, bool)
        int8[u < lost_rate] = False
        misses += paired_drop(fp32, int8)["drop_high"] < 1.5
    assert misses / 500 <= 0.05


def test_a_regression_model_is_judged_on_its_paired_squared_errors() -> None:
    rng = np.random.default_rng(3)
    y = rng.normal(size=400)
    ref = y + rng.normal(scale=0.1, size=400)
    total = float(((y - y.mean()) ** 2).sum())
    same = paired_error_drop((ref - y) ** 2, (ref + 1e-4 - y) ** 2, total)
    assert abs(same["drop"]) < 0.1 and budget_verdict(same, 1.0) == "within"
    worse = y + rng.normal(scale=0.6, size=400)
    bad = paired_error_drop((ref - y) ** 2, (worse - y) ** 2, total)
    assert bad["drop_low"] > 20 and budget_verdict(bad, 1.0) == "over"


def test_drift_over_many_columns_is_judged_on_holm_adjusted_p_values() -> None:
    p = np.random.default_rng(4).uniform(size=64)  # 64 unchanged columns
    p[:3] = [0.01, 0.02, 0.04]  # what chance alone gives one test a column at 0.05
    scores = {f"c{i}": {"pvalue": v, "drift_category": "DRIFT" if v < 0.05 else "NO_DRIFT"}
              for i, v in enumerate(p)}  # fmt: skip
    scores["shifted"] = {"pvalue": 1e-9, "drift_category": "DRIFT"}
    scores["empty"] = None
    out = holm(scores)
    assert [c for c, s in out.items() if s and s["drift_category"] == "DRIFT"] == ["shifted"]
    assert out["shifted"]["pvalue_adjusted"] == pytest.approx(65e-9)
    assert out["c0"]["pvalue"] == 0.01 and out["c0"]["pvalue_adjusted"] == pytest.approx(0.64)
    assert out["empty"] is None
