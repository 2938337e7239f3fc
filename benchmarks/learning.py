"""Learning quality of the default ``pendulum`` preset over several seeds.

After every generation the elite (best fitness) is re-evaluated on held-out episodes without
exploration noise. Those measurement episodes are not counted in the training budget and
never reach the replay buffer; everything the trainer itself does (exploration and fitness
episodes of all members) is counted.

    python benchmarks/learning.py                  # seeds 0 1 2, the pendulum preset
    python benchmarks/learning.py --seeds 0 --set train.generations=5
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from config import Config, build_config  # noqa: E402
from training import runs  # noqa: E402
from training.envs import EnvPool, make_env  # noqa: E402
from training.rollout import rollout  # noqa: E402
from training.trainer import Trainer  # noqa: E402


def held_out_return(trainer: Trainer, slot: int, episodes: int, seed: int) -> float:
    """Mean noise-free return of member ``slot`` over ``episodes`` fresh episodes."""
    cfg = trainer.cfg
    pool = EnvPool(lambda: make_env(cfg.env), trainer.population * episodes)
    seeds = np.random.SeedSequence([seed, 10**6]).generate_state(len(pool)) % 2**31
    result = rollout(trainer.agent, pool, None, seeds, explore=False, episodes_per_stream=1)
    pool.close()
    return float(result.member_fitness(trainer.population, 1)[slot])


def run_seed(cfg: Config, threshold: float, episodes: int) -> dict[str, object]:
    trainer = runs.start(cfg)
    curve = []
    reached = None
    started = time.perf_counter()
    try:
        for generation in range(cfg.train.generations):
            record = trainer.run_generation(generation)
            measured = held_out_return(trainer, record["elite_slot"], episodes, cfg.run.seed)
            curve.append((record["env_steps_total"], record["fitness_best"], measured))
            print(
                f"seed {cfg.run.seed} gen {generation + 1}: env steps {record['env_steps_total']:,} "
                f"fitness {record['fitness_best']:.1f} elite held-out {measured:.1f}",
                flush=True,
            )
            if reached is None and measured >= threshold:
                reached = {
                    "generation": generation + 1,
                    "env_steps": record["env_steps_total"],
                    "wall_s": time.perf_counter() - started,
                    "held_out": measured,
                }
    finally:
        trainer.close()
    return {
        "seed": cfg.run.seed,
        "reached": reached,
        "curve": curve,
        "wall_s": time.perf_counter() - started,
        "final_held_out": curve[-1][2],
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--preset", default="pendulum")
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    parser.add_argument("--threshold", type=float, default=-200.0)
    parser.add_argument("--budget", type=int, default=60_000, help="env steps the goal allows")
    parser.add_argument("--episodes", type=int, default=10, help="held-out episodes per measurement")
    parser.add_argument("--set", dest="overrides", action="append", default=[])
    parser.add_argument("--json", type=Path, default=None)
    args = parser.parse_args()

    results = []
    with tempfile.TemporaryDirectory() as run_dir:
        for seed in args.seeds:
            extra = {
                "run.seed": seed,
                "run.run_dir": run_dir,
                "run.name": f"seed{seed}",
                "run.progress": False,
                "run.tensorboard": False,
            }
            cfg = build_config(args.preset, overrides=args.overrides, extra=extra)
            results.append(run_seed(cfg, args.threshold, args.episodes))

    print(f"\n{'seed':>4} {'reached at env steps':>21} {'generation':>10} {'wall s':>7} {'final held-out':>15}")
    for r in results:
        hit = r["reached"]
        steps = f"{hit['env_steps']:,}" if hit else "not reached"
        print(
            f"{r['seed']:>4} {steps:>21} {hit['generation'] if hit else '-':>10} "
            f"{hit['wall_s'] if hit else r['wall_s']:>7.0f} {r['final_held_out']:>15.1f}"
        )
    ok = sum(1 for r in results if r["reached"] and r["reached"]["env_steps"] <= args.budget)
    print(
        f"RESULT learning {args.preset}: elite held-out mean >= {args.threshold:g} within "
        f"{args.budget:,} env steps for {ok} of {len(results)} seeds"
    )
    if args.json:
        args.json.write_text(json.dumps(results, indent=1))


if __name__ == "__main__":
    main()
