"""train: the model from conf/model/ trained with Ray Train (`TorchTrainer`, Ray Data shards).

Writes `models/fp32/` (weights, architecture config, fitted preprocessing, metadata),
`plots/train.csv` (per-epoch loss and accuracy) and `metrics/train.json`.
"""

import logging
import os
import random
import tempfile
import time
from collections.abc import Iterator
from functools import partial
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
    predict_logits,
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
SOFT = "teacher_outputs"  # a distilled student's soft targets
SHUFFLE_ROWS = 200_000  # the local shuffle buffer's size, at most: memory stays bounded
SAMPLE_ROWS = 200_000  # a streamed train split's preprocessing is fitted on its first rows
PLACEMENT = ("PACK", "SPREAD", "STRICT_PACK", "STRICT_SPREAD")  # Ray placement strategies
PRECISIONS = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}


class ToTensors(NumpyBatchCollateFn):
    """A Ray Data batch as (encoded features [B, F] float32, targets [B], and the teacher's
    outputs [B, C] when distilling, else None)."""

    def __call__(self, batch: dict[str, np.ndarray]) -> tuple[torch.Tensor, ...]:
        soft = torch.from_numpy(np.array(batch[SOFT])) if SOFT in batch else None
        x, y = (torch.from_numpy(np.array(batch[k])) for k in (FEATURES, LABEL))
        return x, y, soft


def encode_batch(
    df: pd.DataFrame, meta: dict[str, Any], split: str, teacher: nn.Module | None = None
) -> pa.Table:
    """Raw split rows as the encoded features (one tensor column: a batch of it is one
    array, not one per feature), the training target and the `teacher`'s outputs."""
    try:
        x = preprocessor(meta).encode_frame(df)
        y = encode_targets(df[meta["target"]], meta)
    except (KeyError, ValueError) as err:
        raise StageError(f"{split} split: {err}") from None
    columns = {FEATURES: ArrowTensorArray.from_numpy(x), LABEL: y}
    if teacher is not None:
        columns[SOFT] = ArrowTensorArray.from_numpy(predict_logits(teacher, x))
    return pa.table(columns)


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


def restore(model: nn.Module, optimizer: Any, scheduler: Any) -> dict[str, Any]:
    """The state of the last checkpoint Ray Train restored after a failure, loaded into the
    model, optimizer and scheduler; an empty state when the run starts afresh."""
    checkpoint = ray.train.get_checkpoint()
    if checkpoint is None:
        return {"epoch": 0, "history": [], "best_state": {}, "attempt": 0}
    with checkpoint.as_directory() as ckpt:
        state = torch.load(Path(ckpt) / "checkpoint.pt", weights_only=True)
    model.load_state_dict(state["model"])
    optimizer.load_state_dict(state["optimizer"])
    if scheduler is not None:
        scheduler.load_state_dict(state["scheduler"])
    return {**state, "attempt": state["attempt"] + 1}


def node_count() -> int:
    """How many machines (Ray nodes) the training workers run on."""
    node = ray.get_runtime_context().get_node_id()
    if not torch.distributed.is_initialized():
        return 1
    nodes: list[str | None] = [None] * torch.distributed.get_world_size()
    torch.distributed.all_gather_object(nodes, node)
    return len(set(nodes))


