"""Start the robopolicy policy node (and optionally the sim bridge) on a robot.

    ros2 launch robopolicy_ros policy.launch.py model:=/path/to/export params:=/path/to/params.yaml
    ros2 launch robopolicy_ros policy.launch.py model:=... params:=... activate:=false  # your supervisor activates
    ros2 launch robopolicy_ros policy.launch.py model:=... params:=... sim:=push   # sim bridge as the robot

The nodes, executables and parameter handling come from robopolicy.real.nodes, the same
description ``robopolicy deploy`` starts from: the parameter file is checked first (unknown
names, wrong types), ``model`` / ``sim`` go into a node-specific override file after it
(removed again when the launch shuts down), and the policy node is configured through a
lifecycle event, then activated once, after that first configure succeeded: a later
cleanup + configure leaves it inactive until someone activates it.
"""

import shutil
import tempfile
from pathlib import Path

from ament_index_python.packages import get_package_share_directory
from launch import LaunchDescription
from launch.actions import DeclareLaunchArgument, EmitEvent, OpaqueFunction, RegisterEventHandler
from launch.event_handlers import OnShutdown
from launch.events import matches_action
from launch.substitutions import LaunchConfiguration
from launch_ros.actions import LifecycleNode, Node
from launch_ros.event_handlers import OnStateTransition
from launch_ros.events.lifecycle import ChangeState
from lifecycle_msgs.msg import Transition

from robopolicy.real.nodes import PACKAGE, POLICY, SIM_BRIDGE, check_params_file, launch_flag


def _nodes(context):
    model = LaunchConfiguration("model").perform(context)
    params = LaunchConfiguration("params").perform(context)
    sim = LaunchConfiguration("sim").perform(context)
    activate = launch_flag("activate", LaunchConfiguration("activate").perform(context))
    check_params_file(params)
    overrides = Path(tempfile.mkdtemp(prefix="robopolicy_launch_"))
    policy = LifecycleNode(
        package=PACKAGE, executable=POLICY.executable, name=POLICY.name, namespace="", output="screen",
        parameters=[params, str(POLICY.overrides_file(overrides / "policy.yaml", {"model": model}))],
    )

    def change(transition_id):
        return EmitEvent(event=ChangeState(lifecycle_node_matcher=matches_action(policy), transition_id=transition_id))

    actions = [
        policy,
        RegisterEventHandler(OnShutdown(on_shutdown=lambda event, ctx: shutil.rmtree(overrides, ignore_errors=True))),
        change(Transition.TRANSITION_CONFIGURE),
    ]
    if activate:
        # Once: after the first successful configure, never after a later one.
        actions.insert(1, RegisterEventHandler(OnStateTransition(
            target_lifecycle_node=policy, start_state="configuring", goal_state="inactive",
            entities=[change(Transition.TRANSITION_ACTIVATE)], handle_once=True)))
    if sim:
        actions.insert(0, Node(
            package=PACKAGE, executable=SIM_BRIDGE.executable, name=SIM_BRIDGE.name, output="screen",
            parameters=[params, str(SIM_BRIDGE.overrides_file(overrides / "sim_bridge.yaml", {"env": sim}))],
        ))
    return actions


def generate_launch_description():
    default_params = str(Path(get_package_share_directory(PACKAGE)) / "config" / "push.yaml")
    return LaunchDescription([
        DeclareLaunchArgument("model", description="export folder (manifest.json) or training run folder"),
        DeclareLaunchArgument("params", default_value=default_params, description="parameter YAML file"),
        DeclareLaunchArgument("activate", default_value="true",
                              description="activate once after the first configure (false: your supervisor does)"),
        DeclareLaunchArgument("sim", default_value="", description="env name: run the sim bridge as the robot"),
        OpaqueFunction(function=_nodes),
    ])
