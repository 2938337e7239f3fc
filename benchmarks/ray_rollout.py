"""Benchmark: env steps per second of the population's exploration rollout, local backend versus
Ray with 1 and 2 rollout workers, and Ray's overhead per generation.

Each block is one exploration phase as the trainer runs it (``backend.rollout`` of ``--steps`` steps
in every stream of a 16-member population, one env per member, noise on, transitions into a real
replay). Timing alternates the designs block by block (local, Ray, local, Ray, ...) so drift on a
shared machine hits both; results are medians, printed as ratios against the local backend measured
in the same run. Ray's overhead per generation is its wall time less the slowest actor's own time
inside ``play`` (the broadcast of the weights, scheduling, the transfer of the results back and
adding them to the replay); the in-actor time per env step is the per-step cost of the model

    generation's rollout time  =  T * E * c / W  +  o

(``T`` steps, ``E`` streams, ``c`` seconds per env step inside an actor, ``W`` actors, ``o`` the
overhead), which the README uses to size the CPUs a GPU learner needs.

Run from the repository root (it starts its own local Ray instance with this machine's CPUs)::

    python benchmarks/ray_rollout.py                  # Pendulum-v1 and HalfCheetah-v5, ~2 min on 2 cores
    python benchmarks/ray_rollout.py --quick          # Pendulum-v1, fewer blocks
    python benchmarks/ray_rollout.py --env HalfCheetah-v5 --steps 1000
"""

from __future__ import annotations

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import argparse  # noqa: E402
import dataclasses  # noqa: E402
import json  # noqa: E402
import logging  # noqa: E402
import os  # noqa: E402
import statistics  # noqa: E402
import time  # noqa: E402
from typing import Any  # noqa: E402

import numpy as np  # noqa: E402
import torch  # noqa: E402

from agents import make_population  # noqa: E402
from config import BackendConfig, Config, build_config  # noqa: E402
from training.backends import LocalBackend, RolloutBackend  # noqa: E402
from training.envs import EnvPool, make_env  # noqa: E402
from training.replay import ReplayBuffer  # noqa: E402

PRESET = {"Pendulum-v1": "pendulum", "HalfCheetah-v5": "halfcheetah"}


def config(env_id: str, population: int, workers: int) -> Config:
    cfg = build_config(PRESET.get(env_id, "pendulum"), extra={"env.id": env_id, "population": population})
    return dataclasses.replace(cfg, backend=BackendConfig(kind="ray", workers=workers))


def block(backend: RolloutBackend, agent: Any, replay: ReplayBuffer, steps: int, index: int) -> dict[str, float]:
    """One exploration phase; its wall time, and (Ray) the slowest actor's own time."""
    seeds = np.random.SeedSequence([0, index + 1]).generate_state(replay.streams) % 2**31
    started = time.perf_counter()
    result = backend.rollout(agent, replay, seeds, explore=True, steps=steps)
    wall = time.perf_counter() - started
    return {"wall_s": wall, "env_steps": result.env_steps, "play_s": getattr(backend, "last_play_s", wall)}


def compare(env_id: str, workers: int, steps: int, blocks: int, population: int) -> dict[str, Any]:
    """Alternating blocks of the local backend and Ray with ``workers`` actors."""
    from training.backends.ray_backend import RayBackend

    cfg = config(env_id, population, workers)
    pool = EnvPool(lambda: make_env(cfg.env), population)
    agent = make_population(population, pool.obs_shape, pool.act_dim, cfg.agent, torch.device("cpu"), pool.action_kind)
    replay = ReplayBuffer(steps * population * 2, population, pool.obs_dim, pool.act_dim, seed=0)
    local: RolloutBackend = LocalBackend(pool)
    remote = RayBackend(cfg, pool)
    try:
        block(remote, agent, replay, steps, -1)  # warm: the actors' first forward, imports
        block(local, agent, replay, steps, -1)
        runs: dict[str, list[dict[str, float]]] = {"local": [], "ray": []}
        for i in range(blocks):
            runs["local"].append(block(local, agent, replay, steps, i))
            runs["ray"].append(block(remote, agent, replay, steps, i))
    finally:
        remote.close()
        pool.close()
    rate = {name: statistics.median(b["env_steps"] / b["wall_s"] for b in bs) for name, bs in runs.items()}
    overhead = statistics.median(b["wall_s"] - b["play_s"] for b in runs["ray"])
    in_actor = statistics.median(b["play_s"] * workers / b["env_steps"] for b in runs["ray"])
    local_step = statistics.median(b["wall_s"] / b["env_steps"] for b in runs["local"])
    return {
        "env": env_id,
        "workers": workers,
        "steps": steps,
        "streams": population,
        "local_steps_per_s": rate["local"],
        "ray_steps_per_s": rate["ray"],
        "ray_over_local": rate["ray"] / rate["local"],
        "overhead_s": overhead,
        "local_us_per_step": local_step * 1e6,
        "actor_us_per_step": in_actor * 1e6,
        "generation_s_local": statistics.median(b["wall_s"] for b in runs["local"]),
        "generation_s_ray": statistics.median(b["wall_s"] for b in runs["ray"]),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--env", action="append", help="env id (repeatable; default Pendulum-v1 and HalfCheetah-v5)")
    parser.add_argument("--steps", type=int, default=200, help="rollout steps per stream per block")
    parser.add_argument("--blocks", type=int, default=5, help="timed blocks per design")
    parser.add_argument("--population", type=int, default=16)
    parser.add_argument("--quick", action="store_true", help="Pendulum-v1 only, 3 blocks")
    parser.add_argument("--json", action="store_true", help="also print the figures as JSON")
    args = parser.parse_args()
    envs = args.env or (["Pendulum-v1"] if args.quick else ["Pendulum-v1", "HalfCheetah-v5"])
    blocks = 3 if args.quick else args.blocks
    torch.set_num_threads(1)
    import ray

    ray.init(include_dashboard=False, logging_level=logging.ERROR, log_to_driver=False)
    print(f"Ray {ray.__version__}, {ray.cluster_resources().get('CPU', 0):g} CPUs; load average {os.getloadavg()}")
    results = []
    for env_id in envs:
        for workers in (1, 2):
            r = compare(env_id, workers, args.steps, blocks, args.population)
            results.append(r)
            print(
                f"{env_id:16s} ray x{workers}: {r['ray_steps_per_s']:8,.0f} env steps/s vs local "
                f"{r['local_steps_per_s']:8,.0f} ({r['ray_over_local']:.2f}x); overhead {r['overhead_s']:.3f} s "
                f"per generation of {r['steps']} x {r['streams']} steps; per env step: local "
                f"{r['local_us_per_step']:.0f} us, in an actor {r['actor_us_per_step']:.0f} us",
                flush=True,
            )
    print(f"load average after: {os.getloadavg()}")
    if args.json:
        print(json.dumps(results, indent=1))
    ray.shutdown()


if __name__ == "__main__":
    main()
