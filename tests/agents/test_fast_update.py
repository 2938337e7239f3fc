"""The fused TD3 update (``agent.fast_update``) against the eager one, and the flat parameter storage
it relies on: same results on the same batches, same checkpoint layout, member rows still copy."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from agents import Batch, make_population
from agents.batched import BatchedAdam, BatchedMLP, FlatAdam, FlatParameters
from agents.td3 import TD3Population, concat
from config import AgentConfig, UserError, build_config

P, OBS, ACT, B = 4, 3, 2, 16


def make_agent(fast: bool, **cfg: object) -> TD3Population:
    torch.manual_seed(0)
    config = AgentConfig(hidden_sizes=[16, 16], batch_size=B, fast_update=fast, **cfg)  # type: ignore[arg-type]
    agent = make_population(P, OBS, ACT, config, torch.device("cpu"))
    assert isinstance(agent, TD3Population)
    return agent


def make_batches(seed: int, k: int = 2) -> list[Batch]:
    g = torch.Generator().manual_seed(seed)

    def one() -> Batch:
        return Batch(
            obs=torch.randn(P, B, OBS, generator=g),
            action=torch.rand(P, B, ACT, generator=g) * 2 - 1,
            reward=torch.randn(P, B, generator=g),
            next_obs=torch.randn(P, B, OBS, generator=g),
            terminated=(torch.rand(P, B, generator=g) < 0.1).float(),
        )

    return [one() for _ in range(k)]


def run(agent: TD3Population, steps: range) -> list[dict[str, list[float]]]:
    out = []
    for step in steps:
        torch.manual_seed(100 + step)  # the same smoothing noise for both paths
        out.append(agent.update(make_batches(step)))
    return out


@pytest.mark.parametrize("clip", [0.0, 0.5])
def test_fast_update_matches_the_eager_update_on_the_same_batches(clip: float) -> None:
    eager, fast = make_agent(False, max_grad_norm=clip), make_agent(True, max_grad_norm=clip)
    for a, b in zip(run(eager, range(6)), run(fast, range(6)), strict=True):
        assert a.keys() == b.keys()
        for name in a:
            torch.testing.assert_close(torch.tensor(b[name]), torch.tensor(a[name]), rtol=1e-4, atol=1e-5)
    tensors = fast.member_tensors()
    for name, expected in eager.member_tensors().items():
        torch.testing.assert_close(tensors[name], expected, rtol=1e-4, atol=1e-5, msg=name)
    assert not torch.equal(
        tensors["critic1.layers.0.weight"], make_agent(True).member_tensors()["critic1.layers.0.weight"]
    )


def test_paths_share_their_state_so_either_can_continue_the_other() -> None:
    """Optimizer moments, step counts and targets are one storage: eager then fast equals fast throughout."""
    mixed, fast = make_agent(False), make_agent(True)
    run(mixed, range(3))
    mixed.cfg.fast_update = True
    run(mixed, range(3, 6))
    run(fast, range(6))
    tensors = fast.member_tensors()
    for name, expected in mixed.member_tensors().items():
        torch.testing.assert_close(tensors[name], expected, rtol=1e-4, atol=1e-5, msg=name)


def test_checkpoint_layout_is_unchanged() -> None:
    """member_tensors() names and shapes are those of separate modules and optimizers (as before the flat storage)."""
    agent = make_agent(True)
    tensors = agent.member_tensors()
    sizes = [(OBS, 16), (1, 16), (16, 16), (1, 16), (16, ACT), (1, ACT)]
    critic = [(OBS + ACT, 16), (1, 16), (16, 16), (1, 16), (16, 1), (1, 1)]
    expected: dict[str, tuple[int, ...]] = {}
    for net, shapes in (("actor", sizes), ("critic1", critic), ("critic2", critic)):
        for prefix in (net, f"{net}_target"):
            for i, shape in enumerate(shapes):
                expected[f"{prefix}.layers.{i // 2}.{'weight' if i % 2 == 0 else 'bias'}"] = (P, *shape)
    for i, shape in enumerate(sizes):
        expected[f"actor_opt.exp_avg.{i}"] = expected[f"actor_opt.exp_avg_sq.{i}"] = (P, *shape)
    for i, shape in enumerate(critic + critic):
        expected[f"critic_opt.exp_avg.{i}"] = expected[f"critic_opt.exp_avg_sq.{i}"] = (P, *shape)
    expected |= {"actor_opt.step": (P,), "critic_opt.step": (P,)}
    expected |= {f"hp.{name}": (P,) for name in TD3Population.HYPERPARAMETERS}
    assert {name: tuple(t.shape) for name, t in tensors.items()} == expected


def test_module_parameters_are_views_of_the_flat_storage() -> None:
    agent = make_agent(True)
    run(agent, range(2))
    flat = agent.critic_flat.flat
    with torch.no_grad():
        # a module write lands in the flat rows (critic 2: rows P..2P)
        agent.critic2.get_parameter("layers.1.bias")[3] = 7.0
    assert (flat[P + 3] == 7.0).sum() == 16
    agent.copy_member(0, 3)  # evolution copies rows of member tensors: both critics' flat rows follow
    assert torch.equal(flat[P], flat[P + 3]) and torch.equal(flat[0], flat[3])
    assert torch.equal(agent.critic_opt.flat_exp_avg[P], agent.critic_opt.flat_exp_avg[P + 3])
    assert torch.equal(agent.actor_flat.flat[0], agent.actor_flat.flat[3])
    for layer in agent.actor_layers():  # crossover's groups still share their output axis
        assert layer[0].shape[-1] == layer[1].shape[-1]


def test_flat_parameters_keep_values_and_refuse_different_shapes() -> None:
    torch.manual_seed(0)
    a, b = BatchedMLP(3, 4, [5], 2), BatchedMLP(3, 4, [5], 2)
    before = [p.detach().clone() for p in (*a.parameters(), *b.parameters())]
    flat = FlatParameters([a, b])
    assert flat.flat.shape == (6, 4 * 5 + 5 + 5 * 2 + 2)
    after = [*a.parameters(), *b.parameters()]
    assert all(torch.equal(x, y) for x, y in zip(before, after, strict=True))
    assert all(isinstance(p, nn.Parameter) and p.requires_grad for p in after)
    with pytest.raises(ValueError, match="identical parameter shapes"):
        FlatParameters([BatchedMLP(3, 4, [5], 2), BatchedMLP(3, 4, [6], 2)])


@pytest.mark.parametrize("clip", [0.0, 1.0])
def test_fused_adam_step_is_elementwise_the_per_parameter_step(clip: float) -> None:
    torch.manual_seed(0)
    lr = torch.tensor([1e-2, 3e-3, 1e-3])
    nets = [BatchedMLP(3, 4, [5], 2) for _ in range(2)]
    reference = [BatchedMLP(3, 4, [5], 2) for _ in range(2)]
    for ref, net in zip(reference, nets, strict=True):
        ref.load_state_dict(net.state_dict())
    flat = FlatParameters(nets)
    fused = FlatAdam(flat, lr, max_grad_norm=clip)
    eager = BatchedAdam([p for r in reference for p in r.parameters()], lr.clone(), max_grad_norm=clip)
    for step in range(3):
        grads = [torch.randn_like(p) * (step + 1) for p in flat.parameters]
        for p, g in zip(eager.params, grads, strict=True):
            p.grad = g.clone()
        norms = eager.step()
        grad = torch.zeros_like(flat.flat)  # the same gradients in the flat layout
        for view, g in zip(flat.member_views(grad), grads, strict=True):
            view.copy_(g)
        fused_norms = fused.fused_step(grad)
        torch.testing.assert_close(fused_norms, norms)
    exact = clip == 0.0  # with clipping the norms (and so the factors) are summed in another order
    for p, q in zip(flat.parameters, eager.params, strict=True):
        if exact:
            assert torch.equal(p, q)
        else:
            torch.testing.assert_close(p, q)


def test_concat_puts_micro_batch_k_in_rows_k_times_b() -> None:
    batches = make_batches(1, k=3)
    joined = concat(batches)
    assert joined.obs.shape == (P, 3 * B, OBS) and joined.reward.shape == (P, 3 * B)
    assert torch.equal(joined.next_obs[:, B : 2 * B], batches[1].next_obs)
    with pytest.raises(ValueError, match="same size"):
        concat([batches[0], Batch(*(t[:, :3] for t in batches[1]))])


def test_compile_mode_is_validated_and_neither_key_changes_the_hash() -> None:
    with pytest.raises(UserError, match="agent.compile"):
        build_config("debug", extra={"agent.compile": "fastest"})
    base = build_config("debug").hash()
    assert build_config("debug", extra={"agent.fast_update": False, "agent.compile": "default"}).hash() == base


@pytest.mark.slow
def test_compiled_fast_update_matches_the_eager_update() -> None:
    """agent.compile=default (inductor on CPU; tens of seconds to compile, hence slow)."""
    eager, compiled = make_agent(False), make_agent(True, compile="default")
    for a, b in zip(run(eager, range(2)), run(compiled, range(2)), strict=True):
        for name in a:
            torch.testing.assert_close(torch.tensor(b[name]), torch.tensor(a[name]), rtol=1e-4, atol=1e-5)
