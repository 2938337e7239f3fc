"""The population on Atari Pong end to end (tiny sizes): CNN members learn from uint8 frames stored
once in the trainer's FrameReplay, checkpoint (start-frame shards included) and resume bit for bit."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import numpy as np
import pytest
import torch
from support import TINY_PONG, tensors_with_graph
from test_trainer import assert_same_run, metrics, resume, train

from agents.sac_discrete import DiscreteSACPopulation
from cloud import checkpoint as ckpt
from config import Config, UserError
from training import runs
from training.frames import START_SHARD, FrameReplay
from training.tools import evaluate as ev
from training.tools.loading import choose_member, open_generation, storages

pytest.importorskip("ale_py")

TinyConfig = Callable[..., Config]

TINY_CNN = {k: TINY_PONG[k] for k in ("agent.cnn_channels", "agent.cnn_features", "agent.hidden_sizes")}
PONG: dict[str, Any] = {
    **TINY_PONG,
    "evolution.elites": 1,
    "evolution.replace_fraction": 0.5,
    "evolution.crossover_prob": 0.5,
}


def test_a_pong_population_learns_from_frames_stored_once(tiny_config: TinyConfig) -> None:
    trainer = train(tiny_config({**PONG, "train.generations": 2}))  # ALE's seeded resets reload the ROM: ~0.1 s each
    assert isinstance(trainer.agent, DiscreteSACPopulation) and trainer.agent.encoder is not None
    replay = trainer.replay
    assert isinstance(replay, FrameReplay) and replay.frame_shape == (84, 84) and replay.stack == 4
    frame = 84 * 84
    assert replay.bytes_per_transition <= 1.2 * frame, replay.bytes_per_transition / frame
    assert 2 * 4 * frame / replay.bytes_per_transition >= 6  # vs stacked obs and next_obs
    assert trainer.counters.updates == 2 * 3 and len(replay) == replay.capacity
    record = metrics(trainer.cfg)[-1]
    assert np.isfinite(record["members"]["critic_loss"]).all()
    assert record["replay_filled_mb"] <= 1.2 * frame * replay.capacity / 2**20 + 0.1
    blobs = ckpt.load(trainer.storage, trainer.run_name, 1).blobs
    assert any(name.startswith(START_SHARD) for name in blobs) and len(blobs) > 2  # rows in several shards
    assert not tensors_with_graph()
    gen = open_generation(storages(trainer.cfg.run.run_dir), trainer.run_name, 1)  # `main.py evaluate`'s path
    seeds = [int(s) for s in trainer._evaluation_seeds(1)]
    assert float(np.mean(ev.evaluate(gen, choose_member(gen, "elite"), seeds).returns)) == record["fitness_best"]


def test_a_stopped_and_resumed_pong_run_equals_the_uninterrupted_run(tiny_config: TinyConfig) -> None:
    straight = train(tiny_config({**PONG, "train.generations": 2, "run.name": "straight"}))
    stopped = tiny_config({**PONG, "train.generations": 1, "run.name": "stopped"})
    first = train(stopped)
    resumed = resume(stopped, extra={"train.generations": 2})  # the resumed generation wraps the ring
    assert isinstance(resumed.replay, FrameReplay) and resumed.replay.filled_rows == resumed.replay.rows
    assert resumed.replay.start_written == straight.replay.start_written
    assert_same_run(straight, resumed)
    assert not torch.equal(*(t.agent.member_tensors()["encoder.weights.0"] for t in (resumed, first)))  # it learned


def test_a_frame_replay_too_large_for_ram_warns_when_the_trainer_builds_it(
    tiny_config: TinyConfig, monkeypatch: pytest.MonkeyPatch
) -> None:
    import training.replay

    class Tiny:
        available = 2**20

    monkeypatch.setattr(training.replay.psutil, "virtual_memory", lambda: Tiny())
    with pytest.warns(UserWarning, match=r"replay buffer needs .* lower replay.capacity"):
        trainer = runs.start(tiny_config({**PONG, "train.generations": 1}))
    trainer.close()


def test_frame_stacks_the_members_cannot_take_are_refused_in_one_line(
    tiny_config: TinyConfig, custom_envs: str
) -> None:
    with pytest.raises(UserError, match=r"frames of 8x8 are too small for the CNN members") as refused:
        runs.start(tiny_config({"env.id": "custom_envs.pixels:SmallStacksEnv", "run.name": "small"}))
    assert "\n" not in str(refused.value)
    cfg = tiny_config({"env.id": "custom_envs.pixels:UnstackedFramesEnv", "run.name": "unstacked", **TINY_CNN})
    trainer = runs.start(cfg)  # (3, 40, 40) uint8 passes the space check, but is no frame stack
    try:
        with pytest.raises(UserError, match=r"next_obs is not obs shifted by one frame \(image observations must"):
            trainer.train()
    finally:
        trainer.close()


def test_cnn_members_learn_to_see(tiny_config: TinyConfig, custom_envs: str) -> None:
    # A square on the left or right of each 36x36 frame names the rewarded action: a blind policy
    # scores ~10 of 20, one that sees 20. 120 optimizer steps suffice (the encoder learns from the
    # critics' loss alone, the actor from its detached features).
    cfg = {
        "env.id": "custom_envs.pixels:StackedPointLeftRight",
        "env.max_episode_steps": 0,
        "population": 2,
        "agent.cnn_channels": [8, 16, 16],
        "agent.cnn_features": 32,
        "agent.hidden_sizes": [32],
        "agent.batch_size": 32,
        "agent.actor_lr": 1e-3,
        "agent.critic_lr": 1e-3,
        "agent.gamma": 0.95,
        "train.generations": 2,
        "train.steps_per_generation": 40,
        "train.updates_per_generation": 60,
        "train.accumulation_steps": 1,
        "train.warmup_steps": 200,
        "train.eval_episodes": 2,
        "evolution.elites": 1,
    }
    trainer = train(tiny_config(cfg))
    assert trainer.counters.best_fitness[-1] == 20.0, trainer.counters.best_fitness
