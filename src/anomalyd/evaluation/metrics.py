"""Detection metrics of labelled series: pure functions of arrays (numpy, scikit-learn and the standard library).

* point-wise precision, recall and F1; point-adjusted F1 as the SMD / OmniAnomaly literature defines it; F1
  over fixed non-overlapping windows as the LSTM encoder-decoder (LSTM-ED) paper defines it; ROC-AUC and
  PR-AUC (average precision);
* threshold tuning from labels for those F1s: `best_f1_threshold`;
* counts on flags and scores: the alert events the daemon's alert policy raises (`alert_events`), the labelled
  segments of a label column (`label_segments`) and the UCR archive's top-1 rule (`ucr_top1`).

The NAB score is `anomalyd.evaluation.nab`'s.

Conventions
-----------
* F1-style measures flag a point when ``score > tau`` (strictly greater), as the LSTM-ED paper does.
* A NaN score is never flagged.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from typing import Any, Literal, TypedDict

import numpy as np
from numpy.typing import ArrayLike, NDArray
from sklearn.metrics import average_precision_score, roc_auc_score

__all__ = [
    "Metrics",
    "alert_events",
    "best_f1_threshold",
    "label_segments",
    "point_adjust",
    "point_adjusted_metrics",
    "point_metrics",
    "pr_auc",
    "roc_auc",
    "ucr_top1",
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


def _two_class_area(area: Callable[[NDArray[np.bool_], NDArray[np.float64]], float], labels: ArrayLike,
                    scores: ArrayLike) -> float:
    """``area(labels, scores)`` after checking both, NaN when ``labels`` holds a single class."""
    lab = _as_bool_1d(labels, "labels")
    sc = _as_float_1d(scores, "scores")
    _check_same_length(lab, sc, ("labels", "scores"))
    if lab.all() or not lab.any():
        return math.nan
    return float(area(lab, sc))


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
    return _two_class_area(roc_auc_score, labels, scores)


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
    return _two_class_area(average_precision_score, labels, scores)


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
# Counts on flags and scores: labelled segments, alert events, the UCR top-1 rule
# ---------------------------------------------------------------------------------------------------------


def label_segments(labels: NDArray[np.bool_]) -> list[tuple[int, int]]:
    """The runs of True in ``labels`` as ``(first, last)`` rows (both inclusive).

    Examples
    --------
    >>> label_segments(np.array([0, 1, 1, 0, 1], dtype=bool))
    [(1, 2), (4, 4)]
    """
    starts, ends = _segments(labels)
    return [(int(a), int(b) - 1) for a, b in zip(starts, ends, strict=True)]


def alert_events(flags: ArrayLike, for_windows: int = 1, recover_windows: int = 32,
                 scored: ArrayLike | None = None) -> list[tuple[int, int]]:
    """The alert events the daemon's alert policy raises on a row's flags, as ``(first, last)`` rows.

    An event opens when ``for_windows`` consecutive scored rows are flagged (at the row that completes the
    run) and closes when ``recover_windows`` consecutive scored rows are not (``last`` is the last flagged row
    before them, or the last row when the series ends first). Rows that are not ``scored`` (missing-data
    windows) neither raise nor clear, as in `anomalyd.alerts.manager`. The defaults are ``[alerts]``'s.

    Examples
    --------
    Two flagged runs 3 rows apart are one event when recovery takes 4 rows, two when it takes 2:

    >>> f = [0, 1, 1, 0, 0, 0, 1, 0, 0, 0, 0, 0]
    >>> alert_events(f, 1, 4), alert_events(f, 1, 2)
    ([(1, 6)], [(1, 2), (6, 6)])
    >>> alert_events(f, 2, 2)  # a lone flagged row does not open an event when two are needed
    [(2, 2)]
    """
    fl = np.asarray(flags, dtype=bool)
    ok = np.ones(fl.shape, dtype=bool) if scored is None else np.asarray(scored, dtype=bool)
    if for_windows < 1 or recover_windows < 1:
        raise ValueError(f"for_windows={for_windows} and recover_windows={recover_windows} must be at least 1")
    events: list[tuple[int, int]] = []
    above = below = 0
    start = last = -1
    anomalous = False
    for i in np.flatnonzero(ok).tolist():
        if not anomalous:
            if fl[i]:
                above += 1
                if above >= for_windows:
                    anomalous, start, last, below = True, i, i, 0
            else:
                above = 0
        elif fl[i]:
            below, last = 0, i
        else:
            below += 1
            if below >= recover_windows:
                events.append((start, last))
                anomalous, above = False, 0
    if anomalous:
        events.append((start, last))
    return events


def ucr_top1(scores: ArrayLike, train_end: int, first: int, last: int, margin: int = 100) -> tuple[int, bool]:
    """The UCR archive's rule: the row of the highest score after the training part (the first on ties), and
    whether it is within ``margin`` rows of the labelled anomaly ``[first, last]``.

    Examples
    --------
    >>> ucr_top1([9.0, 0.0, 0.1, 0.7, 0.2], 1, 3, 3, margin=0)
    (3, True)
    """
    s = np.nan_to_num(np.asarray(scores, dtype=np.float64)[train_end:], nan=-np.inf)
    if s.size == 0:
        return -1, False
    at = train_end + int(np.argmax(s))
    return at, first - margin <= at <= last + margin

