"""What to print when the run dies of an out-of-memory error (MEMORY.md incident 4).

"CUDA out of memory. Tried to allocate 174.00 MiB" names only the last allocation, and once named
the GPU while host memory was the problem. :func:`format_report` puts the recent per-generation
history from :mod:`training.memory.telemetry` beside the error and classifies it. :func:`classify` applies
these rules, in order, to the history (MB per generation, oldest first):

1. Fewer than ``MIN_HISTORY`` records: ``not enough history``.
2. Steady growth (a leak): a tensor figure grows (``cuda_allocated_mb``, ``live_tensor_mb_cpu``,
   ``evicted_alive_mb`` by ``min_slope_mb``; ``grad_tensors`` by ``GRAPH_SLOPE``; ``metric_items`` by
   ``METRIC_ITEMS_SLOPE``), or host memory grows where no census tells tensors apart. "Grows" means a
   Theil-Sen slope (the median of all pairwise slopes, which one outlier cannot move) of at least that
   much per generation *and* a Spearman correlation with the generation of at least ``MIN_CORRELATION``
   (the statistics of :mod:`training.memory.sentinel`, which watches the same records during the run).
3. Memory outside the allocator: host memory (USS, else RSS, minus the replay bytes filled so far)
   grows while the census shows tensors flat, or the CUDA driver's used memory minus the allocator's
   reservation grows.
4. Fragmentation: in the last record the CUDA reservation is at least ``FRAGMENTATION_RATIO`` times
   what tensors needed (allocated, or the generation's peak if higher) and ``FRAGMENTATION_MIN_MB``
   more.
5. A single spike: otherwise. Either the last record is far above the median of the ones before,
   which were flat (the jump is at least ``SPIKE_MIN_MB``, ``SPIKE_RELATIVE`` of that median and
   ``SPIKE_FLATNESS`` times their range), or the history is flat and the peak came inside the
   generation that failed.

On CUDA, :func:`start_recording` and :func:`dump_snapshot` record the allocator's history and write the
file that https://pytorch.org/memory_viz opens (which allocation, from where, at what time).
"""

from __future__ import annotations

import re
import warnings
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TypeVar

import numpy as np
import psutil
import torch

from training.memory.sentinel import spearman, theil_sen
from training.memory.telemetry import MB

LEAK = "steady growth (a leak)"
FRAGMENTATION = "fragmentation (reserved >> allocated)"
SPIKE = "a single spike"
OUTSIDE = "memory outside the allocator (driver/RSS grows, tensors flat)"
SHORT = "not enough history"
LABELS = (LEAK, FRAGMENTATION, SPIKE, OUTSIDE, SHORT)

MIN_HISTORY = 4
"""Records needed before anything is called a trend."""
MIN_SLOPE_MB = 1.0
"""Growth below this many MB per generation is never called growth."""
MIN_CORRELATION = 0.9
"""Spearman rank correlation of a figure with the generation needed to call its growth steady."""
GRAPH_SLOPE = 0.5
"""Tensors holding graphs, per generation: any steady growth is a leak (incident 1)."""
METRIC_ITEMS_SLOPE = 10.0
"""Items per generation in metric containers: a history that grows by one item per generation is by design."""
FRAGMENTATION_RATIO = 2.0
FRAGMENTATION_MIN_MB = 512.0
SPIKE_MIN_MB = 64.0
SPIKE_RELATIVE = 0.25
SPIKE_FLATNESS = 4.0
TABLE_ROWS = 15
"""Most recent generations shown in the report's table (all of them are classified)."""
HISTORY_EVENTS = 100_000
"""Allocator events :func:`start_recording` keeps (several KB each, in host memory)."""

History = Sequence[dict[str, float]]
T = TypeVar("T")


# ---------------------------------------------------------------------------------------- recognising one


