"""What the service tells Prometheus: its metrics, and the drift of the records it serves
against the training profile (scored in a helper process, `drift_pool`)."""

import logging
import threading
import time
from collections.abc import Callable
from concurrent.futures import ProcessPoolExecutor
from concurrent.futures.process import BrokenProcessPool
from dataclasses import dataclass
from functools import cache, cached_property
from typing import TYPE_CHECKING, Any

import numpy as np

if TYPE_CHECKING:
    from prometheus_client import Counter, Gauge, Histogram

LOG = logging.getLogger("bentoml.fullstack_ml")  # BentoML sets up its loggers in workers


@dataclass(frozen=True)
class Metrics:
    """The service's own metrics (README, *Monitoring*)."""

    predictions: "Counter"  # per class label ("value" for a regression model)
    records: "Histogram"  # records per accepted request
    batch: "Histogram"  # records per model call
    failures: "Counter"  # rejected requests by reason
    pvalue: "Gauge"  # drift per feature
    category: "Gauge"
    window: "Gauge"
    outliers: "Counter"  # records flagged as outliers
    outlier_score: "Histogram"  # every record's outlier score (its _count: records scored)
    starts: "Counter"  # worker starts (a restart: the counter rises after the first start)


def up_to(most: int) -> list[int]:
    """Histogram buckets: the powers of two below `most`, then `most`."""
    return [b for b in (1, 2, 4, 8, 16, 32, 64, 128, 256, 512, 1024) if b < most] + [most]


@cache
def metrics(
    max_records: int, max_batch_size: int, score_buckets: tuple[float, ...] = (1.0,)
) -> Metrics:
    """The project's Prometheus metrics, created in the worker (after BentoML has set up
    prometheus_client's multiprocess directory), all at once; the histograms' buckets end
    at `serve.max_records` and `serve.max_batch_size`; the outlier score's are the
    detector's (`runtime.outliers.Detector.buckets`)."""
    from prometheus_client import Counter, Gauge, Histogram

    return Metrics(
        predictions=Counter("fullstack_ml_predictions", "Predictions per class", ["label"]),
        records=Histogram(
            "fullstack_ml_records_per_request",
            "Records per accepted prediction request",
            buckets=up_to(max_records),
        ),
        batch=Histogram(
            "fullstack_ml_batch_records",
            "Records per model call (requests batched together)",
            buckets=up_to(max_batch_size),
        ),
        failures=Counter(
            "fullstack_ml_validation_failures", "Rejected requests by reason", ["reason"]
        ),
        pvalue=Gauge(
            "fullstack_ml_drift_pvalue",
            "Drift p-value of the serving window against train",
            ["feature"],
            multiprocess_mode="mostrecent",
        ),
        category=Gauge(
            "fullstack_ml_drift_category",
            "Drift category: 0 no drift, 1 possible drift, 2 drift",
            ["feature"],
            multiprocess_mode="mostrecent",
        ),
        window=Gauge(
            "fullstack_ml_drift_window_records",
            "Records in the drift window",
            multiprocess_mode="mostrecent",
        ),
        outliers=Counter("fullstack_ml_outliers", "Records flagged as outliers"),
        outlier_score=Histogram(
            "fullstack_ml_outlier_score", "Outlier score of each record", buckets=score_buckets
        ),
        starts=Counter("fullstack_ml_worker_starts", "Serving worker starts"),
    )


class DriftMonitor:
    """The latest `window` records served, profiled with whylogs and scored against the
    training profile with the profile stage's algorithm (KS per feature). `metrics` gives
    the gauges it sets; `reference` is the training profile's file, set before scoring."""

    def __init__(
        self, features: list[str], window: int, min_records: int, metrics: Callable[[], Metrics]
    ) -> None:
        self.features, self.min_records, self.metrics = features, min_records, metrics
        self.buffer = np.zeros((window, len(features)), dtype=np.float32)
        self.outliers = np.zeros(window, dtype=bool)  # each record's outlier flag
        self.seen = 0
        self.scored_at = -1  # `seen` when last scored
        self.lock = threading.Lock()
        self.reference = ""  # the training profile's file

    def add(self, rows: np.ndarray, outliers: np.ndarray) -> None:
        """Records served (their numeric features) and whether each was an outlier."""
        window = len(self.buffer)
        with self.lock:
            kept = rows[-window:]
            start = self.seen + len(rows) - len(kept)
            at = (start + np.arange(len(kept))) % window
            self.buffer[at] = kept
            self.outliers[at] = outliers[-window:]
            self.seen += len(rows)

    def score(self) -> dict[str, Any]:
        """Per-feature drift of the window and its outlier rate; also sets the drift gauges."""
        with self.lock:
            seen, rows = self.seen, self.buffer[: min(self.seen, len(self.buffer))].copy()
            outliers = int(self.outliers[: len(rows)].sum())
        result: dict[str, Any] = {"records_seen": seen, "window_records": len(rows)}
        result["window_outliers"] = outliers
        result["outlier_rate"] = outliers / len(rows) if len(rows) else 0.0
        self.metrics().window.set(len(rows))
        if len(rows) < self.min_records or not self.features:
            return {**result, "status": "insufficient_data", "min_records": self.min_records}
        from fullstack_ml.runtime.drift_pool import CATEGORIES, drifted, window_drift

        scorer = self.scorer
        try:
            scores = scorer.submit(window_drift, rows, self.features, self.reference).result()
        except BrokenProcessPool:  # the helper died (killed, out of memory): start another
            LOG.warning("drift helper process died; starting a new one")
            with self.lock:
                if self.__dict__.get("scorer") is scorer:
                    del self.scorer  # the cached_property makes a new pool on next use
            scores = self.scorer.submit(window_drift, rows, self.features, self.reference)
            scores = scores.result()
        gauges = self.metrics()
        for feature, s in scores.items():
            gauges.pvalue.labels(feature=feature).set(s["pvalue"])
            gauges.category.labels(feature=feature).set(CATEGORIES.index(s["drift_category"]))
        self.scored_at = seen
        return {**result, "status": "ok", "drifted": drifted(scores), "features": scores}

    @cached_property
    def scorer(self) -> ProcessPoolExecutor:
        """A helper process: whylogs holds the GIL for ~0.15 s per score, which in the
        serving process stalls every request in flight (p99 x3 at 64 concurrent)."""
        from fullstack_ml.runtime.drift_pool import helper_pool

        return helper_pool()

    def refresh_forever(self, every_s: float) -> None:
        """Score the window every `every_s` seconds while records arrive (a daemon thread)."""
        while True:
            time.sleep(every_s)
            if self.seen != self.scored_at:
                self.score()
