"""tools/position1_probe.py: each intervention scores what it says, checked against one plain causal pass
per point (control_oracle's construction, with the position ids written out by hand), and the history
windows average the training records they cover."""

from __future__ import annotations

import importlib.util
import json
import math
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from control_oracle import block_start, decoder_ce, eval_points, point_ce
from model_fixtures import tiny_decoder

from cacheaug_engine.augment.coprocessor import Coprocessor
from cacheaug_engine.augment.objective import CacheAugmentationObjective

ROOT = Path(__file__).resolve().parents[2]
NA, NL, T = 3, 2, 16


def _tool():
    spec = importlib.util.spec_from_file_location("position1_probe", ROOT / "tools" / "position1_probe.py")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


@pytest.fixture(scope="module")
def setup():
    dec = tiny_decoder("llama", dtype=torch.float64)
    cop = Coprocessor(dec, NL, lora_rank=2, placement="early", seed=3)  # LoRA at zero init
    with torch.no_grad():
        cop.log_scale.copy_(torch.tensor([0.8, 1.3]).log())
    ids = torch.randint(3, 256, (3, T), generator=torch.Generator().manual_seed(7))
    obj = CacheAugmentationObjective(dec, cop, ahead=NA)
    ce = _tool().probe(obj, ids, batch_size=3)
    return dec, cop, ids, ce


def _pass_ce(dec, ids_row: torch.Tensor, p: int, latents: torch.Tensor | None, positions: list[int]) -> torch.Tensor:
    """CE [N_A] of x[p : p+N_A] from one causal pass over [x[:start] ; latents ; x[start : p+N_A-1]] at the
    given position ids (early placement: start = p - 1)."""
    start = block_start(p, "early")
    row = ids_row.view(1, -1)
    parts = [dec.embed(row[:, :start])]
    if latents is not None:
        parts.append(latents.unsqueeze(0).to(dec.dtype))
    parts.append(dec.embed(row[:, start : p + NA - 1]))
    seq = torch.cat(parts, 1)
    assert seq.shape[1] == len(positions)
    logits = dec.prefill(inputs_embeds=seq, positions=torch.tensor([positions]))[0][0, -NA:]
    return F.cross_entropy(logits.double(), ids_row[p : p + NA], reduction="none")


def _latents(dec, cop, ids_row, p):
    """The coprocessor's latents at p by hand: last N_L hidden rows over [x[:p-1] ; soft tokens] x scale."""
    start = block_start(p, "early")
    seq = torch.cat([dec.embed(ids_row.view(1, -1)[:, :start]), cop.soft_tokens.detach().unsqueeze(0).double()], 1)
    hidden = dec.prefill(inputs_embeds=seq, return_hidden=True)[2][0, start:]
    return hidden.double() * cop.log_scale.detach().double().exp().unsqueeze(-1)


def _oracle(dec, ids, fn) -> torch.Tensor:
    """Per-sequence mean over the evaluator's points of fn(b, p) -> CE [N_A]: [B, N_A]."""
    pts = eval_points(T, NA)
    return torch.stack([torch.stack([fn(b, p) for p in pts]).mean(0) for b in range(ids.shape[0])])


def _close(got, want):
    torch.testing.assert_close(got.double(), want.double(), rtol=1e-6, atol=1e-7)


@torch.no_grad()
def test_variants_match_one_plain_pass_per_point(setup):
    dec, cop, ids, ce = setup
    lat = {(b, p): _latents(dec, cop, ids[b], p) for b in range(3) for p in eval_points(T, NA)}
    dec_ce = _oracle(dec, ids, lambda b, p: decoder_ce(dec, ids[b], p, NA))
    _close(ce["decoder"], dec_ce)
    _close(ce["gap 0 (decoder by the block pass)"], dec_ce)
    # no latents, the token rows at the positions they have behind N_L latents: a gap of N_L after x[:p-1]
    gap = _oracle(dec, ids, lambda b, p: _pass_ce(dec, ids[b], p, None, list(range(p - 1)) +
                                                  list(range(p - 1 + NL, p - 1 + NL + NA))))
    _close(ce[f"gap {NL} only (no latents)"], gap)
    assert float((gap - dec_ce).abs().max()) > 1e-3  # the gap changes the prediction on this model
    full = _oracle(dec, ids, lambda b, p: point_ce(dec, ids[b], p, lat[b, p], NA, "early"))
    _close(ce["coprocessor"], full)
    for a in (0.0, 0.5):
        _close(ce[f"latents x{a:g}"], _oracle(dec, ids, lambda b, p, a=a: point_ce(dec, ids[b], p, a * lat[b, p],
                                                                                   NA, "early")))
    _close(ce[f"last 1 of {NL} latents"],
           _oracle(dec, ids, lambda b, p: point_ce(dec, ids[b], p, lat[b, p][-1:], NA, "early")))
    # no shift: latents at the N_L positions before x[p-1], which keeps its own position p-1
    _close(ce["no shift (tokens keep their positions)"],
           _oracle(dec, ids, lambda b, p: _pass_ce(dec, ids[b], p, lat[b, p], list(range(p - 1)) +
                                                   list(range(p - 1 - NL, p - 1)) + list(range(p - 1, p - 1 + NA)))))
    # paper placement: the same latents (read from x[:p-1]) after x[p-1]
    _close(ce["paper placement (same latents)"],
           _oracle(dec, ids, lambda b, p: point_ce(dec, ids[b], p, lat[b, p], NA, "paper")))


def test_summary_and_history(setup, tmp_path):
    tool = _tool()
    ce = setup[3]
    rows = {r["variant"]: r for r in tool.summarize(ce, mean_upto=2)}
    assert rows["decoder"]["vs_decoder_pos1"] == [0.0, 0.0, 0.0]
    d = float((ce["coprocessor"][:, 0] - ce["decoder"][:, 0]).mean())
    assert rows["coprocessor"]["vs_decoder_pos1"][0] == pytest.approx(100 * math.expm1(d))
    hist = [{"step": i + 1, "pos1": 2.0 + i, "pos1_baseline": 2.0} for i in range(4)]
    (tmp_path / "stages.json").write_text(json.dumps({"A": {"history": hist[:2]}}))
    (tmp_path / "state.json").write_text(json.dumps({"history": hist[2:]}))
    w = tool.history_windows(tmp_path, window=3)
    assert [x["steps"] for x in w] == ["1-3", "4-4"]
    assert w[0]["pos1"] == pytest.approx(3.0) and w[1]["pos1"] == pytest.approx(5.0)


def test_needs_an_early_coprocessor():
    dec = tiny_decoder("llama", dtype=torch.float64)
    obj = CacheAugmentationObjective(dec, Coprocessor(dec, NL, lora_rank=2, placement="paper"), ahead=NA)
    with pytest.raises(ValueError, match="'early' coprocessor"):
        _tool().probe(obj, torch.randint(3, 256, (2, T)))
