"""Statistics shared by evaluation, export and deployment reports.

* :func:`wilson_interval`: the 95 % interval of a success rate (``robopolicy eval``, the
  demo report, ``robopolicy deploy``);
* :func:`percentiles`: the p50 / p99 (or any) percentiles of a sample: chunk inference
  latency in evaluation, call latency in export, control-loop timing on the robot.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import numpy as np


def wilson_interval(successes: int, n: int, z: float = 1.96) -> tuple[float, float]:
    """Wilson score interval for a binomial proportion."""
    if n == 0:
        return (0.0, 1.0)
    p = successes / n
    denom = 1 + z * z / n
    centre = (p + z * z / (2 * n)) / denom
    half = z * math.sqrt(p * (1 - p) / n + z * z / (4 * n * n)) / denom
    return (max(0.0, centre - half), min(1.0, centre + half))


def percentiles(values: np.ndarray | Sequence[float], qs: Sequence[float] = (50, 99)) -> tuple[float, ...]:
    """The ``qs`` percentiles of ``values`` (numpy's linear interpolation), as Python floats."""
    return tuple(float(np.percentile(values, q)) for q in qs)
