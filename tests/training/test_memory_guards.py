"""End to end: the leak sentinel catches a deliberately injected leak and stays quiet on a clean
run; an out-of-memory error produces the report and a non-zero exit."""

from __future__ import annotations

import contextlib
import io
from collections.abc import Callable
from pathlib import Path

import pytest

from config import Config
from training import runs
from training.trainer import LeakStop

GENERATIONS = 30
"""Budget for the sentinel: warm-up 3 + window 8 + confirmation 4 leave room to spare."""


def _memory_config(tiny_config: Callable[..., Config], inject: bool) -> Config:
    return tiny_config(
        {
            "train.generations": GENERATIONS,
            "memory.leak_window": 8,
            "memory.inject_leak": inject,
            "memory.stop_on_leak": True,
        }
    )


def test_injected_loss_graph_leak_is_caught_and_the_run_stops_after_a_checkpoint(tiny_config) -> None:
    trainer = runs.start(_memory_config(tiny_config, inject=True))
    with pytest.raises(LeakStop, match="grad_tensors") as stop, contextlib.redirect_stdout(io.StringIO()) as out:
        trainer.train()
    stopped_after = trainer.counters.generation
    assert stopped_after < GENERATIONS
    assert "memory leak suspected" in out.getvalue()
    assert "autograd graphs" in out.getvalue()
    assert f"generation {stopped_after}" in str(stop.value)
    run_path = Path(trainer.cfg.run.run_dir) / trainer.run_name
    assert (run_path / f"gen-{stopped_after - 1:06d}" / "MANIFEST.json").is_file()


def test_clean_run_of_the_same_length_raises_no_warning(tiny_config) -> None:
    trainer = runs.start(_memory_config(tiny_config, inject=False))
    with contextlib.redirect_stdout(io.StringIO()) as out:
        record = trainer.train()
    assert trainer.counters.generation == GENERATIONS
    assert "memory leak suspected" not in out.getvalue()
    assert record["grad_tensors"] == 0
    assert record["evicted_alive_mb"] == 0


def test_generation_record_carries_memory_telemetry(tiny_config) -> None:
    trainer = runs.start(tiny_config({"train.generations": 1}))
    with contextlib.redirect_stdout(io.StringIO()) as out:
        record = trainer.train()
    for key in (
        "rss_mb",
        "replay_filled_mb",
        "live_tensors",
        "live_tensor_mb",
        "grad_tensors",
        "evicted_alive_mb",
        "metric_items",
        "leak_warnings",
    ):
        assert key in record, key
    assert record["replay_filled_mb"] > 0
    assert "leak sentinel" in out.getvalue() and "with a graph" in out.getvalue()


def test_out_of_memory_prints_the_report_and_exits_non_zero(run_cli, tmp_path: Path) -> None:
    result = run_cli(
        "--preset",
        "debug",
        "--run-dir",
        str(tmp_path / "runs"),
        "--env",
        "custom_envs.toy:MemoryHogEnv",
        "--generations",
        "5",
        "--set",
        "run.tensorboard=false",
    )
    assert result.returncode == 3, result.stderr
    assert "Traceback" not in result.stderr
    assert "cannot allocate 174 MiB" in result.stderr
    assert "classification" in result.stderr.lower() or "diagnosis" in result.stderr.lower()
    assert "continue with: python main.py --resume" in result.stderr
