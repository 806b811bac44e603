"""Where the repository's data folders live (the package is installed editable)."""

import os
from pathlib import Path

REPO_ROOT = Path(__file__).resolve().parent.parent
SIM_ASSETS = Path(os.environ.get("ROBOPOLICY_SIM_ASSETS", REPO_ROOT / "sim"))
REAL_PACKAGE = REPO_ROOT / "real"

#: ROS 2 node parameter files in real/config for the envs that have one.
DEPLOY_PARAMS = {"lift": "panda.yaml", "push": "push.yaml", "multitask": "multitask.yaml"}


def deploy_params(env: str) -> Path | None:
    """The parameter file ``robopolicy deploy --sim env`` uses when ``--params`` is omitted, if any."""
    name = DEPLOY_PARAMS.get(env)
    return REAL_PACKAGE / "config" / name if name else None
