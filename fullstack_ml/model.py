"""The network, saving and loading a model (`model.pt` weights + `model.json`), and the
encoding and scoring that train, distil, evaluate, compress and validate share."""

from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import torch
from hydra.utils import instantiate
from omegaconf import DictConfig, OmegaConf
from torch import nn

from fullstack_ml.runtime.meta import read_meta, write_meta
from fullstack_ml.runtime.preprocess import Preprocessor
from fullstack_ml.stage import StageError


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


def num_outputs(meta: dict[str, Any]) -> int:
    """Logits per class, or one value for regression."""
    return len(meta["classes"]) if meta["task"] == "classification" else 1


def build_network(model_cfg: DictConfig | dict, in_features: int, outputs: int) -> nn.Module:
    """The network from `conf/model/` (via `_target_`) on `in_features` encoded inputs."""
    return instantiate(model_cfg, in_features=in_features, num_classes=outputs)


def save_fp32(model: nn.Module, out_dir: Path, meta: dict[str, Any]) -> None:
    """Write `model.pt` (state dict) and `model.json` (architecture, preprocessing, metadata)."""
    out_dir.mkdir(parents=True, exist_ok=True)
    torch.save(model.state_dict(), out_dir / "model.pt")
    write_meta(out_dir, meta)


def load_fp32(model_dir: Path) -> tuple[nn.Module, dict[str, Any]]:
    """The FP32 model saved by `save_fp32`, in eval mode, with its metadata."""
    meta = load_meta(model_dir)
    width = preprocessor(meta).width
    model = build_network(OmegaConf.create(meta["model"]), width, num_outputs(meta))
    model.load_state_dict(torch.load(model_dir / "model.pt", weights_only=True))
    return model.eval(), meta


def load_meta(model_dir: Path) -> dict[str, Any]:
    """A model's `model.json`; a missing or malformed one is a StageError naming it."""
    try:
        return read_meta(model_dir)
    except (FileNotFoundError, ValueError) as err:
        raise StageError(str(err)) from None


def preprocessor(meta: dict[str, Any]) -> Preprocessor:
    return Preprocessor.from_dict(meta["preprocessing"])


def truth(target: pd.Series, meta: dict[str, Any]) -> np.ndarray:
    """Class indices (int64), or regression values (float64): what `decode` predicts.

    Raises:
        ValueError: a label outside the model's classes, naming it.
    """
    if meta["task"] == "classification":
        return label_indices(target, meta["classes"])
    return target.to_numpy(dtype="float64")


def encode_targets(target: pd.Series, meta: dict[str, Any]) -> np.ndarray:
    """Training targets: class indices, or the standardised regression target (float32)."""
    y = truth(target, meta)
    if meta["task"] == "classification":
        return y
    pre = preprocessor(meta)
    return ((y - pre.target_mean) / pre.target_std).astype(np.float32)


def encode_split(df: pd.DataFrame, meta: dict[str, Any]) -> tuple[np.ndarray, np.ndarray]:
    """A split's encoded features and its `truth`.

    Raises:
        KeyError: a feature or the target missing from `df`.
        ValueError: a label outside the model's classes.
    """
    return preprocessor(meta).encode_frame(df), truth(df[meta["target"]], meta)


def label_indices(labels: pd.Series, classes: list[Any]) -> np.ndarray:
    """Class indices of `labels`; a label outside `classes` raises ValueError naming it."""
    index = {c: i for i, c in enumerate(classes)}
    unknown = set(labels.unique()) - index.keys()
    if unknown:
        raise ValueError(f"labels {sorted(map(str, unknown))} are not among the classes")
    return labels.map(index).to_numpy(dtype=np.int64)


def decode(outputs: np.ndarray, meta: dict[str, Any]) -> np.ndarray:
    """Model outputs to class indices, or to regression values in the target's units."""
    if meta["task"] == "classification":
        return outputs.argmax(axis=1)
    pre = preprocessor(meta)
    return outputs[:, 0] * pre.target_std + pre.target_mean


def score(truth: np.ndarray, predicted: np.ndarray, task: str) -> float:
    """Accuracy (classification, class indices), or R^2 (regression values)."""
    if task == "classification":
        return float((truth == predicted).mean())
    sst = float(((truth - truth.mean()) ** 2).sum()) or 1.0
    return 1.0 - float(((truth - predicted) ** 2).sum()) / sst


SCORE_NAME = {"classification": "accuracy", "regression": "r2"}


@torch.inference_mode()
def predict_logits(model: nn.Module, x: np.ndarray, batch_size: int = 1024) -> np.ndarray:
    """Logits of `model` on `x`, computed in batches."""
    out = [model(torch.from_numpy(x[i : i + batch_size])) for i in range(0, len(x), batch_size)]
    return torch.cat(out).numpy()
