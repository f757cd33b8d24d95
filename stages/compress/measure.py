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
from fullstack_ml.runtime.program import compile_module, load_program, save_program

log = logging.getLogger("stages.compress")


def median_latency_ms(model: nn.Module, x: torch.Tensor, repeats: int) -> float:
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
