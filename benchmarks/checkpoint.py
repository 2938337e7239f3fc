"""How long does the training loop wait for a generation's checkpoint?

The halfcheetah preset (16 members, 256x256 networks, 1000 env steps + 1000 optimizer steps per
generation) with its 1,000,000-transition replay filled up front with synthetic transitions, so
every shard exists from the first save. It runs ``--generations`` real generations and reports,
for each, the generation's time and the time the loop was blocked by its checkpoint (local
commit, retention and queueing the upload; uploads themselves run in the background).

Baseline, measured in the same run: the whole replay written every generation, as before replay
sharding (every shard marked changed before the save), ``--saves`` times.

    python benchmarks/checkpoint.py                        # 3 real generations (~3 min on 2 cores)
    python benchmarks/checkpoint.py --checkpoint-uri s3://bucket/prefix   # also upload in the background
    python benchmarks/checkpoint.py --quick                # pendulum-sized smoke run

Goal (issue 3): blocked time <= 5% of the generation's time.
"""

from __future__ import annotations

import argparse
import contextlib
import io
import statistics
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from cloud import checkpoint as ckpt  # noqa: E402
from config import build_config  # noqa: E402
from training import runs  # noqa: E402
from training.trainer import Trainer  # noqa: E402


def fill_replay(trainer: Trainer, seed: int = 0) -> None:
    """Every row of the replay holds a synthetic transition (what a long run's buffer looks like)."""
    rng = np.random.default_rng(seed)
    replay = trainer.replay
    for array in replay.data.values():
        if array.dtype == np.bool_:
            array[...] = rng.random(array.shape) < 0.001
        else:
            array[...] = rng.standard_normal(array.shape, dtype=np.float32)
    replay.filled_rows = replay.rows
    replay.cursor = 0
    replay._dirty[:] = True


def written_mb(trainer: Trainer, before: set[str]) -> float:
    """MiB the newest checkpoint wrote (and will upload): its own objects and its new shards."""
    manifest = ckpt.read_manifest(trainer.storage, trainer.run_name, trainer.counters.generation - 1)
    own = sum(entry["size"] for entry in manifest["objects"].values())
    new = sum(ref["size"] for ref in manifest["shared"].values() if ref["key"] not in before)
    return (own + new) / 2**20


def stored_keys(trainer: Trainer) -> set[str]:
    return {ref.key for ref in trainer.stored_blobs.values()}


def run_generations(trainer: Trainer, count: int) -> list[tuple[float, float, float]]:
    """(generation seconds, checkpoint-blocked seconds, MiB written) for ``count`` real generations."""
    results = []
    for _ in range(count):
        generation = trainer.counters.generation
        before = stored_keys(trainer)
        with contextlib.redirect_stdout(io.StringIO()):
            record = trainer.run_generation(generation)
        results.append((record["generation_s"], trainer.checkpoint_s, written_mb(trainer, before)))
        print(
            f"  generation {generation + 1}: {record['generation_s']:6.1f}s, checkpoint blocked "
            f"{trainer.checkpoint_s:5.2f}s, wrote {results[-1][2]:5.0f} MiB"
            f"{' (every shard: the first save)' if generation == 0 else ''}",
            flush=True,
        )
    return results


def whole_replay_saves(trainer: Trainer, count: int) -> list[tuple[float, float]]:
    """(checkpoint-blocked seconds, MiB written) when every replay shard is written (the baseline)."""
    results = []
    for _ in range(count):
        trainer.replay._dirty[:] = True
        trainer.counters.generation += 1
        trainer.save_checkpoint()
        results.append((trainer.checkpoint_s, written_mb(trainer, set())))
    return results


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--generations", type=int, default=3, help="real generations (the first writes every shard)")
    parser.add_argument("--saves", type=int, default=3, help="baseline saves of the whole replay")
    parser.add_argument("--checkpoint-uri", default="", help="also upload to this location in the background")
    parser.add_argument("--quick", action="store_true", help="pendulum preset with a 100k replay: a smoke run")
    args = parser.parse_args()

    with tempfile.TemporaryDirectory(prefix="evorl-ckpt-bench-") as tmp:
        preset = "pendulum" if args.quick else "halfcheetah"
        extra = {
            "run.run_dir": tmp,
            "run.name": "bench",
            "run.tensorboard": False,
            "run.progress": False,
            "run.device": "cpu",
            "run.checkpoint_uri": args.checkpoint_uri,
            "train.generations": args.generations + args.saves,
        }
        if args.quick:
            extra["replay.capacity"] = 100_000
        cfg = build_config(preset, extra=extra)
        trainer = runs.start(cfg)
        fill_replay(trainer)
        replay = trainer.replay
        print(
            f"{preset}: P={cfg.population}, hidden {cfg.agent.hidden_sizes}, replay {replay.capacity:,} transitions "
            f"({replay.nbytes / 2**20:,.0f} MiB in {-(-replay.rows // replay.shard_rows)} shards of "
            f"{cfg.run.replay_shard_mb:g} MiB), {cfg.train.steps_per_generation} env steps and "
            f"{cfg.train.updates_per_generation} updates per generation",
            flush=True,
        )
        started = time.perf_counter()
        real = run_generations(trainer, args.generations)
        baseline = whole_replay_saves(trainer, args.saves)
        upload_note = ""
        if trainer.uploader is not None:
            waited = time.perf_counter()
            trainer.uploader.wait(600)
            upload_note = f"; uploads finished {time.perf_counter() - waited:.1f}s after the last save"
        trainer.close()
        total = time.perf_counter() - started

    steady = real[1:] or real
    generation_s = statistics.median(g for g, _, _ in steady)
    sharded_s = statistics.median(c for _, c, _ in steady)
    sharded_mb = statistics.median(mb for _, _, mb in steady)
    whole_s = statistics.median(c for c, _ in baseline)
    whole_mb = statistics.median(mb for _, mb in baseline)
    print(f"\nper generation (median of generations 2..{args.generations}; {total:.0f}s in all{upload_note})")
    print(f"  generation time                  {generation_s:8.2f}s")
    print(
        f"  blocked, changed shards only     {sharded_s:8.2f}s  = {100 * sharded_s / generation_s:5.2f}% of it; "
        f"{sharded_mb:,.0f} MiB written (and uploaded)"
    )
    print(
        f"  blocked, whole replay (baseline) {whole_s:8.2f}s  = {100 * whole_s / generation_s:5.2f}% of it; "
        f"{whole_mb:,.0f} MiB written (and uploaded)"
    )
    print(f"  baseline / sharded               {whole_s / sharded_s:8.1f}x time, {whole_mb / sharded_mb:.1f}x bytes")
    print(f"  goal: <= 5% blocked -> {'met' if sharded_s <= 0.05 * generation_s else 'NOT met'}")


if __name__ == "__main__":
    main()
