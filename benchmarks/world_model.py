"""Does the Dreamer member's world model learn? Losses and imagined-vs-real reward error.

For each environment: 16 streams of uniform random actions fill a training replay and, from other
seeds, a held-out replay. The Dreamer member (``dreamer.size``, default ``tiny``) then takes
``--updates`` world-model updates on the training replay. Every ``--every`` updates it prints the
mean losses of those updates and, on held-out sequences, the mean absolute error of the imagined
reward at horizons 1, 5, 10 and 15 (open loop: the model starts from a real state and is fed the
real actions). The baseline in the same run is predicting the training data's mean reward.

    python benchmarks/world_model.py                          # Pendulum-v1 and HalfCheetah-v5
    python benchmarks/world_model.py --envs Pendulum-v1 --updates 60
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from agents import make_population  # noqa: E402
from config import Config, build_config  # noqa: E402
from training.dreamer_member import DreamerMember  # noqa: E402
from training.envs import EnvPool, make_env  # noqa: E402
from training.replay import ReplayBuffer  # noqa: E402
from training.rollout import rollout  # noqa: E402

HORIZONS = (1, 5, 10, 15)
STREAMS = 16


def random_replay(cfg: Config, steps: int, seed: int) -> ReplayBuffer:
    """``steps`` rows of uniform random actions in ``STREAMS`` envs (all kept)."""
    pool = EnvPool(lambda: make_env(cfg.env), STREAMS)
    replay = ReplayBuffer(steps * STREAMS, STREAMS, pool.obs_dim, pool.act_dim, seed=seed)
    agent = make_population(STREAMS, pool.obs_dim, pool.act_dim, cfg.agent, torch.device("cpu"))
    seeds = np.random.SeedSequence([seed, 7]).generate_state(STREAMS) % 2**31
    rollout(agent, pool, replay, seeds, explore=True, steps=steps, random_steps=steps)
    pool.close()
    return replay


def mean_reward_error(train: ReplayBuffer, held_out: ReplayBuffer) -> float:
    """Baseline: the error of always predicting the training data's mean reward."""
    mean = train.data["reward"][: train.filled_rows].mean()
    return float(np.abs(held_out.data["reward"][: held_out.filled_rows] - mean).mean())


def measure(env_id: str, args: argparse.Namespace) -> dict[str, float]:
    overrides = [f"env.id={env_id}", "dreamer.enabled=true", f"dreamer.size={args.size}", *args.overrides]
    cfg = build_config("pendulum", overrides=overrides, extra={"run.seed": args.seed})
    torch.manual_seed(args.seed)
    train, held_out = random_replay(cfg, args.steps, args.seed), random_replay(cfg, args.steps, args.seed + 100)
    member = DreamerMember(cfg, train.data["obs"].shape[-1], train.data["action"].shape[-1], torch.device("cpu"), 3)
    baseline = mean_reward_error(train, held_out)
    print(f"\n{env_id}: {len(train):,} random transitions, size {args.size}; mean-reward baseline error {baseline:.3f}")
    header = "".join(f"{'err h' + str(h):>9}" for h in HORIZONS)
    print(f"{'updates':>7} {'recon':>8} {'reward':>8} {'cont':>8} {'kl':>8}{header} {'s/update':>9}")
    first: dict[str, float] = {}
    last: dict[str, float] = {}
    errors = member.reward_error(held_out, HORIZONS, sequences=args.sequences)
    print(
        f"{0:>7} {'':>8} {'':>8} {'':>8} {'':>8}"
        + "".join(f"{errors[f'dreamer_reward_error_h{h}']:>9.3f}" for h in HORIZONS)
    )
    for done in range(args.every, args.updates + 1, args.every):
        started = time.perf_counter()
        losses = member.train(train, args.every, lambda: None)
        seconds = (time.perf_counter() - started) / args.every
        errors = member.reward_error(held_out, HORIZONS, sequences=args.sequences)
        last = losses | errors
        first = first or last
        cells = "".join(f"{errors[f'dreamer_reward_error_h{h}']:>9.3f}" for h in HORIZONS)
        print(
            f"{done:>7} {losses['dreamer_reconstruction']:>8.3f} {losses['dreamer_reward']:>8.3f} "
            f"{losses['dreamer_continue']:>8.3f} {losses['dreamer_kl_dyn']:>8.3f}{cells} {seconds:>9.2f}"
        )
    member.close()
    falls = {name: last[f"dreamer_{name}"] / first[f"dreamer_{name}"] for name in ("reconstruction", "reward")}
    ratios = {h: last[f"dreamer_reward_error_h{h}"] / baseline for h in HORIZONS}
    print(
        f"RESULT {env_id}: reconstruction loss x{falls['reconstruction']:.2f}, reward loss x{falls['reward']:.2f} "
        f"(last {args.every} updates vs first {args.every}); reward error / mean-reward baseline: "
        + ", ".join(f"h{h} {ratios[h]:.2f}" for h in HORIZONS)
    )
    return {"reconstruction": falls["reconstruction"], "reward": falls["reward"]}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--envs", nargs="+", default=["Pendulum-v1", "HalfCheetah-v5"])
    parser.add_argument("--size", default="tiny")
    parser.add_argument("--steps", type=int, default=250, help="random steps per stream per replay")
    parser.add_argument("--updates", type=int, default=150)
    parser.add_argument("--every", type=int, default=25)
    parser.add_argument("--sequences", type=int, default=128, help="held-out sequences per error figure")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--set", dest="overrides", action="append", default=[])
    args = parser.parse_args()
    for env_id in args.envs:
        measure(env_id, args)


if __name__ == "__main__":
    main()
