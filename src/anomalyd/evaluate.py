"""Labelled evaluation of anomaly scores, and threshold tuning from labels.

Three families of measures live here, all pure functions of arrays (numpy, scikit-learn and the standard
library only; the NAB loaders are the only functions that read files):

* point-wise precision, recall and F1; point-adjusted F1 as the SMD / OmniAnomaly literature defines it; F1
  over fixed non-overlapping windows as the LSTM encoder-decoder (LSTM-ED) paper defines it; ROC-AUC and
  PR-AUC (average precision);
* the Numenta Anomaly Benchmark score (NAB v1.1), re-implemented from NAB's published scoring rules and
  vectorised so that a whole corpus scores in milliseconds;
* threshold tuning from labels for both: `best_f1_threshold` and `best_nab_threshold`.

Conventions
-----------
* F1-style measures flag a point when ``score > tau`` (strictly greater), as the LSTM-ED paper does.
* NAB flags a row when ``score >= threshold``, as NAB does.
* A NaN score is never flagged.
"""

from __future__ import annotations

import csv
import gzip
import io
import itertools
import json
import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from types import MappingProxyType
from typing import Any, Literal, TypedDict

import numpy as np
from numpy.typing import ArrayLike, NDArray
from sklearn.metrics import average_precision_score, roc_auc_score

__all__ = [
    "NAB_PROFILES",
    "Metrics",
    "NabCorpus",
    "NabFile",
    "NabFileResult",
    "NabProfile",
    "best_f1_threshold",
    "best_nab_threshold",
    "load_nab_corpus",
    "load_nab_profiles",
    "load_published_scores",
    "nab_score",
    "point_adjust",
    "point_adjusted_metrics",
    "point_metrics",
    "pr_auc",
    "roc_auc",
    "window_metrics",
]


# ---------------------------------------------------------------------------------------------------------
# Point-wise, point-adjusted and window-level metrics
# ---------------------------------------------------------------------------------------------------------


class Metrics(TypedDict):
    """Precision, recall and F1 with the counts they come from (0/0 is reported as 0.0)."""

    precision: float
    recall: float
    f1: float
    tp: int
    fp: int
    fn: int


def _as_bool_1d(values: ArrayLike, name: str) -> NDArray[np.bool_]:
    """Return ``values`` as a 1-D boolean array (non-zero is True); reject NaN and other shapes."""
    arr = np.asarray(values)
    if arr.ndim != 1:
        raise ValueError(f"{name} must be one-dimensional, got shape {arr.shape}")
    if arr.dtype == np.bool_:
        return arr
    if not np.issubdtype(arr.dtype, np.number):
        raise TypeError(f"{name} must be booleans or numbers (0/1), got dtype {arr.dtype}")
    if np.issubdtype(arr.dtype, np.floating) and np.isnan(arr).any():
        raise ValueError(f"{name} contains NaN at row {int(np.flatnonzero(np.isnan(arr))[0])}; use 0 or 1")
    return np.asarray(arr != 0)


def _as_float_1d(values: ArrayLike, name: str) -> NDArray[np.float64]:
    """Return ``values`` as a 1-D float64 array."""
    arr = np.asarray(values, dtype=np.float64)
    if arr.ndim != 1:
        raise ValueError(f"{name} must be one-dimensional, got shape {arr.shape}")
    return arr


def _check_same_length(a: NDArray[Any], b: NDArray[Any], names: tuple[str, str]) -> None:
    if a.shape[0] != b.shape[0]:
        raise ValueError(
            f"{names[0]} and {names[1]} must have the same length, got {a.shape[0]} and {b.shape[0]}"
        )


def _metrics_from_counts(tp: int, fp: int, fn: int) -> Metrics:
    """Build a `Metrics` dict from counts, reporting 0/0 as 0.0."""
    precision = tp / (tp + fp) if tp + fp else 0.0
    recall = tp / (tp + fn) if tp + fn else 0.0
    f1 = 2 * tp / (2 * tp + fp + fn) if tp else 0.0
    return Metrics(precision=precision, recall=recall, f1=f1, tp=int(tp), fp=int(fp), fn=int(fn))


def point_metrics(labels: ArrayLike, flags: ArrayLike) -> Metrics:
    """Point-wise precision, recall and F1.

    Parameters
    ----------
    labels : array_like of bool or {0, 1}, shape (n,)
        Ground truth, one per point (non-zero means anomalous).
    flags : array_like of bool or {0, 1}, shape (n,)
        Detector output, one per point (non-zero means flagged).

    Returns
    -------
    Metrics
        ``precision``, ``recall``, ``f1`` (0.0 where the ratio is 0/0) and the counts ``tp``, ``fp``, ``fn``.

    Examples
    --------
    Two of the three flags are right and two of the three anomalies are found:

    >>> m = point_metrics([0, 1, 1, 0, 1], [0, 1, 0, 1, 1])
    >>> m["tp"], m["fp"], m["fn"]
    (2, 1, 1)
    >>> m["precision"], m["recall"], m["f1"]
    (0.6666666666666666, 0.6666666666666666, 0.6666666666666666)
    >>> point_metrics([0, 0], [0, 0])["f1"]
    0.0
    """
    lab = _as_bool_1d(labels, "labels")
    fl = _as_bool_1d(flags, "flags")
    _check_same_length(lab, fl, ("labels", "flags"))
    tp = int(np.count_nonzero(lab & fl))
    fp = int(np.count_nonzero(~lab & fl))
    fn = int(np.count_nonzero(lab & ~fl))
    return _metrics_from_counts(tp, fp, fn)


def _segments(labels: NDArray[np.bool_]) -> tuple[NDArray[np.intp], NDArray[np.intp]]:
    """Starts and (exclusive) ends of the runs of True in ``labels``."""
    edges = np.diff(np.concatenate(([0], labels.astype(np.int8), [0])))
    return np.flatnonzero(edges == 1), np.flatnonzero(edges == -1)


