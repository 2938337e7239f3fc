from __future__ import annotations

import gc
import weakref
from collections.abc import Callable

import pytest
import torch
from support import tensors_with_graph

from agents import Batch, batched, make_population
from agents.batched import BatchedLinear
from agents.td3 import TD3Population
from config import AgentConfig, UserError

P, OBS, ACT, B = 3, 4, 2, 8


def make_agent(**cfg: object) -> TD3Population:
    torch.manual_seed(0)
    agent = make_population(P, OBS, ACT, AgentConfig(hidden_sizes=[16, 16], batch_size=B, **cfg), torch.device("cpu"))
    assert isinstance(agent, TD3Population)
    return agent


def make_batch(seed: int = 1, terminated: float = 0.0) -> Batch:
    g = torch.Generator().manual_seed(seed)
    return Batch(
        obs=torch.randn(P, B, OBS, generator=g),
        action=torch.rand(P, B, ACT, generator=g) * 2 - 1,
        reward=torch.randn(P, B, generator=g),
        next_obs=torch.randn(P, B, OBS, generator=g),
        terminated=torch.full((P, B), terminated),
    )


def snapshot(module: torch.nn.Module) -> list[torch.Tensor]:
    return [p.detach().clone() for p in module.parameters()]


def changed(before: list[torch.Tensor], module: torch.nn.Module) -> bool:
    return any(not torch.equal(a, b) for a, b in zip(before, module.parameters(), strict=True))


def test_make_population_refuses_an_unknown_algorithm() -> None:
    with pytest.raises(UserError, match="agent.algorithm"):
        make_population(2, 3, 1, AgentConfig(algorithm="nope"), torch.device("cpu"))


# ---------------------------------------------------------------- update output


def test_update_returns_p_python_floats_per_metric() -> None:
    agent = make_agent(policy_delay=2)
    first = agent.update([make_batch(1), make_batch(2)])
    second = agent.update([make_batch(3)])
    assert set(first) == {"critic_loss", "q_mean", "critic_grad_norm"}
    assert set(second) == {"critic_loss", "q_mean", "critic_grad_norm", "actor_loss"}
    for metrics in (first, second):
        for name, values in metrics.items():
            assert isinstance(values, list) and len(values) == P, name
            assert all(type(v) is float for v in values), name


def test_update_averages_micro_batch_losses() -> None:
    agent = make_agent()
    batches = [make_batch(1), make_batch(2)]
    with torch.no_grad():
        expected = torch.zeros(P)
        torch.manual_seed(5)
        for batch in batches:
            target = agent._td_target(batch)
            sa = torch.cat([batch.obs, batch.action], -1)
            q1, q2 = agent.critic1(sa).squeeze(-1), agent.critic2(sa).squeeze(-1)
            expected += ((q1 - target) ** 2).mean(1) + ((q2 - target) ** 2).mean(1)
    torch.manual_seed(5)
    metrics = agent.update(batches)
    torch.testing.assert_close(torch.tensor(metrics["critic_loss"]), expected / 2)


# ---------------------------------------------------------------- acting


@pytest.mark.parametrize("explore", [False, True])
def test_act_has_no_graph_and_stays_in_bounds(explore: bool) -> None:
    agent = make_agent(exploration_noise=0.5)
    obs = torch.randn(P, 6, OBS) * 100
    with torch.enable_grad():
        action = agent.act(obs, explore)
    assert action.shape == (P, 6, ACT)
    assert action.grad_fn is None and not action.requires_grad
    assert action.abs().max() <= 1.0


def test_act_without_exploration_is_the_deterministic_policy() -> None:
    agent = make_agent()
    obs = torch.randn(P, 6, OBS)
    with torch.no_grad():
        expected = torch.tanh(agent.actor(obs))
    assert torch.equal(agent.act(obs, explore=False), expected)
    assert not torch.equal(agent.act(obs, explore=True), expected)


def test_exploration_noise_is_per_member() -> None:
    agent = make_agent()
    agent.hyperparameters["exploration_noise"].copy_(torch.tensor([0.0, 0.2, 0.0]))
    obs = torch.zeros(P, 50, OBS)
    deterministic = agent.act(obs, explore=False)
    noisy = agent.act(obs, explore=True)
    assert torch.equal(noisy[0], deterministic[0]) and torch.equal(noisy[2], deterministic[2])
    assert not torch.equal(noisy[1], deterministic[1])


# ---------------------------------------------------------------- TD3 mechanics


