"""The statistics the build's gates decide on: confidence bounds that know their own noise.

A gate fails only on evidence: a lower confidence bound past the limit, not a point estimate
that one row, one scheduler hiccup or one busy core can push over it. Each function is exact
or distribution-free where that is cheap (Clopper-Pearson bounds on rates, order-statistic
bounds on quantiles), a seeded bootstrap where it is not (ratio of two medians), so a verdict
is reproducible from its samples. numpy and scipy only.
"""

from collections.abc import Mapping
from typing import Any

import numpy as np
from scipy import stats


def rate_bounds(count: int, n: int, confidence: float = 0.95) -> tuple[float, float]:
    """Clopper-Pearson bounds on the rate behind `count` of `n`, each one-sided at
    `confidence` (exact: each holds at least that often, whatever the rate)."""
    if n <= 0:
        return 0.0, 1.0
    alpha = 1 - confidence
    low = stats.beta.ppf(alpha, count, n - count + 1) if count > 0 else 0.0
    high = stats.beta.ppf(confidence, count + 1, n - count) if count < n else 1.0
    return float(low), float(high)


def rate_over(count: int, n: int, limit: float, confidence: float = 0.95) -> bool:
    """Whether `count` of `n` is evidence that the rate exceeds `limit`: its lower bound
    does (a few rows of a small sample are not)."""
    return rate_bounds(count, n, confidence)[0] > limit


def exceedances(
    count: int, rows: int, rank: int, reference_rows: int, confidence: float = 0.999
) -> dict[str, Any]:
    """Whether `count` of `rows` new scores over a threshold, the `rank`-th smallest of
    `reference_rows` reference scores (the outlier detector's, on val), is evidence of a rate
    over the one it was set for. Rows exchangeable with the reference each pass it with a
    probability drawn from Beta(reference_rows + 1 - rank, rank) (the threshold is itself a
    sample), so the count is beta-binomial; `over` when P(K >= count) < 1 - `confidence`
    (exact: a false failure at most that often)."""
    a, b = reference_rows + 1 - rank, rank
    if a <= 0 or rows <= 0:  # no threshold (too few reference rows): nothing is flagged
        return {"expected": 0.0, "pvalue": 1.0, "over": False}
    pvalue = float(stats.betabinom.sf(count - 1, rows, a, b)) if count > 0 else 1.0
    return {"expected": rows * a / (a + b), "pvalue": pvalue, "over": pvalue < 1 - confidence}


def quantile_bounds(samples: np.ndarray, q: float, confidence: float = 0.99) -> tuple[float, float]:
    """Distribution-free bounds on the `q` quantile from the order statistics of `samples`,
    each one-sided at `confidence` (the binomial law of how many samples fall below it)."""
    x = np.sort(np.asarray(samples, dtype=float))
    n = len(x)
    # P(x[k-1] <= quantile) = P(Binomial(n, q) >= k): the largest such k with >= confidence
    low = int(stats.binom.ppf(1 - confidence, n, q))  # number of samples surely below
    high = int(stats.binom.ppf(confidence, n, q)) + 1
    return float(x[max(low - 1, 0)]), float(x[min(high - 1, n - 1)])


def slowdown(
    before: np.ndarray,
    after: np.ndarray,
    confidence: float = 0.99,
    resamples: int = 2000,
    seed: int = 0,
) -> dict[str, float]:
    """How much slower `after` is than `before` (two samples of latencies): the ratio and the
    difference of their medians, and the lower bounds of each at `confidence` (a percentile
    bootstrap over both samples, seeded: the same samples give the same bounds)."""
    a, b = np.asarray(before, dtype=float), np.asarray(after, dtype=float)
    rng = np.random.default_rng(seed)
    med_a = np.median(a[rng.integers(0, len(a), (resamples, len(a)))], axis=1)
    med_b = np.median(b[rng.integers(0, len(b), (resamples, len(b)))], axis=1)
    alpha = 1 - confidence
    return {
        "ratio": float(np.median(b) / np.median(a)),
        "ratio_low": float(np.quantile(med_b / med_a, alpha)),
        "diff": float(np.median(b) - np.median(a)),
        "diff_low": float(np.quantile(med_b - med_a, alpha)),
    }