def point_adjust(labels: ArrayLike, flags: ArrayLike) -> NDArray[np.bool_]:
    """Point-adjust flags: a labelled segment with any flagged point counts as entirely flagged.

    This is the adjustment of the SMD / OmniAnomaly evaluation protocol. Flags outside labelled segments are
    left as they are.

    Parameters
    ----------
    labels : array_like of bool or {0, 1}, shape (n,)
        Ground truth; a contiguous run of anomalous points is one segment.
    flags : array_like of bool or {0, 1}, shape (n,)
        Detector output.

    Returns
    -------
    ndarray of bool, shape (n,)
        The adjusted flags.

    Examples
    --------
    The first segment (rows 1-3) is hit at row 2, the second (rows 6-7) is missed; row 5 stays a false alarm:

    >>> point_adjust([0, 1, 1, 1, 0, 0, 1, 1, 0], [0, 0, 1, 0, 0, 1, 0, 0, 0]).astype(int).tolist()
    [0, 1, 1, 1, 0, 1, 0, 0, 0]
    """
    lab = _as_bool_1d(labels, "labels")
    fl = _as_bool_1d(flags, "flags")
    _check_same_length(lab, fl, ("labels", "flags"))
    starts, ends = _segments(lab)
    if starts.size == 0:
        return fl.copy()
    flagged_before = np.concatenate(([0], np.cumsum(fl, dtype=np.int64)))
    hit = flagged_before[ends] - flagged_before[starts] > 0
    marks = np.zeros(lab.shape[0] + 1, dtype=np.int64)
    np.add.at(marks, starts[hit], 1)
    np.add.at(marks, ends[hit], -1)
    return np.asarray(fl | (np.cumsum(marks[:-1]) > 0))


def point_adjusted_metrics(labels: ArrayLike, flags: ArrayLike) -> Metrics:
    """Precision, recall and F1 after `point_adjust` (the SMD / OmniAnomaly "F1 with point adjustment").

    Parameters
    ----------
    labels : array_like of bool or {0, 1}, shape (n,)
        Ground truth.
    flags : array_like of bool or {0, 1}, shape (n,)
        Detector output.

    Returns
    -------
    Metrics
        Point-wise metrics of the adjusted flags.

    Examples
    --------
    After adjustment rows 1-3 are true positives, row 5 a false positive and rows 6-7 false negatives:

    >>> m = point_adjusted_metrics([0, 1, 1, 1, 0, 0, 1, 1, 0], [0, 0, 1, 0, 0, 1, 0, 0, 0])
    >>> m["tp"], m["fp"], m["fn"], m["precision"], m["recall"]
    (3, 1, 2, 0.75, 0.6)
    """
    return point_metrics(labels, point_adjust(labels, flags))


def _window_starts(n: int, size: int) -> NDArray[np.intp]:
    if size < 1:
        raise ValueError(f"size={size} must be a positive number of rows")
    return np.arange(0, n, size, dtype=np.intp)


def window_metrics(
    labels: ArrayLike, scores: ArrayLike, tau: float, size: int = 100, delta: int = 0
) -> Metrics:
    """Window-level precision, recall and F1 as the LSTM encoder-decoder (LSTM-ED) paper defines them.

    The series is cut into fixed, non-overlapping windows of ``size`` rows (the last window keeps whatever
    rows are left). A window is anomalous when it contains any labelled point; it is flagged when MORE than
    ``delta`` of its points have ``score > tau``.

    Parameters
    ----------
    labels : array_like of bool or {0, 1}, shape (n,)
        Point labels.
    scores : array_like of float, shape (n,)
        Anomaly scores (NaN is never above ``tau``).
    tau : float
        Score threshold.
    size : int, default 100
        Rows per window.
    delta : int, default 0
        A window needs more than ``delta`` points above ``tau`` to be flagged.

    Returns
    -------
    Metrics
        Precision, recall and F1 over windows; ``tp``, ``fp`` and ``fn`` count windows.

    Examples
    --------
    Windows of 4 rows: rows 0-3 (normal, one point above 0.5), rows 4-7 (anomalous, two points above 0.5) and
    rows 8-9 (normal, none):

    >>> labels = [0, 0, 0, 0, 0, 1, 0, 0, 0, 0]
    >>> scores = [0, 0.9, 0, 0, 0, 0.8, 0.7, 0, 0, 0]
    >>> m = window_metrics(labels, scores, tau=0.5, size=4)
    >>> m["tp"], m["fp"], m["fn"], m["f1"]
    (1, 1, 0, 0.6666666666666666)
    >>> window_metrics(labels, scores, tau=0.5, size=4, delta=1)["f1"]
    1.0
    """
    lab = _as_bool_1d(labels, "labels")
    sc = _as_float_1d(scores, "scores")
    _check_same_length(lab, sc, ("labels", "scores"))
    if delta < 0:
        raise ValueError(f"delta={delta} must be >= 0")
    starts = _window_starts(lab.shape[0], size)
    if starts.size == 0:
        return _metrics_from_counts(0, 0, 0)
    anomalous = np.logical_or.reduceat(lab, starts)
    above = np.add.reduceat((sc > tau).astype(np.int64), starts)
    flagged = above > delta
    tp = int(np.count_nonzero(anomalous & flagged))
    fp = int(np.count_nonzero(~anomalous & flagged))
    fn = int(np.count_nonzero(anomalous & ~flagged))
    return _metrics_from_counts(tp, fp, fn)


def roc_auc(labels: ArrayLike, scores: ArrayLike) -> float:
    """Area under the ROC curve (scikit-learn), NaN when only one class is present.

    Parameters
    ----------
    labels : array_like of bool or {0, 1}, shape (n,)
        Ground truth.
    scores : array_like of float, shape (n,)
        Anomaly scores, higher meaning more anomalous.

    Returns
    -------
    float
        ROC-AUC, or NaN when ``labels`` holds a single class.

    Examples
    --------
    Three of the four (anomaly, normal) pairs are ordered correctly:

    >>> roc_auc([0, 0, 1, 1], [0.1, 0.4, 0.35, 0.8])
    0.75
    >>> roc_auc([1, 1], [0.1, 0.2])
    nan
    """
    lab = _as_bool_1d(labels, "labels")
    sc = _as_float_1d(scores, "scores")
    _check_same_length(lab, sc, ("labels", "scores"))
    if lab.all() or not lab.any():
        return math.nan
    return float(roc_auc_score(lab, sc))


