"""Headless RGB cameras over a MuJoCo model, tuned for software GL.

On llvmpipe the shadow map, reflections and the skybox dominate a small frame, so they are
turned off; collision geoms (group 0) are hidden so only the visual meshes are drawn.
Frames are upright ``(H, W, 3)`` uint8 (row 0 is the top of the image).
"""

from __future__ import annotations

import atexit
import weakref

import mujoco
import numpy as np

from robopolicy.errors import RobopolicyError

#: Largest accepted square image side; beyond that software rendering is impractical.
MAX_IMAGE_SIZE = 1024
_OFF_FLAGS = (mujoco.mjtRndFlag.mjRND_SHADOW, mujoco.mjtRndFlag.mjRND_REFLECTION, mujoco.mjtRndFlag.mjRND_SKYBOX)
# Renderers still open at exit. MuJoCo terminates the EGL display in an atexit hook that it
# registers with the first GL context; ours is registered after it, so it runs first (LIFO)
# and frees the contexts while the display is alive (else teardown prints EGL errors).
_OPEN: "weakref.WeakSet[Cameras]" = weakref.WeakSet()
_exit_hook = False


def _close_open() -> None:
    for cameras in list(_OPEN):
        cameras.close()


def model_cameras(model: mujoco.MjModel) -> list[str]:
    """Names of the cameras defined in ``model``."""
    return [model.camera(i).name for i in range(model.ncam)]


class Cameras:
    """Renders the named model cameras at ``size`` x ``size``; validates both up front."""

    def __init__(self, model: mujoco.MjModel, data: mujoco.MjData, names: tuple[str, ...], size: int,
                 owner: str = "env") -> None:
        known = model_cameras(model)
        unknown = [n for n in names if n not in known]
        if unknown:
            raise RobopolicyError(f"{owner}: unknown camera(s) {unknown}; this scene has: {', '.join(known)}")
        if len(set(names)) != len(names):
            raise RobopolicyError(f"{owner}: duplicate camera names in {list(names)}")
        if not isinstance(size, (int, np.integer)) or not 1 <= size <= MAX_IMAGE_SIZE:
            raise RobopolicyError(f"{owner}: image_size must be an int in [1, {MAX_IMAGE_SIZE}], got {size!r}")
        self.names = tuple(names)
        self.size = int(size)
        self._data = data
        self._renderer: mujoco.Renderer | None = None
        if self.names:
            model.vis.global_.offwidth = max(model.vis.global_.offwidth, self.size)
            model.vis.global_.offheight = max(model.vis.global_.offheight, self.size)
            self._renderer = mujoco.Renderer(model, self.size, self.size)
            _OPEN.add(self)
            global _exit_hook
            if not _exit_hook:
                atexit.register(_close_open)
                _exit_hook = True
            self._option = mujoco.MjvOption()
            self._option.geomgroup[0] = 0

    def render(self) -> dict[str, np.ndarray]:
        """One frame per camera, keyed by camera name."""
        frames: dict[str, np.ndarray] = {}
        if self._renderer is None:
            return frames
        for name in self.names:
            self._renderer.update_scene(self._data, camera=name, scene_option=self._option)
            for flag in _OFF_FLAGS:
                self._renderer.scene.flags[flag] = False
            frames[name] = self._renderer.render()
        return frames

    def close(self) -> None:
        """Free the GL context (safe to call twice)."""
        if self._renderer is not None:
            self._renderer.close()
            self._renderer = None
            _OPEN.discard(self)
