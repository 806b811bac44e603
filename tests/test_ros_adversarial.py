"""The policy node against an adversarial robot, over DDS, from a separate participant.

The node runs as its own process, started the way a robot integrator starts it
(``python -m robopolicy.real.policy_node --ros-args --params-file arm.yaml``). This test
process plays the robot: an SO-100-style 3-joint arm behind a ros2_control-like driver
(:class:`Arm`) whose joint names (``shoulder_pan``) and units (radians) differ from the
model's (``shoulder_pan.pos``, degrees), and which moves to every position command it
receives. The model is a tiny untrained diffusion policy whose actions land anywhere in
[-90, 90] degrees: exactly what a safety layer must tame.

Every test hands its commands to :meth:`Arm.check`, which checks each one from the robot's
side of the topic: the ROS joint names, finite values inside the limits, and the slew
limit per second (and per cycle) from the previous command, or, for the first command
after an activation, from the measured joints.
"""

from __future__ import annotations

import itertools
import math
import os
import re
import subprocess
import threading
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Iterator

import numpy as np
import pytest
import rclpy
import torch
import yaml
from rclpy.context import Context
from rclpy.experimental import EventsExecutor
from rclpy.node import Node
from rclpy.signals import SignalHandlerOptions
from sensor_msgs.msg import JointState
from trajectory_msgs.msg import JointTrajectory

from robopolicy.policies.factory import make_policy
from robopolicy.real.client import PolicyClient
from robopolicy.real.messages import s_to_stamp, stamp_to_s
from robopolicy.real.nodes import POLICY, ros_environment
from robopolicy.real.rosutil import spin, stream_qos
from robopolicy.spec import ACTION, STATE, Feature, FeatureSpec, Stats
from robopolicy.train.checkpoint import save_policy

pytestmark = pytest.mark.ros

JOINTS = ["shoulder_pan", "shoulder_lift", "elbow_flex"]
NAMES = [f"{j}.pos" for j in JOINTS]
DEG = math.pi / 180.0
LIMIT_DEG, MAX_DELTA_DEG, MAX_RATE_DEG = 100.0, 5.0, 60.0  # 60 deg/s: 1.2 deg per 20 ms cycle
CONTROL_HZ, STALENESS_S, FUTURE_TOLERANCE_S = 50.0, 0.25, 0.1
PERIOD = 1.0 / CONTROL_HZ
START_DEG = np.array([30.0, -40.0, 50.0])  # where the arm stands when the node starts
TOPIC, COMMAND_TOPIC = "/joint_states", "/arm_controller/joint_trajectory"
TINY = {"n_obs_steps": 2, "horizon": 8, "n_action_steps": 4, "down_dims": [16, 32], "n_groups": 4,
        "kernel_size": 3, "time_embed_dim": 16, "state_mlp_dims": [32], "num_inference_steps": 2}
WAIT_S = 30.0
#: Float slack of the checks, in degrees: stamps as float seconds resolve ~0.2 us (60 deg/s * 0.5 us = 3e-5).
EPS_DEG = 1e-4
_domains = itertools.count()


