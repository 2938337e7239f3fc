"""What does a population of CNN encoders cost? One grouped convolution vs a loop over members.

Every member gets its own NatureCNN encoder (Mnih et al. 2015: conv 32 8x8 stride 4, conv 64 4x4
stride 2, conv 64 3x3 stride 1, linear 3136 -> 512, ReLU after each) on 4 stacked 84x84 frames. Three
ways to run P of them on a ``(P, B, 4, 84, 84)`` uint8 batch, forward and backward (a mean-square loss
on the features), timed in the same run with the same weights:

- ``grouped``: one ``Conv2d`` per layer with ``groups=P`` over the members' channels (``P * 4`` input
  channels), the linear layer as one batched matmul;
- ``loop``: ``P`` separate encoders, one after the other (what a naive population does);
- ``vmap``: ``torch.func.vmap`` over the stacked parameters of the ``P`` encoders.

It first checks that the three give the same features and gradients (they are the same function),
then prints the median time per forward+backward (the variants take turns, so a busy machine slows
them alike) and each one's ratio to ``grouped``.

With ``--update`` it times what a run pays instead: one optimizer step of the discrete SAC population
with CNN members (``agents.sac_discrete``, K micro-batches of B stacks per member: the encoder's
forward and backward through the critic loss, the target encoder and the actor on detached features),
in the same run as two baselines: the same heads on flat observations as wide as the features (what
the CNN adds) and P single-member CNN populations stepped one after the other (what batching saves);
with the encoder grouped and looped.

    python benchmarks/pixels.py                          # P=16, B=32, cpu
    python benchmarks/pixels.py --device cuda --reps 20
    python benchmarks/pixels.py --update --members 4     # cost per optimizer step
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from collections.abc import Callable
from pathlib import Path

import torch
from torch import nn
from torch.func import functional_call, stack_module_state, vmap

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from agents import Batch, PopulationAgent, make_population  # noqa: E402
from agents.sac_discrete import DiscreteSACPopulation  # noqa: E402
from config import AgentConfig  # noqa: E402

CHANNELS, SIZE, FEATURES = 4, 84, 512
FLAT = 64 * 7 * 7


def nature_cnn() -> nn.Sequential:
    """One member's encoder: ``(B, 4, 84, 84)`` float -> ``(B, 512)``."""
    return nn.Sequential(
        nn.Conv2d(CHANNELS, 32, 8, 4),
        nn.ReLU(),
        nn.Conv2d(32, 64, 4, 2),
        nn.ReLU(),
        nn.Conv2d(64, 64, 3, 1),
        nn.ReLU(),
        nn.Flatten(),
        nn.Linear(FLAT, FEATURES),
        nn.ReLU(),
    )


class GroupedNatureCNN(nn.Module):
    """``P`` NatureCNN encoders as one computation: ``(P, B, 4, 84, 84)`` -> ``(P, B, 512)``. Member
    ``p``'s filters are output channels ``p * out .. (p + 1) * out`` of each grouped convolution."""

    def __init__(self, members: int) -> None:
        super().__init__()
        self.members = members
        self.conv = nn.Sequential(
            nn.Conv2d(members * CHANNELS, members * 32, 8, 4, groups=members),
            nn.ReLU(),
            nn.Conv2d(members * 32, members * 64, 4, 2, groups=members),
            nn.ReLU(),
            nn.Conv2d(members * 64, members * 64, 3, 1, groups=members),
            nn.ReLU(),
        )
        self.weight = nn.Parameter(torch.randn(members, FLAT, FEATURES) / FLAT**0.5)
        self.bias = nn.Parameter(torch.zeros(members, 1, FEATURES))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        members, batch = x.shape[:2]
        h = self.conv(x.transpose(0, 1).reshape(batch, members * CHANNELS, SIZE, SIZE))  # (B, P * 64, 7, 7)
        h = h.reshape(batch, members, FLAT).transpose(0, 1)  # (P, B, 3136), flattened as nn.Flatten does
        return torch.relu(torch.baddbmm(self.bias, h, self.weight))

    def member(self, p: int) -> nn.Sequential:
        """A standalone encoder holding copies of member ``p``'s weights."""
        single = nature_cnn()
        convs = [m for m in self.conv if isinstance(m, nn.Conv2d)]
        with torch.no_grad():
            for grouped, alone in zip(convs, [m for m in single if isinstance(m, nn.Conv2d)], strict=True):
                out = alone.out_channels
                alone.weight.copy_(grouped.weight[p * out : (p + 1) * out])
                assert grouped.bias is not None and alone.bias is not None
                alone.bias.copy_(grouped.bias[p * out : (p + 1) * out])
            linear = single[7]
            assert isinstance(linear, nn.Linear)
            linear.weight.copy_(self.weight[p].T)
            linear.bias.copy_(self.bias[p, 0])
        return single


