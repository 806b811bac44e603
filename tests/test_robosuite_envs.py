"""The robosuite tasks (lift, stack, can) on real robosuite: spaces, seeding, randomization,
cameras and the scripted expert. robosuite is slow here, so envs are built once per module."""

from __future__ import annotations

from collections.abc import Iterator

import numpy as np
import pytest

from robopolicy.errors import RobopolicyError
from robopolicy.sim import Randomization, make_env, make_expert
from robopolicy.sim.robosuite_tasks import TASKS, RobosuiteEnv
from robopolicy.spec import ACTION, ENV_STATE, IMAGE_PREFIX, STATE

NAMES = sorted(TASKS)


@pytest.fixture(scope="module")
def envs() -> Iterator[dict[str, RobosuiteEnv]]:
    built = {name: make_env(name) for name in NAMES}
    yield built
    for env in built.values():
        env.close()


def object_xy(env: RobosuiteEnv) -> np.ndarray:
    return env.object_pose()[0][:2]


@pytest.mark.parametrize("name", NAMES)
def test_spaces_steps_and_success_flag(envs: dict[str, RobosuiteEnv], name: str) -> None:
    env = envs[name]
    assert env.action_space.shape == (7,) and env.action_space.dtype == np.float32
    assert (env.action_space.low == -1).all() and (env.action_space.high == 1).all()
    obs, info = env.reset(seed=0)
    assert set(obs) == {STATE, ENV_STATE}
    assert obs in env.observation_space
    for key in (STATE, ENV_STATE):
        assert obs[key].dtype == np.float32
        assert len(env.feature_names[key]) == obs[key].shape[0]
    assert len(env.feature_names[ACTION]) == 7
    assert info["is_success"] is False and info["task"] == env.task_description
    for _ in range(3):
        obs, reward, terminated, truncated, info = env.step(env.action_space.sample())
    assert obs in env.observation_space
    assert isinstance(info["is_success"], bool) and reward == float(info["is_success"])
    assert not terminated and not truncated


@pytest.mark.parametrize("name", NAMES)
def test_seeded_reset_reproduces_placement(envs: dict[str, RobosuiteEnv], name: str) -> None:
    env = envs[name]
    global_state = np.random.get_state()[1].copy()
    a, _ = env.reset(seed=7)
    env.step(env.action_space.sample())
    b, _ = env.reset(seed=7)
    c, _ = env.reset(seed=8)
    np.testing.assert_array_equal(a[ENV_STATE], b[ENV_STATE])
    np.testing.assert_array_equal(a[STATE], b[STATE])
    assert not np.allclose(a[ENV_STATE], c[ENV_STATE])
    np.testing.assert_array_equal(np.random.get_state()[1], global_state)  # caller's RNG untouched


def test_same_seed_same_scene_across_instances(envs: dict[str, RobosuiteEnv]) -> None:
    other = make_env("lift")
    try:
        a, _ = envs["lift"].reset(seed=3)
        b, _ = other.reset(seed=3)
        np.testing.assert_array_equal(a[ENV_STATE], b[ENV_STATE])
    finally:
        other.close()


def test_time_limit_and_dense_reward() -> None:
    env = make_env("lift", max_episode_steps=2, dense_reward=True)
    try:
        env.reset(seed=0)
        _, r1, _, truncated1, _ = env.step(np.zeros(7, np.float32))
        _, r2, _, truncated2, _ = env.step(np.zeros(7, np.float32))
        assert (truncated1, truncated2) == (False, True)
        assert 0.0 < r2 < 1.0  # robosuite's shaped reaching reward, below the success value
    finally:
        env.close()


def test_lift_expert_succeeds(envs: dict[str, RobosuiteEnv]) -> None:
    env, expert = envs["lift"], make_expert("lift")
    obs, _ = env.reset(seed=0)
    expert.reset(env, np.random.default_rng(0))
    for _ in range(env.max_episode_steps):
        action = expert.act(env, obs)
        assert action.shape == (7,) and action.dtype == np.float32 and np.abs(action).max() <= 1
        obs, _, terminated, truncated, info = env.step(action)
        if terminated or truncated:
            break
    assert info["is_success"] and terminated


def test_camera_frame_64() -> None:
    env = make_env("lift", cameras=("agentview",), image_size=64)
    try:
        obs, _ = env.reset(seed=0)
        frame = obs[IMAGE_PREFIX + "agentview"]
        assert frame.shape == (64, 64, 3) and frame.dtype == np.uint8
        assert obs in env.observation_space
        assert frame.std() > 5  # a scene, not a blank buffer
        # Upright: the table (bright) fills the bottom rows, the robot base the top centre.
        assert frame[-8:].mean() > frame[:8, 24:40].mean()
    finally:
        env.close()


@pytest.mark.parametrize("kwargs, match", [
    ({"cameras": ("nope",)}, "unknown camera"),
    ({"cameras": ("agentview",), "image_size": 0}, "image_size"),
])
def test_bad_camera_arguments(kwargs: dict, match: str) -> None:
    with pytest.raises(RobopolicyError, match=match):
        make_env("lift", **kwargs)


def test_object_pose_scale_changes_placement_range() -> None:
    def placements(scale: float) -> np.ndarray:
        env = make_env("lift", randomization=Randomization(object_pose=scale))
        try:
            out = []
            for seed in range(8):
                env.reset(seed=seed)
                out.append(object_xy(env))
            return np.array(out)
        finally:
            env.close()

    fixed, wide = placements(0.0), placements(3.0)
    assert np.ptp(fixed, axis=0).max() < 1e-3  # no range: always the sampler's centre
    assert np.abs(wide).max() > 0.035  # beyond the nominal +-0.03 m


def test_physics_randomization_changes_friction(envs: dict[str, RobosuiteEnv]) -> None:
    nominal_model = envs["lift"].model  # no randomization: the nominal physics
    nominal, nominal_mass = nominal_model.geom_friction.copy(), nominal_model.body_mass.copy()
    env = make_env("lift", randomization=Randomization(friction=0.3, mass=0.2))
    try:
        m = env.model
        env.reset(seed=1)
        first = m.geom_friction.copy()
        env.reset(seed=2)
        second = m.geom_friction.copy()
        env.reset(seed=1)
        assert not np.allclose(first, nominal) and not np.allclose(first, second)
        np.testing.assert_array_equal(m.geom_friction, first)
        ratio = first[:, 0] / np.where(nominal[:, 0] > 0, nominal[:, 0], 1.0)
        assert ratio.min() >= 0.7 - 1e-9 and ratio.max() <= 1.3 + 1e-9
        assert not np.allclose(m.body_mass, nominal_mass)
        env.step(np.zeros(7, np.float32))  # the sim still runs on the randomized model
    finally:
        env.close()
