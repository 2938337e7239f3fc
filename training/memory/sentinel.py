"""A memory leak sentinel: robust per-generation trends of memory figures, a verdict and a hint.

This follows MEMORY.md ("Measuring a leak"):

- a robust slope (Theil-Sen) is fitted over a rolling window of generations after warm-up, and
  growth is only called a leak when the Spearman rank correlation of the series with the
  generation number is high (a single spike or a one-time step does not make a trend);
- a verdict is confirmed over several windows (by default the current one and the one ending
  half a window earlier) before anything is reported;
- host memory is judged net of the replay buffer's filled bytes: RSS grows while a preallocated
  numpy buffer fills (untouched pages cost nothing), so ``rss_mb - replay_filled_mb`` is watched;
- tensors that carry an autograd graph at a generation boundary (``grad_tensors``) are watched
  closely: a growing count is a leak, and a nonzero count that persists is reported too.

The sentinel is pure numpy and keeps a bounded history (``window + (confirm - 1) * confirm_every``
points per series), so it does not grow with the run.
"""

from __future__ import annotations

import math
from collections import deque
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Any, Literal

import numpy as np
import numpy.typing as npt

STATE_VERSION = 1

HINT_GRAPHS = (
    "tensors that carry autograd graphs are accumulating: a loss or output kept beyond its step (store .item() floats)"
)
HINT_EVICTED = "evicted replay data is still referenced (samples must be copies, not views)"
HINT_HOST_NOT_TENSORS = (
    "host memory grows while tensor memory is flat: allocator fragmentation or a non-tensor Python leak"
)
HINT_HOST_UNKNOWN = (
    "host memory grows; no tensor census in the record to tell tensors from allocator "
    "fragmentation or a non-tensor Python leak"
)
HINT_TENSORS = (
    "tensors are accumulating: something keeps references beyond their step (lists of outputs, "
    "caches, replaced population members or their optimizer state)"
)
HINT_GPU_TENSORS = (
    "GPU tensors are accumulating (acting, evaluation and imagination must run under "
    "torch.no_grad(); cached recurrent state must be detached)"
)
HINT_FRAGMENTATION = "fragmentation: the caching allocator reserves far more than is allocated"
HINT_RESERVE_GROWS = (
    "the caching allocator reserves more every generation while allocated memory is flat (fragmentation building up)"
)
HINT_OUTSIDE_ALLOCATOR = (
    "device memory grows outside PyTorch's caching allocator (CUDA context, library workspaces or another process)"
)
HINT_METRICS = "a metrics container grows every generation"


@dataclass(frozen=True)
class _Series:
    """One watched series: the record key, its unit, a record key subtracted from it (bytes that
    are accounted for) and whose free memory bounds it (for the time-to-exhaustion estimate)."""

    key: str
    unit: Literal["MB", "count"]
    adjust: str | None = None
    device: Literal["host", "cuda"] | None = None


SERIES: tuple[_Series, ...] = (
    _Series("rss_mb", "MB", adjust="replay_filled_mb", device="host"),
    _Series("uss_mb", "MB", adjust="replay_filled_mb", device="host"),
    _Series("cuda_allocated_mb", "MB", device="cuda"),
    _Series("cuda_reserved_mb", "MB", device="cuda"),
    _Series("cuda_driver_used_mb", "MB", device="cuda"),
    _Series("live_tensors", "count"),
    _Series("live_tensor_mb", "MB"),
    _Series("grad_tensors", "count"),
    _Series("evicted_alive_mb", "MB", device="host"),
    _Series("metric_items", "count"),
    _Series("ray_object_store_mb", "MB"),
)
RECORD_KEYS: tuple[str, ...] = (*(s.key for s in SERIES), "replay_filled_mb")
"""Every record key the sentinel reads (all optional; absent series are not watched)."""


# ---------------------------------------------------------------- statistics


