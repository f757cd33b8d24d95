"""The Ray Train driver shared by the train and distil stages: Ray datasets of the encoded
splits, the worker group's scaling, and `fit`, which runs `train_worker.train_loop_per_worker`
on it and returns the best epoch's model."""

# isort: off
from fullstack_ml import ray_session  # sets Ray's environment before Ray loads
# isort: on

import logging
import os
import tempfile
import time
from collections.abc import Iterator
from contextlib import contextmanager, nullcontext
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import pyarrow as pa
import ray
import ray.train
import ray.train.torch
import torch
from hydra.utils import instantiate
from ray.data import ExecutionOptions
from ray.data.extensions import ArrowTensorArray
from torch import nn

from fullstack_ml.model import (
    SCORE_NAME,
    build_network,
    encode_targets,
    num_outputs,
    predict_logits,
    preprocessor,
)
from fullstack_ml.stage import StageError
from fullstack_ml.train_worker import FEATURES, LABEL, PRECISIONS, SOFT, train_loop_per_worker

log = logging.getLogger("fullstack_ml.trainer")
SHUFFLE_ROWS = 200_000  # the local shuffle buffer's size, at most: memory stays bounded
SAMPLE_ROWS = 200_000  # a streamed train split's preprocessing is fitted on its first rows
PLACEMENT = ("PACK", "SPREAD", "STRICT_PACK", "STRICT_SPREAD")  # Ray placement strategies


def encode_arrays(
    df: pd.DataFrame, meta: dict[str, Any], split: str, teacher: nn.Module | None = None
) -> dict[str, np.ndarray]:
    """Raw split rows as the encoded features [rows, width], the training target and the
    `teacher`'s outputs (when given), by column name of the training loop."""
    try:
        columns = {
            FEATURES: preprocessor(meta).encode_frame(df),
            LABEL: encode_targets(df[meta["target"]], meta),
        }
    except (KeyError, ValueError) as err:
        raise StageError(f"{split} split: {err}") from None
    if teacher is not None:
        columns[SOFT] = predict_logits(teacher, columns[FEATURES])
    return columns


def encode_batch(
    df: pd.DataFrame, meta: dict[str, Any], split: str, teacher: nn.Module | None = None
) -> pa.Table:
    """`encode_arrays` as a table (a tensor column: a batch of it is one array, not one
    per feature), for Ray Data."""
    arrays = encode_arrays(df, meta, split, teacher)
    return pa.table(
        {k: ArrowTensorArray.from_numpy(v) if v.ndim > 1 else v for k, v in arrays.items()}
    )


def build_datasets(
    splits: dict[str, pd.DataFrame | Path],
    meta: dict[str, Any],
    teacher: nn.Module | None = None,
) -> dict[str, ray.data.Dataset]:
    """Ray datasets of the encoded features and the training target, per split (and the
    `teacher`'s outputs on train): a frame is encoded here; a folder of Parquet parts
    (data.engine=ray) is read and encoded by Ray Data tasks, never whole in this process."""
    out = {}
    for name, split in splits.items():
        soft = teacher if name == "train" else None
        if isinstance(split, pd.DataFrame):
            out[name] = ray.data.from_arrow(encode_batch(split, meta, name, soft))
        else:  # a function, not a class: tasks, not an actor pool holding a CPU
            data = ray.data.read_parquet(str(split))
            kwargs = {"meta": meta, "split": name, "teacher": soft}
            encoded = data.map_batches(encode_batch, fn_kwargs=kwargs, batch_format="pandas")
            # Read and encoded once, in parallel blocks, into Ray's object store (which spills
            # to disk): re-running the read every epoch cost about 15 s per epoch here.
            out[name] = encoded.materialize()
    return out


def in_memory_tensors(
    splits: dict[str, pd.DataFrame], meta: dict[str, Any], teacher: nn.Module | None
) -> dict[str, dict[str, torch.Tensor]]:
    """`encode_arrays` of each split as tensors (the teacher's outputs on train only)."""
    return {
        name: {
            k: torch.from_numpy(v)
            for k, v in encode_arrays(df, meta, name, teacher if name == "train" else None).items()
        }
        for name, df in splits.items()
    }


def resolve_use_gpu(use_gpu: bool | str) -> bool:
    """`auto`: use GPUs when torch or the Ray cluster has any."""
    if use_gpu == "auto":
        cluster = ray.cluster_resources() if ray.is_initialized() else {}
        return torch.cuda.is_available() or cluster.get("GPU", 0) > 0
    if use_gpu is True and ray.is_initialized() and not ray.cluster_resources().get("GPU"):
        raise StageError("train.use_gpu: true, but the Ray cluster has no GPU (use auto)")
    if isinstance(use_gpu, bool):
        return use_gpu
    raise StageError(f"train.use_gpu: expected auto, true or false, got {use_gpu!r}")


