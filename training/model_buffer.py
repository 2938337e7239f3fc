"""The model buffer: a bounded ring of transitions imagined by the world model.

It is never the real replay: the members draw ``dreamer.model_fraction`` of their micro-batches
from it. Storage is preallocated numpy, filled by copying detached arrays in; samples are built
by fancy indexing, so they are fresh arrays that own their memory (never views of storage).
"""

from __future__ import annotations

from typing import Any

import numpy as np
import torch

FIELDS = ("obs", "action", "reward", "next_obs", "terminated")


class ModelBuffer:
    """``capacity`` flat transitions: ``obs``/``next_obs (N, obs_dim)``, ``action (N, act_dim)``,
    ``reward (N,)`` float32, ``terminated (N,)`` bool; the oldest are overwritten first."""

    def __init__(self, capacity: int, obs_dim: int, act_dim: int, seed: int) -> None:
        self.capacity = capacity
        shapes = {"obs": (obs_dim,), "action": (act_dim,), "reward": (), "next_obs": (obs_dim,), "terminated": ()}
        self.data: dict[str, np.ndarray] = {
            name: np.zeros((capacity, *shape), np.bool_ if name == "terminated" else np.float32)
            for name, shape in shapes.items()
        }
        self.cursor = 0
        self.size = 0
        self.rng = np.random.default_rng(seed)

    def __len__(self) -> int:
        return self.size

    @property
    def nbytes(self) -> int:
        return sum(a.nbytes for a in self.data.values())

    def add(self, transitions: dict[str, np.ndarray]) -> None:
        """Copy ``n`` transitions in (each field with leading ``n``); keeps the newest ``capacity``."""
        n = len(transitions["reward"])
        keep = min(n, self.capacity)
        rows = (self.cursor + np.arange(keep)) % self.capacity
        for name in FIELDS:
            self.data[name][rows] = transitions[name][n - keep :]
        self.cursor = int((self.cursor + keep) % self.capacity)
        self.size = min(self.size + keep, self.capacity)

    def sample(self, members: int, batch_size: int) -> dict[str, np.ndarray]:
        """Independent uniform draws per member, like ``ReplayBuffer.sample``: each field
        ``(members, batch_size, ...)``, fresh arrays."""
        if self.size == 0:
            raise ValueError("cannot sample from an empty model buffer")
        index = self.rng.integers(0, self.size, size=(members, batch_size))
        return {name: self.data[name][index] for name in FIELDS}

    # ------------------------------------------------------------ checkpoint state

    def state(self) -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
        """(the filled rows of every field as tensors, JSON metadata incl. the sampling rng)."""
        tensors = {name: torch.from_numpy(self.data[name][: self.size].copy()) for name in FIELDS}
        return tensors, {"cursor": self.cursor, "size": self.size, "rng": self.rng.bit_generator.state}

    def load_state(self, tensors: dict[str, torch.Tensor], meta: dict[str, Any]) -> None:
        """Restore :meth:`state`'s output; ValueError in one line when it does not fit this buffer."""
        size = int(meta["size"])
        if size > self.capacity:
            raise ValueError(f"the saved model buffer holds {size} transitions, more than dreamer.model_buffer")
        for name in FIELDS:
            saved = tensors[name].numpy()
            if saved.shape != (size, *self.data[name].shape[1:]) or saved.dtype != self.data[name].dtype:
                raise ValueError(f"the saved model buffer's {name} is {saved.dtype}{list(saved.shape)}")
            self.data[name][:size] = saved
        self.cursor, self.size = int(meta["cursor"]), size
        self.rng.bit_generator.state = meta["rng"]
