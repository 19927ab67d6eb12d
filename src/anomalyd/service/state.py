"""Persisted daemon state, written atomically: per-series watermarks (the end time of the last window scored)
and per-series score normalisers (the recent error history behind the ``score`` field)."""

from __future__ import annotations

import io
import json
import logging
import math
import time
import zipfile
import zlib
from collections.abc import Callable, Mapping
from dataclasses import asdict
from pathlib import Path
from typing import IO, Any

import numpy as np

from ..core.normaliser import HISTORY_DTYPE, NormaliserParams, ScoreNormaliser
from ..files import atomic_write

log = logging.getLogger(__name__)


class StateError(ValueError):
    """The state file exists but cannot be used."""


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
        # One series per line; `separators` rather than `indent` keeps json's C encoder (2x faster at 100,000).
        atomic_write(self.path, json.dumps({"version": 1, "watermarks": self._marks}, separators=(",\n", ": "),
                                           sort_keys=True).encode())
        self._dirty = False


class ScoreStates:
    """Per-series `ScoreNormaliser` state (see `anomalyd.core.normaliser`), kept in memory between ticks.

    It is soft state: the recent error history of each series, which the ``score`` field is computed from. It is
    saved at most every ``save_every_s`` seconds and on `close`, not on every tick, as one ``.npz`` of plain
    arrays (no pickle; 4 bytes per remembered average, 80 MB for 10,000 series of full histories of 2,000,
    written a few thousand series at a time, so a save holds no copy of all the histories). After a
    crash the windows scored since the last save are missing from the history, which only shortens it. A
    normaliser is started afresh from the model's warm-up state when its model is retrained (the errors change
    scale), and when the file is corrupt (with a warning: the scores then need ``learning`` windows to settle).

    Parameters
    ----------
    path : Path or None
        The ``.npz`` file; None keeps the state in memory only (backfills).
    save_every_s : float
        Smallest interval between two saves by `maybe_save`.
    forget_after_s : float
        A series not scored for this long (a week by default: gone from InfluxDB, or from the config) is dropped
        from the state at the next save, so the file does not grow forever.
    """

    def __init__(self, path: Path | None, save_every_s: float = 60.0, forget_after_s: float = 7 * 86400.0,
                 clock: Callable[[], float] = time.monotonic) -> None:
        self.path = path
        self.save_every_s = save_every_s
        self.forget_after_s = forget_after_s
        self.clock = clock
        self._norms: dict[str, tuple[str, ScoreNormaliser]] = {}
        self._saved: dict[str, tuple[str, dict[str, Any] | ScoreNormaliser]] = {}  # loaded, not yet asked for
        self._used: dict[str, float] = {}  # when each series was last scored (or loaded)
        self._now = -math.inf
        self._dirty = False
        self._last_save = clock()
        if path is not None and path.exists():
            try:
                with path.open("rb") as f:
                    self._saved = _read_states(f)
                self._used = dict.fromkeys(self._saved, self._last_save)
            except (OSError, ValueError, KeyError, TypeError, zipfile.BadZipFile, zlib.error) as exc:
                log.warning("score state %s is unreadable (%s); starting the score history afresh (moved aside "
                            "to %s)", path, exc, path.with_suffix(".corrupt"))
                path.replace(path.with_suffix(".corrupt"))

    def get(self, series_id: str, model_tag: str, initial: ScoreNormaliser) -> ScoreNormaliser:
        """The normaliser of a series scored by the model ``model_tag``; a copy of ``initial`` (the model's
        warm state) if the series is new or its model changed."""
        now = self.clock()
        if not 0.0 <= now - self._now < 1.0:  # one float object shared by the series scored within a second,
            self._now = now  # not a new one per series per tick amid the tick's temporaries
        self._used[series_id] = self._now
        have = self._norms.get(series_id)
        if have is not None and have[0] == model_tag:
            return have[1]
        norm: ScoreNormaliser | None = None
        saved = self._saved.pop(series_id, None)
        if saved is not None and saved[0] == model_tag:
            try:
                st = saved[1]
                norm = st if isinstance(st, ScoreNormaliser) else ScoreNormaliser.from_dict(st)
                if norm.params != initial.params:
                    norm = None
            except ValueError as exc:
                log.warning("series %s: saved score state ignored (%s)", series_id, exc)
        if norm is None:
            norm = initial.copy()
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
        cutoff = self.clock() - self.forget_after_s
        stale = [k for k, t in self._used.items() if t < cutoff]
        for k in stale:
            self._used.pop(k)
            self._saved.pop(k, None)
            self._norms.pop(k, None)
        if stale:
            log.info("forgot the score history of %d series not scored for %.0f days", len(stale),
                     self.forget_after_s / 86400)
        entries: dict[str, tuple[str, Mapping[str, Any] | ScoreNormaliser]] = dict(self._saved)
        entries.update(self._norms)
        _atomic_write_states(self.path, entries)
        self._dirty = False
        self._last_save = self.clock()

    close = save


