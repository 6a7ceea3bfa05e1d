"""TransformersDecoder vs our native Decoder on the CPU, paired, one run (issue 22, item 7).

    python -m bench.transformers_decoder --out bench/results/transformers_decoder_cpu.json [--smoke]

Same SmolLM2-135M configuration and weights (random, fp32) in both: the native ``Decoder`` and a
transformers ``LlamaForCausalLM`` wrapped as ``TransformersDecoder`` (the engine's attention inside
the HF modules). Cases: ``prefill`` (T 256, logits for every row + the cache) and ``train_step``
(one optimizer step of CacheAugmentationObjective: B 1, T 256, N 4 points, N_L 8, N_A 16, LoRA
rank 32, AdamW). Per repeat both variants run back to back (order alternating); the reported ratio
is the median of per-repeat ratios transformers_decoder_ms / native_ms with a distribution-free 95%
interval (> 1: the wrapper is slower).
"""

from __future__ import annotations

import argparse
import json
import platform
import statistics
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch

from .cpu_peer import median_interval


def _hf_llama(cfg: Any) -> Any:
    """transformers' LlamaForCausalLM of ``cfg`` (a DecoderConfig without rope scaling), random weights."""
    from transformers import LlamaConfig, LlamaForCausalLM

    hf_cfg = LlamaConfig(
        vocab_size=cfg.vocab_size, hidden_size=cfg.hidden_size, intermediate_size=cfg.intermediate_size,
        num_hidden_layers=cfg.num_layers, num_attention_heads=cfg.num_heads, num_key_value_heads=cfg.num_kv_heads,
        head_dim=cfg.head_dim, rms_norm_eps=cfg.rms_norm_eps, max_position_embeddings=cfg.max_position_embeddings,
        tie_word_embeddings=cfg.tie_word_embeddings,
        rope_parameters={"rope_type": "default", "rope_theta": cfg.rope_theta},
    )
    return LlamaForCausalLM(hf_cfg).eval().requires_grad_(False)


def _paired(native: Callable[[], Any], wrapped: Callable[[], Any], repeats: int, warmup: int) -> dict[str, Any]:
    for _ in range(warmup):
        native()
        wrapped()
    ms: dict[str, list[float]] = {"native": [], "transformers_decoder": []}
    for r in range(repeats):
        order = [("native", native), ("transformers_decoder", wrapped)]
        for name, f in order if r % 2 == 0 else order[::-1]:
            t0 = time.perf_counter()
            f()
            ms[name].append((time.perf_counter() - t0) * 1e3)
    ratios = [a / b for a, b in zip(ms["transformers_decoder"], ms["native"], strict=True)]
    return {
        "native_ms_median": round(statistics.median(ms["native"]), 2),
        "transformers_decoder_ms_median": round(statistics.median(ms["transformers_decoder"]), 2),
        "ratio_median": round(statistics.median(ratios), 4),
        "ratio_ci95": [round(x, 4) for x in median_interval(ratios)],
        "ratios": [round(x, 4) for x in ratios],
    }


def run(out: str, smoke: bool = False, repeats: int | None = None) -> dict[str, Any]:
    """Run both cases and write the JSON document to ``out``; returns it."""
    import transformers

    from cacheaug_engine.augment import CacheAugmentationObjective, Coprocessor
    from cacheaug_engine.models import Decoder, DecoderConfig, TransformersDecoder
    from cacheaug_engine.models.hf import hf_to_ours

    repeats = repeats or (2 if smoke else 5)
    cfg = (DecoderConfig(vocab_size=512, hidden_size=96, intermediate_size=128, num_layers=2, num_heads=6,
                         num_kv_heads=2, head_dim=16) if smoke else DecoderConfig())
    torch.manual_seed(0)
    hf = _hf_llama(cfg)
    state = {hf_to_ours(k, cfg): v for k, v in hf.state_dict().items()}
    native = Decoder.from_weights(cfg, {k: v for k, v in state.items() if k is not None})
    wrapped = TransformersDecoder(hf)
    gen = torch.Generator().manual_seed(0)
    t = 64 if smoke else 256
    ids = torch.randint(0, cfg.vocab_size, (1, t), generator=gen)
    cases = []

    def prefill(dec: Any) -> Callable[[], Any]:
        def f() -> Any:
            with torch.no_grad():
                return dec.prefill(ids)
        return f

    with torch.no_grad():
        gap = float((native.prefill(ids)[0] - wrapped.prefill(ids)[0]).abs().max())
    cases.append({"case": "prefill", "T": t, "B": 1, "max_abs_logit_diff": gap,
                  **_paired(prefill(native), prefill(wrapped), repeats, 1)})
    print("prefill", cases[-1]["ratio_median"], flush=True)

    n, nl, na, rank = (2, 2, 4, 4) if smoke else (4, 8, 16, 32)
    p = torch.linspace(8, t - na, n).round().long().view(1, n)

    def step(dec: Any) -> Callable[[], Any]:
        obj = CacheAugmentationObjective(dec, Coprocessor(dec, nl, lora_rank=rank, seed=0), ahead=na)
        opt = torch.optim.AdamW([q for q in obj.parameters() if q.requires_grad], lr=1e-4)

        def f() -> Any:
            out = obj(ids, positions=p)
            out.loss.backward()
            opt.step()
            opt.zero_grad()
            return out.loss
        return f

    cases.append({"case": "train_step", "T": t, "B": 1, "N": n, "N_L": nl, "N_A": na, "lora_rank": rank,
                  **_paired(step(native), step(wrapped), repeats, 1)})
    doc = {
        "bench": "transformers_decoder_vs_native", "device": "cpu", "cpu": platform.processor() or platform.machine(),
        "threads": torch.get_num_threads(), "torch": torch.__version__, "transformers": transformers.__version__,
        "smoke": smoke, "dtype": "float32", "repeats": repeats,
        "model": "SmolLM2-135M config, random weights" if not smoke else "tiny llama config", "cases": cases,
        "note": "ratio = transformers_decoder_ms / native_ms per repeat; > 1: the wrapper is slower",
    }
    Path(out).parent.mkdir(parents=True, exist_ok=True)
    Path(out).write_text(json.dumps(doc, indent=2) + "\n")
    return doc


def main() -> None:
    """Command line: --out FILE [--smoke] [--repeats N]."""
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--out", default="bench/results/transformers_decoder_cpu.json")
    ap.add_argument("--smoke", action="store_true")
    ap.add_argument("--repeats", type=int)
    a = ap.parse_args()
    doc = run(a.out, smoke=a.smoke, repeats=a.repeats)
    for c in doc["cases"]:
        print(c["case"], c["native_ms_median"], c["transformers_decoder_ms_median"], c["ratio_median"], c["ratio_ci95"])


if __name__ == "__main__":
    main()
