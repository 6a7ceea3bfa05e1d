"""decode / cascade / merge on the emulated CUDA library, with torch CPU tensors in and out.

The fast build runs in this process; the sanitizer build runs in one subprocess per batch of
calls (libasan preloaded). Inputs keep their own strides, storage offsets and alignment; the
outputs are written into NaN-filled buffers of the requested layout, so an element a kernel
fails to write shows as NaN.
"""

from __future__ import annotations

import functools
import math
import os
import pickle
import subprocess
import sys
import tempfile

import emu_build
import torch
from emu_driver import Buf, Lib, run_call

CODES = {torch.float32: 0, torch.float16: 1, torch.bfloat16: 2}
SCHEDULES = {"fwd-deferred": (0, 1), "rev-immediate": (1, 0)}


def to_buf(t: torch.Tensor) -> Buf:
    """A tensor's whole storage, its element-0 offset, strides and address alignment."""
    st = t.untyped_storage()
    raw = torch.empty(0, dtype=torch.uint8).set_(st, 0, (st.nbytes(),), (1,))
    off = t.storage_offset() * t.element_size()
    return Buf(raw.numpy().tobytes(), off, tuple(t.stride()), t.data_ptr() % 16)


def from_buf(data: bytes, like: torch.Tensor) -> torch.Tensor:
    """The tensor `like` (same storage size, offset, strides) read back from a result's bytes."""
    raw = torch.frombuffer(bytearray(data), dtype=torch.uint8)
    return raw.view(like.dtype).as_strided(like.shape, like.stride(), like.storage_offset()).clone()


def empty_like_layout(shape, dtype, strided: bool = False, misalign: int = 0) -> torch.Tensor:
    """A NaN-filled output of `shape`: contiguous, or with padded rows (strided) and/or shifted
    by `misalign` elements from its storage start."""
    last = shape[-1] * 2 + 1 if strided else shape[-1]
    n = math.prod(shape[:-1]) * last + misalign
    base = torch.full((n,), float("nan"), dtype=dtype)
    view = base[misalign:].view(*shape[:-1], last)
    return view[..., : shape[-1]]


@functools.cache
def libs() -> dict:
    return {k: str(v) for k, v in emu_build.build().items()}


@functools.cache
def fast_lib() -> Lib:
    return Lib(libs()["fast"])


def run_san(calls: list[dict]) -> list[dict]:
    """Run calls in one subprocess on the ASan+UBSan build; an abort fails with its report."""
    env = dict(os.environ, LD_PRELOAD=emu_build.asan_runtime(),
               ASAN_OPTIONS="detect_leaks=0:abort_on_error=0:halt_on_error=1",
               UBSAN_OPTIONS="print_stacktrace=1:halt_on_error=1")
    here = os.path.dirname(os.path.abspath(__file__))
    with tempfile.TemporaryDirectory() as d:
        inp, outp = os.path.join(d, "in.pkl"), os.path.join(d, "out.pkl")
        with open(inp, "wb") as f:
            pickle.dump(calls, f)
        proc = subprocess.run([sys.executable, os.path.join(here, "emu_driver.py"), libs()["san"], inp, outp],
                              env=env, capture_output=True, text=True, timeout=600)
        if proc.returncode != 0:
            raise AssertionError(f"sanitizer run failed (exit {proc.returncode}):\n{proc.stderr[-6000:]}")
        with open(outp, "rb") as f:
            return pickle.load(f)


def _scale(scale, dh):
    return 1.0 / math.sqrt(dh) if scale is None else float(scale)


def decode_call(q, k, v, lens, *, softcap=None, window=None, scale=None, num_splits=0, schedule="fwd-deferred",
                o=None, lse=None, **extra) -> tuple[dict, torch.Tensor, torch.Tensor]:
    b, hq, dh = q.shape
    o = empty_like_layout((b, hq, dh), q.dtype) if o is None else o
    lse = empty_like_layout((b, hq), torch.float32) if lse is None else lse
    args = dict(dtype=CODES[q.dtype], B=b, Hq=hq, Hkv=k.shape[1], Tmax=k.shape[2], Dh=dh,
                lens_i64=int(lens.dtype == torch.int64), scale=_scale(scale, dh), softcap=float(softcap or 0.0),
                window=int(window or 0), num_splits=num_splits, **extra)
    tensors = dict(q=to_buf(q), k=to_buf(k), v=to_buf(v), lens=to_buf(lens), o=to_buf(o), lse=to_buf(lse))
    return dict(fn="decode", args=args, tensors=tensors, schedule=SCHEDULES[schedule]), o, lse


def cascade_call(q, ks, vs, kx, vx, suffix_lens, *, softcap=None, window=None, scale=None, num_splits=0,
                 schedule="fwd-deferred", o=None, lse=None, **extra):
    b, hq, dh = q.shape
    o = empty_like_layout((b, hq, dh), q.dtype) if o is None else o
    lse = empty_like_layout((b, hq), torch.float32) if lse is None else lse
    args = dict(dtype=CODES[q.dtype], B=b, Hq=hq, Hkv=ks.shape[0], T=ks.shape[1], L=kx.shape[2], Dh=dh,
                lens_i64=int(suffix_lens.dtype == torch.int64), scale=_scale(scale, dh),
                softcap=float(softcap or 0.0), window=int(window or 0), num_splits=num_splits, **extra)
    tensors = dict(q=to_buf(q), k_shared=to_buf(ks), v_shared=to_buf(vs), k_suffix=to_buf(kx), v_suffix=to_buf(vx),
                   lens=to_buf(suffix_lens), o=to_buf(o), lse=to_buf(lse))
    return dict(fn="cascade", args=args, tensors=tensors, schedule=SCHEDULES[schedule]), o, lse


def merge_call(o_a, lse_a, o_b, lse_b, *, schedule="fwd-deferred", o=None, lse=None):
    """o_* [N, Dh] (any row / element strides), lse_* [N]."""
    n, dh = o_a.shape
    o = empty_like_layout((n, dh), o_a.dtype) if o is None else o
    lse = empty_like_layout((n,), torch.float32) if lse is None else lse
    args = dict(dtype=CODES[o_a.dtype], N=n, Dh=dh)
    tensors = dict(o_a=to_buf(o_a), lse_a=to_buf(lse_a), o_b=to_buf(o_b), lse_b=to_buf(lse_b), o=to_buf(o),
                   lse=to_buf(lse))
    return dict(fn="merge", args=args, tensors=tensors, schedule=SCHEDULES[schedule]), o, lse


def outputs(result: dict, o: torch.Tensor, lse: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(o, lse) of a successful call; a failed one raises with the library's message."""
    if result["rc"] != 0:
        raise AssertionError(f"C API returned {result['rc']}: {result['err']}")
    return from_buf(result["out"]["o"], o), from_buf(result["out"]["lse"], lse)


def run(call_o_lse) -> tuple[torch.Tensor, torch.Tensor, dict]:
    """Run one (call, o, lse) on the fast build: (o, lse, raw result)."""
    call, o, lse = call_o_lse
    res = run_call(fast_lib(), call)
    out, l = outputs(res, o, lse)
    return out, l, res
