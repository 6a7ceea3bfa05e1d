"""Decoder self-consistency: forward vs prefill/decode/extend/forward_blocks, gradients, cache ops."""

from __future__ import annotations

import pytest
import torch
from model_fixtures import ARCHS, tiny_config, tiny_decoder

from cacheaug_engine.models import Decoder, DecoderConfig, KVCache

TOL = 1e-5


def _ids(b: int, t: int, seed: int = 0) -> torch.Tensor:
    return torch.randint(0, 256, (b, t), generator=torch.Generator().manual_seed(seed))


@pytest.mark.parametrize("arch", ARCHS)
def test_frozen_and_named(arch: str) -> None:
    m = tiny_decoder(arch)
    assert all(not p.requires_grad for p in m.parameters())
    names = {n.rsplit(".", 1)[-1] for n, mod in m.named_modules() if isinstance(mod, torch.nn.Linear)}
    assert {"q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"} <= names
    assert m.attn_backend is None
    assert m.param_count() > 0
    if m.cfg.tie_word_embeddings:
        assert m.lm_head.weight is m.embed_tokens.weight
    again = tiny_decoder(arch)
    assert torch.equal(m.layers[0].attn.q_proj.weight, again.layers[0].attn.q_proj.weight)


@pytest.mark.parametrize("arch", ARCHS)
def test_prefill_decode_extend_match_forward(arch: str) -> None:
    m = tiny_decoder(arch)
    ids = _ids(2, 21)
    full = m(ids)
    assert full.dtype == torch.float32 and full.shape == (2, 21, 256)
    logits, cache, hidden = m.prefill(ids[:, :12], return_hidden=True)
    assert hidden.shape == (2, 12, 128)
    torch.testing.assert_close(logits, full[:, :12], atol=TOL, rtol=0)
    torch.testing.assert_close(m.logits(hidden), logits, atol=TOL, rtol=0)
    assert cache.num_layers == m.cfg.num_layers and cache.lens.tolist() == [12, 12]
    assert cache.k[0].shape == (2, 2, 12, 64)
    steps = [m.decode_step(ids[:, t], cache) for t in range(12, 21)]
    torch.testing.assert_close(torch.stack(steps, 1), full[:, 12:], atol=TOL, rtol=0)
    assert cache.lens.tolist() == [21, 21]
    # extend (chunked prefill) from a shorter prompt, then decode with embeddings
    _, c2 = m.prefill(ids[:, :5])
    torch.testing.assert_close(m.extend(ids[:, 5:17], cache=c2), full[:, 5:17], atol=TOL, rtol=0)
    step = m.decode_step(None, c2, inputs_embeds=m.embed(ids[:, 17:18])[:, 0])
    torch.testing.assert_close(step, full[:, 17], atol=TOL, rtol=0)


@pytest.mark.parametrize("arch", ARCHS)
def test_ragged_decode(arch: str) -> None:
    """Requests of different lengths in one batch decode like each alone."""
    m = tiny_decoder(arch)
    a, b = _ids(1, 14, 1), _ids(1, 14, 2)
    ref_a, ref_b = m(a), m(b)
    _, ca = m.prefill(a[:, :6], capacity=20)
    _, cb = m.prefill(b[:, :10], capacity=20)
    cache = KVCache([torch.cat([x, y]) for x, y in zip(ca.k, cb.k, strict=True)],
                    [torch.cat([x, y]) for x, y in zip(ca.v, cb.v, strict=True)], torch.tensor([6, 10]), 10)
    for i in range(4):
        step = m.decode_step(torch.tensor([a[0, 6 + i], b[0, 10 + i]]), cache)
        torch.testing.assert_close(step[0], ref_a[0, 6 + i], atol=TOL, rtol=0)
        torch.testing.assert_close(step[1], ref_b[0, 10 + i], atol=TOL, rtol=0)
    assert cache.lens.tolist() == [10, 14]


