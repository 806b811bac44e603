"""Teleoperation input: keyboard and gamepad events -> the env's action and episode commands.

Pure logic (no GUI, no ROS) plus the keyboard sources; the gamepad source (``sensor_msgs/Joy``
over ROS 2) is :class:`robopolicy.real.joy.JoySource`. A source's ``poll(timeout_s)`` returns
the events that arrived (:class:`KeyPress`, :class:`JoyInput`); a :class:`Teleoperator`
turns them into the action sent at each env step and into episode :class:`Command` s.

Keys (both keyboards deliver presses only, no releases, so motion keys are *sticky*: each
press moves that action dimension's command one step towards the key's direction, and the
command holds until changed; space stops all motion):

* push-like envs (action ``pusher_vx_cmd, pusher_vy_cmd``): ``d``/``a`` +x/-x, ``w``/``s`` +y/-y;
* robosuite OSC tasks (action ``delta_x .. delta_rz, gripper``): ``w``/``s`` +x/-x,
  ``a``/``d`` +y/-y, ``r``/``f`` +z/-z, ``i``/``k`` +rx/-rx, ``j``/``l`` +ry/-ry,
  ``u``/``o`` +rz/-rz, ``g`` toggles the gripper (open/closed);
* any other Box action: a key pair per dimension, ``1``/``q`` for dimension 0, ``2``/``w``
  for 1, ... ``0``/``p`` for 9, then ``z``/``a`` ... (up to 19 dimensions);
* always: space stop, Enter save the episode, Backspace discard it, Esc quit.

Gamepad (``--joy TOPIC``): sticks are velocities (per-layout default axes), with a dead-man
button (LB, button 4) that must be held and a dead zone; buttons A (0) save, B (1) discard,
X (2) toggles the gripper, Back (6) quits. Axes older than ``timeout_s`` count as released.
"""

from __future__ import annotations

import enum
import os
import select
import subprocess
import sys
import time
from dataclasses import dataclass, field
from typing import Callable, Iterable, Protocol, Union

import numpy as np

from robopolicy.errors import RobopolicyError


class Command(enum.Enum):
    SAVE = "save"
    DISCARD = "discard"
    QUIT = "quit"
    STOP = "stop"


#: Keys with the same meaning in every layout.
CONTROL_KEYS = {"enter": Command.SAVE, "backspace": Command.DISCARD, "esc": Command.QUIT, "space": Command.STOP}


@dataclass(frozen=True)
class KeyPress:
    key: str  # a lower-case character, or enter / backspace / esc / space


@dataclass(frozen=True)
class JoyInput:
    axes: tuple[float, ...]
    buttons: tuple[int, ...]
    received: float  # time.monotonic() when it arrived


Event = Union[KeyPress, JoyInput]


# ---- key layouts -------------------------------------------------------------------------
@dataclass(frozen=True)
class KeyLayout:
    """``bindings``: key -> (action dimension, +1 / -1); ``toggles``: key -> dimension
    switched between its low and high bound (a gripper); ``step``: command change per press
    (a fraction of the dimension's half-range)."""

    name: str
    bindings: dict[str, tuple[int, int]]
    toggles: dict[str, int] = field(default_factory=dict)
    step: float = 0.5

    def help(self, names: list[str]) -> str:
        by_dim: dict[int, list[str]] = {}
        for key, (dim, sign) in self.bindings.items():
            by_dim.setdefault(dim, ["", ""])[0 if sign > 0 else 1] = key
        parts = [f"{plus}/{minus} {names[d]} +/-" for d, (plus, minus) in sorted(by_dim.items())]
        parts += [f"{k} toggle {names[d]}" for k, d in self.toggles.items()]
        return (f"keys ({self.name} layout, step {self.step:g} per press, sticky): " + ", ".join(parts)
                + "; space stop, Enter save episode, Backspace discard, Esc quit")


PLANAR_NAMES = ["pusher_vx_cmd", "pusher_vy_cmd"]
OSC_NAMES = ["delta_x", "delta_y", "delta_z", "delta_rx", "delta_ry", "delta_rz"]
_GENERIC_PLUS = "1234567890zxcvbnm,."
_GENERIC_MINUS = "qwertyuiopasdfghjkl"


