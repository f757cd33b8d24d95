import json
from pathlib import Path

import numpy as np
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


def test_streams_part_folders_and_learns_categories_with_gaps(tmp_path: Path, cfg) -> None:
    """data.engine=ray splits (folders of Parquet parts) are streamed through Ray Data; the
    label here depends on a category and a number with missing values."""
    from stages.common import compose
    from stages.ingest import ingest
    from stages.train import train

    rng = np.random.default_rng(1)
    n = 4000
    df = pd.DataFrame({"x": rng.normal(size=n), "city": rng.choice(["a", "b", "c"], n)})
    df["label"] = np.where(df.x + (df.city == "a") * 1.5 > 0.5, "yes", "no")
    df.loc[rng.random(n) < 0.1, "x"] = np.nan
    df.loc[rng.random(n) < 0.1, "city"] = None
    df.to_parquet(tmp_path / "t.parquet")
    overrides = ["data=file", f"data.path={tmp_path / 't.parquet'}", "data.engine=ray"]
    overrides.append("data.quality.max_duplicate_rows=0.2")  # rows with x missing repeat
    ingest(compose(overrides).data, 0, tmp_path / "curated")
    assert (tmp_path / "curated/train.parquet").is_dir()
    run = compose([*overrides, "train.epochs=4", "train.num_workers=1", "train.batch_size=128"])
    history = train(run, tmp_path / "curated", tmp_path / "model")
    model, meta = load_fp32(tmp_path / "model")
    assert meta["preprocessing"]["vocab"] == {"city": ["a", "b", "c"]}
    test = pd.read_parquet(tmp_path / "curated/test.parquet")
    x, y = encode_split(test, meta)
    accuracy = (predict_logits(model, x).argmax(1) == y).mean()
    assert accuracy > 0.8 and history[-1]["val_accuracy"] > 0.8  # majority class: about 0.6
