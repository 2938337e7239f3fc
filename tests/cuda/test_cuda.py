"""What only a CUDA GPU can check (marked ``cuda``: skipped, saying so, without one; run by
``benchmarks/gpu_check.py``): the CUDA memory telemetry, the out-of-memory report's allocator
summary, the allocator-history snapshot, pinned host memory, every checkpointed tensor back on the
GPU after a resume, and the fused (and CUDA-graph compiled) update against the eager one."""

from __future__ import annotations

import pickle
from collections.abc import Callable
from pathlib import Path

import pytest
import torch

from agents import Batch, make_population
from agents.td3 import TD3Population
from config import AgentConfig, Config
from training import runs
from training.memory import oom, telemetry

pytestmark = pytest.mark.cuda

CUDA_KEYS = {
    "cuda_allocated_mb",
    "cuda_reserved_mb",
    "cuda_peak_mb",
    "cuda_driver_used_mb",
    "cuda_small_pool_mb",
    "cuda_large_pool_mb",
    "cuda_alloc_retries",
}


@pytest.fixture
def device() -> torch.device:
    return torch.device("cuda", torch.cuda.current_device())


def test_telemetry_has_every_cuda_key_and_sees_an_allocation(device: torch.device) -> None:
    before = telemetry.memory_snapshot(device, census=False)
    assert set(before) >= CUDA_KEYS
    block = torch.empty(64 * 2**20, dtype=torch.uint8, device=device)  # 64 MiB
    after = telemetry.memory_snapshot(device, census=False)
    assert after["cuda_allocated_mb"] >= before["cuda_allocated_mb"] + 63
    assert after["cuda_reserved_mb"] >= after["cuda_allocated_mb"]
    assert after["cuda_driver_used_mb"] >= after["cuda_reserved_mb"]  # the driver also counts the context
    assert after["cuda_peak_mb"] >= 63
    del block


def test_pinned_host_memory_is_reported(device: torch.device) -> None:
    staging = torch.empty(8 * 2**20, dtype=torch.uint8).pin_memory()
    figures = telemetry.cuda_memory(device)
    if "cuda_pinned_host_mb" not in figures:
        pytest.skip(f"torch {torch.__version__} has no torch.cuda.host_memory_stats")
    assert figures["cuda_pinned_host_mb"] >= 8
    del staging


def test_out_of_memory_report_has_the_allocator_summary(device: torch.device) -> None:
    history = [telemetry.memory_snapshot(device, census=False) | {"generation": 1.0}]
    report = oom.format_report(torch.cuda.OutOfMemoryError("CUDA out of memory."), history, device)
    assert "CUDA allocator summary" in report and "PyTorch CUDA memory summary" in report
    assert "driver used" in report


def test_allocator_history_snapshot_is_written(device: torch.device, tmp_path: Path) -> None:
    assert oom.start_recording(device)
    try:
        kept = [torch.randn(1024, 1024, device=device) for _ in range(3)]
        path = oom.dump_snapshot(device, tmp_path / "memory" / "test.pickle")
    finally:
        oom.stop_recording(device)
    assert path is not None and path.stat().st_size > 0
    with path.open("rb") as handle:  # our own file, written just now
        snapshot = pickle.load(handle)
    assert snapshot["segments"] and any(trace for trace in snapshot["device_traces"])
    del kept


def test_checkpoint_round_trip_puts_every_tensor_back_on_the_gpu(
    tiny_config: Callable[..., Config], capsys: pytest.CaptureFixture[str]
) -> None:
    cfg = tiny_config({"train.generations": 1, "run.device": "cuda"})
    trainer = runs.start(cfg)
    try:
        trainer.train()
        saved = {name: t.detach().clone() for name, t in trainer.agent.member_tensors().items()}
    finally:
        trainer.close()
    status = capsys.readouterr().out  # the status block's CUDA lines
    assert "cuda          allocated" in status and "driver used" in status and "small pool" in status
    resumed = runs.resume(cfg.run.run_dir, cfg.run.name, {"train.generations": 2})
    try:
        tensors = resumed.agent.member_tensors()
        assert tensors.keys() == saved.keys()
        for name, tensor in tensors.items():
            assert tensor.device.type == "cuda", name
            assert torch.equal(tensor, saved[name]), name
        assert all(p.device.type == "cuda" for p in resumed.agent.parameters())
        resumed.train()  # and it trains on from there
    finally:
        resumed.close()


def _agents(device: torch.device, **cfg: object) -> tuple[TD3Population, TD3Population]:
    pair = []
    for fast in (False, True):
        torch.manual_seed(0)
        config = AgentConfig(hidden_sizes=[64, 64], batch_size=64, fast_update=fast, **cfg)  # type: ignore[arg-type]
        agent = make_population(8, 5, 2, config, device)
        assert isinstance(agent, TD3Population)
        pair.append(agent)
    return pair[0], pair[1]


def _batches(device: torch.device, step: int) -> list[Batch]:
    g = torch.Generator(device=device).manual_seed(step)
    shape = (8, 64)
    return [
        Batch(
            torch.randn(*shape, 5, device=device, generator=g),
            torch.rand(*shape, 2, device=device, generator=g) * 2 - 1,
            torch.randn(*shape, device=device, generator=g),
            torch.randn(*shape, 5, device=device, generator=g),
            torch.zeros(shape, device=device),
        )
        for _ in range(2)
    ]


@pytest.mark.parametrize("mode", ["none", "reduce-overhead"])
def test_fast_update_on_cuda_matches_the_eager_one(device: torch.device, mode: str) -> None:
    eager, fast = _agents(device, compile=mode)
    for step in range(6):
        torch.manual_seed(step)
        a = eager.update(_batches(device, step))
        torch.manual_seed(step)
        b = fast.update(_batches(device, step))
        for name in a:
            torch.testing.assert_close(torch.tensor(b[name]), torch.tensor(a[name]), rtol=1e-3, atol=1e-4)
    tensors = fast.member_tensors()
    for name, expected in eager.member_tensors().items():
        assert tensors[name].device.type == "cuda", name
        torch.testing.assert_close(tensors[name], expected, rtol=1e-3, atol=1e-4, msg=name)
