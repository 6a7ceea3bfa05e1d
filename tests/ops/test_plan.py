"""Plan/run ops: one host read-back per pass, not per layer; plans reused by every layer;
capability-based dispatch; the decoder's passes trace with torch.compile(fullgraph=True)."""

from __future__ import annotations

import dataclasses
import importlib

import pytest
import torch
from model_fixtures import tiny_config, tiny_decoder
from sync_counter import SyncCounter

from cacheaug_engine import ops
from cacheaug_engine.augment.coprocessor import Coprocessor
from cacheaug_engine.augment.objective import CacheAugmentationObjective
from cacheaug_engine.models import Decoder
from cacheaug_engine.ops import reference
from cacheaug_engine.ops.backends import BackendUnavailableError, resolve_backend
from cacheaug_engine.ops.capabilities import Call, capability_reason, format_matrix

backends = importlib.import_module("cacheaug_engine.ops.backends")  # the package exports a function of that name


def _decoder(layers: int, arch: str = "llama") -> Decoder:
    cfg = tiny_config(arch)
    kinds = ("sliding", "full") * layers if arch == "gemma2" else ("full",) * layers
    cfg = dataclasses.replace(cfg, num_layers=layers, layer_types=kinds[:layers])
    return Decoder.from_config(cfg, seed=1)


def _train_step_syncs(layers: int, arch: str) -> SyncCounter:
    dec = _decoder(layers, arch)
    obj = CacheAugmentationObjective(dec, Coprocessor(dec, 2, lora_rank=2), ahead=3, num_positions=3)
    ids = torch.randint(0, 256, (2, 24), generator=torch.Generator().manual_seed(0))
    pos = obj.sample(2, 24)
    with SyncCounter() as sc:
        obj(ids, pos).loss.backward()
    return sc


@pytest.mark.parametrize("arch", ["llama", "gemma2"])
def test_training_step_syncs_do_not_depend_on_layers(arch):
    two, eight = _train_step_syncs(2, arch), _train_step_syncs(8, arch)
    assert two.count == eight.count, (two.where, eight.where)
    # positions check (1) + coprocessor block plan (1) + decoder block plan (1) + the prefill's
    # logits_at range check (1; made on host tensors only, so on a GPU it is no device sync)
    assert two.count <= 4, two.where


def test_decode_syncs_per_token_do_not_depend_on_layers():
    from cacheaug_engine.generation import generate

    counts = {}
    for layers in (2, 8):
        dec = _decoder(layers)
        prompt = torch.randint(3, 256, (1, 5), generator=torch.Generator().manual_seed(0))
        per = []
        for n in (2, 8):
            with SyncCounter() as sc:
                generate(dec, prompt, max_new_tokens=n, eos_id=2)
            per.append(sc.count)
        counts[layers] = (per[1] - per[0]) / 6
    assert counts[2] == counts[8], counts
    assert counts[2] <= 1, counts  # at most the stop check


def test_plan_runs_every_layer_without_reading_back():
    g = torch.Generator().manual_seed(0)
    b, hq, hkv, s, n, t, dh = 2, 4, 2, 3, 2, 9, 16
    lens = torch.tensor([[0, 5], [9, 2]])
    with SyncCounter() as sc:
        plan = ops.plan_segment_attention(lens, block_len=s, prefix_len=t, head_dim=dh, dtype=torch.float32)
    assert sc.count == 1 and plan.max_prefix_len == 9 and plan.backend == "torch"
    for _ in range(3):  # three "layers"
        q = torch.randn(b, hq, n * s, dh, generator=g)
        k, v = torch.randn(2, b, hkv, n * s, dh, generator=g)
        kp, vp = torch.randn(2, b, hkv, t, dh, generator=g)
        with SyncCounter() as sc:
            o = plan.run(q, k, v, kp, vp)
        assert sc.count == 0, sc.where
        torch.testing.assert_close(o, reference.segment_attention(q, k, v, kp, vp, lens, block_len=s))
    with pytest.raises(ValueError, match=r"q: dim 2"):
        plan.run(q[:, :, :5], k, v, kp, vp)


