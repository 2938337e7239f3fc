"""Evolution between generations: elites, tournament selection, crossover, mutation, and
PBT-style perturbation of per-member hyperparameters.

A replaced member first becomes a full copy of its parent (actor, critics, targets,
optimizer state, hyperparameters: every row of ``agent.member_tensors()``), so no member
ever starts from scratch by accident; then its actor is crossed over and mutated and its
hyperparameters perturbed or resampled.
"""

from __future__ import annotations

from typing import Any

import numpy as np
import torch

from agents import PopulationAgent
from config import EvolutionConfig

ANCESTRY_KEPT = 5
"""Ancestor ids remembered per member (bounded, so memory stays flat over long runs)."""


COMPLEMENTED = frozenset({"gamma"})
"""Hyperparameters searched as ``1 - value``: a discount is a horizon, ``1 / (1 - gamma)``, so
x0.8 / x1.25 move 0.99 to 0.9875 / 0.992, not to the bounds."""


def to_search(name: str, value: float) -> float:
    """A hyperparameter's value in the positive space where evolution multiplies and samples."""
    return 1.0 - value if name in COMPLEMENTED else value


def from_search(name: str, value: float) -> float:
    """Inverse of :func:`to_search`."""
    return 1.0 - value if name in COMPLEMENTED else value


