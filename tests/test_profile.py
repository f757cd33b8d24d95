import json
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
from omegaconf import DictConfig

from stages.common import StageError
from stages.drift import load_profile
from stages.ingest import SPLITS
from stages.profile import profile


@pytest.fixture(scope="module")
def splits(curated: Path) -> dict[str, pd.DataFrame]:
    return {name: pd.read_parquet(curated / f"{name}.parquet") for name in SPLITS}


@pytest.fixture(scope="module")
def schema(curated: Path) -> dict:
    return json.loads((curated / "schema.json").read_text())


def test_profiles_constraints_and_drift_written(
    splits: dict, schema: dict, cfg: DictConfig, tmp_path: Path
) -> None:
    summary = profile(splits, schema, cfg.profile, tmp_path / "p")
    assert summary["constraints_passed"] == 64 + 1 + 64 + 1  # missing x65, range x64, classes
    train = load_profile(tmp_path / "p" / "train.bin")
    assert train.get_column("pixel_3_3").to_summary_dict()["counts/n"] == len(splits["train"])
    drift = json.loads((tmp_path / "p" / "drift.json").read_text())
    assert set(drift) == {"val", "test"}
    assert drift["val"]["target"]["algorithm"] == "chi-square"
    assert drift["val"]["pixel_3_3"]["algorithm"] == "ks"
    html = (tmp_path / "p" / "report.html").read_text()
    assert "pixel_3_3" in html and "<script" not in html


def test_shifted_split_is_reported_as_drift(
    splits: dict, schema: dict, cfg: DictConfig, tmp_path: Path
) -> None:
    shifted = dict(splits, test=splits["test"].assign(pixel_3_3=lambda d: d.pixel_3_3 * 0.3))
    profile(shifted, schema, cfg.profile, tmp_path / "p")
    drift = json.loads((tmp_path / "p" / "drift.json").read_text())
    assert drift["test"]["pixel_3_3"]["drift_category"] == "DRIFT"
    assert drift["val"]["pixel_3_3"]["drift_category"] != "DRIFT"


@pytest.mark.parametrize(
    ("column", "value", "message"),
    [
        ("pixel_2_2", 99.0, r"pixel_2_2 is in range \[0,16\] \(observed \[0.0, 99.0\]\)"),
        ("pixel_2_2", np.nan, r"pixel_2_2 has no missing values"),
        ("target", 12, r"target values in the 10 known classes"),
    ],
)
def test_violated_constraint_fails_and_writes_nothing(
    splits: dict, schema: dict, cfg: DictConfig, tmp_path: Path, column: str, value, message: str
) -> None:
    train = splits["train"].copy()
    train.loc[5, column] = value
    out = tmp_path / "p"
    with pytest.raises(StageError, match=message):
        profile(dict(splits, train=train), schema, cfg.profile, out)
    assert not out.exists() and not list(tmp_path.iterdir())
