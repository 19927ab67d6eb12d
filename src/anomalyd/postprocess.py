"""Causal mappings from reconstruction errors to anomaly scores in [0, 1] (pure numpy, no I/O).

A raw reconstruction error has no fixed scale: it depends on the series, on the model, and it drifts. Which
mapping turns it into a score matters more for detection quality than the clustering does (see issue 5). Every
mapping here is *causal*: the score of an error uses only that error and the ones before it, so scoring a
stream in one call or in many small calls gives the same scores.

The building blocks:

* `running_rank` -- the share of the last ``window`` errors that are below each error;
* `anomaly_likelihood` -- an HTM-style anomaly likelihood: the short-window average of recent errors is
  compared with a Gaussian fitted to the averages over a long window, and the tail probability says how
  unusual it is (the idea of Numenta's ``AnomalyLikelihood``, Ahmad et al. 2017);
* `log_score` -- the log scale NAB's HTM detector reports (likelihood 0.99999 maps to 0.5);
* `out_of_range` -- a rule for values outside the range seen so far (with a tolerance), again as NAB's HTM
  detector does it.

`ScoreNormaliser` chains them with state, so the daemon can keep one per series and persist it as JSON between
ticks (`ScoreNormaliser.to_dict` / `ScoreNormaliser.from_dict`).

Defaults (`NormaliserParams`)
-----------------------------
``long_window=2000`` errors for the reference distribution (bounded state: about 2 x 2000 floats),
``short_window=8`` errors averaged, ``min_std=0.05`` (relative to the long-window mean, a floor on the spread so
a perfectly quiet history does not turn every wobble into an anomaly), ``learning=32`` errors before any score
other than 0 is given, ``red=1e-5`` / ``yellow=1e-3``: a tail probability in the red zone right after another one
is demoted to yellow, so a lasting anomaly alerts once and not on every window, ``range_tolerance=0.1`` (a value
more than 10% of the seen range beyond it scores 1) and ``transform="log"`` (the likelihood is computed over
``log(error + eps)``, which tames the heavy right tail of reconstruction errors).
"""

from __future__ import annotations

import bisect
import math
from collections.abc import Mapping, Sequence
from dataclasses import asdict, dataclass, fields
from typing import Any, Literal

import numpy as np
from numpy.typing import ArrayLike, NDArray

__all__ = [
    "TRANSFORMS",
    "NormaliserParams",
    "ScoreNormaliser",
    "anomaly_likelihood",
    "log_score",
    "out_of_range",
    "running_rank",
    "tail_probability",
    "update_many",
]

#: Transforms applied to the errors before the likelihood.
TRANSFORMS = ("none", "log", "rank")
_LOG_EPS = 1e-10
_STATE_VERSION = 1


def tail_probability(z: ArrayLike) -> NDArray[np.float64]:
    """Upper tail probability ``Q(z) = P(Z > z)`` of the standard normal distribution.

    Examples
    --------
    >>> tail_probability([0.0, 1.0, -1.0]).round(4).tolist()
    [0.5, 0.1587, 0.8413]
    """
    zz = np.asarray(z, dtype=np.float64)
    erfc = np.vectorize(math.erfc, otypes=[np.float64])
    return np.asarray(0.5 * erfc(zz / math.sqrt(2.0)), dtype=np.float64)


def log_score(likelihood: ArrayLike) -> NDArray[np.float64]:
    """Map a likelihood in [0, 1] to NAB's HTM log scale: ``log(1 + 1e-10 - L) / log(1e-10)``, in [0, 1].

    The scale spreads the interesting end: 0.9 maps to 0.1, 0.999 to 0.3, 0.99999 to 0.5.

    Examples
    --------
    >>> log_score([0.0, 0.9, 0.999, 0.99999, 1.0]).round(3).tolist()
    [0.0, 0.1, 0.3, 0.5, 1.0]
    """
    lik = np.clip(np.asarray(likelihood, dtype=np.float64), 0.0, 1.0)
    return np.asarray(np.clip(np.log1p(_LOG_EPS - lik) / math.log(_LOG_EPS), 0.0, 1.0))


