"""The population of CNN encoders (agents/cnn.py) and the discrete SAC members built on it."""

from __future__ import annotations

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from support import tensors_with_graph
from torch import nn

from agents import Batch, make_population
from agents.cnn import BatchedCNN, conv_output_size
from agents.sac_discrete import DiscreteSACPopulation
from config import AgentConfig, EvolutionConfig, UserError
from training.evolution import Evolution

P, B, N = 3, 4, 6
FRAMES = (4, 44, 44)  # the smallest NatureCNN geometry with a 2x2 last map: cheap, and flattening matters
CHANNELS, FEATURES = [4, 8, 8], 16


def frames(*lead: int, seed: int = 0) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return torch.randint(0, 256, (*lead, *FRAMES), dtype=torch.uint8, generator=g)


def member_encoder(cnn: BatchedCNN, p: int) -> nn.Sequential:
    """A standalone torch encoder holding copies of member ``p``'s weights (the reference)."""
    layers: list[nn.Module] = []
    for weight, bias, stride in zip(cnn.weights, cnn.biases, (4, 2, 1), strict=True):
        conv = nn.Conv2d(weight.shape[2], weight.shape[1], weight.shape[3], stride)
        conv.weight.data.copy_(weight[p].detach())
        assert conv.bias is not None
        conv.bias.data.copy_(bias[p].detach())
        layers += [conv, nn.ReLU()]
    linear = nn.Linear(cnn.linear.weight.shape[1], cnn.linear.weight.shape[2])
    linear.weight.data.copy_(cnn.linear.weight[p].detach().T)
    linear.bias.data.copy_(cnn.linear.bias[p, 0].detach())
    return nn.Sequential(*layers, nn.Flatten(), linear, nn.ReLU())


def test_conv_output_size_follows_the_nature_cnn_geometry() -> None:
    assert conv_output_size(84) == 7 and conv_output_size(44) == 2 and conv_output_size(36) == 1
    assert conv_output_size(35) == 0
    with pytest.raises(ValueError, match="too small"):
        BatchedCNN(P, (4, 32, 32))


@pytest.mark.parametrize("grouped", [True, False])
def test_the_batched_cnn_equals_one_torch_encoder_per_member(grouped: bool) -> None:
    torch.manual_seed(0)
    cnn = BatchedCNN(P, FRAMES, CHANNELS, FEATURES, grouped=grouped)
    x = frames(P, B)
    out = cnn(x)
    assert out.shape == (P, B, FEATURES) and out.dtype == torch.float32
    out.square().sum().backward()
    for p in range(P):
        alone = member_encoder(cnn, p)
        expected = alone(x[p].float() / 255.0)
        torch.testing.assert_close(out[p], expected, rtol=1e-5, atol=1e-6)
        expected.square().sum().backward()
        first = alone[0]
        assert isinstance(first, nn.Conv2d) and first.weight.grad is not None and cnn.weights[0].grad is not None
        torch.testing.assert_close(cnn.weights[0].grad[p], first.weight.grad, rtol=1e-4, atol=1e-6)


def test_grouped_and_looped_forward_agree_and_members_do_not_mix() -> None:
    torch.manual_seed(1)
    cnn = BatchedCNN(P, FRAMES, CHANNELS, FEATURES, grouped=False)
    x = frames(P, B)
    looped = cnn(x)
    cnn.grouped = True
    grouped = cnn(x)
    torch.testing.assert_close(grouped, looped, rtol=1e-5, atol=1e-6)
    changed = x.clone()
    changed[1] = frames(B, seed=5)
    out = cnn(changed)
    torch.testing.assert_close(out[[0, 2]], grouped[[0, 2]], rtol=0, atol=0)  # only member 1's input changed
    assert not torch.equal(out[1], grouped[1])


# ---------------------------------------------------------------- discrete SAC with CNN members


