"""Serving runtimes benchmark: the compressed model on each runtime of `serve.runtime`, one run.

Loads `models/compressed` (`model.pt2`, `model.onnx`; run `make repro` first) on Inductor
(the PT2E program compiled with frozen weights, the path the service runs), ONNX Runtime and
OpenVINO through `fullstack_ml.runtime.engine.load_engine`, each with one intra-op thread
(as the service), and prints per batch size (1, 16, 64, 256) the median latency of each,
its ratio to Inductor's measured in the same run, and per runtime the INT8 kernels that ran:
the ops ONNX Runtime's profiler saw executed (QGemm, QLinearMatMul, MatMulInteger...), the
layers OpenVINO compiled in u8/i8, the quantize/dequantize ops of the program Inductor
compiled. It also checks the answers: label differences from the PT2E program's on the test
split.

Then the bento served on each runtime (`bentoml serve`, its params.yaml's serve.runtime
set): seconds from the command to the first 200 on /readyz, against a BentoML hello-world
service in the same run (BentoML's own floor here), and seconds from SIGKILL of the serving
worker to the next 200 from /predict.

    python -m bench.runtime                 # the pipeline's model and bento (make repro)
    python -m bench.runtime --repeats 2000 --starts 10
    python -m bench.runtime --smoke         # a model built here (1 epoch), served on onnxruntime
"""

import argparse
import contextlib
import json
import os
import signal
import statistics
import subprocess
import sys
import tarfile
import tempfile
import time
from collections import Counter
from pathlib import Path

import numpy as np
import pandas as pd
import psutil
import yaml

from fullstack_ml.bento import free_port, raw_records, request
from fullstack_ml.runtime.engine import RUNTIMES, load_engine
from fullstack_ml.runtime.meta import read_meta
from fullstack_ml.runtime.preprocess import Preprocessor
from fullstack_ml.stage import ROOT

SIZES = (1, 16, 64, 256)


def markdown(rows: list[dict], digits: int = 4) -> str:
    """`rows` as a markdown table, numbers to `digits` decimals."""
    cells = [
        [f"{v:.{digits}f}" if isinstance(v, float) else str(v) for v in r.values()] for r in rows
    ]
    lines = ["| " + " | ".join(rows[0]) + " |", "|" + "---|" * len(rows[0])]
    return "\n".join(lines + ["| " + " | ".join(c) + " |" for c in cells])


def onnxruntime_kernels(onnx_file: Path, x: np.ndarray) -> str:
    """The op types ONNX Runtime's profiler saw run, with counts (one call)."""
    import onnxruntime as ort

    options = ort.SessionOptions()
    options.intra_op_num_threads = 1
    options.enable_profiling = True
    with tempfile.TemporaryDirectory() as tmp:
        options.profile_file_prefix = str(Path(tmp) / "ort")
        session = ort.InferenceSession(str(onnx_file), options, providers=["CPUExecutionProvider"])
        session.run(None, {session.get_inputs()[0].name: x})
        events = json.loads(Path(session.end_profiling()).read_text())
    ran = Counter(
        e["args"]["op_name"]
        for e in events
        if e.get("cat") == "Node"
        and "op_name" in e.get("args", {})
        and e["name"].endswith("_kernel_time")
    )
    return ", ".join(f"{op} x{n}" for op, n in sorted(ran.items()))


def openvino_kernels(onnx_file: Path) -> str:
    """OpenVINO's compiled layers by type and the precision each runs in."""
    import openvino as ov

    compiled = ov.Core().compile_model(str(onnx_file), "CPU", {"INFERENCE_NUM_THREADS": 1})
    layers = Counter(
        (
            op.get_rt_info()["layerType"].astype(str),
            op.get_rt_info()["runtimePrecision"].astype(str),
        )
        for op in compiled.get_runtime_model().get_ordered_ops()
    )
    wanted = [(t, p) for t, p in layers if t not in ("Const", "Input", "Output")]
    return ", ".join(f"{t}:{p} x{layers[t, p]}" for t, p in sorted(wanted))


def inductor_kernels(model_dir: Path) -> str:
    """The quantize/dequantize ops of the PT2E program Inductor compiles (INT8 GEMMs once
    lowered: `program.INT8_OPTIONS`)."""
    from fullstack_ml.runtime.program import load_program

    graph = load_program(model_dir / "model.pt2").graph
    ops = Counter(
        str(n.target).split(".")[1]
        for n in graph.nodes
        if str(n.target).startswith("quantized_decomposed.")
    )
    return ", ".join(f"{op} x{n}" for op, n in sorted(ops.items()))