def running_rank(errors: ArrayLike, window: int = 2000,
                 history: ArrayLike | None = None) -> NDArray[np.float64]:
    """Causal running rank: the share of the previous ``window`` errors below each error (ties count half).

    Parameters
    ----------
    errors : array_like of float, shape (n,)
        Errors in time order (NaN is given NaN and not remembered).
    window : int, default 2000
        How many previous errors each one is ranked against.
    history : array_like of float, optional
        Errors seen before ``errors`` (oldest first), e.g. on the validation part of the training data.

    Returns
    -------
    ndarray of float, shape (n,)
        Ranks in [0, 1]; 0.5 for the very first error (nothing to compare with).

    Examples
    --------
    >>> running_rank([1.0, 3.0, 2.0, 2.0, 5.0]).tolist()
    [0.5, 1.0, 0.5, 0.5, 1.0]
    >>> running_rank([2.0], history=[1.0, 2.0, 3.0, 4.0]).tolist()
    [0.375]
    """
    if window < 1:
        raise ValueError(f"window={window} must be at least 1 previous error")
    e = np.asarray(errors, dtype=np.float64)
    past = [float(v) for v in np.asarray(history if history is not None else [], dtype=np.float64).ravel()
            if np.isfinite(v)][-window:]
    out, _ = _rank_stream(e, past, window)
    return out


def _rank_stream(e: NDArray[np.float64], past: list[float], window: int) -> tuple[NDArray[np.float64], list[float]]:
    """Rank ``e`` against a sliding window started with ``past`` (oldest first); return ranks and new window."""
    order = list(past)  # chronological
    sorted_vals = sorted(order)
    start = 0  # index in `order` of the oldest value still in the window
    out = np.full(e.shape[0], np.nan)
    for i, v in enumerate(e.tolist()):
        if not math.isfinite(v):
            continue
        m = len(order) - start
        if m == 0:
            out[i] = 0.5
        else:
            lo = bisect.bisect_left(sorted_vals, v)
            hi = bisect.bisect_right(sorted_vals, v)
            out[i] = (lo + 0.5 * (hi - lo)) / m
        bisect.insort(sorted_vals, v)
        order.append(v)
        if len(order) - start > window:
            old = order[start]
            del sorted_vals[bisect.bisect_left(sorted_vals, old)]
            start += 1
    return out, order[start:]


def anomaly_likelihood(errors: ArrayLike, long_window: int = 2000, short_window: int = 8,
                       min_std: float = 0.05, learning: int = 32) -> NDArray[np.float64]:
    """HTM-style anomaly likelihood of each error, causally.

    The average of the last ``short_window`` errors is compared with a Gaussian fitted to the averages of the
    previous ``long_window`` errors: the likelihood is ``1 - Q(z)`` with ``z = (avg - mean) / std``, so values
    near 1 mean "this recent level is rarely reached". ``std`` is floored at ``min_std * max(|mean|, 1e-12)``
    (and absolute 1e-12). The first ``learning`` errors get 0.5 (no opinion).

    Parameters
    ----------
    errors : array_like of float, shape (n,)
        Errors in time order (NaN gets NaN and is not remembered).
    long_window, short_window, min_std, learning
        See above and `NormaliserParams`.

    Returns
    -------
    ndarray of float, shape (n,)
        Likelihoods in [0, 1].

    Examples
    --------
    A steady error, then one three times larger:

    >>> e = [1.0, 1.1, 0.9, 1.0, 1.1, 0.9, 1.0, 3.0]
    >>> lik = anomaly_likelihood(e, long_window=10, short_window=1, learning=3)
    >>> lik[:3].tolist(), round(float(lik[7]), 6)
    ([0.5, 0.5, 0.5], 1.0)
    """
    params = NormaliserParams(long_window=long_window, short_window=short_window, min_std=min_std,
                              learning=learning, transform="none", range_tolerance=None, red=0.0)
    norm = ScoreNormaliser(params)
    return norm.likelihood(errors)


