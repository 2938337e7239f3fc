"""``python main.py export --member dreamer`` (``evorl-policy/3``): the Dreamer member's encoder,
RSSM, actor and sampling generator. The loaded stateful policy acts as the trainer's member does
(its own acting path, ``DreamerMember.act_streams``, bit for bit) and plays ``evaluate``'s episodes."""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
from click.testing import CliRunner
from safetensors.torch import load, save

from agents import DreamerPolicy, load_policy
from agents.policy import PolicyFileError
from config import EnvConfig
from main import cli
from tests.training.tools.conftest import FinishedRun, finish_run
from training.dreamer_member import DreamerMember
from training.envs import EnvPool, make_env
from training.tools import evaluate as ev
from training.tools.export import export
from training.tools.loading import choose_member, dreamer_member, make_pool, open_generation, storages

DREAMER: dict[str, Any] = {  # tests/training/test_dreamer_member.py's tiny member: a few updates a generation
    "dreamer.enabled": True,
    "dreamer.batch_size": 4,
    "dreamer.seq_len": 16,
    "dreamer.train_ratio": 1.0,
    "dreamer.horizon": 5,
}


@pytest.fixture(scope="module")
def pendulum(tmp_path_factory: pytest.TempPathFactory) -> FinishedRun:
    """A debug-preset Pendulum-v1 run of 2 generations with the (tiny) Dreamer member."""
    return finish_run(tmp_path_factory.mktemp("dreamer") / "runs", "dreamer", 2, **DREAMER)


@pytest.fixture(scope="module")
def pong(tmp_path_factory: pytest.TempPathFactory) -> FinishedRun:
    """One generation of a tiny Pong run with a tiny CNN Dreamer member ((4, 84, 84) uint8 frame
    stacks; one model update)."""
    pytest.importorskip("ale_py")
    from tests.training.tools.test_export_discrete import PONG

    extra = {**PONG, **DREAMER, "dreamer.cnn_channels": [4, 8, 8], "dreamer.cnn_features": 16}
    extra |= {"dreamer.batch_size": 2, "dreamer.seq_len": 8, "dreamer.train_ratio": 0.5, "dreamer.horizon": 3}
    return finish_run(tmp_path_factory.mktemp("dreamer-pong") / "runs", "pong", 1, **extra)


@pytest.fixture(scope="module")
def cartpole(tmp_path_factory: pytest.TempPathFactory) -> FinishedRun:
    """The same on CartPole-v1 (discrete actions: a categorical actor)."""
    extra = {**DREAMER, "env.id": "CartPole-v1"}
    return finish_run(tmp_path_factory.mktemp("dreamer-cartpole") / "runs", "cartpole", 2, **extra)


def exported(run: FinishedRun, out: Path, *args: str) -> DreamerPolicy:
    args = ("export", run.name, "--run-dir", str(run.run_dir), "--member", "dreamer", "--out", str(out), *args)
    result = CliRunner().invoke(cli, list(args))
    assert result.exit_code == 0, result.output
    policy = load_policy(out)
    assert isinstance(policy, DreamerPolicy)
    return policy


def trainer_member(run: FinishedRun, pool: EnvPool) -> DreamerMember:
    """The checkpoint's Dreamer member as ``evaluate --member dreamer`` restores it."""
    return dreamer_member(open_generation(storages(str(run.run_dir)), run.name), pool)


def observations(run: FinishedRun, steps: int, streams: int) -> np.ndarray:
    """``(steps, streams, *obs_shape)`` observations in the env's range (random, so every latent class is used)."""
    space = make_env(run.cfg.env).observation_space
    rng = np.random.default_rng(streams)
    if space.dtype == np.uint8:  # frame stacks
        return rng.integers(0, 256, size=(steps, streams, *space.shape), dtype=np.uint8)  # type: ignore[misc]
    low, high = np.maximum(space.low, -5.0), np.minimum(space.high, 5.0)  # type: ignore[attr-defined]
    return rng.uniform(low, high, size=(steps, streams, *space.shape)).astype(space.dtype)  # type: ignore[misc]