def as_input(frames: torch.Tensor) -> torch.Tensor:
    """uint8 frames -> floats in [0, 1] (part of every variant's cost)."""
    return frames.float() / 255.0


Variant = tuple[Callable[[torch.Tensor], torch.Tensor], list[torch.Tensor]]


def variants(grouped: GroupedNatureCNN, device: torch.device) -> dict[str, Variant]:
    """name -> (``(P, B, 4, 84, 84)`` uint8 -> ``(P, B, 512)``, its parameters), all the same function."""
    loop = [grouped.member(p).to(device) for p in range(grouped.members)]
    params, buffers = stack_module_state(loop)  # type: ignore[arg-type]
    template = nature_cnn().to("meta")

    def one(p: dict[str, torch.Tensor], b: dict[str, torch.Tensor], x: torch.Tensor) -> torch.Tensor:
        return functional_call(template, (p, b), (x,))

    batched = vmap(one)
    return {
        "grouped": (lambda x: grouped(as_input(x)), list(grouped.parameters())),
        "loop": (
            lambda x: torch.stack([m(as_input(x[p])) for p, m in enumerate(loop)]),
            [q for m in loop for q in m.parameters()],
        ),
        "vmap": (lambda x: batched(params, buffers, as_input(x)), list(params.values())),
    }


def step(run: Callable[[torch.Tensor], torch.Tensor], parameters: list[torch.Tensor], x: torch.Tensor) -> torch.Tensor:
    """One forward and backward; returns the features (detached)."""
    for q in parameters:
        q.grad = None
    out = run(x)
    out.square().mean().backward()
    return out.detach()


def first_layer_grad(name: str, parameters: list[torch.Tensor], members: int) -> torch.Tensor:
    """The first convolution's weight gradient as ``(P, 32, 4, 8, 8)``, whatever the variant's layout
    (``grouped``: the convolutions' parameters after the linear layer's two; ``loop``: 8 parameters
    per member, the first convolution's weight first; ``vmap``: the stacked first weight first)."""
    index = {"grouped": [2], "loop": [i * 8 for i in range(members)], "vmap": [0]}[name]
    grads = [parameters[i].grad for i in index]
    assert all(g is not None for g in grads)
    return torch.cat(grads).reshape(members, 32, CHANNELS, 8, 8)  # type: ignore[arg-type]


def pixel_batches(members: int, batch: int, k: int, actions: int, device: torch.device) -> list[Batch]:
    """``k`` random micro-batches of frame stacks ``(P, B, 4, 84, 84)`` uint8 and one-hot actions."""
    out = []
    for _ in range(k):
        frames = torch.randint(0, 256, (2, members, batch, CHANNELS, SIZE, SIZE), dtype=torch.uint8, device=device)
        action = nn.functional.one_hot(torch.randint(actions, (members, batch), device=device), actions).float()
        reward, done = torch.randn(members, batch, device=device), torch.zeros(members, batch, device=device)
        out.append(Batch(frames[0], action, reward, frames[1], done))
    return out


def time_updates(steps: dict[str, Callable[[], object]], reps: int, device: torch.device) -> dict[str, float]:
    """Median seconds of each step, the steps taking turns (after one warm-up each)."""
    samples: dict[str, list[float]] = {name: [] for name in steps}
    for step_fn in steps.values():
        step_fn()
    for _ in range(reps):
        for name, step_fn in steps.items():
            if device.type == "cuda":
                torch.cuda.synchronize(device)
            started = time.perf_counter()
            step_fn()
            if device.type == "cuda":
                torch.cuda.synchronize(device)
            samples[name].append(time.perf_counter() - started)
    return {name: statistics.median(values) for name, values in samples.items()}


