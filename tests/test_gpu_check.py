"""benchmarks/gpu_check.py off a GPU: --help works, and a plain run says in one line that nothing was checked."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest
import torch

REPO_ROOT = Path(__file__).resolve().parents[1]


def gpu_check(*args: str) -> subprocess.CompletedProcess[str]:
    command = [sys.executable, "benchmarks/gpu_check.py", *args]
    return subprocess.run(command, cwd=REPO_ROOT, capture_output=True, text=True, timeout=120)


def test_help_lists_the_options() -> None:
    done = gpu_check("--help")
    assert done.returncode == 0 and "--budget" in done.stdout and "--json" in done.stdout


@pytest.mark.skipif(torch.cuda.is_available(), reason="this machine has a CUDA GPU: the check would run")
def test_without_cuda_it_exits_with_one_line_and_checks_nothing() -> None:
    done = gpu_check()
    assert done.returncode == 2
    assert done.stdout.strip().count("\n") == 0 and "no CUDA device" in done.stdout
    assert done.stderr == ""


def test_bad_input_is_one_error_line() -> None:
    done = gpu_check("--device", "cpu")
    assert done.returncode == 2 and "Traceback" not in done.stderr
    assert (
        done.stderr.strip().splitlines()[-1].endswith("--device must be a CUDA device (cuda, cuda:1, ...), got 'cpu'")
    )
