"""``python main.py export``: a member's actor as safetensors + JSON; ``agents.load_policy`` gives
back a plain ``obs -> action`` callable whose actions equal the trainer's."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch
from click.testing import CliRunner, Result

from agents import load_policy
from agents.policy import PolicyFileError
from main import cli
from tests.test_main import assert_one_line_user_error
from tests.training.tools.conftest import FinishedRun
from training.envs import make_env


def invoke(*args: str) -> Result:
    return CliRunner().invoke(cli, list(args))


def trainer_actions(run: FinishedRun, slot: int, obs: np.ndarray) -> np.ndarray:
    """What the trainer sends to the env for ``obs (N, obs_dim)``: its population's noise-free
    actions for member ``slot``, rescaled to the action box as its env pool rescales them."""
    batch = torch.as_tensor(obs).expand(run.cfg.population, *obs.shape).contiguous()
    with torch.inference_mode():
        action = run.agent.act(batch, False)[slot].numpy()
    space = make_env(run.cfg.env).action_space
    low, high = space.low.astype(np.float32), space.high.astype(np.float32)  # type: ignore[attr-defined]
    return np.clip(low + (action + 1.0) * 0.5 * (high - low), low, high)


@pytest.mark.parametrize("rows", [1, 5, 40])  # 40: the batched layers take another path from 32 rows on
def test_the_exported_elite_acts_as_the_trainer_does(finished: FinishedRun, tmp_path: Path, rows: int) -> None:
    result = invoke("export", finished.name, "--run-dir", str(finished.run_dir), "--out", str(tmp_path / "policy"))
    assert result.exit_code == 0, result.output
    policy = load_policy(tmp_path / "policy")
    slot = finished.records()[-1]["elite_slot"]
    obs = np.random.default_rng(rows).normal(size=(rows, 3)).astype(np.float32) * 3
    actions = policy(obs)
    assert actions.shape == (rows, 1) and actions.dtype == np.float32
    np.testing.assert_array_equal(actions, trainer_actions(finished, slot, obs))
    single = policy(obs[0])  # one observation -> one action (a 1-row matmul may round differently: 1 ulp)
    assert single.shape == (1,) and single.dtype == np.float32
    np.testing.assert_allclose(single, actions[0], rtol=1e-6, atol=1e-7)
    assert np.all(np.abs(actions) <= 2.0)


def test_the_json_says_what_the_policy_is_and_where_it_came_from(finished: FinishedRun, tmp_path: Path) -> None:
    result = invoke(
        "export", "--run-dir", str(finished.run_dir), "--generation", "2", "--member", "elite", "--out", str(tmp_path)
    )
    assert result.exit_code == 0, result.output
    info = json.loads((tmp_path / "policy.json").read_text())
    record = finished.records()[1]
    assert info["format"] == "evorl-policy/1"
    assert info["architecture"]["sizes"] == [3, 32, 32, 1]
    assert info["observation_space"]["shape"] == [3] and info["action_space"]["low"] == [-2.0]
    assert info["action_space"]["high"] == [2.0]
    assert (info["env_id"], info["generation"], info["run"]) == ("Pendulum-v1", 2, "done")
    assert (info["slot"], info["fitness"]) == (record["elite_slot"], record["fitness_best"])
    assert info["config_hash"] == finished.cfg.hash()
    assert info["tensors"]["layers.0.weight"] == [3, 32]


def test_an_earlier_export_is_kept_without_force(finished: FinishedRun, tmp_path: Path) -> None:
    args = ["export", "--run-dir", str(finished.run_dir), "--out", str(tmp_path)]
    assert invoke(*args, "--member", "0").exit_code == 0
    before = (tmp_path / "policy.safetensors").read_bytes()
    assert_one_line_user_error(invoke(*args, "--member", "1"), "already holds policy.safetensors", "--force")
    assert (tmp_path / "policy.safetensors").read_bytes() == before
    assert invoke(*args, "--member", "1", "--force").exit_code == 0
    assert json.loads((tmp_path / "policy.json").read_text())["slot"] == 1


def test_an_unwritable_output_folder_is_one_line(finished: FinishedRun, tmp_path: Path) -> None:
    blocker = tmp_path / "a-file"
    blocker.write_text("x")
    result = invoke("export", "--run-dir", str(finished.run_dir), "--out", str(blocker / "out"))
    assert_one_line_user_error(result, "cannot write to", str(blocker))


@pytest.mark.parametrize(
    ("args", "expected"),
    [
        (["ghost"], ["no run 'ghost'"]),
        (["done", "--generation", "7"], ["has no generation 7"]),
        (["done", "--member", "12"], ["member slot 12 is out of range"]),
    ],
)
def test_bad_input_is_one_line(finished: FinishedRun, tmp_path: Path, args: list[str], expected: list[str]) -> None:
    result = invoke("export", *args, "--run-dir", str(finished.run_dir), "--out", str(tmp_path / "out"))
    assert_one_line_user_error(result, *expected)
    assert not (tmp_path / "out").exists()


def test_the_dreamer_member_of_a_run_without_one_is_one_line(finished: FinishedRun, tmp_path: Path) -> None:
    result = invoke("export", "--run-dir", str(finished.run_dir), "--member", "dreamer", "--out", str(tmp_path))
    assert_one_line_user_error(result, "has no Dreamer member", "dreamer.enabled=false")
    assert not any(tmp_path.iterdir())


def test_a_damaged_export_is_refused(finished: FinishedRun, tmp_path: Path) -> None:
    assert invoke("export", "--run-dir", str(finished.run_dir), "--out", str(tmp_path)).exit_code == 0
    weights = tmp_path / "policy.safetensors"
    data = bytearray(weights.read_bytes())
    data[-1] ^= 0xFF
    weights.write_bytes(bytes(data))
    with pytest.raises(PolicyFileError, match="does not match the sha256"):
        load_policy(tmp_path)
