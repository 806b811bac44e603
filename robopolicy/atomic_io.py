"""Atomic file and directory replacement.

A dataset or checkpoint on disk is either the old version or the new one, never a
half-written mix: new content is written beside the target and swapped in with one
``rename`` (files) or ``renameat2(RENAME_EXCHANGE)`` (directories).
"""

from __future__ import annotations

import contextlib
import ctypes
import ctypes.util
import json
import os
import shutil
from pathlib import Path
from typing import Any

_RENAME_EXCHANGE = 2
_AT_FDCWD = -100
_libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6", use_errno=True)


def _fsync_dir(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def write_bytes_atomic(path: Path, data: bytes) -> None:
    """Write ``data`` to ``path`` via a temporary sibling, fsync and rename."""
    path = Path(path)
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    with open(tmp, "wb") as f:
        f.write(data)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)
    _fsync_dir(path.parent)


def write_json_atomic(path: Path, obj: Any) -> None:
    write_bytes_atomic(path, (json.dumps(obj, indent=2, sort_keys=False) + "\n").encode())


def exchange_dirs(a: Path, b: Path) -> None:
    """Atomically swap two existing directories (Linux ``renameat2``).

    Falls back to two renames where the kernel or filesystem lacks RENAME_EXCHANGE;
    :func:`recover_swap` repairs the tiny window that fallback leaves.
    """
    renameat2 = getattr(_libc, "renameat2", None)
    if renameat2 is not None:
        rc = renameat2(_AT_FDCWD, os.fsencode(a), _AT_FDCWD, os.fsencode(b), _RENAME_EXCHANGE)
        if rc == 0:
            _fsync_dir(Path(a).parent)
            return
    tmp = Path(b).with_name(Path(b).name + ".swap")
    os.rename(b, tmp)
    os.rename(a, b)
    os.rename(tmp, a)


def recover_swap(target: Path) -> None:
    """Finish a fallback swap that was killed between its renames."""
    swap = target.with_name(target.name + ".swap")
    if swap.exists() and not target.exists():
        os.rename(swap, target)
    elif swap.exists():
        shutil.rmtree(swap, ignore_errors=True)


def replace_dir(staged: Path, target: Path) -> None:
    """Make ``staged`` the new ``target``; the previous target is deleted."""
    if target.exists():
        exchange_dirs(staged, target)
        shutil.rmtree(staged, ignore_errors=True)
    else:
        os.rename(staged, target)
        _fsync_dir(target.parent)


def remove_quietly(path: Path) -> None:
    with contextlib.suppress(FileNotFoundError):
        if Path(path).is_dir():
            shutil.rmtree(path)
        else:
            Path(path).unlink()
