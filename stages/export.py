"""Models on disk as torch.export programs: one gzipped `.pt2` file with a dynamic batch
dimension. Depends on torch alone, so the BentoML service loads models with it too."""

import gzip
import io
from pathlib import Path

import torch
from torch import nn

# Node metadata torch.export keeps for debugging (stack traces, provenance); not needed to
# load or run a program, and a large part of a small model's file.
DEBUG_META = ("stack_trace", "from_node", "nn_module_stack", "source_fn_stack", "torch_fn")


def batch_dim() -> tuple[dict[int, torch.export.Dim]]:
    """Dynamic shapes for one input whose first dimension is the batch."""
    return ({0: torch.export.Dim("batch", min=1, max=1 << 20)},)


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