def run(model_dir: Path, serving: dict, test: pd.DataFrame, repeats: int) -> None:
    meta = read_meta(model_dir)
    pre = Preprocessor.from_dict(meta["preprocessing"])
    x = pre.encode_frame(test)
    batches = {b: np.ascontiguousarray(x[np.arange(b) % len(x)]) for b in SIZES}
    engines = {r: load_engine(model_dir, serving, pre.width, r, 1) for r in RUNTIMES}
    # the PT2E program eager: the reference the answers are checked against
    from fullstack_ml.model import predict_logits
    from fullstack_ml.runtime.program import load_program
    from stages.compress.measure import median_latency_ms

    reference = predict_logits(load_program(model_dir / "model.pt2"), x)
    times = {
        r: {b: median_latency_ms(e, batches[b], repeats) for b in SIZES} for r, e in engines.items()
    }
    rows = []
    for b in SIZES:
        row = {"batch": b}
        for r in RUNTIMES:
            row[f"{r} ms"] = times[r][b]
        for r in RUNTIMES[1:]:
            row[f"{r}/inductor"] = times[r][b] / times["inductor"][b]
        rows.append(row)
    print(f"median latency per call ({repeats} calls, 1 thread); ratios to Inductor, same run")
    print(markdown(rows))
    onnx_file = model_dir / "model.onnx"
    kernels = {
        "inductor": inductor_kernels(model_dir),
        "onnxruntime": onnxruntime_kernels(onnx_file, batches[16]),
        "openvino": openvino_kernels(onnx_file),
    }
    rows = []
    for r, e in engines.items():
        out = np.concatenate([e(x[i : i + 256]) for i in range(0, len(x), 256)])
        differences = int((out.argmax(1) != reference.argmax(1)).sum())
        rows.append(
            {"runtime": r, "label differences": differences, "rows": len(x), "kernels": kernels[r]}
        )
    print("\nanswers against model.pt2's (eager) on the test split, and the INT8 kernels that ran")
    print(markdown(rows))


HELLO = """import bentoml


@bentoml.service(workers=1)
class Hello:
    @bentoml.api
    def hi(self, x: int) -> int:
        return x
"""


def answered(port: int, path: str, body: bytes | None) -> bool:
    try:
        return request(port, "POST" if body else "GET", path, body)[0] == 200
    except OSError:
        return False


def serve_times(
    target: str, cwd: Path, starts: int, kills: int, body: bytes | None
) -> tuple[list[float], list[float]]:
    """Seconds from `bentoml serve target` to the first 200 on /readyz, `starts` times;
    then, on the last server, seconds from SIGKILL of its worker to the next 200 from
    /predict (`body`), `kills` times."""
    bentoml = Path(sys.executable).parent / "bentoml"
    env = {**os.environ, "BENTOML_HOME": str(cwd / "home"), "BENTOML_DO_NOT_TRACK": "true"}
    env["FULLSTACK_ML_API_TOKEN"] = ""
    ready, back = [], []
    for i in range(starts):
        port = free_port()
        start = time.perf_counter()
        cmd = [bentoml, "serve", target, "--host", "127.0.0.1", "--port", str(port)]
        proc = subprocess.Popen(
            cmd, cwd=cwd, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
            start_new_session=True,
        )  # fmt: skip
        try:
            while not answered(port, "/readyz", None):
                if proc.poll() is not None:
                    sys.exit(f"error: bentoml serve {target} exited {proc.returncode}")
                time.sleep(0.005)
            ready.append(time.perf_counter() - start)
            for _ in range(kills if i == starts - 1 else 0):
                time.sleep(1.0)  # the worker settled (its drift helper started)
                (worker,) = [
                    p for p in psutil.Process(proc.pid).children(recursive=True)
                    if "_bentoml_impl.worker.service" in " ".join(p.cmdline())
                ]  # fmt: skip
                killed = time.perf_counter()
                worker.kill()
                worker.wait()
                while not answered(port, "/predict", body):
                    time.sleep(0.005)
                back.append(time.perf_counter() - killed)
        finally:  # the whole server, no graceful wait; its workers too: circus starts each in
            # a session of its own, which the group kill missed (they outlived every smoke)
            family = psutil.Process(proc.pid).children(recursive=True)
            os.killpg(proc.pid, signal.SIGKILL)
            for child in family:
                with contextlib.suppress(psutil.NoSuchProcess):
                    child.kill()
            proc.wait()
    return ready, back


