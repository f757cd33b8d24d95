from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import torch

from stages.common import StageError, compose
from stages.distil import check_distil, distil
from stages.model import encode_split, load_fp32, predict_logits
from stages.train import distillation_loss


def test_distillation_loss_is_the_scaled_kl_divergence() -> None:
    rng = np.random.default_rng(0)
    student, teacher = rng.normal(size=(2, 5, 3))
    t = 2.0

    def softmax(z: np.ndarray) -> np.ndarray:
        e = np.exp(z / t - (z / t).max(1, keepdims=True))
        return e / e.sum(1, keepdims=True)

    p, q = softmax(student), softmax(teacher)
    expected = (q * (np.log(q) - np.log(p))).sum() * t**2
    loss = distillation_loss(torch.tensor(student), torch.tensor(teacher), t)
    assert loss.item() == pytest.approx(expected)
    same = distillation_loss(torch.tensor(teacher), torch.tensor(teacher), t)
    assert same.item() == pytest.approx(0.0, abs=1e-12)
    regression = distillation_loss(torch.ones(4, 1), torch.zeros(4, 1), t)
    assert regression.item() == pytest.approx(4.0)  # summed squared error


@pytest.mark.parametrize(
    ("key", "value", "message"),
    [
        ("temperature", 0, r"distil.temperature: expected a number > 0, got 0"),
        ("alpha", 1.5, r"distil.alpha: expected a number in \[0, 1\], got 1.5"),
    ],
)
def test_bad_distil_config_is_named(key: str, value: float, message: str) -> None:
    cfg = {"temperature": 4.0, "alpha": 0.5, key: value}
    with pytest.raises(StageError, match=message):
        check_distil(cfg)


def test_student_learns_from_the_teachers_soft_labels_alone(
    fp32_dir: Path, curated: Path, tmp_path: Path
) -> None:
    """alpha=1: the true labels carry no weight, so everything the student learns comes
    from the teacher's outputs on Ray Train."""
    cfg = compose(["train.num_workers=1", "distil.epochs=15", "distil.alpha=1.0"])
    result = distil(cfg, curated, fp32_dir, tmp_path / "student")
    student, meta = load_fp32(tmp_path / "student")
    teacher, teacher_meta = load_fp32(fp32_dir)
    assert meta["model"]["hidden_sizes"] == [64] and meta["distilled_from"]["alpha"] == 1.0
    assert meta["preprocessing"] == teacher_meta["preprocessing"]
    assert result["student_parameters"] < result["teacher_parameters"] / 10
    x, y = encode_split(pd.read_parquet(curated / "test.parquet"), meta)
    accuracy = (predict_logits(student, x).argmax(1) == y).mean()
    assert accuracy == pytest.approx(result["student_accuracy"])
    assert accuracy > 0.9  # 10 classes: chance is 0.1
    assert result["drop_points"] < 3.0
