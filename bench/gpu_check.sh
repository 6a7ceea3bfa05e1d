#!/usr/bin/env bash
# One prepared GPU check (install, CUDA tests, compute-sanitizer, benchmarks, a training run).
#
#   bash bench/gpu_check.sh OUTDIR [--budget-s N] [--steps install,pytest,sanitizer,bench,train,ncu]
#                                  [--maxfail N] [--workers N] [--rehearse]
#
# Runs from any folder; works in the repository root. PYTHON picks the interpreter (default
# python3: on the GPU image the one that holds torch). Offline machines: packages the image
# lacks are installed from the wheels in .whl/ (bench/fetch_wheels.sh fills it). The commit
# is read from git, or from CACHEAUG_GIT_COMMIT where the copy has no .git. Everything
# else: bench/gpu_check.py and bench/README.md.
set -u
here="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
cd "$here/.." || exit 2
if [ "$#" -lt 1 ] || [ "${1#-}" != "$1" ]; then
    echo "usage: bash bench/gpu_check.sh OUTDIR [--budget-s N] [--steps ...] [--rehearse]" >&2
    exit 2
fi
py="${PYTHON:-python3}"
if ! command -v "$py" >/dev/null 2>&1; then
    echo "gpu_check: $py not found (set PYTHON)" >&2
    exit 2
fi
export PYTHONUNBUFFERED=1
exec "$py" bench/gpu_check.py "$@"
