"""benchmarks/population_update.py: the matmul floor replays exactly the update's matmuls."""

from __future__ import annotations

import importlib.util
import json
import subprocess
import sys
from pathlib import Path
from types import ModuleType

import torch

from agents.td3 import TD3Population
from config import AgentConfig

REPO_ROOT = Path(__file__).resolve().parents[1]


def benchmark() -> ModuleType:
    spec = importlib.util.spec_from_file_location("population_update", REPO_ROOT / "benchmarks/population_update.py")
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_the_floor_records_the_fast_updates_matmuls_and_their_flops() -> None:
    bench = benchmark()
    population, obs, act, batch, hidden = 3, 5, 2, 8, [8, 8]  # 16 rows: every layer a matmul
    cfg = AgentConfig(hidden_sizes=hidden, batch_size=batch)
    agent = TD3Population(population, obs, act, cfg, torch.device("cpu"))
    batches = bench.make_batches(population, 2, batch, torch.device("cpu"), obs, act)
    floor = bench.MatmulFloor(lambda: agent.update(batches), cfg.policy_delay, torch.device("cpu"))
    # critic step: 3 forward + 5 backward; TD target: 3 + 3; actor step (every 2nd): 3 + 3 forward, 3 + 5 backward
    assert floor.matmuls_per_update() == 8 + 6 + 14 / 2
    expected = bench.update_flops(population, obs, act, hidden, 2 * batch, cfg.policy_delay)
    assert floor.flops_per_update() == expected
    floor()
    floor()  # replays both recorded updates in turn, without a graph or any state change
    assert floor.turn == 0


def test_a_quick_run_reports_the_floor_bound(tmp_path: Path) -> None:
    out = tmp_path / "result.json"
    command = [sys.executable, "benchmarks/population_update.py", "--quick", "--designs", "eager", "fast", "--floor"]
    command += ["--population", "2", "--hidden", "8", "8", "--batch-size", "8", "-k", "1", "--json", str(out)]
    done = subprocess.run(command, cwd=REPO_ROOT, capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr
    result = json.loads(out.read_text())
    assert set(result["floor_bound"]) == {"eager", "fast"} and all(b > 0 for b in result["floor_bound"].values())
    assert "Most speed-up left over each design: eager" in done.stdout
