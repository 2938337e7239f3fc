"""The Dreamer member in the generation loop: losses and fitness recorded, no graph left at the
generation boundary, bit-exact resume, refused toggles, a NaN model handled like a diverged member."""

from __future__ import annotations

import math
from collections.abc import Callable
from typing import Any

import pytest
import torch
from support import assert_members_equal, tensors_with_graph
from test_trainer import RICH, assert_same_run, metrics, resume, train

from config import Config, UserError
from training import runs
from training.report import status_block
from training.trainer import Trainer

TinyConfig = Callable[..., Config]

# Tiny and fast: one update per ~256 env steps (the debug preset takes ~500 a generation).
DREAMER = {
    "dreamer.enabled": True,
    "dreamer.batch_size": 4,
    "dreamer.seq_len": 16,
    "dreamer.train_ratio": 1.0,
    "dreamer.horizon": 5,
}
LOSSES = ("reconstruction", "reward", "continue", "kl_dyn", "kl_rep")


def assert_same_dreamer(a: Trainer, b: Trainer) -> None:
    assert a.dreamer is not None and b.dreamer is not None
    assert_members_equal(a.dreamer.agent.state_tensors(), b.dreamer.agent.state_tensors())
    assert a.dreamer.state()[1] == b.dreamer.state()[1]
    runs_a, runs_b = metrics(a.cfg), metrics(b.cfg)
    assert [r["dreamer_fitness"] for r in runs_a] == [r["dreamer_fitness"] for r in runs_b]


def test_a_generation_with_the_dreamer_member_records_its_losses_and_fitness(
    tiny_config: TinyConfig, capsys: Any
) -> None:
    trainer = train(tiny_config({**DREAMER, "train.generations": 2}))
    records = metrics(trainer.cfg)
    last = records[-1]
    assert last["dreamer_updates"] >= 1 and trainer.dreamer is not None and trainer.dreamer.agent.train_steps >= 2
    assert all(math.isfinite(last[f"dreamer_{name}"]) for name in LOSSES)
    assert math.isfinite(last["dreamer_fitness"]) and last["dreamer_finite"] == 1.0
    assert 1 <= last["dreamer_rank"] <= trainer.population + 1
    out = capsys.readouterr().out
    assert f"rank {last['dreamer_rank']}/{trainer.population + 1}" in out and "kl_dyn" in out
    assert f"P={trainer.population} + Dreamer" in out
    assert 0.0 <= trainer.dreamer.carry < 1.0


def test_the_dreamer_members_episodes_are_not_added_to_the_replay(tiny_config: TinyConfig) -> None:
    without = train(tiny_config({"train.generations": 2, "run.name": "without"}))
    trainer = train(tiny_config({**DREAMER, "train.generations": 2}))
    assert len(trainer.replay) == len(without.replay)
    assert trainer.counters.env_steps > without.counters.env_steps  # its steps are counted


def run_without_graphs(cfg: Config) -> Trainer:
    """Run ``cfg``'s generations, asserting that no tensor holds a graph at each boundary."""
    trainer = runs.start(cfg)
    try:
        for generation in range(cfg.train.generations):
            trainer.run_generation(generation)
            assert not tensors_with_graph()
    finally:
        trainer.close()
    return trainer


def test_the_dreamer_member_leaves_no_graph_at_the_generation_boundary(tiny_config: TinyConfig) -> None:
    trainer = run_without_graphs(tiny_config({**DREAMER, "train.generations": 3}))
    assert trainer.dreamer is not None and trainer.dreamer.agent.train_steps > 0
    cached = trainer.dreamer.agent._act_state  # the acting filter state is kept detached
    assert cached is not None and not any(t.requires_grad for t in cached.values())


def test_a_stopped_and_resumed_run_with_the_dreamer_member_equals_the_uninterrupted_run(
    tiny_config: TinyConfig,
) -> None:
    straight = train(tiny_config({**RICH, **DREAMER, "train.generations": 3, "run.name": "straight"}))
    stopped = tiny_config({**RICH, **DREAMER, "train.generations": 2, "run.name": "stopped"})
    train(stopped)
    resumed = resume(stopped, extra={"train.generations": 3})
    assert_same_run(straight, resumed)
    assert_same_dreamer(straight, resumed)


@pytest.mark.parametrize("written_with", [True, False])
def test_resume_with_the_dreamer_member_toggled_is_refused_naming_the_key(
    tiny_config: TinyConfig, written_with: bool
) -> None:
    cfg = tiny_config({**DREAMER, "dreamer.enabled": written_with, "train.generations": 1})
    train(cfg)
    toggle = {"extra": {"dreamer.enabled": not written_with}}
    with pytest.raises(UserError, match=r"changed config: dreamer\.enabled \(") as refused:
        runs.resume(cfg.run.run_dir, cfg.run.name, toggle)
    assert "\n" not in str(refused.value)
    with pytest.raises(UserError, match=r"dreamer\.enabled=") as refused:  # even when the change is allowed
        runs.resume(cfg.run.run_dir, cfg.run.name, toggle, allow=["dreamer.enabled"])
    assert "\n" not in str(refused.value)


def test_a_non_finite_world_model_gives_fitness_minus_inf_and_no_traceback(
    tiny_config: TinyConfig, capsys: Any
) -> None:
    trainer = runs.start(tiny_config({**DREAMER, "train.generations": 2}))
    try:
        trainer.run_generation(0)
        assert trainer.dreamer is not None
        with torch.no_grad():
            for p in trainer.dreamer.agent.wm.parameters():
                p.fill_(float("nan"))
        record = trainer.run_generation(1)
    finally:
        trainer.close()
    assert record["dreamer_finite"] == 0.0 and record["dreamer_fitness"] == float("-inf")
    assert record["dreamer_rank"] == trainer.population + 1 and not record["dreamer_elite"]
    assert "NON-FINITE world-model loss" in status_block(record)
    assert math.isfinite(record["fitness_best"])  # the population goes on


@pytest.mark.parametrize(
    ("key", "value", "message"),
    [
        ("dreamer.size", "huge", "dreamer.size must be one of"),
        ("dreamer.train_ratio", 0, "dreamer.train_ratio must be > 0"),
        ("dreamer.seq_len", 0, "dreamer.seq_len must be >= 1"),
    ],
)
def test_bad_dreamer_values_are_one_line_errors(tiny_config: TinyConfig, key: str, value: Any, message: str) -> None:
    with pytest.raises(UserError, match=message) as refused:
        tiny_config({**DREAMER, key: value})
    assert "\n" not in str(refused.value)


def test_a_dreamer_member_of_another_size_is_refused_in_one_line(tiny_config: TinyConfig) -> None:
    cfg = tiny_config({**DREAMER, "train.generations": 1})
    train(cfg)
    with pytest.raises(UserError, match=r"does not fit dreamer\.\*") as refused:
        runs.resume(cfg.run.run_dir, cfg.run.name, {"extra": {"dreamer.size": "small"}}, allow=["dreamer.size"])
    assert "\n" not in str(refused.value)
