"""Where the repository's data folders live (the package is installed editable)."""

import os
from pathlib import Path

REPO_ROOT = Path(__file__).resolve().parent.parent
SIM_ASSETS = Path(os.environ.get("ROBOPOLICY_SIM_ASSETS", REPO_ROOT / "sim"))
REAL_PACKAGE = REPO_ROOT / "real"
