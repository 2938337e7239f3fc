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


class PackedStreams:
    """Collects the rollout steps of ``m`` streams, ``m`` a divisor of the replay's ``E``, and writes
    them as full rows: each stream's ``T`` steps are cut into ``E / m`` consecutive chunks, one per
    column (column ``j * E / m + c`` holds chunk ``c`` of stream ``j``), so every column still holds
    consecutive steps of one stream. A chunk's first step is marked ``is_first`` and its last
    ``truncated`` (a cut: it bootstraps). ``T`` must be a multiple of ``E / m``."""

    def __init__(self, replay: ReplayBuffer, streams: int) -> None:
        if replay.streams % streams:
            raise ValueError(f"{streams} streams do not divide the replay's {replay.streams} columns")
        self.replay = replay
        self.chunks = replay.streams // streams
        self.steps: list[Transitions] = []

    def add(self, step: Transitions) -> None:
        self.steps.append(Transitions(*(np.array(getattr(step, name)) for name in FIELDS)))

    def flush(self) -> int:
        """Write the collected steps to the replay; returns the rows written."""
        if len(self.steps) % self.chunks:
            raise ValueError(f"{len(self.steps)} steps do not split into {self.chunks} chunks")
        rows = len(self.steps) // self.chunks
        packed = {}
        for name in FIELDS:
            steps = np.stack([getattr(s, name) for s in self.steps])  # (T, m, ...)
            chunked = steps.reshape(self.chunks, rows, *steps.shape[1:])  # [c, r, j] = step c * rows + r of j
            packed[name] = np.swapaxes(np.swapaxes(chunked, 0, 1), 1, 2).reshape(rows, -1, *steps.shape[2:])
        if rows:
            packed["is_first"][0] = True
            packed["truncated"][-1] = True
        for r in range(rows):
            self.replay.add(Transitions(*(packed[name][r] for name in FIELDS)))
        self.steps = []
        return rows


class ReplayBuffer:
    def __init__(
        self, capacity: int, streams: int, obs_dim: int, act_dim: int, seed: int, shard_mb: float = 16.0
    ) -> None:
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
        self.shard_rows = max(1, int(shard_mb * 2**20 * self.rows / self.nbytes))
        """Rows per checkpoint shard (about ``shard_mb`` MiB each)."""
        self._dirty = np.ones(-(-self.rows // self.shard_rows), np.bool_)
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
        self._dirty[row // self.shard_rows] = True
        self.cursor = (row + 1) % self.rows
        self.filled_rows = min(self.filled_rows + 1, self.rows)

    def sample(self, members: int, batch_size: int, rng: np.random.Generator | None = None) -> dict[str, np.ndarray]:
        """Independent uniform draws per member: each field ``(members, batch_size, ...)``, drawn
        with ``rng`` (default: the buffer's own, which the population's learning uses).

        The arrays are fresh copies (they own their memory), never views of storage.
        """
        if self.filled_rows == 0:
            raise ValueError("cannot sample from an empty replay buffer")
        flat = (rng or self.rng).integers(0, self.filled_rows * self.streams, size=(members, batch_size))
        rows, cols = np.divmod(flat, self.streams)
        return {name: self.data[name][rows, cols] for name in ("obs", "action", "reward", "next_obs", "terminated")}

    def sample_sequences(
        self, batch: int, length: int, rng: np.random.Generator | None = None
    ) -> dict[str, np.ndarray]:
        """``batch`` sequences of ``length`` consecutive steps of one stream each: every field in
        ``FIELDS`` as ``(batch, length, ...)``, drawn with ``rng`` (default: the buffer's own).

        A sequence lies within the filled rows and never spans the write cursor (it never joins the
        newest row to the oldest); it may cross episode boundaries, which ``is_first`` marks, and its
        first step is always marked ``is_first`` (the model starts its latent state there). The
        arrays are fresh copies that own their memory, never views of storage.
        """
        if length < 1 or self.filled_rows < length:
            raise ValueError(f"cannot sample sequences of {length} steps from {self.filled_rows} filled rows")
        starts = self.filled_rows - length + 1
        flat = (rng or self.rng).integers(0, starts * self.streams, size=batch)
        start, cols = np.divmod(flat, self.streams)
        oldest = self.cursor if self.filled_rows == self.rows else 0
        rows = (oldest + start[:, None] + np.arange(length)[None, :]) % self.rows
        out = {name: self.data[name][rows, cols[:, None]] for name in FIELDS}
        out["is_first"][:, 0] = True
        return out

    # ------------------------------------------------------------ checkpoint state

    def state(self) -> tuple[dict[str, bytes | None], dict[str, Any]]:
        """(shard blobs, JSON metadata). The filled rows are cut into shards of ``shard_rows``
        rows, each the raw bytes of every field's rows in ``FIELDS`` order. A shard that did not
        change since ``mark_saved`` is ``None``: the caller references its stored copy."""
        blobs: dict[str, bytes | None] = {}
        shards = []
        for index, start in enumerate(range(0, self.filled_rows, self.shard_rows)):
            stop = min(start + self.shard_rows, self.filled_rows)
            name = f"replay/{index:05d}"
            blobs[name] = b"".join(self.data[f][start:stop].tobytes() for f in FIELDS) if self._dirty[index] else None
            shards.append([name, start, stop])
        meta = {
            "cursor": self.cursor,
            "filled_rows": self.filled_rows,
            "rows": self.rows,
            "streams": self.streams,
            "fields": {name: [arr.dtype.str, list(arr.shape[2:])] for name, arr in self.data.items()},
            "shards": shards,
            "rng": self.rng.bit_generator.state,
        }
        return blobs, meta

    def mark_saved(self) -> None:
        """Every shard is now stored: the next ``state`` hands out only shards written after this."""
        self._dirty[:] = False

    def load_state(self, blobs: dict[str, bytes], meta: dict[str, Any]) -> None:
        """Restore from ``state``'s metadata and every shard's bytes; all shards count as changed
        (the next save writes them all, e.g. to a fresh local disk)."""
        if meta["rows"] != self.rows or meta["streams"] != self.streams:
            raise ValueError(
                f"replay layout {meta['rows']}x{meta['streams']} does not match {self.rows}x{self.streams}"
            )
        fields = {name: [arr.dtype.str, list(arr.shape[2:])] for name, arr in self.data.items()}
        if meta["fields"] != fields:
            raise ValueError(f"replay fields {meta['fields']} do not match {fields}")
        for name, start, stop in meta["shards"]:
            self._load_shard(blobs[name], start, stop)
        self.cursor = int(meta["cursor"])
        self.filled_rows = int(meta["filled_rows"])
        self.rng.bit_generator.state = meta["rng"]
        self._dirty[:] = True

    def _load_shard(self, blob: bytes, start: int, stop: int) -> None:
        sizes = [self.data[f][start:stop].nbytes for f in FIELDS]
        if len(blob) != sum(sizes):
            raise ValueError(f"replay shard of rows {start}..{stop} holds {len(blob)} bytes, expected {sum(sizes)}")
        offset = 0
        for name, size in zip(FIELDS, sizes, strict=True):
            target = self.data[name][start:stop]
            target[...] = np.frombuffer(blob, target.dtype, target.size, offset).reshape(target.shape)
            offset += size


def _warn_if_too_large(nbytes: int) -> None:
    available = psutil.virtual_memory().available
    if nbytes > 0.8 * available:
        warnings.warn(
            f"replay buffer needs {nbytes / 2**30:.1f} GiB but only {available / 2**30:.1f} GiB of RAM "
            "is available; lower replay.capacity or the run may be killed when the buffer fills",
            stacklevel=3,
        )
