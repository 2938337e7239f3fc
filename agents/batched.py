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
        return linear(x, self.weight, self.bias)


def linear(x: Tensor, weight: Tensor, bias: Tensor) -> Tensor:
    """``R`` independent linear layers: ``x (R, B, in)``, ``weight (R, in, out)``, ``bias (R, 1, out)``
    -> ``(R, B, out)``."""
    if weight.shape[2] == 1 and x.shape[1] >= 32:
        # A (B, in) @ (in, 1) product per member is a slow batched-matmul shape on CPU for
        # training batches; a broadcast multiply and a sum do the same arithmetic several times
        # faster. For a few rows (acting) one baddbmm call is cheaper than three.
        return (x * weight.transpose(1, 2)).sum(-1, keepdim=True) + bias
    return torch.baddbmm(bias, x, weight)


def mlp(x: Tensor, layers: Sequence[Sequence[Tensor]]) -> Tensor:
    """The forward pass of :class:`BatchedMLP` on explicit ``[weight, bias]`` pairs (e.g. views of a
    :class:`FlatParameters`): ``(R, B, in) -> (R, B, out)``, ReLU between layers."""
    for weight, bias in layers[:-1]:
        x = linear(x, weight, bias).relu_()
    weight, bias = layers[-1]
    return linear(x, weight, bias)


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

    def neuron_groups(self) -> list[list[Tensor]]:
        """``[weight (P, in, out), bias (P, 1, out)]`` per layer: the tensors of one layer's neurons
        (what ``PopulationAgent.actor_layers`` returns for crossover)."""
        layers: list[BatchedLinear] = list(self.layers)  # type: ignore[arg-type]
        return [[layer.weight, layer.bias] for layer in layers]


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

    def _clip_scale(self, norms: Tensor) -> Tensor:
        """Per-member gradient factor ``(P,)`` of the norm clip (ones without clipping)."""
        if self.max_grad_norm > 0:
            return (self.max_grad_norm / (norms + 1e-6)).clamp(max=1.0)
        return torch.ones_like(norms)

    def _advance(self) -> tuple[Tensor, Tensor]:
        """Count one step; returns per-member ``(step_size, correction2)``, each ``(P,)``."""
        beta1, beta2 = self.betas
        self.step_count += 1
        # Bias corrections in double precision, like torch.optim.Adam: in float32, 1 - 0.999**t is
        # off by ~1e-5 relative for small t (0.999 is not exact in float32).
        steps = self.step_count.double()
        correction1 = (1 - beta1**steps).to(self.lr.dtype)
        correction2 = (1 - beta2**steps).to(self.lr.dtype)
        return self.lr / correction1, correction2

    @torch.no_grad()
    def step(self) -> Tensor:
        """Apply one update to every member; returns the per-member grad norm ``(P,)`` before clipping."""
        norms = self.grad_norms()
        scale = self._clip_scale(norms)
        beta1, beta2 = self.betas
        step_size, correction2 = self._advance()
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


