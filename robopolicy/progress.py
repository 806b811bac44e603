"""Progress for long loops: a tqdm bar on a terminal, a plain line every few seconds in a log.

tqdm redraws its bar with a carriage return on every refresh; written to a file (CI, a
robot's journal, ``demo.sh > log``) that is one "line" per update, megabytes for a long
run. :func:`progress` keeps the bar where a person watches a terminal and otherwise writes
one line every ``interval`` seconds (count/total, rate, ETA, the postfix) and a final line
when the loop ends::

    train diffusion: 1200/5000 step (24%), 41.2 step/s, ETA 1m32s, loss=0.0312
    train diffusion: done 5000/5000 step in 2m01s, 41.3 step/s, loss=0.0127

Both kinds take the tqdm calls the loops use (``update``, ``update_to``, ``set_postfix``,
``write``, ``close``, iteration, a context manager), so a call site does not care which it
got. The log kind serializes its updates with a re-entrant lock (a signal handler or a
second thread may write while the loop updates).

Environment: ``ROBOPOLICY_PROGRESS`` = ``bar`` | ``log`` | ``off`` forces a kind (default:
``bar`` when the stream is a terminal, else ``log``); ``ROBOPOLICY_PROGRESS_INTERVAL`` sets
the seconds between log lines (default 10).
"""

from __future__ import annotations

import os
import sys
import threading
import time
from collections.abc import Iterable, Iterator, Mapping
from typing import IO, Any

from tqdm import tqdm

DEFAULT_INTERVAL_S = 10.0
_LOCK = threading.RLock()  # one for all log-kind progress and write(): lines never interleave
_active_bars = 0  # tqdm bars open in this process (write() then goes through tqdm.write)


def _interval_from_env() -> float:
    raw = os.environ.get("ROBOPOLICY_PROGRESS_INTERVAL", "")
    try:
        return max(float(raw), 0.0) if raw else DEFAULT_INTERVAL_S
    except ValueError:
        return DEFAULT_INTERVAL_S


def _is_tty(stream: IO[str]) -> bool:
    try:
        return bool(stream.isatty())
    except (AttributeError, ValueError, OSError):
        return False


def _format_value(v: Any) -> str:
    if isinstance(v, float):
        return tqdm.format_num(v)
    return str(v)


def _format_postfix(postfix: Mapping[str, Any]) -> str:
    return ", ".join(f"{k}={_format_value(v)}" for k, v in postfix.items())


class LogProgress:
    """The non-terminal kind: a line every ``interval`` seconds and one at the end."""

    def __init__(self, iterable: Iterable[Any] | None = None, *, total: float | None = None, initial: float = 0,
                 desc: str = "", unit: str = "it", file: IO[str] | None = None,
                 interval: float | None = None) -> None:
        if total is None and iterable is not None:
            try:
                total = len(iterable)  # type: ignore[arg-type]
            except TypeError:
                total = None
        self.iterable = iterable
        self.total = total
        self.n = initial
        self.initial = initial
        self.desc = desc
        self.unit = unit
        self.file = file
        self.interval = _interval_from_env() if interval is None else interval
        self.postfix: dict[str, Any] = {}
        self.start = self.last_line = time.monotonic()
        self.closed = False

    # -- the tqdm surface ---------------------------------------------------------------
    def __iter__(self) -> Iterator[Any]:
        if self.iterable is None:
            raise TypeError("this progress has no iterable")
        try:
            for item in self.iterable:
                yield item
                self.update(1)
        finally:
            self.close()

    def __enter__(self) -> LogProgress:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def update(self, n: float = 1) -> None:
        with _LOCK:
            self.n += n
            self._maybe_line()

    def update_to(self, n: float) -> None:
        """Set the count (for loops that poll a total rather than count steps)."""
        with _LOCK:
            self.n = n
            self._maybe_line()

    def set_postfix(self, ordered_dict: Mapping[str, Any] | None = None, refresh: bool = True,
                    **kwargs: Any) -> None:
        with _LOCK:
            self.postfix = {**(ordered_dict or {}), **kwargs}

    def set_description(self, desc: str, refresh: bool = True) -> None:
        with _LOCK:
            self.desc = desc

    def write(self, message: str, file: IO[str] | None = None) -> None:
        write(message, file=file if file is not None else self.file)

    def refresh(self) -> None:
        with _LOCK:
            self._line()

    def close(self) -> None:
        with _LOCK:
            if self.closed:
                return
            self.closed = True
            self._line(final=True)

    # -- lines ----------------------------------------------------------------------------
    def _maybe_line(self) -> None:
        if not self.closed and time.monotonic() - self.last_line >= self.interval:
            self._line()

    def _line(self, final: bool = False) -> None:
        now = time.monotonic()
        self.last_line = now
        elapsed = now - self.start
        done = self.n - self.initial
        rate = done / elapsed if elapsed > 0 else 0.0
        count = f"{_format_value(self.n)}/{_format_value(self.total)}" if self.total is not None \
            else _format_value(self.n)
        parts = [f"{'done ' if final else ''}{count} {self.unit}"]
        if not final and self.total:
            parts[0] += f" ({100.0 * self.n / self.total:.0f}%)"
        if final:
            parts[0] += f" in {tqdm.format_interval(elapsed)}"
        if rate >= 1.0 or rate == 0.0:
            parts.append(f"{tqdm.format_num(rate)} {self.unit}/s")
        else:
            parts.append(f"{tqdm.format_num(1.0 / rate)} s/{self.unit}")
        if not final and self.total is not None and rate > 0:
            parts.append(f"ETA {tqdm.format_interval(max(self.total - self.n, 0) / rate)}")
        if self.postfix:
            parts.append(_format_postfix(self.postfix))
        head = f"{self.desc}: " if self.desc else ""
        _print(head + ", ".join(parts), self.file)


