"""The planar pushing envs (push, multitask) on real MuJoCo: API, seeding, rewards, randomization,
cameras, experts and language instructions."""

from __future__ import annotations

import warnings

import mujoco
import numpy as np
import pytest
from gymnasium.utils.env_checker import check_env

from robopolicy.errors import RobopolicyError
from robopolicy.sim.base import Randomization
from robopolicy.sim.push import MULTITASK, PushEnv, PushExpert, instruction
from robopolicy.sim.registry import make_env, make_expert
from robopolicy.spec import ACTION, ENV_STATE, IMAGE_PREFIX, STATE


def put_block_on_goal(env: PushEnv, index: int) -> None:
    """Teleport block ``index`` onto the goal (privileged test helper)."""
    adr = env.model.joint(f"block_{env.task.colours[index]}").qposadr[0]
    env.data.qpos[adr:adr + 2] = env.goal_xy()
    env.data.qvel[:] = 0.0
    mujoco.mj_forward(env.model, env.data)


def rollout_expert(env: PushEnv, seed: int, options: dict | None = None) -> dict:
    """One expert episode; returns the final info."""
    expert = PushExpert()
    obs, info = env.reset(seed=seed, options=options)
    expert.reset(env, np.random.default_rng(seed + 1000))
    done = False
    while not done:
        obs, _, terminated, truncated, info = env.step(expert.act(env, obs))
        done = terminated or truncated
    return info


@pytest.mark.parametrize("name", ["push", "multitask"])
def test_spaces_and_features(name: str) -> None:
    env = make_env(name)
    obs, info = env.reset(seed=0)
    assert set(obs) == {STATE, ENV_STATE} == set(env.observation_space.spaces)
    for key in (STATE, ENV_STATE):
        assert obs[key].dtype == np.float32 and obs[key].shape == (len(env.feature_names[key]),)
    assert env.observation_space.contains(obs)
    assert env.action_space.dtype == np.float32 and env.action_space.shape == (len(env.feature_names[ACTION]),)
    assert np.all(env.action_space.low == -1) and np.all(env.action_space.high == 1)
    assert info["task"] == env.task_description in env.instructions
    n_blocks = len(env.task.colours)
    assert len(env.feature_names[ENV_STATE]) == 4 * n_blocks + 2
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message=".*infinity")  # unbounded positions are intended
        check_env(env, skip_render_check=True)


def test_seeding_reproducible() -> None:
    actions = np.random.default_rng(0).uniform(-1, 1, (30, 2)).astype(np.float32)

    def trajectory(env: PushEnv, seed: int) -> np.ndarray:
        obs, _ = env.reset(seed=seed)
        out = [obs[ENV_STATE]]
        for a in actions:
            obs, *_ = env.step(a)
            out.append(np.concatenate([obs[STATE], obs[ENV_STATE]]))
        return np.concatenate(out)

    r = Randomization.default_dr()
    a, b = PushEnv(MULTITASK, randomization=r), PushEnv(MULTITASK, randomization=r)
    np.testing.assert_array_equal(trajectory(a, 7), trajectory(b, 7))
    assert not np.array_equal(trajectory(a, 7), trajectory(a, 8))


def test_success_terminates_with_sparse_reward() -> None:
    env = PushEnv()
    env.reset(seed=0)
    _, reward, terminated, truncated, info = env.step(np.zeros(2, np.float32))
    assert (reward, terminated, info["is_success"]) == (0.0, False, False)
    put_block_on_goal(env, 0)
    _, reward, terminated, truncated, info = env.step(np.zeros(2, np.float32))
    assert info["is_success"] and terminated and not truncated and reward == 1.0
    assert info["achieved_task"] == instruction("red")


def test_time_limit_truncates() -> None:
    env = PushEnv(max_episode_steps=5)
    env.reset(seed=0)
    for i in range(5):
        _, _, terminated, truncated, _ = env.step(np.zeros(2, np.float32))
        assert not terminated and truncated == (i == 4)


def test_dense_reward_grows_towards_goal() -> None:
    env = PushEnv(dense_reward=True, terminate_on_success=False)
    env.reset(seed=0)
    _, far, *_ = env.step(np.zeros(2, np.float32))
    assert 0.0 < far < 1.0
    adr = env.model.joint("block_red").qposadr[0]
    env.data.qpos[adr:adr + 2] = env.goal_xy() + [0.05, 0.0]
    _, near, *_ = env.step(np.zeros(2, np.float32))
    put_block_on_goal(env, 0)
    _, done, *_ = env.step(np.zeros(2, np.float32))
    assert far < near < done == 1.0


