#!/usr/bin/env bash
# Fill .whl/ (git-ignored via .git/info/exclude) with the wheels a bare, offline GPU machine
# lacks, for bench/gpu_check.sh's install step (it installs a wheel only when its module is
# missing there). Run here, where pip reaches PyPI; carry .whl with the call.
#
#   bash bench/fetch_wheels.sh [NAME==VERSION ...]     (default: gguf, the one the GPU image lacked)
#
# Wheels for CPython 3.12 on x86-64 Linux (the GPU image's Python); pure-Python wheels fit any.
# --no-deps: name each missing dependency too (gguf needs numpy, pyyaml, tqdm: on the image).
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."
git_dir="$(git rev-parse --git-common-dir 2>/dev/null || true)"
if [ -n "$git_dir" ] && ! grep -qx '/.whl/' "$git_dir/info/exclude" 2>/dev/null; then
    mkdir -p "$git_dir/info" && echo '/.whl/' >> "$git_dir/info/exclude"
fi
pkgs=("$@")
[ "${#pkgs[@]}" -eq 0 ] && pkgs=("gguf==0.19.0")
mkdir -p .whl
python3 -m pip download --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
    --platform manylinux_2_28_x86_64 --platform manylinux_2_17_x86_64 --platform manylinux2014_x86_64 \
    --platform any -d .whl "${pkgs[@]}"
ls -l .whl
