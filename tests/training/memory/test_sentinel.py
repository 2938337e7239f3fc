from __future__ import annotations

import json
from collections.abc import Callable, Iterable

import numpy as np
import pytest

from training.memory import sentinel as sentinel_module
from training.memory.sentinel import (
    HINT_EVICTED,
    HINT_FRAGMENTATION,
    HINT_GPU_TENSORS,
    HINT_GRAPHS,
    HINT_HOST_NOT_TENSORS,
    HINT_METRICS,
    LeakSentinel,
    LeakWarning,
    spearman,
    theil_sen,
)

WARMUP, WINDOW, CONFIRM = 3, 20, 2
FIRST_JUDGED = WARMUP + WINDOW + (CONFIRM - 1) * (WINDOW // 2) - 1
"""The first generation (0-based) at which the default sentinel can warn: 32."""
GEN_S = 30.0
Record = dict[str, float]


def make(**kwargs: object) -> LeakSentinel:
    """A default sentinel with a fixed 64 GB of free host memory."""
    return LeakSentinel(available_mb=lambda: 64_000.0, **kwargs)  # type: ignore[arg-type]


def feed(sentinel: LeakSentinel, records: Iterable[Record], start: int = 0) -> list[LeakWarning]:
    warnings: list[LeakWarning] = []
    for generation, record in enumerate(records, start):
        warnings += sentinel.observe(generation, record, GEN_S)
    return warnings


def noise(n: int, sd: float, seed: int = 0) -> np.ndarray:
    return np.random.default_rng(seed).normal(0.0, sd, n)


def leak(n: int, per_generation: float, sd: float = 2.0, base: float = 500.0, seed: int = 0) -> np.ndarray:
    return base + per_generation * np.arange(n) + noise(n, sd, seed)


def rss(values: Iterable[float], **extra: Callable[[int], float]) -> list[Record]:
    return [{"rss_mb": float(v), **{k: f(g) for k, f in extra.items()}} for g, v in enumerate(values)]


# ---------------------------------------------------------------- statistics


def test_theil_sen_recovers_slope_despite_20_percent_outliers() -> None:
    rng = np.random.default_rng(1)
    x = np.arange(50, dtype=float)
    y = 3.0 * x + 7.0 + rng.normal(0, 0.5, 50)
    outliers = rng.choice(50, 10, replace=False)
    y[outliers] += rng.uniform(200, 1000, 10)
    slope, intercept = theil_sen(x, y)
    assert slope == pytest.approx(3.0, abs=0.1)
    assert intercept == pytest.approx(7.0, abs=2.0)
    assert abs(np.polyfit(x, y, 1)[0] - 3.0) > 0.5, "control: least squares is pulled off by the outliers"


def test_spearman_of_monotone_series_is_one_and_ignores_a_spike() -> None:
    x = np.arange(20)
    assert spearman(x, np.exp(x / 3)) == pytest.approx(1.0)
    assert spearman(x, -x) == pytest.approx(-1.0)
    assert spearman(x, np.full(20, 5.0)) == 0.0
    flat = 100 + noise(20, 1.0)
    spiked = flat.copy()
    spiked[-1] += 500
    assert abs(spearman(x, spiked)) < 0.6
    with pytest.raises(ValueError):
        theil_sen([1.0, 1.0], [2.0, 3.0])


# ---------------------------------------------------------------- verdicts


def test_flat_noise_raises_nothing() -> None:
    assert feed(make(), rss(500 + noise(60, 5.0))) == []


@pytest.mark.parametrize("fill_generations", [20, 40])
def test_replay_buffer_fill_is_not_a_leak(fill_generations: int) -> None:
    """RSS grows 50 MB/generation while the buffer fills, exactly as the filled bytes do."""
    g = np.arange(80)
    filled = 50.0 * np.minimum(g, fill_generations)
    records = rss(500 + filled + noise(80, 5.0), replay_filled_mb=lambda i: float(filled[i]))
    assert feed(make(), records) == []


def test_replay_fill_without_filled_bytes_looks_like_a_leak_until_it_plateaus() -> None:
    """The control for the test above: the same RSS without ``replay_filled_mb`` is flagged
    while the fill is in the window, and never again once the plateau fills the window."""
    filled = 50.0 * np.minimum(np.arange(80), 40)
    warnings = feed(make(), rss(500 + filled + noise(80, 5.0)))
    assert [w.series for w in warnings] == ["rss_mb"]
    assert warnings[0].label == "rss_mb"
    assert warnings[0].generation < 40 + WINDOW // 2


def test_steady_slow_leak_is_caught_with_its_slope() -> None:
    warnings = feed(make(), rss(leak(60, 3.0)))
    assert warnings, "a 3 MB/generation leak went unnoticed"
    first = warnings[0]
    assert first.series == "rss_mb" and first.kind == "growth"
    assert first.generation <= FIRST_JUDGED + 2
    assert first.slope == pytest.approx(3.0, rel=0.3)
    assert first.correlation >= 0.9
    assert first.generations_left == pytest.approx(64_000.0 / first.slope)
    assert first.seconds_left == pytest.approx(64_000.0 / first.slope * GEN_S)
    text = first.message()
    assert "rss_mb grows 3.0 MB/generation" in text and "runs out in" in text and "Hint:" in text
    assert len(text.splitlines()) <= 2


def test_leak_is_reported_net_of_replay_fill() -> None:
    filled = 40.0 * np.minimum(np.arange(60), 30)
    records = rss(leak(60, 3.0) + filled, replay_filled_mb=lambda i: float(filled[i]))
    warnings = feed(make(), records)
    assert warnings and warnings[0].label == "rss_mb (replay-adjusted)"
    assert warnings[0].slope == pytest.approx(3.0, rel=0.3)


def test_consecutive_confirmation_warns_one_generation_after_the_first_window() -> None:
    warnings = feed(make(confirm_every=1), rss(leak(40, 3.0)))
    assert warnings and warnings[0].generation == WARMUP + WINDOW + CONFIRM - 2


@pytest.mark.parametrize("spike_at", [25, 40, 59])
def test_single_spike_is_not_a_leak(spike_at: int) -> None:
    values = 500 + noise(60, 5.0)
    values[spike_at] += 500
    assert feed(make(), rss(values)) == []


def test_one_time_step_is_not_a_leak() -> None:
    values = 500 + noise(80, 2.0)
    values[30:] += 200
    assert feed(make(), rss(values)) == []


def test_growth_below_min_slope_is_ignored() -> None:
    records = rss(leak(60, 0.5, sd=0.1))
    assert feed(make(), records) == []
    assert feed(make(min_slope_mb=0.25), records), "control: the same series is a leak at a lower threshold"


def test_growing_tensors_with_graphs_warn_with_the_graph_hint() -> None:
    records = rss(500 + noise(40, 2.0), grad_tensors=lambda g: 96.0 * g)
    warnings = feed(make(), records)
    assert [w.series for w in warnings] == ["grad_tensors"]
    w = warnings[0]
    assert w.hint == HINT_GRAPHS and w.kind == "growth"
    assert w.slope == pytest.approx(96.0)
    assert w.generations_left is None and w.seconds_left is None
    assert "96 per generation" in w.message()


def test_persistent_tensors_with_graphs_warn_without_stopping() -> None:
    sentinel = make(stop_on_leak=True)
    warnings = feed(sentinel, rss(500 + noise(40, 2.0), grad_tensors=lambda g: 12.0))
    assert [(w.series, w.kind, w.hint) for w in warnings] == [("grad_tensors", "persistent", HINT_GRAPHS)]
    assert not sentinel.should_stop
    assert feed(make(), rss(500 + noise(40, 2.0), grad_tensors=lambda g: 0.0)) == []


def test_reserved_growing_over_flat_allocated_is_fragmentation() -> None:
    records = [
        {"cuda_allocated_mb": 300.0 + a, "cuda_reserved_mb": 1000.0 + 20.0 * g + r}
        for g, (a, r) in enumerate(zip(noise(50, 2.0, seed=1), noise(50, 2.0, seed=2), strict=True))
    ]
    warnings = feed(make(), records)
    assert [w.series for w in warnings] == ["cuda_reserved_mb"]
    assert warnings[0].hint == HINT_FRAGMENTATION
    assert warnings[0].generations_left is None, "no free-GPU figure was given"
    gpu = feed(make(cuda_available_mb=lambda: 8000.0), records)
    assert gpu[0].generations_left == pytest.approx(8000.0 / gpu[0].slope)
    assert "the GPU runs out" in gpu[0].message()


@pytest.mark.parametrize(
    ("growing", "flat", "series", "hint"),
    [
        ({"rss_mb": 5.0}, {"live_tensor_mb": 200.0, "live_tensors": 400.0}, "rss_mb", HINT_HOST_NOT_TENSORS),
        ({"rss_mb": 5.0, "evicted_alive_mb": 5.0}, {}, "evicted_alive_mb", HINT_EVICTED),
        ({"rss_mb": 5.0, "evicted_alive_mb": 5.0}, {}, "rss_mb", HINT_EVICTED),
        ({"rss_mb": 1.5, "metric_items": 3072.0}, {}, "metric_items", HINT_METRICS),
        ({"cuda_allocated_mb": 10.0, "cuda_reserved_mb": 10.0}, {}, "cuda_allocated_mb", HINT_GPU_TENSORS),
    ],
)
def test_attribution_hints(growing: dict[str, float], flat: dict[str, float], series: str, hint: str) -> None:
    n = 40
    records = [
        {**{k: 100.0 + s * g + e for k, s in growing.items()}, **{k: v + e for k, v in flat.items()}}
        for g, e in enumerate(noise(n, 0.5))
    ]
    warnings = {w.series: w for w in feed(make(), records)}
    assert warnings[series].hint == hint
    assert not set(flat) & set(warnings)


# ---------------------------------------------------------------- repetition, state, bounds, stopping


def test_warnings_do_not_repeat_every_generation() -> None:
    warnings = feed(make(), rss(leak(60, 3.0)))
    assert 1 <= len(warnings) <= 3
    generations = [w.generation for w in warnings]
    assert all(b - a >= WINDOW for a, b in zip(generations, generations[1:], strict=False))


def test_state_round_trip_continues_identically() -> None:
    records = rss(leak(80, 3.0), grad_tensors=lambda g: 5.0 * g)
    original = make()
    feed(original, records[:28])
    saved = json.loads(json.dumps(original.state()))
    resumed = make()
    resumed.load_state(saved)
    after_original = feed(original, records[28:], start=28)
    after_resumed = feed(resumed, records[28:], start=28)
    assert after_resumed == after_original
    assert after_original and after_original[0].generation <= FIRST_JUDGED
    assert resumed.state() == original.state()
    fresh = feed(make(), records[28:], start=28)
    assert fresh[0].generation > after_original[0].generation, "control: without the history it warns later"


def test_history_stays_bounded() -> None:
    sentinel = make()
    records = rss(leak(1000, 3.0), grad_tensors=lambda g: 5.0, live_tensors=lambda g: 40.0)
    sizes = []
    for generation, record in enumerate(records):
        sentinel.observe(generation, record, GEN_S)
        if generation in (100, 999):
            sizes.append(len(json.dumps(sentinel.state())))
    state = sentinel.state()
    assert {len(s["points"]) for s in state["series"].values()} == {WINDOW + (CONFIRM - 1) * WINDOW // 2}
    assert len(state["times"]) == WINDOW
    assert sizes[1] <= sizes[0] * 1.1


def test_resume_from_an_older_generation_drops_the_newer_history() -> None:
    sentinel = make()
    feed(sentinel, rss(leak(50, 3.0)))
    feed(sentinel, rss(np.full(5, 500.0)), start=40)
    points = sentinel.state()["series"]["rss_mb"]["points"]
    assert [g for g, _ in points] == list(range(20, 45))
    assert [v for g, v in points if g >= 40] == [500.0] * 5


def test_should_stop_only_with_stop_on_leak() -> None:
    records = rss(leak(40, 3.0))
    stopping = make(stop_on_leak=True)
    fired: list[LeakWarning] = []
    for generation, record in enumerate(records):
        assert not stopping.should_stop
        fired = stopping.observe(generation, record, GEN_S)
        if fired:
            break
    assert fired and stopping.should_stop
    watching = make()
    assert feed(watching, records) and not watching.should_stop


def test_default_free_memory_comes_from_psutil() -> None:
    assert LeakSentinel().available_mb is sentinel_module._host_available_mb
    assert sentinel_module._host_available_mb() > 0
