"""``agents.policy``: the exported actor's files and the plain numpy callable they load into."""

from __future__ import annotations

import json
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from agents.policy import (
    DiscretePolicy,
    Policy,
    PolicyFileError,
    discrete_member,
    load_policy,
    save_discrete_policy,
    save_policy,
    scale_actions,
)
from agents.sac_discrete import DiscreteSACPopulation
from config import AgentConfig

CPU = torch.device("cpu")


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


# ------------------------------------------------------------ evorl-policy/1 as the previous exporter wrote it

GOLDEN_V1 = Path(__file__).parent / "data" / "policy-v1"
"""A TD3 folder written by the exporter before evorl-policy/2 existed, and its actions then."""


def test_a_folder_the_previous_exporter_wrote_loads_and_acts_as_it_did() -> None:
    expected = json.loads((GOLDEN_V1 / "expected.json").read_text())
    policy = load_policy(GOLDEN_V1)
    assert isinstance(policy, Policy) and policy.info["format"] == "evorl-policy/1"
    obs = np.asarray(expected["obs"], np.float32)
    np.testing.assert_array_equal(policy(obs), np.asarray(expected["actions"], np.float32))
    np.testing.assert_array_equal(policy(obs[0]), np.asarray(expected["single"], np.float32))


# ------------------------------------------------------------ evorl-policy/2: discrete actors, frames or vectors

FRAMES = (2, 36, 36)  # the smallest frames the NatureCNN geometry takes


def discrete_agent(obs_shape: tuple[int, ...], actions: int = 3) -> DiscreteSACPopulation:
    cfg = AgentConfig(hidden_sizes=[8], cnn_channels=[2, 4, 4], cnn_features=8)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(0)
        return DiscreteSACPopulation(3, obs_shape[0] if len(obs_shape) == 1 else obs_shape, actions, cfg, CPU)


def save_member(agent: DiscreteSACPopulation, folder: Path, slot: int = 1, first_action: int = 0) -> None:
    obs_shape = FRAMES if agent.encoder is not None else (int(agent.actor.layers[0].weight.shape[1]),)
    net, tensors = discrete_member(agent.encoder, agent.actor, slot, obs_shape, first_action)
    save_discrete_policy(folder, net, tensors, {"env_id": "Toy-v0"})


def spread(agent: DiscreteSACPopulation, obs: np.ndarray, slot: int = 1) -> None:
    """Rescale member ``slot``'s last actor layer so its logits on ``obs`` are centred with spread ~1:
    a fresh tiny CNN's logits differ by ~1e-3 between frames, which would pick one action for all."""
    full = torch.zeros(agent.population, *obs.shape)
    full[slot] = torch.as_tensor(obs)
    with torch.no_grad():
        logits = agent.actor(agent._features(full))[slot]
        last = agent.actor.neuron_groups()[-1]
        last[1][slot] -= logits.mean(0)
        scale = 1.0 / logits.std(0).mean()
        last[0][slot] *= scale
        last[1][slot] *= scale


def population_actions(agent: DiscreteSACPopulation, slot: int, obs: np.ndarray) -> np.ndarray:
    """Member ``slot``'s noise-free integer actions for ``obs (N, ...)``, the others acting on zeros."""
    full = torch.zeros(agent.population, *obs.shape)
    full[slot] = torch.as_tensor(obs)
    return agent.act(full, False)[slot].argmax(-1).numpy()


@pytest.mark.parametrize("obs_shape", [(5,), FRAMES], ids=["vectors", "frames"])
def test_a_discrete_member_loads_as_the_argmax_of_its_own_logits(tmp_path: Path, obs_shape: tuple[int, ...]) -> None:
    agent = discrete_agent(obs_shape)
    rng = np.random.default_rng(0)
    if len(obs_shape) == 1:
        obs = rng.normal(size=(64, *obs_shape)).astype(np.float32)
    else:
        obs = rng.integers(0, 256, size=(64, *obs_shape), dtype=np.uint8)
        spread(agent, obs)
    save_member(agent, tmp_path)
    policy = load_policy(tmp_path)
    assert isinstance(policy, DiscretePolicy) and policy.info["format"] == "evorl-policy/2"
    actions = policy(obs)
    assert actions.shape == (64,) and actions.dtype == np.int64 and len(set(actions.tolist())) > 1
    np.testing.assert_array_equal(actions, population_actions(agent, 1, obs))
    assert policy(obs[3]).shape == () and policy(obs[3]) == actions[3]
    np.testing.assert_array_equal(actions, policy.logits(obs).argmax(-1))


