"""Memory readings taken once per generation, and the bounded history the out-of-memory report reads.

Every figure is a float. Sizes are MB (2**20 bytes), counts are plain numbers:

- process: ``rss_mb`` always, ``uss_mb`` where psutil can read it (memory only this process holds);
- replay: ``replay_filled_mb`` (bytes of the rows written so far: RSS grows while a preallocated
  buffer fills, so compare RSS against this, not against zero) and ``evicted_alive_mb``
  (replay storage reachable through views handed out: 0 in a healthy run, MEMORY.md incident 2);
- tensor census (``gc.get_objects()``, one pass, deduplicated by storage): ``live_tensors`` /
  ``live_tensor_mb`` and per device type ``live_tensors_cpu``, ``live_tensor_mb_cpu``,
  ``live_tensors_cuda``, ...; ``grad_tensors`` (tensors holding an autograd graph, must be 0 at a
  generation boundary, incident 1); ``census_ms`` (what the census cost);
- CUDA: ``cuda_allocated_mb``, ``cuda_reserved_mb``, ``cuda_peak_mb`` (since the previous snapshot),
  ``cuda_driver_used_mb`` (device-wide, as ``nvidia-smi`` shows it), ``cuda_small_pool_mb`` /
  ``cuda_large_pool_mb`` (allocated bytes per allocator pool), ``cuda_alloc_retries`` (failed
  ``cudaMalloc`` calls that flushed the cache, cumulative) and ``cuda_pinned_host_mb`` (pinned host
  memory held by the caching host allocator, where this torch has ``torch.cuda.host_memory_stats``),
  ``cuda_utilization_pct`` (GPU utilisation as ``nvidia-smi`` shows it, where ``pynvml`` is installed).

What the census cannot see: ``tracemalloc`` does not see torch storage at all, and tensors without a
Python object (those saved inside an autograd graph) are not in ``gc.get_objects()``; gradients are
counted through their parameters' ``.grad``. Graph memory shows up in ``cuda_allocated_mb`` on a GPU
and in ``rss_mb``/``uss_mb`` on the host; ``grad_tensors`` is the early sign that graphs are kept.
"""

from __future__ import annotations

import contextlib
import gc
import sys
import time
from collections import deque
from collections.abc import Iterable, Iterator, Mapping
from dataclasses import dataclass, field
from typing import Any, Protocol

import numpy as np
import psutil
import torch

MB = 2**20
HISTORY_LENGTH = 50
"""Generation records a :class:`TelemetryHistory` keeps by default."""
_REFERENT_CHUNK = 10_000
"""Objects whose referents are examined at once while looking for views (bounds the temporary list)."""


class ReplayLike(Protocol):
    """What the snapshot reads from a replay buffer (``training.replay.ReplayBuffer`` fits)."""

    data: dict[str, np.ndarray]

    @property
    def filled_bytes(self) -> int: ...


# ---------------------------------------------------------------------------------------- snapshot


def memory_snapshot(
    device: torch.device,
    replay: ReplayLike | None = None,
    extra_counts: Mapping[str, float] | None = None,
    *,
    census: bool = True,
    collect: bool = True,
) -> dict[str, float]:
    """All memory figures of this process now (see the module docstring for keys and units).

    ``replay`` adds ``replay_filled_mb`` and ``evicted_alive_mb``; ``extra_counts`` (e.g.
    ``{"metric_items": n}``) are copied in as floats. ``census=False`` skips the tensor census and the
    view check (``memory.tensor_census``). ``collect`` runs ``gc.collect()`` first so that garbage
    waiting for the cycle collector is not counted as live. Resets the CUDA peak statistic.
    """
    if collect:
        gc.collect()
    snapshot = _process_memory()
    if replay is not None:
        snapshot["replay_filled_mb"] = replay.filled_bytes / MB
    if census:
        started = time.perf_counter()
        tensors = tensor_census(device_types=("cpu", device.type))
        snapshot |= tensors.figures()
        if replay is not None:
            snapshot["evicted_alive_mb"] = evicted_alive_bytes(replay.data, tensors.cpu_storages) / MB
        snapshot["census_ms"] = (time.perf_counter() - started) * 1000
    if device.type == "cuda":
        snapshot |= cuda_memory(device)
    for name, value in (extra_counts or {}).items():
        snapshot[name] = float(value)
    return snapshot


def _process_memory() -> dict[str, float]:
    """``rss_mb`` and, where psutil can read ``/proc/<pid>/smaps`` or its equivalent, ``uss_mb``."""
    process = psutil.Process()
    figures = {"rss_mb": process.memory_info().rss / MB}
    # Absent where the platform lacks it or reading it is not permitted.
    with contextlib.suppress(psutil.Error, OSError, AttributeError, NotImplementedError):
        figures["uss_mb"] = process.memory_full_info().uss / MB
    return figures


