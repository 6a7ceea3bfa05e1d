"""Call the emulated CUDA library's C API (csrc/cacheaug.h) through ctypes; numpy only (no torch).

A call is a plain dict, so it can be pickled to a subprocess that runs the sanitizer build
(which needs libasan preloaded into the interpreter):

    {"fn": "decode" | "cascade" | "merge", "args": {sizes and options},
     "tensors": {name: Buf}, "schedule": (reverse, defer)}

Every tensor travels as a Buf: the bytes of its whole storage, the byte offset of element 0 and
the element strides. ``run_call`` copies each into a fresh, exactly sized allocation (so ASan
sees a read past the storage) at the same address alignment modulo 16 as the original, calls the
C API with pointers into them, and returns rc, the error text, the launch log and the bytes of
the output buffers. The workspace is sized with ca_*_workspace and allocated exactly.

Run as a script: ``python emu_driver.py LIB IN.pkl OUT.pkl`` runs a pickled list of calls.
"""

from __future__ import annotations

import ctypes as C
import pickle
import sys
from dataclasses import dataclass

import numpy as np

_I64P = C.POINTER(C.c_int64)
_P = C.c_void_p


@dataclass
class Buf:
    """One tensor argument: storage bytes, offset of element 0 (bytes), element strides."""

    data: bytes
    offset: int
    strides: tuple[int, ...]
    align: int  # address of element 0 modulo 16 in the caller's memory


class Lib:
    """The emulated library (a path to libcacheaug_emu_*.so)."""

    def __init__(self, path: str):
        self.dll = C.CDLL(path)
        d = self.dll
        d.ca_decode_workspace.argtypes = [C.c_int, C.c_int, C.c_int, C.c_int64, C.c_int, C.c_int,
                                          C.POINTER(C.c_int), C.POINTER(C.c_size_t), C.c_char_p, C.c_size_t]
        d.ca_cascade_workspace.argtypes = [C.c_int, C.c_int, C.c_int, C.c_int64, C.c_int64, C.c_int, C.c_int,
                                           C.POINTER(C.c_int), C.POINTER(C.c_int), C.POINTER(C.c_size_t),
                                           C.c_char_p, C.c_size_t]
        d.ca_decode_attention.argtypes = (
            [C.c_int, C.c_int, C.c_int, C.c_int, C.c_int64, C.c_int] + [_P, _I64P] * 3 + [_P, C.c_int, C.c_int64]
            + [_P, _I64P, _P, _I64P, C.c_float, C.c_float, C.c_int64, C.c_int, _P, C.c_size_t, _P, C.c_char_p,
               C.c_size_t])
        d.ca_cascade_decode.argtypes = (
            [C.c_int, C.c_int, C.c_int, C.c_int, C.c_int64, C.c_int64, C.c_int] + [_P, _I64P] * 5
            + [_P, C.c_int, C.c_int64]
            + [_P, _I64P, _P, _I64P, C.c_float, C.c_float, C.c_int64, C.c_int, _P, C.c_size_t, _P, C.c_char_p,
               C.c_size_t])
        d.ca_merge_states.argtypes = (
            [C.c_int, C.c_int64, C.c_int] + [_P, C.c_int64, C.c_int64, _P, C.c_int64] * 2
            + [_P, C.c_int64, C.c_int64, _P, C.c_int64, _P, C.c_char_p, C.c_size_t])
        d.cuda_emu_configure.argtypes = [C.c_int, C.c_int, C.c_int]
        d.cuda_emu_last_message.restype = C.c_char_p
        d.cuda_emu_launch_log.restype = C.c_char_p

    def workspace(self, fn: str, a: dict) -> tuple[tuple[int, ...], int]:
        """(split counts, bytes) the launcher asks for."""
        err = C.create_string_buffer(512)
        nbytes = C.c_size_t(0)
        if fn == "decode":
            s = C.c_int(0)
            rc = self.dll.ca_decode_workspace(a["B"], a["Hq"], a["Hkv"], a["Tmax"], a["Dh"], a.get("num_splits", 0),
                                              C.byref(s), C.byref(nbytes), err, 512)
            splits: tuple[int, ...] = (s.value,)
        else:
            s1, s2 = C.c_int(0), C.c_int(0)
            rc = self.dll.ca_cascade_workspace(a["B"], a["Hq"], a["Hkv"], a["T"], a["L"], a["Dh"],
                                               a.get("num_splits", 0), C.byref(s1), C.byref(s2), C.byref(nbytes),
                                               err, 512)
            splits = (s1.value, s2.value)
        if rc != 0:
            raise ValueError(f"workspace query failed ({rc}): {err.value.decode()}")
        return splits, nbytes.value


