"""The element-wise regions of a decoder layer, eager or under ``torch.compile`` (``--compile``).

A layer's GEMMs already run on tuned libraries (oneDNN packed weights on the CPU, cuBLAS or our
kernels on CUDA); what eager mode leaves on the table is the chains of element-wise ops between
them: RMSNorm (square, mean, rsqrt, two muls), RoPE (two muls, a rotate, an add) and the gated
activation (act(g) * u). Each is one function here; ``torch.compile`` fuses each into one kernel,
forward and backward. Regions, not the whole objective: each region compiles once (dynamic
shapes) and serves every layer of the decoder and of a LoRA coprocessor sharing its classes,
so compiling costs seconds, not the minutes a whole-objective graph costs (bench/train_precision.py
and docs/recipe-search.md record both on the CPU).

Modules opt in by declaring a class attribute ``compiled = False``; :func:`compile_regions` sets
it on every such module under a root.
"""

from __future__ import annotations

import functools
from collections.abc import Callable

import torch
import torch.nn.functional as F
from torch import Tensor, nn


def rms_norm(x: Tensor, weight: Tensor, eps: float, offset: float) -> Tensor:
    """RMSNorm of x [..., d] in float32; ``offset=1`` is Gemma's ``x * (1 + w)``. Returns x's dtype."""
    xf = x.float()
    xf = xf * torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + eps)
    if offset:
        return (xf * (offset + weight.float())).type_as(x)
    return weight * xf.to(x.dtype)


def gated(g: Tensor, u: Tensor, gelu: bool) -> Tensor:
    """act(g) * u: SiLU (SwiGLU) or tanh-approximate GELU (GeGLU)."""
    return (F.gelu(g, approximate="tanh") if gelu else F.silu(g)) * u


@functools.cache
def compiled(fn: Callable[..., Tensor]) -> Callable[..., Tensor]:
    """``fn`` under ``torch.compile`` (dynamic shapes), made once per function and shared."""
    return torch.compile(fn, dynamic=True)


def compile_regions(root: nn.Module, on: bool = True) -> int:
    """Switch every opted-in module under ``root`` to its compiled regions (or back); returns how
    many modules were switched. Zero means ``root`` has no regions to compile (e.g. a transformers
    decoder): callers that asked for compilation should refuse that, not carry on eager."""
    n = 0
    for m in root.modules():
        if hasattr(type(m), "compiled"):
            m.compiled = on
            n += 1
    return n


def check_compilable(device: torch.device) -> None:
    """RuntimeError saying why ``torch.compile`` cannot build kernels for ``device`` here, else None.

    On the CPU inductor writes C++ and needs a compiler; on CUDA it needs Triton."""
    if device.type == "cpu":
        from torch._inductor import cpp_builder

        try:
            cpp_builder.get_cpp_compiler()
        except Exception as e:  # inductor's own message names the compiler it looked for
            raise RuntimeError(f"--compile: torch.compile needs a C++ compiler on the CPU: {e}") from None
    elif device.type == "cuda":
        import importlib.util

        if importlib.util.find_spec("triton") is None:
            raise RuntimeError("--compile: torch.compile needs triton on CUDA (pip install triton)")
