"""Soak: does memory stay flat over many generations of the real trainer?

Runs the trainer with the original incident's shape (16 members x 32 optimizer steps x 6
accumulation steps per generation, 256x256 networks, batch 256) on a replay small enough to
fill early, then keeps going for ``--after-fill`` generations. Prints RSS per generation, the
Theil-Sen slope of RSS after the buffer is full and warm-up is over, the leak sentinel's
verdicts, and what the memory telemetry cost (its share of generation time).

The incident this guards against grew by ~25 GB per generation; the goal is < 1 MB per
generation. ``--compare`` then runs the same shape for a few generations with the debug leak
(every critic loss kept with its graph, the incident itself) as the contrast in the same
invocation; it grows by gigabytes per generation, so it is bounded by ``--leak-generations`` and
stops early when less than a quarter of the machine's memory is left.

    python benchmarks/soak.py                       # ~25 generations past fill
    python benchmarks/soak.py --quick               # a short smoke run
    python benchmarks/soak.py --compare             # also the injected-leak run, for the ratio
    python benchmarks/soak.py --quick --after-fill 25 --dreamer   # with the Dreamer member and its uses

``--dreamer`` adds the Dreamer member with model rollouts and screening, used from its first
update, at a small train ratio (``DREAMER``); its bounded model buffer fills within the first
generations too, so the fit after fill covers it.
"""

from __future__ import annotations

import argparse
import contextlib
import io
import json
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import psutil

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from config import build_config  # noqa: E402
from training import runs  # noqa: E402
from training.memory.sentinel import spearman, theil_sen  # noqa: E402
from training.trainer import LeakStop  # noqa: E402

DREAMER = {
    "dreamer.enabled": True,
    "dreamer.model_rollouts": True,
    "dreamer.screen": True,
    "dreamer.imagine_after": 0,
    "dreamer.train_ratio": 0.5,
    "dreamer.model_buffer": 20_000,
}
"""The Dreamer member and both uses of its imagination (``--dreamer``)."""