def _alloc(buf: Buf) -> tuple[np.ndarray, int]:
    """A fresh allocation that ends exactly where buf.data ends, element 0 at buf.align modulo 16."""
    n, start = len(buf.data), 0
    for _ in range(4):
        mem = np.empty(n + start, dtype=np.uint8)
        want = (buf.align - buf.offset - mem.ctypes.data) % 16
        if want == start:
            mem[start:] = np.frombuffer(buf.data, dtype=np.uint8)
            return mem, mem.ctypes.data + start + buf.offset
        start = want
    raise RuntimeError("cannot place a buffer at the wanted alignment")


def _strides(buf: Buf):
    return (C.c_int64 * max(len(buf.strides), 1))(*buf.strides)


def run_call(lib: Lib, call: dict) -> dict:
    """Run one call; {"rc", "err", "log", "splits", "ws_bytes", "out": {name: bytes}}."""
    fn, a, t = call["fn"], call["args"], call["tensors"]
    reverse, defer = call.get("schedule", (0, 1))
    lib.dll.cuda_emu_configure(int(reverse), int(defer), 0)
    lib.dll.cuda_emu_reset()
    mem = {name: _alloc(b) for name, b in t.items() if b is not None}
    ptr = {name: mem[name][1] if name in mem else None for name in t}
    st = {name: _strides(b) for name, b in t.items() if b is not None}
    err = C.create_string_buffer(1024)
    splits: tuple[int, ...] = ()
    ws_bytes = 0
    if fn == "merge":
        rc = lib.dll.ca_merge_states(
            a["dtype"], a["N"], a["Dh"],
            ptr["o_a"], *t["o_a"].strides, ptr["lse_a"], t["lse_a"].strides[0],
            ptr["o_b"], *t["o_b"].strides, ptr["lse_b"], t["lse_b"].strides[0],
            ptr["o"], *t["o"].strides, ptr["lse"], t["lse"].strides[0], None, err, 1024)
    else:
        try:
            splits, ws_bytes = lib.workspace(fn, a)
        except ValueError as exc:
            return {"rc": -1, "err": str(exc), "log": "", "splits": (), "ws_bytes": 0, "out": {}}
        ws_bytes = a.get("workspace_bytes", ws_bytes)
        ws = np.empty(ws_bytes, dtype=np.uint8) if ws_bytes > 0 else None
        ws_ptr = ws.ctypes.data if ws is not None else None
        lens = t["lens"]
        lens_stride = lens.strides[0] if lens.strides else 1
        common = [ptr["lens"], a["lens_i64"], lens_stride, ptr["o"], st["o"],
                  ptr.get("lse"), st.get("lse"), a["scale"], a.get("softcap", 0.0), a.get("window", 0),
                  a.get("num_splits", 0), ws_ptr, ws_bytes, None, err, 1024]
        if fn == "decode":
            rc = lib.dll.ca_decode_attention(
                a["dtype"], a["B"], a["Hq"], a["Hkv"], a["Tmax"], a["Dh"],
                ptr["q"], st["q"], ptr["k"], st["k"], ptr["v"], st["v"], *common)
        else:
            rc = lib.dll.ca_cascade_decode(
                a["dtype"], a["B"], a["Hq"], a["Hkv"], a["T"], a["L"], a["Dh"], ptr["q"], st["q"],
                ptr["k_shared"], st["k_shared"], ptr["v_shared"], st["v_shared"],
                ptr["k_suffix"], st["k_suffix"], ptr["v_suffix"], st["v_suffix"], *common)
    out = {}
    for name in call.get("outputs", ("o", "lse")):
        if name in mem:
            arr = mem[name][0]
            out[name] = arr[len(arr) - len(t[name].data):].tobytes()
    return {"rc": rc, "err": err.value.decode(errors="replace"),
            "log": lib.dll.cuda_emu_launch_log().decode(), "splits": splits, "ws_bytes": ws_bytes, "out": out}


def main(argv: list[str]) -> int:
    lib_path, inp, outp = argv
    lib = Lib(lib_path)
    with open(inp, "rb") as f:
        calls = pickle.load(f)
    results = [run_call(lib, c) for c in calls]
    with open(outp, "wb") as f:
        pickle.dump(results, f)
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