def key_layout(action_names: list[str], step: float | None = None) -> KeyLayout:
    """The default layout for an action (by its per-dimension names)."""
    names = list(action_names)
    if names == PLANAR_NAMES:
        return KeyLayout("planar", {"d": (0, 1), "a": (0, -1), "w": (1, 1), "s": (1, -1)}, step=step or 0.5)
    if names[:6] == OSC_NAMES:
        pairs = ("ws", "ad", "rf", "ik", "jl", "uo")
        bindings = {p[i]: (d, 1 - 2 * i) for d, p in enumerate(pairs) for i in (0, 1)}
        toggles = {"g": 6} if len(names) > 6 and names[6] == "gripper" else {}
        if len(names) > 6 + len(toggles):
            raise RobopolicyError(f"teleop: OSC action with unexpected extra dimensions {names[6:]}")
        return KeyLayout("osc", bindings, toggles, step=step or 0.25)
    if len(names) > len(_GENERIC_PLUS):
        raise RobopolicyError(f"teleop: the keyboard drives at most {len(_GENERIC_PLUS)} action dimensions, "
                              f"this action has {len(names)}; use a gamepad (--joy)")
    bindings = {}
    for d in range(len(names)):
        bindings[_GENERIC_PLUS[d]] = (d, 1)
        bindings[_GENERIC_MINUS[d]] = (d, -1)
    return KeyLayout("generic", bindings, step=step or 0.25)


# ---- gamepad mapping ---------------------------------------------------------------------
@dataclass(frozen=True)
class JoyMap:
    """``axes``: per action dimension ``(axis index, scale)`` (index -1: not driven);
    ``toggles``: button -> dimension toggled low/high; ``buttons``: button -> command;
    ``deadman``: a button that must be held for the axes to act (None: none)."""

    axes: tuple[tuple[int, float], ...]
    toggles: dict[int, int] = field(default_factory=dict)
    buttons: dict[int, Command] = field(default_factory=lambda: {0: Command.SAVE, 1: Command.DISCARD,
                                                                 6: Command.QUIT})
    deadman: int | None = 4
    deadzone: float = 0.1
    timeout_s: float = 0.5

    def help(self, names: list[str]) -> str:
        parts = [f"axis {a} (x{s:g}) -> {names[d]}" for d, (a, s) in enumerate(self.axes) if a >= 0]
        parts += [f"button {b} toggle {names[d]}" for b, d in self.toggles.items()]
        parts += [f"button {b} {c.value}" for b, c in self.buttons.items()]
        held = f"hold button {self.deadman} (dead-man) to move; " if self.deadman is not None else ""
        return f"gamepad: {held}" + ", ".join(parts) + f"; dead zone {self.deadzone:g}"


def joy_map(action_names: list[str], layout: KeyLayout) -> JoyMap:
    """The default gamepad mapping for an action (Xbox-style joy_linux axis order: 0/1 left
    stick x/y, 3/4 right stick x/y; left and up are positive)."""
    n = len(action_names)
    if layout.name == "planar":
        return JoyMap(((0, -1.0), (1, 1.0)))
    if layout.name == "osc":
        axes = [(1, 0.5), (0, 0.5), (4, 0.5), (-1, 0.0), (-1, 0.0), (3, -0.5)]
        return JoyMap(tuple(axes + [(-1, 0.0)] * (n - 6)), toggles={2: 6} if layout.toggles else {})
    return JoyMap(tuple((d, 1.0) if d < 8 else (-1, 0.0) for d in range(n)))


def apply_deadzone(v: float, deadzone: float) -> float:
    if abs(v) <= deadzone:
        return 0.0
    return float(np.sign(v) * (abs(v) - deadzone) / (1.0 - deadzone))


