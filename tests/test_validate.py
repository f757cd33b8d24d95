"""The release gate's SLO checks (the stage itself runs in tests/test_pipeline.py)."""

from pathlib import Path

import numpy as np
import pytest

from fullstack_ml.answers import load_answers, save_answers
from fullstack_ml.stage import StageError, compose
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


def test_answers_are_kept_for_their_model_and_each_bad_file_is_named(tmp_path: Path) -> None:
    model, path = tmp_path / "model.pt2", tmp_path / "answers.npz"
    model.write_bytes(b"program")
    save_answers(path, np.array([2, 0, 1]), model)
    assert load_answers(path, model, 3).tolist() == [2, 0, 1]
    with pytest.raises(StageError, match=r"answers.npz: 3 answers for 4 test rows"):
        load_answers(path, model, 4)
    model.write_bytes(b"another program")
    with pytest.raises(StageError, match=r"answers.npz: made for another .*model.pt2"):
        load_answers(path, model, 3)
    path.write_bytes(b"not npz")
    with pytest.raises(StageError, match=r"answers.npz: not the compress stage's answers"):
        load_answers(path, model, 3)
    with pytest.raises(StageError, match=r"missing.npz: not found \(run the compress stage"):
        load_answers(tmp_path / "missing.npz", model, 3)