@pytest.fixture(scope="module")
def arm_model(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """An untrained tiny diffusion policy on joint angles in degrees, saved as a checkpoint."""
    def feature(key: str) -> Feature:
        return Feature(key, (3,), names=list(NAMES), stats=Stats([-90.0] * 3, [90.0] * 3, [0.0] * 3, [45.0] * 3))

    spec = FeatureSpec({STATE: feature(STATE), ACTION: feature(ACTION)}, fps=10.0, n_obs_steps=2, horizon=8,
                       n_action_steps=4, tasks=["wave"])
    torch.manual_seed(0)
    policy = make_policy("diffusion", spec, TINY)
    folder = tmp_path_factory.mktemp("arm_model")
    save_policy(folder, policy, policy.state_dict(), {"env": "arm"})
    return folder


def arm_params(folder: Path, model: Path, **changes: Any) -> Path:
    """The robot's parameter file: the model's names and degrees mapped onto the driver's radians."""
    params: dict[str, Any] = {
        "model": str(model), "control_rate_hz": CONTROL_HZ, "execution_horizon": 3, "blend_s": 0.1,
        "sync_to_observation": True, "diagnostics_period_s": 0.2,
        "observation": {"staleness_s": STALENESS_S, "future_tolerance_s": FUTURE_TOLERANCE_S,
                        "state": {"topic": TOPIC, "names": NAMES, "ros_names": JOINTS, "ros_scale": [DEG]}},
        "action": {"topic": COMMAND_TOPIC, "message_type": "joint_trajectory", "names": NAMES,
                   "ros_names": JOINTS, "ros_scale": [DEG], "lower": [-LIMIT_DEG] * 3, "upper": [LIMIT_DEG] * 3,
                   "max_delta": [MAX_DELTA_DEG] * 3, "max_rate": [MAX_RATE_DEG] * 3, "hold": ["last"],
                   "measured": NAMES},
    }
    params.update(changes)
    path = folder / "arm.yaml"
    path.write_text(yaml.dump({POLICY.name: {"ros__parameters": params}}, Dumper=NoAliases))
    return path


class NoAliases(yaml.SafeDumper):
    """rcl's YAML parser refuses anchors and aliases."""

    def ignore_aliases(self, data: Any) -> bool:
        return True


@dataclass
class Command:
    arrival: float  # monotonic, at the robot
    stamp: float  # the node's header stamp (its clock when it computed the command)
    names: list[str]
    degrees: np.ndarray
    measured: np.ndarray  # where the arm stood when it arrived, degrees


class Arm:
    """The robot: publishes ``/joint_states`` from its own thread (radians, driver names, plus a
    joint the policy does not use) and moves to every command it receives. Knobs for faults:
    ``rate_hz``, ``paused``, ``follow`` (False: someone holds the arm where it is),
    ``mutate(msg)`` (edits each message), :meth:`send_once` and :meth:`flood`."""

    def __init__(self, context: Context) -> None:
        self.node = Node("adversarial_arm", context=context)
        self._pub = self.node.create_publisher(JointState, TOPIC, stream_qos(10, "reliable"))
        self.node.create_subscription(JointTrajectory, COMMAND_TOPIC, self._on_command, stream_qos(100, "reliable"))
        self._lock = threading.Lock()
        self.position_deg = START_DEG.copy()
        self.commands: list[Command] = []
        self.rate_hz, self.paused, self.follow = 100.0, False, True
        self.mutate: Callable[[JointState], None] | None = None
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)
        self._thread.start()

    def message(self, stamp_offset_s: float = 0.0) -> JointState:
        with self._lock:
            radians = (self.position_deg * DEG).tolist()
        msg = JointState(name=[*JOINTS, "wrist_roll"], position=[*radians, 0.1])
        msg.header.stamp = s_to_stamp(time.time() + stamp_offset_s)
        return msg

    def send_once(self, msg: JointState) -> None:
        self._pub.publish(msg)

    def _run(self) -> None:
        while not self._stop.wait(1.0 / self.rate_hz):
            if not self.paused:
                msg = self.message()
                if self.mutate is not None:
                    self.mutate(msg)
                self._pub.publish(msg)

    def flood(self, count: int, seconds: float) -> None:
        """Publish ``count`` joint states evenly over ``seconds`` (as fast as Python can go)."""
        start = time.perf_counter()
        for k in range(count):
            while time.perf_counter() < start + k * seconds / count:
                pass
            self._pub.publish(self.message())

    def _on_command(self, msg: JointTrajectory) -> None:
        arrival = time.monotonic()
        values = np.array(msg.points[0].positions) / DEG if msg.points else np.full(3, np.nan)
        with self._lock:
            self.commands.append(Command(arrival, stamp_to_s(msg.header.stamp), list(msg.joint_names), values,
                                         self.position_deg.copy()))
            if self.follow and np.all(np.isfinite(values)):
                self.position_deg = values.copy()

    def place(self, degrees: np.ndarray) -> None:
        with self._lock:
            self.position_deg = np.asarray(degrees, dtype=float).copy()

    def count(self) -> int:
        with self._lock:
            return len(self.commands)

    def since(self, n: int) -> list[Command]:
        with self._lock:
            return list(self.commands[n:])

    def check(self, commands: list[Command], fresh_start: bool) -> None:
        """Every command safe from the robot's side (see the module docstring)."""
        per_cycle = MAX_DELTA_DEG
        for i, c in enumerate(commands):
            assert c.names == JOINTS, f"command {i} names {c.names}"
            assert np.all(np.isfinite(c.degrees)), f"command {i} is not finite: {c.degrees}"
            assert np.all(np.abs(c.degrees) <= LIMIT_DEG + EPS_DEG), f"command {i} leaves the limits: {c.degrees}"
            if i == 0:
                if fresh_start:  # from where the arm stood
                    step = np.abs(c.degrees - c.measured).max()
                    assert step <= MAX_RATE_DEG * PERIOD + EPS_DEG, \
                        f"the first command jumps {step:.3f} deg from the measured joints"
                continue
            prev = commands[i - 1]
            dt = c.stamp - prev.stamp
            step = np.abs(c.degrees - prev.degrees).max()
            allowed = min(per_cycle, MAX_RATE_DEG * max(dt, 0.0))
            assert step <= allowed + EPS_DEG, \
                f"command {i} moves {step:.4f} deg in {dt * 1e3:.2f} ms (allowed {allowed:.4f})"

    def close(self) -> None:
        self._stop.set()
        self._thread.join(2.0)


