"""Shared fixtures: tiny configs in a per-test run folder, the test environments, a CLI runner."""

from __future__ import annotations

import os
import subprocess
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
import torch

from config import Config, build_config

REPO_ROOT = Path(__file__).resolve().parents[1]
TESTS_DIR = Path(__file__).resolve().parent


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    """Tests marked ``cuda`` are skipped, saying so, on machines without a CUDA GPU
    (``benchmarks/gpu_check.py`` runs them on one)."""
    if torch.cuda.is_available():
        return
    skip = pytest.mark.skip(reason="needs a CUDA GPU")
    for item in items:
        if "cuda" in item.keywords:
            item.add_marker(skip)


# The suite runs on small, often shared CPUs: tiny networks gain nothing from intra-op threads,
# and a descheduled worker thread can stall every op for a time slice. Results do not depend on it.
torch.set_num_threads(1)


@pytest.fixture
def custom_envs(monkeypatch: pytest.MonkeyPatch) -> str:
    """Put ``tests/`` on the import path so ``custom_envs.toy:ClassName`` env ids resolve."""
    monkeypatch.syspath_prepend(str(TESTS_DIR))
    return "custom_envs.toy"


@pytest.fixture
def tiny_config(tmp_path: Path) -> Callable[..., Config]:
    """``tiny_config({"train.generations": 2, ...})``: the debug preset in this test's run folder,
    without TensorBoard or a progress bar."""

    def make(extra: dict[str, Any] | None = None, preset: str = "debug") -> Config:
        base = {
            "run.run_dir": str(tmp_path / "runs"),
            "run.name": "test",
            "run.tensorboard": False,
            "run.progress": False,
            "run.device": "cpu",
        }
        return build_config(preset, extra={**base, **(extra or {})})

    return make


@pytest.fixture
def run_cli(tmp_path: Path) -> Callable[..., subprocess.CompletedProcess[str]]:
    """Run ``python main.py ARGS`` from the repository root with ``tests/`` on PYTHONPATH."""

    def run(*args: str, timeout: float = 180) -> subprocess.CompletedProcess[str]:
        env = {
            **os.environ,
            "PYTHONPATH": os.pathsep.join([str(REPO_ROOT), str(TESTS_DIR)]),
            "OMP_NUM_THREADS": "1",
            "PYTHONWARNINGS": "ignore::DeprecationWarning",
        }
        return subprocess.run(
            [sys.executable, "main.py", *args],
            cwd=REPO_ROOT,
            env=env,
            capture_output=True,
            text=True,
            timeout=timeout,
        )

    return run
