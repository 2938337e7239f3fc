"""``python main.py plot``: PNGs whose drawn data are the run's logs."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
from click.testing import CliRunner, Result

from config import MemoryConfig
from main import cli
from tests.test_main import assert_one_line_user_error
from tests.training.tools.conftest import FinishedRun, finish_run
from training.memory.sentinel import theil_sen
from training.tools.plot import (
    FIGURES,
    elite_lineage,
    fitness_figure,
    hyperparameter_figure,
    lineage_figure,
    memory_figure,
    plotted,
)


def invoke(*args: str) -> Result:
    return CliRunner().invoke(cli, list(args))


def column(records: list[dict], key: str) -> np.ndarray:
    return np.array([r[key] for r in records], np.float64)


def test_fitness_is_drawn_against_total_env_steps(finished: FinishedRun) -> None:
    records = finished.records()
    lines = plotted(fitness_figure(records))
    steps = column(records, "env_steps_total")
    for gid, key in (("best", "fitness_best"), ("median", "fitness_median"), ("worst", "fitness_worst")):
        np.testing.assert_array_equal(lines[gid][0], steps)
        np.testing.assert_array_equal(lines[gid][1], column(records, key))
    for slot in range(finished.cfg.population):
        np.testing.assert_array_equal(lines[f"member {slot}"][1], [r["members"]["fitness"][slot] for r in records])
    assert "dreamer" not in lines


def test_memory_and_the_sentinel_fit(finished: FinishedRun) -> None:
    records = finished.records()
    memory = MemoryConfig(leak_warmup=0, leak_window=20)
    lines = plotted(memory_figure(records, memory))
    generation = column(records, "generation") + 1
    for key in ("rss_mb", "uss_mb", "replay_filled_mb"):
        np.testing.assert_array_equal(lines[key][0], generation)
        np.testing.assert_array_equal(lines[key][1], column(records, key))
    net = column(records, "rss_mb") - column(records, "replay_filled_mb")
    np.testing.assert_array_equal(lines["rss_net"][1], net)
    slope, intercept = theil_sen(generation, net)
    np.testing.assert_allclose(lines["fit"][1], slope * generation + intercept)
    assert "cuda_allocated_mb" not in lines  # not logged on a cpu run


def test_every_hyperparameter_of_every_member(finished: FinishedRun) -> None:
    records = finished.records()
    lines = plotted(hyperparameter_figure(records))
    names = {gid.split(" ")[0] for gid in lines}
    assert names == {"actor_lr", "critic_lr", "gamma", "tau", "exploration_noise"} & set(records[0]["members"])
    for name in names:
        for slot in range(finished.cfg.population):
            np.testing.assert_array_equal(
                lines[f"{name} member {slot}"][1], [r["members"][name][slot] for r in records]
            )
        elite = [r["members"][name][r["elite_slot"]] for r in records]
        np.testing.assert_array_equal(lines[f"{name} elite"][1], elite)


def test_the_elite_lineage_follows_the_lineage_log(finished: FinishedRun) -> None:
    records, events = finished.records(), finished.events()
    chain = elite_lineage(records, events)
    assert [str(c["id"]) for c in chain][: len(records[-1]["elite_lineage"].split(" <- "))] == records[-1][
        "elite_lineage"
    ].split(" <- ")
    by_id = {e["id"]: e for e in events}
    for child, parent in zip(chain, chain[1:], strict=False):
        assert by_id[child["id"]]["parent"] == parent["id"]
    assert chain[-1]["born"] is None and chain[-1]["id"] < finished.cfg.population  # an initial member
    born = [c for c in chain if c["born"] is not None][::-1]
    x, y = plotted(lineage_figure(records, events))["lineage"]
    np.testing.assert_array_equal(x, [by_id[c["id"]]["generation"] + 1 for c in born])
    np.testing.assert_array_equal(y, [by_id[c["id"]]["parent_fitness"] for c in born])


def test_the_command_writes_png_files_and_keeps_them_without_force(finished: FinishedRun) -> None:
    result = invoke("plot", finished.name, "--run-dir", str(finished.run_dir))
    assert result.exit_code == 0, result.output
    paths = [finished.folder / name for name in FIGURES]
    assert result.stdout.split() == [str(p) for p in paths]
    for path in paths:
        data = path.read_bytes()
        assert data[:8] == b"\x89PNG\r\n\x1a\n" and 2_000 < len(data) < 100_000
    before = [p.stat().st_mtime_ns for p in paths]
    assert_one_line_user_error(invoke("plot", "--run-dir", str(finished.run_dir)), "already holds", "--force")
    assert [p.stat().st_mtime_ns for p in paths] == before
    assert invoke("plot", "--run-dir", str(finished.run_dir), "--force").exit_code == 0


def test_a_run_only_in_the_bucket_is_plotted_from_its_copy_of_the_logs(tmp_path: Path) -> None:
    import shutil

    bucket = tmp_path / "bucket"
    run = finish_run(tmp_path / "runs", "remote", generations=2, **{"run.checkpoint_uri": str(bucket)})
    shutil.rmtree(run.folder)
    elsewhere = tmp_path / "new-machine"
    result = invoke("plot", "remote", "--run-dir", str(elsewhere), "--checkpoint-uri", str(bucket))
    assert result.exit_code == 0, result.output
    assert sorted(p.name for p in (elsewhere / "remote").iterdir()) == sorted(FIGURES)


@pytest.mark.parametrize(
    ("args", "expected"), [(["ghost"], ["no metrics log of run 'ghost'"]), ([], ["no run with a checkpoint"])]
)
def test_bad_input_is_one_line(tmp_path: Path, args: list[str], expected: list[str]) -> None:
    assert_one_line_user_error(invoke("plot", *args, "--run-dir", str(tmp_path)), *expected)


def test_a_figure_that_cannot_be_written_is_one_line(finished: FinishedRun, tmp_path: Path) -> None:
    import shutil

    copy = tmp_path / "runs"
    shutil.copytree(finished.run_dir, copy)
    (copy / finished.name / "fitness.png").unlink(missing_ok=True)
    (copy / finished.name / "fitness.png" / "in-the-way").mkdir(parents=True)  # a folder where the file goes
    result = invoke("plot", finished.name, "--run-dir", str(copy), "--force")
    assert_one_line_user_error(result, "cannot write", "fitness.png")
    assert not list((copy / finished.name).glob(".*.tmp-*"))
