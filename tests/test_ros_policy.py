"""The policy node and the sim bridge over real DDS (rclpy, Fast DDS on localhost).

In-process tests run the policy node, an observation feeder (a stand-in sensor with
injectable faults) and a :class:`PolicyClient` in one process on a private ROS domain,
each node with its own executor thread. The closed-loop tests go through
``robopolicy.real.deploy``: the policy node and the sim bridge as child processes.
A tiny untrained diffusion policy with the ``push`` feature spec is the model: these
tests are about the node, not the policy's skill.
"""

from __future__ import annotations

import itertools
import os
import threading
import time
from pathlib import Path
from typing import Any, Callable

import numpy as np
import pytest
import rclpy
import torch
import yaml
from rclpy.context import Context
from rclpy.experimental import EventsExecutor
from rclpy.node import Node
from rclpy.parameter import Parameter
from rclpy.signals import SignalHandlerOptions
from sensor_msgs.msg import JointState

from robopolicy.errors import RobopolicyError
from robopolicy.policies.factory import make_policy
from robopolicy.real.client import PolicyClient
from robopolicy.real.deploy import deploy
from robopolicy.real.loader import load_predictor
from robopolicy.real.messages import CommandCodec, JointMap, s_to_stamp
from robopolicy.real.policy_node import PolicyNode
from robopolicy.real.rosutil import spin, stream_qos
from robopolicy.sim import make_env
from robopolicy.spec import ENV_STATE, STATE, Stats
from robopolicy.train.checkpoint import save_policy

pytestmark = pytest.mark.ros

PUSH_YAML = Path(__file__).resolve().parent.parent / "real" / "config" / "push.yaml"
TINY = {"n_obs_steps": 2, "horizon": 8, "n_action_steps": 4, "down_dims": [16, 32], "n_groups": 4,
        "kernel_size": 3, "time_embed_dim": 16, "state_mlp_dims": [32], "num_inference_steps": 2}
WAIT_S = 20.0
_domains = itertools.count()


