"""A finished debug run shared by the tools' tests (training it once per module keeps them quick)."""

from __future__ import annotations

import contextlib
import io
import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest

from agents import PopulationAgent
from config import Config, build_config
from training import runs


@dataclass
class FinishedRun:
    run_dir: Path
    name: str
    cfg: Config
    agent: PopulationAgent
    """The trainer's own population after the last generation (what the newest checkpoint holds)."""

    @property
    def folder(self) -> Path:
        return self.run_dir / self.name

    def records(self) -> list[dict[str, Any]]:
        return [json.loads(line) for line in (self.folder / "metrics.jsonl").read_text().splitlines()]

    def events(self) -> list[dict[str, Any]]:
        return [json.loads(line) for line in (self.folder / "lineage.jsonl").read_text().splitlines()]


def finish_run(run_dir: Path, name: str, generations: int = 3, **extra: Any) -> FinishedRun:
    cfg = build_config(
        "debug",
        extra={
            "run.run_dir": str(run_dir),
            "run.name": name,
            "run.tensorboard": False,
            "run.progress": False,
            "run.device": "cpu",
            "train.generations": generations,
            **extra,
        },
    )
    trainer = runs.start(cfg)
    try:
        with contextlib.redirect_stdout(io.StringIO()):
            trainer.train()
            assert trainer.finish_uploads(60) == ""  # with run.checkpoint_uri: the copy is complete
    finally:
        trainer.close()
    return FinishedRun(run_dir, name, cfg, trainer.agent)


@pytest.fixture(scope="module")
def finished(tmp_path_factory: pytest.TempPathFactory) -> FinishedRun:
    """A debug-preset run of 3 generations (Pendulum-v1, P=4), every generation checkpointed."""
    return finish_run(tmp_path_factory.mktemp("tools") / "runs", "done", generations=3, **{"run.keep_checkpoints": 10})
