"""The model buffer: bounded, oldest evicted first, samples that own their memory, exact state."""

from __future__ import annotations

import numpy as np
import pytest

from training.model_buffer import FIELDS, ModelBuffer


def transitions(start: int, count: int) -> dict[str, np.ndarray]:
    """``count`` transitions numbered from ``start`` (every number of one transition is its index)."""
    index = np.arange(start, start + count, dtype=np.float32)
    return {
        "obs": np.repeat(index[:, None], 3, 1),
        "action": index[:, None] / 1000,
        "reward": index,
        "next_obs": np.repeat(index[:, None], 3, 1) + 0.5,
        "terminated": index % 2 == 0,
    }


def test_the_buffer_is_bounded_and_evicts_the_oldest_first() -> None:
    buffer = ModelBuffer(10, obs_dim=3, act_dim=1, seed=0)
    buffer.add(transitions(0, 7))
    buffer.add(transitions(7, 7))
    assert len(buffer) == 10 and buffer.cursor == 4
    assert sorted(buffer.data["reward"].tolist()) == list(range(4, 14))
    buffer.add(transitions(100, 25))  # more than the capacity at once: the newest 10 are kept
    assert sorted(buffer.data["reward"].tolist()) == list(range(115, 125)) and len(buffer) == 10


def test_samples_keep_transitions_whole_and_own_their_memory() -> None:
    buffer = ModelBuffer(50, obs_dim=3, act_dim=1, seed=0)
    buffer.add(transitions(0, 20))
    sample = buffer.sample(members=4, batch_size=8)
    assert sample["obs"].shape == (4, 8, 3) and sample["reward"].shape == (4, 8)
    assert np.array_equal(sample["obs"][..., 0], sample["reward"]) and np.all(sample["reward"] < 20)
    assert np.array_equal(sample["terminated"], sample["reward"] % 2 == 0)
    assert not any(np.shares_memory(sample[name], buffer.data[name]) for name in FIELDS)
    held = {name: a.copy() for name, a in sample.items()}
    buffer.add(transitions(1000, 50))  # overwrite everything
    assert all(np.array_equal(sample[name], held[name]) for name in FIELDS)


def test_sampling_an_empty_buffer_is_refused() -> None:
    with pytest.raises(ValueError, match="empty model buffer"):
        ModelBuffer(5, 3, 1, seed=0).sample(1, 1)


def test_state_round_trip_restores_contents_cursor_and_rng() -> None:
    buffer = ModelBuffer(16, obs_dim=3, act_dim=1, seed=0)
    buffer.add(transitions(0, 11))
    tensors, meta = buffer.state()
    restored = ModelBuffer(16, obs_dim=3, act_dim=1, seed=99)
    restored.load_state(tensors, meta)
    assert (restored.cursor, len(restored)) == (buffer.cursor, len(buffer))
    a, b = buffer.sample(2, 5), restored.sample(2, 5)
    assert all(np.array_equal(a[name], b[name]) for name in FIELDS)


def test_a_saved_buffer_larger_than_the_capacity_is_refused() -> None:
    buffer = ModelBuffer(16, obs_dim=3, act_dim=1, seed=0)
    buffer.add(transitions(0, 12))
    tensors, meta = buffer.state()
    with pytest.raises(ValueError, match="more than dreamer.model_buffer"):
        ModelBuffer(8, obs_dim=3, act_dim=1, seed=0).load_state(tensors, meta)
