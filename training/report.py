"""What a person and a machine read while the run goes on: a progress bar, a status block
after each generation, a JSONL log and TensorBoard scalars."""

from __future__ import annotations

import contextlib
import json
import os
import re
import sys
import time
import warnings
from collections.abc import Iterable
from pathlib import Path
from typing import Any, TextIO

import numpy as np

from config import UserError

DREAMER_LOSSES = ("reconstruction", "reward", "continue", "kl_dyn", "kl_rep")
"""World-model losses the status block shows (the log holds every ``dreamer_*`` metric)."""


class LogWriteError(UserError):
    """A log file could not be written (a full disk, a read-only mount): shown as one line."""


class ProgressBar:
    """A one-line ``tqdm`` bar on a terminal: the generation's label, phase, rate, time left for the
    generation and for the run; silent elsewhere (nothing is written when ``stream`` is not a tty).

    The run's time left assumes the generations still to come (read from a label ``gen G/N``) each
    take as long as this one is projected to; the rate counts work units (rollout steps of all
    streams and optimizer steps), so the estimates settle once a phase has run a while."""

    REDRAW_S = 0.1

    def __init__(self, total: int, label: str, enabled: bool, stream: TextIO = sys.stderr) -> None:
        self.total = max(total, 1)
        self.label = label
        self.stream = stream
        self.enabled = enabled and stream.isatty()
        self.done = 0
        self.started = time.perf_counter()
        self.drawn = 0.0
        match = re.fullmatch(r"gen (\d+)/(\d+)", label)
        self.generations_after = int(match[2]) - int(match[1]) if match else 0
        self._bar: Any = None
        if self.enabled:
            from tqdm import tqdm

            self._bar = tqdm(
                total=self.total,
                desc=label,
                file=stream,
                leave=False,
                dynamic_ncols=True,
                mininterval=0,  # ``advance`` redraws at most every REDRAW_S itself
                miniters=1,
                unit="step",
                bar_format="{desc} {percentage:3.0f}%|{bar:20}| {rate_fmt}{postfix}",
            )

    def advance(self, amount: int = 1, phase: str = "") -> None:
        self.done += amount
        if self._bar is None:
            return
        now = time.perf_counter()
        if now - self.drawn > self.REDRAW_S or self.done >= self.total:
            self.drawn = now
            self._bar.set_postfix_str(self.postfix(phase, now), refresh=False)
            self._bar.update(min(self.done, self.total) - self._bar.n)

    def postfix(self, phase: str, now: float) -> str:
        """``phase  generation left 0:12  run left 3:40`` (estimates from this generation's rate)."""
        elapsed = now - self.started
        done = min(self.done, self.total)
        if done == 0 or elapsed <= 0:
            return f"{phase:<8}"
        left = (self.total - done) * elapsed / done
        run_left = left + self.generations_after * (elapsed + left)
        return f"{phase:<8} gen left {_clock(left)}  run left {_clock(run_left)}"

    def close(self) -> None:
        if self._bar is not None:
            self._bar.close()
            self._bar = None


def _clock(seconds: float) -> str:
    """``m:ss``, or ``h:mm:ss`` from an hour on."""
    whole = int(round(seconds))
    hours, rest = divmod(whole, 3600)
    return f"{hours}:{rest // 60:02d}:{rest % 60:02d}" if hours else f"{rest // 60}:{rest % 60:02d}"


