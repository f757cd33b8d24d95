"""compress: Intel Neural Compressor post-training INT8 quantization of the FP32 model.

Calibrates on the val split, compares FP32 and INT8 on the test split (serialized size,
accuracy, latency at batch 1 and 256) and fails when the accuracy drop exceeds
`compress.max_accuracy_drop`. Writes `models/compressed/` and `metrics/compress.json`.
"""

import logging
import os
import statistics
import time
import warnings
from pathlib import Path
from typing import Any

import numpy as np
import torch
from hydra.utils import instantiate
from omegaconf import DictConfig
from torch import nn

from stages.common import StageError, atomic_dir, run, write_json
from stages.export import batch_dim, load_program, save_program
from stages.ingest import load_split
from stages.model import SCORE_NAME, decode, encode_split, load_fp32, predict_logits, score

log = logging.getLogger("stages.compress")
FP32_DIR = Path("models/fp32")
OUT_DIR = Path("models/compressed")
METRICS = Path("metrics/compress.json")
METHODS = ("int8_static",)


def quiet_inc() -> None:
    """INC logs at INFO/WARNING on every call, torchao about missing CUDA kernels."""
    os.environ.setdefault("LOGLEVEL", "ERROR")  # INC's logger level, read on first import
    for name in ("neural_compressor", "torchao", "torch.utils._pytree"):
        logging.getLogger(name).setLevel(logging.ERROR)
    warnings.filterwarnings("ignore", message=r"`torch\.jit\.script_method` is deprecated")


def fold_weight_quantization(gm: torch.fx.GraphModule) -> None:
    """Store the quantized weights as int8 buffers and drop the FP32 weights, in place.

    INC's `convert` leaves the graph quantizing FP32 weights on every call (it does not
    forward `fold_quantize`), so the saved model would be as large as the FP32 one.
    """
    qd = torch.ops.quantized_decomposed
    quantize_ops = {qd.quantize_per_channel.default, qd.quantize_per_tensor.default}
    graph = gm.graph
    for i, node in enumerate(n for n in list(graph.nodes) if n.target in quantize_ops):
        inputs = [a for a in node.args if isinstance(a, torch.fx.Node)]
        if any(a.op != "get_attr" for a in inputs):
            continue  # quantizes an activation: depends on the input
        args = [_attr(gm, a) for a in node.args]
        with torch.no_grad():
            gm.register_buffer(f"int8_weight_{i}", node.target(*args))
        with graph.inserting_before(node):
            folded = graph.get_attr(f"int8_weight_{i}")
        folded.meta = dict(node.meta)
        node.replace_all_uses_with(folded)
        graph.erase_node(node)
    for node in list(graph.nodes):
        if node.op == "get_attr" and not node.users:
            graph.erase_node(node)
    used = {n.target for n in graph.nodes if n.op == "get_attr"}
    for name in [n for n, _ in gm.named_parameters()] + [n for n, _ in gm.named_buffers()]:
        if name not in used:
            owner, _, attr = name.rpartition(".")
            delattr(gm.get_submodule(owner) if owner else gm, attr)
    graph.lint()
    gm.recompile()


def _attr(gm: torch.fx.GraphModule, arg: Any) -> Any:
    """The tensor behind a get_attr node argument; other arguments unchanged."""
    if not isinstance(arg, torch.fx.Node):
        return arg
    obj: Any = gm
    for part in arg.target.split("."):
        obj = getattr(obj, part)
    return obj