class Robot:
    """The policy node process + the arm + a lifecycle client, on a private ROS domain."""

    def __init__(self, model: Path, folder: Path, **changes: Any) -> None:
        self.domain = 1 + (os.getpid() * 7 + 41 * next(_domains)) % 101
        self.params = arm_params(folder, model, **changes)
        self.rejected_before: dict[str, int] = {}
        self.log = (folder / "policy_node.log").open("w")
        env = ros_environment(self.domain)
        self.process = subprocess.Popen(POLICY.command([self.params]), env=env, stdout=self.log,
                                        stderr=subprocess.STDOUT)
        try:
            self._connect()
        except BaseException:
            self.close()
            raise

    def _connect(self) -> None:
        self.context = Context()
        rclpy.init(context=self.context, domain_id=self.domain, signal_handler_options=SignalHandlerOptions.NO)
        self.arm = Arm(self.context)
        self._stop = threading.Event()
        self._executor = EventsExecutor(context=self.context)
        self._executor.add_node(self.arm.node)
        self._thread = threading.Thread(target=spin, args=(self._executor, self.context, self._stop), daemon=True)
        self._thread.start()
        self.client = PolicyClient(self.context)
        assert self.client.ready(60.0), f"the policy node did not come up; log: {self.log.name}"

    def diag(self, key: str, default: str = "0") -> str:
        return self.client.diagnostic_values().get(key, default)

    def rejected(self, reason: str) -> int:
        """Observations rejected for ``reason`` since the test began (the node counts for its life)."""
        return int(self.diag(f"rejected.{reason}")) - self.rejected_before.get(reason, 0)

    def wait(self, predicate: Callable[[], bool], what: str, timeout_s: float = WAIT_S) -> None:
        end = time.monotonic() + timeout_s
        while time.monotonic() < end:
            if predicate():
                return
            time.sleep(0.01)
        message = self.client.diagnostics.message if self.client.diagnostics else ""
        raise AssertionError(f"timed out waiting for {what}; diagnostics: {message!r} {self.client.diagnostic_values()}")

    def commanding(self, n: int = 10) -> None:
        """Wait until the node sends commands computed by the policy (not holds)."""
        start = self.arm.count()
        self.wait(lambda: self.arm.count() >= start + n and self.client.diagnostics is not None
                  and self.client.diagnostics.message == "commanding", "commanding")

    def start(self) -> int:
        """Configure + activate; returns the index of the first command of this activation."""
        n = self.arm.count()
        assert self.client.transition("configure"), self.client.diagnostics
        assert self.client.transition("activate")
        return n

    def stop(self) -> None:
        assert self.client.transition("deactivate") and self.client.transition("cleanup")

    @property
    def alive(self) -> bool:
        return self.process.poll() is None

    def close(self) -> None:
        if hasattr(self, "client"):
            self.client.close()
        if hasattr(self, "_thread"):
            self._stop.set()
            self._thread.join(5.0)
            self._executor.shutdown()
        if hasattr(self, "arm"):
            self.arm.close()
            self.arm.node.destroy_node()
        if hasattr(self, "context"):
            self.context.try_shutdown()
        if self.alive:
            self.process.send_signal(2)
            try:
                self.process.wait(15.0)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait()
        self.log.close()


