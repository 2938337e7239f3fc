from __future__ import annotations

import gc
import math

import numpy as np
import pytest
import torch
from support import tensors_with_graph

from agents.dreamer import SIZES, ActionSpec, DreamerAgent, DreamerSize
from agents.dreamer.networks import make_actor, make_encoder
from config import DreamerConfig, UserError

OBS, ACT = 3, 1


@pytest.fixture(autouse=True)
def test_size(monkeypatch: pytest.MonkeyPatch) -> None:
    """A size smaller than ``tiny`` so the suite stays fast."""
    monkeypatch.setitem(SIZES, "test", DreamerSize(deter=32, units=32, layers=1, groups=4, classes=4, model_lr=1e-4))


def make(seed: int = 0, **overrides: float | int | str) -> DreamerAgent:
    cfg = DreamerConfig(size="test", horizon=5, **overrides)  # type: ignore[arg-type]
    return DreamerAgent((OBS,), ActionSpec("box", ACT), cfg, torch.device("cpu"), seed)


def toy_sequences(batch: int = 8, length: int = 12, seed: int = 0) -> dict[str, np.ndarray]:
    """A linear system ``x' = 0.9 x + 0.5 a`` with reward ``-|x_0|``; episodes of 6 steps."""
    rng = np.random.default_rng(seed)
    obs = np.zeros((batch, length, OBS), np.float32)
    next_obs = np.zeros_like(obs)
    action = rng.uniform(-1, 1, (batch, length, ACT)).astype(np.float32)
    is_first = np.zeros((batch, length), np.bool_)
    x = rng.normal(size=(batch, OBS)).astype(np.float32)
    for t in range(length):
        if t % 6 == 0:
            x = rng.normal(size=(batch, OBS)).astype(np.float32)
            is_first[:, t] = True
        obs[:, t] = x
        x = 0.9 * x + 0.5 * action[:, t]
        next_obs[:, t] = x
    terminated = np.zeros((batch, length), np.bool_)
    terminated[:, 5::6] = True
    reward = -np.abs(next_obs[..., 0]).astype(np.float32)
    return {
        "obs": obs,
        "action": action,
        "reward": reward,
        "next_obs": next_obs,
        "terminated": terminated,
        "truncated": np.zeros_like(terminated),
        "is_first": is_first,
    }


def test_train_step_returns_floats_and_leaves_no_graph() -> None:
    agent = make()
    metrics = agent.train_step(toy_sequences())
    for key in ("reconstruction", "reward", "continue", "kl_dyn", "kl_rep", "actor_loss", "critic_loss", "finite"):
        assert type(metrics[key]) is float, key
    assert metrics["finite"] == 1.0
    agent.act(torch.zeros(4, OBS), torch.ones(4, dtype=torch.bool), explore=True)
    gc.collect()
    assert tensors_with_graph() == []


def test_losses_fall_on_a_toy_system() -> None:
    agent = make(seed=1, model_lr=3e-3, critic_lr=1e-3)
    seq = toy_sequences()
    history = [agent.train_step(seq) for _ in range(120)]
    # the critic chases moving imagined returns, so it is held to a weaker bar than the model
    for key, factor in (("reconstruction", 0.5), ("reward", 0.5), ("continue", 0.5), ("critic_loss", 0.8)):
        first = np.mean([m[key] for m in history[:5]])
        last = np.mean([m[key] for m in history[-5:]])
        assert last < factor * first, (key, first, last)
    assert all(m["finite"] == 1.0 for m in history)


def test_act_keeps_a_detached_state_per_env_and_restarts_where_is_first() -> None:
    agent = make()
    obs = torch.randn(3, OBS)
    first = agent.act(obs, torch.ones(3, dtype=torch.bool), explore=False)
    assert first.shape == (3, ACT) and float(first.abs().max()) <= 1.0
    assert first.grad_fn is None and not first.requires_grad
    agent.act(obs, torch.tensor([True, False, False]), explore=False)
    state = agent._act_state
    assert state is not None and all(not v.requires_grad and v.grad_fn is None for v in state.values())
    assert state["deter"].shape == (3, 32) and state["stoch"].shape == (3, 4, 4)
    assert torch.all(state["deter"][0] == 0) and torch.all(state["deter"][1:].abs().sum(-1) > 0)  # 0 restarted
    agent.reset_state()
    agent.act(obs[:2], torch.zeros(2, dtype=torch.bool), explore=False)  # a fresh state: every env starts
    assert agent._act_state is not None and torch.all(agent._act_state["deter"] == 0)
    explored = agent.act(obs, torch.zeros(3, dtype=torch.bool), explore=True)
    assert explored.shape == (3, ACT) and float(explored.abs().max()) <= 1.0


