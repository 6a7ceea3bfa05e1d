"""The objective's loss and gradients against an independent plain loop (issue 28).

The latents' scale (pause table and coprocessor, learned, per slot, values other than 1) must reach
the loss and receive its gradient; the contrast term must equal its formula (mean CE plus
w * mean over points of relu(margin + CE(own latents) - CE(the previous row's latents))), computed
here from per-point CEs of ``control_oracle``, not with the objective's own ``score``.
"""

from __future__ import annotations

import pytest
import torch
from control_oracle import copro_latents, decoder_ce, pause_latents, point_ce
from model_fixtures import tiny_decoder

from cacheaug_engine.augment.coprocessor import Coprocessor
from cacheaug_engine.augment.objective import CacheAugmentationObjective

NA = 3
POS = torch.tensor([[2, 6, 11], [3, 8, 12], [1, 5, 9]])
TOL = dict(rtol=1e-6, atol=1e-7)


@pytest.fixture(scope="module")
def dec():
    return tiny_decoder("llama", dtype=torch.float64)


def _ids(seed: int = 0) -> torch.Tensor:
    return torch.randint(3, 256, (3, 16), generator=torch.Generator().manual_seed(seed))


def _grad_close(got: torch.Tensor, want: torch.Tensor) -> None:
    """Gradients agree to float32 rounding of the logits (relative to the largest entry)."""
    scale = float(want.abs().max())
    assert scale > 0
    torch.testing.assert_close(got.double(), want.double(), rtol=1e-4, atol=1e-5 * scale)


def _leaves(cop: Coprocessor) -> tuple[torch.Tensor, torch.Tensor]:
    return (cop.soft_tokens.detach().clone().requires_grad_(), cop.log_scale.detach().clone().requires_grad_())


def _per_point(dec, ids, latents_of, placement) -> torch.Tensor:
    """CE [B, N, N_A] with ``latents_of(b, k, p)`` at every point of POS."""
    return torch.stack([
        torch.stack([point_ce(dec, ids[b], p, latents_of(b, k, p), NA, placement) for k, p in enumerate(row)])
        for b, row in enumerate(POS.tolist())
    ])  # fmt: skip


def _pause(dec, placement="paper") -> Coprocessor:
    pause = Coprocessor(dec, 3, latents="pause", placement=placement, seed=4)
    with torch.no_grad():
        pause.soft_tokens.add_(torch.randn(pause.soft_tokens.shape, generator=torch.Generator().manual_seed(5)))
        pause.log_scale.copy_(torch.tensor([1.04, 1.22, 0.7]).log())
    return pause


def _copro(dec, placement) -> Coprocessor:
    cop = Coprocessor(dec, 2, lora_rank=2, placement=placement, seed=6)  # LoRA at zero init: network = decoder
    with torch.no_grad():
        cop.log_scale.copy_(torch.tensor([0.5, 1.9]).log())
    return cop


@pytest.mark.parametrize("placement", ["paper", "early"])
def test_pause_loss_and_scale_gradient_match_the_loop(dec, placement):
    """Pause latents = table x scale (not 1): the objective's loss, per-target CEs, baseline and the
    gradients on the table and on the log-scale equal the plain loop's."""
    pause = _pause(dec, placement)
    ids = _ids(1)
    out = CacheAugmentationObjective(dec, pause, ahead=NA)(ids, POS)
    out.loss.backward()
    soft, log_scale = _leaves(pause)
    z = pause_latents(soft, log_scale)
    ce = _per_point(dec, ids, lambda b, k, p: z, placement)
    ce.mean().backward()
    torch.testing.assert_close(out.ce_aug.double(), ce.detach(), **TOL)
    torch.testing.assert_close(out.loss.detach().double(), ce.mean().detach(), **TOL)
    base = torch.stack([torch.stack([decoder_ce(dec, ids[b], p, NA) for p in r]) for b, r in enumerate(POS.tolist())])
    torch.testing.assert_close(out.ce_base.double(), base, **TOL)
    assert float(log_scale.grad.abs().min()) > 0  # every slot's scale reaches the loss
    _grad_close(pause.log_scale.grad, log_scale.grad)
    _grad_close(pause.soft_tokens.grad, soft.grad)


