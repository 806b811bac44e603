"""Process defaults are applied by the entry points, never by importing the package."""

import os
import subprocess
import sys

from robopolicy.process_defaults import DEFAULTS

_CHECK = """
import os, sys
before = dict(os.environ)
import robopolicy, robopolicy.cli, robopolicy.real.policy_node, robopolicy.real.sim_bridge, robopolicy.real.record
assert dict(os.environ) == before, "importing changed the environment"
try:
    robopolicy.cli.main(["--version"])
except SystemExit:
    pass
print(sorted(k for k in os.environ if k not in before))
"""


def test_import_changes_nothing_and_the_cli_applies_the_defaults() -> None:
    env = {k: v for k, v in os.environ.items() if k not in DEFAULTS}
    out = subprocess.run([sys.executable, "-c", _CHECK], env=env, capture_output=True, text=True, check=True)
    assert out.stdout.strip().splitlines()[-1] == str(sorted(DEFAULTS))
