"""Distillation units; the distil stage end to end (Ray Train, the student learning from
the teacher's soft labels alone) runs in tests/test_pipeline.py."""

import numpy as np
import pytest
import torch

from fullstack_ml.stage import StageError
from fullstack_ml.train_worker import distillation_loss
from stages.distil import check_distil


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
