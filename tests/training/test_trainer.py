from __future__ import annotations

import json
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
from support import assert_members_equal, live_storages, metrics, tensors_with_graph, train

from agents.sac_discrete import DiscreteSACPopulation
from agents.td3 import TD3Population
from cloud import checkpoint as ckpt
from config import Config, UserError
from training import runs
from training.trainer import Trainer, TrainingDiverged, evolved_hyperparameters

TinyConfig = Callable[..., Config]

# Small but complete: two envs per member, crossover and adaptive mutation on, and a replay
# that wraps around during the run, so a resume has every kind of state to get right.
RICH = {
    "env.envs_per_member": 2,
    "replay.capacity": 1000,
    "evolution.crossover_prob": 0.5,
    "evolution.adaptive_mutation": True,
}


def resume(cfg: Config, **overrides: Any) -> Trainer:
    trainer = runs.resume(cfg.run.run_dir, cfg.run.name, overrides)
    try:
        trainer.train()
    finally:
        trainer.close()
    return trainer


def lineage(cfg: Config) -> list[str]:
    return (Path(cfg.run.run_dir) / cfg.run.name / "lineage.jsonl").read_text().splitlines()


def assert_same_run(a: Trainer, b: Trainer) -> None:
    """Bit-identical agents, replay, evolution state, counters and fitness history."""
    assert_members_equal(a.agent.member_tensors(), b.agent.member_tensors())
    assert a.agent.extra_state() == b.agent.extra_state()
    for name in a.replay.data:
        np.testing.assert_array_equal(a.replay.data[name], b.replay.data[name], err_msg=name)
    assert (a.replay.cursor, a.replay.filled_rows) == (b.replay.cursor, b.replay.filled_rows)
    assert a.replay.rng.bit_generator.state == b.replay.rng.bit_generator.state
    assert a.evolution.state() == b.evolution.state()
    for counter in ("generation", "env_steps", "updates", "best_fitness"):
        assert getattr(a.counters, counter) == getattr(b.counters, counter), counter
    assert [m["members"]["fitness"] for m in metrics(a.cfg)] == [m["members"]["fitness"] for m in metrics(b.cfg)]
    assert lineage(a.cfg) == lineage(b.cfg)


# ---------------------------------------------------------------- one generation


def test_a_generation_collects_learns_evaluates_and_checkpoints(tiny_config: TinyConfig) -> None:
    cfg = tiny_config({"train.generations": 2})
    trainer = train(cfg)
    c = trainer.counters
    assert c.generation == 2
    explore, evaluate = 50 * 4, 50 * 4  # debug preset: 50 steps, episodes cut at 50 steps, 4 members
    assert c.env_steps == 2 * (explore + evaluate) == len(trainer.replay)
    assert c.updates == 2 * 8
    records = metrics(cfg)
    assert [r["generation"] for r in records] == [0, 1]
    assert all(len(r["members"]["fitness"]) == 4 for r in records)
    assert all(r["rss_mb"] > 0 for r in records)  # memory is recorded every generation
    assert set(records[-1]["members"]) >= {"fitness", "critic_loss", "actor_loss", "actor_lr", "gamma"}
    storage = trainer.storage
    assert ckpt.generations(storage, cfg.run.name) == [1, 0]
    assert (Path(cfg.run.run_dir) / cfg.run.name / "config.yaml").is_file()


def test_no_learning_before_warmup(tiny_config: TinyConfig) -> None:
    cfg = tiny_config({"train.generations": 1, "train.warmup_steps": 10_000, "replay.capacity": 20_000})
    trainer = runs.start(cfg)
    trainer.learn = lambda bar: {"diverged": np.zeros(4, bool)}  # type: ignore[method-assign]
    trainer.train()
    trainer.close()
    assert trainer.counters.env_steps >= 10_000  # the warm-up ran although steps_per_generation is 50