def test_physics_randomization_changes_model() -> None:
    nominal = PushEnv()
    env = PushEnv(randomization=Randomization(friction=0.3, mass=0.3, actuator_gain=0.2))
    env.reset(seed=0)
    first = (env.model.geom_friction.copy(), env.model.body_mass.copy(), env.model.actuator_gainprm[:, 0].copy())
    for now, ref in zip(first, (nominal.model.geom_friction, nominal.model.body_mass, nominal.model.actuator_gainprm[:, 0])):
        assert not np.allclose(now, ref)
    np.testing.assert_allclose(env.model.actuator_biasprm[:, 1], -env.model.actuator_gainprm[:, 0])
    env.reset(seed=1)
    assert not np.allclose(first[0], env.model.geom_friction)


def test_object_pose_scale() -> None:
    def block_spread(scale: float) -> float:
        env = PushEnv(randomization=Randomization(object_pose=scale))
        return float(np.ptp([env.reset(seed=s)[0][ENV_STATE][:2] for s in range(20)], axis=0).sum())

    assert block_spread(0.0) == 0.0
    assert 0.0 < block_spread(1.0) < block_spread(2.0)


def test_observation_noise() -> None:
    clean, _ = PushEnv().reset(seed=3)
    noisy, _ = PushEnv(randomization=Randomization(obs_noise_std=0.01)).reset(seed=3)
    diff = noisy[ENV_STATE] - clean[ENV_STATE]
    assert noisy[ENV_STATE].dtype == np.float32 and 0 < np.abs(diff).max() < 0.1


def test_action_latency_delays_effect() -> None:
    push_x = np.array([1.0, 0.0], np.float32)

    def pusher_x_after_steps(latency: int) -> list[float]:
        env = PushEnv(randomization=Randomization(action_latency_steps=latency))
        obs, _ = env.reset(seed=0)
        start = obs[STATE][0]
        return [env.step(push_x)[0][STATE][0] - start for _ in range(2)]

    now, delayed = pusher_x_after_steps(0), pusher_x_after_steps(1)
    step = PushEnv().step_length
    assert now[0] > 0.8 * step and abs(delayed[0]) < 1e-3 and delayed[1] > 0.8 * step


def test_camera_observation() -> None:
    env = PushEnv(MULTITASK, cameras=("top",), image_size=32)
    obs, _ = env.reset(seed=0)
    image = obs[IMAGE_PREFIX + "top"]
    assert image.shape == (32, 32, 3) and image.dtype == np.uint8 and image.std() > 5
    assert env.observation_space.contains(obs)
    assert env.render().shape == (256, 256, 3)
    env.close()


def test_bad_camera_arguments() -> None:
    with pytest.raises(RobopolicyError, match="unknown camera.*top, front"):
        PushEnv(cameras=("wrist",))
    with pytest.raises(RobopolicyError, match="image_size"):
        PushEnv(cameras=("top",), image_size=0)


@pytest.mark.parametrize("name", ["push", "multitask"])
def test_expert_succeeds(name: str) -> None:
    env = make_env(name)
    assert isinstance(make_expert(name), PushExpert)
    assert sum(rollout_expert(env, seed)["is_success"] for seed in range(10)) >= 9


def test_multitask_forced_instruction_keeps_scene() -> None:
    env = PushEnv(MULTITASK)
    assert env.instructions == [instruction(c) for c in ("red", "green", "blue")]
    scenes = []
    for task in env.instructions:
        obs, info = env.reset(seed=5, options={"task": task})
        assert env.task_description == info["task"] == task and env.target == env.instructions.index(task)
        scenes.append(obs[ENV_STATE])
    np.testing.assert_array_equal(scenes[0], scenes[1])
    drawn = {env.reset(seed=s)[1]["task"] for s in range(30)}
    assert drawn == set(env.instructions)


def test_multitask_unknown_instruction() -> None:
    env = PushEnv(MULTITASK)
    with pytest.raises(RobopolicyError, match="push the purple block.*push the red block to the goal"):
        env.reset(seed=0, options={"task": "push the purple block to the goal"})
    with pytest.raises(RobopolicyError, match="unknown reset option"):
        env.reset(seed=0, options={"colour": "red"})


def test_multitask_achieved_task() -> None:
    env = PushEnv(MULTITASK)
    env.reset(seed=0, options={"task": instruction("green")})
    put_block_on_goal(env, 2)  # blue, not the instructed green
    _, reward, terminated, _, info = env.step(np.zeros(2, np.float32))
    assert not info["is_success"] and not terminated and reward == 0.0
    assert info["achieved_task"] == instruction("blue")
    info = rollout_expert(env, seed=0, options={"task": instruction("green")})
    assert info["is_success"] and info["achieved_task"] == instruction("green")