@pytest.mark.parametrize("arch", ARCHS)
def test_forward_blocks_match_full_sequence(arch: str) -> None:
    """Blocks at p_k over a prefix cache == the full sequence's logits at p_k .. p_k+S-1."""
    m = tiny_decoder(arch)
    b, t, s = 2, 20, 6
    ids = _ids(b, t + s, 3)
    full = m(ids)
    _, cache = m.prefill(ids[:, :t])
    starts = [[0, 3, 11, 20], [20, 7, 0, 14]]  # p_k = 0, = T, and positions continuing the prefix
    emb = m.embed(ids)
    rows = [torch.cat([emb[bi, p:p + s] for p in starts[bi]]) for bi in range(b)]
    x = torch.stack(rows).clone().requires_grad_(True)
    pos = torch.stack([torch.cat([torch.arange(p, p + s) for p in starts[bi]]) for bi in range(b)])
    prefix_lens = torch.tensor(starts, dtype=torch.int32)
    out = m.forward_blocks(x, pos, cache, prefix_lens, s)
    ref = torch.stack([torch.cat([full[bi, p:p + s] for p in starts[bi]]) for bi in range(b)])
    torch.testing.assert_close(out, ref, atol=TOL, rtol=0)
    hidden = m.forward_blocks(x, pos, cache, prefix_lens, s, output="hidden")
    assert hidden.shape == (b, 4 * s, 128)
    torch.testing.assert_close(m.logits(hidden), out, atol=TOL, rtol=0)
    # gradients reach the input embeddings and match the full-sequence gradient of block 0 (p=0)
    out[0, :s].logsumexp(-1).sum().backward()
    assert x.grad is not None and x.grad[0, :s].abs().sum() > 0
    e = emb.detach().clone().requires_grad_(True)
    m.prefill(inputs_embeds=e)[0][0, :s].logsumexp(-1).sum().backward()
    torch.testing.assert_close(x.grad[0, :s], e.grad[0, :s], atol=TOL, rtol=1e-4)
    assert x.grad[0, s:].abs().sum() == 0  # blocks are independent


def test_forward_blocks_cache_batch_broadcast_and_errors() -> None:
    m = tiny_decoder("llama")
    ids = _ids(1, 10)
    _, cache = m.prefill(ids)
    x = torch.randn(3, 8, 128)
    pos = torch.tensor([[4, 5, 6, 7, 2, 3, 4, 5]]).expand(3, -1)
    pl = torch.tensor([[4, 2]] * 3)
    out = m.forward_blocks(x, pos, cache, pl, 4)  # cache with batch 1 shared by 3 rows
    assert out.shape == (3, 8, 256)
    with pytest.raises(ValueError, match="prefix_lens"):
        m.forward_blocks(x, pos, cache, torch.tensor([[11, 2]] * 3), 4)
    with pytest.raises(ValueError, match="block_len"):
        m.forward_blocks(x, pos, cache, pl, 3)
    with pytest.raises(ValueError, match="output"):
        m.forward_blocks(x, pos, cache, pl, 4, output="probs")
    with pytest.raises(ValueError, match="exactly one"):
        m.prefill()


def test_gemma_window_matters() -> None:
    """Sequences longer than the sliding window: masking the window changes the logits."""
    cfg = tiny_config("gemma2")
    m = Decoder.from_config(cfg)
    wide = Decoder.from_config(DecoderConfig(**{**cfg.to_dict(), "sliding_window": 1000}))
    ids = _ids(1, 24)
    assert (m(ids)[:, 8:] - wide(ids)[:, 8:]).abs().max() > 1e-4
    torch.testing.assert_close(m(ids)[:, :8], wide(ids)[:, :8], atol=TOL, rtol=0)


def test_embed_scale_and_cache_ops() -> None:
    m = tiny_decoder("gemma2")
    ids = _ids(2, 5)
    torch.testing.assert_close(m.embed(ids), m.embed_tokens(ids) * 128**0.5)
    _, cache = m.prefill(ids)
    pre = cache.prefix(3)
    assert pre.lens.tolist() == [3, 3] and pre.k[0].shape[2] == 3
    rep = cache.repeat_interleave(2)
    assert rep.batch_size == 4 and torch.equal(rep.k[1][1], cache.k[1][0])
    sel = cache.select([1])
    assert torch.equal(sel.v[0][0], cache.v[0][1])
    c = cache.clone()
    c.append([torch.ones(2, 2, 3, 64)] * c.num_layers, [torch.ones(2, 2, 3, 64)] * c.num_layers)
    assert c.lens.tolist() == [8, 8] and c.capacity >= 8 and torch.equal(c.k[0][:, :, :5], cache.k[0])


