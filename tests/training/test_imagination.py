"""The Dreamer member's imagination for the population: model rollouts into a bounded model buffer
that members draw micro-batches from, and screening members in imagination before real evaluation."""

from __future__ import annotations

import math
from collections.abc import Callable
from typing import Any

import numpy as np
import pytest
from test_dreamer_member import DREAMER, assert_same_dreamer, run_without_graphs
from test_trainer import RICH, assert_same_run, metrics, resume, train

from config import Config, UserError
from training import runs
from training.report import status_block

TinyConfig = Callable[..., Config]

IMAGINE = {**DREAMER, "dreamer.imagine_after": 1}
ROLLOUTS = {**IMAGINE, "dreamer.model_rollouts": True, "dreamer.rollout_starts": 8, "dreamer.rollout_length": 3}
SCREEN = {**IMAGINE, "dreamer.screen": True, "dreamer.screen_starts": 8, "dreamer.screen_check_every": 3}


def test_model_rollouts_fill_a_bounded_model_buffer_the_members_learn_from(tiny_config: TinyConfig) -> None:
    plain = train(tiny_config({**DREAMER, "train.generations": 3, "run.name": "plain"}))
    trainer = train(tiny_config({**ROLLOUTS, "dreamer.model_buffer": 50, "train.generations": 3}))
    buffer = trainer.dreamer.model_buffer if trainer.dreamer is not None else None
    assert buffer is not None and len(buffer) == 50 and buffer.cursor < 50  # bounded: the oldest were evicted
    assert all(isinstance(a, np.ndarray) and np.isfinite(a.astype(float)).all() for a in buffer.data.values())
    assert len(trainer.replay) == len(plain.replay)  # imagined data never enters the real replay
    records = metrics(trainer.cfg)
    used = sum(r["dreamer_model_transitions"] for r in records)
    assert used > 0 and used == trainer.counters.model_micro_batches * trainer.population * trainer.cfg.agent.batch_size
    assert all(r["dreamer_model_added"] > 0 for r in records if r["dreamer_updates"] > 0)
    assert math.isfinite(records[-1]["dreamer_reward_error_h1"])


def test_imagination_waits_for_the_world_models_first_imagine_after_updates(tiny_config: TinyConfig) -> None:
    trainer = train(tiny_config({**ROLLOUTS, **SCREEN, "dreamer.imagine_after": 1000, "train.generations": 2}))
    assert trainer.dreamer is not None and trainer.dreamer.agent.train_steps > 0
    assert trainer.dreamer.model_buffer is not None and len(trainer.dreamer.model_buffer) == 0
    assert trainer.counters.model_micro_batches == 0
    assert not any("screen_evaluated" in r for r in metrics(trainer.cfg))


def test_the_model_fraction_of_micro_batches_is_spread_evenly_over_updates(tiny_config: TinyConfig) -> None:
    trainer = runs.start(tiny_config({**ROLLOUTS, "dreamer.model_fraction": 0.25, "train.accumulation_steps": 2}))
    try:
        assert trainer.model_micro_batches(0) == 0  # the buffer cannot give a batch yet
        assert trainer.dreamer is not None and trainer.dreamer.model_buffer is not None
        rows = {name: np.zeros((64, *a.shape[1:]), a.dtype) for name, a in trainer.dreamer.model_buffer.data.items()}
        trainer.dreamer.model_buffer.add(rows)
        counts = [trainer.model_micro_batches(u) for u in range(100)]
    finally:
        trainer.close()
    assert sum(counts) == 50 and set(counts) == {0, 1} and counts[:4] == [0, 1, 0, 1]


def test_screening_plays_only_the_elites_and_the_most_promising_members(tiny_config: TinyConfig) -> None:
    plain = train(tiny_config({**DREAMER, "train.generations": 3, "run.name": "plain"}))
    trainer = train(tiny_config({**SCREEN, "train.generations": 3}))
    records, baseline = metrics(trainer.cfg), metrics(plain.cfg)
    check, screened = records[0], records[1:]
    assert check["screen_evaluated"] == trainer.population and "screen_spearman" in check
    assert -1.0 <= check["screen_spearman"] <= 1.0
    for r, b in zip(screened, baseline[1:], strict=True):
        assert r["screen_evaluated"] == 2 and len(r["screened_out"]) == 2 and "screen_spearman" not in r
        assert r["screen_saved_steps"] > 0 and r["env_steps"] + r["screen_saved_steps"] == b["env_steps"]
        assert r["elite_slot"] not in r["screened_out"]
    assert "screened" in status_block(screened[-1])