def check_config(
    model_cfg: dict[str, Any],
    train_cfg: dict[str, Any],
    width: int,
    outputs: int,
    image_shape: tuple[int, int, int] | None = None,
) -> None:
    """Fail before Ray starts, naming the key, when the model or optimizer config is bad."""
    for key in ("epochs", "batch_size", "num_workers", "checkpoint_every", "max_categories"):
        value, least = train_cfg[key], 0 if key == "num_workers" else 1
        if not isinstance(value, int) or isinstance(value, bool) or value < least:
            raise StageError(f"train.{key}: expected an integer >= {least}, got {value!r}")
    cache = train_cfg["cache_shard_mb"]
    if not isinstance(cache, int | float) or isinstance(cache, bool) or cache < 0:
        raise StageError(f"train.cache_shard_mb: expected a number >= 0, got {cache!r}")
    failures = train_cfg["max_failures"]
    if not isinstance(failures, int) or isinstance(failures, bool) or failures < -1:
        raise StageError(f"train.max_failures: expected an integer >= -1, got {failures!r}")
    if train_cfg["precision"] not in PRECISIONS:
        raise StageError(
            f"train.precision: expected one of {', '.join(PRECISIONS)},"
            f" got {train_cfg['precision']!r}"
        )
    if train_cfg["placement_strategy"] not in PLACEMENT:
        raise StageError(
            f"train.placement_strategy: expected one of {', '.join(PLACEMENT)},"
            f" got {train_cfg['placement_strategy']!r}"
        )
    resources = train_cfg["resources_per_worker"] or {}
    for name, amount in resources.items():
        if not isinstance(amount, int | float) or isinstance(amount, bool) or amount < 0:
            raise StageError(
                f"train.resources_per_worker.{name}: expected a number >= 0, got {amount!r}"
            )
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
        ("model", lambda: build_network(model_cfg, width, outputs, image_shape)),
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


def scaling(train_cfg: dict[str, Any], use_gpu: bool) -> ray.train.ScalingConfig:
    """Workers, their resources and placement from `train.*`; `num_workers: 0` is Ray
    Train's local mode (the loop runs in this process)."""
    if train_cfg["num_workers"] == 0:
        return ray.train.ScalingConfig(num_workers=0, use_gpu=use_gpu)
    resources = dict(train_cfg["resources_per_worker"] or {})
    if use_gpu:
        resources.setdefault("GPU", 1)
    return ray.train.ScalingConfig(
        num_workers=train_cfg["num_workers"],
        use_gpu=use_gpu,
        resources_per_worker=resources or None,
        placement_strategy=train_cfg["placement_strategy"],
    )


@contextmanager
def local_threads(threads: int | None) -> Iterator[None]:
    """Local mode: torch uses the threads a worker would get (Ray sets a worker's
    OMP_NUM_THREADS to its CPUs), so both modes compute alike; None: unchanged."""
    before = torch.get_num_threads()
    context = ray.data.DataContext.get_current()
    order = context.execution_options.preserve_order
    if threads is not None:
        torch.set_num_threads(threads)
        context.execution_options.preserve_order = True  # as DataConfig sets for workers
    try:
        yield
    finally:
        torch.set_num_threads(before)
        context.execution_options.preserve_order = order


