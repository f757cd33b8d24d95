"""The serving runtime interface (`fullstack_ml.runtime.engine`): each runtime gives the
PT2E program's answers, `auto` takes the compress stage's measured choice, a bad choice is
one line naming `serve.runtime`, and a worker off torch never imports it."""

import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pandas as pd
import psutil
import pytest
import requests

from fullstack_ml.bento import Server, serve_bento
from fullstack_ml.model import predict_logits
from fullstack_ml.runtime.engine import (
    RUNTIMES,
    choose_runtime,
    load_engine,
    run_batches,
    runtime_of,
    softmax,
)
from fullstack_ml.runtime.meta import read_meta
from fullstack_ml.runtime.preprocess import Preprocessor
from fullstack_ml.runtime.program import load_program
from stages.compress import fastest_runtime
from stages.compress.measure import parity

PLAN = {
    "latency_ms": {
        "compressed_eager": {"1": 0.6, "256": 1.5},
        "compressed_compiled": {"1": 0.2, "256": 0.25},
        "compressed_onnxruntime": {"1": 0.02, "256": 0.14},
    },
    "runtime": "onnxruntime",
    "unusable": {"openvino": "3 answers differ from model.pt2's"},
}


@pytest.fixture(scope="module")
def model(bento: Path, curated: Path) -> dict:
    """The session bento's compressed model (its work folder), the test split encoded and
    the PT2E program's own logits on it."""
    work = bento.parent.parent
    meta = read_meta(work / "int8")
    pre = Preprocessor.from_dict(meta["preprocessing"])
    x = pre.encode_frame(pd.read_parquet(curated / "test.parquet"))
    reference = predict_logits(load_program(work / "int8/model.pt2"), x)
    serving = json.loads((work / "serving.json").read_text())
    return {"dir": work / "int8", "x": x, "reference": reference, "serving": serving, "pre": pre}


@pytest.mark.parametrize("runtime", RUNTIMES)
def test_each_runtime_answers_as_the_pt2e_program(model: dict, runtime: str) -> None:
    engine = load_engine(model["dir"], model["serving"], model["pre"].width, runtime)
    assert engine.runtime == runtime
    out = run_batches(engine, model["x"], 64)
    assert out.dtype == np.float32 and out.shape == model["reference"].shape
    assert (out.argmax(1) == model["reference"].argmax(1)).all()
    assert np.abs(softmax(out) - softmax(model["reference"])).max() <= 0.01


def test_the_compress_stage_checked_and_measured_every_portable_runtime(model: dict) -> None:
    serving = model["serving"]
    assert serving["unusable"] == {}
    assert serving["qdq_ops"]["QuantizeLinear"] > 0 and serving["qdq_ops"]["DequantizeLinear"] > 0
    for runtime in ("onnxruntime", "openvino"):
        assert serving["parity"][runtime]["label_differences"] == 0
        assert set(serving["latency_ms"][f"compressed_{runtime}"]) == {"1", "16", "64", "256"}
    assert serving["runtime"] == fastest_runtime(serving["latency_ms"])


def test_auto_takes_the_measured_runtime_and_a_bad_choice_names_serve_runtime() -> None:
    assert choose_runtime("auto", PLAN) == "onnxruntime"
    assert choose_runtime("inductor", PLAN) == "inductor"
    assert choose_runtime("auto", None) == "inductor"  # no plan: the PT2E program
    assert choose_runtime("auto", {"latency_ms": {}}) == "inductor"  # a plan before ONNX
    with pytest.raises(ValueError, match=r"serve.runtime: 'tensorrt' is not one of auto"):
        choose_runtime("tensorrt", PLAN)
    with pytest.raises(ValueError, match=r"serve.runtime: openvino cannot serve .*3 answers"):
        choose_runtime("openvino", PLAN)
    plan = {**PLAN, "unusable": {}}
    with pytest.raises(ValueError, match=r"openvino was not measured .*compress.runtimes"):
        choose_runtime("openvino", plan)


def test_auto_prefers_the_least_geometric_mean_latency_over_batch_sizes() -> None:
    assert runtime_of("compressed_compiled") == "inductor"
    assert runtime_of("fp32_eager") == "inductor"
    assert runtime_of("compressed_openvino") == "openvino"
    assert fastest_runtime(PLAN["latency_ms"]) == "onnxruntime"
    # faster at the large batch, much slower at batch 1: the geometric mean weighs both
    slow_small = {**PLAN["latency_ms"], "compressed_onnxruntime": {"1": 2.0, "256": 0.2}}
    assert fastest_runtime(slow_small) == "inductor"
    tie = {"compressed_compiled": {"1": 1.0}, "compressed_openvino": {"1": 1.0}}
    assert fastest_runtime(tie) == "inductor"


