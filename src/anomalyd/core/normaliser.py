"""The score normaliser: a causal map from window errors to anomaly scores in [0, 1] (pure numpy, no I/O).

A raw reconstruction error has no fixed scale: it depends on the series and on the model, and it drifts. The
normaliser turns it into a score with the same meaning everywhere, the way NAB's HTM detector does:

* an HTM-style **anomaly likelihood** (Ahmad et al. 2017): the average of the last ``short_window`` errors is
  compared with a Gaussian fitted to the previous ``long_window`` such averages; the tail probability says how
  unusual the recent level is;
* NAB's **log scale**: a tail probability of 1e-5 (likelihood 0.99999) maps to 0.5;
* an **out-of-range rule**: a window whose values leave the range seen so far (per field, widened by
  ``range_tolerance`` of its width) scores 1;
* a **red-zone filter**: a red tail probability (``<= red``, or out of range) right after another red one is
  demoted to ``yellow``, so a lasting anomaly scores high once rather than on every window.

Every score uses only its error and the ones before it. The update is *chunk-invariant*: feeding a stream in
one call or in many gives the same scores bit for bit (the running sums are updated step by step in a fixed
order and recomputed from the history every ``long_window`` errors), so the daemon, which scores a few
windows per tick, writes exactly what an evaluation over the stored series computes in one call. `update_block`
updates many series at once (one row each), which is the daemon's tick.

Defaults (`NormaliserParams`): ``long_window=2000``, ``short_window=8``, ``min_std=0.05`` (relative to the
reference mean), ``learning=32``, ``red=1e-5``, ``yellow=1e-3``, ``range_tolerance=0.02``, no transform. The
ranking options (``unsaturated``, the record rule) are off; ``unsaturated`` with ``record_factor=1`` and
``record_scope="flagged"`` keeps the order of flagged windows without changing any decision at 0.5
(benchmarks/RESULTS.md, issue 11).
"""

from __future__ import annotations

import math
import threading
from collections.abc import Mapping, Sequence
from dataclasses import asdict, dataclass, fields
from typing import Any, ClassVar, Literal

import numpy as np
from numpy.typing import ArrayLike, NDArray
from scipy.special import log_ndtr, ndtr

__all__ = ["HISTORY_DTYPE", "TRANSFORMS", "HistoryPool", "NormaliserParams", "ScoreNormaliser", "field_surprise",
           "log_score", "update_block"]

#: Transforms applied to the errors before the likelihood.
TRANSFORMS = ("none", "log")
#: Reference of the history: mean and standard deviation, or median and interquartile range.
REFERENCES = ("gaussian", "robust")
#: Windows the record rule may lift (`NormaliserParams.record_scope`).
RECORD_SCOPES = ("all", "flagged", "red")
_LOG_EPS = 1e-10
#: Version 3: the history is stored as float32 (`HISTORY_DTYPE`); version 2 states (float64) load, rounded.
_STATE_VERSION = 3
_OLD_STATE_VERSIONS = (2,)
#: Storage of the score history (the short-window averages); the running sums and every computation stay float64.
#: Each average is rounded to this type when it enters the history, in every chunking, so the scores stay
#: chunk-invariant.
HISTORY_DTYPE = np.dtype(np.float32)
#: Errors above this are taken as this (a glitch of 1e308 would overflow the running sums of squares).
_ERROR_CAP = 1e100


def log_score(tail: ArrayLike) -> NDArray[np.float64]:
    """Map an upper tail probability to NAB's HTM log scale: ``log(tail) / log(1e-10)``, clipped to [0, 1].

    A tail of 0.1 (likelihood 0.9) maps to 0.1, 1e-3 to 0.3, the red zone's 1e-5 to exactly 0.5, so a red
    tail probability is a score of at least 0.5 and the reverse.

    Examples
    --------
    >>> log_score([1.0, 0.1, 1e-3, 1e-5, 0.0]).round(3).tolist()
    [0.0, 0.1, 0.3, 0.5, 1.0]
    >>> float(log_score([1e-5])[0])
    0.5
    """
    t = np.clip(np.asarray(tail, dtype=np.float64), 0.0, 1.0)
    return np.asarray(np.clip(np.log(np.maximum(t, 1e-300)) / math.log(_LOG_EPS), 0.0, 1.0) + 0.0)


