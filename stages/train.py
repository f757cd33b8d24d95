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
import pyarrow as pa  # noqa: E402
import ray  # noqa: E402
import ray.train  # noqa: E402
import ray.train.torch  # noqa: E402
import torch  # noqa: E402
from hydra.utils import instantiate  # noqa: E402
from omegaconf import DictConfig, OmegaConf  # noqa: E402
from ray.data import ExecutionOptions  # noqa: E402
from ray.data.collate_fn import NumpyBatchCollateFn  # noqa: E402
from ray.data.extensions import ArrowTensorArray  # noqa: E402
from torch import nn  # noqa: E402

from stages.common import StageError, atomic_dir, read_json, run, write_atomic, write_json  # noqa: E402
from stages.ingest import OUT_DIR as DATA_DIR  # noqa: E402
from stages.ingest import load_split  # noqa: E402
from stages.model import (  # noqa: E402
    SCORE_NAME,
    build_network,
    encode_targets,
    label_indices,
    num_outputs,
    preprocessor,
    save_fp32,
)
from stages.preprocess import fit_preprocessor  # noqa: E402

log = logging.getLogger("stages.train")
MODEL_DIR = Path("models/fp32")
CURVES = Path("plots/train.csv")
METRICS = Path("metrics/train.json")
LABEL = "label_index"
FEATURES = "features"
SHUFFLE_ROWS = 200_000  # the local shuffle buffer's size, at most: memory stays bounded
SAMPLE_ROWS = 200_000  # a streamed train split's preprocessing is fitted on its first rows


class ToTensors(NumpyBatchCollateFn):
    """A Ray Data batch as (encoded features [B, F] float32, targets [B])."""

    def __call__(self, batch: dict[str, np.ndarray]) -> tuple[torch.Tensor, torch.Tensor]:
        return torch.from_numpy(np.array(batch[FEATURES])), torch.from_numpy(np.array(batch[LABEL]))


def encode_batch(df: pd.DataFrame, meta: dict[str, Any], split: str) -> pa.Table:
    """Raw split rows as the encoded features (one tensor column: a batch of it is one
    array, not one per feature) and the training target."""
    try:
        x = preprocessor(meta).encode_frame(df)
        y = encode_targets(df[meta["target"]], meta)
    except (KeyError, ValueError) as err:
        raise StageError(f"{split} split: {err}") from None
    return pa.table({FEATURES: ArrowTensorArray.from_numpy(x), LABEL: y})


def build_datasets(
    splits: dict[str, pd.DataFrame | Path], meta: dict[str, Any]
) -> dict[str, ray.data.Dataset]:
    """Ray datasets of the encoded features and the training target, per split: a frame is
    encoded here; a folder of Parquet parts (data.engine=ray) is read and encoded by Ray
    Data tasks, never whole in this process."""
    out = {}
    for name, split in splits.items():
        if isinstance(split, pd.DataFrame):
            out[name] = ray.data.from_arrow(encode_batch(split, meta, name))
        else:  # a function, not a class: tasks, not an actor pool holding a CPU
            data = ray.data.read_parquet(str(split))
            kwargs = {"meta": meta, "split": name}
            encoded = data.map_batches(encode_batch, fn_kwargs=kwargs, batch_format="pandas")
            # Read and encoded once, in parallel blocks, into Ray's object store (which spills
            # to disk): re-running the read every epoch cost about 15 s per epoch here.
            out[name] = encoded.materialize()
    return out


def read_splits(
    data_dir: Path, fit_rows: int
) -> tuple[dict[str, pd.DataFrame | Path], pd.DataFrame]:
    """The train and val splits (frames, or the folders Ray Data streams) and the train rows
    the preprocessing is fitted on (all of a frame, the first `fit_rows` of a folder)."""
    import pyarrow.dataset

    splits: dict[str, pd.DataFrame | Path] = {}
    for name in ("train", "val"):
        path = data_dir / f"{name}.parquet"
        splits[name] = path if path.is_dir() else load_split(name, data_dir)
    train = splits["train"]
    if isinstance(train, Path):
        return splits, pyarrow.dataset.dataset(train).head(fit_rows).to_pandas()
    return splits, train


def seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)


def epoch_metrics(sums: torch.Tensor, task: str) -> tuple[float, float]:
    """Mean loss and the score (accuracy, or R^2) from summed loss, hits or squared error,
    rows, sum of targets and sum of squared targets."""
    loss, hits, n, sum_y, sum_y2 = sums.tolist()
    if task == "classification":
        return loss / n, hits / n
    return loss / n, 1.0 - hits / max(sum_y2 - sum_y**2 / n, 1e-12)


