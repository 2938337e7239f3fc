from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from agents.batched import BatchedAdam, BatchedLinear, BatchedMLP


@pytest.fixture(autouse=True)
def _seed() -> None:
    torch.manual_seed(0)


# ---------------------------------------------------------------- BatchedLinear / BatchedMLP


def test_batched_linear_equals_per_member_linear() -> None:
    layer = BatchedLinear(3, 5, 4)
    x = torch.randn(3, 7, 5)
    out = layer(x)
    assert out.shape == (3, 7, 4)
    for i in range(3):
        expected = F.linear(x[i], layer.weight[i].T, layer.bias[i, 0])
        torch.testing.assert_close(out[i], expected, rtol=0, atol=1e-6)


def test_batched_linear_initialises_like_nn_linear() -> None:
    layer = BatchedLinear(4, 16, 8)
    bound = 1 / 16**0.5
    assert layer.weight.abs().max() <= bound
    assert layer.bias.abs().max() <= bound
    assert not torch.equal(layer.weight[0], layer.weight[1])  # members start different


@pytest.mark.parametrize("member", [0, 2])
def test_member_loss_gradient_touches_only_its_own_row(member: int) -> None:
    layer = BatchedLinear(3, 5, 4)
    layer(torch.randn(3, 7, 5))[member].pow(2).sum().backward()
    for param in (layer.weight, layer.bias):
        assert param.grad is not None
        for i in range(3):
            if i == member:
                assert param.grad[i].abs().sum() > 0
            else:
                assert torch.count_nonzero(param.grad[i]) == 0


def test_mlp_member_output_ignores_other_members_inputs() -> None:
    mlp = BatchedMLP(3, 4, [8, 8], 2)
    x = torch.randn(3, 5, 4)
    before = mlp(x)
    x[1] = 1e6
    after = mlp(x)
    assert torch.equal(before[0], after[0])
    assert torch.equal(before[2], after[2])
    assert not torch.equal(before[1], after[1])


def test_reset_members_reinitialises_only_the_given_rows() -> None:
    layer = BatchedLinear(3, 5, 4)
    weight, bias = layer.weight.detach().clone(), layer.bias.detach().clone()
    layer.reset_members([1])
    assert torch.equal(layer.weight[0], weight[0]) and torch.equal(layer.weight[2], weight[2])
    assert torch.equal(layer.bias[0], bias[0])
    assert not torch.equal(layer.weight[1], weight[1])


# ---------------------------------------------------------------- BatchedAdam


def _params(population: int) -> list[nn.Parameter]:
    return [nn.Parameter(torch.randn(population, 4, 5)), nn.Parameter(torch.randn(population, 1, 5))]


def _reference(params: list[nn.Parameter], member: int, lr: float) -> tuple[list[nn.Parameter], torch.optim.Adam]:
    own = [nn.Parameter(p.detach()[member].clone()) for p in params]
    return own, torch.optim.Adam(own, lr=lr, betas=(0.9, 0.999), eps=1e-8)


def test_batched_adam_equals_torch_adam_per_member_with_different_lrs() -> None:
    lrs = [1e-3, 1e-2, 5e-2]
    params = _params(3)
    opt = BatchedAdam(params, torch.tensor(lrs))
    refs = [_reference(params, i, lr) for i, lr in enumerate(lrs)]
    for _ in range(20):
        grads = [torch.randn_like(p) for p in params]
        opt.zero_grad()
        for p, g in zip(params, grads, strict=True):
            p.grad = g.clone()
        opt.step()
        for i, (own, ref_opt) in enumerate(refs):
            ref_opt.zero_grad()
            for p, g in zip(own, grads, strict=True):
                p.grad = g[i].clone()
            ref_opt.step()
    for i, (own, _) in enumerate(refs):
        for p, q in zip(params, own, strict=True):
            torch.testing.assert_close(p.detach()[i], q.detach(), rtol=0, atol=1e-6)
    torch.testing.assert_close(opt.step_count, torch.full((3,), 20.0))