def cnn_agent(**cfg: object) -> DiscreteSACPopulation:
    torch.manual_seed(0)
    config = AgentConfig(hidden_sizes=[16], batch_size=B, cnn_channels=CHANNELS, cnn_features=FEATURES, **cfg)  # type: ignore[arg-type]
    agent = make_population(P, FRAMES, N, config, torch.device("cpu"), action_kind="discrete")
    assert isinstance(agent, DiscreteSACPopulation)
    return agent


def pixel_batch(seed: int = 1) -> Batch:
    g = torch.Generator().manual_seed(seed)
    return Batch(
        obs=frames(P, B, seed=seed),
        action=F.one_hot(torch.randint(N, (P, B), generator=g), N).float(),
        reward=torch.randn(P, B, generator=g),
        next_obs=frames(P, B, seed=seed + 100),
        terminated=torch.zeros(P, B),
    )


def test_cnn_members_have_one_encoder_each_and_act_on_uint8_frames() -> None:
    agent = cnn_agent()
    assert agent.encoder is not None and agent.encoder_target is not None
    tensors = agent.member_tensors()
    encoder = [name for name in tensors if name.startswith("encoder.")]
    assert len(encoder) == 8 and all(tensors[name].shape[0] == P for name in tensors)
    assert tensors["encoder.weights.0"].shape == (P, CHANNELS[0], FRAMES[0], 8, 8)
    assert tensors["actor.layers.0.weight"].shape == (P, FEATURES, 16)  # the heads read the features
    assert torch.equal(tensors["encoder.weights.0"], tensors["encoder_target.weights.0"])
    action = agent.act(frames(P, 2), explore=True)
    assert action.shape == (P, 2, N) and action.dtype == torch.float32
    torch.testing.assert_close(action.sum(-1), torch.ones(P, 2))
    actor_ids = {id(p) for p in agent.actor_opt.params}
    assert all(id(p) not in actor_ids for p in agent.encoder.parameters())  # only the critic loss trains it
    assert {id(p) for p in agent.encoder.parameters()} <= {id(p) for p in agent.critic_opt.params}


def test_a_cnn_update_trains_the_encoder_by_the_critic_loss_and_leaves_floats_only() -> None:
    agent = cnn_agent()
    assert agent.encoder is not None
    before = {n: t.clone() for n, t in agent.member_tensors().items()}
    metrics = agent.update([pixel_batch(1), pixel_batch(2)])
    after = agent.member_tensors()
    for name in ("encoder.weights.0", "encoder.linear.weight", "encoder_target.weights.0", "actor.layers.0.weight"):
        assert all(not torch.equal(before[name][p], after[name][p]) for p in range(P)), name
    assert all(isinstance(v, float) and np.isfinite(v) for values in metrics.values() for v in values)
    assert not tensors_with_graph()


def test_evolution_copies_cnn_members_whole_and_mutates_only_the_actor_head() -> None:
    agent = cnn_agent()
    agent.update([pixel_batch(3)])
    before = {n: t.clone() for n, t in agent.member_tensors().items()}
    cfg = EvolutionConfig(elites=1, replace_fraction=0.34, mutation_scale=0.1, mutation_fraction=1.0)
    events = Evolution(cfg, P, seed=0).evolve(agent, np.array([3.0, 2.0, 1.0]), generation=0)
    assert [e["slot"] for e in events] == [2]
    parent = events[0]["parent"]
    after = agent.member_tensors()
    for name in after:
        if name.startswith(("encoder", "critic")):  # copied from the parent, untouched by mutation
            assert torch.equal(after[name][2], before[name][parent]), name
    assert not torch.equal(after["actor.layers.0.weight"][2], before["actor.layers.0.weight"][parent])
    assert all(torch.equal(after[name][:2], before[name][:2]) for name in after)  # the survivors unchanged


def test_only_algorithms_with_a_cnn_member_take_image_observations() -> None:
    with pytest.raises(UserError, match="agent.algorithm td3 has no CNN member for image observations") as refused:
        make_population(P, FRAMES, 2, AgentConfig(), torch.device("cpu"), action_kind="box")
    assert "\n" not in str(refused.value) and "sac_discrete" in str(refused.value)
