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

Designs (``--designs``, timed in turns): ``eager`` (``agent.fast_update=false``, today's baseline
before issue 15), ``fast`` (the fused update, the default), ``compiled`` (fast with
``agent.compile=--compile-mode``; its first calls, the compile time, are reported apart) and
``looped``. Ratios are against ``--baseline``. ``--flops`` also times this machine's dense float32
matmul rate in the same turns and reports each design's achieved matmul FLOP rate as a fraction of
it; ``--scaling 1 4 16 64`` adds the time per member-update at those population sizes. ``--floor``
replays the fast update's matmul calls alone (recorded by the profiler, same shapes, each timed with
its inputs in cache) in the same turns: ``design / floor`` bounds what any rewrite keeping that
arithmetic could gain.

Run from the repository root::

    python benchmarks/population_update.py            # batched (fast) vs looped at 256x256, ~1-3 min
    python benchmarks/population_update.py --quick    # smoke run, < 30 s
    python benchmarks/population_update.py --preset pendulum --designs eager fast compiled --threads 1 --floor
    python benchmarks/population_update.py --designs eager fast looped --flops --scaling 1 4 16 64
"""

from __future__ import annotations

import os
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import argparse  # noqa: E402
import copy  # noqa: E402
import dataclasses  # noqa: E402
import functools  # noqa: E402
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


def make_batches(
    population: int,
    micro_batches: int,
    batch_size: int,
    device: torch.device,
    obs_dim: int = OBS_DIM,
    act_dim: int = ACT_DIM,
) -> list[Batch]:
    """``K`` random micro-batches of shape ``(P, B, ...)`` (contents do not matter for speed)."""

    def one() -> Batch:
        shape = (population, batch_size)
        return Batch(
            obs=torch.randn(*shape, obs_dim, device=device),
            action=torch.rand(*shape, act_dim, device=device) * 2 - 1,
            reward=torch.randn(*shape, device=device),
            next_obs=torch.randn(*shape, obs_dim, device=device),
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


# ---------------------------------------------------------------- arithmetic


def net_macs(sizes: Sequence[int]) -> tuple[int, int]:
    """(multiply-adds of one forward pass per sample, those of its first layer) of an MLP of ``sizes``."""
    pairs = list(zip(sizes[:-1], sizes[1:], strict=False))
    return sum(a * b for a, b in pairs), pairs[0][0] * pairs[0][1]


def update_flops(population: int, obs: int, act: int, hidden: Sequence[int], rows: int, policy_delay: int) -> float:
    """Matmul FLOPs (2 per multiply-add) of one TD3 population update over ``rows`` samples per member
    (``K * B``), the actor step counted ``1 / policy_delay`` times. Backward passes: weight gradients of
    every layer, input gradients of every layer but the first (the first's only where the actor's
    action flows through the critic). Elementwise work is not counted, so the rate is a lower bound."""
    actor, actor_first = net_macs([obs, *hidden, act])
    critic, critic_first = net_macs([obs + act, *hidden, 1])
    critic_step = (actor + 2 * critic) + 2 * critic + 2 * critic + 2 * (critic - critic_first)
    actor_step = actor + critic + critic + actor + (actor - actor_first)
    return 2.0 * population * rows * (critic_step + actor_step / policy_delay)


def matmul_step(device: torch.device, size: int) -> tuple[Callable[[], object], float]:
    """(a dense ``size x size`` float32 matmul, its FLOPs): the machine's reference rate."""
    a = torch.randn(size, size, device=device)
    b = torch.randn(size, size, device=device)
    return (lambda: torch.mm(a, b)), 2.0 * size**3


MATMUL_OPS = {"aten::mm": 2, "aten::bmm": 2, "aten::addmm": 3, "aten::baddbmm": 3}
"""The matmul kernels an update dispatches, by name, with their number of tensor inputs."""


