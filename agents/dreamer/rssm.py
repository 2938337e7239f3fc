"""The recurrent state-space model: a LayerNorm GRU deterministic state and a categorical stochastic state.

A state is a dict ``{"deter": (B, deter), "stoch": (B, groups, classes)}`` (one-hot samples,
straight-through gradients); ``feat(state)`` is ``(B, deter + groups * classes)``.
"""

from __future__ import annotations

import torch
from torch import Tensor, nn

from agents.dreamer.math import sample_straight_through, unimix_logits
from agents.dreamer.networks import mlp

State = dict[str, Tensor]


class LayerNormGRUCell(nn.Module):
    """GRU cell with one fused Linear and a LayerNorm on its gates (DreamerV3's recurrent core)."""

    def __init__(self, inp: int, size: int) -> None:
        super().__init__()
        self.size = size
        self.linear = nn.Linear(inp + size, 3 * size, bias=False)
        self.norm = nn.LayerNorm(3 * size)

    def forward(self, x: Tensor, h: Tensor) -> Tensor:
        """``x (B, inp)``, ``h (B, size)`` -> new ``h (B, size)``."""
        reset, cand, update = self.norm(self.linear(torch.cat([x, h], -1))).chunk(3, -1)
        reset = torch.sigmoid(reset)
        cand = torch.tanh(reset * cand)
        update = torch.sigmoid(update - 1.0)
        return update * cand + (1 - update) * h


class RSSM(nn.Module):
    def __init__(self, embed: int, act_dim: int, deter: int, groups: int, classes: int, units: int, unimix: float):
        super().__init__()
        self.deter, self.groups, self.classes, self.unimix = deter, groups, classes, unimix
        self.feat_dim = deter + groups * classes
        self.img_in = mlp(groups * classes + act_dim, units, 1)
        self.gru = LayerNormGRUCell(units, deter)
        self.prior_net = mlp(deter, units, 1, groups * classes)
        self.post_net = mlp(deter + embed, units, 1, groups * classes)

    def initial(self, batch: int, device: torch.device) -> State:
        """The all-zeros state of ``batch`` streams (the start of every episode)."""
        return {
            "deter": torch.zeros(batch, self.deter, device=device),
            "stoch": torch.zeros(batch, self.groups, self.classes, device=device),
        }

    @staticmethod
    def feat(state: State) -> Tensor:
        """``(..., deter + groups * classes)`` features the heads read."""
        return torch.cat([state["deter"], state["stoch"].flatten(-2)], -1)

    def _logits(self, net: nn.Module, x: Tensor) -> Tensor:
        return unimix_logits(net(x).reshape(-1, self.groups, self.classes), self.unimix)

    def img_step(self, state: State, action: Tensor, gen: torch.Generator | None) -> tuple[State, Tensor]:
        """Prior step: ``state``, ``action (B, act)`` -> (next prior state, prior logits ``(B, G, K)``)."""
        deter = self._deter(state, action)
        logits = self._logits(self.prior_net, deter)
        return {"deter": deter, "stoch": sample_straight_through(logits, gen)}, logits

    def _deter(self, state: State, action: Tensor) -> Tensor:
        return self.gru(self.img_in(torch.cat([state["stoch"].flatten(1), action], -1)), state["deter"])

    def observe_deter(self, deter: Tensor, embed: Tensor, gen: torch.Generator | None) -> tuple[State, Tensor]:
        """Posterior on a given ``deter (B, D)`` and ``embed (B, E)`` -> (state, posterior logits)."""
        logits = self._logits(self.post_net, torch.cat([deter, embed], -1))
        return {"deter": deter, "stoch": sample_straight_through(logits, gen)}, logits

    def start(self, embed: Tensor, gen: torch.Generator | None) -> State:
        """Posterior state of a first observation ``embed (B, E)`` from the zero deterministic state."""
        deter = torch.zeros(embed.shape[0], self.deter, device=embed.device, dtype=embed.dtype)
        return self.observe_deter(deter, embed, gen)[0]

    def obs_step(
        self, state: State, action: Tensor, embed: Tensor, gen: torch.Generator | None
    ) -> tuple[State, Tensor, Tensor]:
        """Filter step: ``state``, ``action (B, act)``, next ``embed (B, E)`` ->
        (posterior state, posterior logits, prior logits), logits ``(B, G, K)``."""
        deter = self._deter(state, action)
        prior_logits = self._logits(self.prior_net, deter)
        post, post_logits = self.observe_deter(deter, embed, gen)
        return post, post_logits, prior_logits