def theil_sen(x: npt.ArrayLike, y: npt.ArrayLike) -> tuple[float, float]:
    """Theil-Sen line fit: ``(slope, intercept)``, slope the median of all pairwise slopes and
    intercept the median of ``y - slope * x``. Robust to up to ~29% outliers."""
    xa, ya = np.asarray(x, np.float64), np.asarray(y, np.float64)
    if xa.shape != ya.shape or xa.ndim != 1:
        raise ValueError(f"x and y must be 1-D and of equal length, got {xa.shape} and {ya.shape}")
    i, j = np.triu_indices(len(xa), k=1)
    dx = xa[j] - xa[i]
    distinct = dx != 0
    if not distinct.any():
        raise ValueError("theil_sen needs at least two distinct x values")
    slope = float(np.median((ya[j] - ya[i])[distinct] / dx[distinct]))
    return slope, float(np.median(ya - slope * xa))


def _ranks(a: np.ndarray) -> np.ndarray:
    """1-based ranks, ties given their average rank."""
    _, inverse, counts = np.unique(a, return_inverse=True, return_counts=True)
    ends = np.cumsum(counts)
    return (ends - (counts - 1) / 2.0)[inverse.reshape(-1)]


def spearman(x: npt.ArrayLike, y: npt.ArrayLike) -> float:
    """Spearman rank correlation of ``y`` with ``x`` (ties averaged); 0.0 when either is constant.
    A single spike moves one rank, so it cannot fake a trend."""
    xa, ya = np.asarray(x, np.float64), np.asarray(y, np.float64)
    if xa.shape != ya.shape or xa.ndim != 1:
        raise ValueError(f"x and y must be 1-D and of equal length, got {xa.shape} and {ya.shape}")
    rx, ry = _ranks(xa), _ranks(ya)
    rx, ry = rx - rx.mean(), ry - ry.mean()
    denominator = math.sqrt(float(rx @ rx) * float(ry @ ry))
    return float(rx @ ry) / denominator if denominator > 0 else 0.0


# ---------------------------------------------------------------- verdicts


@dataclass(frozen=True)
class LeakWarning:
    """A confirmed leak (``kind="growth"``), or tensors with autograd graphs that persist at every
    generation boundary without growing (``kind="persistent"``, ``grad_tensors`` only)."""

    series: str
    """Record key of the series, e.g. ``rss_mb``."""
    label: str
    """The series as printed, e.g. ``rss_mb (replay-adjusted)``."""
    unit: Literal["MB", "count"]
    generation: int
    """The generation whose observation raised the warning."""
    slope: float
    """Theil-Sen growth per generation over the latest window, in ``unit``."""
    correlation: float
    """Spearman rank correlation of the series with the generation over the latest window."""
    window: int
    """Generations in the window."""
    latest: float
    """The series' latest value (replay-adjusted where that applies)."""
    generations_left: float | None
    """Generations until the memory runs out at this slope (MB series with a known free amount)."""
    seconds_left: float | None
    """``generations_left`` times the mean generation time."""
    hint: str
    """Likely cause, following MEMORY.md."""
    kind: Literal["growth", "persistent"] = "growth"

    def message(self) -> str:
        """One or two lines for a person: what grows, how fast, when memory runs out, and why."""
        if self.kind == "persistent":
            head = (
                f"autograd graphs kept: {self.label} is nonzero at every generation boundary "
                f"(latest {self.latest:.0f}, r={self.correlation:.2f} over {self.window} generations)."
            )
        else:
            head = (
                f"memory leak suspected: {self.label} grows {_format_slope(self.slope, self.unit)} "
                f"(r={self.correlation:.2f} over {self.window} generations)"
            )
            if self.generations_left is not None:
                who = "the GPU" if self.series.startswith("cuda_") else "the machine"
                head += f"; {who} runs out in ~{self.generations_left:,.0f} generations"
                if self.seconds_left is not None:
                    head += f" (~{_format_duration(self.seconds_left)})"
            head += "."
        return f"{head}\n  Hint: {self.hint}."


def _format_slope(slope: float, unit: str) -> str:
    return f"{slope:.1f} MB/generation" if unit == "MB" else f"{slope:.3g} per generation"


def _format_duration(seconds: float) -> str:
    if seconds < 120:
        return f"{seconds:.0f} s"
    if seconds < 2 * 3600:
        return f"{seconds / 60:.0f} min"
    if seconds < 48 * 3600:
        return f"{seconds / 3600:.1f} h"
    return f"{seconds / 86400:.1f} days"