def paired_drop(
    reference_right: np.ndarray, new_right: np.ndarray, confidence: float = 0.95
) -> dict[str, Any]:
    """The accuracy drop from a reference model to a new one on the same rows, in points, with
    bounds each one-sided at `confidence`.

    Only the rows where the two disagree carry information: `lost` (the reference right, the
    new one wrong) and `won` (the reverse). The drop is (lost - won) / rows; its bounds are
    Clopper-Pearson bounds on the two rates, split Bonferroni-wise (each at half the error),
    so each bound holds at least `confidence` of the time, whatever the rates.
    """
    ref, new = np.asarray(reference_right, bool), np.asarray(new_right, bool)
    n = len(ref)
    lost, won = int((ref & ~new).sum()), int((~ref & new).sum())
    half = 1 - (1 - confidence) / 2
    lost_low, lost_high = rate_bounds(lost, n, half)
    won_low, won_high = rate_bounds(won, n, half)
    return {
        "rows": n,
        "lost": lost,
        "won": won,
        "drop": 100 * (lost - won) / max(n, 1),
        "drop_low": 100 * (lost_low - won_high),
        "drop_high": 100 * (lost_high - won_low),
        # the best a sample of n rows can show: the upper bound with no disagreement at all
        "resolution": 100 * rate_bounds(0, n, half)[1],
    }


def paired_error_drop(
    reference_err: np.ndarray,
    new_err: np.ndarray,
    total: float,
    confidence: float = 0.95,
    resamples: int = 2000,
    seed: int = 0,
) -> dict[str, Any]:
    """The R^2 drop, in points, from a reference regression model to a new one on the same
    rows (`*_err`: squared errors per row, `total`: the rows' total sum of squares), with
    bounds each one-sided at `confidence` from a seeded bootstrap of the rows' paired
    differences."""
    d = (np.asarray(new_err, float) - np.asarray(reference_err, float)) * 100 / max(total, 1e-12)
    rng = np.random.default_rng(seed)
    sums = d[rng.integers(0, len(d), (resamples, len(d)))].sum(axis=1)
    alpha = 1 - confidence
    return {
        "rows": len(d),
        "drop": float(d.sum()),
        "drop_low": float(np.quantile(sums, alpha)),
        "drop_high": float(np.quantile(sums, confidence)),
        "resolution": 0.0,  # no floor a bootstrap could state
    }


def budget_verdict(drop: dict[str, Any], budget: float) -> str:
    """`within` when the drop's upper bound is within `budget` points, `over` when its lower
    bound is past it, else `undecided` (the rows cannot tell; `unresolvable` when even no
    disagreement at all could not show it within)."""
    if drop["drop_high"] <= budget:
        return "within"
    if drop["drop_low"] > budget:
        return "over"
    return "unresolvable" if drop["resolution"] > budget else "undecided"


def window_rates(finished_s: np.ndarray, window_s: float) -> np.ndarray:
    """Completions per second in each whole window of `window_s` from the first completion
    (`finished_s`: completion times in seconds); a final partial window is left out."""
    t = np.sort(np.asarray(finished_s, dtype=float))
    windows = int((t[-1] - t[0]) // window_s) if len(t) else 0
    counts = np.histogram(t, bins=windows, range=(t[0], t[0] + windows * window_s))[0]
    return counts / window_s if windows else np.array([len(t) / max(t[-1] - t[0], 1e-9)])


def missed_slos(result: Mapping[str, Any], slo: Mapping[str, Any]) -> list[str]:
    """The release gate's verdict on the figures `stages.validate` measured (`result`) against
    `serve.slo`, one line per SLO missed. Latency and throughput fail on their confidence
    bounds (one busy core must not fail a build); any failed request fails."""
    conf = f"{slo['confidence']:.0%} confidence"
    slower = (
        result["after_burst_ratio_low"] > slo["max_after_burst_ratio"]
        and result["after_burst_diff_low_ms"] > slo["min_after_burst_ms"]
    )
    checks = [
        (
            not slower,
            f"lone requests {result['after_burst_ratio']:.2f}x "
            f"({result['after_burst_diff_ms']:+.2f} ms) slower {slo['settle_s']} s after a burst "
            f"than before it: at least {result['after_burst_ratio_low']:.2f}x and "
            f"{result['after_burst_diff_low_ms']:+.2f} ms at {conf} "
            f"(> {slo['max_after_burst_ratio']}x and > {slo['min_after_burst_ms']} ms)",
        ),
        (
            result["burst_error_rate"] <= slo["max_error_rate"],
            f"error rate {result['burst_error_rate']:.4f} in the burst > {slo['max_error_rate']}",
        ),
        (
            result["p99_low_ms"] <= slo["p99_ms"],
            f"p99 {result['p99_ms']:.1f} ms > {slo['p99_ms']} "
            f"(at least {result['p99_low_ms']:.1f} ms at {conf})",
        ),
        (
            result["rps_high"] >= slo["min_rps"],
            f"throughput {result['rps']:.1f}/s < {slo['min_rps']} "
            f"(at most {result['rps_high']:.1f}/s at {conf})",
        ),
        (
            result["error_rate"] <= slo["max_error_rate"],
            f"error rate {result['error_rate']:.4f} > {slo['max_error_rate']}",
        ),
    ]
    return [f"serve.slo: {msg}" for ok, msg in checks if not ok]