def test_actor_and_targets_change_only_every_policy_delay_updates() -> None:
    agent = make_agent(policy_delay=3)
    for step in range(1, 7):
        actor, targets = snapshot(agent.actor), [snapshot(m) for m in (agent.actor_target, agent.critic1_target)]
        critic = snapshot(agent.critic1)
        metrics = agent.update([make_batch(step)])
        delayed = step % 3 == 0
        assert changed(critic, agent.critic1), step
        assert changed(actor, agent.actor) == delayed, step
        assert changed(targets[0], agent.actor_target) == delayed, step
        assert changed(targets[1], agent.critic1_target) == delayed, step
        assert ("actor_loss" in metrics) == delayed, step


def test_targets_move_toward_online_networks_by_each_members_tau() -> None:
    agent = make_agent(policy_delay=1)
    tau = torch.tensor([0.01, 0.5, 1.0])
    agent.hyperparameters["tau"].copy_(tau)
    pairs = [
        (agent.actor, agent.actor_target),
        (agent.critic1, agent.critic1_target),
        (agent.critic2, agent.critic2_target),
    ]
    before = [snapshot(target) for _, target in pairs]
    agent.update([make_batch()])
    for (online, target), old in zip(pairs, before, strict=True):
        for p, t, t0 in zip(online.parameters(), target.parameters(), old, strict=True):
            for i in range(P):
                expected = t0[i] + tau[i] * (p.detach()[i] - t0[i])
                torch.testing.assert_close(t[i], expected, rtol=0, atol=1e-6)
            assert torch.equal(t[2], p.detach()[2])  # tau = 1 copies


def test_target_networks_never_require_grad() -> None:
    agent = make_agent()
    agent.update([make_batch()])
    for module in (agent.actor_target, agent.critic1_target, agent.critic2_target):
        assert not any(p.requires_grad for p in module.parameters())


def test_terminal_transitions_do_not_bootstrap() -> None:
    agent = make_agent()
    batch = make_batch(terminated=1.0)
    assert torch.equal(agent._td_target(batch), batch.reward)


def test_zero_gamma_does_not_bootstrap() -> None:
    agent = make_agent()
    agent.hyperparameters["gamma"].zero_()
    batch = make_batch()
    assert torch.equal(agent._td_target(batch), batch.reward)


def test_non_terminal_target_is_clipped_double_q_with_each_members_gamma() -> None:
    agent = make_agent(policy_noise=0.0)
    gamma = torch.tensor([0.5, 0.9, 0.99])
    agent.hyperparameters["gamma"].copy_(gamma)
    batch = make_batch()
    with torch.no_grad():
        next_action = torch.tanh(agent.actor_target(batch.next_obs))
        sa = torch.cat([batch.next_obs, next_action], -1)
        next_q = torch.min(agent.critic1_target(sa), agent.critic2_target(sa)).squeeze(-1)
    expected = batch.reward + gamma[:, None] * next_q
    target = agent._td_target(batch)
    torch.testing.assert_close(target, expected)
    assert target.grad_fn is None


def test_members_learn_independently() -> None:
    """Garbage in one member's batch (NaN rewards) leaves every other member's update bit-identical."""
    clean, poisoned = make_agent(max_grad_norm=1.0, policy_delay=1), make_agent(max_grad_norm=1.0, policy_delay=1)
    bad = make_batch()
    bad.reward[1] = float("nan")
    torch.manual_seed(3)
    clean.update([make_batch()])
    torch.manual_seed(3)
    metrics = poisoned.update([bad])
    assert metrics["critic_loss"][1] != metrics["critic_loss"][1]  # NaN
    a, b = clean.member_tensors(), poisoned.member_tensors()
    for name in a:
        for i in (0, 2):
            assert torch.equal(a[name][i], b[name][i]), (name, i)


# ---------------------------------------------------------------- members


def test_member_tensors_cover_every_parameter_and_optimizer_state() -> None:
    agent = make_agent()
    listed = {t.data_ptr() for t in agent.member_tensors().values()}
    for name, p in agent.named_parameters():
        assert p.data_ptr() in listed, name
    for opt in (agent.actor_opt, agent.critic_opt):
        for name, s in opt.state_tensors().items():
            assert s.data_ptr() in listed, name
    for name, hp in agent.hyperparameters.items():
        assert hp.data_ptr() in listed, name
    assert all(t.shape[0] == P for t in agent.member_tensors().values())


def test_copy_member_copies_every_member_tensor_exactly() -> None:
    agent = make_agent(policy_delay=1)
    for hp in agent.hyperparameters.values():
        hp.mul_(torch.tensor([1.0, 1.1, 1.2]))
    for seed in range(3):
        agent.update([make_batch(seed)])
    before = {name: t.clone() for name, t in agent.member_tensors().items()}
    agent.copy_member(0, 2)
    for name, t in agent.member_tensors().items():
        assert torch.equal(t[0], before[name][2]), name
        assert torch.equal(t[1], before[name][1]), name
        assert torch.equal(t[2], before[name][2]), name
    assert agent.actor_opt.lr[0] == agent.actor_opt.lr[2]  # the optimizer reads the copied lr