def pr_auc(labels: ArrayLike, scores: ArrayLike) -> float:
    """Area under the precision-recall curve as average precision (scikit-learn), NaN with one class.

    Parameters
    ----------
    labels : array_like of bool or {0, 1}, shape (n,)
        Ground truth.
    scores : array_like of float, shape (n,)
        Anomaly scores, higher meaning more anomalous.

    Returns
    -------
    float
        Average precision, or NaN when ``labels`` holds a single class.

    Examples
    --------
    Ranked by score the labels read 1, 0, 1, 0: precision 1 at recall 0.5, then 2/3 at recall 1, so
    AP = 0.5 * 1 + 0.5 * 2/3:

    >>> round(pr_auc([0, 0, 1, 1], [0.1, 0.4, 0.35, 0.8]), 4)
    0.8333
    """
    lab = _as_bool_1d(labels, "labels")
    sc = _as_float_1d(scores, "scores")
    _check_same_length(lab, sc, ("labels", "scores"))
    if lab.all() or not lab.any():
        return math.nan
    return float(average_precision_score(lab, sc))


# ---------------------------------------------------------------------------------------------------------
# Threshold tuning for the F1 measures
# ---------------------------------------------------------------------------------------------------------


def _candidate_thresholds(scores: NDArray[np.float64], max_candidates: int) -> NDArray[np.float64]:
    """Ascending candidate thresholds for ``score > tau``: score values, plus one below the minimum.

    With more distinct scores than ``max_candidates - 1``, the candidates are quantiles of the scores (actual
    score values, evenly spaced in rank), so the search stays fast on long series.
    """
    if max_candidates < 2:
        raise ValueError(f"max_candidates={max_candidates} must be at least 2")
    finite = scores[np.isfinite(scores)]
    if finite.size == 0:
        raise ValueError("scores holds no finite value to take a threshold from")
    values = np.unique(finite)
    if values.size > max_candidates - 1:
        ranks = np.linspace(0.0, 1.0, max_candidates - 1)
        values = np.unique(np.quantile(finite, ranks, method="lower"))
    below = np.nextafter(values[0], -np.inf)
    return np.concatenate(([below], values))


def _count_above(sorted_values: NDArray[np.float64], thresholds: NDArray[np.float64]) -> NDArray[np.int64]:
    """For each threshold, how many of ``sorted_values`` (ascending) are strictly greater."""
    return (sorted_values.size - np.searchsorted(sorted_values, thresholds, side="right")).astype(np.int64)


def _f1_curve(tp: NDArray[np.int64], fp: NDArray[np.int64], fn: NDArray[np.int64]) -> NDArray[np.float64]:
    denominator = 2 * tp + fp + fn
    return np.where(tp > 0, 2 * tp / np.maximum(denominator, 1), 0.0)


def best_f1_threshold(
    labels: ArrayLike,
    scores: ArrayLike,
    kind: Literal["point", "point_adjusted", "window"] = "point",
    size: int = 100,
    deltas: Sequence[int] = (0, 1, 2, 5, 10),
    max_candidates: int = 1000,
) -> tuple[float, int, float]:
    """Threshold (and, for windows, ``delta``) that maximises F1 against labels.

    Every candidate is evaluated exactly and at once (sorting and counting, no loop over thresholds). The
    candidates are the distinct score values, or ``max_candidates`` quantiles of the scores when there are
    more, plus one value just below the minimum (flag everything). Flags are ``score > tau``.

    Parameters
    ----------
    labels : array_like of bool or {0, 1}, shape (n,)
        Point labels.
    scores : array_like of float, shape (n,)
        Anomaly scores (NaN is never flagged).
    kind : {"point", "point_adjusted", "window"}, default "point"
        Which F1: `point_metrics`, `point_adjusted_metrics` or `window_metrics`.
    size : int, default 100
        Window size for ``kind="window"``.
    deltas : sequence of int, default (0, 1, 2, 5, 10)
        Values of ``delta`` searched for ``kind="window"``; ignored otherwise.
    max_candidates : int, default 1000
        Upper bound on the number of thresholds tried.

    Returns
    -------
    tau : float
        Best threshold; among equally good thresholds, the highest (fewest alerts).
    delta : int
        Best ``delta`` (the smallest among ties); 0 unless ``kind="window"``.
    f1 : float
        F1 at (``tau``, ``delta``).

    Examples
    --------
    Flagging the two scores above 0.3 finds both anomalies and nothing else:

    >>> best_f1_threshold([0, 0, 1, 1, 0], [0.1, 0.2, 0.9, 0.8, 0.3])
    (0.3, 0, 1.0)
    """
    lab = _as_bool_1d(labels, "labels")
    sc = _as_float_1d(scores, "scores")
    _check_same_length(lab, sc, ("labels", "scores"))
    sc = np.where(np.isnan(sc), -np.inf, sc)  # never above a finite threshold
    candidates = _candidate_thresholds(sc, max_candidates)

    if kind == "point":
        tp = _count_above(np.sort(sc[lab]), candidates)
        fp = _count_above(np.sort(sc[~lab]), candidates)
        f1 = _f1_curve(tp, fp, np.count_nonzero(lab) - tp)
        best = int(np.flatnonzero(f1 == f1.max())[-1])
        return float(candidates[best]), 0, float(f1[best])

    if kind == "point_adjusted":
        starts, ends = _segments(lab)
        if starts.size:
            # reduce over [start, end) of each segment; the slices from an end to the next start are dropped
            bounds = np.column_stack((starts, ends)).ravel()
            segment_max = np.maximum.reduceat(np.append(sc, -np.inf), bounds)[::2]
            order = np.argsort(segment_max, kind="stable")
            length_from = np.concatenate((np.cumsum((ends - starts)[order][::-1])[::-1], [0]))
            tp = length_from[np.searchsorted(segment_max[order], candidates, side="right")].astype(np.int64)
        else:
            tp = np.zeros(candidates.size, dtype=np.int64)
        fp = _count_above(np.sort(sc[~lab]), candidates)
        f1 = _f1_curve(tp, fp, np.count_nonzero(lab) - tp)
        best = int(np.flatnonzero(f1 == f1.max())[-1])
        return float(candidates[best]), 0, float(f1[best])

    if kind == "window":
        if not deltas:
            raise ValueError("deltas must hold at least one value for kind='window'")
        starts = _window_starts(lab.shape[0], size)
        if starts.size == 0:
            raise ValueError("labels and scores are empty")
        n_windows = starts.size
        padded = np.full(n_windows * size, -np.inf)
        padded[: sc.size] = sc
        rows = padded.reshape(n_windows, size)
        anomalous = np.logical_or.reduceat(lab, starts)
        best_tau, best_delta, best_f1 = math.nan, 0, -1.0
        for delta in sorted(set(deltas)):
            if delta < 0:
                raise ValueError(f"delta={delta} must be >= 0")
            # A window is flagged iff its (delta + 1)-th largest score is above tau.
            if delta < size:
                kth = np.partition(rows, size - 1 - delta, axis=1)[:, size - 1 - delta]
            else:
                kth = np.full(n_windows, -np.inf)
            tp = _count_above(np.sort(kth[anomalous]), candidates)
            fp = _count_above(np.sort(kth[~anomalous]), candidates)
            f1 = _f1_curve(tp, fp, np.count_nonzero(anomalous) - tp)
            best = int(np.flatnonzero(f1 == f1.max())[-1])
            if f1[best] > best_f1:
                best_tau, best_delta, best_f1 = float(candidates[best]), int(delta), float(f1[best])
        return best_tau, best_delta, best_f1

    raise ValueError(f"kind={kind!r} is not one of 'point', 'point_adjusted', 'window'")


