"""Batched rollouts: every member acts in its own environments with one forward, no graph."""

from __future__ import annotations

from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Protocol, runtime_checkable

import numpy as np
import torch

from agents import PopulationAgent
from training.envs import EnvPool
from training.replay import Transitions


@runtime_checkable
class StreamActor(Protocol):
    """A member with per-stream recurrent state (the Dreamer member): it is told episode starts."""

    population: int

    def act_streams(self, obs: np.ndarray, is_first: np.ndarray, explore: bool) -> np.ndarray:
        """``obs (E, obs_dim)``, ``is_first (E,)`` bool -> actions ``(E, act_dim)`` float32 in ``[-1, 1]``
        (one-hot rows for ``Discrete`` actions)."""
        ...


class TransitionSink(Protocol):
    """Where a rollout's steps go: the replay, ``PackedStreams``, or a Ray worker's recorder."""

    def add(self, step: Transitions) -> None: ...


@dataclass
class RolloutResult:
    env_steps: int
    """Environment steps taken, all streams together."""
    episode_returns: list[list[float]]
    """Per stream, the returns of the episodes completed in this rollout, in order."""

    def member_fitness(self, members: int, episodes: int | np.ndarray) -> np.ndarray:
        """Mean of each member's first ``episodes`` returns per stream (an int, or one count per
        stream ``(E,)``), shape ``(members,)``."""
        quota = np.broadcast_to(np.asarray(episodes), (len(self.episode_returns),))
        per_member = len(self.episode_returns) // members
        fitness = np.zeros(members)
        for m in range(members):
            streams = range(m * per_member, (m + 1) * per_member)
            fitness[m] = np.mean([r for e in streams for r in self.episode_returns[e][: quota[e]]])
        return fitness


def episode_quota(episodes: int, streams_per_member: int, members: int) -> np.ndarray:
    """Episodes each stream plays so that every member plays exactly ``episodes``: shape ``(E,)``,
    the member's first ``episodes % streams_per_member`` streams play one more than the others."""
    base, extra = divmod(episodes, streams_per_member)
    one_member = base + (np.arange(streams_per_member) < extra)
    return np.tile(one_member, members)


class MemberSubset:
    """Some members of a population, acting in their own streams only (``StreamActor``): the
    members evaluated for real on a screened generation. ``members`` are sorted slots."""

    def __init__(self, agent: PopulationAgent, members: list[int], streams_per_member: int) -> None:
        self.agent, self.members, self.per_member = agent, members, streams_per_member
        self.population = len(members)
        self.device = next(agent.parameters()).device

    def act_streams(self, obs: np.ndarray, is_first: np.ndarray, explore: bool) -> np.ndarray:
        """``obs (m * per_member, obs_dim)`` -> actions ``(m * per_member, act_dim)``; the other
        members act on zeros (one batched forward serves all) and their actions are dropped."""
        full = np.zeros((self.agent.population, self.per_member, *obs.shape[1:]), obs.dtype)
        full[self.members] = obs.reshape(len(self.members), self.per_member, *obs.shape[1:])
        action = _act(self.agent, full.reshape(-1, *obs.shape[1:]), self.agent.population, explore, self.device)
        return action.reshape(self.agent.population, self.per_member, -1)[self.members].reshape(len(obs), -1)


class StreamNoise:
    """Each stream's own generator of exploration noise, seeded from its reset seed: the draws are a
    pure function of (seed, generation, phase, stream, step), whichever process plays the stream."""

    KEY = 0x6E6F697365
    """Mixed into every stream's seed so its noise is not the environment's own reset stream."""

    def __init__(self, seeds: np.ndarray, width: int) -> None:
        self.generators = [np.random.default_rng([int(s), self.KEY]) for s in seeds]
        self.width = width

    def draw(self) -> np.ndarray:
        """One step's uniform draws in ``[0, 1)``, ``(E, width)`` float32."""
        return np.stack([g.random(self.width, np.float32) for g in self.generators])


