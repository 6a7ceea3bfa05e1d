"""End-to-end benchmarks: the training step and decoding (issue 7, item 4).

train (op "train_step"): one optimizer step of CacheAugmentationObjective (forward,
backward, AdamW step) at N positions per sequence, per attention backend, vs
peer:naive_loop - one objective call per position (the prefill repeated each time, as
when every training example carries one augmentation point). Reported: ms/step,
tokens/s (B*T sequence tokens per step; targets/s = B*N*N_A in extra), peak memory.
Models: SmolLM2-135M and Gemma-2-2B shapes with random weights (speed does not depend
on the weights; nothing is downloaded).

decode (op "decode_e2e"): greedy tokens/s after a prefill of T tokens, without latents
and with N_L latents computed by the coprocessor and appended (latent time included);
op "generate_n": n samples over one prompt through cacheaug_engine.generation when it
exists (cascade_decode over the shared prompt cache), else recorded unavailable.
"""

from __future__ import annotations

import contextlib
import inspect
from collections.abc import Callable, Iterator
from typing import Any

import torch

from .records import BenchContext, Unavailable, Work

GEMMA2_2B_HF = {
    "model_type": "gemma2", "vocab_size": 256000, "hidden_size": 2304, "intermediate_size": 9216,
    "num_hidden_layers": 26, "num_attention_heads": 8, "num_key_value_heads": 4, "head_dim": 256,
    "rms_norm_eps": 1e-6, "rope_theta": 10000.0, "max_position_embeddings": 8192,
    "hidden_activation": "gelu_pytorch_tanh", "attn_logit_softcapping": 50.0, "final_logit_softcapping": 30.0,
    "query_pre_attn_scalar": 256, "sliding_window": 4096,
}


def _import_stack() -> tuple[Any, Any, Any, Any]:
    try:
        from cacheaug_engine.augment.coprocessor import Coprocessor
        from cacheaug_engine.augment.objective import CacheAugmentationObjective
        from cacheaug_engine.models import Decoder, DecoderConfig
    except Exception as exc:  # noqa: BLE001
        raise Unavailable(f"models/augment do not import yet: {type(exc).__name__}: {exc}") from exc
    return Decoder, DecoderConfig, Coprocessor, CacheAugmentationObjective


def model_config(name: str, smoke: bool) -> Any:
    _, DecoderConfig, _, _ = _import_stack()
    if name == "smollm2-135m":
        if smoke:
            return DecoderConfig(vocab_size=512, hidden_size=64, intermediate_size=128, num_layers=2,
                                 num_heads=6, num_kv_heads=2, head_dim=16)
        return DecoderConfig()  # defaults are SmolLM2-135M
    if name == "gemma2-2b":
        hf = dict(GEMMA2_2B_HF)
        if smoke:
            hf.update(vocab_size=512, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                      num_attention_heads=4, num_key_value_heads=2, head_dim=16, sliding_window=24)
        return DecoderConfig.from_hf(hf)
    raise ValueError(name)


def train_cases(smoke: bool) -> list[dict[str, Any]]:
    """model, B, T, N (positions per sequence), N_L, N_A, LoRA rank."""
    if smoke:
        return [{"model": "smollm2-135m", "B": 1, "T": 48, "N": 4, "N_L": 4, "N_A": 4, "lora": 4}]
    return [{"model": "smollm2-135m", "B": 8, "T": 2048, "N": 64, "N_L": 16, "N_A": 16, "lora": 32},
            {"model": "gemma2-2b", "B": 2, "T": 2048, "N": 64, "N_L": 16, "N_A": 16, "lora": 32}]


def _set_backend(module: torch.nn.Module, backend: str | None) -> None:
    for m in module.modules():
        if hasattr(m, "attn_backend"):
            m.attn_backend = backend


@contextlib.contextmanager
def _timer_override(ctx: BenchContext, warmup: int, repeats: int) -> Iterator[None]:
    old = (ctx.timer.warmup, ctx.timer.repeats)
    ctx.timer.warmup, ctx.timer.repeats = min(old[0], warmup), min(old[1], repeats)
    try:
        yield
    finally:
        ctx.timer.warmup, ctx.timer.repeats = old


