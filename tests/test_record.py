"""``robopolicy record``: a ROS 2 recorder node over real DDS (rclpy, Fast DDS on localhost).

The round trip: the sim bridge (a child process, as ``deploy`` starts it) plays the robot on
the push task and, with ``expert_commands``, publishes its scripted expert's action on the
command topic each step (a stand-in teleoperator); ``record`` (in this process, in a thread)
writes the dataset, episodes started and saved through its Trigger services; the dataset is
compared with ``robopolicy collect`` from the same seeds. The bad-input tests use a small
in-process publisher instead of the bridge; Ctrl-C runs ``robopolicy record`` as a subprocess.
"""

from __future__ import annotations

import itertools
import json
import os
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path
from typing import Any, Callable

import numpy as np
import pytest
import rclpy
import yaml
from lerobot.datasets.lerobot_dataset import LeRobotDataset
from rclpy.context import Context
from rclpy.experimental import EventsExecutor
from rclpy.node import Node
from rclpy.signals import SignalHandlerOptions
from sensor_msgs.msg import JointState
from std_msgs.msg import Float64MultiArray, String
from std_srvs.srv import Trigger

from robopolicy.data.collect import CollectConfig, collect
from robopolicy.errors import RobopolicyError
from robopolicy.real.nodes import SIM_BRIDGE, ros_environment
from robopolicy.real.record import RECORDER_NODE, RecordConfig, RecordResult, record
from robopolicy.real.rosutil import RECORD_QOS, spin, stream_qos
from robopolicy.spec import ACTION, ENV_STATE, STATE

pytestmark = pytest.mark.ros

ROOT = Path(__file__).resolve().parent.parent
PUSH_YAML = ROOT / "real" / "config" / "push.yaml"
STATE_NAMES = ["pusher_x", "pusher_y", "pusher_vx", "pusher_vy"]
ENV_NAMES = ["red_block.dx", "red_block.dy", "red_block.cos_yaw", "red_block.sin_yaw", "goal.dx", "goal.dy"]
#: Bridge episodes in the round trip: short (30 steps = 3 s at the push env's 10 fps).
STEPS = 30
WAIT_S = 30.0
_domains = itertools.count()


def _domain() -> int:
    """A domain of its own per test (the suite runs on $ROS_DOMAIN_ID in a private namespace)."""
    base = int(os.environ.get("ROS_DOMAIN_ID", "150"))
    return 101 + (base + 7 * (1 + next(_domains))) % 100


def _load(path: Path) -> LeRobotDataset:
    return LeRobotDataset(f"local/{path.name}", root=path, video_backend="pyav")


def _episodes(path: Path) -> dict[int, dict[str, np.ndarray]]:
    """Per episode: state, environment_state and action arrays, in frame order."""
    ds = _load(path)
    cols = ds.hf_dataset.with_format("numpy")
    ep = np.asarray(cols["episode_index"])
    out = {}
    for e in np.unique(ep):
        rows = np.flatnonzero(ep == e)
        out[int(e)] = {k: np.stack([np.asarray(cols[int(i)][k]) for i in rows]) for k in (STATE, ENV_STATE, ACTION)}
    return out


class Helper:
    """A node in its own context and executor thread: Trigger clients, a result subscriber, and an
    optional fake robot publishing the push topics (joint names and topics configurable)."""

    def __init__(self, domain: int, publish: dict[str, list[str]] | None = None, rate_hz: float = 20.0) -> None:
        self.context = Context()
        rclpy.init(context=self.context, domain_id=domain, signal_handler_options=SignalHandlerOptions.NO)
        self.node = Node("record_test_helper", context=self.context)
        self.results: list[dict[str, Any]] = []
        self.node.create_subscription(String, "/sim/episode_result",
                                      lambda m: self.results.append(json.loads(m.data)), RECORD_QOS)
        self.clients: dict[str, Any] = {}
        self.publish = publish or {}
        qos = stream_qos(1, "reliable")
        self.pubs = {t: self.node.create_publisher(Float64MultiArray if t == "/policy/command" else JointState, t, qos)
                     for t in self.publish}
        self.k = 0
        if self.publish:
            self.node.create_timer(1.0 / rate_hz, self._tick)
        self.executor = EventsExecutor(context=self.context)
        self.executor.add_node(self.node)
        self.stop = threading.Event()
        self.thread = threading.Thread(target=spin, args=(self.executor, self.context, self.stop), daemon=True)
        self.thread.start()

    def _tick(self) -> None:
        self.k += 1
        now = self.node.get_clock().now().to_msg()
        for topic, names in self.publish.items():
            values = [0.01 * self.k + i for i in range(len(names))]
            if topic == "/policy/command":
                self.pubs[topic].publish(Float64MultiArray(data=values))
            else:
                msg = JointState(name=list(names), position=values)
                msg.header.stamp = now
                self.pubs[topic].publish(msg)

    def call(self, service: str, timeout_s: float = WAIT_S) -> Trigger.Response:
        if service not in self.clients:
            self.clients[service] = self.node.create_client(Trigger, service)
        client = self.clients[service]
        assert client.wait_for_service(timeout_sec=timeout_s), f"service {service} did not come up"
        future = client.call_async(Trigger.Request())
        deadline = time.monotonic() + timeout_s
        while not future.done():
            assert time.monotonic() < deadline, f"{service} did not answer within {timeout_s} s"
            time.sleep(0.01)
        return future.result()

    def recorder(self, name: str) -> Trigger.Response:
        return self.call(f"/{RECORDER_NODE}/{name}")

    def wait(self, predicate: Callable[[], bool], what: str, timeout_s: float = WAIT_S) -> None:
        deadline = time.monotonic() + timeout_s
        while not predicate():
            assert time.monotonic() < deadline, f"timed out waiting for {what}"
            time.sleep(0.02)

    def close(self) -> None:
        self.stop.set()
        self.thread.join(5.0)
        self.executor.shutdown()
        self.node.destroy_node()
        self.context.try_shutdown()


