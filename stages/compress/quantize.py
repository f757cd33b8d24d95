"""Quantization methods of the compress stage, all through Intel Neural Compressor (3.x).

Each method turns an FP32 module into one that `stages.export.save_program` can export:
PT2E static/dynamic INT8 graphs with their INT8 weights folded in, weight-only RTN
INT8/INT4 (INC's packed layers rewritten as plain tensor ops) and BF16 mixed precision.
`tune` runs INC's `autotune` over the configured methods.
"""

import copy
import logging
import os
import warnings
from collections.abc import Callable
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from hydra.utils import instantiate
from omegaconf import DictConfig
from torch import nn

from fullstack_ml.runtime.program import batch_dim
from fullstack_ml.stage import StageError

log = logging.getLogger("stages.quantize")
FAMILIES = {  # INC config class -> how its result is made exportable
    "INT8StaticQuantConfig": "pt2e",
    "DynamicQuantConfig": "pt2e",
    "RTNConfig": "woq",
    "MixedPrecisionConfig": "half",
}


def quiet_inc() -> None:
    """INC logs at INFO/WARNING on every call, torchao about missing CUDA kernels."""
    os.environ.setdefault("LOGLEVEL", "ERROR")  # INC's logger level, read on first import
    for name in ("neural_compressor", "torchao", "torch.utils._pytree"):
        logging.getLogger(name).setLevel(logging.ERROR)
    warnings.filterwarnings("ignore", message=r"`torch\.jit\.script_method` is deprecated")
    warnings.filterwarnings("ignore", message=r"To copy construct from a tensor")


def inc_config(methods: DictConfig, name: str) -> Any:
    """The INC config of method `name` from `compress.methods` (via `_target_`)."""
    config = instantiate(methods[name])
    if type(config).__name__ not in FAMILIES:
        raise StageError(
            f"compress.methods.{name}: {type(config).__name__} is not supported "
            f"(one of {', '.join(FAMILIES)})"
        )
    return config


