from __future__ import annotations

import copy
import json
from typing import Any

import numpy as np
import pytest
import torch
from support import live_storages

from agents import Batch, PopulationAgent, make_population
from agents.td3 import TD3Population
from config import AgentConfig, EvolutionConfig
from training.evolution import ANCESTRY_KEPT, Evolution, from_search, to_search

P, OBS, ACT = 6, 3, 2


def make_agent() -> PopulationAgent:
    """Six members with distinct weights, non-zero optimizer state and distinct hyperparameters."""
    torch.manual_seed(0)
    agent = make_population(P, OBS, ACT, AgentConfig(hidden_sizes=[8, 8], policy_delay=1), torch.device("cpu"))
    g = torch.Generator().manual_seed(0)
    batch = Batch(
        torch.randn(P, 4, OBS, generator=g),
        torch.rand(P, 4, ACT, generator=g) * 2 - 1,
        torch.randn(P, 4, generator=g),
        torch.randn(P, 4, OBS, generator=g),
        torch.zeros(P, 4),
    )
    agent.update([batch])
    agent.update([batch])
    bounds = EvolutionConfig()
    for name, hp in agent.hyperparameters.items():
        hp.mul_(torch.linspace(0.9, 1.1, P)).clamp_(*getattr(bounds, f"{name}_bounds"))
    return agent


def make_evolution(seed: int = 0, **overrides: Any) -> Evolution:
    cfg = EvolutionConfig(
        **{
            "elites": 2,
            "replace_fraction": 0.5,
            "tournament_size": 2,
            "crossover_prob": 0.0,
            "mutation_scale": 0.1,
            "mutation_fraction": 0.5,
            **overrides,
        }
    )
    return Evolution(cfg, P, seed=seed)


def clone_tensors(agent: PopulationAgent) -> dict[str, torch.Tensor]:
    return {name: t.clone() for name, t in agent.member_tensors().items()}


def actor_names(agent: PopulationAgent) -> set[str]:
    actor = {p.data_ptr() for p in agent.actor_parameters()}
    return {name for name, t in agent.member_tensors().items() if t.data_ptr() in actor}


FITNESS = np.array([5.0, -1.0, 3.0, 9.0, 0.0, 7.0])  # best first: 3, 5, 0, 2, 4, 1


# ---------------------------------------------------------------- selection


def test_the_worst_members_are_replaced() -> None:
    events = make_evolution().evolve(make_agent(), FITNESS, generation=0)
    assert sorted(e["slot"] for e in events) == [1, 2, 4]  # the worst half
    assert all(e["replaced_fitness"] == FITNESS[e["slot"]] for e in events)


@pytest.mark.parametrize("seed", range(5))
def test_elites_are_never_replaced_or_changed(seed: int) -> None:
    agent = make_agent()
    evolution = make_evolution(seed=seed, replace_fraction=1.0, crossover_prob=0.5)
    rng = np.random.default_rng(seed)
    for generation in range(4):
        fitness = rng.normal(size=P)
        elites = np.argsort(-fitness)[:2]
        before = clone_tensors(agent)
        events = evolution.evolve(agent, fitness, generation)
        assert len(events) == P - 2
        assert not {e["slot"] for e in events} & set(elites.tolist())
        for name, t in agent.member_tensors().items():
            for elite in elites:
                assert torch.equal(t[elite], before[name][elite]), (name, elite)


def test_parents_are_survivors() -> None:
    evolution = make_evolution()
    survivors = {evolution.member_ids[i] for i in (3, 5, 0)}
    events = evolution.evolve(make_agent(), FITNESS, generation=0)
    assert {e["parent"] for e in events} <= survivors


def test_every_non_finite_member_is_replaced_and_none_is_a_parent() -> None:
    fitness = np.array([5.0, -np.inf, np.nan, 9.0, -np.inf, -np.inf])  # 4 non-finite, replace_fraction 0.25
    for seed in range(20):
        evolution = make_evolution(seed=seed, replace_fraction=0.25, crossover_prob=1.0)
        ids = list(evolution.member_ids)
        events = evolution.evolve(make_agent(), fitness, generation=0)
        assert sorted(e["slot"] for e in events) == [1, 2, 4, 5]
        assert {e["parent"] for e in events} | {e["second_parent"] for e in events} <= {ids[0], ids[3]}