# ---------------------------------------------------------------------------------------------------------
# NAB v1.1 scoring
# ---------------------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class NabProfile:
    """A NAB application profile: the weights of NAB's cost matrix (the true-negative weight is unused).

    Parameters
    ----------
    tp_weight, fp_weight, fn_weight : float
        ``A_tp``, ``A_fp`` and ``A_fn`` as magnitudes (NAB applies the signs), all finite and >= 0.
    """

    tp_weight: float
    fp_weight: float
    fn_weight: float

    def __post_init__(self) -> None:
        for name in ("tp_weight", "fp_weight", "fn_weight"):
            value = getattr(self, name)
            if not (math.isfinite(value) and value >= 0):
                raise ValueError(f"NabProfile {name}={value!r} must be a finite number >= 0")


NAB_PROFILES: Mapping[str, NabProfile] = MappingProxyType(
    {
        "standard": NabProfile(tp_weight=1.0, fp_weight=0.11, fn_weight=1.0),
        "reward_low_FP_rate": NabProfile(tp_weight=1.0, fp_weight=0.22, fn_weight=1.0),
        "reward_low_FN_rate": NabProfile(tp_weight=1.0, fp_weight=0.11, fn_weight=2.0),
    }
)
"""The three profiles of NAB v1.1's ``config/profiles.json``."""


def _sigmoid_weight(position: NDArray[np.float64]) -> NDArray[np.float64]:
    """NAB's scaled sigmoid ``2 / (1 + exp(5 y)) - 1``, which is -1 beyond ``y > 3``."""
    clipped = np.minimum(position, 3.0)
    return np.where(position > 3.0, -1.0, 2.0 / (1.0 + np.exp(5.0 * clipped)) - 1.0)


# 2 * sigmoid(5) - 1: the unscaled weight of a window's first row
_MAX_TP = float(_sigmoid_weight(np.array([-1.0]))[0])


@dataclass(frozen=True, eq=False)
class NabFile:
    """One NAB data file: its row timestamps and labelled windows.

    Parameters
    ----------
    name : str
        Relative path, e.g. ``"realKnownCause/nyc_taxi.csv"``.
    timestamps : ndarray, shape (n,)
        Row timestamps as the file has them (``datetime64`` for NAB; any type with ``==`` works, which
        keeps hand-made test corpora simple). Repeated or out-of-order timestamps are kept: NAB scores rows.
    windows : tuple of (start, end)
        Labelled windows in file order; each bound must be one of ``timestamps``.
    values : ndarray of float, shape (n,), optional
        The series values (not used for scoring).
    """

    name: str
    timestamps: NDArray[Any]
    windows: tuple[tuple[Any, Any], ...]
    values: NDArray[np.float64] | None = None


@dataclass(frozen=True)
class NabFileResult:
    """Per-file outcome of `nab_score`.

    Attributes
    ----------
    score : float
        Raw NAB score of the file.
    tp, fp, tn, fn : int
        Row counts after the probationary period, as NAB reports them (rows inside windows are positives).
    detected_windows, missed_windows : int
        Scored windows with and without a detection.
    """

    score: float
    tp: int
    fp: int
    tn: int
    fn: int
    detected_windows: int
    missed_windows: int


@dataclass(frozen=True, eq=False)
class _NabLayout:
    """Everything about a corpus that does not depend on the scores, flattened over all files."""

    names: tuple[str, ...]
    offsets: NDArray[np.intp]  # first row of each file in the concatenation
    lengths: NDArray[np.intp]
    inside: NDArray[np.bool_]  # scored rows inside a window
    outside: NDArray[np.bool_]  # scored rows outside every window
    fp_unit: NDArray[np.float64]  # NAB's unweighted (negative) false-positive score of outside rows, else 0
    window_rows: NDArray[np.intp]  # rows of `inside`, in order, grouped by window
    window_tp: NDArray[np.float64]  # true-positive score (before A_tp) of those rows, 1.0 at a window start
    window_starts: NDArray[np.intp]  # start of each scored window's group in `window_rows`
    window_file: NDArray[np.intp]  # file index of each scored window
    labelled_windows: int  # windows in the labels (NAB's count for the perfect score)


def _probation_rows(n: int, fraction: float) -> int:
    """Rows NAB leaves unscored: ``min(floor(fraction * n), fraction * 5000)``, i.e. 750 at most at 0.15."""
    return math.ceil(min(math.floor(fraction * n), fraction * 5000))


