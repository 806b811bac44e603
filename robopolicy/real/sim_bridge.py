"""The sim bridge: one of our envs standing in for the robot, behind the robot's topics.

At the env's rate it applies the latest command it received (the last one again if none
is new, zero at the start of an episode), steps the env and publishes what a robot and its
perception would: a ``sensor_msgs/JointState`` per low-dimensional feature (names from
``env.feature_names``, stamped now), a ``sensor_msgs/Image`` per camera, and the episode's
instruction (``std_msgs/String``) when a language topic is set. ``observation.state`` goes
out last, after the rest of the frame.

At the end of an episode it publishes the result (``std_msgs/String``, JSON: episode,
seed, success, length, task) and resets; ``~/reset`` (``std_srvs/Trigger``) resets on
request (no result for the interrupted episode; the response message is
``{"episode": <index of the new episode>}``). After a reset it publishes the new scene for
``reset_pause_s`` without stepping (commands are ignored), like a robot being set up, so the
policy re-plans from the new scene. The policy node cannot tell it from a robot.

With ``expert_commands`` the bridge is also its own teleoperator (for ``robopolicy record``
tests and demos): the env's scripted expert needs the env's internals, so it runs here. Each
step it publishes the observation, then the expert's action for it on ``action.topic`` (the
first action of an episode on the first tick after the reset pause, before any step), and
applies that action at the next tick; commands from other nodes are ignored. The env's
trajectory is then the one ``robopolicy collect`` records from the same seed (the expert's
generator is seeded with the episode's seed, as collect seeds it).
"""

from __future__ import annotations

import json
import sys
import time
from typing import Any

import numpy as np
from rclpy.context import Context
from rclpy.node import Node
from rclpy.parameter import Parameter
from sensor_msgs.msg import Image, JointState
from std_msgs.msg import String
from std_srvs.srv import Trigger

from robopolicy.process_defaults import apply_defaults
from robopolicy.real.config import BRIDGE_PARAMS, LOW_DIM_KEYS
from robopolicy.real.messages import CommandCodec, JointMap, MessageError, array_to_image, joint_state, s_to_stamp
from robopolicy.real.nodes import SIM_BRIDGE
from robopolicy.real.rosutil import RECORD_QOS, declare_parameters, parameter_values, run_node, stream_qos
from robopolicy.spec import ACTION, IMAGE_PREFIX, STATE


