from __future__ import annotations

import numpy as np
import pytest

from config import EnvConfig, UserError
from training.envs import DEFAULT_EPISODE_LIMIT, SUPPORTED, EnvPool, episode_limit, make_env


def test_make_env_builds_pendulum() -> None:
    env = make_env(EnvConfig(id="Pendulum-v1"))
    assert env.observation_space.shape == (3,)
    assert env.action_space.shape == (1,)
    env.close()


def test_max_episode_steps_truncates_without_terminating() -> None:
    env = make_env(EnvConfig(id="Pendulum-v1", max_episode_steps=5))
    env.reset(seed=0)
    flags = [env.step(np.zeros(1, np.float32))[2:4] for _ in range(5)]
    assert flags[:4] == [(False, False)] * 4
    assert flags[4] == (False, True)


def test_custom_env_class_by_module_path(custom_envs: str) -> None:
    env = make_env(EnvConfig(id=f"{custom_envs}:CounterEnv"))
    assert type(env.unwrapped).__name__ == "CounterEnv"


def test_max_episode_steps_can_lengthen_a_registered_envs_own_limit() -> None:
    env = make_env(EnvConfig(id="Pendulum-v1", max_episode_steps=500))  # Pendulum's own limit is 200
    env.reset(seed=0)
    steps = 1
    while not any(env.step(np.zeros(1, np.float32))[2:4]):
        steps += 1
    assert steps == 500
    assert episode_limit(env) == 500 == env.spec.max_episode_steps


def test_an_env_without_a_time_limit_gets_the_default_one(custom_envs: str) -> None:
    endless = make_env(EnvConfig(id=f"{custom_envs}:EndlessEnv"))
    assert episode_limit(endless) == DEFAULT_EPISODE_LIMIT
    endless.reset(seed=0)
    flags = [endless.step(np.zeros(1, np.float32))[2:4] for _ in range(DEFAULT_EPISODE_LIMIT)]
    assert flags[-1] == (False, True) and not any(any(f) for f in flags[:-1])
    assert episode_limit(make_env(EnvConfig(id=f"{custom_envs}:EndlessEnv", max_episode_steps=7))) == 7


def test_rescaled_actions_never_leave_the_box(custom_envs: str) -> None:
    pool = EnvPool(lambda: make_env(EnvConfig(id=f"{custom_envs}:StrictBoxEnv")), 1)
    for sign in (-1.0, 1.0):
        pool.reset(np.zeros(1, np.int64))
        pool.step(np.full((1, 3), sign, np.float32))  # StrictBoxEnv raises unless action_space.contains(a)


@pytest.mark.parametrize(
    ("env_id", "message"),
    [
        ("NoSuchEnv-v0", "unknown environment 'NoSuchEnv-v0'"),
        ("custom_envs.toy:DictObsEnv", "observation space Dict"),
        ("custom_envs.toy:TupleObsEnv", "observation space Tuple"),
        ("custom_envs.toy:MultiDiscreteEnv", "action space MultiDiscrete"),
        ("custom_envs.toy:MultiBinaryEnv", "action space MultiBinary"),
        ("custom_envs.toy:UnboundedActionEnv", "unbounded actions"),
        ("custom_envs.toy:NotAnEnv", "is not a gymnasium.Env"),
        ("custom_envs.toy:Missing", "has no class 'Missing'"),
        ("no_such_package.envs:Env", "cannot import module 'no_such_package.envs'"),
    ],
)
def test_unknown_or_unsupported_env_is_a_user_error(custom_envs: str, env_id: str, message: str) -> None:
    with pytest.raises(UserError, match=message) as refused:
        make_env(EnvConfig(id=env_id))
    assert "\n" not in str(refused.value)
    if "space" in message:
        assert str(refused.value).endswith("supported: " + SUPPORTED)  # says what is supported


def test_supported_spaces_are_named() -> None:
    assert "Box actions" in SUPPORTED and "Discrete actions" in SUPPORTED and "flat Box observations" in SUPPORTED


# ---------------------------------------------------------------- EnvPool


@pytest.fixture
def counter_pool(custom_envs: str) -> EnvPool:
    pool = EnvPool(lambda: make_env(EnvConfig(id=f"{custom_envs}:CounterEnv")), 2)
    pool.reset(np.array([1, 2]))
    return pool


def test_pool_rescales_normalised_actions_to_each_envs_bounds(counter_pool: EnvPool) -> None:
    counter_pool.step(np.array([[-1.0, 1.0], [0.0, -0.5]], np.float32))
    np.testing.assert_allclose(counter_pool.envs[0].unwrapped.last_action, [0.0, 4.0])
    np.testing.assert_allclose(counter_pool.envs[1].unwrapped.last_action, [5.0, -2.0])


