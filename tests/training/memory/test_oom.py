"""Out-of-memory report: recognising the error, classifying the history, the printed report."""

from __future__ import annotations

import inspect
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch

from training.memory.oom import (
    FRAGMENTATION,
    LEAK,
    OUTSIDE,
    SHORT,
    SPIKE,
    classify,
    diagnose,
    dump_snapshot,
    format_report,
    is_out_of_memory,
    start_recording,
    stop_recording,
    trend,
)

CPU = torch.device("cpu")
CUDA = torch.device("cuda", 0)
MB = 2**20


def history(generations: int, **figures: Callable[[int], float]) -> list[dict[str, float]]:
    """Synthetic telemetry: ``figures`` maps a record key to its value as a function of the generation."""
    return [{"generation": float(g), **{k: float(f(g)) for k, f in figures.items()}} for g in range(generations)]


def cuda_history(
    generations: int = 12,
    allocated: Callable[[int], float] = lambda g: 1000,
    reserved: Callable[[int], float] = lambda g: 1300,
    peak: Callable[[int], float] = lambda g: 1200,
    driver: Callable[[int], float] = lambda g: 1800,
) -> list[dict[str, float]]:
    return history(
        generations,
        rss_mb=lambda g: 3000 + 3 * (g % 2),  # a little noise
        uss_mb=lambda g: 2900 + 3 * (g % 2),
        live_tensor_mb_cpu=lambda g: 50,
        cuda_allocated_mb=allocated,
        cuda_reserved_mb=reserved,
        cuda_peak_mb=peak,
        cuda_driver_used_mb=driver,
    )


# ---------------------------------------------------------------- classify


def test_steady_growth_of_allocated_memory_is_a_leak() -> None:
    grows = cuda_history(
        allocated=lambda g: 1000 + 40 * g + 5 * (g % 3),
        reserved=lambda g: 1300 + 40 * g,
        peak=lambda g: 1200 + 40 * g,
        driver=lambda g: 1800 + 40 * g,
    )
    assert classify(grows) == LEAK


def test_graphs_kept_every_generation_are_a_leak() -> None:
    kept = history(10, rss_mb=lambda g: 3000, live_tensor_mb_cpu=lambda g: 50, grad_tensors=lambda g: 96 * g)
    assert classify(kept) == LEAK


def test_metric_containers_that_grow_by_thousands_per_generation_are_a_leak() -> None:
    flat = {"rss_mb": lambda g: 3000, "live_tensor_mb_cpu": lambda g: 50}
    assert classify(history(10, metric_items=lambda g: 3072 * g, **flat)) == LEAK  # incident 1's lists
    assert classify(history(10, metric_items=lambda g: 40 + g, **flat)) != LEAK  # one best fitness per generation


def test_host_growth_with_flat_tensors_is_outside_the_allocator() -> None:
    grows = history(
        10,
        rss_mb=lambda g: 3000 + 50 * g,
        uss_mb=lambda g: 2900 + 50 * g,
        live_tensor_mb_cpu=lambda g: 50,
        live_tensors=lambda g: 97,
    )
    assert classify(grows) == OUTSIDE


def test_driver_growth_beside_a_flat_allocator_is_outside_the_allocator() -> None:
    assert classify(cuda_history(driver=lambda g: 1800 + 100 * g)) == OUTSIDE


def test_reserved_far_above_what_tensors_needed_is_fragmentation() -> None:
    fragmented = cuda_history(reserved=lambda g: 6000, driver=lambda g: 6500)
    assert classify(fragmented) == FRAGMENTATION
    cached_peak = cuda_history(reserved=lambda g: 6000, peak=lambda g: 5800, driver=lambda g: 6500)
    assert classify(cached_peak) != FRAGMENTATION  # the cache holds what the generation's peak needed


