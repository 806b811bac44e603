"""The node descriptions both ``ros2 launch robopolicy_ros policy.launch.py`` and
``robopolicy deploy`` start from: names, executables, parameter files.

Parameter files are ordinary ROS 2 YAML: a ``/**`` section for what both nodes share
(topics, QoS) and one section per node name. :func:`check_params_file` reads one and
rejects unknown parameter names and wrongly typed values (rclpy would silently ignore a
misspelt name, or refuse ``50`` for a double deep inside the node), naming the file,
section and parameter.

No rclpy here: the launch file imports this module.
"""

from __future__ import annotations

import os
import random
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Mapping

import yaml

from robopolicy.errors import RobopolicyError
from robopolicy.real.config import BRIDGE_PARAMS, POLICY_PARAMS, Param

#: The ament package that installs the executables on a robot (real/ in this repository).
PACKAGE = "robopolicy_ros"
#: ROS domain ids that are safe on Linux with Fast DDS' default ports; deploy draws from them.
SAFE_DOMAIN_IDS = range(1, 102)


@dataclass(frozen=True)
class NodeDescription:
    """One node: its default name, the executable installed by the ament package, its module."""

    name: str
    executable: str
    module: str
    params: tuple[Param, ...]

    def command(self, params_files: list[Path]) -> list[str]:
        """The command line that starts this node with ``params_files`` (later files win)."""
        cmd = [sys.executable, "-m", self.module, "--ros-args"]
        for path in params_files:
            cmd += ["--params-file", str(path)]
        return cmd

    def overrides_file(self, path: Path, values: Mapping[str, Any]) -> Path:
        """Write ``values`` as a parameter file section of this node (it beats ``/**`` and ``-p``)."""
        path.write_text(yaml.safe_dump({self.name: {"ros__parameters": dict(values)}}))
        return path


POLICY = NodeDescription("robopolicy_policy", "policy_node", "robopolicy.real.policy_node", POLICY_PARAMS)
SIM_BRIDGE = NodeDescription("robopolicy_sim_bridge", "sim_bridge", "robopolicy.real.sim_bridge", BRIDGE_PARAMS)
NODES = (POLICY, SIM_BRIDGE)

_PY_TYPES: dict[str, tuple[type, ...]] = {
    "bool": (bool,), "integer": (int,), "double": (float,), "string": (str,),
    "string_array": (str,), "double_array": (float,),
}


def _flatten(tree: Mapping[str, Any], prefix: str = "") -> dict[str, Any]:
    flat: dict[str, Any] = {}
    for key, value in tree.items():
        name = f"{prefix}{key}"
        if isinstance(value, Mapping):
            flat.update(_flatten(value, f"{name}."))
        else:
            flat[name] = value
    return flat


def _type_ok(p: Param, value: Any) -> bool:
    allowed = _PY_TYPES[p.type]
    if p.type.endswith("_array"):
        return isinstance(value, list) and all(isinstance(v, allowed) and not isinstance(v, bool) for v in value)
    if p.type == "bool":
        return isinstance(value, bool)
    return isinstance(value, allowed) and not isinstance(value, bool)


def _applies(section: str, node: NodeDescription) -> bool:
    return section in ("/**", node.name, f"/{node.name}", f"/**/{node.name}")


def check_params_file(path: str | Path) -> dict[str, dict[str, Any]]:
    """Read and check a parameter file; returns ``{node name: {parameter: value}}`` as the nodes
    will see them (the file's values over the declared defaults)."""
    path = Path(path)
    try:
        doc = yaml.safe_load(path.read_text())
    except (OSError, yaml.YAMLError) as e:
        raise RobopolicyError(f"cannot read parameter file {path}: {e}") from e
    if not isinstance(doc, Mapping) or not doc:
        raise RobopolicyError(f"parameter file {path} is empty or not a mapping of node sections")
    applied: dict[str, dict[str, Any]] = {n.name: {p.name: p.default for p in n.params} for n in NODES}
    problems: list[str] = []
    for section, body in doc.items():
        nodes = [n for n in NODES if _applies(str(section), n)]
        if not nodes:
            problems.append(f"section {section!r} matches no node (expected '/**' or one of "
                            f"{[n.name for n in NODES]})")
            continue
        if not isinstance(body, Mapping) or not isinstance(body.get("ros__parameters"), Mapping):
            problems.append(f"section {section!r} has no 'ros__parameters' mapping")
            continue
        for name, value in _flatten(body["ros__parameters"]).items():
            known = [p for n in nodes for p in n.params if p.name == name]
            if not known:
                problems.append(f"{section}: unknown parameter {name!r}")
            elif not _type_ok(known[0], value):
                problems.append(f"{section}: {name} = {value!r} must be a {known[0].type}"
                                + (" (write 50.0, not 50)" if known[0].type.startswith("double") else ""))
            for n in nodes:
                if any(p.name == name for p in n.params):
                    applied[n.name][name] = value
    if problems:
        raise RobopolicyError(f"parameter file {path}: " + "; ".join(problems))
    return applied


def ros_environment(domain_id: int) -> dict[str, str]:
    """Environment of a child ROS process: ours, its own domain, DDS kept on this machine."""
    env = dict(os.environ)
    env["ROS_DOMAIN_ID"] = str(domain_id)
    env.setdefault("ROS_AUTOMATIC_DISCOVERY_RANGE", "LOCALHOST")
    env["PYTHONUNBUFFERED"] = "1"
    return env


def pick_domain_id(requested: int | None = None, robot: bool = False) -> int:
    """``requested``, else ``$ROS_DOMAIN_ID``, else ROS' default 0 on a robot (its driver is
    there) or a random safe id in simulation (a private sim stays off everyone's domain)."""
    if requested is not None:
        return requested
    value = os.environ.get("ROS_DOMAIN_ID", "").strip()
    if value:
        if not value.isdigit():
            raise RobopolicyError(f"ROS_DOMAIN_ID={value!r} is not a domain id (0-232)")
        return int(value)
    return 0 if robot else random.choice(SAFE_DOMAIN_IDS)


def launch_flag(name: str, value: str) -> bool:
    """A launch argument's ``true`` / ``false`` (any case), or a clear error."""
    if value.strip().lower() not in ("true", "false"):
        raise RobopolicyError(f"launch argument {name}:={value!r} must be true or false")
    return value.strip().lower() == "true"