def out_of_range(values: ArrayLike, tolerance: float = 0.1, lo: float | None = None,
                 hi: float | None = None) -> NDArray[np.bool_]:
    """Flag values outside the range seen so far, widened by ``tolerance`` times its width, causally.

    Parameters
    ----------
    values : array_like of float, shape (n,) or (n, k)
        Values in time order; with two dimensions a row is flagged when any of its values is out of range
        (e.g. the samples of one window).
    tolerance : float, default 0.1
        Share of the seen range ``hi - lo`` allowed beyond it.
    lo, hi : float, optional
        Range seen before ``values`` (e.g. over the training data).

    Returns
    -------
    ndarray of bool, shape (n,)
        True where a value leaves the widened range. Nothing is flagged while the range has zero width.

    Examples
    --------
    >>> out_of_range([1.0, 2.0, 1.5, 2.05, 3.0, 0.0], tolerance=0.1).tolist()
    [False, False, False, False, True, True]
    """
    flags, _, _ = _range_stream(np.asarray(values, dtype=np.float64), tolerance, lo, hi)
    return flags


def _range_stream(v: NDArray[np.float64], tolerance: float, lo: float | None,
                  hi: float | None) -> tuple[NDArray[np.bool_], float | None, float | None]:
    if v.ndim == 1:
        v = v[:, None]
    elif v.ndim != 2:
        raise ValueError(f"values must have one or two dimensions, got shape {v.shape}")
    n = v.shape[0]
    if n == 0:
        return np.zeros(0, dtype=bool), lo, hi
    big = np.inf
    finite = np.isfinite(v)
    f_lo = np.where(finite, v, big).min(axis=1, initial=big)
    f_hi = np.where(finite, v, -big).max(axis=1, initial=-big)
    # Range seen BEFORE each row.
    prev_lo = np.minimum.accumulate(np.concatenate(([big if lo is None else lo], f_lo)))[:-1]
    prev_hi = np.maximum.accumulate(np.concatenate(([-big if hi is None else hi], f_hi)))[:-1]
    width = prev_hi - prev_lo
    with np.errstate(invalid="ignore"):
        ok = np.isfinite(width) & (width > 0)
        tol = np.where(ok, tolerance * width, 0.0)
        flags = ok & ((f_hi > prev_hi + tol) | (f_lo < prev_lo - tol))
    new_lo = float(min(prev_lo[-1], f_lo[-1]))
    new_hi = float(max(prev_hi[-1], f_hi[-1]))
    return (np.asarray(flags, dtype=bool), None if math.isinf(new_lo) else new_lo,
            None if math.isinf(new_hi) else new_hi)


