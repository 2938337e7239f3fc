"""``agents.policy``: the exported actor's files and the plain numpy callable they load into."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch

from agents.policy import PolicyFileError, load_policy, save_policy, scale_actions


def layers(sizes: list[int]) -> list[tuple[torch.Tensor, torch.Tensor]]:
    gen = torch.Generator().manual_seed(0)
    return [
        (torch.randn(a, b, generator=gen), torch.randn(b, generator=gen))
        for a, b in zip(sizes, sizes[1:], strict=False)
    ]


def info(sizes: list[int], low: list[float], high: list[float]) -> dict:
    return {"architecture": {"sizes": sizes}, "action_space": {"low": low, "high": high}, "env_id": "Toy-v0"}


def test_a_saved_policy_computes_the_mlp_and_scales_to_the_box(tmp_path: Path) -> None:
    net = layers([4, 8, 2])
    save_policy(tmp_path, net, info([4, 8, 2], [-1.0, 0.0], [1.0, 10.0]))
    policy = load_policy(tmp_path)
    obs = np.random.default_rng(0).normal(size=(6, 4)).astype(np.float32)
    (w1, b1), (w2, b2) = net
    hidden = torch.relu(torch.as_tensor(obs) @ w1 + b1)
    expected = torch.tanh(hidden @ w2 + b2).numpy()
    np.testing.assert_allclose(policy.normalized(obs), expected, rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(policy(obs)[:, 1], (expected[:, 1] + 1) * 5, rtol=1e-5, atol=1e-5)
    assert policy(obs[0]).shape == (2,) and policy.info["env_id"] == "Toy-v0"


def test_loading_leaves_the_callers_random_generator_alone(tmp_path: Path) -> None:
    save_policy(tmp_path, layers([2, 3, 1]), info([2, 3, 1], [-1.0], [1.0]))
    torch.manual_seed(5)
    load_policy(tmp_path)
    after = torch.rand(1)
    torch.manual_seed(5)
    assert torch.equal(after, torch.rand(1))


def test_scaling_clips_to_the_box() -> None:
    low, high = np.array([-2.0], np.float32), np.array([2.0], np.float32)
    np.testing.assert_array_equal(
        scale_actions(np.array([[-1.0], [0.0], [1.5]], np.float32), low, high), [[-2], [0], [2]]
    )


def test_a_wrong_observation_shape_is_a_clear_error(tmp_path: Path) -> None:
    save_policy(tmp_path, layers([2, 3, 1]), info([2, 3, 1], [-1.0], [1.0]))
    with pytest.raises(ValueError, match=r"expected observations of shape \(2,\) or \(N, 2\), got \(3,\)"):
        load_policy(tmp_path)(np.zeros(3, np.float32))


def test_missing_foreign_and_inconsistent_folders_are_refused(tmp_path: Path) -> None:
    with pytest.raises(PolicyFileError, match="no exported policy in"):
        load_policy(tmp_path / "none")
    save_policy(tmp_path, layers([2, 3, 1]), info([2, 3, 1], [-1.0], [1.0]))
    described = json.loads((tmp_path / "policy.json").read_text())
    (tmp_path / "policy.json").write_text(json.dumps({**described, "format": "other/1"}))
    with pytest.raises(PolicyFileError, match="is not an evorl-policy/1 description"):
        load_policy(tmp_path)
    (tmp_path / "policy.json").write_text(json.dumps({**described, "architecture": {"sizes": [2, 4, 1]}}))
    with pytest.raises(PolicyFileError, match="does not hold the MLP"):
        load_policy(tmp_path)
