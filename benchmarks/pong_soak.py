"""Pong soak: does the Dreamer-on-Pong configuration that once crashed at step ~53,800 stay flat?

The incident (``../shared/docs/MEMORY.md`` #2): Dreamer on Atari Pong, 84x84 frames stacked 4,
Discrete(6), replay capacity 50,000 steps, batch 16 x sequence 50, 2 environments, a NatureCNN-sized
encoder (32/64/64 channels, 512 features), RSSM deterministic 200 / stochastic 32; RAM grew ~53 MB
per 1,000 steps once the buffer evicted, and the run died at ~53,800 steps.

This runs that configuration with the product's parts: ``make_atari`` (gymnasium's wrappers), the
frame replay that stores each frame once (``training.frames.FrameReplay``), and a ``DreamerAgent`` of
size ``atari`` (deter 200, 32 x 32 categorical latents) with the world model's CNN encoder/decoder.
The agent acts in 2 envs under ``no_grad`` (explore on) and takes one world-model + imagination update
every ``--update-every`` env steps (a reduced train ratio, so it fits 2 CPU cores; DreamerV3's is one
every ~1.6 steps). Every ``--report-every`` env steps it prints RSS after ``gc.collect()``; at the end,
the Theil-Sen slope of RSS over the reports after the buffer is full (MB per 10,000 env steps; goal
< 1; the incident: ~530). Env steps are agent steps (4 emulator frames each), both envs counted.

``--put-back-leak`` is the debug switch that restores the incident's sampling path, to show that this
benchmark sees the leak: whole episodes kept as their own arrays of stacked ``obs``/``next_obs``
(evicted oldest first), batches made of ``torch.from_numpy`` views of them handed to the device with
``non_blocking=True``, and the source of every such copy kept alive, as an asynchronous copy needs
(MEMORY.md does not say what held the incident's references; here a list of in-flight copies that is
never trimmed does). Evicted episodes then stay referenced, and RSS climbs at the rate the buffer
evicts.

    python benchmarks/pong_soak.py                                  # 150,000 env steps (~3x the crash)
    python benchmarks/pong_soak.py --put-back-leak --steps 90000    # the incident's bug, put back
    python benchmarks/pong_soak.py --steps 6000 --capacity 2000 --update-every 500   # a smoke run
"""

from __future__ import annotations

import argparse
import contextlib
import ctypes
import gc
import sys
import time
from collections import deque
from pathlib import Path
from typing import Any

import numpy as np
import psutil
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from agents.dreamer import ActionSpec, DreamerAgent  # noqa: E402
from config import DreamerConfig  # noqa: E402
from training.envs import make_atari  # noqa: E402
from training.frames import FrameReplay  # noqa: E402
from training.memory.sentinel import theil_sen  # noqa: E402
from training.replay import Transitions  # noqa: E402

ENV_ID, ENVS, BATCH, SEQ_LEN = "ALE/Pong-v5", 2, 16, 50
PER_10K = 10_000


class IncidentReplay:
    """The incident's replay, put back behind ``--put-back-leak``: finished episodes as dicts of their
    own arrays (``obs``/``next_obs (T, 4, 84, 84)`` uint8 each), evicted oldest first beyond
    ``capacity`` steps; ``sample_sequences`` builds batches from views ``ep[k][t0:t0 + L]`` copied to
    the device with ``non_blocking=True``, keeping every copy's source in ``in_flight``."""

    def __init__(self, capacity: int, device: torch.device) -> None:
        self.capacity, self.device = capacity, device
        self.episodes: deque[dict[str, np.ndarray]] = deque()
        self.stored = 0
        self.open: list[list[dict[str, Any]]] = [[] for _ in range(ENVS)]
        self.in_flight: list[torch.Tensor] = []
        """The bug: sources of non-blocking copies, views of stored episodes, never released."""

    def __len__(self) -> int:
        return self.stored

    def add(self, step: Transitions) -> None:
        for e in range(ENVS):
            self.open[e].append({
                "obs": step.obs[e], "next_obs": step.next_obs[e], "action": step.action[e],
                "reward": np.float32(step.reward[e]), "terminated": np.bool_(step.terminated[e]),
                "is_first": np.bool_(step.is_first[e]),
            })  # fmt: skip
            if step.terminated[e] or step.truncated[e]:
                self.episodes.append({k: np.stack([s[k] for s in self.open[e]]) for k in self.open[e][0]})
                self.stored += len(self.open[e])
                self.open[e] = []
        while self.stored > self.capacity:
            self.stored -= len(self.episodes.popleft()["reward"])

    def sample_sequences(self, batch: int, length: int, rng: np.random.Generator) -> dict[str, torch.Tensor]:
        long = [ep for ep in self.episodes if len(ep["reward"]) >= length]
        weights = np.array([len(ep["reward"]) - length + 1 for ep in long], np.float64)
        picks = rng.choice(len(long), size=batch, p=weights / weights.sum())
        out: dict[str, list[torch.Tensor]] = {k: [] for k in long[0]}
        for i in picks:
            t0 = int(rng.integers(0, len(long[i]["reward"]) - length + 1))
            for k, values in long[i].items():
                source = torch.from_numpy(values[t0 : t0 + length])  # a view of the stored episode
                self.in_flight.append(source)
                out[k].append(source.to(self.device, non_blocking=True))
        seq = {k: torch.stack(v) for k, v in out.items()}
        seq["is_first"][:, 0] = True
        return seq

    @property
    def filled_rows(self) -> int:
        return self.stored // ENVS


