"""Real ``gymnasium.Env`` subclasses that make the trainer's environment handling observable."""

from __future__ import annotations

from typing import Any

import gymnasium as gym
import numpy as np
from gymnasium import spaces


class CounterEnv(gym.Env):
    """Observation ``[t, episode, seed_draw]``: ``t`` counts steps in the episode, which terminates
    after ``length`` steps. Actions live in the asymmetric box ``[0, -4] .. [10, 4]``; the last
    action received is kept in ``last_action`` and every step ever taken is counted in ``total_steps``."""

    length = 5

    def __init__(self) -> None:
        self.observation_space = spaces.Box(-np.inf, np.inf, shape=(3,), dtype=np.float32)
        self.action_space = spaces.Box(np.array([0.0, -4.0], np.float32), np.array([10.0, 4.0], np.float32))
        self.t = 0
        self.episode = -1
        self.total_steps = 0
        self.last_action: np.ndarray | None = None
        self.draw = 0.0

    def _obs(self) -> np.ndarray:
        return np.array([self.t, self.episode, self.draw], np.float32)

    def reset(self, *, seed: int | None = None, options: dict[str, Any] | None = None) -> tuple[np.ndarray, dict]:
        super().reset(seed=seed)
        self.t = 0
        self.episode += 1
        self.draw = float(self.np_random.uniform())
        return self._obs(), {}

    def step(self, action: np.ndarray) -> tuple[np.ndarray, float, bool, bool, dict]:
        self.last_action = np.array(action, np.float32)
        self.t += 1
        self.total_steps += 1
        return self._obs(), 1.0, self.t >= self.length, False, {}


class DictObsEnv(gym.Env):
    """A dict observation space, which the trainer does not support."""

    def __init__(self) -> None:
        self.observation_space = spaces.Dict({"pos": spaces.Box(-1.0, 1.0, shape=(2,), dtype=np.float32)})
        self.action_space = spaces.Box(-1.0, 1.0, shape=(1,), dtype=np.float32)

    def reset(self, *, seed: int | None = None, options: dict[str, Any] | None = None) -> tuple[dict, dict]:
        super().reset(seed=seed)
        return {"pos": np.zeros(2, np.float32)}, {}

    def step(self, action: np.ndarray) -> tuple[dict, float, bool, bool, dict]:
        return {"pos": np.zeros(2, np.float32)}, 0.0, False, False, {}


class UnboundedActionEnv(gym.Env):
    """A Box action space without finite bounds, which the trainer cannot rescale to."""

    def __init__(self) -> None:
        self.observation_space = spaces.Box(-1.0, 1.0, shape=(2,), dtype=np.float32)
        self.action_space = spaces.Box(-np.inf, np.inf, shape=(1,), dtype=np.float32)

    def reset(self, *, seed: int | None = None, options: dict[str, Any] | None = None) -> tuple[np.ndarray, dict]:
        super().reset(seed=seed)
        return np.zeros(2, np.float32), {}

    def step(self, action: np.ndarray) -> tuple[np.ndarray, float, bool, bool, dict]:
        return np.zeros(2, np.float32), 0.0, False, False, {}


class NotAnEnv:
    """Has the right name shape but is no ``gymnasium.Env``."""


class BrokenConstructorEnv(gym.Env):
    """A user's env whose constructor fails."""

    def __init__(self) -> None:
        raise RuntimeError("simulator license not found")


class MemoryHogEnv(CounterEnv):
    """Raises MemoryError after 250 steps, as a host allocation failing mid-run would."""

    def step(self, action: np.ndarray) -> tuple[np.ndarray, float, bool, bool, dict]:
        if self.total_steps >= 250:
            raise MemoryError("simulated: cannot allocate 174 MiB")
        return super().step(action)


class NaNEnv(CounterEnv):
    """Returns a NaN observation on its third step."""

    def step(self, action: np.ndarray) -> tuple[np.ndarray, float, bool, bool, dict]:
        obs, reward, terminated, truncated, info = super().step(action)
        if self.total_steps >= 3:
            obs = np.full_like(obs, np.nan)
        return obs, reward, terminated, truncated, info


class EndlessEnv(gym.Env):
    """Never terminates or truncates by itself (no time limit of its own)."""

    def __init__(self) -> None:
        self.observation_space = spaces.Box(-1.0, 1.0, shape=(2,), dtype=np.float32)
        self.action_space = spaces.Box(-1.0, 1.0, shape=(1,), dtype=np.float32)

    def reset(self, *, seed: int | None = None, options: dict[str, Any] | None = None) -> tuple[np.ndarray, dict]:
        super().reset(seed=seed)
        return np.zeros(2, np.float32), {}

    def step(self, action: np.ndarray) -> tuple[np.ndarray, float, bool, bool, dict]:
        return np.zeros(2, np.float32), 0.0, False, False, {}


class StrictBoxEnv(EndlessEnv):
    """Refuses any action outside its (awkward, float32) action box, as some simulators do."""

    def __init__(self) -> None:
        super().__init__()
        low = np.array([3.923089, -3.440354, -6.491805], np.float32)  # a = +1 rescales 1 ulp past high
        high = np.array([10.674328, 0.19423719, -3.1861458], np.float32)
        self.action_space = spaces.Box(low, high, dtype=np.float32)

    def step(self, action: np.ndarray) -> tuple[np.ndarray, float, bool, bool, dict]:
        if not self.action_space.contains(np.asarray(action, np.float32)):
            raise ValueError(f"action {action!r} outside {self.action_space}")
        return super().step(action)


class ChoiceEnv(gym.Env):
    """``Discrete(3, start=-1)`` actions: each step the observation is ``[last action, t]`` and the
    reward is ``1`` for action ``1``, else ``0``; episodes terminate after ``length`` steps."""

    length = 4

    def __init__(self) -> None:
        self.observation_space = spaces.Box(-np.inf, np.inf, shape=(2,), dtype=np.float32)
        self.action_space = spaces.Discrete(3, start=-1)
        self.t = 0
        self.actions: list[int] = []

    def reset(self, *, seed: int | None = None, options: dict[str, Any] | None = None) -> tuple[np.ndarray, dict]:
        super().reset(seed=seed)
        self.t = 0
        return np.zeros(2, np.float32), {}

    def step(self, action: Any) -> tuple[np.ndarray, float, bool, bool, dict]:
        if not self.action_space.contains(action):
            raise ValueError(f"action {action!r} outside {self.action_space}")
        self.actions.append(int(action))
        self.t += 1
        return np.array([action, self.t], np.float32), float(action == 1), self.t >= self.length, False, {}


class TupleObsEnv(EndlessEnv):
    """A tuple observation space, which the trainer does not support."""

    def __init__(self) -> None:
        super().__init__()
        self.observation_space = spaces.Tuple((spaces.Box(-1.0, 1.0, shape=(2,)), spaces.Discrete(2)))


class MultiDiscreteEnv(EndlessEnv):
    """A MultiDiscrete action space, which the trainer does not support."""

    def __init__(self) -> None:
        super().__init__()
        self.action_space = spaces.MultiDiscrete([3, 2])


class MultiBinaryEnv(EndlessEnv):
    """A MultiBinary action space, which the trainer does not support."""

    def __init__(self) -> None:
        super().__init__()
        self.action_space = spaces.MultiBinary(3)
