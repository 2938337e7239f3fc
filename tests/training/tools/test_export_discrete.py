"""``python main.py export`` of discrete-SAC members (``evorl-policy/2``): CartPole (MLP actor) and a
tiny Pong run (CNN encoder + MLP actor). The loaded policy's actions are the trainer's, and the env
its JSON describes is the one the trainer played."""

from __future__ import annotations

import dataclasses
import importlib
import json
from pathlib import Path
from typing import Any

import gymnasium as gym
import numpy as np
import pytest
import torch
from click.testing import CliRunner
from support import TINY_PONG

from agents import DiscretePolicy, load_policy
from agents.sac_discrete import DiscreteSACPopulation
from config import EnvConfig
from main import cli
from tests.training.tools.conftest import FinishedRun, finish_run
from training.envs import make_env
from training.tools import evaluate as ev
from training.tools.loading import MemberActor, choose_member, open_generation, storages

PONG: dict[str, Any] = {
    **TINY_PONG,
    "env.max_episode_steps": 30,  # evaluation episodes are cut, so the run takes seconds
    "train.steps_per_generation": 20,
    "train.updates_per_generation": 2,
    "train.accumulation_steps": 1,
    "train.warmup_steps": 20,
}


@pytest.fixture(scope="module")
def cartpole(tmp_path_factory: pytest.TempPathFactory) -> FinishedRun:
    """A debug-preset CartPole-v1 run of 2 generations (P=4, MLP actors)."""
    return finish_run(tmp_path_factory.mktemp("cartpole") / "runs", "cartpole", 2, **{"env.id": "CartPole-v1"})


@pytest.fixture(scope="module")
def pong(tmp_path_factory: pytest.TempPathFactory) -> FinishedRun:
    """One generation of a tiny Pong run (P=2, CNN members on (4, 84, 84) uint8 frame stacks)."""
    pytest.importorskip("ale_py")
    return finish_run(tmp_path_factory.mktemp("pong") / "runs", "pong", 1, **PONG)


def exported(run: FinishedRun, out: Path, *args: str) -> DiscretePolicy:
    result = CliRunner().invoke(cli, ["export", run.name, "--run-dir", str(run.run_dir), "--out", str(out), *args])
    assert result.exit_code == 0, result.output
    policy = load_policy(out)
    assert isinstance(policy, DiscretePolicy)
    return policy


def trainer_logits(agent: DiscreteSACPopulation, slot: int, obs: np.ndarray) -> np.ndarray:
    """Member ``slot``'s actor logits ``(N, actions)`` for ``obs (N, ...)`` by the population's own
    forward (the other members acting on zeros, as ``evaluate`` does)."""
    full = torch.zeros(agent.population, *obs.shape)
    full[slot] = torch.as_tensor(obs)
    with torch.inference_mode():
        return agent.actor(agent._features(full))[slot].numpy()


def trainer_actions(agent: DiscreteSACPopulation, slot: int, obs: np.ndarray) -> np.ndarray:
    """What the trainer sends to CartPole's/Pong's ``step`` (their Discrete spaces start at 0)."""
    return MemberActor(agent, slot, len(obs))(obs, np.zeros(len(obs), bool)).argmax(-1)


@pytest.mark.parametrize("rows", [1, 5, 40])
def test_an_exported_cartpole_member_acts_as_the_trainer_does(cartpole: FinishedRun, tmp_path: Path, rows: int) -> None:
    policy = exported(cartpole, tmp_path, "--member", "2")
    agent = cartpole.agent
    assert isinstance(agent, DiscreteSACPopulation) and policy.info["slot"] == 2
    obs = np.random.default_rng(rows).normal(size=(rows, 4)).astype(np.float32) * [1, 2, 0.2, 2]
    actions = policy(obs)
    assert actions.shape == (rows,) and actions.dtype == np.int64
    assert rows < 40 or set(actions.tolist()) == {0, 1}
    np.testing.assert_array_equal(actions, trainer_actions(agent, 2, obs))
    np.testing.assert_array_equal(policy.logits(obs), trainer_logits(agent, 2, obs))  # bit for bit
    assert policy(obs[0]).shape == () and policy(obs[0]) == actions[0]


def test_the_exported_cartpole_elite_plays_the_episode_evaluate_plays(cartpole: FinishedRun, tmp_path: Path) -> None:
    policy = exported(cartpole, tmp_path)
    env = make_env(EnvConfig(**policy.info["env"]))  # the README's loop
    obs, _ = env.reset(seed=0)
    total, done = 0.0, False
    while not done:
        obs, reward, terminated, truncated, _ = env.step(policy(obs))
        total, done = total + float(reward), terminated or truncated
    gen = open_generation(storages(str(cartpole.run_dir)), cartpole.name)
    assert [total] == ev.evaluate(gen, choose_member(gen, "elite"), [0]).returns