def assert_acts_as_the_trainer(run: FinishedRun, policy: DreamerPolicy, streams: int, seed: int | None) -> None:
    """The policy and the trainer's member, from the same generator state, given the same observations
    and episode starts (stream 0 restarting every 5th step): the same env actions at every step."""
    pool = make_pool(run.cfg, streams)
    try:
        member = trainer_member(run, pool)
        policy.reset(streams, seed)
        if seed is not None:
            member.agent.gen.manual_seed(seed)
        member.agent.reset_state()
        for step, obs in enumerate(observations(run, 12, streams)):
            is_first = np.zeros(streams, bool)
            is_first[0] = step % 5 == 4
            expected = pool.env_actions(member.act_streams(obs, is_first, False))
            np.testing.assert_array_equal(policy(obs, is_first), expected)
        assert (policy.generator.get_state() == member.agent.gen.get_state()).all()  # the same draws
    finally:
        pool.close()


@pytest.mark.parametrize(("streams", "seed"), [(1, None), (3, None), (3, 7)])
def test_the_exported_dreamer_member_acts_as_the_trainers(
    pendulum: FinishedRun, tmp_path: Path, streams: int, seed: int | None
) -> None:
    policy = exported(pendulum, tmp_path)
    assert_acts_as_the_trainer(pendulum, policy, streams, seed)
    policy.reset(1)
    action = policy(observations(pendulum, 1, 1)[0, 0])  # one observation -> one action
    assert action.shape == (1,) and action.dtype == np.float32 and abs(float(action[0])) <= 2.0


def play(policy: DreamerPolicy, env_cfg: EnvConfig, seeds: list[int]) -> list[float]:
    """The README's loop over ``len(seeds)`` envs side by side (rewards summed as ``evaluate`` sums
    them: float32 rewards into a float64 total); every episode played to its end once."""
    envs = [make_env(env_cfg) for _ in seeds]
    obs = np.stack([env.reset(seed=s)[0] for env, s in zip(envs, seeds, strict=True)])
    policy.reset(len(seeds))
    totals, done = np.zeros(len(seeds)), np.zeros(len(seeds), bool)
    is_first = np.ones(len(seeds), bool)
    while not done.all():
        actions = policy(obs, is_first)
        for i, env in enumerate(envs):
            obs[i], reward, terminated, truncated, _ = env.step(actions[i])
            if not done[i]:
                totals[i] += np.float32(reward)
            is_first[i] = terminated or truncated
            if is_first[i]:
                done[i] = True
                obs[i] = env.reset()[0]
    return totals.tolist()


def test_the_readme_loop_returns_what_evaluate_does(pendulum: FinishedRun, tmp_path: Path) -> None:
    policy = exported(pendulum, tmp_path)
    gen = open_generation(storages(str(pendulum.run_dir)), pendulum.name)
    member = choose_member(gen, "dreamer")
    env = make_env(EnvConfig(**policy.info["env"]))  # the README's loop, one episode, reset seed 0
    obs, _ = env.reset(seed=0)
    total, done = 0.0, False
    while not done:
        obs, reward, terminated, truncated, _ = env.step(policy(obs))
        total, done = total + float(np.float32(reward)), terminated or truncated
    assert [total] == ev.evaluate(gen, member, [0]).returns  # both from the checkpoint's generator state
    again = load_policy(tmp_path)
    assert isinstance(again, DreamerPolicy)
    assert play(again, EnvConfig(**policy.info["env"]), list(range(4))) == ev.evaluate(gen, member, range(4)).returns