def test_pool_next_obs_is_the_true_successor_before_auto_reset(counter_pool: EnvPool) -> None:
    length = counter_pool.envs[0].unwrapped.length
    for t in range(1, length + 1):
        next_obs, reward, terminated, truncated = counter_pool.step(np.zeros((2, 2), np.float32))
        assert next_obs[:, 0].tolist() == [t, t]
    assert terminated.tolist() == [True, True] and truncated.tolist() == [False, False]
    assert next_obs[:, 1].tolist() == [0, 0]  # still the finished episode
    assert counter_pool.obs[:, 0].tolist() == [0, 0]  # the pool already acts on the new episode
    assert counter_pool.obs[:, 1].tolist() == [1, 1]


def test_pool_reports_time_limit_truncation_not_termination() -> None:
    pool = EnvPool(lambda: make_env(EnvConfig(id="Pendulum-v1", max_episode_steps=3)), 2)
    pool.reset(np.array([0, 1]))
    flags = [pool.step(np.zeros((2, 1), np.float32))[2:] for _ in range(3)]
    assert [t.tolist() for t, _ in flags] == [[False, False]] * 3
    assert [c.tolist() for _, c in flags] == [[False, False], [False, False], [True, True]]


def test_pool_reset_is_seeded_per_env() -> None:
    pool = EnvPool(lambda: make_env(EnvConfig(id="Pendulum-v1")), 3)
    first = pool.reset(np.array([5, 6, 5]))
    again = pool.reset(np.array([5, 6, 5]))
    np.testing.assert_array_equal(first, again)
    np.testing.assert_array_equal(first[0], first[2])
    assert not np.array_equal(first[0], first[1])


def test_pool_reset_returns_a_copy(counter_pool: EnvPool) -> None:
    obs = counter_pool.reset(np.array([1, 2]))
    counter_pool.step(np.zeros((2, 2), np.float32))
    assert obs[:, 0].tolist() == [0, 0]


def test_pool_dimensions() -> None:
    pool = EnvPool(lambda: make_env(EnvConfig(id="Pendulum-v1")), 4)
    assert (len(pool), pool.obs_dim, pool.act_dim) == (4, 3, 1)
    np.testing.assert_array_equal(pool.low, [-2.0])
    np.testing.assert_array_equal(pool.high, [2.0])
    pool.close()


# ---------------------------------------------------------------- Discrete actions


def test_discrete_pool_takes_one_hot_rows_and_steps_integer_actions(custom_envs: str) -> None:
    pool = EnvPool(lambda: make_env(EnvConfig(id=f"{custom_envs}:ChoiceEnv")), 2)
    assert (pool.action_kind, pool.act_dim, pool.obs_dim) == ("discrete", 3, 2)
    pool.reset(np.array([0, 1]))
    next_obs, reward, _, _ = pool.step(np.array([[0, 0, 1], [1, 0, 0]], np.float32))
    assert [env.unwrapped.actions for env in pool.envs] == [[1], [-1]]  # index + the space's start
    assert next_obs[:, 0].tolist() == [1, -1] and reward.tolist() == [1.0, 0.0]
    pool.close()


def test_discrete_pool_stores_the_largest_entry_as_a_one_hot_row(custom_envs: str) -> None:
    pool = EnvPool(lambda: make_env(EnvConfig(id=f"{custom_envs}:ChoiceEnv")), 3)
    rows = np.array([[0.2, -0.9, 0.7], [0.9, 0.1, -1.0], [0, 1, 0]], np.float32)
    np.testing.assert_array_equal(pool.canonical(rows), [[0, 0, 1], [1, 0, 0], [0, 1, 0]])
    assert pool.canonical(rows).dtype == np.float32
    np.testing.assert_array_equal(pool.env_actions(rows), [1, -1, 0])
    pool.close()


def test_box_actions_are_stored_unchanged(counter_pool: EnvPool) -> None:
    actions = np.array([[0.3, -0.2], [1.0, -1.0]], np.float32)
    assert counter_pool.action_kind == "box" and counter_pool.canonical(actions) is actions


def test_cartpole_is_supported() -> None:
    pool = EnvPool(lambda: make_env(EnvConfig(id="CartPole-v1")), 2)
    assert (pool.action_kind, pool.obs_dim, pool.act_dim, pool.max_episode_steps) == ("discrete", 4, 2, 500)
    pool.reset(np.array([0, 1]))
    pool.step(np.eye(2, dtype=np.float32))  # CartPole refuses anything but an integer in {0, 1}
    pool.close()
