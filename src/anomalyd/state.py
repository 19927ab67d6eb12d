"""Persisted daemon state, written atomically: per-series watermarks (the end time of the last window scored)
and per-series score normalisers (the recent error history behind the ``score`` field)."""

from __future__ import annotations

import json
import logging
import os
import tempfile
import time
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any

import orjson

from .postprocess import ScoreNormaliser

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


class ScoreStates:
    """Per-series `ScoreNormaliser` state (see `anomalyd.postprocess`), kept in memory between ticks.

    It is soft state: the recent error history of each series, which the ``score`` field is computed from. It is
    saved (one JSON file for all series) at most every ``save_every_s`` seconds and on `close`, not on every
    tick, so that many series do not cost a large write per tick. After a crash the windows scored since the
    last save are missing from the history, which only shortens it. A normaliser is started afresh from the
    model's warm-up state when its model is retrained (the errors change scale), and when the file is corrupt
    (with a warning: the scores then need ``learning`` windows to settle again).

    Parameters
    ----------
    path : Path or None
        The JSON file; None keeps the state in memory only (backfills).
    save_every_s : float
        Smallest interval between two saves by `maybe_save`.
    """

    def __init__(self, path: Path | None, save_every_s: float = 60.0,
                 clock: Callable[[], float] = time.monotonic) -> None:
        self.path = path
        self.save_every_s = save_every_s
        self.clock = clock
        self._norms: dict[str, tuple[str, ScoreNormaliser]] = {}
        self._saved: dict[str, tuple[str, dict[str, Any]]] = {}
        self._dirty = False
        self._last_save = clock()
        if path is not None and path.exists():
            try:
                raw = orjson.loads(path.read_bytes())
                self._saved = {str(k): (str(v["model"]), dict(v["state"])) for k, v in raw["series"].items()}
            except (orjson.JSONDecodeError, KeyError, TypeError, AttributeError, ValueError) as exc:
                log.warning("score state %s is unreadable (%s); starting the score history afresh (moved aside "
                            "to %s)", path, exc, path.with_suffix(".corrupt"))
                path.replace(path.with_suffix(".corrupt"))

    def get(self, series_id: str, model_tag: str, initial: Mapping[str, Any] | None) -> ScoreNormaliser:
        """The normaliser of a series scored by the model ``model_tag``, created from ``initial`` if new."""
        have = self._norms.get(series_id)
        if have is not None and have[0] == model_tag:
            return have[1]
        norm: ScoreNormaliser | None = None
        saved = self._saved.pop(series_id, None)
        if saved is not None and saved[0] == model_tag:
            try:
                norm = ScoreNormaliser.from_dict(saved[1])
            except ValueError as exc:
                log.warning("series %s: saved score state ignored (%s)", series_id, exc)
        if norm is None:
            norm = ScoreNormaliser.from_dict(initial) if initial else ScoreNormaliser()
        self._norms[series_id] = (model_tag, norm)
        self._dirty = True
        return norm

    def touch(self) -> None:
        """Mark the state as changed (the normalisers handed out by `get` were updated)."""
        self._dirty = True

    def maybe_save(self) -> None:
        """Save if something changed and ``save_every_s`` has passed since the last save."""
        if self._dirty and self.clock() - self._last_save >= self.save_every_s:
            self.save()

    def save(self) -> None:
        """Write every series' state now (atomically)."""
        if self.path is None or not self._dirty:
            return
        series = {k: {"model": m, "state": st} for k, (m, st) in self._saved.items()}
        series.update({k: {"model": m, "state": n.to_dict()} for k, (m, n) in self._norms.items()})
        self.path.parent.mkdir(parents=True, exist_ok=True)
        atomic_write(self.path, orjson.dumps({"version": 1, "series": series}))
        self._dirty = False
        self._last_save = self.clock()

    close = save