def train_loop_per_worker(config: dict[str, Any]) -> None:
    """One Ray Train worker: trains on its shard, reports metrics and a checkpoint per epoch."""
    logging.getLogger().setLevel(logging.WARNING)  # Ray Train logs every report at INFO
    rank = ray.train.get_context().get_world_rank()
    task, score = config["task"], SCORE_NAME[config["task"]]
    seed_everything(config["seed"])  # the same initial weights on every worker
    model = build_network(config["model"], config["width"], config["outputs"])
    model = ray.train.torch.prepare_model(model)  # device placement, DDP with >1 worker
    torch.manual_seed(config["seed"] + rank)  # distinct dropout per worker
    optimizer = instantiate(config["optimizer"])(model.parameters(), lr=config["lr"])
    schedule = config["lr_schedule"]
    scheduler = instantiate(schedule)(optimizer) if schedule else None
    classify = task == "classification"
    device = ray.train.torch.get_device()
    weights = config["class_weights"]
    weight = torch.tensor(weights, dtype=torch.float32, device=device) if weights else None
    loss_fn = (
        nn.CrossEntropyLoss(weight=weight, reduction="sum")
        if classify
        else nn.MSELoss(reduction="sum")
    )
    collate = ToTensors()

    def batch_sums(logits: torch.Tensor, y: torch.Tensor) -> tuple[torch.Tensor, list[float]]:
        if not classify:
            logits = logits[:, 0]
        loss = loss_fn(logits, y)
        hits = (logits.argmax(1) == y).sum() if classify else loss.detach()
        yf = y.double()
        return loss, [loss.item(), hits.item(), len(y), yf.sum().item(), (yf**2).sum().item()]

    train_shard = ray.train.get_dataset_shard("train")
    val_data = ray.train.get_dataset_shard("val")
    history: list[dict[str, float]] = []
    stop = config["early_stopping"]
    best_state: dict[str, torch.Tensor] = {}
    for epoch in range(1, config["epochs"] + 1):
        began = time.perf_counter()
        model.train()
        sums = torch.zeros(5, dtype=torch.float64, device=device)
        for x, y in train_shard.iter_torch_batches(
            batch_size=config["batch_size"],
            collate_fn=collate,
            local_shuffle_buffer_size=config["shuffle_buffer"],
            local_shuffle_seed=config["seed"] + 1000 * epoch + rank,
        ):
            optimizer.zero_grad()
            loss, batch = batch_sums(model(x), y)
            (loss / len(y)).backward()
            optimizer.step()
            sums += torch.tensor(batch, dtype=torch.float64, device=device)
        if torch.distributed.is_initialized():
            torch.distributed.all_reduce(sums)
        model.eval()
        val_sums = torch.zeros(5, dtype=torch.float64)  # every worker scores all of val
        with torch.no_grad():
            for x, y in val_data.iter_torch_batches(batch_size=1024, collate_fn=collate):
                val_sums += torch.tensor(batch_sums(model(x), y)[1], dtype=torch.float64)
        train_loss, train_score = epoch_metrics(sums.cpu(), task)
        val_loss, val_score = epoch_metrics(val_sums, task)
        metrics = {
            "epoch": epoch,
            "train_loss": train_loss,
            f"train_{score}": train_score,
            "val_loss": val_loss,
            f"val_{score}": val_score,
            "lr": optimizer.param_groups[0]["lr"],
            "epoch_s": time.perf_counter() - began,  # training and validation
        }
        history.append(metrics)
        if scheduler is not None:
            scheduler.step()
        net = model.module if hasattr(model, "module") else model
        best = best_epoch(history, stop)
        if best == epoch:  # kept in memory; checkpoints carry the best weights, not the last
            best_state = {k: v.detach().cpu().clone() for k, v in net.state_dict().items()}
        stopping = stop["patience"] is not None and epoch - best >= stop["patience"]
        if rank == 0:
            print(  # reaches the driver's console through Ray's log forwarding
                f"epoch {epoch}/{config['epochs']}: train loss {train_loss:.4f}"
                f" {score} {train_score:.4f}, val loss {val_loss:.4f} {score} {val_score:.4f}",
                flush=True,
            )
        with tempfile.TemporaryDirectory() as tmp:
            checkpoint = None
            last = epoch == config["epochs"] or stopping
            if rank == 0 and (last or epoch % config["checkpoint_every"] == 0):
                torch.save(
                    {"state_dict": best_state, "best_epoch": best, "history": history},
                    Path(tmp) / "checkpoint.pt",
                )
                checkpoint = ray.train.Checkpoint.from_directory(tmp)
            ray.train.report(metrics, checkpoint=checkpoint)  # every worker must report
        if stopping:  # every worker scores all of val: all stop at the same epoch
            if rank == 0:
                print(f"early stop: no {stop['metric']} gain since epoch {best}", flush=True)
            break


