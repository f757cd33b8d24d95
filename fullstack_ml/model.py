"""The network, saving and loading a model (`model.pt` weights + `model.json`), and the
encoding and scoring that train, distil, evaluate, compress and validate share."""

import math
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


class ConvBlock(nn.Module):
    """3x3 convolution, batch norm, ReLU; with `residual`, two of them and a skip connection
    (ResNet's basic block; a 1x1 convolution matches the skip's shape where it changes)."""

    def __init__(self, c_in: int, c_out: int, stride: int = 1, residual: bool = False) -> None:
        super().__init__()

        def conv_bn(a: int, b: int, s: int) -> list[nn.Module]:
            return [nn.Conv2d(a, b, 3, s, 1, bias=False), nn.BatchNorm2d(b)]

        self.residual = residual
        if not residual:
            self.body = nn.Sequential(*conv_bn(c_in, c_out, stride), nn.ReLU())
            return
        self.body = nn.Sequential(
            *conv_bn(c_in, c_out, stride), nn.ReLU(), *conv_bn(c_out, c_out, 1)
        )
        self.skip = (
            nn.Sequential(nn.Conv2d(c_in, c_out, 1, stride, bias=False), nn.BatchNorm2d(c_out))
            if stride != 1 or c_in != c_out
            else nn.Identity()
        )
        self.relu = nn.ReLU()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if not self.residual:
            return self.body(x)
        return self.relu(self.body(x) + self.skip(x))


class ConvNet(nn.Module):
    """A ConvNet on one image feature, trained from scratch: per entry of `channels` a stage
    of `blocks` ConvBlocks (plain stages end in a 2x2 max pool; `residual` stages, ResNet
    style, halve the size by a stride-2 first block), then global average pooling, an
    optional `hidden` linear layer and the classifier. It takes the encoded rows [B, C*H*W]
    (`Preprocessor`) and views them as images of `image_shape` (C, H, W), in `channels_last`
    memory (the layout oneDNN's convolutions run fastest on)."""

    def __init__(
        self,
        in_features: int,
        num_classes: int,
        image_shape: tuple[int, int, int] | None,
        channels: list[int],
        blocks: int = 1,
        residual: bool = False,
        hidden: int = 0,
        dropout: float = 0.0,
        channels_last: bool = True,
    ) -> None:
        super().__init__()
        if image_shape is None or in_features != math.prod(image_shape):
            raise ValueError(
                f"a ConvNet takes one image feature and nothing else ({in_features} encoded"
                f" inputs, image {image_shape})"
            )
        self.image_shape, self.channels_last = tuple(image_shape), channels_last
        layers: list[nn.Module] = []
        width = image_shape[0]
        for i, c in enumerate(channels):
            for b in range(blocks):
                stride = 2 if residual and i > 0 and b == 0 else 1
                layers.append(ConvBlock(width, c, stride, residual))
                width = c
            if not residual:
                layers.append(nn.MaxPool2d(2, ceil_mode=True))
        layers += [nn.AdaptiveAvgPool2d(1), nn.Flatten()]
        if hidden:
            layers += [nn.Linear(width, hidden), nn.ReLU(), nn.Dropout(dropout)]
            width = hidden
        self.body = nn.Sequential(*layers)
        self.head = nn.Linear(width, num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = x.reshape(-1, *self.image_shape)
        # Eager only: Inductor lays convolutions out channels-last itself, and the explicit
        # copy in an exported graph broke its INT8 conv lowering (torch 2.13: a stride assert)
        if self.channels_last and not (
            torch.compiler.is_exporting() or torch.compiler.is_compiling()
        ):
            x = x.contiguous(memory_format=torch.channels_last)
        return self.head(self.body(x))


def augment(x: torch.Tensor, shape: tuple[int, int, int], cfg: dict[str, Any]) -> torch.Tensor:
    """A training batch of encoded images [B, C*H*W] randomly shifted by up to
    `cfg["shift"]` pixels (a random crop of the zero-padded image), flipped left-right with
    `cfg["flip"]`, and rotated by up to `cfg["rotation"]` degrees: one affine resampling per
    image (`grid_sample`; uncovered pixels are 0, the train mean after normalising)."""
    shift, flip, rotation = cfg["shift"], cfg["flip"], cfg["rotation"]
    if not (shift or flip or rotation):
        return x
    b, (c, h, w) = len(x), shape
    angle = (torch.rand(b) * 2 - 1) * math.radians(rotation)
    sign = torch.where(torch.rand(b) < 0.5, -1.0, 1.0) if flip else torch.ones(b)
    dx, dy = (torch.randint(-shift, shift + 1, (2, b)) * 2).float() / torch.tensor([[w], [h]])
    cos, sin = torch.cos(angle), torch.sin(angle)
    theta = torch.stack(
        [torch.stack([cos * sign, -sin, dx], 1), torch.stack([sin * sign, cos, dy], 1)], 1
    ).to(x.device, x.dtype)
    images = x.reshape(b, c, h, w)
    grid = nn.functional.affine_grid(theta, [b, c, h, w], align_corners=False)
    return nn.functional.grid_sample(images, grid, align_corners=False).reshape(b, -1)


def num_outputs(meta: dict[str, Any]) -> int:
    """Logits per class, or one value for regression."""
    return len(meta["classes"]) if meta["task"] == "classification" else 1


def build_network(
    model_cfg: DictConfig | dict,
    in_features: int,
    outputs: int,
    image_shape: tuple[int, int, int] | None = None,
) -> nn.Module:
    """The network from `conf/model/` (via `_target_`) on `in_features` encoded inputs; a
    model config with an `image_shape` key (a ConvNet) gets the image feature's (C, H, W)."""
    extra = {"image_shape": image_shape} if "image_shape" in model_cfg else {}
    return instantiate(model_cfg, in_features=in_features, num_classes=outputs, **extra)


def save_fp32(model: nn.Module, out_dir: Path, meta: dict[str, Any]) -> None:
    """Write `model.pt` (state dict) and `model.json` (architecture, preprocessing, metadata)."""
    out_dir.mkdir(parents=True, exist_ok=True)
    torch.save(model.state_dict(), out_dir / "model.pt")
    write_meta(out_dir, meta)


def load_fp32(model_dir: Path) -> tuple[nn.Module, dict[str, Any]]:
    """The FP32 model saved by `save_fp32`, in eval mode, with its metadata."""
    meta = load_meta(model_dir)
    pre = preprocessor(meta)
    model = build_network(
        OmegaConf.create(meta["model"]), pre.width, num_outputs(meta), pre.image_shape
    )
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