def update_costs(args: argparse.Namespace, device: torch.device) -> None:
    """Cost of one optimizer step of the CNN population against its two baselines (see the module doc)."""
    p, b, k, n = args.members, args.batch, args.accumulation, 6
    cfg = AgentConfig(hidden_sizes=[256], batch_size=b)
    batches = pixel_batches(p, b, k, n, device)
    flat = [  # the same actions and rewards, observations as wide as the features
        Batch(
            torch.randn(p, b, FEATURES, device=device),
            x.action,
            x.reward,
            torch.randn(p, b, FEATURES, device=device),
            x.terminated,
        )
        for x in batches
    ]
    grouped = make_population(p, (CHANNELS, SIZE, SIZE), n, cfg, device, "discrete")
    looped = make_population(p, (CHANNELS, SIZE, SIZE), n, cfg, device, "discrete")
    assert isinstance(grouped, DiscreteSACPopulation) and isinstance(looped, DiscreteSACPopulation)
    assert grouped.encoder is not None and looped.encoder is not None
    grouped.encoder.grouped = grouped.encoder_target.grouped = True  # type: ignore[union-attr]
    looped.encoder.grouped = looped.encoder_target.grouped = False  # type: ignore[union-attr]
    heads = make_population(p, FEATURES, n, cfg, device, "discrete")
    singles: list[PopulationAgent] = [
        make_population(1, (CHANNELS, SIZE, SIZE), n, cfg, device, "discrete") for _ in range(p)
    ]
    one = [[Batch(*(t[i : i + 1] for t in x)) for x in batches] for i in range(p)]
    steps: dict[str, Callable[[], object]] = {
        "grouped": lambda: grouped.update(batches),
        "looped": lambda: looped.update(batches),
        "heads only": lambda: heads.update(flat),
        "P agents": lambda: [agent.update(one[i]) for i, agent in enumerate(singles)],
    }
    times = time_updates(steps, args.reps, device)
    print(
        f"discrete SAC optimizer step, P={p} CNN members (NatureCNN 32/64/64, 512 features, head 256), K={k} x B={b} "
        f"stacks (4, 84, 84) uint8, {device}, {torch.get_num_threads()} thread(s), median of {args.reps}"
    )
    base = times["grouped"]
    for name, seconds in times.items():
        ratio, per_member = seconds / base, seconds / p * 1000
        print(f"  {name:>10}  {seconds * 1000:9.1f} ms   {ratio:5.2f}x grouped   {per_member:8.1f} ms per member")
    print(
        f"  the CNN population's step (grouped, the default) is {base / times['heads only']:.0f}x the heads' alone; "
        f"P separate agents take {times['P agents'] / base:.2f}x its time"
    )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--members", type=int, default=16)
    parser.add_argument("--batch", type=int, default=32)
    parser.add_argument("--reps", type=int, default=5)
    parser.add_argument("--threads", type=int, default=torch.get_num_threads())
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--update", action="store_true", help="time optimizer steps of the CNN population")
    parser.add_argument("--accumulation", type=int, default=1, help="--update: micro-batches per step (K)")
    args = parser.parse_args()
    torch.manual_seed(0)
    torch.set_num_threads(args.threads)
    device = torch.device(args.device)
    if args.update:
        update_costs(args, device)
        return
    grouped = GroupedNatureCNN(args.members).to(device)
    frames = torch.randint(0, 256, (args.members, args.batch, CHANNELS, SIZE, SIZE), dtype=torch.uint8, device=device)
    runs = variants(grouped, device)

    reference, reference_grad = None, None
    for name, (run, parameters) in runs.items():
        out = step(run, parameters, frames)
        grad = first_layer_grad(name, parameters, args.members)
        if reference is None:
            reference, reference_grad = out, grad
        else:
            assert reference_grad is not None
            print(
                f"{name:>8} vs grouped: features max |diff| {float((out - reference).abs().max()):.2e}, "
                f"first-layer gradient max |diff| {float((grad - reference_grad).abs().max()):.2e}"
            )
            torch.testing.assert_close(out, reference, rtol=1e-4, atol=1e-4)
            torch.testing.assert_close(grad, reference_grad, rtol=1e-3, atol=1e-5)

    shape = f"({args.members}, {args.batch}, {CHANNELS}, {SIZE}, {SIZE})"
    print(
        f"NatureCNN forward+backward on {shape} uint8, {device}, {torch.get_num_threads()} thread(s), "
        f"median of {args.reps} (after one warm-up)"
    )
    samples: dict[str, list[float]] = {name: [] for name in runs}
    for _ in range(args.reps):  # round robin, so a busy machine slows every variant alike
        for name, (run, parameters) in runs.items():
            if device.type == "cuda":
                torch.cuda.synchronize(device)
            started = time.perf_counter()
            step(run, parameters, frames)
            if device.type == "cuda":
                torch.cuda.synchronize(device)
            samples[name].append(time.perf_counter() - started)
    times = {name: statistics.median(values) for name, values in samples.items()}
    for name, seconds in times.items():
        print(
            f"  {name:>8}  {seconds * 1000:9.1f} ms   {seconds / times['grouped']:5.2f}x grouped   "
            f"{seconds / args.members * 1000:7.1f} ms per member"
        )


if __name__ == "__main__":
    main()