class RecorderThread:
    """``record()`` in a thread (as ``robopolicy record`` runs it, minus signals)."""

    def __init__(self, cfg: RecordConfig) -> None:
        self.stop, self.lines = threading.Event(), []
        self.result: RecordResult | None = None
        self.error: BaseException | None = None
        self.thread = threading.Thread(target=self._run, args=(cfg,), daemon=True)
        self.thread.start()

    def _run(self, cfg: RecordConfig) -> None:
        try:
            self.result = record(cfg, self.stop, self.lines.append)
        except BaseException as e:  # noqa: BLE001  (handed to the test)
            self.error = e

    def finish(self, timeout_s: float = WAIT_S) -> RecordResult:
        self.stop.set()
        self.thread.join(timeout_s)
        assert not self.thread.is_alive(), "record() did not stop"
        if self.error is not None:
            raise self.error
        assert self.result is not None
        return self.result


def _params(tmp_path: Path, bridge: dict[str, Any] | None = None, shared: dict[str, Any] | None = None,
            policy: dict[str, Any] | None = None) -> Path:
    doc = yaml.safe_load(PUSH_YAML.read_text())
    doc["robopolicy_sim_bridge"]["ros__parameters"].update(bridge or {})
    doc["/**"]["ros__parameters"].update(shared or {})
    doc["robopolicy_policy"]["ros__parameters"].update(policy or {})
    path = tmp_path / "robot.yaml"
    path.write_text(yaml.safe_dump(doc))
    return path


def _cfg(params: Path, out: Path, domain: int, **kw: Any) -> RecordConfig:
    return RecordConfig(params=params, out=out, domain_id=domain, keyboard=False, progress=False, **kw)


def _record_with_bridge(tmp_path: Path, episodes: int, check_services: bool = False
                        ) -> tuple[RecordResult, list[int], list[str], Path]:
    """The bridge (expert as teleoperator) and ``record()``: ``episodes`` bridge episodes recorded,
    each started after a bridge reset and saved once the bridge reports its end. Returns the
    result, the bridge seeds of the episodes, the recorder's log lines and the params file."""
    domain = _domain()
    params = _params(tmp_path, bridge={"expert_commands": True, "max_episode_steps": STEPS, "reset_pause_s": 0.5,
                                       "seed": 0})
    log = open(tmp_path / "bridge.log", "wb")
    bridge = subprocess.Popen(SIM_BRIDGE.command([params]), env=ros_environment(domain), stdout=log,
                              stderr=subprocess.STDOUT, start_new_session=True)
    helper = Helper(domain)
    rec = RecorderThread(_cfg(params, tmp_path / "rec", domain, topic_timeout_s=WAIT_S))
    try:
        if check_services:
            assert not helper.recorder("save_episode").success  # nothing under way
            assert helper.recorder("start_episode").success
            assert not helper.recorder("start_episode").success  # already under way
            time.sleep(0.5)
            r = helper.recorder("discard_episode")
            assert r.success and "discarded" in r.message
            assert not helper.recorder("discard_episode").success
        seeds = []
        for _ in range(episodes):
            # reset the bridge first (its pause publishes the new scene, no commands), then start
            episode = json.loads(helper.call(f"/{SIM_BRIDGE.name}/reset").message)["episode"]
            assert helper.recorder("start_episode").success
            helper.wait(lambda: any(e["episode"] == episode for e in helper.results), f"bridge episode {episode}")
            r = helper.recorder("save_episode")
            assert r.success, r.message
            seeds.append(episode)  # bridge seed 0 + episode index
        result = rec.finish()
    finally:
        rec.stop.set()
        helper.close()
        bridge.send_signal(signal.SIGINT)
        try:
            bridge.wait(10)
        except subprocess.TimeoutExpired:
            bridge.kill()
        log.close()
    return result, seeds, rec.lines, params


