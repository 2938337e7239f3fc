"""Benchmark: env steps per second of the batched population rollout versus a per-member loop.

The batched design is ``training.rollout.rollout``: an ``EnvPool`` of ``P`` environments (one
per member) and one batched actor forward per step for the whole population. The baseline is
what one writes without batching: ``P`` members, each an ordinary ``nn.Sequential`` actor and its
own environment, stepped one after another (forward on a ``(1, obs)`` tensor under ``no_grad``,
or ``inference_mode`` with ``--inference-mode-baseline``; Gaussian exploration noise, rescale to
the action bounds, step, reset when the episode ends).

Both take the same number of env steps per block (``steps`` per member, replay off). Timing
alternates the designs block by block (ABAB...) so drift on a shared machine hits both; the
result is the ratio of the median env steps per second, never an absolute figure.

Run from the repository root::

    python benchmarks/rollout.py                    # Pendulum-v1 and HalfCheetah-v5, ~1 min
    python benchmarks/rollout.py --quick            # Pendulum-v1 only, < 30 s
    python benchmarks/rollout.py --env HalfCheetah-v5
"""

from __future__ import annotations

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import argparse  # noqa: E402
import json  # noqa: E402
import statistics  # noqa: E402
import time  # noqa: E402
from collections.abc import Callable, Sequence  # noqa: E402
from typing import Any  # noqa: E402

import gymnasium as gym  # noqa: E402
import numpy as np  # noqa: E402
import torch  # noqa: E402
from torch import nn  # noqa: E402

from agents.td3 import TD3Population  # noqa: E402
from config import PRESETS, AgentConfig, EnvConfig  # noqa: E402
from training.envs import EnvPool, make_env  # noqa: E402
from training.rollout import rollout  # noqa: E402

HIDDEN = {"Pendulum-v1": PRESETS["pendulum"]["agent"]["hidden_sizes"]}
"""Hidden sizes per env id (the matching preset's); anything else gets ``AgentConfig``'s default."""


# ---------------------------------------------------------------- the baseline


def mlp(in_features: int, hidden: Sequence[int], out_features: int) -> nn.Sequential:
    """An ordinary ReLU MLP, the same shape as one member of ``agents.batched.BatchedMLP``."""
    sizes = [in_features, *hidden, out_features]
    layers: list[nn.Module] = []
    for a, b in zip(sizes[:-1], sizes[1:], strict=False):
        layers += [nn.Linear(a, b), nn.ReLU()]
    return nn.Sequential(*layers[:-1])


class LoopedMember:
    """One member the usual way: its own actor module and its own environment."""

    def __init__(
        self, env: gym.Env, hidden: Sequence[int], noise: float, device: torch.device, inference_mode: bool = False
    ) -> None:
        space = env.action_space
        assert isinstance(space, gym.spaces.Box) and env.observation_space.shape is not None
        self.env = env
        self.low, self.high = space.low.astype(np.float32), space.high.astype(np.float32)
        self.actor = mlp(env.observation_space.shape[0], hidden, space.shape[0]).to(device)
        self.noise = noise
        self.grad_mode = torch.inference_mode if inference_mode else torch.no_grad
        self.device = device
        self.obs = np.zeros(env.observation_space.shape, np.float32)
        self.running = 0.0
        self.returns: list[float] = []

    def reset(self, seed: int) -> None:
        self.obs, _ = self.env.reset(seed=seed)
        self.running = 0.0
        self.returns = []

    def act(self) -> np.ndarray:
        """A noisy action in ``[-1, 1]`` for the current observation."""
        with self.grad_mode():
            obs = torch.as_tensor(self.obs, dtype=torch.float32, device=self.device).unsqueeze(0)
            action = torch.tanh(self.actor(obs))
            action = (action + torch.randn_like(action) * self.noise).clamp(-1.0, 1.0)
            return action[0].cpu().numpy()

    def step(self) -> None:
        """Act, step the environment with the rescaled action, reset when the episode ends."""
        action = self.act()
        scaled = self.low + (action + 1.0) * 0.5 * (self.high - self.low)
        obs, reward, terminated, truncated, _ = self.env.step(scaled)
        self.running += float(reward)
        if terminated or truncated:
            self.returns.append(self.running)
            self.running = 0.0
            obs, _ = self.env.reset()
        self.obs = obs


def looped_rollout(members: Sequence[LoopedMember], seeds: np.ndarray, steps: int) -> int:
    """Reset every member with its seed, then step them one after another; returns env steps."""
    for member, seed in zip(members, seeds, strict=True):
        member.reset(int(seed))
    for _ in range(steps):
        for member in members:
            member.step()
    return steps * len(members)


# ---------------------------------------------------------------- timing


def time_block(run_block: Callable[[], int]) -> float:
    """Env steps per second of one call of ``run_block`` (which returns the steps it took)."""
    start = time.perf_counter()
    steps = run_block()
    return steps / (time.perf_counter() - start)


