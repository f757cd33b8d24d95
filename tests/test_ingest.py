import json
from pathlib import Path

import pandas as pd
import pytest
from omegaconf import OmegaConf

from stages.common import StageError
from stages.ingest import ingest, split_table


def file_cfg(path: Path, target: str = "label", **split: float) -> OmegaConf:
    sizes = {"val_size": 0.2, "test_size": 0.2, "stratify": True, **split}
    return OmegaConf.create(
        {"source": "file", "path": str(path), "format": "auto", "target": target, "split": sizes}
    )


def test_digits_splits_are_typed_stratified_and_complete(curated: Path) -> None:
    parts = {n: pd.read_parquet(curated / f"{n}.parquet") for n in ("train", "val", "test")}
    schema = json.loads((curated / "schema.json").read_text())
    assert sum(len(p) for p in parts.values()) == 1797
    assert len(schema["features"]) == 64 and schema["classes"] == list(range(10))
    assert schema["target"] == {"name": "target", "dtype": "int64"}
    for part in parts.values():
        assert list(part.columns) == [f["name"] for f in schema["features"]] + ["target"]
        assert part["pixel_3_3"].dtype == "float64"
        # stratified: every class present with roughly its overall share (about 10%)
        shares = part["target"].value_counts(normalize=True)
        assert set(shares.index) == set(range(10)) and shares.max() < 0.13


def test_split_is_seeded() -> None:
    df = pd.DataFrame({"x": range(100), "y": [0, 1] * 50})
    a = split_table(df, "y", 0.2, 0.2, True, seed=1)
    b = split_table(df, "y", 0.2, 0.2, True, seed=1)
    c = split_table(df, "y", 0.2, 0.2, True, seed=2)
    assert a["test"].equals(b["test"]) and not a["test"].equals(c["test"])


def test_csv_with_string_labels(tmp_path: Path) -> None:
    src = tmp_path / "flowers.csv"
    rows = [{"a": i * 0.5, "b": i % 7, "label": "yes" if i % 3 else "no"} for i in range(60)]
    pd.DataFrame(rows).to_csv(src, index=False)
    schema = ingest(file_cfg(src), 0, tmp_path / "out")
    assert schema["classes"] == ["no", "yes"]
    assert schema["target"]["dtype"] == "object"
    assert pd.read_parquet(tmp_path / "out" / "train.parquet")["label"].isin(["no", "yes"]).all()


def test_parquet_source(tmp_path: Path) -> None:
    src = tmp_path / "t.parquet"
    pd.DataFrame({"a": range(40), "label": [1, 2] * 20}).to_parquet(src)
    assert ingest(file_cfg(src), 0, tmp_path / "out")["rows"]["train"] == 24


@pytest.mark.parametrize(
    ("content", "target", "message"),
    [
        (None, "label", "file not found"),
        ("", "label", "cannot read as csv"),
        ("a,b\n1,2\n", "label", "target column 'label' not found"),
        ("a,label\nx,1\ny,2\n", "label", "feature column 'a' is object, not numeric"),
        ("a,label\n", "label", "no data rows"),
    ],
)
def test_bad_file_fails_and_keeps_previous_output(
    tmp_path: Path, curated: Path, content: str | None, target: str, message: str
) -> None:
    src = tmp_path / "bad.csv"
    if content is not None:
        src.write_text(content)
    out = tmp_path / "out"
    out.mkdir()
    (out / "train.parquet").write_bytes((curated / "train.parquet").read_bytes())
    with pytest.raises(StageError, match=message) as err:
        ingest(file_cfg(src, target), 0, out)
    assert str(src) in str(err.value)
    assert sorted(p.name for p in out.iterdir()) == ["train.parquet"]
    assert not list(tmp_path.glob(".out.tmp-*")), "temporary output left behind"


def test_unsplittable_data_names_the_split(tmp_path: Path) -> None:
    src = tmp_path / "tiny.csv"
    pd.DataFrame({"a": range(6), "label": [0, 0, 0, 0, 0, 1]}).to_csv(src, index=False)
    with pytest.raises(StageError, match="data.split: cannot split 6 rows"):
        ingest(file_cfg(src), 0, tmp_path / "out")


def test_stage_cli_reports_one_line_and_exit_status(tmp_path: Path, in_repo_root: Path) -> None:
    import subprocess
    import sys

    missing = tmp_path / "missing.csv"
    proc = subprocess.run(
        [sys.executable, "-m", "stages.ingest", "data=file", f"data.path={missing}"],
        capture_output=True,
        text=True,
    )
    assert proc.returncode == 1
    assert proc.stderr.strip() == f"error: {missing}: file not found (data.path)"