def test_one_jump_after_flat_history_is_a_spike() -> None:
    jump = diagnose(cuda_history(peak=lambda g: 1200 if g < 11 else 5000))
    assert (jump.label, jump.domain) == (SPIKE, "gpu")
    assert "jumped to 5,000 MB" in jump.evidence
    host_jump = diagnose(history(10, rss_mb=lambda g: 3000 if g < 9 else 9000, live_tensor_mb_cpu=lambda g: 50))
    assert (host_jump.label, host_jump.domain) == (SPIKE, "host")
    assert "jumped to 9,000 MB" in host_jump.evidence
    small_step = diagnose(cuda_history(peak=lambda g: 1200 if g < 11 else 1230))
    assert "jumped" not in small_step.evidence


def test_flat_history_means_the_peak_came_inside_the_failing_generation() -> None:
    flat = diagnose(cuda_history())
    assert flat.label == SPIKE
    assert "no figure grew" in flat.evidence


def test_rss_that_grows_only_as_the_replay_fills_is_not_a_leak() -> None:
    filling = history(
        10, rss_mb=lambda g: 3000 + 80 * g, replay_filled_mb=lambda g: 80 * g, live_tensor_mb_cpu=lambda g: 50
    )
    assert classify(filling) == SPIKE
    leaking = history(
        10, rss_mb=lambda g: 3000 + 80 * g, replay_filled_mb=lambda g: 40 * g, live_tensor_mb_cpu=lambda g: 50
    )
    assert classify(leaking) == OUTSIDE


def test_a_short_history_is_not_enough() -> None:
    assert classify([]) == SHORT
    assert classify(cuda_history(generations=3, allocated=lambda g: 1000 * (g + 1))) == SHORT


def test_the_trend_ignores_one_outlier() -> None:
    x = np.arange(10.0)
    y = 5.0 * x
    y[7] = 1000.0
    fitted = trend(x, y)
    assert fitted.slope == pytest.approx(5.0) and fitted.correlation > 0.9
    assert trend(np.zeros(5), np.arange(5.0)).slope == 0.0  # no two distinct generations: no trend


# ---------------------------------------------------------------- recognising an out-of-memory error


def test_out_of_memory_errors_are_recognised() -> None:
    try:
        raise torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 174.00 MiB")
    except Exception as err:  # what the trainer's handler sees
        assert is_out_of_memory(err)
    assert is_out_of_memory(MemoryError())
    assert is_out_of_memory(RuntimeError("CUDA error: out of memory"))
    assert is_out_of_memory(RuntimeError("DefaultCPUAllocator: can't allocate memory: you tried to allocate 8 GB"))
    assert not is_out_of_memory(RuntimeError("mat1 and mat2 shapes cannot be multiplied"))
    assert not is_out_of_memory(ValueError("out of memory"))


def test_an_out_of_memory_error_raised_from_another_is_recognised() -> None:
    try:
        try:
            raise torch.OutOfMemoryError("CUDA out of memory")
        except torch.OutOfMemoryError as oom:
            raise ValueError("rollout failed") from oom
    except ValueError as err:
        assert is_out_of_memory(err)


# ---------------------------------------------------------------- the report


def test_report_has_the_error_line_the_table_and_the_diagnosis() -> None:
    error = torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 174.00 MiB\nsecond line of details")
    grows = history(
        20,
        rss_mb=lambda g: 3000 + 50 * g,
        uss_mb=lambda g: 2900 + 50 * g,
        live_tensors=lambda g: 97,
        live_tensor_mb_cpu=lambda g: 50,
        grad_tensors=lambda g: 0,
    )
    report = format_report(error, grows, CPU)
    assert "OutOfMemoryError: CUDA out of memory. Tried to allocate 174.00 MiB" in report
    assert "second line of details" not in report
    assert "the failed request was 174.00 MiB" in report
    assert "rss MB" in report and "uss MB" in report and "graphs" in report
    rows = [line.split() for line in report.splitlines() if line[:5].strip().isdigit()]
    assert [row[0] for row in rows] == [str(g) for g in range(5, 20)]  # the newest 15 generations
    assert rows[-1][1:3] == ["3,950", "3,850"]  # rss, uss of generation 19
    assert f"diagnosis: {OUTSIDE}" in report
    assert "host memory is what grew" in report  # the error names CUDA, the host grew (incident 4)
    assert "CUDA allocator summary" not in report


