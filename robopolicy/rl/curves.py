"""Learning curves of RL runs: success rate and return vs environment steps, as one PNG.

A run's ``history`` (kept in its JSON log) holds ``"eval"`` rows ``[env_steps, success_rate]``
(deterministic policy, fixed seeds) and ``"train"`` rows ``[env_steps, success_rate,
mean_return, episodes]`` over the last training episodes (with exploration noise).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from robopolicy.train.plots import save_figure


def plot_learning_curves(runs: dict[str, dict[str, Any]], out: Path, title: str) -> None:
    """One line per run (label -> history): eval and training success (top), training return (bottom)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (ax_s, ax_r) = plt.subplots(2, 1, figsize=(8, 6), sharex=True, height_ratios=[3, 2])
    colors = plt.rcParams["axes.prop_cycle"].by_key()["color"]
    for color, (label, history) in zip(colors, runs.items()):
        if history.get("eval"):
            steps, success = zip(*[(row[0], row[1]) for row in history["eval"]])
            ax_s.plot(steps, [100 * s for s in success], "o-", color=color, label=f"{label}: eval")
        if history.get("train"):
            steps, success, ret = zip(*[(row[0], row[1], row[2]) for row in history["train"]])
            ax_s.plot(steps, [100 * s for s in success], "--", color=color, alpha=0.6,
                      label=f"{label}: training episodes")
            ax_r.plot(steps, ret, color=color, label=label)
    ax_s.set_ylabel("success rate [%]")
    ax_s.set_ylim(-3, 103)
    ax_s.grid(alpha=0.3)
    ax_s.legend(loc="best", fontsize=8)
    ax_r.set_ylabel("episode return (training)")
    ax_r.set_xlabel("environment steps")
    ax_r.grid(alpha=0.3)
    fig.suptitle(title)
    save_figure(fig, out)
