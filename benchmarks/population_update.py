"""Benchmark: one TD3 population update, batched design versus a loop over per-member modules.

The batched design is ``agents.td3.TD3Population.update`` fed ``K`` micro-batches of shape
``(P, B, ...)``. The baseline is what a careful person writes without batching: ``P`` separate
members, each an ordinary ``nn.Sequential`` actor, twin critics and target copies with their own
``torch.optim.Adam``, doing the same TD3 step (critic update accumulating ``K`` micro-batches,
delayed actor and target update every ``policy_delay`` calls), one member after another.

Both see the same data (member ``i`` of the baseline gets row ``i`` of every batch). Timing
alternates the two designs block by block (ABAB...) so drift on a shared machine hits both;
the result is the ratio of the median time per update, never an absolute figure.

OpenMP's wait policy matters a lot on 2 cores and is printed with the result. With the default
(spinning) policy an idle machine runs the looped design's many small parallel ops well, but a
busy one stalls every parallel region whose peer thread is descheduled (up to seconds per update,
mostly in the looped design), so the ratio swings wildly. ``OMP_WAIT_POLICY=PASSIVE`` removes
the stalls but makes each small parallel region wake sleeping threads, which slows the looped
design on an idle machine. Neither is set here; compare runs under the same policy.

Run from the repository root::

    python benchmarks/population_update.py            # default, ~1-3 min on 2 CPU cores
    python benchmarks/population_update.py --quick    # smoke run, < 30 s
"""

from __future__ import annotations

import os
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import argparse  # noqa: E402
import copy  # noqa: E402
import json  # noqa: E402
import statistics  # noqa: E402
import time  # noqa: E402
from collections.abc import Callable, Mapping, Sequence  # noqa: E402
from typing import Any  # noqa: E402

import torch  # noqa: E402
from torch import Tensor, nn  # noqa: E402

from agents.base import Batch  # noqa: E402
from agents.td3 import TD3Population  # noqa: E402
from config import AgentConfig  # noqa: E402

OBS_DIM, ACT_DIM = 17, 6
"""HalfCheetah's observation and action sizes."""


# ---------------------------------------------------------------- the baseline


def mlp(in_features: int, hidden: Sequence[int], out_features: int) -> nn.Sequential:
    """An ordinary ReLU MLP, the same shape as one member of ``agents.batched.BatchedMLP``."""
    sizes = [in_features, *hidden, out_features]
    layers: list[nn.Module] = []
    for a, b in zip(sizes[:-1], sizes[1:], strict=False):
        layers += [nn.Linear(a, b), nn.ReLU()]
    return nn.Sequential(*layers[:-1])


def frozen_copy(module: nn.Module) -> nn.Module:
    """A target network: a deep copy that autograd ignores."""
    target = copy.deepcopy(module)
    target.requires_grad_(False)
    return target


class LoopedMember(nn.Module):
    """One TD3 member built the usual way: separate modules, ``torch.optim.Adam`` per network group."""

    def __init__(self, obs_dim: int, act_dim: int, cfg: AgentConfig) -> None:
        super().__init__()
        self.cfg = cfg
        self.actor = mlp(obs_dim, cfg.hidden_sizes, act_dim)
        self.critic1 = mlp(obs_dim + act_dim, cfg.hidden_sizes, 1)
        self.critic2 = mlp(obs_dim + act_dim, cfg.hidden_sizes, 1)
        self.actor_target = frozen_copy(self.actor)
        self.critic1_target = frozen_copy(self.critic1)
        self.critic2_target = frozen_copy(self.critic2)
        self.actor_opt = torch.optim.Adam(self.actor.parameters(), lr=cfg.actor_lr)
        self.critic_opt = torch.optim.Adam([*self.critic1.parameters(), *self.critic2.parameters()], lr=cfg.critic_lr)
        self.critic_updates = 0

    def update(self, batches: Sequence[Batch]) -> dict[str, float]:
        """One optimizer step accumulating ``len(batches)`` micro-batches of shape ``(B, ...)``."""
        metrics = self.update_critics(batches)
        self.critic_updates += 1
        if self.critic_updates % self.cfg.policy_delay == 0:
            metrics["actor_loss"] = self.update_actor(batches)
            self.update_targets()
        return metrics

    def update_critics(self, batches: Sequence[Batch]) -> dict[str, float]:
        self.critic_opt.zero_grad(set_to_none=True)
        loss_sum = torch.zeros((), device=batches[0].obs.device)
        q_sum = torch.zeros_like(loss_sum)
        for batch in batches:
            target = self.td_target(batch)
            sa = torch.cat([batch.obs, batch.action], dim=-1)
            q1 = self.critic1(sa).squeeze(-1)
            q2 = self.critic2(sa).squeeze(-1)
            loss = (q1 - target).pow(2).mean() + (q2 - target).pow(2).mean()
            (loss / len(batches)).backward()
            loss_sum += loss.detach()
            q_sum += q1.detach().mean()
        self.critic_opt.step()
        k = len(batches)
        return {"critic_loss": (loss_sum / k).item(), "q_mean": (q_sum / k).item()}

    def update_actor(self, batches: Sequence[Batch]) -> float:
        self.actor_opt.zero_grad(set_to_none=True)
        self.critic1.requires_grad_(False)
        loss_sum = torch.zeros((), device=batches[0].obs.device)
        try:
            for batch in batches:
                action = torch.tanh(self.actor(batch.obs))
                loss = -self.critic1(torch.cat([batch.obs, action], dim=-1)).mean()
                (loss / len(batches)).backward()
                loss_sum += loss.detach()
        finally:
            self.critic1.requires_grad_(True)
        self.actor_opt.step()
        return (loss_sum / len(batches)).item()

    @torch.no_grad()
    def td_target(self, batch: Batch) -> Tensor:
        """Clipped double-Q target with target policy smoothing, ``(B,)``."""
        cfg = self.cfg
        noise = (torch.randn_like(batch.action) * cfg.policy_noise).clamp(-cfg.noise_clip, cfg.noise_clip)
        next_action = (torch.tanh(self.actor_target(batch.next_obs)) + noise).clamp(-1.0, 1.0)
        sa = torch.cat([batch.next_obs, next_action], dim=-1)
        next_q = torch.min(self.critic1_target(sa), self.critic2_target(sa)).squeeze(-1)
        return batch.reward + cfg.gamma * (1.0 - batch.terminated) * next_q

    @torch.no_grad()
    def update_targets(self) -> None:
        pairs = [
            (self.actor, self.actor_target),
            (self.critic1, self.critic1_target),
            (self.critic2, self.critic2_target),
        ]
        for online, target in pairs:
            for p, t in zip(online.parameters(), target.parameters(), strict=True):
                t.lerp_(p, self.cfg.tau)


