import json
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import torch

from stages.common import StageError
from stages.model import features_array, load_fp32, predict_logits
from stages.train import build_datasets, resolve_use_gpu


def test_trained_model_learns_and_keeps_its_preprocessing(fp32_dir: Path, curated: Path) -> None:
    model, meta = load_fp32(fp32_dir)
    train = pd.read_parquet(curated / "train.parquet")
    val = pd.read_parquet(curated / "val.parquet")
    # the standardisation fitted on train travels inside the model
    scaler = model[0]
    x = features_array(train, meta["features"])
    assert np.allclose(scaler.mean.numpy(), x.mean(axis=0), atol=1e-4)
    assert meta["preprocessing"]["standardize"]["mean"] == pytest.approx(scaler.mean.tolist())
    pred = predict_logits(model, features_array(val, meta["features"])).argmax(1)
    labels = np.array([meta["classes"].index(v) for v in val[meta["target"]]])
    assert (pred == labels).mean() > 0.85  # 10 classes: chance is 0.1
    saved = json.loads((fp32_dir / "model.json").read_text())
    assert saved["model"]["_target_"] == "stages.model.MLP" and saved["train"]["epochs"] == 10


def test_unknown_label_in_val_names_the_split_and_column() -> None:
    train = pd.DataFrame({"a": [1.0, 2.0], "y": [0, 1]})
    with pytest.raises(StageError, match=r"val split, column 'y': labels \['7'\]"):
        build_datasets({"train": train, "val": train.assign(y=[0, 7])}, ["a"], "y", [0, 1])


def test_use_gpu_values() -> None:
    assert resolve_use_gpu(False) is False
    assert resolve_use_gpu("auto") is torch.cuda.is_available()
    with pytest.raises(StageError, match="train.use_gpu"):
        resolve_use_gpu("sometimes")


@pytest.mark.parametrize(
    ("override", "message"),
    [
        ({"train": {"lr": "abc"}}, r"train.lr: expected a number > 0, got 'abc'"),
        ({"train": {"epochs": 0}}, r"train.epochs: expected an integer >= 1, got 0"),
        ({"model": {"hidden_sizes": "wide"}}, r"model: cannot build it"),
        ({"model": {"_target_": "stages.model.Nope"}}, r"model: cannot build it"),
        ({"train": {"optimizer": {"_target_": "torch.optim.Nope"}}}, "train.optimizer: cannot"),
    ],
)
def test_bad_config_fails_before_ray_starts(cfg, override: dict, message: str) -> None:
    from omegaconf import OmegaConf

    from stages.train import check_config

    merged = OmegaConf.to_container(OmegaConf.merge(cfg, override), resolve=True)
    with pytest.raises(StageError, match=message):
        check_config(merged["model"], merged["train"], 64, 10)
