"""Environments: building them from a user's id, checking spaces, and stepping many in lockstep."""

from __future__ import annotations

import copy
import importlib
import os
import sys
from collections.abc import Callable
from typing import Any

import gymnasium as gym
import numpy as np
from gymnasium.wrappers import AtariPreprocessing, FrameStackObservation, TimeLimit

from config import EnvConfig, UserError

SUPPORTED = (
    "flat Box observations (1-D vectors) or uint8 frame stacks (stack, H, W) with Discrete actions; "
    "Box actions with finite bounds or Discrete actions"
)


DEFAULT_EPISODE_LIMIT = 1_000
"""Time limit given to an environment that has none of its own when ``env.max_episode_steps`` is 0,
so evaluation (which runs whole episodes) always ends."""

ATARI_PREFIX = "ALE/"
ATARI_INSTALL = 'pip install -e ".[atari]"'
ATARI_FRAME_SKIP = 4
ATARI_STACK = 4
ATARI_EPISODE_LIMIT = 108_000 // ATARI_FRAME_SKIP
"""Agent steps in the ALE v5 ids' own limit of 108,000 emulator frames (30 minutes of play)."""
ATARI_PREPROCESSING: dict[str, Any] = {
    "noop_max": 30,
    "frame_skip": ATARI_FRAME_SKIP,
    "screen_size": 84,
    "grayscale_obs": True,
}
"""``AtariPreprocessing``'s arguments in :func:`make_atari` (the rest are gymnasium's defaults)."""


def make_env(cfg: EnvConfig) -> gym.Env:
    """Build one environment from a registered id or ``package.module:ClassName``.

    ``env.max_episode_steps`` replaces the environment's own time limit (a registered id gets it
    through ``gym.make``, which can lengthen episodes too); an environment without any limit gets
    ``DEFAULT_EPISODE_LIMIT``.
    """
    env = _instantiate(cfg.id, cfg.max_episode_steps)
    if episode_limit(env) is None:
        env = TimeLimit(env, max_episode_steps=cfg.max_episode_steps or DEFAULT_EPISODE_LIMIT)
    check_spaces(env, cfg.id)
    return env


def wrappers(cfg: EnvConfig, env: gym.Env) -> list[dict[str, Any]]:
    """How :func:`make_env` built ``env`` from ``cfg``, innermost first, for rebuilding it without
    the trainer: ``{"call": "gymnasium.make" | "gymnasium.wrappers.<Name>" | "module:ClassName",
    "args": {...}}``, each call taking the previous one's env as its first argument (``needs``: a
    package to import and ``gymnasium.register_envs`` first)."""
    limit = {"max_episode_steps": episode_limit(env)}
    if cfg.id.startswith(ATARI_PREFIX):
        return [
            {"call": "gymnasium.make", "args": {"id": cfg.id, "frameskip": 1}, "needs": "ale_py"},
            {"call": "gymnasium.wrappers.AtariPreprocessing", "args": dict(ATARI_PREPROCESSING)},
            {"call": "gymnasium.wrappers.FrameStackObservation", "args": {"stack_size": ATARI_STACK}},
            {"call": "gymnasium.wrappers.TimeLimit", "args": limit},
        ]
    if ":" in cfg.id and not cfg.id.startswith(":"):
        built = [{"call": cfg.id, "args": {}}]
        return built + ([{"call": "gymnasium.wrappers.TimeLimit", "args": limit}] if limit["max_episode_steps"] else [])
    return [{"call": "gymnasium.make", "args": {"id": cfg.id, **limit}}]


def episode_limit(env: gym.Env) -> int | None:
    """The step limit of the innermost ``TimeLimit`` wrapper around ``env``, or None without one."""
    limit = None
    while isinstance(env, gym.Wrapper):
        if isinstance(env, TimeLimit):
            limit = int(env._max_episode_steps)
        env = env.env
    return limit


def make_atari(env_id: str, max_episode_steps: int = 0) -> gym.Env:
    """An ``ALE/...-v5`` id with the standard preprocessing, from gymnasium's own wrappers: the v5
    env at ``frameskip=1`` (sticky actions as v5 defines them, ``repeat_action_probability=0.25``),
    ``AtariPreprocessing`` (up to 30 no-op steps at reset, frame skip 4 with a max over the last two
    frames, 84x84 grayscale), ``FrameStackObservation`` of 4 (reset padding), then a ``TimeLimit``
    in agent steps (``max_episode_steps``, or the v5 ids' own 108,000 frames). Observations are
    ``(4, 84, 84)`` uint8, oldest frame first. UserError without the ``atari`` extra."""
    try:
        import ale_py
    except ImportError:
        raise UserError(f"env {env_id!r} needs ale-py for Atari games: {ATARI_INSTALL}") from None
    ale_py.ALEInterface.setLoggerMode(ale_py.LoggerMode.Error)  # no emulator banner on stderr
    gym.register_envs(ale_py)
    try:
        env = gym.make(env_id, frameskip=1)
    except gym.error.Error as err:
        raise UserError(f"unknown environment {env_id!r}: {str(err).splitlines()[0]}") from None
    try:
        env = AtariPreprocessing(env, **ATARI_PREPROCESSING)
    except gym.error.DependencyNotInstalled:  # opencv, which the extra installs with ale-py
        raise UserError(f"env {env_id!r} needs opencv for Atari preprocessing: {ATARI_INSTALL}") from None
    env = FrameStackObservation(env, ATARI_STACK)
    return TimeLimit(env, max_episode_steps=max_episode_steps or ATARI_EPISODE_LIMIT)


