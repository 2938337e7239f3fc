"""The shared replay buffer: preallocated numpy, copy in, copy out.

Storage is a ring over time with one column per environment stream, ``(T, E, ...)``:
every rollout step writes one row of ``E`` transitions (all members' environments step
in lockstep), so a stream's consecutive steps are consecutive rows and sequences can be
sampled later without extra bookkeeping. Capacity is given in transitions: ``T = capacity // E``.

Samples are built by fancy indexing, which returns fresh arrays that own their memory;
nothing handed out is a view into storage, so overwritten (evicted) rows are really gone.
"""

from __future__ import annotations

import warnings
from dataclasses import dataclass
from typing import Any

import numpy as np
import psutil

FIELDS = ("obs", "action", "reward", "next_obs", "terminated", "truncated", "is_first")


@dataclass
class Transitions:
    """One rollout step of all ``E`` streams: ``obs``/``next_obs`` ``(E, obs_dim)``,
    ``action`` ``(E, act_dim)`` in ``[-1, 1]``, ``reward`` ``(E,)``, flags ``(E,)`` bool."""

    obs: np.ndarray
    action: np.ndarray
    reward: np.ndarray
    next_obs: np.ndarray
    terminated: np.ndarray
    truncated: np.ndarray
    is_first: np.ndarray


class ReplayBuffer:
    def __init__(self, capacity: int, streams: int, obs_dim: int, act_dim: int, seed: int) -> None:
        if capacity < streams:
            raise ValueError(f"replay capacity {capacity} is smaller than the {streams} env streams")
        self.streams = streams
        self.rows = capacity // streams
        self.capacity = self.rows * streams
        shapes: dict[str, tuple[tuple[int, ...], type]] = {
            "obs": ((obs_dim,), np.float32),
            "action": ((act_dim,), np.float32),
            "reward": ((), np.float32),
            "next_obs": ((obs_dim,), np.float32),
            "terminated": ((), np.bool_),
            "truncated": ((), np.bool_),
            "is_first": ((), np.bool_),
        }
        self.nbytes = sum(
            self.capacity * int(np.prod(s, dtype=np.int64)) * np.dtype(t).itemsize for s, t in shapes.values()
        )
        _warn_if_too_large(self.nbytes)
        self.data: dict[str, np.ndarray] = {
            name: np.zeros((self.rows, streams, *shape), dtype) for name, (shape, dtype) in shapes.items()
        }
        self.cursor = 0
        self.filled_rows = 0
        self.rng = np.random.default_rng(seed)

    def __len__(self) -> int:
        """Transitions stored."""
        return self.filled_rows * self.streams

    @property
    def filled_bytes(self) -> int:
        return self.nbytes * self.filled_rows // self.rows

    def add(self, step: Transitions) -> None:
        """Copy one step of all streams into the next row, evicting the oldest when full."""
        row = self.cursor
        for name in FIELDS:
            self.data[name][row] = getattr(step, name)
        self.cursor = (row + 1) % self.rows
        self.filled_rows = min(self.filled_rows + 1, self.rows)

    def sample(self, members: int, batch_size: int) -> dict[str, np.ndarray]:
        """Independent uniform draws per member: each field ``(members, batch_size, ...)``.

        The arrays are fresh copies (they own their memory), never views of storage.
        """
        if self.filled_rows == 0:
            raise ValueError("cannot sample from an empty replay buffer")
        flat = self.rng.integers(0, self.filled_rows * self.streams, size=(members, batch_size))
        rows, cols = np.divmod(flat, self.streams)
        return {name: self.data[name][rows, cols] for name in ("obs", "action", "reward", "next_obs", "terminated")}

    # ------------------------------------------------------------ checkpoint state

    def state(self) -> tuple[dict[str, np.ndarray], dict[str, Any]]:
        """(arrays of the filled rows, JSON metadata). Arrays are the storage itself: copy
        or write them out before the buffer changes."""
        arrays = {name: arr[: self.filled_rows] for name, arr in self.data.items()}
        meta = {
            "cursor": self.cursor,
            "filled_rows": self.filled_rows,
            "rows": self.rows,
            "streams": self.streams,
            "rng": self.rng.bit_generator.state,
        }
        return arrays, meta

    def load_state(self, arrays: dict[str, np.ndarray], meta: dict[str, Any]) -> None:
        if meta["rows"] != self.rows or meta["streams"] != self.streams:
            raise ValueError(
                f"replay layout {meta['rows']}x{meta['streams']} does not match {self.rows}x{self.streams}"
            )
        filled = int(meta["filled_rows"])
        for name, arr in self.data.items():
            arr[:filled] = arrays[name]
        self.cursor = int(meta["cursor"])
        self.filled_rows = filled
        self.rng.bit_generator.state = meta["rng"]


def _warn_if_too_large(nbytes: int) -> None:
    available = psutil.virtual_memory().available
    if nbytes > 0.8 * available:
        warnings.warn(
            f"replay buffer needs {nbytes / 2**30:.1f} GiB but only {available / 2**30:.1f} GiB of RAM "
            "is available; lower replay.capacity or the run may be killed when the buffer fills",
            stacklevel=3,
        )
