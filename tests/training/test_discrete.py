"""Discrete actions through the whole trainer (CartPole-v1): one-hot rows in the replay, the discrete
SAC population chosen automatically, its hyperparameters evolved, bit-exact resume, the Dreamer
member's categorical actor for a generation, refusals of unsupported spaces, and a short learning run."""

from __future__ import annotations

import json
from collections.abc import Callable
from pathlib import Path
from subprocess import CompletedProcess
from typing import Any

import numpy as np
import pytest
from support import assert_members_equal, tensors_with_graph
from test_dreamer_member import DREAMER
from test_trainer import RICH, assert_same_run, lineage, metrics, resume, train

from agents.sac_discrete import DiscreteSACPopulation
from agents.td3 import TD3Population
from config import Config, UserError
from training import runs
from training.envs import EnvPool, make_env
from training.rollout import rollout
from training.trainer import Trainer

TinyConfig = Callable[..., Config]

CARTPOLE = {"env.id": "CartPole-v1"}


def test_a_discrete_run_stores_one_hot_actions_and_evolves_sac_hyperparameters(tiny_config: TinyConfig) -> None:
    trainer = train(tiny_config({**CARTPOLE, "train.generations": 2, "evolution.replace_fraction": 0.5}))
    assert isinstance(trainer.agent, DiscreteSACPopulation) and trainer.agent.act_dim == 2
    actions = trainer.replay.data["action"][: trainer.replay.filled_rows]  # (T, E, 2)
    assert actions.shape[-1] == 2 and set(np.unique(actions).tolist()) == {0.0, 1.0}
    np.testing.assert_array_equal(actions.sum(-1), 1.0)
    warmup = actions[:25, :, 1]  # debug preset: 100 warm-up transitions over 4 streams, uniformly random
    assert 0.3 < warmup.mean() < 0.7
    record = metrics(trainer.cfg)[-1]
    assert {"alpha", "entropy", "target_entropy", "critic_loss", "actor_loss"} <= set(record["members"])
    assert "exploration_noise" not in record["members"]
    events = [json.loads(line) for line in lineage(trainer.cfg)]
    assert events and all("target_entropy" in e and "exploration_noise" not in e for e in events)
    assert not tensors_with_graph()


def test_agent_algorithm_can_name_the_variant_and_is_checked_against_the_env(tiny_config: TinyConfig) -> None:
    trainer = train(tiny_config({**CARTPOLE, "train.generations": 1, "agent.algorithm": "sac_discrete"}))
    assert isinstance(trainer.agent, DiscreteSACPopulation)
    assert isinstance(train(tiny_config({"train.generations": 1, "run.name": "box"})).agent, TD3Population)
    with pytest.raises(UserError, match="needs box actions but the env has discrete actions"):
        runs.start(tiny_config({**CARTPOLE, "agent.algorithm": "td3", "run.name": "wrong"}))


def test_a_stopped_and_resumed_discrete_run_equals_the_uninterrupted_run(tiny_config: TinyConfig) -> None:
    rich = {**RICH, **CARTPOLE}
    straight = train(tiny_config({**rich, "train.generations": 3, "run.name": "straight"}))
    stopped = tiny_config({**rich, "train.generations": 2, "run.name": "stopped"})
    train(stopped)
    resumed = resume(stopped, extra={"train.generations": 3})
    assert resumed.replay.filled_rows == resumed.replay.rows  # the ring wrapped during the run
    assert_same_run(straight, resumed)
    assert len(lineage(straight.cfg)) > 0  # evolution happened, so resume restored it too


