"""One command that proves the CUDA path on a GPU machine, in under 6 minutes.

Steps, each a subprocess with its own time limit inside the overall budget (``--budget``, 360 s):

1. ``pytest -m cuda tests/cuda``: CUDA telemetry keys, the out-of-memory report's
   ``memory_summary``, the allocator-history snapshot, pinned host memory, every checkpointed tensor
   back on the GPU after a resume, the fused and CUDA-graph (``reduce-overhead``) update against the
   eager one.
2. A short training run on ``cuda`` (pendulum preset, 2 generations of 200 updates): its status block
   must show the CUDA lines (allocated, reserved, peak, driver used, utilisation where ``pynvml`` is
   installed); ``nvidia-smi`` is read at the end for comparison when it exists.
3. ``benchmarks/population_update.py`` at 256x256 (the halfcheetah preset's shape): batched (fast)
   over a per-member loop, the issue's goal >= 10x.
4. The same benchmark at the pendulum shape: fast over eager, and compiled (``reduce-overhead``:
   CUDA graphs) over eager, with the compile time.

It needs the project's dependencies where it runs (gymnasium; ale-py for the Pong tests): on a
machine without internet, bring them as wheels and put them on ``PYTHONPATH``, which the steps keep.

Then a summary of a few lines (PASS/FAIL per step with its figure) and, with ``--json``, every figure.
Exit code 0 when every step passed, 1 when one failed, 2 without a CUDA device (one line, nothing run).

    python benchmarks/gpu_check.py                 # on the GPU machine, from the repository root
    python benchmarks/gpu_check.py --json gpu.json --budget 300
"""

from __future__ import annotations

import argparse
import json
import os
import re
import shutil
import subprocess
import sys
import tempfile
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
CUDA_STATUS = re.compile(r"cuda\s+allocated [\d,]+ MB\s+reserved [\d,]+ MB\s+peak [\d,]+ MB\s+driver used [\d,]+ MB")
STEP_LIMITS = {"tests": 120, "train": 90, "loop": 60, "compile": 90}
"""Seconds each step may take (360 in all), cut down to what is left of the budget."""


