"""Where the package's data files live: inside the package (``robopolicy/assets``), so a wheel works.

They are found through :mod:`importlib.resources`, never through the repository root:

* ``assets/sim``: the MJCF scenes of the own-MJCF envs (``push``, ``multitask``).
* ``assets/real/config``: the ROS 2 files the package reads at run time (the loopback Fast DDS
  profile, the ``deploy --sim`` default node parameters). The ROS 2 package ``real/`` links its
  ``config/`` entries of the same names here, so both read one file.
"""

import atexit
import os
from contextlib import ExitStack
from importlib.resources import as_file, files
from importlib.resources.abc import Traversable
from pathlib import Path

#: The package's data folder as an :mod:`importlib.resources` traversable.
ASSETS: Traversable = files("robopolicy") / "assets"

_on_disk_files = ExitStack()
atexit.register(_on_disk_files.close)


def on_disk(resource: Traversable) -> Path:
    """A file-system path for a packaged resource, valid for the life of the process.

    The resource itself for an unpacked install (wheel or editable); a temporary copy if the
    package is imported from a zip file. MuJoCo and ROS 2 take paths, not streams.
    """
    return _on_disk_files.enter_context(as_file(resource))


#: MJCF scenes (``push.xml`` includes ``push_scene.xml`` from the same folder).
SIM_ASSETS = Path(os.environ["ROBOPOLICY_SIM_ASSETS"]) if os.environ.get("ROBOPOLICY_SIM_ASSETS") \
    else on_disk(ASSETS / "sim")
#: The run-time files of the ROS 2 package (``config/``), as shipped inside the Python package.
REAL_PACKAGE = on_disk(ASSETS / "real")
#: The Fast DDS profile that keeps ROS 2 traffic on loopback.
FASTDDS_PROFILE = REAL_PACKAGE / "config" / "fastdds_loopback.xml"

#: ROS 2 node parameter files in real/config for the envs that have one (shipped in the package).
DEPLOY_PARAMS = {"lift": "panda.yaml", "push": "push.yaml", "multitask": "multitask.yaml"}


def deploy_params(env: str) -> Path | None:
    """The parameter file ``robopolicy deploy --sim env`` uses when ``--params`` is omitted, if any."""
    name = DEPLOY_PARAMS.get(env)
    return REAL_PACKAGE / "config" / name if name else None