def test_load_member_tensors_restores_in_place_and_checks_shapes() -> None:
    source, target = make_agent(), make_agent(policy_delay=1)
    source.update([make_batch(1)])
    saved = {name: t.clone() for name, t in source.member_tensors().items()}
    weight, moment = target.actor.layers[0].weight, target.actor_opt.exp_avg[0]
    target.load_member_tensors(saved)
    for name, t in target.member_tensors().items():
        assert torch.equal(t, saved[name]), name
    # in place: the optimizer still steps the module's own parameters and moments
    assert target.actor.layers[0].weight is weight and target.actor_opt.params[0] is weight
    assert target.actor_opt.exp_avg[0] is moment
    saved["hp.tau"] = torch.zeros(P + 1)
    with pytest.raises(ValueError, match="hp.tau"):
        target.load_member_tensors(saved)
    del saved["hp.tau"]
    with pytest.raises(ValueError, match="lacks member tensor 'hp.tau'"):
        target.load_member_tensors(saved)


def test_extra_state_round_trip() -> None:
    agent = make_agent()
    agent.update([make_batch()])
    other = make_agent()
    other.load_extra_state(agent.extra_state())
    assert other.critic_updates == agent.critic_updates == 1


# ---------------------------------------------------------------- MEMORY.md rule 1: metrics are floats, no graph kept


def _watch_activations(
    agent: TD3Population, monkeypatch: pytest.MonkeyPatch
) -> tuple[list[weakref.ref], Callable[[], None]]:
    """Weak references to the input and output of every batched layer call, through the modules
    (eager path) and through ``agents.batched.linear`` (the fused path); returns (refs, remove)."""
    refs: list[weakref.ref] = []

    def hook(module: torch.nn.Module, inputs: tuple[torch.Tensor, ...], output: torch.Tensor) -> None:
        refs.append(weakref.ref(output))
        refs.extend(weakref.ref(x) for x in inputs)

    linear = batched.linear

    def watched(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor) -> torch.Tensor:
        out = linear(x, weight, bias)
        refs.extend(weakref.ref(t) for t in (x, out))
        return out

    monkeypatch.setattr(batched, "linear", watched)
    handles = [m.register_forward_hook(hook) for m in agent.modules() if isinstance(m, BatchedLinear)]
    return refs, lambda: [h.remove() for h in handles]


@pytest.mark.parametrize("fast", [False, True])
def test_update_keeps_no_activation_alive_and_returns_only_floats(fast: bool, monkeypatch: pytest.MonkeyPatch) -> None:
    """MEMORY.md rule 1: nothing of a step (loss, activations, graph) outlives it; metrics are floats."""
    agent = make_agent(policy_delay=1, fast_update=fast)
    batches = [make_batch(1), make_batch(2), make_batch(3)]
    refs, remove = _watch_activations(agent, monkeypatch)
    history = [agent.update(batches) for _ in range(3)]  # held, like a trainer's metric log
    remove()
    gc.collect()
    assert len(refs) > 0
    alive = [r() for r in refs if r() is not None]
    alive = [t for t in alive if not any(t is b for batch in batches for b in batch)]
    assert not alive, f"{len(alive)} activations of the update are still alive"
    assert not tensors_with_graph()
    for metrics in history:
        for values in metrics.values():
            assert all(type(v) is float for v in values)


@pytest.mark.parametrize("algorithm", ["td3", "sac_discrete"])
@pytest.mark.parametrize("move", ["to_cpu", "float", "double"])
def test_a_population_refuses_to_be_moved_or_cast_after_it_is_built(algorithm: str, move: str) -> None:
    """A move would leave the optimizer state, the hyperparameters and TD3's flat storage behind."""
    kind = "discrete" if algorithm == "sac_discrete" else "box"
    agent = make_population(P, OBS, ACT, AgentConfig(algorithm=algorithm, hidden_sizes=[8]), torch.device("cpu"), kind)
    before = {name: t.clone() for name, t in agent.member_tensors().items()}
    moves = {"to_cpu": lambda: agent.to("cpu"), "float": agent.float, "double": agent.double}
    with pytest.raises(RuntimeError, match="cannot be moved or cast after it is built.*make_population"):
        moves[move]()
    assert all(torch.equal(before[name], t) for name, t in agent.member_tensors().items())