class Evolution:
    def __init__(
        self, cfg: EvolutionConfig, population: int, seed: int, evolved: tuple[str, ...] | None = None
    ) -> None:
        """``evolved`` names the hyperparameters children perturb or resample (default: every one in
        ``agent.hyperparameters``, e.g. from ``PopulationAgent.evolved_hyperparameters``); the others
        are inherited from the parent unchanged. Each needs ``cfg.<name>_bounds``."""
        self.cfg = cfg
        self.evolved = evolved
        self.population = population
        self.rng = np.random.default_rng(seed)
        self.mutation_scale = cfg.mutation_scale
        self.member_ids = list(range(population))
        self.next_id = population
        self.ancestry: list[list[int]] = [[] for _ in range(population)]
        self.pending: list[tuple[int, float]] = []  # (child slot, parent fitness) for the 1/5th rule
        self.elite_slots: list[int] = []
        """The slots the last :meth:`evolve` kept as elites (unchanged members)."""

    def evolve(self, agent: PopulationAgent, fitness: np.ndarray, generation: int) -> list[dict[str, Any]]:
        """Replace the worst members by mutated children of tournament winners, in place.

        ``fitness`` has shape ``(P,)``; ``-inf`` (or NaN) marks a diverged member. Returns one
        lineage record per replaced member.
        """
        self._adapt_mutation_scale(fitness)
        survivors, losers = self.select(fitness)
        self.elite_slots = [s for s in survivors[: self.cfg.elites] if np.isfinite(fitness[s])]
        events = []
        for child in losers:
            parent = self._tournament(survivors, fitness)
            agent.copy_member(child, parent)
            second = None
            if self.rng.random() < self.cfg.crossover_prob and len(survivors) > 1:
                second = self._tournament([s for s in survivors if s != parent], fitness)
                self._crossover(agent, child, second)
            self._mutate(agent, child)
            change = self._change_hyperparameters(agent, child)
            events.append(self._record(generation, child, parent, second, fitness, change, agent))
            self.pending.append((child, float(fitness[parent])))
        return events

    def select(self, fitness: np.ndarray) -> tuple[list[int], list[int]]:
        """Split the slots into survivors (parents-to-be) and losers (to be replaced).

        The ``elites`` best finite members always survive; ``replace_fraction`` of the population
        (rounded half up) is replaced worst first, and so is every non-finite member, which can
        therefore never be a parent. With no finite member at all nothing is replaced.
        """
        finite = np.isfinite(fitness)
        if not finite.any():
            return list(range(self.population)), []
        ranked = np.where(finite, fitness, -np.inf)
        order = [int(i) for i in np.argsort(-ranked, kind="stable")]
        elites = min(self.cfg.elites, int(finite.sum()))
        wanted = max(int(np.floor(self.cfg.replace_fraction * self.population + 0.5)), int((~finite).sum()))
        replace = min(wanted, self.population - elites)
        keep = self.population - replace
        return order[:keep], order[keep:]

    # ------------------------------------------------------------ operators

    def _tournament(self, candidates: list[int], fitness: np.ndarray) -> int:
        size = min(self.cfg.tournament_size, len(candidates))
        drawn = self.rng.choice(candidates, size=size, replace=False)
        return int(drawn[np.argmax(fitness[drawn])])

    @torch.no_grad()
    def _crossover(self, agent: PopulationAgent, child: int, other: int) -> None:
        """Uniform crossover per output neuron: one draw per neuron of each layer, so a neuron's
        incoming weights and its bias come whole from the same parent."""
        for layer in agent.actor_layers():
            take = self.rng.random(layer[0].shape[-1]) < 0.5
            mask = torch.as_tensor(take, device=layer[0].device)
            for param in layer:
                param[child] = torch.where(mask, param[other], param[child])

    @torch.no_grad()
    def _mutate(self, agent: PopulationAgent, child: int) -> None:
        """Gaussian noise on a random ``mutation_fraction`` of each actor tensor's entries,
        scaled by ``mutation_scale`` times that tensor's std."""
        if self.mutation_scale <= 0 or self.cfg.mutation_fraction <= 0:
            return
        for param in agent.actor_parameters():
            row = param[child]
            shape = tuple(row.shape)
            touched = self.rng.random(shape) < self.cfg.mutation_fraction
            noise = self.rng.standard_normal(shape) * touched
            scale = self.mutation_scale * float(row.std()) if row.numel() > 1 else self.mutation_scale
            param[child] += torch.as_tensor(noise * scale, dtype=param.dtype, device=param.device)

    def _change_hyperparameters(self, agent: PopulationAgent, child: int) -> str:
        """Perturb (multiply by one of ``perturb_factors``) or resample (log-uniform within bounds)
        every hyperparameter, in its search space (see :func:`to_search`), then clip to bounds."""
        perturb = self.rng.random() < self.cfg.perturb_prob
        for name in agent.hyperparameters if self.evolved is None else self.evolved:
            low, high = sorted(to_search(name, b) for b in getattr(self.cfg, f"{name}_bounds"))
            value = to_search(name, float(agent.hyperparameters[name][child]))
            if perturb:
                value *= float(self.rng.choice(self.cfg.perturb_factors))
            else:
                value = float(np.exp(self.rng.uniform(np.log(low), np.log(high))))
            agent.hyperparameters[name][child] = from_search(name, min(max(value, low), high))
        return "perturbed" if perturb else "resampled"

    def _adapt_mutation_scale(self, fitness: np.ndarray) -> None:
        """1/5th success rule over the children made last generation."""
        if self.cfg.adaptive_mutation and self.pending:
            success = np.mean([fitness[child] > parent_fit for child, parent_fit in self.pending])
            factor = 1.22 if success > 0.2 else 1 / 1.22
            self.mutation_scale = float(np.clip(self.mutation_scale * factor, 1e-4, 1.0))
        self.pending = []

    # ------------------------------------------------------------ lineage

    def _record(
        self,
        generation: int,
        child: int,
        parent: int,
        second: int | None,
        fitness: np.ndarray,
        change: str,
        agent: PopulationAgent,
    ) -> dict[str, Any]:
        parent_id = self.member_ids[parent]
        self.ancestry[child] = ([*self.ancestry[parent], parent_id])[-ANCESTRY_KEPT:]
        self.member_ids[child] = self.next_id
        self.next_id += 1
        return {
            "generation": generation,
            "slot": child,
            "id": self.member_ids[child],
            "replaced_fitness": float(fitness[child]),
            "parent": parent_id,
            "parent_fitness": float(fitness[parent]),
            "second_parent": None if second is None else self.member_ids[second],
            "mutation_scale": self.mutation_scale,
            "hyperparameters": change,
            **{name: float(hp[child]) for name, hp in agent.hyperparameters.items()},
        }

    def lineage(self, slot: int) -> str:
        """``id <- parent <- grandparent ...`` for the member in ``slot``."""
        return " <- ".join(str(i) for i in [self.member_ids[slot], *reversed(self.ancestry[slot])])

    # ------------------------------------------------------------ checkpoint state

    def state(self) -> dict[str, Any]:
        return {
            "rng": self.rng.bit_generator.state,
            "mutation_scale": self.mutation_scale,
            "member_ids": self.member_ids,
            "next_id": self.next_id,
            "ancestry": self.ancestry,
            "pending": self.pending,
            "elite_slots": self.elite_slots,
        }

    def load_state(self, state: dict[str, Any]) -> None:
        self.rng.bit_generator.state = state["rng"]
        self.mutation_scale = float(state["mutation_scale"])
        self.member_ids = [int(i) for i in state["member_ids"]]
        self.next_id = int(state["next_id"])
        self.ancestry = [[int(i) for i in a] for a in state["ancestry"]]
        self.pending = [(int(c), float(f)) for c, f in state["pending"]]
        self.elite_slots = [int(i) for i in state.get("elite_slots", [])]  # absent before screening existed