def test_no_member_is_replaced_when_none_is_finite() -> None:
    events = make_evolution().evolve(make_agent(), np.full(P, -np.inf), generation=0)
    assert events == []


@pytest.mark.parametrize(("fraction", "replaced"), [(0.25, 2), (2.5 / 6, 3), (0.75, 4)])  # 1.5, 2.5 -> 3, 4.5 (capped)
def test_replaced_count_rounds_half_up(fraction: float, replaced: int) -> None:
    evolution = make_evolution(replace_fraction=fraction)
    assert len(evolution.evolve(make_agent(), FITNESS, generation=0)) == replaced


def test_nothing_is_replaced_when_every_member_is_an_elite() -> None:
    two = make_population(2, OBS, ACT, AgentConfig(hidden_sizes=[8]), torch.device("cpu"))
    before = clone_tensors(two)
    evolution = Evolution(EvolutionConfig(elites=2, replace_fraction=1.0), 2, seed=0)
    assert evolution.evolve(two, np.array([1.0, 2.0]), generation=0) == []
    assert all(torch.equal(t, before[n]) for n, t in two.member_tensors().items())


# ---------------------------------------------------------------- children


def test_child_is_a_whole_copy_of_its_parent_but_for_mutation_and_hyperparameters() -> None:
    agent = make_agent()
    evolution = make_evolution()
    before = clone_tensors(agent)
    slot_of = {member_id: slot for slot, member_id in enumerate(evolution.member_ids)}
    events = evolution.evolve(agent, FITNESS, generation=0)
    actor = actor_names(agent)
    after = agent.member_tensors()
    for event in events:
        child, parent = event["slot"], slot_of[event["parent"]]
        touched, entries = 0, 0
        for name, t in after.items():
            if name.startswith("hp."):
                continue
            if name in actor:  # the parent's plus small noise on about mutation_fraction = 0.5 of the entries
                diff = t[child] - before[name][parent]
                touched, entries = touched + int((diff != 0).sum()), entries + diff.numel()
                assert diff.abs().max() < 1.0, name
            else:  # critics, targets, optimizer state: the parent's, exactly
                assert torch.equal(t[child], before[name][parent]), name
        assert 0.3 < touched / entries < 0.7


def test_without_mutation_the_child_actor_equals_its_parents() -> None:
    agent = make_agent()
    evolution = make_evolution(mutation_scale=0.0)
    before = clone_tensors(agent)
    slot_of = {member_id: slot for slot, member_id in enumerate(evolution.member_ids)}
    for event in evolution.evolve(agent, FITNESS, generation=0):
        child, parent = event["slot"], slot_of[event["parent"]]
        for name, t in agent.member_tensors().items():
            if not name.startswith("hp."):
                assert torch.equal(t[child], before[name][parent]), name


def test_crossover_takes_each_neuron_whole_from_one_parent() -> None:
    agent = make_agent()
    evolution = make_evolution(crossover_prob=1.0, mutation_scale=0.0)
    before = clone_tensors(agent)
    slot_of = {member_id: slot for slot, member_id in enumerate(evolution.member_ids)}
    events = evolution.evolve(agent, FITNESS, generation=0)
    mixed = False
    for event in events:
        child, first, second = event["slot"], slot_of[event["parent"]], slot_of[event["second_parent"]]
        assert first != second
        for name in actor_names(agent):
            row = agent.member_tensors()[name][child]
            from_first = (row == before[name][first]).all(dim=0)  # per output neuron (last axis)
            from_second = (row == before[name][second]).all(dim=0)
            assert (from_first | from_second).all(), name
            mixed |= bool(from_first.any() and from_second.any() and not from_first.all())
    assert mixed


