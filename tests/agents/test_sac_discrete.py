from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F
from support import tensors_with_graph

from agents import AUTO, Batch, algorithm_class, make_population
from agents.sac_discrete import DiscreteSACPopulation
from agents.td3 import TD3Population
from config import AgentConfig, UserError

P, OBS, N, B = 3, 4, 5, 8


def make_agent(**cfg: object) -> DiscreteSACPopulation:
    torch.manual_seed(0)
    config = AgentConfig(hidden_sizes=[16, 16], batch_size=B, **cfg)  # type: ignore[arg-type]
    agent = make_population(P, OBS, N, config, torch.device("cpu"), action_kind="discrete")
    assert isinstance(agent, DiscreteSACPopulation)
    return agent


def make_batch(seed: int = 1, terminated: float = 0.0) -> Batch:
    g = torch.Generator().manual_seed(seed)
    return Batch(
        obs=torch.randn(P, B, OBS, generator=g),
        action=F.one_hot(torch.randint(N, (P, B), generator=g), N).float(),
        reward=torch.randn(P, B, generator=g),
        next_obs=torch.randn(P, B, OBS, generator=g),
        terminated=torch.full((P, B), terminated),
    )


def rows_changed(before: dict[str, torch.Tensor], after: dict[str, torch.Tensor]) -> set[int]:
    """Members whose row differs in any member tensor."""
    return {i for name in before for i in range(P) if not torch.equal(before[name][i], after[name][i])}


def clone(agent: DiscreteSACPopulation) -> dict[str, torch.Tensor]:
    return {name: t.clone() for name, t in agent.member_tensors().items()}


# ---------------------------------------------------------------- choosing the algorithm


def test_auto_picks_td3_for_box_and_discrete_sac_for_discrete_actions() -> None:
    cfg = AgentConfig()
    assert cfg.algorithm == "auto" and AUTO == {"box": "td3", "discrete": "sac_discrete"}
    assert algorithm_class(cfg, "box") is TD3Population
    assert algorithm_class(cfg, "discrete") is DiscreteSACPopulation
    assert algorithm_class(AgentConfig(algorithm="sac_discrete"), "discrete") is DiscreteSACPopulation


@pytest.mark.parametrize(
    ("algorithm", "kind", "message"),
    [("td3", "discrete", "use auto or sac_discrete"), ("sac_discrete", "box", "use auto or td3")],
)
def test_an_algorithm_for_the_other_action_space_is_refused_in_one_line(
    algorithm: str, kind: str, message: str
) -> None:
    with pytest.raises(UserError, match=message) as refused:
        algorithm_class(AgentConfig(algorithm=algorithm), kind)
    assert "\n" not in str(refused.value)


def test_each_algorithm_declares_its_evolved_hyperparameters() -> None:
    agent = make_agent()
    assert tuple(agent.hyperparameters) == DiscreteSACPopulation.HYPERPARAMETERS
    assert "target_entropy" in agent.hyperparameters and "exploration_noise" not in agent.hyperparameters
    assert DiscreteSACPopulation.evolved_hyperparameters(explores=False) == DiscreteSACPopulation.HYPERPARAMETERS
    assert TD3Population.evolved_hyperparameters(explores=False) == ("actor_lr", "critic_lr", "gamma", "tau")


# ---------------------------------------------------------------- acting


@pytest.mark.parametrize("explore", [False, True])
def test_act_gives_one_hot_rows_without_a_graph(explore: bool) -> None:
    agent = make_agent()
    obs = torch.randn(P, 6, OBS) * 100
    with torch.enable_grad():
        action = agent.act(obs, explore)
    assert action.shape == (P, 6, N) and action.dtype == torch.float32
    assert action.grad_fn is None and not action.requires_grad
    assert torch.equal(action.sum(-1), torch.ones(P, 6)) and set(action.unique().tolist()) <= {0.0, 1.0}


def test_act_without_exploration_is_the_most_likely_action() -> None:
    agent = make_agent()
    obs = torch.randn(P, 6, OBS)
    with torch.no_grad():
        expected = agent.actor(obs).argmax(-1)
    assert torch.equal(agent.act(obs, explore=False).argmax(-1), expected)


def test_exploring_draws_actions_with_the_policys_probabilities() -> None:
    agent = make_agent()
    obs = torch.randn(P, 1, OBS).expand(P, 20_000, OBS)
    with torch.no_grad():
        probs = F.softmax(agent.actor(obs[:, :1]), -1).squeeze(1)  # (P, N)
    frequency = agent.act(obs, explore=True).mean(1)
    torch.testing.assert_close(frequency, probs, atol=0.02, rtol=0)