class LoopedPopulation:
    """``P`` independent :class:`LoopedMember` s updated one after another."""

    def __init__(self, population: int, obs_dim: int, act_dim: int, cfg: AgentConfig, device: torch.device):
        self.members = [LoopedMember(obs_dim, act_dim, cfg).to(device) for _ in range(population)]

    def update(self, per_member: Sequence[Sequence[Batch]]) -> dict[str, list[float]]:
        """``per_member[i]`` holds member ``i``'s micro-batches; returns metric -> P floats."""
        results = [member.update(batches) for member, batches in zip(self.members, per_member, strict=True)]
        return {name: [r[name] for r in results] for name in results[0]}


# ---------------------------------------------------------------- data and timing


def make_batches(population: int, micro_batches: int, batch_size: int, device: torch.device) -> list[Batch]:
    """``K`` random micro-batches of shape ``(P, B, ...)`` (contents do not matter for speed)."""

    def one() -> Batch:
        shape = (population, batch_size)
        return Batch(
            obs=torch.randn(*shape, OBS_DIM, device=device),
            action=torch.rand(*shape, ACT_DIM, device=device) * 2 - 1,
            reward=torch.randn(*shape, device=device),
            next_obs=torch.randn(*shape, OBS_DIM, device=device),
            terminated=(torch.rand(*shape, device=device) < 0.01).float(),
        )

    return [one() for _ in range(micro_batches)]


def split_members(batches: Sequence[Batch], population: int) -> list[list[Batch]]:
    """Member ``i``'s share of every ``(P, B, ...)`` batch, as contiguous ``(B, ...)`` batches."""
    return [[Batch(*(t[i].contiguous() for t in b)) for b in batches] for i in range(population)]