def fit(
    splits: dict[str, pd.DataFrame | Path],
    meta: dict[str, Any],
    train_cfg: dict[str, Any],
    seed: int,
    cluster: dict[str, Any] | None = None,
    train_rows: int | None = None,
    teacher: nn.Module | None = None,
    distill: dict[str, float] | None = None,
    live_dir: Path | None = None,
) -> tuple[nn.Module, list[dict[str, float]], dict[str, Any]]:
    """Train the network in `meta` on `splits` ("train", "val") with Ray Train, on the
    cluster at `cluster["address"]` (none: a local Ray). With a `teacher`, the loss mixes
    in `distillation_loss` on its outputs (`distill`: temperature, alpha). With `live_dir`,
    the rank-0 worker logs every epoch there with DVCLive.

    Returns:
        The best epoch's model (eval mode), the per-epoch history, and what it was
        trained on (`trained_on` of model.json: workers, nodes, device, precision,
        restarts).
    """
    cluster = cluster or {"address": None, "storage_path": None}
    pre, outputs = preprocessor(meta), num_outputs(meta)
    width, image_shape = pre.width, pre.image_shape
    check_config(meta["model"], train_cfg, width, outputs, image_shape)
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
    local = num_workers == 0  # Ray Train's local mode: the loop runs in this process
    shard_bytes = train_rows / max(num_workers, 1) * (width + outputs + 1) * 4
    cpus = (train_cfg["resources_per_worker"] or {}).get("CPU", 1)
    # Local mode on splits in memory needs no Ray at all: the loop gets the encoded
    # tensors in its config instead of Ray Data shards (Ray's start alone took ~4 s here).
    in_memory = local and all(isinstance(split, pd.DataFrame) for split in splits.values())
    ray_context = (
        nullcontext()
        if in_memory
        else ray_session.session(
            cluster["address"], int(np.ceil(num_workers * cpus)), cluster.get("runtime_env")
        )
    )
    logging.getLogger("ray.train").setLevel(logging.WARNING)  # INFO: a line per report
    with ray_context, local_threads(int(np.ceil(cpus)) if local else None):
        use_gpu = resolve_use_gpu(train_cfg["use_gpu"])
        backend = "nccl" if use_gpu else "gloo"
        log.info(
            "training %s (%s, %d inputs) for %d epochs %s on the %s, %s",
            meta["model"]["_target_"],
            meta["task"],
            width,
            train_cfg["epochs"],
            "in this process (Ray Train local mode)"
            if local
            else f"with {num_workers} Ray Train worker(s) ({backend})",
            "GPU" if use_gpu else "CPU",
            train_cfg["precision"],
        )
        with tempfile.TemporaryDirectory(prefix="ray-train-") as tmp:
            trainer = ray.train.torch.TorchTrainer(
                train_loop_per_worker,
                train_loop_config={
                    "model": meta["model"],
                    "optimizer": train_cfg["optimizer"],
                    "task": meta["task"],
                    "width": width,
                    "image_shape": image_shape,
                    "augment": train_cfg["augment"] if image_shape else None,
                    "outputs": outputs,
                    "epochs": train_cfg["epochs"],
                    "batch_size": train_cfg["batch_size"],
                    "lr": train_cfg["lr"],
                    "seed": seed,
                    "shuffle_buffer": min(train_rows, SHUFFLE_ROWS),
                    "cache_shard": shard_bytes <= train_cfg["cache_shard_mb"] * 2**20,
                    "checkpoint_every": train_cfg["checkpoint_every"],
                    "early_stopping": train_cfg["early_stopping"],
                    "lr_schedule": train_cfg["lr_schedule"],
                    "class_weights": meta.get("class_weights"),
                    "precision": train_cfg["precision"],
                    "distill": distill if teacher is not None else None,
                    # local mode keeps the checkpoint it is given: not a folder deleted after
                    "checkpoint_dir": str(Path(tmp) / "local") if local else None,
                    # absolute: a worker actor's working directory is not this one
                    "live_dir": str(Path(live_dir).resolve()) if live_dir else None,
                    "arrays": in_memory_tensors(splits, meta, teacher) if in_memory else None,
                },
                torch_config=ray.train.torch.TorchConfig(backend=backend),
                scaling_config=scaling(train_cfg, use_gpu),
                run_config=ray.train.RunConfig(
                    name=f"train-{time.strftime('%Y%m%d-%H%M%S')}-{os.getpid()}",
                    storage_path=cluster["storage_path"] or tmp,
                    checkpoint_config=ray.train.CheckpointConfig(num_to_keep=1),
                    failure_config=ray.train.FailureConfig(max_failures=train_cfg["max_failures"]),
                ),
                datasets=None if in_memory else build_datasets(splits, meta, teacher),
                dataset_config=ray.train.DataConfig(
                    datasets_to_split=["train"],  # every worker scores all of val
                    execution_options=ExecutionOptions(preserve_order=True),
                ),
            )
            result = trainer.fit()
            with result.checkpoint.as_directory() as ckpt:
                state = torch.load(Path(ckpt) / "checkpoint.pt", weights_only=True)
        model = build_network(meta["model"], width, outputs, image_shape)
        model.load_state_dict(state["state_dict"])  # the best epoch's weights
        history = state["history"]
        trained_on = {
            "workers": num_workers,
            "nodes": state["nodes"],
            "device": "GPU" if use_gpu else "CPU",
            "precision": train_cfg["precision"],
            "restarts": history[-1]["attempt"],
        }
        log.info(
            "kept epoch %d of %d (best %s); %d worker(s) on %d node(s), %d restart(s)",
            state["best_epoch"],
            len(history),
            train_cfg["early_stopping"]["metric"],
            num_workers,
            state["nodes"],
            history[-1]["attempt"],
        )
        return model.eval(), history, trained_on