def cuda_memory(device: torch.device) -> dict[str, float]:
    """CUDA allocator and driver figures in MB (counts as numbers), then resets the peak statistic."""
    stats = torch.cuda.memory_stats(device)
    free, total = torch.cuda.mem_get_info(device)
    figures = {
        "cuda_allocated_mb": torch.cuda.memory_allocated(device) / MB,
        "cuda_reserved_mb": torch.cuda.memory_reserved(device) / MB,
        "cuda_peak_mb": torch.cuda.max_memory_allocated(device) / MB,
        "cuda_driver_used_mb": (total - free) / MB,
        "cuda_small_pool_mb": stats.get("allocated_bytes.small_pool.current", 0) / MB,
        "cuda_large_pool_mb": stats.get("allocated_bytes.large_pool.current", 0) / MB,
        "cuda_alloc_retries": float(stats.get("num_alloc_retries", 0)),
    }
    pinned = _pinned_host_bytes()
    if pinned is not None:
        figures["cuda_pinned_host_mb"] = pinned / MB
    utilization = _utilization(device)
    if utilization is not None:
        figures["cuda_utilization_pct"] = utilization
    torch.cuda.reset_peak_memory_stats(device)
    return figures


def _utilization(device: torch.device) -> float | None:
    """GPU utilisation in percent over the driver's last sample period (as ``nvidia-smi`` shows it),
    or None where torch cannot read it (it needs the ``pynvml``/``nvidia-ml-py`` package)."""
    try:
        return float(torch.cuda.utilization(device))
    except Exception:  # ModuleNotFoundError without pynvml, RuntimeError/NVMLError from the driver
        return None


def _pinned_host_bytes() -> int | None:
    """Bytes of pinned host blocks the CUDA host allocator owns (in use and cached), or None where
    this torch has no ``host_memory_stats`` or the host allocator was never used."""
    host_stats = getattr(torch.cuda, "host_memory_stats", None)
    if host_stats is None:
        return None
    try:
        value = host_stats().get("allocated_bytes.current")
    except RuntimeError:
        return None
    return None if value is None else int(value)


# ---------------------------------------------------------------------------------------- tensor census


@dataclass
class TensorCensus:
    """Live tensors found through ``gc.get_objects()``: storages counted once however many views."""

    storages: dict[str, dict[tuple[int, int], int]] = field(default_factory=dict)
    """Device type -> {(data pointer, device index): bytes}."""
    grad_tensors: int = 0
    """Tensor objects with a ``grad_fn`` (each keeps its autograd graph alive)."""
    device_types: tuple[str, ...] = ("cpu",)
    """Device types always reported, even with no tensor on them (stable record keys)."""

    @property
    def cpu_storages(self) -> dict[tuple[int, int], int]:
        return self.storages.get("cpu", {})

    def add(self, tensor: torch.Tensor) -> None:
        """Count ``tensor``'s storage (and its ``.grad``'s, for a leaf that requires grad)."""
        if tensor.grad_fn is not None:
            self.grad_tensors += 1
        self._add_storage(tensor)
        if tensor.is_leaf and tensor.requires_grad and tensor.grad is not None:
            self._add_storage(tensor.grad)

    def _add_storage(self, tensor: torch.Tensor) -> None:
        device = tensor.device
        if device.type == "meta":
            return
        try:
            storage = tensor.untyped_storage()
        except (RuntimeError, NotImplementedError, TypeError):
            return  # sparse, nested or wrapper tensors without one plain storage
        self.storages.setdefault(device.type, {})[(storage.data_ptr(), device.index or 0)] = storage.nbytes()

    def figures(self) -> dict[str, float]:
        """``live_tensors`` (distinct storages), ``live_tensor_mb``, the same per device type, ``grad_tensors``."""
        figures: dict[str, float] = {"live_tensors": 0.0, "live_tensor_mb": 0.0}
        for device_type in dict.fromkeys((*self.device_types, *self.storages)):
            storages = self.storages.get(device_type, {})
            figures[f"live_tensors_{device_type}"] = float(len(storages))
            figures[f"live_tensor_mb_{device_type}"] = sum(storages.values()) / MB
            figures["live_tensors"] += len(storages)
            figures["live_tensor_mb"] += figures[f"live_tensor_mb_{device_type}"]
        figures["grad_tensors"] = float(self.grad_tensors)
        return figures


def tensor_census(device_types: Iterable[str] = ("cpu",)) -> TensorCensus:
    """One pass over ``gc.get_objects()``: every tensor with a Python object, deduplicated by storage
    (``untyped_storage().data_ptr()`` and device). ``device_types`` are reported even when empty."""
    census = TensorCensus(device_types=tuple(dict.fromkeys(device_types)))
    for tensor in _live_instances(gc.get_objects(), torch.Tensor):
        try:
            census.add(tensor)
        except (RuntimeError, NotImplementedError, TypeError, AttributeError):
            continue  # an exotic tensor subclass that refuses introspection: not counted
    return census


def _live_instances(objects: Iterable[object], cls: type) -> Iterator[Any]:
    """The objects that are instances of ``cls``, testing each distinct type only once."""
    is_instance: dict[type, bool] = {}
    for obj in objects:
        kind = type(obj)
        hit = is_instance.get(kind)
        if hit is None:
            hit = is_instance[kind] = issubclass(kind, cls)
        if hit:
            yield obj


# ---------------------------------------------------------------------------------------- views of replay storage


