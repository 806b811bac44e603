"""Process-wide environment defaults, applied by the entry points, never on import.

Nothing may leave this machine: no hub downloads, ROS 2 discovery on localhost only.
Rendering is headless (EGL). Values already set by the user win.

Who calls :func:`apply_defaults`: ``robopolicy.cli.main`` (every ``robopolicy`` command, and
``python -m robopolicy.real.record``, which goes through it), the ``main`` of each ROS node
(``robopolicy.real.policy_node``, ``robopolicy.real.sim_bridge``), the benches, and the test
suite (``tests/conftest.py``). A library user (a notebook) gets none of this unless they call
it.

Call it first, before heavy imports: several values are read once, when a library loads,
and are ignored if set later:

* ``OMP_WAIT_POLICY``: read when torch (its OpenMP runtime) is loaded;
* ``MUJOCO_GL`` / ``PYOPENGL_PLATFORM``: read when PyOpenGL is imported, which
  ``robopolicy.sim`` does at import;
* ``HF_HUB_OFFLINE`` / ``HF_DATASETS_DISABLE_PROGRESS_BARS``: read when
  ``huggingface_hub`` / ``datasets`` are imported (by lerobot);
* the ROS 2 values: read when the rclpy context is initialised.

So an entry point calls it first thing in its ``main``, and its module imports none of these
libraries at module level (``robopolicy.cli`` and the node modules import them lazily); a
script that cannot (a bench) calls it at the top, above its imports.
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