def test_an_exported_pong_member_acts_as_the_trainer_does(pong: FinishedRun, tmp_path: Path) -> None:
    policy = exported(pong, tmp_path, "--member", "1")
    agent = pong.agent
    assert isinstance(agent, DiscreteSACPopulation) and agent.encoder is not None
    frames = np.random.default_rng(0).integers(0, 256, size=(40, 4, 84, 84), dtype=np.uint8)
    for rows in (1, 5, 40):
        np.testing.assert_array_equal(policy(frames[:rows]), trainer_actions(agent, 1, frames[:rows]))
        # The trainer's grouped convolution over P members rounds unlike one member's: a few ulps.
        np.testing.assert_allclose(policy.logits(frames[:rows]), trainer_logits(agent, 1, frames[:rows]), atol=1e-6)
    agent.encoder.grouped = False  # the members one at a time: the same convolutions as the policy's
    try:
        np.testing.assert_array_equal(policy.logits(frames), trainer_logits(agent, 1, frames))
    finally:
        agent.encoder.grouped = True
    assert policy(frames[0]).shape == () and policy(frames[0]) == policy(frames[:1])[0]


def test_the_pong_json_describes_the_network_and_the_wrapped_env(pong: FinishedRun, tmp_path: Path) -> None:
    info = exported(pong, tmp_path).info
    assert info["format"] == "evorl-policy/2" and info["algorithm"] == "sac_discrete"
    arch = info["architecture"]
    assert arch["kind"] == "cnn_mlp" and arch["input"]["shape"] == [4, 84, 84] and arch["input"]["dtype"] == "uint8"
    assert arch["input"]["scaling"].startswith("x / 255")
    convs = arch["encoder"]["convolutions"]
    assert [(c["out_channels"], c["kernel"], c["stride"]) for c in convs] == [(4, 8, 4), (8, 4, 2), (8, 3, 1)]
    assert arch["encoder"]["linear"] == {"in": 8 * 7 * 7, "out": 16, "activation": "relu"}
    assert arch["head"]["sizes"] == [16, 16, 6] and arch["output"]["kind"] == "argmax"
    assert info["action_space"] == {"kind": "discrete", "n": 6, "start": 0}
    obs_space = {"kind": "box", "shape": [4, 84, 84], "dtype": "uint8", "low": 0.0, "high": 255.0}
    assert info["observation_space"] == obs_space
    assert info["env"] == dataclasses.asdict(pong.cfg.env)
    assert [w["call"].rpartition(".")[2] for w in info["env_wrappers"]] == [
        "make",
        "AtariPreprocessing",
        "FrameStackObservation",
        "TimeLimit",
    ]
    assert info["tensors"]["encoder.conv.0.weight"] == [4, 4, 8, 8] and info["config_hash"] == pong.cfg.hash()


def from_wrappers(described: list[dict[str, Any]]) -> gym.Env:
    """The env ``env_wrappers`` describes, built with gymnasium alone (what a user without the trainer does)."""
    env: gym.Env | None = None
    for step in described:
        if "needs" in step:
            gym.register_envs(importlib.import_module(step["needs"]))
        module, _, name = step["call"].rpartition(".")
        call = getattr(importlib.import_module(module), name)
        env = call(**step["args"]) if env is None else call(env, **step["args"])
    assert env is not None
    return env


def test_the_exported_pong_policy_plays_in_the_env_its_json_describes(pong: FinishedRun, tmp_path: Path) -> None:
    policy = exported(pong, tmp_path)
    gen = open_generation(storages(str(pong.run_dir)), pong.name)
    member = choose_member(gen, "elite")
    actor = MemberActor(pong.agent, policy.info["slot"])
    envs = [make_env(EnvConfig(**policy.info["env"])), from_wrappers(policy.info["env_wrappers"])]
    (obs, _), (rebuilt, _) = (env.reset(seed=0) for env in envs)
    total, steps, done = 0.0, 0, False
    while not done:
        np.testing.assert_array_equal(obs, rebuilt)
        action = policy(obs)
        assert action == actor(obs[None], np.zeros(1, bool)).argmax(-1)[0]
        (obs, reward, terminated, truncated, _), (rebuilt, *_) = (env.step(action) for env in envs)
        total, steps, done = total + float(reward), steps + 1, terminated or truncated
    assert steps == 30 and [total] == ev.evaluate(gen, member, [0]).returns
    assert json.loads((tmp_path / "policy.json").read_text())["env_wrappers"][-1]["args"] == {"max_episode_steps": 30}
