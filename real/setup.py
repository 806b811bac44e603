"""ament_python package robopolicy_ros: launch and parameter files plus the node executables.

The executables are entry points into the robopolicy Python package (robopolicy.real), so
the same code runs under `ros2 launch` and `robopolicy deploy`.
"""

from glob import glob

from setuptools import setup

PACKAGE = "robopolicy_ros"

setup(
    name=PACKAGE,
    version="0.1.0",
    packages=[],
    data_files=[
        ("share/ament_index/resource_index/packages", [f"resource/{PACKAGE}"]),
        (f"share/{PACKAGE}", ["package.xml"]),
        (f"share/{PACKAGE}/launch", glob("launch/*.launch.py")),
        (f"share/{PACKAGE}/config", glob("config/*.yaml") + glob("config/*.xml")),
    ],
    install_requires=["setuptools"],
    zip_safe=True,
    description="ROS 2 policy node and sim bridge of robopolicy",
    license="Apache-2.0",
    entry_points={
        "console_scripts": [
            "policy_node = robopolicy.real.policy_node:main",
            "sim_bridge = robopolicy.real.sim_bridge:main",
        ],
    },
)
