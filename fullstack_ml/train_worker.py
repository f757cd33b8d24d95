"""The per-worker training loop of Ray Train, shared by the train and distil stages: one
worker trains on its shard, reports metrics every epoch and a checkpoint every
`checkpoint_every` epochs, and resumes from the last checkpoint after a failure."""

# isort: off
from fullstack_ml import ray_session  # noqa: F401  sets Ray's environment before Ray loads
# isort: on

import logging
import random
import tempfile
import time
from collections.abc import Iterator
from contextlib import nullcontext
from functools import partial
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
import ray.train
import ray.train.torch
import torch
from hydra.utils import instantiate
from ray.data.collate_fn import NumpyBatchCollateFn
from torch import nn

from fullstack_ml.model import SCORE_NAME, augment, build_network
from fullstack_ml.progress import bar

if TYPE_CHECKING:
    from dvclive import Live

LABEL = "label_index"
FEATURES = "features"
SOFT = "teacher_outputs"  # a distilled student's soft targets
PRECISIONS = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}


class ToTensors(NumpyBatchCollateFn):
    """A Ray Data batch as (encoded features [B, F] float32, targets [B], and the teacher's
    outputs [B, C] when distilling, else None)."""

    def __call__(self, batch: dict[str, np.ndarray]) -> tuple[torch.Tensor, ...]:
        soft = torch.from_numpy(np.array(batch[SOFT])) if SOFT in batch else None
        x, y = (torch.from_numpy(np.array(batch[k])) for k in (FEATURES, LABEL))
        return x, y, soft


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
    if not torch.distributed.is_initialized():
        return 1
    node = ray.get_runtime_context().get_node_id()
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
    net = build_network(config["model"], config["width"], config["outputs"], config["image_shape"])
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

    arrays = config["arrays"]  # local mode on splits in memory: tensors, no Ray Data
    if arrays:
        train_shard, val_data = None, arrays["val"]
        cache: list | None = [
            None if k not in arrays["train"] else arrays["train"][k].to(device)
            for k in (FEATURES, LABEL, SOFT)
        ]
    else:
        train_shard = ray.train.get_dataset_shard("train")
        val_data = ray.train.get_dataset_shard("val")
        cache = [] if config["cache_shard"] else None
    history: list[dict[str, float]] = state["history"]
    stop = config["early_stopping"]
    live = open_live(config["live_dir"], resumed=bool(history)) if rank == 0 else None
    best_state: dict[str, torch.Tensor] = state["best_state"]
    progress = bar(config["epochs"], "distil" if distill else "train", "epoch", show=rank == 0)
    progress.update(state["epoch"])  # resumed after a failure: the epochs done before
    for epoch in range(state["epoch"] + 1, config["epochs"] + 1):
        began = time.perf_counter()
        torch.manual_seed(config["seed"] + 1000 * epoch + rank)  # dropout: same after a resume
        model.train()
        sums = torch.zeros(5, dtype=torch.float64, device=device)
        for x, y, soft in batches(train_shard, {**config, "rank": rank}, epoch, cache):
            if config["augment"]:
                x = augment(x, config["image_shape"], config["augment"])
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
            for x, y, _ in val_batches(val_data, device):
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
        if live is not None:
            log_epoch(live, metrics, history[best - 1], score)
        if rank == 0:
            line = (
                f"epoch {epoch}/{config['epochs']}: train loss {train_loss:.4f}"
                f" {score} {train_score:.4f}, val loss {val_loss:.4f} {score} {val_score:.4f}"
            )
            if progress.disable:  # not a terminal: reaches the driver through Ray's logs
                print(line, flush=True)
            else:  # local mode on a terminal: the bar, with this epoch's figures
                progress.set_postfix_str(f"val loss {val_loss:.4f} {score} {val_score:.4f}")
                progress.update(1)
        local = config["checkpoint_dir"]  # local mode: a folder the driver reads after
        with nullcontext(local) if local else tempfile.TemporaryDirectory() as tmp:
            checkpoint = None
            last = epoch == config["epochs"] or stopping
            if rank == 0 and (last or epoch % config["checkpoint_every"] == 0):
                Path(tmp).mkdir(parents=True, exist_ok=True)
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
                progress.close()
                print(f"early stop: no {stop['metric']} gain since epoch {best}", flush=True)
            break
    progress.close()


def open_live(live_dir: str | None, resumed: bool) -> "Live | None":
    """DVCLive's logger for the per-epoch metrics and plots (`dvc exp show` and `dvc plots`
    read them while the run goes on); a run resumed after a failure continues its files.
    Imported here, by the one worker that logs: 1.1 s of import and 0.6 s to start."""
    if live_dir is None:
        return None
    from dvclive import Live

    return Live(live_dir, resume=resumed, save_dvc_exp=False, dvcyaml=None)


def log_epoch(live: "Live", metrics: dict[str, float], best: dict[str, float], score: str) -> None:
    """One epoch's figures at step = epoch, and the best epoch's in the summary
    (`metrics.json`: what the stage's metric shows)."""
    live.step = int(metrics["epoch"])
    # not epoch_s (a timing: the outputs would differ run to run) nor attempt (the history)
    names = ("train_loss", f"train_{score}", "val_loss", f"val_{score}", "lr")
    for name in names:
        live.log_metric(name, metrics[name])
    # the kept weights' epoch and score; DVCLive's own `step` is the epochs run
    live.summary.update({f"best_val_{score}": best[f"val_{score}"], "best_epoch": best["epoch"]})
    live.make_summary()


def val_batches(data: Any, device: torch.device) -> Iterator[tuple[torch.Tensor, ...]]:
    """The val split in order, in batches of 1024: from its tensors (local mode, in
    memory) or from its Ray Data shard."""
    if not isinstance(data, dict):
        yield from data.iter_torch_batches(batch_size=1024, collate_fn=ToTensors())
        return
    x, y = data[FEATURES].to(device), data[LABEL].to(device)
    for i in range(0, len(x), 1024):
        yield x[i : i + 1024], y[i : i + 1024], None


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
