"""Where the population's rollouts run: in this process (``local``) or on Ray actors (``ray``).

The trainer asks a backend to play the population's streams from given reset seeds (exploration
for a number of steps, or evaluation for episode quotas) and gets back what
:func:`training.rollout.rollout` returns, with the transitions added to the replay in the same
stream order. Either backend gives the same result: the reset seeds and the exploration noise are
pure functions of (seed, generation, phase, stream, step), never of which process plays a stream.
Importing this package does not import Ray (only ``backend.kind: ray`` does).
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Protocol

import numpy as np

from agents import PopulationAgent
from config import BackendConfig, Config, UserError
from training.envs import EnvPool
from training.rollout import RolloutResult, TransitionSink, rollout

RAY_INSTALL = 'pip install -e ".[ray]"'


class RolloutBackend(Protocol):
    """Plays every stream of the population (``E = P * envs_per_member``, stream ``e`` is member
    ``e // envs_per_member``)."""

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
        """What :func:`training.rollout.rollout` does with the trainer's pool: ``seeds (E,)``,
        the same arguments, the same result and the same rows added to ``replay``."""
        ...

    def figures(self) -> dict[str, float]:
        """The backend's figures for the generation's record (none for the local backend). With
        ``ray_workers_restarted`` (workers replaced since the last call) the trainer adds those to
        the run's checkpointed total."""
        ...

    def close(self) -> None: ...


class LocalBackend:
    """Today's path: the trainer's own pool, stepped in this process."""

    def __init__(self, pool: EnvPool) -> None:
        self.pool = pool

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
        return rollout(
            agent,
            self.pool,
            replay,
            seeds,
            explore=explore,
            steps=steps,
            episodes_per_stream=episodes_per_stream,
            random_steps=random_steps,
            on_step=on_step,
        )

    def figures(self) -> dict[str, float]:
        return {}

    def close(self) -> None:
        pass


def make_backend(cfg: Config, pool: EnvPool) -> RolloutBackend:
    """The backend ``cfg.backend.kind`` names (Ray is connected to, and its actors started, here)."""
    if cfg.backend.kind == "local":
        return LocalBackend(pool)
    from training.backends.ray_backend import RayBackend

    return RayBackend(cfg, pool)


def check(cfg: BackendConfig, streams: int, envs_per_member: int) -> None:
    """Before a run starts: with ``kind: ray``, UserError in one line when Ray is not installed,
    the address cannot be reached or the workers outnumber the cluster's CPUs."""
    if cfg.kind == "local":
        return
    try:
        import ray  # noqa: F401
    except ImportError:
        raise UserError(f"backend.kind ray needs Ray: {RAY_INSTALL}") from None
    from training.backends.ray_backend import connect, worker_count

    worker_count(cfg, streams, envs_per_member, connect(cfg))
