"""Noise-free episodes of one member of a checkpointed generation, optionally recorded as video
with gymnasium's ``RecordVideo``. Episode ``i`` starts from reset seed ``seeds[i]``."""

from __future__ import annotations

import os
import warnings
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import gymnasium as gym
import numpy as np

from config import Config, UserError
from training.envs import DEFAULT_EPISODE_LIMIT, EnvPool, check_spaces, episode_limit, make_env
from training.tools.loading import Generation, Member, MemberActor, dreamer_member, make_pool, population_agent

Actor = Callable[[np.ndarray, np.ndarray], np.ndarray]
"""``(obs (N, obs_dim) float32, is_first (N,) bool) -> actions (N, act_dim)`` as the env pool takes them."""

MAX_STREAMS = 32
"""Episodes played side by side (one batched forward per step); more are played in rounds."""


@dataclass(frozen=True)
class Episodes:
    """Returns and lengths of the episodes played, in seed order."""

    seeds: list[int]
    returns: list[float]
    lengths: list[int]

    def summary(self) -> str:
        r, n = np.asarray(self.returns), np.asarray(self.lengths)
        first, last = self.seeds[0], self.seeds[-1]
        return (
            f"{len(r)} noise-free episode(s), reset seeds {first}..{last}\n"
            f"  return  mean {r.mean():.2f}  std {r.std():.2f}  min {r.min():.2f}  max {r.max():.2f}\n"
            f"  length  mean {n.mean():.1f}  min {n.min()}  max {n.max()}"
        )


def play(act: Actor, pool: EnvPool, seeds: np.ndarray) -> tuple[list[float], list[int]]:
    """One episode per stream of ``pool`` from ``seeds (E,)``: (returns, lengths), stream order.
    Rewards are summed as the trainer's rollout sums them (float32 rewards into a float64 total);
    streams that finish first keep stepping (auto-reset) without counting, as in training."""
    count = len(pool)
    obs = pool.reset(seeds)
    is_first = np.ones(count, np.bool_)
    running = np.zeros(count, np.float64)
    lengths = np.zeros(count, np.int64)
    done = np.zeros(count, np.bool_)
    while not done.all():
        _, reward, terminated, truncated = pool.step(act(obs, is_first))
        live = ~done
        running[live] += reward[live]
        lengths[live] += 1
        is_first = terminated | truncated
        done |= is_first
        obs = pool.obs.copy()
    return running.tolist(), lengths.tolist()


def actor(gen: Generation, member: Member, pool: EnvPool) -> tuple[Actor, Callable[[], None]]:
    """The member's noise-free acting function and what to call before each round of episodes
    (the Dreamer member forgets its filter state)."""
    if member.slot is not None:
        return MemberActor(population_agent(gen, pool), member.slot, gen.cfg.env.envs_per_member), lambda: None
    dreamer = dreamer_member(gen, pool)
    return (lambda obs, is_first: dreamer.act_streams(obs, is_first, False)), dreamer.agent.reset_state


def evaluate(gen: Generation, member: Member, seeds: Sequence[int], video: Path | None = None) -> Episodes:
    """Play one noise-free episode of ``member`` from each reset seed; with ``video``, one at a
    time, each recorded to ``video/<prefix>-episode-<i>.mp4`` (see :func:`video_prefix`)."""
    seeds = [int(s) for s in seeds]
    if video is not None:
        pool = EnvPool(lambda: recording_env(gen.cfg, video, video_prefix(gen, member)), 1)
        rounds = [[s] for s in seeds]
    else:
        per_member = gen.cfg.env.envs_per_member  # the actor's group size: whole groups per round
        streams = max(MAX_STREAMS // per_member, 1) * per_member
        pool = make_pool(gen.cfg, min(len(seeds), streams))
        rounds = [seeds[i : i + streams] for i in range(0, len(seeds), streams)]
    returns: list[float] = []
    lengths: list[int] = []
    try:
        act, reset = actor(gen, member, pool)
        for chunk in rounds:
            padded = np.resize(np.asarray(chunk, np.int64), len(pool))  # a short last round repeats seeds
            reset()
            got, steps = play(act, pool, padded)
            returns += got[: len(chunk)]
            lengths += steps[: len(chunk)]
    except gym.error.DependencyNotInstalled as err:
        raise UserError(f"--video: {str(err).splitlines()[0]} (pip install -e '.[video]')") from None
    finally:
        pool.close()
    return Episodes(seeds, returns, lengths)


def video_prefix(gen: Generation, member: Member) -> str:
    """File name prefix of the videos: run, generation (1-based) and member."""
    who = "dreamer" if member.slot is None else f"slot{member.slot}"
    return f"{gen.run}-gen{gen.generation + 1}-{who}"


def video_files(folder: Path, prefix: str, episodes: int) -> list[Path]:
    """The files :func:`evaluate` writes for ``episodes`` recorded episodes."""
    return [folder / f"{prefix}-episode-{i}.mp4" for i in range(episodes)]


class _SeededResetsOnly(gym.Wrapper):  # type: ignore[type-arg]
    """Passes on only seeded resets: the env pool's automatic reset after an episode would start a
    recording of an episode nobody plays; each evaluated episode starts with a seeded reset."""

    _last: tuple[Any, dict[str, Any]] | None = None

    def reset(self, *, seed: int | None = None, options: dict[str, Any] | None = None) -> tuple[Any, dict[str, Any]]:
        if seed is None and self._last is not None:
            return self._last
        self._last = self.env.reset(seed=seed, options=options)
        return self._last


def recording_env(cfg: Config, folder: Path, prefix: str) -> gym.Env:
    """The run's environment rendering ``rgb_array`` frames into ``RecordVideo`` (every episode).
    UserError in one line when it cannot render or the video writer is not installed."""
    probe = make_env(cfg.env)
    modes = probe.metadata.get("render_modes") or []
    probe.close()
    if "rgb_array" not in modes:
        raise UserError(
            f"env {cfg.env.id!r} cannot render frames (render modes: {', '.join(modes) or 'none'}); "
            "--video needs an environment with the rgb_array render mode"
        )
    os.environ.setdefault("PYGAME_HIDE_SUPPORT_PROMPT", "1")
    env = _rendering(cfg)
    if episode_limit(env) is None:
        env = gym.wrappers.TimeLimit(env, max_episode_steps=cfg.env.max_episode_steps or DEFAULT_EPISODE_LIMIT)
    check_spaces(env, cfg.env.id)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # "overwriting existing videos": the caller checked (--force)
        try:
            recorder = gym.wrappers.RecordVideo(
                env, str(folder), episode_trigger=lambda _: True, name_prefix=prefix, disable_logger=True
            )
        except gym.error.DependencyNotInstalled as err:
            env.close()
            raise UserError(f"--video: {str(err).splitlines()[0]} (pip install -e '.[video]')") from None
    return _SeededResetsOnly(recorder)


def _rendering(cfg: Config) -> gym.Env:
    """The environment built as ``make_env`` builds it, with ``render_mode="rgb_array"``."""
    env_id, limit = cfg.env.id, cfg.env.max_episode_steps
    if ":" in env_id and not env_id.startswith(":"):
        import importlib

        module, _, name = env_id.partition(":")
        try:
            env: gym.Env = getattr(importlib.import_module(module), name)(render_mode="rgb_array")
        except TypeError as err:
            raise UserError(f"env {env_id!r} does not take render_mode ({err}); --video needs it") from None
        return gym.wrappers.TimeLimit(env, max_episode_steps=limit) if limit > 0 else env
    return gym.make(env_id, max_episode_steps=limit or None, render_mode="rgb_array")