@dataclass(frozen=True)
class _Trend:
    """A series' standing at the current generation."""

    slope: float
    correlation: float
    growing: bool
    """The latest window alone shows a leak."""
    confirmed: bool
    """Every confirming window shows a leak."""
    persistent: bool
    """``grad_tensors`` only: nonzero across the whole confirmation span."""
    latest: float


def _host_available_mb() -> float:
    import psutil

    return float(psutil.virtual_memory().available) / 2**20


# ---------------------------------------------------------------- the sentinel


class LeakSentinel:
    """Watches per-generation memory figures and warns when one grows steadily.

    Feed :meth:`observe` once per generation. The first ``warmup`` observations are ignored; a
    series is judged once it has ``window + (confirm - 1) * confirm_every`` points after warm-up.
    A series is *confirmed* leaking when, in each of ``confirm`` windows of ``window`` generations
    (the latest, and the ones ending ``confirm_every``, ``2 * confirm_every``, ... generations
    earlier), its Theil-Sen slope is at least the minimum (``min_slope_mb`` for MB series,
    ``min_slope_count`` for counts; any growth for ``grad_tensors``) and its Spearman correlation
    with the generation is at least ``min_correlation``.

    Warnings do not repeat every generation: a series warns when it first becomes confirmed, then
    again only if it is still (or again) confirmed a full ``window`` generations after its last
    warning. With ``stop_on_leak=True`` a growth warning sets :attr:`should_stop` (the trainer then
    checkpoints and stops); a persistent-but-flat ``grad_tensors`` warning does not.
    """

    def __init__(
        self,
        window: int = 20,
        min_slope_mb: float = 1.0,
        min_correlation: float = 0.9,
        confirm: int = 2,
        available_mb: Callable[[], float] | None = None,
        *,
        warmup: int = 3,
        stop_on_leak: bool = False,
        min_slope_count: float = 4.0,
        confirm_every: int | None = None,
        cuda_available_mb: Callable[[], float] | None = None,
    ) -> None:
        """``available_mb``: free host memory in MB for the time-to-exhaustion estimate (default:
        psutil's available memory); ``cuda_available_mb`` likewise for CUDA series (default: no
        estimate). ``min_slope_count``: growth per generation below which a count series is ignored
        (some containers grow by an item or two per generation by design). ``confirm_every``:
        generations between the ends of the confirming windows (default: half a window)."""
        if window < 3:
            raise ValueError(f"window must be at least 3 generations, got {window}")
        if confirm < 1:
            raise ValueError(f"confirm must be at least 1, got {confirm}")
        if warmup < 0:
            raise ValueError(f"warmup must be >= 0, got {warmup}")
        if not 0 < min_correlation <= 1:
            raise ValueError(f"min_correlation must be in (0, 1], got {min_correlation}")
        self.window = window
        self.min_slope_mb = min_slope_mb
        self.min_correlation = min_correlation
        self.confirm = confirm
        self.warmup = warmup
        self.stop_on_leak = stop_on_leak
        self.min_slope_count = min_slope_count
        self.confirm_every = max(1, window // 2) if confirm_every is None else confirm_every
        if not 1 <= self.confirm_every <= window:
            raise ValueError(f"confirm_every must be in [1, window], got {confirm_every}")
        self.span = window + (confirm - 1) * self.confirm_every
        """Points kept per series: enough for every confirming window, and no more."""
        self.available_mb = available_mb if available_mb is not None else _host_available_mb
        self.cuda_available_mb = cuda_available_mb
        self.should_stop = False
        """Set when a growth warning fires and ``stop_on_leak`` is on."""
        self._seen = 0
        self._times: deque[tuple[int, float]] = deque(maxlen=window)
        self._points: dict[str, deque[tuple[int, float]]] = {s.key: deque(maxlen=self.span) for s in SERIES}
        self._adjusted: dict[str, bool] = {}
        self._last_warned: dict[str, int] = {}

    # ------------------------------------------------------------ feeding

    def observe(self, generation: int, record: Mapping[str, Any], generation_s: float) -> list[LeakWarning]:
        """Take one generation's figures (the trainer's per-generation record; keys in
        :data:`RECORD_KEYS`, absent ones skipped) and its duration in seconds. Returns the
        warnings raised by this generation (usually none). A generation at or before one already
        seen (a resume from an older checkpoint) first drops the history from it on."""
        self._rewind(generation)
        if self._seen < self.warmup:
            self._seen += 1
            return []
        if math.isfinite(generation_s) and generation_s > 0:
            self._times.append((generation, float(generation_s)))
        fresh = [s for s in SERIES if self._append(s, generation, record)]
        trends = {s.key: trend for s in fresh if (trend := self._trend(s)) is not None}
        warnings = [w for s in fresh if (w := self._verdict(s, generation, trends)) is not None]
        if self.stop_on_leak and any(w.kind == "growth" for w in warnings):
            self.should_stop = True
        return warnings

    def _rewind(self, generation: int) -> None:
        for points in (*self._points.values(), self._times):
            while points and points[-1][0] >= generation:
                points.pop()
        self._last_warned = {k: g for k, g in self._last_warned.items() if g < generation}

    def _append(self, series: _Series, generation: int, record: Mapping[str, Any]) -> bool:
        value = _number(record.get(series.key))
        if value is None:
            return False
        adjustment = _number(record.get(series.adjust)) if series.adjust else None
        self._adjusted[series.key] = adjustment is not None
        self._points[series.key].append((generation, value - (adjustment or 0.0)))
        return True

    # ------------------------------------------------------------ judging

    def _threshold(self, series: _Series) -> float:
        if series.key == "grad_tensors":
            return 0.0
        return self.min_slope_mb if series.unit == "MB" else self.min_slope_count

    def _leaking(self, slope: float, correlation: float, threshold: float) -> bool:
        return slope > 0 and slope >= threshold and correlation >= self.min_correlation

    def _trend(self, series: _Series) -> _Trend | None:
        """The series' latest-window fit and confirmation; None before ``window`` points."""
        points = self._points[series.key]
        if len(points) < self.window:
            return None
        xy = np.asarray(points, np.float64)
        threshold = self._threshold(series)
        fits = []
        for k in range(self.confirm):
            end = len(xy) - k * self.confirm_every
            if end < self.window:
                break
            x, y = xy[end - self.window : end, 0], xy[end - self.window : end, 1]
            fits.append((theil_sen(x, y)[0], spearman(x, y)))
        slope, correlation = fits[0]
        complete = len(fits) == self.confirm
        return _Trend(
            slope=slope,
            correlation=correlation,
            growing=self._leaking(slope, correlation, threshold),
            confirmed=complete and all(self._leaking(s, r, threshold) for s, r in fits),
            persistent=series.key == "grad_tensors" and complete and bool((xy[:, 1] > 0).all()),
            latest=float(xy[-1, 1]),
        )

    def _verdict(self, series: _Series, generation: int, trends: dict[str, _Trend]) -> LeakWarning | None:
        trend = trends.get(series.key)
        if trend is None or not (trend.confirmed or trend.persistent):
            return None
        last = self._last_warned.get(series.key)
        if last is not None and generation - last < self.window:
            return None
        self._last_warned[series.key] = generation
        kind: Literal["growth", "persistent"] = "growth" if trend.confirmed else "persistent"
        generations_left = self._generations_left(series, trend.slope) if kind == "growth" else None
        mean_s = float(np.mean([s for _, s in self._times])) if self._times else None
        label = f"{series.key} (replay-adjusted)" if self._adjusted.get(series.key) else series.key
        return LeakWarning(
            series=series.key,
            label=label,
            unit=series.unit,
            generation=generation,
            slope=trend.slope,
            correlation=trend.correlation,
            window=self.window,
            latest=trend.latest,
            generations_left=generations_left,
            seconds_left=generations_left * mean_s if generations_left is not None and mean_s else None,
            hint=self._hint(series.key, trends),
            kind=kind,
        )

    def _generations_left(self, series: _Series, slope: float) -> float | None:
        source = {"host": self.available_mb, "cuda": self.cuda_available_mb}.get(series.device or "")
        if series.unit != "MB" or source is None or slope <= 0:
            return None
        return max(float(source()), 0.0) / slope

    # ------------------------------------------------------------ attribution

    def _hint(self, key: str, trends: dict[str, _Trend]) -> str:
        """The likeliest cause of ``key``'s growth, given how the other series behave (MEMORY.md)."""

        def growing(name: str) -> bool:
            trend = trends.get(name)
            return trend is not None and trend.growing

        graphs = growing("grad_tensors") or (
            trends.get("grad_tensors") is not None and trends["grad_tensors"].persistent
        )
        if key == "grad_tensors":
            return HINT_GRAPHS
        if key == "evicted_alive_mb":
            return HINT_EVICTED
        if key == "metric_items":
            return HINT_METRICS
        if key in ("live_tensors", "live_tensor_mb"):
            return HINT_GRAPHS if graphs else HINT_EVICTED if growing("evicted_alive_mb") else HINT_TENSORS
        if key in ("rss_mb", "uss_mb"):
            return self._host_hint(trends, graphs, growing)
        return self._cuda_hint(key, graphs, growing)

    def _host_hint(self, trends: dict[str, _Trend], graphs: bool, growing: Callable[[str], bool]) -> str:
        if graphs:
            return HINT_GRAPHS
        if growing("evicted_alive_mb"):
            return HINT_EVICTED
        if growing("live_tensor_mb") or growing("live_tensors"):
            return HINT_TENSORS
        if growing("metric_items"):
            return HINT_METRICS
        if "live_tensor_mb" in trends or "live_tensors" in trends:
            return HINT_HOST_NOT_TENSORS
        return HINT_HOST_UNKNOWN

    def _cuda_hint(self, key: str, graphs: bool, growing: Callable[[str], bool]) -> str:
        if graphs:
            return HINT_GRAPHS
        if growing("cuda_allocated_mb") or key == "cuda_allocated_mb":
            return HINT_GPU_TENSORS
        if growing("cuda_reserved_mb") or key == "cuda_reserved_mb":
            return HINT_FRAGMENTATION if self._reserved_ratio() > 2 else HINT_RESERVE_GROWS
        return HINT_OUTSIDE_ALLOCATOR

    def _reserved_ratio(self) -> float:
        """Latest reserved / allocated CUDA memory (inf when nothing is allocated)."""
        reserved, allocated = self._points["cuda_reserved_mb"], self._points["cuda_allocated_mb"]
        if not reserved or not allocated:
            return 0.0
        return reserved[-1][1] / allocated[-1][1] if allocated[-1][1] > 0 else math.inf

    # ------------------------------------------------------------ state

    def state(self) -> dict[str, Any]:
        """The history (JSON-serialisable), for a checkpoint: a resumed run keeps judging where
        this one stood. :attr:`should_stop` is not kept (a resumed run starts without it)."""
        return {
            "version": STATE_VERSION,
            "seen": self._seen,
            "times": [list(p) for p in self._times],
            "series": {
                key: {
                    "points": [list(p) for p in points],
                    "adjusted": self._adjusted.get(key, False),
                    "last_warned": self._last_warned.get(key),
                }
                for key, points in self._points.items()
                if points or key in self._last_warned
            },
        }

    def load_state(self, state: Mapping[str, Any]) -> None:
        """Restore :meth:`state`'s history (trimmed to this sentinel's window if it is smaller)."""
        if state.get("version") != STATE_VERSION:
            raise ValueError(f"unknown leak sentinel state version {state.get('version')!r}")
        self._seen = min(int(state["seen"]), self.warmup)
        self._times = deque(((int(g), float(s)) for g, s in state["times"]), maxlen=self.window)
        self._points = {s.key: deque(maxlen=self.span) for s in SERIES}
        self._adjusted, self._last_warned = {}, {}
        for key, saved in state["series"].items():
            if key not in self._points:
                continue
            self._points[key].extend((int(g), float(v)) for g, v in saved["points"])
            self._adjusted[key] = bool(saved["adjusted"])
            if saved["last_warned"] is not None:
                self._last_warned[key] = int(saved["last_warned"])


def _number(value: Any) -> float | None:
    """A finite float, or None for anything else (absent, bool, text, NaN, inf)."""
    if isinstance(value, bool) or not isinstance(value, (int, float, np.integer, np.floating)):
        return None
    number = float(value)
    return number if math.isfinite(number) else None