def _file_layout(
    f: NabFile, probation_fraction: float
) -> tuple[int, NDArray[np.intp], NDArray[np.float64], NDArray[np.float64]]:
    """Replay NAB's sweep over one file's rows.

    Returns the probationary length, the window index of each row (-1 outside windows), the true-positive
    score of window rows (before ``A_tp``) and the unweighted false-positive score of the other rows.

    The window logic follows NAB's sweeper: a window is entered at the first row (after the previous
    window's entry) whose timestamp equals its start, and left at the first row from there whose timestamp
    equals its end; its width is measured between the FIRST occurrences of its bounds in the file. With
    NAB's scaled sigmoid ``S(y) = 2 / (1 + exp(5 y)) - 1``, a row at ``i`` inside scores
    ``S(-(right - i + 1) / width) / S(-1)``; a row after a window scores ``S(|right - i| / (width - 1))``
    (-1 beyond ``y > 3``); a row before any window scores -1.
    """
    ts = np.asarray(f.timestamps)
    n = int(ts.shape[0])
    if ts.ndim != 1 or n == 0:
        raise ValueError(f"{f.name}: timestamps must be a non-empty 1-D array, got shape {ts.shape}")
    probation = _probation_rows(n, probation_fraction)

    entries: list[int] = []
    search_from = 0
    for k, (start, _end) in enumerate(f.windows):
        hits = np.flatnonzero(ts[search_from:] == start)
        if hits.size == 0:
            raise ValueError(
                f"{f.name}: window {k} starts at {start}, which is not a timestamp of the file at or after "
                f"row {search_from}; windows must be in file order and bounded by timestamps of the file"
            )
        entries.append(search_from + int(hits[0]))
        search_from = entries[-1] + 1

    row_window = np.full(n, -1, dtype=np.intp)
    tp_unit = np.zeros(n)
    fp_unit = np.full(n, -1.0)  # no preceding window: NAB's "far from any window" weight
    for k, (start, end) in enumerate(f.windows):
        entry = entries[k]
        next_entry = entries[k + 1] if k + 1 < len(entries) else n
        end_rows = np.flatnonzero(ts == end)
        if end_rows.size == 0:
            raise ValueError(f"{f.name}: window {k} ends at {end}, which is not a timestamp of the file")
        right = int(end_rows[0])
        width = right - int(np.flatnonzero(ts == start)[0]) + 1
        if width < 1:
            raise ValueError(f"{f.name}: window {k} [{start}, {end}] ends (row {right}) before it starts")
        later_end = end_rows[end_rows >= entry]
        exit_row = int(later_end[0]) if later_end.size else n
        rows = np.arange(entry, min(exit_row + 1, next_entry))
        row_window[rows] = k
        tp_unit[rows] = _sigmoid_weight(-(right - rows + 1) / width) / _MAX_TP
        fp_unit[rows] = 0.0
        if exit_row < next_entry:  # left normally: the rows up to the next window are measured from this one
            after = np.arange(exit_row + 1, next_entry)
            if width > 1:
                fp_unit[after] = _sigmoid_weight(np.abs(right - after) / (width - 1))
            else:  # NAB divides by zero here; a one-row window's neighbourhood is "far" at once
                fp_unit[after] = -1.0

    row_window[:probation] = -1
    tp_unit[:probation] = 0.0
    fp_unit[:probation] = 0.0
    return probation, row_window, tp_unit, fp_unit


def _build_layout(files: Mapping[str, NabFile], probation_fraction: float) -> _NabLayout:
    names: list[str] = []
    lengths: list[int] = []
    inside_parts: list[NDArray[np.bool_]] = []
    outside_parts: list[NDArray[np.bool_]] = []
    fp_parts: list[NDArray[np.float64]] = []
    tp_parts: list[NDArray[np.float64]] = []
    window_parts: list[NDArray[np.intp]] = []
    labelled = 0
    window_base = 0
    for name, f in files.items():
        if f.name != name:
            raise ValueError(f"NabCorpus key {name!r} does not match its file's name {f.name!r}")
        probation, row_window, tp_unit, fp_unit = _file_layout(f, probation_fraction)
        scored = np.arange(row_window.size) >= probation
        names.append(name)
        lengths.append(row_window.size)
        inside_parts.append(row_window >= 0)
        outside_parts.append((row_window < 0) & scored)
        fp_parts.append(fp_unit)
        tp_parts.append(tp_unit)
        window_parts.append(np.where(row_window >= 0, row_window + window_base, -1))
        window_base += len(f.windows)
        labelled += len(f.windows)

    if not names:
        raise ValueError("a NAB corpus needs at least one file")
    lengths_arr = np.asarray(lengths, dtype=np.intp)
    offsets = np.concatenate(([0], np.cumsum(lengths_arr)[:-1])).astype(np.intp)
    inside = np.concatenate(inside_parts)
    row_window = np.concatenate(window_parts)
    window_rows = np.flatnonzero(inside)
    window_ids = row_window[window_rows]
    new_window = np.concatenate(([True], window_ids[1:] != window_ids[:-1]))
    window_starts = np.flatnonzero(new_window).astype(np.intp)
    file_of_row = np.repeat(np.arange(len(names), dtype=np.intp), lengths_arr)
    return _NabLayout(
        names=tuple(names),
        offsets=offsets,
        lengths=lengths_arr,
        inside=inside,
        outside=np.concatenate(outside_parts),
        fp_unit=np.concatenate(fp_parts),
        window_rows=window_rows,
        window_tp=np.concatenate(tp_parts)[window_rows],
        window_starts=window_starts if window_rows.size else np.zeros(0, dtype=np.intp),
        window_file=file_of_row[window_rows[window_starts]] if window_rows.size else np.zeros(0, np.intp),
        labelled_windows=labelled,
    )


