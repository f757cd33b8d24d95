"""Measuring a compressed candidate: saved as a torch.export program, loaded back, then its
file size, score on the test split and latency per execution path and batch size."""

import logging
import statistics
import time
from pathlib import Path
from typing import Any

import numpy as np
import torch
from omegaconf import DictConfig
from torch import nn

from fullstack_ml.model import SCORE_NAME, decode, predict_logits, score
from fullstack_ml.runtime.engine import PORTABLE_ENGINES, run_batches, softmax
from fullstack_ml.runtime.program import compile_module, export_onnx, load_program, save_program

log = logging.getLogger("stages.compress")


def median_latency_ms(model: Any, x: Any, repeats: int) -> float:
    """Median time of one forward pass, after a few warm-up passes."""
    times = []
    with torch.inference_mode():
        for i in range(repeats + 5):
            start = time.perf_counter()
            model(x)
            if i >= 5:
                times.append(time.perf_counter() - start)
    return statistics.median(times) * 1e3


def latencies(
    model: nn.Module, x: np.ndarray, cfg: DictConfig, compile: bool
) -> dict[str, dict[str, float]]:
    """Latency (ms) of `model` eager and, if `compile`, Inductor-compiled, at each batch
    size of `compress.batch_sizes` (rows of `x`, cycled)."""
    with torch.inference_mode():  # inference tensors, as served: what was compiled for
        xt = torch.from_numpy(x)
        batches = {b: xt[np.arange(b) % len(xt)] for b in cfg.batch_sizes}
    paths = {"eager": model}
    if compile:
        torch._dynamo.reset()
        try:
            paths["compiled"] = compile_module(model, x.shape[1])
        except Exception as err:  # noqa: BLE001  reported, the eager numbers still count
            log.warning("torch.compile failed (%s: %s)", type(err).__name__, err)
    return {
        path: {
            str(b): median_latency_ms(m, batch, cfg.latency_repeats) for b, batch in batches.items()
        }
        for path, m in paths.items()
    }


def measure(
    module: nn.Module,
    path: Path,
    test: tuple[np.ndarray, np.ndarray],
    meta: dict,
    cfg: DictConfig,
    compile: bool | None = None,
) -> dict[str, Any]:
    """Save `module` to `path`, load it back and measure the loaded program: file size,
    score on `test`, latency
    per execution path (compiled too if `compile`, by default `compress.compile`) and batch
    size; `answers`: the loaded program's on `test` (decoded), not for the metrics file."""
    x, y = test
    save_program(module, path, torch.from_numpy(x[:2]))
    program = load_program(path)
    answers = decode(predict_logits(program, x), meta)
    value = score(y, answers, meta["task"])
    times = latencies(program, x, cfg, cfg.compile if compile is None else compile)
    best = {b: min(t[b] for t in times.values()) for b in times["eager"]}
    first, last = str(min(cfg.batch_sizes)), str(max(cfg.batch_sizes))
    return {
        "size_bytes": path.stat().st_size,
        SCORE_NAME[meta["task"]]: value,
        "latency_ms_batch1": best[first],
        "latency_ms_batch256": best[last],
        "latency_ms": times,
        "answers": answers,
    }


def parity(reference: np.ndarray, outputs: np.ndarray, meta: dict, tolerance: float) -> dict:
    """How far `outputs` (a portable runtime's) are from `reference` (the PT2E program's,
    eager) on the same rows: label differences and the largest probability difference
    (classification), or values differing by more than `tolerance` relative and the largest
    relative difference (regression). `ok`: no label differences, the largest within."""
    if meta["task"] == "classification":
        differences = int((reference.argmax(1) != outputs.argmax(1)).sum())
        largest = float(np.abs(softmax(reference) - softmax(outputs)).max())
    else:
        a, b = reference[:, 0].astype("float64"), outputs[:, 0].astype("float64")
        relative = np.abs(a - b) / np.maximum(1.0, np.abs(a))
        differences, largest = int((relative > tolerance).sum()), float(relative.max())
    ok = differences == 0 and largest <= tolerance
    return {"label_differences": differences, "largest_difference": largest, "ok": ok}


def portable(
    program_file: Path, onnx_file: Path, x: np.ndarray, meta: dict, cfg: DictConfig
) -> dict:
    """Export the program of `program_file` to `onnx_file` and measure it on each runtime of
    `compress.runtimes`: its answers on `x` (the test split) against the program's (parity,
    within `compress.runtime_tolerance`) and its latency per batch size. A runtime whose
    export, load or parity fails is `unusable`, with the reason; the others serve."""
    result: dict[str, Any] = {"latency_ms": {}, "parity": {}, "unusable": {}, "qdq_ops": {}}
    if not cfg.runtimes:  # none to serve it: no export (nor the device stage's artifact)
        return result
    program = load_program(program_file)
    reference = predict_logits(program, x)
    try:
        result["qdq_ops"] = export_onnx(program, onnx_file, torch.from_numpy(x[:2]))
    except Exception as err:  # noqa: BLE001  any exporter failure: served by torch alone
        reason = f"ONNX export failed: {type(err).__name__}: {str(err).strip()[:200]}"
        log.warning("%s: %s", onnx_file.name, reason)
        onnx_file.unlink(missing_ok=True)
        result["unusable"] = dict.fromkeys(cfg.runtimes, reason)
        return result
    batches = {b: x[np.arange(b) % len(x)] for b in cfg.batch_sizes}
    for runtime in cfg.runtimes:
        try:
            engine = PORTABLE_ENGINES[runtime](onnx_file, cfg.threads)
            outputs = run_batches(engine, x, 1024)
        except Exception as err:  # noqa: BLE001  a runtime that cannot run it is left out
            result["unusable"][runtime] = f"{type(err).__name__}: {str(err).strip()[:200]}"
            log.warning("%s cannot run %s: %s", runtime, onnx_file, result["unusable"][runtime])
            continue
        check = parity(reference, outputs, meta, cfg.runtime_tolerance)
        result["parity"][runtime] = check
        if not check["ok"]:
            result["unusable"][runtime] = (
                f"{check['label_differences']} answers differ from model.pt2's on the test "
                f"split, largest difference {check['largest_difference']:.3g} "
                f"(compress.runtime_tolerance: {cfg.runtime_tolerance})"
            )
            log.warning("%s: %s", runtime, result["unusable"][runtime])
        result["latency_ms"][runtime] = {
            str(b): median_latency_ms(engine, batch, cfg.latency_repeats)
            for b, batch in batches.items()
        }
    return result
