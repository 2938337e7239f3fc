"""A population of CNN encoders: every member its own NatureCNN-shaped encoder of stacked frames.

Member ``p`` owns row ``p`` of every parameter (``weight (P, out, in, k, k)``, ``bias (P, out)``, the
linear layer's ``(P, in, out)``), so evolution and checkpoints treat the encoder like any other
member tensor. Frames arrive as uint8 and become floats in ``[0, 1]`` here, on the parameters' device.

Two ways to run the ``P`` encoders compute the same function on the same parameters (a test checks
they agree): one grouped convolution per layer (``groups=P``, the members' channels side by side: one
kernel per layer whatever ``P``; the default everywhere) and a loop over members (one ordinary
convolution per member and layer). ``benchmarks/pixels.py`` on a busy 2-core CPU at P=16, batch 32:
the loop 0.83x the grouped time on one thread but 5.4x on two (its many small ops stall on a
descheduled thread), ``torch.func.vmap`` 1.27x and 1.09x (it lowers to the same grouped convolution
plus its own overhead, so it is never the better choice). One mode for acting and learning on every
device also keeps a member's actions the same whichever process and thread count computes them.
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Sequence

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from agents.batched import BatchedLinear

KERNELS = (8, 4, 3)
STRIDES = (4, 2, 1)
"""NatureCNN's geometry (Mnih et al. 2015); the channel widths and feature size are configurable."""


def conv_output_size(size: int, layers: int = len(KERNELS)) -> int:
    """Side of the last feature map for an input side ``size`` (0 when the frame is too small)."""
    for kernel, stride in zip(KERNELS[:layers], STRIDES[:layers], strict=True):
        size = (size - kernel) // stride + 1 if size >= kernel else 0
    return max(size, 0)


class BatchedCNN(nn.Module):
    """``P`` encoders ``(P, B, C, H, W)`` uint8 -> ``(P, B, features)`` float32: three convolutions
    (``channels`` wide, kernels 8/4/3, strides 4/2/1) and a linear layer, ReLU after each.

    ``grouped`` False runs the per-member loop instead of the grouped convolution (the benchmark's
    and the tests' reference).
    ``amp`` runs the forward under bf16 autocast (CUDA only); the features come back float32.
    """

    def __init__(
        self,
        population: int,
        frame_shape: Sequence[int],
        channels: Sequence[int] = (32, 64, 64),
        features: int = 512,
        grouped: bool = True,
        amp: bool = False,
    ) -> None:
        super().__init__()
        in_channels, height, width = (int(s) for s in frame_shape)
        side_h, side_w = conv_output_size(height), conv_output_size(width)
        if side_h < 1 or side_w < 1:
            raise ValueError(f"frames of {height}x{width} are too small for the NatureCNN geometry (>= 36x36)")
        self.population, self.grouped, self.amp = population, grouped, amp
        widths = [in_channels, *channels]
        self.weights = nn.ParameterList(
            nn.Parameter(torch.empty(population, out, inp, k, k))
            for inp, out, k in zip(widths[:-1], widths[1:], KERNELS, strict=True)
        )
        self.biases = nn.ParameterList(nn.Parameter(torch.empty(population, out)) for out in channels)
        self.linear = BatchedLinear(population, channels[-1] * side_h * side_w, features)
        self.reset_members(range(population))

    @torch.no_grad()
    def reset_members(self, members: Iterable[int]) -> None:
        """Re-initialise the given rows like ``nn.Conv2d`` does (uniform, fan-in scaled)."""
        members = list(members)
        for weight, bias in zip(self.weights, self.biases, strict=True):
            bound = 1.0 / math.sqrt(math.prod(weight.shape[2:]))
            for i in members:
                weight[i].uniform_(-bound, bound)
                bias[i].uniform_(-bound, bound)
        self.linear.reset_members(members)

    def forward(self, frames: Tensor) -> Tensor:
        """``frames (P, B, C, H, W)`` uint8 (or float in [0, 255]) -> features ``(P, B, features)`` float32."""
        with torch.autocast(frames.device.type, dtype=torch.bfloat16, enabled=self.amp):
            x = self._grouped(frames) if self.grouped else self._looped(frames)
            out = self.linear(x).relu_()
        return out.float()

    def _grouped(self, frames: Tensor) -> Tensor:
        """The convolutions as grouped ones over ``(B, P * C, H, W)``; returns ``(P, B, flat)``."""
        members, batch = frames.shape[:2]
        x = frames.transpose(0, 1).reshape(batch, -1, *frames.shape[3:]).float().div(255.0)
        for weight, bias, stride in zip(self.weights, self.biases, STRIDES, strict=True):
            x = F.conv2d(x, weight.flatten(0, 1), bias.flatten(), stride, groups=members).relu_()
        return x.reshape(batch, members, -1).transpose(0, 1)  # each member flattened as nn.Flatten does

    def _looped(self, frames: Tensor) -> Tensor:
        """One member at a time; returns ``(P, B, flat)``."""
        out = []
        for p in range(frames.shape[0]):
            x = frames[p].float().div(255.0)
            for weight, bias, stride in zip(self.weights, self.biases, STRIDES, strict=True):
                x = F.conv2d(x, weight[p], bias[p], stride).relu_()
            out.append(x.flatten(1))
        return torch.stack(out)
