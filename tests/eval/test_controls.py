"""The controls of issue 10 are what they claim (tiny random model, CPU, seconds)."""

from __future__ import annotations

import math

import pytest
import torch
from model_fixtures import tiny_decoder

from cacheaug_engine.augment.controls import ConstantLatents, LatentStats, shuffled_latents
from cacheaug_engine.augment.coprocessor import Coprocessor
from cacheaug_engine.augment.layout import block_layout, stride_positions
from cacheaug_engine.augment.objective import CacheAugmentationObjective
from cacheaug_engine.eval.evaluator import evaluate_controls, mean_latent
from cacheaug_engine.eval.plots import plot_controls
from cacheaug_engine.eval.tables import controls_table, format_controls, paired_interval


@pytest.fixture(scope="module")
def dec():
    return tiny_decoder("llama")


def _ids(b: int, t: int, seed: int = 0) -> torch.Tensor:
    return torch.randint(3, 256, (b, t), generator=torch.Generator().manual_seed(seed))


def test_pause_table_same_latents_at_every_point(dec):
    pause = Coprocessor(dec, config=None, num_latents=3, lora_rank=4, latents="pause", placement="early")
    assert pause.model is None and pause.adapters() == []
    with torch.no_grad():
        pause.soft_tokens.add_(torch.randn_like(pause.soft_tokens))
        pause.log_scale.copy_(torch.tensor([1.04, 1.22, 0.7]).log())  # trained tables have scales != 1
    ids = _ids(3, 40)
    cache = dec.prefill(ids)[1]
    pos = torch.tensor([[5, 9, 20], [6, 17, 30], [8, 10, 11]])
    z = pause(cache, block_layout(pos, 3, 4, "early"))
    assert z.shape == (3, 3, 3, dec.cfg.hidden_size)
    ref = (pause.soft_tokens * torch.tensor([1.04, 1.22, 0.7]).view(3, 1)).detach()
    torch.testing.assert_close(z.detach(), ref.expand_as(z), rtol=1e-6, atol=0)
    # the cache cannot matter: another cache gives the same latents
    z2 = pause(dec.prefill(_ids(3, 40, seed=1))[1], block_layout(pos, 3, 4, "early"))
    assert torch.equal(z, z2)
    # it trains: the loss has a gradient into the table and only the table (+ scale)
    obj = CacheAugmentationObjective(dec, pause, ahead=4, num_positions=3)
    obj(ids).loss.backward()
    assert pause.soft_tokens.grad is not None and pause.soft_tokens.grad.abs().sum() > 0
    assert pause.log_scale.grad is not None and pause.log_scale.grad.abs().min() > 0  # each slot's scale
    assert set(pause.trainable_state()) == {"soft_tokens", "log_scale"}


def test_shuffled_uses_another_rows_cache(dec):
    cop = Coprocessor(dec, 2, lora_rank=4)
    ids = _ids(3, 32)
    pos = stride_positions(3, 32, 4, stride=4, start=4)
    lay = block_layout(pos, 2, 4, "paper")
    z = cop(dec.prefill(ids)[1], lay)
    zs = shuffled_latents(z)
    for b in range(3):
        other = ids[(b - 1) % 3 : (b - 1) % 3 + 1]
        direct = cop(dec.prefill(other)[1], block_layout(pos[:1], 2, 4, "paper"))[0]
        torch.testing.assert_close(zs[b], direct, rtol=1e-5, atol=1e-5)
        assert not torch.allclose(zs[b], z[b])  # really another cache
    with pytest.raises(ValueError, match="batch of >= 2"):
        shuffled_latents(z[:1])


def test_mean_is_the_mean(dec):
    cop = Coprocessor(dec, 2, lora_rank=4, placement="early")
    seqs = _ids(5, 24, seed=3)
    m = mean_latent(cop, dec, seqs, ahead=4, stride=4, batch_size=2)
    pos = stride_positions(5, 24, 4, stride=4, start=4)
    z = cop(dec.prefill(seqs)[1], block_layout(pos, 2, 4, "early"))
    torch.testing.assert_close(m, z.mean((0, 1)), rtol=1e-5, atol=1e-6)
    const = ConstantLatents(m, "early")
    zc = const(None, block_layout(pos, 2, 4, "early"))
    assert zc.shape == z.shape and torch.equal(zc[3, 2], m)


def test_cache_dependence_figure():
    st = LatentStats()
    st.update(torch.ones(2, 3, 2, 4) * 0.5)
    assert st.ratio() == pytest.approx(0.0, abs=1e-12)
    z = torch.randn(4, 5, 2, 8, generator=torch.Generator().manual_seed(0))
    st = LatentStats()
    st.update(z[:2])
    st.update(z[2:])
    flat = z.flatten(0, 1).double()
    direct = (flat - flat.mean(0)).pow(2).mean().sqrt() / flat.pow(2).mean().sqrt()
    assert st.ratio() == pytest.approx(float(direct), rel=1e-9)


