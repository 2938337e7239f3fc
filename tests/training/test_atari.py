"""Atari ids through ale-py: gymnasium's own preprocessing, and the one-line refusals."""

from __future__ import annotations

import sys
from pathlib import Path

import gymnasium as gym
import numpy as np
import pytest
from click.testing import CliRunner
from gymnasium.wrappers import AtariPreprocessing, FrameStackObservation

from config import EnvConfig, UserError, build_config
from main import cli
from tests.test_main import assert_one_line_user_error
from training.envs import ATARI_EPISODE_LIMIT, ATARI_INSTALL, check_spaces, episode_limit, make_atari, make_env

pytest.importorskip("ale_py")


def chain(env: gym.Env) -> list[gym.Env]:
    """The wrappers around ``env``, outermost first."""
    found = []
    while isinstance(env, gym.Wrapper):
        found.append(env)
        env = env.env
    return found


def test_pong_is_built_with_gymnasiums_own_wrappers() -> None:
    env = make_atari("ALE/Pong-v5")
    assert env.observation_space.shape == (4, 84, 84) and env.observation_space.dtype == np.uint8
    assert env.action_space == gym.spaces.Discrete(6)
    kinds = [type(w) for w in chain(env)]
    assert AtariPreprocessing in kinds and FrameStackObservation in kinds
    assert kinds.index(FrameStackObservation) < kinds.index(AtariPreprocessing)  # stacks of preprocessed frames
    pre = next(w for w in chain(env) if isinstance(w, AtariPreprocessing))
    assert (pre.frame_skip, pre.noop_max, pre.screen_size, pre.grayscale_obs) == (4, 30, (84, 84), True)
    ale = env.unwrapped
    assert ale._frameskip == 1  # the preprocessing skips frames, not the emulator
    assert ale.ale.getFloat("repeat_action_probability") == pytest.approx(0.25)  # v5's sticky actions
    assert episode_limit(env) == ATARI_EPISODE_LIMIT == 27_000
    assert episode_limit(make_atari("ALE/Pong-v5", max_episode_steps=100)) == 100
    obs, _ = env.reset(seed=0)
    assert all(np.array_equal(obs[0], obs[i]) for i in range(4))  # reset padding: the first frame, 4 times
    nxt = env.step(0)[0]
    assert np.array_equal(nxt[:3], obs[1:]) and nxt.dtype == np.uint8
    env.close()


def test_an_atari_id_without_the_extra_says_what_to_install(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setitem(sys.modules, "ale_py", None)  # import ale_py now raises ImportError
    with pytest.raises(UserError) as refused:
        make_env(EnvConfig(id="ALE/Pong-v5"))
    message = str(refused.value)
    assert "\n" not in message and message.endswith(ATARI_INSTALL) and ATARI_INSTALL == 'pip install -e ".[atari]"'


def test_an_unknown_atari_game_is_one_line() -> None:
    with pytest.raises(UserError, match="unknown environment 'ALE/NoSuchGame-v5'") as refused:
        make_env(EnvConfig(id="ALE/NoSuchGame-v5"))
    assert "\n" not in str(refused.value)


def test_frame_stacks_pass_the_space_check_and_channels_last_images_are_refused_in_one_line() -> None:
    env = make_env(EnvConfig(id="ALE/Pong-v5"))  # (4, 84, 84) uint8: CNN members take it
    assert env.observation_space.shape == (4, 84, 84)
    env.close()
    rgb = gym.make("ALE/Pong-v5", frameskip=4)  # raw (210, 160, 3) RGB frames, not stacked
    with pytest.raises(UserError, match=r"CNN members take uint8 frame stacks \(stack, H, W\)") as refused:
        check_spaces(rgb, "rgb")
    assert "\n" not in str(refused.value)
    rgb.close()


def test_the_pong_preset_keeps_the_incidents_shape_and_refuses_what_pixels_lack_in_one_line(
    tmp_path: Path,
) -> None:
    cfg = build_config("pong")
    assert (cfg.env.id, cfg.replay.capacity, cfg.dreamer.batch_size, cfg.dreamer.seq_len) == (
        "ALE/Pong-v5",
        50_000,
        16,
        50,
    )
    runs = str(tmp_path / "runs")
    refusals = [
        (
            ["--set", "dreamer.enabled=true", "--set", "dreamer.screen=true"],
            "dreamer.model_rollouts and dreamer.screen are not yet supported with image observations (4, 84, 84)",
        ),
        (["--set", "agent.algorithm=td3"], "agent.algorithm 'td3' needs box actions"),
        (["--set", "agent.amp=true", "--device", "cpu"], "agent.amp (bf16 autocast of the CNN encoders) needs CUDA"),
    ]
    for flags, message in refusals:
        result = CliRunner().invoke(
            cli, ["--preset", "pong", "--population", "2", "--run-dir", runs, *flags]
        )  # 2 envs, not 16
        assert_one_line_user_error(result, message)
