"""How long does the training loop wait for a generation's checkpoint?

The halfcheetah preset (16 members, 256x256 networks, 1000 env steps + 1000 optimizer steps per
generation) with its 1,000,000-transition replay filled up front with synthetic transitions, so
every shard exists from the first save. It runs ``--generations`` real generations and reports,
for each, the generation's time and the time the loop was blocked by its checkpoint (local
commit, retention and queueing the upload; uploads themselves run in the background).

Baseline, measured in the same run: the whole replay written every generation, as before replay
sharding (every shard marked changed before the save), ``--saves`` times.

Tensor format before/after (issue 9), in the same run: ``--pairs`` pairs of saves, each pair one
with the tensors encoded by ``torch.save`` (the previous format, evorl-checkpoint/2) and one with
safetensors (the current format), in alternating order, each after the same replay shards changed
as in the last real generation; and the time to decode the tensors on resume
(``torch.load(weights_only=True)`` before, the checked safetensors reader after).

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
from unittest import mock

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from cloud import checkpoint as ckpt  # noqa: E402
from cloud import tensorfile  # noqa: E402
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


def run_generations(trainer: Trainer, count: int, changed: list[np.ndarray]) -> list[tuple[float, float, float]]:
    """(generation seconds, checkpoint-blocked seconds, MiB written) for ``count`` real generations;
    ``changed`` gets each generation's changed-shard mask, as its save saw it."""
    save = trainer.save_checkpoint

    def noting_changed_shards() -> None:
        changed.append(trainer.replay._dirty.copy())
        save()

    results = []
    for _ in range(count):
        generation = trainer.counters.generation
        before = stored_keys(trainer)
        with (
            contextlib.redirect_stdout(io.StringIO()),
            mock.patch.object(trainer, "save_checkpoint", noting_changed_shards),
        ):
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


def torch_save_bytes(tensors: dict[str, torch.Tensor]) -> bytes:
    """The previous format's tensor encoder (evorl-checkpoint/2), for the before/after comparison."""
    buffer = io.BytesIO()
    torch.save({name: t.detach().cpu().contiguous() for name, t in tensors.items()}, buffer)
    return buffer.getvalue()


ENCODERS = {"before": torch_save_bytes, "after": tensorfile.encode}
"""The tensor encoders compared: torch.save (previous format) and safetensors (current format)."""


def paired_saves(trainer: Trainer, pairs: int, changed: np.ndarray) -> dict[str, list[float]]:
    """Checkpoint-blocked seconds per encoder: ``pairs`` saves each, alternating which goes first,
    each after the shards in ``changed`` changed (the same work as a real generation's save)."""
    blocked: dict[str, list[float]] = {name: [] for name in ENCODERS}
    for i in range(pairs):
        for name in list(ENCODERS)[:: 1 if i % 2 == 0 else -1]:
            trainer.replay._dirty[:] = changed
            trainer.counters.generation += 1
            with mock.patch.object(tensorfile, "encode", ENCODERS[name]):  # what ckpt.save calls
                trainer.save_checkpoint()
            blocked[name].append(trainer.checkpoint_s)
    return blocked


def decode_times(trainer: Trainer, repeats: int = 5) -> dict[str, tuple[float, float]]:
    """(median seconds to decode, MiB) of the trainer's tensors in each format, as a resume reads them."""
    tensors = trainer.state().tensors
    decoders = {
        "before": lambda data: torch.load(io.BytesIO(data), weights_only=True, map_location="cpu"),
        "after": tensorfile.decode,
    }
    result = {}
    for name, decode in decoders.items():
        data = ENCODERS[name](tensors)
        seconds = []
        for _ in range(repeats):
            started = time.perf_counter()
            decode(data)
            seconds.append(time.perf_counter() - started)
        result[name] = (statistics.median(seconds), len(data) / 2**20)
    return result


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--generations", type=int, default=3, help="real generations (the first writes every shard)")
    parser.add_argument("--saves", type=int, default=3, help="baseline saves of the whole replay")
    parser.add_argument("--pairs", type=int, default=4, help="saves with each tensor format (before/after)")
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
            "train.generations": args.generations + args.saves + 2 * args.pairs,
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
        changed: list[np.ndarray] = []
        real = run_generations(trainer, args.generations, changed)
        baseline = whole_replay_saves(trainer, args.saves)
        formats = paired_saves(trainer, args.pairs, changed[-1])
        decoded = decode_times(trainer)
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
    before_s, after_s = (statistics.median(formats[name]) for name in ("before", "after"))
    print(
        f"\ntensor format (median of {args.pairs} saves each, alternating; the shards of generation "
        f"{args.generations}: {int(changed[-1].sum())} changed)"
    )
    print(
        f"  blocked, torch.save (before)     {before_s:8.2f}s  = {100 * before_s / generation_s:5.2f}% of a generation"
    )
    print(f"  blocked, safetensors (after)     {after_s:8.2f}s  = {100 * after_s / generation_s:5.2f}% of a generation")
    print(f"  after / before                   {after_s / before_s:8.2f}x")
    (load_before, mb_before), (load_after, mb_after) = decoded["before"], decoded["after"]
    print(
        f"  decode on resume                 {1000 * load_before:6.0f} ms torch.load(weights_only=True) of "
        f"{mb_before:,.1f} MiB, {1000 * load_after:.0f} ms checked safetensors of {mb_after:,.1f} MiB"
    )


if __name__ == "__main__":
    main()
