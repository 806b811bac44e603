"""Test-wide settings: headless rendering, offline hub, ROS 2 on localhost only.

``import robopolicy`` changes nothing in the process, so the suite applies the process
defaults the entry points apply (``robopolicy.process_defaults``), here, before any test
module imports torch, mujoco, lerobot or rclpy.
"""

from robopolicy.process_defaults import apply_defaults

apply_defaults()
