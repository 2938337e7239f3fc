"""Helpers for the tests: live-tensor counting for the memory regression tests (docs/MEMORY.md),
exact comparison of population members, and running a short training to its end."""

from __future__ import annotations

import gc
import json
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch

from config import Config
from training import runs
from training.trainer import Trainer

TINY_PONG: dict[str, Any] = {
    "env.id": "ALE/Pong-v5",
    "env.max_episode_steps": 60,  # evaluation episodes are cut, so a generation stays short
    "population": 2,
    "agent.cnn_channels": [4, 8, 8],
    "agent.cnn_features": 16,
    "agent.hidden_sizes": [16],
    "agent.batch_size": 8,
    "replay.capacity": 200,  # 100 rows of 2 streams: full after generation 1 (40 + 60 rows), wraps in 2
    "train.steps_per_generation": 40,
    "train.updates_per_generation": 3,
    "train.accumulation_steps": 2,
    "train.warmup_steps": 80,
    "run.replay_shard_mb": 0.5,
}
"""Overrides of the debug preset for a run on Atari Pong of seconds a generation: two CNN members
(discrete SAC) on (4, 84, 84) uint8 frame stacks; tests needing ale_py skip without it."""


def live_tensors() -> list[torch.Tensor]:
    """Every torch tensor the garbage collector can reach, after a full collection."""
    gc.collect()
    return [obj for obj in gc.get_objects() if issubclass(type(obj), torch.Tensor)]


def live_storages() -> dict[int, int]:
    """Distinct storages of the live tensors: data pointer -> bytes (views count once)."""
    storages = {}
    for tensor in live_tensors():
        if tensor.is_meta:
            continue
        storage = tensor.untyped_storage()
        storages[storage.data_ptr()] = storage.nbytes()
    return storages


def tensors_with_graph() -> list[torch.Tensor]:
    """Live tensors that hold an autograd graph (must be none between steps)."""
    return [t for t in live_tensors() if t.grad_fn is not None]


def assert_members_equal(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> None:
    """Every member tensor identical, bit for bit."""
    assert sorted(a) == sorted(b)
    different = [name for name in a if not torch.equal(a[name], b[name])]
    assert not different, f"member tensors differ: {different[:5]}"


def train(cfg: Config, before: Callable[[Trainer], None] | None = None) -> Trainer:
    """Start a run of ``cfg``, call ``before`` on the trainer (a test's hook), train it to the end, close it."""
    trainer = runs.start(cfg)
    try:
        if before is not None:
            before(trainer)
        trainer.train()
    finally:
        trainer.close()
    return trainer


def metrics(cfg: Config) -> list[dict[str, Any]]:
    """The run's ``metrics.jsonl`` records, one per generation."""
    path = Path(cfg.run.run_dir) / cfg.run.name / "metrics.jsonl"
    return [json.loads(line) for line in path.read_text().splitlines()]
