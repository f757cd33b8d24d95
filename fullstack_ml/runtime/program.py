"""Models on disk as torch.export programs: one gzipped `.pt2` file with a dynamic batch
dimension. Depends on torch alone, so the BentoML service loads models with it too."""

import gzip
import io
import os
import shutil
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path

import torch
from torch import nn

# Inductor's own caches (generated C++ kernels built as shared objects, autotuning results)
# in a folder that outlives /tmp clean-ups: a rerun, a new clone or a restarted server reuses
# them. Its FX graph cache cannot hold our graphs (frozen CPU weights are prepacked mkldnn
# tensors, "unpickleable"), so tracing and lowering still run each time.
os.environ.setdefault("TORCHINDUCTOR_CACHE_DIR", str(Path.home() / ".cache" / "torchinductor"))

# Node metadata torch.export keeps for debugging (stack traces, provenance); not needed to
# load or run a program, and a large part of a small model's file.
DEBUG_META = ("stack_trace", "from_node", "nn_module_stack", "source_fn_stack", "torch_fn")


def batch_dim() -> tuple[dict[int, torch.export.Dim]]:
    """Dynamic shapes for one input whose first dimension is the batch."""
    return ({0: torch.export.Dim("batch", min=1, max=1 << 20)},)


@contextmanager
def torch_threads(threads: int) -> Iterator[None]:
    """torch's intra-op threads set to `threads` while the block runs, restored after.

    Inductor generates its C++ kernels for the thread count it compiles under, so a program
    compiled under the service's count (`serve.torch_threads`) runs the service's kernels,
    built once into Inductor's cache (a fresh build paid 2.6 s of g++ for a second set)."""
    before = torch.get_num_threads()
    torch.set_num_threads(threads)
    try:
        yield
    finally:
        torch.set_num_threads(before)


def save_program(module: nn.Module, path: Path, example: torch.Tensor) -> int:
    """Export `module` (already in eval mode) with a dynamic batch and write it gzipped.

    Returns:
        The size of the written file in bytes.
    """
    program = torch.export.export(module, (example,), dynamic_shapes=batch_dim())
    for node in program.graph.nodes:
        for key in DEBUG_META:
            node.meta.pop(key, None)
    program.example_inputs = None
    buf = io.BytesIO()
    torch.export.save(program, buf)
    data = gzip.compress(buf.getvalue(), compresslevel=9, mtime=0)
    Path(path).write_bytes(data)
    return len(data)


def load_program(path: Path) -> nn.Module:
    """A module loaded from a file written by `save_program` (FP32 or INT8)."""
    import torch.ao.quantization.fx._decomposed  # noqa: F401  registers the int8 q/dq ops

    data = gzip.decompress(Path(path).read_bytes())
    return torch.export.load(io.BytesIO(data)).module()


# Ops of an ONNX graph that keep INT8: PT2E's quantize/dequantize pairs lowered by the
# exporter. An INT8 program exported without them ran in float (decomposed or dropped).
QDQ_OPS = ("QuantizeLinear", "DequantizeLinear")


def export_onnx(module: nn.Module, path: Path, example: torch.Tensor) -> dict[str, int]:
    """Write `module` (a program `load_program` gave) as ONNX with a dynamic batch, input
    `x` and output `logits`, for runtimes without torch (`engine.py`). The same program
    gives the same bytes (measured: two exports, one SHA-256).

    Returns:
        The count of each QDQ op in the written graph.

    Raises:
        ValueError: `module` is an INT8 program and the graph holds no QuantizeLinear or no
            DequantizeLinear (the exporter decomposed them into float ops).
    """
    import logging
    import warnings

    # the exporter and its optimiser log each pass, each node they skip and a warning per
    # torchvision op it has no table for: a hundred lines of a stage's log
    for name in ("torch.onnx", "onnxscript", "onnx_ir"):
        logging.getLogger(name).setLevel(logging.ERROR)
    with warnings.catch_warnings():
        # a loaded program's module reports training mode, and cannot be switched (its
        # graph has no dropout or batch-norm training ops left: export froze them)
        warnings.filterwarnings("ignore", "Exporting a model while it is in training mode")
        exported = torch.onnx.export(
            module,
            (example,),
            dynamo=True,
            dynamic_shapes=batch_dim(),
            input_names=["x"],
            output_names=["logits"],
            verbose=False,
            report=False,
        )
    ops = [node.op_type for node in exported.model.graph]
    counts = {op: ops.count(op) for op in QDQ_OPS}
    if quantized(module) and not all(counts.values()):
        raise ValueError(f"{path}: the ONNX export lost the INT8 ops ({counts}; ops: {set(ops)})")
    exported.save(str(path))
    return counts


# INT8 matmuls on Inductor's C++ GEMM template (VNNI/AMX micro-kernels, requantization and
# ReLU fused) rather than oneDNN's qlinear: no autotuning, one choice; oneDNN where the
# template does not apply. About 0.45x FP32 eager at batch 256, on par at batch 1 (1 thread);
# FP32 stays on oneDNN/MKL (the template is slower there).
INT8_OPTIONS = {"max_autotune": True, "max_autotune_gemm_backends": "CPP"}


