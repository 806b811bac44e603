"""The policy node's plain-Python parts: chunk schedule, control clock, observation history,
parameter validation against the feature spec, parameter files, message conversion.
No DDS here (the ROS 2 message types are plain Python objects)."""

from __future__ import annotations

import time
from pathlib import Path

import numpy as np
import pytest
from sensor_msgs.msg import JointState

from robopolicy.errors import RobopolicyError, SpecMismatchError
from robopolicy.real import messages
from robopolicy.real.config import POLICY_PARAMS, PolicyNodeConfig
from robopolicy.real.messages import (
    CommandCodec, JointMap, JointStateReader, MessageError, array_to_image, image_to_array,
)
from robopolicy.real.nodes import POLICY, SAFE_DOMAIN_IDS, SIM_BRIDGE, check_params_file, pick_domain_id
from robopolicy.real.controller import PolicyController
from robopolicy.real.observations import (
    FUTURE_OUTLIER, FUTURE_STAMP, NON_FINITE_OBSERVATION, OUT_OF_ORDER, STALE_STAMP, ObservationBuffer,
)
from robopolicy.real.safety import CLAMPED, NON_FINITE_ACTION, STALE_OBSERVATION, EStop, SafetyLimits
from robopolicy.real.control_loop import ControlClock, ControlLoop, Inbox
from robopolicy.real.schedule import ActionSchedule, Chunk
from robopolicy.spec import ACTION, ENV_STATE, STATE, Feature, FeatureSpec, Stats

CONFIG = Path(__file__).resolve().parent.parent / "real" / "config"
STATE_NAMES = ["pusher_x", "pusher_y", "pusher_vx", "pusher_vy"]
ENV_NAMES = ["red_block.dx", "red_block.dy", "red_block.cos_yaw", "red_block.sin_yaw", "goal.dx", "goal.dy"]
ACTION_NAMES = ["pusher_vx_cmd", "pusher_vy_cmd"]


# ---- schedule -------------------------------------------------------------------------------
def chunk(start: float, values: list[float], horizon: int = 3, fps: float = 10.0) -> Chunk:
    return Chunk(start, np.array(values, dtype=float)[:, None], fps, horizon)


def test_chunk_actions_are_timestamped_and_stale_ones_dropped() -> None:
    s = ActionSchedule(blend_s=0.0)
    assert s.action(0.0) is None and s.plan_end is None
    c = chunk(10.0, [0, 1, 2, 3])
    assert s.install(c, now=10.15) == 1  # action 0 (slot [10.0, 10.1)) already passed
    assert s.action(10.15)[0] == 1 and s.action(10.25)[0] == 2
    assert s.plan_switch == pytest.approx(10.3)  # the next chunk is due after 3 actions ...
    assert s.action(10.35)[0] == 3  # ... if it is late, the reserve action covers
    assert s.plan_end == pytest.approx(10.4) and s.action(10.4) is None  # then the plan is exhausted
    assert s.install(chunk(9.0, [5, 5, 5, 5]), now=10.4) == 4  # entirely in the past: not installed
    assert s.current is c


def test_seams_cross_fade_linearly_from_the_old_chunk() -> None:
    s = ActionSchedule(blend_s=0.1)
    s.install(chunk(0.0, [0, 0, 0, 0]), now=0.0)
    s.install(chunk(0.2, [1, 1, 1, 1]), now=0.25)
    assert s.action(0.25)[0] == pytest.approx(0.0)
    assert s.action(0.30)[0] == pytest.approx(0.5)
    assert s.action(0.35)[0] == pytest.approx(1.0)
    # The old chunk ends (its reserve too) before the blend would: the new one takes over.
    s.install(chunk(0.4, [2, 2, 2, 2]), now=0.45)
    s.install(chunk(0.9, [3, 3, 3, 3]), now=0.95)
    assert s.action(0.95)[0] == 3.0


