import json
from pathlib import Path

import pandas as pd
import pytest
import torch

from stages.common import StageError
from stages.model import encode_split, load_fp32, predict_logits
from stages.train import build_datasets, model_meta, resolve_use_gpu


def test_trained_model_learns_and_keeps_its_preprocessing(fp32_dir: Path, curated: Path) -> None:
    model, meta = load_fp32(fp32_dir)
    train = pd.read_parquet(curated / "train.parquet")
    val = pd.read_parquet(curated / "val.parquet")
    # the standardisation fitted on train is saved with the model
    x = train[meta["features"]].to_numpy()
    assert meta["preprocessing"]["mean"] == pytest.approx(x.mean(axis=0).tolist())
    val_x, labels = encode_split(val, meta)
    assert abs(val_x.mean()) < 0.2  # standardised with train's statistics
    pred = predict_logits(model, val_x).argmax(1)
    assert (pred == labels).mean() > 0.85  # 10 classes: chance is 0.1
    saved = json.loads((fp32_dir / "model.json").read_text())
    assert saved["model"]["_target_"] == "stages.model.MLP" and saved["train"]["epochs"] == 10
    assert saved["task"] == "classification"


def test_unknown_label_in_val_names_the_split_and_column(cfg) -> None:
    from omegaconf import OmegaConf

    train = pd.DataFrame({"a": [1.0, 2.0], "y": [0, 1]})
    schema = {
        "task": "classification",
        "features": [{"name": "a", "kind": "numeric"}],
        "target": {"name": "y"},
        "classes": [0, 1],
    }
    meta = model_meta(schema, train, {}, OmegaConf.to_container(cfg.train))
    with pytest.raises(StageError, match=r"val split: labels \['7'\]"):
        build_datasets({"train": train, "val": train.assign(y=[0, 7])}, meta)


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
