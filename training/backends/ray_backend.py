"""Rollouts on Ray actors: the learner, replay, evolution and checkpoints stay in this process.

Each actor (:class:`RolloutWorker`) holds the environments of a fixed, contiguous set of members
and a CPU copy of those members' acting networks. Per phase the driver makes one ``ray.put`` of
the population's acting tensors (every actor reads its members' rows of that one object), each
actor plays its streams with :func:`training.rollout.rollout` and returns compact numpy arrays
``(T, E_w, ...)`` per field; the driver adds them to the replay row by row in stream order,
exactly as the local backend does. Evaluation stops when every stream completed its quota, so an
actor whose streams finished sooner is asked once more for the common number of steps (replayed
from the same seeds: the same steps, just more of them).

A worker that dies, or hangs (has not answered within ``backend.call_timeout_s``: it is killed),
is replaced and its share rerun from the same seeds and weights (the result is the one an
undisturbed run gets). A worker failing three times in a row in one phase, a replacement that
cannot start within ``backend.start_timeout_s``, or a cluster that stops answering ends the run at
this safe point in one line (:class:`ClusterLost`); the last generation is checkpointed and
``--resume`` continues. Every wait on a worker is bounded by one of those two timeouts.
"""

from __future__ import annotations

import dataclasses
import logging
import os
import socket
import time
from collections.abc import Callable
from contextlib import suppress
from typing import Any

import numpy as np
import ray
import torch
from ray.exceptions import GetTimeoutError, RayActorError, RayError

from agents import PopulationAgent, make_population
from config import BackendConfig, Config, UserError
from training.envs import EnvPool, make_env
from training.replay import FIELDS, Transitions
from training.rollout import RolloutResult, TransitionSink, rollout
from training.signals import stop_requested

ACTING = ("actor.", "encoder.", "hp.")
"""Member tensors (``PopulationAgent.member_tensors`` names) that ``act`` reads: what the actors get."""

WAIT_S = 0.2
"""How often the driver checks for a stop signal while the actors play."""


class ClusterLost(UserError):
    """The Ray cluster stopped answering, or a dead worker could not be replaced."""

    def __init__(self, reason: str) -> None:
        super().__init__(f"{reason}; the last finished generation is checkpointed (continue: python main.py --resume)")


_started_here: list[bool] = []
"""Whether :func:`connect` started the local Ray instance this process uses (closing shuts it down)."""


def connect(cfg: BackendConfig) -> dict[str, float]:
    """Join the cluster at ``cfg.address`` (or start a local one) unless this process already has
    Ray; returns the cluster's resources. UserError in one line when it cannot be reached."""
    if not ray.is_initialized():
        _started_here[:] = [not cfg.address]
        address = cfg.address.removeprefix("ray://")
        if address not in ("", "auto"):
            host, _, port = address.rpartition(":")
            try:
                socket.create_connection((host, int(port)), timeout=5).close()
            except OSError as err:
                raise UserError(f"cannot reach the Ray cluster at {cfg.address}: {err.strerror or err}") from None
        try:
            if cfg.address:
                ray.init(address=cfg.address, logging_level=logging.ERROR, log_to_driver=False)
            else:
                ray.init(include_dashboard=False, logging_level=logging.ERROR, log_to_driver=False)
        except (ConnectionError, RuntimeError, ValueError) as err:
            where = cfg.address or "a new local instance"
            raise UserError(f"cannot connect to Ray at {where}: {_first_line(err)}") from None
    return {k: float(v) for k, v in ray.cluster_resources().items()}


