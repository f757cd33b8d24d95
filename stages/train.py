"""train: the model from conf/model/ trained with Ray Train (`TorchTrainer`, Ray Data shards).

Writes `models/fp32/` (weights, architecture config, fitted preprocessing, metadata) and,
through DVCLive while it trains, `dvclive/train/` (per-epoch loss, score, learning rate as
plots; `metrics.json`: the last epoch's figures and the best epoch's).
"""

import logging
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
from omegaconf import DictConfig, OmegaConf

from fullstack_ml.curated import read_schema, read_splits
from fullstack_ml.model import label_indices, save_fp32
from fullstack_ml.paths import DATA_DIR, FP32_DIR, LIVE
from fullstack_ml.runtime.preprocess import fit_preprocessor
from fullstack_ml.schema import Schema
from fullstack_ml.stage import StageError, atomic_dir, run
from fullstack_ml.train_worker import best_epoch
from fullstack_ml.trainer import SAMPLE_ROWS, fit

log = logging.getLogger("stages.train")


def class_weights(labels: np.ndarray, n_classes: int) -> list[float]:
    """Loss weights inversely proportional to each class's frequency (scikit-learn's
    "balanced"): n / (classes * count); an absent class gets weight 1."""
    counts = np.bincount(labels, minlength=n_classes).astype(np.float64)
    weights = np.where(counts > 0, len(labels) / (n_classes * np.maximum(counts, 1)), 1.0)
    return weights.tolist()


def model_meta(
    schema: Schema,
    train: pd.DataFrame,
    model_cfg: dict[str, Any],
    train_cfg: dict[str, Any],
) -> dict[str, Any]:
    """What `models/fp32/model.json` holds: the architecture, the task, the feature and
    target names, the classes and the preprocessing fitted on `train`."""
    task, target = schema.task, schema.target
    try:
        pre = fit_preprocessor(
            train,
            schema.numeric,
            schema.categorical,
            train_cfg["max_categories"],
            train[target] if task == "regression" else None,
            schema.images,
        )
    except (KeyError, ValueError, TypeError) as err:
        raise StageError(f"train split does not match schema.json: {err}") from None
    weights = None
    if train_cfg["class_weights"] == "balanced":
        if task != "classification":
            raise StageError("train.class_weights: balanced needs a classification target")
        labels = label_indices(train[target], schema.classes)
        weights = class_weights(labels, len(schema.classes))
    return {
        "class_weights": weights,
        "model": model_cfg,
        "task": task,
        "features": schema.features,
        "target": target,
        "classes": schema.classes if task == "classification" else [],
        "preprocessing": pre.to_dict(),
        "train": {k: v for k, v in train_cfg.items() if k != "optimizer"},
    }


def train(
    cfg: DictConfig, data_dir: Path, model_dir: Path, live_dir: Path | None = None
) -> list[dict[str, float]]:
    """Train on the curated splits in `data_dir` and save the model to `model_dir`; with
    `live_dir`, log each epoch there with DVCLive."""
    schema = read_schema(data_dir)
    splits, fit_on = read_splits(data_dir, SAMPLE_ROWS)
    model_cfg = OmegaConf.to_container(cfg.model, resolve=True)
    train_cfg = OmegaConf.to_container(cfg.train, resolve=True)
    meta = model_meta(schema, fit_on, model_cfg, train_cfg)
    cluster = OmegaConf.to_container(cfg.cluster, resolve=True)
    model, history, trained_on = fit(
        splits, meta, train_cfg, cfg.seed, cluster, schema.rows["train"], live_dir=live_dir
    )
    with atomic_dir(model_dir) as tmp:
        save_fp32(model, tmp, {**meta, "trained_on": trained_on})
    return history


def main(cfg: DictConfig) -> None:
    history = train(cfg, DATA_DIR, FP32_DIR, LIVE["train"])
    best = best_epoch(history, OmegaConf.to_container(cfg.train.early_stopping))
    score = next(k for k in history[-1] if k.startswith("val_") and k != "val_loss")
    log.info(
        "%s %.4f at the best of %d epochs (%d) -> %s, %s",
        score,
        history[best - 1][score],
        len(history),
        best,
        FP32_DIR,
        LIVE["train"],
    )


if __name__ == "__main__":
    run(main)