def rollout(
    agent: PopulationAgent | StreamActor,
    pool: EnvPool,
    replay: TransitionSink | None,
    seeds: np.ndarray,
    *,
    explore: bool,
    steps: int = 0,
    episodes_per_stream: int | np.ndarray = 0,
    random_steps: int = 0,
    step_multiple: int = 1,
    min_steps: int = 0,
    on_step: Callable[[int], None] | None = None,
) -> RolloutResult:
    """Reset every stream with its seed, then step all streams together.

    Stops after ``steps`` steps, or once every stream completed its ``episodes_per_stream``
    episodes (an int, or one count per stream ``(E,)``; streams that finish early keep playing,
    their data is not wasted), after a multiple of ``step_multiple`` steps (what ``PackedStreams``
    needs), and not before ``min_steps`` steps. The first ``random_steps`` steps take uniform random
    actions; those and the exploration noise come from each stream's ``StreamNoise``.
    Each step's transitions, ``E = P * envs_per_member`` of them, go to ``replay``; a stream
    cut by the end of the rollout is marked truncated (it bootstraps, it is not terminal).
    """
    count = len(pool)
    quota = np.broadcast_to(np.asarray(episodes_per_stream), (count,))
    if (steps > 0) == bool(quota.max() > 0):
        raise ValueError("rollout needs exactly one of steps or episodes_per_stream")
    act = _policy(agent, explore)
    noise = StreamNoise(seeds, pool.act_dim) if explore or random_steps else None
    obs = pool.reset(seeds)
    is_first = np.ones(count, np.bool_)
    running = np.zeros(count, np.float64)
    returns: list[list[float]] = [[] for _ in range(count)]
    taken = 0
    done = False
    while not done:
        uniform = noise.draw() if noise is not None else None
        action = uniform * 2 - 1 if uniform is not None and taken < random_steps else act(obs, is_first, uniform)
        action = pool.canonical(action)  # Discrete: one-hot rows (a random row becomes a random choice)
        next_obs, reward, terminated, truncated = pool.step(action)
        taken += 1
        running += reward
        ended = terminated | truncated
        for e in np.flatnonzero(ended):
            returns[e].append(float(running[e]))
            running[e] = 0.0
        done = taken >= steps if steps > 0 else all(len(r) >= q for r, q in zip(returns, quota, strict=True))
        done = done and taken % step_multiple == 0 and taken >= min_steps
        cut = ~ended if done else np.zeros(count, np.bool_)
        if replay is not None:
            replay.add(Transitions(obs, action, reward, next_obs, terminated, truncated | cut, is_first))
        is_first = ended
        obs = pool.obs.copy()
        if on_step is not None:
            on_step(count)
    return RolloutResult(env_steps=taken * count, episode_returns=returns)


Policy = Callable[[np.ndarray, np.ndarray, "np.ndarray | None"], np.ndarray]
"""``(obs (E, obs_dim), is_first (E,), noise (E, act_dim) or None) -> actions (E, act_dim)``."""


def _policy(agent: PopulationAgent | StreamActor, explore: bool) -> Policy:
    """The rollout's policy, resolved once per rollout (a ``StreamActor`` keeps its own noise)."""
    if isinstance(agent, StreamActor):
        return lambda obs, is_first, _: agent.act_streams(obs, is_first, explore)
    device = next(agent.parameters()).device
    return lambda obs, _, noise: _act(agent, obs, agent.population, explore, device, noise)


def _act(
    agent: PopulationAgent,
    obs: np.ndarray,
    members: int,
    explore: bool,
    device: torch.device,
    noise: np.ndarray | None = None,
) -> np.ndarray:
    """``obs (E, obs_dim)`` -> actions ``(E, act_dim)``; stream ``e`` is member ``e // (E / P)``;
    ``noise (E, act_dim)`` uniform draws for exploration (None: torch's global generator)."""
    with torch.inference_mode(), _one_cpu_thread(device):
        batch = torch.as_tensor(obs, device=device).view(members, -1, *obs.shape[1:])
        draws = None if noise is None else torch.as_tensor(noise, device=device).view(members, -1, noise.shape[-1])
        action = agent.act(batch, explore, draws).reshape(obs.shape[0], -1).cpu().numpy().astype(np.float32, copy=False)
    # A diverged member (non-finite weights) must not crash the environments: it plays
    # neutral actions and the trainer gives it fitness -inf, so evolution replaces it.
    return np.nan_to_num(action, nan=0.0, posinf=1.0, neginf=-1.0)


@contextmanager
def _one_cpu_thread(device: torch.device) -> Iterator[None]:
    """On cpu, run torch on one intra-op thread inside the block, then restore the setting.

    An acting forward is tiny (a few rows per member): splitting it over threads saves nothing,
    and on a busy machine each parallel region can stall for a scheduler time slice
    (milliseconds) waiting for a descheduled thread. Results do not depend on the thread count.
    """
    threads = torch.get_num_threads()
    if device.type != "cpu" or threads == 1:
        yield
        return
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(threads)