@dataclass(frozen=True)
class NormaliserParams:
    """Parameters of `ScoreNormaliser` (defaults in the module docstring).

    Parameters
    ----------
    long_window : int
        Short-window averages in the reference distribution.
    short_window : int
        Errors averaged before comparing with the reference.
    min_std : float
        Floor of the reference spread, relative to ``|mean|`` of the averages (absolute with ``transform="log"``).
    learning : int
        Errors seen before the first score other than the neutral likelihood 0.5.
    red, yellow : float
        Tail probabilities: a red one (``<= red``) right after another red one is replaced by ``yellow``;
        ``red=0`` turns the filter off.
    range_tolerance : float or None
        Out-of-range rule tolerance (share of the seen range); None turns the rule off.
    transform : {"none", "log"}
        Applied to the errors before the likelihood.
    refractory : int
        A red within this many errors after another red one is demoted.
    reference : {"gaussian", "robust"}
        The history's centre and spread: mean and standard deviation (HTM's likelihood), or median and
        interquartile range / 1.349, which an earlier burst barely widens (a later, larger error keeps its rank).
    range_growth : float or None
        An out-of-range window widens the seen range by at most this share of its width (per side); None: by
        as much as it leaves it (the seen range is then the plain running minimum and maximum).
    unsaturated : bool
        Scores above `_SOFT_TOP` (0.9) keep their order instead of tying at 1: the tail probability is taken in
        log space (``log_ndtr``, no underflow), an out-of-range window's surprise is ``1 + excess`` (how far, in
        widths of the seen range beyond the tolerance, it leaves the range; at least its likelihood's), and the
        surprise ``u`` (``log(tail) / log(1e-10)``) maps to ``u`` up to 0.9 and to ``1 - 0.1 / (1 + (u - 0.9) /
        0.1)`` above (C1, below 1 for any finite ``u``). Scores up to 0.9 -- every decision at 0.5 -- are unchanged.
    record_factor : float or None
        The record rule: a window whose error is above ``record_factor`` times the largest error seen so far
        (training hold-out included) scores at least just above (``R + 0.01 (1 - R)``) the highest score ``R``
        seen so far, red-zone filter or not. None: off.
    record_scope : {"all", "flagged", "red"}
        Which record windows the rule lifts: any; only those already red after the red-zone filter (score at
        least ``log_score(red)``, 0.5: the decisions do not change, only the order among flagged windows); or
        those red before the filter (demoted ones come back).
    history_gate : int
        When > 0, a red window's average (tail ``<= red`` or out of range, before the red-zone filter) stays out
        of the history (a burst does not widen the reference), for at most ``history_gate`` windows in a row; a
        longer red run enters again (a lasting change is learned as before). 0: off.
    """

    long_window: int = 2000
    short_window: int = 8
    min_std: float = 0.05
    learning: int = 32
    red: float = 1e-5
    yellow: float = 1e-3
    range_tolerance: float | None = 0.02
    transform: Literal["none", "log"] = "none"
    refractory: int = 1
    range_growth: float | None = None
    reference: Literal["gaussian", "robust"] = "gaussian"
    unsaturated: bool = False
    record_factor: float | None = None
    record_scope: Literal["all", "flagged", "red"] = "all"
    history_gate: int = 0

    def __post_init__(self) -> None:
        if self.long_window < 2:
            raise ValueError(f"long_window={self.long_window} must be at least 2 errors")
        if not 1 <= self.short_window <= self.long_window:
            raise ValueError(f"short_window={self.short_window} must be between 1 and long_window="
                             f"{self.long_window}")
        if not (math.isfinite(self.min_std) and self.min_std >= 0):
            raise ValueError(f"min_std={self.min_std} must be a finite number >= 0")
        if self.learning < 0:
            raise ValueError(f"learning={self.learning} must be >= 0")
        if not 0.0 <= self.red <= self.yellow < 1.0:
            raise ValueError(f"red={self.red} and yellow={self.yellow} must satisfy 0 <= red <= yellow < 1")
        if self.range_tolerance is not None and not self.range_tolerance >= 0:
            raise ValueError(f"range_tolerance={self.range_tolerance} must be >= 0, or None to disable the rule")
        if self.range_growth is not None and not (math.isfinite(self.range_growth) and self.range_growth >= 0):
            raise ValueError(f"range_growth={self.range_growth} must be a finite number >= 0, or None (no cap)")
        if self.refractory < 1:
            raise ValueError(f"refractory={self.refractory} must be at least 1 error")
        if self.reference not in REFERENCES:
            raise ValueError(f"reference={self.reference!r} is not one of {', '.join(REFERENCES)}")
        if self.transform not in TRANSFORMS:
            raise ValueError(f"transform={self.transform!r} is not one of {', '.join(TRANSFORMS)}")
        if self.record_factor is not None and not (math.isfinite(self.record_factor) and self.record_factor > 0):
            raise ValueError(f"record_factor={self.record_factor} must be a finite number > 0, or None (off)")
        if self.record_scope not in RECORD_SCOPES:
            raise ValueError(f"record_scope={self.record_scope!r} is not one of {', '.join(RECORD_SCOPES)}")
        if self.history_gate < 0:
            raise ValueError(f"history_gate={self.history_gate} must be >= 0 (0: off)")