def is_out_of_memory(error: BaseException) -> bool:
    """Whether ``error`` (or an error it was raised from) is an out-of-memory error: ``torch.OutOfMemoryError``
    (CUDA and other accelerators), ``MemoryError`` (Python's host allocation failed), or a ``RuntimeError``
    saying "out of memory" (CUDA errors from kernels) or "can't allocate memory" (torch's CPU allocator)."""
    current: BaseException | None = error
    for _ in range(8):
        if current is None:
            return False
        if isinstance(current, (torch.cuda.OutOfMemoryError, MemoryError)):  # same class as torch.OutOfMemoryError
            return True
        if isinstance(current, RuntimeError) and _says_out_of_memory(str(current)):
            return True
        current = current.__cause__
    return False


def _says_out_of_memory(message: str) -> bool:
    lowered = message.lower()
    return "out of memory" in lowered or "can't allocate memory" in lowered


# ---------------------------------------------------------------------------------------- classifying the history


@dataclass(frozen=True)
class Diagnosis:
    label: str
    """One of :data:`LABELS`."""
    evidence: str
    """The figures behind the label, in words."""
    domain: str = ""
    """Where the memory went: ``"gpu"``, ``"host"`` or ``""`` (unknown)."""


@dataclass(frozen=True)
class Trend:
    slope: float
    """Theil-Sen slope, units per generation."""
    correlation: float
    """Spearman rank correlation with the generation (0 for a constant series)."""

    def grows(self, min_slope: float) -> bool:
        return self.slope >= min_slope and self.correlation >= MIN_CORRELATION


def classify(history: History, min_slope_mb: float = MIN_SLOPE_MB) -> str:
    """One of :data:`LABELS` for ``history`` (telemetry records, oldest first); rules in the module docstring."""
    return diagnose(history, min_slope_mb).label


def diagnose(history: History, min_slope_mb: float = MIN_SLOPE_MB) -> Diagnosis:
    """:func:`classify` with the evidence for its answer."""
    if len(history) < MIN_HISTORY:
        return Diagnosis(SHORT, f"{len(history)} generation(s) recorded, {MIN_HISTORY} needed for a trend")
    x = np.array([r.get("generation", i) for i, r in enumerate(history)], dtype=float)
    for rule in (_leak, _outside, _fragmentation, _visible_spike):
        found = rule(history, x, min_slope_mb)
        if found is not None:
            return found
    return Diagnosis(
        SPIKE,
        f"no figure grew over the last {len(history)} generations: the memory was needed inside the "
        "generation that failed (by the allocation the error names, or by one just before it)",
    )


def _leak(history: History, x: np.ndarray, min_slope: float) -> Diagnosis | None:
    """Every growing leak figure, the most specific first (graphs, views, metrics, then tensor memory)."""
    checks = [
        ("grad_tensors", "tensors holding autograd graphs", GRAPH_SLOPE, ""),
        ("evicted_alive_mb", "replay storage kept alive by views", min_slope, "host"),
        ("metric_items", "items kept in metric containers", METRIC_ITEMS_SLOPE, "host"),
        ("cuda_allocated_mb", "CUDA allocated memory", min_slope, "gpu"),
        ("live_tensor_mb_cpu", "live CPU tensor memory", min_slope, "host"),
    ]
    found = [(text, domain) for key, what, slope, domain in checks if (text := _growth(history, x, key, what, slope))]
    host = _host_net(history)
    if not found and host is not None and _series(history, "live_tensor_mb_cpu") is None:
        text = _describe_growth(x, host[1], host[0], min_slope)
        if text:
            found.append((text + "; no tensor census tells whether tensors grew", "host"))
    if not found:
        return None
    domains = {domain for _, domain in found if domain}
    return Diagnosis(LEAK, "; ".join(text for text, _ in found), domains.pop() if len(domains) == 1 else "")


def _outside(history: History, x: np.ndarray, min_slope: float) -> Diagnosis | None:
    driver, reserved = _series(history, "cuda_driver_used_mb"), _series(history, "cuda_reserved_mb")
    if driver is not None and reserved is not None:
        found = _describe_growth(
            x, driver - reserved, "CUDA driver-used memory beyond the allocator's reservation", min_slope
        )
        if found:
            return Diagnosis(OUTSIDE, found + " while allocated memory did not", "gpu")
    host = _host_net(history)
    if host is not None and _series(history, "live_tensor_mb_cpu") is not None:
        found = _describe_growth(x, host[1], host[0], min_slope)
        if found:
            return Diagnosis(OUTSIDE, found + " while live tensor memory did not", "host")
    return None


