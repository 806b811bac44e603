"""Writing rollout frames as video."""

from __future__ import annotations

from pathlib import Path

import numpy as np


def write_video(path: Path, frames: np.ndarray, fps: int) -> None:
    """Write uint8 ``[T, H, W, 3]`` frames as an H.264 MP4 (pyav)."""
    import av

    h, w = frames.shape[1:3]
    with av.open(str(path), mode="w") as container:
        stream = container.add_stream("libx264", rate=fps)
        stream.width, stream.height = w + w % 2, h + h % 2
        stream.pix_fmt = "yuv420p"
        for frame in frames:
            if w % 2 or h % 2:
                frame = np.pad(frame, ((0, h % 2), (0, w % 2), (0, 0)))
            for packet in stream.encode(av.VideoFrame.from_ndarray(np.ascontiguousarray(frame), format="rgb24")):
                container.mux(packet)
        for packet in stream.encode():
            container.mux(packet)
