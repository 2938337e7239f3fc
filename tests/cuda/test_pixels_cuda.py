"""CUDA only (marked ``cuda``; ``benchmarks/gpu_check.py`` runs them): replay samples reach the GPU
through reusable pinned buffers, and the CNN members' bf16 autocast (``agent.amp``)."""

from __future__ import annotations

from collections.abc import Callable

import numpy as np
import pytest
import torch
from support import train

from agents import make_population
from agents.cnn import BatchedCNN
from config import AgentConfig, Config
from training.staging import PinnedStaging

pytestmark = pytest.mark.cuda


@pytest.fixture
def device() -> torch.device:
    return torch.device("cuda", torch.cuda.current_device())


def test_pinned_staging_copies_equal_values_into_fresh_device_tensors(device: torch.device) -> None:
    staging = PinnedStaging(device)
    rng = np.random.default_rng(0)
    batches = [
        {"obs": rng.integers(0, 256, (4, 8, 4, 84, 84), dtype=np.uint8), "reward": rng.random((4, 8), np.float32)}
        for _ in range(5)
    ]
    outs = [staging.to_device(b) for b in batches]
    assert all(b.is_pinned() for b in staging.buffers.values()) and staging.allocations == 2
    for arrays, out in zip(batches, outs, strict=True):  # every earlier copy survived the buffer's reuse
        assert out["obs"].device == device and out["obs"].dtype == torch.uint8
        np.testing.assert_array_equal(out["obs"].cpu().numpy(), arrays["obs"])
        np.testing.assert_array_equal(out["reward"].cpu().numpy(), arrays["reward"])


def test_amp_runs_the_encoder_in_bf16_and_returns_float32_features(device: torch.device) -> None:
    torch.manual_seed(0)
    frames = torch.randint(0, 256, (3, 16, 4, 84, 84), dtype=torch.uint8, device=device)
    plain = BatchedCNN(3, (4, 84, 84)).to(device)
    mixed = BatchedCNN(3, (4, 84, 84), amp=True).to(device)
    mixed.load_state_dict(plain.state_dict())
    full, half = plain(frames), mixed(frames)
    assert half.dtype == torch.float32 and half.shape == (3, 16, 512)
    torch.testing.assert_close(half, full, rtol=5e-2, atol=5e-2)  # bf16 keeps ~3 significant digits
    cfg = AgentConfig(hidden_sizes=[32], batch_size=16, amp=True)
    agent = make_population(3, (4, 84, 84), 6, cfg, device, action_kind="discrete")
    assert agent.act(frames, explore=True).shape == (3, 16, 6)


PONG_ON_CUDA = {
    "env.id": "ALE/Pong-v5",
    "env.max_episode_steps": 40,
    "population": 2,
    "agent.cnn_channels": [8, 16, 16],
    "agent.cnn_features": 32,
    "agent.hidden_sizes": [32],
    "agent.batch_size": 16,
    "agent.amp": True,
    "replay.capacity": 400,
    "train.steps_per_generation": 40,
    "train.updates_per_generation": 5,
    "train.warmup_steps": 80,
    "train.generations": 2,
    "evolution.elites": 1,
    "run.device": "cuda",
}
"""Two tiny generations of a Pong population on CUDA."""


def test_a_pong_generation_on_cuda_samples_through_the_same_pinned_buffers(
    device: torch.device, tiny_config: Callable[..., Config]
) -> None:
    pytest.importorskip("ale_py")
    trainer = train(tiny_config(PONG_ON_CUDA))
    assert trainer.staging is not None and trainer.staging.allocations == 5  # one buffer per field, reused
    assert all(b.is_pinned() for b in trainer.staging.buffers.values())
    assert all(t.device.type == "cuda" for t in trainer.agent.member_tensors().values())


def test_the_dreamer_member_on_pong_trains_on_cuda_through_its_own_pinned_buffers(
    device: torch.device, tiny_config: Callable[..., Config]
) -> None:
    pytest.importorskip("ale_py")
    dreamer = {"dreamer.enabled": True, "dreamer.cnn_channels": [4, 8, 8], "dreamer.cnn_features": 16}
    dreamer |= {"dreamer.batch_size": 2, "dreamer.seq_len": 8, "dreamer.train_ratio": 0.2}  # ~2 updates a generation
    trainer = train(tiny_config({**PONG_ON_CUDA, **dreamer}))
    member = trainer.dreamer
    assert member is not None and member.agent.train_steps >= 2 and member.staging is not None
    assert member.staging.allocations == 7 and all(b.is_pinned() for b in member.staging.buffers.values())
    assert member.staging.buffers["obs"].dtype == torch.uint8  # frames cross as uint8
    assert all(t.device.type == "cuda" for name, t in member.agent.state_tensors().items() if name != "rng")