def test_warmup_takes_uniform_random_actions_step_by_step_even_without_exploration(tiny_config: TinyConfig) -> None:
    # 4 streams; warm-up 100 transitions = 25 rows; no exploration steps configured at all
    cfg = tiny_config({"train.generations": 2, "train.steps_per_generation": 0, "train.eval_to_replay": False})
    trainer = train(cfg)
    actions = trainer.replay.data["action"][: trainer.replay.filled_rows]
    assert trainer.replay.filled_rows == 25  # the warm-up happened once, in generation 1
    assert actions.min() < -0.9 and actions.max() > 0.9 and abs(actions.mean()) < 0.2
    assert trainer.counters.updates == 2 * 8  # and learning started in generation 1


def test_every_member_is_evaluated_from_the_same_start_states(tiny_config: TinyConfig) -> None:
    cfg = tiny_config({"train.generations": 2, "env.envs_per_member": 2, "train.eval_episodes": 2})
    trainer = runs.start(cfg)
    seen: list[np.ndarray] = []
    reset = trainer.pool.reset
    trainer.pool.reset = lambda seeds: (seen.append(seeds.copy()), reset(seeds))[1]  # type: ignore[method-assign]
    trainer.train()
    trainer.close()
    explore_1, evaluate_1, explore_2, evaluate_2 = seen
    assert len(set(explore_1.tolist())) == 8  # exploration: a seed per stream
    for evaluate in (evaluate_1, evaluate_2):
        per_member = evaluate.reshape(4, 2)
        assert (per_member == per_member[0]).all() and per_member[0, 0] != per_member[0, 1]
    assert not np.array_equal(evaluate_1, evaluate_2)  # new start states every generation


def test_old_checkpoints_are_pruned(tiny_config: TinyConfig) -> None:
    trainer = train(tiny_config({"train.generations": 4, "run.keep_checkpoints": 2}))
    assert ckpt.generations(trainer.storage, trainer.run_name) == [3, 2]


def test_checkpoints_without_the_replay_hold_no_shard_and_resume(tiny_config: TinyConfig) -> None:
    cfg = tiny_config({"train.generations": 3, "run.save_replay": False, "run.replay_shard_mb": 0.001})
    trainer = train(cfg)
    assert trainer.replay.shard_rows < 100 < trainer.replay.filled_rows  # several shards, most unchanged
    assert ckpt.load(trainer.storage, trainer.run_name, 2).blobs == {}
    assert not (trainer.storage.root / trainer.run_name / ckpt.OBJECTS).exists()
    resumed = resume(cfg, extra={"train.generations": 4})
    assert resumed.counters.generation == 4


def test_a_run_name_is_not_reused(tiny_config: TinyConfig) -> None:
    train(tiny_config({"train.generations": 1}))
    with pytest.raises(UserError, match="already exists"):
        runs.start(tiny_config({"train.generations": 1}))


# ---------------------------------------------------------------- determinism


def test_same_seed_gives_identical_runs(tiny_config: TinyConfig) -> None:
    a = train(tiny_config({**RICH, "train.generations": 2, "run.name": "a"}))
    b = train(tiny_config({**RICH, "train.generations": 2, "run.name": "b"}))
    assert_same_run(a, b)


def test_different_seeds_give_different_runs(tiny_config: TinyConfig) -> None:
    a = train(tiny_config({"train.generations": 1, "run.name": "a", "run.seed": 1}))
    b = train(tiny_config({"train.generations": 1, "run.name": "b", "run.seed": 2}))
    ta, tb = a.agent.member_tensors(), b.agent.member_tensors()
    assert not torch.equal(ta["actor.layers.0.weight"], tb["actor.layers.0.weight"])
    assert not np.array_equal(a.replay.data["obs"], b.replay.data["obs"])


# ---------------------------------------------------------------- resume


def test_stopped_and_resumed_run_equals_the_uninterrupted_run(tiny_config: TinyConfig) -> None:
    straight = train(tiny_config({**RICH, "train.generations": 3, "run.name": "straight"}))
    stopped = tiny_config({**RICH, "train.generations": 2, "run.name": "stopped"})
    train(stopped)
    resumed = resume(stopped, extra={"train.generations": 3})
    assert resumed.replay.filled_rows == resumed.replay.rows  # the ring wrapped during the run
    assert_same_run(straight, resumed)