class SimBridge(Node):
    """See the module docstring."""

    def __init__(self, context: Context | None = None, parameter_overrides: list[Parameter] | None = None) -> None:
        # Imported here, not at module level: robopolicy.sim imports mujoco and PyOpenGL, which read
        # MUJOCO_GL / PYOPENGL_PLATFORM once, so main() applies the process defaults before this.
        from robopolicy.sim import make_env, make_expert

        super().__init__(SIM_BRIDGE.name, context=context, parameter_overrides=parameter_overrides or [])
        declare_parameters(self, BRIDGE_PARAMS)
        p = parameter_values(self, BRIDGE_PARAMS)
        cameras, camera_topics = list(p["observation.images.cameras"] or []), list(p["observation.images.topics"] or [])
        kwargs: dict[str, Any] = {"cameras": tuple(cameras), "image_size": p["image_size"]}
        if p["max_episode_steps"]:
            kwargs["max_episode_steps"] = p["max_episode_steps"]
        self.env = make_env(p["env"], **kwargs)
        self.seed, self.reset_pause_s = int(p["seed"]), float(p["reset_pause_s"])
        qos = stream_qos(p["qos.depth"], p["qos.reliability"])
        names = self.env.feature_names
        # Publication order: images, instruction, other low-dim features, observation.state last.
        self._images = [(IMAGE_PREFIX + c, self.create_publisher(Image, t, qos))
                        for c, t in zip(cameras, camera_topics)]
        self._language = (self.create_publisher(String, p["observation.language.topic"], qos)
                          if p["observation.language.topic"] else None)
        keys = sorted((k for k in LOW_DIM_KEYS if p[f"{k}.topic"] and k in self.env.observation_space.spaces),
                      key=lambda k: k == STATE)
        self._low_dim = [(k, names[k], self.create_publisher(JointState, p[f"{k}.topic"], qos)) for k in keys]
        self._codec = CommandCodec(p["action.message_type"], JointMap.identity(names[ACTION]), 1.0 / self.env.fps)
        self._action_topic = p["action.topic"]
        self._expert = make_expert(p["env"]) if p["expert_commands"] else None
        if self._expert is None:
            self.create_subscription(self._codec.msg_type, self._action_topic, self._on_command, qos)
        else:
            self._teleop = self.create_publisher(self._codec.msg_type, self._action_topic, qos)
        self._results = self.create_publisher(String, p["result_topic"], RECORD_QOS)
        self.create_service(Trigger, "~/reset", self._on_reset)
        self.episode = 0
        self._start_episode()
        self.create_timer(1.0 / self.env.fps, self._step)
        self.get_logger().info(f"sim bridge: {p['env']} at {self.env.fps:g} Hz, publishing "
                               f"{[k for k, *_ in self._low_dim]} + {len(self._images)} camera(s), "
                               f"commands on {self._action_topic}")

    def _start_episode(self) -> None:
        self._obs, info = self.env.reset(seed=self.seed + self.episode)
        self._task = info["task"]
        self._command = np.zeros(self.env.action_space.shape, dtype=np.float32)
        self._length, self._success = 0, False
        self._paused_until = time.monotonic() + self.reset_pause_s
        if self._expert is not None:
            self._expert.reset(self.env, np.random.default_rng(self.seed + self.episode))
            self._expert_started = False
        self._publish()

    def _step(self) -> None:
        if time.monotonic() < self._paused_until:
            self._publish()
            return
        if self._expert is not None and not self._expert_started:  # obs 0 and its action, no step yet
            self._expert_started = True
            self._publish()
            self._teleoperate()
            return
        self._obs, _, terminated, truncated, info = self.env.step(self._command)
        self._length += 1
        self._success = self._success or bool(info["is_success"])
        if terminated or truncated:
            result = {"episode": self.episode, "seed": self.seed + self.episode, "success": self._success,
                      "length": self._length, "task": self._task}
            self._results.publish(String(data=json.dumps(result)))
            self.get_logger().info(f"episode {self.episode}: {'success' if self._success else 'failure'} "
                                   f"in {self._length} steps")
            self.episode += 1
            self._start_episode()
        else:
            self._publish()
            if self._expert is not None:
                self._teleoperate()

    def _teleoperate(self) -> None:
        """Publish the scripted expert's action for the current observation and apply it next tick."""
        assert self._expert is not None
        self._command = np.asarray(self._expert.act(self.env, self._obs), dtype=np.float32)
        stamp = s_to_stamp(self.get_clock().now().nanoseconds * 1e-9)
        self._teleop.publish(self._codec.encode(self._command, stamp))

    def _publish(self) -> None:
        stamp = s_to_stamp(self.get_clock().now().nanoseconds * 1e-9)
        for key, pub in self._images:
            pub.publish(array_to_image(self._obs[key], stamp, key.removeprefix(IMAGE_PREFIX)))
        if self._language is not None:
            self._language.publish(String(data=self._task))
        for key, names, pub in self._low_dim:
            pub.publish(joint_state(names, self._obs[key], stamp))

    def _on_command(self, msg: Any) -> None:
        try:
            command = self._codec.decode(msg, self._action_topic)
        except MessageError as e:
            self.get_logger().warning(f"command rejected: {e}", throttle_duration_sec=5.0)
            return
        if not np.all(np.isfinite(command)):
            self.get_logger().warning(f"non-finite command rejected: {command}", throttle_duration_sec=5.0)
        elif time.monotonic() >= self._paused_until:
            self._command = command.astype(np.float32)

    def _on_reset(self, request: Trigger.Request, response: Trigger.Response) -> Trigger.Response:
        self.get_logger().info(f"episode {self.episode} reset on request after {self._length} steps")
        self.episode += 1
        self._start_episode()
        response.success, response.message = True, json.dumps({"episode": self.episode})
        return response

    def destroy_node(self) -> None:
        self.env.close()
        super().destroy_node()


def main(args: list[str] | None = None) -> int:
    """``python -m robopolicy.real.sim_bridge --ros-args --params-file P -p env:=push``."""
    apply_defaults()  # before rclpy.init and the env's mujoco / OpenGL import (see process_defaults)
    return run_node(lambda context: SimBridge(context=context), args=args)


if __name__ == "__main__":
    sys.exit(main())
