"""The Ray backend against a real local Ray instance (2 CPUs, started here): the same run as the
local backend, a killed or hung worker replaced, the restart total across a resume, a stop and
resume, a flat object store, bad input."""

from __future__ import annotations

import logging
import os
import signal
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from support import TINY_PONG, assert_members_equal, metrics, train

from config import Config, UserError, build_config
from training import runs
from training.signals import StopRequested, stop_on_signals
from training.trainer import Trainer

ray = pytest.importorskip("ray")
from config import BackendConfig  # noqa: E402
from training.backends.ray_backend import ClusterLost, RolloutWorker, shares, worker_count  # noqa: E402  (needs Ray)

TinyConfig = Callable[..., Config]
REPO_ROOT = Path(__file__).resolve().parents[3]
RAY = {"backend.kind": "ray", "backend.workers": 2}
SMALL = {"env.envs_per_member": 2, "train.generations": 2}
QUIET = {"run.tensorboard": False, "run.progress": False, "run.device": "cpu"}


@pytest.fixture(scope="module", autouse=True)
def ray_cluster() -> Iterator[None]:
    """One real local Ray instance for the module: 2 CPUs, no dashboard."""
    ray.init(num_cpus=2, include_dashboard=False, logging_level=logging.ERROR, log_to_driver=False)
    yield
    ray.shutdown()


@pytest.fixture(scope="module")
def local_run(tmp_path_factory: pytest.TempPathFactory) -> Trainer:
    """The reference: the ``SMALL`` run on the local backend (Pendulum, TD3), trained once."""
    base = {"run.run_dir": str(tmp_path_factory.mktemp("local")), "run.name": "local"}
    return train(build_config("debug", extra={**base, **QUIET, **SMALL}))


def assert_same_run(a: Trainer, b: Trainer) -> None:
    """Bit-identical members, replay rows, evolution and per-member fitness."""
    assert_members_equal(a.agent.member_tensors(), b.agent.member_tensors())
    for name in a.replay.data:
        np.testing.assert_array_equal(a.replay.data[name], b.replay.data[name], err_msg=name)
    assert a.evolution.state() == b.evolution.state()
    assert a.counters.env_steps == b.counters.env_steps
    assert [r["members"]["fitness"] for r in metrics(a.cfg)] == [r["members"]["fitness"] for r in metrics(b.cfg)]


def test_ray_run_equals_the_local_run_with_episodes_of_different_lengths(tiny_config: TinyConfig) -> None:
    """Discrete SAC on CartPole (Gumbel noise; episodes of different lengths, so evaluation actors
    are asked for the common length): the same run, bit for bit. (TD3 on Pendulum: below.)"""
    extra = {**SMALL, "env.id": "CartPole-v1", "train.eval_episodes": 3}
    local = train(tiny_config({**extra, "run.name": "local"}))
    remote = train(tiny_config({**extra, **RAY, "run.name": "ray"}))
    assert_same_run(local, remote)
    last = metrics(remote.cfg)[-1]
    assert last["ray_workers"] == 2 and last["ray_workers_restarted_total"] == 0


def before_evaluating(generation: int, act: Callable[[Trainer], None]) -> Callable[[Trainer], None]:
    """A ``train`` hook: ``act(trainer)`` in generation ``generation`` (0-based), between its
    exploration and its evaluation (the workers are idle then)."""

    def hook(trainer: Trainer) -> None:
        learn = trainer.learn

        def learn_then_act(*args: Any) -> Any:
            if trainer.counters.generation == generation:
                act(trainer)
            return learn(*args)

        trainer.learn = learn_then_act  # type: ignore[method-assign,assignment]

    return hook


def kill_worker_1(trainer: Trainer) -> None:
    os.kill(trainer.backend.pids[1], signal.SIGKILL)  # type: ignore[attr-defined]


