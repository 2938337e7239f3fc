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
from config import HYPERPARAMETERS, EvolutionConfig

ANCESTRY_KEPT = 5
"""Ancestor ids remembered per member (bounded, so memory stays flat over long runs)."""


class Evolution:
    def __init__(self, cfg: EvolutionConfig, population: int, seed: int) -> None:
        self.cfg = cfg
        self.population = population
        self.rng = np.random.default_rng(seed)
        self.mutation_scale = cfg.mutation_scale
        self.member_ids = list(range(population))
        self.next_id = population
        self.ancestry: list[list[int]] = [[] for _ in range(population)]
        self.pending: list[tuple[int, float]] = []  # (child slot, parent fitness) for the 1/5th rule

    def evolve(self, agent: PopulationAgent, fitness: np.ndarray, generation: int) -> list[dict[str, Any]]:
        """Replace the worst members by mutated children of tournament winners, in place.

        ``fitness`` has shape ``(P,)``. Returns one lineage record per replaced member.
        """
        self._adapt_mutation_scale(fitness)
        order = np.argsort(-fitness, kind="stable")
        replace = min(round(self.cfg.replace_fraction * self.population), self.population - self.cfg.elites)
        losers = [int(i) for i in order[self.population - replace :]] if replace > 0 else []
        survivors = [int(i) for i in order[: self.population - replace]]
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

    # ------------------------------------------------------------ operators

    def _tournament(self, candidates: list[int], fitness: np.ndarray) -> int:
        size = min(self.cfg.tournament_size, len(candidates))
        drawn = self.rng.choice(candidates, size=size, replace=False)
        return int(drawn[np.argmax(fitness[drawn])])

    @torch.no_grad()
    def _crossover(self, agent: PopulationAgent, child: int, other: int) -> None:
        """Uniform crossover per output neuron: each neuron's incoming weights and bias
        come whole from one parent."""
        for param in agent.actor_parameters():
            take = self.rng.random(param.shape[-1]) < 0.5
            mask = torch.as_tensor(take, device=param.device)
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
        perturb = self.rng.random() < self.cfg.perturb_prob
        for name in HYPERPARAMETERS:
            low, high = getattr(self.cfg, f"{name}_bounds")
            value = float(agent.hyperparameters[name][child])
            if perturb:
                value *= float(self.rng.choice(self.cfg.perturb_factors))
            else:
                value = float(np.exp(self.rng.uniform(np.log(low), np.log(high))))
            agent.hyperparameters[name][child] = min(max(value, low), high)
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
            **{name: float(agent.hyperparameters[name][child]) for name in HYPERPARAMETERS},
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
        }

    def load_state(self, state: dict[str, Any]) -> None:
        self.rng.bit_generator.state = state["rng"]
        self.mutation_scale = float(state["mutation_scale"])
        self.member_ids = [int(i) for i in state["member_ids"]]
        self.next_id = int(state["next_id"])
        self.ancestry = [[int(i) for i in a] for a in state["ancestry"]]
        self.pending = [(int(c), float(f)) for c, f in state["pending"]]