def test_the_dreamer_member_plays_cartpole_with_a_categorical_actor(tiny_config: TinyConfig) -> None:
    straight = train(tiny_config({**CARTPOLE, **DREAMER, "train.generations": 2, "run.name": "straight"}))
    assert straight.dreamer is not None and straight.dreamer.agent.action.kind == "discrete"
    record = metrics(straight.cfg)[-1]
    assert record["dreamer_updates"] >= 1 and record["dreamer_finite"] == 1.0
    assert np.isfinite(record["dreamer_fitness"]) and record["dreamer_fitness"] >= 8  # CartPole lasts >= 8 steps
    stopped = tiny_config({**CARTPOLE, **DREAMER, "train.generations": 1, "run.name": "stopped"})
    train(stopped)
    resumed = resume(stopped, extra={"train.generations": 2})
    assert resumed.dreamer is not None
    assert_members_equal(straight.dreamer.agent.state_tensors(), resumed.dreamer.agent.state_tensors())
    assert [r["dreamer_fitness"] for r in metrics(resumed.cfg)] == [r["dreamer_fitness"] for r in metrics(straight.cfg)]
    assert_same_run(straight, resumed)
    obs = straight.dreamer.pool.reset(np.array([0]))  # acting through act_streams, as rollouts do
    action = straight.dreamer.act_streams(obs, np.ones(1, np.bool_), explore=True)
    assert action.shape == (1, 2) and action.sum() == 1.0 and set(action.ravel().tolist()) == {0.0, 1.0}


@pytest.mark.parametrize(
    ("env", "message"),
    [
        ("custom_envs.toy:MultiDiscreteEnv", "action space MultiDiscrete"),
        ("custom_envs.toy:MultiBinaryEnv", "action space MultiBinary"),
        ("custom_envs.toy:TupleObsEnv", "observation space Tuple"),
        ("custom_envs.toy:DictObsEnv", "observation space Dict"),
    ],
)
def test_unsupported_spaces_are_refused_in_one_line(
    run_cli: Callable[..., CompletedProcess[str]], tmp_path: Path, env: str, message: str
) -> None:
    result = run_cli("--preset", "debug", "--env", env, "--run-dir", str(tmp_path / "runs"))
    assert result.returncode == 2, result.stderr
    assert "Traceback" not in result.stderr + result.stdout
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: ") and message in lines[0]
    assert "supported: flat Box observations" in lines[0] and "Discrete actions" in lines[0]


# ---------------------------------------------------------------- it learns


def held_out_return(trainer: Trainer, slot: int, episodes: int = 10) -> float:
    """Mean noise-free return of member ``slot`` over ``episodes`` fresh CartPole episodes."""
    pool = EnvPool(lambda: make_env(trainer.cfg.env), trainer.population * episodes)
    seeds = np.random.SeedSequence([trainer.cfg.run.seed, 10**6]).generate_state(len(pool)) % 2**31
    result = rollout(trainer.agent, pool, None, seeds, explore=False, episodes_per_stream=1)
    pool.close()
    return float(result.member_fitness(trainer.population, 1)[slot])


def _cartpole_run(tiny_config: TinyConfig, seed: int) -> tuple[Trainer, dict[str, Any]]:
    """4 members, ~4-6k env steps, 1,000 updates each (~15 s on one core)."""
    cfg = tiny_config(
        {
            "population": 4,
            "replay.capacity": 20_000,
            "train.generations": 4,
            "train.updates_per_generation": 250,
            "train.warmup_steps": 1_000,
            "evolution.elites": 1,
            "run.save_replay": False,
            "run.seed": seed,
        },
        preset="cartpole",
    )
    trainer = train(cfg)
    return trainer, metrics(cfg)[-1]


def test_a_small_cartpole_run_learns_far_above_random(tiny_config: TinyConfig) -> None:
    """A random policy lasts ~22 steps; the elite's held-out mean was 328 / 151 / 335 for seeds 0 / 1 / 2."""
    trainer, record = _cartpole_run(tiny_config, seed=0)
    assert trainer.counters.env_steps < 8_000
    assert held_out_return(trainer, record["elite_slot"]) > 100


@pytest.mark.slow
@pytest.mark.parametrize("seed", [1, 2])
def test_the_cartpole_learning_holds_for_other_seeds(tiny_config: TinyConfig, seed: int) -> None:
    trainer, record = _cartpole_run(tiny_config, seed)
    assert held_out_return(trainer, record["elite_slot"]) > 100