def test_imagination_helpers_give_detached_transitions() -> None:
    agent = make()
    agent.train_step(toy_sequences())
    start = torch.randn(5, OBS)
    seen = []

    def policy(obs: torch.Tensor) -> torch.Tensor:
        seen.append(obs.shape)
        return torch.zeros(obs.shape[0], ACT)

    roll = agent.imagine_rollout(start, policy, steps=4)
    assert roll["obs"].shape == roll["next_obs"].shape == (4, 5, OBS)
    assert roll["action"].shape == (4, 5, ACT)
    assert roll["reward"].shape == roll["cont"].shape == roll["terminated"].shape == (4, 5)
    assert roll["terminated"].dtype == torch.bool and torch.equal(roll["obs"][0], start)
    assert torch.equal(roll["obs"][1:], roll["next_obs"][:-1]) and seen == [(5, OBS)] * 4
    assert all(v.grad_fn is None and not v.requires_grad for v in roll.values())
    fixed = agent.imagine_rollout(start, torch.zeros(4, 5, ACT), steps=4)
    assert fixed["action"].abs().sum() == 0
    score = agent.imagined_return(start, policy)
    own = agent.imagined_return(start, None, horizon=3)
    assert score.shape == own.shape == (5,) and score.grad_fn is None and torch.isfinite(score).all()


def test_state_tensors_round_trip_bit_exact() -> None:
    seq_a, seq_b, seq_c = (toy_sequences(seed=s) for s in range(3))
    agent = make(seed=0)
    agent.train_step(seq_a)
    agent.train_step(seq_b)
    agent.act(torch.randn(2, OBS), torch.ones(2, dtype=torch.bool), explore=True)
    tensors, extra = agent.state_tensors(), agent.extra_state()
    assert all(isinstance(v, torch.Tensor) for v in tensors.values())
    assert any(k.startswith("opt.wm.") for k in tensors) and "rng" in tensors
    assert "net.ac.return_lo" in tensors and any(k.startswith("net.ac.slow_critic.") for k in tensors)
    fresh = make(seed=123)
    fresh.load_state_tensors(tensors)
    fresh.load_extra_state(extra)
    assert fresh.train_steps == agent.train_steps == 2
    out_a, out_b = agent.train_step(seq_c), fresh.train_step(seq_c)
    assert out_a == out_b
    act_a = agent.act(torch.ones(2, OBS), torch.zeros(2, dtype=torch.bool), explore=True)
    act_b = fresh.act(torch.ones(2, OBS), torch.zeros(2, dtype=torch.bool), explore=True)
    assert torch.equal(act_a, act_b)
    after_a, after_b = agent.state_tensors(), fresh.state_tensors()
    assert sorted(after_a) == sorted(after_b)
    assert [k for k in after_a if not torch.equal(after_a[k], after_b[k])] == []


def test_a_nan_batch_is_reported_not_raised_and_leaves_weights_finite() -> None:
    agent = make()
    before = agent.state_tensors()
    seq = toy_sequences()
    seq["next_obs"][0, 3, 0] = np.nan
    metrics = agent.train_step(seq)
    assert metrics["finite"] == 0.0 and math.isnan(metrics["reconstruction"])
    after = agent.state_tensors()
    assert all(torch.equal(before[k], after[k]) for k in before if k.startswith("net.wm."))
    assert all(torch.isfinite(v).all() for k, v in after.items() if v.is_floating_point())


def test_unsupported_spaces_and_sizes_are_one_line_errors() -> None:
    with pytest.raises(UserError, match="not supported"):
        make_encoder((64, 64), 32, 1, [4, 8, 8], 16)
    with pytest.raises(UserError, match="too small"):
        make_encoder((4, 20, 84), 32, 1, [4, 8, 8], 16)
    with pytest.raises(UserError, match="not supported"):
        make_actor(ActionSpec("multi_discrete", 4), 16, 32, 1)
    with pytest.raises(UserError, match="dreamer.size"):
        DreamerAgent((OBS,), ActionSpec("box", ACT), DreamerConfig(size="huge"), torch.device("cpu"), 0)


def test_the_package_is_math_only() -> None:
    import subprocess
    import sys

    code = (
        "import sys, agents.dreamer; print(sorted(m for m in sys.modules if m.split('.')[0] in ('training', 'cloud')))"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert out.strip() == "[]"


def test_trains_on_the_replay_sequence_sampler() -> None:
    from training.replay import ReplayBuffer, Transitions

    streams, rng = 2, np.random.default_rng(0)
    replay = ReplayBuffer(60, streams, OBS, ACT, seed=0)
    for t in range(40):  # wraps the ring: 30 rows
        obs = rng.normal(size=(streams, OBS)).astype(np.float32)
        first, no = np.full(streams, t % 7 == 0), np.zeros(streams, np.bool_)
        replay.add(Transitions(obs, np.zeros((streams, ACT), np.float32), obs[:, 0], obs + 0.1, no, no, first))
    metrics = make().train_step(replay.sample_sequences(4, 10))
    assert metrics["finite"] == 1.0


def test_the_world_model_learning_rate_is_the_size_presets_unless_set() -> None:
    assert make().optimizers["wm"].param_groups[0]["lr"] == 1e-4  # the test size's preset
    assert make(model_lr=3e-4).optimizers["wm"].param_groups[0]["lr"] == 3e-4
    assert SIZES["tiny"].model_lr == 6e-4 and SIZES["large"].model_lr == 1e-4
