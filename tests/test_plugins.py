"""Bring your own task: ``robopolicy.envs`` entry points, ``--env module:Class`` and ``robosuite:<Env>``.

The plugin distributions here are made in ``tmp_path`` (a ``<name>.dist-info`` folder with
METADATA and entry_points.txt next to a module), put on ``sys.path`` in-process and on
``PYTHONPATH`` for fresh processes. The registry is global: every test restores it.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import numpy as np
import pytest

from robopolicy.cli import main
from robopolicy.errors import RobopolicyError
from robopolicy.sim import registry
from robopolicy.sim.registry import env_names, make_env, make_expert, plugin_errors

#: A complete task in one module: the minimal RobopolicyEnv (README, "Bring your own task").
POINT_MODULE = textwrap.dedent('''
    """A point mass on a rail: push it to x = 0.5."""
    import gymnasium as gym
    import mujoco
    import numpy as np

    from robopolicy.sim.base import RobopolicyEnv
    from robopolicy.sim.registry import EnvEntry
    from robopolicy.spec import ACTION, STATE

    XML = """<mujoco><option timestep="0.005"/><worldbody><body name="mass">
      <joint name="x" type="slide" axis="1 0 0" range="-1 1" damping="2"/>
      <geom type="sphere" size="0.05" mass="1"/></body></worldbody>
      <actuator><motor joint="x" gear="5"/></actuator></mujoco>"""


    class PointEnv(RobopolicyEnv):
        """Slide a point mass to the mark."""

        name, task_description, fps = "point", "slide the mass to the mark", 20.0

        def __init__(self, max_episode_steps=60, **kwargs):
            super().__init__(max_episode_steps, **kwargs)
            self._model = mujoco.MjModel.from_xml_string(XML)
            self._data = mujoco.MjData(self._model)
            self.feature_names = {STATE: ["x", "vx"], ACTION: ["force"]}
            self.observation_space = gym.spaces.Dict({STATE: gym.spaces.Box(-np.inf, np.inf, (2,), np.float32)})
            self.action_space = gym.spaces.Box(-1.0, 1.0, (1,), np.float32)

        model = property(lambda self: self._model)
        data = property(lambda self: self._data)

        def _reset_task(self, rng):
            mujoco.mj_resetData(self._model, self._data)
            self._data.qpos[0] = rng.uniform(-0.5, 0.0)
            mujoco.mj_forward(self._model, self._data)

        def _apply_action(self, action):
            self._data.ctrl[:] = action
            mujoco.mj_step(self._model, self._data, nstep=10)  # 10 x 5 ms = one 20 Hz step

        def _observe(self):
            return {STATE: np.array([self._data.qpos[0], self._data.qvel[0]], np.float32)}

        def _is_success(self):
            return abs(self._data.qpos[0] - 0.5) < 0.05

        def _dense_reward(self):
            return -abs(self._data.qpos[0] - 0.5)


    class PointExpert:
        def reset(self, env, rng):
            pass

        def act(self, env, obs):
            x, v = obs["observation.state"]
            return np.clip([4.0 * (0.5 - x) - 1.0 * v], -1.0, 1.0).astype(np.float32)


    def make_point(**kwargs):
        return PointEnv(**kwargs)


    def entries():
        return [EnvEntry("fake_point", PointEnv, PointExpert, "slide a point mass (test plugin)"),
                EnvEntry("fake_point_noexpert", PointEnv, None, "the same, without an expert")]


    class NotAnEnv:
        pass
''')


def _make_dist(site: Path, dist: str, version: str, entry_points: dict[str, str], modules: dict[str, str]) -> None:
    info = site / f"{dist.replace('-', '_')}-{version}.dist-info"
    info.mkdir(parents=True)
    (info / "METADATA").write_text(f"Metadata-Version: 2.1\nName: {dist}\nVersion: {version}\n")
    lines = "".join(f"{k} = {v}\n" for k, v in entry_points.items())
    (info / "entry_points.txt").write_text(f"[robopolicy.envs]\n{lines}")
    for name, text in modules.items():
        (site / f"{name}.py").write_text(text)


@pytest.fixture
def clean_registry():
    """The registry as it was (built-ins loaded, plugins not yet looked up), restored after."""
    registry._load_builtin()
    saved = dict(registry._REGISTRY), list(registry._PLUGIN_ERRORS), registry._plugins_loaded
    registry._plugins_loaded = False
    registry._PLUGIN_ERRORS.clear()
    modules = set(sys.modules)
    yield
    registry._REGISTRY.clear()
    registry._REGISTRY.update(saved[0])
    registry._PLUGIN_ERRORS[:] = saved[1]
    registry._plugins_loaded = saved[2]
    for name in set(sys.modules) - modules:
        if name.startswith(("fake_tasks", "broken_tasks")):
            del sys.modules[name]


@pytest.fixture
def site(tmp_path: Path, monkeypatch: pytest.MonkeyPatch, clean_registry) -> Path:
    """A site folder with a working plugin distribution and a broken one, on sys.path."""
    site = tmp_path / "site"
    _make_dist(site, "fake-tasks", "0.1", {"fake": "fake_tasks:entries"}, {"fake_tasks": POINT_MODULE})
    _make_dist(site, "broken-tasks", "0.2", {"broken": "broken_tasks:entries"},
               {"broken_tasks": "import a_module_that_does_not_exist_xyz\n"})
    monkeypatch.syspath_prepend(str(site))
    return site


def _env_with(site: Path) -> dict[str, str]:
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join(p for p in (str(site), env.get("PYTHONPATH", "")) if p)
    return env


def test_plugin_envs_and_experts_register(site: Path) -> None:
    assert {"fake_point", "fake_point_noexpert", "push", "lift"} <= set(env_names())
    env = make_env("fake_point", max_episode_steps=80)
    expert = make_expert("fake_point")
    obs, info = env.reset(seed=3)
    expert.reset(env, np.random.default_rng(0))
    for _ in range(80):
        obs, _, terminated, truncated, info = env.step(expert.act(env, obs))
        if terminated or truncated:
            break
    assert info["is_success"], obs
    assert registry.env_entry("fake_point").source == "plugin fake (fake-tasks 0.1)"
    with pytest.raises(RobopolicyError, match="no scripted expert for fake_point_noexpert: collect needs one"):
        make_expert("fake_point_noexpert")
    env.close()


def test_broken_plugin_is_one_line_and_builtins_still_work(site: Path, capsys: pytest.CaptureFixture) -> None:
    errors = plugin_errors()
    assert len(errors) == 1 and "\n" not in errors[0]
    assert "'broken'" in errors[0] and "broken-tasks 0.2" in errors[0] and "a_module_that_does_not_exist_xyz" in errors[0]
    make_env("push").close()  # built-ins and the working plugin are unaffected
    make_env("fake_point").close()
    with pytest.raises(RobopolicyError, match="unknown env 'nope'.*broken-tasks 0.2"):
        make_env("nope")  # the broken plugin may be why a name is missing: say so

    assert main(["envs"]) == 0
    out, err = capsys.readouterr()
    rows = {line.split()[0]: line for line in out.splitlines()}
    assert "no expert" not in rows["push"] and "expert" in rows["push"]
    assert "no expert" in rows["fake_point_noexpert"] and "plugin fake (fake-tasks 0.1)" in rows["fake_point"]
    assert "robosuite:<Env>" in rows
    assert err.count("\n") == 1 and "warning" in err and "broken-tasks 0.2" in err and "Traceback" not in err


def test_plugin_name_clash_with_a_builtin_is_rejected(tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
                                                       clean_registry) -> None:
    site = tmp_path / "site"
    clash = POINT_MODULE + "\n\ndef clash():\n    return EnvEntry('push', PointEnv)\n"
    _make_dist(site, "fake-clash", "1.0", {"clash": "fake_tasks_clash:clash", "bad": "fake_tasks_clash:NotAnEnv"},
               {"fake_tasks_clash": clash})
    monkeypatch.syspath_prepend(str(site))
    errors = plugin_errors()
    assert len(errors) == 2
    assert any("'push' is already taken by builtin" in e for e in errors)
    assert any("'bad'" in e and "not an EnvEntry" in e for e in errors)
    assert type(make_env("push")).__name__ == "PushEnv"


def test_module_class_and_function(site: Path) -> None:
    for name in ("fake_tasks:PointEnv", "fake_tasks:make_point"):
        env = make_env(name, max_episode_steps=5)
        obs, _ = env.reset(seed=0)
        assert obs["observation.state"].shape == (2,)
        assert env.feature_spec().fps == 20.0
        env.close()
        with pytest.raises(RobopolicyError, match=f"no scripted expert for {name}"):
            make_expert(name)


@pytest.mark.parametrize("name, message", [
    ("fake_tasks:NotAnEnv", "NotAnEnv, not a robopolicy.sim.RobopolicyEnv subclass"),
    ("fake_tasks:Missing", "has no attribute 'Missing'"),
    ("no_such_module_xyz:Env", "no module named 'no_such_module_xyz'"),
    ("broken_tasks:entries", "importing 'broken_tasks' failed: ModuleNotFoundError"),
    ("gymnasium.envs.classic_control.cartpole:CartPoleEnv", "gymnasium.Env subclass, not a robopolicy"),
    ("robopolicy.sim.base:RobopolicyEnv", "does not implement model, data, _reset_task"),
    ("fake_tasks:entries", "built a list, not a robopolicy.sim.RobopolicyEnv"),
    ("robosuite:TwoArmLift", "not a single-arm"),
    ("robosuite:NoSuchEnv", "unknown robosuite environment 'NoSuchEnv'; expected one of: Door"),
])
def test_bad_env_names_are_clear_errors(site: Path, name: str, message: str) -> None:
    with pytest.raises(RobopolicyError, match=message.replace("(", r"\(")):
        make_env(name)


def test_env_contract_is_checked() -> None:
    class Thin:  # not an env at all
        pass

    with pytest.raises(RobopolicyError, match="built a Thin, not a robopolicy.sim.RobopolicyEnv"):
        registry.check_env(Thin(), "env 'x'")


def test_fresh_process_sees_the_plugin(site: Path) -> None:
    env = _env_with(site)
    out = subprocess.run([sys.executable, "-m", "robopolicy.cli", "envs"], env=env, capture_output=True,
                         text=True, timeout=120)
    assert out.returncode == 0, out.stderr
    assert "fake_point" in out.stdout and "broken-tasks 0.2" in out.stderr and "Traceback" not in out.stderr
    code = ("from robopolicy.sim import make_env, make_expert; e = make_env('fake_point'); "
            "o, _ = e.reset(seed=1); print(type(make_expert('fake_point')).__name__, o['observation.state'].shape)")
    out = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=120)
    assert out.returncode == 0 and "PointExpert (2,)" in out.stdout, out.stderr


def test_sim_bridge_process_builds_plugin_and_module_envs(site: Path, tmp_path: Path) -> None:
    """The sim bridge runs in its own process and builds the env from its ``env`` parameter."""
    pytest.importorskip("rclpy")
    procs = {}
    for name in ("fake_point", "fake_tasks:PointEnv"):
        log = open(tmp_path / f"bridge_{name.replace(':', '_')}.log", "wb")
        cmd = [sys.executable, "-m", "robopolicy.real.sim_bridge", "--ros-args", "-p", f"env:={name}",
               "-r", f"__node:=bridge_{name.replace(':', '_')}"]
        procs[name] = subprocess.Popen(cmd, env=_env_with(site), stdout=log, stderr=subprocess.STDOUT,
                                       start_new_session=True)
    try:
        deadline = time.monotonic() + 60
        pending = set(procs)
        while pending and time.monotonic() < deadline:
            for name in list(pending):
                text = (tmp_path / f"bridge_{name.replace(':', '_')}.log").read_text(errors="replace")
                assert procs[name].poll() is None, text
                if f"sim bridge: {name} at 20 Hz" in text:
                    pending.discard(name)
            time.sleep(0.2)
        assert not pending, {n: (tmp_path / f"bridge_{n.replace(':', '_')}.log").read_text() for n in pending}
    finally:
        for p in procs.values():
            if p.poll() is None:
                p.send_signal(signal.SIGINT)
        for p in procs.values():
            try:
                p.wait(timeout=15)
            except subprocess.TimeoutExpired:
                p.kill()
                p.wait()


def test_robosuite_door_wraps_generically(tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    env = make_env("robosuite:Door", max_episode_steps=3)
    try:
        obs, info = env.reset(seed=0)
        for _ in range(3):
            obs, _, terminated, truncated, info = env.step(env.action_space.sample())
        assert truncated and not terminated
        for key, value in obs.items():
            assert value.ndim == 1 and np.all(np.isfinite(value)), key
            assert len(env.feature_names[key]) == value.shape[0] == env.observation_space[key].shape[0]
        names = env.feature_names["observation.environment_state"]
        assert "hinge_qpos" in names and "handle_qpos" in names and "door_pos.x" in names  # 0-d: one element each
        assert env.feature_spec().tasks == ["robosuite Door"]
    finally:
        env.close()

    out = tmp_path / "door"
    assert main(["collect", "--env", "robosuite:Door", "--episodes", "2", "--out", str(out)]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "no scripted expert for robosuite:Door" in err and "robopolicy teleop --env robosuite:Door" in err
    assert not out.exists()
