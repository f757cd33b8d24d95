"""Shared fixtures: the real config, shrunk, and small curated splits in tmp_path."""

import os
from pathlib import Path

import pytest
from omegaconf import DictConfig

from stages.common import ROOT, compose
from stages.ingest import ingest

os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")
os.environ.setdefault("BENTOML_DO_NOT_TRACK", "true")

SMALL = ["train.epochs=3", "train.num_workers=1", "compress.latency_repeats=3"]


@pytest.fixture(scope="session")
def cfg() -> DictConfig:
    """conf/ composed as DVC does, shrunk for tests."""
    return compose(SMALL)


@pytest.fixture(scope="session")
def curated(cfg: DictConfig, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The default data ingested once per session into a temporary folder."""
    out = tmp_path_factory.mktemp("curated")
    ingest(cfg.data, cfg.seed, out)
    return out


@pytest.fixture
def in_repo_root(monkeypatch: pytest.MonkeyPatch) -> Path:
    monkeypatch.chdir(ROOT)
    return ROOT


@pytest.fixture(scope="session")
def fp32_dir(cfg: DictConfig, curated: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A model trained once per session by the real train stage (Ray Train, 1 worker)."""
    from stages.train import train

    out = tmp_path_factory.mktemp("models") / "fp32"
    history = train(compose([*SMALL, "train.epochs=10"]), curated, out)
    assert len(history) == 10
    return out
