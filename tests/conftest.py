"""Test-wide settings: headless rendering, offline hub, ROS 2 on localhost only."""

import os

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("MUJOCO_GL", "egl")
os.environ.setdefault("ROS_AUTOMATIC_DISCOVERY_RANGE", "LOCALHOST")

import robopolicy  # noqa: E402,F401  (applies the remaining runtime defaults)