def _instantiate(env_id: str, max_episode_steps: int) -> gym.Env:
    if env_id.startswith(ATARI_PREFIX):
        return make_atari(env_id, max_episode_steps)
    if ":" in env_id and not env_id.startswith(":"):
        module_name, _, class_name = env_id.partition(":")
        if os.getcwd() not in sys.path:
            sys.path.append(os.getcwd())  # a user's env module next to where they run the trainer
        try:
            module = importlib.import_module(module_name)
        except ImportError as err:
            raise UserError(f"cannot import module {module_name!r} for env {env_id!r}: {err}") from None
        cls = getattr(module, class_name, None)
        if cls is None:
            raise UserError(f"module {module_name!r} has no class {class_name!r} (env {env_id!r})")
        try:
            env = cls()
        except Exception as err:  # a user's constructor can fail in any way
            raise UserError(f"cannot construct env {env_id!r}: {type(err).__name__}: {err}") from None
        if not isinstance(env, gym.Env):
            raise UserError(f"{env_id!r} is not a gymnasium.Env subclass")
        return TimeLimit(env, max_episode_steps=max_episode_steps) if max_episode_steps > 0 else env
    try:
        return gym.make(env_id, max_episode_steps=max_episode_steps or None)
    except gym.error.DependencyNotInstalled as err:
        raise UserError(
            f"env {env_id!r} needs an extra dependency ({str(err).splitlines()[0]}); "
            "for MuJoCo tasks: pip install '.[mujoco]'"
        ) from None
    except gym.error.Error as err:
        raise UserError(f"unknown environment {env_id!r}: {str(err).splitlines()[0]}") from None


def check_spaces(env: gym.Env, env_id: str) -> None:
    """Raise UserError unless the spaces are ones this trainer supports."""
    obs, act = env.observation_space, env.action_space
    if isinstance(obs, gym.spaces.Box) and len(obs.shape) in (2, 3) and not is_frame_stack(obs):
        raise UserError(
            f"env {env_id!r} has image observations {obs}; CNN members take uint8 frame stacks "
            f"(stack, H, W), e.g. FrameStackObservation of grayscale frames (ALE/... ids); supported: {SUPPORTED}"
        )
    if not (isinstance(obs, gym.spaces.Box) and (len(obs.shape) == 1 or is_frame_stack(obs))):
        raise UserError(f"env {env_id!r} has observation space {obs}; supported: {SUPPORTED}")
    if isinstance(act, gym.spaces.Discrete):
        return
    if not (isinstance(act, gym.spaces.Box) and len(act.shape) == 1):
        raise UserError(f"env {env_id!r} has action space {act}; supported: {SUPPORTED}")
    if not (np.all(np.isfinite(act.low)) and np.all(np.isfinite(act.high))):
        raise UserError(f"env {env_id!r} has unbounded actions {act}; supported: {SUPPORTED}")


def is_frame_stack(space: gym.Space) -> bool:
    """Whether ``space`` holds frame stacks ``(stack, H, W)`` uint8, fewer frames than pixels a side
    (what ``FrameStackObservation`` of grayscale frames gives; not a channels-last ``(H, W, 3)`` image)."""
    if not (isinstance(space, gym.spaces.Box) and space.dtype == np.uint8 and len(space.shape) == 3):
        return False
    stack, height, width = space.shape
    return stack < min(height, width)