@dataclass(frozen=True, eq=False)
class NabCorpus:
    """A NAB corpus: files with their windows, prepared once for fast repeated scoring.

    Parameters
    ----------
    files : mapping of str to NabFile
        Files keyed by their relative path (equal to ``NabFile.name``), in scoring order.
    probation_fraction : float, default 0.15
        NAB's probationary fraction: the first ``min(floor(fraction * n), fraction * 5000)`` rows of each
        file are not scored.

    Raises
    ------
    ValueError
        When a window bound is not a timestamp of its file (NAB's labels always are), or a file is empty.
    """

    files: Mapping[str, NabFile]
    probation_fraction: float = 0.15
    _layout: _NabLayout = field(init=False, repr=False)

    def __post_init__(self) -> None:
        if not 0.0 <= self.probation_fraction < 1.0:
            raise ValueError(f"probation_fraction={self.probation_fraction} must be in [0, 1)")
        object.__setattr__(self, "files", MappingProxyType(dict(self.files)))
        object.__setattr__(self, "_layout", _build_layout(self.files, self.probation_fraction))

    @property
    def n_windows(self) -> int:
        """Number of labelled windows over all files."""
        return self._layout.labelled_windows


def _resolve_profile(profile: NabProfile | str) -> NabProfile:
    if isinstance(profile, NabProfile):
        return profile
    try:
        return NAB_PROFILES[profile]
    except KeyError:
        raise ValueError(
            f"profile={profile!r} is not one of {sorted(NAB_PROFILES)}; pass a NabProfile"
        ) from None


def _concat_scores(corpus: NabCorpus, scores_by_file: Mapping[str, ArrayLike]) -> NDArray[np.float64]:
    parts: list[NDArray[np.float64]] = []
    for name, n in zip(corpus._layout.names, corpus._layout.lengths, strict=True):
        if name not in scores_by_file:
            raise ValueError(f"scores_by_file has no scores for {name!r}; it needs one entry per corpus file")
        scores = np.asarray(scores_by_file[name], dtype=np.float64)
        if scores.shape != (n,):
            raise ValueError(
                f"scores for {name!r} have shape {scores.shape}, expected ({n},): "
                "one score per row of the data file"
            )
        parts.append(scores)
    return np.concatenate(parts)


def nab_score(
    corpus: NabCorpus,
    scores_by_file: Mapping[str, ArrayLike],
    threshold: float,
    profile: NabProfile | str = "standard",
) -> tuple[float, float, dict[str, NabFileResult]]:
    """NAB v1.1 score of a detector over a corpus at one threshold.

    A row is a detection when its score is ``>= threshold`` and it lies after the probationary period. The
    first detection inside a window scores ``A_tp * S(y) / S(-1)`` with ``S(y) = 2 / (1 + exp(5 y)) - 1`` and
    ``y = -(right - i + 1) / width`` (so exactly ``A_tp`` at the window's first row); later detections in
    the same window add nothing; a window without detection costs ``-A_fn``; a detection outside windows
    adds ``A_fp * S(|right - i| / (width - 1))`` measured from the preceding window (negative), or
    ``-A_fp`` when no window precedes it. Raw scores are summed over files and normalised as
    ``100 * (raw - null) / (perfect - null)`` where ``null`` is the score of a detector that flags nothing
    and ``perfect = A_tp * (number of labelled windows)``, the score of a detector flagging exactly the
    first row of every window (as NAB's runner computes it).

    Parameters
    ----------
    corpus : NabCorpus
        The labelled files.
    scores_by_file : mapping of str to array_like
        One score per row for every corpus file (extra keys are ignored; NaN is never a detection).
    threshold : float
        Detection threshold.
    profile : NabProfile or str, default "standard"
        Cost weights, or the name of one of `NAB_PROFILES`.

    Returns
    -------
    normalised : float
        The normalised NAB score (100 = perfect, 0 = null detector); NaN when perfect equals null.
    raw : float
        The raw score summed over files.
    per_file : dict of str to NabFileResult
        Raw score, row counts and window counts of each file.

    Examples
    --------
    One file of 20 rows, one window over rows 10-14, probationary period floor(0.15 * 20) = 3 rows. A
    detection at row 10 (the window's first row) is worth exactly A_tp = 1:

    >>> f = NabFile("demo.csv", np.arange(20), ((10, 14),))
    >>> corpus = NabCorpus({"demo.csv": f})
    >>> scores = np.zeros(20)
    >>> scores[10] = 1.0
    >>> normalised, raw, per_file = nab_score(corpus, {"demo.csv": scores}, 0.5)
    >>> round(normalised, 6), round(raw, 6), per_file["demo.csv"].tp
    (100.0, 1.0, 1)

    Flagging nothing scores -A_fn = -1, the null score:

    >>> nab_score(corpus, {"demo.csv": np.zeros(20)}, 0.5)[:2]
    (0.0, -1.0)
    """
    prof = _resolve_profile(profile)
    lay = corpus._layout
    scores = _concat_scores(corpus, scores_by_file)
    detected = scores >= threshold  # NaN compares False

    false_alarm = detected & lay.outside
    fp_score = np.add.reduceat(np.where(false_alarm, lay.fp_unit, 0.0), lay.offsets) * prof.fp_weight
    fp = np.add.reduceat(false_alarm.astype(np.int64), lay.offsets)
    tp = np.add.reduceat((detected & lay.inside).astype(np.int64), lay.offsets)
    n_out = np.add.reduceat(lay.outside.astype(np.int64), lay.offsets)
    n_in = np.add.reduceat(lay.inside.astype(np.int64), lay.offsets)

    n_files = len(lay.names)
    window_score: NDArray[np.float64] = np.zeros(n_files)
    detected_windows: NDArray[np.int64] = np.zeros(n_files, dtype=np.int64)
    scored_windows: NDArray[np.int64] = np.zeros(n_files, dtype=np.int64)
    if lay.window_starts.size:
        # Tp weights fall along a window, so the largest detected one is the first detection's.
        tp_if_detected = np.where(detected[lay.window_rows], lay.window_tp, -np.inf)
        first = np.maximum.reduceat(tp_if_detected, lay.window_starts)
        hit = np.isfinite(first)
        tp_score = prof.tp_weight * np.where(hit, first, 0.0)
        per_window = np.where(hit, np.maximum(tp_score, -prof.fn_weight), -prof.fn_weight)
        window_score = np.bincount(lay.window_file, weights=per_window, minlength=n_files).astype(np.float64)
        detected_windows = np.bincount(lay.window_file[hit], minlength=n_files).astype(np.int64)
        scored_windows = np.bincount(lay.window_file, minlength=n_files).astype(np.int64)

    file_scores = fp_score + window_score
    per_file = {
        name: NabFileResult(
            score=float(file_scores[i]),
            tp=int(tp[i]),
            fp=int(fp[i]),
            tn=int(n_out[i] - fp[i]),
            fn=int(n_in[i] - tp[i]),
            detected_windows=int(detected_windows[i]),
            missed_windows=int(scored_windows[i] - detected_windows[i]),
        )
        for i, name in enumerate(lay.names)
    }
    raw = float(file_scores.sum())
    null = -prof.fn_weight * float(lay.window_starts.size)
    perfect = prof.tp_weight * float(lay.labelled_windows)
    normalised = 100.0 * (raw - null) / (perfect - null) if perfect != null else math.nan
    return normalised, raw, per_file