def test_parity_counts_label_differences_and_the_largest_probability_gap() -> None:
    meta = {"task": "classification"}
    ref = np.array([[2.0, 0.0], [0.0, 1.0], [1.0, 0.9]], dtype=np.float32)
    same = parity(ref, ref + 1e-4, meta, 0.01)
    assert same["ok"] and same["label_differences"] == 0 and same["largest_difference"] < 1e-3
    flipped = ref.copy()
    flipped[2] = [0.9, 1.0]
    moved = parity(ref, flipped, meta, 0.5)
    assert not moved["ok"] and moved["label_differences"] == 1
    values = np.array([[1.0], [100.0]], dtype=np.float32)
    close = parity(values, values * 1.001, {"task": "regression"}, 0.01)
    assert close["ok"] and close["label_differences"] == 0
    far = parity(values, values * 1.1, {"task": "regression"}, 0.01)
    assert not far["ok"] and far["label_differences"] == 2


def test_a_worker_on_onnxruntime_or_openvino_never_imports_torch(model: dict) -> None:
    """In a fresh process as a serving worker loads it: the model answers and neither torch
    nor any module of it was imported."""
    for runtime in ("onnxruntime", "openvino"):
        script = (
            "import json, sys, numpy as np\n"
            "from fullstack_ml.runtime.engine import load_engine\n"
            f"serving = json.loads({json.dumps(json.dumps(model['serving']))})\n"
            f"e = load_engine({str(model['dir'])!r}, serving, {model['pre'].width}, {runtime!r})\n"
            f"e(np.zeros((3, {model['pre'].width}), dtype=np.float32))\n"
            "print(sorted(m for m in sys.modules if m.split('.')[0] in ('torch', 'torchao')))\n"
        )
        out = subprocess.run(
            [sys.executable, "-c", script], capture_output=True, text=True, check=True
        )
        assert out.stdout.strip() == "[]", (runtime, out.stdout[:300])


def maps_torch(server: Server) -> bool:
    """Whether any process of the server (supervisor, workers, their helpers) has torch's
    library mapped: imported torch, whatever module did."""
    procs = [psutil.Process(server.proc.pid), *psutil.Process(server.proc.pid).children(True)]
    return any("libtorch" in Path(f"/proc/{p.pid}/maps").read_text() for p in procs)


@pytest.fixture(scope="module")
def on_inductor(bento: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The session's bento with params.yaml's serve.runtime set to inductor."""
    import tarfile

    import yaml

    work = tmp_path_factory.mktemp("inductor-bento")
    with tarfile.open(bento) as tar:
        tar.extractall(work / "bento", filter="data")
    params_file = work / "bento/src/params.yaml"
    params = yaml.safe_load(params_file.read_text())
    params["serve"]["runtime"] = "inductor"
    params_file.write_text(yaml.safe_dump(params))
    with tarfile.open(work / "inductor.bento", "w") as tar:
        tar.add(work / "bento", arcname=".")
    return work / "inductor.bento"


@pytest.mark.slow
def test_the_bento_serves_on_onnxruntime_and_no_process_of_it_loads_torch(
    server: Server,
) -> None:
    """The compress stage measured onnxruntime fastest here (serve.runtime: auto), so the
    bento serves on it: /metadata names it, and no server process maps libtorch."""
    assert requests.get(f"{server.url}/metadata", timeout=10).json()["runtime"] == "onnxruntime"
    assert not maps_torch(server)


@pytest.mark.slow
def test_a_bento_on_inductor_answers_as_the_one_on_onnxruntime(
    server: Server, on_inductor: Path, curated: Path
) -> None:
    """The same bento served on Inductor (torch loaded: the check above can see it): the
    same label for every test record, probabilities within compress.runtime_tolerance."""
    test_split = pd.read_parquet(curated / "test.parquet")
    records = test_split.drop(columns="target").to_dict("records")
    with serve_bento(on_inductor, env={"FULLSTACK_ML_API_TOKEN": ""}) as torch_server:
        assert maps_torch(torch_server)
        answers = []
        for url in (server.url, torch_server.url):
            got = []
            for start in range(0, len(test_split), 128):
                body = {"records": records[start : start + 128]}
                r = requests.post(f"{url}/predict_proba", json=body, timeout=30)
                assert r.status_code == 200, r.text[:300]
                got += r.json()
            answers.append(got)
    portable, torch_side = answers
    assert [a["label"] for a in portable] == [a["label"] for a in torch_side]
    gap = max(
        abs(a["probabilities"][k] - b["probabilities"][k])
        for a, b in zip(portable, torch_side, strict=True)
        for k in a["probabilities"]
    )
    assert gap <= 0.01
