"""Pinned staging of replay samples (training/staging.py), on the cpu: the same code with ordinary
buffers (tests/cuda/test_pixels_cuda.py runs it pinned on a GPU)."""

from __future__ import annotations

import numpy as np
import torch

from agents.base import device_dtype
from training.frames import FrameReplay
from training.replay import Transitions
from training.staging import PinnedStaging

E, ACT = 2, 3


def filled_replay() -> FrameReplay:
    replay = FrameReplay(40, E, ACT, seed=0, frame_shape=(8, 8), stack=4)
    rng = np.random.default_rng(0)
    obs = np.repeat(rng.integers(0, 256, (E, 1, 8, 8), dtype=np.uint8), 4, axis=1)
    for t in range(30):
        nxt = np.concatenate([obs[:, 1:], rng.integers(0, 256, (E, 1, 8, 8), dtype=np.uint8)], axis=1)
        action = np.eye(ACT, dtype=np.float32)[rng.integers(0, ACT, E)]
        flags = np.zeros(E, np.bool_)
        replay.add(Transitions(obs, action, rng.random(E, np.float32), nxt, flags, flags, np.full(E, t == 0)))
        obs = nxt
    return replay


def test_samples_own_their_memory_and_reach_the_device_as_fresh_tensors() -> None:
    replay = filled_replay()
    staging = PinnedStaging(torch.device("cpu"))
    arrays = replay.sample(3, 5)
    for name, array in arrays.items():
        assert not any(np.shares_memory(array, stored) for stored in replay.data.values()), name
    out = staging.to_device(arrays)
    assert out["obs"].dtype == torch.uint8 and out["obs"].shape == (3, 5, 4, 8, 8)
    assert out["terminated"].dtype == torch.float32 and out["action"].shape == (3, 5, ACT)
    for name, tensor in out.items():
        np.testing.assert_array_equal(tensor.numpy(), arrays[name].astype(tensor.numpy().dtype), err_msg=name)
        assert tensor.data_ptr() != staging.buffers[name].data_ptr(), name  # not the reused buffer itself
        assert not np.shares_memory(tensor.numpy(), arrays[name]), name
    assert device_dtype(arrays["obs"]) == torch.uint8 and device_dtype(arrays["reward"]) == torch.float32


def test_staging_buffers_are_reused_and_do_not_grow() -> None:
    replay = filled_replay()
    staging = PinnedStaging(torch.device("cpu"))
    first = staging.to_device(replay.sample(3, 5))
    pointers = {name: b.data_ptr() for name, b in staging.buffers.items()}
    held = staging.nbytes
    kept = [first]
    for _ in range(20):
        kept.append(staging.to_device(replay.sample(3, 5)))
    assert {name: b.data_ptr() for name, b in staging.buffers.items()} == pointers
    assert staging.allocations == len(first) == 5 and staging.nbytes == held
    assert not torch.equal(kept[0]["obs"], kept[-1]["obs"])  # earlier results were not overwritten in place
    staging.to_device(replay.sample(4, 5))  # another shape: one new buffer per field, not one more per call
    assert staging.allocations == 10 and len(staging.buffers) == 5