def best_nab_threshold(
    corpus: NabCorpus,
    scores_by_file: Mapping[str, ArrayLike],
    profile: NabProfile | str = "standard",
) -> tuple[float, float, float]:
    """Threshold that maximises the NAB score of a detector over a corpus, for one profile.

    Like NAB v1.1's optimiser this sweeps every distinct score, so the optimum is exact (no grid): the rows
    are sorted by descending score once, each row's change to the total is computed (a false positive's
    weight, or the gain of a window whose earliest detection moves earlier), and the cumulative sum gives
    the score at every threshold. Among equal scores the highest threshold wins.

    Parameters
    ----------
    corpus : NabCorpus
        The labelled files.
    scores_by_file : mapping of str to array_like
        One score per row for every corpus file (NaN is never a detection).
    profile : NabProfile or str, default "standard"
        Cost weights, or the name of one of `NAB_PROFILES`.

    Returns
    -------
    threshold : float
        The best threshold for ``score >= threshold`` (``inf`` when flagging nothing is best).
    normalised : float
        Normalised NAB score at that threshold.
    raw : float
        Raw NAB score at that threshold.

    Examples
    --------
    One window over rows 10-14 of 20. Row 14 (the window's last row, worth 0.468) scores 0.9, row 16 (a false
    positive just after the window, costing 0.11 * 0.848 = 0.093) scores 0.7 and row 10 (the window's first
    row, worth 1) scores 0.5. Going down to 0.5 pays: 1 - 0.093 = 0.907 beats 0.468.

    >>> f = NabFile("demo.csv", np.arange(20), ((10, 14),))
    >>> corpus = NabCorpus({"demo.csv": f})
    >>> scores = np.zeros(20)
    >>> scores[[14, 16, 10]] = [0.9, 0.7, 0.5]
    >>> threshold, normalised, raw = best_nab_threshold(corpus, {"demo.csv": scores})
    >>> threshold, round(raw, 4), round(normalised, 2)
    (0.5, 0.9067, 95.33)
    """
    prof = _resolve_profile(profile)
    lay = corpus._layout
    scores = _concat_scores(corpus, scores_by_file)
    base = -prof.fn_weight * float(lay.window_starts.size)

    # Inside windows: per window, walk its rows by descending score and record how much the window's
    # contribution max(-A_fn, A_tp * best tp weight so far) improves at each row.
    window_scores = scores[lay.window_rows]
    gains = np.zeros(window_scores.size)
    usable = ~np.isnan(window_scores)
    bounds = np.append(lay.window_starts, window_scores.size)
    for start, stop in itertools.pairwise(bounds):
        idx = np.arange(start, stop)[usable[start:stop]]
        if idx.size == 0:
            continue
        idx = idx[np.argsort(-window_scores[idx], kind="stable")]
        contribution = np.maximum(prof.tp_weight * np.maximum.accumulate(lay.window_tp[idx]), -prof.fn_weight)
        gains[idx] = np.diff(contribution, prepend=-prof.fn_weight)

    out_rows = np.flatnonzero(lay.outside & ~np.isnan(scores))
    all_scores = np.concatenate((window_scores[usable], scores[out_rows]))
    all_gains = np.concatenate((gains[usable], prof.fp_weight * lay.fp_unit[out_rows]))
    order = np.argsort(-all_scores, kind="stable")
    sorted_scores = all_scores[order]
    totals = base + np.cumsum(all_gains[order])
    last_of_level = np.flatnonzero(np.append(sorted_scores[1:] != sorted_scores[:-1], True))
    thresholds = np.concatenate(([np.inf], sorted_scores[last_of_level]))
    candidates = np.concatenate(([base], totals[last_of_level]))
    best = int(np.argmax(candidates))  # first maximum: the highest threshold
    threshold = float(thresholds[best])
    normalised, raw, _ = nab_score(corpus, scores_by_file, threshold, prof)
    return threshold, normalised, raw


# ---------------------------------------------------------------------------------------------------------
# NAB corpus loaders (the only I/O of this module)
# ---------------------------------------------------------------------------------------------------------


def _parse_timestamps(texts: Sequence[str], where: str) -> NDArray[np.datetime64]:
    try:
        return np.array(texts, dtype="datetime64[us]")
    except ValueError as exc:
        raise ValueError(f"{where}: cannot parse timestamps as 'YYYY-MM-DD HH:MM:SS': {exc}") from exc


def _read_nab_csv(path: Path) -> tuple[NDArray[np.datetime64], NDArray[np.float64]]:
    with path.open(newline="") as handle:
        reader = csv.reader(handle)
        header = next(reader, None)
        if header is None or [h.strip() for h in header] != ["timestamp", "value"]:
            raise ValueError(f"{path}: header must be 'timestamp,value', got {header!r}")
        texts: list[str] = []
        values: list[float] = []
        for line_no, row in enumerate(reader, start=2):
            if not row:
                continue
            try:
                texts.append(row[0])
                values.append(float(row[1]))
            except (IndexError, ValueError) as exc:
                raise ValueError(f"{path}:{line_no}: expected 'timestamp,value', got {row!r}") from exc
    return _parse_timestamps(texts, str(path)), np.asarray(values, dtype=np.float64)


