"""Build the CUDA C++ kernels of csrc/ as a host shared library under the emulator (cuda_emu.h).

The sources are copied with two rewrites, nothing else: a launch ``k<<<grid, block, smem,
stream>>>(args)`` becomes ``::cuda_emu::launch(<__launch_bounds__ of k>, "k", k, grid, block,
smem, stream, args)``, and every ``__shared__`` declaration is followed by a call that registers
the array (0xFF fill at each block start, 48 KiB check, cp.async destination check). Everything
else comes from ``g++ -include cuda_emu.h`` and the real CUDA headers.

Two variants: ``fast`` (-O2) and ``san`` (-O1, AddressSanitizer + UndefinedBehaviorSanitizer,
aborting on the first report; it must be loaded with libasan preloaded, see emu_driver.py).
Builds are cached under a directory keyed by the hash of every input (sources, flags, compiler).
"""

from __future__ import annotations

import glob
import hashlib
import os
import re
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

HERE = Path(__file__).resolve().parent
REPO = HERE.parents[1]
CSRC = REPO / "csrc"
SOURCES = ("cacheaug.h", "decode_kernels.cuh", "decode.cu")
HARNESS = ("cuda_emu.h", "cuda_emu.cpp", "include/cuda_pipeline.h", "emu_build.py")
COMMON_FLAGS = ["-std=c++17", "-fPIC", "-shared", "-g", "-fno-strict-aliasing", "-Wall", "-Wno-unknown-pragmas",
                "-Wno-unused-function"]
VARIANTS = {
    "fast": ["-O2"],
    "san": ["-O1", "-fsanitize=address,undefined", "-fno-sanitize-recover=all", "-fno-omit-frame-pointer"],
}

_LAUNCH = re.compile(r"([A-Za-z_][\w:]*(?:<[^<>;]*>)?)<<<(.*?)>>>\(")
_BOUNDS = re.compile(r"__launch_bounds__\(\s*(\d+)[^)]*\)\s*(\w+)\s*\(")
_SHARED = re.compile(r"__shared__[^;{}]*;")


class EmuUnavailable(RuntimeError):
    """No g++ or no CUDA headers: the emulated suite cannot be built here."""


def cuda_include() -> Path:
    """The CUDA toolkit's include directory (cuda_fp16.h, cuda_bf16.h, cuda_runtime.h)."""
    roots = [os.environ.get("CUDA_HOME"), os.environ.get("CUDA_PATH"), "/usr/local/cuda"]
    roots += sorted(glob.glob("/usr/local/cuda-*"), reverse=True)
    for root in roots:
        if root and (Path(root) / "include" / "cuda_bf16.h").is_file():
            return Path(root) / "include"
    raise EmuUnavailable("CUDA headers (cuda_bf16.h) not found under CUDA_HOME, /usr/local/cuda or /usr/local/cuda-*")


def compiler() -> str:
    cxx = os.environ.get("CXX", "g++")
    path = shutil.which(cxx)
    if path is None:
        raise EmuUnavailable(f"no C++ compiler: {cxx!r} is not on PATH")
    return path


def rewrite(text: str, bounds: dict[str, int], origin: str = "") -> str:
    """One source with its launches and __shared__ declarations rewritten (see the module doc)."""

    def launch(m: re.Match) -> str:
        kernel, cfg = m.group(1), m.group(2)
        base = kernel.split("::")[-1].split("<")[0]
        return f'::cuda_emu::launch({bounds.get(base, 1024)}, "{kernel}", {kernel}, ::cuda_emu::LaunchCfg({cfg}), '

    def shared(m: re.Match) -> str:
        decl = m.group(0)
        name = re.search(r"(\w+)\s*(?:\[[^;]*\])?\s*;$", decl)
        if name is None:
            raise ValueError(f"cannot parse the __shared__ declaration {decl!r}")
        return f'{decl} ::cuda_emu::register_shared(&{name.group(1)}, sizeof({name.group(1)}), "{name.group(1)}");'

    out = _SHARED.sub(shared, _LAUNCH.sub(launch, text))
    if "<<<" in out:
        raise ValueError("a kernel launch was not rewritten (the form k<<<...>>>(args) is expected)")
    return f'#line 1 "{origin}"\n{out}' if origin else out  # messages name the original file:line


# Translation units: (source directory, files, the .cu file compiled). "selftest": the emulator's own
# checks (selftest_kernels.cu: one small kernel per rule it enforces).
UNITS = {
    "decode": (CSRC, SOURCES, "decode.cu"),
    "selftest": (HERE, ("selftest_kernels.cu",), "selftest_kernels.cu"),
}