def parse_args() -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--steps", type=int, default=150_000, help="env steps in all (both envs)")
    p.add_argument("--capacity", type=int, default=50_000, help="replay capacity in transitions")
    p.add_argument("--update-every", type=int, default=2_000, help="env steps per model update")
    p.add_argument("--report-every", type=int, default=PER_10K, help="env steps between RSS reports")
    p.add_argument("--put-back-leak", action="store_true", help="debug: the incident's view-sampling bug")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--device", default="cpu")
    p.add_argument("--threads", type=int, default=1, help="torch intra-op threads")
    return p.parse_args()


def main() -> None:
    args = parse_args()
    torch.set_num_threads(args.threads)
    device = torch.device(args.device)
    envs = [make_atari(ENV_ID) for _ in range(ENVS)]
    cfg = DreamerConfig(size="atari", batch_size=BATCH, seq_len=SEQ_LEN)
    agent = DreamerAgent((4, 84, 84), ActionSpec("discrete", 6), cfg, device, args.seed)
    replay: FrameReplay | IncidentReplay = (
        IncidentReplay(args.capacity, device)
        if args.put_back_leak
        else FrameReplay(args.capacity, ENVS, 6, args.seed, frame_shape=(84, 84), stack=4)
    )
    rng = np.random.default_rng(args.seed + 1)
    process = psutil.Process()
    print(f"pong soak: {'INCIDENT BUG PUT BACK' if args.put_back_leak else 'frame replay'}; {ENVS} envs, "
          f"capacity {args.capacity:,}, batch {BATCH} x {SEQ_LEN}, one update per {args.update_every:,} env "
          f"steps, {args.threads} thread(s), {device}")  # fmt: skip
    obs = np.stack([env.reset(seed=args.seed * 100 + e)[0] for e, env in enumerate(envs)])
    is_first = np.ones(ENVS, np.bool_)
    steps = updates = 0
    update_s = 0.0
    points: list[tuple[int, float]] = []
    started = time.perf_counter()
    while steps < args.steps:
        action = agent.act(torch.as_tensor(obs), torch.as_tensor(is_first), explore=True).numpy()
        next_obs, reward = np.empty_like(obs), np.zeros(ENVS, np.float32)
        terminated, truncated = np.zeros(ENVS, np.bool_), np.zeros(ENVS, np.bool_)
        following = obs.copy()
        for e, env in enumerate(envs):
            next_obs[e], reward[e], terminated[e], truncated[e], _ = env.step(int(action[e].argmax()))
            following[e] = env.reset()[0] if terminated[e] or truncated[e] else next_obs[e]
        replay.add(Transitions(obs, action.astype(np.float32), reward, next_obs, terminated, truncated, is_first))
        obs, is_first = following, terminated | truncated
        steps += ENVS
        if steps % args.update_every == 0 and replay.filled_rows >= SEQ_LEN and len(replay) >= BATCH * SEQ_LEN:
            tick = time.perf_counter()
            agent.train_step(replay.sample_sequences(BATCH, SEQ_LEN, rng))
            update_s += time.perf_counter() - tick
            updates += 1
        if steps % args.report_every == 0:
            rss = settled_rss(process)
            full = steps > args.capacity  # both replays evict from here on
            points.append((steps, rss if full else float("nan")))
            minutes = (time.perf_counter() - started) / 60
            print(f"  {steps:>8,} steps  RSS {rss:8.1f} MB  replay {len(replay):>6,}{' (full)' if full else ''}  "
                  f"updates {updates:>4}  {minutes:6.1f} min", flush=True)  # fmt: skip
    minutes = (time.perf_counter() - started) / 60
    print(f"{steps:,} env steps in {minutes:.1f} min: {updates} model updates of {update_s / max(updates, 1):.1f} s "
          f"each, the rest (acting, envs, replay) {(minutes * 60 - update_s) / steps * 1000 * ENVS:.1f} ms "
          f"per step of both envs")  # fmt: skip
    report(points, args.put_back_leak)


def settled_rss(process: psutil.Process) -> float:
    """RSS in MB after ``gc.collect()`` and glibc's ``malloc_trim(0)``: freed heap pages go back to the
    system first, so a reading counts live memory, not what the allocator happens to keep cached
    (without it, one update's freed activations move RSS by +-100 MB between reports)."""
    gc.collect()
    with contextlib.suppress(OSError, AttributeError):  # not glibc: read RSS as it is
        ctypes.CDLL("libc.so.6").malloc_trim(0)
    return float(process.memory_info().rss / 2**20)


def report(points: list[tuple[int, float]], leaking: bool) -> None:
    """The Theil-Sen slope of RSS (MB per 10,000 env steps) over the reports once the buffer is full."""
    after = [(s, r) for s, r in points if np.isfinite(r)][1:]  # the first full report still settles
    if len(after) < 3:
        print("too few reports after the buffer filled for a slope: run more --steps")
        return
    slope, _ = theil_sen([s for s, _ in after], [r for _, r in after])
    per_10k = slope * PER_10K
    verdict = "goal < 1 MB met" if per_10k < 1.0 else "goal < 1 MB NOT met"
    label = "with the incident's bug put back" if leaking else "frame replay"
    print(f"RSS slope after fill ({label}, {len(after)} reports from {after[0][0]:,} to {after[-1][0]:,} steps): "
          f"{per_10k:+.2f} MB per 10,000 env steps ({verdict}; the incident: ~530)")  # fmt: skip


if __name__ == "__main__":
    main()
