"""Training curves as PNG (what people look at instead of reading logs)."""

from __future__ import annotations

from pathlib import Path

from robopolicy.atomic_io import write_bytes_atomic


def plot_curves(history: dict[str, list[list[float]]], out: Path, title: str) -> None:
    """Loss (log scale) and learning rate vs step; eval success on a second axis if any."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    if not history.get("loss"):
        return
    fig, (ax_loss, ax_lr) = plt.subplots(2, 1, figsize=(8, 5.5), sharex=True, height_ratios=[3, 1])
    steps, loss = zip(*history["loss"])
    ax_loss.plot(steps, loss, color="tab:blue", label="loss (EMA-smoothed)")
    ax_loss.set_yscale("log")
    ax_loss.set_ylabel("training loss")
    ax_loss.grid(alpha=0.3, which="both")
    if history.get("success"):
        ax_s = ax_loss.twinx()
        s_steps, success = zip(*history["success"])
        ax_s.plot(s_steps, [100 * s for s in success], "o-", color="tab:green", label="eval success")
        ax_s.set_ylabel("eval success [%]")
        ax_s.set_ylim(-5, 105)
    ax_loss.legend(loc="upper right")
    lr_steps, lr = zip(*history["lr"])
    ax_lr.plot(lr_steps, lr, color="tab:orange")
    ax_lr.set_ylabel("lr")
    ax_lr.set_xlabel("step")
    ax_lr.grid(alpha=0.3)
    fig.suptitle(title)
    save_figure(fig, out)


def save_figure(fig, out: Path) -> None:
    """Write a matplotlib figure as PNG atomically (a reader never sees half a file) and close it."""
    import io

    import matplotlib.pyplot as plt

    fig.tight_layout()
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=100)
    plt.close(fig)
    write_bytes_atomic(Path(out), buf.getvalue())
