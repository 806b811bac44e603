"""Teleoperation: scripted keys and Joy messages over DDS drive the push env; episodes are
recorded like collect's (lerobot reloads them), success ends an episode, discard / quit keep
only saved episodes, and no display and no terminal is a clear error."""

from __future__ import annotations

import io
import itertools
import json
import os
import threading
import time
from pathlib import Path

import numpy as np
import pytest
from lerobot.datasets.lerobot_dataset import LeRobotDataset

from robopolicy.cli import main
from robopolicy.data.teleop import TeleopConfig, teleop
from robopolicy.data.teleop_input import (
    Command, JoyInput, KeyPress, ScriptedKeys, Teleoperator, _parse_terminal, joy_map, key_layout,
)
from robopolicy.errors import RobopolicyError
from robopolicy.sim import make_env, make_expert

_domains = itertools.count()


def _load(path: Path) -> LeRobotDataset:
    return LeRobotDataset(f"local/{path.name}", root=path, video_backend="pyav")


def _actions(path: Path) -> np.ndarray:
    ds = _load(path)
    return np.stack([ds[i]["action"].numpy() for i in range(len(ds))])


def test_scripted_keys_record_the_saved_episode_only(tmp_path: Path) -> None:
    out = tmp_path / "keys"
    script = [["d"], [], [], ["w"], [], ["enter"],  # episode 1: 5 steps, saved
              [], ["a"], ["backspace"],  # episode 2: idle tick (not recorded), 1 step, discarded
              ["s"], ["s"]]  # episode 3: 2 steps, then the script ends: Esc (quit) drops it
    r = teleop(TeleopConfig(env="push", out=out, episodes=5, speed=0), sources=[ScriptedKeys(script)])
    assert (r.saved, r.attempts, r.successes, r.frames, r.quit) == (1, 2, 0, 5, True)
    np.testing.assert_allclose(_actions(out), [[0.5, 0]] * 3 + [[0.5, 0.5]] * 2)
    ds = _load(out)
    assert ds.num_episodes == 1 and ds.meta.info["codebase_version"] == "v3.0" and ds.fps == 10
    assert ds[0]["task"] == "push the red block to the goal"
    assert ds.meta.features["action"]["names"] == ["pusher_vx_cmd", "pusher_vy_cmd"]
    meta = json.loads((out / "meta" / "robopolicy.json").read_text())
    assert meta["env"] == "push" and meta["source"] == "teleoperation (script)"

    # appending: same features as collect writes, so the dataset grows
    r2 = teleop(TeleopConfig(env="push", out=out, episodes=1, speed=0),
                sources=[ScriptedKeys([["w"], ["space"], ["enter"]])])
    assert (r2.saved, r2.total_episodes) == (1, 2)
    np.testing.assert_allclose(_actions(out)[5:], [[0, 0.5], [0, 0]])


def test_success_ends_the_episode(tmp_path: Path) -> None:
    """The scripted expert's actions, quantized to key presses, solve push; success saves."""
    env, expert = make_env("push"), make_expert("push")
    step = 0.25
    state = {"units": np.zeros(2, int), "elapsed": -1}
    layout = key_layout(env.feature_names["action"], step)
    keys = {(d, s): k for k, (d, s) in layout.bindings.items()}

    def script(tick: int) -> list[str] | None:
        if tick > 400:
            return None
        if env._elapsed == 0 and state["elapsed"] != 0:  # a fresh episode: the command is zero
            expert.reset(env, np.random.default_rng(tick))
            state["units"][:] = 0
        state["elapsed"] = env._elapsed
        target = np.round(expert.act(env, {}) / step).astype(int)
        out = []
        for d in range(2):
            diff = int(target[d] - state["units"][d])
            if diff:
                out += [keys[(d, 1 if diff > 0 else -1)]] * abs(diff)
        state["units"][:] = target
        return out

    out = tmp_path / "success"
    r = teleop(TeleopConfig(env="push", out=out, episodes=1, speed=0, key_step=step),
               sources=[ScriptedKeys(script)], env=env)
    assert r.successes == 1 and r.saved == 1 and not r.quit
    assert 0 < r.frames < env.max_episode_steps
    ds = _load(out)
    assert ds.num_episodes == 1 and len(ds) == r.frames


def test_layouts_and_operator_units() -> None:
    osc = key_layout(["delta_x", "delta_y", "delta_z", "delta_rx", "delta_ry", "delta_rz", "gripper"])
    op = Teleoperator(osc, -np.ones(7), np.ones(7))
    assert op.action()[6] == -1  # gripper open
    assert op.handle([KeyPress("w"), KeyPress("w"), KeyPress("d"), KeyPress("g")]) == []
    np.testing.assert_allclose(op.action(), [0.5, -0.25, 0, 0, 0, 0, 1])
    assert op.handle([KeyPress("space")]) == [Command.STOP]
    np.testing.assert_allclose(op.action(), [0, 0, 0, 0, 0, 0, 1])  # stop keeps the gripper
    generic = key_layout(["a", "b", "c"])
    assert generic.bindings["1"] == (0, 1) and generic.bindings["e"] == (2, -1)
    assert "Esc quit" in generic.help(["a", "b", "c"])
    with pytest.raises(RobopolicyError, match="at most"):
        key_layout([f"d{i}" for i in range(40)])
    assert _parse_terminal(b"w\x1b[Aa\r\x7f \x1b") == ["w", "a", "enter", "backspace", "space", "esc"]