def calibrator(calib_x: np.ndarray, batches: int, batch_size: int) -> Callable[[nn.Module], None]:
    """A `run_fn` feeding up to `batches` batches of `calib_x` through a prepared model."""
    calib = torch.from_numpy(np.ascontiguousarray(calib_x, dtype=np.float32))

    def run_fn(model: nn.Module) -> None:
        with torch.no_grad():
            for i in range(min(batches, -(-len(calib) // batch_size))):
                model(calib[i * batch_size : (i + 1) * batch_size])

    return run_fn


def exported(model: nn.Module, example: torch.Tensor) -> torch.fx.GraphModule:
    """INC's export (the input of its PT2E methods), with a dynamic batch dimension."""
    from neural_compressor.torch.export import export

    return export(model, (example,), dynamic_shapes=batch_dim())


def quantize(model: nn.Module, config: Any, run_fn: Callable, example: torch.Tensor) -> nn.Module:
    """`model` quantized by INC with `config`, made exportable (see `exportable`)."""
    from neural_compressor.torch.quantization import quantize as inc_quantize

    if family(config) == "pt2e":
        source = exported(model, example)
        fp32_one_channel_convs(config, model)
    else:
        source = copy.deepcopy(model)
    out = inc_quantize(source, config, run_fn=run_fn, example_inputs=(example,))
    return exportable(out, config)


def family(config: Any) -> str:
    return FAMILIES[type(config).__name__]


def exportable(model: nn.Module, config: Any) -> nn.Module:
    """INC's quantized model in a form whose saved program keeps the low-precision weights."""
    kind = family(config)
    if kind == "pt2e":
        fold_weight_quantization(model)
    elif kind == "woq":
        replace_woq_layers(model)
    else:
        for name, module in model.named_modules():
            if type(module).__name__ == "HalfPrecisionModuleWrapper":
                module.module.to(module.dtype)  # autocast runs it; weights stored as bf16/fp16
                log.debug("%s: weights in %s", name, module.dtype)
    return model


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


class PackedLinear(nn.Module):
    """A weight-only quantized Linear as plain tensor ops (exportable, compilable).

    Holds INC RTN's unsigned integer weights (two 4-bit values per byte when `bits` is 4),
    per-group zero points and FP16 scales; dequantizes to FP32 in `forward`.
    """

    def __init__(self, q: torch.Tensor, scales: torch.Tensor, zp: torch.Tensor, bias, bits: int):
        super().__init__()
        self.bits, self.in_features = bits, q.shape[1]
        self.group = -(-q.shape[1] // scales.shape[1])
        q = q.to(torch.uint8)
        if bits == 4:
            q = F.pad(q, (0, q.shape[1] % 2))
            q = q[:, 0::2] | (q[:, 1::2] << 4)
        self.register_buffer("qweight", q.contiguous())
        self.register_buffer("scales", scales.to(torch.float16))
        self.register_buffer("zeros", zp.to(torch.uint8))
        self.register_buffer("bias", None if bias is None else bias.to(torch.float16))

    def weight(self) -> torch.Tensor:
        q = self.qweight
        if self.bits == 4:
            q = torch.stack((q & 15, q >> 4), dim=-1).reshape(q.shape[0], -1)
        q = q[:, : self.in_features].float()
        scale = self.scales.float().repeat_interleave(self.group, dim=1)[:, : self.in_features]
        zero = self.zeros.float().repeat_interleave(self.group, dim=1)[:, : self.in_features]
        return (q - zero) * scale

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        bias = None if self.bias is None else self.bias.float()
        return F.linear(x, self.weight(), bias)


def replace_woq_layers(model: nn.Module) -> None:
    """Swap INC's weight-only layers (their unpacking is numpy code export cannot trace)
    for `PackedLinear`s holding the same integers, zero points and scales, in place."""
    for name, module in list(model.named_modules()):
        if type(module).__name__ != "INCWeightOnlyLinear":
            continue
        p = module.unpack()
        g_idx = p.get("g_idx")  # set by INC on the first forward pass: the plain grouping
        plain = torch.arange(module.in_features) // module.group_size
        if (g_idx is not None and not torch.equal(g_idx.long(), plain)) or p.get("zp") is None:
            raise StageError(f"weight-only layer {name}: only RTN with zero points is supported")
        owner, _, attr = name.rpartition(".")
        packed = PackedLinear(p["int_weight"], p["scales"], p["zp"], p.get("bias"), module.bits)
        setattr(model.get_submodule(owner) if owner else model, attr, packed)


def trials(
    model: nn.Module,
    configs: list[Any],
    evaluate: Callable[[nn.Module], float],
    run_fn: Callable,
    example: torch.Tensor,
) -> list[tuple[nn.Module, float]]:
    """INC `autotune` of `model` over `configs` of one family (all PT2E, or none), every
    trial run (none ends the search early) and kept: (exportable model, `evaluate`'s score)
    per config, in order."""
    from neural_compressor.torch.quantization import TuningConfig, autotune

    seen: list[tuple[nn.Module, float]] = []

    def eval_fn(candidate: nn.Module) -> float:
        value = evaluate(candidate)
        seen.append((candidate, value))
        return value

    source = exported(model, example) if family(configs[0]) == "pt2e" else model
    if family(configs[0]) == "pt2e":
        for c in configs:
            fp32_one_channel_convs(c, model)
    # tolerable_loss -1: no trial ends the search early; all trials run.
    config = TuningConfig(config_set=configs, tolerable_loss=-1.0, max_trials=len(configs))
    autotune(source, config, eval_fn, run_fn=run_fn, example_inputs=(example,))
    # seen[0] is INC's baseline: the model unquantized
    return [
        (exportable(candidate, c), value)
        for (candidate, value), c in zip(seen[1 : len(configs) + 1], configs, strict=True)
    ]


def tune(
    model: nn.Module,
    methods: DictConfig,
    names: list[str],
    evaluate: Callable[[nn.Module], float],
    run_fn: Callable,
    example: torch.Tensor,
    max_trials: int,
) -> list[tuple[str, nn.Module, float]]:
    """INC `autotune` over the methods `names` (one trial each, in order), scored by
    `evaluate` (higher is better).

    INC's PT2E methods take an exported graph, the others the module, so the trials run in
    two `autotune` calls. Every trial is kept, not only INC's best: the caller picks by
    size or latency within the accuracy budget.

    Returns:
        (method name, exportable quantized model, score) per trial.
    """
    configs = {name: inc_config(methods, name) for name in names[:max_trials]}
    out: list[tuple[str, nn.Module, float]] = []
    for pt2e in (True, False):
        group = [n for n, c in configs.items() if (family(c) == "pt2e") == pt2e]
        if group:
            done = trials(model, [configs[n] for n in group], evaluate, run_fn, example)
            out += [(n, m, v) for n, (m, v) in zip(group, done, strict=True)]
    return out


def with_fp32_layers(methods: DictConfig, name: str, layers: list[str]) -> Any:
    """The INC config of PT2E method `name` with the Linear and Conv layers `layers` (module
    names) left in FP32 (`set_local`: INC's per-layer override)."""
    config = inc_config(methods, name)
    for layer in layers:
        config.set_local(layer, type(config)(w_dtype="fp32", act_dtype="fp32"))
    return config


def int8_layers(module: nn.Module) -> dict[str, list[int]]:
    """Per kind of layer (conv, linear): [how many run on INT8 weights (the graph dequantizes
    their weight), how many there are] in a PT2E program's graph. A quantizer can silently
    return FP32 (pytorch/ao#3914): this is how the stage tells."""
    out = {"conv": [0, 0], "linear": [0, 0]}
    for node in module.graph.nodes if hasattr(module, "graph") else []:
        kind = str(node.target).removeprefix("aten.").split(".")[0].removesuffix("2d")
        if node.op == "call_function" and kind in out:
            weight = str(getattr(node.args[1], "target", ""))
            out[kind][0] += weight.startswith("quantized_decomposed.dequantize")
            out[kind][1] += 1
    return out


def fp32_one_channel_convs(config: Any, model: nn.Module) -> None:
    """Leave convolutions on one input channel (a grey image's first layer) in FP32, in
    place: torch 2.13's Inductor lowering of an INT8 convolution fails on them (a stride
    assert: a one-channel tensor is both contiguous and channels-last), so the compiled
    program would not build; three channels compile (tested in tests/test_compress.py)."""
    for name, m in model.named_modules():
        if isinstance(m, nn.Conv2d) and m.in_channels == 1:
            config.set_local(name, type(config)(w_dtype="fp32", act_dtype="fp32"))


def quantizable_layers(model: nn.Module) -> list[str]:
    """The module names of the layers INT8 PT2E quantizes (Linear, Conv), in order."""
    kinds = (nn.Linear, nn.Conv1d, nn.Conv2d, nn.Conv3d)
    return [name for name, m in model.named_modules() if isinstance(m, kinds)]
