from __future__ import annotations

from typing import Any

import numpy as np
import pytest
import torch
from support import tensors_with_graph

from agents import PopulationAgent, make_population
from agents.batched import BatchedLinear
from config import AgentConfig, EnvConfig
from training.envs import EnvPool, make_env
from training.replay import ReplayBuffer
from training.rollout import MemberSubset, RolloutResult, StreamNoise, _act, episode_quota, rollout

MEMBERS, PER_MEMBER = 2, 2
STREAMS = MEMBERS * PER_MEMBER


def make_agent(obs_dim: int, act_dim: int) -> PopulationAgent:
    torch.manual_seed(0)
    return make_population(MEMBERS, obs_dim, act_dim, AgentConfig(hidden_sizes=[8]), torch.device("cpu"))


@pytest.fixture
def counter(custom_envs: str) -> tuple[PopulationAgent, EnvPool, ReplayBuffer]:
    """CounterEnv episodes last 5 steps; observation ``[t, episode, seed draw]``."""
    pool = EnvPool(lambda: make_env(EnvConfig(id=f"{custom_envs}:CounterEnv")), STREAMS)
    replay = ReplayBuffer(1000, STREAMS, pool.obs_dim, pool.act_dim, seed=0)
    return make_agent(pool.obs_dim, pool.act_dim), pool, replay


@pytest.fixture
def pendulum() -> tuple[PopulationAgent, EnvPool, ReplayBuffer]:
    pool = EnvPool(lambda: make_env(EnvConfig(id="Pendulum-v1", max_episode_steps=7)), STREAMS)
    replay = ReplayBuffer(1000, STREAMS, pool.obs_dim, pool.act_dim, seed=0)
    return make_agent(pool.obs_dim, pool.act_dim), pool, replay


SEEDS = np.arange(STREAMS)


def test_steps_mode_takes_exactly_steps_times_streams(counter: Any) -> None:
    agent, pool, replay = counter
    result = rollout(agent, pool, replay, SEEDS, explore=True, steps=12)
    assert result.env_steps == 12 * STREAMS
    assert [env.unwrapped.total_steps for env in pool.envs] == [12] * STREAMS
    assert len(replay) == 12 * STREAMS
    assert [len(r) for r in result.episode_returns] == [2] * STREAMS  # 12 steps = 2 whole episodes of 5


def test_episodes_mode_completes_the_required_episodes(pendulum: Any) -> None:
    agent, pool, replay = pendulum
    result = rollout(agent, pool, replay, SEEDS, explore=False, episodes_per_stream=2)
    assert result.env_steps == 2 * 7 * STREAMS
    assert all(len(returns) == 2 for returns in result.episode_returns)
    assert all(r < 0 for returns in result.episode_returns for r in returns)  # pendulum rewards are negative


def test_a_rollout_cut_mid_episode_marks_its_last_transition_truncated(counter: Any) -> None:
    agent, pool, replay = counter
    rollout(agent, pool, replay, SEEDS, explore=True, steps=3)
    assert replay.data["truncated"][:3].tolist() == [[False] * STREAMS] * 2 + [[True] * STREAMS]
    assert not replay.data["terminated"][:3].any()


def test_an_episode_that_ends_with_the_rollout_keeps_its_own_flags(counter: Any) -> None:
    agent, pool, replay = counter
    rollout(agent, pool, replay, SEEDS, explore=False, episodes_per_stream=1)
    assert replay.data["terminated"][4].all()
    assert not replay.data["truncated"][:5].any()


def test_is_first_marks_the_first_step_of_every_episode(counter: Any) -> None:
    agent, pool, replay = counter
    rollout(agent, pool, replay, SEEDS, explore=True, steps=12)
    is_first = replay.data["is_first"][:12, 0].tolist()
    assert is_first == [t % 5 == 0 for t in range(12)]
    np.testing.assert_array_equal(replay.data["is_first"][:12, 0], replay.data["obs"][:12, 0, 0] == 0)


