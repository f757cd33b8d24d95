import json
import time
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import torch

from fullstack_ml.model import encode_split, load_fp32, predict_logits
from fullstack_ml.schema import parse_schema
from fullstack_ml.stage import StageError
from fullstack_ml.trainer import build_datasets, resolve_use_gpu
from stages.train import model_meta


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
    assert saved["model"]["_target_"] == "fullstack_ml.model.MLP" and saved["train"]["epochs"] == 40
    assert saved["task"] == "classification"


def test_unknown_label_in_val_names_the_split_and_column(cfg) -> None:
    from omegaconf import OmegaConf

    train = pd.DataFrame({"a": [1.0, 2.0], "y": [0, 1]})
    schema = {
        "task": "classification",
        "features": [{"name": "a", "kind": "numeric"}],
        "target": {"name": "y"},
        "classes": [0, 1],
        "rows": {"train": 2, "val": 2, "test": 0},
    }
    meta = model_meta(parse_schema(schema), train, {}, OmegaConf.to_container(cfg.train))
    with pytest.raises(StageError, match=r"val split: labels \['7'\]"):
        build_datasets({"train": train, "val": train.assign(y=[0, 7])}, meta)


def test_use_gpu_values() -> None:
    assert resolve_use_gpu(False) is False
    assert resolve_use_gpu("auto") is torch.cuda.is_available()
    with pytest.raises(StageError, match="train.use_gpu"):
        resolve_use_gpu("sometimes")


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks a machine without a GPU")
@pytest.mark.usefixtures("ray_local")
def test_use_gpu_true_without_a_gpu_fails_instead_of_waiting() -> None:
    with pytest.raises(StageError, match="train.use_gpu: true, but the Ray cluster has no"):
        resolve_use_gpu(True)


@pytest.mark.parametrize(
    ("override", "message"),
    [
        ({"train": {"lr": "abc"}}, r"train.lr: expected a number > 0, got 'abc'"),
        ({"train": {"epochs": 0}}, r"train.epochs: expected an integer >= 1, got 0"),
        ({"train": {"num_workers": -1}}, r"train.num_workers: expected an integer >= 0, got -1"),
        ({"model": {"hidden_sizes": "wide"}}, r"model: cannot build it"),
        ({"model": {"_target_": "fullstack_ml.model.Nope"}}, r"model: cannot build it"),
        ({"train": {"optimizer": {"_target_": "torch.optim.Nope"}}}, "train.optimizer: cannot"),
        ({"train": {"early_stopping": {"mode": "up"}}}, "train.early_stopping.mode: expected"),
        ({"train": {"early_stopping": {"patience": 0}}}, "train.early_stopping.patience"),
        ({"train": {"class_weights": "equal"}}, "train.class_weights: expected null or balanced"),
        ({"train": {"lr_schedule": {"_target_": "torch.Nope"}}}, "train.lr_schedule: cannot"),
        ({"train": {"precision": "int4"}}, "train.precision: expected one of fp32, bf16, fp16"),
        ({"train": {"placement_strategy": "ANY"}}, "train.placement_strategy: expected one"),
        ({"train": {"max_failures": -2}}, r"train.max_failures: expected an integer >= -1"),
        ({"train": {"resources_per_worker": {"CPU": "one"}}}, "resources_per_worker.CPU"),
    ],
)
def test_bad_config_fails_before_ray_starts(cfg, override: dict, message: str) -> None:
    from omegaconf import OmegaConf

    from fullstack_ml.trainer import check_config

    merged = OmegaConf.to_container(OmegaConf.merge(cfg, override), resolve=True)
    with pytest.raises(StageError, match=message):
        check_config(merged["model"], merged["train"], 64, 10)


@pytest.mark.usefixtures("ray_local")
def test_streams_part_folders_and_learns_categories_with_gaps(tmp_path: Path, cfg) -> None:
    """data.engine=ray splits (folders of Parquet parts) are streamed through Ray Data; the
    label here depends on a category and a number with missing values."""
    from fullstack_ml.stage import compose
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
    shrunk = ["train.epochs=4", "train.batch_size=128"]  # local mode, on Ray Data
    # streamed through Ray Data, not cached in the worker
    run = compose([*overrides, *shrunk, "train.cache_shard_mb=0"])
    history = train(run, tmp_path / "curated", tmp_path / "model")
    model, meta = load_fp32(tmp_path / "model")
    assert meta["preprocessing"]["vocab"] == {"city": ["a", "b", "c"]}
    test = pd.read_parquet(tmp_path / "curated/test.parquet")
    x, y = encode_split(test, meta)
    accuracy = (predict_logits(model, x).argmax(1) == y).mean()
    assert accuracy > 0.8 and history[-1]["val_accuracy"] > 0.8  # majority class: about 0.6


