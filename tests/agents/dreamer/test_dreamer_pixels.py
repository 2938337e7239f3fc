"""The Dreamer member on stacked frames: the CNN encoder/decoder pair and a world-model update on uint8 sequences."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from support import tensors_with_graph

from agents.dreamer import SIZES, ActionSpec, DreamerAgent, DreamerSize
from agents.dreamer.networks import ImageDecoder, ImageEncoder, make_decoder, make_encoder
from config import DreamerConfig

FRAMES, ACT = (4, 36, 36), 3
WIDTHS = [4, 8, 8]


@pytest.fixture(autouse=True)
def test_size(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setitem(SIZES, "test", DreamerSize(deter=32, units=32, layers=1, groups=4, classes=4, model_lr=1e-3))


def make(seed: int = 0) -> DreamerAgent:
    cfg = DreamerConfig(size="test", horizon=4, cnn_channels=WIDTHS, cnn_features=32, model_lr=1e-2)
    return DreamerAgent(FRAMES, ActionSpec("discrete", ACT), cfg, torch.device("cpu"), seed)


def pixel_sequences(batch: int = 4, length: int = 6, seed: int = 0) -> dict[str, np.ndarray]:
    """Consecutive stacks of one drifting bright square (``obs_t+1 == next_obs_t``), uint8."""
    rng = np.random.default_rng(seed)
    frames = np.zeros((batch, length + FRAMES[0], *FRAMES[1:]), np.uint8)
    for b in range(batch):
        x, y = rng.integers(0, 20, 2)
        for t in range(frames.shape[1]):
            frames[b, t, y : y + 8, (x + t) % 28 : (x + t) % 28 + 8] = 255
    stacks = np.stack([frames[:, t : t + FRAMES[0]] for t in range(length + 1)], 1)
    is_first = np.zeros((batch, length), np.bool_)
    is_first[:, 0] = True
    return {
        "obs": stacks[:, :-1].copy(),
        "next_obs": stacks[:, 1:].copy(),
        "action": np.eye(ACT, dtype=np.float32)[rng.integers(0, ACT, (batch, length))],
        "reward": rng.normal(size=(batch, length)).astype(np.float32),
        "terminated": np.zeros((batch, length), np.bool_),
        "is_first": is_first,
    }


@pytest.mark.parametrize("shape", [(4, 84, 84), (1, 37, 41), (3, 64, 64)])
def test_the_decoder_returns_the_encoders_frame_shape(shape: tuple[int, int, int]) -> None:
    encoder = make_encoder(shape, 32, 1, WIDTHS, 16)
    decoder = make_decoder(shape, 24, 32, 1, WIDTHS)
    assert isinstance(encoder, ImageEncoder) and isinstance(decoder, ImageDecoder)
    frames = torch.randint(0, 256, (2, 3, *shape), dtype=torch.uint8)
    assert encoder(frames).shape == (2, 3, 16)
    pred = decoder(torch.zeros(2, 3, 24))
    assert pred.shape == (2, 3, *shape)
    assert decoder.loss(pred, frames).shape == (2, 3)
    decoded = decoder.observation(pred)
    assert float(decoded.min()) >= 0 and float(decoded.max()) <= 255


def test_frames_travel_as_uint8_and_scale_alike_from_float() -> None:
    agent, seq = make(), pixel_sequences()
    assert agent._tensors(seq)["obs"].dtype == torch.uint8
    frames = torch.as_tensor(seq["obs"][:, 0])
    assert torch.equal(agent.wm.encoder(frames), agent.wm.encoder(frames.float()))


def test_only_restart_rows_of_obs_are_encoded() -> None:
    """``obs_t`` equals ``next_obs_{t-1}`` inside a sequence, so the filter reads ``obs`` only where a
    state restarts: garbage elsewhere must not change the loss or its gradient; at a restart it must."""

    def loss_and_gradient(batch: dict[str, np.ndarray]) -> tuple[float, torch.Tensor]:
        agent = make()
        loss = agent.wm.loss(agent._tensors(batch), agent.gen)[0]
        loss.backward()
        return loss.item(), torch.cat([p.grad.flatten() for p in agent.wm.encoder.parameters() if p.grad is not None])

    seq = pixel_sequences()
    seq["is_first"][:, 3] = True
    loss, gradient = loss_and_gradient(seq)
    garbage = {**seq, "obs": seq["obs"].copy()}
    garbage["obs"][:, [1, 2, 4, 5]] = 77
    garbage_loss, garbage_gradient = loss_and_gradient(garbage)
    assert garbage_loss == loss and torch.equal(garbage_gradient, gradient)
    changed = {**seq, "obs": seq["obs"].copy()}
    changed["obs"][:, 3] = 77  # a restart row: it must matter
    assert not torch.equal(loss_and_gradient(changed)[1], gradient)


def test_pixel_updates_lower_the_reconstruction_and_leave_no_graph() -> None:
    agent, seq = make(), pixel_sequences()
    first = agent.train_step(seq)
    for _ in range(9):
        last = agent.train_step(seq)
    assert all(isinstance(v, float) for v in last.values()) and last["finite"] == 1.0
    assert last["reconstruction"] < 0.6 * first["reconstruction"]
    action = agent.act(torch.as_tensor(seq["obs"][:, 0]), torch.ones(4, dtype=torch.bool), explore=True)
    assert action.shape == (4, ACT) and torch.equal(action.sum(-1), torch.ones(4))
    assert agent._act_state is not None and not any(v.requires_grad for v in agent._act_state.values())
    assert tensors_with_graph() == []