def test_changing_one_members_lr_changes_only_that_member() -> None:
    params_a = _params(2)
    params_b = [nn.Parameter(p.detach().clone()) for p in params_a]
    lr_a, lr_b = torch.tensor([1e-2, 1e-2]), torch.tensor([1e-2, 1e-2])
    opt_a, opt_b = BatchedAdam(params_a, lr_a), BatchedAdam(params_b, lr_b)
    lr_b[1] = 1e-1  # the caller owns the lr tensor
    for params, opt in ((params_a, opt_a), (params_b, opt_b)):
        for p in params:
            p.grad = torch.ones_like(p)
        opt.step()
    assert torch.equal(params_a[0][0], params_b[0][0])
    assert not torch.equal(params_a[0][1], params_b[0][1])


def test_grad_norms_are_per_member() -> None:
    params = _params(2)
    opt = BatchedAdam(params, torch.tensor([1e-3, 1e-3]))
    for p in params:
        p.grad = torch.zeros_like(p)
    params[0].grad[0, 0, 0] = 3.0
    params[1].grad[0, 0, 0] = 4.0
    params[1].grad[1, 0, 0] = 2.0
    torch.testing.assert_close(opt.grad_norms(), torch.tensor([5.0, 2.0]))


def test_grad_clipping_is_per_member_and_matches_torch() -> None:
    """Member 0 has a huge gradient and is clipped; member 1's small gradient is left alone."""
    max_norm = 1.0
    params = _params(2)
    lrs = [1e-2, 1e-2]
    opt = BatchedAdam(params, torch.tensor(lrs), max_grad_norm=max_norm)
    refs = [_reference(params, i, lr) for i, lr in enumerate(lrs)]
    for step in range(5):
        grads = [torch.randn_like(p) for p in params]
        for g in grads:
            g[0] *= 100.0
            g[1] *= 0.01
        for p, g in zip(params, grads, strict=True):
            p.grad = g.clone()
        norms = opt.step()
        assert norms[0] > 10 * max_norm and norms[1] < max_norm, f"step {step}: {norms}"
        for i, (own, ref_opt) in enumerate(refs):
            for p, g in zip(own, grads, strict=True):
                p.grad = g[i].clone()
            torch.nn.utils.clip_grad_norm_(own, max_norm)
            ref_opt.step()
    for i, (own, _) in enumerate(refs):
        for p, q in zip(params, own, strict=True):
            torch.testing.assert_close(p.detach()[i], q.detach(), rtol=0, atol=1e-6)


def test_grad_clipping_of_one_member_does_not_change_another() -> None:
    params_a = _params(2)
    params_b = [nn.Parameter(p.detach().clone()) for p in params_a]
    opt_a = BatchedAdam(params_a, torch.tensor([1e-2, 1e-2]), max_grad_norm=1.0)
    opt_b = BatchedAdam(params_b, torch.tensor([1e-2, 1e-2]), max_grad_norm=1.0)
    grads = [torch.randn_like(p) * 0.01 for p in params_a]
    for p, g in zip(params_a, grads, strict=True):
        p.grad = g.clone()
    for p, g in zip(params_b, grads, strict=True):
        p.grad = g.clone()
        p.grad[1] *= 1e4  # only member 1 differs, and is clipped hard
    opt_a.step()
    opt_b.step()
    for p, q in zip(params_a, params_b, strict=True):
        assert torch.equal(p[0], q[0])
    for m, n in zip(opt_a.exp_avg, opt_b.exp_avg, strict=True):
        assert torch.equal(m[0], n[0])


def test_state_tensors_all_have_a_population_axis() -> None:
    params = _params(3)
    opt = BatchedAdam(params, torch.full((3,), 1e-3))
    state = opt.state_tensors()
    assert set(state) == {"step", "exp_avg.0", "exp_avg_sq.0", "exp_avg.1", "exp_avg_sq.1"}
    assert all(t.shape[0] == 3 for t in state.values())
