"""Simulated tasks (gymnasium API over MuJoCo / robosuite) and their scripted experts."""

from robopolicy.sim.base import Randomization, RobopolicyEnv
from robopolicy.sim.registry import env_names, make_env, make_expert

__all__ = ["Randomization", "RobopolicyEnv", "env_names", "make_env", "make_expert"]