def best_epoch(history: list[dict[str, float]], stop: dict[str, Any]) -> int:
    """The epoch (1-based) whose `stop.metric` is best (`stop.mode` min or max), counting
    only gains over `stop.min_delta`."""
    sign = 1.0 if stop["mode"] == "min" else -1.0
    best, at = float("inf"), 0
    for entry in history:
        value = sign * entry[stop["metric"]]
        if value < best - stop["min_delta"]:
            best, at = value, entry["epoch"]
    return at


def class_weights(labels: np.ndarray, n_classes: int) -> list[float]:
    """Loss weights inversely proportional to each class's frequency (scikit-learn's
    "balanced"): n / (classes * count); an absent class gets weight 1."""
    counts = np.bincount(labels, minlength=n_classes).astype(np.float64)
    weights = np.where(counts > 0, len(labels) / (n_classes * np.maximum(counts, 1)), 1.0)
    return weights.tolist()


def resolve_use_gpu(use_gpu: bool | str) -> bool:
    """`auto`: use GPUs when torch or the Ray cluster has any."""
    if use_gpu == "auto":
        return torch.cuda.is_available() or ray.cluster_resources().get("GPU", 0) > 0
    if isinstance(use_gpu, bool):
        return use_gpu
    raise StageError(f"train.use_gpu: expected auto, true or false, got {use_gpu!r}")


