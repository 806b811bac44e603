"""``robopolicy dataset info`` and ``robopolicy dataset plot``."""

from __future__ import annotations

from pathlib import Path

import numpy as np

from robopolicy.data.reader import dataset_spec, load_arrays, open_dataset, read_robopolicy_meta
from robopolicy.errors import DatasetError
from robopolicy.media import write_video


def _fmt(values: list[float]) -> str:
    if len(values) > 8:
        return f"[{min(values):+.3f} .. {max(values):+.3f}] over {len(values)} dims"
    return "[" + ", ".join(f"{v:+.3f}" for v in values) + "]"


def dataset_info(path: Path) -> str:
    """A human-readable summary: episodes, frames, fps, features, tasks, per-feature ranges."""
    ds = open_dataset(path)
    spec = dataset_spec(ds)
    meta = read_robopolicy_meta(path)
    lines = [
        f"dataset   {Path(path).resolve()}",
        f"format    LeRobotDataset {ds.meta.info.get('codebase_version', '?')}"
        + (f"  (recorded from env {meta['env']!r}, {meta.get('source', '')})" if meta.get("env")
           else f"  ({meta['source']})" if meta.get("source") else ""),
        f"episodes  {ds.meta.total_episodes}",
        f"frames    {ds.meta.total_frames}  ({ds.meta.total_frames / ds.meta.fps:.1f} s at {ds.meta.fps} fps)",
        "tasks     " + "; ".join(repr(t) for t in spec.tasks),
        "features",
    ]
    width = max(len(k) for k in spec.features)
    for key, feat in spec.features.items():
        storage = ds.meta.features[key]["dtype"]
        lines.append(f"  {key:<{width}}  {storage:<8} {str(tuple(feat.shape)):<14}")
        if feat.stats is not None:
            lines.append(f"  {'':<{width}}    min {_fmt(feat.stats.min)}")
            lines.append(f"  {'':<{width}}    max {_fmt(feat.stats.max)}")
        if feat.names:
            lines.append(f"  {'':<{width}}    names {', '.join(map(str, feat.names))}")
    return "\n".join(lines)


def plot_episode(path: Path, episode: int, out: Path) -> list[Path]:
    """Plot state and action of one episode to ``out`` (PNG); images also go to an MP4."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    ds = open_dataset(path)
    if not 0 <= episode < ds.meta.total_episodes:
        raise DatasetError(f"--episode {episode} is out of range: {path} has episodes 0..{ds.meta.total_episodes - 1}")
    spec = dataset_spec(ds)
    low_dim = [f for f in spec.features.values() if f.kind != "image"]
    images = [f.name for f in spec.image_features]
    arrays = load_arrays(ds, [f.name for f in low_dim] + images)
    s, e = int(arrays.episode_starts[episode]), int(arrays.episode_ends[episode])
    t = np.arange(e - s) / ds.meta.fps

    fig, axes = plt.subplots(len(low_dim), 1, figsize=(10, 2.6 * len(low_dim)), sharex=True, squeeze=False)
    for ax, feat in zip(axes[:, 0], low_dim):
        values = arrays.data[feat.name][s:e]
        names = feat.names or [str(i) for i in range(values.shape[1])]
        for i in range(values.shape[1]):
            ax.plot(t, values[:, i], label=str(names[i]) if i < len(names) else str(i), lw=1.2)
        ax.set_ylabel(feat.name.replace("observation.", "obs."))
        ax.grid(alpha=0.3)
        ax.legend(fontsize=7, ncol=min(values.shape[1], 7), loc="upper right")
    axes[-1, 0].set_xlabel("time [s]")
    task = arrays.tasks[arrays.task_index[s]] if arrays.tasks else ""
    fig.suptitle(f"{Path(path).name} — episode {episode} ({e - s} frames) — {task}")
    fig.tight_layout()
    out = Path(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(out, dpi=110)
    plt.close(fig)
    written = [out]
    for key in images:
        video = out.with_name(f"{out.stem}_{key.split('.')[-1]}.mp4")
        write_video(video, arrays.data[key][s:e], fps=int(ds.meta.fps))
        written.append(video)
    return written