@pytest.fixture(scope="module")
def tiny_model(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """An untrained tiny diffusion policy with the push env's feature spec, saved as a checkpoint."""
    env = make_env("push")
    spec = env.feature_spec()
    env.close()
    for feature in spec.features.values():
        feature.stats = Stats.unit(feature.dim)
    torch.manual_seed(0)
    policy = make_policy("diffusion", spec, TINY)
    folder = tmp_path_factory.mktemp("tiny_push")
    save_policy(folder, policy, policy.state_dict(), {"env": "push"})
    return folder


@pytest.fixture(scope="module")
def tiny_export(tiny_model: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The tiny model exported to ONNX (policy.onnx + manifest.json)."""
    from robopolicy.export import export_policy

    return export_policy(tiny_model, tmp_path_factory.mktemp("export") / "tiny_push", latency_runs=2).out


@pytest.fixture(scope="module")
def residual_export(tiny_model: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The tiny model fine-tuned with a residual that drives every action to the actor's upper
    bound (1.5, -0.5), beyond the node's command limit 1.0 in the first dimension; exported."""
    from robopolicy.export import export_policy
    from robopolicy.rl.policy import make_residual_policy
    from robopolicy.train.checkpoint import load_policy

    policy = make_residual_policy(load_policy(tiny_model), 3.0, (8,), (-1.0, -1.0), (1.5, -0.5))
    torch.nn.init.constant_(policy.actor.net[-1].bias, 10.0)  # tanh -> 1: base + 3, clipped to the bound
    folder = tmp_path_factory.mktemp("residual")
    save_policy(folder / "ckpt", policy, policy.state_dict(), {"env": "push"})
    return export_policy(folder / "ckpt", folder / "export", latency_runs=2).out


class Feeder:
    """A stand-in sensor: publishes the push observations at 10 Hz, with a switchable fault."""

    MODES = ("ok", "wrong_names", "wrong_count", "nan", "stale", "off")

    def __init__(self, context: Context) -> None:
        self.node = Node("feeder", context=context)
        env = make_env("push")
        obs, _ = env.reset(seed=0)
        self.names, self.obs = env.feature_names, obs
        env.close()
        qos = stream_qos(1, "reliable")
        self.pubs = {STATE: self.node.create_publisher(JointState, "/joint_states", qos),
                     ENV_STATE: self.node.create_publisher(JointState, "/object_state", qos)}
        self.mode = "ok"
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)
        self._thread.start()

    def _run(self) -> None:
        while not self._stop.wait(0.1):  # the sensor's own 10 Hz cadence
            if self.mode != "off":
                for key in (ENV_STATE, STATE):
                    self.pubs[key].publish(self._message(key))

    def _message(self, key: str) -> JointState:
        names, values = list(self.names[key]), self.obs[key].astype(float).tolist()
        if key == STATE and self.mode == "wrong_names":
            names[0] = "pusher_q"
        if key == STATE and self.mode == "wrong_count":
            values = values[:-1]
        if key == STATE and self.mode == "nan":
            values[1] = float("nan")
        stamp = time.time() - (1.0 if self.mode == "stale" else 0.0)
        msg = JointState(name=names, position=values)
        msg.header.stamp = s_to_stamp(stamp)
        return msg

    def close(self) -> None:
        self._stop.set()
        self._thread.join(2.0)


class Rig:
    """Policy node + feeder + client in this process, on a private ROS domain."""

    def __init__(self, model: Path, overrides: dict[str, Any] | None = None,
                 loader: Callable[..., Any] = load_predictor) -> None:
        self.context = Context()
        domain = 1 + (os.getpid() + 37 * next(_domains)) % 101
        rclpy.init(context=self.context, domain_id=domain, args=["--ros-args", "--params-file", str(PUSH_YAML)],
                   signal_handler_options=SignalHandlerOptions.NO)
        params = {"model": str(model), "diagnostics_period_s": 0.2, "execution_horizon": 3, **(overrides or {})}
        self.policy = PolicyNode(self.context, loader, [Parameter(k, value=v) for k, v in params.items()])
        self.feeder = Feeder(self.context)
        self._stop = threading.Event()
        self._spinning = []
        for node in (self.policy, self.feeder.node):
            executor = EventsExecutor(context=self.context)
            executor.add_node(node)
            thread = threading.Thread(target=spin, args=(executor, self.context, self._stop), daemon=True)
            thread.start()
            self._spinning.append((executor, thread))
        self.client = self.new_client()

    def new_client(self) -> PolicyClient:
        codec = CommandCodec("float64_multi_array", JointMap.identity(["pusher_vx_cmd", "pusher_vy_cmd"]), 0.02)
        return PolicyClient(self.context, command=codec, command_topic="/policy/command")

    def wait(self, predicate: Callable[[PolicyClient], bool], what: str, timeout_s: float = WAIT_S) -> None:
        assert self.client.wait_for(predicate, timeout_s), f"timed out waiting for {what}; " \
            f"diagnostics: {self.message()!r} {self.client.diagnostic_values()}"

    def message(self) -> str:
        return self.client.diagnostics.message if self.client.diagnostics is not None else ""

    def value(self, key: str) -> int:
        return int(self.client.diagnostic_values().get(key, "0"))

    def start(self) -> None:
        assert self.client.transition("configure"), self.message()
        assert self.client.transition("activate")

    def commands_after(self, n: int, count: int) -> np.ndarray:
        """The next ``count`` commands after the first ``n``."""
        self.wait(lambda c: len(c.commands) >= n + count, f"{count} commands")
        return np.stack([v for _, v in self.client.commands[n:n + count]])

    def close(self) -> None:
        self.feeder.close()
        self.client.close()
        self._stop.set()
        for executor, thread in self._spinning:
            thread.join(5.0)
            executor.shutdown()
        self._spinning.clear()  # a live EventsExecutor keeps the participant (see rosutil)
        self.policy.destroy_node()
        self.feeder.node.destroy_node()
        self.context.try_shutdown()


@pytest.fixture
def rig(tiny_model: Path, request: pytest.FixtureRequest):
    """A :class:`Rig` with the tiny model; ``@pytest.mark.parametrize("rig", [{...}], indirect=True)``
    passes parameter overrides."""
    r = Rig(tiny_model, getattr(request, "param", None))
    yield r
    r.close()


def test_lifecycle_transitions(rig: Rig) -> None:
    c = rig.client
    assert c.state() == "unconfigured"
    assert c.transition("configure") and c.state() == "inactive"
    rig.wait(lambda c: c.diagnostic_values().get("state") == "inactive", "inactive diagnostics")
    assert not c.commands, "an inactive node must not command"
    assert c.transition("activate") and c.state() == "active"
    rig.wait(lambda c: rig.message() == "commanding" and rig.value("chunks") >= 2, "commanding")
    assert len(c.commands) > 0
    assert c.transition("deactivate") and c.state() == "inactive"
    rig.wait(lambda c: c.diagnostic_values().get("state") == "inactive" and not c.commands[-1][1].any(),
             "inactive diagnostics and the hold command deactivate sends")
    n = len(c.commands)
    seen = c.diagnostics_received
    rig.wait(lambda c: c.diagnostics_received >= seen + 3, "three more diagnostics")
    assert len(c.commands) == n, "commands after deactivate"
    assert c.transition("cleanup") and c.state() == "unconfigured"
    assert c.transition("configure") and c.transition("activate")  # a node can be configured again
    rig.wait(lambda c: len(c.commands) > n + 5, "commands after re-activation")


@pytest.mark.parametrize(
    "mode, reason, text",
    [
        ("wrong_names", "wrong_names", "lacks ['pusher_x']"),
        ("wrong_count", "wrong_size", "has 4 names but 3 positions"),
        ("nan", "non_finite_observation", "non_finite_observation"),
        ("stale", "stale_stamp", "stamped 1.0"),
    ],
)
def test_bad_observations_are_rejected_and_commands_stay_safe(rig: Rig, mode: str, reason: str, text: str) -> None:
    rig.feeder.mode = mode
    rig.start()
    rig.wait(lambda c: rig.value(f"rejected.{reason}") >= 3 and rig.value("intervention.no_observation") >= 3,
             f"{reason} rejections")
    assert text in rig.client.diagnostic_values()["rejected.last"]
    assert rig.client.diagnostics.level == b"\x01" and "rejecting observations" in rig.message()  # WARN
    assert np.all(rig.commands_after(0, 10) == 0.0)
    assert rig.client.state() == "active"


def test_sensor_dropout_holds_then_recovers(rig: Rig) -> None:
    rig.start()
    rig.wait(lambda c: rig.message() == "commanding", "commanding")
    rig.feeder.mode = "off"
    rig.wait(lambda c: rig.message() == "holding: stale_observation", "the watchdog to hold")
    n = len(rig.client.commands)
    assert np.all(rig.commands_after(n + 2, 5) == 0.0)  # ramped to zero within the rate limit
    rig.feeder.mode = "ok"
    rig.wait(lambda c: rig.message() == "commanding", "commanding again")
    assert rig.value("intervention.stale_observation") > 0 and rig.client.state() == "active"


class HangingPredictor:
    """Wraps a predictor; its ``hang_at``-th call sleeps ``hang_s`` before answering."""

    def __init__(self, inner: Any, hang_at: int, hang_s: float) -> None:
        self.inner, self.spec = inner, inner.spec
        self.calls, self.hang_at, self.hang_s = 0, hang_at, hang_s

    def predict_chunk(self, obs: dict[str, Any]) -> np.ndarray:
        self.calls += 1
        if self.calls == self.hang_at:
            time.sleep(self.hang_s)
        return self.inner.predict_chunk(obs)


def test_hung_inference_misses_the_deadline_holds_and_recovers(tiny_model: Path) -> None:
    # Two warm-up calls at configure, then live ones: the second live call hangs for 2 s.
    rig = Rig(tiny_model, loader=lambda *a: HangingPredictor(load_predictor(*a), hang_at=4, hang_s=2.0))
    try:
        rig.start()
        rig.wait(lambda c: rig.value("missed_inference_deadlines") >= 1 and rig.message() == "holding: missed_deadline",
                 "a missed inference deadline")
        n = len(rig.client.commands)
        assert np.all(rig.commands_after(n + 2, 5) == 0.0)
        assert rig.client.state() == "active"  # the node stays up while the model hangs
        rig.wait(lambda c: rig.value("stale_chunks") >= 1 and rig.message() == "commanding", "recovery")
        assert rig.value("intervention.missed_deadline") > 0
    finally:
        rig.close()


@pytest.mark.parametrize(
    "rig, expected",
    [
        ({"action.names": ["vx", "vy"]}, ["does not match the parameters of node robopolicy_policy",
                                          "action.names", "'pusher_vx_cmd'", "'vx'"]),
        ({"control_rate_hz": 5.0}, ["control_rate_hz 5 is below the model's 10 fps"]),
    ],
    indirect=["rig"],
)
def test_spec_mismatch_fails_configure_with_both_sides_named(rig: Rig, expected: list[str]) -> None:
    assert not rig.client.transition("configure")
    rig.wait(lambda c: "configure failed" in rig.message(), "the configure error on /diagnostics")
    assert rig.client.diagnostics.level == b"\x02"  # ERROR
    for piece in expected:
        assert piece in rig.message()
    assert rig.client.state() == "unconfigured" and not rig.client.commands


def test_export_folder_runs_on_onnxruntime_and_its_manifest_is_checked(tiny_export: Path) -> None:
    wrong = Rig(tiny_export, {"observation.state.names": ["x", "y", "vx", "vy"]})
    try:
        assert not wrong.client.transition("configure")
        wrong.wait(lambda c: "configure failed" in wrong.message(), "the configure error")
        assert f"model {tiny_export} does not match" in wrong.message() and "'pusher_x'" in wrong.message()
    finally:
        wrong.close()
    right = Rig(tiny_export, {"backend": "onnxruntime"})
    try:
        right.start()
        right.wait(lambda c: right.message() == "commanding" and right.value("chunks") >= 3, "commanding")
    finally:
        right.close()


def test_residual_export_corrects_every_command_before_the_safety_layer(residual_export: Path) -> None:
    rig = Rig(residual_export)
    try:
        rig.start()
        rig.wait(lambda c: rig.message() == "commanding" and rig.value("chunks") >= 3
                 and "recent.correction_ms_p99" in c.diagnostic_values(), "commanding with corrections")
        commands = rig.commands_after(len(rig.client.commands), 10)
        assert np.all(np.abs(commands) <= 1.0)  # the safety layer saw the corrected command: clamped
        assert np.sum(np.all(commands == [1.0, -0.5], axis=1)) >= 8  # (a hold may ramp one or two)
        values = rig.client.diagnostic_values()
        assert rig.value("intervention.clamped") >= 10 and rig.value("correction_errors") == 0
        assert 0.0 < float(values["recent.correction_ms_p99"]) < 20.0
    finally:
        rig.close()


def test_estop_latches_until_reset(rig: Rig) -> None:
    rig.start()
    rig.wait(lambda c: rig.message() == "commanding" and c.estopped is False, "commanding")
    response = rig.client.trigger("estop")
    assert response.success and response.message == "e-stop latched"
    rig.wait(lambda c: c.estopped is True and rig.message().startswith("e-stop latched"), "the latch")
    n = len(rig.client.commands)
    assert np.all(rig.commands_after(n, 10) == 0.0)
    late = rig.new_client()  # a late subscriber still gets the latched state (transient local)
    try:
        assert late.wait_for(lambda c: c.estopped is True, WAIT_S)
    finally:
        late.close()
    assert rig.client.transition("deactivate") and rig.client.transition("activate")
    n = len(rig.client.commands)
    assert np.all(rig.commands_after(n, 10) == 0.0), "re-activation must not clear the e-stop"
    assert rig.value("intervention.estop") >= 20
    assert rig.client.trigger("reset_estop").message == "e-stop cleared"
    rig.wait(lambda c: c.estopped is False and rig.message() == "commanding", "commanding after the reset")


def deploy_params(tmp_path: Path, policy: dict[str, Any] | None = None) -> Path:
    """push.yaml with short episodes (and ``policy`` changes, by dotted parameter name)."""
    doc = yaml.safe_load(PUSH_YAML.read_text())
    doc["robopolicy_sim_bridge"]["ros__parameters"].update(max_episode_steps=15, reset_pause_s=0.6)
    doc["robopolicy_policy"]["ros__parameters"]["execution_horizon"] = 3  # of the tiny model's Ta = 4
    for name, value in (policy or {}).items():
        *parents, leaf = name.split(".")
        section = doc["robopolicy_policy"]["ros__parameters"]
        for key in parents:
            section = section.setdefault(key, {})
        section[leaf] = value
    path = tmp_path / "params.yaml"
    path.write_text(yaml.safe_dump(doc))
    return path


def test_deploy_closed_loop_with_the_sim_bridge(tiny_model: Path, tmp_path: Path) -> None:
    report = deploy(tiny_model, deploy_params(tmp_path), sim="push", episodes=2, out=tmp_path / "run",
                    progress=False)
    assert [e["episode"] for e in report.episodes] == sorted(e["episode"] for e in report.episodes)
    assert len(report.episodes) == 2 and all(e["length"] <= 15 for e in report.episodes)
    t = report.timing
    assert t.cycles > 50 and t.chunks > 5 and t.obs_to_command_ms.n > 10
    assert 15.0 < t.period_ms_mean < 25.0  # 50 Hz
    assert (tmp_path / "run" / "latency.png").stat().st_size > 0
    assert "obs-to-command" in report.table() and (tmp_path / "run" / "deploy.json").is_file()


def test_deploy_reports_a_configure_failure(tiny_model: Path, tmp_path: Path) -> None:
    params = deploy_params(tmp_path, {"action.names": ["vx", "vy"]})
    with pytest.raises(RobopolicyError, match=r"did not configure: configure failed: model .* does not match"):
        deploy(tiny_model, params, sim="push", episodes=1, out=tmp_path / "run", progress=False)