class MatmulFloor:
    """The matmul calls of ``policy_delay`` updates of a design, recorded once by the profiler (names
    and input shapes) and replayed on fresh tensors of those shapes, one update's worth per call in
    turn. Each replayed matmul runs twice and only the second run is timed, with its inputs and output
    already in cache: :attr:`samples` gets one sum per call. That is the time the update's arithmetic
    takes at its best on this machine, a lower bound on any update with the same matmuls, so
    ``design / floor`` bounds the speed-up any rewrite keeping them could reach."""

    def __init__(self, update: Callable[[], object], updates: int, device: torch.device) -> None:
        from torch.profiler import ProfilerActivity, profile

        self.device = device
        self.calls: list[list[tuple[Callable[..., Tensor], list[Tensor]]]] = []
        for _ in range(updates):
            with profile(activities=[ProfilerActivity.CPU], record_shapes=True) as prof:
                update()
            self.calls.append(
                [(self._op(e.name), self._inputs(e, device)) for e in prof.events() if self._outermost_matmul(e)]
            )
        self.turn = 0
        self.samples: list[float] = []
        """Seconds of warm matmuls per call (one update's worth each)."""

    @staticmethod
    def _outermost_matmul(event: Any) -> bool:
        parent = event.cpu_parent
        return event.name in MATMUL_OPS and (parent is None or parent.name not in MATMUL_OPS)

    @staticmethod
    def _op(name: str) -> Callable[..., Tensor]:
        return getattr(torch, name.removeprefix("aten::"))  # type: ignore[no-any-return]

    @staticmethod
    def _inputs(event: Any, device: torch.device) -> list[Tensor]:
        shapes = event.input_shapes[: MATMUL_OPS[event.name]]
        return [torch.randn(*shape, device=device) for shape in shapes]

    def matmuls_per_update(self) -> float:
        return sum(len(calls) for calls in self.calls) / len(self.calls)

    def flops_per_update(self) -> float:
        """FLOPs of the recorded matmuls (2 per multiply-add), per update: a check of :func:`update_flops`."""
        total = 0
        for calls in self.calls:
            for _, inputs in calls:
                a, b = inputs[-2:]
                total += 2 * a.numel() * b.shape[-1]
        return total / len(self.calls)

    def __call__(self) -> None:
        seconds = 0.0
        for op, inputs in self.calls[self.turn]:
            op(*inputs)  # brings the inputs and the output into cache
            synchronize(self.device)
            started = time.perf_counter()
            op(*inputs)
            synchronize(self.device)
            seconds += time.perf_counter() - started
        self.samples.append(seconds)
        self.turn = (self.turn + 1) % len(self.calls)


# ---------------------------------------------------------------- designs


PRESETS = {
    "pendulum": {
        "population": 16,
        "hidden": [64, 64],
        "batch_size": 128,
        "accumulation": 2,
        "obs_dim": 3,
        "act_dim": 1,
    },
    "halfcheetah": {"population": 16, "hidden": [256, 256], "batch_size": 256, "accumulation": 6},
}
"""Shapes of the trainer's presets (``config.PRESETS``); halfcheetah's obs/act sizes are the defaults.
``pendulum`` keeps issue 15's shape, K=2: the trainer's preset uses K=1 since 2026-12-02 (``-k 1``)."""


def build_steps(
    args: argparse.Namespace, p: int, device: torch.device
) -> tuple[dict[str, Callable[[], object]], float]:
    """The designs' update calls on the same data at population ``p``, and the compiled design's
    first-calls time (0 without it)."""
    cfg = AgentConfig(hidden_sizes=list(args.hidden), batch_size=args.batch_size)
    batches = make_batches(p, args.accumulation, args.batch_size, device, args.obs_dim, args.act_dim)
    steps: dict[str, Callable[[], object]] = {}
    compile_s = 0.0
    for name in args.designs:
        torch.manual_seed(args.seed)
        if name == "looped":
            looped = LoopedPopulation(p, args.obs_dim, args.act_dim, cfg, device)
            per_member = split_members(batches, p)
            steps[name] = functools.partial(looped.update, per_member)
            continue
        fast, mode = name != "eager", args.compile_mode if name == "compiled" else "none"
        agent_cfg = dataclasses.replace(cfg, fast_update=fast, compile=mode)
        agent = TD3Population(p, args.obs_dim, args.act_dim, agent_cfg, device)
        steps[name] = functools.partial(agent.update, batches)
        if name == "compiled":  # compiles both graphs (critic-only and critic + actor calls)
            started = time.perf_counter()
            for _ in range(agent_cfg.policy_delay):
                steps[name]()
            synchronize(device)
            compile_s = time.perf_counter() - started
    threads = torch.get_num_threads()
    out = {}
    for name, step in steps.items():
        count = args.baseline_threads if name == "looped" and args.baseline_threads else threads
        out[name] = with_threads(count, step)
    return out, compile_s


