"""The release gate's inputs (its rule: tests/test_gates.py; the stage itself runs in
tests/test_pipeline.py and, planted with a regression, in bench/gates.py's smoke)."""

from pathlib import Path

import numpy as np
import pytest

from fullstack_ml.answers import load_answers, save_answers
from fullstack_ml.stage import StageError


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
