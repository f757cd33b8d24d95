"""The networks of conf/model/: ConvNets on an image feature (cnn_small, resnet_tiny,
cnn_tiny), their augmentation, and the Preprocessor's image encoding they read."""

import io

import numpy as np
import pandas as pd
import pytest
import torch
from hydra.errors import InstantiationException
from omegaconf import OmegaConf
from PIL import Image

from fullstack_ml.model import ConvNet, augment, build_network
from fullstack_ml.runtime.preprocess import fit_preprocessor
from fullstack_ml.stage import ROOT

IMAGE = {"size": [12, 8], "mode": "RGB", "channels": 3, "mean": [0.2, 0.4, 0.6]}
IMAGE |= {"std": [0.1, 0.2, 0.3], "resize": "stretch"}
OFF = {"shift": 0, "flip": False, "rotation": 0}


def png(pixels: np.ndarray) -> bytes:
    out = io.BytesIO()
    Image.fromarray(pixels).save(out, "PNG")
    return out.getvalue()


@pytest.mark.parametrize("name", ["cnn_small", "resnet_tiny", "cnn_tiny"])
def test_each_convnet_config_builds_on_an_image_feature_and_classifies(name: str) -> None:
    cfg = OmegaConf.load(ROOT / f"conf/model/{name}.yaml")
    net = build_network(cfg, 3 * 8 * 12, 5, (3, 8, 12)).eval()
    out = net(torch.randn(4, 3 * 8 * 12))
    assert out.shape == (4, 5)
    # the classifier reads a penultimate layer (what the outlier kNN candidate hooks)
    assert isinstance(net.head, torch.nn.Linear)


def test_a_convnet_refuses_inputs_that_are_not_one_image() -> None:
    cfg = OmegaConf.load(ROOT / "conf/model/cnn_small.yaml")
    with pytest.raises(InstantiationException, match="one image feature and nothing else"):
        build_network(cfg, 64, 10)  # a table's 64 columns: no image shape
    with pytest.raises(ValueError, match="65 encoded inputs"):
        ConvNet(65, 10, (1, 8, 8), [4])  # an image and one more column


def test_channels_last_gives_the_same_outputs_as_contiguous() -> None:
    torch.manual_seed(0)
    a = ConvNet(3 * 64, 4, (3, 8, 8), [8, 8], channels_last=True).eval()
    b = ConvNet(3 * 64, 4, (3, 8, 8), [8, 8], channels_last=False).eval()
    b.load_state_dict(a.state_dict())
    x = torch.randn(5, 3 * 64)
    torch.testing.assert_close(a(x), b(x), atol=1e-5, rtol=1e-5)


def test_augmentation_off_is_the_identity_and_on_moves_pixels_keeping_the_shape() -> None:
    x = torch.zeros(6, 1, 8, 8)
    x[:, 0, 2:6, 1:3] = 1.0  # a bar on the left
    flat = x.reshape(6, -1)
    assert augment(flat, (1, 8, 8), OFF) is flat
    torch.manual_seed(0)
    flipped = augment(flat, (1, 8, 8), {**OFF, "flip": True}).reshape(6, 1, 8, 8)
    mirrored = torch.flip(x, dims=[3])
    # every image is either itself or its mirror, and both happen
    same = [torch.allclose(f, o, atol=1e-5) for f, o in zip(flipped, x, strict=True)]
    mirror = [torch.allclose(f, m, atol=1e-5) for f, m in zip(flipped, mirrored, strict=True)]
    assert all(s or m for s, m in zip(same, mirror, strict=True)) and any(mirror) and any(same)
    shifted = augment(flat, (1, 8, 8), {**OFF, "shift": 2, "rotation": 10})
    assert shifted.shape == flat.shape and not torch.allclose(shifted, flat)


def test_images_encode_normalised_channels_first_from_bytes_or_pixels() -> None:
    rng = np.random.default_rng(0)
    pixels = rng.integers(0, 256, (3, 8, 12, 3), dtype=np.uint8)  # (N, H, W, C)
    train = pd.DataFrame({"image": [png(p) for p in pixels]})
    pre = fit_preprocessor(train, [], [], images={"image": IMAGE})
    assert pre.width == 3 * 8 * 12 and pre.image_shape == (3, 8, 12)
    x = pre.encode_frame(train)
    want = (pixels / 255.0 - np.array(IMAGE["mean"])) / np.array(IMAGE["std"])
    np.testing.assert_allclose(x, want.transpose(0, 3, 1, 2).reshape(3, -1), atol=1e-5)
    decoded = pre.encode({"image": list(pixels)})  # as the service passes them
    np.testing.assert_array_equal(decoded, x)
