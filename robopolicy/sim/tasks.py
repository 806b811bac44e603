"""Imports every built-in task module; each registers its envs and experts on import."""

from robopolicy.sim import push  # noqa: F401
from robopolicy.sim import robosuite_tasks  # noqa: F401
