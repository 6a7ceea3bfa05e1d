"""Compile one Triton kernel launch for a GPU architecture without a GPU, and measure it.

`compile_launch(fn, values, arch=90, num_warps=8, num_stages=3)` specialises the kernel's
arguments the way Triton's launcher does (`values` maps every parameter name to a value:
tensors - meta tensors are fine - ints, floats, constexprs), compiles it with
`triton.compile(ASTSource(...), target=GPUTarget("cuda", arch, 32))` and returns a record:

    status "ok" | "error", error (message or None), registers, spill_stores, spill_loads,
    spills (bytes, stores + loads), shared_bytes, smem_limit, num_warps, num_stages,
    hgmma (sm_90+: does the SASS use warpgroup MMA; None below), mma_instructions, compile_s

Registers and spills come from ptxas's own `-v` report (Triton always passes -v; the log is
kept beside the cubin in Triton's cache so that cache hits report it too). A launch whose
shared memory exceeds the architecture's per-block limit is an error record, as on a GPU.
Must run with TRITON_INTERPRET unset (kernels decorated under the interpreter cannot be
compiled); `kernel_sweep` runs it in clean worker processes.
"""

from __future__ import annotations

import contextlib
import io
import os
import re
import time
from pathlib import Path
from typing import Any

# Opt-in shared memory per block (bytes), the most a launch may ask for: cudaDevAttrMaxSharedMemoryPerBlockOptin.
# A100 (sm_80) 163 KB of its 164 KB per SM; H100 (sm_90) 227 KB of its 228 KB per SM.
SMEM_LIMIT = {80: 166912, 86: 101376, 87: 166912, 89: 101376, 90: 232448}

_PTXAS_REGS = re.compile(r"Used (\d+) registers")
_PTXAS_SPILL = re.compile(r"(\d+) bytes spill stores, (\d+) bytes spill loads")
_PTXAS_STACK = re.compile(r"(\d+) bytes stack frame")


def smem_limit(arch: int) -> int:
    """Per-block shared-memory limit of compute capability `arch` (e.g. 80, 90) in bytes."""
    if arch in SMEM_LIMIT:
        return SMEM_LIMIT[arch]
    return SMEM_LIMIT[max(a for a in SMEM_LIMIT if a <= arch)] if arch >= 80 else 49152


def parse_ptxas(log: str) -> dict[str, int]:
    """registers / spill_stores / spill_loads / stack_bytes from a `ptxas -v` log (sums over functions)."""
    regs = [int(x) for x in _PTXAS_REGS.findall(log)]
    spills = [(int(a), int(b)) for a, b in _PTXAS_SPILL.findall(log)]
    if not regs:
        raise ValueError("no 'Used N registers' line in the ptxas log")
    return dict(
        registers=max(regs),
        spill_stores=sum(a for a, _ in spills),
        spill_loads=sum(b for _, b in spills),
        stack_bytes=sum(int(x) for x in _PTXAS_STACK.findall(log)),
    )


def specialise(fn, values: dict[str, Any], backend) -> tuple[dict, dict, dict]:
    """(signature, constexprs, attrs) for `triton.compile`, as the JIT launcher derives them."""
    from triton._C.libtriton import native_specialize_impl

    signature, constexprs, attrs = {}, {}, {}
    for i, p in enumerate(fn.params):
        val = values[p.name]
        if p.is_constexpr:
            signature[p.name], constexprs[p.name] = "constexpr", val
            continue
        ty, attr = native_specialize_impl(type(backend), val, p.is_const, not p.do_not_specialize,
                                          not p.do_not_specialize_on_alignment)
        signature[p.name] = ty
        if ty == "constexpr":
            constexprs[p.name] = attr
        elif isinstance(attr, str) and attr:
            attrs[(i,)] = backend.parse_attr(attr)
    return signature, constexprs, attrs


def _first_lines(exc: BaseException, limit: int = 600) -> str:
    text = f"{type(exc).__name__}: {exc}".strip()
    # ptxas failures carry the whole PTX; keep the head, which holds the reason.
    return text if len(text) <= limit else text[:limit] + " ..."


