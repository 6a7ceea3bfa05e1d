"""The decoder contract: augment/ and generate.py drive a decoder only through ``DecoderLike``.

A wrapper module that exposes nothing but the protocol's members (delegating to a real
Decoder) must give the objective and generation exactly the results the Decoder gives: any
reach into a private member or a layer internal would break it.
"""

from __future__ import annotations

import inspect

import pytest
import torch
from model_fixtures import tiny_decoder
from torch import nn

from cacheaug_engine.augment.coprocessor import Coprocessor
from cacheaug_engine.augment.objective import CacheAugmentationObjective
from cacheaug_engine.generation import generate
from cacheaug_engine.models import Decoder, DecoderLike

PROTOCOL_METHODS = [
    "embed",
    "logits",
    "prefill",
    "forward_blocks",
    "extend",
    "decode_step",
    "decode_step_shared",
    "decode_step_static",
    "plan_decode",
]


class OnlyTheContract(nn.Module):
    """A DecoderLike that is not a Decoder: it forwards the protocol's members, nothing else."""

    def __init__(self, inner: Decoder) -> None:
        super().__init__()
        self.inner = inner

    @property
    def cfg(self):
        return self.inner.cfg

    @property
    def dtype(self) -> torch.dtype:
        return self.inner.dtype

    @property
    def device(self) -> torch.device:
        return self.inner.device


def _forwarding(name: str):
    def method(self, *args, **kwargs):
        return getattr(self.inner, name)(*args, **kwargs)

    method.__name__ = name
    return method


for _name in PROTOCOL_METHODS:  # embed, logits, prefill, ...: each forwards to the inner Decoder
    setattr(OnlyTheContract, _name, _forwarding(_name))


def test_decoder_implements_the_protocol_with_its_signatures():
    dec = tiny_decoder("llama")
    assert isinstance(dec, DecoderLike)
    for name in PROTOCOL_METHODS:
        want = inspect.signature(getattr(DecoderLike, name))
        got = inspect.signature(getattr(Decoder, name))
        assert list(got.parameters) == list(want.parameters), name
        for p, q in zip(got.parameters.values(), want.parameters.values(), strict=True):
            assert (p.kind, p.default) == (q.kind, q.default), f"{name}({p.name})"


def test_a_plain_object_is_not_a_decoder():
    assert not isinstance(nn.Linear(2, 2), DecoderLike)
    with pytest.raises(TypeError, match="decoder: expected an nn.Module implementing"):
        Coprocessor(nn.Linear(2, 2), 2, lora_rank=2)


def _cop(dec, seed=1):
    cop = Coprocessor(dec, 3, lora_rank=2, seed=seed)
    gen = torch.Generator().manual_seed(2)
    with torch.no_grad():
        for ad in cop.adapters():
            ad.lora_b.copy_(0.05 * torch.randn(ad.lora_b.shape, generator=gen))
    return cop


def test_objective_through_the_contract_equals_the_decoder():
    dec = tiny_decoder("llama")
    wrapped = OnlyTheContract(dec)
    ids = torch.randint(3, 200, (2, 24), generator=torch.Generator().manual_seed(0))
    pos = torch.tensor([[4, 9], [6, 12]])
    outs = []
    for d in (dec, wrapped):
        obj = CacheAugmentationObjective(d, _cop(d), ahead=3)
        out = obj(ids, pos)
        out.loss.backward()
        grads = [p.grad for p in obj.coprocessor.parameters() if p.requires_grad]
        outs.append((out.loss.detach(), out.ce_base, grads))
    (la, ba, ga), (lb, bb, gb) = outs
    assert torch.equal(la, lb) and torch.equal(ba, bb)
    assert len(ga) == len(gb) and all(torch.equal(a, b) for a, b in zip(ga, gb, strict=True))


def test_generation_through_the_contract_equals_the_decoder():
    dec = tiny_decoder("llama")
    wrapped = OnlyTheContract(dec)
    prompt = torch.randint(3, 200, (1, 10), generator=torch.Generator().manual_seed(1))
    for n in (1, 3):  # one sample (decode_step) and a shared prompt cache (decode_step_shared)
        a = generate(dec, prompt, coprocessor=_cop(dec), max_new_tokens=5, num_samples=n)
        b = generate(wrapped, prompt, coprocessor=_cop(wrapped), max_new_tokens=5, num_samples=n)
        assert a.tokens == b.tokens


def test_full_copy_owns_fp32_trainable_copies_and_leaves_the_decoder_alone():
    dec = tiny_decoder("llama")
    before = {n: p.clone() for n, p in dec.named_parameters()}
    cop = Coprocessor(dec, 2, lora_rank=None)
    own = dict(cop.model.named_parameters())
    shared = dict(dec.named_parameters())
    assert list(own) == list(shared)  # same names, same order
    for name, p in own.items():
        if name.startswith("embed_tokens"):
            assert p is shared[name] and not p.requires_grad
        else:
            assert p is not shared[name] and p.requires_grad and p.dtype == torch.float32
            assert torch.equal(p, shared[name].float())
    with torch.no_grad():
        next(p for n, p in own.items() if n.endswith("q_proj.weight")).add_(1.0)
    assert all(torch.equal(p, before[n]) for n, p in dec.named_parameters())
    assert all(not p.requires_grad for p in dec.parameters())