def quantized(module: nn.Module) -> bool:
    """Whether `module` is a graph with quantize/dequantize ops (a PT2E INT8 program)."""
    graph = getattr(module, "graph", None)
    return graph is not None and any(
        str(n.target).startswith("quantized_decomposed.") for n in graph.nodes
    )


def compile_module(module: nn.Module, width: int) -> Callable[[torch.Tensor], torch.Tensor]:
    """`module` compiled by Inductor with frozen weights (constants folded, INT8 weights
    prepacked), now, as one graph for every batch size.

    Calls must pass inference tensors (made under `torch.inference_mode()`, as the service
    and `predict_logits` do): a tensor made outside it fails a guard and compiles again.

    Raises:
        Exception: whatever Inductor raises where it cannot compile (no C compiler, ...).
    """
    import torch._inductor.config as inductor_config

    if not any(shutil.which(cxx) for cxx in (os.environ.get("CXX", "g++"), "c++", "clang++")):
        raise RuntimeError("no C++ compiler on PATH (Inductor needs one)")
    inductor_config.freezing = True  # global: a per-compile option is not seen by all passes
    if inductor_config.cpp.vec_isa_ok is None:  # unset (TORCHINDUCTOR_VEC_ISA_OK: the user's)
        # the CPU's flags still pick the vector ISA; this skips checking that each candidate
        # builds and loads: a test build and a child Python dlopen-ing it per ISA, 1.9 s of
        # every compiling process here. A compiler that cannot build it fails the compile,
        # which load_runner and the compress stage turn into the eager path.
        inductor_config.cpp.vec_isa_ok = True
    # INT8 GEMMs on Inductor's C++ template; graphs it cannot take (dynamic INT8) get the
    # default lowering
    for options in [INT8_OPTIONS, None] if quantized(module) else [None]:
        compiled = torch.compile(module, dynamic=True, options=options)
        try:
            with torch.inference_mode():
                x = torch.zeros(1, width)
                # an unbacked batch size is not specialised for 1: one graph serves every
                # size (batch 1 and then 2 compiled twice, 8.9 s against 3.9 s here, warm)
                torch._dynamo.decorators.mark_unbacked(x, 0)
                compiled(x)
        except Exception:  # noqa: BLE001  NoValidChoicesError and the like: next options
            if options is None:
                raise
            continue
        return compiled
    raise AssertionError("unreachable")


class Runner:
    """Runs each batch on the execution path measured fastest at the largest measured batch
    size not above it (`plan`: ascending (batch size, path name))."""

    def __init__(self, paths: dict[str, Callable], plan: list[tuple[int, str]]) -> None:
        self.paths, self.plan = paths, plan

    def path_for(self, batch: int) -> str:
        return next((p for b, p in reversed(self.plan) if b <= batch), self.plan[0][1])

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        return self.paths[self.path_for(len(x))](x)


def fastest_paths(
    latency: dict[str, dict[str, float]], available: set[str]
) -> list[tuple[int, str]]:
    """Per measured batch size, the available path of least latency.

    Args:
        latency: path name (`<program>_<eager|compiled>`) -> batch size -> milliseconds.
    """
    sizes = sorted({int(b) for times in latency.values() for b in times})
    usable = [p for p in latency if p in available]
    return [(b, min(usable, key=lambda p: latency[p].get(str(b), float("inf")))) for b in sizes]


def for_batch(serving: dict | None, rows: int) -> dict | None:
    """`serving` cut to the one path its plan runs batches of `rows` on, for a caller that
    sends batches of that size (the predict stage): `load_runner` then loads and compiles
    that path alone and runs every batch on it, a smaller last one too (a compile costs
    seconds, more than it saves on a run of a few batches where eager is the faster path)."""
    if not serving:
        return serving
    latency = serving["latency_ms"]
    path = Runner({}, fastest_paths(latency, set(latency))).path_for(rows)
    return {**serving, "latency_ms": {path: latency[path]}}


def load_runner(model_dir: Path, serving: dict | None, width: int, log=None) -> Runner:
    """The compressed model of `model_dir` (`model.pt2`, maybe `fp32.pt2`) on the execution
    paths `serving` (the compress stage's measured plan) says are fastest per batch size;
    without a plan, `model.pt2` eager. A path that fails to compile is dropped (logged); the
    others, eager ones at least, remain."""
    if not serving:
        return Runner(
            {"compressed_eager": load_program(model_dir / "model.pt2")}, [(1, "compressed_eager")]
        )
    latency = serving["latency_ms"]
    wanted = {p for _, p in fastest_paths(latency, set(latency))}
    paths: dict[str, Callable] = {}
    for program, file in serving["programs"].items():
        needed = any(p.startswith(f"{program}_") for p in wanted)
        if program != "compressed" and not (needed and (model_dir / file).exists()):
            continue
        module = load_program(model_dir / file)
        paths[f"{program}_eager"] = module
        if f"{program}_compiled" in wanted:
            try:
                paths[f"{program}_compiled"] = compile_module(module, width)
            except Exception as err:  # noqa: BLE001  any compile failure: serve eager
                if log:
                    lines = str(err).strip().splitlines() or [""]
                    log.warning(
                        "%s: torch.compile failed, serving eager (%s: %s)",
                        file,
                        type(err).__name__,
                        lines[0][:200],
                    )
    plan = fastest_paths(latency, set(paths))
    if log:
        log.info("execution paths by batch size: %s", plan)
    return Runner(paths, plan)
