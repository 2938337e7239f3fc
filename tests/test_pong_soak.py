"""benchmarks/pong_soak.py sees the incident's leak when it is put back, and not without it (slow)."""

from __future__ import annotations

import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

pytest.importorskip("ale_py")

REPO_ROOT = Path(__file__).resolve().parents[1]
SMALL = ["--steps", "4000", "--capacity", "1000", "--update-every", "2000", "--report-every", "500"]


def soak_slope(*flags: str) -> float:
    """The benchmark's fitted RSS slope after fill, MB per 10,000 env steps."""
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    out = subprocess.run(
        [sys.executable, "benchmarks/pong_soak.py", *SMALL, *flags],
        cwd=REPO_ROOT,
        env=env,
        capture_output=True,
        text=True,
        check=True,
        timeout=600,
    ).stdout
    found = re.search(r"([-+][\d.]+) MB per 10,000 env steps", out)
    assert found, out
    return float(found.group(1))


@pytest.mark.slow
def test_the_pong_soak_sees_the_incidents_leak_only_when_it_is_put_back() -> None:
    leaking = soak_slope("--put-back-leak")
    clean = soak_slope()
    # Evicted episodes kept alive cost 56 KB a step (stacked obs and next_obs): ~560 MB per 10,000.
    assert leaking > 150, leaking
    assert clean < leaking / 5, (clean, leaking)