def test_torch_plan_builds_its_masks_once_per_pass_and_per_window():
    """The torch backend's invisible-key mask is index data: built by the first layer's run and
    reused by the others; a layer with another window gets its own (Gemma-2)."""
    g = torch.Generator().manual_seed(1)
    b, hq, hkv, s, n, t, dh = 2, 4, 2, 3, 2, 9, 16
    lens = torch.tensor([[0, 5], [9, 2]])
    plan = ops.plan_segment_attention(lens, block_len=s, prefix_len=t, head_dim=dh, dtype=torch.float32)
    q = torch.randn(b, hq, n * s, dh, generator=g)
    k, v = torch.randn(2, b, hkv, n * s, dh, generator=g)
    kp, vp = torch.randn(2, b, hkv, t, dh, generator=g)
    plan.run(q, k, v, kp, vp)
    mask = plan.mask_cache["invisible"]
    plan.run(q, k, v, kp, vp)
    assert plan.mask_cache["invisible"] is mask
    windowed = plan.with_window(2)
    assert windowed.mask_cache == {}
    o = windowed.run(q, k, v, kp, vp)
    assert windowed.mask_cache["invisible"] is not mask and plan.mask_cache["invisible"] is mask
    want = reference.segment_attention(q, k, v, kp, vp, lens, block_len=s, window=2)
    torch.testing.assert_close(o, want)


def test_plan_checks_values_once_with_the_op_messages():
    with pytest.raises(ValueError, match=r"prefix_lens: values must lie in \[0, 4\], got min 0, max 7"):
        ops.plan_segment_attention(torch.tensor([[0, 7]]), block_len=2, prefix_len=4, head_dim=8, dtype=torch.float32)
    with pytest.raises(ValueError, match=r"prefix_lens: values must lie in \[0, lens\[b\]\]"):
        ops.plan_segment_attention(
            torch.tensor([[3], [3]]), block_len=2, prefix_len=4, head_dim=8, dtype=torch.float32,
            prefix_limit=torch.tensor([4, 2]),
        )
    with pytest.raises(ValueError, match=r"max_prefix_len: expected an int in \[0, 4\]"):
        ops.plan_segment_attention(
            torch.tensor([[0]]), block_len=2, prefix_len=4, head_dim=8, dtype=torch.float32, max_prefix_len=5
        )
    with pytest.raises(ValueError, match=r"lens: values must lie in \[0, 6\]"):
        ops.plan_decode(torch.tensor([7]), kv_capacity=6, num_q_heads=2, num_kv_heads=1, head_dim=8,
                        dtype=torch.float32)
    with pytest.raises(TypeError, match="prefix_lens: expected an int32/int64"):
        ops.plan_segment_attention(torch.zeros(1, 1), block_len=1, prefix_len=0, head_dim=8, dtype=torch.float32)


def test_bounds_a_plan_relies_on_are_checked():
    """What a plan trusts later is checked when it is made or run: a caller's max_len must fit the cache,
    a run must pass every prefix key the plan's prefix_lens reach, another window is re-checked."""
    with pytest.raises(ValueError, match=r"max_len: expected an int in \[0, 6\], got 7"):
        ops.plan_decode(torch.tensor([1]), kv_capacity=6, num_q_heads=2, num_kv_heads=1, head_dim=8,
                        dtype=torch.float32, max_len=7)  # fmt: skip
    g = torch.Generator().manual_seed(2)
    plan = ops.plan_segment_attention(torch.tensor([[0, 5]]), block_len=2, prefix_len=9, head_dim=8,
                                      dtype=torch.float32)  # fmt: skip
    q, k, v = torch.randn(3, 1, 2, 4, 8, generator=g)
    kp, vp = torch.randn(2, 1, 2, 9, 8, generator=g)
    with pytest.raises(ValueError, match="k_prefix: 4 keys, but the plan has prefix_lens up to 5"):
        plan.run(q, k[:, :1], v[:, :1], kp[:, :1, :4], vp[:, :1, :4])
    torch.testing.assert_close(plan.run(q, k[:, :1], v[:, :1], kp[:, :1, :5], vp[:, :1, :5]),
                               plan.run(q, k[:, :1], v[:, :1], kp[:, :1], vp[:, :1]))  # fmt: skip
    with pytest.raises(ValueError, match="window: expected None or an int >= 1, got 0"):
        plan.with_window(0)