def test_interval_arithmetic_matches_direct():
    g = torch.Generator().manual_seed(1)
    a, b = torch.randn(50, generator=g), torch.randn(50, generator=g)
    m, lo, hi = paired_interval(a, b)
    d = [float(x) - float(y) for x, y in zip(a, b, strict=True)]
    mean = sum(d) / len(d)
    sd = math.sqrt(sum((x - mean) ** 2 for x in d) / (len(d) - 1))
    assert m == pytest.approx(mean, abs=1e-12)
    assert lo == pytest.approx(mean - 1.959964 * sd / math.sqrt(len(d)), abs=1e-9)
    assert hi == pytest.approx(mean + 1.959964 * sd / math.sqrt(len(d)), abs=1e-9)
    # the table's percentages are exp(CE change) - 1 of those numbers, per position and for the mean row
    ce = torch.randn(6, 3, generator=g).abs() + 1
    res = {"ahead": 3, "ce": {"decoder": (ce + 0.1).tolist(), "coprocessor": ce.tolist()}, "cache_dependence": 0.1}
    tab = controls_table(res)
    c, lo1, hi1 = tab["change_pct"]["decoder"][-1]
    m2, l2, h2 = paired_interval(ce.double().mean(1), (ce.double() + 0.1).mean(1))
    assert (c, lo1, hi1) == pytest.approx(tuple(100 * math.expm1(x) for x in (m2, l2, h2)))
    assert tab["positions"][-1] == "mean 1-3" and c == pytest.approx(100 * math.expm1(-0.1))


def test_evaluate_controls_end_to_end(dec, tmp_path):
    cop = Coprocessor(dec, 2, lora_rank=4, placement="early")
    pause = Coprocessor(dec, 2, latents="pause", placement="early")
    obj = CacheAugmentationObjective(dec, cop, ahead=4)
    held, train = _ids(5, 32, seed=4), _ids(4, 32, seed=5)
    mean = ConstantLatents(mean_latent(cop, dec, train, ahead=4), "early")
    res = evaluate_controls(obj, held, pause=pause, mean_table=mean, batch_size=2)  # 2,2,1 -> 2,3: no lone row
    assert res["methods"] == ["decoder", "pause", "coprocessor", "shuffled", "mean"]
    assert all(len(v) == 5 and len(v[0]) == 4 for v in res["ce"].values())
    # the coprocessor's own CE agrees with the objective's forward on the same points
    pos = stride_positions(5, 32, 4, stride=4, start=4)
    out = obj(held, pos)
    torch.testing.assert_close(
        torch.tensor(res["ce"]["coprocessor"], dtype=torch.float64), out.ce_aug.double().mean(1), rtol=1e-5, atol=1e-5
    )
    torch.testing.assert_close(torch.tensor(res["ce"]["decoder"], dtype=torch.float64), out.ce_base.double().mean(1))
    assert 0 < res["cache_dependence"] < 1
    tab = controls_table(res)
    assert set(tab["change_pct"]) == {"decoder", "pause", "shuffled", "mean"}
    text = format_controls(tab, "title")
    assert "copro vs pause" in text and "mean 1-4" in text
    assert plot_controls(tab, tmp_path / "c.png").stat().st_size > 0


def test_centered_coprocessor_constant_is_the_table(dec):
    cop = Coprocessor(dec, 2, lora_rank=4, center=True)
    ids = _ids(3, 32, seed=6)
    lay = block_layout(stride_positions(3, 32, 4, stride=4, start=4), 2, 4, "paper")
    cache = dec.prefill(ids)[1]
    cop.train()
    z = cop(cache, lay)
    # training: the points' mean latent is exactly the trainable table; the first update sets the running mean
    torch.testing.assert_close(z.mean((0, 1)), cop.base_latents, rtol=1e-5, atol=1e-5)
    assert float(cop.mean_updates) == 1 and float(cop.latent_mean.abs().sum()) > 0
    cop.eval()
    torch.testing.assert_close(cop(cache, lay), z, rtol=1e-5, atol=1e-5)  # same batch: running mean = batch mean
    assert {"latent_mean", "mean_updates", "base_latents"} <= set(cop.trainable_state())


# The contrast term against its formula (per-point CEs of an independent loop, not the objective's
# own score): tests/augment/test_objective_oracles.py::test_contrast_loss_matches_its_formula.


def test_addition_task(tmp_path):
    import json

    from cacheaug_engine.data.tasks import task_documents, write_task

    docs = task_documents("addition", docs=3, per_doc=4, digits=3, seed=1)
    assert docs == task_documents("addition", docs=3, per_doc=4, digits=3, seed=1)
    for line in "\n".join(docs).splitlines():
        lhs, c = line.split("=")
        a, b = lhs.split("+")
        assert len(a) == len(b) == 3 and int(a) + int(b) == int(c)
    p = write_task(tmp_path / "t.jsonl", docs=2, per_doc=2)
    assert [json.loads(x)["text"].count("\n") for x in p.read_text().splitlines()] == [1, 1]
    with pytest.raises(ValueError, match="task must be one of"):
        task_documents("subtraction")
