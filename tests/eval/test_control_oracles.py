"""Every number of the controlled evaluation against an independent plain loop (issue 28).

``run_controls`` / ``evaluate_controls`` report, per held-out sequence, the mean CE per position of
the decoder alone, the coprocessor, and the pause, shuffled and mean controls. Here each of them is
recomputed by ``control_oracle`` (one causal pass per point, latents formed by hand) and compared.
The pause table and the coprocessor carry scales other than 1, the pause control uses another
N_L and placement than the coprocessor, so a control scored without its scale, on the wrong
latents or on the wrong layout gives other numbers. float64 decoder: differences are rounding.
"""

from __future__ import annotations

import math

import pytest
import torch
from control_oracle import copro_latents, decoder_ce, eval_points, pause_latents, per_sequence_mean, point_ce
from model_fixtures import tiny_decoder

from cacheaug_engine.augment.coprocessor import Coprocessor
from cacheaug_engine.augment.objective import CacheAugmentationObjective
from cacheaug_engine.eval.evaluator import evaluate_controls, run_controls

T, NA = 16, 3
TOL = dict(rtol=1e-6, atol=1e-6)


def _ids(b: int, t: int, seed: int) -> torch.Tensor:
    return torch.randint(3, 256, (b, t), generator=torch.Generator().manual_seed(seed))


@pytest.fixture(scope="module")
def models():
    dec = tiny_decoder("llama", dtype=torch.float64)
    # LoRA adapters at their zero init: the coprocessor's network is the decoder (the oracle's premise)
    cop = Coprocessor(dec, 2, lora_rank=2, placement="early", seed=1)
    pause = Coprocessor(dec, 3, latents="pause", placement="paper", seed=2)
    with torch.no_grad():
        cop.log_scale.copy_(torch.tensor([0.6, 1.7]).log())
        pause.soft_tokens.add_(torch.randn(pause.soft_tokens.shape, generator=torch.Generator().manual_seed(3)))
        pause.log_scale.copy_(torch.tensor([1.04, 1.22, 0.8]).log())  # the shipped tables: 1.04-1.22
    assert all(float(ad.lora_b.detach().abs().max()) == 0 for ad in cop.adapters())
    return dec, cop, pause


@torch.no_grad()
def _oracle(dec, cop, pause, held, train, groups, methods=("decoder", "pause", "coprocessor", "shuffled", "mean")):
    """{method: [n, N_A]} per-sequence mean CE; ``groups``: the evaluator's batches (the shuffle rolls
    rows within one batch: row b gets row b-1's latents, the first row the last one's)."""
    pts = eval_points(held.shape[1], NA)
    lat = {
        b: [copro_latents(dec, cop.soft_tokens, cop.log_scale, held[b], p, "early") for p in pts]
        for b in range(held.shape[0])
    }
    train_pts = eval_points(train.shape[1], NA) if "mean" in methods else []
    train_lat = [copro_latents(dec, cop.soft_tokens, cop.log_scale, r, p, "early") for r in train for p in train_pts]
    mean = torch.stack(train_lat).mean(0) if train_lat else None
    partner = {}
    for a, e in groups:
        for b in range(a, e):
            partner[b] = a + (b - a - 1) % (e - a)
    z_pause = pause_latents(pause.soft_tokens, pause.log_scale)
    rows: dict[str, list[torch.Tensor]] = {m: [] for m in methods}
    for b, row in enumerate(held):
        for m in methods:
            if m == "decoder":
                ces = [decoder_ce(dec, row, p, NA) for p in pts]
            elif m == "pause":
                ces = [point_ce(dec, row, p, z_pause, NA, "paper") for p in pts]
            else:
                src = {"coprocessor": lat[b], "shuffled": lat[partner[b]], "mean": [mean] * len(pts)}[m]
                ces = [point_ce(dec, row, p, src[k], NA, "early") for k, p in enumerate(pts)]
            rows[m].append(per_sequence_mean(ces))
    return {m: torch.stack(v) for m, v in rows.items()}


def _assert_matches(res: dict, want: dict[str, torch.Tensor], methods) -> None:
    for m in methods:
        got = torch.tensor(res["ce"][m], dtype=torch.float64)
        torch.testing.assert_close(got, want[m], **TOL, msg=lambda s, m=m: f"{m}: {s}")


def test_run_controls_every_method_matches_the_plain_loop(models):
    """run_controls (mean table from the training sample, one batch): all five methods, per sequence and
    position, equal the oracle; the methods really differ (each comparison can fail)."""
    dec, cop, pause = models
    held, train = _ids(4, T, seed=10), _ids(3, T, seed=11)
    obj = CacheAugmentationObjective(dec, cop, ahead=NA)
    res, table = run_controls(obj, held, train, pause=pause, batch_size=4)
    assert res["methods"] == ["decoder", "pause", "coprocessor", "shuffled", "mean"]
    assert res["points_per_sequence"] == len(eval_points(T, NA)) and res["num_sequences"] == 4
    want = _oracle(dec, cop, pause, held, train, groups=[(0, 4)])
    _assert_matches(res, want, res["methods"])
    # no two methods give the same numbers here, so a control scored as another one is caught
    names = list(want)
    for i, a in enumerate(names):
        for b in names[i + 1 :]:
            assert (want[a] - want[b]).abs().max() > 1e-3, (a, b)
    # the table's perplexities are exp of those means (per position, then the mean row)
    for m in names:
        per_pos = want[m].mean(0).tolist()
        assert table["ppl"][m][:NA] == pytest.approx([math.exp(x) for x in per_pos], rel=1e-6)
        assert table["ppl"][m][NA] == pytest.approx(math.exp(sum(per_pos) / NA), rel=1e-6)


def test_shuffled_rolls_within_each_batch(models):
    """batch_size 2 over 5 sequences: batches [0, 2) and [2, 5) (a lone last row is merged); the
    shuffled control of row b uses row b-1's latents within its batch, never its own."""
    dec, cop, pause = models
    held = _ids(5, T, seed=12)
    obj = CacheAugmentationObjective(dec, cop, ahead=NA)
    res = evaluate_controls(obj, held, pause=None, mean_table=None, batch_size=2)
    assert res["methods"] == ["decoder", "coprocessor", "shuffled"]
    want = _oracle(dec, cop, pause, held, held[:0], [(0, 2), (2, 5)], methods=("decoder", "coprocessor", "shuffled"))
    _assert_matches(res, want, ["decoder", "coprocessor", "shuffled"])


def test_pause_alone_uses_its_own_scale_and_layout(models):
    """A pause table as the objective's own coprocessor (scored alone: its latents read no cache)."""
    dec, _, pause = models
    held = _ids(3, T, seed=13)
    res, _ = run_controls(CacheAugmentationObjective(dec, pause, ahead=NA), held, held[:0])
    assert res["methods"] == ["decoder", "coprocessor"]
    z = pause_latents(pause.soft_tokens, pause.log_scale)
    with torch.no_grad():
        want = torch.stack(
            [per_sequence_mean([point_ce(dec, row, p, z, NA, "paper") for p in eval_points(T, NA)]) for row in held]
        )
    torch.testing.assert_close(torch.tensor(res["ce"]["coprocessor"], dtype=torch.float64), want, **TOL)
