"""Pre-emption: a real training subprocess gets SIGTERM/SIGINT mid-run, stops at a safe point
without a partial checkpoint, and resumes cleanly."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from cloud import checkpoint as ckpt
from cloud.storage import LocalStorage

REPO_ROOT = Path(__file__).resolve().parents[2]


def _start(run_dir: Path, *more: str) -> subprocess.Popen[str]:
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONWARNINGS": "ignore::DeprecationWarning"}
    args = ["--preset", "debug", "--run-dir", str(run_dir), "--name", "pre", "--set", "run.tensorboard=false"]
    return subprocess.Popen(
        [sys.executable, "main.py", *args, *more],
        cwd=REPO_ROOT,
        env=env,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
        text=True,
    )


def _wait_for_checkpoint(run_dir: Path, generation: int, process: subprocess.Popen[str]) -> None:
    manifest = run_dir / "pre" / f"gen-{generation:06d}" / "MANIFEST.json"
    deadline = time.monotonic() + 120
    while not manifest.exists():
        assert process.poll() is None, process.stderr.read() if process.stderr else ""
        assert time.monotonic() < deadline, "no checkpoint appeared"
        time.sleep(0.05)


@pytest.mark.parametrize("signum", [signal.SIGTERM, signal.SIGINT])
def test_a_signal_stops_the_run_at_a_safe_point_and_it_resumes(tmp_path: Path, signum: int) -> None:
    run_dir = tmp_path / "runs"
    process = _start(run_dir, "--generations", "500")
    _wait_for_checkpoint(run_dir, 2, process)
    sent = time.monotonic()
    process.send_signal(signum)
    _, stderr = process.communicate(timeout=60)
    assert time.monotonic() - sent < 10, "the stop was not prompt"
    assert process.returncode == 128 + signum, stderr
    assert "Traceback" not in stderr
    assert f"stopped by {signal.Signals(signum).name}" in stderr
    assert "continue with: python main.py --resume pre" in stderr

    storage = LocalStorage(run_dir)
    newest, _, rejected = ckpt.load_latest([storage], "pre")
    assert rejected == []  # no partial manifest: every listed generation verifies
    assert not list(run_dir.rglob("*.tmp-*"))

    resumed = subprocess.run(
        [
            sys.executable,
            "main.py",
            "--resume",
            "--run-dir",
            str(run_dir),
            "--name",
            "pre",
            "--generations",
            str(newest + 3),
        ],
        cwd=REPO_ROOT,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert resumed.returncode == 0, resumed.stderr
    assert f"resuming run 'pre' after generation {newest + 1}" in resumed.stdout
    assert ckpt.generations(storage, "pre")[0] == newest + 2


def test_a_preempted_and_resumed_run_equals_the_uninterrupted_run(tmp_path: Path) -> None:
    """Across processes: SIGTERM mid-run, resume, and the final checkpoint matches a straight run."""
    straight_dir, preempted_dir = tmp_path / "straight", tmp_path / "preempted"
    straight = _start(straight_dir, "--generations", "5")
    assert straight.wait(timeout=120) == 0, straight.stderr.read() if straight.stderr else ""

    process = _start(preempted_dir, "--generations", "5")
    _wait_for_checkpoint(preempted_dir, 1, process)
    process.send_signal(signal.SIGTERM)
    process.communicate(timeout=60)
    assert process.returncode in (0, 128 + signal.SIGTERM)  # it may have finished first on a fast machine
    resumed = subprocess.run(
        [sys.executable, "main.py", "--resume", "--run-dir", str(preempted_dir), "--name", "pre"],
        cwd=REPO_ROOT,
        env={**os.environ, "OMP_NUM_THREADS": "1"},
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert resumed.returncode == 0, resumed.stderr

    a = ckpt.load(LocalStorage(straight_dir), "pre", 4)
    b = ckpt.load(LocalStorage(preempted_dir), "pre", 4)
    assert a.tensors.keys() == b.tensors.keys()
    for name in a.tensors:
        assert torch.equal(a.tensors[name], b.tensors[name]), name
    assert a.blobs == b.blobs  # the replay, shard by shard
    assert a.meta["evolution"] == b.meta["evolution"]
    assert a.meta["counters"]["env_steps"] == b.meta["counters"]["env_steps"]
    assert a.meta["counters"]["best_fitness"] == b.meta["counters"]["best_fitness"]


def test_a_signal_arriving_while_the_handlers_are_installed_is_not_lost(monkeypatch: pytest.MonkeyPatch) -> None:
    from training import signals

    install = signal.signal

    def install_then_signal(sig: int, handler: object) -> object:  # the real install, then a real SIGTERM
        previous = install(sig, handler)  # type: ignore[arg-type]
        if sig == signal.SIGTERM:
            os.kill(os.getpid(), signal.SIGTERM)
        return previous

    monkeypatch.setattr(signal, "signal", install_then_signal)
    with signals.stop_on_signals():
        monkeypatch.setattr(signal, "signal", install)
        assert signals.stop_requested() == signal.SIGTERM