def train_loop_per_worker(config: dict[str, Any]) -> None:
    """One Ray Train worker: trains on its shard, reports metrics every epoch and a
    checkpoint every `checkpoint_every` epochs; after a failure it resumes from the last
    checkpoint."""
    for name in ("", "ray.train"):  # Ray Train logs every report and checkpoint at INFO
        logging.getLogger(name).setLevel(logging.WARNING)
    rank = ray.train.get_context().get_world_rank()
    task, score = config["task"], SCORE_NAME[config["task"]]
    seed_everything(config["seed"])  # the same initial weights on every worker
    net = build_network(config["model"], config["width"], config["outputs"])
    optimizer = instantiate(config["optimizer"])(net.parameters(), lr=config["lr"])
    schedule = config["lr_schedule"]
    scheduler = instantiate(schedule)(optimizer) if schedule else None
    state = restore(net, optimizer, scheduler)  # before DDP wraps the model
    model = ray.train.torch.prepare_model(net)  # device placement, DDP with >1 worker
    optimizer.load_state_dict(optimizer.state_dict())  # moves its state to the device
    classify = task == "classification"
    device = ray.train.torch.get_device()
    weights = config["class_weights"]
    weight = torch.tensor(weights, dtype=torch.float32, device=device) if weights else None
    loss_fn = (
        nn.CrossEntropyLoss(weight=weight, reduction="sum")
        if classify
        else nn.MSELoss(reduction="sum")
    )
    dtype = PRECISIONS[config["precision"]]
    autocast = partial(torch.autocast, device.type, dtype=dtype, enabled=dtype != torch.float32)
    scaler = torch.amp.GradScaler(device.type, enabled=dtype == torch.float16)
    collate = ToTensors()
    nodes = node_count()
    distill = config["distill"]

    def batch_sums(logits: torch.Tensor, y: torch.Tensor) -> tuple[torch.Tensor, list[float]]:
        logits = logits.float()
        if not classify:
            logits = logits[:, 0]
        loss = loss_fn(logits, y)
        hits = (logits.argmax(1) == y).sum() if classify else loss.detach()
        yf = y.double()
        return loss, [loss.item(), hits.item(), len(y), yf.sum().item(), (yf**2).sum().item()]

    train_shard = ray.train.get_dataset_shard("train")
    val_data = ray.train.get_dataset_shard("val")
    cache: list | None = [] if config["cache_shard"] else None
    history: list[dict[str, float]] = state["history"]
    stop = config["early_stopping"]
    best_state: dict[str, torch.Tensor] = state["best_state"]
    for epoch in range(state["epoch"] + 1, config["epochs"] + 1):
        began = time.perf_counter()
        torch.manual_seed(config["seed"] + 1000 * epoch + rank)  # dropout: same after a resume
        model.train()
        sums = torch.zeros(5, dtype=torch.float64, device=device)
        for x, y, soft in batches(train_shard, {**config, "rank": rank}, epoch, cache):
            optimizer.zero_grad()
            with autocast():
                outputs = model(x)
                loss, batch = batch_sums(outputs, y)  # the loss on the true targets
                if distill:
                    soft_loss = distillation_loss(outputs.float(), soft, distill["temperature"])
                    loss = (1 - distill["alpha"]) * loss + distill["alpha"] * soft_loss
            scaler.scale(loss / len(y)).backward()
            scaler.step(optimizer)
            scaler.update()
            sums += torch.tensor(batch, dtype=torch.float64, device=device)
        if torch.distributed.is_initialized():
            torch.distributed.all_reduce(sums)
        model.eval()
        val_sums = torch.zeros(5, dtype=torch.float64)  # every worker scores all of val
        with torch.no_grad(), autocast():
            for x, y, _ in val_data.iter_torch_batches(batch_size=1024, collate_fn=collate):
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
            "attempt": state["attempt"],  # 0, or how many failures the run resumed from
        }
        history.append(metrics)
        if scheduler is not None:
            scheduler.step()
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
                    {
                        "state_dict": best_state,  # what the stage keeps
                        "best_epoch": best,
                        "history": history,
                        "nodes": nodes,
                        # what a resumed run needs besides
                        "epoch": epoch,
                        "model": net.state_dict(),
                        "optimizer": optimizer.state_dict(),
                        "scheduler": scheduler.state_dict() if scheduler else None,
                        "best_state": best_state,
                        "attempt": state["attempt"],
                    },
                    Path(tmp) / "checkpoint.pt",
                )
                checkpoint = ray.train.Checkpoint.from_directory(tmp)
            ray.train.report(metrics, checkpoint=checkpoint)  # every worker must report
        if stopping:  # every worker scores all of val: all stop at the same epoch
            if rank == 0:
                print(f"early stop: no {stop['metric']} gain since epoch {best}", flush=True)
            break


def batches(
    shard: Any, config: dict[str, Any], epoch: int, cache: list | None
) -> Iterator[tuple[torch.Tensor, ...]]:
    """One epoch of (x, y, teacher outputs or None) training batches, shuffled with a seed
    per epoch and worker. `cache` (a list, filled on the first call) holds the whole shard
    in memory, shuffled by index like a plain PyTorch loop; None streams it through Ray Data
    with a bounded local shuffle buffer."""
    seed, size = config["seed"] + 1000 * epoch + config["rank"], config["batch_size"]
    if cache is None:
        yield from shard.iter_torch_batches(
            batch_size=size,
            collate_fn=ToTensors(),
            local_shuffle_buffer_size=config["shuffle_buffer"],
            local_shuffle_seed=seed,
        )
        return
    if not cache:
        parts = list(shard.iter_torch_batches(batch_size=65536, collate_fn=ToTensors()))
        cache.extend(None if p[0] is None else torch.cat(p) for p in zip(*parts, strict=True))
    x, y, soft = cache
    order = torch.randperm(len(x), generator=torch.Generator().manual_seed(seed))
    for i in range(0, len(x), size):
        rows = order[i : i + size]
        yield x[rows], y[rows], None if soft is None else soft[rows]


