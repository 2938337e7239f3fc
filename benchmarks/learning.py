"""Learning quality of the default ``pendulum`` preset over several seeds.

After every generation the elite (best fitness) is re-evaluated on held-out episodes without
exploration noise. Those measurement episodes are not counted in the training budget and
never reach the replay buffer; everything the trainer itself does (exploration and fitness
episodes of all members) is counted.

    python benchmarks/learning.py                  # seeds 0 1 2, the pendulum preset
    python benchmarks/learning.py --seeds 0 --set train.generations=5
    python benchmarks/learning.py --variants none member rollouts screening all --max-env-steps 20000

``--variants`` compares the Dreamer member's uses side by side (``VARIANTS``), same seeds, same
machine, one invocation; ``--max-env-steps`` ends a run once it has taken that many env steps,
and every run ends once the threshold is reached. The table gives wall and process CPU seconds
(user + sys, all threads; the held-out measurements included) to the crossing, or of the whole run.
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from config import Config, build_config  # noqa: E402
from training import runs  # noqa: E402
from training.envs import EnvPool, make_env  # noqa: E402
from training.rollout import rollout  # noqa: E402
from training.trainer import Trainer  # noqa: E402

DREAMER = ["dreamer.enabled=true"]
VARIANTS = {
    "none": [],
    "member": DREAMER,
    "rollouts": [*DREAMER, "dreamer.model_rollouts=true"],
    "screening": [*DREAMER, "dreamer.screen=true"],
    "all": [*DREAMER, "dreamer.model_rollouts=true", "dreamer.screen=true"],
}
"""The Dreamer member's uses, each on its own and all together (``--set`` adds to each)."""


def held_out_return(trainer: Trainer, slot: int, episodes: int, seed: int) -> float:
    """Mean noise-free return of member ``slot`` over ``episodes`` fresh episodes."""
    cfg = trainer.cfg
    pool = EnvPool(lambda: make_env(cfg.env), trainer.population * episodes)
    seeds = np.random.SeedSequence([seed, 10**6]).generate_state(len(pool)) % 2**31
    result = rollout(trainer.agent, pool, None, seeds, explore=False, episodes_per_stream=1)
    pool.close()
    return float(result.member_fitness(trainer.population, 1)[slot])


def held_out_dreamer(trainer: Trainer, episodes: int, seed: int) -> float:
    """Mean noise-free return of the Dreamer member over ``episodes`` fresh episodes."""
    assert trainer.dreamer is not None
    pool = EnvPool(lambda: make_env(trainer.cfg.env), episodes)
    seeds = np.random.SeedSequence([seed, 10**6]).generate_state(len(pool)) % 2**31
    trainer.dreamer.agent.reset_state()
    result = rollout(trainer.dreamer, pool, None, seeds, explore=False, episodes_per_stream=1)
    trainer.dreamer.agent.reset_state()
    pool.close()
    return float(result.member_fitness(1, 1)[0])


def _imagination(record: dict[str, Any]) -> str:
    """The Dreamer member's figures for the progress line ('' without it)."""
    if "dreamer_fitness" not in record:
        return ""
    parts = [f" | dreamer {record['dreamer_fitness']:.1f}{' (elite)' if record.get('dreamer_elite') else ''}"]
    parts.append(f"{record.get('dreamer_updates', 0):.0f} model updates ({record.get('dreamer_train_s', 0):.0f}s)")
    if "dreamer_reward_error_h1" in record:
        parts.append(f"reward err h1 {record['dreamer_reward_error_h1']:.2f}")
    if "screen_spearman" in record:
        parts.append(f"screen spearman {record['screen_spearman']:.2f}")
    if "screen_saved_steps" in record:
        parts.append(f"saved {record['screen_saved_steps']:,} steps")
    return ", ".join(parts)