def test_transitions_chain_within_an_episode(counter: Any) -> None:
    agent, pool, replay = counter
    rollout(agent, pool, replay, SEEDS, explore=True, steps=4)
    np.testing.assert_array_equal(replay.data["next_obs"][:3], replay.data["obs"][1:4])


def test_each_stream_plays_its_own_members_policy(pendulum: Any) -> None:
    agent, pool, replay = pendulum
    rollout(agent, pool, replay, SEEDS, explore=False, steps=1)
    obs = torch.as_tensor(replay.data["obs"][0]).view(MEMBERS, PER_MEMBER, -1)
    expected = agent.act(obs, explore=False).reshape(STREAMS, -1).numpy()
    np.testing.assert_allclose(replay.data["action"][0], expected, rtol=0, atol=1e-6)


def test_rollout_resets_with_the_given_seeds(pendulum: Any) -> None:
    agent, pool, replay = pendulum
    first = rollout(agent, pool, None, SEEDS, explore=False, episodes_per_stream=1)
    again = rollout(agent, pool, None, SEEDS, explore=False, episodes_per_stream=1)
    assert first.episode_returns == again.episode_returns


def test_random_actions_cover_the_normalised_range(counter: Any) -> None:
    agent, pool, replay = counter
    rollout(agent, pool, replay, SEEDS, explore=True, steps=50, random_steps=50)
    actions = replay.data["action"][:50]
    assert actions.min() >= -1 and actions.max() <= 1
    assert actions.min() < -0.9 and actions.max() > 0.9


def test_random_actions_stop_after_random_steps(counter: Any) -> None:
    agent, pool, replay = counter
    rollout(agent, pool, replay, SEEDS, explore=False, steps=6, random_steps=4)
    obs, actions = replay.data["obs"][:6], replay.data["action"][:6]
    with torch.no_grad():
        policy = [agent.act(torch.as_tensor(o).view(MEMBERS, PER_MEMBER, -1), False).reshape(STREAMS, -1) for o in obs]
    for t in range(6):
        assert np.allclose(actions[t], policy[t].numpy(), atol=1e-6) == (t >= 4), t


def test_each_stream_plays_its_own_episode_quota(counter: Any) -> None:
    agent, pool, replay = counter
    quota = episode_quota(3, PER_MEMBER, MEMBERS)  # 3 episodes per member over 2 streams: 2 + 1
    assert quota.tolist() == [2, 1, 2, 1]
    result = rollout(agent, pool, None, SEEDS, explore=False, episodes_per_stream=quota)
    assert result.env_steps == 2 * 5 * STREAMS  # streams that finish early keep playing
    returns = [[1.0, 2.0], [3.0, 100.0], [5.0, 6.0], [7.0, 100.0]]
    fitness = RolloutResult(0, returns).member_fitness(MEMBERS, quota)
    np.testing.assert_allclose(fitness, [2.0, 6.0])  # exactly 3 episodes each, never the 4th


def test_rollout_needs_exactly_one_stopping_rule(counter: Any) -> None:
    agent, pool, replay = counter
    with pytest.raises(ValueError, match="exactly one"):
        rollout(agent, pool, replay, SEEDS, explore=True)
    with pytest.raises(ValueError, match="exactly one"):
        rollout(agent, pool, replay, SEEDS, explore=True, steps=1, episodes_per_stream=1)


def test_on_step_is_called_once_per_step(counter: Any) -> None:
    agent, pool, replay = counter
    calls: list[int] = []
    rollout(agent, pool, None, SEEDS, explore=True, steps=4, on_step=calls.append)
    assert calls == [STREAMS] * 4


def test_diverged_member_does_not_crash_the_environments(pendulum: Any) -> None:
    agent, pool, replay = pendulum
    with torch.no_grad():
        for p in agent.actor_parameters():
            p[1] = float("nan")
    result = rollout(agent, pool, replay, SEEDS, explore=True, steps=3)
    assert result.env_steps == 3 * STREAMS
    assert np.isfinite(replay.data["obs"][:3]).all()