def alternate(blocks: dict[str, Callable[[], int]], rounds: int) -> dict[str, list[float]]:
    """ABAB...: each round times every design once, the order flipping each round."""
    names = list(blocks)
    rates: dict[str, list[float]] = {name: [] for name in names}
    for r in range(rounds):
        for name in names if r % 2 == 0 else names[::-1]:
            rates[name].append(time_block(blocks[name]))
    return rates


def bench_env(env_id: str, args: argparse.Namespace) -> dict[str, Any]:
    """Build both designs for ``env_id``, warm them up, time them alternately."""
    device = torch.device(args.device)
    torch.manual_seed(args.seed)
    p = args.population
    env_cfg = EnvConfig(id=env_id)
    hidden = list(args.hidden or HIDDEN.get(env_id, AgentConfig().hidden_sizes))
    cfg = AgentConfig(hidden_sizes=hidden)
    pool = EnvPool(lambda: make_env(env_cfg), p)
    agent = TD3Population(p, pool.obs_dim, pool.act_dim, cfg, device)
    members = [
        LoopedMember(make_env(env_cfg), hidden, cfg.exploration_noise, device, args.inference_mode_baseline)
        for _ in range(p)
    ]
    seeds = np.arange(args.seed, args.seed + p)
    steps = args.steps or (100 if args.quick else 400)

    def batched() -> int:
        return rollout(agent, pool, None, seeds, explore=True, steps=steps).env_steps

    def looped() -> int:
        return looped_rollout(members, seeds, steps)

    blocks = {"batched": batched, "looped": looped}
    alternate(blocks, rounds=1)  # warm-up
    rounds = args.rounds or (3 if args.quick else 10)
    rates = alternate(blocks, rounds)
    pool.close()
    for member in members:
        member.env.close()
    median = {name: statistics.median(r) for name, r in rates.items()}
    return {
        "env": env_id,
        "population": p,
        "hidden": hidden,
        "steps_per_member_per_block": steps,
        "rounds": rounds,
        "env_steps_per_s": rates,
        "median_steps_per_s": median,
        "speedup": median["batched"] / median["looped"],
        "speedup_best_blocks": max(rates["batched"]) / max(rates["looped"]),
        "baseline_grad_mode": "inference_mode" if args.inference_mode_baseline else "no_grad",
    }


# ---------------------------------------------------------------- main


def parse_args(argv: Sequence[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="few repeats, Pendulum-v1 only, well under 30 s")
    parser.add_argument("--device", default="cpu", help="cpu (default) or cuda")
    parser.add_argument("--env", action="append", help="env id (repeatable); default Pendulum-v1 and HalfCheetah-v5")
    parser.add_argument("--population", type=int, default=16)
    parser.add_argument("--hidden", type=int, nargs="+", help="actor hidden sizes (default: per env)")
    parser.add_argument("--steps", type=int, default=0, help="env steps per member per block (0: 100 quick, 400)")
    parser.add_argument("--rounds", type=int, default=0, help="ABAB rounds (0: 3 quick, 10 default)")
    parser.add_argument("--threads", type=int, default=0, help="torch.set_num_threads (0: leave as is)")
    parser.add_argument(
        "--inference-mode-baseline", action="store_true", help="baseline acts under inference_mode, not no_grad"
    )
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--json", type=Path, help="also write the result here")
    return parser.parse_args(argv)


def report(results: list[dict[str, Any]], device: str) -> None:
    """Print the table and one RESULT line per environment."""
    print(f"{'env':<16}{'design':<10}{'median steps/s':>16}{'min':>10}{'max':>10}{'blocks':>8}")
    for res in results:
        for name, rates in res["env_steps_per_s"].items():
            print(
                f"{res['env']:<16}{name:<10}{statistics.median(rates):>16.0f}{min(rates):>10.0f}"
                f"{max(rates):>10.0f}{len(rates):>8}"
            )
    for res in results:
        print(
            f"{res['env']}: ratio of the fastest blocks (least disturbed by other load): "
            f"{res['speedup_best_blocks']:.2f}x"
        )
    for res in results:
        print(
            f"RESULT rollout {res['env']} batched/looped speedup: {res['speedup']:.2f}x "
            f"(P={res['population']}, hidden {res['hidden']}, device {device}, torch {torch.__version__}, "
            f"threads {torch.get_num_threads()}, baseline {res['baseline_grad_mode']})"
        )


def main(argv: Sequence[str] | None = None) -> None:
    args = parse_args(argv)
    if torch.device(args.device).type == "cuda" and not torch.cuda.is_available():
        sys.exit(f"--device {args.device}: CUDA is not available in this torch build or machine")
    if args.threads > 0:
        torch.set_num_threads(args.threads)
    envs = args.env or (["Pendulum-v1"] if args.quick else ["Pendulum-v1", "HalfCheetah-v5"])
    results = [bench_env(env_id, args) for env_id in envs]
    report(results, args.device)
    if args.json is not None:
        record = {
            "benchmark": "rollout",
            "device": args.device,
            "torch": torch.__version__,
            "threads": torch.get_num_threads(),
            "results": results,
        }
        args.json.write_text(json.dumps(record, indent=2) + "\n")


if __name__ == "__main__":
    main()
