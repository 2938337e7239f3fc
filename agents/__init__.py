"""The learning math: batched population networks, actor-critic updates. No I/O."""

from __future__ import annotations

from collections.abc import Callable

import torch

from agents.base import Batch, PopulationAgent
from agents.policy import Policy, load_policy
from agents.td3 import TD3Population
from config import AgentConfig, UserError

AgentFactory = Callable[[int, int, int, AgentConfig, torch.device], PopulationAgent]
"""(population, obs_dim, act_dim, config, device) -> a PopulationAgent."""

ALGORITHMS: dict[str, AgentFactory] = {"td3": TD3Population}
"""Actor-critic variants by name; a new one subclasses PopulationAgent and registers here."""


def make_population(
    population: int, obs_dim: int, act_dim: int, cfg: AgentConfig, device: torch.device
) -> PopulationAgent:
    """Build ``population`` members of ``cfg.algorithm`` on ``device``."""
    if cfg.algorithm not in ALGORITHMS:
        raise UserError(f"unknown agent.algorithm {cfg.algorithm!r}; choose one of: {', '.join(ALGORITHMS)}")
    return ALGORITHMS[cfg.algorithm](population, obs_dim, act_dim, cfg, device)


__all__ = ["ALGORITHMS", "Batch", "Policy", "PopulationAgent", "load_policy", "make_population"]
