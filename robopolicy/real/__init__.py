"""ROS 2 deployment: the policy node, the sim bridge, the safety layer, ``robopolicy deploy``.

Pure-Python logic (no rclpy): :mod:`~robopolicy.real.safety`, :mod:`~robopolicy.real.schedule`,
:mod:`~robopolicy.real.observations`, :mod:`~robopolicy.real.controller`,
:mod:`~robopolicy.real.telemetry`, :mod:`~robopolicy.real.config`, :mod:`~robopolicy.real.nodes`.
Thin rclpy nodes over it: :mod:`~robopolicy.real.policy_node`, :mod:`~robopolicy.real.sim_bridge`;
:mod:`~robopolicy.real.deploy` runs them in closed loop. Nothing is imported here: importing
the package must stay cheap (the launch file imports :mod:`robopolicy.real.nodes`).
"""