def evicted_alive_bytes(storage: Mapping[str, np.ndarray], cpu_storages: Mapping[tuple[int, int], int]) -> int:
    """Bytes of replay ``storage`` still reachable outside the buffer through views (0 when healthy).

    The replay is a preallocated ring that overwrites rows in place, so evicted data can stay alive only
    through views handed out (a view sees its rows overwritten, and keeps a dropped buffer's whole
    storage alive). Cheap in a healthy run: the storage arrays' reference counts are compared with those
    of fresh arrays held the same way, and only extra references start a search: numpy arrays held by
    containers, objects' attributes or suspended generators whose ``.base`` chain ends in the storage, and CPU
    tensors (``torch.from_numpy`` of a view) whose memory lies inside it (``cpu_storages``: see
    :class:`TensorCensus`). Overlapping views are counted once per (address, size).
    """
    if _foreign_references(storage) <= 0:  # before anything here takes a reference of its own
        return 0
    arrays = list(storage.values())
    found = {**_numpy_views(arrays), **_tensor_views(arrays, cpu_storages)}
    return sum(size for _, size in found)


def _foreign_references(storage: Mapping[str, np.ndarray]) -> int:
    """References to the arrays of ``storage`` beyond the mapping's own (a view holds one through ``.base``).

    Counted against fresh arrays held by a dict in the same way, so the interpreter's own temporary
    references (which differ between Python versions) cancel out.
    """
    probe = {name: np.empty(0) for name in storage}
    return _refcount_sum(storage) - _refcount_sum(probe)


def _refcount_sum(arrays: Mapping[str, np.ndarray]) -> int:
    """Sum of the reference counts of the mapping's values."""
    return sum(sys.getrefcount(array) for array in arrays.values())


def _numpy_views(arrays: list[np.ndarray]) -> dict[tuple[int, int], None]:
    """(address, bytes) of numpy views of ``arrays`` held by containers, objects or suspended generators."""
    owners = {id(array) for array in arrays}
    found: dict[tuple[int, int], None] = {}
    for candidate in _reachable_arrays():
        if id(candidate) not in owners and _base_is_one_of(candidate, owners):
            found[(candidate.__array_interface__["data"][0], candidate.nbytes)] = None
    return found


def _reachable_arrays() -> Iterator[np.ndarray]:
    """numpy arrays referenced by gc-tracked objects (arrays themselves are not tracked).

    Not the local variables of running functions: reading ``frame.f_locals`` would cache a snapshot of
    them on the frame (Python < 3.13) and keep those objects alive, the very thing measured here.
    """
    objects = gc.get_objects()
    for start in range(0, len(objects), _REFERENT_CHUNK):
        yield from _live_instances(gc.get_referents(*objects[start : start + _REFERENT_CHUNK]), np.ndarray)


def _base_is_one_of(array: np.ndarray, owners: set[int], depth: int = 8) -> bool:
    """Whether ``array``'s ``.base`` chain (through memoryviews too) reaches an object in ``owners``."""
    base: Any = array.base
    for _ in range(depth):
        if base is None:
            return False
        if id(base) in owners:
            return True
        base = base.obj if isinstance(base, memoryview) else getattr(base, "base", None)
    return False


def _tensor_views(arrays: list[np.ndarray], cpu_storages: Mapping[tuple[int, int], int]) -> dict[tuple[int, int], None]:
    """(address, bytes) of CPU tensor storages lying inside one of ``arrays`` (zero-copy from numpy)."""
    ranges = [(array.__array_interface__["data"][0], array.nbytes) for array in arrays]
    found: dict[tuple[int, int], None] = {}
    for (pointer, _), nbytes in cpu_storages.items():
        if any(start <= pointer < start + size for start, size in ranges):
            found[(pointer, nbytes)] = None
    return found


# ---------------------------------------------------------------------------------------- history


class TelemetryHistory:
    """The last ``maxlen`` generation snapshots (oldest first), for the out-of-memory report and checkpoints."""

    def __init__(self, maxlen: int = HISTORY_LENGTH) -> None:
        if maxlen < 1:
            raise ValueError(f"history length must be >= 1, got {maxlen}")
        self.maxlen = maxlen
        self._records: deque[dict[str, float]] = deque(maxlen=maxlen)

    def __len__(self) -> int:
        return len(self._records)

    def append(self, generation: int, snapshot: Mapping[str, float]) -> None:
        """Keep ``snapshot`` (from :func:`memory_snapshot`) as generation ``generation``'s record."""
        self._records.append({"generation": float(generation), **{k: float(v) for k, v in snapshot.items()}})

    def records(self) -> list[dict[str, float]]:
        """Copies of the kept records, oldest first."""
        return [dict(record) for record in self._records]

    def state(self) -> dict[str, Any]:
        """JSON-serialisable state (for checkpoint metadata)."""
        return {"maxlen": self.maxlen, "records": self.records()}

    def load_state(self, state: Mapping[str, Any]) -> None:
        """Replace the records with those of :meth:`state` (the newest ``maxlen`` of them)."""
        self._records.clear()
        for record in state["records"]:
            self._records.append({str(k): float(v) for k, v in record.items()})