def _ptxas_log(kernel, captured: str) -> str:
    """The ptxas -v log of `kernel`: freshly captured (then saved beside the cubin) or the saved one."""
    cubin = next((Path(p) for name, p in kernel.metadata_group.items() if name.endswith(".cubin")), None)
    side = cubin.with_suffix(".ptxas.log") if cubin is not None else None
    if "registers" in captured:
        if side is not None:
            with contextlib.suppress(OSError):
                side.write_text(captured)
        return captured
    if side is not None and side.exists():
        return side.read_text()
    log = _rerun_ptxas(kernel)  # cached by someone else (e.g. the runtime JIT): ask ptxas again
    if side is not None:
        with contextlib.suppress(OSError):
            side.write_text(log)
    return log


def _rerun_ptxas(kernel) -> str:
    """`ptxas -v` on a compiled kernel's PTX with Triton's flags, for its resource report only."""
    import subprocess
    import tempfile

    from triton.backends.nvidia.compiler import get_ptxas, sm_arch_from_capability

    arch = kernel.metadata.target.arch
    with tempfile.TemporaryDirectory(prefix="cacheaug-ptxas-") as tmp:
        ptx = Path(tmp) / "k.ptx"
        ptx.write_text(kernel.asm["ptx"])
        cmd = [get_ptxas(arch).path, "-lineinfo", "-v", "--regAllocOptLevel=2",
               f"--gpu-name={sm_arch_from_capability(arch)}", str(ptx), "-o", str(Path(tmp) / "k.cubin")]
        return subprocess.run(cmd, capture_output=True, text=True, check=True).stderr


def compile_launch(fn, values: dict[str, Any], *, arch: int, num_warps: int, num_stages: int) -> dict[str, Any]:
    """Compile `fn` specialised on `values` for sm_<arch>; never raises for a kernel's own errors."""
    import triton
    from triton.backends.compiler import GPUTarget
    from triton.compiler.compiler import ASTSource, make_backend

    if os.environ.get("TRITON_INTERPRET", "0") == "1" or not hasattr(fn, "params"):
        raise RuntimeError("compile_launch needs TRITON_INTERPRET unset when the kernel module is imported")
    rec: dict[str, Any] = dict(status="error", error=None, registers=None, spill_stores=None, spill_loads=None,
                               spills=None, stack_bytes=None, shared_bytes=None, smem_limit=smem_limit(arch),
                               num_warps=num_warps, num_stages=num_stages, hgmma=None, mma_instructions=None,
                               compile_s=None)
    t0 = time.perf_counter()
    target = GPUTarget("cuda", arch, 32)
    try:
        signature, constexprs, attrs = specialise(fn, values, make_backend(target))
        out = io.StringIO()
        old = triton.knobs.nvidia.dump_ptxas_log
        triton.knobs.nvidia.dump_ptxas_log = True  # make_cubin prints ptxas's -v report to stdout
        try:
            with contextlib.redirect_stdout(out):
                kernel = triton.compile(ASTSource(fn, signature, constexprs, attrs), target=target,
                                        options=dict(num_warps=num_warps, num_stages=num_stages))
        finally:
            triton.knobs.nvidia.dump_ptxas_log = old
        res = parse_ptxas(_ptxas_log(kernel, out.getvalue()))
        sass = kernel.asm["sass"]
    except Exception as exc:  # noqa: BLE001 - every compile failure becomes an error record
        rec.update(error=_first_lines(exc), compile_s=round(time.perf_counter() - t0, 2))
        return rec
    rec.update(res, spills=res["spill_stores"] + res["spill_loads"], shared_bytes=int(kernel.metadata.shared),
               num_warps=int(kernel.metadata.num_warps), num_stages=int(kernel.metadata.num_stages),
               compile_s=round(time.perf_counter() - t0, 2))
    rec["mma_instructions"] = len(re.findall(r"\b(?:HGMMA|HMMA)\b", sass))
    if arch >= 90:
        rec["hgmma"] = "HGMMA" in sass
    if rec["shared_bytes"] > rec["smem_limit"]:
        rec["error"] = f"shared memory {rec['shared_bytes']} B exceeds the sm_{arch} limit of {rec['smem_limit']} B"
    else:
        rec["status"] = "ok"
    return rec
