"""Per-generation memory telemetry: the figures, the tensor census, the replay view check, the history."""

from __future__ import annotations

import inspect
import json
import math
from collections.abc import Callable
from types import ModuleType
from typing import Any

import numpy as np
import pytest
import torch

from training.memory.telemetry import MB, TelemetryHistory, memory_snapshot
from training.replay import ReplayBuffer, Transitions

CPU = torch.device("cpu")
CUDA = torch.device("cuda", 0)
STREAMS, OBS, ACT = 3, 4, 2


def filled_buffer(rows: int = 40) -> ReplayBuffer:
    buffer = ReplayBuffer(100 * STREAMS, STREAMS, OBS, ACT, seed=0)
    for value in range(rows):
        buffer.add(
            Transitions(
                obs=np.full((STREAMS, OBS), value, np.float32),
                action=np.zeros((STREAMS, ACT), np.float32),
                reward=np.full(STREAMS, value, np.float32),
                next_obs=np.full((STREAMS, OBS), value + 1, np.float32),
                terminated=np.zeros(STREAMS, bool),
                truncated=np.zeros(STREAMS, bool),
                is_first=np.zeros(STREAMS, bool),
            )
        )
    return buffer


# ---------------------------------------------------------------- the figures


def test_snapshot_on_cpu_has_process_replay_and_census_figures_and_no_cuda_ones() -> None:
    buffer = filled_buffer(rows=40)
    snapshot = memory_snapshot(CPU, buffer, {"metric_items": 7})
    expected = {
        "rss_mb",
        "uss_mb",
        "replay_filled_mb",
        "evicted_alive_mb",
        "live_tensors",
        "live_tensor_mb",
        "live_tensors_cpu",
        "live_tensor_mb_cpu",
        "grad_tensors",
        "census_ms",
        "metric_items",
    }
    assert expected <= set(snapshot)
    assert not [key for key in snapshot if key.startswith("cuda_")]
    assert all(isinstance(v, float) and math.isfinite(v) for v in snapshot.values())
    assert snapshot["rss_mb"] > 0 and snapshot["uss_mb"] > 0
    assert snapshot["replay_filled_mb"] == buffer.filled_bytes / MB > 0
    assert snapshot["metric_items"] == 7.0
    assert snapshot["live_tensors"] == snapshot["live_tensors_cpu"]


def test_census_off_leaves_out_the_census_figures() -> None:
    snapshot = memory_snapshot(CPU, filled_buffer(), census=False)
    assert "rss_mb" in snapshot and "replay_filled_mb" in snapshot
    assert not {"live_tensors", "grad_tensors", "evicted_alive_mb", "census_ms"} & set(snapshot)


def fake(monkeypatch: pytest.MonkeyPatch, module: ModuleType, name: str, result: Any, calls: list[str]) -> None:
    """Replace ``module.name`` by a stand-in that first checks the call against the real function's
    signature (so a wrong argument fails here, without a GPU), then returns ``result``."""
    signature = inspect.signature(getattr(module, name))

    def stand_in(*args: Any, **kwargs: Any) -> Any:
        signature.bind(*args, **kwargs)
        calls.append(name)
        return result

    monkeypatch.setattr(module, name, stand_in)


@pytest.fixture
def fake_cuda(monkeypatch: pytest.MonkeyPatch) -> Callable[[dict[str, Any]], list[str]]:
    """A CUDA runtime on a machine without one: 100 MB allocated (3 small pool, 97 large), 300 reserved,
    150 peak, 3,000 of 4,000 MB used device-wide, 2 allocation retries; ``host`` is the pinned statistics."""

    def install(host: dict[str, Any]) -> list[str]:
        calls: list[str] = []
        stats = {
            "allocated_bytes.small_pool.current": 3 * MB,
            "allocated_bytes.large_pool.current": 97 * MB,
            "num_alloc_retries": 2,
        }
        for name, result in {
            "memory_stats": stats,
            "mem_get_info": (1000 * MB, 4000 * MB),
            "memory_allocated": 100 * MB,
            "memory_reserved": 300 * MB,
            "max_memory_allocated": 150 * MB,
            "reset_peak_memory_stats": None,
            "host_memory_stats": host,
        }.items():
            fake(monkeypatch, torch.cuda, name, result, calls)
        return calls

    return install