@pytest.mark.parametrize("placement", ["paper", "early"])
def test_coprocessor_scale_gradient_matches_the_loop(dec, placement):
    """Coprocessor latents = hidden x scale (not 1): loss and the gradients on the soft tokens and the
    log-scale equal the plain loop's (one causal pass per point over [prefix ; soft tokens])."""
    cop = _copro(dec, placement)
    ids = _ids(2)
    out = CacheAugmentationObjective(dec, cop, ahead=NA)(ids, POS)
    out.loss.backward()
    soft, log_scale = _leaves(cop)
    ce = _per_point(dec, ids, lambda b, k, p: copro_latents(dec, soft, log_scale, ids[b], p, placement), placement)
    ce.mean().backward()
    torch.testing.assert_close(out.ce_aug.double(), ce.detach(), **TOL)
    assert float(log_scale.grad.abs().min()) > 0
    _grad_close(cop.log_scale.grad, log_scale.grad)
    _grad_close(cop.soft_tokens.grad, soft.grad)


def test_contrast_loss_matches_its_formula(dec):
    """loss = mean CE + w * mean_{b,k} relu(m + mean_i CE(own) - mean_i CE(row b-1's latents)), with the
    margin set so that some points are inside the hinge and some outside; the gradient too. In eval mode
    (or without grad) the term is off."""
    cop = _copro(dec, "early")
    ids = _ids(3)
    soft, log_scale = _leaves(cop)
    lat = [[copro_latents(dec, soft, log_scale, ids[b], p, "early") for p in row] for b, row in enumerate(POS.tolist())]
    own = _per_point(dec, ids, lambda b, k, p: lat[b][k], "early")
    other = _per_point(dec, ids, lambda b, k, p: lat[(b - 1) % 3][k], "early")
    gap = own.mean(-1) - other.mean(-1)  # [B, N]
    margin = -float(gap.detach().flatten().median()) + 1e-3  # about half the points inside the hinge
    hinge = torch.relu(gap + margin)
    assert 0 < int((hinge > 0).sum()) < hinge.numel()
    want = own.mean() + 2.0 * hinge.mean()
    want.backward()
    obj = CacheAugmentationObjective(dec, cop, ahead=NA, contrast=2.0, contrast_margin=margin)
    obj.train()
    out = obj(ids, POS)
    out.loss.backward()
    torch.testing.assert_close(out.loss.detach().double(), want.detach(), **TOL)
    _grad_close(cop.log_scale.grad, log_scale.grad)
    _grad_close(cop.soft_tokens.grad, soft.grad)
    with torch.no_grad():  # training mode without grad (e.g. a held-out eval inside training): off
        plain = obj(ids, POS)
    torch.testing.assert_close(plain.loss.double(), own.mean().detach(), **TOL)
    obj.eval()  # eval mode with grad enabled: off too (the term is training-only)
    plain = obj(ids, POS)
    torch.testing.assert_close(plain.loss.detach().double(), own.mean().detach(), **TOL)


def test_first_weight_loss_is_the_weighted_mean_of_the_loop(dec):
    """--first-weight w: loss = sum_{b,k,i} w_i CE / sum w_i over all targets, w_1 = w and w_i = 1 after,
    from the plain loop's per-point CEs; the gradient too. The per-target CEs are unchanged."""
    cop = _copro(dec, "early")
    ids = _ids(4)
    soft, log_scale = _leaves(cop)
    ce = _per_point(dec, ids, lambda b, k, p: copro_latents(dec, soft, log_scale, ids[b], p, "early"), "early")
    w = torch.tensor([5.0, 1.0, 1.0], dtype=ce.dtype)
    want = (ce * w).sum() / (w.sum() * ce.shape[0] * ce.shape[1])
    assert abs(float(want.detach()) - float(ce.detach().mean())) > 1e-4  # the weight changes the loss on these targets
    want.backward()
    out = CacheAugmentationObjective(dec, cop, ahead=NA, first_weight=5.0)(ids, POS)
    out.loss.backward()
    torch.testing.assert_close(out.loss.detach().double(), want.detach(), **TOL)
    torch.testing.assert_close(out.ce_aug.double(), ce.detach(), **TOL)
    _grad_close(cop.log_scale.grad, log_scale.grad)
    _grad_close(cop.soft_tokens.grad, soft.grad)
    for bad in (0.0, -1.0, float("nan")):
        with pytest.raises(ValueError, match="first_weight"):
            CacheAugmentationObjective(dec, cop, ahead=NA, first_weight=bad)