def test_report_survives_a_host_memory_error_with_a_broken_history() -> None:
    report = format_report(MemoryError(), [{"generation": 0.0}, {"rss_mb": float("nan")}], CPU)
    assert "what happened: MemoryError: (no message)" in report
    assert f"diagnosis: {SHORT}" in report


# ---------------------------------------------------------------- on CUDA, without a GPU


@pytest.fixture
def fake_cuda(monkeypatch: pytest.MonkeyPatch) -> dict[str, dict[str, Any]]:
    """Stand-ins for the CUDA calls the report and the recorder make. Each checks its arguments against
    the real torch function's signature and records them: name -> the arguments of its last call."""
    calls: dict[str, dict[str, Any]] = {}

    def fake(module: Any, name: str, result: Callable[..., Any]) -> None:
        signature = inspect.signature(getattr(module, name))

        def stand_in(*args: Any, **kwargs: Any) -> Any:
            calls[name] = dict(signature.bind(*args, **kwargs).arguments)
            return result(*args, **kwargs)

        monkeypatch.setattr(module, name, stand_in)

    fake(torch.cuda, "memory_summary", lambda *a, **k: "|  PyTorch CUDA memory summary, device ID 0  |")
    fake(torch.cuda, "mem_get_info", lambda *a, **k: (1000 * MB, 4000 * MB))
    fake(torch.cuda, "memory_allocated", lambda *a, **k: 100 * MB)
    fake(torch.cuda, "memory_reserved", lambda *a, **k: 300 * MB)
    fake(torch.cuda.memory, "_record_memory_history", lambda *a, **k: None)
    fake(torch.cuda.memory, "_dump_snapshot", lambda filename, **k: Path(filename).write_bytes(b"snapshot"))
    return calls


def test_report_on_cuda_adds_the_allocator_summary_and_the_figures_now(fake_cuda: dict[str, dict[str, Any]]) -> None:
    report = format_report(torch.OutOfMemoryError("CUDA out of memory."), cuda_history(), CUDA)
    assert "CUDA allocated 100 MB, reserved 300 MB, driver used 3,000 of 4,000 MB" in report
    assert "CUDA allocator summary:\n|  PyTorch CUDA memory summary, device ID 0  |" in report
    assert fake_cuda["memory_summary"] == {"device": CUDA, "abbreviated": True}
    assert "cuda alloc" in report and "driver" in report


def test_recording_and_dumping_allocator_history_on_cuda(fake_cuda: dict[str, dict[str, Any]], tmp_path: Path) -> None:
    assert start_recording(CUDA, max_entries=5000) is True
    assert fake_cuda["_record_memory_history"] == {"enabled": "all", "max_entries": 5000}
    path = dump_snapshot(CUDA, tmp_path / "memory" / "oom.pickle")
    assert path == tmp_path / "memory" / "oom.pickle" and path.read_bytes() == b"snapshot"
    stop_recording(CUDA)
    assert fake_cuda["_record_memory_history"] == {"enabled": None}


# ---------------------------------------------------------------- allocator history (CUDA only)


def test_allocator_history_is_a_clear_no_op_on_cpu(tmp_path: Path) -> None:
    with pytest.warns(UserWarning, match="CUDA only"):
        assert start_recording(CPU) is False
    with pytest.warns(UserWarning, match="CUDA only"):
        assert dump_snapshot(CPU, tmp_path / "snapshot.pickle") is None
    assert not (tmp_path / "snapshot.pickle").exists()
