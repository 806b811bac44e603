"""``robopolicy demo``: the whole pipeline on the default task (lift), with a report.

collect -> train -> eval_bc -> finetune -> eval_rl -> export -> eval_export -> deploy ->
report. Each stage writes under ``<out>/<stage>/`` through the project's Python API and
finishes with a ``done.json``; a re-run reuses finished, up-to-date stages (see
:mod:`robopolicy.demo.runner`). The report (``<out>/report/``) holds the summary table as
Markdown and JSON, the training and RL curves, the ROS 2 latency histogram and a rollout
video of the final policy.
"""

from robopolicy.demo.config import DEFAULT, QUICK, Budget, DemoConfig
from robopolicy.demo.runner import run_demo

__all__ = ["DEFAULT", "QUICK", "Budget", "DemoConfig", "run_demo"]
