"""The device artifact (`make device`, the device stage): model.onnx, preprocess.json,
schema.json and runner.py, which score records in a bare virtualenv holding only
onnxruntime and numpy, as the PT2E program does."""

import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import onnx
import pandas as pd
import pytest

from fullstack_ml.model import encode_split, predict_logits
from fullstack_ml.runtime.engine import softmax
from fullstack_ml.runtime.program import load_program
from fullstack_ml.stage import StageError
from stages.device import device


@pytest.fixture(scope="module")
def artifact(bento: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The device artifact of the session bento's compressed model."""
    work = bento.parent.parent
    out = tmp_path_factory.mktemp("device") / "device"
    device(work / "int8", work / "schema.json", out)
    return out


def test_the_artifact_is_the_qdq_onnx_program_and_its_json(artifact: Path, bento: Path) -> None:
    assert sorted(p.name for p in artifact.iterdir()) == [
        "model.onnx",
        "preprocess.json",
        "runner.py",
        "schema.json",
    ]
    ops = {node.op_type for node in onnx.load(artifact / "model.onnx").graph.node}
    assert {"QuantizeLinear", "DequantizeLinear"} <= ops  # INT8 kept, not decomposed
    pre = json.loads((artifact / "preprocess.json").read_text())
    meta = json.loads((bento.parent.parent / "int8/model.json").read_text())
    assert pre["features"] == meta["features"] and pre["classes"] == meta["classes"]
    assert pre["mean"] == meta["preprocessing"]["mean"] and pre["input"] == "x"


def test_without_model_onnx_the_stage_fails_naming_the_file(tmp_path: Path, bento: Path) -> None:
    work = bento.parent.parent
    (tmp_path / "model").mkdir()
    (tmp_path / "model/model.json").write_bytes((work / "int8/model.json").read_bytes())
    (tmp_path / "out").mkdir()
    (tmp_path / "out/kept").write_text("an earlier artifact")
    with pytest.raises(StageError, match=r"model/model.onnx: not found .*compress.runtimes"):
        device(tmp_path / "model", work / "schema.json", tmp_path / "out")
    assert (tmp_path / "out/kept").read_text() == "an earlier artifact"


@pytest.mark.slow
def test_the_runner_scores_in_a_bare_virtualenv_as_the_pt2e_program(
    artifact: Path, bento: Path, curated: Path, tmp_path: Path
) -> None:
    """A virtualenv of its own, without this project or torch: `pip install onnxruntime
    numpy` (the README's minimal runner), then runner.py on the test split's records."""
    bare = tmp_path / "bare"
    subprocess.run([sys.executable, "-m", "venv", bare], check=True)
    pip = [bare / "bin/python", "-m", "pip", "install", "-q", "--disable-pip-version-check"]
    subprocess.run([*pip, "onnxruntime", "numpy"], check=True, capture_output=True)
    listed = subprocess.run(
        [bare / "bin/python", "-m", "pip", "list", "--format=json"],
        check=True,
        capture_output=True,
        text=True,
    )
    installed = {p["name"].lower() for p in json.loads(listed.stdout)}
    assert "torch" not in installed and "fullstack-ml" not in installed
    test = pd.read_parquet(curated / "test.parquet")
    meta = json.loads((bento.parent.parent / "int8/model.json").read_text())
    test.loc[test.index[0], meta["features"][0]] = None  # missing: imputed, as the service does
    records = test[meta["features"]].to_dict("records")
    stdin = "".join(json.dumps(r) + "\n" for r in records)
    run = subprocess.run(
        [bare / "bin/python", artifact / "runner.py", artifact],
        input=stdin,
        capture_output=True,
        text=True,
        cwd=tmp_path,
    )
    assert run.returncode == 0, run.stderr[-2000:]
    answers = [json.loads(line) for line in run.stdout.splitlines()]
    logits = predict_logits(
        load_program(bento.parent.parent / "int8/model.pt2"), encode_split(test, meta)[0]
    )
    want = [meta["classes"][i] for i in logits.argmax(1)]
    assert [a["label"] for a in answers] == want
    got = np.array([[a["probabilities"][str(c)] for c in meta["classes"]] for a in answers])
    assert np.abs(got - softmax(logits)).max() <= 0.01  # compress.runtime_tolerance