def run_seed(cfg: Config, threshold: float, episodes: int, max_env_steps: int = 0) -> dict[str, object]:
    trainer = runs.start(cfg)
    curve = []
    reached = None
    started, cpu_started = time.perf_counter(), time.process_time()
    try:
        for generation in range(cfg.train.generations):
            record = trainer.run_generation(generation)
            if record.get("dreamer_elite"):
                measured = held_out_dreamer(trainer, episodes, cfg.run.seed)
            else:
                measured = held_out_return(trainer, record["elite_slot"], episodes, cfg.run.seed)
            curve.append((record["env_steps_total"], record["fitness_best"], measured))
            print(
                f"seed {cfg.run.seed} gen {generation + 1}: env steps {record['env_steps_total']:,} "
                f"fitness {record['fitness_best']:.1f} elite held-out {measured:.1f}{_imagination(record)}",
                flush=True,
            )
            if reached is None and measured >= threshold:
                reached = {
                    "generation": generation + 1,
                    "env_steps": record["env_steps_total"],
                    "wall_s": time.perf_counter() - started,
                    "cpu_s": time.process_time() - cpu_started,
                    "held_out": measured,
                }
            if max_env_steps > 0 and (reached is not None or record["env_steps_total"] >= max_env_steps):
                break
    finally:
        trainer.close()
    return {
        "seed": cfg.run.seed,
        "reached": reached,
        "curve": curve,
        "wall_s": time.perf_counter() - started,
        "cpu_s": time.process_time() - cpu_started,
        "final_held_out": curve[-1][2],
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--preset", default="pendulum")
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    parser.add_argument("--threshold", type=float, default=-200.0)
    parser.add_argument("--budget", type=int, default=60_000, help="env steps the goal allows")
    parser.add_argument("--episodes", type=int, default=10, help="held-out episodes per measurement")
    parser.add_argument("--variants", nargs="+", choices=list(VARIANTS), default=None)
    parser.add_argument("--max-env-steps", type=int, default=0, help="end a run after this many env steps")
    parser.add_argument("--set", dest="overrides", action="append", default=[])
    parser.add_argument("--json", type=Path, default=None)
    args = parser.parse_args()

    variants = args.variants or [""]
    results: dict[str, list[dict[str, object]]] = {}
    with tempfile.TemporaryDirectory() as run_dir:
        for variant in variants:
            for seed in args.seeds:
                extra = {
                    "run.seed": seed,
                    "run.run_dir": run_dir,
                    "run.name": f"{variant or 'run'}-seed{seed}",
                    "run.progress": False,
                    "run.tensorboard": False,
                }
                overrides = [*VARIANTS.get(variant, []), *args.overrides]
                cfg = build_config(args.preset, overrides=overrides, extra=extra)
                stop = args.max_env_steps
                results.setdefault(variant, []).append(run_seed(cfg, args.threshold, args.episodes, stop))
    for variant, runs_ in results.items():
        report(args, variant, runs_)
    if args.json:
        args.json.write_text(json.dumps(results, indent=1))


def report(args: argparse.Namespace, variant: str, results: list[dict[str, object]]) -> None:
    """One variant's table and RESULT line."""
    label = f"{args.preset}{' ' + variant if variant else ''}"
    print(
        f"\n{label}\n{'seed':>4} {'reached at env steps':>21} {'generation':>10} {'wall s':>7} {'cpu s':>7} "
        f"{'final held-out':>15}"
    )
    for r in results:
        hit: Any = r["reached"]
        steps = f"{hit['env_steps']:,}" if hit else "not reached"
        print(
            f"{r['seed']:>4} {steps:>21} {hit['generation'] if hit else '-':>10} "
            f"{(hit or r)['wall_s']:>7.0f} {(hit or r)['cpu_s']:>7.0f} {r['final_held_out']:>15.1f}"
        )
    ok = sum(1 for r in results if r["reached"] and r["reached"]["env_steps"] <= args.budget)  # type: ignore[index]
    print(
        f"RESULT learning {label}: elite held-out mean >= {args.threshold:g} within "
        f"{args.budget:,} env steps for {ok} of {len(results)} seeds"
    )


if __name__ == "__main__":
    main()