def _sources(unit: str, mutations: tuple[tuple[str, str, str], ...]) -> dict[str, str]:
    """{file: text} of a unit with mutations (file, old, new) applied - each must apply exactly once."""
    src_dir, files, _ = UNITS[unit]
    texts = {s: (src_dir / s).read_text() for s in files}
    for name, old, new in mutations:
        if texts[name].count(old) != 1:
            raise ValueError(f"mutation of {name}: {old!r} occurs {texts[name].count(old)} times, not once")
        texts[name] = texts[name].replace(old, new)
    return texts


def _inputs_hash(cxx: str, inc: Path, flags: list[str], texts: dict[str, str]) -> str:
    h = hashlib.sha256()
    for name, text in sorted(texts.items()):
        h.update(name.encode() + b"\0" + text.encode())
    for path in [HERE / s for s in HARNESS]:
        h.update(path.name.encode() + b"\0" + path.read_bytes())
    version = subprocess.run([cxx, "--version"], capture_output=True, text=True, check=False).stdout
    h.update("\0".join([cxx, version, str(inc), *flags]).encode())
    return h.hexdigest()[:16]


def build_dir() -> Path:
    return Path(os.environ.get("CACHEAUG_EMU_BUILD_DIR", Path(tempfile.gettempdir()) / "cacheaug-cuda-emu"))


def build(variants: tuple[str, ...] = ("fast", "san"), unit: str = "decode",
          mutations: tuple[tuple[str, str, str], ...] = ()) -> dict[str, Path]:
    """{variant: path of the shared library} of a unit (UNITS), optionally with source mutations
    (planted bugs, for the emulator's own tests); compiles in parallel only what is not cached."""
    cxx, inc = compiler(), cuda_include()
    texts = _sources(unit, mutations)
    main = UNITS[unit][2].replace(".cu", ".cpp")
    out: dict[str, Path] = {}
    jobs = []
    for variant in variants:
        flags = COMMON_FLAGS + VARIANTS[variant]
        target = build_dir() / _inputs_hash(cxx, inc, flags, texts) / f"libcacheaug_emu_{unit}_{variant}.so"
        out[variant] = target
        if target.is_file():
            continue
        target.parent.mkdir(parents=True, exist_ok=True)
        work = Path(tempfile.mkdtemp(prefix=f"build-{variant}-", dir=target.parent))
        bounds = {name: int(n) for t in texts.values() for n, name in _BOUNDS.findall(t)}
        src_dir = UNITS[unit][0]
        for s, t in texts.items():
            origin = str((src_dir / s).relative_to(REPO))
            (work / (s.replace(".cu", ".cpp") if s.endswith(".cu") else s)).write_text(rewrite(t, bounds, origin))
        tmp_lib = work / target.name
        cmd = [cxx, *flags, "-include", str(HERE / "cuda_emu.h"), f"-I{HERE / 'include'}", f"-I{inc}", f"-I{work}",
               str(work / main), str(HERE / "cuda_emu.cpp"), "-o", str(tmp_lib)]
        jobs.append((variant, target, work, tmp_lib, subprocess.Popen(cmd, stdout=subprocess.PIPE,
                                                                      stderr=subprocess.STDOUT, text=True)))
    errors = []
    for variant, target, work, tmp_lib, proc in jobs:
        try:
            log, _ = proc.communicate(timeout=600)
        except subprocess.TimeoutExpired:
            proc.kill()
            log, _ = proc.communicate()
        if proc.returncode != 0:
            errors.append(f"[{variant}] {' '.join(proc.args)}\n{log}")
            continue
        os.replace(tmp_lib, target)  # atomic: a concurrent build of the same inputs is harmless
        shutil.rmtree(work, ignore_errors=True)
    if errors:
        raise RuntimeError("building the emulated CUDA library failed:\n" + "\n".join(errors))
    return out


def asan_runtime() -> str:
    """libasan.so of the compiler (to LD_PRELOAD into the process that loads the san variant)."""
    path = subprocess.run([compiler(), "-print-file-name=libasan.so"], capture_output=True, text=True,
                          check=True).stdout.strip()
    if not os.path.isabs(path):
        raise EmuUnavailable("the compiler has no libasan.so")
    return path


if __name__ == "__main__":
    for v, p in build(tuple(sys.argv[1:]) or ("fast", "san")).items():
        print(v, p)
