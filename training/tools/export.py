"""Export one member's actor from a checkpointed generation (``agents.policy`` formats): TD3 members
as ``evorl-policy/1``, discrete-SAC members (MLP, or CNN encoder + MLP) as ``evorl-policy/2``, the
Dreamer member (encoder, RSSM, actor and sampling generator) as ``evorl-policy/3``."""

from __future__ import annotations

import dataclasses
from pathlib import Path
from typing import Any

import gymnasium as gym
import numpy as np

from agents.batched import BatchedLinear
from agents.dreamer.sizes import SIZES
from agents.dreamer_policy import dreamer_member as dreamer_tensors
from agents.dreamer_policy import save_dreamer_policy
from agents.policy import INFO, WEIGHTS, discrete_member, save_discrete_policy, save_policy
from agents.sac_discrete import DiscreteSACPopulation
from agents.td3 import TD3Population
from config import UserError
from training.envs import make_env, wrappers
from training.tools.loading import Generation, Member, dreamer_member, make_pool, population_agent
from training.tools.output import writable_folder


def export(gen: Generation, member: Member, out: Path, force: bool = False) -> list[Path]:
    """Write ``policy.safetensors`` + ``policy.json`` for ``member`` into ``out``; refuses to replace
    an earlier export without ``force``, and algorithms it has no format for."""
    targets = [out / WEIGHTS, out / INFO]
    writable_folder(out, [t for t in targets if t.exists()], force)
    if member.slot is None:
        return export_dreamer(gen, member, out)
    pool = make_pool(gen.cfg, 1)
    try:
        agent = population_agent(gen, pool)
    finally:
        pool.close()
    if isinstance(agent, DiscreteSACPopulation):
        net, tensors = discrete_member(agent.encoder, agent.actor, member.slot, pool.obs_shape, pool.first_action)
        return save_discrete_policy(out, net, tensors, describe(gen, member, "sac_discrete"))
    if not isinstance(agent, TD3Population):
        algorithm = gen.cfg.agent.algorithm
        raise UserError(f"exporting agent.algorithm {algorithm!r} members is not yet supported (td3, sac_discrete)")
    linear: list[BatchedLinear] = list(agent.actor.layers)  # type: ignore[arg-type]
    layers = [(layer.weight[member.slot], layer.bias[member.slot, 0]) for layer in linear]
    sizes = [int(layers[0][0].shape[0]), *(int(weight.shape[1]) for weight, _ in layers)]
    info = describe(gen, member, "td3")
    info = {
        "architecture": {
            "kind": "mlp",
            "sizes": sizes,
            "hidden_activation": "relu",
            "output_activation": "tanh",
            "layer": "y = x @ weight + bias, weight (in, out)",
        },
        **info,
        "action_scaling": "low + (tanh_output + 1) / 2 * (high - low), clipped to [low, high]",
    }
    return save_policy(out, layers, info)


def export_dreamer(gen: Generation, member: Member, out: Path) -> list[Path]:
    """The Dreamer member as ``evorl-policy/3``: its encoder, RSSM, actor and generator state, the
    architecture, and the ``dreamer`` config and size preset the networks were built with."""
    pool = make_pool(gen.cfg, 1)
    try:
        dreamer = dreamer_member(gen, pool)
    finally:
        pool.close()
    net, tensors = dreamer_tensors(dreamer.agent, pool.obs_shape)
    d = gen.cfg.dreamer
    info = {
        **describe(gen, member, "dreamer"),
        "dreamer": dataclasses.asdict(d),
        "dreamer_size": {"name": d.size, **dataclasses.asdict(SIZES[d.size])},
    }
    if net.action_kind == "box":
        info["action_scaling"] = "low + (action + 1) / 2 * (high - low), clipped to [low, high]"
    return save_dreamer_policy(out, net, tensors, info)


def describe(gen: Generation, member: Member, algorithm: str) -> dict[str, Any]:
    """The JSON beside the weights (but the architecture): spaces, the env the policy acts in and
    how it is built, and where the actor came from."""
    env = make_env(gen.cfg.env)
    try:
        obs_space, act_space, built = env.observation_space, env.action_space, wrappers(gen.cfg.env, env)
    finally:
        env.close()
    assert isinstance(obs_space, gym.spaces.Box)
    return {
        "observation_space": _box(obs_space),
        "action_space": _box(act_space) if isinstance(act_space, gym.spaces.Box) else _discrete(act_space),
        "env_id": gen.cfg.env.id,
        "max_episode_steps": gen.cfg.env.max_episode_steps,
        "env": dataclasses.asdict(gen.cfg.env),
        "env_wrappers": built,
        "algorithm": algorithm,
        "run": gen.run,
        "generation": gen.generation + 1,
        "member": member.name,
        "slot": member.slot,
        "fitness": member.fitness,
        "config_hash": gen.cfg.hash(),
    }


def _box(space: gym.spaces.Box) -> dict[str, Any]:
    """Shape, dtype and bounds; the bounds as one number when every entry has the same (frames)."""
    low, high = np.asarray(space.low, np.float64), np.asarray(space.high, np.float64)
    uniform = len(space.shape) > 1 and low.min() == low.max() and high.min() == high.max()
    return {
        "kind": "box",
        "shape": list(space.shape),
        "dtype": str(space.dtype),
        "low": float(low.flat[0]) if uniform else low.tolist(),
        "high": float(high.flat[0]) if uniform else high.tolist(),
    }


def _discrete(space: gym.Space) -> dict[str, Any]:
    assert isinstance(space, gym.spaces.Discrete)
    return {"kind": "discrete", "n": int(space.n), "start": int(space.start)}
