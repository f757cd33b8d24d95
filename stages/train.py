"""train: the model from conf/model/ trained with Ray Train (`TorchTrainer`, Ray Data shards).

Writes `models/fp32/` (weights, architecture config, fitted preprocessing, metadata),
`plots/train.csv` (per-epoch loss and accuracy) and `metrics/train.json`.
"""

import logging
import os
import random
import tempfile
import time
from pathlib import Path
from typing import Any

# Before Ray starts: workers inherit these. No usage stats, no log folding, quiet libraries.
for _key, _value in {
    "RAY_USAGE_STATS_ENABLED": "0",
    "RAY_DEDUP_LOGS": "0",
    "RAY_DATA_LOG_LEVEL": "ERROR",
    "RAY_LOGGER_LEVEL": "error",
    "RAY_TRAIN_ENABLE_PRINT_PATCH": "0",
    "RAY_TRAIN_HEALTH_CHECK_INTERVAL_S": "0.2",  # the 2 s default caps training at 1 epoch/2 s
    "RAY_TRAIN_ENABLE_PREEMPTION_WATCHER": "0",
    "RAY_ACCEL_ENV_VAR_OVERRIDE_ON_ZERO": "0",
}.items():
    os.environ.setdefault(_key, _value)

import numpy as np  # noqa: E402
import pandas as pd  # noqa: E402
import ray  # noqa: E402
import ray.train  # noqa: E402
import ray.train.torch  # noqa: E402
import torch  # noqa: E402
from hydra.utils import instantiate  # noqa: E402
from omegaconf import DictConfig, OmegaConf  # noqa: E402
from ray.data import ExecutionOptions  # noqa: E402
from ray.data.collate_fn import NumpyBatchCollateFn  # noqa: E402
from torch import nn  # noqa: E402

from stages.common import StageError, atomic_dir, read_json, run, write_atomic, write_json  # noqa: E402
from stages.ingest import OUT_DIR as DATA_DIR  # noqa: E402
from stages.ingest import load_split  # noqa: E402
from stages.model import (  # noqa: E402
    Standardize,
    build_classifier,
    features_array,
    fit_standardize,
    label_indices,
    save_fp32,
)

log = logging.getLogger("stages.train")
MODEL_DIR = Path("models/fp32")
CURVES = Path("plots/train.csv")
METRICS = Path("metrics/train.json")
LABEL = "label_index"


class ToTensors(NumpyBatchCollateFn):
    """A Ray Data batch as (features [B, F] float32, class indices [B] int64)."""

    def __init__(self, features: list[str]) -> None:
        self.features = features

    def __call__(self, batch: dict[str, np.ndarray]) -> tuple[torch.Tensor, torch.Tensor]:
        x = np.stack([batch[f] for f in self.features], axis=1).astype(np.float32)
        return torch.from_numpy(x), torch.from_numpy(batch[LABEL].astype(np.int64))


def build_datasets(
    splits: dict[str, pd.DataFrame], features: list[str], target: str, classes: list[Any]
) -> dict[str, ray.data.Dataset]:
    """Ray datasets of float32 features and the class index, one per split."""
    out = {}
    for name, df in splits.items():
        table = pd.DataFrame(features_array(df, features), columns=features)
        try:
            table[LABEL] = label_indices(df[target], classes)
        except ValueError as err:
            raise StageError(f"{name} split, column {target!r}: {err}") from None
        out[name] = ray.data.from_pandas(table)
    return out


def seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)


