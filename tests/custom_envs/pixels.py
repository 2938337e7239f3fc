"""A tiny image environment whose every frame can be recognised, for the frame replay's tests."""

from __future__ import annotations

from typing import Any

import gymnasium as gym
import numpy as np
from gymnasium import spaces
from gymnasium.wrappers import FrameStackObservation, TimeLimit


class CountingFramesEnv(gym.Env):
    """8x8 uint8 frames; frame number ``n`` (counted over the env's whole life, resets included) is
    written into the first three pixels (``n`` in base 256), the rest is noise. Episodes last
    1..``max_length`` steps (drawn at reset); odd episodes terminate, even ones truncate."""

    def __init__(self, max_length: int = 6) -> None:
        self.observation_space = spaces.Box(0, 255, shape=(8, 8), dtype=np.uint8)
        self.action_space = spaces.Discrete(3)
        self.max_length = max_length
        self.frames = 0
        self.episode = -1
        self.t = 0
        self.length = 1

    def _frame(self) -> np.ndarray:
        frame = self.np_random.integers(0, 256, size=(8, 8), dtype=np.uint8)
        frame.flat[:3] = [self.frames // 65536 % 256, self.frames // 256 % 256, self.frames % 256]
        self.frames += 1
        return frame

    def reset(self, *, seed: int | None = None, options: dict[str, Any] | None = None) -> tuple[np.ndarray, dict]:
        super().reset(seed=seed)
        self.episode += 1
        self.t = 0
        self.length = int(self.np_random.integers(1, self.max_length + 1))
        return self._frame(), {}

    def step(self, action: int) -> tuple[np.ndarray, float, bool, bool, dict]:
        self.t += 1
        done = self.t >= self.length
        return self._frame(), 0.0, done and self.episode % 2 == 1, done and self.episode % 2 == 0, {}


def stacked(max_length: int = 6, stack: int = 4, limit: int = 0) -> gym.Env:
    """``CountingFramesEnv`` behind ``FrameStackObservation`` (its default padding), optionally a
    ``TimeLimit`` outside: observations ``(stack, 8, 8)`` uint8."""
    env: gym.Env = FrameStackObservation(CountingFramesEnv(max_length), stack)
    return TimeLimit(env, max_episode_steps=limit) if limit else env


class UnstackedFramesEnv(gym.Env):
    """``(3, 40, 40)`` uint8 noise that is no frame stack (each observation is new in every channel),
    e.g. channels-first RGB: the trainer must refuse it in one line."""

    def __init__(self) -> None:
        self.observation_space = spaces.Box(0, 255, shape=(3, 40, 40), dtype=np.uint8)
        self.action_space = spaces.Discrete(2)

    def _frame(self) -> np.ndarray:
        return self.np_random.integers(0, 256, size=(3, 40, 40), dtype=np.uint8)

    def reset(self, *, seed: int | None = None, options: dict[str, Any] | None = None) -> tuple[np.ndarray, dict]:
        super().reset(seed=seed)
        return self._frame(), {}

    def step(self, action: int) -> tuple[np.ndarray, float, bool, bool, dict]:
        return self._frame(), 0.0, False, False, {}


class SmallStacksEnv(gym.Wrapper):
    """:func:`stacked` as a class for a ``module:ClassName`` env id: ``(4, 8, 8)`` frame stacks, too
    small for the CNN members."""

    def __init__(self) -> None:
        super().__init__(stacked())


class PointLeftRight(gym.Env):
    """A pixel task a CNN must see to solve: each 36x36 uint8 frame shows a bright 6x6 square in its
    left or right half (drawn at random each step); action 0 / 1 names the side, +1 when right.
    Episodes last 20 steps: a blind policy scores ~10, one that sees scores 20."""

    def __init__(self) -> None:
        self.observation_space = spaces.Box(0, 255, shape=(36, 36), dtype=np.uint8)
        self.action_space = spaces.Discrete(2)
        self.side, self.t = 0, 0

    def _frame(self) -> np.ndarray:
        self.side = int(self.np_random.integers(0, 2))
        frame = np.zeros((36, 36), np.uint8)
        row, col = int(self.np_random.integers(0, 30)), int(self.np_random.integers(0, 12)) + 18 * self.side
        frame[row : row + 6, col : col + 6] = 255
        return frame

    def reset(self, *, seed: int | None = None, options: dict[str, Any] | None = None) -> tuple[np.ndarray, dict]:
        super().reset(seed=seed)
        self.t = 0
        return self._frame(), {}

    def step(self, action: int) -> tuple[np.ndarray, float, bool, bool, dict]:
        reward = float(int(action) == self.side)
        self.t += 1
        return self._frame(), reward, False, self.t >= 20, {}


class StackedPointLeftRight(gym.Wrapper):
    """:class:`PointLeftRight` behind ``FrameStackObservation`` of 4: ``(4, 36, 36)`` uint8."""

    def __init__(self) -> None:
        super().__init__(FrameStackObservation(PointLeftRight(), 4))