def test_control_clock_runs_cycles_at_observation_arrival_and_waits_for_a_due_one() -> None:
    clock = ControlClock(period_s=0.02, sync=True)
    assert clock.next_cycle() == -np.inf  # the first cycle runs at once
    assert clock.on_observation(0.0)  # an observation runs a cycle at once
    clock.ran(0.0)
    for k in range(1, 5):  # periodic cycles between observations, counted from the last one
        assert clock.next_cycle() == pytest.approx(0.02 * k)
        clock.ran(0.02 * k)
    assert clock.on_observation(0.1)
    clock.ran(0.1)
    assert clock.next_cycle() == pytest.approx(0.12)  # re-timed from the observation's cycle
    assert clock.observation_period() == pytest.approx(0.1)
    clock.ran(0.18)
    # The next observation is due at 0.2, with the periodic cycle: wait for it, at most a guard.
    assert clock.next_cycle() == pytest.approx(0.2 + clock.guard)
    assert clock.on_observation(0.2005)  # it arrives and runs the cycle


def test_control_clock_leaves_fast_sensors_to_the_period() -> None:
    clock = ControlClock(period_s=0.02, sync=True)
    for k in range(20):  # 500 Hz joint states
        clock.on_observation(0.002 * k)
    assert not clock.on_observation(0.04)
    clock.ran(0.041)
    assert clock.next_cycle() == pytest.approx(0.061)


def test_control_clock_without_sync_is_periodic() -> None:
    clock = ControlClock(period_s=0.02, sync=False)
    assert not clock.on_observation(0.0)
    clock.ran(0.0)
    assert not clock.on_observation(0.019) and clock.next_cycle() == pytest.approx(0.02)
    with pytest.raises(RobopolicyError):
        ControlClock(0.0, True)


def test_control_loop_runs_cycles_in_its_own_thread_and_observations_run_one_at_once() -> None:
    times: list[float] = []
    loop = ControlLoop(0.02, True, lambda: times.append(time.perf_counter()), log=print)
    loop.start()
    try:
        time.sleep(0.11)
        n = len(times)
        assert 5 <= n <= 7  # 50 Hz
        arrival = time.perf_counter()
        loop.observed(arrival)
        time.sleep(0.005)
        assert len(times) == n + 1 and times[-1] - arrival < 0.004  # within a few ms of the arrival
    finally:
        assert loop.stop()
    count = len(times)
    time.sleep(0.05)
    assert len(times) == count  # stopped


def test_inbox_coalesces_a_flood_to_the_newest_message_per_topic() -> None:
    inbox = Inbox()
    for k in range(1000):
        inbox.put(STATE, k, arrival=float(k))
    inbox.put(ENV_STATE, "env", arrival=2000.0)
    assert inbox.take() == {STATE: (999, 999.0), ENV_STATE: ("env", 2000.0)}
    assert inbox.coalesced == 999 and inbox.take() == {}


# ---- observation history ---------------------------------------------------------------------
def test_history_is_sampled_at_the_policy_fps_from_faster_topics() -> None:
    buf = ObservationBuffer([STATE, ENV_STATE], n_obs_steps=2, fps=10.0, staleness_s=0.5, future_tolerance_s=0.05)
    assert buf.frame("t") is None
    for k in range(50):  # state at 100 Hz, environment state at 10 Hz
        t = 100.0 + 0.01 * k
        assert buf.add(STATE, t, np.array([t], dtype=np.float32), now=t, arrival=k) is None
        if k % 10 == 0:
            buf.add(ENV_STATE, t, np.array([t], dtype=np.float32), now=t, arrival=k)
    frame = buf.frame("push")
    assert frame.stamp == pytest.approx(100.4) and frame.obs["task"] == ["push"]
    assert frame.obs[STATE].shape == (1, 2, 1)
    np.testing.assert_allclose(frame.obs[STATE][0, :, 0], [100.3, 100.4], atol=1e-4)
    np.testing.assert_allclose(frame.obs[ENV_STATE][0, :, 0], [100.3, 100.4], atol=1e-4)
    assert buf.newest == (49, pytest.approx(100.49))


