"""Networks and an optimizer whose every tensor has a leading population axis ``P``.

One ``torch.baddbmm`` evaluates the same layer for all members at once; member ``i``
owns row ``i`` of every parameter and of every optimizer buffer, so evolution can copy,
mutate or overwrite a member by indexing rows. Nothing here mixes rows.
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Sequence

import torch
from torch import Tensor, nn


class BatchedLinear(nn.Module):
    """``P`` independent linear layers: ``(P, B, in) -> (P, B, out)``."""

    def __init__(self, population: int, in_features: int, out_features: int) -> None:
        super().__init__()
        self.weight = nn.Parameter(torch.empty(population, in_features, out_features))
        self.bias = nn.Parameter(torch.empty(population, 1, out_features))
        self.reset_members(range(population))

    @torch.no_grad()
    def reset_members(self, members: Iterable[int]) -> None:
        """Re-initialise the given rows like ``nn.Linear`` does (uniform, fan-in scaled)."""
        bound = 1.0 / math.sqrt(self.weight.shape[1])
        for i in members:
            self.weight[i].uniform_(-bound, bound)
            self.bias[i].uniform_(-bound, bound)

    def forward(self, x: Tensor) -> Tensor:
        if self.weight.shape[2] == 1 and x.shape[1] >= 32:
            # A (B, in) @ (in, 1) product per member is a slow batched-matmul shape on CPU for
            # training batches; a broadcast multiply and a sum do the same arithmetic several times
            # faster. For a few rows (acting) one baddbmm call is cheaper than three.
            return (x * self.weight.transpose(1, 2)).sum(-1, keepdim=True) + self.bias
        return torch.baddbmm(self.bias, x, self.weight)


class BatchedMLP(nn.Module):
    """``P`` independent MLPs with ReLU hidden layers: ``(P, B, in) -> (P, B, out)``."""

    def __init__(self, population: int, in_features: int, hidden: Sequence[int], out_features: int) -> None:
        super().__init__()
        sizes = [in_features, *hidden, out_features]
        self.layers = nn.ModuleList(
            BatchedLinear(population, a, b) for a, b in zip(sizes[:-1], sizes[1:], strict=False)
        )

    def forward(self, x: Tensor) -> Tensor:
        for layer in self.layers[:-1]:
            x = layer(x).relu_()
        out: Tensor = self.layers[-1](x)
        return out


def per_member(values: Tensor, like: Tensor) -> Tensor:
    """Reshape a ``(P,)`` tensor to broadcast against ``like`` of shape ``(P, ...)``."""
    return values.view(-1, *([1] * (like.dim() - 1)))


class BatchedAdam:
    """Adam with per-member learning rate, step count and moments.

    Every state tensor is ``(P, ...)`` shaped like its parameter, plus ``step`` of shape
    ``(P,)``, so a member's optimizer state is a row and travels with the member.
    ``lr`` is a ``(P,)`` tensor owned by the caller; changing a row changes that member's rate.
    """

    def __init__(
        self,
        params: Sequence[nn.Parameter],
        lr: Tensor,
        betas: tuple[float, float] = (0.9, 0.999),
        eps: float = 1e-8,
        max_grad_norm: float = 0.0,
    ) -> None:
        self.params = list(params)
        self.lr = lr
        self.betas = betas
        self.eps = eps
        self.max_grad_norm = max_grad_norm
        population = self.params[0].shape[0]
        self.step_count = torch.zeros(population, device=lr.device)
        self.exp_avg = [torch.zeros_like(p) for p in self.params]
        self.exp_avg_sq = [torch.zeros_like(p) for p in self.params]

    def zero_grad(self) -> None:
        for p in self.params:
            p.grad = None

    def grad_norms(self) -> Tensor:
        """Per-member gradient L2 norm over all parameters, shape ``(P,)``."""
        squares = [p.grad.pow(2).flatten(1).sum(1) for p in self.params if p.grad is not None]
        return torch.stack(squares).sum(0).sqrt()

    @torch.no_grad()
    def step(self) -> Tensor:
        """Apply one update to every member; returns the per-member grad norm ``(P,)`` before clipping."""
        norms = self.grad_norms()
        scale = torch.ones_like(norms)
        if self.max_grad_norm > 0:
            scale = (self.max_grad_norm / (norms + 1e-6)).clamp(max=1.0)
        beta1, beta2 = self.betas
        self.step_count += 1
        # Bias corrections in double precision, like torch.optim.Adam: in float32, 1 - 0.999**t is
        # off by ~1e-5 relative for small t (0.999 is not exact in float32).
        steps = self.step_count.double()
        correction1 = (1 - beta1**steps).to(self.lr.dtype)
        correction2 = (1 - beta2**steps).to(self.lr.dtype)
        step_size = self.lr / correction1
        for p, m, v in zip(self.params, self.exp_avg, self.exp_avg_sq, strict=True):
            if p.grad is None:
                continue
            grad = p.grad * per_member(scale, p)
            m.lerp_(grad, 1 - beta1)
            v.mul_(beta2).addcmul_(grad, grad, value=1 - beta2)
            denom = (v / per_member(correction2, v)).sqrt_().add_(self.eps)
            p.addcdiv_(m * per_member(step_size, p), denom, value=-1.0)
        return norms

    def state_tensors(self) -> dict[str, Tensor]:
        """Every state tensor by name; all have a leading ``P`` axis."""
        state = {"step": self.step_count}
        for i, (m, v) in enumerate(zip(self.exp_avg, self.exp_avg_sq, strict=True)):
            state[f"exp_avg.{i}"] = m
            state[f"exp_avg_sq.{i}"] = v
        return state
