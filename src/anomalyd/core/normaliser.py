"""The score normaliser: a causal map from window errors to anomaly scores in [0, 1] (pure numpy, no I/O).

A raw reconstruction error has no fixed scale: it depends on the series and on the model, and it drifts. The
normaliser turns it into a score with the same meaning everywhere, the way NAB's HTM detector does:

* an HTM-style **anomaly likelihood** (Ahmad et al. 2017): the average of the last ``short_window`` errors is
  compared with a Gaussian fitted to the previous ``long_window`` such averages; the tail probability says how
  unusual the recent level is;
* NAB's **log scale**: a tail probability of 1e-5 (likelihood 0.99999) maps to 0.5;
* an **out-of-range rule**: a window whose values leave the range seen so far (per field, widened by
  ``range_tolerance`` of its width) scores 1 (with ``unsaturated``, the detector's default, above 0.9 and the
  higher the farther out);
* a **red-zone filter**: a red tail probability (``<= red``, or out of range) right after another red one is
  demoted to ``yellow``, so a lasting anomaly scores high once rather than on every window.

Every score uses only its error and the ones before it. The update is *chunk-invariant*: feeding a stream in
one call or in many gives the same scores bit for bit (the running sums are updated step by step in a fixed
order and recomputed from the history every ``long_window`` errors), so the daemon, which scores a few
windows per tick, writes exactly what an evaluation over the stored series computes in one call. `update_block`
updates many series at once (one row each), which is the daemon's tick.

Defaults (`NormaliserParams`): ``long_window=2000``, ``short_window=8``, ``min_std=0.05`` (relative to the
reference mean), ``learning=32``, ``red=1e-5``, ``yellow=1e-3``, ``range_tolerance=0.02``, no transform. The
ranking options (``unsaturated``, the record rule) are off here; the detector's default (`DetectorSpec`) turns on
``unsaturated``, ``record_factor=1`` with ``record_scope="flagged"`` (the order of flagged windows is kept without
changing any decision at 0.5) and ``range_growth=1`` (benchmarks/RESULTS.md, issue 11). Two more options are off
by default: the *peak filter* (``peak_wait``: the red-zone filter reports a run of reds once at its peak instead of
at its onset, at most ``peak_wait`` windows late) and a *peaks-over-threshold tail* (``tail``: the lower of the
likelihood's tail probability and that of the window's own error against an exponential or generalised Pareto tail
fitted to the hold-out's and the stream's peaks).
"""

from __future__ import annotations