def soak(args: argparse.Namespace, inject: bool, run_dir: str) -> dict[str, Any]:
    """One soak run; returns per-generation figures and the fitted slope after fill."""
    streams = args.population
    fill_generations = -(-args.capacity // (streams * 2 * args.steps))
    generations = args.leak_generations if inject else fill_generations + args.after_fill
    extra = {
        "population": args.population,
        "agent.hidden_sizes": args.hidden,
        "agent.batch_size": 256,
        "replay.capacity": args.capacity,
        "train.generations": generations,
        "train.steps_per_generation": args.steps,
        "train.updates_per_generation": 32,
        "train.accumulation_steps": 6,
        "train.warmup_steps": 1000,
        "env.max_episode_steps": args.steps,
        "run.run_dir": run_dir,
        "run.name": f"soak-{'leak' if inject else 'clean'}",
        "run.tensorboard": False,
        "run.progress": False,
        "run.seed": 0,
        "memory.inject_leak": inject,
        **(DREAMER if args.dreamer else {}),
    }
    trainer = runs.start(build_config("pendulum", extra=extra))
    rows: list[dict[str, float]] = []
    warnings: list[str] = []
    try:
        for generation in range(generations):
            with contextlib.redirect_stdout(io.StringIO()) as out:
                record = trainer.run_generation(generation)
            warnings += [line for line in out.getvalue().splitlines() if line.startswith("memory leak suspected")]
            rows.append({key: record[key] for key in KEPT})
            print(
                f"{'leak ' if inject else 'clean'} gen {generation + 1:3d}/{generations}  "
                f"RSS {record['rss_mb']:8.1f} MB  replay {record['replay_size']:>7,}/{record['replay_capacity']:,}"
                f"  tensors {record['live_tensors']:6.0f}  with graph {record['grad_tensors']:5.0f}"
                f"  {record['generation_s']:5.1f} s  telemetry {record['census_ms']:4.0f} ms{_dreamer(record)}",
                flush=True,
            )
            memory = psutil.virtual_memory()
            if memory.available < memory.total / 4:
                print("stopping: less than a quarter of the machine's memory is left", flush=True)
                break
    except LeakStop:
        pass
    finally:
        trainer.close()
    full = [r for r in rows if r["replay_size"] >= trainer.replay.capacity]
    measured = rows if inject else full[args.warmup :]
    slope = corr = float("nan")
    if len(measured) >= 2:
        x = [r["generation"] for r in measured]
        slope, _ = theil_sen(x, [r["rss_mb"] for r in measured])
        corr = spearman(x, [r["rss_mb"] for r in measured])
    overhead = sum(r["census_ms"] / 1000 for r in rows) / sum(r["generation_s"] for r in rows)
    return {
        "inject": inject,
        "rows": rows,
        "slope_mb_per_generation": slope,
        "correlation": corr,
        "generations_measured": len(measured),
        "telemetry_share": overhead,
        "warnings": warnings,
    }


def _dreamer(record: dict[str, Any]) -> str:
    """The Dreamer member's model updates, model buffer and screening ('' without it)."""
    if "dreamer_fitness" not in record:
        return ""
    buffer = f"  model buffer {record['dreamer_model_buffer']:,.0f}" if "dreamer_model_buffer" in record else ""
    played = f"  played {record['screen_evaluated']}" if "screen_evaluated" in record else ""
    return f"  dreamer {record.get('dreamer_updates', 0):.0f} updates{buffer}{played}"


KEPT = ("generation", "rss_mb", "replay_filled_mb", "live_tensors", "grad_tensors", "census_ms", "generation_s")
KEPT += ("replay_size",)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--population", type=int, default=16)
    parser.add_argument("--hidden", type=int, nargs="+", default=[256, 256])
    parser.add_argument("--capacity", type=int, default=50_000, help="replay capacity (small, to fill early)")
    parser.add_argument("--steps", type=int, default=200, help="exploration steps per member per generation")
    parser.add_argument("--after-fill", type=int, default=None, help="generations after the buffer is full (30)")
    parser.add_argument("--warmup", type=int, default=3, help="full-buffer generations left out of the fit")
    parser.add_argument("--quick", action="store_true", help="small networks and few generations")
    parser.add_argument("--compare", action="store_true", help="also run a few generations with the injected leak")
    parser.add_argument("--leak-generations", type=int, default=3, help="generations of the injected-leak run")
    parser.add_argument("--dreamer", action="store_true", help="with the Dreamer member, model rollouts, screening")
    parser.add_argument("--json", type=Path, default=None)
    args = parser.parse_args()
    if args.quick:
        args.hidden, args.capacity = [32, 32], 20_000
    if args.after_fill is None:
        args.after_fill = 8 if args.quick else 30

    started = time.perf_counter()
    with tempfile.TemporaryDirectory() as run_dir:
        results = [soak(args, inject=False, run_dir=run_dir)]
        if args.compare:
            results.append(soak(args, inject=True, run_dir=run_dir))
    clean = results[0]
    print(
        f"\nclean: RSS slope {clean['slope_mb_per_generation']:+.3f} MB/generation "
        f"(rank correlation {clean['correlation']:+.2f}) over {clean['generations_measured']} generations "
        f"after fill and warm-up; sentinel warnings: {len(clean['warnings'])}; "
        f"telemetry cost {clean['telemetry_share']:.2%} of generation time"
    )
    if args.compare:
        leak = results[1]
        ratio = leak["slope_mb_per_generation"] / max(abs(clean["slope_mb_per_generation"]), 1e-3)
        print(
            f"leak:  RSS slope {leak['slope_mb_per_generation']:+,.1f} MB/generation over {len(leak['rows'])} "
            f"generations with every critic loss kept ({ratio:,.0f}x the clean slope)"
        )
    print(
        f"RESULT soak: RSS slope {clean['slope_mb_per_generation']:+.3f} MB/generation after fill "
        f"(goal < 1 MB; the original incident grew ~25,000 MB/generation), "
        f"{time.perf_counter() - started:.0f} s in all"
    )
    if args.json:
        args.json.write_text(json.dumps(results, indent=1))


if __name__ == "__main__":
    main()
