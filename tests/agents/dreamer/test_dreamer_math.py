from __future__ import annotations

import torch

from agents.dreamer.behavior import lambda_returns
from agents.dreamer.math import (
    NUM_BINS,
    free_bits_kl,
    sample_straight_through,
    symexp,
    symlog,
    symlog_bins,
    two_hot,
    two_hot_loss,
    unimix_logits,
)


def test_symexp_inverts_symlog() -> None:
    x = torch.tensor([-1e6, -123.4, -1.0, -1e-3, 0.0, 1e-3, 0.5, 7.0, 1e6], dtype=torch.float64)
    assert torch.allclose(symexp(symlog(x)), x, rtol=1e-12)
    assert torch.equal(torch.sign(symlog(x)), torch.sign(x))


def test_two_hot_round_trips_and_weights_two_neighbouring_bins() -> None:
    bins = symlog_bins().double()
    assert bins.shape == (NUM_BINS,)
    y = torch.tensor([[-5000.0, -3.3, 0.0], [0.2, 17.0, 1e5]], dtype=torch.float64)
    code = two_hot(symlog(y), bins)
    assert code.shape == (2, 3, NUM_BINS)
    assert torch.allclose(code.sum(-1), torch.ones(2, 3, dtype=torch.float64))
    assert int((code > 0).sum(-1).max()) <= 2
    assert torch.allclose(symexp((code * bins).sum(-1)), y, rtol=1e-9)


def test_two_hot_loss_is_smallest_at_its_target() -> None:
    bins = symlog_bins()
    logits = torch.zeros(NUM_BINS, requires_grad=True)
    opt = torch.optim.Adam([logits], lr=0.1)
    for _ in range(300):
        opt.zero_grad()
        two_hot_loss(logits, torch.tensor(42.0), bins).backward()
        opt.step()
    mean = symexp((torch.softmax(logits.detach(), -1) * bins).sum())
    assert abs(float(mean) - 42.0) < 1.0


def test_straight_through_sample_is_one_hot_and_passes_gradients() -> None:
    logits = torch.randn(5, 4, 6, requires_grad=True)
    sample = sample_straight_through(logits, torch.Generator().manual_seed(0))
    assert torch.allclose(sample.detach().sum(-1), torch.ones(5, 4))
    assert torch.allclose(sample.detach(), sample.detach().round(), atol=1e-6)  # one-hot forward values
    (sample * torch.arange(6.0)).sum().backward()
    assert logits.grad is not None and logits.grad.abs().sum() > 0


def test_unimix_keeps_every_class_possible() -> None:
    logits = unimix_logits(torch.tensor([[100.0, 0.0, -100.0, -100.0]]), 0.01)
    probs = logits.exp()
    assert torch.allclose(probs.sum(-1), torch.ones(1))
    assert float(probs.min()) >= 0.01 / 4 - 1e-7


def test_free_bits_give_no_gradient_below_the_threshold() -> None:
    post = torch.zeros(3, 4, 5, requires_grad=True)
    prior = (0.01 * torch.randn(3, 4, 5)).requires_grad_()
    dyn, rep, raw = free_bits_kl(post, prior, free=1.0)
    assert torch.all(dyn == 1.0) and torch.all(rep == 1.0) and torch.all(raw < 1.0)
    (dyn.sum() + rep.sum()).backward()
    assert post.grad is not None and prior.grad is not None
    assert post.grad.abs().sum() == 0 and prior.grad.abs().sum() == 0
    far = torch.zeros(3, 4, 5)
    far[..., 0] = 10.0
    far.requires_grad_()
    dyn, rep, _ = free_bits_kl(far, prior, free=1.0)
    assert torch.all(dyn > 1.0)
    rep.sum().backward()
    assert far.grad is not None and far.grad.abs().sum() > 0


def test_lambda_returns_match_their_two_limits() -> None:
    reward = torch.tensor([[1.0], [2.0], [3.0]])
    disc = torch.full((3, 1), 0.5)
    value = torch.tensor([[10.0], [20.0], [30.0], [40.0]])
    mc = lambda_returns(reward, disc, value, lam=1.0)
    assert torch.allclose(mc[0], torch.tensor([1 + 0.5 * 2 + 0.25 * 3 + 0.125 * 40]))
    td = lambda_returns(reward, disc, value, lam=0.0)
    assert torch.allclose(td[:, 0], reward[:, 0] + 0.5 * value[1:, 0])