def _build(case: dict[str, Any], device: torch.device, dtype: torch.dtype, smoke: bool):
    Decoder, _, Coprocessor, Objective = _import_stack()
    cfg = model_config(case["model"], smoke)
    dec = Decoder.from_config(cfg, dtype=dtype, seed=0).to(device)
    cop = Coprocessor(dec, case["N_L"], lora_rank=case["lora"]).to(device)
    obj = Objective(dec, cop, ahead=case["N_A"], num_positions=case["N"])
    g = torch.Generator().manual_seed(0)
    ids = torch.randint(3, cfg.vocab_size, (case["B"], case["T"]), generator=g).to(device)
    hi = case["T"] - case["N_A"]
    pos = torch.stack([torch.randperm(hi, generator=g)[: case["N"]].sort().values + 1
                       for _ in range(case["B"])])
    return dec, cop, obj, ids, pos.to(device)


TRAIN_NAMES = ("default", "triton", "flex", "torch", "peer:naive_loop")


def recipe_cases(smoke: bool) -> list[dict[str, Any]]:
    """The default training recipe's shapes (TrainConfig's defaults on SmolLM2-135M), one case.

    Random weights: the shipped GGUF does not travel to a bare benchmark machine, and speed
    does not depend on the weights. Smoke: the same recipe on the tiny smoke decoder.
    """
    from cacheaug_engine.train.config import TrainConfig

    d = TrainConfig()
    return [{"model": "smollm2-135m", "B": d.batch_size, "T": d.seq_len, "N": d.positions, "N_L": d.num_latents,
             "N_A": d.ahead, "lora": d.lora_rank, "recipe": "default"}] if not smoke else [
        {"model": "smollm2-135m", "B": 2, "T": 48, "N": 4, "N_L": 4, "N_A": 4, "lora": 4, "recipe": "default"}]


def run_train(ctx: BenchContext, dtype: torch.dtype, smoke: bool = False,
              cases: list[dict[str, Any]] | None = None, names: tuple[str, ...] = TRAIN_NAMES) -> None:
    """train_step records for ``cases`` (default: train_cases(smoke)) and each of ``names``."""
    cases = train_cases(smoke) if cases is None else cases
    names = list(names)
    ctx.start_section("train_step", len(cases) * len(names))
    for case in cases:
        shape = dict(case)
        for name in names:
            def prepare(name: str = name, case: dict[str, Any] = case):
                dec, cop, obj, ids, pos = _build(case, ctx.device, dtype, smoke)
                if name in ("triton", "flex", "torch"):
                    from cacheaug_engine.ops.backends import backend_reason

                    reason = backend_reason(name, ctx.device)
                    if reason is not None:
                        raise Unavailable(reason)
                    _set_backend(obj, name)
                params = [p for p in obj.parameters() if p.requires_grad]
                opt = torch.optim.AdamW(params, lr=1e-4)
                n = pos.shape[1]

                def step() -> None:
                    if name == "peer:naive_loop":
                        for k in range(n):
                            (obj(ids, pos[:, k:k + 1], baseline=False).loss / n).backward()
                    else:
                        obj(ids, pos, baseline=False).loss.backward()
                    opt.step()

                def setup() -> None:
                    opt.zero_grad(set_to_none=True)

                b, t = ids.shape
                return step, setup, Work(tokens=float(b * t))

            note = "one objective call per position (prefill repeated)" if name == "peer:naive_loop" else None
            if name == "default":
                note = "backend chosen by dispatch (triton on CUDA, torch on the CPU)"
            with _timer_override(ctx, warmup=1, repeats=3 if not smoke else 1):
                rec = ctx.measure("train_step", name, shape, dtype, prepare, note=note)
            if rec.ms:
                rec.extra["targets_per_s"] = case["B"] * case["N"] * case["N_A"] / (rec.ms * 1e-3)
    ctx.close_section()


def decode_cases(smoke: bool) -> list[dict[str, Any]]:
    if smoke:
        return [{"model": "smollm2-135m", "B": 1, "T": 32, "G": 4, "N_L": 4, "lora": 4}]
    return [{"model": "smollm2-135m", "B": 1, "T": 4096, "G": 64, "N_L": 16, "lora": 32},
            {"model": "smollm2-135m", "B": 16, "T": 4096, "G": 64, "N_L": 16, "lora": 32},
            {"model": "gemma2-2b", "B": 1, "T": 4096, "G": 32, "N_L": 16, "lora": 32}]


