"""Process-wide defaults every robopolicy entry point sets before heavy imports.

Nothing may leave this machine: no hub downloads, ROS 2 discovery on localhost only.
Rendering is headless (EGL). Values already set by the user win.
"""

from __future__ import annotations

import os
import warnings

from robopolicy.paths import REAL_PACKAGE

DEFAULTS = {
    "HF_HUB_OFFLINE": "1",
    "MUJOCO_GL": "egl",
    "PYOPENGL_PLATFORM": "egl",
    "ROS_AUTOMATIC_DISCOVERY_RANGE": "LOCALHOST",
    "FASTDDS_DEFAULT_PROFILES_FILE": str(REAL_PACKAGE / "config" / "fastdds_loopback.xml"),
    "TOKENIZERS_PARALLELISM": "false",
    # OpenMP threads that spin-wait collapse when another process holds a core: a training
    # step went from 0.59 s to 5.9 s on this 2-core VM under load. Passive waiting fixes it.
    "OMP_WAIT_POLICY": "PASSIVE",
    # lerobot re-enables HF datasets' per-episode "Map" bars, which would bury ours.
    "HF_DATASETS_DISABLE_PROGRESS_BARS": "1",
}


def apply_defaults() -> None:
    """Set the environment defaults above where the user has not set them."""
    for key, value in DEFAULTS.items():
        os.environ.setdefault(key, value)
    warnings.filterwarnings("ignore", message="Cannot enable progress bars")
    if os.environ.get("MUJOCO_GL") == "osmesa":
        os.environ["PYOPENGL_PLATFORM"] = "osmesa"
