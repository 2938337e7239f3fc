"""``python main.py evaluate``: a member's noise-free episodes from a checkpoint, equal to the
trainer's own evaluation of that member from the same start states; bad input in one line."""

from __future__ import annotations

import json
import re
import types
from pathlib import Path

import numpy as np
import pytest
import torch
from click.testing import CliRunner, Result

from cloud import checkpoint as ckpt
from cloud.storage import LocalStorage
from main import cli
from tests.test_main import assert_one_line_user_error
from tests.training.tools.conftest import FinishedRun, finish_run
from training.tools import evaluate as ev
from training.tools.loading import choose_member, open_generation, storages
from training.trainer import Trainer


def invoke(*args: str) -> Result:
    return CliRunner().invoke(cli, list(args))


def trainer_seeds(run: FinishedRun, generation: int) -> np.ndarray:
    """The reset seeds the trainer's evaluation of ``generation`` used (its own function)."""
    fake = types.SimpleNamespace(cfg=run.cfg, pool=[None] * (run.cfg.population * run.cfg.env.envs_per_member))
    fake._seeds = lambda *args, **kwargs: Trainer._seeds(fake, *args, **kwargs)  # type: ignore[arg-type]
    return Trainer._evaluation_seeds(fake, generation)  # type: ignore[arg-type]


@pytest.mark.parametrize("generation", [0, 1, 2])
def test_the_elite_scores_what_the_trainer_measured_from_the_same_start_states(
    finished: FinishedRun, generation: int
) -> None:
    gen = open_generation(storages(str(finished.run_dir)), finished.name, generation)
    elite = choose_member(gen, "elite")
    record = finished.records()[generation]
    assert elite.slot == record["elite_slot"] and elite.fitness == record["fitness_best"]
    seeds = [int(s) for s in trainer_seeds(finished, generation)]
    episodes = ev.evaluate(gen, elite, seeds)
    assert float(np.mean(episodes.returns)) == record["fitness_best"]  # bit for bit: the same actions and sums
    assert episodes.lengths == [finished.cfg.env.max_episode_steps] * len(seeds)


def test_a_surviving_slot_scores_its_logged_fitness_and_a_replaced_one_has_none(finished: FinishedRun) -> None:
    gen = open_generation(storages(str(finished.run_dir)), finished.name, 1)
    replaced = {child for child, _ in gen.checkpoint.meta["evolution"]["pending"]}
    fitness = finished.records()[1]["members"]["fitness"]
    survivor = next(s for s in range(finished.cfg.population) if s not in replaced)
    member = choose_member(gen, str(survivor))
    assert member.fitness == fitness[survivor]
    assert float(np.mean(ev.evaluate(gen, member, trainer_seeds(finished, 1)).returns)) == fitness[survivor]
    assert all(choose_member(gen, str(s)).fitness is None for s in replaced)


def test_the_command_prints_the_returns_of_the_newest_generation(finished: FinishedRun) -> None:
    seed = int(trainer_seeds(finished, 2)[0])
    result = invoke(
        "evaluate", finished.name, "--run-dir", str(finished.run_dir), "--episodes", "1", "--seed", str(seed)
    )
    assert result.exit_code == 0, result.output
    best = finished.records()[2]["fitness_best"]
    assert f"run 'done' generation 3, member elite (slot {finished.records()[2]['elite_slot']})" in result.stdout
    assert f"return  mean {best:.2f}  std 0.00  min {best:.2f}  max {best:.2f}" in result.stdout
    assert "length  mean 50.0  min 50  max 50" in result.stdout


def test_episodes_have_their_own_seeds_and_repeat(finished: FinishedRun) -> None:
    args = ["evaluate", "--run-dir", str(finished.run_dir), "--generation", "2", "--member", "0", "--episodes", "3"]
    first, again = invoke(*args, "--seed", "7"), invoke(*args, "--seed", "7")
    assert first.exit_code == 0, first.output
    assert first.stdout == again.stdout
    assert "3 noise-free episode(s), reset seeds 7..9" in first.stdout
    gen = open_generation(storages(str(finished.run_dir)), finished.name, 1)
    single = [ev.evaluate(gen, choose_member(gen, "0"), [s]).returns[0] for s in (7, 8, 9)]
    together = ev.evaluate(gen, choose_member(gen, "0"), [7, 8, 9]).returns
    assert together == single
    assert len(set(together)) == 3  # different start states


def test_more_episodes_than_streams_are_played_in_rounds(
    finished: FinishedRun, monkeypatch: pytest.MonkeyPatch
) -> None:
    gen = open_generation(storages(str(finished.run_dir)), finished.name)
    member = choose_member(gen, "elite")
    whole = ev.evaluate(gen, member, range(5)).returns
    monkeypatch.setattr(ev, "MAX_STREAMS", 2)
    assert ev.evaluate(gen, member, range(5)).returns == whole


def test_a_run_that_is_only_in_the_bucket(tmp_path: Path) -> None:
    import shutil

    bucket = tmp_path / "bucket"
    run = finish_run(tmp_path / "runs", "remote", generations=2, **{"run.checkpoint_uri": str(bucket)})
    shutil.rmtree(run.folder)
    elsewhere = tmp_path / "new-machine"
    args = ["--run-dir", str(elsewhere), "--checkpoint-uri", str(bucket)]
    result = invoke("evaluate", "remote", *args, "--episodes", "2")
    assert result.exit_code == 0, result.output
    logged = [json.loads(line) for line in (bucket / "remote" / "logs" / "metrics.jsonl").read_text().splitlines()]
    assert f"run 'remote' generation 2, member elite (slot {logged[1]['elite_slot']})" in result.stdout
    assert invoke("export", *args, "--out", str(tmp_path / "policy")).exit_code == 0
    assert_one_line_user_error(invoke("evaluate", "remote", "--run-dir", str(elsewhere)), "no run 'remote'")


