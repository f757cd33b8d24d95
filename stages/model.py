"""Model building blocks shared by train, evaluate, compress and the service."""

import json
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import torch
from hydra.utils import instantiate
from omegaconf import DictConfig, OmegaConf
from torch import nn


class Standardize(nn.Module):
    """Feature standardisation fitted on the train split; part of the model so every
    consumer (evaluate, compress, the service) applies exactly the same transform."""

    def __init__(self, mean: torch.Tensor, std: torch.Tensor) -> None:
        super().__init__()
        self.register_buffer("mean", mean.float())
        self.register_buffer("std", std.float())

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return (x - self.mean) / self.std


class MLP(nn.Module):
    """Fully connected classifier: `hidden_sizes` layers of Linear + activation + dropout."""

    def __init__(
        self,
        in_features: int,
        num_classes: int,
        hidden_sizes: list[int],
        dropout: float = 0.0,
        activation: str = "ReLU",
    ) -> None:
        super().__init__()
        layers: list[nn.Module] = []
        width = in_features
        for size in hidden_sizes:
            layers += [nn.Linear(width, size), getattr(nn, activation)(), nn.Dropout(dropout)]
            width = size
        layers.append(nn.Linear(width, num_classes))
        self.net = nn.Sequential(*layers)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.net(x)


def fit_standardize(x: np.ndarray) -> Standardize:
    """Standardisation fitted on `x` (rows x features); constant columns keep scale 1."""
    mean = x.mean(axis=0)
    std = x.std(axis=0)
    std[std < 1e-8] = 1.0
    return Standardize(torch.from_numpy(mean), torch.from_numpy(std))


def build_classifier(
    model_cfg: DictConfig | dict, in_features: int, num_classes: int, scaler: Standardize
) -> nn.Sequential:
    """The network from `conf/model/` (via `_target_`) behind the fitted preprocessing."""
    net = instantiate(model_cfg, in_features=in_features, num_classes=num_classes)
    return nn.Sequential(scaler, net)


def save_fp32(model: nn.Sequential, out_dir: Path, meta: dict[str, Any]) -> None:
    """Write `model.pt` (state dict) and `model.json` (architecture config and metadata)."""
    out_dir.mkdir(parents=True, exist_ok=True)
    torch.save(model.state_dict(), out_dir / "model.pt")
    (out_dir / "model.json").write_text(json.dumps(meta, indent=2))


def load_fp32(model_dir: Path) -> tuple[nn.Sequential, dict[str, Any]]:
    """The FP32 model saved by `save_fp32`, in eval mode, with its metadata."""
    meta = json.loads((model_dir / "model.json").read_text())
    n_features = len(meta["features"])
    scaler = Standardize(torch.zeros(n_features), torch.ones(n_features))
    model = build_classifier(
        OmegaConf.create(meta["model"]), n_features, len(meta["classes"]), scaler
    )
    model.load_state_dict(torch.load(model_dir / "model.pt", weights_only=True))
    return model.eval(), meta


def features_array(df: pd.DataFrame, features: list[str]) -> np.ndarray:
    """The feature columns of `df`, in model order, as float32."""
    return df[features].to_numpy(dtype=np.float32, copy=True)


def label_indices(labels: pd.Series, classes: list[Any]) -> np.ndarray:
    """Class indices of `labels`; a label outside `classes` raises ValueError naming it."""
    index = {c: i for i, c in enumerate(classes)}
    unknown = set(labels.unique()) - index.keys()
    if unknown:
        raise ValueError(f"labels {sorted(map(str, unknown))} are not among the classes")
    return labels.map(index).to_numpy(dtype=np.int64)


@torch.inference_mode()
def predict_logits(model: nn.Module, x: np.ndarray, batch_size: int = 1024) -> np.ndarray:
    """Logits of `model` on `x`, computed in batches."""
    out = [model(torch.from_numpy(x[i : i + batch_size])) for i in range(0, len(x), batch_size)]
    return torch.cat(out).numpy()
