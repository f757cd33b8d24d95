"""The release tool's own rules (the whole cycle runs in tests/test_pipeline.py)."""

import pytest

from fullstack_ml.release import gate_failures, version_tag
from fullstack_ml.stage import StageError

SLO = {"p99_ms": 250, "min_rps": 100, "max_error_rate": 0.0, "max_after_burst_ratio": 2.0}
PASSED = {"rps": 900.0, "p99_ms": 12.0, "error_rate": 0.0, "after_burst_ratio": 1.1}
PASSED |= {"answers_checked": 270}


def test_versions_are_semver_tags() -> None:
    assert version_tag("1.2.0") == version_tag("v1.2.0") == "v1.2.0"
    for bad in ("1.2", "latest", "v1.2.0-rc1", ""):
        with pytest.raises(StageError, match="is not a version such as 1.2.0"):
            version_tag(bad)


def test_the_gate_must_have_passed_on_this_very_bento() -> None:
    details = {"bento_tag": "fullstack_ml:abc"}
    assert gate_failures(PASSED, details, "fullstack_ml:abc", SLO) == []
    assert gate_failures(PASSED, details, "fullstack_ml:def", SLO) == [
        "the gate measured fullstack_ml:abc, not fullstack_ml:def"
    ]
    slow = PASSED | {"p99_ms": 300.0, "rps": 50.0}
    assert gate_failures(slow, details, "fullstack_ml:abc", SLO) == [
        "p99_ms 300.0 is not <= 250",
        "rps 50.0 is not >= 100",
    ]
    unchecked = {k: v for k, v in PASSED.items() if k != "answers_checked"}
    assert gate_failures(unchecked, details, "fullstack_ml:abc", SLO) == [
        "no served answer was checked"
    ]