def train_loop_per_worker(config: dict[str, Any]) -> None:
    """One Ray Train worker: trains on its shard, reports metrics and a checkpoint per epoch."""
    logging.getLogger().setLevel(logging.WARNING)  # Ray Train logs every report at INFO
    rank = ray.train.get_context().get_world_rank()
    seed_everything(config["seed"])  # the same initial weights on every worker
    model = build_classifier(
        config["model"], len(config["features"]), len(config["classes"]), config["scaler"]
    )
    model = ray.train.torch.prepare_model(model)  # device placement, DDP with >1 worker
    torch.manual_seed(config["seed"] + rank)  # distinct dropout per worker
    optimizer = instantiate(config["optimizer"])(model.parameters(), lr=config["lr"])
    loss_fn = nn.CrossEntropyLoss(reduction="sum")
    collate = ToTensors(config["features"])
    device = ray.train.torch.get_device()
    train_shard = ray.train.get_dataset_shard("train")
    val_data = ray.train.get_dataset_shard("val")
    history: list[dict[str, float]] = []
    for epoch in range(1, config["epochs"] + 1):
        model.train()
        sums = torch.zeros(3, dtype=torch.float64, device=device)  # loss, correct, rows
        for x, y in train_shard.iter_torch_batches(
            batch_size=config["batch_size"],
            collate_fn=collate,
            local_shuffle_buffer_size=config["shuffle_buffer"],
            local_shuffle_seed=config["seed"] + 1000 * epoch + rank,
        ):
            optimizer.zero_grad()
            logits = model(x)
            loss = loss_fn(logits, y)
            (loss / len(y)).backward()
            optimizer.step()
            batch = [loss.item(), (logits.argmax(1) == y).sum().item(), len(y)]
            sums += torch.tensor(batch, dtype=torch.float64, device=device)
        if torch.distributed.is_initialized():
            torch.distributed.all_reduce(sums)
        model.eval()
        val_sums = torch.zeros(3, dtype=torch.float64)  # every worker scores all of val
        with torch.no_grad():
            for x, y in val_data.iter_torch_batches(batch_size=1024, collate_fn=collate):
                logits = model(x)
                val_sums += torch.tensor(
                    [loss_fn(logits, y).item(), (logits.argmax(1) == y).sum().item(), len(y)]
                )
        metrics = {
            "epoch": epoch,
            "train_loss": float(sums[0] / sums[2]),
            "train_accuracy": float(sums[1] / sums[2]),
            "val_loss": float(val_sums[0] / val_sums[2]),
            "val_accuracy": float(val_sums[1] / val_sums[2]),
        }
        history.append(metrics)
        if rank == 0:
            print(  # reaches the driver's console through Ray's log forwarding
                f"epoch {epoch}/{config['epochs']}: train loss {metrics['train_loss']:.4f}"
                f" acc {metrics['train_accuracy']:.4f}, val loss {metrics['val_loss']:.4f}"
                f" acc {metrics['val_accuracy']:.4f}",
                flush=True,
            )
        with tempfile.TemporaryDirectory() as tmp:
            checkpoint = None
            last = epoch == config["epochs"]
            if rank == 0 and (last or epoch % config["checkpoint_every"] == 0):
                net = model.module if hasattr(model, "module") else model
                state = {k: v.cpu() for k, v in net.state_dict().items()}
                torch.save(
                    {"state_dict": state, "history": history},
                    Path(tmp) / "checkpoint.pt",
                )
                checkpoint = ray.train.Checkpoint.from_directory(tmp)
            ray.train.report(metrics, checkpoint=checkpoint)  # every worker must report


def resolve_use_gpu(use_gpu: bool | str) -> bool:
    """`auto`: use GPUs when torch or the Ray cluster has any."""
    if use_gpu == "auto":
        return torch.cuda.is_available() or ray.cluster_resources().get("GPU", 0) > 0
    if isinstance(use_gpu, bool):
        return use_gpu
    raise StageError(f"train.use_gpu: expected auto, true or false, got {use_gpu!r}")


def check_config(
    model_cfg: dict[str, Any], train_cfg: dict[str, Any], n_features: int, n_classes: int
) -> None:
    """Fail before Ray starts, naming the key, when the model or optimizer config is bad."""
    for key in ("epochs", "batch_size", "num_workers", "checkpoint_every"):
        value = train_cfg[key]
        if not isinstance(value, int) or isinstance(value, bool) or value < 1:
            raise StageError(f"train.{key}: expected an integer >= 1, got {value!r}")
    lr = train_cfg["lr"]
    if not isinstance(lr, int | float) or isinstance(lr, bool) or lr <= 0:
        raise StageError(f"train.lr: expected a number > 0, got {lr!r}")
    scaler = Standardize(torch.zeros(n_features), torch.ones(n_features))
    for key, build in (
        ("model", lambda: build_classifier(model_cfg, n_features, n_classes, scaler)),
        (
            "train.optimizer",
            lambda: instantiate(train_cfg["optimizer"])(nn.Linear(1, 1).parameters(), lr=lr),
        ),
    ):
        try:
            build()
        except Exception as err:  # any error building it means the config is wrong
            raise StageError(f"{key}: cannot build it: {' '.join(str(err).split())}") from None


def init_ray(address: str | None, num_workers: int) -> None:
    """Join the cluster at `address`, or start a private local Ray.

    The local Ray gets a logical CPU more than the workers take: with none spare, Ray
    Data's tasks wait forever for a CPU.
    """
    if ray.is_initialized():
        return
    local = {"num_cpus": max(num_workers + 1, os.cpu_count() or 1)} if address is None else {}
    ray.init(
        address=address or "local",
        include_dashboard=False,
        logging_level=logging.ERROR,
        configure_logging=True,
        **local,
    )
    for name in ("ray.data", "ray.train"):
        logging.getLogger(name).setLevel(logging.WARNING)
    ray.data.DataContext.get_current().enable_progress_bars = False