def test_joy_mapping_deadman_deadzone_buttons() -> None:
    layout = key_layout(["pusher_vx_cmd", "pusher_vy_cmd"])
    op = Teleoperator(layout, -np.ones(2), np.ones(2), joy_map(["pusher_vx_cmd", "pusher_vy_cmd"], layout))
    now = time.monotonic()
    released = JoyInput((-1.0, 0.5), (0, 0, 0, 0, 0, 0, 0, 0), now)
    assert op.handle([released]) == [] and not op.moved
    np.testing.assert_allclose(op.action(now), [0, 0])  # dead-man not held
    held = JoyInput((-1.0, 0.05), (0, 0, 0, 0, 1, 0, 0, 0), now)
    op.handle([held])
    assert op.moved
    np.testing.assert_allclose(op.action(now), [1, 0])  # left = +1 -> vx = +1; 0.05 in the dead zone
    np.testing.assert_allclose(op.action(now + 1.0), [0, 0])  # stale
    press = JoyInput((0.0, 0.0), (1, 0, 0, 0, 1, 0, 0, 0), now)
    assert op.handle([press, press]) == [Command.SAVE]  # an edge, not a level


def test_joy_over_dds_drives_push(tmp_path: Path) -> None:
    import rclpy
    from rclpy.context import Context
    from rclpy.node import Node
    from rclpy.signals import SignalHandlerOptions
    from sensor_msgs.msg import Joy

    from robopolicy.real.joy import JoySource

    domain = 1 + (os.getpid() + 53 * next(_domains)) % 101
    joy = JoySource("/teleop_test/joy", domain_id=domain)
    ctx = Context()
    rclpy.init(context=ctx, domain_id=domain, signal_handler_options=SignalHandlerOptions.NO)
    node = Node("fake_gamepad", context=ctx)
    pub = node.create_publisher(Joy, "/teleop_test/joy", 10)
    done = threading.Event()

    def gamepad() -> None:
        def send(axes, buttons) -> None:
            pub.publish(Joy(axes=axes, buttons=buttons))

        deadline = time.monotonic() + 20
        while pub.get_subscription_count() < 1 and time.monotonic() < deadline:
            time.sleep(0.05)
        for _ in range(15):  # 0.75 s at 20 Hz: left stick full right (axis 0 = -1), dead-man held
            send([-1.0, 0.0, 0.0, 0.0, 0.0], [0, 0, 0, 0, 1, 0, 0, 0])
            time.sleep(0.05)
        for _ in range(3):  # A (save): one press
            send([0.0] * 5, [1, 0, 0, 0, 0, 0, 0, 0])
            time.sleep(0.05)
        while not done.wait(0.05):
            send([0.0] * 5, [0, 0, 0, 0, 0, 0, 1, 0])  # Back (quit) if the loop still runs

    thread = threading.Thread(target=gamepad, daemon=True)
    thread.start()
    out = tmp_path / "joy"
    try:
        r = teleop(TeleopConfig(env="push", out=out, episodes=1, speed=2.0), sources=[joy])
    finally:
        done.set()
        thread.join(5)
        node.destroy_node()
        ctx.try_shutdown()
    assert r.saved == 1, r
    actions = _actions(out)
    assert len(actions) >= 3
    np.testing.assert_allclose(actions, np.tile([1.0, 0.0], (len(actions), 1)))
    meta = json.loads((out / "meta" / "robopolicy.json").read_text())
    assert meta["source"] == "teleoperation (joy)"


def test_no_display_and_no_terminal_is_a_clear_error(tmp_path: Path, monkeypatch, capsys) -> None:
    monkeypatch.delenv("DISPLAY", raising=False)
    monkeypatch.delenv("WAYLAND_DISPLAY", raising=False)
    monkeypatch.setattr("sys.stdin", io.StringIO(""))
    out = tmp_path / "none"
    assert main(["teleop", "--env", "push", "--out", str(out)]) == 2
    err = capsys.readouterr().err.strip()
    assert "teleop needs a keyboard" in err and "--joy" in err and len(err.splitlines()) == 1
    assert not out.exists()
    assert main(["teleop", "--env", "push", "--out", str(out), "--keyboard", "none"]) == 2
    assert "needs a gamepad" in capsys.readouterr().err
    monkeypatch.setenv("DISPLAY", ":99")  # named but unreachable: probed in a child, never a Qt abort here
    assert main(["teleop", "--env", "push", "--out", str(out), "--keyboard", "window"]) == 2
    err = capsys.readouterr().err
    assert "cannot open the teleop window" in err and ":99" in err