def _fragmentation(history: History, x: np.ndarray, min_slope: float) -> Diagnosis | None:
    last = history[-1]
    if "cuda_reserved_mb" not in last or "cuda_allocated_mb" not in last:
        return None
    reserved = last["cuda_reserved_mb"]
    needed = max(last["cuda_allocated_mb"], last.get("cuda_peak_mb", 0.0))
    if reserved < FRAGMENTATION_RATIO * needed or reserved - needed < FRAGMENTATION_MIN_MB:
        return None
    retries = last.get("cuda_alloc_retries", 0.0)
    return Diagnosis(
        FRAGMENTATION,
        f"the CUDA allocator reserved {reserved:,.0f} MB while tensors needed at most {needed:,.0f} MB "
        f"(allocated or peak) in the last generation; {retries:,.0f} allocation retries so far",
        "gpu",
    )


def _visible_spike(history: History, x: np.ndarray, min_slope: float) -> Diagnosis | None:
    candidates: list[tuple[str, np.ndarray | None, str]] = [
        ("CUDA peak allocated memory", _series(history, "cuda_peak_mb"), "gpu"),
        ("CUDA allocated memory", _series(history, "cuda_allocated_mb"), "gpu"),
        ("CUDA driver-used memory", _series(history, "cuda_driver_used_mb"), "gpu"),
    ]
    host = _host_net(history)
    if host is not None:
        candidates.append((host[0], host[1], "host"))
    for what, values, domain in candidates:
        if values is not None and _is_spike(values):
            before = float(np.median(values[:-1]))
            return Diagnosis(
                SPIKE,
                f"{what} jumped to {values[-1]:,.0f} MB in the last generation from a flat {before:,.0f} MB",
                domain,
            )
    return None


def _is_spike(values: np.ndarray) -> bool:
    """The last value far above the median of the others, which stayed within a narrow range."""
    before = values[:-1]
    median = float(np.median(before))
    jump = float(values[-1]) - median
    spread = float(before.max() - before.min())
    return jump >= max(SPIKE_MIN_MB, SPIKE_RELATIVE * median) and jump >= SPIKE_FLATNESS * spread


def _growth(history: History, x: np.ndarray, key: str, what: str, min_slope: float) -> str:
    values = _series(history, key)
    return "" if values is None else _describe_growth(x, values, what, min_slope, unit=_unit(key))


def _describe_growth(x: np.ndarray, values: np.ndarray, what: str, min_slope: float, unit: str = "MB") -> str:
    """Words for the growth of ``values`` if it is steady, else ``""``."""
    fitted = trend(x, values)
    if not fitted.grows(min_slope):
        return ""
    return (
        f"{what} grew {fitted.slope:,.1f} {unit} per generation (Theil-Sen, rank correlation {fitted.correlation:.2f}) "
        f"from {values[0]:,.0f} to {values[-1]:,.0f} {unit} over {len(values)} generations"
    )


def trend(x: np.ndarray, y: np.ndarray) -> Trend:
    """Theil-Sen slope of ``y`` over ``x`` and their Spearman correlation (the leak sentinel's statistics)."""
    if len(np.unique(x)) < 2:
        return Trend(0.0, 0.0)
    return Trend(theil_sen(x, y)[0], spearman(x, y))


def _series(history: History, key: str) -> np.ndarray | None:
    """The figure ``key`` over the history, or None where any record lacks it."""
    if not all(key in record for record in history):
        return None
    return np.array([record[key] for record in history], dtype=float)