def check_config(
    model_cfg: dict[str, Any], train_cfg: dict[str, Any], width: int, outputs: int
) -> None:
    """Fail before Ray starts, naming the key, when the model or optimizer config is bad."""
    for key in ("epochs", "batch_size", "num_workers", "checkpoint_every", "max_categories"):
        value = train_cfg[key]
        if not isinstance(value, int) or isinstance(value, bool) or value < 1:
            raise StageError(f"train.{key}: expected an integer >= 1, got {value!r}")
    stop = train_cfg["early_stopping"]
    if stop["mode"] not in ("min", "max"):
        raise StageError(f"train.early_stopping.mode: expected min or max, got {stop['mode']!r}")
    patience = stop["patience"]
    if patience is not None and (not isinstance(patience, int) or patience < 1):
        raise StageError(f"train.early_stopping.patience: expected null or >= 1, got {patience!r}")
    if train_cfg["class_weights"] not in (None, "balanced"):
        raise StageError(
            f"train.class_weights: expected null or balanced, got {train_cfg['class_weights']!r}"
        )
    lr = train_cfg["lr"]
    if not isinstance(lr, int | float) or isinstance(lr, bool) or lr <= 0:
        raise StageError(f"train.lr: expected a number > 0, got {lr!r}")
    for key, build in (
        ("model", lambda: build_network(model_cfg, width, outputs)),
        (
            "train.optimizer",
            lambda: instantiate(train_cfg["optimizer"])(nn.Linear(1, 1).parameters(), lr=lr),
        ),
        (
            "train.lr_schedule",
            lambda: (
                train_cfg["lr_schedule"]
                and instantiate(train_cfg["lr_schedule"])(
                    torch.optim.SGD(nn.Linear(1, 1).parameters(), lr=lr)
                )
            ),
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
    splits: dict[str, pd.DataFrame | Path],
    meta: dict[str, Any],
    train_cfg: dict[str, Any],
    seed: int,
    address: str | None = None,
    train_rows: int | None = None,
) -> tuple[nn.Module, list[dict[str, float]]]:
    """Train the network in `meta` on `splits` ("train", "val") with Ray Train.

    Returns:
        The model from the final checkpoint (eval mode) and the per-epoch history.
    """
    width, outputs = preprocessor(meta).width, num_outputs(meta)
    check_config(meta["model"], train_cfg, width, outputs)
    score = SCORE_NAME[meta["task"]]
    metrics = ("train_loss", "val_loss", f"train_{score}", f"val_{score}")
    if train_cfg["early_stopping"]["metric"] not in metrics:
        raise StageError(
            f"train.early_stopping.metric: {train_cfg['early_stopping']['metric']!r} is not"
            f" one of {', '.join(metrics)}"
        )
    if train_rows is None:
        train_rows = len(splits["train"])
    num_workers = train_cfg["num_workers"]
    init_ray(address, num_workers)
    use_gpu = resolve_use_gpu(train_cfg["use_gpu"])
    log.info(
        "training %s (%s, %d inputs) for %d epochs on %d %s worker(s)",
        meta["model"]["_target_"],
        meta["task"],
        width,
        train_cfg["epochs"],
        num_workers,
        "GPU" if use_gpu else "CPU",
    )
    with tempfile.TemporaryDirectory(prefix="ray-train-") as storage:
        trainer = ray.train.torch.TorchTrainer(
            train_loop_per_worker,
            train_loop_config={
                "model": meta["model"],
                "optimizer": train_cfg["optimizer"],
                "task": meta["task"],
                "width": width,
                "outputs": outputs,
                "epochs": train_cfg["epochs"],
                "batch_size": train_cfg["batch_size"],
                "lr": train_cfg["lr"],
                "seed": seed,
                "shuffle_buffer": min(train_rows, SHUFFLE_ROWS),
                "checkpoint_every": train_cfg["checkpoint_every"],
                "early_stopping": train_cfg["early_stopping"],
                "lr_schedule": train_cfg["lr_schedule"],
                "class_weights": meta.get("class_weights"),
            },
            scaling_config=ray.train.ScalingConfig(num_workers=num_workers, use_gpu=use_gpu),
            run_config=ray.train.RunConfig(
                name=f"train-{int(time.time())}",
                storage_path=storage,
                checkpoint_config=ray.train.CheckpointConfig(num_to_keep=1),
            ),
            datasets=build_datasets(splits, meta),
            dataset_config=ray.train.DataConfig(
                datasets_to_split=["train"],  # every worker scores all of val
                execution_options=ExecutionOptions(preserve_order=True),
            ),
        )
        result = trainer.fit()
        with result.checkpoint.as_directory() as ckpt:
            state = torch.load(Path(ckpt) / "checkpoint.pt", weights_only=True)
    model = build_network(meta["model"], width, outputs)
    model.load_state_dict(state["state_dict"])  # the best epoch's weights
    log.info(
        "kept epoch %d of %d (best %s)",
        state["best_epoch"],
        len(state["history"]),
        train_cfg["early_stopping"]["metric"],
    )
    return model.eval(), state["history"]


def model_meta(
    schema: dict[str, Any],
    train: pd.DataFrame,
    model_cfg: dict[str, Any],
    train_cfg: dict[str, Any],
) -> dict[str, Any]:
    """What `models/fp32/model.json` holds: the architecture, the task, the feature and
    target names, the classes and the preprocessing fitted on `train`."""
    features = schema["features"]
    task = schema.get("task", "classification")
    target = schema["target"]["name"]
    try:
        pre = fit_preprocessor(
            train,
            [f["name"] for f in features if f.get("kind", "numeric") == "numeric"],
            [f["name"] for f in features if f.get("kind") == "categorical"],
            train_cfg["max_categories"],
            train[target] if task == "regression" else None,
        )
    except (KeyError, ValueError, TypeError) as err:
        raise StageError(f"train split does not match schema.json: {err}") from None
    weights = None
    if train_cfg["class_weights"] == "balanced":
        if task != "classification":
            raise StageError("train.class_weights: balanced needs a classification target")
        labels = label_indices(train[target], schema["classes"])
        weights = class_weights(labels, len(schema["classes"]))
    return {
        "class_weights": weights,
        "model": model_cfg,
        "task": task,
        "features": [f["name"] for f in features],
        "target": target,
        "classes": schema["classes"] if task == "classification" else [],
        "preprocessing": pre.to_dict(),
        "train": {k: v for k, v in train_cfg.items() if k != "optimizer"},
    }


def train(cfg: DictConfig, data_dir: Path, model_dir: Path) -> list[dict[str, float]]:
    """Train on the curated splits in `data_dir` and save the model to `model_dir`."""
    schema = read_json(data_dir / "schema.json")
    splits, fit_on = read_splits(data_dir, SAMPLE_ROWS)
    model_cfg = OmegaConf.to_container(cfg.model, resolve=True)
    train_cfg = OmegaConf.to_container(cfg.train, resolve=True)
    meta = model_meta(schema, fit_on, model_cfg, train_cfg)
    rows = schema["rows"]["train"]
    try:
        model, history = fit(splits, meta, train_cfg, cfg.seed, cfg.cluster.address, rows)
    finally:
        ray.shutdown()
    with atomic_dir(model_dir) as tmp:
        save_fp32(model, tmp, meta)
    return history


def main(cfg: DictConfig) -> None:
    history = train(cfg, DATA_DIR, MODEL_DIR)
    write_atomic(CURVES, pd.DataFrame(history).to_csv(index=False))
    best = best_epoch(history, OmegaConf.to_container(cfg.train.early_stopping))
    write_json(METRICS, {**history[best - 1], "best_epoch": best, "epochs_run": len(history)})
    score = next(k for k in history[-1] if k.startswith("val_") and k != "val_loss")
    log.info(
        "%s %.4f after %d epochs -> %s, %s",
        score,
        history[-1][score],
        len(history),
        MODEL_DIR,
        CURVES,
    )


if __name__ == "__main__":
    run(main)