@pytest.fixture(scope="module")
def robot(arm_model: Path, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Robot]:
    r = Robot(arm_model, tmp_path_factory.mktemp("robot"))
    yield r
    r.close()


@pytest.fixture
def arm(robot: Robot) -> Iterator[Robot]:
    """The robot with a healthy arm at the start pose and an unconfigured node; after the
    test the node must still be alive and back to unconfigured."""
    robot.arm.rate_hz, robot.arm.paused, robot.arm.follow, robot.arm.mutate = 100.0, False, True, None
    robot.arm.place(START_DEG)
    robot.client.trigger("reset_estop")
    seen = robot.client.diagnostics_received
    robot.wait(lambda: robot.client.diagnostics_received >= seen + 2, "fresh diagnostics")
    robot.rejected_before = {k.removeprefix("rejected."): int(v) for k, v in robot.client.diagnostic_values().items()
                             if k.startswith("rejected.") and v.isdigit()}
    yield robot
    assert robot.alive, f"the policy node died; log: {robot.log.name}"
    state = robot.client.state()
    if state == "active":
        robot.client.transition("deactivate")
    if robot.client.state() == "inactive":
        robot.client.transition("cleanup")


def test_first_command_ramps_from_the_measured_joints_in_the_robots_names_and_units(arm: Robot) -> None:
    n = arm.start()
    arm.commanding()
    commands = arm.arm.since(n)
    arm.arm.check(commands, fresh_start=True)
    first = commands[0]
    np.testing.assert_allclose(first.measured, START_DEG)
    # The untrained policy asks for anywhere in [-90, 90] deg: the arm moves 1.2 deg a cycle.
    assert np.abs(first.degrees - START_DEG).max() <= MAX_RATE_DEG * PERIOD + EPS_DEG
    arm.stop()


def _resumes_from(arm: Robot, since: int, where: np.ndarray) -> None:
    """The first command after ``since`` that moves starts within one cycle's slew of ``where``;
    every command from there on is safe."""
    commands = arm.arm.since(since - 1)  # from the last command of the hold
    moving = next(i for i in range(1, len(commands)) if not np.allclose(commands[i].degrees, commands[0].degrees))
    assert np.allclose(commands[moving].measured, where)
    arm.arm.check(commands[moving:], fresh_start=True)


def test_estop_reset_and_holds_resume_from_where_the_arm_is(arm: Robot) -> None:
    n = arm.start()
    arm.commanding()
    arm.arm.check(arm.arm.since(n), fresh_start=True)
    assert arm.client.trigger("estop").message == "e-stop latched"
    arm.wait(lambda: arm.client.estopped is True, "the e-stop latch")
    arm.arm.follow = False
    moved = np.array([-20.0, 10.0, 0.0])
    arm.arm.place(moved)  # someone moves the stopped arm by hand
    time.sleep(0.3)
    held = arm.arm.since(arm.arm.count() - 5)
    assert all(np.allclose(c.degrees, held[0].degrees) for c in held), "the e-stop holds the last command"
    m = arm.arm.count()
    assert arm.client.trigger("reset_estop").message == "e-stop cleared"
    arm.commanding()
    _resumes_from(arm, m, moved)
    arm.arm.follow = True
    # A hold (the joint states stop) while the arm is moved; it resumes from there.
    arm.arm.paused = True
    arm.wait(lambda: "stale_observation" in arm.client.diagnostics.message, "the stale-observation hold")
    arm.arm.follow = False
    moved = np.array([45.0, 45.0, -45.0])
    arm.arm.place(moved)
    m = arm.arm.count()
    arm.arm.paused = False
    arm.commanding()
    _resumes_from(arm, m, moved)
    arm.arm.follow = True
    arm.stop()