def load_nab_corpus(root: Path | str, probation_fraction: float = 0.15) -> NabCorpus:
    """Load the NAB corpus: ``data/*/*.csv`` and ``labels/combined_windows.json`` under ``root``.

    Parameters
    ----------
    root : Path or str
        The NAB folder, holding ``data/`` and ``labels/``.
    probation_fraction : float, default 0.15
        NAB's probationary fraction.

    Returns
    -------
    NabCorpus
        The files in sorted relative-path order (``"realKnownCause/nyc_taxi.csv"``), rows as in the files.

    Raises
    ------
    FileNotFoundError
        When ``data/`` holds no CSV file or the labels file is missing.
    ValueError
        When a data file has no labels entry, a malformed row, or a window bound that is not one of its
        timestamps.
    """
    root = Path(root)
    data_dir = root / "data"
    labels_path = root / "labels" / "combined_windows.json"
    paths = sorted(data_dir.glob("*/*.csv"))
    if not paths:
        raise FileNotFoundError(f"no NAB data files under {data_dir}; root must be the folder holding data/")
    if not labels_path.is_file():
        raise FileNotFoundError(f"NAB labels {labels_path} not found")
    windows_json = json.loads(labels_path.read_text())
    files: dict[str, NabFile] = {}
    for path in paths:
        name = path.relative_to(data_dir).as_posix()
        if name not in windows_json:
            raise ValueError(f"{labels_path} has no windows for {name!r} (an empty list means no anomaly)")
        timestamps, values = _read_nab_csv(path)
        flat = [t for pair in windows_json[name] for t in pair]
        bounds = _parse_timestamps(flat, f"{labels_path} [{name}]")
        windows = tuple((bounds[i], bounds[i + 1]) for i in range(0, bounds.size, 2))
        files[name] = NabFile(name=name, timestamps=timestamps, windows=windows, values=values)
    return NabCorpus(files, probation_fraction=probation_fraction)


def load_nab_profiles(path: Path | str) -> dict[str, NabProfile]:
    """Read NAB's ``config/profiles.json`` (``{name: {"CostMatrix": {"tpWeight": ..., ...}}}``).

    Parameters
    ----------
    path : Path or str
        The profiles file.

    Returns
    -------
    dict of str to NabProfile
        The profiles by name.
    """
    path = Path(path)
    document = json.loads(path.read_text())
    profiles: dict[str, NabProfile] = {}
    for name, entry in document.items():
        try:
            costs = entry["CostMatrix"]
            profiles[name] = NabProfile(
                tp_weight=float(costs["tpWeight"]),
                fp_weight=float(costs["fpWeight"]),
                fn_weight=float(costs["fnWeight"]),
            )
        except (KeyError, TypeError, ValueError) as exc:
            raise ValueError(
                f"{path}: profile {name!r} needs CostMatrix.tpWeight, .fpWeight and .fnWeight as numbers"
            ) from exc
    return profiles


def load_published_scores(
    path: Path | str, corpus: NabCorpus | None = None
) -> dict[str, NDArray[np.float64]]:
    """Read a published NAB score file (``file,timestamp,anomaly_score``, optionally gzip-compressed).

    Parameters
    ----------
    path : Path or str
        E.g. ``results/published_numenta_scores.csv.gz``; ``file`` holds data-relative paths such as
        ``realKnownCause/nyc_taxi.csv``.
    corpus : NabCorpus, optional
        When given, every corpus file must be present with as many rows as the data file and the same
        timestamps (as a multiset: see Notes).

    Returns
    -------
    dict of str to ndarray of float
        Scores per file, in the score file's row order.

    Raises
    ------
    ValueError
        On a malformed row, or a mismatch with ``corpus``.

    Notes
    -----
    NAB pairs a detector's scores with the data rows by position, not by timestamp, and so does
    `nab_score`. This matters for one published file: the randomCutForest scores of
    ``realKnownCause/machine_temperature_system_failure.csv`` list the rows around the backwards time step
    in sorted timestamp order, not in the data file's order; NAB's published results score them by position,
    so the check against ``corpus`` compares timestamps as a multiset only.
    """
    path = Path(path)
    raw = path.read_bytes()
    if raw[:2] == b"\x1f\x8b":
        raw = gzip.decompress(raw)
    reader = csv.reader(io.StringIO(raw.decode("utf-8")))
    header = next(reader, None)
    if header is None or [h.strip() for h in header] != ["file", "timestamp", "anomaly_score"]:
        raise ValueError(f"{path}: header must be 'file,timestamp,anomaly_score', got {header!r}")
    texts: dict[str, list[str]] = {}
    scores: dict[str, list[float]] = {}
    for line_no, row in enumerate(reader, start=2):
        if not row:
            continue
        try:
            name = row[0].replace("\\", "/").removeprefix("./")
            stamp, score = row[1], float(row[2])
        except (IndexError, ValueError) as exc:
            raise ValueError(
                f"{path}:{line_no}: expected 'file,timestamp,anomaly_score', got {row!r}"
            ) from exc
        texts.setdefault(name, []).append(stamp)
        scores.setdefault(name, []).append(score)
    result = {name: np.asarray(values, dtype=np.float64) for name, values in scores.items()}
    if corpus is not None:
        for name, f in corpus.files.items():
            if name not in result:
                raise ValueError(f"{path} has no scores for corpus file {name!r}")
            stamps = np.sort(_parse_timestamps(texts[name], f"{path} [{name}]"))
            expected = np.sort(np.asarray(f.timestamps))
            if stamps.shape != expected.shape:
                raise ValueError(
                    f"{path}: {name!r} has {stamps.size} scores but the data file has {expected.size} rows"
                )
            if not np.array_equal(stamps, expected):
                bad = int(np.flatnonzero(stamps != expected)[0])
                raise ValueError(
                    f"{path}: the timestamps of {name!r} are not those of the data file "
                    f"(first difference at {stamps[bad]} vs {expected[bad]})"
                )
    return result