def distillation_loss(
    student: torch.Tensor, teacher: torch.Tensor, temperature: float
) -> torch.Tensor:
    """Summed over the batch: for classes, KL divergence between the teacher's and the
    student's class probabilities softened by `temperature`, times temperature^2 (Hinton et
    al.: keeps gradients comparable across temperatures); for regression, squared error to
    the teacher's prediction."""
    if student.shape[1] == 1:
        return nn.functional.mse_loss(student, teacher, reduction="sum")
    log_p = nn.functional.log_softmax(student / temperature, dim=1)
    q = nn.functional.softmax(teacher / temperature, dim=1)
    return nn.functional.kl_div(log_p, q, reduction="sum") * temperature**2


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
        cluster = ray.cluster_resources() if ray.is_initialized() else {}
        return torch.cuda.is_available() or cluster.get("GPU", 0) > 0
    if use_gpu is True and ray.is_initialized() and not ray.cluster_resources().get("GPU"):
        raise StageError("train.use_gpu: true, but the Ray cluster has no GPU (use auto)")
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


def init_ray(address: str | None, cpus: int, runtime_env: dict[str, Any] | None = None) -> None:
    """Join the cluster at `address`, or start a private local Ray; `runtime_env` (Ray's:
    e.g. a `working_dir` shipping this project's code to every node) applies to the job.

    The local Ray gets a logical CPU more than the workers take (`cpus`): with none spare,
    Ray Data's tasks wait forever for a CPU.
    """
    if ray.is_initialized():
        return
    local = {"num_cpus": max(cpus + 1, os.cpu_count() or 1)} if address is None else {}
    ray.init(
        address=address or "local",
        include_dashboard=False,
        logging_level=logging.ERROR,
        configure_logging=True,
        runtime_env=runtime_env,
        **local,
    )
    for name in ("ray.data", "ray.train"):
        logging.getLogger(name).setLevel(logging.WARNING)
    ray.data.DataContext.get_current().enable_progress_bars = False


def scaling(train_cfg: dict[str, Any], use_gpu: bool) -> ray.train.ScalingConfig:
    """Workers, their resources and placement from `train.*`."""
    resources = dict(train_cfg["resources_per_worker"] or {})
    if use_gpu:
        resources.setdefault("GPU", 1)
    return ray.train.ScalingConfig(
        num_workers=train_cfg["num_workers"],
        use_gpu=use_gpu,
        resources_per_worker=resources or None,
        placement_strategy=train_cfg["placement_strategy"],
    )


def fit(
    splits: dict[str, pd.DataFrame | Path],
    meta: dict[str, Any],
    train_cfg: dict[str, Any],
    seed: int,
    cluster: dict[str, Any] | None = None,
    train_rows: int | None = None,
    teacher: nn.Module | None = None,
    distill: dict[str, float] | None = None,
) -> tuple[nn.Module, list[dict[str, float]]]:
    """Train the network in `meta` on `splits` ("train", "val") with Ray Train, on the
    cluster at `cluster["address"]` (none: a local Ray). Records in `meta["trained_on"]`
    the workers, nodes, device and precision used. With a `teacher`, the loss mixes in
    `distillation_loss` on its outputs (`distill`: temperature, alpha).

    Returns:
        The best epoch's model (eval mode) and the per-epoch history.
    """
    cluster = cluster or {"address": None, "storage_path": None}
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
    shard_bytes = train_rows / num_workers * (width + outputs + 1) * 4  # features, soft, label
    cpus = (train_cfg["resources_per_worker"] or {}).get("CPU", 1)
    init_ray(cluster["address"], int(np.ceil(num_workers * cpus)), cluster.get("runtime_env"))
    use_gpu = resolve_use_gpu(train_cfg["use_gpu"])
    backend = "nccl" if use_gpu else "gloo"
    log.info(
        "training %s (%s, %d inputs) for %d epochs on %d %s worker(s), %s, %s",
        meta["model"]["_target_"],
        meta["task"],
        width,
        train_cfg["epochs"],
        num_workers,
        "GPU" if use_gpu else "CPU",
        backend,
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
            },
            torch_config=ray.train.torch.TorchConfig(backend=backend),
            scaling_config=scaling(train_cfg, use_gpu),
            run_config=ray.train.RunConfig(
                name=f"train-{time.strftime('%Y%m%d-%H%M%S')}-{os.getpid()}",
                storage_path=cluster["storage_path"] or tmp,
                checkpoint_config=ray.train.CheckpointConfig(num_to_keep=1),
                failure_config=ray.train.FailureConfig(max_failures=train_cfg["max_failures"]),
            ),
            datasets=build_datasets(splits, meta, teacher),
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
    history = state["history"]
    meta["trained_on"] = {
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
    return model.eval(), history


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
        cluster = OmegaConf.to_container(cfg.cluster, resolve=True)
        model, history = fit(splits, meta, train_cfg, cfg.seed, cluster, rows)
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