def test_bursts_of_observations_move_the_command_at_most_max_rate_per_second(arm: Robot) -> None:
    """20 Hz joint states with a burst of three 1 ms apart every fourth message: with
    ``sync_to_observation`` each burst message runs a cycle."""
    arm.arm.paused = True
    n = arm.start()
    stop = threading.Event()

    def bursty() -> None:
        for k in itertools.count():
            if stop.wait(0.05):
                return
            for _ in range(3 if k % 4 == 3 else 1):
                arm.arm.send_once(arm.arm.message())
                time.sleep(0.001)

    thread = threading.Thread(target=bursty, daemon=True)
    thread.start()
    try:
        arm.commanding(50)
    finally:
        stop.set()
        thread.join(2.0)
    commands = arm.arm.since(n)
    arm.arm.check(commands, fresh_start=True)
    gaps = np.diff([c.stamp for c in commands])
    assert (gaps < 0.005).sum() >= 3, "the bursts ran cycles milliseconds apart"
    arm.stop()


@pytest.mark.parametrize("count, seconds", [(1000, 0.3), (1100, 1.0)])
def test_a_flood_of_observations_does_not_starve_the_control_loop(arm: Robot, count: int, seconds: float) -> None:
    n = arm.start()
    arm.commanding()
    m = arm.arm.count()
    start = time.monotonic()
    arm.arm.flood(count, seconds)
    end = time.monotonic()
    arm.commanding()
    commands = arm.arm.since(n)
    arm.arm.check(commands, fresh_start=True)
    during = [c.arrival for c in arm.arm.since(m) if start - 0.1 <= c.arrival <= end + 0.1]
    gaps = np.diff(during) * 1e3
    assert len(during) >= (end - start) * CONTROL_HZ * 0.8, f"{len(during)} commands in {end - start:.2f} s"
    assert gaps.max() < 2.5 * PERIOD * 1e3, f"control gaps up to {gaps.max():.1f} ms during the flood"
    # Many never reached the node (keep-last QoS drops them in DDS); of those that did, the
    # control loop took only the newest each cycle.
    arm.wait(lambda: int(arm.diag("observations.coalesced")) > 100, "coalesced observations")
    arm.stop()


def test_future_and_backward_stamps_are_rejected_without_blinding_the_stream(arm: Robot) -> None:
    n = arm.start()
    arm.commanding()

    def alone(stamp_offset_s: float) -> None:
        """One sample, then the stream resumes once the control loop took it (a cycle later)."""
        arm.arm.paused = True
        time.sleep(0.05)
        arm.arm.send_once(arm.arm.message(stamp_offset_s))
        time.sleep(0.04)
        arm.arm.paused = False

    alone(0.2)  # beyond the 0.1 s clock-skew tolerance
    arm.wait(lambda: arm.rejected("future_stamp") >= 1, "the future-stamp rejection")
    ahead = re.search(r"stamped ([0-9.]+) s in the future", arm.diag("rejected.last", ""))
    assert ahead and 0.15 < float(ahead.group(1)) <= 0.2, arm.diag("rejected.last", "")  # what was sent, not +0.003
    # Within the tolerance: accepted, then shown to be an outlier by the next real sample
    # (stamped before it, while it is still ahead of the clock), which is kept.
    alone(0.09)
    arm.wait(lambda: arm.rejected("future_outlier") >= 1, "the outlier to be dropped")
    arm.commanding()
    assert int(arm.diag("intervention.stale_observation")) == 0, "the stream was never blinded"
    assert arm.rejected("out_of_order") == 0
    # A sample stamped before the previous one is out of order, and said so.
    arm.arm.paused = True
    time.sleep(0.05)
    arm.arm.send_once(arm.arm.message())
    time.sleep(0.05)
    arm.arm.send_once(arm.arm.message(stamp_offset_s=-0.1))
    arm.wait(lambda: "before the previous sample" in arm.diag("rejected.last", ""), "the out-of-order rejection")
    arm.arm.paused = False
    arm.commanding()
    arm.arm.check(arm.arm.since(n), fresh_start=True)
    arm.stop()


