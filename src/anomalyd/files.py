"""Durable files: write a whole file or nothing (temporary file, fsync, rename, fsync the directory)."""

from __future__ import annotations

import os
import tempfile
from collections.abc import Callable
from pathlib import Path
from typing import IO


def fsync_dir(path: Path) -> None:
    """Make renames and creations inside directory ``path`` durable."""
    dir_fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(dir_fd)
    finally:
        os.close(dir_fd)


def atomic_write(path: Path, data: bytes | Callable[[IO[bytes]], object], sync_dir: bool = True) -> None:
    """Write ``data`` to ``path`` so that a crash leaves either the old or the new file, never a mix.

    ``data`` is the bytes, or a function that writes them to the open file (a large file streamed without
    holding it in memory). With ``sync_dir=False`` the caller syncs the directory itself (once for many files,
    see :func:`fsync_dir`).
    """
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "wb") as f:
            if callable(data):
                data(f)
            else:
                f.write(data)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    if sync_dir:
        fsync_dir(path.parent)