def _generate_fn() -> Callable[..., Any]:
    try:
        import cacheaug_engine.generation as gen_mod
    except Exception as exc:  # noqa: BLE001
        raise Unavailable(f"cacheaug_engine.generation does not import: {type(exc).__name__}: {exc}") from exc
    for name in ("generate", "generate_n", "sample"):
        fn = getattr(gen_mod, name, None)
        if callable(fn):
            return fn
    raise Unavailable("cacheaug_engine.generation has no generate()/generate_n()/sample() function")


def _call_generate(fn: Callable[..., Any], dec: Any, cop: Any, ids: torch.Tensor, g: int, n: int) -> Any:
    params = inspect.signature(fn).parameters
    kw: dict[str, Any] = {}
    pairs = (("max_new_tokens", g), ("num_samples", n), ("n", n), ("coprocessor", cop), ("temperature", 1.0))
    for key, val in pairs:
        if key == "coprocessor" and val is None:
            continue
        if key in params:
            kw[key] = val
    if "max_new_tokens" not in kw or not ({"num_samples", "n"} & kw.keys()):
        raise Unavailable(f"unrecognised generate signature {inspect.signature(fn)}")
    return fn(dec, ids, **kw)


def run_generate(ctx: BenchContext, dtype: torch.dtype, smoke: bool = False,
                 cases: list[dict[str, Any]] | None = None) -> None:
    """decode_e2e and generate_n records for ``cases`` (default: decode_cases(smoke))."""
    cases = decode_cases(smoke) if cases is None else cases
    names = ["no_latents", "with_latents"]
    n_samples = 4 if smoke else 16
    ctx.start_section("decode_e2e", len(cases) * len(names) + 2)
    for case in cases:
        for name in names:
            def prepare(name: str = name, case: dict[str, Any] = case):
                Decoder, _, Coprocessor, _ = _import_stack()
                cfg = model_config(case["model"], smoke)
                dec = Decoder.from_config(cfg, dtype=dtype, seed=0).to(ctx.device)
                cop = Coprocessor(dec, case["N_L"], lora_rank=case["lora"]).to(ctx.device)
                ids = torch.randint(3, cfg.vocab_size, (case["B"], case["T"]),
                                    generator=torch.Generator().manual_seed(0)).to(ctx.device)
                state: dict[str, Any] = {}
                cap = case["T"] + case["N_L"] + case["G"] + 1

                def setup() -> None:
                    with torch.no_grad():
                        logits, cache = dec.prefill(ids, capacity=cap)
                    state["cache"], state["tok"] = cache, logits[:, -1].argmax(-1)

                @torch.no_grad()
                def run() -> None:
                    cache, tok = state["cache"], state["tok"]
                    if name == "with_latents":
                        pos = torch.full((case["B"], 1), case["T"], dtype=torch.long, device=ctx.device)
                        z = cop.latents_at(cache, pos)[:, 0]
                        tok = dec.extend(inputs_embeds=z.to(dec.dtype), cache=cache)[:, -1].argmax(-1)
                    for _ in range(case["G"]):
                        tok = dec.decode_step(tok, cache).argmax(-1)

                return run, setup, Work(tokens=float(case["B"] * case["G"]))

            with _timer_override(ctx, warmup=1, repeats=3):
                ctx.measure("decode_e2e", name, dict(case), dtype, prepare,
                            note="latent computation + append included" if name == "with_latents" else None)
    # n samples over one prompt (cascade_decode over the shared prompt cache)
    case = dict(cases[0], B=1, n=n_samples)

    def prepare_n(augmented: bool):
        fn = _generate_fn()
        Decoder, _, Coprocessor, _ = _import_stack()
        cfg = model_config(case["model"], smoke)
        dec = Decoder.from_config(cfg, dtype=dtype, seed=0).to(ctx.device)
        cop = Coprocessor(dec, case["N_L"], lora_rank=case["lora"]).to(ctx.device)
        ids = torch.randint(3, cfg.vocab_size, (1, case["T"]), generator=torch.Generator().manual_seed(0))
        ids = ids.to(ctx.device)
        use = cop if augmented else None
        return (lambda: _call_generate(fn, dec, use, ids, case["G"], n_samples)), None, \
            Work(tokens=float(n_samples * case["G"]))

    with _timer_override(ctx, warmup=1, repeats=3):
        ctx.measure("generate_n", "with_latents", case, dtype, lambda: prepare_n(True),
                    note="prefill + latents + n sampled continuations over the shared cache")
        ctx.measure("generate_n", "no_latents", case, dtype, lambda: prepare_n(False),
                    note="prefill + n sampled continuations over the shared cache")
    ctx.close_section()