def test_the_json_describes_the_member_and_holds_only_what_it_acts_with(pendulum: FinishedRun, tmp_path: Path) -> None:
    info = exported(pendulum, tmp_path).info
    record = [json.loads(line) for line in (pendulum.folder / "metrics.jsonl").read_text().splitlines()][-1]
    assert info["format"] == "evorl-policy/3" and info["algorithm"] == "dreamer"
    assert (info["member"], info["slot"], info["fitness"]) == ("dreamer", None, record["dreamer_fitness"])
    assert record["dreamer_updates"] >= 1  # a trained member, not its initial weights
    arch = info["architecture"]
    assert arch["kind"] == "dreamer" and arch["input"] == {
        "shape": [3],
        "dtype": "float32",
        "scaling": arch["input"]["scaling"],
    }
    assert arch["rssm"] | {"initial_state": ""} == {
        "deter": 128,
        "groups": 8,
        "classes": 8,
        "units": 128,
        "unimix": 0.01,
        "initial_state": "",
    }
    assert arch["actor"]["kind"] == "gaussian" and arch["actor"]["actions"] == 1
    assert info["dreamer"] == dataclasses.asdict(pendulum.cfg.dreamer) and info["dreamer_size"]["name"] == "tiny"
    assert info["env"] == dataclasses.asdict(pendulum.cfg.env) and info["env_wrappers"][0]["call"] == "gymnasium.make"
    assert info["action_space"]["low"] == [-2.0] and "action_scaling" in info
    names = set(info["tensors"])
    assert {name.split(".")[0] for name in names} == {"encoder", "rssm", "actor", "generator_state"}
    assert info["tensors"]["rssm.gru.linear.weight"] == [3 * 128, 128 + 128]
    tensors = load((tmp_path / "policy.safetensors").read_bytes())
    assert {name: list(t.shape) for name, t in tensors.items()} == info["tensors"]


def rewrite(folder: Path, info: dict[str, Any] | None = None, tensors: dict[str, Any] | None = None) -> None:
    """Replace the JSON and/or the weights, keeping the sha256 right (a consistent but foreign folder)."""
    import hashlib

    described = json.loads((folder / "policy.json").read_text()) if info is None else info
    if tensors is not None:
        blob = save(tensors)
        (folder / "policy.safetensors").write_bytes(blob)
        described["weights_sha256"] = hashlib.sha256(blob).hexdigest()
    (folder / "policy.json").write_text(json.dumps(described))


def test_damaged_or_foreign_exports_are_refused_in_one_line(pendulum: FinishedRun, tmp_path: Path) -> None:
    exported(pendulum, tmp_path / "good")
    original = json.loads((tmp_path / "good" / "policy.json").read_text())
    weights = load((tmp_path / "good" / "policy.safetensors").read_bytes())
    cases: dict[str, tuple[dict[str, Any] | None, dict[str, Any] | None, str]] = {
        "deter": (
            {
                **original,
                "architecture": {**original["architecture"], "rssm": {**original["architecture"]["rssm"], "deter": 64}},
            },
            None,
            "does not hold the network",
        ),
        "activation": (
            {**original, "architecture": {**original["architecture"], "sampling": "argmax"}},
            None,
            "describes no architecture",
        ),
        "no actor": (
            None,
            {k: v for k, v in weights.items() if not k.startswith("actor.")},
            "does not hold the network",
        ),
        "float rng": (
            None,
            {**weights, "generator_state": weights["generator_state"].float()},
            "generator state",
        ),
        "action box": (
            {**original, "action_space": {**original["action_space"], "low": [-2.0, 0.0]}},
            None,
            "action_space",
        ),
    }
    for name, (info, tensors, message) in cases.items():
        folder = tmp_path / name.replace(" ", "-")
        exported(pendulum, folder)
        rewrite(folder, json.loads(json.dumps(info)) if info is not None else None, tensors)
        with pytest.raises(PolicyFileError, match=message) as caught:
            load_policy(folder)
        assert "\n" not in str(caught.value), name
    flipped = bytearray((tmp_path / "good" / "policy.safetensors").read_bytes())
    flipped[-1] ^= 0xFF
    (tmp_path / "good" / "policy.safetensors").write_bytes(bytes(flipped))
    with pytest.raises(PolicyFileError, match="does not match the sha256"):
        load_policy(tmp_path / "good")


