"""Magnitude pruning of the MLP with `torch.nn.utils.prune`, then a short fine-tune.

`structured` drops whole hidden neurons (rows of a hidden Linear by L2 norm, and the
matching input columns of the next Linear), so the rebuilt MLP is physically smaller.
`global_unstructured` zeroes the smallest weights across all Linear layers; the layers
keep their shape and the saved file shrinks only as far as the zeros compress.
"""

import copy
import logging
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from omegaconf import DictConfig
from torch import nn
from torch.nn.utils import prune

from fullstack_ml.model import MLP
from fullstack_ml.stage import StageError

log = logging.getLogger("stages.prune")
PRUNE_METHODS = ("none", "global_unstructured", "structured")


def check_prune(cfg: DictConfig) -> None:
    """StageError naming the `compress.prune` key at fault."""
    if cfg.method not in PRUNE_METHODS:
        raise StageError(
            f"compress.prune.method: unknown method {cfg.method!r} ({', '.join(PRUNE_METHODS)})"
        )
    if not 0 <= cfg.sparsity < 1:
        raise StageError(f"compress.prune.sparsity: {cfg.sparsity} is not in [0, 1)")


def linears(model: nn.Module) -> list[nn.Linear]:
    return [m for m in model.modules() if isinstance(m, nn.Linear)]


def sparsity(model: nn.Module) -> float:
    """The fraction of zero weights over all Linear layers."""
    weights = [m.weight for m in linears(model)]
    return float(sum((w == 0).sum() for w in weights) / sum(w.numel() for w in weights))


def prune_model(
    model: nn.Module, method: str, amount: float, meta: dict[str, Any]
) -> tuple[nn.Module, dict[str, Any]]:
    """A pruned copy of `model` and its metadata (the new hidden sizes when structured).

    Unstructured pruning leaves the mask in place (`prune.remove` once fine-tuned).
    """
    model = copy.deepcopy(model)
    if method == "global_unstructured":
        params = [(m, "weight") for m in linears(model)]
        prune.global_unstructured(params, pruning_method=prune.L1Unstructured, amount=amount)
        return model, meta
    if not isinstance(model, MLP):
        raise StageError(f"structured pruning needs a stages.model.MLP, not {type(model).__name__}")
    layers = linears(model)
    keep = []
    for layer in layers[:-1]:  # hidden layers: drop output neurons; the output layer stays
        prune.ln_structured(layer, "weight", amount=amount, n=2, dim=0)
        prune.remove(layer, "weight")
        keep.append(layer.weight.detach().abs().sum(1).nonzero().flatten())
    spec = meta["model"]
    smaller = MLP(
        layers[0].in_features,
        layers[-1].out_features,
        [len(k) for k in keep],
        spec.get("dropout", 0.0),
        spec.get("activation", "ReLU"),
    )
    inputs = torch.arange(layers[0].in_features)
    with torch.no_grad():
        for old, new, rows in zip(layers, linears(smaller), [*keep, None], strict=True):
            rows = torch.arange(old.out_features) if rows is None else rows
            new.weight.copy_(old.weight[rows][:, inputs])
            new.bias.copy_(old.bias[rows])
            inputs = rows
    meta = {**meta, "model": {**spec, "hidden_sizes": [len(k) for k in keep]}}
    return smaller.eval(), meta


def finetune(
    model: nn.Module,
    train: tuple[np.ndarray, np.ndarray] | None,
    task: str,
    cfg: DictConfig,
    seed: int,
) -> nn.Module:
    """`cfg.finetune_epochs` epochs of Adam at `cfg.lr` on `train` (encoded features,
    encoded targets); pruning masks, if any, stay applied and are then made permanent."""
    if cfg.finetune_epochs and train is None:
        raise StageError("compress.prune.finetune_epochs: fine-tuning needs the train split")
    torch.manual_seed(seed)
    if cfg.finetune_epochs:
        x, y = torch.from_numpy(train[0]), torch.from_numpy(train[1])
        optimizer = torch.optim.Adam(model.parameters(), lr=cfg.lr)
    model.train()
    for epoch in range(cfg.finetune_epochs):
        total = 0.0
        for idx in torch.randperm(len(x)).split(cfg.batch_size):
            out = model(x[idx])
            if task == "classification":
                loss = F.cross_entropy(out, y[idx])
            else:
                loss = F.mse_loss(out[:, 0], y[idx])
            optimizer.zero_grad()
            loss.backward()
            optimizer.step()
            total += loss.item() * len(idx)
        log.info("fine-tune epoch %d: loss %.4f", epoch + 1, total / len(x))
    for layer in linears(model):
        if prune.is_pruned(layer):
            prune.remove(layer, "weight")
    return model.eval()