def test_history_pads_with_the_oldest_sample_and_rejects_bad_samples() -> None:
    buf = ObservationBuffer([STATE], n_obs_steps=3, fps=10.0, staleness_s=0.2, future_tolerance_s=0.05)
    one = np.array([1.0], dtype=np.float32)
    assert buf.add(STATE, 5.0, one, now=5.0, arrival=0) is None
    np.testing.assert_allclose(buf.frame("").obs[STATE][0, :, 0], [1.0, 1.0, 1.0])
    stale = buf.add(STATE, 4.0, one, now=5.0, arrival=1)
    assert stale.reason == STALE_STAMP and "stamped 1.000 s ago, beyond the 0.2 s" in stale.detail
    future = buf.add(STATE, 5.1, one, now=5.0, arrival=1)
    assert future.reason == FUTURE_STAMP and "0.100 s in the future" in future.detail
    assert buf.add(STATE, 5.01, np.array([np.nan], dtype=np.float32), now=5.01, arrival=1).reason \
        == NON_FINITE_OBSERVATION
    back = buf.add(STATE, 4.95, one, now=5.0, arrival=1)
    assert back.reason == OUT_OF_ORDER and "0.050 s before the previous sample" in back.detail
    assert dict(buf.rejected) == {STALE_STAMP: 1, FUTURE_STAMP: 1, NON_FINITE_OBSERVATION: 1, OUT_OF_ORDER: 1}
    assert buf.observation_time() == 5.0


def test_a_future_stamped_outlier_neither_blinds_the_stream_nor_looks_fresh() -> None:
    buf = ObservationBuffer([STATE], n_obs_steps=2, fps=10.0, staleness_s=0.25, future_tolerance_s=0.05)
    value = np.zeros(1, dtype=np.float32)
    assert buf.add(STATE, 10.0, value, now=10.0, arrival=0) is None
    assert buf.add(STATE, 10.14, value + 1, now=10.1, arrival=1) is None  # 40 ms ahead: within the skew tolerance
    # While nothing else arrives, it is fresh from its arrival (10.1), not from its stamp (10.14).
    assert buf.observation_time() == pytest.approx(10.1)
    # The next real sample is stamped before it, but the outlier is still ahead of the clock:
    # the outlier goes, the real sample stays; the stream is not blinded.
    dropped = buf.add(STATE, 10.11, value + 2, now=10.11, arrival=2)
    assert dropped.kept and dropped.reason == FUTURE_OUTLIER and "ahead of the clock" in dropped.detail
    assert buf.latest()[STATE][0] == 2.0 and buf.observation_time() == pytest.approx(10.11)
    assert buf.add(STATE, 10.12, value + 3, now=10.12, arrival=3) is None


# ---- the per-step correction in the control cycle ----------------------------------------------
class CorrectingPredictor:
    """Constant chunks of 0.2 and a scripted ``correct_action`` that records what it was given."""

    def __init__(self, spec: FeatureSpec) -> None:
        self.spec = spec
        self.correction = lambda action: action + 5.0  # far beyond the command limits
        self.seen: list[tuple[dict[str, np.ndarray], np.ndarray]] = []

    def predict_chunk(self, obs: dict[str, np.ndarray]) -> np.ndarray:
        return np.full((1, self.spec.n_action_steps, self.spec.action.dim), 0.2, np.float32)

    def correct_action(self, obs: dict[str, np.ndarray], action: np.ndarray) -> np.ndarray:
        self.seen.append((obs, action))
        return self.correction(action)