class _Bar(tqdm):  # type: ignore[misc]
    """tqdm with ``update_to`` and a count of open bars (so :func:`write` knows to go through tqdm)."""

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        global _active_bars
        super().__init__(*args, **kwargs)
        if not self.disable:
            with _LOCK:
                _active_bars += 1
            self._counted = True

    def update_to(self, n: float) -> None:
        self.n = n
        self.refresh()

    def close(self) -> None:
        global _active_bars
        if getattr(self, "_counted", False):
            self._counted = False
            with _LOCK:
                _active_bars -= 1
        super().close()


class _Off:
    """``disable=True``: every call is accepted and nothing is written."""

    def __init__(self, iterable: Iterable[Any] | None = None, total: float | None = None, initial: float = 0) -> None:
        self.iterable, self.total, self.n = iterable, total, initial

    def __iter__(self) -> Iterator[Any]:
        return iter(self.iterable if self.iterable is not None else ())

    def __enter__(self) -> _Off:
        return self

    def __exit__(self, *exc: object) -> None:
        pass

    def update(self, n: float = 1) -> None:
        self.n += n

    def update_to(self, n: float) -> None:
        self.n = n

    def write(self, message: str, file: IO[str] | None = None) -> None:
        write(message, file=file)

    def set_postfix(self, *args: Any, **kwargs: Any) -> None:
        pass

    set_description = refresh = close = set_postfix


def progress(iterable: Iterable[Any] | None = None, *, total: float | None = None, initial: float = 0,
             desc: str = "", unit: str = "it", disable: bool = False, file: IO[str] | None = None,
             interval: float | None = None, mode: str | None = None) -> Any:
    """Progress over ``iterable`` (or counted by ``update``): see the module docstring.

    ``file`` defaults to ``sys.stderr`` (as tqdm). ``mode`` (``bar``/``log``/``off``)
    overrides the choice made from the stream and ``ROBOPOLICY_PROGRESS``.
    """
    mode = mode or os.environ.get("ROBOPOLICY_PROGRESS", "").strip().lower() or None
    if disable or mode == "off":
        return _Off(iterable, total, initial)
    stream = file if file is not None else sys.stderr
    if mode not in ("bar", "log"):
        mode = "bar" if _is_tty(stream) else "log"
    if mode == "bar":
        return _Bar(iterable, total=total, initial=initial, desc=desc or None, unit=unit, file=file,
                    dynamic_ncols=True)
    return LogProgress(iterable, total=total, initial=initial, desc=desc, unit=unit, file=file, interval=interval)


def _print(line: str, file: IO[str] | None) -> None:
    stream = file if file is not None else sys.stderr
    with _LOCK:
        stream.write(line + "\n")
        stream.flush()


def write(message: str, file: IO[str] | None = None) -> None:
    """Print a line without breaking an open bar (``tqdm.write``); default stream stdout, as tqdm's."""
    stream = file if file is not None else sys.stdout
    with _LOCK:
        if _active_bars:
            tqdm.write(message, file=stream)
            stream.flush()
        else:
            stream.write(message + "\n")
            stream.flush()
