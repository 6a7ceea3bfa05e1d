"""Build script: pure-Python package plus an optional CUDA extension built by CMake.

CACHEAUG_BUILD_CUDA=auto (default) builds csrc/ when nvcc is found, 1 requires it,
0 skips it. CACHEAUG_CUDA_ARCHS (default "80;90") picks the SM targets. A build that
was asked for (auto with nvcc present, or 1) and fails, fails the install: a broken
extension must not pass unnoticed.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path

from setuptools import Extension, setup
from setuptools.command.build_ext import build_ext

ROOT = Path(__file__).resolve().parent


def _find_nvcc() -> str | None:
    nvcc = shutil.which("nvcc")
    if nvcc:
        return nvcc
    for home in (os.environ.get("CUDA_HOME"), os.environ.get("CUDA_PATH"), "/usr/local/cuda"):
        if home and (Path(home) / "bin" / "nvcc").exists():
            return str(Path(home) / "bin" / "nvcc")
    return None


def _want_cuda() -> tuple[bool, str | None]:
    mode = os.environ.get("CACHEAUG_BUILD_CUDA", "auto").strip().lower()
    if mode not in ("auto", "0", "1"):
        raise SystemExit(f"CACHEAUG_BUILD_CUDA must be auto, 0 or 1, got {mode!r}")
    nvcc = _find_nvcc()
    if mode == "0":
        return False, None
    if mode == "1" and nvcc is None:
        raise SystemExit("CACHEAUG_BUILD_CUDA=1 but nvcc was not found (PATH, CUDA_HOME, /usr/local/cuda)")
    return nvcc is not None, nvcc


class CMakeExtension(Extension):
    def __init__(self, name: str, sourcedir: Path) -> None:
        super().__init__(name, sources=[])
        self.sourcedir = str(sourcedir)


class CMakeBuild(build_ext):
    def build_extension(self, ext: Extension) -> None:
        if not isinstance(ext, CMakeExtension):
            return super().build_extension(ext)
        import pybind11

        _, nvcc = _want_cuda()
        out_path = Path(self.get_ext_fullpath(ext.name)).resolve()
        build_dir = Path(self.build_temp).resolve() / "cmake"
        build_dir.mkdir(parents=True, exist_ok=True)
        archs = os.environ.get("CACHEAUG_CUDA_ARCHS", "80;90")
        cfg = [
            "cmake",
            ext.sourcedir,
            f"-DCMAKE_LIBRARY_OUTPUT_DIRECTORY={out_path.parent}",
            f"-DCACHEAUG_EXT_NAME={out_path.name}",
            f"-DPython_EXECUTABLE={sys.executable}",
            f"-Dpybind11_DIR={pybind11.get_cmake_dir()}",
            f"-DCMAKE_CUDA_COMPILER={nvcc}",
            f"-DCMAKE_CUDA_ARCHITECTURES={archs}",
            "-DCMAKE_BUILD_TYPE=Release",
        ]
        jobs = str(max(1, os.cpu_count() or 1))
        subprocess.run(cfg, cwd=build_dir, check=True)
        subprocess.run(["cmake", "--build", ".", "--parallel", jobs], cwd=build_dir, check=True)
        if not out_path.exists():
            raise RuntimeError(f"CMake finished but {out_path} was not produced")


build_cuda, _ = _want_cuda()
ext_modules = [CMakeExtension("cacheaug_engine._C", ROOT)] if build_cuda else []

setup(
    packages=[
        "cacheaug_engine",
        *(f"cacheaug_engine.{room}" for room in (
            "ops", "ops.cuda", "models", "augment", "data", "train", "eval", "generation", "integrations", "cli",
            "tooling",
        )),
        "cacheaug_engine.triton_kernels",
        "cacheaug_engine.bench",
    ],
    package_dir={
        "cacheaug_engine": "cacheaug_engine",
        "cacheaug_engine.triton_kernels": "triton_kernels",
        "cacheaug_engine.bench": "bench",
    },
    package_data={"cacheaug_engine": ["assets/*", "assets/**/*", "integrations/lm_eval_tasks/*"]},
    ext_modules=ext_modules,
    cmdclass={"build_ext": CMakeBuild},
    zip_safe=False,
)