# ---- events -> action + commands ---------------------------------------------------------
class Teleoperator:
    """The action the operator commands, from key presses and gamepad messages.

    Keys change a sticky command; the gamepad's axes (while fresh and the dead-man is held)
    add to it; the result is clipped to the action bounds. ``moved`` turns true at the first
    motion input after :meth:`reset` (an episode starts recording then)."""

    def __init__(self, layout: KeyLayout, low: np.ndarray, high: np.ndarray, joy: JoyMap | None = None) -> None:
        self.layout, self.joy_map = layout, joy
        self.low, self.high = np.asarray(low, np.float32), np.asarray(high, np.float32)
        self._half = (self.high - self.low) / 2.0
        self.reset()

    def reset(self) -> None:
        self.command = np.zeros_like(self.low)
        self.toggled = np.zeros(len(self.low), dtype=bool)
        for dim in self._toggle_dims():
            self.command[dim] = self.low[dim]  # gripper open
        self.moved = False
        self._joy: JoyInput | None = None
        self._joy_buttons: tuple[int, ...] = ()

    def _toggle_dims(self) -> set[int]:
        dims = set(self.layout.toggles.values())
        if self.joy_map is not None:
            dims |= set(self.joy_map.toggles.values())
        return dims

    def _toggle(self, dim: int) -> None:
        self.toggled[dim] = not self.toggled[dim]
        self.command[dim] = self.high[dim] if self.toggled[dim] else self.low[dim]
        self.moved = True

    def handle(self, events: Iterable[Event]) -> list[Command]:
        """Apply ``events`` in order; return the episode commands among them."""
        commands: list[Command] = []
        for ev in events:
            if isinstance(ev, KeyPress):
                commands += self._key(ev.key)
            else:
                commands += self._joy_event(ev)
        return commands

    def _key(self, key: str) -> list[Command]:
        if key in CONTROL_KEYS:
            cmd = CONTROL_KEYS[key]
            if cmd is Command.STOP:
                keep = list(self._toggle_dims())
                held = self.command[keep].copy()
                self.command[:] = 0.0
                self.command[keep] = held
            return [cmd]
        if key in self.layout.toggles:
            self._toggle(self.layout.toggles[key])
        elif key in self.layout.bindings:
            dim, sign = self.layout.bindings[key]
            value = self.command[dim] + sign * self.layout.step * self._half[dim]
            self.command[dim] = np.clip(value, self.low[dim], self.high[dim])
            self.moved = True
        return []

    def _joy_event(self, ev: JoyInput) -> list[Command]:
        jm = self.joy_map
        if jm is None:
            return []
        prev = self._joy_buttons
        self._joy, self._joy_buttons = ev, ev.buttons
        pressed = [b for b, v in enumerate(ev.buttons) if v and not (b < len(prev) and prev[b])]
        commands = []
        for b in pressed:
            if b in jm.toggles:
                self._toggle(jm.toggles[b])
            if b in jm.buttons:
                commands.append(jm.buttons[b])
        if np.any(self._joy_axes(ev.received)):
            self.moved = True
        return commands

    def _joy_axes(self, now: float) -> np.ndarray:
        out = np.zeros_like(self.low)
        jm, ev = self.joy_map, self._joy
        if jm is None or ev is None or now - ev.received > jm.timeout_s:
            return out
        if jm.deadman is not None and not (jm.deadman < len(ev.buttons) and ev.buttons[jm.deadman]):
            return out
        for dim, (axis, scale) in enumerate(jm.axes):
            if 0 <= axis < len(ev.axes):
                out[dim] = scale * apply_deadzone(float(ev.axes[axis]), jm.deadzone) * self._half[dim]
        return out

    def action(self, now: float | None = None) -> np.ndarray:
        """The action to send now (``now``: ``time.monotonic()``, for the gamepad's staleness)."""
        now = time.monotonic() if now is None else now
        return np.clip(self.command + self._joy_axes(now), self.low, self.high).astype(np.float32)


# ---- sources -----------------------------------------------------------------------------
class InputSource(Protocol):
    name: str
    #: True when ``poll`` waits up to ``timeout_s`` for input (keyboards); the loop paces itself
    #: on it. A non-blocking source (the gamepad) returns at once.
    blocking: bool

    def poll(self, timeout_s: float) -> list[Event]: ...

    def close(self) -> None: ...


class ScriptedKeys:
    """Key events from a script (tests, replays): one entry per poll, each a list of keys, or
    a function ``tick -> keys``. When the script ends it sends Esc (quit)."""

    name = "script"
    blocking = True  # like a keyboard: one entry per control tick

    def __init__(self, script: Iterable[Iterable[str]] | Callable[[int], Iterable[str] | None]) -> None:
        self._fn = script if callable(script) else None
        self._it = None if callable(script) else iter(script)
        self.tick = 0

    def poll(self, timeout_s: float) -> list[Event]:
        if timeout_s > 0:
            time.sleep(timeout_s)
        self.tick += 1
        keys = self._fn(self.tick - 1) if self._fn is not None else next(self._it, None)  # type: ignore[arg-type]
        if keys is None:
            return [KeyPress("esc")]
        return [KeyPress(k) for k in keys]

    def close(self) -> None:
        pass


def _key_name(code: int) -> str | None:
    if code < 0:
        return None
    code &= 0xFF
    return {13: "enter", 10: "enter", 8: "backspace", 127: "backspace", 27: "esc", 32: "space"}.get(
        code, chr(code).lower() if 33 <= code < 127 else None)


def _parse_terminal(data: bytes) -> list[str]:
    keys, i = [], 0
    while i < len(data):
        b = data[i]
        if b == 0x1B and i + 1 < len(data) and data[i + 1] in b"[O":  # an escape sequence (arrows...)
            i += 2
            while i < len(data) and not (0x40 <= data[i] <= 0x7E):
                i += 1
            i += 1
            continue
        name = _key_name(b)
        if name:
            keys.append(name)
        i += 1
    return keys