def test_round_trip_sim_bridge_expert_matches_collect(tmp_path: Path) -> None:
    """Bridge + expert as teleoperator -> record (services) -> dataset == collect's, up to timing."""
    result, seeds, lines, _ = _record_with_bridge(tmp_path, 2, check_services=True)
    assert [e.index for e in result.saved] == [0, 1] and result.discarded == 1 and not result.discarded_at_exit
    assert result.total_episodes == 2
    assert sum("msgs" in line for line in lines) == 2 * 3  # per-topic report at each save

    # collect from the same seeds: collect's seed i is i (seed 0, a fresh dataset), keep failures
    collect(CollectConfig(env="push", episodes=max(seeds) + 1, out=tmp_path / "collect", keep_failures=True,
                          commit_every_s=0))
    recorded, collected = _episodes(tmp_path / "rec"), _episodes(tmp_path / "collect")
    figures = []
    for e, seed in enumerate(seeds):
        rec_ep, col_ep = recorded[e], collected[seed]
        n = min(len(rec_ep[ACTION]), len(col_ep[ACTION]))
        # the bridge truncates at STEPS: collect's first STEPS frames are the same trajectory
        assert abs(len(rec_ep[ACTION]) - min(STEPS, len(col_ep[ACTION]))) <= 2, (len(rec_ep[ACTION]), seed)
        diffs = {k: float(np.abs(rec_ep[k][:n] - col_ep[k][:n]).max()) for k in (STATE, ENV_STATE, ACTION)}
        # The env's trajectory is collect's (same seed, same expert, each action applied at the next
        # tick), so frames are exact unless sampling slips: frames sit half a period (50 ms) after
        # each command, so only a bridge tick late by more than that (this VM stalls 5-15 ms) makes a
        # frame hold the previous sample. Allowed: one step off, at most 20 % of the frames.
        exact = 0
        for i in range(n):
            near = [j for j in (i, i - 1, i + 1) if 0 <= j < len(col_ep[ACTION])
                    and all(np.allclose(rec_ep[k][i], col_ep[k][j], atol=1e-5) for k in (STATE, ENV_STATE, ACTION))]
            assert near, f"episode {e} frame {i} matches no collect frame within one step"
            exact += near[0] == i
        figures.append(f"seed {seed}: frames {len(rec_ep[ACTION])} recorded vs {len(col_ep[ACTION])} collected; "
                       f"exact-index frames {exact}/{n}; max abs diff "
                       + ", ".join(f"{k} {v:.4g}" for k, v in diffs.items()))
        assert exact >= 0.8 * n, figures[-1]
    print("\n".join(["round trip:", *figures]))
    (tmp_path / "figures.txt").write_text("\n".join(figures))


def test_topic_that_never_publishes_is_named(tmp_path: Path) -> None:
    domain = _domain()
    helper = Helper(domain, publish={"/joint_states": STATE_NAMES, "/policy/command": ["a", "b"]})
    try:
        with pytest.raises(RobopolicyError, match=r"nothing arrived within 3 s on /object_state "
                                                  r"\(observation.environment_state\): no publisher"):
            record(_cfg(_params(tmp_path), tmp_path / "ds", domain, topic_timeout_s=3.0), log=lambda _: None)
    finally:
        helper.close()
    assert not (tmp_path / "ds").exists()


def test_mismatched_joint_names_are_a_named_error(tmp_path: Path) -> None:
    domain = _domain()
    helper = Helper(domain, publish={"/joint_states": ["x", "y", "vx", "vy"], "/object_state": ENV_NAMES,
                                     "/policy/command": ["a", "b"]})
    try:
        with pytest.raises(RobopolicyError, match=r"observation.state: JointState on /joint_states lacks "
                                                  r"\['pusher_x', 'pusher_y', 'pusher_vx', 'pusher_vy'\]; it has "
                                                  r"\['x', 'y', 'vx', 'vy'\]"):
            record(_cfg(_params(tmp_path), tmp_path / "ds", domain, topic_timeout_s=WAIT_S), log=lambda _: None)
    finally:
        helper.close()