def status_block(record: dict[str, Any]) -> str:
    """The compact System Status block printed after each generation."""
    r = record
    lines = [
        f"== System Status == generation {r['generation'] + 1}/{r['generations']}  "
        f"({r['env_id']}, P={r['population']}{' + Dreamer' if 'dreamer_fitness' in r else ''})",
        f"  env steps     {r['env_steps_total']:>12,}  ({r['env_steps_per_s']:,.0f}/s this generation)",
        f"  updates       {r['updates_total']:>12,}  ({r['updates_per_s']:,.1f} optimizer steps/s)",
        f"  replay        {r['replay_size']:>12,} / {r['replay_capacity']:,}",
        f"  time          {r['generation_s']:>11.1f}s  "
        f"(average {r['generation_avg_s']:.1f}s, total {r['elapsed_s'] / 60:.1f} min)",
        f"  fitness       best {r['fitness_best']:.1f}  median {r['fitness_median']:.1f}  "
        f"worst {r['fitness_worst']:.1f}",
        f"  elite         slot {r['elite_slot']}  lineage {r['elite_lineage']}"
        + ("  (the Dreamer member is better)" if r.get("dreamer_elite") else ""),
        _dreamer_lines(r),
        _memory_line(r),
        _census_line(r),
        _checkpoint_line(r),
        _ray_line(r),
        "  leak sentinel "
        + (
            f"WARNING: steady growth in {', '.join(r['leak_warnings'])}"
            if r.get("leak_warnings")
            else "no steady growth"
        ),
    ]
    if "cuda_allocated_mb" in r:
        lines.append(
            f"  cuda          allocated {r['cuda_allocated_mb']:,.0f} MB  reserved {r['cuda_reserved_mb']:,.0f} MB  "
            f"peak {r['cuda_peak_mb']:,.0f} MB  driver used {r['cuda_driver_used_mb']:,.0f} MB"
            + (f"  utilisation {r['cuda_utilization_pct']:.0f}%" if "cuda_utilization_pct" in r else "")
        )
        lines.append(
            f"                small pool {r.get('cuda_small_pool_mb', 0):,.0f} MB  "
            f"large pool {r.get('cuda_large_pool_mb', 0):,.0f} MB  "
            f"alloc retries {r.get('cuda_alloc_retries', 0):,.0f}  "
            f"pinned host {r.get('cuda_pinned_host_mb', 0):,.0f} MB"
        )
    return "\n".join([line for line in lines if line])


def _ray_line(r: dict[str, Any]) -> str:
    """Ray rollout workers, the ones replaced, and the object store in use ('' on the local backend)."""
    if "ray_workers" not in r:
        return ""
    return (
        f"  ray           {r['ray_workers']:.0f} rollout workers  restarted {r['ray_workers_restarted']:.0f} "
        f"(this generation), {r['ray_workers_restarted_total']:.0f} in all  "
        f"object store {r['ray_object_store_mb']:,.1f} MB"
    )


def _dreamer_lines(r: dict[str, Any]) -> str:
    """The Dreamer member's fitness, rank among P + 1 and world-model losses ('' without it)."""
    if "dreamer_fitness" not in r:
        return ""
    elite = "  ELITE" if r.get("dreamer_elite") else ""
    health = "" if r.get("dreamer_finite", 1.0) else "  NON-FINITE world-model loss: fitness -inf"
    line = (
        f"  dreamer       fitness {r['dreamer_fitness']:.1f}  rank {r['dreamer_rank']}/{r['population'] + 1}"
        f"{elite}  {int(r.get('dreamer_updates', 0))} model updates "
        f"({r.get('dreamer_train_s', 0.0) + r.get('dreamer_eval_s', 0.0):.1f}s){health}"
    )
    losses = [f"{name} {r[f'dreamer_{name}']:.3g}" for name in DREAMER_LOSSES if f"dreamer_{name}" in r]
    return line + ("\n  world model   " + "  ".join(losses) if losses else "") + _imagination_line(r)


def _imagination_line(r: dict[str, Any]) -> str:
    """Imagined-vs-real reward error, the model buffer, and screening ('' when none applies)."""
    parts = [
        f"reward err h{h} {r[f'dreamer_reward_error_h{h}']:.3g}" for h in (1, 15) if f"dreamer_reward_error_h{h}" in r
    ]
    if "dreamer_model_transitions" in r:
        parts.append(
            f"model buffer {r.get('dreamer_model_buffer', 0):,.0f} (members used {r['dreamer_model_transitions']:,})"
        )
    if "screen_evaluated" in r:
        saved = r.get("screen_saved_steps", 0)
        parts.append(f"screened: {r['screen_evaluated']}/{r['population']} played ({saved:,} env steps saved)")
    if "screen_spearman" in r:
        parts.append(f"imagined vs real spearman {r['screen_spearman']:.2f}")
    return "\n  imagination   " + "  ".join(parts) if parts else ""


def _checkpoint_line(r: dict[str, Any]) -> str:
    if not r.get("checkpoint_s"):
        return ""
    line = f"  checkpoint    previous commit blocked {r['checkpoint_s']:.2f}s"
    if "upload_pending" not in r:
        return line
    if not r["upload_pending"]:  # up to date, unless a generation was skipped or retention fails
        return line + (f"  upload: {r['upload_error']}" if r["upload_error"] else "  upload up to date")
    error = f"  retrying: {r['upload_error']}" if r["upload_error"] else ""
    return line + f"  upload {r['upload_pending']} generation(s) behind ({r['upload_lag_s']:.0f}s){error}"


def _memory_line(r: dict[str, Any]) -> str:
    uss = f"  USS {r['uss_mb']:,.0f} MB" if "uss_mb" in r else ""
    filled = f"  replay filled {r['replay_filled_mb']:,.0f} MB" if "replay_filled_mb" in r else ""
    return f"  memory        RSS {r['rss_mb']:,.0f} MB{uss}{filled}"