def test_snapshot_on_cuda_reads_allocator_pools_driver_and_pinned_memory(
    fake_cuda: Callable[[dict[str, Any]], list[str]],
) -> None:
    calls = fake_cuda({"allocated_bytes.current": 8 * MB})
    snapshot = memory_snapshot(CUDA, filled_buffer())
    assert {k: v for k, v in snapshot.items() if k.startswith("cuda_")} == {
        "cuda_allocated_mb": 100.0,
        "cuda_reserved_mb": 300.0,
        "cuda_peak_mb": 150.0,
        "cuda_driver_used_mb": 3000.0,
        "cuda_small_pool_mb": 3.0,
        "cuda_large_pool_mb": 97.0,
        "cuda_alloc_retries": 2.0,
        "cuda_pinned_host_mb": 8.0,
    }
    assert snapshot["live_tensors_cuda"] == 0 and "live_tensor_mb_cuda" in snapshot
    assert calls.index("reset_peak_memory_stats") > calls.index("max_memory_allocated")  # read, then reset


def test_pinned_memory_is_left_out_when_the_host_allocator_has_no_figures(
    fake_cuda: Callable[[dict[str, Any]], list[str]],
) -> None:
    fake_cuda({})  # what host_memory_stats() returns before CUDA is initialised
    snapshot = memory_snapshot(CUDA, census=False)
    assert "cuda_pinned_host_mb" not in snapshot and snapshot["cuda_allocated_mb"] == 100.0


# ---------------------------------------------------------------- tensor census


def test_live_tensors_counts_held_tensors_once_per_storage() -> None:
    before = memory_snapshot(CPU)
    held = [torch.zeros(1000) for _ in range(10)]
    views = [t[:10] for t in held]  # views share their storage: not counted again
    during = memory_snapshot(CPU)
    del held, views
    after = memory_snapshot(CPU)
    assert during["live_tensors"] - before["live_tensors"] == 10
    assert during["live_tensor_mb"] - before["live_tensor_mb"] == 10 * 1000 * 4 / MB
    assert after["live_tensors"] == before["live_tensors"]


def test_grad_tensors_counts_a_held_loss_with_its_graph() -> None:
    weight = torch.ones(8, requires_grad=True)
    loss = (weight * 2.0).pow(2).sum()  # incident 1: a loss kept with its graph
    held = memory_snapshot(CPU)
    del loss
    freed = memory_snapshot(CPU)
    assert held["grad_tensors"] >= 1
    assert freed["grad_tensors"] == 0
    assert weight.grad is None  # nothing was backpropagated: the census only looked


# ---------------------------------------------------------------- replay data kept alive by views (incident 2)


def test_a_held_view_of_replay_storage_is_reported_and_gone_once_dropped() -> None:
    buffer = filled_buffer()
    healthy = memory_snapshot(CPU, buffer)
    kept = {"episode": [buffer.data["obs"][5:25]]}  # the Dreamer mistake: a slice of storage
    with_view = memory_snapshot(CPU, buffer)
    del kept
    dropped = memory_snapshot(CPU, buffer)
    assert healthy["evicted_alive_mb"] == 0
    assert with_view["evicted_alive_mb"] * MB == 20 * STREAMS * OBS * 4
    assert dropped["evicted_alive_mb"] == 0


def test_a_tensor_made_from_a_view_of_replay_storage_is_reported() -> None:
    buffer = filled_buffer()
    tensor = torch.from_numpy(buffer.data["reward"][:10])  # zero-copy: the tensor keeps the view
    snapshot = memory_snapshot(CPU, buffer)
    assert snapshot["evicted_alive_mb"] * MB == 10 * STREAMS * 4
    assert tensor.shape == (10, STREAMS)


def test_held_samples_keep_no_replay_storage_alive() -> None:
    """Fails if ``ReplayBuffer.sample`` hands out views of storage instead of copies."""
    buffer = filled_buffer()
    samples = [buffer.sample(4, 16) for _ in range(5)]
    as_tensors = [torch.from_numpy(sample["obs"]) for sample in samples]
    snapshot = memory_snapshot(CPU, buffer)
    assert snapshot["evicted_alive_mb"] == 0
    assert len(samples) == len(as_tensors) == 5


# ---------------------------------------------------------------- history


def test_history_keeps_only_the_newest_records() -> None:
    history = TelemetryHistory(maxlen=5)
    for generation in range(8):
        history.append(generation, {"rss_mb": 100.0 + generation})
    records = history.records()
    assert len(history) == 5
    assert [r["generation"] for r in records] == [3, 4, 5, 6, 7]
    assert records[-1]["rss_mb"] == 107.0


def test_history_state_round_trips_through_json() -> None:
    history = TelemetryHistory(maxlen=4)
    for generation in range(6):
        history.append(generation, memory_snapshot(CPU, census=False, collect=False))
    restored = TelemetryHistory(maxlen=4)
    restored.load_state(json.loads(json.dumps(history.state())))
    assert restored.records() == history.records()
    shorter = TelemetryHistory(maxlen=2)
    shorter.load_state(history.state())
    assert [r["generation"] for r in shorter.records()] == [4, 5]
