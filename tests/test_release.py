"""The release tool's own rules (the whole cycle runs in tests/test_pipeline.py)."""

import pytest

from fullstack_ml.release import gate_failures, version_tag
from fullstack_ml.stage import StageError, compose

SLO = dict(compose().serve.slo)
PASSED = {"rps": 900.0, "p99_ms": 12.0, "error_rate": 0.0, "after_burst_ratio": 1.1}
PASSED |= {"answers_checked": 270}
FIGURES = {"bento_tag": "fullstack_ml:abc", **PASSED, "p99_low_ms": 11.0, "rps_high": 950.0}
FIGURES |= {"burst_error_rate": 0.0, "after_burst_ratio_low": 1.0}
FIGURES |= {"after_burst_diff_ms": 0.1, "after_burst_diff_low_ms": 0.0}


def test_versions_are_semver_tags() -> None:
    assert version_tag("1.2.0") == version_tag("v1.2.0") == "v1.2.0"
    for bad in ("1.2", "latest", "v1.2.0-rc1", ""):
        with pytest.raises(StageError, match="is not a version such as 1.2.0"):
            version_tag(bad)


def test_the_gate_must_have_passed_on_this_very_bento() -> None:
    details = FIGURES
    assert gate_failures(PASSED, details, "fullstack_ml:abc", SLO) == []
    assert gate_failures(PASSED, details, "fullstack_ml:def", SLO) == [
        "the gate measured fullstack_ml:abc, not fullstack_ml:def"
    ]
    slow = details | {"p99_ms": 300.0, "p99_low_ms": 290.0, "rps": 50.0, "rps_high": 60.0}
    assert gate_failures(PASSED, slow, "fullstack_ml:abc", SLO) == [
        "serve.slo: p99 300.0 ms > 250 (at least 290.0 ms at 99% confidence)",
        "serve.slo: throughput 50.0/s < 100 (at most 60.0/s at 99% confidence)",
    ]
    unchecked = {k: v for k, v in PASSED.items() if k != "answers_checked"}
    assert gate_failures(unchecked, details, "fullstack_ml:abc", SLO) == [
        "no served answer was checked"
    ]
    old = {k: v for k, v in details.items() if k != "p99_low_ms"}  # an older gate's figures
    assert gate_failures(PASSED, old, "fullstack_ml:abc", SLO) == [
        "the gate's figures lack 'p99_low_ms' (run dvc repro)"
    ]
