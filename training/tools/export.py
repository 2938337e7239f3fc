"""Export one population member's actor from a checkpointed generation (``agents.policy`` format)."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import gymnasium as gym
import numpy as np

from agents.batched import BatchedLinear
from agents.policy import INFO, WEIGHTS, save_policy
from agents.td3 import TD3Population
from config import UserError
from training.envs import make_env
from training.tools.loading import Generation, Member, make_pool, population_agent
from training.tools.output import writable_folder


def export(gen: Generation, member: Member, out: Path, force: bool = False) -> list[Path]:
    """Write ``policy.safetensors`` + ``policy.json`` for ``member`` into ``out``; refuses to replace
    an earlier export without ``force``, and members that are not TD3 actors ("not yet supported")."""
    if member.slot is None:
        raise UserError("exporting the Dreamer member is not yet supported; export a population member (--member)")
    targets = [out / WEIGHTS, out / INFO]
    writable_folder(out, [t for t in targets if t.exists()], force)
    pool = make_pool(gen.cfg, 1)
    try:
        agent = population_agent(gen, pool)
    finally:
        pool.close()
    if not isinstance(agent, TD3Population):
        algorithm = gen.cfg.agent.algorithm
        raise UserError(f"exporting agent.algorithm {algorithm!r} members is not yet supported (td3 only)")
    linear: list[BatchedLinear] = list(agent.actor.layers)  # type: ignore[arg-type]
    layers = [(layer.weight[member.slot], layer.bias[member.slot, 0]) for layer in linear]
    sizes = [int(layers[0][0].shape[0]), *(int(weight.shape[1]) for weight, _ in layers)]
    return save_policy(out, layers, describe(gen, member, sizes))


def describe(gen: Generation, member: Member, sizes: list[int]) -> dict[str, Any]:
    """The JSON beside the weights: architecture, spaces, scaling and where the actor came from."""
    env = make_env(gen.cfg.env)
    try:
        obs_space, act_space = env.observation_space, env.action_space
    finally:
        env.close()
    assert isinstance(obs_space, gym.spaces.Box) and isinstance(act_space, gym.spaces.Box)
    return {
        "architecture": {
            "kind": "mlp",
            "sizes": sizes,
            "hidden_activation": "relu",
            "output_activation": "tanh",
            "layer": "y = x @ weight + bias, weight (in, out)",
        },
        "observation_space": _box(obs_space),
        "action_space": _box(act_space),
        "action_scaling": "low + (tanh_output + 1) / 2 * (high - low), clipped to [low, high]",
        "env_id": gen.cfg.env.id,
        "max_episode_steps": gen.cfg.env.max_episode_steps,
        "algorithm": "td3",
        "run": gen.run,
        "generation": gen.generation + 1,
        "member": member.name,
        "slot": member.slot,
        "fitness": member.fitness,
        "config_hash": gen.cfg.hash(),
    }


def _box(space: gym.spaces.Box) -> dict[str, Any]:
    return {
        "shape": list(space.shape),
        "dtype": str(space.dtype),
        "low": np.asarray(space.low, np.float64).tolist(),
        "high": np.asarray(space.high, np.float64).tolist(),
    }