class EnvPool:
    """``E`` environments stepped in lockstep, auto-resetting finished episodes.

    Observations are ``(E, *obs_shape)`` of ``obs_dtype``: float32 vectors ``(E, obs_dim)``, or uint8
    frame stacks ``(E, stack, H, W)`` kept as uint8 (frames become floats on the device, in the agent).
    ``Box`` actions come in normalised to ``[-1, 1]`` and are rescaled to each env's bounds;
    ``Discrete(n)`` actions come in as rows of width ``n`` whose largest entry is the choice
    (one-hot rows, as agents and the replay hold them). Stream ``e`` belongs to member
    ``e // envs_per_member``.
    """

    def __init__(self, make: Callable[[], gym.Env], count: int) -> None:
        self.envs = [make() for _ in range(count)]
        space = self.envs[0].action_space
        self.action_kind = "discrete" if isinstance(space, gym.spaces.Discrete) else "box"
        """``"box"`` or ``"discrete"``: what ``agents.make_population`` builds members for."""
        if isinstance(space, gym.spaces.Discrete):
            self.act_dim = int(space.n)
            self.first_action = int(space.start)
        else:
            assert isinstance(space, gym.spaces.Box)
            self.low = space.low.astype(np.float32)
            self.high = space.high.astype(np.float32)
            self.act_dim = int(space.shape[0])
        obs_space = self.envs[0].observation_space
        self.obs_shape: tuple[int, ...] = tuple(int(s) for s in obs_space.shape or ())
        """One observation's shape: ``(obs_dim,)`` or a frame stack ``(stack, H, W)``."""
        self.obs_dtype = np.dtype(np.uint8) if is_frame_stack(obs_space) else np.dtype(np.float32)
        self.obs_dim = int(np.prod(self.obs_shape))
        """Values in one observation (its width, for flat observations)."""
        self.max_episode_steps = episode_limit(self.envs[0]) or DEFAULT_EPISODE_LIMIT
        """Steps after which an episode is cut (every env is built the same way)."""
        self.obs = np.zeros((count, *self.obs_shape), self.obs_dtype)

    def __len__(self) -> int:
        return len(self.envs)

    def reset(self, seeds: np.ndarray) -> np.ndarray:
        """Reset every env with its own seed; returns observations ``(E, *obs_shape)``."""
        for e, env in enumerate(self.envs):
            obs, _ = env.reset(seed=int(seeds[e]))
            self.obs[e] = obs
        return self.obs.copy()

    def canonical(self, actions: np.ndarray) -> np.ndarray:
        """Actions ``(E, act_dim)`` as stored in the replay: ``Box`` actions unchanged (the same
        array); for ``Discrete`` the one-hot row of each row's largest entry (so uniform random rows
        become uniformly random choices)."""
        if self.action_kind == "box":
            return actions
        return np.eye(self.act_dim, dtype=np.float32)[actions.argmax(-1)]

    def env_actions(self, actions: np.ndarray) -> np.ndarray:
        """What each env's ``step`` gets for actions ``(E, act_dim)``: ``Box`` rows rescaled to the
        bounds ``(E, act_dim)``, ``Discrete`` rows as integer choices ``(E,)``."""
        if self.action_kind == "discrete":
            return actions.argmax(-1) + self.first_action
        # Rescaling can land one float32 ulp outside the box; an env checking contains() must not fail.
        return np.clip(self.low + (actions + 1.0) * 0.5 * (self.high - self.low), self.low, self.high)

    def step(self, actions: np.ndarray) -> tuple[np.ndarray, ...]:
        """Step all envs with normalised (``Box``) or one-hot (``Discrete``) actions ``(E, act_dim)``.

        Returns ``(next_obs, reward, terminated, truncated)``, each with leading ``E``;
        ``next_obs`` is the true successor (before any auto-reset). ``self.obs`` then holds
        the observations to act on next.
        """
        count = len(self.envs)
        next_obs = np.zeros((count, *self.obs_shape), self.obs_dtype)
        reward = np.zeros(count, np.float32)
        terminated = np.zeros(count, np.bool_)
        truncated = np.zeros(count, np.bool_)
        scaled = self.env_actions(actions)
        for e, env in enumerate(self.envs):
            obs, r, term, trunc, _ = env.step(scaled[e])
            next_obs[e], reward[e], terminated[e], truncated[e] = obs, r, term, trunc
            if term or trunc:
                obs, _ = env.reset()
            self.obs[e] = obs
        finite_obs = self.obs_dtype == np.uint8 or np.all(np.isfinite(next_obs))
        if not finite_obs or not np.all(np.isfinite(reward)):
            spec = self.envs[0].spec
            name = spec.id if spec is not None else type(self.envs[0].unwrapped).__name__
            raise UserError(f"env {name!r} returned a non-finite observation or reward (NaN or inf)")
        return next_obs, reward, terminated, truncated

    def subset(self, streams: np.ndarray) -> EnvPool:
        """A pool of the given streams' environments (the same objects, not copies), e.g. the
        members evaluated for real on a screened generation."""
        part = copy.copy(self)
        part.envs = [self.envs[int(e)] for e in streams]
        part.obs = np.zeros((len(part.envs), *self.obs.shape[1:]), self.obs.dtype)
        return part

    def close(self) -> None:
        for env in self.envs:
            env.close()
