"""real/launch/policy.launch.py, read with stand-in ``launch`` / ``launch_ros`` classes.

``launch`` and ``launch_ros`` are not installable here (no registry has them), so these tests
load the launch file against small stand-ins that record how each action was built, and
check what it asks ROS 2 launch to do: configure, activate once (never after a later
configure) unless ``activate:=false``, and remove its override folder at shutdown. The file
itself has been run under the real launch 3.7 / launch_ros 0.28 (see shared/GUIDE.md);
keep it thin so that this structural check stays meaningful.
"""

from __future__ import annotations

import importlib.util
import sys
import types
from pathlib import Path
from typing import Any

import pytest
from lifecycle_msgs.msg import Transition

from robopolicy.errors import RobopolicyError

REPO = Path(__file__).resolve().parent.parent
LAUNCH_FILE = REPO / "real" / "launch" / "policy.launch.py"


class Recorded:
    """A stand-in action / handler / event: keeps its arguments."""

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        self.args, self.kwargs = args, kwargs


class LaunchConfiguration:
    def __init__(self, name: str) -> None:
        self.name = name

    def perform(self, context: dict[str, str]) -> str:
        return context[self.name]


def _module(name: str, **members: Any) -> types.ModuleType:
    module = types.ModuleType(name)
    module.__dict__.update(members)
    return module


@pytest.fixture
def launch_file(monkeypatch: pytest.MonkeyPatch) -> types.ModuleType:
    kinds = ("LaunchDescription", "DeclareLaunchArgument", "EmitEvent", "OpaqueFunction", "RegisterEventHandler",
             "OnShutdown", "LifecycleNode", "Node", "OnStateTransition", "ChangeState")
    fake = {k: type(k, (Recorded,), {}) for k in kinds}
    stand_ins = {
        "ament_index_python": _module("ament_index_python"),
        "ament_index_python.packages": _module("ament_index_python.packages",
                                               get_package_share_directory=lambda package: str(REPO / "real")),
        "launch": _module("launch", LaunchDescription=fake["LaunchDescription"]),
        "launch.actions": _module("launch.actions", **{k: fake[k] for k in (
            "DeclareLaunchArgument", "EmitEvent", "OpaqueFunction", "RegisterEventHandler")}),
        "launch.event_handlers": _module("launch.event_handlers", OnShutdown=fake["OnShutdown"]),
        "launch.events": _module("launch.events", matches_action=lambda action: ("matches", action)),
        "launch.substitutions": _module("launch.substitutions", LaunchConfiguration=LaunchConfiguration),
        "launch_ros": _module("launch_ros"),
        "launch_ros.actions": _module("launch_ros.actions", LifecycleNode=fake["LifecycleNode"], Node=fake["Node"]),
        "launch_ros.event_handlers": _module("launch_ros.event_handlers", OnStateTransition=fake["OnStateTransition"]),
        "launch_ros.events": _module("launch_ros.events"),
        "launch_ros.events.lifecycle": _module("launch_ros.events.lifecycle", ChangeState=fake["ChangeState"]),
    }
    for name, module in stand_ins.items():
        monkeypatch.setitem(sys.modules, name, module)
    spec = importlib.util.spec_from_file_location("policy_launch", LAUNCH_FILE)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def _context(**changes: str) -> dict[str, str]:
    return {"model": "/models/push", "params": str(REPO / "real" / "config" / "push.yaml"), "sim": "",
            "activate": "true", **changes}


def _handlers(actions: list[Any], kind: str) -> list[Any]:
    return [a.args[0] for a in actions if type(a).__name__ == "RegisterEventHandler"
            and type(a.args[0]).__name__ == kind]


def _transitions(actions: list[Any]) -> list[int]:
    return [a.kwargs["event"].kwargs["transition_id"] for a in actions if type(a).__name__ == "EmitEvent"]


def test_configures_then_activates_once(launch_file: types.ModuleType) -> None:
    actions = launch_file._nodes(_context())
    assert _transitions(actions) == [Transition.TRANSITION_CONFIGURE]
    (activation,) = _handlers(actions, "OnStateTransition")
    assert activation.kwargs["handle_once"] is True  # a later cleanup + configure stays inactive
    assert (activation.kwargs["start_state"], activation.kwargs["goal_state"]) == ("configuring", "inactive")
    assert _transitions(activation.kwargs["entities"]) == [Transition.TRANSITION_ACTIVATE]
    (policy,) = [a for a in actions if type(a).__name__ == "LifecycleNode"]
    assert policy.kwargs["parameters"][0] == _context()["params"]


def test_activate_false_leaves_activation_to_the_integrator(launch_file: types.ModuleType) -> None:
    actions = launch_file._nodes(_context(activate="false"))
    assert not _handlers(actions, "OnStateTransition") and _transitions(actions) == [Transition.TRANSITION_CONFIGURE]
    with pytest.raises(RobopolicyError, match="activate:='maybe' must be true or false"):
        launch_file._nodes(_context(activate="maybe"))


def test_the_override_folder_is_removed_at_shutdown(launch_file: types.ModuleType) -> None:
    actions = launch_file._nodes(_context(sim="push"))
    (policy,) = [a for a in actions if type(a).__name__ == "LifecycleNode"]
    overrides = Path(policy.kwargs["parameters"][1])
    assert "model: /models/push" in overrides.read_text() and len(list(overrides.parent.iterdir())) == 2
    (shutdown,) = _handlers(actions, "OnShutdown")
    shutdown.kwargs["on_shutdown"](None, None)
    assert not overrides.parent.exists()


def test_a_bad_parameter_file_stops_the_launch_before_any_node(launch_file: types.ModuleType, tmp_path: Path) -> None:
    bad = tmp_path / "bad.yaml"
    bad.write_text("robopolicy_policy:\n  ros__parameters:\n    control_rate_hz: 50\n")
    with pytest.raises(RobopolicyError, match="control_rate_hz = 50 must be a double"):
        launch_file._nodes(_context(params=str(bad)))