# fm/fv/fn: per-field surprise state (several fields); pot, peak: the tail and peak-filter options' small states
# (absent from files saved before them: None)
_LISTS = ("hist", "tail", "lo", "hi", "fm", "fv", "fn", "pot", "peak")
#: 3: ``hist`` is stored as `HISTORY_DTYPE` (float32); files of version 2 (float64 histories) still load.
_VERSION = 3
_READABLE = (2, 3)
_CHUNK = 1024  # series whose histories are gathered (saving) or read (loading) at a time


def _params_json(params: Any) -> str:
    return json.dumps(asdict(params) if isinstance(params, NormaliserParams) else dict(params), sort_keys=True)


def _atomic_write_states(path: Path, entries: Mapping[str, tuple[str, Mapping[str, Any] | ScoreNormaliser]]) -> None:
    """`_write_states` to ``path``, streamed, so that a crash leaves the old file or the new one."""
    atomic_write(path, lambda f: _write_states(f, entries))


def _pack_states(entries: Mapping[str, tuple[str, Mapping[str, Any] | ScoreNormaliser]]) -> bytes:
    """`_write_states` as bytes."""
    buf = io.BytesIO()
    _write_states(buf, entries)
    return buf.getvalue()


def _field(st: Mapping[str, Any] | ScoreNormaliser, name: str) -> Any:
    return getattr(st, name) if isinstance(st, ScoreNormaliser) else st[name]


def _write_states(f: IO[bytes], entries: Mapping[str, tuple[str, Mapping[str, Any] | ScoreNormaliser]]) -> None:
    """``{series: (model tag, ScoreNormaliser, or its .snapshot() or .to_dict())}`` as an ``.npz`` of plain arrays
    (one row per series; ragged arrays padded with NaN beside their lengths), written member by member: the
    histories (the bulk) are gathered `_CHUNK` series at a time, never all at once."""
    ids = list(entries)
    states = [entries[k][1] for k in ids]
    texts: dict[int, str] = {}  # params objects are shared by the series of a model: serialise each once
    keys = []
    for st in states:
        p = _field(st, "params")
        if id(p) not in texts:
            texts[id(p)] = _params_json(p)
        keys.append(texts[id(p)])
    params = sorted(set(keys))
    index = {p: i for i, p in enumerate(params)}

    def version(st: Mapping[str, Any] | ScoreNormaliser) -> int:
        return ScoreNormaliser.state_version if isinstance(st, ScoreNormaliser) else int(st["version"])

    arrays: dict[str, Any] = {
        "version": np.array(_VERSION),
        "ids": np.array(ids, dtype=str), "models": np.array([entries[k][0] for k in ids], dtype=str),
        "params": np.array(params, dtype=str),
        "param_idx": np.array([index[k] for k in keys], dtype=np.int64),
        "state_version": np.array([version(st) for st in states], dtype=np.int64),
        "seen": np.array([_field(st, "seen") for st in states], dtype=np.int64),
        "since_red": np.array([_field(st, "since_red") for st in states], dtype=np.int64),
        "s1": np.array([_field(st, "s1") for st in states], dtype=np.float64),
        "s2": np.array([_field(st, "s2") for st in states], dtype=np.float64),
        # the ranking options' scalars (record rule, history gate); -inf / 0 when unused or saved before them
        "rec_err": np.array([_scalar(st, "rec_err", -np.inf) for st in states], dtype=np.float64),
        "top_score": np.array([_scalar(st, "top_score", -np.inf) for st in states], dtype=np.float64),
        "red_run": np.array([_scalar(st, "red_run", 0) for st in states], dtype=np.int64),
    }
    with zipfile.ZipFile(f, "w", zipfile.ZIP_STORED, allowZip64=True) as zf:
        def put(name: str, a: Any) -> None:
            with zf.open(f"{name}.npy", "w", force_zip64=True) as out:
                np.lib.format.write_array(out, np.asanyarray(a), allow_pickle=False)

        for name, a in arrays.items():
            put(name, a)
        for name in _LISTS:
            dtype = HISTORY_DTYPE if name == "hist" else np.dtype(np.float64)
            lengths = np.array([_length(st, name) for st in states], dtype=np.int64)
            width = int(lengths.max(initial=0))
            put(f"{name}_len", lengths)
            with zf.open(f"{name}.npy", "w", force_zip64=True) as out:
                np.lib.format.write_array_header_1_0(out, {"descr": np.lib.format.dtype_to_descr(dtype),
                                                           "fortran_order": False, "shape": (len(states), width)})
                for c in range(0, len(states), _CHUNK):
                    part = states[c : c + _CHUNK]
                    block = np.full((len(part), width), np.nan, dtype=dtype)
                    for r, st in enumerate(part):
                        v = _field(st, name)
                        if v is not None and len(v):
                            block[r, : len(v)] = v
                    out.write(block.tobytes())


