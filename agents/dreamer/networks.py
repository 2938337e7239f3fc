"""Encoders, decoders, heads and actors, each chosen by a factory from the space it serves.

``make_encoder(obs_shape)`` / ``make_decoder(obs_shape)`` pick the network for an observation shape:
an MLP pair for flat vectors, a CNN pair for stacked frames ``(C, H, W)`` (pixel values 0..255),
with the same ``(..., *obs_shape) -> (..., embed)`` and ``(..., feat) -> (..., *obs_shape)``
contracts. ``make_actor(action)`` picks the policy head for
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


class ImageEncoder(nn.Module):
    """Frames ``(..., C, H, W)`` of pixel values 0..255 (any dtype) -> embedding ``(..., features)``.

    NatureCNN's shape (Mnih et al. 2015): three convolutions of ``widths`` channels (8x8 stride 4,
    4x4 stride 2, 3x3 stride 1), then a linear layer; SiLU after each. Pixels enter as
    ``x / 255 - 0.5``. ``widths`` (32, 64, 64) and ``features`` 512 are NatureCNN's."""

    def __init__(self, obs_shape: tuple[int, ...], widths: list[int], features: int) -> None:
        super().__init__()
        channels, height, width = obs_shape
        self.obs_shape, self.out_dim = tuple(obs_shape), features
        layers: list[nn.Module] = []
        for c_in, c_out, k, s in _conv_plan(channels, widths):
            layers += [nn.Conv2d(c_in, c_out, k, s), nn.SiLU()]
        self.convs = nn.Sequential(*layers)
        self.grid = _conv_grid(height, width)[-1]
        self.linear = nn.Sequential(nn.Linear(widths[-1] * self.grid[0] * self.grid[1], features), nn.SiLU())

    def forward(self, obs: Tensor) -> Tensor:
        lead = obs.shape[: -len(self.obs_shape)]
        x = obs.reshape(-1, *self.obs_shape).float() / 255.0 - 0.5
        return self.linear(self.convs(x).flatten(1)).reshape(*lead, self.out_dim)


class ImageDecoder(nn.Module):
    """Features ``(..., feat)`` -> frames ``(..., C, H, W)`` in the encoder's ``x / 255 - 0.5`` space:
    a linear layer to the encoder's last grid, then the encoder's convolutions transposed (output
    padding so any frame size the encoder takes comes back exactly). Loss: squared error summed over
    pixels (DreamerV3's image loss)."""

    def __init__(self, obs_shape: tuple[int, ...], feat: int, widths: list[int]) -> None:
        super().__init__()
        channels, height, width = obs_shape
        self.obs_shape = tuple(obs_shape)
        grids = _conv_grid(height, width)
        self.grid, self.depth = grids[-1], widths[-1]
        self.linear = nn.Sequential(nn.Linear(feat, self.depth * self.grid[0] * self.grid[1]), nn.SiLU())
        layers: list[nn.Module] = []
        plan = _conv_plan(channels, widths)
        for i in reversed(range(len(plan))):
            c_in, c_out, k, s = plan[i]
            (h_in, w_in), (h_out, w_out) = grids[i + 1], grids[i]
            pad = (h_out - ((h_in - 1) * s + k), w_out - ((w_in - 1) * s + k))
            layers.append(nn.ConvTranspose2d(c_out, c_in, k, s, output_padding=pad))
            if i > 0:
                layers.append(nn.SiLU())
        self.deconvs = nn.Sequential(*layers)

    def forward(self, feat: Tensor) -> Tensor:
        lead = feat.shape[:-1]
        x = self.linear(feat.reshape(-1, feat.shape[-1])).view(-1, self.depth, *self.grid)
        return self.deconvs(x).reshape(*lead, *self.obs_shape)

    def loss(self, pred: Tensor, obs: Tensor) -> Tensor:
        """``(...)``: squared error against ``obs (..., C, H, W)`` (0..255), summed over pixels."""
        target = obs.float() / 255.0 - 0.5
        return (pred - target).pow(2).flatten(-len(self.obs_shape)).sum(-1)

    def observation(self, pred: Tensor) -> Tensor:
        """Decoded frames ``(..., C, H, W)`` as float pixel values in ``[0, 255]``."""
        return ((pred + 0.5) * 255.0).clamp(0.0, 255.0)


def _conv_plan(channels: int, widths: list[int]) -> list[tuple[int, int, int, int]]:
    """NatureCNN's convolutions as ``(in channels, out channels, kernel, stride)``."""
    c1, c2, c3 = widths
    return [(channels, c1, 8, 4), (c1, c2, 4, 2), (c2, c3, 3, 1)]


def _conv_grid(height: int, width: int) -> list[tuple[int, int]]:
    """Spatial sizes before and after each of :func:`_conv_plan`'s convolutions (84 -> 20 -> 9 -> 7)."""
    grids = [(height, width)]
    for _, _, k, s in _conv_plan(1, [1, 1, 1]):
        h, w = grids[-1]
        grids.append(((h - k) // s + 1, (w - k) // s + 1))
    if min(grids[-1]) < 1:
        raise UserError(f"dreamer: frames of {height}x{width} are too small for the CNN encoder (at least 36x36)")
    return grids


Encoder = VectorEncoder | ImageEncoder
Decoder = VectorDecoder | ImageDecoder


def make_encoder(obs_shape: tuple[int, ...], units: int, layers: int, widths: list[int], features: int) -> Encoder:
    """The encoder for ``obs_shape``: an MLP of ``layers`` x ``units`` for flat vectors, a CNN
    (``widths`` channels, ``features`` out) for stacked frames ``(C, H, W)``."""
    if len(obs_shape) == 1:
        return VectorEncoder(obs_shape, units, layers)
    if len(obs_shape) == 3:
        return ImageEncoder(obs_shape, widths, features)
    raise UserError(f"dreamer: observations of shape {obs_shape} are not supported (flat vectors or (C, H, W) frames)")


def make_decoder(obs_shape: tuple[int, ...], feat: int, units: int, layers: int, widths: list[int]) -> Decoder:
    """The decoder for ``obs_shape``, the mirror of :func:`make_encoder`."""
    if len(obs_shape) == 1:
        return VectorDecoder(obs_shape, feat, units, layers)
    if len(obs_shape) == 3:
        return ImageDecoder(obs_shape, feat, widths)
    raise UserError(f"dreamer: observations of shape {obs_shape} are not supported (flat vectors or (C, H, W) frames)")


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


Actor = BoundedGaussianActor | CategoricalActor


def make_actor(action: ActionSpec, feat: int, units: int, layers: int) -> Actor:
    """The policy head for ``action``: a bounded Gaussian for ``box``, a categorical over one-hot
    actions for ``discrete``; both with the same ``sample``/``mode``/``log_prob_entropy``."""
    if action.kind == "box":
        return BoundedGaussianActor(feat, action.dim, units, layers)
    if action.kind == "discrete":
        return CategoricalActor(feat, action.dim, units, layers)
    raise UserError(f"dreamer: {action.kind!r} action spaces are not supported (Box or Discrete actions)")