class HistoryPool:
    """Preallocated storage of the score histories of many normalisers: rows of ``long_window`` values in a few
    2-D blocks (``block_bytes`` each, pages touched only when written), one row per normaliser, used as a ring.

    A normaliser takes a row when it is created and gives it back when it is garbage collected, so the histories of
    100,000 series are a few dozen arrays rather than 100,000, and an update writes its new averages in place (the
    ring) instead of building a new array per series. One pool per ``(long_window, dtype)`` (`HistoryPool.of`).

    Examples
    --------
    >>> pool = HistoryPool(4, np.float32, block_bytes=64)
    >>> pool.rows_per_block, pool.take(), pool.take()
    (4, 0, 1)
    >>> pool.row(1).base is pool.blocks[0]
    True
    """

    _pools: ClassVar[dict[tuple[int, str], HistoryPool]] = {}
    _pools_lock: ClassVar[threading.Lock] = threading.Lock()

    def __init__(self, long_window: int, dtype: Any = HISTORY_DTYPE, block_bytes: int = 16 << 20) -> None:
        self.long_window = int(long_window)
        self.dtype = np.dtype(dtype)
        self.rows_per_block = max(1, block_bytes // (self.long_window * self.dtype.itemsize))
        self.blocks: list[NDArray[Any]] = []
        self._free: list[int] = []  # list.pop/append are atomic: a row given back by a finaliser needs no lock
        self._grow_lock = threading.Lock()

    @classmethod
    def of(cls, long_window: int, dtype: Any = HISTORY_DTYPE) -> HistoryPool:
        """The shared pool of histories of ``long_window`` values of ``dtype``."""
        key = (int(long_window), np.dtype(dtype).str)
        pool = cls._pools.get(key)
        if pool is None:
            with cls._pools_lock:
                pool = cls._pools.setdefault(key, cls(long_window, dtype))
        return pool

    def take(self) -> int:
        """A free row (its values are arbitrary)."""
        try:
            return self._free.pop()
        except IndexError:
            pass
        with self._grow_lock:
            try:
                return self._free.pop()
            except IndexError:
                pass
            start = len(self.blocks) * self.rows_per_block
            self.blocks.append(np.empty((self.rows_per_block, self.long_window), dtype=self.dtype))
            self._free.extend(range(start + self.rows_per_block - 1, start, -1))  # handed out in ascending order
            return start

    def give_back(self, row: int) -> None:
        self._free.append(row)

    def row(self, row: int) -> NDArray[Any]:
        """The row as a view into its block."""
        b, r = divmod(row, self.rows_per_block)
        return self.blocks[b][r]

    @property
    def rows_in_use(self) -> int:
        return len(self.blocks) * self.rows_per_block - len(self._free)


def _copy(a: NDArray[np.float64] | None) -> NDArray[np.float64] | None:
    return None if a is None else a.copy()


def _from_snapshot(state: Mapping[str, Any]) -> ScoreNormaliser:
    return ScoreNormaliser.from_dict(state)


#: Parameters added after models and score states were first saved, with the values that reproduce the behaviour
#: they were saved with: parameters read from an older file keep scoring as they did.
PARAMS_BEFORE: dict[str, Any] = {"unsaturated": False, "record_factor": None}


def params_from_dict(raw: Mapping[str, Any]) -> NormaliserParams:
    """`NormaliserParams` from a saved dict; keys it does not know are ignored, missing ones are `PARAMS_BEFORE`'s.

    Examples
    --------
    >>> params_from_dict({"long_window": 100}).unsaturated  # saved before the option existed
    False
    """
    names = {f.name for f in fields(NormaliserParams)}
    return NormaliserParams(**{**PARAMS_BEFORE, **{k: v for k, v in dict(raw).items() if k in names}})


class ScoreNormaliser:
    """The state of one series' score: recent averages, running sums, red-zone and range memory.

    Examples
    --------
    >>> norm = ScoreNormaliser(NormaliserParams(long_window=50, short_window=2, learning=10))
    >>> rng = np.random.default_rng(0)
    >>> warm = norm.update(1.0 + 0.1 * rng.standard_normal(100))
    >>> bool(warm.max() < 0.5)
    True
    >>> float(norm.update([50.0])[0]) >= 0.5
    True
    >>> again = ScoreNormaliser.from_dict(norm.to_dict())
    >>> again.to_dict() == norm.to_dict()
    True
    """

    __slots__ = ("_count", "_head", "_pool", "_ring", "_row", "_undo", "fm", "fn", "fv", "hi", "lo", "params",
                 "rec_err", "red_run", "s1", "s2", "seen", "since_red", "tail", "top_score")

    #: The version `snapshot` and `to_dict` write.
    state_version = _STATE_VERSION

    def __init__(self, params: NormaliserParams | None = None) -> None:
        self.params = params or NormaliserParams()
        # The last long_window short-window averages: a ring in a row of the shared pool (`hist` gives them in
        # order); _head is the oldest's position, _count how many there are.
        self._pool = HistoryPool.of(self.params.long_window)
        self._row = self._pool.take()
        self._ring = self._pool.row(self._row)
        self._head = 0
        self._count = 0
        self._undo: list[tuple[int, NDArray[Any]]] | None = None  # ring writes since `refs`: (first position, values)
        self.s1 = 0.0  # sum and sum of squares of hist, updated step by step
        self.s2 = 0.0
        self.tail: NDArray[np.float64] = np.empty(0)  # last short_window - 1 transformed errors, oldest first
        self.seen = 0  # finite errors seen
        self.since_red = 1 << 30  # errors since the last red one (huge: none yet)
        self.lo: NDArray[np.float64] | None = None  # per-field range seen so far
        self.hi: NDArray[np.float64] | None = None
        # Per-field surprise (`field_surprise`, ``DetectorSpec.field_surprise``): each field's exponentially
        # weighted error mean and variance, and its run of consecutive gated windows; None when unused.
        self.fm: NDArray[np.float64] | None = None
        self.fv: NDArray[np.float64] | None = None
        self.fn: NDArray[np.float64] | None = None
        # Record rule (``record_factor``): the largest error and the highest score seen; history gate
        # (``history_gate``): red windows in a row kept out of the history.
        self.rec_err = -math.inf
        self.top_score = -math.inf
        self.red_run = 0

    def __del__(self) -> None:
        pool = getattr(self, "_pool", None)
        if pool is not None:
            pool.give_back(self._row)

    def __reduce__(self) -> tuple[Any, ...]:  # pickled as its snapshot, not with the pool
        return (_from_snapshot, (self.snapshot(),))

    # -- the history ring ----------------------------------------------------------------------------
    @property
    def hist(self) -> NDArray[np.float64]:
        """The history, oldest first (a float64 copy)."""
        return self._oldest(self._count)

    @hist.setter
    def hist(self, values: ArrayLike) -> None:
        v = np.asarray(values, dtype=np.float64).reshape(-1)[-self.params.long_window :]
        self._ring[: len(v)] = _to_storage(v)
        self._head, self._count = 0, len(v)

    def _oldest(self, m: int) -> NDArray[np.float64]:
        """The ``m`` oldest averages of the history (float64)."""
        L, h = self.params.long_window, self._head
        if h + m <= L:
            return self._ring[h : h + m].astype(np.float64)
        return np.concatenate((self._ring[h:], self._ring[: h + m - L])).astype(np.float64)

    def _push(self, values: NDArray[np.float64]) -> None:
        """Append averages to the history in place (the oldest ones go), noting what is overwritten when `refs`
        asked for it."""
        L = self.params.long_window
        v = len(values)
        keep = values[-L:]
        start = (self._head + self._count + (v - len(keep))) % L
        pos = (start + np.arange(len(keep))) % L
        if self._undo is not None:  # where the overwritten run starts (an int, not a position array) and its values
            self._undo.append((start, self._ring[pos]))
        self._ring[pos] = keep
        count = min(L, self._count + v)
        self._head = (self._head + self._count + v - count) % L
        self._count = count

    @property
    def history_length(self) -> int:
        """Averages in the history (``len(hist)``, without building it)."""
        return self._count

    @property
    def history_bytes(self) -> int:
        """Bytes of history storage this normaliser holds (one row of its pool)."""
        return int(self._ring.nbytes)

    def refs(self) -> tuple[Any, ...]:
        """The state as it is now, cheaply: the scalars, copies of ``tail``, ``lo`` and ``hi`` (which `update_block`
        writes in place), the per-field surprise arrays (which `field_surprise` replaces) as references, and a mark
        in an undo log of the history's in-place writes, so that `restore` can put the state back as it was (e.g.
        when a tick's writes failed). `release` ends the log."""
        if self._undo is None:
            self._undo = []
        return ((self._head, self._count, len(self._undo)), self.s1, self.s2, self.tail.copy(), self.seen,
                self.since_red, _copy(self.lo), _copy(self.hi), self.fm, self.fv, self.fn, self.rec_err,
                self.top_score, self.red_run)

    def restore(self, refs: tuple[Any, ...]) -> None:
        """Put back a state taken with `refs` (the history writes since then are undone, newest first)."""
        ((self._head, self._count, mark), self.s1, self.s2, self.tail, self.seen, self.since_red, self.lo, self.hi,
         self.fm, self.fv, self.fn, self.rec_err, self.top_score, self.red_run) = refs
        log = self._undo if self._undo is not None else []
        L = self.params.long_window
        while len(log) > mark:
            start, old = log.pop()
            self._ring[(start + np.arange(len(old))) % L] = old
        if not mark:
            self._undo = None

    def release(self) -> None:
        """Forget the undo log of `refs` (the updates since then are final)."""
        self._undo = None

    def copy(self) -> ScoreNormaliser:
        """An independent copy (the arrays are copied)."""
        return ScoreNormaliser.from_dict(self.snapshot())

    # -- state -------------------------------------------------------------------------------------
    def observe_range(self, values: ArrayLike) -> None:
        """Widen the seen range with ``values`` (rows x fields, or one field) without scoring anything."""
        v = np.asarray(values, dtype=np.float64)
        v = v.reshape(len(v), -1) if v.ndim else v.reshape(1, 1)
        with np.errstate(invalid="ignore"):
            lo = np.fmin.reduce(np.where(np.isfinite(v), v, np.nan), axis=0)
            hi = np.fmax.reduce(np.where(np.isfinite(v), v, np.nan), axis=0)
        self.lo = lo if self.lo is None else np.fmin(self.lo, lo)
        self.hi = hi if self.hi is None else np.fmax(self.hi, hi)

    def snapshot(self) -> dict[str, Any]:
        """The state with arrays (not JSON-able; `to_dict` is); `from_dict` takes either."""
        return {"version": _STATE_VERSION, "params": self.params, "hist": self.hist, "s1": self.s1,
                "s2": self.s2, "tail": self.tail.copy(), "seen": self.seen, "since_red": self.since_red,
                "lo": None if self.lo is None else self.lo.copy(), "hi": None if self.hi is None else self.hi.copy(),
                **{k: None if getattr(self, k) is None else getattr(self, k).copy() for k in ("fm", "fv", "fn")},
                "rec_err": self.rec_err, "top_score": self.top_score, "red_run": self.red_run}

    def to_dict(self) -> dict[str, Any]:
        """JSON-able state, parameters included; floats round-trip exactly through JSON."""
        s = self.snapshot()
        return {**s, "params": asdict(self.params), "hist": s["hist"].tolist(), "tail": s["tail"].tolist(),
                "lo": None if s["lo"] is None else [_json_float(v) for v in s["lo"]],
                "hi": None if s["hi"] is None else [_json_float(v) for v in s["hi"]],
                **{k: None if s[k] is None else [_json_float(v) for v in s[k]] for k in ("fm", "fv", "fn")},
                "rec_err": _json_float(self.rec_err), "top_score": _json_float(self.top_score)}

    @classmethod
    def from_dict(cls, state: Mapping[str, Any]) -> ScoreNormaliser:
        """Restore a state saved by `to_dict` or `snapshot`.

        Raises
        ------
        ValueError
            When ``state`` is from another version or malformed; delete the saved state (or retrain) so it is
            learned again.
        """
        if state.get("version") != _STATE_VERSION and state.get("version") not in _OLD_STATE_VERSIONS:
            raise ValueError(f"normaliser state version {state.get('version')!r} is not {_STATE_VERSION} (or "
                             f"{', '.join(map(str, _OLD_STATE_VERSIONS))}); delete the saved score state (or retrain "
                             "the model) so it is learned again")
        try:
            raw = state["params"]
            if isinstance(raw, NormaliserParams):
                params = raw
            else:
                params = params_from_dict(raw)
            norm = cls(params)
            hist = np.array(state["hist"], dtype=np.float64).reshape(-1)
            if len(hist) > params.long_window:
                raise ValueError(f"a history of {len(hist)} averages is longer than long_window")
            norm.hist = hist  # a version 2 state's float64 averages are rounded to HISTORY_DTYPE
            norm.tail = np.array(state["tail"], dtype=np.float64).reshape(-1)
            norm.s1 = float(state["s1"])
            norm.s2 = float(state["s2"])
            norm.seen = int(state["seen"])
            norm.since_red = int(state["since_red"])
            norm.lo = None if state["lo"] is None else np.array(state["lo"], dtype=np.float64).reshape(-1)
            norm.hi = None if state["hi"] is None else np.array(state["hi"], dtype=np.float64).reshape(-1)
            for k in ("fm", "fv", "fn"):  # absent from states saved before the per-field surprise: None
                v = state.get(k)
                setattr(norm, k, None if v is None else np.array(v, dtype=np.float64).reshape(-1))
            for k in ("rec_err", "top_score"):  # absent from older states, None when -inf: none seen yet
                v = state.get(k)
                setattr(norm, k, -math.inf if v is None else float(v))
            norm.red_run = int(state.get("red_run") or 0)
        except (KeyError, TypeError, ValueError) as exc:
            raise ValueError(f"normaliser state is malformed ({exc!r}); delete the saved score state (or retrain) "
                             "so it is learned again") from exc
        return norm

    # -- scoring -----------------------------------------------------------------------------------
    def update(self, errors: ArrayLike, lo: ArrayLike | None = None,
               hi: ArrayLike | None = None) -> NDArray[np.float64]:
        """Score ``errors`` (in time order) and remember them; `update_block` with one row.

        Parameters
        ----------
        errors : array_like of float, shape (k,)
            Window errors; NaN (a window that could not be scored) gives NaN and is not remembered.
        lo, hi : array_like of float, shape (k,) or (k, d), optional
            Per field, the smallest and largest value of each window, for the out-of-range rule.

        Returns
        -------
        ndarray of float, shape (k,)
            Scores in [0, 1] (NaN where the error was NaN).
        """
        e = np.asarray(errors, dtype=np.float64).reshape(1, -1)
        return update_block([self], e, _per_field(lo, e.shape[1]), _per_field(hi, e.shape[1]))[0]


def field_surprise(norms: Sequence[ScoreNormaliser], errors: NDArray[np.float64], span: int,
                   min_rel_std: float = 0.05, gate: float | None = None,
                   rebaseline: int = 0) -> tuple[NDArray[np.float64], NDArray[np.bool_]]:
    """Each field's error against that field's own recent errors: a per-field surprise (causal, chunk-invariant).

    Per series and field, an exponentially weighted mean ``m`` and variance ``v`` of the field's errors (weight
    ``a = 2 / (span + 1)`` for the newest, state in ``norm.fm``/``norm.fv``, which must be set) give
    ``z = (e - m) / max(sqrt(v), min_rel_std * |m|, 1e-9)`` *before* ``e`` updates them. A field whose error is
    high all the time (noisy, or settled at a new level) thus stops dominating the windows, and a field that is
    quiet in training but moves at a lower level than the others keeps its voice.

    With ``gate``, a window whose ``z`` is above ``gate`` does not update its field's history (an anomaly does not
    teach the history that it is normal); after ``rebaseline`` such windows in a row (0: never) the field
    *re-baselines*: its mean becomes the current error (a sustained level shift is accepted as the new normal)
    and the window is reported in the second output.

    Parameters
    ----------
    norms : sequence of ScoreNormaliser
        One per series, with ``fm``/``fv`` of ``d`` fields (``fn`` is created when missing); advanced in place.
    errors : ndarray, shape (n, k, d)
        Per-field errors in time order; NaN: not updated, NaN out.

    Returns
    -------
    z : ndarray, shape (n, k, d)
    rebased : ndarray of bool, shape (n, k, d)
        The field re-baselined at that window.

    Examples
    --------
    >>> nm = ScoreNormaliser()
    >>> nm.fm, nm.fv = np.array([1.0, 1.0]), np.array([0.01, 0.01])
    >>> z, _ = field_surprise([nm], np.array([[[1.0, 2.0], [1.0, 1.0]]]), span=10)
    >>> z.round(2).tolist()
    [[[0.0, 10.0], [0.0, -0.46]]]
    """
    e_all = np.asarray(errors, dtype=np.float64)
    n, k, d = e_all.shape
    z = np.full((n, k, d), np.nan)
    rebased = np.zeros((n, k, d), dtype=bool)
    if n == 0 or k == 0:
        return z, rebased
    a = 2.0 / (span + 1.0)
    m = np.stack([np.asarray(nm.fm, dtype=np.float64) for nm in norms])
    v = np.stack([np.asarray(nm.fv, dtype=np.float64) for nm in norms])
    c = np.stack([np.zeros(d) if nm.fn is None else np.asarray(nm.fn, dtype=np.float64) for nm in norms])
    for j in range(k):  # one step at a time, the same operations in any chunking
        e = e_all[:, j]
        ok = np.isfinite(e)
        den = np.maximum(np.maximum(np.sqrt(v), min_rel_std * np.abs(m)), 1e-9)
        zj = np.where(ok, (np.where(ok, e, 0.0) - m) / den, np.nan)
        z[:, j] = zj
        upd = ok
        if gate is not None:
            with np.errstate(invalid="ignore"):
                hot = ok & (zj > gate)
            c = np.where(hot, c + 1.0, np.where(ok, 0.0, c))
            upd = ok & ~hot
            if rebaseline > 0:
                rb = hot & (c >= rebaseline)
                if rb.any():
                    rebased[:, j] = rb
                    m = np.where(rb, e, m)
                    c = np.where(rb, 0.0, c)
        dlt = np.where(upd, e - m, 0.0)
        m = np.where(upd, m + a * dlt, m)
        v = np.where(upd, (1.0 - a) * (v + a * dlt * dlt), v)
    for i, nm in enumerate(norms):
        nm.fm, nm.fv, nm.fn = m[i].copy(), v[i].copy(), c[i].copy()
    return z, rebased


def _per_field(a: ArrayLike | None, k: int) -> NDArray[np.float64] | None:
    """``(k,)`` or ``(k, d)`` per-window values as ``(1, k, d)``."""
    if a is None:
        return None
    v = np.asarray(a, dtype=np.float64)
    return v.reshape(1, k, v.shape[-1] if v.ndim == 2 else 1)


def _robust_reference(norms: Sequence[ScoreNormaliser], avg: NDArray[np.float64], f: NDArray[np.int64],
                      L: int) -> tuple[NDArray[np.float64], NDArray[np.float64]]:
    """Median and spread (interquartile range / 1.349) of the history before each push, ``(n, k)``.

    Order statistics of the last ``min(L, count)`` averages (ranks ``(c - 1) // 4``, ``(c - 1) // 2``,
    ``3 * (c - 1) // 4`` of ``c`` values): exact, so the same in any chunking. A burst shorter than a quarter
    of the history barely moves them, so a later, larger error still ranks above it. Full histories use a
    sliding rank filter (scipy, O(log L) per push); the rest are sorted one by one.
    """
    from scipy.ndimage import rank_filter

    n, k = avg.shape
    med = np.full((n, k), np.nan)
    spread = np.full((n, k), np.nan)
    for i, nm in enumerate(norms):
        fi = int(f[i])
        if fi == 0:
            continue
        c0 = nm._count
        series = np.concatenate((nm.hist, avg[i, : fi - 1]))  # push j sees series[c0 + j - L : c0 + j]
        j = np.arange(fi)
        full = c0 + j >= L
        part = np.flatnonzero(~full & (c0 + j >= 2))
        for jj in part:
            c = c0 + int(jj)
            r = (np.array([(c - 1) // 4, (c - 1) // 2, 3 * (c - 1) // 4]))
            q = np.partition(series[:c], r)[r]
            med[i, jj], spread[i, jj] = q[1], (q[2] - q[0]) / 1.349
        jf = np.flatnonzero(full)
        if jf.size:
            a, b = c0 + int(jf[0]) - L, c0 + int(jf[-1])  # the windows cover series[a : b]
            seg = series[a:b]
            at = np.arange(len(jf)) + L // 2  # centre of the size-L window starting at each push's first value
            qs = [rank_filter(seg, rank, size=L, mode="nearest")[at]
                  for rank in ((L - 1) // 4, (L - 1) // 2, 3 * (L - 1) // 4)]
            med[i, jf], spread[i, jf] = qs[1], (qs[2] - qs[0]) / 1.349
    return med, spread


def _half_width(lo: NDArray[np.float64], hi: NDArray[np.float64]) -> NDArray[np.float64]:
    """Half the width of a range, computed so that it never overflows (``hi - lo`` can, for finite bounds)."""
    with np.errstate(invalid="ignore"):
        return np.asarray(0.5 * hi - 0.5 * lo)


def _out_of_range(prev_lo: NDArray[np.float64], prev_hi: NDArray[np.float64], lo: NDArray[np.float64],
                  hi: NDArray[np.float64], tolerance: float) -> NDArray[np.bool_]:
    """Windows (``(n, k, d)`` bounds) whose values leave the range seen before them, widened by ``tolerance`` of
    its width on each side; a range of no width (a constant field) flags nothing. Any axis layout works."""
    half = _half_width(prev_lo, prev_hi)
    with np.errstate(invalid="ignore", over="ignore"):
        ok = half > 0
        tol = np.where(ok, 2.0 * tolerance * half, 0.0)
        out = ok & ((hi > prev_hi + tol) | (lo < prev_lo - tol))
    return np.asarray(out.any(axis=-1))


def range_excess(norms: Sequence[ScoreNormaliser], lo: NDArray[np.float64],
                 hi: NDArray[np.float64]) -> NDArray[np.float64]:
    """How far each field of each window leaves the range seen before it, by the out-of-range rule of
    `update_block` (window bounds ``(n, k, d)``; the running range of each series, from its normaliser's):
    beyond the tolerance, in widths of that range, positive above it, negative below, 0 inside (and for a field
    of no width, and without the rule). It says which fields made the rule score a window 1.

    Examples
    --------
    >>> nm = ScoreNormaliser(NormaliserParams())
    >>> nm.lo, nm.hi = np.array([0.0, 0.0]), np.array([1.0, 1.0])
    >>> range_excess([nm], np.array([[[0.5, -0.5]]]), np.array([[[1.5, 0.9]]])).round(2).tolist()
    [[[0.48, -0.48]]]
    """
    n, k, d = lo.shape
    tolerance = norms[0].params.range_tolerance if norms else None
    if tolerance is None or not n:
        return np.zeros((n, k, d))
    lo0 = np.stack([np.full(d, np.nan) if nm.lo is None or len(nm.lo) != d else nm.lo for nm in norms])
    hi0 = np.stack([np.full(d, np.nan) if nm.hi is None or len(nm.hi) != d else nm.hi for nm in norms])
    with np.errstate(invalid="ignore", over="ignore"):
        lo_c = np.where(np.isfinite(lo), lo, np.nan)
        hi_c = np.where(np.isfinite(hi), hi, np.nan)
    run_lo = np.fmin.accumulate(np.concatenate((lo0[:, None, :], lo_c), axis=1), axis=1)[:, :k]
    run_hi = np.fmax.accumulate(np.concatenate((hi0[:, None, :], hi_c), axis=1), axis=1)[:, :k]
    half = _half_width(run_lo, run_hi)
    with np.errstate(invalid="ignore", over="ignore", divide="ignore"):
        width = np.where(half > 0, 2.0 * half, np.nan)
        above = (hi - run_hi) / width - tolerance
        below = (run_lo - lo) / width - tolerance
        out = np.where(above > 0, above, 0.0) - np.where(below > 0, below, 0.0)
    return np.nan_to_num(out, nan=0.0, posinf=0.0, neginf=0.0)


def _capped_range(lo0: NDArray[np.float64], hi0: NDArray[np.float64], lo: NDArray[np.float64],
                  hi: NDArray[np.float64], tolerance: float, growth: float) -> tuple[
                      NDArray[np.float64], NDArray[np.float64], NDArray[np.bool_]]:
    """The running range of one series (``(k, d)`` window bounds) when an out-of-range window widens it by at most
    ``growth`` of its width: returns the range before each window and after the last (``(k + 1, d)``) and the
    out-of-range flags (``(k,)``)."""
    k, d = lo.shape
    run_lo = np.empty((k + 1, d))
    run_hi = np.empty((k + 1, d))
    flags = np.zeros(k, dtype=bool)
    cur_lo, cur_hi = lo0.copy(), hi0.copy()
    run_lo[0], run_hi[0] = cur_lo, cur_hi
    for j in range(k):
        flags[j] = bool(_out_of_range(cur_lo, cur_hi, lo[j], hi[j], tolerance))
        half = _half_width(cur_lo, cur_hi)
        with np.errstate(invalid="ignore", over="ignore"):
            step = np.where(half > 0, 2.0 * growth * half, np.inf)  # no width yet: no cap
            new_hi = np.fmax(cur_hi, np.fmin(hi[j], cur_hi + step))
            new_lo = np.fmin(cur_lo, np.fmax(lo[j], cur_lo - step))
        cur_lo, cur_hi = new_lo, new_hi
        run_lo[j + 1], run_hi[j + 1] = cur_lo, cur_hi
    return run_lo, run_hi, flags


def _to_storage(v: NDArray[np.float64]) -> NDArray[Any]:
    """Averages as `HISTORY_DTYPE`, clipped to its finite range."""
    big = float(np.finfo(HISTORY_DTYPE).max)
    return np.clip(v, -big, big).astype(HISTORY_DTYPE)


def _json_float(v: float) -> float | None:
    return float(v) if math.isfinite(v) else None


#: With ``unsaturated``, scores up to this are the plain log score; above, the surprise is compressed below 1.
_SOFT_TOP = 0.9
#: With ``history_gate``, the longest stretch scored in one trial before the first gated window is looked for.
_GATE_CHUNK = 1024


def _soft_top(u: NDArray[np.float64]) -> NDArray[np.float64]:
    """``u`` up to `_SOFT_TOP`, then ``1 - (1 - a) / (1 + (u - a) / (1 - a))``: continuous with slope 1 at ``a``,
    increasing, below 1 for any finite ``u``."""
    a = _SOFT_TOP
    with np.errstate(invalid="ignore", over="ignore"):
        top = 1.0 - (1.0 - a) / (1.0 + (u - a) / (1.0 - a))
    return np.where(u <= a, np.clip(u, 0.0, 1.0), top)


def update_block(norms: Sequence[ScoreNormaliser], errors: NDArray[np.float64],
                 lo: NDArray[np.float64] | None = None, hi: NDArray[np.float64] | None = None) -> NDArray[np.float64]:
    """Score ``errors[i]`` with ``norms[i]`` for many series at once, each row in time order.

    Parameters
    ----------
    norms : sequence of ScoreNormaliser
        Distinct normalisers with the same parameters.
    errors : ndarray, shape (n, k)
        Errors per series (NaN: not scored, not remembered).
    lo, hi : ndarray, shape (n, k, d), optional
        Per window and field, the smallest and largest value, for the out-of-range rule.

    Returns
    -------
    ndarray, shape (n, k)
        The scores, the same bit for bit as feeding each row's errors in any number of calls.
    """
    if norms and norms[0].params.history_gate > 0:
        return _update_gated(norms, errors, lo, hi)
    return _update_core(norms, errors, lo, hi)[0]


def _update_gated(norms: Sequence[ScoreNormaliser], errors: NDArray[np.float64], lo: NDArray[np.float64] | None,
                  hi: NDArray[np.float64] | None) -> NDArray[np.float64]:
    """`update_block` with ``history_gate``: each row is scored in stretches up to its next gated window (a red
    one within ``history_gate`` reds in a row), which is scored without entering the history. The stretches are
    plain `_update_core` calls (chunk-invariant), and where a gated window falls depends only on the scores, so
    the whole is chunk-invariant too."""
    e_all = np.asarray(errors, dtype=np.float64)
    n, k = e_all.shape
    out = np.full((n, k), np.nan)
    gate = norms[0].params.history_gate if norms else 0

    def part(a: NDArray[np.float64] | None, i: int, j0: int, j1: int) -> NDArray[np.float64] | None:
        return None if a is None else np.asarray(a, dtype=np.float64)[i : i + 1, j0:j1]

    for i, nm in enumerate(norms):
        pos = 0
        while pos < k:
            end = min(k, pos + _GATE_CHUNK)
            outer = nm._undo
            mark = nm.refs()
            sc, red = _update_core([nm], e_all[i : i + 1, pos:end], part(lo, i, pos, end), part(hi, i, pos, end))
            run = int(mark[-1])
            g = -1
            fin = np.isfinite(e_all[i, pos:end])
            for j in np.flatnonzero(fin).tolist():
                if red[0, j]:
                    if run < gate:
                        g = j
                        break
                    run += 1
                else:
                    run = 0
            if g < 0:  # nothing gated: the trial stands
                if outer is None:
                    nm.release()
                nm.red_run = run
                out[i, pos:end] = sc[0]
                pos = end
                continue
            nm.restore(mark)
            nm._undo = outer
            if g > 0:
                _update_core([nm], e_all[i : i + 1, pos : pos + g], part(lo, i, pos, pos + g),
                             part(hi, i, pos, pos + g))
            out[i, pos : pos + g] = sc[0, :g]
            sg, _ = _update_core([nm], e_all[i : i + 1, pos + g : pos + g + 1], part(lo, i, pos + g, pos + g + 1),
                                 part(hi, i, pos + g, pos + g + 1), push=False)
            out[i, pos + g] = sg[0, 0]
            nm.red_run = run + 1
            pos += g + 1
    return out


def _update_core(norms: Sequence[ScoreNormaliser], errors: NDArray[np.float64], lo: NDArray[np.float64] | None = None,
                 hi: NDArray[np.float64] | None = None, push: bool = True) -> tuple[
                     NDArray[np.float64], NDArray[np.bool_]]:
    """`update_block`'s work: the scores and, per window, whether it was red before the red-zone filter (its
    tail ``<= red`` or out of range). ``push=False``: the averages do not enter the history (the rest of the state
    advances)."""
    e_in = np.asarray(errors, dtype=np.float64)
    n, k = e_in.shape
    out = np.full((n, k), np.nan)
    red_out = np.zeros((n, k), dtype=bool)
    if n == 0 or k == 0:
        return out, red_out
    p = norms[0].params
    if any(nm.params != p for nm in norms):
        raise ValueError("update_block needs normalisers with the same parameters; group them first")
    L, S = p.long_window, p.short_window
    fin = np.isfinite(e_in)
    f = fin.sum(axis=1)
    if not f.any():
        return out, red_out
    # Compress each row's finite errors to the left: column j is the row's j-th remembered error.
    order = np.argsort(~fin, axis=1, kind="stable")
    rows = np.arange(n)[:, None]
    e = e_in[rows, order]
    valid = np.arange(k)[None, :] < f[:, None]
    e = np.where(valid, np.minimum(e, _ERROR_CAP), 0.0)  # capped: squares of the running sums stay finite
    t = np.log(np.maximum(e, 0.0) + _LOG_EPS) if p.transform == "log" else e
    # Short-window averages: the last S transformed errors (state tail first), added oldest first.
    ext = np.full((n, S - 1 + k), np.nan)
    for i, nm in enumerate(norms):
        if len(nm.tail):
            ext[i, S - 1 - len(nm.tail) : S - 1] = nm.tail
    ext[:, S - 1 :] = np.where(valid, t, np.nan)
    acc = np.zeros((n, k))
    cnt = np.zeros((n, k))
    for c in range(S):
        v = ext[:, c : c + k]
        ok = ~np.isnan(v)
        acc = acc + np.where(ok, v, 0.0)
        cnt = cnt + ok
    avg = acc / np.maximum(cnt, 1.0)
    # What enters the history (and its sums) is the average rounded to the storage type, in any chunking (beyond
    # the type's range, its largest finite value).
    q = avg if HISTORY_DTYPE == np.float64 else _to_storage(avg).astype(np.float64)
    # Reference statistics before each push: running sums with evictions, in a fixed order.
    c0 = np.fromiter((nm._count for nm in norms), dtype=np.int64, count=n)
    old = np.zeros((n, k))
    evict = np.zeros((n, k), dtype=bool)
    kk = min(k, L)
    for i, nm in enumerate(norms):
        first = L - int(c0[i])  # push index whose eviction takes hist[0]
        if first < kk:
            m = kk - first
            old[i, first:kk] = nm._oldest(m)
            evict[i, first:kk] = True
    if k > L:  # pushes beyond one long window evict this block's own averages
        old[:, L:] = q[:, : k - L]
        evict[:, L:] = True
    d1 = np.where(evict, q - old, q)
    d2 = np.where(evict, q * q - old * old, q * q)
    s1_0 = np.fromiter((nm.s1 for nm in norms), dtype=np.float64, count=n)
    s2_0 = np.fromiter((nm.s2 for nm in norms), dtype=np.float64, count=n)
    s1 = np.cumsum(np.concatenate((s1_0[:, None], d1), axis=1), axis=1)  # s1[:, j]: before push j
    s2 = np.cumsum(np.concatenate((s2_0[:, None], d2), axis=1), axis=1)
    seen0 = np.fromiter((nm.seen for nm in norms), dtype=np.int64, count=n)
    # Every long_window pushes (when the history is full), the sums are recomputed from the history itself (pairwise
    # summation of the same values in the same order, whatever the chunking), so they never drift; the running
    # sums go on from there, each segment once (linear in the row's length).
    for i in range(n):
        first = (-(int(seen0[i]) + 1)) % L  # first push after which seen is a multiple of L
        points = [j for j in range(first, int(f[i]), L) if min(L, c0[i] + j + 1) == L]
        for pi, j in enumerate(points):
            window = np.concatenate((norms[i].hist, q[i, : j + 1]))[-L:]
            s1[i, j + 1] = np.sum(window)
            s2[i, j + 1] = np.sum(window * window)
            end = points[pi + 1] if pi + 1 < len(points) else k
            s1[i, j + 2 : end + 1] = np.cumsum(np.concatenate(([s1[i, j + 1]], d1[i, j + 1 : end])))[1:]
            s2[i, j + 2 : end + 1] = np.cumsum(np.concatenate(([s2[i, j + 1]], d2[i, j + 1 : end])))[1:]
    cnt_before = np.minimum(c0[:, None] + np.arange(k)[None, :], L).astype(np.float64)
    with np.errstate(invalid="ignore", divide="ignore"):
        mean = s1[:, :k] / cnt_before
        var = s2[:, :k] / cnt_before - mean * mean
    std = np.sqrt(np.maximum(np.nan_to_num(var), 0.0))
    if p.reference == "robust":
        mean, std = _robust_reference(norms, q, f, L)
    floor = np.full_like(mean, max(p.min_std, 1e-12)) if p.transform == "log" else np.maximum(
        p.min_std * np.abs(np.nan_to_num(mean)), 1e-12)
    std = np.maximum(std, floor)
    with np.errstate(invalid="ignore"):
        z = (avg - mean) / std
    tail = ndtr(-np.nan_to_num(z, nan=0.0))
    log_tail = log_ndtr(-np.nan_to_num(z, nan=0.0)) if p.unsaturated else None
    neutral = ((seen0[:, None] + np.arange(k)[None, :]) < p.learning) | (cnt_before < 2)
    tail = np.where(neutral, 0.5, tail)
    # Out-of-range rule, per field, against the range seen before each window.
    flags = np.zeros((n, k), dtype=bool)
    excess = np.zeros((n, k))
    new_lo: NDArray[np.float64] | None = None
    new_hi: NDArray[np.float64] | None = None
    if lo is not None and hi is not None:
        with np.errstate(invalid="ignore"):
            lo_c = np.asarray(lo, dtype=np.float64)[rows, order]  # (n, k, d)
            hi_c = np.asarray(hi, dtype=np.float64)[rows, order]
        # Non-finite values (an overflow upstream) never enter the range: they would disable the rule for good.
        lo_c = np.where(valid[:, :, None] & np.isfinite(lo_c), lo_c, np.nan)
        hi_c = np.where(valid[:, :, None] & np.isfinite(hi_c), hi_c, np.nan)
        d = lo_c.shape[2]
        lo0 = np.stack([np.full(d, np.nan) if nm.lo is None or len(nm.lo) != d else nm.lo for nm in norms])
        hi0 = np.stack([np.full(d, np.nan) if nm.hi is None or len(nm.hi) != d else nm.hi for nm in norms])
        run_lo = np.fmin.accumulate(np.concatenate((lo0[:, None, :], lo_c), axis=1), axis=1)
        run_hi = np.fmax.accumulate(np.concatenate((hi0[:, None, :], hi_c), axis=1), axis=1)
        if p.range_tolerance is not None:
            flags = _out_of_range(run_lo[:, :k], run_hi[:, :k], lo_c, hi_c, p.range_tolerance)
            if p.range_growth is not None:
                # A window widens the range by at most range_growth of its width: one absurd value (a glitch of
                # 1e308) cannot widen it for good. Where no window reaches the cap the plain running range is
                # the same; the rows where one does are recomputed step by step.
                binds = _out_of_range(run_lo[:, :k], run_hi[:, :k], lo_c, hi_c, p.range_growth)
                for r in np.flatnonzero(binds.any(axis=1)).tolist():
                    run_lo[r], run_hi[r], flags[r] = _capped_range(lo0[r], hi0[r], lo_c[r], hi_c[r],
                                                                    p.range_tolerance, p.range_growth)
            if p.unsaturated:  # how far each window leaves the range before it, in its widths beyond the tolerance
                half = _half_width(run_lo[:, :k], run_hi[:, :k])
                with np.errstate(invalid="ignore", over="ignore", divide="ignore"):
                    width = np.where(half > 0, 2.0 * half, np.nan)
                    beyond = np.fmax((hi_c - run_hi[:, :k]) / width, (run_lo[:, :k] - lo_c) / width)
                    excess = np.nan_to_num(np.fmax.reduce(beyond - p.range_tolerance, axis=2), nan=0.0,
                                           posinf=1e300, neginf=0.0)
                excess = np.maximum(excess, 0.0)
        new_lo = run_lo[rows[:, 0], f]
        new_hi = run_hi[rows[:, 0], f]
    flags &= valid
    red_pre = ((tail <= p.red) | flags) & valid
    # Red-zone filter: a red right after another red (within `refractory` pushes) is demoted.
    since0 = np.fromiter((nm.since_red for nm in norms), dtype=np.int64, count=n)
    since_after = since0.copy()
    if p.red > 0:
        red = ((tail <= p.red) | flags) & valid
        idx = np.arange(k)[None, :]
        last = np.maximum.accumulate(np.where(red, idx, -1), axis=1)  # last red at or before each push
        last_before = np.concatenate((np.full((n, 1), -1), last[:, :-1]), axis=1)
        since = np.where(last_before >= 0, idx - last_before, since0[:, None] + idx)
        demote = red & (since <= p.refractory)
        tail = np.where(demote, np.maximum(tail, p.yellow), tail)
        flags &= ~demote
        last_f = last[rows[:, 0], np.maximum(f - 1, 0)]
        since_after = np.where(f == 0, since0, np.where(last_f >= 0, f - last_f, since0 + f))
    if p.unsaturated and log_tail is not None:
        # The surprise u = log(tail) / log(1e-10) without underflow; out of range: at least 1 + excess.
        u = np.log(np.maximum(tail, 1e-300)) / math.log(_LOG_EPS)
        deep = (tail < 1e-290) & ~neutral
        u = np.where(deep, log_tail / math.log(_LOG_EPS), u)
        u = np.where(flags, np.maximum(u, 1.0 + excess), u)
        scores = _soft_top(u)
    else:
        scores = log_score(tail)
        scores[flags] = 1.0
    rec_after: NDArray[np.float64] | None = None
    top_after: NDArray[np.float64] | None = None
    if p.record_factor is not None:
        eligible = (np.ones((n, k), dtype=bool) if p.record_scope == "all" else red_pre if p.record_scope == "red"
                    else scores >= float(log_score([p.red])[0]))
        rec_after, top_after = _record_rule(norms, scores, e, f, p.record_factor, eligible)
    # Write the state back and scatter the scores to the original positions.
    for i, nm in enumerate(norms):
        fi = int(f[i])
        if fi == 0:
            continue
        out[i, order[i, :fi]] = scores[i, :fi]
        red_out[i, order[i, :fi]] = red_pre[i, :fi]
        if push:
            nm._push(q[i, :fi])
            nm.s1 = float(s1[i, fi])
            nm.s2 = float(s2[i, fi])
        if rec_after is not None and top_after is not None:
            nm.rec_err, nm.top_score = float(rec_after[i]), float(top_after[i])
        nm.tail = _in_place(nm.tail, np.concatenate((nm.tail, t[i, :fi]))[-(S - 1):] if S > 1 else np.empty(0))
        nm.seen += fi
        nm.since_red = int(min(since_after[i], 1 << 30))
        if new_lo is not None and new_hi is not None:
            nm.lo, nm.hi = _in_place(nm.lo, new_lo[i]), _in_place(nm.hi, new_hi[i])
    return out, red_out


def _in_place(old: NDArray[np.float64] | None, new: NDArray[np.float64]) -> NDArray[np.float64]:
    """``new`` written into ``old`` when ``old`` is an array of its own of the same shape, else a copy of ``new``
    (never a view of a block): a series' small arrays are made once, not again at every update, so they stay put
    in memory while a tick's temporaries come and go around them. (`ScoreNormaliser.refs` copies them.)"""
    if old is not None and old.base is None and old.shape == new.shape and old.dtype == new.dtype \
            and old.flags.writeable:
        old[...] = new
        return old
    return new.copy()


def _record_rule(norms: Sequence[ScoreNormaliser], scores: NDArray[np.float64], e: NDArray[np.float64],
                 f: NDArray[np.int64], factor: float, eligible: NDArray[np.bool_]) -> tuple[
                     NDArray[np.float64], NDArray[np.float64]]:
    """The record rule, in place on ``scores`` (compressed rows, ``f[i]`` valid each): a window whose error is above
    ``factor`` times the largest error before it scores at least ``R + 0.01 (1 - R)``, ``R`` the highest score
    before it (only where ``eligible``). Returns each row's largest error and highest score after the block."""
    n = len(norms)
    rec_after = np.empty(n)
    top_after = np.empty(n)
    for i, nm in enumerate(norms):
        fi = int(f[i])
        rec, top = nm.rec_err, nm.top_score
        if fi == 0:
            rec_after[i], top_after[i] = rec, top
            continue
        ei = e[i, :fi]
        before = np.maximum.accumulate(np.concatenate(([rec], ei[:-1])))  # largest error before each window
        cand = np.flatnonzero(ei > factor * before) if math.isfinite(rec) else np.flatnonzero(
            ei[1:] > factor * before[1:]) + 1
        last = 0
        for j in cand.tolist():
            if j > last:
                top = max(top, float(np.max(scores[i, last:j])))
            lift = top + 0.01 * (1.0 - top) if math.isfinite(top) else -math.inf
            if eligible[i, j] and scores[i, j] < lift:
                scores[i, j] = lift
            last = j
        if last < fi:
            top = max(top, float(np.max(scores[i, last:fi])))
        rec_after[i] = max(rec, float(np.max(ei)))
        top_after[i] = top
    return rec_after, top_after