import math
import threading
from collections.abc import Callable, Mapping, Sequence
from dataclasses import asdict, dataclass, fields
from typing import Any, ClassVar, Generic, Literal, TypeVar, overload

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
#: Tail models of the peaks-over-threshold score (`NormaliserParams.tail`).
TAILS = ("off", "exp", "gpd")
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
    tail : {"off", "exp", "gpd"}
        A second tail probability, of each window's *own* error (not the short-window average), by peaks over
        threshold (Siffer et al., KDD 2017, SPOT): the threshold ``t`` is the hold-out errors' ``tail_level``
        quantile (`ScoreNormaliser.fit_tail`), the excesses over it are fitted by an exponential (``"exp"``,
        scale = their mean) or a generalised Pareto distribution (``"gpd"``, by the method of moments, shape
        clipped to [0, 0.45], so the tail never ends and the order of the errors is kept), and a window's tail
        probability is ``k / n * S(e - t)`` (``k`` peaks among ``n`` errors, hold-out and stream). The lower of the
        two tail probabilities is scored. Every later error joins the fit after it is scored, an anomalous one too
        (as the likelihood's history does: a lasting change is learned). "off": off.
    tail_level : float
        Quantile of the hold-out errors that is the peaks' threshold.
    tail_min_peaks : int
        Peaks needed before the tail probability is used.
    peak_wait : int
        When > 0, the red-zone filter flags each run of reds once at its peak rather than at its onset: the run is
        held while its surprise rises and flagged, with its highest surprise so far, at the first window whose
        surprise falls, the first window after the run, or ``peak_wait`` windows after its onset, whichever comes
        first. 0 or 1: off (flagged at the onset).
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
    tail: Literal["off", "exp", "gpd"] = "off"
    tail_level: float = 0.98
    tail_min_peaks: int = 10
    peak_wait: int = 0

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
        if self.tail not in TAILS:
            raise ValueError(f"tail={self.tail!r} is not one of {', '.join(TAILS)}")
        if not 0.0 < self.tail_level < 1.0:
            raise ValueError(f"tail_level={self.tail_level} must be between 0 and 1 (exclusive)")
        if self.peak_wait < 0:
            raise ValueError(f"peak_wait={self.peak_wait} must be >= 0 (0: off)")
        if self.tail_min_peaks < 2:
            raise ValueError(f"tail_min_peaks={self.tail_min_peaks} must be at least 2")

    @property
    def option_width(self) -> int:
        """Columns of per-series state the tail and peak-filter options need in a pool row (0 when both are off:
        a default normaliser's row is as wide as before them)."""
        return _N_OPTION if self.tail != "off" or self.peak_wait > 0 else 0


# Columns of a normaliser's scalars in its pool's state blocks (float64: the integers are exact up to 2**53).
(_C_HEAD, _C_COUNT, _C_S1, _C_S2, _C_SEEN, _C_SINCE, _C_REC, _C_TOP, _C_RUN, _C_TLEN, _C_LOD, _C_HID,
 _C_JHEAD, _C_CLS, _C_SLOT) = range(15)
_N_SCALARS = 15
#: ``since_red`` of a series with no red error yet (and the largest it is kept at).
_SINCE_NONE = 1 << 30
_SCALAR_DEFAULTS = np.array([0, 0, 0.0, 0.0, 0, _SINCE_NONE, -math.inf, -math.inf, 0, 0, 0, 0, -1, -1, -1],
                            dtype=np.float64)
#: Columns of the tail and peak-filter options' state (`NormaliserParams.option_width`), after the tail in a row of
#: a pool made for them: the peaks over threshold (``pot``: threshold, errors, peaks, sum of the excesses, sum of their
#: squares) and the held run of the peak filter (``peak``: age, its top surprise, the last surprise); NaN: none.
(_O_POT, _O_PEAK) = (0, 5)
_N_OPTION = 8
#: History rings are sized to what they hold, in steps of this many values, until they are full (long_window).
_RING_STEP = 128


class _Rings:
    """Rows of ``cap`` history values in blocks of ``block_bytes``; a block whose rows are all free is let go."""

    def __init__(self, cap: int, dtype: np.dtype[Any], block_bytes: int) -> None:
        self.cap = cap
        self.dtype = dtype
        self.rows_per_block = max(1, block_bytes // (cap * dtype.itemsize))
        self.blocks: list[NDArray[Any] | None] = []
        self.used: list[int] = []
        self._free: list[int] = []

    def take(self) -> int:
        """A free row (its values are arbitrary). Call with the pool's ring lock held."""
        if not self._free:
            start = len(self.blocks) * self.rows_per_block
            self.blocks.append(None)
            self.used.append(0)
            self._free.extend(range(start + self.rows_per_block - 1, start - 1, -1))  # handed out ascending
        slot = self._free.pop()
        b = slot // self.rows_per_block
        self.used[b] += 1
        if self.blocks[b] is None:  # pages are touched only when written
            self.blocks[b] = np.empty((self.rows_per_block, self.cap), dtype=self.dtype)
        return slot

    def give_back(self, slot: int) -> None:
        """Call with the pool's ring lock held."""
        b = slot // self.rows_per_block
        self.used[b] -= 1
        self._free.append(slot)
        if self.used[b] == 0:
            self.blocks[b] = None  # its memory goes back; its rows stay in the free list

    def row(self, slot: int) -> NDArray[Any]:
        b, r = divmod(slot, self.rows_per_block)
        blk = self.blocks[b]
        assert blk is not None
        return blk[r]
#: Undo journal: records of ``(prev, row, kind, length, chunk, offset)``; kind -1 is a state snapshot (`refs`), a
#: kind >= 0 is a run of ring values overwritten from that position on; the values are in payload chunks.
_J_PREV, _J_ROW, _J_KIND, _J_LEN, _J_CHUNK, _J_POS = range(6)
_JOURNAL_CHUNK = 1 << 18  # payload values per chunk (2 MiB)


class HistoryPool:
    """Preallocated storage of the score states of many normalisers: one row per normaliser in a few blocks.

    Per row: the history, in a row of a 2-D block (``block_bytes`` each, pages touched only when written) of the
    smallest capacity that holds it (steps of `_RING_STEP` values: a history that outgrows its row moves to a
    larger one; once it holds ``long_window`` values it is a ring in a row of that size; a block whose rows are
    all free is let go); the scalars (running sums, counters, ring head and length) and the tail of the last
    ``short_window - 1`` errors in a float64 state block (and, in a pool made for the tail and peak-filter options,
    their ``options`` columns after the tail); the seen range per field in a block per number of
    fields. A normaliser takes a row when it is created and gives it back when it is garbage collected, so the
    states of 100,000 series are a few dozen arrays rather than a million small objects, and an update reads and
    writes them with array indexing instead of building Python objects per series. One pool per ``(long_window,
    dtype, short_window, options)`` (`HistoryPool.of`).

    The pool also keeps the undo journal of `ScoreNormaliser.refs`/`restore`: state snapshots and the history
    values an update overwrote, in a few shared arrays, emptied once no normaliser of the pool logs any more.

    Examples
    --------
    >>> pool = HistoryPool(4, np.float32, block_bytes=64)
    >>> pool.take(), pool.take()
    (0, 1)
    >>> pool.ensure_capacity(1, 3)
    >>> pool.row(1).base is pool.rings[-1].blocks[0]
    True
    """

    _pools: ClassVar[dict[tuple[int, str, int, int], HistoryPool]] = {}
    _pools_lock: ClassVar[threading.Lock] = threading.Lock()

    def __init__(self, long_window: int, dtype: Any = HISTORY_DTYPE, block_bytes: int = 16 << 20,
                 short_window: int = 1, options: int = 0) -> None:
        self.long_window = int(long_window)
        self.dtype = np.dtype(dtype)
        self.tail_width = max(0, int(short_window) - 1)
        self.options = int(options)  # columns of the options' state (`NormaliserParams.option_width`)
        self.opt0 = _N_SCALARS + self.tail_width  # their first column
        self.width = self.opt0 + self.options  # of a state row
        self.rows_per_block = 4096  # of the state blocks
        step = min(_RING_STEP, self.long_window)
        caps = sorted({min(self.long_window, c) for c in range(step, self.long_window + step, step)})
        self.rings = [_Rings(c, self.dtype, block_bytes) for c in caps]  # by capacity, the last long_window
        self._caps = np.array(caps, dtype=np.int64)
        self._ring_lock = threading.Lock()
        self.states: list[NDArray[np.float64]] = []  # per block: (rows, scalars + tail), float64
        self.ranges: dict[int, list[NDArray[np.float64] | None]] = {}  # fields -> per block: (rows, 2, fields)
        self._free: list[int] = []  # list.pop/append are atomic: a row given back by a finaliser needs no lock
        self._grow_lock = threading.Lock()
        # The undo journal (see `ScoreNormaliser.refs`).
        self._jlock = threading.Lock()
        self._jrec = np.empty((0, 6), dtype=np.int64)
        self._jn = 0
        self._jpay: list[NDArray[np.float64]] = []
        self._jused = 0  # values used in the last payload chunk
        self._jobj: dict[int, tuple[Any, Any, Any]] = {}  # snapshot record -> (fm, fv, fn) when any is set
        self._logging = 0  # rows whose journal chain is open

    @classmethod
    def of(cls, long_window: int, dtype: Any = HISTORY_DTYPE, short_window: int = 1, options: int = 0) -> HistoryPool:
        """The shared pool of histories of ``long_window`` values of ``dtype`` (and tails of ``short_window - 1``,
        and ``options`` columns of the options' state)."""
        key = (int(long_window), np.dtype(dtype).str, max(1, int(short_window)), int(options))
        pool = cls._pools.get(key)
        if pool is None:
            with cls._pools_lock:
                pool = cls._pools.setdefault(key, cls(long_window, dtype, short_window=key[2], options=key[3]))
        return pool

    def take(self) -> int:
        """A free row, its state reset (its history values are arbitrary)."""
        try:
            row = self._free.pop()
        except IndexError:
            with self._grow_lock:
                try:
                    row = self._free.pop()
                except IndexError:
                    start = len(self.states) * self.rows_per_block
                    st = np.full((self.rows_per_block, self.width), np.nan)
                    st[:, _C_JHEAD] = -1
                    st[:, _C_CLS] = -1
                    self.states.append(st)
                    self._free.extend(range(start + self.rows_per_block - 1, start, -1))  # handed out ascending
                    row = start
        b, r = divmod(row, self.rows_per_block)
        st = self.states[b]
        if st[r, _C_JHEAD] >= 0:
            # given back while its journal chain was open (a normaliser dropped between refs and release)
            with self._jlock:
                if st[r, _C_JHEAD] >= 0:
                    st[r, _C_JHEAD] = -1
                    self._chain_closed()
        if st[r, _C_CLS] >= 0:  # the history row of the normaliser that had this row before
            with self._ring_lock:
                self.rings[int(st[r, _C_CLS])].give_back(int(st[r, _C_SLOT]))
        st[r, :_N_SCALARS] = _SCALAR_DEFAULTS
        st[r, _N_SCALARS:] = np.nan  # the tail, and the options' state (none)
        return row

    def give_back(self, row: int) -> None:
        self._free.append(row)

    def row(self, row: int) -> NDArray[Any]:
        """The history row (of its capacity) as a view into its block; empty when it has none yet."""
        b, r = divmod(row, self.rows_per_block)
        cls = int(self.states[b][r, _C_CLS])
        if cls < 0:
            return np.empty(0, dtype=self.dtype)
        return self.rings[cls].row(int(self.states[b][r, _C_SLOT]))

    def class_for(self, n: NDArray[np.int64]) -> NDArray[np.int64]:
        """The capacity class holding ``n`` values (-1 for none)."""
        return np.where(n > 0, np.searchsorted(self._caps, np.minimum(n, self.long_window)), -1)

    def ensure_capacity(self, row: int, n: int) -> None:
        """Move a row's history to a row that holds ``n`` values if its own does not (its values kept)."""
        self.grow(self.state(row)[None, :], np.array([n]))  # a view: grow writes the row

    def grow(self, state: NDArray[np.float64], need: NDArray[np.int64]) -> None:
        """Move the histories of the rows (``state``: their state rows, updated in place) whose history row holds
        fewer than ``need`` values to rows that do; a history that is not full yet starts at position 0, so its
        values keep their positions."""
        cls = state[:, _C_CLS].astype(np.int64)
        cap = np.where(cls >= 0, self._caps[np.maximum(cls, 0)], 0)
        movers = np.flatnonzero(need > cap)
        if not movers.size:
            return
        new_cls = self.class_for(need[movers])
        with self._ring_lock:
            for i, c in zip(movers.tolist(), new_cls.tolist(), strict=True):
                slot = self.rings[c].take()
                old_c = int(cls[i])
                if old_c >= 0:
                    old_slot = int(state[i, _C_SLOT])
                    count = int(state[i, _C_COUNT])
                    if count:
                        self.rings[c].row(slot)[:count] = self.rings[old_c].row(old_slot)[:count]
                    self.rings[old_c].give_back(old_slot)
                state[i, _C_CLS] = c
                state[i, _C_SLOT] = slot

    def ring_groups(self, state: NDArray[np.float64]) -> list[tuple[NDArray[Any], NDArray[np.intp], NDArray[np.int64]]]:
        """The rows (``state``: their state rows, all with a history row) by history block: (block, positions in
        ``state``, rows within the block)."""
        cls = state[:, _C_CLS].astype(np.int64)
        slot = state[:, _C_SLOT].astype(np.int64)
        out = []
        for c in np.unique(cls[cls >= 0]).tolist():
            rings = self.rings[c]
            in_c = np.flatnonzero(cls == c)
            b = slot[in_c] // rings.rows_per_block
            r = slot[in_c] % rings.rows_per_block
            for blk in np.unique(b).tolist():
                sel = b == blk
                block = rings.blocks[blk]
                assert block is not None
                out.append((block, in_c[sel], r[sel]))
        return out

    def state(self, row: int) -> NDArray[np.float64]:
        """The scalars and tail (and the options' state) of a row as a view into its state block."""
        b, r = divmod(row, self.rows_per_block)
        return self.states[b][r]

    def range_row(self, row: int, d: int) -> NDArray[np.float64]:
        """The seen range (``[lo, hi]`` x ``d`` fields) of a row as a view, its block made when first needed."""
        b, r = divmod(row, self.rows_per_block)
        return self.range_block(b, d)[r]

    def range_block(self, b: int, d: int) -> NDArray[np.float64]:
        """Block ``b``'s seen ranges of ``d`` fields, ``(rows, 2, d)``."""
        blocks = self.ranges.setdefault(d, [])
        while len(blocks) <= b:
            blocks.append(None)
        blk = blocks[b]
        if blk is None:
            with self._grow_lock:
                blk = blocks[b]
                if blk is None:
                    blk = blocks[b] = np.full((self.rows_per_block, 2, d), np.nan)
        return blk

    @property
    def rows_in_use(self) -> int:
        return len(self.states) * self.rows_per_block - len(self._free)

    # -- many rows at once (update_block) --------------------------------------------------------------
    def groups(self, rows: NDArray[np.int64]) -> list[tuple[int, NDArray[np.intp], NDArray[np.int64]]]:
        """``rows`` by block: (block, positions in ``rows``, rows within the block)."""
        b = rows // self.rows_per_block
        r = rows % self.rows_per_block
        if len(b) and b[0] == b[-1] and (b == b[0]).all():
            return [(int(b[0]), np.arange(len(rows)), r)]
        out = []
        for blk in np.unique(b).tolist():
            sel = np.flatnonzero(b == blk)
            out.append((blk, sel, r[sel]))
        return out

    def gather_states(self, groups: list[tuple[int, NDArray[np.intp], NDArray[np.int64]]],
                      n: int) -> NDArray[np.float64]:
        out = np.empty((n, self.width))
        for b, sel, r in groups:
            out[sel] = self.states[b][r]
        return out

    def gather_ring(self, groups: list[tuple[NDArray[Any], NDArray[np.intp], NDArray[np.int64]]],
                    pos: NDArray[np.int64]) -> NDArray[Any]:
        """History values at ``pos`` (``(n, m)`` positions; ``groups`` from `ring_groups`)."""
        out = np.zeros(pos.shape, dtype=self.dtype)
        for block, sel, r in groups:
            out[sel] = block[r[:, None], np.minimum(pos[sel], block.shape[1] - 1)]
        return out

    def gather_ranges(self, groups: list[tuple[int, NDArray[np.intp], NDArray[np.int64]]], widths: NDArray[Any],
                      d: int, side: int) -> NDArray[np.float64]:
        """The ``lo`` (``side`` 0) or ``hi`` (1) of each row, NaN where it is not of ``d`` fields."""
        out = np.full((len(widths), d), np.nan)
        blocks = self.ranges.get(d, [])
        for b, sel, r in groups:
            blk = blocks[b] if b < len(blocks) else None
            if blk is None:
                continue
            ok = widths[sel] == d
            out[sel[ok]] = blk[r[ok], side]
        return out

    # -- the undo journal ------------------------------------------------------------------------------
    def _chain_closed(self) -> None:
        self._logging -= 1
        if self._logging <= 0:  # nothing can be undone any more: empty the journal
            self._logging = 0
            self._jn = 0
            self._jpay = []
            self._jused = 0
            self._jobj.clear()
            if len(self._jrec) > 4096:
                self._jrec = np.empty((0, 6), dtype=np.int64)

    def _append(self, recs: NDArray[np.int64], payload: NDArray[np.float64]) -> int:
        """Append records (their ``_J_CHUNK``/``_J_POS`` filled here, payloads back to back in ``payload``); returns
        the index of the first. Call with ``_jlock`` held."""
        m = len(recs)
        if self._jn + m > len(self._jrec):
            grown = np.empty((max(1024, 2 * len(self._jrec), self._jn + m), 6), dtype=np.int64)
            grown[: self._jn] = self._jrec[: self._jn]
            self._jrec = grown
        size = len(payload)
        if not self._jpay or self._jused + size > len(self._jpay[-1]):
            self._jpay.append(np.empty(max(_JOURNAL_CHUNK, size)))
            self._jused = 0
        chunk = self._jpay[-1]
        chunk[self._jused : self._jused + size] = payload
        recs[:, _J_CHUNK] = len(self._jpay) - 1
        recs[:, _J_POS] = self._jused + np.cumsum(recs[:, _J_LEN]) - recs[:, _J_LEN]
        self._jused += size
        first = self._jn
        self._jrec[first : first + m] = recs
        self._jn += m
        return first

    def _snapshot(self, row: int, st: NDArray[np.float64], lo: NDArray[np.float64] | None,
                  hi: NDArray[np.float64] | None) -> int:
        """Append a snapshot record of a row (its state ``st`` and range) to its journal chain; returns its index.
        Call with ``_jlock`` held."""
        size = len(st) + (0 if lo is None else len(lo)) + (0 if hi is None else len(hi))
        g = self._jn
        if g >= len(self._jrec):
            grown = np.empty((max(1024, 2 * len(self._jrec)), 6), dtype=np.int64)
            grown[:g] = self._jrec[:g]
            self._jrec = grown
        if not self._jpay or self._jused + size > len(self._jpay[-1]):
            self._jpay.append(np.empty(max(_JOURNAL_CHUNK, size)))
            self._jused = 0
        chunk, at = self._jpay[-1], self._jused
        chunk[at : at + len(st)] = st
        end = at + len(st)
        for a in (lo, hi):
            if a is not None:
                chunk[end : end + len(a)] = a
                end += len(a)
        prev = int(st[_C_JHEAD])
        self._jrec[g] = (prev, row, -1, size, len(self._jpay) - 1, at)
        self._jused = end
        self._jn = g + 1
        if prev < 0:
            self._logging += 1
        st[_C_JHEAD] = g
        return g

    def _payload(self, g: int) -> NDArray[np.float64]:
        rec = self._jrec[g]
        return self._jpay[int(rec[_J_CHUNK])][int(rec[_J_POS]) : int(rec[_J_POS] + rec[_J_LEN])]


def _from_snapshot(state: Mapping[str, Any]) -> ScoreNormaliser:
    return ScoreNormaliser.from_dict(state)


#: Parameters added after models and score states were first saved, with the values that reproduce the behaviour
#: they were saved with: parameters read from an older file keep scoring as they did.
PARAMS_BEFORE: dict[str, Any] = {"unsaturated": False, "record_factor": None, "tail": "off", "peak_wait": 0}


def params_from_dict(raw: Mapping[str, Any]) -> NormaliserParams:
    """`NormaliserParams` from a saved dict; keys it does not know are ignored, missing ones are `PARAMS_BEFORE`'s.

    Examples
    --------
    >>> params_from_dict({"long_window": 100}).unsaturated  # saved before the option existed
    False
    """
    names = {f.name for f in fields(NormaliserParams)}
    return NormaliserParams(**{**PARAMS_BEFORE, **{k: v for k, v in dict(raw).items() if k in names}})


_T = TypeVar("_T")


class _Scalar(Generic[_T]):
    """One of a normaliser's numbers, kept in column ``col`` of its row in the pool's state block (see
    `HistoryPool`): read and written as an attribute, converted by ``kind`` (float or int)."""

    def __init__(self, col: int, kind: Callable[[Any], _T], doc: str) -> None:
        self.col, self.kind, self.__doc__ = col, kind, doc

    @overload
    def __get__(self, obj: None, owner: type | None = None) -> _Scalar[_T]: ...
    @overload
    def __get__(self, obj: ScoreNormaliser, owner: type | None = None) -> _T: ...
    def __get__(self, obj: ScoreNormaliser | None, owner: type | None = None) -> _Scalar[_T] | _T:
        return self if obj is None else self.kind(obj._get(self.col))

    def __set__(self, obj: ScoreNormaliser, v: _T) -> None:
        obj._set(self.col, self.kind(v))  # type: ignore[arg-type]


class ScoreNormaliser:
    """The state of one series' score: recent averages, running sums, red-zone and range memory.

    The state lives in a row of a shared `HistoryPool` (the history ring, the scalars, the tail, the seen range,
    and the state of the tail and peak-filter options when they are on), so a normaliser object is a handle (its
    pool and row, and the per-field surprise arrays when used); the attributes read and write that row.

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

    __slots__ = ("_pool", "_row", "fm", "fn", "fv", "params")

    #: The version `snapshot` and `to_dict` write.
    state_version = _STATE_VERSION

    def __init__(self, params: NormaliserParams | None = None) -> None:
        self.params = params or NormaliserParams()
        # The last long_window short-window averages: a ring in a row of the shared pool (`hist` gives them in
        # order; the head is the oldest's position), beside the row's scalars and tail (see `HistoryPool`).
        self._pool = HistoryPool.of(self.params.long_window, HISTORY_DTYPE, self.params.short_window,
                                    self.params.option_width)
        self._row = self._pool.take()
        # Per-field surprise (`field_surprise`, ``DetectorSpec.field_surprise``): each field's exponentially
        # weighted error mean and variance, and its run of consecutive gated windows; None when unused.
        self.fm: NDArray[np.float64] | None = None
        self.fv: NDArray[np.float64] | None = None
        self.fn: NDArray[np.float64] | None = None

    def __del__(self) -> None:
        pool = getattr(self, "_pool", None)
        if pool is not None:
            pool.give_back(self._row)

    def __reduce__(self) -> tuple[Any, ...]:  # pickled as its snapshot, not with the pool
        return (_from_snapshot, (self.snapshot(),))

    # -- the row's scalars -----------------------------------------------------------------------------
    def _get(self, c: int) -> float:
        b, r = divmod(self._row, self._pool.rows_per_block)
        return float(self._pool.states[b][r, c])

    def _set(self, c: int, v: float) -> None:
        b, r = divmod(self._row, self._pool.rows_per_block)
        self._pool.states[b][r, c] = v

    s1 = _Scalar(_C_S1, float, "Running sum of the history.")
    s2 = _Scalar(_C_S2, float, "Running sum of the squares of the history.")
    seen = _Scalar(_C_SEEN, int, "Finite errors seen.")
    since_red = _Scalar(_C_SINCE, int, "Errors since the last red one (huge: none yet).")
    rec_err = _Scalar(_C_REC, float, "Record rule (``record_factor``): the largest error seen.")
    top_score = _Scalar(_C_TOP, float, "Record rule: the highest score seen.")
    red_run = _Scalar(_C_RUN, int, "History gate (``history_gate``): red windows in a row kept out of the history.")

    @property
    def tail(self) -> NDArray[np.float64]:
        """The last ``short_window - 1`` transformed errors, oldest first (a copy)."""
        st = self._pool.state(self._row)
        n = int(st[_C_TLEN])
        return st[_N_SCALARS + self._pool.tail_width - n : _N_SCALARS + self._pool.tail_width].copy()

    @tail.setter
    def tail(self, values: ArrayLike) -> None:
        v = np.asarray(values, dtype=np.float64).reshape(-1)
        w = self._pool.tail_width
        if len(v) > w:
            raise ValueError(f"a tail of {len(v)} errors is longer than short_window - 1 = {w}")
        st = self._pool.state(self._row)
        st[_N_SCALARS : _N_SCALARS + w - len(v)] = np.nan
        st[_N_SCALARS + w - len(v) : _N_SCALARS + w] = v
        st[_C_TLEN] = len(v)

    def _option(self, at: int, size: int) -> NDArray[np.float64] | None:
        """``size`` columns of the options' state from ``at`` (a copy; None: all NaN, or no such columns)."""
        if not self._pool.options:
            return None
        st = self._pool.state(self._row)
        v = st[self._pool.opt0 + at : self._pool.opt0 + at + size]
        return None if np.isnan(v).all() else v.copy()

    def _set_option(self, at: int, size: int, values: ArrayLike | None) -> None:
        if not self._pool.options:  # both options off: their state is not kept
            return
        st = self._pool.state(self._row)
        if values is None:
            st[self._pool.opt0 + at : self._pool.opt0 + at + size] = np.nan
            return
        v = np.asarray(values, dtype=np.float64).reshape(-1)
        if v.shape != (size,):
            raise ValueError(f"a state array of {size} values has shape {v.shape}")
        st[self._pool.opt0 + at : self._pool.opt0 + at + size] = v

    @property
    def pot(self) -> NDArray[np.float64] | None:
        """Peaks over threshold (``tail``): ``[threshold, errors, peaks, sum of excesses, sum of their squares]``
        (a copy), or None before `fit_tail`."""
        return self._option(_O_POT, 5)

    @pot.setter
    def pot(self, v: ArrayLike | None) -> None:
        self._set_option(_O_POT, 5, v)

    @property
    def peak(self) -> NDArray[np.float64] | None:
        """Peak filter (``peak_wait``): the held run, ``[age (-1: none), its top surprise, the last surprise]`` (a
        copy), or None before the first update."""
        return self._option(_O_PEAK, 3)

    @peak.setter
    def peak(self, v: ArrayLike | None) -> None:
        self._set_option(_O_PEAK, 3, v)

    def _range(self, side: int) -> NDArray[np.float64] | None:
        d = int(self._get(_C_LOD + side))
        return None if d == 0 else self._pool.range_row(self._row, d)[side].copy()

    def _set_range(self, side: int, values: ArrayLike | None) -> None:
        if values is None:
            self._set(_C_LOD + side, 0)
            return
        v = np.asarray(values, dtype=np.float64).reshape(-1)
        if len(v) == 0:
            self._set(_C_LOD + side, 0)
            return
        self._pool.range_row(self._row, len(v))[side] = v
        self._set(_C_LOD + side, len(v))

    @property
    def lo(self) -> NDArray[np.float64] | None:
        """Per field, the smallest value seen so far (a copy; None: none yet)."""
        return self._range(0)

    @lo.setter
    def lo(self, v: ArrayLike | None) -> None:
        self._set_range(0, v)

    @property
    def hi(self) -> NDArray[np.float64] | None:
        """Per field, the largest value seen so far (a copy; None: none yet)."""
        return self._range(1)

    @hi.setter
    def hi(self, v: ArrayLike | None) -> None:
        self._set_range(1, v)

    # -- the history ring ----------------------------------------------------------------------------
    @property
    def _ring(self) -> NDArray[Any]:
        return self._pool.row(self._row)

    @property
    def hist(self) -> NDArray[np.float64]:
        """The history, oldest first (a float64 copy)."""
        return self._oldest(self.history_length)

    @hist.setter
    def hist(self, values: ArrayLike) -> None:
        v = np.asarray(values, dtype=np.float64).reshape(-1)[-self.params.long_window :]
        self._pool.ensure_capacity(self._row, len(v))
        self._ring[: len(v)] = _to_storage(v)
        self._set(_C_HEAD, 0)
        self._set(_C_COUNT, len(v))

    def _oldest(self, m: int) -> NDArray[np.float64]:
        """The ``m`` oldest averages of the history (float64)."""
        L, h = self.params.long_window, int(self._get(_C_HEAD))
        ring = self._ring
        if h + m <= L:
            return ring[h : h + m].astype(np.float64)
        return np.concatenate((ring[h:], ring[: h + m - L])).astype(np.float64)

    @property
    def history_length(self) -> int:
        """Averages in the history (``len(hist)``, without building it)."""
        return int(self._get(_C_COUNT))

    @property
    def history_bytes(self) -> int:
        """Bytes of history storage this normaliser holds (one row of its pool, at most ``long_window`` values)."""
        return int(self._ring.nbytes)

    # -- rollback ----------------------------------------------------------------------------------------
    @property
    def _journal_head(self) -> int:
        """The newest record of this row's undo chain in its pool's journal; -1: not logging."""
        return int(self._get(_C_JHEAD))

    def refs(self) -> tuple[int]:
        """Mark the state as it is now, cheaply, so that `restore` can put it back (e.g. when a tick's writes
        failed): a snapshot of the row's scalars, tail and range into the pool's undo journal, after which updates
        log the history values they overwrite there too (no copy of any history, no Python object per series but
        the returned mark). Marks taken one after the other are restored newest first; `release` ends the log."""
        pool = self._pool
        b, r = divmod(self._row, pool.rows_per_block)
        st = pool.states[b][r]
        d_lo, d_hi = int(st[_C_LOD]), int(st[_C_HID])
        with pool._jlock:
            g = pool._snapshot(self._row, st, pool.range_row(self._row, d_lo)[0] if d_lo else None,
                               pool.range_row(self._row, d_hi)[1] if d_hi else None)
            if self.fm is not None or self.fv is not None or self.fn is not None:
                pool._jobj[g] = (self.fm, self.fv, self.fn)
        return (g,)

    def restore(self, refs: tuple[object, ...]) -> None:
        """Put back a state marked with `refs` (the history writes since then are undone, newest first)."""
        mark = refs[0]
        if len(refs) != 1 or not isinstance(mark, int):
            raise ValueError("not a mark of refs()")
        pool = self._pool
        b, r = divmod(self._row, pool.rows_per_block)
        st = pool.states[b][r]
        L = self.params.long_window
        with pool._jlock:
            g = int(st[_C_JHEAD])
            while g > mark:
                rec = pool._jrec[g]
                if rec[_J_ROW] != self._row:
                    raise ValueError("refs of another normaliser, or released")
                if rec[_J_KIND] >= 0:  # history values overwritten from that position on
                    old = pool._payload(g)
                    pool.row(self._row)[(int(rec[_J_KIND]) + np.arange(len(old))) % L] = old
                g = int(rec[_J_PREV])
            if g != mark or pool._jrec[mark, _J_ROW] != self._row or pool._jrec[mark, _J_KIND] != -1:
                raise ValueError("refs of another normaliser, or released: nothing to restore")
            payload = pool._payload(mark)
            prev = int(pool._jrec[mark, _J_PREV])
            where = st[_C_CLS : _C_SLOT + 1].copy()  # the history stays where it is now (it may have grown)
            st[:] = payload[: len(st)]
            st[_C_CLS : _C_SLOT + 1] = where
            at = len(st)
            for side in (0, 1):
                d = int(st[_C_LOD + side])
                if d:
                    pool.range_row(self._row, d)[side] = payload[at : at + d]
                    at += d
            self.fm, self.fv, self.fn = pool._jobj.get(mark, (None, None, None))
            if prev < 0:  # the first mark of the chain: the log ends (as after `release`)
                st[_C_JHEAD] = -1
                pool._chain_closed()
            else:  # the mark stays in the chain: it can be restored again, and older marks after it
                st[_C_JHEAD] = mark

    def release(self) -> None:
        """Forget the undo log of `refs` (the updates since then are final)."""
        pool = self._pool
        b, r = divmod(self._row, pool.rows_per_block)
        st = pool.states[b][r]
        if st[_C_JHEAD] < 0:
            return
        with pool._jlock:
            if st[_C_JHEAD] >= 0:
                st[_C_JHEAD] = -1
                pool._chain_closed()

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
        old_lo, old_hi = self.lo, self.hi
        self.lo = lo if old_lo is None else np.fmin(old_lo, lo)
        self.hi = hi if old_hi is None else np.fmax(old_hi, hi)

    def snapshot(self) -> dict[str, Any]:
        """The state with arrays (not JSON-able; `to_dict` is); `from_dict` takes either."""
        return {"version": _STATE_VERSION, "params": self.params, "hist": self.hist, "s1": self.s1,
                "s2": self.s2, "tail": self.tail, "seen": self.seen, "since_red": self.since_red,
                "lo": self.lo, "hi": self.hi,
                **{k: None if getattr(self, k) is None else getattr(self, k).copy() for k in ("fm", "fv", "fn")},
                "rec_err": self.rec_err, "top_score": self.top_score, "red_run": self.red_run,
                "pot": self.pot, "peak": self.peak}

    def to_dict(self) -> dict[str, Any]:
        """JSON-able state, parameters included; floats round-trip exactly through JSON."""
        s = self.snapshot()
        return {**s, "params": asdict(self.params), "hist": s["hist"].tolist(), "tail": s["tail"].tolist(),
                "lo": None if s["lo"] is None else [_json_float(v) for v in s["lo"]],
                "hi": None if s["hi"] is None else [_json_float(v) for v in s["hi"]],
                **{k: None if s[k] is None else [_json_float(v) for v in s[k]] for k in ("fm", "fv", "fn")},
                "rec_err": _json_float(self.rec_err), "top_score": _json_float(self.top_score),
                **{k: None if s[k] is None else [_json_float(v) for v in s[k]] for k in ("pot", "peak")}}

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
            pot = state.get("pot")  # absent from states saved before the tail option: no tail fitted
            norm.pot = None if pot is None or len(pot) == 0 else _small_array(pot, 5, math.nan)
            peak = state.get("peak")  # absent from states saved before the peak filter: no run held
            norm.peak = None if peak is None or len(peak) == 0 else _small_array(peak, 3, -math.inf)
        except (KeyError, TypeError, ValueError) as exc:
            raise ValueError(f"normaliser state is malformed ({exc!r}); delete the saved score state (or retrain) "
                             "so it is learned again") from exc
        return norm

    def fit_tail(self, errors: ArrayLike) -> None:
        """Start the peaks-over-threshold tail (``params.tail``) from the hold-out's errors: the threshold is
        their ``tail_level`` quantile, and their peaks over it are the tail's first peaks. No-op when ``tail`` is
        "off" or no error is finite."""
        e = np.asarray(errors, dtype=np.float64).reshape(-1)
        e = np.minimum(e[np.isfinite(e)], _ERROR_CAP)
        if self.params.tail == "off" or not e.size:
            return
        t = float(np.quantile(e, self.params.tail_level))
        y = e[e > t] - t
        self.pot = np.array([t, float(e.size), float(y.size), float(np.sum(y)), float(np.sum(y * y))])

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
        c0 = nm.history_length
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
    growth = norms[0].params.range_growth
    if growth is not None:  # the range as `update_block` keeps it: a window widens it by at most its width's share
        binds = _out_of_range(run_lo, run_hi, lo_c, hi_c, growth)
        for r in np.flatnonzero(binds.any(axis=1)).tolist():
            capped_lo, capped_hi, _ = _capped_range(lo0[r], hi0[r], lo_c[r], hi_c[r], tolerance, growth)
            run_lo[r], run_hi[r] = capped_lo[:k], capped_hi[:k]
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
            outer = nm._journal_head
            run = nm.red_run
            mark = nm.refs()
            sc, red = _update_core([nm], e_all[i : i + 1, pos:end], part(lo, i, pos, end), part(hi, i, pos, end))
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
                if outer < 0:
                    nm.release()
                nm.red_run = run
                out[i, pos:end] = sc[0]
                pos = end
                continue
            nm.restore(mark)  # back to the outer log, if any
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
    advances). The state is read from and written to the normalisers' pool rows with array indexing."""
    e_in = np.asarray(errors, dtype=np.float64)
    n, k = e_in.shape
    out = np.full((n, k), np.nan)
    red_out = np.zeros((n, k), dtype=bool)
    if n == 0 or k == 0:
        return out, red_out
    p = norms[0].params
    pool = norms[0]._pool
    if any(nm.params is not p and nm.params != p for nm in norms):
        raise ValueError("update_block needs normalisers with the same parameters; group them first")
    if any(nm._pool is not pool for nm in norms):
        raise ValueError("update_block needs normalisers of one pool")
    L, S = p.long_window, p.short_window
    fin = np.isfinite(e_in)
    f = fin.sum(axis=1)
    if not f.any():
        return out, red_out
    row_ids = np.fromiter((nm._row for nm in norms), dtype=np.int64, count=n)
    if len(np.unique(row_ids)) != n:
        raise ValueError("update_block needs distinct normalisers")
    groups = pool.groups(row_ids)
    state0 = pool.gather_states(groups, n)
    # Compress each row's finite errors to the left: column j is the row's j-th remembered error.
    order = np.argsort(~fin, axis=1, kind="stable")
    rows = np.arange(n)[:, None]
    e = e_in[rows, order]
    valid = np.arange(k)[None, :] < f[:, None]
    e = np.where(valid, np.minimum(e, _ERROR_CAP), 0.0)  # capped: squares of the running sums stay finite
    t = np.log(np.maximum(e, 0.0) + _LOG_EPS) if p.transform == "log" else e
    # Short-window averages: the last S transformed errors (state tail first, stored right-aligned after NaNs),
    # added oldest first.
    ext = np.empty((n, S - 1 + k))
    ext[:, : S - 1] = state0[:, _N_SCALARS : _N_SCALARS + S - 1]
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
    c0 = state0[:, _C_COUNT].astype(np.int64)
    head0 = state0[:, _C_HEAD].astype(np.int64)
    kk = min(k, L)
    first = L - c0  # push index whose eviction takes hist[0]
    jj = np.arange(kk)[None, :]
    evict = np.zeros((n, k), dtype=bool)
    evict[:, :kk] = jj >= first[:, None]
    old = np.zeros((n, k))
    ev = np.flatnonzero(evict[:, :kk].any(axis=1))  # rows with a full history
    if ev.size:
        pos = (head0[ev, None] + jj - first[ev, None]) % L
        old[ev, :kk] = np.where(evict[ev, :kk], pool.gather_ring(pool.ring_groups(state0[ev]), pos), 0.0)
    if k > L:  # pushes beyond one long window evict this block's own averages
        old[:, L:] = q[:, : k - L]
        evict[:, L:] = True
    d1 = np.where(evict, q - old, q)
    d2 = np.where(evict, q * q - old * old, q * q)
    s1_0 = state0[:, _C_S1]
    s2_0 = state0[:, _C_S2]
    s1 = np.cumsum(np.concatenate((s1_0[:, None], d1), axis=1), axis=1)  # s1[:, j]: before push j
    s2 = np.cumsum(np.concatenate((s2_0[:, None], d2), axis=1), axis=1)
    seen0 = state0[:, _C_SEEN].astype(np.int64)
    # Every long_window pushes (when the history is full), the sums are recomputed from the history itself (pairwise
    # summation of the same values in the same order, whatever the chunking), so they never drift; the running
    # sums go on from there, each segment once (linear in the row's length). Rows with no such point skip this.
    first_pt = (-(seen0 + 1)) % L  # first push after which seen is a multiple of L
    has_pt = (first_pt < f) & ((c0 + first_pt + 1 >= L) | (first_pt + L < f))
    for i in np.flatnonzero(has_pt).tolist():
        points = [j for j in range(int(first_pt[i]), int(f[i]), L) if min(L, c0[i] + j + 1) == L]
        hist_i = norms[i].hist
        for pi, j in enumerate(points):
            window = np.concatenate((hist_i, q[i, : j + 1]))[-L:]
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
    o = pool.opt0  # the options' state columns (tail, peak filter), when the pool has them
    pot_after: NDArray[np.float64] | None = None
    if p.tail != "off":  # the lower of the two tail probabilities (log space: no underflow)
        log_pot, pot_after = _pot_tails(state0[:, o + _O_POT : o + _O_POT + 5], e, f, p)
        with np.errstate(under="ignore"):
            tail = np.minimum(tail, np.exp(log_pot))
        if log_tail is not None:
            log_tail = np.minimum(log_tail, log_pot)
    # Out-of-range rule, per field, against the range seen before each window.
    flags = np.zeros((n, k), dtype=bool)
    excess = np.zeros((n, k))
    new_lo: NDArray[np.float64] | None = None
    new_hi: NDArray[np.float64] | None = None
    d = 0
    if lo is not None and hi is not None:
        with np.errstate(invalid="ignore"):
            lo_c = np.asarray(lo, dtype=np.float64)[rows, order]  # (n, k, d)
            hi_c = np.asarray(hi, dtype=np.float64)[rows, order]
        # Non-finite values (an overflow upstream) never enter the range: they would disable the rule for good.
        lo_c = np.where(valid[:, :, None] & np.isfinite(lo_c), lo_c, np.nan)
        hi_c = np.where(valid[:, :, None] & np.isfinite(hi_c), hi_c, np.nan)
        d = lo_c.shape[2]
        lo0 = pool.gather_ranges(groups, state0[:, _C_LOD], d, 0)
        hi0 = pool.gather_ranges(groups, state0[:, _C_HID], d, 1)
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
            if p.unsaturated or p.peak_wait > 0:  # how far each window leaves the range before it, in its
                # widths beyond the tolerance
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
    since0 = state0[:, _C_SINCE].astype(np.int64)
    since_after = since0.copy()
    u_peak: NDArray[np.float64] | None = None
    peak_after: NDArray[np.float64] | None = None
    if p.red > 0:
        red = ((tail <= p.red) | flags) & valid
        idx = np.arange(k)[None, :]
        last = np.maximum.accumulate(np.where(red, idx, -1), axis=1)  # last red at or before each push
        last_before = np.concatenate((np.full((n, 1), -1), last[:, :-1]), axis=1)
        since = np.where(last_before >= 0, idx - last_before, since0[:, None] + idx)
        demote = red & (since <= p.refractory)
        if p.peak_wait > 0:
            u_peak, peak_after = _peak_filter(state0[:, o + _O_PEAK : o + _O_PEAK + 3],
                                              _surprise(tail, log_tail, flags, excess, neutral), red,
                                              since <= p.refractory, f, p)
        tail = np.where(demote, np.maximum(tail, p.yellow), tail)
        flags &= ~demote
        last_f = last[rows[:, 0], np.maximum(f - 1, 0)]
        since_after = np.where(f == 0, since0, np.where(last_f >= 0, f - last_f, since0 + f))
    if u_peak is not None:
        scores = _soft_top(u_peak) if p.unsaturated else np.clip(u_peak, 0.0, 1.0)
    elif p.unsaturated and log_tail is not None:
        scores = _soft_top(_surprise(tail, log_tail, flags, excess, neutral))
    else:
        scores = log_score(tail)
        scores[flags] = 1.0
    rec_after: NDArray[np.float64] | None = None
    top_after: NDArray[np.float64] | None = None
    if p.record_factor is not None:
        eligible = (np.ones((n, k), dtype=bool) if p.record_scope == "all" else red_pre if p.record_scope == "red"
                    else scores >= float(log_score([p.red])[0]))
        rec_after, top_after = _record_rule(state0[:, _C_REC], state0[:, _C_TOP], scores, e, f, p.record_factor,
                                            eligible)
    # Scatter the scores to the original positions.
    out[rows, order] = np.where(valid, scores, np.nan)
    red_out[rows, order] = red_pre & valid
    # Write the state back (the rows with at least one error; the others are unchanged).
    w = f > 0
    if not w.all():
        sel = np.flatnonzero(w)
        row_ids = row_ids[sel]
        groups = pool.groups(row_ids)
        state0, f, c0, head0, q, ext, since_after = (state0[sel], f[sel], c0[sel], head0[sel], q[sel], ext[sel],
                                                     since_after[sel])
        s1, s2 = s1[sel], s2[sel]
        new_lo = None if new_lo is None else new_lo[sel]
        new_hi = None if new_hi is None else new_hi[sel]
        rec_after = None if rec_after is None else rec_after[sel]
        top_after = None if top_after is None else top_after[sel]
        pot_after = None if pot_after is None else pot_after[sel]
        peak_after = None if peak_after is None else peak_after[sel]
    m = len(f)
    rr = np.arange(m)
    state1 = state0
    if push:
        _push_many(pool, row_ids, state0, f, c0, head0, q, L)
        state1[:, _C_S1] = s1[rr, f]
        state1[:, _C_S2] = s2[rr, f]
    if rec_after is not None and top_after is not None:
        state1[:, _C_REC], state1[:, _C_TOP] = rec_after, top_after
    if pot_after is not None:
        state1[:, o + _O_POT : o + _O_POT + 5] = pot_after
    if peak_after is not None:
        state1[:, o + _O_PEAK : o + _O_PEAK + 3] = peak_after
    if S > 1:
        state1[:, _N_SCALARS : _N_SCALARS + S - 1] = ext[rr[:, None], f[:, None] + np.arange(S - 1)[None, :]]
        state1[:, _C_TLEN] = np.minimum(state0[:, _C_TLEN] + f, S - 1)
    state1[:, _C_SEEN] += f
    state1[:, _C_SINCE] = np.minimum(since_after, _SINCE_NONE)
    if new_lo is not None and new_hi is not None:
        state1[:, _C_LOD] = d
        state1[:, _C_HID] = d
        for gb, gsel, gr in groups:
            blk = pool.range_block(gb, d)
            blk[gr, 0] = new_lo[gsel]
            blk[gr, 1] = new_hi[gsel]
    for gb, gsel, gr in groups:
        pool.states[gb][gr] = state1[gsel]
    return out, red_out


def _surprise(tail: NDArray[np.float64], log_tail: NDArray[np.float64] | None, flags: NDArray[np.bool_],
              excess: NDArray[np.float64], neutral: NDArray[np.bool_]) -> NDArray[np.float64]:
    """The surprise ``u = log(tail) / log(1e-10)`` (0.5 at the red zone's 1e-5), without underflow where
    ``log_tail`` is given; out of range: at least ``1 + excess``."""
    u = np.log(np.maximum(tail, 1e-300)) / math.log(_LOG_EPS)
    if log_tail is not None:
        deep = (tail < 1e-290) & ~neutral
        u = np.where(deep, log_tail / math.log(_LOG_EPS), u)
    return np.asarray(np.where(flags, np.maximum(u, 1.0 + excess), u))


def _peak_filter(peak0: NDArray[np.float64], u: NDArray[np.float64], red: NDArray[np.bool_],
                 cont: NDArray[np.bool_], f: NDArray[np.int64], p: NormaliserParams) -> tuple[
                     NDArray[np.float64], NDArray[np.float64]]:
    """The red-zone filter that reports a run of reds once, at its peak (``NormaliserParams.peak_wait``).

    ``peak0`` is each row's held run before the block (``[age, top, previous surprise]``, age -1: none; a row of
    NaN: none yet), ``u`` each window's surprise, ``red`` whether it is red before the filter, ``cont`` whether it
    continues a run (within ``refractory`` of the last red). A new run is held (its windows score at most yellow)
    while its surprise rises; the first window whose surprise is lower than the one before it, the first window
    after the run, or the window ``peak_wait`` after its onset is flagged with the run's highest surprise so far;
    the rest of the run is demoted as before. So a run is flagged once, as before, but with its peak's surprise (an
    anomaly that builds up over a window scores its worst, not its onset), at most ``peak_wait`` windows late.
    Returns the surprises after the filter and each row's held run after the block. The windows are walked in time
    order, the held run carried between calls (the pool row's ``peak`` columns)."""
    u_y = math.log(p.yellow) / math.log(_LOG_EPS) if p.yellow > 0 else math.inf
    out = np.where(red & cont, np.minimum(u, u_y), u)
    after = np.empty((len(peak0), 3))
    wait = p.peak_wait
    for i in range(len(peak0)):
        held = peak0[i]
        age, top, prev = ((-1.0, -math.inf, -math.inf) if np.isnan(held).all()
                          else (float(held[0]), float(held[1]), float(held[2])))
        fi = int(f[i])
        if age < 0 and not red[i, :fi].any():  # nothing held, nothing red: nothing to do
            after[i] = (age, top, prev)
            continue
        reds, conts, us = red[i, :fi].tolist(), cont[i, :fi].tolist(), u[i, :fi].tolist()
        for j in range(fi):
            if age < 0:
                if reds[j] and not conts[j] and wait > 1:  # a new run: held
                    age, top, prev = 0.0, us[j], us[j]
                    out[i, j] = min(us[j], u_y)
                continue
            uj = us[j]
            if not reds[j] or uj < prev or age + 1 >= wait:  # ended, past its peak, or waited enough: flagged
                out[i, j] = max(top, uj)
                age = -1.0
            else:  # still rising: held
                age, top, prev = age + 1.0, max(top, uj), uj
                out[i, j] = min(uj, u_y)
        after[i] = (age, top, prev)
    return out, after


def _small_array(v: Any, size: int, none: float) -> NDArray[np.float64]:
    """A small state array from a saved list (None, JSON's non-finite value, becomes ``none``)."""
    a = np.array([none if x is None else float(x) for x in np.asarray(v, dtype=object).reshape(-1)])
    if a.shape != (size,):
        raise ValueError(f"a state array of {size} values has shape {a.shape}")
    return a


def _pot_tails(state: NDArray[np.float64], e: NDArray[np.float64], f: NDArray[np.int64],
               p: NormaliserParams) -> tuple[NDArray[np.float64], NDArray[np.float64]]:
    """The peaks-over-threshold log tail probability of each window's own error (compressed rows, ``f[i]`` valid
    each; 0 -- tail 1 -- at or below the threshold, before `ScoreNormaliser.fit_tail` and while fewer than
    ``tail_min_peaks`` peaks are known), and each row's state after the block. ``state`` is each row's ``pot``
    columns (``(n, 5)``; NaN: no tail fitted, which stays so). Each error is scored against the errors before it
    (and counts itself among them), then joins them; the counts and sums run in time order (cumulative sums from
    the state's), so in any chunking. All rows at once."""
    n, k = e.shape
    t, cnt, kk, s1, s2 = (state[:, c : c + 1] for c in range(5))
    valid = np.arange(k)[None, :] < f[:, None]
    with np.errstate(invalid="ignore"):
        y = e - t
        peak = valid & (y > 0)  # NaN threshold (no tail fitted): no peak
    yp = np.where(peak, y, 0.0)
    zero = np.zeros((n, 1))
    k_before = kk + np.cumsum(np.concatenate((zero, peak[:, :-1]), axis=1), axis=1, dtype=np.float64)
    s1_all = np.cumsum(np.concatenate((s1, yp), axis=1), axis=1)
    s2_all = np.cumsum(np.concatenate((s2, yp * yp), axis=1), axis=1)
    seen = cnt + np.arange(1, k + 1, dtype=np.float64)[None, :]  # the errors so far, this one included
    with np.errstate(divide="ignore", invalid="ignore"):
        m = s1_all[:, :-1] / k_before
        lt = np.log(k_before / seen)
        if p.tail == "gpd":  # method of moments, shape clipped to [0, 0.45]
            v = s2_all[:, :-1] / k_before - m * m
            xi = np.clip(np.where(v > 0, 0.5 * (1.0 - m * m / v), 0.0), 0.0, 0.45)
            sigma = np.where(xi > 0, 0.5 * m * (1.0 + m * m / np.where(v > 0, v, 1.0)), m)
            lt = lt - np.where(xi > 0, np.log1p(xi * y / sigma) / np.where(xi > 0, xi, 1.0), y / sigma)
        else:
            lt = lt - y / m
        use = peak & (k_before >= p.tail_min_peaks) & (m > 0)
    out = np.where(use, lt, 0.0)
    rows = np.arange(n)
    after = state.copy()
    fitted = np.isfinite(state[:, 0])
    if fitted.any():
        new = np.column_stack((state[:, 0], state[:, 1] + f, state[:, 2] + peak.sum(axis=1),
                               s1_all[rows, f], s2_all[rows, f]))
        after[fitted] = new[fitted]
    return out, after


def _push_many(pool: HistoryPool, row_ids: NDArray[np.int64], state: NDArray[np.float64], f: NDArray[np.int64],
               c0: NDArray[np.int64], head0: NDArray[np.int64], q: NDArray[np.float64], L: int) -> None:
    """Append each row's ``f[i]`` averages (``q[i, :f[i]]``) to its history ring in place (the oldest ones go),
    and set the ring's head and length in ``state``. Rows whose journal chain is open (`ScoreNormaliser.refs`) log
    the history values they overwrite first (only values that were in the history: a ring that is not full yet
    logs nothing)."""
    k = q.shape[1]
    pool.grow(state, np.minimum(L, c0 + f))  # a history row that would overflow moves to a larger one
    groups = pool.ring_groups(state)
    keep = np.minimum(f, L)
    jj = np.arange(k)[None, :]
    write = (jj < f[:, None]) & (jj >= (f - keep)[:, None])
    pos = (head0[:, None] + c0[:, None] + jj) % L
    logging = state[:, _C_JHEAD] >= 0
    if logging.any():
        # Overwritten history values: pushes j with c0 + j >= L (a push of more than L logs all it keeps).
        lj0 = np.where(f <= L, np.maximum(0, L - c0), f - keep)
        logged = write & (jj >= lj0[:, None]) & logging[:, None]
        lens = logged.sum(axis=1)
        li = np.flatnonzero(lens)
        if li.size:
            old = pool.gather_ring(groups, pos)
            # A push of more than L values in one call logs every position it keeps, also those the history had
            # not reached yet: their memory was never written (arbitrary bits, which a cast may trip on); they
            # are logged as 0 and never read back as history (the restored count leaves them out).
            old = np.where((pos - head0[:, None]) % L < c0[:, None], old, 0)
            recs = np.zeros((li.size, 6), dtype=np.int64)
            recs[:, _J_PREV] = state[li, _C_JHEAD]
            recs[:, _J_ROW] = row_ids[li]
            recs[:, _J_KIND] = (head0[li] + c0[li] + lj0[li]) % L
            recs[:, _J_LEN] = lens[li]
            payload = old[logged].astype(np.float64)  # row by row, each in push order
            with pool._jlock:
                g0 = pool._append(recs, payload)
            state[li, _C_JHEAD] = g0 + np.arange(li.size)  # written back with the rest of the row
    vals = q.astype(pool.dtype)  # q holds values of the storage type already
    for block, sel, r in groups:
        wr = write[sel]
        ri = np.broadcast_to(r[:, None], wr.shape)[wr]
        block[ri, pos[sel][wr]] = vals[sel][wr]
    count = np.minimum(L, c0 + f)
    state[:, _C_HEAD] = (head0 + c0 + f - count) % L
    state[:, _C_COUNT] = count


def _record_rule(rec0: NDArray[np.float64], top0: NDArray[np.float64], scores: NDArray[np.float64],
                 e: NDArray[np.float64], f: NDArray[np.int64], factor: float, eligible: NDArray[np.bool_]) -> tuple[
                     NDArray[np.float64], NDArray[np.float64]]:
    """The record rule, in place on ``scores`` (compressed rows, ``f[i]`` valid each): a window whose error is above
    ``factor`` times the largest error before it scores at least ``R + 0.01 (1 - R)``, ``R`` the highest score
    before it (only where ``eligible``). Returns each row's largest error and highest score after the block."""
    n = len(rec0)
    rec_after = np.empty(n)
    top_after = np.empty(n)
    for i in range(n):
        fi = int(f[i])
        rec, top = float(rec0[i]), float(top0[i])
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