def test_the_frames_go_through_the_members_own_encoder_and_are_scaled_to_0_1(tmp_path: Path) -> None:
    agent = discrete_agent(FRAMES)
    save_member(agent, tmp_path)
    policy = load_policy(tmp_path)
    frames = np.random.default_rng(1).integers(0, 256, size=(7, *FRAMES), dtype=np.uint8)
    assert agent.encoder is not None
    agent.encoder.grouped = False  # one member's own convolutions: what the policy runs, bit for bit
    full = torch.zeros(3, *frames.shape)
    full[1] = torch.as_tensor(frames)
    with torch.inference_mode():
        logits = agent.actor(agent.encoder(full))[1].numpy()
    np.testing.assert_array_equal(policy.logits(frames), logits)
    x = torch.as_tensor(frames).float() / 255  # by hand from the file's tensors
    for i, stride in enumerate((4, 2, 1)):
        weight, bias = agent.encoder.weights[i][1], agent.encoder.biases[i][1]
        x = F.conv2d(x, weight.detach(), bias.detach(), stride).relu()
    x = torch.relu(x.flatten(1) @ agent.encoder.linear.weight[1].detach() + agent.encoder.linear.bias[1].detach())
    np.testing.assert_allclose(
        policy.logits(frames), agent.actor(x.unsqueeze(0).expand(3, -1, -1))[1].detach(), atol=1e-6
    )


def test_the_first_action_offsets_the_argmax_and_ties_pick_the_first(tmp_path: Path) -> None:
    agent = discrete_agent((4,))
    with torch.no_grad():
        for layer in agent.actor.layers:
            layer.weight.zero_()
            layer.bias.zero_()  # every logit 0: a tie of all actions
    save_member(agent, tmp_path, first_action=-1)
    policy = load_policy(tmp_path)
    assert policy.info["architecture"]["output"] == {
        "kind": "argmax",
        "actions": 3,
        "first_action": -1,
        "rule": "action = first_action + argmax(logits), the first of equal maxima",
    }
    np.testing.assert_array_equal(policy(np.ones((2, 4), np.float32)), [-1, -1])


@pytest.mark.parametrize(
    ("obs", "expected"),
    [
        (
            np.zeros((36, 36), np.uint8),
            r"expected uint8 frame stacks of shape \(2, 36, 36\) or \(N, 2, 36, 36\), got \(36, 36\) uint8",
        ),
        (np.zeros(FRAMES, np.float32), r"got \(2, 36, 36\) float32"),
        (np.zeros((1, 1, *FRAMES), np.uint8), r"got \(1, 1, 2, 36, 36\) uint8"),
    ],
)
def test_frames_of_another_shape_or_dtype_are_a_clear_error(tmp_path: Path, obs: np.ndarray, expected: str) -> None:
    save_member(discrete_agent(FRAMES), tmp_path)
    with pytest.raises(ValueError, match=expected) as refused:
        load_policy(tmp_path)(obs)
    assert "\n" not in str(refused.value)


def test_vectors_of_another_shape_are_a_clear_error(tmp_path: Path) -> None:
    save_member(discrete_agent((5,)), tmp_path)
    with pytest.raises(ValueError, match=r"expected observations of shape \(5,\) or \(N, 5\), got \(4,\) float32"):
        load_policy(tmp_path)(np.zeros(4))


def edit_architecture(folder: Path, edit: Callable[[dict[str, Any]], None]) -> None:
    described = json.loads((folder / "policy.json").read_text())
    edit(described["architecture"])
    (folder / "policy.json").write_text(json.dumps(described))


@pytest.mark.parametrize(
    ("edit", "expected"),
    [
        (lambda a: a["encoder"]["convolutions"][0].update(kernel=7), "describes no architecture this loader runs"),
        (lambda a: a["input"].update(scaling="none"), "describes no architecture this loader runs"),
        (lambda a: a["output"].update(kind="tanh_box"), "describes no architecture this loader runs"),
        (lambda a: a.pop("head"), "describes no architecture this loader runs"),
        (lambda a: a.update(input=[4]), "describes no architecture this loader runs"),
        (lambda a: a["input"].update(shape=[2, 8, 8]), "describes no architecture this loader runs"),
        (lambda a: a["head"].update(sizes=[9, 8, 3]), "describes no architecture this loader runs"),
        (lambda a: a["head"].update(sizes=[8, 16, 3]), "does not hold the network that policy.json describes"),
    ],
    ids=["kernel", "scaling", "output", "no-head", "malformed", "tiny-frames", "head-misfit", "other-head"],
)
def test_a_foreign_or_inconsistent_discrete_description_is_refused_in_one_line(
    tmp_path: Path, edit: Callable[[dict[str, Any]], None], expected: str
) -> None:
    save_member(discrete_agent(FRAMES), tmp_path)
    edit_architecture(tmp_path, edit)
    with pytest.raises(PolicyFileError, match=expected) as refused:
        load_policy(tmp_path)
    assert "\n" not in str(refused.value)


def test_a_damaged_discrete_export_is_refused(tmp_path: Path) -> None:
    save_member(discrete_agent(FRAMES), tmp_path)
    weights = tmp_path / "policy.safetensors"
    data = bytearray(weights.read_bytes())
    data[len(data) // 2] ^= 0x01
    weights.write_bytes(bytes(data))
    with pytest.raises(PolicyFileError, match="does not match the sha256"):
        load_policy(tmp_path)