class TerminalKeyboard:
    """Keys from a terminal in cbreak mode (no echo, no line buffering); restored on close."""

    name = "terminal"
    blocking = True

    def __init__(self, fd: int | None = None) -> None:
        import termios
        import tty

        self.fd = sys.stdin.fileno() if fd is None else fd
        self._saved = termios.tcgetattr(self.fd)
        tty.setcbreak(self.fd)

    def poll(self, timeout_s: float) -> list[Event]:
        ready, _, _ = select.select([self.fd], [], [], max(timeout_s, 0.0))
        if not ready:
            return []
        return [KeyPress(k) for k in _parse_terminal(os.read(self.fd, 256))]

    def close(self) -> None:
        import termios

        if self._saved is not None:
            termios.tcsetattr(self.fd, termios.TCSADRAIN, self._saved)
            self._saved = None


class WindowKeyboard:
    """An OpenCV window: shows the camera view (:meth:`show`) and reads keys with waitKey."""

    name = "window"
    blocking = True
    title = "robopolicy teleop"

    def __init__(self) -> None:
        import cv2

        self._cv2 = cv2
        cv2.namedWindow(self.title, cv2.WINDOW_AUTOSIZE)
        self._shown = False

    def show(self, frame: np.ndarray, lines: list[str]) -> None:
        cv2 = self._cv2
        img = cv2.cvtColor(np.ascontiguousarray(frame), cv2.COLOR_RGB2BGR)
        if img.shape[0] < 320:
            scale = 320 / img.shape[0]
            img = cv2.resize(img, None, fx=scale, fy=scale, interpolation=cv2.INTER_NEAREST)
        for i, line in enumerate(lines):
            y = 18 + 18 * i
            cv2.putText(img, line, (6, y), cv2.FONT_HERSHEY_SIMPLEX, 0.45, (0, 0, 0), 3, cv2.LINE_AA)
            cv2.putText(img, line, (6, y), cv2.FONT_HERSHEY_SIMPLEX, 0.45, (255, 255, 255), 1, cv2.LINE_AA)
        cv2.imshow(self.title, img)
        self._shown = True

    def poll(self, timeout_s: float) -> list[Event]:
        cv2 = self._cv2
        name = _key_name(cv2.waitKey(max(1, int(timeout_s * 1000))))
        if self._shown and cv2.getWindowProperty(self.title, cv2.WND_PROP_VISIBLE) < 1:
            return [KeyPress("esc")]  # the window was closed
        return [KeyPress(name)] if name else []

    def close(self) -> None:
        try:
            self._cv2.destroyWindow(self.title)
            self._cv2.waitKey(1)
        except Exception:  # noqa: BLE001 - already gone
            pass


def window_unavailable() -> str | None:
    """Why an OpenCV window cannot open here (None: it can). Qt aborts the whole process when
    it cannot reach a display, so a display that is named is probed in a child process."""
    if not (os.environ.get("DISPLAY") or os.environ.get("WAYLAND_DISPLAY")):
        return "no display (DISPLAY and WAYLAND_DISPLAY are unset)"
    probe = "import cv2; cv2.namedWindow('probe'); cv2.waitKey(1); cv2.destroyAllWindows()"
    try:
        r = subprocess.run([sys.executable, "-c", probe], capture_output=True, text=True, timeout=30)
    except subprocess.TimeoutExpired:
        return "opening an OpenCV window timed out"
    if r.returncode != 0:
        lines = [line.strip() for line in r.stderr.splitlines() if line.strip()] or ["failed"]
        last = next((line for line in lines if "could not connect" in line.lower()), lines[0])
        return f"OpenCV cannot open a window on display {os.environ.get('DISPLAY') or os.environ.get('WAYLAND_DISPLAY')!r}: {last}"
    return None


KEYBOARDS = ("auto", "window", "terminal", "none")


def open_keyboard(kind: str, have_joy: bool) -> InputSource | None:
    """The keyboard source ``kind`` (``auto``: the window where a display exists, else the
    terminal); None for ``none``. A clear error when none can open and there is no gamepad."""
    if kind not in KEYBOARDS:
        raise RobopolicyError(f"--keyboard must be one of {', '.join(KEYBOARDS)}, got {kind!r}")
    if kind == "none":
        if not have_joy:
            raise RobopolicyError("--keyboard none needs a gamepad: give --joy TOPIC")
        return None
    why_window = window_unavailable() if kind in ("auto", "window") else "not asked for"
    if why_window is None:
        return WindowKeyboard()
    if kind == "window":
        raise RobopolicyError(f"cannot open the teleop window: {why_window}")
    if sys.stdin.isatty():
        return TerminalKeyboard()
    if kind == "terminal":
        raise RobopolicyError("--keyboard terminal: stdin is not a terminal")
    if have_joy:
        return None
    raise RobopolicyError(
        f"teleop needs a keyboard: {why_window} for the OpenCV window, and stdin is not a terminal; run it in a "
        "terminal or a desktop session, or drive it from a gamepad with --joy TOPIC")