class FlatParameters:
    """The parameters of ``G`` same-shaped :class:`BatchedMLP` s of ``P`` members in one ``(G * P, N)``
    tensor ``flat``, module ``g`` in rows ``g * P .. (g + 1) * P`` and each parameter in its own
    columns. The modules' parameters become views of their rows (same names, shapes and values), so
    everything that uses the modules (and member row copies) works unchanged, while a whole group
    can step in a few tensor ops and twin networks can run as one batched network of ``G * P`` rows.

    The modules must not be moved (``.to``) afterwards: that would replace the views with copies.
    """

    def __init__(self, modules: Sequence[nn.Module]) -> None:
        first = list(modules[0].parameters())
        self.population, self.groups = first[0].shape[0], len(modules)
        self.shapes = [tuple(p.shape[1:]) for p in first]
        sizes = [math.prod(shape) for shape in self.shapes]
        self.columns = [(sum(sizes[:i]), sum(sizes[: i + 1])) for i in range(len(sizes))]
        self.flat = torch.empty(self.groups * self.population, sum(sizes), dtype=first[0].dtype, device=first[0].device)
        self.parameters: list[nn.Parameter] = []
        """Every module's parameters, module by module: the views, in ``module.parameters()`` order."""
        for g, module in enumerate(modules):
            named = list(module.named_parameters())
            if [tuple(p.shape) for _, p in named] != [(self.population, *s) for s in self.shapes]:
                raise ValueError("FlatParameters needs modules of identical parameter shapes")
            for (name, p), view in zip(named, self.views(self.flat, g), strict=True):
                owner, _, attr = name.rpartition(".")
                view.copy_(p.detach())
                alias = nn.Parameter(view, requires_grad=p.requires_grad)
                setattr(module.get_submodule(owner), attr, alias)
                self.parameters.append(alias)

    def views(self, tensor: Tensor, group: int | None = None) -> list[Tensor]:
        """Per-parameter views of a ``(G * P, N)`` tensor laid out like ``flat``: ``(P, *shape)`` of
        module ``group``'s rows, or ``(G * P, *shape)`` of all rows when ``group`` is None."""
        rows = slice(None) if group is None else slice(group * self.population, (group + 1) * self.population)
        return [tensor[rows, a:b].view(-1, *shape) for (a, b), shape in zip(self.columns, self.shapes, strict=True)]

    def member_views(self, tensor: Tensor) -> list[Tensor]:
        """Every module's ``(P, *shape)`` views of ``tensor``, module by module (like :attr:`parameters`)."""
        return [view for g in range(self.groups) for view in self.views(tensor, g)]

    def layers(self, tensor: Tensor, group: int | None = None) -> list[list[Tensor]]:
        """:meth:`views` as ``[weight, bias]`` pairs, one per layer, for :func:`mlp`."""
        views = self.views(tensor, group)
        return [views[i : i + 2] for i in range(0, len(views), 2)]

    def leaves(self) -> list[Tensor]:
        """Fresh autograd leaves viewing all ``G * P`` rows of ``flat``, one per parameter ``(G * P, *shape)``,
        for gradients by ``torch.autograd.grad`` (the module parameters' ``.grad`` is not touched)."""
        return [view.detach().requires_grad_(True) for view in self.views(self.flat)]

    @staticmethod
    def gather(grads: Sequence[Tensor]) -> Tensor:
        """Per-parameter ``(G * P, *shape)`` gradients -> one ``(G * P, N)`` tensor laid out like ``flat``."""
        return torch.cat([g.reshape(g.shape[0], -1) for g in grads], dim=1)


class FlatAdam(BatchedAdam):
    """:class:`BatchedAdam` over a :class:`FlatParameters`: the moments are ``(G * P, N)`` tensors and
    ``exp_avg``/``exp_avg_sq`` their per-parameter views, so ``state_tensors()`` (names, shapes) and the
    per-parameter :meth:`step` are unchanged; :meth:`fused_step` does the same update in a few ops on
    the flat tensors. ``lr`` and ``step`` stay ``(P,)``: the ``G`` modules of a member share them."""

    def __init__(
        self,
        flat: FlatParameters,
        lr: Tensor,
        betas: tuple[float, float] = (0.9, 0.999),
        eps: float = 1e-8,
        max_grad_norm: float = 0.0,
    ) -> None:
        super().__init__(flat.parameters, lr, betas, eps, max_grad_norm)
        self.flat = flat
        self.flat_exp_avg = torch.zeros_like(flat.flat)
        self.flat_exp_avg_sq = torch.zeros_like(flat.flat)
        self.exp_avg = flat.member_views(self.flat_exp_avg)
        self.exp_avg_sq = flat.member_views(self.flat_exp_avg_sq)

    @torch.no_grad()
    def fused_step(self, grad: Tensor) -> Tensor:
        """One update from ``grad`` ``(G * P, N)`` (laid out like ``flat``); returns the per-member
        grad norm ``(P,)`` before clipping. Elementwise it is exactly :meth:`step`."""
        groups = self.flat.groups
        norms = grad.square().view(groups, self.flat.population, -1).sum(2).sum(0).sqrt()
        if self.max_grad_norm > 0:
            grad = grad * self._clip_scale(norms).repeat(groups)[:, None]
        beta1, beta2 = self.betas
        step_size, correction2 = self._advance()
        m, v = self.flat_exp_avg, self.flat_exp_avg_sq
        m.lerp_(grad, 1 - beta1)
        v.mul_(beta2).addcmul_(grad, grad, value=1 - beta2)
        denom = (v / correction2.repeat(groups)[:, None]).sqrt_().add_(self.eps)
        self.flat.flat.addcdiv_(m * step_size.repeat(groups)[:, None], denom, value=-1.0)
        return norms