@dataclass(frozen=True)
class NormaliserParams:
    """Parameters of `ScoreNormaliser` (defaults documented in the module docstring).

    Parameters
    ----------
    long_window : int
        Errors in the reference distribution (and in the rank window).
    short_window : int
        Errors averaged before comparing with the reference.
    min_std : float
        Floor of the reference spread, relative to ``|mean|`` of the (transformed) averages; with
        ``transform="log"`` it is absolute (the log scale is already relative).
    learning : int
        Errors seen before the first non-zero score.
    red, yellow : float
        Tail probabilities: a red one (``<= red``) right after another red one is replaced by ``yellow``.
        ``red=0`` turns the filter off.
    range_tolerance : float or None
        Out-of-range rule tolerance (share of the seen range); None turns the rule off.
    transform : {"none", "log", "rank"}
        Applied to the errors before the likelihood: nothing, ``log(e + 1e-10)``, or the running rank.
    """

    long_window: int = 2000
    short_window: int = 8
    min_std: float = 0.05
    learning: int = 32
    red: float = 1e-5
    yellow: float = 1e-3
    range_tolerance: float | None = 0.02
    transform: Literal["none", "log", "rank"] = "none"
    refractory: int = 1

    @classmethod
    def for_windows(cls, window: int, slide: int, history: int = 500) -> NormaliserParams:
        """Parameters for errors of windows scored every ``slide`` samples, as the daemon scores them.

        The short average spans about one window (``ceil(window / slide)`` errors: a spike is seen by that
        many windows) and the reference holds ``history`` errors; the rest are the defaults.

        Examples
        --------
        >>> NormaliserParams.for_windows(32, 16, 500).short_window
        2
        """
        return cls(long_window=history, short_window=max(1, min(history, -(-window // slide))))

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
        if self.refractory < 1:
            raise ValueError(f"refractory={self.refractory} must be at least 1 error")
        if self.transform not in TRANSFORMS:
            raise ValueError(f"transform={self.transform!r} is not one of {', '.join(TRANSFORMS)}")


class ScoreNormaliser:
    """Stateful, causal map from raw errors to scores in [0, 1], persisted as JSON between calls.

    ``update(errors, values)`` returns, for each error, ``max(log_score(likelihood), out_of_range)`` where the
    likelihood is `anomaly_likelihood` of the (transformed) errors after the red-zone filter, and the range
    rule scores 1 when ``values`` (the samples behind each error) leave the range seen so far. Calling
    ``update`` on a stream in one go or in pieces gives the same scores.

    Parameters
    ----------
    params : NormaliserParams, optional
        Defaults as documented in the module docstring.

    Examples
    --------
    >>> norm = ScoreNormaliser(NormaliserParams(learning=4, short_window=1, range_tolerance=None))
    >>> warm = norm.update([1.0, 1.2, 0.9, 1.1, 1.0, 0.95, 1.05, 1.0])
    >>> bool(warm.max() < 0.3)
    True
    >>> float(norm.update([50.0])[0]) >= 0.5
    True
    >>> again = ScoreNormaliser.from_dict(norm.to_dict())
    >>> again.to_dict() == norm.to_dict()
    True
    """

    def __init__(self, params: NormaliserParams | None = None) -> None:
        self.params = params or NormaliserParams()
        self._raw: list[float] = []  # last long_window finite raw errors (for the rank) or short_window - 1
        # Last long_window short-window averages of the transformed errors (an array: 8 bytes per value, where a
        # list of floats takes 32; the daemon keeps one per series).
        self._avg: NDArray[np.float64] = np.empty(0)
        self._tail: list[float] = []  # last short_window - 1 transformed errors
        self._seen = 0
        self._since_red = 1 << 30  # errors since the last red one (huge: none yet)
        self._lo: float | None = None
        self._hi: float | None = None

    # -- state -------------------------------------------------------------------------------------
    @property
    def n_seen(self) -> int:
        """How many finite errors the normaliser has seen."""
        return self._seen

    def observe_range(self, values: ArrayLike) -> None:
        """Widen the seen range with ``values`` (e.g. the training data) without scoring anything."""
        v = np.asarray(values, dtype=np.float64).ravel()
        v = v[np.isfinite(v)]
        if v.size:
            self._lo = float(v.min()) if self._lo is None else min(self._lo, float(v.min()))
            self._hi = float(v.max()) if self._hi is None else max(self._hi, float(v.max()))

    def to_dict(self) -> dict[str, Any]:
        """JSON-able state (parameters included); `from_dict` restores it exactly."""
        return {**self.snapshot(), "params": asdict(self.params), "avg": self._avg.tolist()}

    def snapshot(self) -> dict[str, Any]:
        """The state as `to_dict` gives it, but cheaper and not JSON-able: ``params`` is the
        `NormaliserParams` object and ``avg`` an array (for binary storage of many normalisers)."""
        return {"version": _STATE_VERSION, "params": self.params, "raw": list(self._raw), "avg": self._avg,
                "tail": list(self._tail), "seen": self._seen, "since_red": self._since_red, "lo": self._lo,
                "hi": self._hi}

    @classmethod
    def from_dict(cls, state: Mapping[str, Any]) -> ScoreNormaliser:
        """Restore a normaliser saved by `to_dict`.

        Raises
        ------
        ValueError
            When ``state`` is from another version or malformed; delete the state file to start afresh.
        """
        if state.get("version") != _STATE_VERSION:
            raise ValueError(f"normaliser state version {state.get('version')!r} is not {_STATE_VERSION}; "
                             "delete the saved state so it is learned again")
        try:
            if isinstance(state["params"], NormaliserParams):
                params = state["params"]
            else:
                names = {f.name for f in fields(NormaliserParams)}
                params = NormaliserParams(**{k: v for k, v in dict(state["params"]).items() if k in names})
            norm = cls(params)
            norm._raw = [float(v) for v in state["raw"]]
            norm._avg = np.array(state["avg"], dtype=np.float64).reshape(-1)  # a copy, never a view
            norm._tail = [float(v) for v in state["tail"]]
            norm._seen = int(state["seen"])
            norm._since_red = int(state["since_red"])
            norm._lo = None if state["lo"] is None else float(state["lo"])
            norm._hi = None if state["hi"] is None else float(state["hi"])
        except (KeyError, TypeError) as exc:
            raise ValueError(f"normaliser state is malformed ({exc!r}); delete the saved state so it is "
                             "learned again") from exc
        return norm

    # -- scoring -----------------------------------------------------------------------------------
    def _transform(self, e: NDArray[np.float64]) -> NDArray[np.float64]:
        p = self.params
        if p.transform == "log":
            return np.asarray(np.log(np.maximum(e, 0.0) + _LOG_EPS))
        if p.transform == "rank":
            ranks, window = _rank_stream(e, self._raw, p.long_window)
            self._raw = window
            return ranks
        return e

    def likelihood(self, errors: ArrayLike) -> NDArray[np.float64]:
        """Update the state with ``errors`` and return their likelihoods (before the red-zone filter)."""
        p = self.params
        e_all = np.asarray(errors, dtype=np.float64)
        if e_all.ndim != 1:
            raise ValueError(f"errors must be one-dimensional, got shape {e_all.shape}")
        out = np.full(e_all.shape[0], np.nan)
        finite = np.isfinite(e_all)
        e = e_all[finite]
        n = e.shape[0]
        if n == 0:
            return out
        t = self._transform(e)
        # Short-window averages, continuing the previous call's tail.
        ext = np.concatenate((np.asarray(self._tail, dtype=np.float64), t))
        k = p.short_window
        csum = np.concatenate(([0.0], np.cumsum(ext)))
        idx = np.arange(len(self._tail), ext.shape[0])  # positions of the new values in ext
        first = np.maximum(idx - k + 1, 0)
        avg = (csum[idx + 1] - csum[first]) / (idx + 1 - first)
        # Reference statistics over the previous long_window averages (excluding the current one).
        hist = np.concatenate((self._avg, avg))
        h0 = len(self._avg)
        ref = float(hist[0])  # centre the sums on an old value (causal, and keeps the cumsums precise)
        centred = hist - ref
        s1 = np.concatenate(([0.0], np.cumsum(centred)))
        s2 = np.concatenate(([0.0], np.cumsum(centred * centred)))
        pos = np.arange(h0, hist.shape[0])
        lo = np.maximum(pos - p.long_window, 0)
        cnt = pos - lo
        with np.errstate(invalid="ignore", divide="ignore"):
            mean_c = (s1[pos] - s1[lo]) / cnt
            var = (s2[pos] - s2[lo]) / cnt - mean_c**2
        mean = mean_c + ref
        std = np.sqrt(np.maximum(var, 0.0))
        if p.transform == "log":
            floor = np.full_like(mean, max(p.min_std, 1e-12))
        else:
            floor = np.maximum(p.min_std * np.abs(mean), 1e-12)
        std = np.maximum(np.nan_to_num(std), floor)
        z = (avg - mean) / std
        lik = 1.0 - tail_probability(np.nan_to_num(z, nan=0.0))
        seen_before = self._seen + np.arange(n)
        lik = np.where((seen_before < p.learning) | (cnt < 2), 0.5, lik)
        out[finite] = lik
        # Keep the state bounded.
        self._avg = hist[-p.long_window:].copy()
        self._tail = ext[ext.shape[0] - (k - 1):].tolist() if k > 1 else []
        if p.transform != "rank":
            self._raw = []
        self._seen += n
        return out

    def update(self, errors: ArrayLike, values: ArrayLike | None = None) -> NDArray[np.float64]:
        """Score ``errors`` (in time order) and remember them.

        Parameters
        ----------
        errors : array_like of float, shape (n,)
            Raw reconstruction errors; NaN (a window that could not be scored) gives NaN and is skipped.
        values : array_like of float, shape (n,) or (n, k), optional
            The values behind each error (one value, or the k samples of its window) for the out-of-range
            rule; without them the rule is not applied.

        Returns
        -------
        ndarray of float, shape (n,)
            Scores in [0, 1] (NaN where the error was NaN).
        """
        p = self.params
        e_in = np.asarray(errors, dtype=np.float64)
        if (e_in.shape == (1,) and p.transform != "rank" and len(self._avg) >= 2 and self._seen >= p.learning
                and math.isfinite(e_in[0])):  # one new error in the steady state: the daemon's common case
            row = None if values is None else np.asarray(values, dtype=np.float64).reshape(1, -1)
            return _update_group([self], p, e_in, row)
        lik = self.likelihood(errors)
        n = lik.shape[0]
        flags = np.zeros(n, dtype=bool)
        if values is not None and p.range_tolerance is not None:
            v = np.asarray(values, dtype=np.float64)
            if v.shape[0] != n:
                raise ValueError(f"values has {v.shape[0]} rows but errors has {n}; give one row of values per "
                                 "error")
            flags, self._lo, self._hi = _range_stream(v, p.range_tolerance, self._lo, self._hi)
        elif values is not None:
            self.observe_range(values)
        tail = 1.0 - lik
        finite = np.flatnonzero(np.isfinite(tail))
        flags_f = flags[finite]
        if p.red > 0 and finite.size:
            t = tail[finite]
            red = (t <= p.red) | flags_f
            # A red is kept only when no red came in the previous `refractory` errors.
            r = p.refractory
            hist = np.concatenate((np.zeros(r, dtype=np.int64), red.astype(np.int64)))
            if self._since_red <= r:
                hist[r - self._since_red] = 1
            csum = np.concatenate(([0], np.cumsum(hist)))
            idx = np.arange(red.size) + r
            recent = csum[idx] - csum[idx - r] > 0
            demote = red & recent
            tail[finite] = np.where(demote, np.maximum(t, p.yellow), t)
            flags_f = flags_f & ~demote
            reds = np.flatnonzero(red)
            self._since_red = int(red.size - reds[-1]) if reds.size else self._since_red + int(red.size)
        scores = log_score(1.0 - tail)
        scores[finite[flags_f]] = 1.0
        return np.where(np.isfinite(lik), scores, np.nan)


def update_many(norms: Sequence[ScoreNormaliser], errors: ArrayLike,
                values: ArrayLike | None = None) -> NDArray[np.float64]:
    """``norms[i].update(errors[i:i+1], values[i:i+1])`` for many normalisers at once (one error each).

    This is the daemon's tick: one new window for each of many series. Normalisers with the same parameters and
    the same length of reference history, past the learning period, with a finite error and no rank transform,
    are updated together with array operations; the others go one by one. The scores are the same as one call
    each, to rounding.

    Parameters
    ----------
    norms : sequence of ScoreNormaliser
        Distinct normalisers (one per series).
    errors : array_like of float, shape (k,)
        One error per normaliser.
    values : array_like of float, shape (k, m), optional
        The samples behind each error, for the out-of-range rule.

    Returns
    -------
    ndarray of float, shape (k,)
    """
    e = np.asarray(errors, dtype=np.float64).reshape(-1)
    k = len(norms)
    if e.shape[0] != k:
        raise ValueError(f"update_many: {e.shape[0]} errors for {k} normalisers; give one error per normaliser")
    v = None if values is None else np.asarray(values, dtype=np.float64).reshape(k, -1)
    out = np.full(k, np.nan)
    if k == 0:
        return out
    groups: dict[tuple[NormaliserParams, int], list[int]] = {}
    for i, n in enumerate(norms):
        p = n.params
        if p.transform != "rank" and len(n._avg) >= 2 and n._seen >= p.learning and math.isfinite(e[i]):
            groups.setdefault((p, len(n._avg)), []).append(i)
        else:
            out[i] = n.update(e[i : i + 1], None if v is None else v[i : i + 1])[0]
    for (p, _), members in groups.items():
        idx = np.asarray(members)
        out[idx] = _update_group([norms[i] for i in members], p, e[idx], None if v is None else v[idx])
    return out


def _update_group(group: Sequence[ScoreNormaliser], p: NormaliserParams, ee: NDArray[np.float64],
                  rows: NDArray[np.float64] | None) -> NDArray[np.float64]:
    """One error for each normaliser of ``group`` (same parameters and history length; see `update_many`)."""
    # -- likelihood (as `ScoreNormaliser.likelihood` for one more error, over all rows) --
    t = np.log(np.maximum(ee, 0.0) + _LOG_EPS) if p.transform == "log" else ee
    tails = [n._tail for n in group]
    avg = (np.fromiter((sum(tl) for tl in tails), dtype=np.float64, count=len(group)) + t) / np.fromiter(
        (len(tl) + 1 for tl in tails), dtype=np.float64, count=len(group))
    hist = np.stack([n._avg for n in group])
    ref = hist[:, :1].copy()
    centred = hist - ref
    cnt = hist.shape[1]
    mean_c = np.cumsum(centred, axis=1)[:, -1] / cnt  # sequential sums per row, like the scalar path
    centred *= centred
    var = np.cumsum(centred, axis=1)[:, -1] / cnt - mean_c * mean_c
    mean = mean_c + ref[:, 0]
    std = np.sqrt(np.maximum(var, 0.0))
    floor = (np.full_like(mean, max(p.min_std, 1e-12)) if p.transform == "log"
             else np.maximum(p.min_std * np.abs(mean), 1e-12))
    z = (avg - mean) / np.maximum(np.where(np.isfinite(std), std, 0.0), floor)
    lik = 1.0 - tail_probability(z)
    keep = hist[:, 1:] if cnt >= p.long_window else hist
    new_hist = np.concatenate((keep, avg[:, None]), axis=1)
    # -- out-of-range rule --
    flags = np.zeros(len(group), dtype=bool)
    if rows is not None:
        finite = np.isfinite(rows)
        f_lo = np.where(finite, rows, np.inf).min(axis=1)
        f_hi = np.where(finite, rows, -np.inf).max(axis=1)
        prev_lo = np.array([np.inf if n._lo is None else n._lo for n in group])
        prev_hi = np.array([-np.inf if n._hi is None else n._hi for n in group])
        if p.range_tolerance is not None:
            width = prev_hi - prev_lo
            with np.errstate(invalid="ignore"):
                ok = np.isfinite(width) & (width > 0)
                tol = np.where(ok, p.range_tolerance * width, 0.0)
                flags = ok & ((f_hi > prev_hi + tol) | (f_lo < prev_lo - tol))
        new_lo, new_hi = np.minimum(prev_lo, f_lo), np.maximum(prev_hi, f_hi)
    # -- red-zone filter --
    tail_p = 1.0 - lik
    since = np.array([n._since_red for n in group], dtype=np.int64)
    if p.red > 0:
        red = (tail_p <= p.red) | flags
        demote = red & (since <= p.refractory)
        tail_p = np.where(demote, np.maximum(tail_p, p.yellow), tail_p)
        flags = flags & ~demote
        since = np.where(red, 1, since + 1)
    scores = log_score(1.0 - tail_p)
    scores[flags] = 1.0
    # -- write the state back --
    keep_tail = p.short_window - 1
    for r, n in enumerate(group):
        n._avg = new_hist[r]
        if keep_tail > 0:
            n._tail.append(float(t[r]))
            if len(n._tail) > keep_tail:
                del n._tail[: len(n._tail) - keep_tail]
        n._raw = []
        n._seen += 1
        n._since_red = int(since[r])
        if rows is not None:
            n._lo = None if math.isinf(new_lo[r]) else float(new_lo[r])
            n._hi = None if math.isinf(new_hi[r]) else float(new_hi[r])
    return scores