def test_bf16_runs() -> None:
    """bf16 weights, fp32 logits, the same random model. Its numbers (error at most twice transformers'
    bf16 error against float64): tests/models/test_loaders.py::test_bf16_error_within_twice_transformers
    (a bound of 0.1 on logits the softcap keeps within +-3 could not fail)."""
    m = tiny_decoder("gemma2", dtype=torch.bfloat16)
    ids = _ids(1, 9)
    out = m(ids)
    assert m.dtype == torch.bfloat16 and out.dtype == torch.float32 and torch.isfinite(out).all()
    assert torch.equal(m.embed_tokens.weight, tiny_decoder("gemma2").embed_tokens.weight.bfloat16())


def test_empty_prefill_then_decode() -> None:
    m = tiny_decoder("qwen2")
    ids = _ids(2, 6)
    logits, cache = m.prefill(ids[:, :0])
    assert logits.shape == (2, 0, 256) and cache.lens.tolist() == [0, 0]
    steps = torch.stack([m.decode_step(ids[:, t], cache) for t in range(6)], 1)
    torch.testing.assert_close(steps, m(ids), atol=TOL, rtol=0)


@pytest.mark.parametrize("arch", ["llama", "gemma2"])
def test_prefill_logits_at_rows(arch: str) -> None:
    """logits_at runs the lm_head on the chosen rows only: the same values as indexing all T rows."""
    m = tiny_decoder(arch)
    ids = _ids(2, 10)
    full, cache_full = m.prefill(ids)
    rows = torch.tensor([[9, 0, 4], [3, 3, 7]])
    some, cache = m.prefill(ids, logits_at=rows)
    assert some.shape == (2, 3, 256) and some.dtype == torch.float32
    torch.testing.assert_close(some, torch.stack([full[b, rows[b]] for b in range(2)]), atol=TOL, rtol=0)
    torch.testing.assert_close(cache.k[1], cache_full.k[1], atol=0, rtol=0)
    none, _ = m.prefill(ids, logits_at=rows[:, :0])
    assert none.shape == (2, 0, 256)
    assert m.prefill(ids[:, :0], logits_at=rows[:, :0])[0].shape == (2, 0, 256)


@pytest.mark.parametrize("bad,needle", [
    (torch.tensor([[1, 2]]), r"int32/int64 \[2, R\]"),  # batch 1, not 2
    (torch.tensor([1, 2]), r"int32/int64 \[2, R\]"),
    (torch.tensor([[0.0], [1.0]]), "int32/int64"),
    (torch.tensor([[0], [10]]), r"in \[0, 10\)"),
    (torch.tensor([[-1], [0]]), r"in \[0, 10\)"),
])
def test_prefill_logits_at_bad_input(bad: torch.Tensor, needle: str) -> None:
    with pytest.raises(ValueError, match=needle) as err:
        tiny_decoder("llama").prefill(_ids(2, 10), logits_at=bad)
    assert str(err.value).startswith("logits_at:")


@pytest.mark.parametrize("arch", ["llama", "gemma2"])
def test_attn_backend_triton_matches_torch(arch: str) -> None:
    """The model with ``attn_backend="triton"`` (the interpreter on CPU) equals the torch path."""
    import cacheaug_engine

    info = cacheaug_engine.backends().get("triton", {})
    if not info.get("available"):
        pytest.skip(f"triton backend unavailable: {info.get('reason')}")
    m = tiny_decoder(arch)
    ids = _ids(2, 20)
    ref = m(ids)
    _, cache = m.prefill(ids[:, :16])
    x = m.embed(ids[:, 12:20]).clone().requires_grad_(True)
    pos = torch.arange(12, 20).expand(2, -1)
    pl = torch.tensor([[12, 16]] * 2)
    ref_blocks = m.forward_blocks(x, pos, cache, pl, 4)
    (g_ref,) = torch.autograd.grad(ref_blocks.logsumexp(-1).sum(), x)
    torch.testing.assert_close(ref_blocks, ref[:, 12:20], atol=1e-5, rtol=0)
    ref_step = m.decode_step(ids[:, 16], cache.clone())
    m.attn_backend = "triton"
    torch.testing.assert_close(m(ids), ref, atol=1e-4, rtol=0)
    out = m.forward_blocks(x, pos, cache, pl, 4)
    torch.testing.assert_close(out, ref_blocks, atol=1e-4, rtol=0)
    (g,) = torch.autograd.grad(out.logsumexp(-1).sum(), x)
    torch.testing.assert_close(g, g_ref, atol=1e-4, rtol=1e-3)
    torch.testing.assert_close(m.decode_step(ids[:, 16], cache), ref_step, atol=1e-4, rtol=0)