def quantize_int8_static(
    model: nn.Module, calib_x: np.ndarray, quant_config: Any, batches: int, batch_size: int
) -> torch.fx.GraphModule:
    """INC PT2E static INT8: export, prepare, calibrate on `calib_x`, convert, fold."""
    from neural_compressor.torch.export import export
    from neural_compressor.torch.quantization import convert, prepare

    calib = torch.from_numpy(np.ascontiguousarray(calib_x, dtype=np.float32))
    prepared = prepare(
        export(model, (calib[:batch_size],), dynamic_shapes=batch_dim()), quant_config
    )
    n = min(batches, -(-len(calib) // batch_size))
    with torch.no_grad():
        for i in range(n):
            prepared(calib[i * batch_size : (i + 1) * batch_size])
            log.info("calibration batch %d/%d", i + 1, n)
    quantized = convert(prepared)
    fold_weight_quantization(quantized)
    return quantized


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


def measure(
    model: nn.Module, path: Path, x: np.ndarray, y: np.ndarray, meta: dict, repeats: int
) -> dict[str, float]:
    """Serialized size, score on (x, y) (accuracy, or R^2 for regression) and latency at
    batch 1 and 256 of `model`."""
    xt = torch.from_numpy(x)
    batch = xt[np.arange(256) % len(xt)]
    predicted = decode(predict_logits(model, x), meta)
    return {
        "size_bytes": path.stat().st_size,
        SCORE_NAME[meta["task"]]: score(y, predicted, meta["task"]),
        "latency_ms_batch1": median_latency_ms(model, xt[:1], repeats),
        "latency_ms_batch256": median_latency_ms(model, batch, repeats),
    }


def check_budget(fp32: float, int8: float, max_drop: float, name: str = "accuracy") -> float:
    """The drop of the score `name` in points; StageError when it exceeds `max_drop`."""
    drop = (fp32 - int8) * 100
    if drop > max_drop:
        raise StageError(
            f"compressed {name} {int8:.4f} is {drop:.2f} points below FP32 "
            f"{fp32:.4f}, over the budget compress.max_accuracy_drop={max_drop}"
        )
    return drop


def compress(
    fp32_dir: Path,
    val: np.ndarray,
    test: tuple[np.ndarray, np.ndarray],
    cfg: DictConfig,
    out_dir: Path,
) -> dict[str, Any]:
    """Quantize the model in `fp32_dir`, measure both, check the budget, write `out_dir`.

    Returns:
        The comparison written to the metrics file.
    """
    if cfg.method not in METHODS:
        raise StageError(f"compress.method: unknown method {cfg.method!r} ({', '.join(METHODS)})")
    quiet_inc()  # before anything imports INC (instantiating the quant config does)
    model, meta = load_fp32(fp32_dir)
    x, y = test
    with atomic_dir(out_dir) as tmp:
        log.info(
            "quantizing (%s), calibrating on up to %d val rows",
            cfg.method,
            cfg.calibration_batches * cfg.calibration_batch_size,
        )
        qmodel = quantize_int8_static(
            model,
            val,
            instantiate(cfg.quant_config),
            cfg.calibration_batches,
            cfg.calibration_batch_size,
        )
        example = torch.from_numpy(x[:2])
        save_program(qmodel, tmp / "model.pt2", example)
        fp32_file = tmp / "fp32.pt2"  # the same format, for a fair size comparison
        save_program(model, fp32_file, example)
        log.info("measuring FP32 and INT8 on %d test rows", len(x))
        fp32 = measure(model, fp32_file, x, y, meta, cfg.latency_repeats)
        int8 = measure(
            load_program(tmp / "model.pt2"), tmp / "model.pt2", x, y, meta, cfg.latency_repeats
        )
        fp32_file.unlink()
        name = SCORE_NAME[meta["task"]]
        drop = check_budget(fp32[name], int8[name], cfg.max_accuracy_drop, name)
        write_json(tmp / "model.json", {**meta, "compression": cfg.method})
    return {
        "method": cfg.method,
        "fp32": fp32,
        "int8": int8,
        "size_ratio": int8["size_bytes"] / fp32["size_bytes"],
        "accuracy_drop_points": drop,
        "latency_ratio_batch1": int8["latency_ms_batch1"] / fp32["latency_ms_batch1"],
        "latency_ratio_batch256": int8["latency_ms_batch256"] / fp32["latency_ms_batch256"],
    }


def main(cfg: DictConfig) -> None:
    torch.manual_seed(cfg.seed)
    _, meta = load_fp32(FP32_DIR)
    try:
        val_x, _ = encode_split(load_split("val"), meta)
        test_xy = encode_split(load_split("test"), meta)
    except (KeyError, ValueError) as err:
        raise StageError(f"curated splits do not match the model: {err}") from None
    result = compress(FP32_DIR, val_x, test_xy, cfg.compress, OUT_DIR)
    write_json(METRICS, result)
    name = SCORE_NAME[meta["task"]]
    log.info(
        "INT8 size %.2fx FP32, %s %.4f -> %.4f, latency b1 %.2fx b256 %.2fx -> %s",
        result["size_ratio"],
        name,
        result["fp32"][name],
        result["int8"][name],
        result["latency_ratio_batch1"],
        result["latency_ratio_batch256"],
        OUT_DIR,
    )


if __name__ == "__main__":
    run(main)
