"""The one interface every caller runs the model through (the service, predict, validate's
reference, the benchmarks): `load_engine(...)` gives a callable from the encoded float32
matrix to the model's float32 outputs, on the runtime `serve.runtime` names.

Runtimes: `inductor` (the PT2E program `model.pt2`, eager or compiled by Inductor per batch
size, as the compress stage measured), `onnxruntime` and `openvino` (the same INT8 program
exported as ONNX with QuantizeLinear/DequantizeLinear, `model.onnx`). `auto` is the runtime
the compress stage measured fastest over its batch sizes among those whose answers equal
the PT2E program's (`serving.json`'s `runtime`). A worker on onnxruntime or openvino never
imports torch: this module imports each runtime's package where it loads it.
"""

import logging
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np

RUNTIMES = ("inductor", "onnxruntime", "openvino")
PORTABLE = {"onnxruntime", "openvino"}  # what runs model.onnx, without torch (PORTABLE_ENGINES)
ONNX_FILE = "model.onnx"
Engine = Callable[[np.ndarray], np.ndarray]


def runtime_of(path: str) -> str:
    """The runtime of an execution path of the serving plan (`compressed_compiled`: inductor,
    `compressed_onnxruntime`: onnxruntime)."""
    suffix = path.rsplit("_", 1)[-1]
    return suffix if suffix in PORTABLE else "inductor"


def choose_runtime(runtime: str, serving: dict[str, Any] | None) -> str:
    """`runtime` itself, or for `auto` the one `serving` (the compress stage's plan) chose;
    inductor where there is no plan or it names none (a model compressed before ONNX).

    Raises:
        ValueError: an unknown runtime, or one the plan found unusable (naming why).
    """
    if runtime not in ("auto", *RUNTIMES):
        raise ValueError(f"serve.runtime: {runtime!r} is not one of auto, {', '.join(RUNTIMES)}")
    chosen = (serving or {}).get("runtime", "inductor") if runtime == "auto" else runtime
    problem = (serving or {}).get("unusable", {}).get(chosen)
    if problem:
        raise ValueError(f"serve.runtime: {chosen} cannot serve this model ({problem})")
    if chosen in PORTABLE and f"compressed_{chosen}" not in (serving or {}).get("latency_ms", {}):
        raise ValueError(
            f"serve.runtime: {chosen} was not measured by the compress stage (compress.runtimes)"
        )
    return chosen


def load_engine(
    model_dir: Path,
    serving: dict[str, Any] | None,
    width: int,
    runtime: str = "auto",
    threads: int = 1,
    log: logging.Logger | None = None,
    batch: int | None = None,
) -> Engine:
    """The compressed model of `model_dir` on `runtime` (see the module's docstring), with
    `threads` intra-op threads. `engine.runtime` names the runtime it runs on. `batch`: the
    rows per call of a caller that sends one size (predict), for inductor's path choice
    (`program.for_batch`)."""
    chosen = choose_runtime(runtime, serving)
    if chosen in PORTABLE:
        engine = PORTABLE_ENGINES[chosen](Path(model_dir) / ONNX_FILE, threads)
    else:
        engine = inductor_engine(model_dir, serving, width, threads, log, batch)
    engine.runtime = chosen  # type: ignore[attr-defined]
    if log:
        log.info("runtime: %s", chosen)
    return engine


def onnxruntime_engine(path: Path, threads: int) -> Engine:
    """`model.onnx` on ONNX Runtime's CPU provider: its graph optimiser fuses each
    DequantizeLinear -> Gemm -> QuantizeLinear into an INT8 QGemm (kernels picked by the CPU
    it runs on, at load)."""
    import onnxruntime as ort

    options = ort.SessionOptions()
    options.intra_op_num_threads = threads
    options.inter_op_num_threads = 1
    options.log_severity_level = 3  # no warnings about ops it placed on the CPU provider
    session = ort.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])
    name = session.get_inputs()[0].name
    run = session.run

    def engine(x: np.ndarray) -> np.ndarray:
        return run(None, {name: x})[0]

    return engine


def openvino_engine(path: Path, threads: int) -> Engine:
    """`model.onnx` compiled by OpenVINO's CPU plugin (its FullyConnected layers in u8/i8)."""
    import openvino as ov

    compiled = ov.Core().compile_model(
        str(path), "CPU", {"INFERENCE_NUM_THREADS": threads, "PERFORMANCE_HINT": "LATENCY"}
    )
    request = compiled.create_infer_request()

    def engine(x: np.ndarray) -> np.ndarray:
        # a copy: the request's output buffer is overwritten by the next call
        return request.infer({0: x})[0].copy()

    return engine


def inductor_engine(
    model_dir: Path,
    serving: dict[str, Any] | None,
    width: int,
    threads: int,
    log: logging.Logger | None,
    batch: int | None = None,
) -> Engine:
    """The PT2E program on the torch paths of the plan (`program.load_runner`)."""
    import torch

    from fullstack_ml.runtime.program import for_batch, load_runner

    # Idle OpenMP threads spin between the many small ops of the INT8 graph and take the
    # CPU the event loop needs; one intra-op thread per worker serves more, not less.
    torch.set_num_threads(threads)
    if serving:
        latency = serving["latency_ms"]
        torch_paths = {p: t for p, t in latency.items() if runtime_of(p) == "inductor"}
        serving = {**serving, "latency_ms": torch_paths}
    if batch:
        serving = for_batch(serving, batch)
    runner = load_runner(Path(model_dir), serving, width, log)

    def engine(x: np.ndarray) -> np.ndarray:
        with torch.inference_mode():  # inference tensors: what the compiled program's guards want
            return runner(torch.from_numpy(x)).numpy()

    return engine


PORTABLE_ENGINES = {"onnxruntime": onnxruntime_engine, "openvino": openvino_engine}


def softmax(logits: np.ndarray) -> np.ndarray:
    """Class probabilities from logits, per row (float32, as torch.softmax gives)."""
    z = np.exp(logits - logits.max(axis=1, keepdims=True))
    return z / z.sum(axis=1, keepdims=True)


def run_batches(engine: Engine, x: np.ndarray, size: int) -> np.ndarray:
    """`engine` on `x`, `size` rows per call."""
    return np.concatenate([engine(x[i : i + size]) for i in range(0, len(x), size)])
