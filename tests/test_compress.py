from pathlib import Path

import numpy as np
import pandas as pd
import pytest
from omegaconf import DictConfig, OmegaConf

from stages.common import StageError
from stages.compress import compress
from stages.export import load_program
from stages.model import encode_split, load_fp32, predict_logits


@pytest.fixture(scope="module")
def data(fp32_dir: Path, curated: Path) -> tuple:
    _, meta = load_fp32(fp32_dir)
    val = pd.read_parquet(curated / "val.parquet")
    test = pd.read_parquet(curated / "test.parquet")
    return encode_split(val, meta)[0], encode_split(test, meta)


def with_budget(cfg: DictConfig, max_drop: float) -> DictConfig:
    return OmegaConf.merge(cfg.compress, {"max_accuracy_drop": max_drop})


def test_int8_model_is_smaller_and_as_accurate(
    fp32_dir: Path, data: tuple, cfg: DictConfig, tmp_path: Path
) -> None:
    val, (x, y) = data
    result = compress(fp32_dir, val, (x, y), with_budget(cfg, 2.0), tmp_path / "c")
    assert result["size_ratio"] < 0.3
    assert result["accuracy_drop_points"] <= 2.0
    int8 = load_program(tmp_path / "c" / "model.pt2")
    fp32, _ = load_fp32(fp32_dir)
    agree = (predict_logits(int8, x).argmax(1) == predict_logits(fp32, x).argmax(1)).mean()
    assert agree > 0.97
    assert result["int8"]["accuracy"] == pytest.approx(
        float((predict_logits(int8, x).argmax(1) == y).mean())
    )
    assert result["int8"]["latency_ms_batch256"] > 0 and result["fp32"]["latency_ms_batch1"] > 0
    assert sorted(p.name for p in (tmp_path / "c").iterdir()) == ["model.json", "model.pt2"]


def test_accuracy_budget_exceeded_fails_and_keeps_previous_model(
    fp32_dir: Path, data: tuple, cfg: DictConfig, tmp_path: Path
) -> None:
    val, test = data
    out = tmp_path / "c"
    out.mkdir()
    (out / "model.pt2").write_bytes(b"previous")
    with pytest.raises(StageError, match=r"over the budget compress.max_accuracy_drop=-100"):
        compress(fp32_dir, val, test, with_budget(cfg, -100.0), out)
    assert (out / "model.pt2").read_bytes() == b"previous"
    assert [p.name for p in tmp_path.iterdir()] == ["c"]


def test_unknown_method_is_named(
    fp32_dir: Path, data: tuple, cfg: DictConfig, tmp_path: Path
) -> None:
    bad = OmegaConf.merge(cfg.compress, {"method": "int3"})
    with pytest.raises(StageError, match="compress.method: unknown method 'int3'"):
        compress(fp32_dir, data[0], data[1], bad, tmp_path / "c")
    assert not np.any([p.exists() for p in [tmp_path / "c"]])