# ---------------------------------------------------------------- learning


def test_update_returns_p_python_floats_per_metric() -> None:
    agent = make_agent()
    metrics = agent.update([make_batch(1), make_batch(2)])
    assert set(metrics) == {"critic_loss", "q_mean", "critic_grad_norm", "actor_loss", "entropy", "alpha"}
    for name, values in metrics.items():
        assert isinstance(values, list) and len(values) == P, name
        assert all(type(v) is float and math.isfinite(v) for v in values), name
    assert not tensors_with_graph()


def test_the_critic_target_is_the_exact_soft_value_of_the_next_state() -> None:
    agent = make_agent(initial_alpha=0.3, gamma=0.9)
    batch = make_batch(3, terminated=0.0)
    with torch.no_grad():
        probs = F.softmax(agent.actor(batch.next_obs), -1)
        q = torch.min(agent.critic1_target(batch.next_obs), agent.critic2_target(batch.next_obs))
        value = (probs * (q - 0.3 * probs.log())).sum(-1)
    torch.testing.assert_close(agent._td_target(batch), batch.reward + 0.9 * value)
    terminal = make_batch(3, terminated=1.0)
    torch.testing.assert_close(agent._td_target(terminal), terminal.reward)


def test_the_temperature_rises_below_the_target_entropy_and_falls_above_it() -> None:
    agent = make_agent(target_entropy=0.5, alpha_lr=0.01)
    with torch.no_grad():  # member 0: a nearly deterministic actor (entropy far below the target)
        agent.actor.layers[-1].bias[0] = torch.tensor([30.0, 0, 0, 0, 0])
        agent.hyperparameters["target_entropy"][2] = 0.01  # member 2: a near-uniform actor above its target
    before = agent.log_alpha.detach().clone().squeeze(1)
    metrics = agent.update([make_batch(1)])
    after = agent.log_alpha.detach().squeeze(1)
    assert metrics["entropy"][0] < 0.5 * math.log(N) < metrics["entropy"][1]
    assert after[0] > before[0] and after[2] < before[2]


def test_changing_one_members_batch_changes_only_that_member() -> None:
    a, b = make_agent(), make_agent()
    batch = make_batch(1)
    other = make_batch(2)
    mixed = Batch(*(torch.cat([x[:1], y[1:2], x[2:]]) for x, y in zip(batch, other, strict=True)))
    before = clone(a)
    torch.manual_seed(7)
    a.update([batch])
    torch.manual_seed(7)
    b.update([mixed])
    assert rows_changed(before, clone(a)) == {0, 1, 2}
    assert rows_changed(clone(a), clone(b)) == {1}


def test_changing_one_members_parameters_changes_only_that_member() -> None:
    a, b = make_agent(), make_agent()
    with torch.no_grad():
        b.critic1.layers[0].weight[2] += 0.5
        b.hyperparameters["actor_lr"][2] *= 2
    batch = make_batch(1)
    a.update([batch])
    b.update([batch])
    assert rows_changed(clone(a), clone(b)) == {2}


def test_the_target_critics_trail_the_critics_by_tau() -> None:
    agent = make_agent(tau=0.1)
    before = [t.clone() for t in agent.critic1_target.parameters()]
    agent.update([make_batch(1)])
    for old, target, online in zip(before, agent.critic1_target.parameters(), agent.critic1.parameters(), strict=True):
        torch.testing.assert_close(target, old + 0.1 * (online - old))


def test_member_tensors_cover_every_row_owning_tensor() -> None:
    agent = make_agent()
    agent.update([make_batch(1)])
    names = set(agent.member_tensors())
    assert {"log_alpha", "alpha_opt.step", "hp.target_entropy", "critic2_target.layers.0.weight"} <= names
    covered = {t.data_ptr() for t in agent.member_tensors().values()}
    assert {p.data_ptr() for p in agent.parameters()} <= covered  # targets and log_alpha included
    assert {s.data_ptr() for s in agent.alpha_opt.state_tensors().values()} <= covered
    assert all(t.shape[0] == P for t in agent.member_tensors().values())


def test_copy_member_makes_an_identical_member() -> None:
    agent = make_agent()
    agent.update([make_batch(1)])
    agent.copy_member(0, 2)
    for name, t in agent.member_tensors().items():
        assert torch.equal(t[0], t[2]), name


def test_actor_layers_group_weights_with_their_biases() -> None:
    agent = make_agent()
    layers = agent.actor_layers()
    assert len(layers) == 3 and [len(group) for group in layers] == [2, 2, 2]
    assert all(w.shape[-1] == b.shape[-1] for w, b in layers) and layers[-1][0].shape[-1] == N
