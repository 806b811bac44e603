"""Node parameters: the declared table, their validation, and the check against the model.

Parameter names follow the feature names, so a YAML file reads like the feature spec::

    observation:
      state: {topic: /joint_states, names: [pusher_x, pusher_y, pusher_vx, pusher_vy]}
      environment_state: {topic: /object_state, names: [...]}
      images: {cameras: [top], topics: [/camera/top/image_raw]}
    action: {topic: /policy/command, names: [...], lower: [...], upper: [...], max_delta: [...]}

:meth:`PolicyNodeConfig.check_spec` compares them with the model's :class:`FeatureSpec`
(per-dimension names and their order, image sizes, fps vs control rate, execution horizon
vs ``Ta``, the action range the model was trained on vs the limits) and raises one
:class:`SpecMismatchError` listing every disagreement, naming both sides.

Pure Python (no rclpy): the nodes declare these with descriptors, ``robopolicy deploy``
and the launch file check parameter files against them.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any, Mapping

import numpy as np

from robopolicy.errors import RobopolicyError, SpecMismatchError
from robopolicy.inference import BACKENDS
from robopolicy.real.messages import COMMAND_TYPES, JointMap
from robopolicy.real.safety import SafetyLimits
from robopolicy.spec import ENV_STATE, IMAGE_PREFIX, STATE, FeatureSpec

#: Low-dimensional observation features the node can subscribe (JointState topics).
LOW_DIM_KEYS = (STATE, ENV_STATE)
RELIABILITIES = ("reliable", "best_effort")
#: Slack when comparing the trained action range with the limits.
RANGE_TOLERANCE = 1e-6


@dataclass(frozen=True)
class Param:
    """One declared parameter. ``type``: bool, integer, double, string, string_array, double_array."""

    name: str
    type: str
    default: Any
    description: str
    choices: tuple[str, ...] = ()
    minimum: float | None = None


def _joint_map_params(key: str, what: str) -> tuple[Param, ...]:
    """The joint map of one feature: ROS joint names and units per dimension (empty: identity)."""
    return (
        Param(f"{key}.ros_names", "string_array", [], f"{what} per dimension (empty: the model's names)"),
        Param(f"{key}.ros_scale", "double_array", [], "ros = ros_scale * model + ros_offset, once or per dimension"),
        Param(f"{key}.ros_offset", "double_array", [], "see ros_scale; once or per dimension (empty: 0)"),
    )


def _topic_params(node: str) -> tuple[Param, ...]:
    """Topic parameters both nodes declare (a ``/**`` YAML section can hold them once)."""
    return (
        Param("observation.state.topic", "string", "/joint_states", f"JointState topic of observation.state ({node})"),
        Param("observation.environment_state.topic", "string", "",
              f"JointState topic of observation.environment_state ({node}); empty: not used"),
        Param("observation.images.cameras", "string_array", [], "camera names (observation.images.<camera>)"),
        Param("observation.images.topics", "string_array", [], "Image topic of each camera, in the same order"),
        Param("observation.language.topic", "string", "", "std_msgs/String instruction topic; empty: not used"),
        Param("action.topic", "string", "/policy/command", "command topic"),
        Param("action.message_type", "string", "float64_multi_array", "command message type", COMMAND_TYPES),
        Param("qos.depth", "integer", 1, "history depth of observation and command topics", minimum=1),
        Param("qos.reliability", "string", "reliable", "reliability of observation and command topics", RELIABILITIES),
    )


POLICY_PARAMS: tuple[Param, ...] = (
    Param("model", "string", "", "export folder (manifest.json) or training run / checkpoint folder"),
    Param("backend", "string", "onnxruntime", "inference backend for export folders", BACKENDS),
    Param("control_rate_hz", "double", 50.0, "control timer rate; >= the policy fps", minimum=1e-3),
    Param("execution_horizon", "integer", 0,
          "actions per chunk before the next one takes over (0: Ta); the rest cover a late inference", minimum=0),
    Param("blend_s", "double", 0.1, "linear cross-fade from the old to the new chunk at a seam", minimum=0.0),
    Param("sync_to_observation", "bool", True, "run a control cycle when an observation arrives"),
    Param("observation.staleness_s", "double", 0.25, "observations older than this hold the robot", minimum=1e-3),
    Param("observation.future_tolerance_s", "double", 0.05,
          "clock skew tolerated: samples stamped further ahead of the node's clock are rejected", minimum=0.0),
    *(param for key in ("observation.state", "observation.environment_state") for param in (
        Param(f"{key}.names", "string_array", [], f"the model's per-dimension names of {key}"),
        *_joint_map_params(key, "JointState joint name"))),
    Param("task", "string", "", "instruction when no language topic is used (empty: the model's first task)"),
    Param("action.names", "string_array", [], "per-dimension names of the action"),
    Param("action.lower", "double_array", [], "lower command limit per dimension"),
    Param("action.upper", "double_array", [], "upper command limit per dimension"),
    Param("action.max_delta", "double_array", [], "largest command change per control cycle, per dimension"),
    Param("action.max_rate", "double_array", [], "largest command change per second, per dimension"),
    Param("action.hold", "string_array", ["zero"],
          "safe command, once or per dimension: 'zero' (velocity / delta) or 'last' (position, gripper)"),
    Param("action.measured", "string_array", [],
          "per dimension: the observation.state name that measures this position command (it then starts "
          "from the measured value), or '' for a velocity-like command (starts from zero); empty: all ''"),
    *_joint_map_params("action", "command joint name"),
    Param("inference.threads", "integer", 1, "intra-op threads of the inference backend", minimum=1),
    Param("inference.switch_interval_s", "double", 0.0005,
          "Python GIL switch interval (short: the control thread preempts inference sooner)", minimum=1e-6),
    Param("diagnostics_period_s", "double", 1.0, "diagnostics and telemetry publishing period", minimum=0.01),
) + _topic_params("subscribed")

BRIDGE_PARAMS: tuple[Param, ...] = (
    Param("env", "string", "push", "robopolicy env the bridge runs"),
    Param("seed", "integer", 0, "seed of the first episode (episode i uses seed + i)"),
    Param("max_episode_steps", "integer", 0, "episode length limit (0: the env's default)", minimum=0),
    Param("image_size", "integer", 84, "camera image size in pixels", minimum=8),
    Param("reset_pause_s", "double", 1.0,
          "after a reset, publish the new scene this long before stepping (the policy re-plans)", minimum=0.0),
    Param("result_topic", "string", "/sim/episode_result", "std_msgs/String JSON episode results"),
    Param("expert_commands", "bool", False,
          "stand-in teleoperator: publish the env's scripted-expert action on action.topic each step and apply "
          "it (commands from others are ignored); for recording tests and demos"),
) + _topic_params("published")

PARAMS_BY_NODE_KIND = {"policy": POLICY_PARAMS, "sim_bridge": BRIDGE_PARAMS}


@dataclass(frozen=True)
class FeatureTopic:
    """Where one observation feature comes from (``joints``: JointState features only)."""

    key: str
    topic: str
    names: tuple[str, ...] = ()
    joints: JointMap | None = None


@dataclass(frozen=True)
class PolicyNodeConfig:
    """The policy node's parameters, validated on their own (not yet against a model)."""

    model: str
    backend: str
    control_rate_hz: float
    execution_horizon: int
    blend_s: float
    sync_to_observation: bool
    staleness_s: float
    future_tolerance_s: float
    low_dim: tuple[FeatureTopic, ...]
    images: tuple[FeatureTopic, ...]
    language_topic: str
    task: str
    action_topic: str
    message_type: str
    action_names: tuple[str, ...]
    action_joints: JointMap
    limits: SafetyLimits
    #: Per action dimension: the index of its measured value in observation.state, or -1.
    measured_index: tuple[int, ...]
    qos_depth: int
    qos_reliability: str
    inference_threads: int
    switch_interval_s: float
    diagnostics_period_s: float

    @classmethod
    def from_params(cls, values: Mapping[str, Any]) -> "PolicyNodeConfig":
        """Build from ``{parameter name: value}`` (unset arrays may be ``None``)."""
        v = {p.name: (values.get(p.name) if values.get(p.name) is not None else p.default) for p in POLICY_PARAMS}
        problems = [p for p in (_check_param(p, v[p.name]) for p in POLICY_PARAMS) if p]
        if not v["model"]:
            problems.append("model is empty: give an export folder or a training run folder")
        cams, cam_topics = list(v["observation.images.cameras"]), list(v["observation.images.topics"])
        if len(cams) != len(cam_topics):
            problems.append(f"observation.images.cameras has {len(cams)} entries but observation.images.topics "
                            f"has {len(cam_topics)}")
        names = tuple(v["action.names"])
        if not names:
            problems.append("action.names is empty")
        joints = {key: _joint_map(key, list(v[f"{key}.names"]), v, problems) for key in (*LOW_DIM_KEYS, "action")}
        measured = _measured_index(names, list(v["action.measured"]), list(v[f"{STATE}.names"]), problems)
        limits = None
        try:
            limits = SafetyLimits(
                *(np.array(v[f"action.{k}"], dtype=float) for k in ("lower", "upper", "max_delta", "max_rate")),
                tuple(v["action.hold"]), tuple(i >= 0 for i in measured))
            if names and len(names) != limits.lower.size:
                problems.append(f"action.names has {len(names)} entries but action.lower/upper/max_delta/max_rate "
                                f"have {limits.lower.size}")
        except RobopolicyError as e:
            problems.append(f"action limits: {e}")
        for key in LOW_DIM_KEYS:
            if not v[f"{key}.topic"] and v[f"{key}.names"]:
                problems.append(f"{key}.names is set but {key}.topic is empty")
        if problems:
            raise RobopolicyError("invalid policy node parameters: " + "; ".join(problems))
        assert limits is not None
        return cls(
            model=v["model"], backend=v["backend"], control_rate_hz=float(v["control_rate_hz"]),
            execution_horizon=int(v["execution_horizon"]), blend_s=float(v["blend_s"]),
            sync_to_observation=bool(v["sync_to_observation"]), staleness_s=float(v["observation.staleness_s"]),
            future_tolerance_s=float(v["observation.future_tolerance_s"]),
            low_dim=tuple(FeatureTopic(k, v[f"{k}.topic"], tuple(v[f"{k}.names"]), joints[k]) for k in LOW_DIM_KEYS
                          if v[f"{k}.topic"]),
            images=tuple(FeatureTopic(IMAGE_PREFIX + c, t) for c, t in zip(cams, cam_topics)),
            language_topic=v["observation.language.topic"], task=v["task"],
            action_topic=v["action.topic"], message_type=v["action.message_type"], action_names=names,
            action_joints=joints["action"], limits=limits, measured_index=measured,
            qos_depth=int(v["qos.depth"]), qos_reliability=v["qos.reliability"],
            inference_threads=int(v["inference.threads"]), switch_interval_s=float(v["inference.switch_interval_s"]),
            diagnostics_period_s=float(v["diagnostics_period_s"]),
        )

    @property
    def observation_keys(self) -> list[str]:
        return sorted(f.key for f in self.low_dim + self.images)

    def horizon(self, spec: FeatureSpec) -> int:
        """Actions executed per chunk."""
        return self.execution_horizon or spec.n_action_steps

    def check_spec(self, spec: FeatureSpec, model_side: str, params_side: str) -> None:
        """Raise :class:`SpecMismatchError` listing every way ``spec`` and these parameters disagree."""
        problems: list[str] = []
        configured = {f.key: f for f in self.low_dim + self.images}
        for key in sorted(set(spec.observation_keys) - set(configured)):
            f = spec.features[key]
            where = "a camera in observation.images.cameras" if key.startswith(IMAGE_PREFIX) else f"{key}.topic"
            if key.startswith(IMAGE_PREFIX) or key in LOW_DIM_KEYS:
                problems.append(f"the model needs {key} {list(f.shape)} but the parameters set no {where}")
            else:
                problems.append(f"the model needs {key}, which the node cannot subscribe "
                                f"(it maps {', '.join(LOW_DIM_KEYS)} and observation.images.*)")
        for key in sorted(set(configured) - set(spec.observation_keys)):
            problems.append(f"the parameters subscribe {key} ({configured[key].topic}) "
                            "but the model has no such feature")
        for f in self.low_dim:
            if f.key in spec.features:
                problems += _name_problems(f"{f.key}.names", list(f.names), spec.features[f.key].names,
                                           spec.features[f.key].dim)
        problems += _name_problems("action.names", list(self.action_names), spec.action.names, spec.action.dim)
        if self.limits.lower.size == spec.action.dim and spec.action.stats is not None:
            lo, hi = np.asarray(spec.action.stats.min), np.asarray(spec.action.stats.max)
            names = spec.action.names or [str(i) for i in range(spec.action.dim)]
            for i, name in enumerate(names):
                if lo[i] < self.limits.lower[i] - RANGE_TOLERANCE or hi[i] > self.limits.upper[i] + RANGE_TOLERANCE:
                    problems.append(f"action {name!r} was trained on [{lo[i]:.4g}, {hi[i]:.4g}] but the limits are "
                                    f"[{self.limits.lower[i]:.4g}, {self.limits.upper[i]:.4g}]")
        if self.control_rate_hz < spec.fps - 1e-9:
            problems.append(f"control_rate_hz {self.control_rate_hz:g} is below the model's {spec.fps:g} fps "
                            "(actions would be skipped)")
        if self.execution_horizon > spec.n_action_steps:
            problems.append(f"execution_horizon {self.execution_horizon} exceeds the model's chunk of "
                            f"{spec.n_action_steps} actions (Ta)")
        if len(spec.tasks) > 1 and not (self.language_topic or self.task):
            problems.append(f"the model follows instructions ({len(spec.tasks)} tasks) but neither "
                            "observation.language.topic nor task is set")
        if problems:
            raise SpecMismatchError(f"{model_side} does not match {params_side}: " + "; ".join(problems))

    def default_task(self, spec: FeatureSpec) -> str:
        return self.task or (spec.tasks[0] if spec.tasks else "")


def _joint_map(key: str, names: list[str], v: Mapping[str, Any], problems: list[str]) -> JointMap:
    """``key``'s joint map from its ``ros_names`` / ``ros_scale`` / ``ros_offset`` (identity where unset)."""
    n = len(names)
    ros_names = list(v[f"{key}.ros_names"]) or names
    arrays = {}
    for what, default in (("ros_scale", 1.0), ("ros_offset", 0.0)):
        given = np.asarray(v[f"{key}.{what}"] or [default], dtype=np.float64)
        if given.size not in (1, n) or not np.all(np.isfinite(given)):
            problems.append(f"{key}.{what} needs one finite value, or one per dimension ({n}); got {given.tolist()}")
            given = np.full(1, default)
        arrays[what] = np.broadcast_to(given, (n,)).copy()
    if np.any(arrays["ros_scale"] == 0):
        problems.append(f"{key}.ros_scale must not be 0")
        arrays["ros_scale"][arrays["ros_scale"] == 0] = 1.0
    if len(ros_names) != n:
        problems.append(f"{key}.ros_names has {len(ros_names)} entries but {key}.names has {n}")
        ros_names = names
    elif len(set(ros_names)) != n or not all(ros_names):
        problems.append(f"{key}.ros_names must be distinct and non-empty, got {ros_names}")
    return JointMap(tuple(ros_names), arrays["ros_scale"], arrays["ros_offset"])


def _measured_index(action_names: tuple[str, ...], measured: list[str], state_names: list[str],
                    problems: list[str]) -> tuple[int, ...]:
    """Per action dimension, the index of the ``observation.state`` name that measures it, or -1."""
    if not measured:
        return (-1,) * len(action_names)
    if len(measured) != len(action_names):
        problems.append(f"action.measured has {len(measured)} entries but action.names has {len(action_names)} "
                        "(one observation.state name, or '', per dimension)")
        return (-1,) * len(action_names)
    unknown = [m for m in measured if m and m not in state_names]
    if unknown:
        problems.append(f"action.measured names {unknown}, which observation.state.names ({state_names}) lacks")
        return (-1,) * len(action_names)
    return tuple(state_names.index(m) if m else -1 for m in measured)


def _check_param(p: Param, value: Any) -> str | None:
    if p.choices and value not in p.choices:
        return f"{p.name} is {value!r}; expected one of {list(p.choices)}"
    if p.minimum is not None and not (isinstance(value, (int, float)) and math.isfinite(value) and value >= p.minimum):
        return f"{p.name} is {value!r}; expected a number >= {p.minimum:g}"
    return None


def _name_problems(what: str, given: list[str], expected: list[str] | None, dim: int) -> list[str]:
    if expected is None:
        return [] if len(given) == dim else [
            f"{what}: the parameters list {len(given)} names but the model's feature has {dim} dimensions"]
    if given == list(expected):
        return []
    missing = [n for n in expected if n not in given]
    extra = [n for n in given if n not in expected]
    if not missing and not extra:
        return [f"{what}: same names in another order: parameters {given}, model {list(expected)}"]
    return [f"{what}: parameters {given}, model {list(expected)} (missing {missing}, unexpected {extra})"]