def test_member_fitness_is_the_mean_of_each_members_first_episodes() -> None:
    result = RolloutResult(env_steps=0, episode_returns=[[1.0, 2.0, 100.0], [3.0], [5.0], [7.0, 9.0]])
    np.testing.assert_allclose(result.member_fitness(2, 2), [2.0, 7.0])
    np.testing.assert_allclose(result.member_fitness(4, 1), [1.0, 3.0, 5.0, 7.0])


# ---------------------------------------------------------------- MEMORY.md rule 3: no graph during collection


@pytest.mark.parametrize("explore", [False, True])
def test_collection_builds_no_autograd_graph(pendulum: Any, explore: bool) -> None:
    agent, pool, replay = pendulum
    seen: list[tuple[str, bool]] = []
    act = agent.act

    def checked_act(obs: torch.Tensor, explore: bool, noise: torch.Tensor | None = None) -> torch.Tensor:
        seen.append(("act called with grad enabled", torch.is_grad_enabled()))
        action = act(obs, explore, noise)
        seen.append(("action requires grad", action.requires_grad or action.grad_fn is not None))
        return action

    def hook(module: torch.nn.Module, inputs: Any, output: torch.Tensor) -> None:
        seen.append(("layer ran with grad enabled", torch.is_grad_enabled()))
        seen.append(("layer output requires grad", output.requires_grad))

    agent.act = checked_act  # type: ignore[method-assign]
    handles = [m.register_forward_hook(hook) for m in agent.modules() if isinstance(m, BatchedLinear)]
    try:
        with torch.enable_grad():
            rollout(agent, pool, replay, SEEDS, explore=explore, steps=5)
    finally:
        for handle in handles:
            handle.remove()
        del agent.act
    assert len(seen) >= 5 * 4
    assert [what for what, bad in seen if bad] == []
    assert not tensors_with_graph()


def test_a_member_subset_acts_like_those_members_of_the_population(pendulum: Any) -> None:
    agent, pool, _ = pendulum
    members = [MEMBERS - 1]
    streams = np.array([m * PER_MEMBER + k for m in members for k in range(PER_MEMBER)])
    obs = pool.reset(SEEDS)
    full = _act(agent, obs, MEMBERS, False, torch.device("cpu"))
    subset = MemberSubset(agent, members, PER_MEMBER)
    assert subset.population == 1
    np.testing.assert_array_equal(subset.act_streams(obs[streams], np.ones(len(streams), bool), False), full[streams])


def test_a_subset_pool_steps_only_its_own_environments(counter: Any) -> None:
    agent, pool, _ = counter
    members = [1]
    streams = np.arange(PER_MEMBER) + PER_MEMBER
    result = rollout(
        MemberSubset(agent, members, PER_MEMBER),
        pool.subset(streams),
        None,
        SEEDS[streams],
        explore=False,
        episodes_per_stream=1,
        step_multiple=3,
    )
    assert result.env_steps == 6 * PER_MEMBER  # 5-step episodes, stopped at a multiple of 3
    stepped = [env.unwrapped.total_steps for env in pool.envs]
    assert [stepped[e] for e in streams] == [6] * PER_MEMBER and sum(stepped) == 6 * PER_MEMBER


def test_stream_noise_is_a_function_of_each_streams_seed_alone() -> None:
    """A stream's exploration draws do not depend on which other streams a process plays with it."""
    together = StreamNoise(np.array([11, 22, 33]), 2)
    alone = StreamNoise(np.array([22]), 2)
    for _ in range(3):
        assert np.array_equal(together.draw()[1:2], alone.draw())
    assert not np.array_equal(StreamNoise(np.array([11]), 2).draw(), StreamNoise(np.array([22]), 2).draw())