def synchronize(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def time_block(step: Callable[[], object], calls: int, device: torch.device) -> tuple[float, float]:
    """(wall seconds, process CPU seconds) per call of ``step`` over ``calls`` back-to-back calls."""
    synchronize(device)
    wall, cpu = time.perf_counter(), time.process_time()
    for _ in range(calls):
        step()
    synchronize(device)
    return (time.perf_counter() - wall) / calls, (time.process_time() - cpu) / calls


def with_threads(threads: int, step: Callable[[], object]) -> Callable[[], object]:
    """``step`` run with ``threads`` intra-op threads (switching costs well under a microsecond)."""

    def call() -> object:
        torch.set_num_threads(threads)
        return step()

    return call


def alternate(
    steps: Mapping[str, Callable[[], object]], rounds: int, calls: int, device: torch.device
) -> tuple[dict[str, list[float]], dict[str, list[float]]]:
    """ABAB...: each round times every step once, the order flipping each round.

    Returns (wall, CPU) seconds per call, one entry per round, by step name.
    """
    names = list(steps)
    wall: dict[str, list[float]] = {name: [] for name in names}
    cpu: dict[str, list[float]] = {name: [] for name in names}
    for r in range(rounds):
        for name in names if r % 2 == 0 else names[::-1]:
            w, c = time_block(steps[name], calls, device)
            wall[name].append(w)
            cpu[name].append(c)
    return wall, cpu


# ---------------------------------------------------------------- main


def parse_args(argv: Sequence[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="few repeats, finishes in well under 30 s")
    parser.add_argument("--device", default="cpu", help="cpu (default) or cuda")
    parser.add_argument("--population", type=int, default=16)
    parser.add_argument("--hidden", type=int, nargs="+", default=[256, 256])
    parser.add_argument("--batch-size", type=int, default=256)
    parser.add_argument("--accumulation", "-k", type=int, default=6, help="micro-batches per update (K)")
    parser.add_argument("--rounds", type=int, default=0, help="ABAB rounds (0: 2 quick, 10 default)")
    parser.add_argument("--threads", type=int, default=0, help="torch.set_num_threads (0: leave as is)")
    parser.add_argument(
        "--baseline-threads", type=int, default=0, help="threads for the looped baseline only (0: same as batched)"
    )
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--json", type=Path, help="also write the result here")
    return parser.parse_args(argv)


def run(args: argparse.Namespace) -> dict[str, Any]:
    """Build both designs, warm them up, time them alternately; returns the result record."""
    device = torch.device(args.device)
    if args.threads > 0:
        torch.set_num_threads(args.threads)
    threads = torch.get_num_threads()
    baseline_threads = args.baseline_threads or threads
    torch.manual_seed(args.seed)
    cfg = AgentConfig(hidden_sizes=list(args.hidden), batch_size=args.batch_size)
    p = args.population
    batched = TD3Population(p, OBS_DIM, ACT_DIM, cfg, device)
    looped = LoopedPopulation(p, OBS_DIM, ACT_DIM, cfg, device)
    batches = make_batches(p, args.accumulation, args.batch_size, device)
    per_member = split_members(batches, p)
    steps = {
        "batched": with_threads(threads, lambda: batched.update(batches)),
        "looped": with_threads(baseline_threads, lambda: looped.update(per_member)),
    }
    # Warm up (first calls allocate optimizer state and caches), then time blocks of
    # ``policy_delay`` calls so every block holds exactly one delayed actor update.
    calls = cfg.policy_delay
    alternate(steps, rounds=1, calls=1 if args.quick else calls, device=device)
    rounds = args.rounds or (2 if args.quick else 10)
    wall, cpu = alternate(steps, rounds, calls, device)
    median = {name: statistics.median(ts) for name, ts in wall.items()}
    return {
        "benchmark": "population_update",
        "device": str(device),
        "torch": torch.__version__,
        "threads": threads,
        "baseline_threads": baseline_threads,
        "omp_wait_policy": os.environ.get("OMP_WAIT_POLICY", "default"),
        "population": p,
        "hidden": list(args.hidden),
        "batch_size": args.batch_size,
        "accumulation": args.accumulation,
        "obs_dim": OBS_DIM,
        "act_dim": ACT_DIM,
        "rounds": rounds,
        "updates_per_block": calls,
        "seconds_per_update": wall,
        "cpu_seconds_per_update": cpu,
        "median_s": median,
        "speedup": median["looped"] / median["batched"],
        "speedup_best_blocks": min(wall["looped"]) / min(wall["batched"]),
    }


def report(result: dict[str, Any]) -> None:
    """Print the table and the RESULT line."""
    print(
        f"population update: P={result['population']} hidden={result['hidden']} "
        f"batch={result['batch_size']} K={result['accumulation']} obs={result['obs_dim']} act={result['act_dim']}"
    )
    print(f"{'design':<10}{'median ms':>12}{'min ms':>10}{'max ms':>10}{'cpu ms':>10}{'blocks':>8}")
    for name, ts in result["seconds_per_update"].items():
        cpu = statistics.median(result["cpu_seconds_per_update"][name])
        print(
            f"{name:<10}{1e3 * statistics.median(ts):>12.1f}{1e3 * min(ts):>10.1f}{1e3 * max(ts):>10.1f}"
            f"{1e3 * cpu:>10.1f}{len(ts):>8}"
        )
    print("(ms per update, wall clock; cpu ms = median process CPU time, which counts every busy thread)")
    print(f"ratio of the fastest blocks (least disturbed by other load): {result['speedup_best_blocks']:.2f}x")
    print(
        f"RESULT population_update batched/looped speedup: {result['speedup']:.2f}x "
        f"(device {result['device']}, torch {result['torch']}, threads {result['threads']}, "
        f"baseline threads {result['baseline_threads']}, "
        f"OMP_WAIT_POLICY {result['omp_wait_policy']})"
    )


def main(argv: Sequence[str] | None = None) -> None:
    args = parse_args(argv)
    if torch.device(args.device).type == "cuda" and not torch.cuda.is_available():
        sys.exit(f"--device {args.device}: CUDA is not available in this torch build or machine")
    result = run(args)
    report(result)
    if args.json is not None:
        args.json.write_text(json.dumps(result, indent=2) + "\n")


if __name__ == "__main__":
    main()