def test_the_correction_applies_to_the_scheduled_action_before_the_safety_layer() -> None:
    predictor, logs = CorrectingPredictor(push_spec()), []
    limits = SafetyLimits(np.array([-1.0, -1.0]), np.array([1.0, 1.0]), np.full(2, np.inf), np.full(2, np.inf))
    ctrl = PolicyController(predictor, [ENV_STATE, STATE], horizon=6, blend_s=0.0, staleness_s=0.5, limits=limits,
                            estop=EStop(), task="push", clock=lambda: 100.0, log=logs.append, period_s=0.02)
    assert ctrl.corrects
    ctrl.warm_up()
    assert len(predictor.seen) == 2  # warmed up (and checked) at configure, like the chunk inference
    state = np.arange(4, dtype=np.float32)
    ctrl.observe(ENV_STATE, 99.98, np.ones(6, np.float32), arrival=0.0)
    ctrl.observe(STATE, 99.98, state, arrival=0.0)
    ctrl.observe(STATE, 100.0, state + 1, arrival=0.1)
    ctrl.schedule.install(Chunk(100.0, np.full((8, 2), 0.2), 10.0, 6), now=100.0)

    cycle = ctrl.cycle(100.01)  # the correction pushes the command beyond the limits: clamped
    assert cycle.decision.command.tolist() == [1.0, 1.0] and cycle.decision.reasons == (CLAMPED,)
    obs, planned = predictor.seen[-1]
    np.testing.assert_array_equal(obs[STATE], state + 1)  # the newest observation
    assert set(obs) == {STATE, ENV_STATE} and planned.dtype == np.float32 and np.allclose(planned, 0.2)
    assert cycle.correction_ms > 0

    predictor.correction = lambda action: np.full_like(action, np.nan)
    assert ctrl.cycle(100.02).decision.reasons == (NON_FINITE_ACTION,)  # hold (zero)
    predictor.correction = lambda action: 1 / 0
    decision = ctrl.cycle(100.03).decision
    assert decision.reasons == (NON_FINITE_ACTION,) and decision.command.tolist() == [0.0, 0.0]
    assert ctrl.correction_errors == 1 and "correction failed: division by zero" in ctrl.last_error and logs
    predictor.correction = lambda action: action[:1]  # wrong shape: held, never reshaped
    assert ctrl.cycle(100.04).decision.reasons == (NON_FINITE_ACTION,) and ctrl.correction_errors == 2
    assert ctrl.safety.counts[NON_FINITE_ACTION] == 3

    calls = len(predictor.seen)
    cycle = ctrl.cycle(101.0)  # stale observation: the watchdog holds, nothing is corrected
    assert cycle.decision.reasons == (STALE_OBSERVATION,) and len(predictor.seen) == calls
    assert np.isnan(cycle.correction_ms)


# ---- parameters vs the model -------------------------------------------------------------------
def push_spec(**timing: int) -> FeatureSpec:
    def feat(key: str, names: list[str], lo: float = -1.0, hi: float = 1.0) -> Feature:
        d = len(names)
        return Feature(key, (d,), names=names, stats=Stats([lo] * d, [hi] * d, [0.0] * d, [1.0] * d))

    return FeatureSpec({STATE: feat(STATE, STATE_NAMES), ENV_STATE: feat(ENV_STATE, ENV_NAMES),
                        ACTION: feat(ACTION, ACTION_NAMES, -0.9, 0.9)}, fps=10.0, n_obs_steps=2, horizon=16,
                       n_action_steps=8, tasks=["push the red block to the goal"])


def push_params(**changes: object) -> dict[str, object]:
    values: dict[str, object] = {p.name: p.default for p in POLICY_PARAMS}
    values.update({
        "model": "/models/push", "observation.environment_state.topic": "/object_state",
        "observation.state.names": STATE_NAMES, "observation.environment_state.names": ENV_NAMES,
        "action.names": ACTION_NAMES, "action.lower": [-1.0, -1.0], "action.upper": [1.0, 1.0],
        "action.max_delta": [0.5, 0.5], "action.max_rate": [25.0, 25.0],
    })
    values.update(changes)
    return values


def test_matching_parameters_pass_and_map_onto_the_spec() -> None:
    cfg = PolicyNodeConfig.from_params(push_params())
    cfg.check_spec(push_spec(), "model M", "params P")
    assert cfg.observation_keys == [ENV_STATE, STATE] and cfg.horizon(push_spec()) == 8
    assert cfg.default_task(push_spec()) == "push the red block to the goal"


@pytest.mark.parametrize(
    "changes, expected",
    [
        ({"action.names": ["vx", "vy"]}, ["action.names", "pusher_vx_cmd", "vx", "missing"]),
        ({"observation.state.names": STATE_NAMES[::-1]}, ["another order"]),
        ({"observation.state.names": STATE_NAMES[:3]}, ["observation.state.names", "missing ['pusher_vy']"]),
        ({"observation.environment_state.topic": "", "observation.environment_state.names": []},
         ["needs observation.environment_state [6]"]),
        ({"observation.images.cameras": ["top"], "observation.images.topics": ["/top"]},
         ["subscribe observation.images.top", "no such feature"]),
        ({"action.lower": [-0.5, -1.0]}, ["'pusher_vx_cmd' was trained on [-0.9, 0.9]", "limits are [-0.5, 1]"]),
        ({"control_rate_hz": 5.0}, ["control_rate_hz 5 is below the model's 10 fps"]),
        ({"execution_horizon": 9}, ["execution_horizon 9 exceeds", "8 actions"]),
    ],
)
def test_mismatches_name_both_sides(changes: dict[str, object], expected: list[str]) -> None:
    cfg = PolicyNodeConfig.from_params(push_params(**changes))
    with pytest.raises(SpecMismatchError) as err:
        cfg.check_spec(push_spec(), "model /models/push", "parameters push.yaml")
    text = str(err.value)
    assert text.startswith("model /models/push does not match parameters push.yaml: ")
    for piece in expected:
        assert piece in text