def test_a_worker_killed_mid_generation_is_replaced_and_the_run_is_unchanged(
    tiny_config: TinyConfig, local_run: Trainer
) -> None:
    remote = train(tiny_config({**SMALL, **RAY, "run.name": "ray"}), before_evaluating(1, kill_worker_1))
    assert_same_run(local_run, remote)  # TD3 on Pendulum, bit for bit
    assert [r["ray_workers_restarted"] for r in metrics(remote.cfg)] == [0, 1]
    assert metrics(remote.cfg)[-1]["ray_workers_restarted_total"] == 1


def hanging_worker() -> type[RolloutWorker]:
    """A rollout worker that is alive but never answers a phase (a deadlocked env, a stuck
    simulator). Made here, so Ray ships it by value (the test module is not importable in workers)."""

    class HangingWorker(RolloutWorker):
        def play(self, *args: Any) -> dict[str, Any]:
            time.sleep(3600)
            raise AssertionError("unreachable")

    return HangingWorker


def hang_worker_1(trainer: Trainer, every_replacement_too: bool = False) -> None:
    """Worker 1 is restarted as a :func:`hanging_worker` (not counted as a restart) and the call
    timeout shortened to ``HANG_TIMEOUT_S``; its replacements play normally unless ``every_replacement_too``."""
    backend: Any = trainer.backend
    ray.kill(backend.workers[1])
    normal, backend.remote = backend.remote, ray.remote(num_cpus=1)(hanging_worker())
    try:
        backend._start(1)
    finally:
        if not every_replacement_too:
            backend.remote = normal
    backend.call_timeout_s = HANG_TIMEOUT_S


HANG_TIMEOUT_S = 3.0


def test_a_hung_worker_is_killed_and_replaced_within_the_timeout_and_the_run_is_unchanged(
    tiny_config: TinyConfig, local_run: Trainer
) -> None:
    timings: list[float] = []

    def timed_gather(trainer: Trainer) -> None:
        gather = trainer.backend._gather  # type: ignore[attr-defined]

        def gather_and_time(*args: Any) -> Any:
            started = time.monotonic()
            try:
                return gather(*args)
            finally:
                timings.append(time.monotonic() - started)

        trainer.backend._gather = gather_and_time  # type: ignore[attr-defined]

    def hook(trainer: Trainer) -> None:
        timed_gather(trainer)
        before_evaluating(1, hang_worker_1)(trainer)

    remote = train(tiny_config({**SMALL, **RAY, "run.name": "hung"}), hook)
    assert_same_run(local_run, remote)  # TD3 on Pendulum, bit for bit
    assert [r["ray_workers_restarted"] for r in metrics(remote.cfg)] == [0, 1]
    assert metrics(remote.cfg)[-1]["ray_workers_restarted_total"] == 1
    hung = max(timings)  # generation 2's evaluation: the timeout, the replacement's start, its rerun
    assert HANG_TIMEOUT_S < hung < HANG_TIMEOUT_S + 60 and timings.index(hung) == len(timings) - 2, timings


def test_a_worker_that_hangs_three_times_in_a_row_stops_the_run_in_one_line(tiny_config: TinyConfig) -> None:
    cfg = tiny_config({**SMALL, **RAY, "run.name": "always-hung"})
    hook = before_evaluating(1, lambda trainer: hang_worker_1(trainer, every_replacement_too=True))
    with pytest.raises(ClusterLost, match=r"rollout worker 1 failed three times in a row \(last: it hung") as caught:
        train(cfg, hook)
    message = str(caught.value)
    assert "\n" not in message and "within 3s (backend.call_timeout_s)" in message, message
    assert message.endswith("(continue: python main.py --resume)"), message
    assert [r["generation"] for r in metrics(cfg)] == [0]  # generation 1 is the recovery point