def test_bad_observations_and_stream_counts_are_one_line_errors(pendulum: FinishedRun, tmp_path: Path) -> None:
    policy = exported(pendulum, tmp_path)
    obs = observations(pendulum, 1, 3)[0]
    for bad, message in [
        (lambda: policy(np.zeros(4, np.float32)), r"expected observations of shape \(3,\)"),
        (lambda: policy(obs), r"follows 1 episode\(s\), got 3 .*reset\(n=3\)"),
        (lambda: policy(obs[0], np.zeros(2, bool)), "is_first must be 1 bool"),
        (lambda: policy(obs[0], np.zeros(1, np.int64)), "is_first must be 1 bool"),
        (lambda: policy.reset(0), "n >= 1"),
    ]:
        with pytest.raises(ValueError, match=message) as caught:
            bad()
        assert "\n" not in str(caught.value)
    policy.reset(3)
    assert policy(obs, np.array([True, False, True])).shape == (3, 1)


def test_an_exported_discrete_dreamer_member_acts_and_plays_as_the_trainers(
    cartpole: FinishedRun, tmp_path: Path
) -> None:
    policy = exported(cartpole, tmp_path)
    assert policy.info["architecture"]["actor"]["kind"] == "categorical"
    assert_acts_as_the_trainer(cartpole, policy, 3, None)
    policy = load_policy(tmp_path)
    assert isinstance(policy, DreamerPolicy)
    single = policy(observations(cartpole, 1, 1)[0, 0])
    assert single.shape == () and single.dtype == np.int64
    gen = open_generation(storages(str(cartpole.run_dir)), cartpole.name)
    fresh = load_policy(tmp_path)
    assert isinstance(fresh, DreamerPolicy)
    assert (
        play(fresh, EnvConfig(**fresh.info["env"]), [0, 1])
        == ev.evaluate(gen, choose_member(gen, "dreamer"), [0, 1]).returns
    )


def test_an_exported_pong_dreamer_member_acts_and_plays_as_the_trainers(pong: FinishedRun, tmp_path: Path) -> None:
    policy = exported(pong, tmp_path)
    assert pong.records()[-1]["dreamer_updates"] >= 1
    arch = policy.info["architecture"]
    assert (
        arch["encoder"]["kind"] == "cnn"
        and arch["input"]["dtype"] == "uint8"
        and arch["encoder"]["channels"] == [4, 8, 8]
    )
    assert_acts_as_the_trainer(pong, policy, 2, None)
    with pytest.raises(ValueError, match="uint8 frame stacks"):
        policy(np.zeros((4, 84, 84), np.float32))
    fresh = load_policy(tmp_path)
    assert isinstance(fresh, DreamerPolicy)
    gen = open_generation(storages(str(pong.run_dir)), pong.name)
    returns = ev.evaluate(gen, choose_member(gen, "dreamer"), [0]).returns
    assert play(fresh, EnvConfig(**fresh.info["env"]), [0]) == returns


def test_a_member_that_sampled_on_a_gpu_is_exported_with_a_seeded_cpu_generator(
    pendulum: FinishedRun, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    gen = open_generation(storages(str(pendulum.run_dir)), pendulum.name)
    gen.checkpoint.tensors["dreamer.rng"] = torch.zeros(16, dtype=torch.uint8)  # a CUDA (Philox) state's size
    export(gen, choose_member(gen, "dreamer"), tmp_path)
    assert "sampled with a GPU's generator" in capsys.readouterr().err
    policy = load_policy(tmp_path)
    assert isinstance(policy, DreamerPolicy)
    seeded = torch.Generator().manual_seed(pendulum.cfg.run.seed + 3).get_state()
    assert torch.equal(policy.generator.get_state(), seeded)
    assert ev.evaluate(gen, choose_member(gen, "dreamer"), [0]).returns == play(policy, pendulum.cfg.env, [0])
