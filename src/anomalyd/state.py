"""Watermarks: the end time of the last window scored, per series, in a small JSON file written atomically."""

from __future__ import annotations

import json
import logging
import os
import tempfile
from pathlib import Path

log = logging.getLogger(__name__)


class StateError(ValueError):
    """The state file exists but cannot be used."""


def fsync_dir(path: Path) -> None:
    """Make renames and creations inside directory ``path`` durable."""
    dir_fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(dir_fd)
    finally:
        os.close(dir_fd)


def atomic_write(path: Path, data: bytes, sync_dir: bool = True) -> None:
    """Write ``data`` to ``path`` so that a crash leaves either the old or the new file, never a mix.

    With ``sync_dir=False`` the caller syncs the directory itself (once for many files, see :func:`fsync_dir`).
    """
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    if sync_dir:
        fsync_dir(path.parent)


class Watermarks:
    """Per-series watermarks (epoch ns of the last scored window's last sample), persisted as JSON.

    Examples
    --------
    >>> import tempfile, pathlib
    >>> d = pathlib.Path(tempfile.mkdtemp())
    >>> w = Watermarks(d / "watermarks.json")
    >>> w.advance("cpu|host=h1", 32)
    >>> w.advance("cpu|host=h1", 16)   # never moves backwards
    >>> w.save()
    >>> Watermarks(d / "watermarks.json").get("cpu|host=h1")
    32
    """

    def __init__(self, path: Path) -> None:
        self.path = path
        self._marks: dict[str, int] = {}
        self._dirty = False
        if path.exists():
            try:
                raw = json.loads(path.read_text())
                marks = raw["watermarks"]
                self._marks = {str(k): int(v) for k, v in marks.items()}
            except (ValueError, KeyError, TypeError, AttributeError) as exc:
                raise StateError(f"state file {path} is corrupt ({exc}); move it aside to start from the "
                                 f"backlog limit, or restore it from a backup") from exc

    def get(self, series_id: str) -> int | None:
        return self._marks.get(series_id)

    def advance(self, series_id: str, end_ns: int) -> None:
        if end_ns > self._marks.get(series_id, -(2**63)):
            self._marks[series_id] = end_ns
            self._dirty = True

    def items(self) -> list[tuple[str, int]]:
        return list(self._marks.items())

    def save(self) -> None:
        if not self._dirty:
            return
        atomic_write(self.path, json.dumps({"version": 1, "watermarks": self._marks}, indent=0,
                                           sort_keys=True).encode())
        self._dirty = False