def test_the_restart_total_is_checkpointed_and_a_resume_continues_it(
    tiny_config: TinyConfig, local_run: Trainer
) -> None:
    cfg = tiny_config({**SMALL, **RAY, "train.generations": 1, "run.name": "restarted"})
    train(cfg, before_evaluating(0, kill_worker_1))
    resumed = runs.resume(cfg.run.run_dir, cfg.run.name, {"extra": {"train.generations": 2}})
    try:
        assert resumed.counters.workers_restarted == 1
        resumed.train()
    finally:
        resumed.close()
    assert [r["ray_workers_restarted"] for r in metrics(cfg)] == [1, 0]
    assert [r["ray_workers_restarted_total"] for r in metrics(cfg)] == [1, 1]  # not 0 after the resume
    assert_same_run(local_run, resumed)


def test_a_stop_while_the_workers_play_resumes_to_the_same_run(tiny_config: TinyConfig, local_run: Trainer) -> None:
    cfg = tiny_config({**SMALL, **RAY, "run.name": "stopped"})

    def stop_during_generation_2(trainer: Trainer) -> None:
        gather = trainer.backend._gather  # type: ignore[attr-defined]

        def signal_then_gather(*args: Any) -> Any:
            if trainer.counters.generation == 1:
                os.kill(os.getpid(), signal.SIGTERM)  # arrives while the actors play
            return gather(*args)

        trainer.backend._gather = signal_then_gather  # type: ignore[attr-defined]

    with stop_on_signals(), pytest.raises(StopRequested, match="during generation 2"):
        train(cfg, stop_during_generation_2)
    resumed = runs.resume(cfg.run.run_dir, cfg.run.name, {})
    try:
        assert resumed.counters.generation == 1
        resumed.train()
    finally:
        resumed.close()
    assert_same_run(local_run, resumed)


def test_object_store_bytes_stay_flat_over_generations(tiny_config: TinyConfig) -> None:
    cfg = tiny_config({**RAY, "train.generations": 4, "train.steps_per_generation": 200})
    train(cfg)
    used = [r["ray_object_store_mb"] for r in metrics(cfg)]
    assert all(np.isfinite(used)), used
    assert max(used) < 1.0 and used[-1] <= used[1] + 0.1, used  # nothing accumulates


def test_a_lost_worker_without_room_for_a_replacement_stops_in_one_line_and_resumes_locally(
    tiny_config: TinyConfig, local_run: Trainer
) -> None:
    cfg = tiny_config({**SMALL, **RAY, "run.name": "lost"})
    hogs: list[Any] = []

    class Hog:  # defined here, so Ray ships it by value (the test module is not importable in workers)
        """An actor that only holds a CPU."""

        def ready(self) -> bool:
            return True

    def lose_a_node_in_generation_2(trainer: Trainer) -> None:
        learn = trainer.learn
        trainer.backend.start_timeout_s = 2.0  # type: ignore[attr-defined]  # after the first start, which may be slow

        def learn_then_lose(*args: Any) -> Any:  # the worker dies and its CPU is gone
            if trainer.counters.generation == 1:
                os.kill(trainer.backend.pids[0], signal.SIGKILL)  # type: ignore[attr-defined]
                hogs.append(ray.remote(num_cpus=1)(Hog).remote())  # starts once the dead worker's CPU is free
                ray.get(hogs[0].ready.remote(), timeout=60)
            return learn(*args)

        trainer.learn = learn_then_lose  # type: ignore[method-assign,assignment]

    try:
        with pytest.raises(ClusterLost, match=r"did not start within 2s") as caught:
            train(cfg, lose_a_node_in_generation_2)
    finally:
        for hog in hogs:
            ray.kill(hog)
    assert "\n" not in str(caught.value) and "python main.py --resume" in str(caught.value)
    resumed = runs.resume(cfg.run.run_dir, cfg.run.name, {"extra": {"backend.kind": "local"}})
    try:
        assert resumed.counters.generation == 1 and resumed.cfg.backend.kind == "local"
        resumed.train()
    finally:
        resumed.close()
    assert_same_run(local_run, resumed)