def test_decode_plan_matches_op_and_is_reused_across_steps():
    g = torch.Generator().manual_seed(1)
    q = torch.randn(3, 4, 8, generator=g)
    k, v = torch.randn(2, 3, 2, 10, 8, generator=g)
    lens = torch.tensor([1, 10, 4])
    with SyncCounter() as sc:
        plan = ops.plan_decode(lens, kv_capacity=10, num_q_heads=4, num_kv_heads=2, head_dim=8,
                               dtype=torch.float32, max_len=10)
        o = plan.run(q, k, v)
        o2 = plan.with_lens(lens - 1).run(q, k, v)
    assert sc.count == 0, sc.where
    torch.testing.assert_close(o, ops.decode_attention(q, k, v, lens))
    torch.testing.assert_close(o2, ops.decode_attention(q, k, v, lens - 1))
    with pytest.raises(ValueError, match="exceed the plan's kv_capacity"):
        plan.run(q, torch.randn(3, 2, 11, 8), torch.randn(3, 2, 11, 8))


def test_capabilities_explain_and_skip():
    cpu = Call("segment_attention", "cpu", torch.float64, 64, ("backward",))
    assert capability_reason("torch", cpu) is None
    assert "float64" in capability_reason("triton", cpu)
    assert "forward-only on cpu" in capability_reason("flex", Call("segment_attention", "cpu", torch.float32, 64,
                                                                   ("backward",)))
    assert "head dims (64, 128, 256)" in capability_reason("cuda", Call("decode_attention", "cuda", torch.float16, 80))
    assert "no cuda backend" in capability_reason("cuda", Call("segment_attention", "cuda", torch.float16, 64))
    assert "decode_attention" in format_matrix() and "backward" in format_matrix()


def test_auto_selection_skips_backends_that_cannot_run_and_caches(monkeypatch):
    # Pretend every backend is installed and a GPU is present: only capabilities decide.
    monkeypatch.setattr(backends, "backend_reason", lambda name, device=None: None)
    monkeypatch.setattr(backends, "_AUTO", {})
    cuda = torch.device("cuda")
    pick = resolve_backend
    assert pick("decode_attention", None, cuda, dtype=torch.float16, head_dim=64) == "cuda"
    assert pick("decode_attention", None, cuda, dtype=torch.float16, head_dim=80) == "triton"  # cuda: no Dh 80
    assert pick("decode_attention", None, cuda, dtype=torch.float64, head_dim=64) == "torch"
    assert pick("segment_attention", None, cuda, dtype=torch.bfloat16, head_dim=512) == "flex"  # triton <= 256
    assert ("decode_attention", "cuda", torch.float16, 80, ()) in backends._AUTO
    with pytest.raises(BackendUnavailableError, match=r"backend='cuda' for decode_attention is unavailable: .*80"):
        pick("decode_attention", "cuda", cuda, dtype=torch.float16, head_dim=80)


def test_decoder_passes_compile_fullgraph():
    """The block pass and the decode step trace into one graph each (no graph breaks: no host
    reads, no data-dependent Python). backend="eager" keeps the test fast on 2 cores."""
    torch._dynamo.reset()
    dec = tiny_decoder("gemma2")  # sliding + full layers, softcaps
    ids = torch.randint(0, 256, (2, 12), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        cache = dec.prefill(ids, capacity=20)[1]
    emb = torch.randn(2, 6, 128)
    pos = torch.arange(6).view(1, 6).expand(2, 6) + 4
    pl = torch.tensor([[4, 7], [2, 9]])
    blocks = torch.compile(lambda e, p, lens: dec.forward_blocks(e, p, cache, lens, 3), fullgraph=True,
                           backend="eager")
    torch.testing.assert_close(blocks(emb, pos, pl), dec.forward_blocks(emb, pos, cache, pl, 3))
    step = torch.compile(lambda i, c: dec.decode_step(i, c), fullgraph=True, backend="eager")
    c1, c2 = cache.clone(), cache.clone()
    with torch.no_grad():
        torch.testing.assert_close(step(ids[:, 0], c1), dec.decode_step(ids[:, 0], c2))
    assert c1.max_len == c2.max_len == 13
    torch.testing.assert_close(c1.k[0], c2.k[0])