def _scalar(st: Mapping[str, Any] | ScoreNormaliser, name: str, default: float) -> float:
    v = getattr(st, name) if isinstance(st, ScoreNormaliser) else st.get(name)
    return default if v is None else v


def _length(st: Mapping[str, Any] | ScoreNormaliser, name: str) -> int:
    if isinstance(st, ScoreNormaliser) and name == "hist":
        return st.history_length
    v = _field(st, name)
    return 0 if v is None else len(v)


def _unpack_states(blob: bytes) -> dict[str, tuple[str, dict[str, Any]]]:
    """The inverse of `_pack_states` (rows become ``ScoreNormaliser.snapshot()``-like dicts)."""
    out = _read_states(io.BytesIO(blob), normalisers=False)
    return {k: (m, st) for k, (m, st) in out.items() if isinstance(st, dict)}


def _read_states(f: IO[bytes], normalisers: bool = True) -> dict[str, tuple[str, dict[str, Any] | ScoreNormaliser]]:
    """Read a file of `_write_states` (or of version 2), member by member and the histories `_CHUNK` series at a
    time: with ``normalisers``, each row becomes a `ScoreNormaliser` at once (its history copied into its ring; a
    row that cannot stays a dict, for `ScoreStates.get` to report), so a restart holds no second copy of every
    history; without, ``snapshot()``-like dicts."""
    with zipfile.ZipFile(f) as zf:
        names = {n.removesuffix(".npy") for n in zf.namelist()}

        def get(name: str) -> Any:
            with zf.open(f"{name}.npy") as fh:
                return np.lib.format.read_array(fh, allow_pickle=False)

        version = int(get("version"))
        if version not in _READABLE:
            raise ValueError(f"score state version {version} is not {_VERSION} (or 2)")
        a = {name: get(name) for name in names if name != "hist"}
        params = [json.loads(str(p)) for p in a["params"]]
        ids, models = a["ids"].tolist(), a["models"].tolist()
        n = len(ids)
        if len(models) != n:
            raise ValueError(f"{n} series but {len(models)} models")
        out: dict[str, tuple[str, dict[str, Any] | ScoreNormaliser]] = {}
        with zf.open("hist.npy") as fh:
            major, _ = np.lib.format.read_magic(fh)
            read_header = np.lib.format.read_array_header_1_0 if major == 1 else np.lib.format.read_array_header_2_0
            shape, _, dtype = read_header(fh)
            if len(shape) != 2 or shape[0] != n:
                raise ValueError(f"histories of shape {shape} for {n} series")
            width = int(shape[1])
            for c in range(0, n, _CHUNK):
                rows = min(_CHUNK, n - c)
                hist = np.frombuffer(fh.read(rows * width * dtype.itemsize), dtype=dtype).reshape(rows, width)
                for r in range(c, c + rows):
                    state: dict[str, Any] = {
                        "version": int(a["state_version"][r]), "params": params[int(a["param_idx"][r])],
                        "seen": int(a["seen"][r]), "since_red": int(a["since_red"][r]), "s1": float(a["s1"][r]),
                        "s2": float(a["s2"][r])}
                    if "rec_err" in a:  # saved before the ranking options: their defaults
                        state.update(rec_err=float(a["rec_err"][r]), top_score=float(a["top_score"][r]),
                                     red_run=int(a["red_run"][r]))
                    for name in _LISTS:
                        if name == "hist":
                            state[name] = hist[r - c, : int(a["hist_len"][r])]
                        elif name not in a:  # saved before the per-field state existed
                            state[name] = None
                        else:
                            state[name] = a[name][r, : int(a[f"{name}_len"][r])]
                    for name in ("lo", "hi", "fm", "fv", "fn", "pot", "peak"):
                        if state[name] is not None and len(state[name]) == 0:
                            state[name] = None
                    entry: dict[str, Any] | ScoreNormaliser = state
                    if normalisers:
                        try:
                            entry = ScoreNormaliser.from_dict(state)
                        except ValueError:
                            state["hist"] = state["hist"].copy()  # not a view of the whole chunk
                    else:
                        state["hist"] = state["hist"].copy()
                    out[str(ids[r])] = (str(models[r]), entry)
    return out
