"""The Dreamer member on Atari Pong (tiny sizes): its CNN world model learns from the population's
frame replay, and a stopped and resumed run equals the uninterrupted one bit for bit on CPU."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import numpy as np
import pytest
from support import tensors_with_graph
from test_dreamer_member import assert_same_dreamer
from test_pixels import PONG
from test_trainer import assert_same_run, metrics, resume, train

from agents.dreamer.networks import ImageEncoder
from config import Config, UserError
from training.frames import FrameReplay

pytest.importorskip("ale_py")

TinyConfig = Callable[..., Config]

PONG_DREAMER: dict[str, Any] = {
    **PONG,
    "dreamer.enabled": True,
    "dreamer.cnn_channels": [4, 8, 8],
    "dreamer.cnn_features": 16,
    "dreamer.batch_size": 2,
    "dreamer.seq_len": 8,
    "dreamer.train_ratio": 0.2,  # ~3 updates a generation
    "dreamer.horizon": 3,
}


def test_the_dreamer_member_learns_from_the_frame_replay_and_resumes_bit_for_bit(tiny_config: TinyConfig) -> None:
    straight = train(tiny_config({**PONG_DREAMER, "train.generations": 2, "run.name": "straight"}))
    assert straight.dreamer is not None and isinstance(straight.dreamer.agent.wm.encoder, ImageEncoder)
    assert isinstance(straight.replay, FrameReplay) and straight.dreamer.agent.train_steps >= 2
    last = metrics(straight.cfg)[-1]
    assert np.isfinite(last["dreamer_fitness"]) and last["dreamer_finite"] == 1.0
    assert np.isfinite(last["dreamer_reconstruction"]) and last["dreamer_reconstruction"] > 0
    assert not tensors_with_graph()

    stopped = tiny_config({**PONG_DREAMER, "train.generations": 1, "run.name": "stopped"})
    train(stopped)
    resumed = resume(stopped, extra={"train.generations": 2})
    assert_same_run(straight, resumed)
    assert_same_dreamer(straight, resumed)


def test_imagination_for_pixel_members_is_refused_in_one_line(tiny_config: TinyConfig) -> None:
    for key in ("dreamer.screen", "dreamer.model_rollouts"):
        with pytest.raises(UserError, match="not yet supported with image observations"):
            train(tiny_config({**PONG_DREAMER, key: True, "train.generations": 1}))
