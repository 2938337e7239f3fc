"""The contract every population of actor-critic members fulfils.

The training loop knows only this interface, so another actor-critic variant (SAC, ...)
is a new subclass registered in ``agents.ALGORITHMS``, not a change to the loop.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from collections.abc import Callable, Sequence
from typing import ClassVar, NamedTuple, Protocol

import numpy as np
import torch
from torch import Tensor, nn


class Batch(NamedTuple):
    """One micro-batch per member, drawn independently from the shared replay.

    Shapes: ``obs``/``next_obs`` ``(P, B, obs_dim)``, ``action`` ``(P, B, act_dim)`` in
    ``[-1, 1]`` (one-hot rows of width ``act_dim = n`` for ``Discrete(n)`` actions),
    ``reward``/``terminated`` ``(P, B)`` float. Time-limit truncations are not terminal: they
    bootstrap like any other non-terminal step.
    """

    obs: Tensor
    action: Tensor
    reward: Tensor
    next_obs: Tensor
    terminated: Tensor


def device_dtype(values: np.ndarray | Tensor) -> torch.dtype:
    """The dtype a sampled field takes to the device: uint8 frames stay uint8 (compact until the
    encoder scales them), everything else becomes float32."""
    return torch.uint8 if values.dtype in (np.uint8, torch.uint8) else torch.float32


class PopulationAgent(nn.Module, ABC):
    """``P`` members computed together; every member tensor has a leading ``P`` axis.

    Subclasses keep per-member hyperparameters in ``self.hyperparameters`` (name -> ``(P,)``
    tensor) and must list every row-owning tensor in :meth:`member_tensors` so evolution and
    checkpoints can copy and restore members without knowing the algorithm.
    """

    ACTION_KIND: ClassVar[str] = "box"
    """The action spaces the algorithm serves: ``"box"`` (continuous, normalised to ``[-1, 1]``) or
    ``"discrete"`` (one-hot rows)."""
    IMAGES: ClassVar[bool] = False
    """Whether the algorithm has a CNN member for frame-stack observations ``(stack, H, W)`` uint8."""
    HYPERPARAMETERS: ClassVar[tuple[str, ...]] = ()
    """Per-member hyperparameters, each starting at ``agent.<name>`` and evolved within
    ``evolution.<name>_bounds``; ``self.hyperparameters`` holds exactly these."""
    EXPLORATION_ONLY: ClassVar[tuple[str, ...]] = ()
    """Those of :attr:`HYPERPARAMETERS` that only shape exploration steps (not evolved without them)."""

    population: int
    hyperparameters: dict[str, Tensor]
    leaked_losses: list[Tensor] | None = None
    """Debug only (``memory.inject_leak``): when a list, updates append every loss tensor with
    its autograd graph, reproducing MEMORY.md incident 1 so the leak sentinel can be shown to work."""

    def _apply(self, fn: Callable[..., object], recurse: bool = True) -> PopulationAgent:  # type: ignore[override]
        """``.to()``, ``.cuda()``, ``.float()`` and the like: refused. They would move the registered
        parameters only, leaving behind the optimizer moments, the hyperparameter tensors and the flat
        storage the parameters are views of, so the members would silently stop learning."""
        raise RuntimeError(
            f"a {type(self).__name__} cannot be moved or cast after it is built (its optimizer state, "
            "hyperparameters and flat parameter storage would stay behind); build it on its device: "
            "make_population(..., device)"
        )

    @classmethod
    def evolved_hyperparameters(cls, explores: bool) -> tuple[str, ...]:
        """The hyperparameters evolution changes: all of them, less :attr:`EXPLORATION_ONLY` when no
        exploration steps are taken (``explores`` False), where those have no effect."""
        return tuple(name for name in cls.HYPERPARAMETERS if explores or name not in cls.EXPLORATION_ONLY)

    @abstractmethod
    def act(self, obs: Tensor, explore: bool, noise: Tensor | None = None) -> Tensor:
        """act(obs (P, N, obs_dim), explore) -> actions (P, N, act_dim) in [-1, 1], no graph.

        ``noise (P, N, act_dim)``: uniform draws in ``[0, 1)`` that exploration uses instead of torch's
        global generator (rollouts pass per-stream draws, so actions do not depend on which process
        plays which streams); None: draws from the global generator."""
        raise NotImplementedError("act(obs (P, N, obs_dim), explore) -> actions (P, N, act_dim)")

    @abstractmethod
    def update(self, batches: Sequence[Batch]) -> dict[str, list[float]]:
        """One optimizer step per member accumulating ``len(batches)`` micro-batches.

        Returns metric name -> P Python floats. No tensor of the step survives it.
        """
        raise NotImplementedError("update(batches) -> {metric: [P floats]}")

    @abstractmethod
    def actor_parameters(self) -> list[Tensor]:
        """The ``(P, ...)`` policy parameters that evolution mutates and crosses over."""
        raise NotImplementedError("actor_parameters() -> [(P, ...) tensors]")

    def actor_layers(self) -> list[list[Tensor]]:
        """:meth:`actor_parameters` grouped by layer: the tensors of one group share their last
        axis, the layer's output neurons (e.g. ``[weight (P, in, out), bias (P, 1, out)]``), so
        crossover can take each neuron whole from one parent. By default every tensor is its own group."""
        return [[p] for p in self.actor_parameters()]

    @abstractmethod
    def member_tensors(self) -> dict[str, Tensor]:
        """Every tensor whose row ``i`` belongs to member ``i``: parameters, targets,
        optimizer state and hyperparameters. Copying all rows copies the member whole."""
        raise NotImplementedError("member_tensors() -> {name: (P, ...) tensor}")

    def extra_state(self) -> dict[str, int | float]:
        """Population-wide counters (JSON-serialisable) that a checkpoint must keep."""
        return {}

    def load_extra_state(self, state: dict[str, int | float]) -> None:
        """Restore what :meth:`extra_state` returned."""

    @torch.no_grad()
    def copy_member(self, dst: int, src: int) -> None:
        """Overwrite member ``dst`` with member ``src`` in every member tensor."""
        for tensor in self.member_tensors().values():
            tensor[dst] = tensor[src]

    @torch.no_grad()
    def load_member_tensors(self, tensors: dict[str, Tensor]) -> None:
        """Copy saved tensors in place (optimizers keep references to these objects)."""
        own = self.member_tensors()
        missing = sorted(set(own) - set(tensors))
        if missing:
            raise ValueError(f"checkpoint lacks member tensor {missing[0]!r}")
        for name, tensor in own.items():
            if tensors[name].shape != tensor.shape:
                raise ValueError(
                    f"member tensor {name!r} has shape {tuple(tensors[name].shape)}, expected {tuple(tensor.shape)}"
                )
            tensor.copy_(tensors[name])


class Optimizer(Protocol):
    """What :func:`twin_critic_step` needs of a population optimizer (``BatchedAdam``, ``FlatAdam``)."""

    def zero_grad(self) -> None: ...

    def step(self) -> Tensor: ...


def twin_critic_step(
    agent: PopulationAgent,
    batches: Sequence[Batch],
    optimizer: Optimizer,
    twin_q: Callable[[Batch], tuple[Tensor, Tensor]],
    target: Callable[[Batch], Tensor],
) -> dict[str, list[float]]:
    """One optimizer step of twin critics accumulating ``len(batches)`` micro-batches: the sum of both
    critics' mean squared error against ``target(batch) (P, B)`` (no graph), where ``twin_q(batch)``
    gives both critics' values ``(P, B)`` of the stored actions. Returns per-member floats:
    ``critic_loss``, ``q_mean`` (first critic) and ``critic_grad_norm``."""
    optimizer.zero_grad()
    loss_sum = torch.zeros(agent.population, device=batches[0].obs.device)
    q_sum = torch.zeros_like(loss_sum)
    for batch in batches:
        goal = target(batch)
        q1, q2 = twin_q(batch)
        loss = (q1 - goal).pow(2).mean(1) + (q2 - goal).pow(2).mean(1)  # (P,)
        # Members own disjoint parameters, so the sum's gradient is each member's own.
        (loss.sum() / len(batches)).backward(retain_graph=agent.leaked_losses is not None)
        if agent.leaked_losses is not None:
            agent.leaked_losses.append(loss)
        loss_sum += loss.detach()
        q_sum += q1.detach().mean(1)
    grad_norm = optimizer.step()
    k = len(batches)
    return {
        "critic_loss": (loss_sum / k).tolist(),
        "q_mean": (q_sum / k).tolist(),
        "critic_grad_norm": grad_norm.tolist(),
    }