@pytest.mark.parametrize(
    "fault, reason",
    [
        (lambda m: m.position.__setitem__(1, float("nan")), "non_finite_observation"),
        (lambda m: m.position.__setitem__(0, float("inf")), "non_finite_observation"),
        (lambda m: setattr(m, "name", ["shoulder_pan", "elbow_flex", "wrist_roll", "gripper"]), "wrong_names"),
        (lambda m: setattr(m, "position", m.position[:-1]), "wrong_size"),
    ],
    ids=["nan", "inf", "missing_joint", "fewer_positions"],
)
def test_bad_joint_states_are_rejected_and_hold(arm: Robot, fault: Callable[[JointState], None], reason: str) -> None:
    n = arm.start()
    arm.commanding()
    arm.arm.mutate = fault
    arm.wait(lambda: arm.rejected(reason) >= 3 and int(arm.diag("intervention.stale_observation")) > 0,
             f"{reason} rejections and a hold")
    arm.arm.mutate = None
    arm.commanding()
    arm.arm.check(arm.arm.since(n), fresh_start=True)
    arm.stop()


def test_nan_in_a_joint_the_policy_does_not_use_is_harmless(arm: Robot) -> None:
    arm.arm.mutate = lambda m: m.position.__setitem__(3, float("nan"))  # wrist_roll
    n = arm.start()
    arm.commanding(30)
    assert arm.rejected("non_finite_observation") == 0
    arm.arm.check(arm.arm.since(n), fresh_start=True)
    arm.stop()


LIFECYCLES = 100


def test_every_lifecycle_transition_is_safe_under_500_hz_traffic(arm: Robot) -> None:
    arm.arm.rate_hz = 500.0
    n = arm.arm.count()
    for k in range(LIFECYCLES):
        assert arm.client.transition("configure"), f"configure {k}: {arm.client.diagnostics}"
        assert arm.client.transition("activate"), f"activate {k}"
        if k % 10 == 0:
            arm.commanding(5)
        assert arm.client.transition("deactivate"), f"deactivate {k}"
        assert arm.client.transition("cleanup"), f"cleanup {k}"
        assert arm.alive, f"the node died in lifecycle {k}; log: {arm.log.name}"
    assert arm.client.state() == "unconfigured"
    commands = arm.arm.since(n)
    assert len(commands) > 50
    arm.arm.check(commands, fresh_start=True)  # the arm follows: each activation starts where the last stopped


@pytest.mark.parametrize(
    "args, expected",
    [
        (["-p", "control_rate_hz:=50"], "control_rate_hz of node robopolicy_policy must be a double"),
        (["-p", "contol_rate_hz:=50.0"], "has no parameter(s) ['contol_rate_hz']"),
    ],
    ids=["wrong_type", "misspelt"],
)
def test_parameter_errors_are_one_line_at_start(arm_model: Path, tmp_path: Path, args: list[str],
                                                expected: str) -> None:
    params = arm_params(tmp_path, arm_model)
    env = ros_environment(1 + (os.getpid() + 53) % 101)
    done = subprocess.run([*POLICY.command([params]), *args], env=env, capture_output=True, text=True, timeout=120)
    assert done.returncode == 2, done.stderr
    lines = [line for line in done.stderr.splitlines() if line.strip()]
    assert len(lines) == 1 and expected in lines[0] and "Traceback" not in done.stderr, done.stderr
