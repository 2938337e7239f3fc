"""A pixel replay that stores each frame once and rebuilds frame stacks when it samples.

The environment hands out stacks ``(stack, H, W)`` uint8 (gymnasium's ``FrameStackObservation``,
oldest frame first); ``obs`` and ``next_obs`` of one step share ``stack - 1`` frames, and consecutive
steps share all but one. Storing both stacks costs ``2 * stack`` frames a transition; this buffer
stores one, plus a small ring for the frames an episode starts with.

Layout, the same ``(T, E, ...)`` ring over time as :class:`training.replay.ReplayBuffer` (one column
per env stream, ``T = capacity // E``):

- ``frame (T, E, H, W)``: the newest frame of row ``t``'s ``next_obs``;
- ``age (T, E)`` uint8: steps since the row's *context* started, capped at ``stack``;
- ``start (T, E, stack)`` int64: serial numbers, in the start ring, of the frames of the context's
  first ``obs`` (consecutive equal frames share one serial, so a reset-padded stack takes one frame);
- ``start_frames (K, H, W)``: the start ring; serial ``s`` lives in slot ``s % K`` until ``K`` newer
  frames are written;
- ``action``, ``reward``, ``terminated``, ``truncated``, ``is_first`` as in ``ReplayBuffer``.

A context is a run of rows of one column whose observations follow on from each other: a new one
starts at ``is_first``, after a row that ended (``terminated`` or ``truncated``), in an empty buffer,
or wherever ``obs`` is not the previous row's ``next_obs``. Within a context of first ``obs`` ``S``
the frames read ``V = S[0], ..., S[stack-1], frame[s], frame[s+1], ...``; row ``t`` at age ``a``
has ``obs = V[a : a + stack]`` and ``next_obs = V[a + 1 : a + 1 + stack]``. So the first stacks of an
episode repeat its first frame exactly as ``FrameStackObservation``'s default ``padding_type="reset"``
pads them (whatever ``S`` was, it is stored as given), and a stack never reaches across a context start.

A row is sampled only when every frame it needs is still stored: its context's rows back to
``t - min(age, stack)`` (the oldest rows of a full ring whose earlier frames were overwritten are
skipped, so nothing joins frames across the write cursor) and, at ages below ``stack``, its start
frames (when contexts start so often that the start ring wraps first, the oldest first rows go).
Samples are built by fancy indexing into fresh arrays that own their memory, never views of storage.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import numpy as np

from config import UserError
from training.replay import FIELDS, ReplayBuffer, Transitions, _warn_if_too_large

ROW_FIELDS = ("frame", "action", "reward", "terminated", "truncated", "is_first", "age", "start")
"""Per-row storage, in the order each checkpoint shard holds it."""
START_SHARD = "replay/starts/"
MAX_REDRAWS = 64
"""Rounds of redrawing rows that cannot be sampled before the valid rows are listed explicitly."""


class NotFrameStacks(UserError, ValueError):
    """An env's ``(stack, H, W)`` observations are not frame stacks (``next_obs`` is not ``obs``
    shifted by one frame): a one-line error for the user, a ValueError for callers."""


class FrameReplay:
    """Transitions of ``E`` streams with observations ``(stack, H, W)`` uint8, each frame stored once.

    The same interface as :class:`training.replay.ReplayBuffer`: ``add(Transitions)`` of stacked
    observations ``(E, stack, H, W)``, ``sample``, ``sample_sequences``, ``state``/``load_state``/
    ``mark_saved``, ``nbytes``/``filled_bytes`` and ``len``. ``start_fraction`` sizes the start ring,
    in frames per transition of capacity (at least ``2 * stack * E`` frames).
    """

    def __init__(
        self,
        capacity: int,
        streams: int,
        act_dim: int,
        seed: int,
        shard_mb: float = 16.0,
        frame_shape: tuple[int, int] = (84, 84),
        stack: int = 4,
        start_fraction: float = 0.1,
    ) -> None:
        if capacity < streams:
            raise ValueError(f"replay capacity {capacity} is smaller than the {streams} env streams")
        self.streams, self.stack, self.frame_shape = streams, stack, tuple(frame_shape)
        self.rows = capacity // streams
        self.capacity = self.rows * streams
        if self.rows <= stack:
            raise ValueError(f"a frame replay needs more than {stack} rows per stream, got {self.rows}")
        self.start_slots = max(2 * stack * streams, round(self.capacity * start_fraction))
        shapes: dict[str, tuple[tuple[int, ...], type]] = {
            "frame": (self.frame_shape, np.uint8),
            "action": ((act_dim,), np.float32),
            "reward": ((), np.float32),
            "terminated": ((), np.bool_),
            "truncated": ((), np.bool_),
            "is_first": ((), np.bool_),
            "age": ((), np.uint8),
            "start": ((stack,), np.int64),
        }
        self.frame_bytes = int(np.prod(self.frame_shape))
        self.row_bytes = streams * sum(
            int(np.prod(s, dtype=np.int64)) * np.dtype(t).itemsize for s, t in shapes.values()
        )
        self.nbytes = self.rows * self.row_bytes + self.start_slots * self.frame_bytes
        _warn_if_too_large(self.nbytes)
        self.data: dict[str, np.ndarray] = {
            name: np.zeros((self.rows, streams, *shape), dtype) for name, (shape, dtype) in shapes.items()
        }
        self.data["start_frames"] = np.zeros((self.start_slots, *self.frame_shape), np.uint8)
        self.cursor = 0
        self.filled_rows = 0
        self.start_written = 0
        """Start frames ever written: the next one gets this serial number."""
        self.shard_rows = max(1, int(shard_mb * 2**20 / self.row_bytes))
        self.shard_slots = max(1, int(shard_mb * 2**20 / self.frame_bytes))
        self._dirty = np.ones(-(-self.rows // self.shard_rows), np.bool_)
        self._dirty_starts = np.ones(-(-self.start_slots // self.shard_slots), np.bool_)
        self.rng = np.random.default_rng(seed)

    def __len__(self) -> int:
        """Transitions stored."""
        return self.filled_rows * self.streams

    @property
    def filled_bytes(self) -> int:
        return self.filled_rows * self.row_bytes + min(self.start_written, self.start_slots) * self.frame_bytes

    @property
    def bytes_per_transition(self) -> float:
        """Bytes of storage per transition of capacity (the start ring included)."""
        return self.nbytes / self.capacity

    # ------------------------------------------------------------ writing

    def add(self, step: Transitions) -> None:
        """Copy one step of all streams into the next row, evicting the oldest when full.

        ``step.obs`` and ``step.next_obs`` are stacks ``(E, stack, H, W)`` uint8 with ``next_obs``
        the stack ``obs`` shifted by one frame (ValueError otherwise); only ``next_obs``'s newest frame
        is stored, plus ``obs``'s frames where a context starts.
        """
        obs, next_obs = self._checked(step.obs, "obs"), self._checked(step.next_obs, "next_obs")
        shifted = (next_obs[:, :-1] == obs[:, 1:]).reshape(self.streams, -1).all(axis=1)
        if not shifted.all():
            raise NotFrameStacks(
                f"stream {int(np.flatnonzero(~shifted)[0])}: next_obs is not obs shifted by one frame "
                "(image observations must be FrameStackObservation's stacks (stack, H, W) uint8)"
            )
        row, prev = self.cursor, (self.cursor - 1) % self.rows
        follows = self._follows(obs, np.asarray(step.is_first, np.bool_))
        age, start = self.data["age"], self.data["start"]
        age[row] = np.where(follows, np.minimum(age[prev].astype(np.int64) + 1, self.stack), 0)
        start[row] = start[prev]
        for c in np.flatnonzero(~follows):
            start[row, c] = self._write_start(obs[c])
        self.data["frame"][row] = next_obs[:, -1]
        for name in ("action", "reward", "terminated", "truncated", "is_first"):
            self.data[name][row] = getattr(step, name)
        self._dirty[row // self.shard_rows] = True
        self.cursor = (row + 1) % self.rows
        self.filled_rows = min(self.filled_rows + 1, self.rows)

    def _checked(self, stacks: np.ndarray, name: str) -> np.ndarray:
        stacks = np.asarray(stacks)
        expected = (self.streams, self.stack, *self.frame_shape)
        if stacks.shape != expected or stacks.dtype != np.uint8:
            raise ValueError(f"{name} of shape {stacks.shape} {stacks.dtype}; the frame replay takes {expected} uint8")
        return stacks

    def _follows(self, obs: np.ndarray, is_first: np.ndarray) -> np.ndarray:
        """``(E,)``: whether each stream's ``obs`` continues the newest row's context (the newest row
        did not end, ``is_first`` is not set, and its ``next_obs`` can be rebuilt and equals ``obs``)."""
        if self.filled_rows == 0:
            return np.zeros(self.streams, np.bool_)
        prev = np.full(self.streams, (self.cursor - 1) % self.rows)
        cols = np.arange(self.streams)
        follows = ~is_first & ~self.data["terminated"][prev, cols] & ~self.data["truncated"][prev, cols]
        follows &= self._valid(prev, cols)
        if follows.any():
            rebuilt = self._stacks(prev[follows], cols[follows], shift=1)
            follows[follows] = (rebuilt == obs[follows]).reshape(len(rebuilt), -1).all(axis=1)
        return follows

    def _write_start(self, stack: np.ndarray) -> np.ndarray:
        """Write a context's first ``obs`` ``(stack, H, W)`` to the start ring; returns its serials
        ``(stack,)`` (a frame equal to the one before it reuses that one's serial)."""
        serials = np.zeros(self.stack, np.int64)
        for i in range(self.stack):
            if i > 0 and np.array_equal(stack[i], stack[i - 1]):
                serials[i] = serials[i - 1]
                continue
            slot = self.start_written % self.start_slots
            self.data["start_frames"][slot] = stack[i]
            self._dirty_starts[slot // self.shard_slots] = True
            serials[i] = self.start_written
            self.start_written += 1
        return serials

    # ------------------------------------------------------------ reading

    def _valid(self, rows: np.ndarray, cols: np.ndarray) -> np.ndarray:
        """Whether the rows (physical indices, any shape, with ``cols`` alike) can be rebuilt: every
        frame their ``obs`` and ``next_obs`` need is still stored."""
        oldest = self.cursor if self.filled_rows == self.rows else 0
        age = self.data["age"][rows, cols].astype(np.int64)
        in_ring = (rows - oldest) % self.rows >= age
        needed = self.data["start"][rows, cols, np.minimum(age, self.stack - 1)]
        live = needed >= self.start_written - self.start_slots
        return in_ring & ((age >= self.stack) | live)

    def _stacks(self, rows: np.ndarray, cols: np.ndarray, shift: int) -> np.ndarray:
        """Frame stacks ``(..., stack, H, W)`` of the rows (physical indices, any shape ``(...)``, with
        ``cols`` alike): their ``obs`` (``shift`` 0) or ``next_obs`` (``shift`` 1). A fresh array that
        owns its memory, built by fancy indexing."""
        age = self.data["age"][rows, cols].astype(np.int64)[..., None]
        virtual = age + shift + np.arange(self.stack)  # index into V, (..., stack)
        from_start = virtual < self.stack
        source_rows = np.where(from_start, rows[..., None], rows[..., None] - age + virtual - self.stack)
        out = self.data["frame"][source_rows % self.rows, cols[..., None]]
        if from_start.any():
            serials = self.data["start"][rows, cols]  # (..., stack)
            picked = np.take_along_axis(serials, np.minimum(virtual, self.stack - 1), axis=-1)
            out[from_start] = self.data["start_frames"][picked[from_start] % self.start_slots]
        return out

    def _draw(
        self, rng: np.random.Generator, count: int, high: int, valid: Callable[[np.ndarray], np.ndarray]
    ) -> np.ndarray:
        """``count`` draws from ``[0, high)`` whose ``valid(draws)`` holds: invalid ones are drawn
        again (uniform over the valid ones), listed explicitly after ``MAX_REDRAWS`` rounds."""
        draws = rng.integers(0, high, size=count)
        for _ in range(MAX_REDRAWS):
            bad = ~valid(draws)
            if not bad.any():
                return draws
            draws[bad] = rng.integers(0, high, size=int(bad.sum()))
        bad = ~valid(draws)
        if bad.any():
            allowed = np.flatnonzero(valid(np.arange(high)))
            if len(allowed) == 0:
                raise ValueError("no transition in the frame replay has all the frames of its stacks")
            draws[bad] = rng.choice(allowed, size=int(bad.sum()))
        return draws

    def sample(self, members: int, batch_size: int, rng: np.random.Generator | None = None) -> dict[str, np.ndarray]:
        """Independent uniform draws per member over the rows that can be rebuilt: ``obs`` and
        ``next_obs`` ``(members, batch_size, stack, H, W)`` uint8, ``action`` ``(members, batch_size,
        act_dim)``, ``reward``/``terminated`` ``(members, batch_size)``; fresh arrays, never views."""
        if self.filled_rows == 0:
            raise ValueError("cannot sample from an empty replay buffer")

        def valid(flat: np.ndarray) -> np.ndarray:
            return self._valid(*np.divmod(flat, self.streams))

        flat = self._draw(rng or self.rng, members * batch_size, self.filled_rows * self.streams, valid)
        rows, cols = np.divmod(flat.reshape(members, batch_size), self.streams)
        return {
            "obs": self._stacks(rows, cols, 0),
            "action": self.data["action"][rows, cols],
            "reward": self.data["reward"][rows, cols],
            "next_obs": self._stacks(rows, cols, 1),
            "terminated": self.data["terminated"][rows, cols],
        }

    def sample_sequences(
        self, batch: int, length: int, rng: np.random.Generator | None = None
    ) -> dict[str, np.ndarray]:
        """``batch`` sequences of ``length`` consecutive rows of one stream, every field in ``FIELDS``
        as ``(batch, length, ...)`` (``obs``/``next_obs`` ``(batch, length, stack, H, W)``), as
        ``ReplayBuffer.sample_sequences`` draws them: within the filled rows, never across the write
        cursor, the first step marked ``is_first``; a stack restarts (reset-padded) at an episode start
        inside a sequence. Only sequences whose every row can be rebuilt are drawn. Fresh arrays."""
        if length < 1 or self.filled_rows < length:
            raise ValueError(f"cannot sample sequences of {length} steps from {self.filled_rows} filled rows")
        oldest = self.cursor if self.filled_rows == self.rows else 0
        offsets = np.arange(length)[None, :]

        def place(flat: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
            start, cols = np.divmod(flat, self.streams)
            return (oldest + start[:, None] + offsets) % self.rows, np.repeat(cols[:, None], length, axis=1)

        def valid(flat: np.ndarray) -> np.ndarray:
            return np.asarray(self._valid(*place(flat)).all(axis=1))

        flat = self._draw(rng or self.rng, batch, (self.filled_rows - length + 1) * self.streams, valid)
        rows, cols = place(flat)  # (batch, length) each
        out = {name: self.data[name][rows, cols] for name in FIELDS if name not in ("obs", "next_obs")}
        out["obs"], out["next_obs"] = self._stacks(rows, cols, 0), self._stacks(rows, cols, 1)
        out["is_first"][:, 0] = True
        return out

    # ------------------------------------------------------------ checkpoint state

    def state(self) -> tuple[dict[str, bytes | None], dict[str, Any]]:
        """(shard blobs, JSON metadata): ``replay/NNNNN`` shards of ``shard_rows`` filled rows (each
        the raw bytes of every field in ``ROW_FIELDS`` order) and ``replay/starts/NNNNN`` shards of
        ``shard_slots`` written start-ring slots. A shard unchanged since ``mark_saved`` is ``None``."""
        blobs: dict[str, bytes | None] = {}
        shards, start_shards = [], []
        for index, begin in enumerate(range(0, self.filled_rows, self.shard_rows)):
            stop = min(begin + self.shard_rows, self.filled_rows)
            name = f"replay/{index:05d}"
            fields = (self.data[f][begin:stop].tobytes() for f in ROW_FIELDS)
            blobs[name] = b"".join(fields) if self._dirty[index] else None
            shards.append([name, begin, stop])
        for index, begin in enumerate(range(0, min(self.start_written, self.start_slots), self.shard_slots)):
            stop = min(begin + self.shard_slots, self.start_slots, self.start_written)
            name = f"{START_SHARD}{index:05d}"
            frames = self.data["start_frames"][begin:stop]
            blobs[name] = frames.tobytes() if self._dirty_starts[index] else None
            start_shards.append([name, begin, stop])
        meta = {
            "kind": "frames",
            "cursor": self.cursor,
            "filled_rows": self.filled_rows,
            "rows": self.rows,
            "streams": self.streams,
            "start_slots": self.start_slots,
            "start_written": self.start_written,
            "fields": self._fields(),
            "shards": shards,
            "start_shards": start_shards,
            "rng": self.rng.bit_generator.state,
        }
        return blobs, meta

    def _fields(self) -> dict[str, list[Any]]:
        return {name: [arr.dtype.str, list(arr.shape[2:])] for name, arr in self.data.items() if name in ROW_FIELDS}

    def mark_saved(self) -> None:
        """Every shard is now stored: the next ``state`` hands out only shards written after this."""
        self._dirty[:] = False
        self._dirty_starts[:] = False

    def load_state(self, blobs: dict[str, bytes], meta: dict[str, Any]) -> None:
        """Restore from ``state``'s metadata and every shard's bytes (ValueError on another layout or
        a shard of the wrong size); every shard counts as changed afterwards."""
        layout = (meta.get("kind"), meta["rows"], meta["streams"], meta.get("start_slots"))
        if layout != ("frames", self.rows, self.streams, self.start_slots):
            raise ValueError(
                f"replay layout {layout[1]}x{layout[2]} ({layout[0] or 'flat'}, {layout[3]} start frames) does "
                f"not match {self.rows}x{self.streams} (frames, {self.start_slots} start frames)"
            )
        if meta["fields"] != self._fields():
            raise ValueError(f"replay fields {meta['fields']} do not match {self._fields()}")
        for name, begin, stop in meta["shards"]:
            _load(blobs[name], [self.data[f][begin:stop] for f in ROW_FIELDS], f"rows {begin}..{stop}")
        for name, begin, stop in meta["start_shards"]:
            _load(blobs[name], [self.data["start_frames"][begin:stop]], f"start frames {begin}..{stop}")
        self.cursor, self.filled_rows = int(meta["cursor"]), int(meta["filled_rows"])
        self.start_written = int(meta["start_written"])
        self.rng.bit_generator.state = meta["rng"]
        self._dirty[:] = True
        self._dirty_starts[:] = True


def _load(blob: bytes, targets: list[np.ndarray], what: str) -> None:
    """Copy ``blob`` into the ``targets`` (views of storage), one after the other."""
    expected = sum(t.nbytes for t in targets)
    if len(blob) != expected:
        raise ValueError(f"replay shard of {what} holds {len(blob)} bytes, expected {expected}")
    offset = 0
    for target in targets:
        target[...] = np.frombuffer(blob, target.dtype, target.size, offset).reshape(target.shape)
        offset += target.nbytes


def make_replay(
    capacity: int,
    streams: int,
    obs_shape: tuple[int, ...],
    obs_dtype: np.dtype | type,
    act_dim: int,
    seed: int,
    shard_mb: float = 16.0,
) -> ReplayBuffer | FrameReplay:
    """The replay for observations of ``obs_shape``: flat ``(obs_dim,)`` -> ``ReplayBuffer``; frame
    stacks ``(stack, H, W)`` uint8 -> ``FrameReplay``; anything else is a ValueError."""
    if len(obs_shape) == 1:
        return ReplayBuffer(capacity, streams, obs_shape[0], act_dim, seed, shard_mb)
    if len(obs_shape) == 3 and np.dtype(obs_dtype) == np.uint8:
        stack, height, width = obs_shape
        return FrameReplay(capacity, streams, act_dim, seed, shard_mb, frame_shape=(height, width), stack=stack)
    raise ValueError(
        f"no replay for observations of shape {tuple(obs_shape)} {np.dtype(obs_dtype)}: "
        "flat vectors or (stack, H, W) uint8 frame stacks"
    )