def test_resume_falls_back_past_a_corrupted_checkpoint(tiny_config: TinyConfig, capsys: Any) -> None:
    straight = train(tiny_config({**RICH, "train.generations": 3, "run.name": "straight"}))
    stopped = tiny_config({**RICH, "train.generations": 3, "run.name": "stopped"})
    train(stopped)
    newest = Path(stopped.run.run_dir) / "stopped" / "gen-000002" / "tensors.safetensors"
    blob = bytearray(newest.read_bytes())
    blob[len(blob) // 2] ^= 0xFF
    newest.write_bytes(bytes(blob))
    resumed = resume(stopped)  # reruns generation 3 from generation 2's checkpoint
    out = capsys.readouterr().out
    assert "generation 3 rejected" in out and "does not match its manifest" in out
    assert "removed the manifest of rejected generation 3" in out
    assert "resuming run 'stopped' after generation 2" in out
    assert_same_run(straight, resumed)


def test_resume_can_extend_a_run_more_than_once(tiny_config: TinyConfig) -> None:
    cfg = tiny_config({"train.generations": 1})
    train(cfg)
    assert resume(cfg, extra={"train.generations": 2}).counters.generation == 2
    assert resume(cfg, extra={"train.generations": 3}).counters.generation == 3
    assert [r["generation"] for r in metrics(cfg)] == [0, 1, 2]


def test_resume_of_a_finished_run_has_nothing_to_do(tiny_config: TinyConfig) -> None:
    cfg = tiny_config({"train.generations": 1})
    train(cfg)
    trainer = runs.resume(cfg.run.run_dir, cfg.run.name, {})
    assert trainer.train() == {}
    trainer.close()
    assert trainer.counters.generation == 1


@pytest.mark.parametrize(
    ("overrides", "named"),
    [
        ({"overrides": ["agent.actor_lr=0.001"]}, "agent.actor_lr"),
        ({"extra": {"population": 5}}, "population"),
        ({"extra": {"run.seed": 7}}, "run.seed"),
    ],
)
def test_resume_refuses_a_config_change_naming_the_key(
    tiny_config: TinyConfig, overrides: dict[str, Any], named: str
) -> None:
    cfg = tiny_config({"train.generations": 1})
    train(cfg)
    with pytest.raises(UserError, match=rf"cannot resume run 'test' with a changed config: {named}"):
        runs.resume(cfg.run.run_dir, cfg.run.name, overrides)


def test_a_run_written_before_a_config_section_existed_resumes(
    tiny_config: TinyConfig, monkeypatch: pytest.MonkeyPatch
) -> None:
    cfg = tiny_config({"train.generations": 1})
    full = Config.to_dict
    with monkeypatch.context() as patch:  # the checkpoint and run.json of a version without ``dreamer``
        patch.setattr(Config, "to_dict", lambda self: {k: v for k, v in full(self).items() if k != "dreamer"})
        train(cfg)
    assert resume(cfg, extra={"train.generations": 2}).counters.generation == 2


def test_a_checkpoint_from_before_the_restart_total_resumes_with_none(
    tiny_config: TinyConfig, monkeypatch: pytest.MonkeyPatch
) -> None:
    cfg = tiny_config({"train.generations": 1})
    full = Trainer.state

    def without_the_total(self: Trainer) -> ckpt.Checkpoint:  # a state.json of a version before the counter
        state = full(self)
        state.meta["counters"] = {k: v for k, v in state.meta["counters"].items() if k != "workers_restarted"}
        return state

    with monkeypatch.context() as patch:
        patch.setattr(Trainer, "state", without_the_total)
        train(cfg)
    resumed = resume(cfg, extra={"train.generations": 2})
    assert resumed.counters.generation == 2 and resumed.counters.workers_restarted == 0


def test_resume_without_a_checkpoint_is_refused(tiny_config: TinyConfig, tmp_path: Path) -> None:
    with pytest.raises(UserError, match="nothing to resume"):
        runs.resume(str(tmp_path / "empty"), "", {})


# ---------------------------------------------------------------- non-finite losses


def _poison(trainer: Trainer, members: list[int]) -> None:
    with torch.no_grad():
        for p in trainer.agent.critic1.parameters():
            p[members] = float("nan")


def test_a_member_with_non_finite_losses_gets_fitness_minus_inf_and_is_replaced(tiny_config: TinyConfig) -> None:
    trainer = runs.start(tiny_config({"train.generations": 1}))
    _poison(trainer, [1])
    trainer.train()
    trainer.close()
    record = metrics(trainer.cfg)[0]
    assert record["members"]["fitness"][1] == -np.inf
    assert all(np.isfinite(record["members"]["fitness"][i]) for i in (0, 2, 3))
    assert [json.loads(line)["slot"] for line in lineage(trainer.cfg)] == [1]
    for name, t in trainer.agent.member_tensors().items():
        assert torch.isfinite(t[1]).all(), name


def test_training_stops_when_every_member_diverged(tiny_config: TinyConfig) -> None:
    trainer = runs.start(tiny_config({"train.generations": 1}))
    _poison(trainer, [0, 1, 2, 3])
    with pytest.raises(TrainingDiverged, match="every member"):
        trainer.train()
    trainer.close()


# ---------------------------------------------------------------- MEMORY.md: flat memory over generations


def test_generations_leave_no_graph_and_no_growing_tensor_memory(tiny_config: TinyConfig) -> None:
    trainer = runs.start(tiny_config({"train.generations": 6, "replay.capacity": 400}))
    for generation in range(2):
        trainer.run_generation(generation)
    before = live_storages()
    for generation in range(2, 6):
        trainer.run_generation(generation)
    after = live_storages()
    trainer.close()
    assert not tensors_with_graph()
    assert len(after) <= len(before), f"{len(after) - len(before)} more live tensor storages"
    assert sum(after.values()) <= sum(before.values())


# ---------------------------------------------------------------- it learns


def _pendulum_best_fitness(tiny_config: TinyConfig, seed: int) -> list[float]:
    """About 16k env steps and 4k updates per member (~10 s on one CPU core)."""
    cfg = tiny_config(
        {
            "population": 4,
            "agent.hidden_sizes": [64, 64],
            "agent.batch_size": 128,
            "agent.actor_lr": 1e-3,
            "agent.critic_lr": 1e-3,
            "replay.capacity": 50_000,
            "train.generations": 10,
            "train.steps_per_generation": 200,
            "train.updates_per_generation": 400,
            "train.accumulation_steps": 1,
            "train.warmup_steps": 800,
            "evolution.elites": 1,
            "run.save_replay": False,
            "run.seed": seed,
            "run.name": f"pendulum-{seed}",
        },
        preset="pendulum",
    )
    return train(cfg).counters.best_fitness


def test_a_small_pendulum_run_improves_clearly(tiny_config: TinyConfig) -> None:
    """The best fitness of the last three generations beat the first generation's by 800 to 1700
    on every seed tried (0-4), from about -1600 for the untrained population."""
    best = _pendulum_best_fitness(tiny_config, seed=0)
    assert max(best[-3:]) > best[0] + 400, best


@pytest.mark.slow
@pytest.mark.parametrize("seed", [1, 2, 3, 4])
def test_the_pendulum_improvement_holds_for_other_seeds(tiny_config: TinyConfig, seed: int) -> None:
    best = _pendulum_best_fitness(tiny_config, seed)
    assert max(best[-3:]) > best[0] + 400, best


def test_exploration_noise_is_evolved_only_when_exploration_happens(tiny_config: TinyConfig) -> None:
    explores, no_exploration = tiny_config(), tiny_config({"train.steps_per_generation": 0})
    assert "exploration_noise" in evolved_hyperparameters(explores, TD3Population)  # debug preset: 50 noisy steps
    assert "exploration_noise" not in evolved_hyperparameters(no_exploration, TD3Population)
    both = ("actor_lr", "critic_lr", "gamma", "tau", "target_entropy")  # SAC explores by sampling: all kept
    assert evolved_hyperparameters(explores, DiscreteSACPopulation) == both
    assert evolved_hyperparameters(no_exploration, DiscreteSACPopulation) == both