def parse_args(argv: Sequence[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--budget", type=float, default=360.0, help="seconds for all steps (default 360)")
    parser.add_argument("--device", default="cuda", help="the CUDA device to check (default cuda)")
    parser.add_argument("--json", type=Path, help="also write every figure here")
    args = parser.parse_args(argv)
    if not args.device.startswith("cuda"):
        parser.error(f"--device must be a CUDA device (cuda, cuda:1, ...), got {args.device!r}")
    if args.budget <= 0:
        parser.error("--budget must be > 0 seconds")
    return args


def cuda_device_line() -> str | None:
    """The device's name and memory, or None when torch sees no CUDA device."""
    import torch

    if not torch.cuda.is_available():
        return None
    props = torch.cuda.get_device_properties(0)
    return f"{props.name}, {props.total_memory / 2**30:.0f} GiB, torch {torch.__version__}, CUDA {torch.version.cuda}"


class Steps:
    """Runs the steps in order within the budget and keeps their results."""

    def __init__(self, budget: float) -> None:
        self.deadline = time.monotonic() + budget
        self.results: dict[str, dict[str, Any]] = {}

    def run(self, name: str, command: list[str]) -> tuple[int | None, str]:
        """(exit code or None on timeout/no time left, combined output) of ``command`` from the repo root."""
        limit = min(STEP_LIMITS[name], self.deadline - time.monotonic())
        if limit < 10:
            self.results[name] = {"seconds": 0.0, "exit_code": None}
            return None, f"skipped: the budget was spent ({max(limit, 0):.0f} s left)"
        path = os.pathsep.join(p for p in (str(ROOT), os.environ.get("PYTHONPATH", "")) if p)  # keep the caller's
        env = {**os.environ, "PYTHONUNBUFFERED": "1", "PYTHONPATH": path}
        started = time.monotonic()
        try:
            done = subprocess.run(command, cwd=ROOT, env=env, capture_output=True, text=True, timeout=limit)
            code: int | None = done.returncode
            output = done.stdout + done.stderr
        except subprocess.TimeoutExpired as err:
            code, output = None, f"timed out after {limit:.0f} s\n{_text(err.stdout)}{_text(err.stderr)}"
        self.results[name] = {"seconds": round(time.monotonic() - started, 1), "exit_code": code}
        return code, output


def _text(data: bytes | str | None) -> str:
    if data is None:
        return ""
    return data if isinstance(data, str) else data.decode(errors="replace")


def tests_step(steps: Steps) -> str:
    command = [sys.executable, "-m", "pytest", "-q", "-rs", "-m", "cuda", "tests/cuda", "-p", "no:cacheprovider"]
    code, out = steps.run("tests", command)
    lines = out.strip().splitlines() or ["no output"]
    summary = next((line for line in reversed(lines) if re.search(r"\d+ (passed|failed|error)", line)), lines[-1])
    summary = summary.strip("= ")
    passed = code == 0 and "passed" in summary  # all skipped is no proof
    steps.results["tests"] |= {"passed": passed, "summary": summary}
    return f"{'PASS' if passed else 'FAIL'} cuda tests: {summary}"


def train_step(steps: Steps, device: str) -> str:
    run_dir = tempfile.mkdtemp(prefix="gpu-check-runs-")
    command = [sys.executable, "main.py", "--preset", "pendulum", "--device", device, "--generations", "2"]
    command += ["--run-dir", run_dir, "--name", "gpu-check", "--set", "train.updates_per_generation=200"]
    command += ["--set", "run.progress=false", "--set", "run.tensorboard=false"]
    code, out = steps.run("train", command)
    shutil.rmtree(run_dir, ignore_errors=True)
    lines = [line.strip() for line in out.splitlines() if CUDA_STATUS.search(line)]
    rates = re.findall(r"updates\s+[\d,]+\s+\(([\d.,]+) optimizer steps/s\)", out)
    smi = nvidia_smi()
    ok = code == 0 and bool(lines)
    steps.results["train"] |= {"passed": ok, "cuda_lines": lines, "optimizer_steps_per_s": rates, "nvidia_smi": smi}
    if not ok:
        tail = " | ".join(out.strip().splitlines()[-3:])
        return f"FAIL training run on {device}: exit {code}, CUDA status lines {len(lines)}; last output: {tail}"
    rate = f", {rates[-1]} optimizer steps/s" if rates else ""
    return f"PASS training run on {device}{rate}: {lines[-1]}" + (f"; nvidia-smi: {smi}" if smi else "")


def nvidia_smi() -> str:
    """``nvidia-smi``'s used memory and utilisation of GPU 0 now ('' where it is not installed)."""
    if shutil.which("nvidia-smi") is None:
        return ""
    query = ["nvidia-smi", "--query-gpu=memory.used,utilization.gpu", "--format=csv,noheader", "-i", "0"]
    try:
        return subprocess.run(query, capture_output=True, text=True, timeout=10).stdout.strip()
    except (OSError, subprocess.SubprocessError):
        return ""


def benchmark(steps: Steps, name: str, device: str, args: list[str]) -> dict[str, Any] | None:
    """Run ``benchmarks/population_update.py`` with ``args`` on ``device``; its JSON result or None."""
    with tempfile.TemporaryDirectory() as folder:
        out_json = Path(folder) / "result.json"
        command = [
            sys.executable,
            "benchmarks/population_update.py",
            "--device",
            device,
            *args,
            "--json",
            str(out_json),
        ]
        code, out = steps.run(name, command)
        if code != 0 or not out_json.exists():
            steps.results[name] |= {"passed": False, "output": out.strip().splitlines()[-3:]}
            return None
        return json.loads(out_json.read_text())


def loop_step(steps: Steps, device: str) -> str:
    result = benchmark(
        steps, "loop", device, ["--preset", "halfcheetah", "--designs", "fast", "looped", "--rounds", "4"]
    )
    if result is None:
        return "FAIL batched/looped at 256x256: the benchmark did not finish"
    ratio = result["speedup"]
    steps.results["loop"] |= {"passed": ratio >= 10, "ratio": ratio, "median_s": result["median_s"]}
    verdict = "PASS" if ratio >= 10 else "FAIL"
    return f"{verdict} batched/looped at 256x256, P=16: {ratio:.1f}x (goal >= 10x)"


def compile_step(steps: Steps, device: str) -> str:
    args = ["--preset", "pendulum", "--designs", "eager", "fast", "compiled", "--compile-mode", "reduce-overhead"]
    result = benchmark(steps, "compile", device, [*args, "--rounds", "6"])
    if result is None:
        return "FAIL fast and CUDA-graph update at the pendulum shape: the benchmark did not finish"
    fast, graphs = result["ratio"]["fast"], result["ratio"]["compiled"]
    passed = max(fast, graphs) >= 2  # the goal is met by either path (agent.compile picks CUDA graphs)
    steps.results["compile"] |= {"passed": passed, "fast_over_eager": fast, "graphs_over_eager": graphs}
    steps.results["compile"] |= {"compile_s": result["compile_s"], "median_s": result["median_s"]}
    return (
        f"{'PASS' if passed else 'FAIL'} pendulum shape: fast/eager {fast:.2f}x, CUDA graphs/eager {graphs:.2f}x "
        f"(goal: either >= 2x; compiled in {result['compile_s']:.0f} s)"
    )


def main(argv: Sequence[str] | None = None) -> int:
    args = parse_args(argv)
    device = cuda_device_line()
    if device is None:
        print("gpu_check: no CUDA device visible to torch here; nothing was checked (run it on a GPU machine)")
        return 2
    started = time.monotonic()
    steps = Steps(args.budget)
    print(f"gpu_check on {device}", flush=True)
    lines = []
    for step in (tests_step, lambda s: train_step(s, args.device), lambda s: loop_step(s, args.device)):
        lines.append(step(steps))
        print(lines[-1], flush=True)
    lines.append(compile_step(steps, args.device))
    print(lines[-1], flush=True)
    passed = all(result.get("passed") for result in steps.results.values()) and len(steps.results) == 4
    print(f"== gpu_check summary ({time.monotonic() - started:.0f} s, {device}) ==")
    for line in lines:
        print(f"  {line[:160]}")
    print(f"  overall: {'PASS' if passed else 'FAIL'}")
    if args.json is not None:
        args.json.write_text(json.dumps({"device": device, "passed": passed, "steps": steps.results}, indent=2) + "\n")
    return 0 if passed else 1


if __name__ == "__main__":
    sys.exit(main())
