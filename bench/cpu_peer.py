"""`cacheaug bench cpu`: our Decoder vs transformers' LlamaForCausalLM on the CPU, paired, one run.

Same SmolLM2-135M configuration (random weights, fp32; speed does not depend on the weights),
same threads, same process. Cases:

* ``prefill`` T in {256, 1024}: ``Decoder.prefill(ids)`` vs ``LlamaForCausalLM(ids, use_cache=True)``,
  both under no_grad, both returning logits for every position and the KV cache.
* ``train_step`` (T 256, N 4 blocks of S = N_L + N_A - 1 = 23 rows): the decoder side of one
  training step of the objective - a no-grad prefill of x with logits at the N*N_A rows the
  baseline CE reads, then N blocks over their cache prefixes with gradient to the block
  embeddings, CE loss on every block row, backward. Ours: ``prefill(logits_at=rows)`` +
  ``forward_blocks``. transformers: ``logits_to_keep=rows``, then the same blocks as
  ``inputs_embeds`` after the prefill's ``past_key_values`` with a 4-D boolean mask
  [B, 1, N*S, T + N*S] (block k sees the first p_k cache entries and itself causally) and
  explicit position_ids.
* ``generate`` (T 128, B 1 and 4, 32 new tokens): greedy decoding, prefill (logits of the last
  row only on both sides) then one ``decode_step`` / one cached forward per token.

Three variants per case: ``ours`` as shipped (the decoder's projections on oneDNN with weights
packed once, ops/frozen_linear.py), ``ours_torch_linear`` (the same decoder on torch's own
``F.linear``, i.e. MKL - the control that shows what the GEMM backend is worth) and
``transformers``. Each repeat times all three back to back (order rotating); ratios against
transformers are taken per repeat and the median is reported with a distribution-free 95%
interval (< 1: ours is faster). The machine may be shared: the pairing is what makes the
ratio trustworthy, not the absolute ms.
"""

from __future__ import annotations

import json
import math
import platform
import statistics
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F

from .timing import git_commit


def _hf_llama(cfg: Any) -> Any:
    from transformers import LlamaConfig, LlamaForCausalLM

    rope = {"rope_type": "default", "rope_theta": cfg.rope_theta}
    if cfg.rope_scaling is not None:
        rope = {**cfg.rope_scaling, "rope_theta": cfg.rope_theta}
    hf_cfg = LlamaConfig(
        vocab_size=cfg.vocab_size, hidden_size=cfg.hidden_size, intermediate_size=cfg.intermediate_size,
        num_hidden_layers=cfg.num_layers, num_attention_heads=cfg.num_heads, num_key_value_heads=cfg.num_kv_heads,
        head_dim=cfg.head_dim, rms_norm_eps=cfg.rms_norm_eps, max_position_embeddings=cfg.max_position_embeddings,
        tie_word_embeddings=cfg.tie_word_embeddings, rope_parameters=rope, attn_implementation="sdpa",
    )
    return LlamaForCausalLM(hf_cfg).eval().requires_grad_(False)