def serve_table(
    bento_file: Path, test: pd.DataFrame, starts: int, kills: int, runtimes: tuple = RUNTIMES
) -> None:
    """The ready and recovery table (module docstring) for `bento_file`."""
    with tempfile.TemporaryDirectory() as tmp:
        work = Path(tmp)
        (work / "hello").mkdir()
        (work / "hello/service.py").write_text(HELLO)
        rows = [
            ("BentoML hello world", *serve_times("service:Hello", work / "hello", starts, 0, None))
        ]
        with tarfile.open(bento_file) as tar:
            tar.extractall(work / "bento", filter="data")
        params_file = work / "bento/src/params.yaml"
        params = yaml.safe_load(params_file.read_text())
        features = json.loads(next((work / "bento/models").rglob("model.json")).read_text())
        body = json.dumps({"records": raw_records(test.head(2), features["features"])}).encode()
        for runtime in runtimes:
            params["serve"]["runtime"] = runtime
            params_file.write_text(yaml.safe_dump(params, sort_keys=False))
            rows.append(
                (
                    f"bento on {runtime}",
                    *serve_times(str(work / "bento"), work, starts, kills, body),
                )
            )
    floor = statistics.median(rows[0][1])
    print(f"\nbentoml serve: seconds to the first 200 on /readyz ({starts} starts) and from "
          f"SIGKILL of the worker to the next 200 from /predict ({kills} kills)")  # fmt: skip
    table = [
        {
            "server": name,
            "ready s": statistics.median(r),
            "ready max": max(r),
            "ready/hello": statistics.median(r) / floor,
            "killed worker back s": statistics.median(k) if k else float("nan"),
            "back max": max(k) if k else float("nan"),
        }
        for name, r, k in rows
    ]
    print(markdown(table, 2))


def smoke_model(work: Path) -> tuple[Path, dict, pd.DataFrame]:
    """A model trained for 1 epoch and compressed here (int8_static, runtimes exported)."""
    from bench.compress import SMOKE, build_small
    from fullstack_ml.model import encode_split
    from fullstack_ml.stage import compose
    from stages.compress import compress

    cfg = compose([*SMOKE, "compress.pipelines={}"])
    fp32_dir, curated, _ = build_small(cfg, work / "built", student=False)
    splits = {s: pd.read_parquet(curated / f"{s}.parquet") for s in ("train", "val", "test")}
    meta = read_meta(fp32_dir)
    val_x, val_y = encode_split(splits["val"], meta)
    out = work / "compressed"
    result = compress(
        fp32_dir,
        val_x,
        encode_split(splits["test"], meta),
        cfg.compress,
        out,
        val_y=val_y,
        outliers=(splits, cfg.outliers),
    )
    return out, result["serving"], splits["test"]


def smoke_bento(model_dir: Path, serving: dict, work: Path) -> Path:
    """The smoke's model packaged into a bento, in a model store of its own."""
    os.environ["BENTOML_HOME"] = str(work / "bentoml")  # before bentoml is imported
    from fullstack_ml.runtime.drift import profile_frame
    from fullstack_ml.stage import compose
    from stages.package import package

    curated = work / "built/curated"
    train = pd.read_parquet(curated / "train.parquet")
    (work / "train.bin").write_bytes(profile_frame(train).serialize())
    (work / "serving.json").write_text(json.dumps(serving))
    files = {n: model_dir / n for n in ("model.pt2", "model.json", "model.onnx", "outliers.json")}
    files |= {"schema.json": curated / "schema.json", "reference_profile.bin": work / "train.bin"}
    files["serving.json"] = work / "serving.json"
    info = package(files, {"git_commit": "smoke"}, compose([]).serve, work / "dist")
    return work / "dist" / info["file"]


def main(argv: list[str]) -> None:
    parser = argparse.ArgumentParser(
        prog="python -m bench.runtime", description=__doc__.split("\n")[0]
    )
    parser.add_argument("--repeats", type=int, default=300)
    parser.add_argument("--starts", type=int, default=5, help="server starts per runtime")
    parser.add_argument("--kills", type=int, default=5, help="worker kills per runtime")
    parser.add_argument("--smoke", action="store_true")
    args = parser.parse_args(argv)
    if args.smoke:
        with tempfile.TemporaryDirectory() as tmp:
            model_dir, serving, test = smoke_model(Path(tmp))
            run(model_dir, serving, test, 5)
            # on onnxruntime alone: the serving code is the same for each runtime, and each
            # server costs the suite seconds (tests/test_engine.py serves one on Inductor)
            bento = smoke_bento(model_dir, serving, Path(tmp))
            serve_table(bento, test, 1, 1, ("onnxruntime",))
        return
    model_dir = ROOT / "models/compressed"
    if not (model_dir / "model.onnx").exists():
        sys.exit("error: models/compressed/model.onnx not found; run make repro first")
    serving = json.loads((ROOT / "reports/compress.json").read_text())["serving"]
    test = pd.read_parquet(ROOT / "data/curated/test.parquet")
    run(model_dir, serving, test, args.repeats)
    bento = ROOT / "dist" / json.loads((ROOT / "dist/bento.json").read_text())["file"]
    serve_table(bento, test, args.starts, args.kills)


if __name__ == "__main__":
    main(sys.argv[1:])
