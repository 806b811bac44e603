"""robopolicy: robot policy learning with sim-to-real deployment."""

from robopolicy.runtime import apply_defaults

__version__ = "0.1.0"

# Headless rendering, no hub downloads, ROS 2 on localhost: set before mujoco / lerobot /
# rclpy are imported by any submodule (user-set values win).
apply_defaults()
