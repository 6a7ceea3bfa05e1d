"""``--compile``: the decoder's element-wise regions under torch.compile give the eager objective's
loss and gradients, really run compiled, and are refused with a reason where they cannot run."""

from __future__ import annotations

import pytest
import torch
from model_fixtures import tiny_decoder
from test_train import _cfg, corpus  # noqa: F401  (the module-scoped corpus fixture)

from cacheaug_engine.augment.coprocessor import Coprocessor, CoprocessorConfig
from cacheaug_engine.augment.objective import CacheAugmentationObjective
from cacheaug_engine.models import compiled as compiled_mod
from cacheaug_engine.models.compiled import check_compilable, compile_regions
from cacheaug_engine.train.preflight import check_run_inputs
from cacheaug_engine.train.trainer import Trainer


def _objective(arch: str) -> CacheAugmentationObjective:
    dec = tiny_decoder(arch)
    cop = Coprocessor(dec, config=CoprocessorConfig(num_latents=3, lora_rank=2), seed=1)
    return CacheAugmentationObjective(dec, cop, ahead=3, num_positions=2, min_prefix=2)


def _loss_and_grads(obj: CacheAugmentationObjective, ids: torch.Tensor, pos: torch.Tensor):
    obj.zero_grad(set_to_none=True)
    loss = obj(ids, pos).loss
    loss.backward()
    return loss.detach(), {n: p.grad.clone() for n, p in obj.coprocessor.named_parameters() if p.grad is not None}


@pytest.mark.parametrize("arch", ["llama", "gemma2"])  # SiLU and RMSNorm; GELU-tanh and the (1 + w) norm
def test_compiled_regions_match_eager_and_really_compile(arch):
    obj = _objective(arch)
    g = torch.Generator().manual_seed(0)
    ids = torch.randint(0, obj.decoder.cfg.vocab_size, (2, 17), generator=g)
    pos = torch.tensor([[4, 9], [3, 11]])
    want_loss, want = _loss_and_grads(obj, ids, pos)
    n = compile_regions(obj)
    # every layer's two norms, attention (RoPE) and MLP, plus the final norm (shared by the coprocessor)
    assert n >= 4 * obj.decoder.cfg.num_layers + 1
    torch._dynamo.utils.counters.clear()
    got_loss, got = _loss_and_grads(obj, ids, pos)
    assert sum(torch._dynamo.utils.counters["frames"].values()) > 0, "nothing ran under torch.compile"
    assert not torch.equal(got_loss, torch.zeros(())) and want.keys() == got.keys() and want
    torch.testing.assert_close(got_loss, want_loss, rtol=1e-5, atol=1e-6)
    for k in want:  # fp32 both ways: only summation order differs
        torch.testing.assert_close(got[k], want[k], rtol=1e-4, atol=1e-6, msg=k)
    assert compile_regions(obj, on=False) == n
    assert not any(getattr(m, "compiled", False) for m in obj.modules())


def test_training_with_compile_follows_the_eager_loss_curve(tmp_path, corpus):  # noqa: F811
    rows = {}
    for on in (False, True):
        t = Trainer(_cfg(tmp_path / str(on), compile=on), decoder=tiny_decoder("llama"), corpus=corpus,
                    log=lambda s: None)
        assert any(getattr(m, "compiled", False) for m in t.objective.modules()) == on
        rows[on] = [t.step()["loss"] for _ in range(3)]
    assert rows[True] == pytest.approx(rows[False], rel=1e-4)


def test_compile_of_a_transformers_decoder_is_refused_before_loading(tmp_path):
    cfg = _cfg(tmp_path, compile=True, decoder_impl="transformers", model=str(tmp_path / "no-such-model"))
    with pytest.raises(ValueError, match="--compile.*transformers"):
        check_run_inputs(cfg)


def test_a_module_without_regions_reports_none():
    assert compile_regions(torch.nn.Sequential(torch.nn.Linear(2, 2))) == 0


def test_missing_cpp_compiler_is_an_error_that_says_so(monkeypatch):
    from torch._inductor import cpp_builder

    def none(*a, **k):
        raise RuntimeError("no g++ here")

    monkeypatch.setattr(cpp_builder, "get_cpp_compiler", none)
    with pytest.raises(RuntimeError, match="--compile: .*C\\+\\+ compiler.*no g\\+\\+ here"):
        check_compilable(torch.device("cpu"))
    check_compilable(torch.device("meta"))  # nothing to build for: no error
    assert compiled_mod.compiled(compiled_mod.gated) is compiled_mod.compiled(compiled_mod.gated)  # made once