def time_designs(
    args: argparse.Namespace, p: int, device: torch.device, rounds: int, with_matmul: bool
) -> dict[str, Any]:
    """Warm up and time every design (and the reference matmul) in turns at population ``p``."""
    steps, compile_s = build_steps(args, p, device)
    calls = AgentConfig().policy_delay  # each block holds exactly one delayed actor update
    matmul_flops = 0.0
    if with_matmul:
        mm, matmul_flops = matmul_step(device, args.matmul_size)
        steps["matmul"] = mm
    floor_matmuls = 0.0
    if args.floor:
        recorded = "fast" if "fast" in steps else next(d for d in steps if d != "looped")
        floor = MatmulFloor(steps[recorded], calls, device)
        steps["floor"], floor_matmuls = floor, floor.matmuls_per_update()
    alternate(steps, rounds=1, calls=1 if args.quick else calls, device=device)
    if args.floor:
        floor.samples.clear()
    wall, cpu = alternate(steps, rounds, calls, device)
    if args.floor:  # its own warm sums, not the block's wall time (which includes the warming runs)
        samples = floor.samples  # a block's calls replay the critic-only and the critic + actor update
        wall["floor"] = cpu["floor"] = [statistics.fmean(samples[i : i + calls]) for i in range(0, len(samples), calls)]
    median = {name: statistics.median(ts) for name, ts in wall.items()}
    return {
        "wall": wall,
        "cpu": cpu,
        "median": median,
        "compile_s": compile_s,
        "matmul_flops": matmul_flops,
        "floor_matmuls": floor_matmuls,
    }


# ---------------------------------------------------------------- main