def test_more_workers_than_cpus_is_refused_before_training(tiny_config: TinyConfig) -> None:
    cfg = tiny_config({**RAY, "population": 4, "backend.workers": 3})
    with pytest.raises(UserError, match="3 rollout workers need 3 CPUs but the Ray cluster has 2"):
        runs.start(cfg)
    assert not (Path(cfg.run.run_dir) / cfg.run.name / "run.json").exists()


def _cli(*args: str, env: dict[str, str] | None = None) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "main.py", "--preset", "debug", "--set", "run.progress=false", *args],
        cwd=REPO_ROOT,
        env={**os.environ, "OMP_NUM_THREADS": "1", **(env or {})},
        capture_output=True,
        text=True,
        timeout=120,
    )


def test_an_unreachable_address_is_one_line(tmp_path: Path) -> None:
    done = _cli("--run-dir", str(tmp_path), "--backend", "ray", "--ray-address", "127.0.0.1:1")
    assert done.returncode == 2, done.stderr
    assert done.stderr.startswith("error: cannot reach the Ray cluster at 127.0.0.1:1"), done.stderr
    assert len(done.stderr.strip().splitlines()) == 1
    assert not list(tmp_path.rglob("run.json"))


def test_without_ray_installed_the_ray_backend_is_one_line(tmp_path: Path) -> None:
    blocker = tmp_path / "noray"
    (blocker / "ray").mkdir(parents=True)
    (blocker / "ray" / "__init__.py").write_text("raise ImportError('No module named ray')\n")
    done = _cli("--run-dir", str(tmp_path / "runs"), "--backend", "ray", env={"PYTHONPATH": str(blocker)})
    assert done.returncode == 2, done.stderr
    assert done.stderr.strip() == 'error: backend.kind ray needs Ray: pip install -e ".[ray]"'


@pytest.mark.parametrize(
    ("setting", "message"),
    [
        ("backend.kind=spark", "backend.kind must be local or ray"),
        ("backend.address=nowhere", "backend.address must be auto or HOST:PORT"),
        ("backend.workers=9", "backend.workers (9) is more than the population (4)"),
        ("backend.call_timeout_s=0", "backend.call_timeout_s must be a finite number of seconds > 0, got 0"),
    ],
)
def test_bad_backend_settings_are_one_line(tiny_config: TinyConfig, setting: str, message: str) -> None:
    key, value = setting.split("=")
    with pytest.raises(UserError, match=message.replace("(", r"\(").replace(")", r"\)")):
        tiny_config({key: int(value) if value.isdigit() else value})


def test_workers_hold_whole_contiguous_members() -> None:
    even = shares(BackendConfig(workers=2), members=5, envs_per_member=2, workers=2)
    assert [m.tolist() for m in even] == [[0, 1, 2], [3, 4]]
    sized = BackendConfig(envs_per_worker=4)
    assert worker_count(sized, streams=10, envs_per_member=2, resources={"CPU": 8}) == 3
    assert [m.tolist() for m in shares(sized, members=5, envs_per_member=2, workers=3)] == [[0, 1], [2, 3], [4]]
    assert worker_count(BackendConfig(), streams=10, envs_per_member=2, resources={"CPU": 2}) == 2  # one per CPU
    assert worker_count(BackendConfig(), streams=3, envs_per_member=1, resources={"CPU": 8}) == 3  # one per member


def test_a_pong_run_over_ray_equals_the_local_run(tiny_config: TinyConfig) -> None:
    """CNN members on uint8 frame stacks: the actors build the Atari wrappers, send frames back as
    numpy, and the driver's frame replay fills exactly as the local backend fills it."""
    pytest.importorskip("ale_py")
    extra = {**TINY_PONG, "train.generations": 2}
    local = train(tiny_config({**extra, "run.name": "local"}))
    remote = train(tiny_config({**extra, **RAY, "run.name": "ray"}))
    assert_same_run(local, remote)
    assert metrics(remote.cfg)[-1]["ray_workers_restarted_total"] == 0