@pytest.mark.parametrize(
    "changes, expected",
    [
        ({"model": ""}, "model is empty"),
        ({"action.max_delta": [0.5]}, "one value per action dimension"),
        ({"action.hold": ["brake"]}, "'last' or 'zero'"),
        ({"action.message_type": "twist"}, "action.message_type is 'twist'"),
        ({"control_rate_hz": 0.0}, "control_rate_hz is 0.0"),
        ({"observation.images.cameras": ["top"]}, "observation.images.topics has 0"),
        ({"observation.environment_state.topic": ""}, "environment_state.names is set but"),
        ({"action.max_rate": []}, "max_rate has 0"),
        ({"action.max_rate": [25.0, 0.0]}, "max_rate must be > 0"),
        ({"action.measured": ["pusher_x", "bogus"], "action.hold": ["last"]}, "action.measured names ['bogus']"),
        ({"action.measured": ["pusher_x"]}, "action.measured has 1 entries"),
        ({"action.measured": ["pusher_x", ""]}, "position dimensions [0] must hold 'last'"),
        ({"observation.state.ros_scale": [0.0]}, "observation.state.ros_scale must not be 0"),
        ({"observation.state.ros_scale": [1.0, 2.0]}, "ros_scale needs one finite value, or one per dimension (4)"),
        ({"action.ros_names": ["a"]}, "action.ros_names has 1 entries but action.names has 2"),
        ({"action.ros_names": ["a", "a"]}, "must be distinct"),
    ],
)
def test_invalid_parameters_are_refused(changes: dict[str, object], expected: str) -> None:
    with pytest.raises(RobopolicyError, match="invalid policy node parameters") as err:
        PolicyNodeConfig.from_params(push_params(**changes))
    assert expected in str(err.value)


def test_joint_map_turns_robot_names_and_units_into_the_models() -> None:
    """An SO-100-style arm: the model knows degrees and 0-100, the ros2_control driver radians and metres."""
    deg = 180.0 / np.pi
    cfg = PolicyNodeConfig.from_params(push_params(**{
        "observation.state.ros_names": ["shoulder_pan", "shoulder_lift", "elbow_flex", "gripper"],
        "observation.state.ros_scale": [1 / deg, 1 / deg, 1 / deg, 0.0004],
        "action.ros_names": ["shoulder_pan", "gripper"], "action.ros_scale": [1 / deg, 0.0004],
        "action.ros_offset": [0.0, 0.001],
        "action.measured": ["pusher_x", ""], "action.hold": ["last", "zero"],
    }))
    cfg.check_spec(push_spec(), "model M", "params P")  # the model's own names are still checked
    state = next(f for f in cfg.low_dim if f.key == STATE)
    reader = JointStateReader("/joint_states", state.joints)
    msg = JointState(name=["gripper", "elbow_flex", "shoulder_lift", "shoulder_pan", "wrist_roll"],
                     position=[0.02, np.pi / 2, -np.pi / 4, np.pi, 0.3])
    np.testing.assert_allclose(reader.read(msg), [180.0, -45.0, 90.0, 50.0], rtol=1e-6)
    codec = CommandCodec("joint_trajectory", cfg.action_joints, 0.02)
    command = codec.encode(np.array([90.0, 50.0]), messages.s_to_stamp(1.0))
    assert command.joint_names == ["shoulder_pan", "gripper"]
    np.testing.assert_allclose(command.points[0].positions, [np.pi / 2, 0.021])
    np.testing.assert_allclose(codec.decode(command, "/cmd"), [90.0, 50.0], rtol=1e-6)
    assert cfg.measured_index == (0, -1) and cfg.limits.position == (True, False)