def _host_net(history: History) -> tuple[str, np.ndarray] | None:
    """(name, values): USS (else RSS) minus the replay bytes filled so far, MB; None without either."""
    measure, values = "USS", _series(history, "uss_mb")
    if values is None:
        measure, values = "RSS", _series(history, "rss_mb")
    if values is None:
        return None
    filled = _series(history, "replay_filled_mb")
    if filled is None:
        return f"host memory ({measure})", values
    return f"host memory ({measure} minus replay filled)", values - filled


def _unit(key: str) -> str:
    return "MB" if "_mb" in key else "items" if key == "metric_items" else "tensors"


# ---------------------------------------------------------------------------------------- the report

ADVICE = {
    LEAK: (
        "Something keeps a reference every generation. Look at grad_tensors (loss tensors kept with their "
        "graphs: store .item() floats, MEMORY.md incident 1), evicted_alive_mb (views of replay storage, "
        "incident 2), metric_items (metric containers that grow), and graphs built while acting (act under "
        "torch.no_grad(), incident 3). On CUDA, memory.cuda_history records every allocation with its stack "
        "(open the snapshot at https://pytorch.org/memory_viz)."
    ),
    FRAGMENTATION: (
        "Free CUDA memory is cut into blocks too small for the request. Set "
        "PYTORCH_ALLOC_CONF=expandable_segments:True (older torch: PYTORCH_CUDA_ALLOC_CONF), keep tensor "
        "shapes fixed between steps, and let the trainer call torch.cuda.empty_cache() at generation ends."
    ),
    SPIKE: (
        "Memory was flat until one generation needed more than was free; 'Tried to allocate' names only the "
        "last request, not what filled the memory. Lower agent.batch_size, train.accumulation_steps, population "
        "or train.eval_episodes, or find the peak with memory.cuda_history."
    ),
    OUTSIDE: (
        "The growth is not in tensors torch counts. On the GPU: another process, the CUDA context or library "
        "workspaces (compare nvidia-smi). On the host: Python objects, numpy arrays or native code such as "
        "environment simulators (check metric_items and evicted_alive_mb; tracemalloc sees Python and numpy "
        "allocations, not torch storage)."
    ),
    SHORT: (
        "The run failed in its first generations, so its configuration needs more memory than this machine "
        "has: replay.capacity times the transition size, population times network size, agent.batch_size. "
        "Lower them, or use a larger machine."
    ),
}

COLUMNS = (
    ("generation", "gen", "{:>5.0f}"),
    ("rss_mb", "rss MB", "{:>8,.0f}"),
    ("uss_mb", "uss MB", "{:>8,.0f}"),
    ("replay_filled_mb", "replay MB", "{:>9,.0f}"),
    ("live_tensors", "tensors", "{:>8,.0f}"),
    ("live_tensor_mb", "tensor MB", "{:>9,.0f}"),
    ("grad_tensors", "graphs", "{:>6,.0f}"),
    ("evicted_alive_mb", "evicted MB", "{:>10,.1f}"),
    ("metric_items", "metrics", "{:>7,.0f}"),
    ("cuda_allocated_mb", "cuda alloc", "{:>10,.0f}"),
    ("cuda_reserved_mb", "reserved", "{:>8,.0f}"),
    ("cuda_peak_mb", "peak", "{:>7,.0f}"),
    ("cuda_driver_used_mb", "driver", "{:>7,.0f}"),
)


def format_report(error: BaseException, history: History, device: torch.device) -> str:
    """The multi-line report to print before exiting: the error, the recent history as a table (MB per
    generation), the classification with its evidence and what to do, and on CUDA the allocator summary.
    Never raises: a part that cannot be computed says so instead."""
    diagnosis = _safe(lambda: diagnose(history), Diagnosis(SHORT, "the history could not be read"))
    sections = [
        "== Out of memory ==",
        _safe(lambda: _what_happened(error, device, diagnosis), f"what happened: {type(error).__name__}"),
        _safe(lambda: _table(history), "recent memory: (could not be formatted)"),
        f"diagnosis: {diagnosis.label}\n  evidence: {diagnosis.evidence}\n  what to do: {ADVICE[diagnosis.label]}",
    ]
    if device.type == "cuda":
        sections.append(_safe(lambda: _cuda_summary(device), "CUDA allocator summary: unavailable"))
    return "\n".join(sections)


