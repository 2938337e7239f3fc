"""Encoders, decoders, heads and actors, each chosen by a factory from the space it serves.

``make_encoder(obs_shape)`` / ``make_decoder(obs_shape)`` pick the network for an observation shape
(a flat vector today; an image encoder/decoder pair registers in ``ENCODERS``/``DECODERS`` under
its own rule later, with the same ``(..., *obs_shape) -> (..., embed)`` and
``(..., feat) -> (..., *obs_shape)`` contracts). ``make_actor(action)`` picks the policy head for
an action space (bounded Gaussian for ``Box`` in ``[-1, 1]``, categorical over one-hot actions for
``Discrete``; both with the same ``sample``/``mode``/``log_prob_entropy``).
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from agents.dreamer.math import symexp, symlog, two_hot_loss, two_hot_mean, unimix_logits
from config import UserError


def mlp(inp: int, units: int, layers: int, out: int | None = None, zero_out: bool = False) -> nn.Sequential:
    """``layers`` x (Linear, LayerNorm, SiLU) of width ``units``, then an optional Linear to ``out``
    (zero-initialised with ``zero_out``, as DreamerV3 does for the reward head and critic)."""
    mods: list[nn.Module] = []
    for i in range(layers):
        mods += [nn.Linear(inp if i == 0 else units, units, bias=False), nn.LayerNorm(units), nn.SiLU()]
    if out is not None:
        last = nn.Linear(units if layers else inp, out)
        if zero_out:
            nn.init.zeros_(last.weight)
            nn.init.zeros_(last.bias)
        mods.append(last)
    return nn.Sequential(*mods)


class VectorEncoder(nn.Module):
    """Flat observations ``(..., obs_dim)`` -> embedding ``(..., units)`` through symlog and an MLP."""

    def __init__(self, obs_shape: tuple[int, ...], units: int, layers: int) -> None:
        super().__init__()
        self.out_dim = units
        self.net = mlp(obs_shape[0], units, layers)

    def forward(self, obs: Tensor) -> Tensor:
        return self.net(symlog(obs))


class VectorDecoder(nn.Module):
    """Features ``(..., feat)`` -> symlog-space observations ``(..., obs_dim)``; loss is symlog MSE."""

    def __init__(self, obs_shape: tuple[int, ...], feat: int, units: int, layers: int) -> None:
        super().__init__()
        self.net = mlp(feat, units, layers, obs_shape[0])

    def forward(self, feat: Tensor) -> Tensor:
        return self.net(feat)

    def loss(self, pred: Tensor, obs: Tensor) -> Tensor:
        """``(...)``: squared error in symlog space, summed over observation dimensions."""
        return (pred - symlog(obs)).pow(2).sum(-1)

    def observation(self, pred: Tensor) -> Tensor:
        """Decoded observation ``(..., obs_dim)`` in raw units."""
        return symexp(pred)


def make_encoder(obs_shape: tuple[int, ...], units: int, layers: int) -> VectorEncoder:
    """The encoder for ``obs_shape``: an MLP for flat vectors (an image CNN is added here later)."""
    if len(obs_shape) == 1:
        return VectorEncoder(obs_shape, units, layers)
    raise UserError(f"dreamer: observations of shape {obs_shape} are not supported yet (flat vectors only)")


def make_decoder(obs_shape: tuple[int, ...], feat: int, units: int, layers: int) -> VectorDecoder:
    """The decoder for ``obs_shape``, the mirror of :func:`make_encoder`."""
    if len(obs_shape) == 1:
        return VectorDecoder(obs_shape, feat, units, layers)
    raise UserError(f"dreamer: observations of shape {obs_shape} are not supported yet (flat vectors only)")


class TwoHotHead(nn.Module):
    """Features ``(..., feat)`` -> logits ``(..., bins)`` over symexp-spaced bins (reward, critic)."""

    def __init__(self, feat: int, units: int, layers: int, bins: int) -> None:
        super().__init__()
        self.net = mlp(feat, units, layers, bins, zero_out=True)

    def forward(self, feat: Tensor) -> Tensor:
        return self.net(feat)

    @staticmethod
    def mean(logits: Tensor, bins: Tensor) -> Tensor:
        return two_hot_mean(logits, bins)

    @staticmethod
    def loss(logits: Tensor, target: Tensor, bins: Tensor) -> Tensor:
        return two_hot_loss(logits, target, bins)


@dataclass(frozen=True)
class ActionSpec:
    """What the actor factory needs of an action space: ``kind`` ``"box"`` (continuous in
    ``[-1, 1]^dim``, the trainer's normalised actions) or ``"discrete"`` (``dim`` choices)."""

    kind: str
    dim: int


class BoundedGaussianActor(nn.Module):
    """Features ``(..., feat)`` -> a Gaussian with mean ``tanh(.)`` in ``[-1, 1]`` and std in
    ``[min_std, max_std]``; samples are clipped to ``[-1, 1]`` (log-probs are of the unclipped draw)."""

    def __init__(self, feat: int, dim: int, units: int, layers: int, min_std: float = 0.1, max_std: float = 1.0):
        super().__init__()
        self.dim, self.min_std, self.max_std = dim, min_std, max_std
        self.net = mlp(feat, units, layers, 2 * dim)

    def forward(self, feat: Tensor) -> tuple[Tensor, Tensor]:
        """``(mean, std)``, each ``(..., dim)``."""
        mean, std = self.net(feat).chunk(2, -1)
        return torch.tanh(mean), self.min_std + (self.max_std - self.min_std) * torch.sigmoid(std + 2.0)

    def sample(self, feat: Tensor, generator: torch.Generator | None) -> tuple[Tensor, Tensor]:
        """``(raw draw, action clipped to [-1, 1])``, each ``(..., dim)``; the draw is detached."""
        with torch.no_grad():
            mean, std = self(feat)
            noise = torch.randn(mean.shape, generator=generator, device=mean.device, dtype=mean.dtype)
            raw = mean + std * noise
        return raw, raw.clamp(-1.0, 1.0)

    def mode(self, feat: Tensor) -> Tensor:
        return self(feat)[0]

    def log_prob_entropy(self, feat: Tensor, raw: Tensor) -> tuple[Tensor, Tensor]:
        """Log-probability of ``raw (..., dim)`` and the distribution's entropy, each ``(...)``."""
        mean, std = self(feat)
        log_prob = -0.5 * ((raw - mean) / std).pow(2) - std.log() - 0.5 * math.log(2 * math.pi)
        entropy = std.log() + 0.5 * math.log(2 * math.pi * math.e)
        return log_prob.sum(-1), entropy.sum(-1)


class CategoricalActor(nn.Module):
    """Features ``(..., feat)`` -> a categorical over ``dim`` actions, mixed with ``unimix`` of the
    uniform distribution (DreamerV3's 1%, so no action's probability reaches 0). Actions are one-hot
    rows ``(..., dim)``; a sample's ``raw`` draw is that same one-hot row, and the actor learns from it
    by REINFORCE (``log_prob_entropy``), as DreamerV3 does for discrete actions."""

    def __init__(self, feat: int, dim: int, units: int, layers: int, unimix: float = 0.01) -> None:
        super().__init__()
        self.dim, self.unimix = dim, unimix
        self.net = mlp(feat, units, layers, dim)

    def forward(self, feat: Tensor) -> Tensor:
        """Log-probabilities ``(..., dim)`` (after the uniform mix)."""
        return unimix_logits(self.net(feat), self.unimix)

    def sample(self, feat: Tensor, generator: torch.Generator | None) -> tuple[Tensor, Tensor]:
        """``(one-hot draw, the same one-hot action)``, each ``(..., dim)`` and detached."""
        with torch.no_grad():
            probs = self(feat).exp()
            # A non-finite row (a diverged actor) draws from any action instead of raising.
            flat = torch.nan_to_num(probs.reshape(-1, self.dim), nan=1.0, posinf=1.0, neginf=0.0)
            index = torch.multinomial(flat, 1, generator=generator).reshape(probs.shape[:-1])
            one_hot = F.one_hot(index, self.dim).to(probs.dtype)
        return one_hot, one_hot

    def mode(self, feat: Tensor) -> Tensor:
        """The most likely action, one-hot ``(..., dim)``."""
        logits = self(feat)
        return F.one_hot(logits.argmax(-1), self.dim).to(logits.dtype)

    def log_prob_entropy(self, feat: Tensor, raw: Tensor) -> tuple[Tensor, Tensor]:
        """Log-probability of the one-hot ``raw (..., dim)`` and the distribution's entropy, each ``(...)``."""
        log_probs = self(feat)
        return (raw * log_probs).sum(-1), -(log_probs.exp() * log_probs).sum(-1)


def make_actor(action: ActionSpec, feat: int, units: int, layers: int) -> BoundedGaussianActor | CategoricalActor:
    """The policy head for ``action``: a bounded Gaussian for ``box``, a categorical over one-hot
    actions for ``discrete``; both with the same ``sample``/``mode``/``log_prob_entropy``."""
    if action.kind == "box":
        return BoundedGaussianActor(feat, action.dim, units, layers)
    if action.kind == "discrete":
        return CategoricalActor(feat, action.dim, units, layers)
    raise UserError(f"dreamer: {action.kind!r} action spaces are not supported (Box or Discrete actions)")
