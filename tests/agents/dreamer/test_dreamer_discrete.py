"""The Dreamer member's categorical actor (``ActionSpec("discrete", n)``): one-hot actions, REINFORCE
log-probabilities with a uniform mix, and a whole agent that trains and acts on discrete sequences."""

from __future__ import annotations

import math

import numpy as np
import torch
import torch.nn.functional as F
from support import tensors_with_graph

from agents.dreamer import ActionSpec, DreamerAgent
from agents.dreamer.networks import CategoricalActor, make_actor
from config import DreamerConfig

OBS, N, FEAT = 3, 4, 16


def discrete_sequences(batch: int = 4, length: int = 10, seed: int = 0) -> dict[str, np.ndarray]:
    """Random one-hot actions; the reward is 1 for action 2; episodes of 5 steps."""
    rng = np.random.default_rng(seed)
    choice = rng.integers(0, N, (batch, length))
    obs = rng.normal(size=(batch, length, OBS)).astype(np.float32)
    is_first = np.zeros((batch, length), np.bool_)
    is_first[:, ::5] = True
    terminated = np.zeros((batch, length), np.bool_)
    terminated[:, 4::5] = True
    return {
        "obs": obs,
        "action": np.eye(N, dtype=np.float32)[choice],
        "reward": (choice == 2).astype(np.float32),
        "next_obs": np.roll(obs, -1, 1),
        "terminated": terminated,
        "is_first": is_first,
    }


def test_the_factory_gives_a_categorical_actor_for_discrete_actions() -> None:
    actor = make_actor(ActionSpec("discrete", N), FEAT, 32, 1)
    assert isinstance(actor, CategoricalActor) and actor.dim == N


def test_samples_and_modes_are_one_hot_rows_without_a_graph() -> None:
    actor = make_actor(ActionSpec("discrete", N), FEAT, 32, 1)
    feat = torch.randn(5, 7, FEAT)
    raw, action = actor.sample(feat, torch.Generator().manual_seed(0))
    mode = actor.mode(feat)
    for x in (raw, action, mode):
        assert x.shape == (5, 7, N)
        assert torch.equal(x.sum(-1), torch.ones(5, 7)) and set(x.unique().tolist()) <= {0.0, 1.0}
    assert not raw.requires_grad and not action.requires_grad
    assert torch.equal(raw, action)


def test_samples_follow_the_mixed_probabilities() -> None:
    actor = make_actor(ActionSpec("discrete", N), FEAT, 32, 1)
    with torch.no_grad():  # an actor that always prefers action 1 by a wide margin
        actor.net[-1].bias.copy_(torch.tensor([0.0, 50.0, 0.0, 0.0]))
    feat = torch.zeros(20_000, FEAT)
    frequency = actor.sample(feat, torch.Generator().manual_seed(0))[1].mean(0)
    mixed = 0.99 * F.one_hot(torch.tensor(1), N) + 0.01 / N  # unimix: every action keeps 0.25%
    torch.testing.assert_close(frequency, mixed.float(), atol=0.003, rtol=0)
    assert frequency[0] > 0


def test_log_prob_and_entropy_of_the_categorical() -> None:
    actor = make_actor(ActionSpec("discrete", N), FEAT, 32, 1)
    feat = torch.randn(6, FEAT)
    raw, _ = actor.sample(feat, torch.Generator().manual_seed(1))
    log_prob, entropy = actor.log_prob_entropy(feat, raw)
    log_probs = actor(feat)
    torch.testing.assert_close(log_probs.exp().sum(-1), torch.ones(6))
    torch.testing.assert_close(log_prob, log_probs[raw.bool()])
    assert log_prob.shape == entropy.shape == (6,)
    assert (entropy > 0).all() and (entropy <= math.log(N) + 1e-5).all()
    log_prob.sum().backward()  # REINFORCE: the gradient reaches the actor through log_prob
    assert all(p.grad is not None for p in actor.parameters())


def test_a_discrete_agent_trains_and_acts_with_one_hot_actions() -> None:
    agent = DreamerAgent((OBS,), ActionSpec("discrete", N), DreamerConfig(horizon=4), torch.device("cpu"), seed=0)
    before = {k: v.clone() for k, v in agent.state_tensors().items() if k.startswith("net.ac.actor")}
    for seed in range(2):
        metrics = agent.train_step(discrete_sequences(seed=seed))
        assert metrics["finite"] == 1.0 and all(math.isfinite(v) for v in metrics.values())
    after = agent.state_tensors()
    assert any(not torch.equal(before[k], after[k]) for k in before)  # the actor learned
    obs = torch.randn(3, OBS)
    first = torch.ones(3, dtype=torch.bool)
    for explore in (True, False):
        with torch.enable_grad():
            action = agent.act(obs, first, explore)
        assert action.shape == (3, N) and torch.equal(action.sum(-1), torch.ones(3))
        assert not action.requires_grad and agent._act_state is not None
        assert not any(v.requires_grad for v in agent._act_state.values())
    assert not tensors_with_graph()