def _what_happened(error: BaseException, device: torch.device, diagnosis: Diagnosis) -> str:
    message = str(error).strip().splitlines()
    lines = [f"what happened: {type(error).__name__}: {message[0] if message else '(no message)'}"]
    requested = re.search(r"Tried to allocate ([\d.]+ [KMGT]?i?B)", str(error))
    if requested:
        lines.append(f"  the failed request was {requested.group(1)}: only the last allocation, not what filled memory")
    lines.append(f"  now: {_memory_now(device)}")
    if "cuda" in str(error).lower() and diagnosis.domain == "host":
        lines.append("  note: the error names CUDA, but host memory is what grew (see the diagnosis)")
    return "\n".join(lines)


def _memory_now(device: torch.device) -> str:
    """Process and allocator figures at the time of the error (no census: memory may be exhausted)."""
    parts = [f"RSS {psutil.Process().memory_info().rss / MB:,.0f} MB"]
    if device.type == "cuda":
        free, total = torch.cuda.mem_get_info(device)
        parts.append(
            f"CUDA allocated {torch.cuda.memory_allocated(device) / MB:,.0f} MB, "
            f"reserved {torch.cuda.memory_reserved(device) / MB:,.0f} MB, "
            f"driver used {(total - free) / MB:,.0f} of {total / MB:,.0f} MB"
        )
    return "; ".join(parts)


def _table(history: History) -> str:
    """The last ``TABLE_ROWS`` records, one row each, with the columns some record has."""
    if not history:
        return "recent memory: no generation finished"
    columns = [c for c in COLUMNS if any(c[0] in record for record in history)]
    rows = history[-TABLE_ROWS:]
    widths = [len(fmt.format(0.0)) for _, _, fmt in columns]
    header = "  ".join(f"{title:>{w}}" for (_, title, _), w in zip(columns, widths, strict=True))
    lines = [f"recent memory (last {len(rows)} of {len(history)} recorded generations; MB unless counted):", header]
    for record in rows:
        cells = [
            fmt.format(record[key]) if key in record else f"{'-':>{w}}"
            for (key, _, fmt), w in zip(columns, widths, strict=True)
        ]
        lines.append("  ".join(cells))
    return "\n".join(lines)


def _cuda_summary(device: torch.device) -> str:
    return "CUDA allocator summary:\n" + torch.cuda.memory_summary(device, abbreviated=True)


def _safe(part: Callable[[], T], fallback: T) -> T:
    """``part()``, or ``fallback`` if it raises (the report must get out even when something is broken)."""
    try:
        return part()
    except Exception:
        return fallback


# ---------------------------------------------------------------------------------------- allocator history


def start_recording(device: torch.device, max_entries: int = HISTORY_EVENTS) -> bool:
    """On CUDA, start recording allocator events with their stacks (the last ``max_entries``, for the whole
    process); returns whether recording started. On other devices warns and does nothing."""
    if device.type != "cuda":
        warnings.warn(f"allocator history is recorded on CUDA only; nothing is recorded on {device}", stacklevel=2)
        return False
    torch.cuda.memory._record_memory_history(enabled="all", max_entries=max_entries)
    return True


def stop_recording(device: torch.device) -> None:
    """Stop what :func:`start_recording` started (no-op off CUDA)."""
    if device.type == "cuda":
        torch.cuda.memory._record_memory_history(enabled=None)


def dump_snapshot(device: torch.device, path: str | Path) -> Path | None:
    """On CUDA, write the allocator snapshot (with the recorded history) to ``path``, a pickle that
    https://pytorch.org/memory_viz opens; returns the path. On other devices warns and returns None."""
    if device.type != "cuda":
        warnings.warn(f"allocator snapshots exist on CUDA only; nothing written for {device}", stacklevel=2)
        return None
    target = Path(path)
    target.parent.mkdir(parents=True, exist_ok=True)
    torch.cuda.memory._dump_snapshot(str(target))
    return target
