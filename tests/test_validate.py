"""The release gate's SLO checks (the stage itself runs in tests/test_pipeline.py)."""

from fullstack_ml.stage import compose
from stages.validate import missed_slos


def test_a_server_slow_after_a_burst_misses_its_slo_and_says_so() -> None:
    slo = compose().serve.slo
    good = {"p99_ms": 10.0, "rps": 1000.0, "error_rate": 0.0, "burst_error_rate": 0.0}
    assert missed_slos({**good, "after_burst_ratio": 1.0}, slo) == []
    slow = missed_slos({**good, "after_burst_ratio": 4.93}, slo)
    assert slow == [
        f"serve.slo: lone requests 4.93x slower {slo.settle_s} s after a burst than before it"
        f" (> {slo.max_after_burst_ratio}x)"
    ]
    failed = missed_slos({**good, "after_burst_ratio": 1.0, "burst_error_rate": 0.5}, slo)
    assert failed == ["serve.slo: error rate 0.5000 in the burst > 0.0"]