# ---- parameter files ---------------------------------------------------------------------------
@pytest.mark.parametrize("name", ["push.yaml", "panda.yaml", "multitask.yaml", "so100.yaml"])
def test_shipped_parameter_files_are_valid(name: str) -> None:
    applied = check_params_file(CONFIG / name)
    assert applied[POLICY.name]["observation.state.topic"] == "/joint_states"
    assert applied[SIM_BRIDGE.name]["action.topic"] == applied[POLICY.name]["action.topic"]
    assert "control_rate_hz" not in applied[SIM_BRIDGE.name]
    PolicyNodeConfig.from_params({**applied[POLICY.name], "model": "/a/model"})  # and valid together


def test_parameter_file_errors_name_file_section_and_parameter(tmp_path: Path) -> None:
    bad = tmp_path / "bad.yaml"
    bad.write_text("robopolicy_policy:\n  ros__parameters:\n    control_rate: 50.0\n    blend_s: 1\n"
                   "other_node:\n  ros__parameters: {}\n")
    with pytest.raises(RobopolicyError) as err:
        check_params_file(bad)
    text = str(err.value)
    assert str(bad) in text and "unknown parameter 'control_rate'" in text
    assert "blend_s = 1 must be a double (write 50.0, not 50)" in text and "'other_node' matches no node" in text


# ---- messages -----------------------------------------------------------------------------------
def test_joint_state_mapping_by_name() -> None:
    reader = JointStateReader("/joint_states", JointMap.identity(["b", "a"]))
    msg = JointState(name=["a", "b", "extra"], position=[1.0, 2.0, 3.0])
    np.testing.assert_allclose(reader.read(msg), [2.0, 1.0])
    with pytest.raises(MessageError, match=r"lacks \['b'\]") as err:
        reader.read(JointState(name=["a"], position=[1.0]))
    assert err.value.reason == messages.WRONG_NAMES
    with pytest.raises(MessageError, match="2 names but 1 positions"):
        reader.read(JointState(name=["a", "b"], position=[1.0]))


def test_images_round_trip_and_are_checked() -> None:
    img = np.random.default_rng(0).integers(0, 256, (6, 5, 3), dtype=np.uint8)
    msg = array_to_image(img, messages.s_to_stamp(1.5))
    np.testing.assert_array_equal(image_to_array(msg, "/cam", (6, 5, 3)), img)
    msg.encoding = "bgr8"
    np.testing.assert_array_equal(image_to_array(msg, "/cam", (6, 5, 3)), img[..., ::-1])
    with pytest.raises(MessageError, match="is 6x5; the policy needs 8x8"):
        image_to_array(msg, "/cam", (8, 8, 3))
    msg.encoding = "mono8"
    with pytest.raises(MessageError, match="encoding 'mono8'"):
        image_to_array(msg, "/cam", (6, 5, 3))


@pytest.mark.parametrize("kind", messages.COMMAND_TYPES)
def test_commands_round_trip(kind: str) -> None:
    codec = CommandCodec(kind, JointMap.identity(["x", "y"]), period_s=0.02)
    msg = codec.encode(np.array([0.25, -0.5]), messages.s_to_stamp(3.0))
    np.testing.assert_allclose(codec.decode(msg, "/cmd"), [0.25, -0.5])
    assert messages.stamp_to_s(messages.s_to_stamp(1234.000001)) == pytest.approx(1234.000001, abs=1e-9)


def test_domain_id_on_a_robot_is_the_environments_or_ros_default(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("ROS_DOMAIN_ID", raising=False)
    assert pick_domain_id(robot=True) == 0  # where the robot's driver is
    assert pick_domain_id(robot=False) in SAFE_DOMAIN_IDS  # a private sim
    assert pick_domain_id(7, robot=True) == 7
    monkeypatch.setenv("ROS_DOMAIN_ID", "42")
    assert pick_domain_id(robot=True) == pick_domain_id(robot=False) == 42
    monkeypatch.setenv("ROS_DOMAIN_ID", "robot")
    with pytest.raises(RobopolicyError, match="ROS_DOMAIN_ID='robot' is not a domain id"):
        pick_domain_id(robot=True)
