"""The trainer draws an update's K micro-batches in one replay draw: the same rows as K draws."""

from __future__ import annotations

from collections.abc import Callable

import numpy as np
import torch

from config import Config
from training import runs


def test_one_draw_of_k_micro_batches_equals_k_draws(tiny_config: Callable[..., Config]) -> None:
    trainer = runs.start(tiny_config({"train.generations": 1}))
    try:
        trainer.train()
        state = trainer.replay.rng.bit_generator.state
        batches = trainer._sample(3)
        trainer.replay.rng.bit_generator.state = state
        p, b = trainer.population, trainer.cfg.agent.batch_size
        for batch in batches:
            arrays = trainer.replay.sample(p, b)
            for name, tensor in zip(("obs", "action", "reward", "next_obs", "terminated"), batch, strict=True):
                assert tensor.shape == arrays[name].shape, name
                assert torch.equal(tensor, torch.as_tensor(arrays[name], dtype=torch.float32)), name
        assert not np.array_equal(batches[0].obs.numpy(), batches[1].obs.numpy())
        assert trainer._sample(0) == []
    finally:
        trainer.close()