def _census_line(r: dict[str, Any]) -> str:
    if "live_tensors" not in r:
        return ""
    return (
        f"  tensors       {r['live_tensors']:,.0f} live ({r['live_tensor_mb']:,.1f} MB), "
        f"{r['grad_tensors']:,.0f} with a graph, evicted replay alive {r.get('evicted_alive_mb', 0):,.1f} MB"
    )


class MetricsLog:
    """Per-generation records to ``metrics.jsonl`` and scalars to TensorBoard (``tb/``)."""

    def __init__(self, run_path: Path, tensorboard: bool) -> None:
        self.path = run_path / "metrics.jsonl"
        self.lineage_path = run_path / "lineage.jsonl"
        self.writer: Any = None
        if tensorboard:
            try:
                from torch.utils.tensorboard import SummaryWriter
            except ImportError:
                warnings.warn("tensorboard is not installed; TensorBoard scalars are off", stacklevel=2)
            else:
                self.writer = SummaryWriter(str(run_path / "tb"))

    def write(self, record: dict[str, Any], members: dict[str, list[float]]) -> None:
        """Append one generation: ``record`` of scalars, ``members`` metric -> P floats."""
        _append_lines(self.path, [json.dumps({**record, "members": members})], record["generation"])
        if self.writer is None:
            return
        step = record["env_steps_total"]
        for key, value in record.items():
            if isinstance(value, (int, float)) and not isinstance(value, bool):
                self.writer.add_scalar(f"run/{key}", value, step)
        for name, values in members.items():
            finite = [v for v in values if np.isfinite(v)]
            if finite:
                self.writer.add_scalar(f"population/{name}_max", max(finite), step)
                self.writer.add_scalar(f"population/{name}_median", float(np.median(finite)), step)
            for i, v in enumerate(values):
                self.writer.add_scalar(f"member_{i:02d}/{name}", v, step)
        self.writer.flush()

    def write_events(self, events: list[dict[str, Any]]) -> None:
        """Append evolution's lineage records (who replaced whom, with what)."""
        if events:
            _append_lines(self.lineage_path, [json.dumps(event) for event in events], events[0]["generation"])

    def truncate_after(self, generation: int) -> None:
        """Drop records past ``generation`` (a resume runs the generations after it again), and a
        torn line (a write cut short by a full disk or a crash) with a warning; atomic."""
        for path in (self.path, self.lineage_path):
            if path.exists():
                records = read_records(path)
                replace_lines(path, [line for g, line in records if g <= generation])

    def close(self) -> None:
        if self.writer is not None:
            self.writer.close()


def read_records(path: Path) -> list[tuple[int, str]]:
    """(generation, line) of every complete record in a JSONL log; torn or foreign lines are
    dropped with a warning."""
    records = []
    for number, line in enumerate(path.read_bytes().decode(errors="replace").splitlines(), 1):
        if not line.strip():
            continue
        try:
            generation = json.loads(line)["generation"]
            if not isinstance(generation, int):
                raise TypeError
        except (ValueError, KeyError, TypeError):
            print(f"warning: {path}:{number} is not a complete record (a write cut short?); dropped", flush=True)
            continue
        records.append((generation, line))
    return records


def replace_lines(path: Path, lines: Iterable[str]) -> None:
    """Rewrite ``path`` atomically (a synced temporary file, then a rename); one-line error if it fails."""
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    try:
        with tmp.open("w") as f:
            f.writelines(line + "\n" for line in lines)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except OSError as err:
        tmp.unlink(missing_ok=True)
        raise LogWriteError(f"cannot rewrite {path}: {err.strerror or err}; it is unchanged") from None


def _append_lines(path: Path, lines: list[str], generation: int) -> None:
    """Append whole lines, or nothing: a failed write is cut back to where the file ended, so no
    torn line stays behind, and said in one line naming the last complete checkpoint."""
    data = memoryview("".join(line + "\n" for line in lines).encode())
    try:
        fd = os.open(path, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o644)
        try:
            end = os.fstat(fd).st_size
            try:
                while data:
                    data = data[os.write(fd, data) :]
            except OSError:
                with contextlib.suppress(OSError):
                    os.ftruncate(fd, end)
                raise
        finally:
            os.close(fd)
    except OSError as err:
        last = f"generation {generation}" if generation > 0 else "none yet"
        raise LogWriteError(f"cannot write {path}: {err.strerror or err}; last complete checkpoint: {last}") from None