def parse_args(argv: Sequence[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="few repeats, finishes in well under 30 s")
    parser.add_argument("--device", default="cpu", help="cpu (default) or cuda")
    parser.add_argument("--preset", choices=sorted(PRESETS), help="shapes of a trainer preset (other flags override)")
    parser.add_argument("--population", type=int)
    parser.add_argument("--hidden", type=int, nargs="+")
    parser.add_argument("--batch-size", type=int)
    parser.add_argument("--accumulation", "-k", type=int, help="micro-batches per update (K)")
    parser.add_argument("--obs-dim", type=int)
    parser.add_argument("--act-dim", type=int)
    parser.add_argument(
        "--designs", nargs="+", default=["fast", "looped"], choices=["eager", "fast", "compiled", "looped"]
    )
    parser.add_argument("--baseline", help="the design ratios are against (default: eager if timed, else looped)")
    parser.add_argument("--compile-mode", default="default", help="torch.compile mode of the compiled design")
    parser.add_argument("--flops", action="store_true", help="also time a dense matmul: achieved rate / machine rate")
    parser.add_argument("--matmul-size", type=int, default=1024, help="size of the reference square matmul")
    parser.add_argument(
        "--floor",
        action="store_true",
        help="also time the fast update's matmul calls alone (same shapes): the most any path keeping them can gain",
    )
    parser.add_argument("--scaling", type=int, nargs="*", default=[], help="populations for time per member-update")
    parser.add_argument("--rounds", type=int, default=0, help="ABAB rounds (0: 2 quick, 10 default)")
    parser.add_argument("--threads", type=int, default=0, help="torch.set_num_threads (0: leave as is)")
    parser.add_argument(
        "--baseline-threads", type=int, default=0, help="threads for the looped baseline only (0: same as batched)"
    )
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--json", type=Path, help="also write the result here")
    args = parser.parse_args(argv)
    shapes = {"population": 16, "hidden": [256, 256], "batch_size": 256, "accumulation": 6}
    shapes |= {"obs_dim": OBS_DIM, "act_dim": ACT_DIM} | PRESETS.get(args.preset or "", {})
    for key, value in shapes.items():
        if getattr(args, key) is None:
            setattr(args, key, value)
    if args.baseline is None:
        args.baseline = (
            "eager" if "eager" in args.designs else "looped" if "looped" in args.designs else args.designs[0]
        )
    if args.baseline not in args.designs:
        parser.error(f"--baseline {args.baseline} is not among --designs {' '.join(args.designs)}")
    return args


def run(args: argparse.Namespace) -> dict[str, Any]:
    """Build the designs, warm them up, time them alternately; returns the result record."""
    device = torch.device(args.device)
    if args.threads > 0:
        torch.set_num_threads(args.threads)
    torch.manual_seed(args.seed)
    rounds = args.rounds or (2 if args.quick else 10)
    p = args.population
    timed = time_designs(args, p, device, rounds, args.flops)
    median = timed["median"]
    flops = update_flops(p, args.obs_dim, args.act_dim, args.hidden, args.batch_size * args.accumulation, 2)
    designs = [d for d in args.designs]
    result: dict[str, Any] = {
        "benchmark": "population_update",
        "device": str(device),
        "torch": torch.__version__,
        "threads": torch.get_num_threads(),
        "baseline_threads": args.baseline_threads or torch.get_num_threads(),
        "omp_wait_policy": os.environ.get("OMP_WAIT_POLICY", "default"),
        "load_average": list(os.getloadavg()),
        "cpus": os.cpu_count(),
        "population": p,
        "hidden": list(args.hidden),
        "batch_size": args.batch_size,
        "accumulation": args.accumulation,
        "obs_dim": args.obs_dim,
        "act_dim": args.act_dim,
        "rounds": rounds,
        "updates_per_block": AgentConfig().policy_delay,
        "seconds_per_update": timed["wall"],
        "cpu_seconds_per_update": timed["cpu"],
        "median_s": median,
        "baseline": args.baseline,
        "ratio": {d: median[args.baseline] / median[d] for d in designs},
        "ratio_best_blocks": {d: min(timed["wall"][args.baseline]) / min(timed["wall"][d]) for d in designs},
        "update_gflop": flops / 1e9,
        "compile_s": timed["compile_s"],
    }
    if "fast" in designs and "looped" in designs:
        result["speedup"] = median["looped"] / median["fast"]  # the batched/looped figure of earlier runs
    if args.flops:
        machine = timed["matmul_flops"] / median["matmul"]
        result["matmul_gflops"] = machine / 1e9
        result["achieved_gflops"] = {d: flops / median[d] / 1e9 for d in designs}
        result["fraction_of_matmul"] = {d: flops / median[d] / machine for d in designs}
    if args.floor:
        result["floor_matmuls_per_update"] = timed["floor_matmuls"]
        result["floor_bound"] = {d: median[d] / median["floor"] for d in designs}
    if args.scaling:
        result["scaling"] = scaling(args, device, rounds)
    return result


def scaling(args: argparse.Namespace, device: torch.device, rounds: int) -> dict[str, dict[str, float]]:
    """Median time per member-update (update time / P) of each design but ``looped`` at each population."""
    sub = argparse.Namespace(**vars(args))
    sub.designs = [d for d in args.designs if d != "looped"] or ["fast"]
    sub.floor = False
    out: dict[str, dict[str, float]] = {}
    for p in args.scaling:
        timed = time_designs(sub, p, device, max(rounds // 2, 2), with_matmul=False)
        out[str(p)] = {d: timed["median"][d] / p for d in sub.designs}
    return out


def report(result: dict[str, Any]) -> None:
    """Print the table and the RESULT lines."""
    print(
        f"population update: P={result['population']} hidden={result['hidden']} "
        f"batch={result['batch_size']} K={result['accumulation']} obs={result['obs_dim']} act={result['act_dim']} "
        f"({result['update_gflop']:.3f} GFLOP of matmuls per update)"
    )
    print(f"{'design':<10}{'median ms':>12}{'min ms':>10}{'max ms':>10}{'cpu ms':>10}{'blocks':>8}")
    for name, ts in result["seconds_per_update"].items():
        cpu = statistics.median(result["cpu_seconds_per_update"][name])
        print(
            f"{name:<10}{1e3 * statistics.median(ts):>12.1f}{1e3 * min(ts):>10.1f}{1e3 * max(ts):>10.1f}"
            f"{1e3 * cpu:>10.1f}{len(ts):>8}"
        )
    print("(ms per update, or per matmul call; wall clock; cpu ms = median process CPU time, every busy thread)")
    if result["compile_s"]:
        print(f"compiled: its first {result['updates_per_block']} calls (compilation) took {result['compile_s']:.1f} s")
    for name, fraction in result.get("fraction_of_matmul", {}).items():
        print(
            f"{name:<10}achieved {result['achieved_gflops'][name]:6.1f} GFLOP/s = {100 * fraction:5.1f}% of this "
            f"machine's dense matmul ({result['matmul_gflops']:.1f} GFLOP/s, same run)"
        )
    if "floor_bound" in result:
        bounds = ", ".join(f"{d} {bound:.2f}x" for d, bound in result["floor_bound"].items())
        print(
            f"floor: the fast update's {result['floor_matmuls_per_update']:.1f} matmul calls per update alone, same "
            f"shapes, each timed warm; no path keeping them beats it. Most speed-up left over each design: {bounds}"
        )
    for p, per_design in result.get("scaling", {}).items():
        cells = "  ".join(f"{d} {1e3 * s:7.3f} ms" for d, s in per_design.items())
        print(f"P={p:>3}  time per member-update: {cells}")
    load = ", ".join(f"{x:.2f}" for x in result["load_average"])
    context = (
        f"device {result['device']}, torch {result['torch']}, threads {result['threads']}, "
        f"OMP_WAIT_POLICY {result['omp_wait_policy']}, load average {load} on {result['cpus']} CPUs"
    )
    for name, ratio in result["ratio"].items():
        if name != result["baseline"]:
            best = result["ratio_best_blocks"][name]
            line = f"RESULT population_update {name}/{result['baseline']} speedup: {ratio:.2f}x"
            print(f"{line} (best blocks {best:.2f}x; {context})")
    if "speedup" in result:
        print(f"RESULT population_update batched/looped speedup: {result['speedup']:.2f}x ({context})")


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
