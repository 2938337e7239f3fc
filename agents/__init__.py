"""The learning math: batched population networks, actor-critic updates. No I/O."""

from __future__ import annotations

import torch

from agents.base import Batch, PopulationAgent
from agents.dreamer_policy import DreamerPolicy
from agents.policy import DiscretePolicy, Policy, load_policy
from agents.sac_discrete import DiscreteSACPopulation
from agents.td3 import TD3Population
from config import AgentConfig, UserError

ALGORITHMS: dict[str, type[PopulationAgent]] = {"td3": TD3Population, "sac_discrete": DiscreteSACPopulation}
"""Actor-critic variants by name; a new one subclasses PopulationAgent and registers here. Each is
built as ``cls(population, obs_dim, act_dim, config, device)`` (``obs_dim`` a frame-stack shape
``(stack, H, W)`` where ``cls.IMAGES``)."""

AUTO = {"box": "td3", "discrete": "sac_discrete"}
"""``agent.algorithm: auto`` picks the variant by the environment's action space."""


def algorithm_class(cfg: AgentConfig, action_kind: str) -> type[PopulationAgent]:
    """The class ``cfg.algorithm`` names (``auto``: by ``action_kind``, ``"box"`` or ``"discrete"``);
    UserError for an unknown name or one that does not serve ``action_kind``."""
    name = AUTO[action_kind] if cfg.algorithm == "auto" else cfg.algorithm
    if name not in ALGORITHMS:
        raise UserError(f"unknown agent.algorithm {cfg.algorithm!r}; choose one of: auto, {', '.join(ALGORITHMS)}")
    cls = ALGORITHMS[name]
    if action_kind != cls.ACTION_KIND:
        fits = [n for n, c in ALGORITHMS.items() if action_kind == c.ACTION_KIND]
        raise UserError(
            f"agent.algorithm {name!r} needs {cls.ACTION_KIND} actions but the env has {action_kind} actions; "
            f"use auto or {', '.join(fits)}"
        )
    return cls


def make_population(
    population: int,
    obs_shape: int | tuple[int, ...],
    act_dim: int,
    cfg: AgentConfig,
    device: torch.device,
    action_kind: str = "box",
) -> PopulationAgent:
    """Build ``population`` members of ``cfg.algorithm`` on ``device`` for ``action_kind`` actions
    (``act_dim`` is the action vector's width: the number of choices for ``"discrete"``) and
    observations of ``obs_shape`` (``obs_dim`` or ``(obs_dim,)``, or frame stacks ``(stack, H, W)``,
    which need an algorithm with a CNN member: UserError otherwise)."""
    cls = algorithm_class(cfg, action_kind)
    shape = (obs_shape,) if isinstance(obs_shape, int) else tuple(obs_shape)
    if len(shape) > 1 and not cls.IMAGES:
        name = next(n for n, c in ALGORITHMS.items() if c is cls)
        with_cnn = [n for n, c in ALGORITHMS.items() if c.IMAGES]
        raise UserError(
            f"agent.algorithm {name} has no CNN member for image observations {shape}; "
            f"image observations are supported with {', '.join(with_cnn)} (Discrete actions)"
        )
    return cls(population, shape[0] if len(shape) == 1 else shape, act_dim, cfg, device)  # type: ignore[arg-type]


__all__ = [
    "ALGORITHMS",
    "AUTO",
    "Batch",
    "DiscretePolicy",
    "DreamerPolicy",
    "Policy",
    "PopulationAgent",
    "algorithm_class",
    "load_policy",
    "make_population",
]