def test_balanced_class_weights() -> None:
    from stages.train import class_weights

    weights = class_weights(np.array([0, 0, 0, 1]), 3)
    assert weights == pytest.approx([4 / 9, 4 / 3, 1.0])  # n / (classes * count); absent: 1


def test_early_stopping_keeps_the_best_epoch_and_the_schedule_steps(
    curated: Path, tmp_path: Path
) -> None:
    """No later epoch beats epoch 1 by a whole accuracy point: training stops after
    `patience` more epochs and keeps epoch 1's weights, not the last."""
    from fullstack_ml.stage import compose
    from stages.train import train

    run = compose(
        [
            "train.epochs=20",
            "train.early_stopping.metric=val_accuracy",
            "train.early_stopping.mode=max",
            "train.early_stopping.min_delta=1.0",
            "train.early_stopping.patience=2",
            "train.lr_schedule={_target_: torch.optim.lr_scheduler.StepLR, _partial_: true,"
            " step_size: 1, gamma: 0.5}",
        ]
    )
    history = train(run, curated, tmp_path / "m")
    assert [h["epoch"] for h in history] == [1, 2, 3]
    assert [h["lr"] for h in history] == pytest.approx([1e-3, 5e-4, 2.5e-4])
    model, meta = load_fp32(tmp_path / "m")
    x, y = encode_split(pd.read_parquet(curated / "val.parquet"), meta)
    kept = (predict_logits(model, x).argmax(1) == y).mean()
    assert kept == pytest.approx(history[0]["val_accuracy"])
    assert history[2]["val_accuracy"] != history[0]["val_accuracy"]  # the last differs


@pytest.mark.slow
@pytest.mark.usefixtures("ray_local")
def test_killed_worker_resumes_from_the_last_checkpoint(
    fp32_dir: Path, curated: Path, tmp_path: Path
) -> None:
    """SIGKILL the training worker once a checkpoint is registered: Ray Train restarts it
    (train.max_failures), it resumes after that checkpoint's epoch, not epoch 1, and ends
    as accurate as the undisturbed session model trained with the same config; in fact
    with identical weights: a seeded run gives the same weights with one worker, resumed or
    not, as in local mode (`num_workers: 0`, the session model)."""
    import threading

    import psutil
    from conftest import FP32_RUN

    from fullstack_ml.stage import compose
    from stages.train import train

    storage = tmp_path / "checkpoints"
    checkpoints = ["train.checkpoint_every=5", f"cluster.storage_path={storage}"]
    run = compose([*FP32_RUN, "train.num_workers=1", *checkpoints])
    outcome: dict = {}

    def target() -> None:
        try:
            outcome["history"] = train(run, curated, tmp_path / "m")
        except Exception as err:  # re-raised below, in the test's thread
            outcome["error"] = err

    thread = threading.Thread(target=target)
    thread.start()
    # Ray Train writes this file once it has registered a reported checkpoint
    while thread.is_alive() and not list(storage.glob("*/checkpoint_manager_snapshot.json")):
        time.sleep(0.02)
    workers = [
        p
        for p in psutil.process_iter(["cmdline"])  # None where unreadable (a zombie)
        if "ray::RayTrainWorker" in (p.info["cmdline"] or [""])[0]
    ]
    assert thread.is_alive() and len(workers) == 1, "the run ended before the kill"
    workers[0].kill()
    thread.join()
    if "error" in outcome:
        raise outcome["error"]
    history = outcome["history"]
    assert [h["epoch"] for h in history] == list(range(1, 41))
    resumed = next(h["epoch"] for h in history if h["attempt"] == 1)
    assert resumed > 1 and (resumed - 1) % 5 == 0  # right after a checkpoint's epoch
    assert all(h["attempt"] == (h["epoch"] >= resumed) for h in history)
    _, meta = load_fp32(tmp_path / "m")
    assert meta["trained_on"]["restarts"] == 1
    x, y = encode_split(pd.read_parquet(curated / "test.parquet"), meta)
    accuracy = {
        name: (predict_logits(load_fp32(d)[0], x).argmax(1) == y).mean()
        for name, d in (("resumed", tmp_path / "m"), ("undisturbed", fp32_dir))
    }
    assert abs(accuracy["resumed"] - accuracy["undisturbed"]) <= 0.01, accuracy
    # more: a seeded one-worker run, killed and resumed, and local mode: identical weights
    a, b = (torch.load(d / "model.pt", weights_only=True) for d in (fp32_dir, tmp_path / "m"))
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
