"""conf/ is the one source of truth: params.yaml must be its composition."""

from pathlib import Path

import yaml
from dvc.utils.hydra import compose_and_dump
from hydra.utils import instantiate

from fullstack_ml.stage import CONF_DIR, ROOT, compose, params_yaml


def test_params_yaml_is_composition_of_conf(tmp_path: Path) -> None:
    dumped = tmp_path / "params.yaml"
    compose_and_dump(dumped, str(CONF_DIR), None, "config", str(tmp_path), [])
    committed = yaml.safe_load((ROOT / "params.yaml").read_text())
    assert committed == yaml.safe_load(dumped.read_text()), "run `make params` and commit"
    assert (ROOT / "params.yaml").read_text() == params_yaml()


def test_overrides_and_groups_compose() -> None:
    cfg = compose(["model=mlp_wide", "train.lr=0.003", "experiment=smoke"])
    assert cfg.model.hidden_sizes == [512, 512]
    assert cfg.train.lr == 0.003
    assert cfg.train.epochs == 2
    assert "hydra" not in cfg


def test_every_model_variant_instantiates() -> None:
    """On the digits' 64 columns, or for a ConvNet (an `image_shape` key) the same 64 values
    as one 8x8 grey image (`fullstack_ml.model.build_network` fills it from the data)."""
    for path in sorted((CONF_DIR / "model").glob("*.yaml")):
        cfg = compose([f"model={path.stem}"])
        image = {"image_shape": (1, 8, 8)} if "image_shape" in cfg.model else {}
        net = instantiate(cfg.model, in_features=64, num_classes=10, **image)
        assert sum(p.numel() for p in net.parameters()) > 64 * 10, path.name


def test_dvc_stages_list_only_existing_params() -> None:
    params = yaml.safe_load((ROOT / "params.yaml").read_text())
    stages = yaml.safe_load((ROOT / "dvc.yaml").read_text())["stages"]
    for name, stage in stages.items():
        for key in stage.get("params", []):
            node = params
            for part in key.split("."):
                assert part in node, f"stage {name}: param {key} not in params.yaml"
                node = node[part]


def test_data_images_selects_a_convnet_that_an_override_still_replaces() -> None:
    """conf/data/images.yaml's defaults overrides: a ConvNet, its student, augmentation and
    the basic profile by default; `-S model=...` (and every other group) still wins."""
    cfg = compose(["data=images"])
    assert cfg.model._target_.endswith("ConvNet") and cfg.model.channels == [32, 64]
    assert cfg.distil.student.channels == [8, 16] and cfg.train.augment.shift == 1
    assert cfg.profile.constraints.feature_range is None and cfg.profile.batch_rows == 4096
    chosen = compose(["data=digits_images", "model=resnet_tiny", "train=default"])
    assert chosen.model.residual and chosen.train.augment.shift == 0
    assert compose(["data=images", "model=mlp"]).model._target_.endswith("MLP")
    assert compose([]).model._target_.endswith("MLP")  # the default data keeps its MLP