def test_screened_out_members_rank_below_every_member_played_for_real(tiny_config: TinyConfig) -> None:
    trainer = runs.start(tiny_config({**SCREEN, "train.generations": 2}))
    try:
        trainer.run_generation(0)
        elites = list(trainer.evolution.elite_slots)
        fitness, figures = trainer.evaluate(1, _NoBar())
    finally:
        trainer.close()
    out = figures["screened_out"]
    played = [s for s in range(trainer.population) if s not in out]
    assert len(out) == 2 and set(elites) <= set(played)
    assert max(fitness[out]) < min(fitness[played])
    imagined = np.asarray(figures["screen_imagined"])
    assert list(np.argsort(-fitness[out])) == list(np.argsort(-imagined[out], kind="stable"))
    assert min(imagined[s] for s in played if s not in elites) >= max(imagined[out])


def test_imagination_for_the_population_leaves_no_graph(tiny_config: TinyConfig) -> None:
    trainer = run_without_graphs(tiny_config({**ROLLOUTS, **SCREEN, "train.generations": 3}))
    assert trainer.dreamer is not None and trainer.dreamer.model_buffer is not None
    assert len(trainer.dreamer.model_buffer) > 0 and trainer.counters.model_micro_batches > 0


def test_a_resumed_run_with_model_rollouts_and_screening_equals_the_uninterrupted_run(
    tiny_config: TinyConfig,
) -> None:
    both = {**RICH, **ROLLOUTS, **SCREEN}
    straight = train(tiny_config({**both, "train.generations": 4, "run.name": "straight"}))
    stopped = tiny_config({**both, "train.generations": 2, "run.name": "stopped"})
    train(stopped)
    resumed = resume(stopped, extra={"train.generations": 4})
    assert_same_run(straight, resumed)
    assert_same_dreamer(straight, resumed)
    assert straight.dreamer is not None and resumed.dreamer is not None
    a, b = straight.dreamer.model_buffer, resumed.dreamer.model_buffer
    assert a is not None and b is not None and len(a) > 0
    assert all(np.array_equal(a.data[name], b.data[name]) for name in a.data)
    assert [r.get("screened_out") for r in metrics(straight.cfg)] == [
        r.get("screened_out") for r in metrics(resumed.cfg)
    ]


def test_resume_with_model_rollouts_toggled_is_refused_in_one_line(tiny_config: TinyConfig) -> None:
    cfg = tiny_config({**ROLLOUTS, "train.generations": 1})
    train(cfg)
    toggle = {"extra": {"dreamer.model_rollouts": False}}
    with pytest.raises(UserError, match=r"dreamer\.model_rollouts=true") as refused:
        runs.resume(cfg.run.run_dir, cfg.run.name, toggle, allow=["dreamer.model_rollouts"])
    assert "\n" not in str(refused.value)


@pytest.mark.parametrize(
    ("extra", "message"),
    [
        ({**DREAMER, "dreamer.model_fraction": 1.5}, r"dreamer\.model_fraction must be in \[0, 1\]"),
        ({**DREAMER, "dreamer.screen_fraction": 0}, r"dreamer\.screen_fraction must be in \(0, 1\]"),
        ({**DREAMER, "dreamer.rollout_length": 0}, r"dreamer\.rollout_length must be >= 1"),
        ({"dreamer.model_rollouts": True}, "need the Dreamer member: set dreamer.enabled=true"),
        ({"dreamer.screen": True}, "need the Dreamer member"),
    ],
)
def test_bad_imagination_settings_are_one_line_errors(tiny_config: TinyConfig, extra: Any, message: str) -> None:
    with pytest.raises(UserError, match=message) as refused:
        tiny_config(extra)
    assert "\n" not in str(refused.value)


class _NoBar:
    def advance(self, amount: int = 1, phase: str = "") -> None:
        pass