def test_crossover_takes_a_neurons_weights_and_bias_from_the_same_parent() -> None:
    agent = make_agent()
    evolution = make_evolution(crossover_prob=1.0, mutation_scale=0.0, replace_fraction=1.0)
    before = clone_tensors(agent)
    slot_of = {member_id: slot for slot, member_id in enumerate(evolution.member_ids)}
    names = {t.data_ptr(): name for name, t in agent.member_tensors().items()}
    for event in evolution.evolve(agent, FITNESS, generation=0):
        child, second = event["slot"], slot_of[event["second_parent"]]
        for weight, bias in agent.actor_layers():
            w, b = names[weight.data_ptr()], names[bias.data_ptr()]
            weight_from_second = (weight[child] == before[w][second]).all(dim=0)
            bias_from_second = (bias[child] == before[b][second]).all(dim=0)
            differs = (before[w][second] != before[w][slot_of[event["parent"]]]).any(dim=0)
            assert torch.equal(weight_from_second[differs], bias_from_second[differs]), w


def test_the_discount_is_perturbed_as_a_horizon_not_switched_between_its_bounds() -> None:
    agent = make_agent()
    agent.hyperparameters["gamma"].fill_(0.99)
    evolution = make_evolution(perturb_prob=1.0, replace_fraction=1.0)
    values = set()
    for generation in range(5):
        for event in evolution.evolve(agent, np.arange(P, dtype=float), generation):
            values.add(round(event["gamma"], 5))
    assert values == {0.9875, 0.992}  # 1 - 0.99 times 1.25 or 0.8 (the elite parents keep 0.99); not 0.95 / 0.999


def test_hyperparameters_are_perturbed_by_a_factor_within_bounds() -> None:
    agent = make_agent()
    before = {name: hp.clone() for name, hp in agent.hyperparameters.items()}
    evolution = make_evolution(perturb_prob=1.0, perturb_factors=[0.5, 2.0])
    slot_of = {member_id: slot for slot, member_id in enumerate(evolution.member_ids)}
    for event in evolution.evolve(agent, FITNESS, generation=0):
        assert event["hyperparameters"] == "perturbed"
        parent = slot_of[event["parent"]]
        for name in TD3Population.HYPERPARAMETERS:
            low, high = getattr(evolution.cfg, f"{name}_bounds")
            value, old = float(agent.hyperparameters[name][event["slot"]]), float(before[name][parent])
            candidates = [from_search(name, min(max(to_search(name, old) * f, low), high)) for f in (0.5, 2.0)]
            if name == "gamma":  # 1 - gamma is what is multiplied (and clipped)
                candidates = [1 - min(max((1 - old) * f, 1 - high), 1 - low) for f in (0.5, 2.0)]
            assert any(value == pytest.approx(c, rel=1e-6) for c in candidates), name
            assert event[name] == value


@pytest.mark.parametrize("perturb_prob", [0.0, 1.0])
def test_hyperparameters_stay_within_bounds_over_many_generations(perturb_prob: float) -> None:
    agent = make_agent()
    evolution = make_evolution(perturb_prob=perturb_prob, perturb_factors=[0.1, 10.0], replace_fraction=1.0)
    rng = np.random.default_rng(0)
    kinds = set()
    for generation in range(15):
        kinds |= {e["hyperparameters"] for e in evolution.evolve(agent, rng.normal(size=P), generation)}
        for name in TD3Population.HYPERPARAMETERS:
            low, high = getattr(evolution.cfg, f"{name}_bounds")
            values = agent.hyperparameters[name]
            assert values.min() >= low * (1 - 1e-6) and values.max() <= high * (1 + 1e-6), name
    assert kinds == {"perturbed" if perturb_prob else "resampled"}


def test_hyperparameters_not_evolved_are_inherited_unchanged() -> None:
    agent = make_agent()
    evolution = Evolution(make_evolution().cfg, P, seed=0, evolved=("actor_lr",))
    before = {name: hp.clone() for name, hp in agent.hyperparameters.items()}
    slot_of = {member_id: slot for slot, member_id in enumerate(evolution.member_ids)}
    events = evolution.evolve(agent, FITNESS, generation=0)
    for event in events:
        parent = slot_of[event["parent"]]
        assert agent.hyperparameters["exploration_noise"][event["slot"]] == before["exploration_noise"][parent]
    assert any(agent.hyperparameters["actor_lr"][e["slot"]] != before["actor_lr"][slot_of[e["parent"]]] for e in events)