def test_ctrl_c_mid_episode_discards_it_and_keeps_the_saved_ones(tmp_path: Path) -> None:
    domain = _domain()
    helper = Helper(domain, publish={"/joint_states": STATE_NAMES, "/object_state": ENV_NAMES,
                                     "/policy/command": ["a", "b"]})
    out = tmp_path / "ds"
    env = {**ros_environment(domain), "ROBOPOLICY_PROGRESS": "log", "ROBOPOLICY_PROGRESS_INTERVAL": "1"}
    proc = subprocess.Popen([sys.executable, "-m", "robopolicy.cli", "record", "--params", str(_params(tmp_path)),
                             "--out", str(out), "--images", "--topic-timeout", "20"],
                            env=env, stdin=subprocess.DEVNULL, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                            start_new_session=True)
    try:
        assert helper.recorder("start_episode").success
        time.sleep(1.0)
        r = helper.recorder("save_episode")
        assert r.success and "episode 0 saved" in r.message, r.message
        assert helper.recorder("start_episode").success
        time.sleep(0.5)
        proc.send_signal(signal.SIGINT)
        output, _ = proc.communicate(timeout=WAIT_S)
    finally:
        if proc.poll() is None:
            proc.kill()
        helper.close()
    text = output.decode(errors="replace")
    assert proc.returncode == 130, text
    assert "episode 1 discarded (stopped while under way)" in text, text
    assert "saved 1 episode(s)" in text and "holds 1 episodes" in text, text
    assert "rates=" in text  # the throttled progress line (topic rates) in a log
    ds = _load(out)
    assert ds.meta.total_episodes == 1 and ds.meta.total_frames >= 8
    a = ds[0]["action"].numpy()  # the helper publishes [0.01 k, 0.01 k + 1]
    assert abs(a[1] - a[0] - 1.0) < 1e-4


def test_keys_from_a_terminal_start_save_discard_and_quit(tmp_path: Path) -> None:
    """stdin a terminal (a pty here): s starts, Enter saves, d / Backspace discard, q quits."""
    domain = _domain()
    helper = Helper(domain, publish={"/joint_states": STATE_NAMES, "/object_state": ENV_NAMES,
                                     "/policy/command": ["a", "b"]})
    master, slave = os.openpty()
    proc = subprocess.Popen([sys.executable, "-m", "robopolicy.cli", "record", "--params", str(_params(tmp_path)),
                             "--out", str(tmp_path / "ds"), "--images"],
                            env={**ros_environment(domain), "ROBOPOLICY_PROGRESS": "off"}, stdin=slave,
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, start_new_session=True)
    os.close(slave)
    chunks: list[bytes] = []
    reader = threading.Thread(target=lambda: chunks.extend(iter(lambda: proc.stdout.read1(4096), b"")), daemon=True)
    reader.start()

    def seen(text: str) -> Callable[[], bool]:
        return lambda: text in b"".join(chunks).decode(errors="replace")

    try:
        helper.wait(seen("keys: s = start"), "the recorder's key help")
        os.write(master, b"s")
        helper.wait(seen("episode 0 started"), "s")
        time.sleep(1.0)
        os.write(master, b"\r")
        helper.wait(seen("episode 0 saved"), "Enter")
        for key in (b"d", b"\x7f"):
            os.write(master, b"s")
            time.sleep(0.3)
            os.write(master, key)
        helper.wait(seen("discarded (0."), "d")
        os.write(master, b"q")
        assert proc.wait(WAIT_S) == 0, b"".join(chunks).decode(errors="replace")
    finally:
        if proc.poll() is None:
            proc.kill()
        os.close(master)
        helper.close()
    reader.join(5.0)
    text = b"".join(chunks).decode(errors="replace")
    assert "saved 1 episode(s)" in text and "discarded 2" in text and "holds 1 episodes" in text, text


@pytest.mark.slow
def test_recorded_dataset_trains_a_policy_that_deploys(tmp_path: Path) -> None:
    """The rest of the round trip: a tiny diffusion policy trained on the recorded dataset runs
    in closed loop through the policy node against the sim bridge (skill is not the point)."""
    from robopolicy.real.deploy import deploy
    from robopolicy.train.trainer import TrainConfig, train

    _record_with_bridge(tmp_path, 2)
    tiny = {"n_obs_steps": 2, "horizon": 8, "n_action_steps": 4, "down_dims": [16, 32], "n_groups": 4,
            "kernel_size": 3, "time_embed_dim": 16, "state_mlp_dims": [32], "num_inference_steps": 2}
    summary = train(TrainConfig(policy="diffusion", dataset=tmp_path / "rec", out=tmp_path / "run", steps=20,
                                batch_size=8, warmup_steps=2, policy_overrides=tiny))
    params = _params(tmp_path, bridge={"max_episode_steps": 15, "reset_pause_s": 0.6},
                     policy={"execution_horizon": 3})
    report = deploy(Path(summary["run_dir"]), params, sim="push", episodes=1, out=tmp_path / "deploy", progress=False)
    assert len(report.episodes) == 1 and report.timing.chunks > 0