def fit(
    splits: dict[str, pd.DataFrame],
    schema: dict[str, Any],
    model_cfg: dict[str, Any],
    train_cfg: dict[str, Any],
    seed: int,
    address: str | None = None,
) -> tuple[nn.Sequential, list[dict[str, float]]]:
    """Train on `splits` ("train", "val") with Ray Train.

    Returns:
        The model from the final checkpoint (eval mode) and the per-epoch history.
    """
    features = [f["name"] for f in schema["features"]]
    target, classes = schema["target"]["name"], schema["classes"]
    check_config(model_cfg, train_cfg, len(features), len(classes))
    scaler = fit_standardize(features_array(splits["train"], features))
    num_workers = train_cfg["num_workers"]
    init_ray(address, num_workers)
    use_gpu = resolve_use_gpu(train_cfg["use_gpu"])
    log.info(
        "training %s for %d epochs on %d %s worker(s)",
        model_cfg["_target_"],
        train_cfg["epochs"],
        num_workers,
        "GPU" if use_gpu else "CPU",
    )
    with tempfile.TemporaryDirectory(prefix="ray-train-") as storage:
        trainer = ray.train.torch.TorchTrainer(
            train_loop_per_worker,
            train_loop_config={
                "model": model_cfg,
                "optimizer": train_cfg["optimizer"],
                "scaler": scaler,
                "features": features,
                "classes": classes,
                "epochs": train_cfg["epochs"],
                "batch_size": train_cfg["batch_size"],
                "lr": train_cfg["lr"],
                "seed": seed,
                "shuffle_buffer": len(splits["train"]),
                "checkpoint_every": train_cfg["checkpoint_every"],
            },
            scaling_config=ray.train.ScalingConfig(num_workers=num_workers, use_gpu=use_gpu),
            run_config=ray.train.RunConfig(
                name=f"train-{int(time.time())}",
                storage_path=storage,
                checkpoint_config=ray.train.CheckpointConfig(num_to_keep=1),
            ),
            datasets=build_datasets(splits, features, target, classes),
            dataset_config=ray.train.DataConfig(
                datasets_to_split=["train"],  # every worker scores all of val
                execution_options=ExecutionOptions(preserve_order=True),
            ),
        )
        result = trainer.fit()
        with result.checkpoint.as_directory() as ckpt:
            state = torch.load(Path(ckpt) / "checkpoint.pt", weights_only=True)
    n = len(features)
    model = build_classifier(model_cfg, n, len(classes), Standardize(torch.zeros(n), torch.ones(n)))
    model.load_state_dict(state["state_dict"])
    return model.eval(), state["history"]


def train(cfg: DictConfig, data_dir: Path, model_dir: Path) -> list[dict[str, float]]:
    """Train on the curated splits in `data_dir` and save the model to `model_dir`."""
    schema = read_json(data_dir / "schema.json")
    splits = {name: load_split(name, data_dir) for name in ("train", "val")}
    model_cfg = OmegaConf.to_container(cfg.model, resolve=True)
    train_cfg = OmegaConf.to_container(cfg.train, resolve=True)
    try:
        model, history = fit(splits, schema, model_cfg, train_cfg, cfg.seed, cfg.cluster.address)
    finally:
        ray.shutdown()
    meta = {
        "model": model_cfg,
        "features": [f["name"] for f in schema["features"]],
        "target": schema["target"]["name"],
        "classes": schema["classes"],
        "preprocessing": {
            "standardize": {"mean": model[0].mean.tolist(), "std": model[0].std.tolist()}
        },
        "train": {k: v for k, v in train_cfg.items() if k != "optimizer"},
    }
    with atomic_dir(model_dir) as tmp:
        save_fp32(model, tmp, meta)
    return history


def main(cfg: DictConfig) -> None:
    history = train(cfg, DATA_DIR, MODEL_DIR)
    write_atomic(CURVES, pd.DataFrame(history).to_csv(index=False))
    write_json(METRICS, history[-1])
    log.info(
        "val accuracy %.4f after %d epochs -> %s, %s",
        history[-1]["val_accuracy"],
        len(history),
        MODEL_DIR,
        CURVES,
    )


if __name__ == "__main__":
    run(main)