def test_optimizer_uses_the_childs_new_learning_rate() -> None:
    agent = make_agent()
    make_evolution(perturb_prob=1.0).evolve(agent, FITNESS, generation=0)
    assert agent.actor_opt.lr is agent.hyperparameters["actor_lr"]
    assert agent.critic_opt.lr is agent.hyperparameters["critic_lr"]


# ---------------------------------------------------------------- lineage and adaptation


def test_lineage_records_who_replaced_whom() -> None:
    evolution = make_evolution()
    events = evolution.evolve(make_agent(), FITNESS, generation=4)
    assert [e["id"] for e in events] == [6, 7, 8]
    for event in events:
        assert event["generation"] == 4
        assert evolution.member_ids[event["slot"]] == event["id"]
        assert event["parent_fitness"] == FITNESS[event["parent"]]  # ids equal slots in generation 0
        assert evolution.lineage(event["slot"]) == f"{event['id']} <- {event['parent']}"
        json.dumps(event)  # goes to lineage.jsonl


def test_ancestry_is_bounded() -> None:
    agent = make_agent()
    evolution = make_evolution(replace_fraction=1.0, elites=1)
    for generation in range(3 * ANCESTRY_KEPT):
        evolution.evolve(agent, np.arange(P, dtype=float), generation)
    assert max(len(a) for a in evolution.ancestry) <= ANCESTRY_KEPT
    assert len(evolution.lineage(0).split(" <- ")) <= ANCESTRY_KEPT + 1


def test_adaptive_mutation_scale_grows_after_successes_and_shrinks_after_failures() -> None:
    agent = make_agent()
    evolution = make_evolution(adaptive_mutation=True)
    events = evolution.evolve(agent, FITNESS, generation=0)
    scale = evolution.mutation_scale
    assert scale == 0.1  # nothing to judge yet
    children = [e["slot"] for e in events]
    better = FITNESS.copy()
    better[children] = 100.0  # every child beat its parent
    evolution.evolve(agent, better, generation=1)
    assert evolution.mutation_scale == pytest.approx(scale * 1.22)
    worse = np.full(P, 0.0)
    worse[[e["slot"] for e in evolution.evolve(agent, better, generation=2)]] = -100.0  # children lost
    scale = evolution.mutation_scale
    evolution.evolve(agent, worse, generation=3)
    assert evolution.mutation_scale == pytest.approx(scale / 1.22)


def test_fixed_mutation_scale_does_not_move() -> None:
    evolution = make_evolution(adaptive_mutation=False)
    agent = make_agent()
    for generation in range(3):
        evolution.evolve(agent, FITNESS + generation, generation)
    assert evolution.mutation_scale == 0.1


# ---------------------------------------------------------------- checkpoint state


def test_state_round_trip_gives_identical_later_decisions() -> None:
    agent = make_agent()
    evolution = make_evolution(crossover_prob=0.5, adaptive_mutation=True)
    evolution.evolve(agent, FITNESS, generation=0)
    saved = json.loads(json.dumps(evolution.state()))  # stored as JSON in the checkpoint
    twin_agent = copy.deepcopy(agent)
    twin = make_evolution(seed=123, crossover_prob=0.5, adaptive_mutation=True)
    twin.load_state(saved)
    rng = np.random.default_rng(1)
    for generation in range(1, 4):
        fitness = rng.normal(size=P)
        assert evolution.evolve(agent, fitness, generation) == twin.evolve(twin_agent, fitness, generation)
    assert evolution.state() == twin.state()
    for name, t in agent.member_tensors().items():
        assert torch.equal(t, twin_agent.member_tensors()[name]), name


# ---------------------------------------------------------------- MEMORY.md: replaced members are freed


def test_replacing_members_keeps_live_tensor_memory_flat() -> None:
    agent = make_agent()
    evolution = make_evolution(replace_fraction=1.0, crossover_prob=0.5)
    rng = np.random.default_rng(0)
    evolution.evolve(agent, rng.normal(size=P), generation=0)
    before = live_storages()
    for generation in range(1, 8):
        evolution.evolve(agent, rng.normal(size=P), generation)
    after = live_storages()
    assert len(after) <= len(before), f"{len(after) - len(before)} more live tensor storages"
    assert sum(after.values()) <= sum(before.values())