def _block_mask(prefix_lens: torch.Tensor, t: int, s: int) -> torch.Tensor:
    """Bool [B, 1, N*S, T + N*S]: row i of block k sees cache keys j < p_k and its block's keys <= i."""
    b, n = prefix_lens.shape
    rows = torch.arange(n * s)
    blk, i = rows // s, rows % s
    keys = torch.arange(t + n * s)
    in_prefix = keys.view(1, -1) < t
    local = keys - t
    same = (local.view(1, -1) // s == blk.view(-1, 1)) & (local.view(1, -1) % s <= i.view(-1, 1)) & ~in_prefix
    p = prefix_lens[:, blk]  # [B, N*S]
    prefix_ok = in_prefix.unsqueeze(0) & (keys.view(1, 1, -1) < p.unsqueeze(-1))
    return (prefix_ok | same.unsqueeze(0)).unsqueeze(1)


def median_interval(xs: list[float], level: float = 0.95) -> tuple[float, float]:
    """Distribution-free interval for the median: order statistics (k, n+1-k) with the largest k
    whose two-sided binomial(n, 1/2) tail stays <= 1 - level (at n <= 5: min and max)."""
    xs = sorted(xs)
    n = len(xs)
    k, tail = 1, 0.0
    while k < (n + 1) // 2:
        tail += math.comb(n, k - 1) / 2**n  # P(Binom < k)
        if 2 * (tail + math.comb(n, k) / 2**n) > 1 - level:
            break
        k += 1
    return xs[k - 1], xs[n - k]


def _pair(variants: dict[str, Callable[[], Any]], repeats: int, warmup: int) -> dict[str, Any]:
    """Time each variant back to back per repeat (order rotating); ratios are per repeat against
    "transformers". Keys: <variant>_ms_median, and for ours: ratio_median, ratio_ci95, ratios."""
    names = list(variants)
    for _ in range(warmup):
        for f in variants.values():
            f()
    ms: dict[str, list[float]] = {n: [] for n in names}
    for r in range(repeats):
        for name in names[r % len(names):] + names[: r % len(names)]:
            t0 = time.perf_counter()
            variants[name]()
            ms[name].append((time.perf_counter() - t0) * 1e3)
    out: dict[str, Any] = {f"{n}_ms_median": round(statistics.median(ms[n]), 2) for n in names}
    for n in names:
        if n == "transformers":
            continue
        ratios = [a / b for a, b in zip(ms[n], ms["transformers"], strict=True)]
        tag = "" if n == "ours" else f"_{n.removeprefix('ours_')}"
        out[f"ratio{tag}_median"] = round(statistics.median(ratios), 4)
        out[f"ratio{tag}_ci95"] = [round(x, 4) for x in median_interval(ratios)]
        out[f"ratios{tag}"] = [round(x, 4) for x in ratios]
    return out


def run_cpu_peer(out: str, *, smoke: bool = False, repeats: int | None = None, warmup: int | None = None,
                 threads: int | None = None) -> dict[str, Any]:
    """Run the paired cases and write the JSON document to ``out``; returns it."""
    import transformers

    from cacheaug_engine.models import Decoder, DecoderConfig
    from cacheaug_engine.models.cache import KVCache

    if threads:
        torch.set_num_threads(threads)
    repeats = repeats or (2 if smoke else 7)
    warmup = 1 if warmup is None else warmup
    if smoke:
        cfg = DecoderConfig(vocab_size=512, hidden_size=96, intermediate_size=128, num_layers=2, num_heads=6,
                            num_kv_heads=2, head_dim=16)
    else:
        cfg = DecoderConfig()  # SmolLM2-135M
    from cacheaug_engine.models.hf import hf_to_ours

    torch.manual_seed(0)
    hf = _hf_llama(cfg)
    state = {hf_to_ours(k, cfg): v for k, v in hf.state_dict().items()}
    ours_model = Decoder.from_weights(cfg, {k: v for k, v in state.items() if k is not None})  # same weights
    cases = []
    gen = torch.Generator().manual_seed(0)

    def on(backend: str, f: Callable[[], Any]) -> Callable[[], Any]:
        def run() -> Any:
            ours_model.linear_backend = backend
            return f()

        return run

    def variants(ours: Callable[[], Any], theirs: Callable[[], Any]) -> dict[str, Callable[[], Any]]:
        # ours as shipped ("auto" GEMMs), ours on torch's own F.linear, and the peer
        return {"ours": on("auto", ours), "ours_torch_linear": on("torch", ours), "transformers": theirs}

    for t in ((32, 64) if smoke else (256, 1024)):
        ids = torch.randint(0, cfg.vocab_size, (1, t), generator=gen)

        def ours(ids=ids):
            with torch.no_grad():
                return ours_model.prefill(ids)

        def theirs(ids=ids):
            with torch.no_grad():
                return hf(ids, use_cache=True)

        cases.append({"case": "prefill", "T": t, "B": 1, **_pair(variants(ours, theirs), repeats, warmup)})

    t, n, nl, na = (32, 2, 2, 4) if smoke else (256, 4, 8, 16)
    s = nl + na - 1
    ids = torch.randint(0, cfg.vocab_size, (1, t), generator=gen)
    p = torch.linspace(1, t - na, n).round().long().view(1, n)
    pos = (p.view(1, n, 1) + torch.arange(s).view(1, 1, s)).view(1, n * s)
    x0 = 0.1 * torch.randn(1, n * s, cfg.hidden_size, generator=gen)
    targets = torch.randint(0, cfg.vocab_size, (n * s,), generator=gen)
    mask = _block_mask(p, t, s)
    rows = (p.view(n, 1) + torch.arange(na).view(1, na) - 1).view(1, n * na)  # the baseline's rows

    def ours_step():
        with torch.no_grad():
            cache: KVCache = ours_model.prefill(ids, logits_at=rows)[1]
        x = x0.clone().requires_grad_()
        logits = ours_model.forward_blocks(x, pos, cache, p, s)
        F.cross_entropy(logits[0], targets).backward()

    def theirs_step():
        with torch.no_grad():
            past = hf(ids, use_cache=True, logits_to_keep=rows[0]).past_key_values
        x = x0.clone().requires_grad_()
        logits = hf(inputs_embeds=x, past_key_values=past, position_ids=pos, attention_mask=mask,
                    use_cache=False).logits
        F.cross_entropy(logits[0], targets).backward()

    # Same loss from both (up to float error): the comparison is of the same computation.
    def loss(step_logits: Callable[[], torch.Tensor]) -> float:
        return float(F.cross_entropy(step_logits()[0], targets))

    with torch.no_grad():
        ours_loss = loss(lambda: ours_model.forward_blocks(x0, pos, ours_model.prefill(ids)[1], p, s))
        hf_loss = loss(lambda: hf(inputs_embeds=x0, past_key_values=hf(ids, use_cache=True).past_key_values,
                                  position_ids=pos, attention_mask=mask, use_cache=False).logits)
    if abs(ours_loss - hf_loss) > 1e-3 * max(1.0, abs(hf_loss)):
        raise RuntimeError(f"train_step: ours and transformers disagree (loss {ours_loss} vs {hf_loss})")
    with torch.no_grad():
        gap = (ours_model.prefill(ids, logits_at=rows)[0] - hf(ids, logits_to_keep=rows[0]).logits).abs().max()
    if float(gap) > 1e-3:
        raise RuntimeError(f"train_step: the prefill logits at the baseline rows differ by {float(gap):.3g}")
    cases.append({"case": "train_step", "T": t, "B": 1, "N": n, "S": s, "loss": round(ours_loss, 5),
                  **_pair(variants(ours_step, theirs_step), repeats, warmup)})
    t, new = (16, 4) if smoke else (128, 32)
    for b in (1, 4):
        ids = torch.randint(0, cfg.vocab_size, (b, t), generator=gen)
        last = torch.full((b, 1), t - 1)

        def ours_gen(ids=ids, last=last):
            with torch.no_grad():
                logits, cache = ours_model.prefill(ids, capacity=t + new, logits_at=last)
                tok = logits[:, -1].argmax(-1)
                for _ in range(new):
                    tok = ours_model.decode_step(tok, cache).argmax(-1)

        def theirs_gen(ids=ids):
            with torch.no_grad():
                out = hf(ids, use_cache=True, logits_to_keep=1)
                past, tok = out.past_key_values, out.logits[:, -1].argmax(-1)
                for _ in range(new):
                    out = hf(tok.view(-1, 1), past_key_values=past, use_cache=True)
                    past, tok = out.past_key_values, out.logits[:, -1].argmax(-1)

        cases.append({"case": "generate", "T": t, "B": b, "new_tokens": new,
                      **_pair(variants(ours_gen, theirs_gen), repeats, warmup)})

    from cacheaug_engine.ops.frozen_linear import onednn_reason

    why = onednn_reason(x0, ours_model.lm_head.weight)
    gemm = "onednn (packed weights)" if why is None else f"torch F.linear ({why})"
    doc = {
        "bench": "cpu_vs_transformers", "device": "cpu", "cpu": platform.processor() or platform.machine(),
        "threads": torch.get_num_threads(), "torch": torch.__version__, "transformers": transformers.__version__,
        "commit": git_commit(), "smoke": smoke, "dtype": "float32",
        "model": "SmolLM2-135M config, random weights" if not smoke else "tiny llama config",
        "repeats": repeats, "warmup": warmup, "cases": cases,
        "ours_linear": gemm,
        "note": "ratio = ours_ms / transformers_ms per repeat (variants back to back); < 1 means ours is faster; "
                "ratio_torch_linear: ours with linear_backend='torch'; ci95: order-statistic interval of the median",
    }
    Path(out).parent.mkdir(parents=True, exist_ok=True)
    Path(out).write_text(json.dumps(doc, indent=2) + "\n")
    return doc