def worker_count(cfg: BackendConfig, streams: int, envs_per_member: int, resources: dict[str, float]) -> int:
    """How many actors the run uses (``backend.workers``, or what ``envs_per_worker`` implies, or one
    per CPU, at most one per member); UserError when they outnumber the cluster's CPUs."""
    cpus = resources.get("CPU", 0.0)
    members = streams // envs_per_member
    if cfg.envs_per_worker:
        count = -(-streams // cfg.envs_per_worker)
    else:
        count = cfg.workers or max(1, min(members, int(cpus)))
    if count > cpus:
        raise UserError(
            f"backend.workers: {count} rollout workers need {count} CPUs but the Ray cluster has {cpus:g}; "
            "use fewer workers or add nodes"
        )
    return count


def shares(cfg: BackendConfig, members: int, envs_per_member: int, workers: int) -> list[np.ndarray]:
    """Each actor's members, contiguous slots in order: ``envs_per_worker`` worth each, or split evenly."""
    if cfg.envs_per_worker:
        size = cfg.envs_per_worker // envs_per_member
        return [np.arange(start, min(start + size, members)) for start in range(0, members, size)]
    return list(np.array_split(np.arange(members), workers))


def acting_tensors(agent: PopulationAgent) -> dict[str, np.ndarray]:
    """The population's ``(P, ...)`` tensors that acting reads, as CPU numpy arrays."""
    return {
        name: tensor.detach().cpu().numpy()
        for name, tensor in agent.member_tensors().items()
        if name.startswith(ACTING)
    }


class Recorder:
    """A :class:`training.rollout.TransitionSink` that keeps the steps for sending back."""

    def __init__(self) -> None:
        self.steps: list[Transitions] = []

    def add(self, step: Transitions) -> None:
        self.steps.append(step)

    def arrays(self) -> dict[str, np.ndarray]:
        """Every field stacked over steps: ``(T, E_w, ...)``."""
        return {name: np.stack([getattr(s, name) for s in self.steps]) for name in FIELDS}


class RolloutWorker:
    """One Ray actor: the environments of ``members`` (their ``envs_per_member`` streams each) and
    a CPU population of ``len(members)`` whose acting tensors are set from the driver's per phase."""

    def __init__(self, cfg: Config, members: list[int]) -> None:
        torch.set_num_threads(1)
        self.members = np.asarray(members)
        self.pool = EnvPool(lambda: make_env(cfg.env), len(members) * cfg.env.envs_per_member)
        obs_shape = getattr(self.pool, "obs_shape", self.pool.obs_dim)
        agent_cfg = dataclasses.replace(cfg.agent, compile="none")
        cpu = torch.device("cpu")
        self.agent = make_population(len(members), obs_shape, self.pool.act_dim, agent_cfg, cpu, self.pool.action_kind)
        self.tensors = self.agent.member_tensors()

    def pid(self) -> int:
        return os.getpid()

    def play(
        self,
        weights: dict[str, np.ndarray],
        seeds: np.ndarray,
        explore: bool,
        steps: int,
        quota: np.ndarray | int,
        random_steps: int,
        min_steps: int,
    ) -> dict[str, Any]:
        """``rollout`` of this actor's streams with its members' rows of ``weights``: returns
        ``steps`` (T), ``returns`` (per stream), ``play_s`` (its time here) and every field ``(T, E_w, ...)``."""
        started = time.perf_counter()
        with torch.no_grad():
            for name, array in weights.items():
                self.tensors[name].copy_(torch.as_tensor(array[self.members]))
        recorder = Recorder()
        result = rollout(
            self.agent,
            self.pool,
            recorder,
            seeds,
            explore=explore,
            steps=steps,
            episodes_per_stream=quota,
            random_steps=random_steps,
            min_steps=min_steps,
        )
        arrays = recorder.arrays()
        played = time.perf_counter() - started
        return {"steps": len(recorder.steps), "returns": result.episode_returns, "play_s": played, **arrays}


class RayBackend:
    """The population's rollouts on ``backend.workers`` Ray actors (see the module docstring)."""

    def __init__(self, cfg: Config, pool: EnvPool) -> None:
        self.cfg = cfg
        b, per_member = cfg.backend, cfg.env.envs_per_member
        count = worker_count(b, len(pool), per_member, connect(b))
        self.shares = shares(b, cfg.population, per_member, count)
        self.streams = [(m[:, None] * per_member + np.arange(per_member)).ravel() for m in self.shares]
        self.remote: Any = ray.remote(num_cpus=1)(RolloutWorker)
        self.workers: list[Any] = [None] * len(self.shares)
        self.pids: list[int] = [0] * len(self.shares)
        self.restarted = 0
        """Workers replaced since this process started."""
        self.restarted_reported = 0
        self.last_play_s = 0.0
        """The latest rollout's longest time inside one actor (its wall time less this is Ray's overhead)."""
        self.start_timeout_s = cfg.backend.start_timeout_s
        self.call_timeout_s = cfg.backend.call_timeout_s
        """How long one actor's share of a phase may take before the actor counts as hung."""
        try:
            self._start(*range(len(self.shares)))
        except BaseException:
            self.close()
            raise

    # ------------------------------------------------------------ the backend interface

    def rollout(
        self,
        agent: PopulationAgent,
        replay: TransitionSink | None,
        seeds: np.ndarray,
        *,
        explore: bool,
        steps: int = 0,
        episodes_per_stream: int | np.ndarray = 0,
        random_steps: int = 0,
        on_step: Callable[[int], None] | None = None,
    ) -> RolloutResult:
        """``training.rollout.rollout`` of the whole population, played by the actors."""
        quota = np.broadcast_to(np.asarray(episodes_per_stream), (len(seeds),))
        try:
            weights: Any = ray.put(acting_tensors(agent))  # one object per phase, read by every actor

            def call(i: int, min_steps: int = 0) -> Any:
                part = self.streams[i]
                quota_i = quota[part] if steps == 0 else 0
                args = (seeds[part], explore, steps, quota_i, random_steps, min_steps)
                return self.workers[i].play.remote(weights, *args)

            def call_to_total(i: int) -> Any:  # an evaluation's common length, from the same seeds
                return call(i, total)

            parts = self._gather({i: call for i in range(len(self.workers))}, on_step)
            total = max(p["steps"] for p in parts.values())
            parts |= self._gather({i: call_to_total for i, p in parts.items() if p["steps"] < total}, on_step)
        except (RayError, ConnectionError) as err:
            raise ClusterLost(f"the Ray cluster stopped answering ({type(err).__name__}: {_first_line(err)})") from None
        finally:
            weights = None  # the phase's object is freed as soon as the actors are done with it
        self.last_play_s = max(p["play_s"] for p in parts.values())
        result = _merge([parts[i] for i in range(len(self.workers))], replay)
        del parts
        if on_step is not None:
            for _ in range(result.env_steps // len(seeds)):
                on_step(len(seeds))
        return result

    def figures(self) -> dict[str, float]:
        """Workers, restarts since the last call (the trainer keeps the run's total, checkpointed)
        and the object store's bytes in use."""
        fresh, self.restarted_reported = self.restarted - self.restarted_reported, self.restarted
        return {
            "ray_workers": float(len(self.workers)),
            "ray_workers_restarted": float(fresh),
            "ray_object_store_mb": object_store_bytes() / 2**20,
        }

    def close(self) -> None:
        for worker in self.workers:
            if worker is not None:
                with suppress(RayError, ValueError):  # best effort: it may be gone already
                    ray.kill(worker)
        self.workers = [None] * len(self.shares)
        if _started_here == [True]:  # a local instance this run started: it ends with the run
            _started_here.clear()
            ray.shutdown()

    # ------------------------------------------------------------ workers

    def _start(self, *indices: int) -> None:
        """Start the actors ``indices`` together and wait until each answers (ClusterLost when one
        has not within ``start_timeout_s``: no free CPU for it, its envs' construction hangs, or the
        cluster is gone)."""
        started: dict[int, Any] = {i: self.remote.remote(self.cfg, self.shares[i].tolist()) for i in indices}
        pids = {i: worker.pid.remote() for i, worker in started.items()}
        deadline = time.monotonic() + self.start_timeout_s
        for i, worker in started.items():
            try:
                self.pids[i] = ray.get(pids[i], timeout=max(0.0, deadline - time.monotonic()))
            except (GetTimeoutError, RayActorError) as err:
                for other in started.values():
                    with suppress(RayError, ValueError):  # best effort: it may be gone already
                        ray.kill(other)
                if isinstance(err, RayActorError):  # e.g. the env's package missing on that node
                    raise ClusterLost(f"rollout worker {i} failed to start: {_cause(err)}") from None
                raise ClusterLost(
                    f"rollout worker {i} did not start within {self.start_timeout_s:g}s "
                    "(backend.start_timeout_s): the Ray cluster has no free CPU for it, or building its envs hangs"
                ) from None
            self.workers[i] = worker

    def _replace(self, i: int) -> None:
        with suppress(RayError, ValueError):  # best effort: it may be gone already
            ray.kill(self.workers[i])
        self.workers[i] = None
        self._start(i)
        self.restarted += 1

    def _gather(self, calls: dict[int, Callable[[int], Any]], on_step: Callable[[int], None] | None) -> dict[int, Any]:
        """Run ``calls[i](i)`` on actor ``i`` for each ``i``. An actor that dies, or has not answered
        within ``call_timeout_s`` (hung), is killed, replaced and its call made again; the third
        failure of one actor in a row ends the run (ClusterLost). While waiting, a stop signal is honoured."""
        pending: dict[Any, int] = {}
        deadlines: dict[int, float] = {}
        tries = dict.fromkeys(calls, 0)
        out: dict[int, Any] = {}

        def submit(i: int) -> None:
            pending[calls[i](i)] = i
            deadlines[i] = time.monotonic() + self.call_timeout_s

        def retry(i: int, why: str) -> None:
            tries[i] += 1
            if tries[i] > 2:
                raise ClusterLost(f"rollout worker {i} failed three times in a row (last: {why})")
            self._replace(i)
            submit(i)

        hung = f"it hung: no answer within {self.call_timeout_s:g}s (backend.call_timeout_s)"
        for i in calls:
            submit(i)
        while pending:
            ready, _ = ray.wait(list(pending), num_returns=1, timeout=WAIT_S)
            if ready:
                i = pending.pop(ready[0])
                try:
                    out[i] = ray.get(ready[0], timeout=self.call_timeout_s)
                except RayActorError as err:
                    retry(i, f"it died: {_first_line(err)}")
                except GetTimeoutError:
                    retry(i, hung)
            elif on_step is not None and stop_requested() is not None:
                on_step(0)  # raises StopRequested at this safe point
            for ref in self._late(pending, deadlines):
                retry(pending.pop(ref), hung)  # the call is abandoned: its actor is killed and replaced
        return out

    @staticmethod
    def _late(pending: dict[Any, int], deadlines: dict[int, float]) -> list[Any]:
        """The pending calls past their actor's deadline that still have no result (one that came
        in while the driver was busy, e.g. starting a replacement, is not late)."""
        now = time.monotonic()
        late = [ref for ref, i in pending.items() if now > deadlines[i]]
        if not late:
            return []
        _, unanswered = ray.wait(late, num_returns=len(late), timeout=0, fetch_local=False)
        return list(unanswered)


def _merge(parts: list[dict[str, Any]], replay: TransitionSink | None) -> RolloutResult:
    """The actors' parts (in stream order, equally long) as one rollout's result; their steps go to
    ``replay`` row by row, every stream of a row together."""
    steps = parts[0]["steps"]
    arrays = {name: np.concatenate([p[name] for p in parts], axis=1) for name in FIELDS}
    if replay is not None:
        for t in range(steps):
            replay.add(Transitions(**{name: arrays[name][t] for name in FIELDS}))
    returns = [r for p in parts for r in p["returns"]]
    return RolloutResult(env_steps=steps * len(returns), episode_returns=returns)


def object_store_bytes() -> float:
    """Bytes in use in the cluster's object stores (NaN if Ray cannot say): the total of the
    ``object_store_memory`` resource less what is available of it. Every node reports its store's
    bytes in use as that resource's usage (since Ray 1.3, ray-project/ray#14260), so these public
    calls settle on the number Ray's private memory report (``ray memory``) gives, byte for byte
    (measured on Ray 2.60). Both lag: this one is as of the nodes' latest resource report (a put
    showed after 0.1-0.3 s), the private one showed a free only after 0.6-0.9 s."""
    try:
        total = ray.cluster_resources().get("object_store_memory")
        free = ray.available_resources().get("object_store_memory", 0.0)  # left out when none is free
    except (RayError, ConnectionError):
        return float("nan")
    return float("nan") if total is None else max(0.0, float(total) - float(free))


def _cause(err: BaseException) -> str:
    """The last line of a remote error's text (Ray puts the actor's own exception last)."""
    lines = [line.strip() for line in str(err).splitlines() if line.strip()]
    return lines[-1] if lines else type(err).__name__


def _first_line(err: BaseException) -> str:
    text = str(err).strip()
    return text.splitlines()[0] if text else type(err).__name__
