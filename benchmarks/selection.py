"""Selection reliability: does one generation's fitness rank the same members as another
independent evaluation of them would?

A population is trained to mid-run with the real trainer, frozen, and then evaluated several
times with fresh start states. For each evaluation scheme the figure is the Spearman rank
correlation between two independent evaluations of the same members, averaged over pairs:
1.0 means fitness ranks policies, 0 means it ranks luck.

Schemes: ``independent`` (every member's env gets its own reset seed: the trainer before
common random numbers) and ``common`` (every member starts from the same states within an
evaluation, the trainer now), each with 1, 2 and 4 episodes per member.

    python benchmarks/selection.py                            # Pendulum-v1 (pendulum preset) and HalfCheetah-v5
    python benchmarks/selection.py --env pendulum --pairs 20
"""

from __future__ import annotations

import argparse
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from config import build_config  # noqa: E402
from training import runs  # noqa: E402
from training.envs import EnvPool, make_env  # noqa: E402
from training.memory.sentinel import spearman  # noqa: E402
from training.rollout import rollout  # noqa: E402
from training.trainer import Trainer  # noqa: E402

SETUPS = {
    # name: (preset, overrides to reach mid-run in a few minutes on 2 cores)
    "pendulum": ("pendulum", {"train.generations": 6}),
    "halfcheetah": (
        "halfcheetah",
        {"train.generations": 3, "train.updates_per_generation": 300, "train.warmup_steps": 16_000},
    ),
}


def evaluate(trainer: Trainer, pool: EnvPool, episodes: int, common: bool, seed: int) -> np.ndarray:
    """Fitness ``(P,)`` of the frozen population: ``episodes`` noise-free episodes per member, one
    env per episode; with ``common`` every member gets the same ``episodes`` reset seeds."""
    members = trainer.population
    draws = np.random.SeedSequence([seed, 7]).generate_state(episodes if common else members * episodes) % 2**31
    seeds = np.tile(draws, members) if common else draws
    result = rollout(trainer.agent, pool, None, seeds, explore=False, episodes_per_stream=1)
    return result.member_fitness(members, 1)


def reliability(trainer: Trainer, episodes: int, common: bool, pairs: int) -> tuple[float, float]:
    """Mean and std over ``pairs`` of the Spearman correlation of two independent evaluations."""
    pool = EnvPool(lambda: make_env(trainer.cfg.env), trainer.population * episodes)
    try:
        rhos = []
        for pair in range(pairs):
            first = evaluate(trainer, pool, episodes, common, seed=2 * pair)
            second = evaluate(trainer, pool, episodes, common, seed=2 * pair + 1)
            rhos.append(spearman(first, second))
    finally:
        pool.close()
    return float(np.mean(rhos)), float(np.std(rhos))


def measure(name: str, seed: int, pairs: int) -> None:
    preset, overrides = SETUPS[name]
    with tempfile.TemporaryDirectory() as run_dir:
        extra = {
            "run.seed": seed,
            "run.run_dir": run_dir,
            "run.name": name,
            "run.progress": False,
            "run.tensorboard": False,
            **overrides,
        }
        cfg = build_config(preset, extra=extra)
        started = time.perf_counter()
        trainer = runs.start(cfg)
        try:
            trainer.train()
            trained_s = time.perf_counter() - started
            generations = cfg.train.generations
            print(f"\n{cfg.env.id}: P={trainer.population}, trained {generations} generations in {trained_s:.0f}s")
            print(f"{'scheme':>12} {'episodes':>8} {'Spearman (mean +- std over pairs)':>34}")
            for common in (False, True):
                for episodes in (1, 2, 4):
                    mean, std = reliability(trainer, episodes, common, pairs)
                    scheme = "common" if common else "independent"
                    print(f"{scheme:>12} {episodes:>8} {mean:>26.2f} +- {std:.2f}", flush=True)
        finally:
            trainer.close()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--env", choices=[*SETUPS, "all"], default="all")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--pairs", type=int, default=10, help="pairs of independent evaluations per scheme")
    args = parser.parse_args()
    for name in SETUPS if args.env == "all" else [args.env]:
        measure(name, args.seed, args.pairs)


if __name__ == "__main__":
    main()