# ---------------------------------------------------------------- video


def test_video_records_every_episode_and_is_not_overwritten_without_force(
    finished: FinishedRun, tmp_path: Path
) -> None:
    pytest.importorskip("moviepy")
    pytest.importorskip("pygame")
    videos = tmp_path / "videos"
    args = ["evaluate", "--run-dir", str(finished.run_dir), "--episodes", "2", "--seed", "3", "--video", str(videos)]
    result = invoke(*args)
    assert result.exit_code == 0, result.output
    files = sorted(videos.glob("*.mp4"))
    assert [f.name for f in files] == [
        "done-gen3-slot{}-episode-{}.mp4".format(finished.records()[2]["elite_slot"], i) for i in range(2)
    ]
    assert all(f.stat().st_size > 1000 for f in files)
    plain = invoke(*args[:-2])
    assert re.search(r"return .*", plain.stdout)[0] == re.search(r"return .*", result.stdout)[0]  # type: ignore[index]
    before = {f: f.stat().st_mtime_ns for f in files}
    assert_one_line_user_error(invoke(*args), "already holds", "--force")
    assert {f: f.stat().st_mtime_ns for f in files} == before
    assert invoke(*args, "--force").exit_code == 0


def test_video_of_an_env_that_cannot_render_is_refused(custom_envs: str, tmp_path: Path) -> None:
    run = finish_run(tmp_path / "runs", "counter", generations=1, **{"env.id": f"{custom_envs}:CounterEnv"})
    result = invoke("evaluate", "--run-dir", str(run.run_dir), "--video", str(tmp_path / "v"))
    assert_one_line_user_error(result, "cannot render frames", "rgb_array")


def test_video_into_an_unwritable_folder_is_refused(finished: FinishedRun, tmp_path: Path) -> None:
    blocker = tmp_path / "a-file"
    blocker.write_text("x")
    result = invoke("evaluate", "--run-dir", str(finished.run_dir), "--video", str(blocker / "videos"))
    assert_one_line_user_error(result, "cannot write to", str(blocker))


# ---------------------------------------------------------------- bad input


@pytest.mark.parametrize(
    ("args", "expected"),
    [
        (["ghost"], ["no run 'ghost'", "runs there: done"]),
        (["done", "--generation", "9"], ["run 'done' has no generation 9", "checkpointed: 1, 2, 3"]),
        (["done", "--generation", "0"], ["--generation counts from 1"]),
        (["done", "--member", "4"], ["member slot 4 is out of range", "4 members (0-3)"]),
        (["done", "--member", "-1"], ["member slot -1 is out of range"]),
        (["done", "--member", "best"], ["--member must be elite, dreamer or a slot 0-3"]),
        (["done", "--member", "dreamer"], ["has no Dreamer member"]),
    ],
)
def test_bad_input_is_one_line(finished: FinishedRun, args: list[str], expected: list[str]) -> None:
    assert_one_line_user_error(invoke("evaluate", *args, "--run-dir", str(finished.run_dir)), *expected)


def test_nothing_to_evaluate_in_an_empty_folder(tmp_path: Path) -> None:
    assert_one_line_user_error(invoke("evaluate", "--run-dir", str(tmp_path)), "no run with a checkpoint")


def test_a_corrupt_checkpoint_is_one_line(tmp_path: Path) -> None:
    run = finish_run(tmp_path / "runs", "damaged", generations=1)
    folder = run.folder / "gen-000000"
    victim = max((p for p in folder.iterdir() if p.name != "MANIFEST.json"), key=lambda p: p.stat().st_size)
    data = bytearray(victim.read_bytes())
    data[len(data) // 2] ^= 0xFF
    victim.write_bytes(bytes(data))
    assert_one_line_user_error(
        invoke("evaluate", "--run-dir", str(run.run_dir), "--generation", "1"), "does not match its manifest"
    )
    assert_one_line_user_error(invoke("evaluate", "--run-dir", str(run.run_dir)), "no verified checkpoint")


def test_a_damaged_newest_generation_falls_back_with_a_warning(tmp_path: Path) -> None:
    run = finish_run(tmp_path / "runs", "fallback", generations=2)
    (run.folder / "gen-000001" / "state.json").write_text("{}")
    result = invoke("evaluate", "--run-dir", str(run.run_dir), "--episodes", "1")
    assert result.exit_code == 0, result.output
    assert result.stderr.startswith("warning: generation 2 rejected") and len(result.stderr.splitlines()) == 1
    assert "run 'fallback' generation 1, member elite" in result.stdout


def test_a_foreign_checkpoint_is_one_line(tmp_path: Path) -> None:
    storage = LocalStorage(tmp_path / "runs")
    ckpt.save(storage, "foreign", 0, ckpt.Checkpoint({"w": torch.zeros(2)}, {"model": "someone else's"}, {}))
    result = invoke("evaluate", "foreign", "--run-dir", str(tmp_path / "runs"))
    assert_one_line_user_error(result, "not a checkpoint of this trainer")


def test_the_dreamer_member_plays(tmp_path: Path) -> None:
    run = finish_run(tmp_path / "runs", "dream", generations=1, **{"dreamer.enabled": True})
    result = invoke("evaluate", "--run-dir", str(run.run_dir), "--member", "dreamer", "--episodes", "2")
    assert result.exit_code == 0, result.output
    assert "the Dreamer member" in result.stdout
    assert "2 noise-free episode(s)" in result.stdout
