"""Labelled evaluation of anomaly scores, threshold tuning from labels, and the `anomalyd evaluate` back end.

Three families of measures live here, all pure functions of arrays (numpy, scikit-learn and the standard
library only):

* point-wise precision, recall and F1; point-adjusted F1 as the SMD / OmniAnomaly literature defines it; F1
  over fixed non-overlapping windows as the LSTM encoder-decoder (LSTM-ED) paper defines it; ROC-AUC and
  PR-AUC (average precision);
* the Numenta Anomaly Benchmark score (NAB v1.1), re-implemented from NAB's published scoring rules and
  vectorised so that a whole corpus scores in milliseconds;
* threshold tuning from labels for both: `best_f1_threshold` and `best_nab_threshold`.

The file readers (`load_nab_corpus`, `load_published_scores`, `load_labelled_csv`, `load_smd_machine`,
`load_label_windows`) and the command line back end (`add_arguments` and `run`, which read a labelled CSV, a NAB
or SMD folder, or a signal's series over an InfluxDB range, score them with the causal detectors of
`anomalyd.detect` or stored models, print a table, write JSON and PNG plots) sit at the end of the module;
matplotlib, tqdm and the InfluxDB client are imported only there.

Conventions
-----------
* F1-style measures flag a point when ``score > tau`` (strictly greater), as the LSTM-ED paper does.
* NAB flags a row when ``score >= threshold``, as NAB does.
* A NaN score is never flagged.
"""

from __future__ import annotations

import argparse
import csv
import gzip
import io
import itertools
import json
import logging
import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from types import MappingProxyType
from typing import Any, Literal, TypedDict

import numpy as np
from numpy.typing import ArrayLike, NDArray
from sklearn.metrics import average_precision_score, roc_auc_score

from ..core.records import rfc3339

log = logging.getLogger(__name__)

__all__ = [
    "NAB_PROFILES",
    "EvalSeries",
    "Metrics",
    "NabCorpus",
    "NabFile",
    "NabFileResult",
    "NabProfile",
    "PlotEvent",
    "add_arguments",
    "alert_events",
    "best_f1_threshold",
    "best_nab_threshold",
    "find_plot_events",
    "find_smd_machines",
    "format_table",
    "load_label_windows",
    "load_labelled_csv",
    "load_nab_corpus",
    "load_nab_profiles",
    "load_published_scores",
    "load_smd_machine",
    "nab_score",
    "plot_event",
    "point_adjust",
    "point_adjusted_metrics",
    "point_metrics",
    "pr_auc",
    "roc_auc",
    "run",
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


# ---------------------------------------------------------------------------------------------------------
# Labelled CSV and SMD readers
# ---------------------------------------------------------------------------------------------------------


def load_labelled_csv(path: Path | str) -> tuple[list[str], NDArray[np.float64], NDArray[np.bool_] | None]:
    """Read a ``timestamp,value[,label]`` CSV (one row per sample, in time order).

    Parameters
    ----------
    path : Path or str
        The file. An empty ``value`` is read as NaN (a missing sample); ``label`` is 0 or 1.

    Returns
    -------
    timestamps : list of str
        The timestamps as written (only used to label the output).
    values : ndarray of float
        The samples.
    labels : ndarray of bool or None
        The labels, or None when the file has no ``label`` column.

    Raises
    ------
    ValueError
        On a wrong header, a malformed row or a label other than 0/1, naming the line.
    """
    path = Path(path)
    with path.open(newline="") as handle:
        reader = csv.reader(handle)
        header = [h.strip().lower() for h in next(reader, [])]
        if header not in (["timestamp", "value"], ["timestamp", "value", "label"]):
            raise ValueError(f"{path}: header must be 'timestamp,value' or 'timestamp,value,label', got "
                             f"{','.join(header)!r}")
        has_label = len(header) == 3
        stamps: list[str] = []
        values: list[float] = []
        labels: list[bool] = []
        for line_no, row in enumerate(reader, start=2):
            if not row or not "".join(row).strip():
                continue
            if len(row) != len(header):
                raise ValueError(f"{path}:{line_no}: expected {len(header)} columns ({','.join(header)}), got "
                                 f"{row!r}")
            stamps.append(row[0])
            try:
                values.append(float(row[1]) if row[1].strip() else math.nan)
            except ValueError as exc:
                raise ValueError(f"{path}:{line_no}: value {row[1]!r} is not a number") from exc
            if has_label:
                label = row[2].strip()
                if label not in ("0", "1", "0.0", "1.0", "true", "false", "True", "False"):
                    raise ValueError(f"{path}:{line_no}: label {label!r} must be 0 or 1")
                labels.append(label in ("1", "1.0", "true", "True"))
    if not values:
        raise ValueError(f"{path}: no data rows after the header")
    return stamps, np.asarray(values, dtype=np.float64), np.asarray(labels, dtype=bool) if has_label else None


def find_smd_machines(root: Path | str) -> list[str]:
    """Machine ids (``"1-6"``) with train, test and test_label files under an SMD-layout directory."""
    root = Path(root)
    ids = sorted(p.name.removeprefix("machine-").removesuffix("_train.npy") for p in root.glob("machine-*_train.npy"))
    return [m for m in ids if (root / f"machine-{m}_test.npy").is_file()
            and (root / f"machine-{m}_test_label.npy").is_file()]


def load_smd_machine(root: Path | str, machine: str) -> tuple[NDArray[np.float64], NDArray[np.float64],
                                                              NDArray[np.bool_]]:
    """Read one SMD machine: ``machine-<id>_{train,test,test_label}.npy`` (plain arrays, no pickle).

    Returns
    -------
    train, test : ndarray of float, shape (n, d)
        Training and test rows.
    labels : ndarray of bool, shape (n_test,)
        Test labels.
    """
    root = Path(root)
    try:
        train = np.load(root / f"machine-{machine}_train.npy", allow_pickle=False).astype(np.float64)
        test = np.load(root / f"machine-{machine}_test.npy", allow_pickle=False).astype(np.float64)
        labels = np.load(root / f"machine-{machine}_test_label.npy", allow_pickle=False).astype(bool)
    except FileNotFoundError as exc:
        raise FileNotFoundError(f"SMD machine {machine!r} is incomplete under {root}: {exc.filename} is missing; "
                                f"found machines {find_smd_machines(root)}") from exc
    if train.ndim != 2 or test.ndim != 2 or train.shape[1] != test.shape[1] or labels.shape != (test.shape[0],):
        raise ValueError(f"SMD machine {machine}: shapes train {train.shape}, test {test.shape}, labels "
                         f"{labels.shape} do not fit together (rows x metrics, one label per test row)")
    return train, test, labels


_LABEL_LAYOUT = 'write a list of ["start", "end"] pairs, or {"<series>": [["start", "end"], ...]}'


def load_label_windows(path: Path | str, series: Sequence[str], start_ns: int, end_ns: int,
                       now_ns: int | None = None) -> dict[str, list[tuple[int, int]]]:
    """Read the label windows of an InfluxDB range: epoch-ns ``(first, last)`` pairs per series.

    Parameters
    ----------
    path : Path or str
        JSON: a list of ``[start, end]`` pairs applying to every series, or NAB-style
        ``{"<series>": [[start, end], ...]}`` keyed by the series' tags as `anomalyd.core.records.tags_str` renders
        them (``"host=h1"``; ``""`` for a signal without ``group_by``). In the keyed form every series read needs
        a key (an empty list means no anomaly). Bounds are RFC 3339 times (or ``now``, ``now-2h``), inclusive.
    series : sequence of str
        The series read, as tags strings.
    start_ns, end_ns : int
        The evaluated range. A window must overlap it; one reaching past either end is clipped to it.
    now_ns : int, optional
        What ``now`` means in the bounds (default: the current time).

    Returns
    -------
    dict of str to list of (int, int)
        The windows of each series, sorted and clipped to the range.

    Raises
    ------
    ValueError
        Naming the file and the window: not JSON, a wrong layout, a bound that is not a time, a start after its
        end, a window outside the range, a key that is not a series read, or a series without a key.

    Examples
    --------
    >>> import tempfile
    >>> with tempfile.TemporaryDirectory() as d:
    ...     p = Path(d) / "labels.json"
    ...     _ = p.write_text('{"host=a": [["1970-01-01T00:00:10Z", "1970-01-01T00:00:20Z"]], "host=b": []}')
    ...     load_label_windows(p, ["host=a", "host=b"], 0, 60 * 10**9)
    {'host=a': [(10000000000, 20000000000)], 'host=b': []}
    """
    import time

    from ..config import parse_time_ns

    path = Path(path)
    now = time.time_ns() if now_ns is None else now_ns
    try:
        doc = json.loads(path.read_text())
    except json.JSONDecodeError as exc:
        raise ValueError(f"labels {path} is not valid JSON ({exc}); {_LABEL_LAYOUT}") from None
    except OSError as exc:
        raise ValueError(f"labels {path} cannot be read ({exc.strerror}); pass an existing JSON file to --labels"
                         ) from None
    known = list(series)
    entries: Mapping[str, Any]
    if isinstance(doc, list):
        entries = dict.fromkeys(known, doc)
    elif isinstance(doc, dict):
        unknown = [k for k in doc if k not in known]
        if unknown:
            raise ValueError(f"labels {path}: {unknown[0]!r} is not a series read from the range; the series are "
                             f"{', '.join(repr(k) for k in known)} (tags as k=v,k=v, sorted by key)")
        missing = [k for k in known if k not in doc]
        if missing:
            raise ValueError(f"labels {path} have no windows for series {missing[0]!r}; add it (an empty list means "
                             "no anomaly)")
        entries = doc
    else:
        raise ValueError(f"labels {path}: the top level is a JSON {type(doc).__name__}; {_LABEL_LAYOUT}")
    span = f"{rfc3339(start_ns)} .. {rfc3339(end_ns)}"
    out: dict[str, list[tuple[int, int]]] = {}
    for name in known:
        pairs = entries[name]
        where = f"labels {path}" if isinstance(doc, list) else f"labels {path} [{name!r}]"
        if not isinstance(pairs, list):
            raise ValueError(f"{where}: expected a list of [start, end] pairs, got {pairs!r}; {_LABEL_LAYOUT}")
        windows: list[tuple[int, int]] = []
        for i, pair in enumerate(pairs, start=1):
            if not (isinstance(pair, list) and len(pair) == 2 and all(isinstance(t, str) for t in pair)):
                raise ValueError(f"{where} window {i}: expected [start, end] as two RFC 3339 strings, got {pair!r}")
            try:
                a, b = (parse_time_ns(t, now) for t in pair)
            except ValueError as exc:
                raise ValueError(f"{where} window {i}: {exc}") from None
            if a > b:
                raise ValueError(f"{where} window {i}: start {pair[0]} is after end {pair[1]}; swap them")
            if b < start_ns or a > end_ns:
                raise ValueError(f"{where} window {i} ({pair[0]} .. {pair[1]}) lies outside the evaluated range "
                                 f"{span}; widen --start/--end or fix the window (times without a zone are UTC)")
            windows.append((max(a, start_ns), min(b, end_ns)))
        out[name] = sorted(windows)
    return out


# ---------------------------------------------------------------------------------------------------------
# `anomalyd evaluate`: the command line back end
# ---------------------------------------------------------------------------------------------------------

TUNE_CHOICES = ("none", "f1", "point-adjusted", "window", *(f"nab-{p}" for p in NAB_PROFILES))
FORMATS = ("auto", "csv", "nab", "smd", "ucr", "influx")
_F1_KIND: dict[str, Literal["point", "point_adjusted", "window"]] = {
    "f1": "point", "point-adjusted": "point_adjusted", "window": "window"}


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


class _UsageError(ValueError):
    """Options that do not go together."""


@dataclass
class EvalSeries:
    """One evaluated series (a CSV, a NAB file or an SMD machine); arrays have one entry per row.

    ``scores`` are what the threshold applies to (``score > threshold`` flags a row); rows before ``n_train``
    are not evaluated. ``segments`` are the labelled stretches as ``(first, last)`` rows (NAB windows, or runs
    of label 1).
    """

    name: str
    values: NDArray[np.float64]
    scores: NDArray[np.float64]
    errors: NDArray[np.float64]
    labels: NDArray[np.bool_] | None
    n_train: int
    threshold: float
    segments: list[tuple[int, int]] = field(default_factory=list)
    reconstruction: NDArray[np.float64] | None = None
    error_threshold: float | None = None
    info: dict[str, Any] = field(default_factory=dict)
    metrics: dict[str, Any] = field(default_factory=dict)


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """Add the options of ``anomalyd evaluate`` to an `argparse.ArgumentParser`.

    Parameters
    ----------
    parser : argparse.ArgumentParser
        The (sub)parser to extend; `run` reads the namespace it produces.
    """
    parser.add_argument("input", type=Path, nargs="?",
                        help="a labelled CSV (timestamp,value[,label]), a NAB folder (data/ and labels/) or an SMD "
                             "folder (machine-<id>_train/test/test_label.npy); none with --format influx")
    parser.add_argument("--format", choices=FORMATS, default="auto",
                        help="input layout (default: guessed; influx when -c/--config is given)")
    influx = parser.add_argument_group(
        "InfluxDB range (--format influx)",
        "Reads every series of a signal of an anomalyd config between --start and --end, on the signal's grid "
        "(period, gaps up to max_gap filled, as the daemon does). Scoring: with --model, that stored model's "
        "max_error; otherwise the signal's trained models in paths.models (the daemon's own models, thresholds "
        "and max_error; series without a model are left out, as the daemon skips them); with no trained model "
        "at all, the default causal detector trained on the first --train-rows rows of each series. Rows up to "
        "a stored model's training end are not evaluated.")
    influx.add_argument("-c", "--config", type=Path,
                        help="anomalyd TOML config to read InfluxDB, the signal and paths.models from (with "
                             "--format influx, default config.toml)")
    influx.add_argument("--signal", help="signal of the config to evaluate (default: the only one)")
    influx.add_argument("--start", help="start of the range: RFC 3339 time, 'now' or 'now-2h'")
    influx.add_argument("--end", default="now", help="end of the range (default now)")
    influx.add_argument("--labels", type=Path,
                        help="label windows as JSON: a list of [start, end] RFC 3339 pairs for every series, or "
                             "{\"<series>\": [[start, end], ...]} keyed by the series' tags as k=v,k=v (sorted, "
                             "e.g. \"host=h1\"; an empty list means no anomaly); without it, alerts are counted "
                             "only")
    parser.add_argument("--model", type=Path,
                        help="score a CSV or an InfluxDB range with this stored model (catalog JSON) instead of "
                             "training a detector (InfluxDB: a per-series model scores its own series only, a shared "
                             "one every series); the threshold then applies to max_error, as in the daemon")
    parser.add_argument("--train-rows", type=int,
                        help="CSV, and InfluxDB series without a trained model: rows of the training part (default: "
                             "NAB's rule, min(15%%, 750 rows))")
    parser.add_argument("--window", default="auto",
                        help="window length, or 'auto' for the dominant-period rule (default auto)")
    parser.add_argument("--slide", type=int, default=None,
                        help="score one window every N rows, as the daemon does with signals.slide = N (default 1: "
                             "every row; rows in between score 0). A stored model (--model, or the signal's trained "
                             "models) scores at its own stride, set at training: a different --slide is refused")
    parser.add_argument("--max-gap", type=int, default=8,
                        help="CSV and NAB: gaps of up to N samples are filled, as signals.max_gap does (default 8)")
    parser.add_argument("--jobs", type=int, default=1, help="NAB: files evaluated in parallel (default 1)")
    parser.add_argument("--machines", nargs="+", help="SMD: only these machine ids (default: all found)")
    parser.add_argument("--every", type=int, default=1,
                        help="UCR: evaluate every N-th series of index.csv (default 1: all 234)")
    parser.add_argument("--detector", default=None, metavar="NAME",
                        help="the window scorer (DetectorSpec.scorer): kmeans (default), fft, saliency, generalized, "
                             "discord, nodata, or several joined by '+' (e.g. kmeans+discord)")
    parser.add_argument("--threshold", type=float,
                        help="operating threshold (default: 0.5 on normalised scores; the threshold learned "
                             "from training data for SMD, --model and InfluxDB stored models)")
    parser.add_argument("--tune", choices=TUNE_CHOICES, default="none",
                        help="choose the threshold from the labels: best F1 (point, point-adjusted or window; "
                             "per series) or best NAB profile score (one threshold for the corpus)")
    parser.add_argument("--validation", type=float, default=0.0,
                        help="with --tune: tune on the first share of each series' scored rows and report on the "
                             "rest (default 0: tune and report on the same rows, an optimistic oracle)")
    parser.add_argument("--window-size", type=int, default=100,
                        help="rows per window of the window-level F1 (default 100, as the LSTM-ED paper)")
    parser.add_argument("--delta", type=int, default=0,
                        help="window-level F1: a window is flagged when more than DELTA rows exceed the threshold "
                             "(default 0; tuned with --tune window)")
    parser.add_argument("--write-threshold", action="store_true",
                        help="with --model and --tune: write the tuned threshold into the model's catalog JSON")
    parser.add_argument("--json", type=Path, help="write the full report as JSON to this file")
    parser.add_argument("--plots", type=Path, help="write PNG plots of the worst misses and false alarms here")
    parser.add_argument("--n-plots", type=int, default=3, help="plots of each kind (default 3)")
    parser.add_argument("--no-progress", action="store_true", help="no progress bar")


def _detector_spec(args: Any) -> Any:
    """The detector's parameters for ``evaluate``: the defaults every signal gets, with ``--window`` and
    ``--slide``."""
    from ..core.detector import DetectorSpec

    window: int | None
    if str(args.window).lower() == "auto":
        window = None
    else:
        try:
            window = int(args.window)
        except ValueError:
            raise ValueError(f"--window {args.window!r} must be a whole number of rows or 'auto'") from None
        if window < 4:
            raise ValueError(f"--window {window} is too small; use at least 4 rows or 'auto'")
    slide = 1 if args.slide is None else args.slide
    if slide < 1:
        raise ValueError(f"--slide {slide} must be at least 1 (1 scores every row)")
    if args.max_gap < 0:
        raise ValueError(f"--max-gap {args.max_gap} must be >= 0")
    spec = DetectorSpec(window=window, stride=slide)
    detector = getattr(args, "detector", None)
    if detector is not None:
        try:
            spec = spec.with_overrides(scorer=str(detector))
        except ValueError as exc:
            raise _UsageError(f"--detector {detector!r}: {exc}") from None
    return spec


def _check_slide(args: Any, stored: Any) -> None:
    """Refuse a ``--slide`` that differs from a stored model's own stride (it scores at the stride it was trained
    with, ``signals.slide`` at training; its score normaliser was warmed up on that cadence)."""
    stride = int(stored.model.spec.stride)
    if args.slide is not None and args.slide != stride:
        raise _UsageError(f"--slide {args.slide}: stored model {stored.model_id} scores one window every {stride} "
                          f"row(s), its own stride from training (signals.slide); leave out --slide, or retrain "
                          f"with signals.slide = {args.slide}")


def _guess_format(path: Path) -> str:
    if path.is_file():
        return "csv"
    if path.is_dir():
        if (path / "labels" / "combined_windows.json").is_file() and (path / "data").is_dir():
            return "nab"
        if any(path.glob("machine-*_train.npy")):
            return "smd"
        if (path / "series.npz").is_file() and (path / "index.csv").is_file():
            return "ucr"
        raise ValueError(f"{path} is a folder but neither NAB (data/ and labels/combined_windows.json), SMD "
                         "(machine-<id>_train.npy ...) nor UCR (series.npz and index.csv); pass a CSV file or one "
                         "of those folders")
    raise FileNotFoundError(f"input {path} does not exist")


def _resolve_format(args: Any) -> str:
    """The input layout: ``--format``, else influx with ``-c/--config``, else guessed from the input path."""
    fmt = str(args.format)
    config = getattr(args, "config", None)
    if fmt == "auto":
        if config is not None:
            fmt = "influx"
        elif args.input is None:
            raise _UsageError("give an input (a labelled CSV, a NAB or an SMD folder), or -c CONFIG --start T to "
                              "evaluate a signal over an InfluxDB range")
        else:
            fmt = _guess_format(args.input)
    if fmt == "influx":
        if args.input is not None:
            raise _UsageError(f"--format influx reads InfluxDB, not {args.input}; drop the input, or drop "
                              "-c/--config to evaluate the file")
        if getattr(args, "start", None) is None:
            raise _UsageError("--format influx needs --start T (RFC 3339, 'now' or 'now-2h'); --end defaults to now")
        return fmt
    if args.input is None:
        raise _UsageError(f"--format {fmt} needs an input path")
    given = [f"--{name}" for name in ("config", "signal", "start", "labels") if getattr(args, name, None) is not None]
    if given:
        raise _UsageError(f"{', '.join(given)} select an InfluxDB range (--format influx); a {fmt} input does not "
                          "take them")
    return fmt


def _label_segments(labels: NDArray[np.bool_]) -> list[tuple[int, int]]:
    starts, ends = _segments(labels)
    return [(int(a), int(b) - 1) for a, b in zip(starts, ends, strict=True)]


def nab_probation(n: int, fraction: float = 0.15) -> int:
    """Rows in NAB's probationary period: ``min(floor(fraction * n), fraction * 5000)`` (750 at 0.15).

    Examples
    --------
    >>> nab_probation(4032), nab_probation(22695)
    (604, 750)
    """
    return math.ceil(min(math.floor(fraction * n), fraction * 5000))


def _series_from_run(name: str, times: NDArray[np.int64], values: NDArray[np.float64],
                     labels: NDArray[np.bool_] | None, n_train: int, run: Any,
                     segments: list[tuple[int, int]] | None = None, info: dict[str, Any] | None = None) -> EvalSeries:
    """An evaluated series from a `anomalyd.core.stored_run.StoredRun`: the daemon's points, one per row by timestamp.

    A row gets the score and error of the window whose point carries its timestamp (what a join on time with
    the daemon's output gives); rows without one (probation, missing-data windows) score 0.
    """
    from ..core.stored_run import by_timestamp

    det = run.detector
    scores = np.nan_to_num(by_timestamp(run, times, run.batch.score), nan=0.0)
    errors = by_timestamp(run, times, run.batch.max_error)
    flags = by_timestamp(run, times, run.batch.anomalous.astype(np.float64)) == 1.0
    slot = (np.asarray(times, dtype=np.int64) - run.t0 + run.period // 2) // run.period
    recon = det.overlap_reconstruction(run.values, first_index=run.t0 // run.period)
    tau = float(np.nextafter(det.spec.score_threshold, -np.inf))  # score > tau  <=>  score >= score_threshold
    return EvalSeries(name=name, values=values, scores=scores, errors=errors, labels=labels, n_train=n_train,
                      threshold=tau, segments=segments if segments is not None else
                      (_label_segments(labels) if labels is not None else []),
                      reconstruction=recon[np.clip(slot, 0, len(recon) - 1)], error_threshold=float(det.threshold_),
                      info={"window": det.window_, "n_clusters": len(det.catalog_.cluster_centers_),
                            "error_threshold": float(det.threshold_), "decisions": int(flags.sum()),
                            **(info or {})})


def _progress(items: Sequence[Any], args: Any, desc: str) -> Any:
    from tqdm import tqdm

    return tqdm(items, desc=desc, unit="file", disable=args.no_progress or len(items) < 2)


def _csv_times(stamps: list[str]) -> tuple[NDArray[np.int64], bool]:
    """Epoch-ns times of a CSV's timestamps, or the row numbers (one per second) when they are not times."""
    try:
        t = np.array(stamps, dtype="datetime64[ns]").astype(np.int64)
        if len(t) < 2 or not np.any(np.diff(t) > 0):
            raise ValueError("no two distinct times")
        return t, True
    except ValueError:
        return np.arange(len(stamps), dtype=np.int64) * 10**9, False


def _load_csv_series(args: Any, spec: Any) -> list[EvalSeries]:
    from ..core.stored_run import run_stored

    stamps, values, labels = load_labelled_csv(args.input)
    n = values.shape[0]
    name = args.input.name
    times, timed = _csv_times(stamps)
    if not timed:
        log.warning("%s: the timestamps are not times; rows are taken as one sample per second", args.input)
    info: dict[str, Any] = {"first_timestamp": stamps[0]}
    if args.model is not None:
        from ..service.catalog import load as load_model

        stored = load_model(args.model)
        _check_slide(args, stored)
        run = run_stored(times, values, int(times[0]) - 1, period_ns=stored.period_ns, max_gap=args.max_gap,
                         detector=stored.model)
        info.update(model=stored.model_id, model_threshold=float(stored.model.threshold_))
        n_train = stored.model.window_ - 1
    else:
        n_train = args.train_rows if args.train_rows is not None else nab_probation(n)
        if not 0 < n_train < n:
            raise ValueError(f"--train-rows {n_train} must be between 1 and the {n} rows of {args.input} minus one")
        run = run_stored(times, values, int(times[n_train - 1]), spec, max_gap=args.max_gap)
    return [_series_from_run(name, times, values, labels, n_train, run, info=info)]


def _load_nab_series(args: Any, spec: Any) -> tuple[list[EvalSeries], NabCorpus]:
    corpus = load_nab_corpus(args.input)
    names = list(corpus.files)
    with _pool(args) as pool:
        runs = list(_progress_map(pool, _nab_run, [(corpus.files[n], spec, args.max_gap) for n in names], args,
                                  "evaluate NAB"))
    out: list[EvalSeries] = []
    for name, (times, n_train, run) in zip(names, runs, strict=True):
        f = corpus.files[name]
        values = np.asarray(f.values, dtype=np.float64)
        ts = np.asarray(f.timestamps)
        segments = [(int(np.flatnonzero(ts == a)[0]), int(np.flatnonzero(ts == b)[0])) for a, b in f.windows]
        labels = np.zeros(values.shape[0], dtype=bool)
        for a, b in segments:
            labels[a : b + 1] = True
        out.append(_series_from_run(name, times, values, labels, n_train, run, segments))
    return out, corpus


def _nab_run(job: tuple[NabFile, Any, int]) -> tuple[NDArray[np.int64], int, Any]:
    """One NAB file through the daemon's path: trained on its probationary period, every later row scored."""
    from ..core.stored_run import run_stored

    f, spec, max_gap = job
    times = np.asarray(f.timestamps).astype("datetime64[ns]").astype(np.int64)
    n_train = nab_probation(len(times))
    return times, n_train, run_stored(times, np.asarray(f.values, dtype=np.float64), int(times[n_train - 1]), spec,
                                      max_gap=max_gap)


def _pool(args: Any) -> Any:
    """A process pool of ``--jobs`` workers (a no-op pool with one job)."""
    import multiprocessing
    from concurrent.futures import ProcessPoolExecutor
    from contextlib import nullcontext

    # forkserver: a forked child of a process that already ran K-Means (OpenMP) would hang.
    return (ProcessPoolExecutor(args.jobs, mp_context=multiprocessing.get_context("forkserver")) if args.jobs > 1
            else nullcontext(None))


def _progress_map(pool: Any, fn: Any, jobs: Sequence[Any], args: Any, desc: str) -> Any:
    from tqdm import tqdm

    it = map(fn, jobs) if pool is None else pool.map(fn, jobs)
    return tqdm(it, desc=desc, unit="file", total=len(jobs), disable=args.no_progress or len(jobs) < 2)


def smd_run(train: NDArray[np.float64], test: NDArray[np.float64], spec: Any) -> Any:
    """An SMD machine through the detector: trained on its training file, every test row scored (one sample per
    row, the training file's end as the first windows' context)."""
    from ..core.detector import Detector

    det = Detector(spec).fit([train], [0])
    state = det.start(len(train), train)
    return det, det.update(state, test)


def _load_smd_series(args: Any, spec: Any) -> list[EvalSeries]:
    machines = args.machines or find_smd_machines(args.input)
    if not machines:
        raise FileNotFoundError(f"no SMD machine (machine-<id>_train/test/test_label.npy) under {args.input}")
    out: list[EvalSeries] = []
    for machine in _progress(machines, args, "evaluate SMD"):
        train, test, labels = load_smd_machine(args.input, machine)
        det, batch = smd_run(train, test, spec)
        tau = float(np.nextafter(det.spec.score_threshold, -np.inf))
        out.append(EvalSeries(name=f"machine-{machine}", values=test, scores=np.nan_to_num(batch.score),
                              errors=batch.error, labels=labels, n_train=0, threshold=tau,
                              segments=_label_segments(labels), error_threshold=float(det.error_threshold_),
                              info={"window": det.window_, "n_clusters": len(det.catalog_.cluster_centers_),
                                    "metric_scores": batch.field_error}))
    return out


@dataclass(frozen=True)
class UcrSeries:
    """One series of the UCR anomaly archive's index (0-based rows: training ``[0, train_end)``, the anomaly
    ``[anomaly_first, anomaly_last]``)."""

    name: str
    train_end: int
    anomaly_first: int
    anomaly_last: int
    length: int


def load_ucr_index(root: Path | str) -> list[UcrSeries]:
    """The series of a UCR folder's ``index.csv`` (1-based inclusive indices in the file, as in the archive)."""
    path = Path(root) / "index.csv"
    out = []
    with path.open(newline="") as fh:
        for row in csv.DictReader(fh):
            try:
                out.append(UcrSeries(row["name"], int(row["train_end"]), int(row["anomaly_start"]) - 1,
                                     int(row["anomaly_end"]) - 1, int(row["length"])))
            except (KeyError, ValueError) as exc:
                raise ValueError(f"{path}: row {row} is not id,name,train_end,anomaly_start,anomaly_end,length "
                                 f"({exc})") from exc
    return out


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


def _ucr_run(job: tuple[UcrSeries, NDArray[np.float64], Any, int]) -> Any:
    from ..core.stored_run import run_stored

    u, values, spec, max_gap = job
    times = np.arange(values.size, dtype=np.int64) * 10**9
    return run_stored(times, values, int(times[u.train_end - 1]), spec, period_ns=10**9, max_gap=max_gap)


def _load_ucr_series(args: Any, spec: Any) -> list[EvalSeries]:
    """Every ``--every``-th UCR series through the daemon's path: trained on its training part, every later row
    scored (one sample per second)."""
    index = load_ucr_index(args.input)
    if args.every < 1:
        raise _UsageError(f"--every {args.every} must be at least 1")
    index = index[:: args.every]
    out: list[EvalSeries] = []
    with np.load(Path(args.input) / "series.npz") as z:
        for u in _progress(index, args, "evaluate UCR"):
            values = np.asarray(z[u.name], dtype=np.float64)
            run = _ucr_run((u, values, spec, args.max_gap))
            times = np.arange(values.size, dtype=np.int64) * 10**9
            labels = np.zeros(values.size, dtype=bool)
            labels[u.anomaly_first : u.anomaly_last + 1] = True
            s = _series_from_run(u.name, times, values, labels, u.train_end, run)
            for key, col in (("score", s.scores), ("error", np.nan_to_num(
                    by_timestamp_error(run, times), nan=-np.inf))):
                at, hit = ucr_top1(col, u.train_end, u.anomaly_first, u.anomaly_last)
                s.info[f"ucr_top1_{key}"] = at
                s.info[f"ucr_hit_{key}"] = hit
            out.append(s)
    return out


def by_timestamp_error(run: Any, times: NDArray[np.int64]) -> NDArray[np.float64]:
    """The score's input (``WindowBatch.error``) per row, as `anomalyd.core.stored_run.by_timestamp` lines it up."""
    from ..core.stored_run import by_timestamp

    return by_timestamp(run, times, run.batch.error)


def _rows_in_windows(windows: Sequence[tuple[int, int]], t0: int, period: int, n: int) -> NDArray[np.bool_]:
    """Per-row labels of the grid ``t0 + i * period`` (``n`` rows): True inside any window (bounds inclusive).

    A window narrower than a period that holds no grid point labels its nearest row.

    Examples
    --------
    >>> _rows_in_windows([(20, 40), (64, 66)], 0, 10, 10).astype(int).tolist()
    [0, 0, 1, 1, 1, 0, 1, 0, 0, 0]
    """
    labels = np.zeros(n, dtype=bool)
    for a, b in windows:
        first, last = -(-(a - t0) // period), (b - t0) // period
        if last < first:
            first = last = round((a - t0) / period)
        first, last = max(first, 0), min(last, n - 1)
        if first <= last:
            labels[first : last + 1] = True
    return labels


def _load_influx_series(args: Any, spec: Any) -> tuple[list[EvalSeries], str, bool]:
    """Read, align, label and score the series of one signal over an InfluxDB range.

    Returns the series, the input's description for the report, and whether stored models scored them.
    """
    import time

    from ..config import ConfigError, parse_time_ns
    from ..config import load as load_config
    from ..core.records import SeriesKey, Tags, tags_str
    from ..core.stored_run import run_stored
    from ..service.catalog import Catalog, StoredModel, model_id_for, model_mismatch
    from ..service.catalog import load as load_model
    from ..store.influx1 import InfluxDB1Store
    from ..store.sources import describe, read_signal

    config_path = args.config if args.config is not None else Path("config.toml")
    try:
        cfg = load_config(config_path)
    except ConfigError as exc:
        raise _UsageError(str(exc)) from None
    names = [s.name for s in cfg.signals]
    if args.signal is None:
        if len(names) != 1:
            raise _UsageError(f"{cfg.source} configures {len(names)} signals ({', '.join(names)}); pick one with "
                              "--signal NAME")
        sig = cfg.signals[0]
    elif args.signal in names:
        sig = cfg.signal(args.signal)
    else:
        raise ValueError(f"--signal {args.signal!r} is not a signal of {cfg.source}; configured: {', '.join(names)}")
    now = time.time_ns()
    bounds: list[int] = []
    for option, text in (("--start", args.start), ("--end", args.end)):
        try:
            bounds.append(parse_time_ns(text, now))
        except ValueError as exc:
            raise ValueError(f"{option}: {exc}") from None
    start, end = bounds
    if start >= end:
        raise ValueError(f"--start {args.start} ({rfc3339(start)}) must be before --end {args.end} "
                         f"({rfc3339(end)})")
    period = sig.period_ns
    t0 = -(-start // period) * period  # the daemon's grid: multiples of the period since the epoch
    n = int((end // period * period - t0) // period + 1)
    if n < 1:
        raise ValueError(f"--start {args.start} .. --end {args.end} holds no sample time of signal {sig.name} "
                         f"(period {period / 1e9:g}s); widen the range")
    explicit: StoredModel | None = None
    if args.model is not None:
        explicit = load_model(args.model)
        if explicit.signal != sig.name:
            raise ValueError(f"--model {args.model} was trained for signal {explicit.signal!r}, not {sig.name!r}; "
                             f"pass --signal {explicit.signal}")
        if explicit.period_ns != period:
            raise ValueError(f"--model {args.model} was trained at a period of {explicit.period_ns}ns but signal "
                             f"{sig.name} samples every {period}ns; retrain it or restore the config")
    # The daemon's read (worker.py): the signal's where, one series per group_by tag set, half a period beyond
    # both ends so a jittered sample of the first or last grid point is kept.
    # The daemon's read (worker.py): the signal's where, one series per group_by tag set, with one window of
    # context before --start and the gap-filling margin beyond both ends.
    store = InfluxDB1Store(cfg.influxdb, cfg.daemon.write_batch)
    margin = ((sig.window or sig.spec().max_window) - 1 + sig.max_gap + 1) * period + period // 2
    data = read_signal(store, sig, start - margin, end + (sig.max_gap + 1) * period + period // 2)
    if not data:
        where = f" where {tags_str(sig.where)}" if sig.where else ""
        raise ValueError(f"signal {sig.name}: no samples of {describe(sig)}{where} between "
                         f"{rfc3339(start)} and {rfc3339(end)} in database {cfg.influxdb.database!r} at "
                         f"{cfg.influxdb.url}; check --start/--end (UTC) and the signal's measurement, field and where")
    items = sorted(data.items())
    keys = [tags_str(tags) for tags, _ in items]
    windows = load_label_windows(args.labels, keys, start, end, now) if args.labels is not None else None

    models: dict[Tags, StoredModel] = {}
    if explicit is not None:
        _check_slide(args, explicit)
        if explicit.scope == "series":
            if explicit.tags not in data:
                raise ValueError(f"--model {args.model} scores series {tags_str(explicit.tags)!r} of signal "
                                 f"{sig.name}, which has no samples in the range; the series read are "
                                 f"{', '.join(repr(k) for k in keys)}")
            models[explicit.tags] = explicit
        else:
            models = {tags: explicit for tags, _ in items}
    else:
        catalog = Catalog(cfg.paths.models)
        for tags, _ in items:
            stored = catalog.get(model_id_for(sig.name, tags, sig.scope))
            if stored is None:
                continue
            why = model_mismatch(stored, sig)
            if why:
                log.warning("model %s %s; the daemon ignores it and so does this evaluation", stored.model_id, why)
                continue
            models[tags] = stored
        for stored in models.values():
            _check_slide(args, stored)
        untrained = [k for (tags, _), k in zip(items, keys, strict=True) if tags not in models]
        if not models:
            log.warning("signal %s has no trained model in %s: training the default detector on the first rows of "
                        "each series (run `anomalyd train -c %s` to evaluate what the daemon does)", sig.name,
                        cfg.paths.models, cfg.source)
        elif untrained:
            log.warning("signal %s: %d series without a model in %s left out, as the daemon skips them: %s",
                        sig.name, len(untrained), cfg.paths.models, ", ".join(untrained))

    out: list[EvalSeries] = []
    first_end = start // period * period  # the daemon's score: windows ending after --start
    for r in _progress(list(range(len(items))), args, "evaluate InfluxDB"):
        (tags, per_field), key = items[r], keys[r]
        times = np.unique(np.concatenate([t for t, _ in per_field]))
        if models and tags not in models:
            continue
        name = str(SeriesKey(sig.name, tags))
        info: dict[str, Any] = {"series": key, "first_timestamp": rfc3339(first_end + period), "period_ns": period,
                                "for_windows": cfg.alerts.for_windows, "recover_windows": cfg.alerts.recover_windows}
        stored = models.get(tags)
        if stored is None:
            inside = times[times > first_end]
            n_rows = len(inside)
            n_train = args.train_rows if args.train_rows is not None else nab_probation(n_rows)
            if not 0 < n_train < n_rows:
                raise ValueError(f"--train-rows {n_train} must be between 1 and the {n_rows} rows of {name} minus one")
            # the range only: the context read before --start is not training data
            run = run_stored(times, None, int(inside[n_train - 1]), spec, period, sig.max_gap,
                             fields=[(t[t > first_end], v[t > first_end]) for t, v in per_field])
            info["train_rows"] = n_train
        else:
            boundary = max(first_end, stored.train_end_ns // period * period)
            if boundary >= end:
                later = rfc3339(stored.train_end_ns + period)
                raise ValueError(f"{name}: no window of the range ends after model {stored.model_id}'s training end "
                                 f"({rfc3339(stored.train_end_ns)}); evaluate a later range, e.g. --start {later}")
            run = run_stored(times, None, boundary, period_ns=period, max_gap=sig.max_gap, detector=stored.model,
                             fields=per_field)
            info.update(model=stored.model_id, model_threshold=float(stored.model.threshold_))
        keep = run.stamps <= end
        t_rows = run.stamps[keep]
        labels = None
        if windows is not None:
            labels = np.zeros(len(t_rows), dtype=bool)
            for a, b in windows[key]:
                labels |= (t_rows >= a) & (t_rows <= b)
        s = _series_from_run(name, t_rows, run.values[run.first :][keep], labels, 0, run, info=info)
        s.info["missing_rows"] = int(np.count_nonzero(run.written[keep] & ~run.batch.complete[keep]))
        out.append(s)
    if not out:
        raise ValueError(f"signal {sig.name}: no series left to evaluate between {rfc3339(start)} and "
                         f"{rfc3339(end)}; widen the range")
    desc = (f"influx {cfg.influxdb.url} database {cfg.influxdb.database} signal {sig.name} "
            f"{rfc3339(start)} .. {rfc3339(end)}")
    return out, desc, bool(models)


def _split_rows(s: EvalSeries, validation: float) -> tuple[slice, slice]:
    """Rows to tune on and rows to report on (the same with no validation share)."""
    n = s.scores.shape[0]
    if validation <= 0:
        return slice(s.n_train, n), slice(s.n_train, n)
    cut = s.n_train + round(validation * (n - s.n_train))
    return slice(s.n_train, cut), slice(cut, n)


def _f1_block(labels: NDArray[np.bool_], scores: NDArray[np.float64], tau: float, size: int,
              delta: int) -> dict[str, Any]:
    flags = scores > tau
    pm = point_metrics(labels, flags)
    pa = point_adjusted_metrics(labels, flags)
    wm = window_metrics(labels, scores, tau, size, delta)
    scored = np.isfinite(scores)  # NaN (a stored model's missing-data windows) is never flagged, and not ranked
    return {"precision": pm["precision"], "recall": pm["recall"], "f1": pm["f1"],
            "pa_precision": pa["precision"], "pa_recall": pa["recall"], "pa_f1": pa["f1"],
            "window_precision": wm["precision"], "window_recall": wm["recall"], "window_f1": wm["f1"],
            "roc_auc": roc_auc(labels[scored], scores[scored]), "pr_auc": pr_auc(labels[scored], scores[scored])}


def _alert_counts(s: EvalSeries, rows: slice) -> dict[str, Any]:
    """``flagged``: rows over the threshold; ``alerts``: the alert events the daemon's alert policy would raise on
    them (runs of flagged windows, see `alert_events`), with that policy's ``for_windows`` and ``recover_windows``
    (the ``[alerts]`` defaults, or the config's with ``--format influx``)."""
    from ..config import AlertsConfig

    flags = s.scores[rows] > s.threshold
    errors = s.errors[rows]
    scored = np.isfinite(errors) if errors.ndim == 1 and errors.shape == flags.shape else None
    if scored is not None:
        flags &= scored  # a missing-data window (no max_error) is never flagged
    for_w = int(s.info.get("for_windows", AlertsConfig.for_windows))
    recover_w = int(s.info.get("recover_windows", AlertsConfig.recover_windows))
    return {"flagged": int(np.count_nonzero(flags)), "alerts": len(alert_events(flags, for_w, recover_w, scored))}


def _nab_single(s: EvalSeries) -> NabCorpus:
    """A one-file NAB corpus over row numbers, with the series' labelled segments as windows."""
    n = s.scores.shape[0]
    return NabCorpus({s.name: NabFile(s.name, np.arange(n), tuple(s.segments))})


def _evaluate(series: list[EvalSeries], args: Any, corpus: NabCorpus | None) -> dict[str, Any]:
    """Tune (optionally), then fill each series' metrics; return the corpus-level summary."""
    summary: dict[str, Any] = {"tune": args.tune, "validation": args.validation}
    size, delta = args.window_size, args.delta
    if size < 1 or delta < 0:
        raise ValueError(f"--window-size {size} must be >= 1 and --delta {delta} >= 0")
    if args.threshold is not None:
        for s in series:
            s.threshold = float(args.threshold)
    nab_tuned: dict[str, float] = {}
    if args.tune.startswith("nab-"):
        profile = args.tune.removeprefix("nab-")
        if args.validation > 0:
            raise ValueError("--validation applies to the F1 tunings; NAB tuning uses the whole corpus, as NAB does")
        tuned_corpus = corpus
        if tuned_corpus is None:
            if len(series) != 1 or not series[0].segments:
                raise ValueError(f"--tune {args.tune} needs labelled windows: a NAB folder, or a CSV with a label "
                                 "column holding at least one 1")
            tuned_corpus = _nab_single(series[0])
        scores = {s.name: np.where(np.arange(s.scores.size) < s.n_train, np.nan, s.scores) for s in series}
        thr, normalised, _raw = best_nab_threshold(tuned_corpus, scores, profile)
        tau = float(np.nextafter(thr, -np.inf)) if math.isfinite(thr) else math.inf  # >= thr  <=>  > tau
        for s in series:
            s.threshold = tau
        nab_tuned = {"profile": profile, "threshold": tau, "normalised": normalised}
        summary["tuned"] = nab_tuned
    for s in series:
        if s.labels is None:
            if args.tune != "none":
                raise _UsageError(f"--tune {args.tune} needs labels, and {s.name} has no label column; add "
                                  "'label' (0/1) to the CSV")
            s.metrics = {"threshold": s.threshold, "rows": int(s.scores.size - s.n_train),
                         **_alert_counts(s, slice(s.n_train, s.scores.size))}
            continue
        tune_rows, report_rows = _split_rows(s, args.validation)
        if args.tune in _F1_KIND:
            kind = _F1_KIND[args.tune]
            lab, sc = s.labels[tune_rows], s.scores[tune_rows]
            if not lab.any():
                raise ValueError(f"{s.name}: the tuning rows hold no labelled anomaly; lower --validation or give "
                                 "labels")
            tau, d, f1 = best_f1_threshold(lab, sc, kind, size=size)
            s.threshold, delta_s = tau, d if kind == "window" else delta
            s.metrics["tuned_f1"] = f1
        else:
            delta_s = delta
        lab, sc = s.labels[report_rows], s.scores[report_rows]
        s.metrics.update(_f1_block(lab, sc, s.threshold, size, delta_s))
        s.metrics.update({"threshold": s.threshold, "delta": delta_s, "rows": int(lab.size),
                          "labelled_rows": int(np.count_nonzero(lab)), "segments": len(s.segments),
                          **_alert_counts(s, report_rows)})
    # NAB scores at the operating thresholds and with NAB's own per-profile optimisation.
    nab_corpus = corpus
    if nab_corpus is None and len(series) == 1 and series[0].segments and series[0].labels is not None:
        nab_corpus = _nab_single(series[0])
    if nab_corpus is not None and len({s.threshold for s in series}) == 1:
        scores = {s.name: np.where(np.arange(s.scores.size) < s.n_train, np.nan, s.scores) for s in series}
        tau = series[0].threshold
        nab: dict[str, Any] = {"threshold": tau}
        per_file: dict[str, NabFileResult] = {}
        for profile in NAB_PROFILES:
            at = float(np.nextafter(tau, np.inf)) if math.isfinite(tau) else math.inf
            normalised, raw, files = nab_score(nab_corpus, scores, at, profile)
            best_thr, best_norm, _ = best_nab_threshold(nab_corpus, scores, profile)
            nab[profile] = {"score": normalised, "raw": raw, "optimised_threshold": best_thr,
                            "optimised_score": best_norm}
            if profile == "standard":
                per_file = files
        for s in series:
            r = per_file.get(s.name)
            if r is not None:
                s.metrics.update({"nab_raw": r.score, "nab_detected": r.detected_windows,
                                  "nab_missed": r.missed_windows, "nab_fp_rows": r.fp})
        summary["nab"] = nab
    ucr = [s for s in series if "ucr_hit_score" in s.info]
    if ucr:
        summary["ucr"] = {"series": len(ucr), **{f"top1_{k}": float(np.mean([s.info[f"ucr_hit_{k}"] for s in ucr]))
                                                 for k in ("score", "error")},
                          **{f"hits_{k}": int(sum(s.info[f"ucr_hit_{k}"] for s in ucr)) for k in ("score", "error")}}
    labelled = [s for s in series if s.labels is not None]
    if labelled:
        keys = ("f1", "pa_f1", "window_f1", "roc_auc", "pr_auc")
        summary["mean"] = {k: float(np.nanmean([s.metrics[k] for s in labelled])) if any(
            math.isfinite(s.metrics[k]) for s in labelled) else math.nan for k in keys}
    return summary


def _fmt(v: Any, width: int) -> str:
    if isinstance(v, float):
        text = "-" if not math.isfinite(v) else f"{v:.3f}" if abs(v) < 1000 else f"{v:.4g}"
    else:
        text = str(v)
    return text.rjust(width)


def format_table(series: Sequence[EvalSeries], summary: Mapping[str, Any]) -> str:
    """Render the per-series metrics and the summary as a plain-text table."""
    has_nab = "nab" in summary
    cols = [("rows", 7), ("segs", 5), ("alerts", 7), ("flagged", 8), ("thresh", 9), ("P", 6), ("R", 6), ("F1", 6),
            ("PA-F1", 6), ("win-F1", 6), ("ROC", 6), ("PR", 6)]
    if has_nab:
        cols += [("NAB", 6), ("det", 4), ("miss", 4)]
    keys = {"rows": "rows", "segs": "segments", "alerts": "alerts", "flagged": "flagged", "thresh": "threshold",
            "P": "precision",
            "R": "recall", "F1": "f1", "PA-F1": "pa_f1", "win-F1": "window_f1", "ROC": "roc_auc", "PR": "pr_auc",
            "NAB": "nab_raw", "det": "nab_detected", "miss": "nab_missed"}
    name_w = max([len("series"), *(len(s.name) for s in series)])
    lines = ["series".ljust(name_w) + "".join(_fmt(c, w + 1) for c, w in cols)]
    lines.append("-" * len(lines[0]))
    for s in series:
        lines.append(s.name.ljust(name_w) + "".join(_fmt(s.metrics.get(keys[c], ""), w + 1) for c, w in cols))
    if "mean" in summary:
        m = summary["mean"]
        lines.append(f"mean over series: F1 {m['f1']:.3f}  PA-F1 {m['pa_f1']:.3f}  window-F1 {m['window_f1']:.3f}  "
                     f"ROC-AUC {m['roc_auc']:.3f}  PR-AUC {m['pr_auc']:.3f}")
    if has_nab:
        nab = summary["nab"]
        at = "; ".join(f"{p} {nab[p]['score']:.2f}" for p in NAB_PROFILES)
        lines.append(f"NAB normalised score at the operating threshold (score > {nab['threshold']:.4g}, what the "
                     f"daemon flags): {at}")
        best = "; ".join(f"{p} {nab[p]['optimised_score']:.2f} (score >= {nab[p]['optimised_threshold']:.4g})"
                         for p in NAB_PROFILES)
        lines.append(f"NAB normalised score at NAB's optimised threshold per profile (tuned on these labels, "
                     f"optimistic): {best}")
    if "ucr" in summary:
        u = summary["ucr"]
        lines.append(f"UCR top-1 within 100 rows of the anomaly: score {u['hits_score']}/{u['series']} "
                     f"({u['top1_score']:.3f}), the score's input (error) {u['hits_error']}/{u['series']} "
                     f"({u['top1_error']:.3f})")
    if "tuned" in summary:
        lines.append(f"tuned ({summary['tune']}): {summary['tuned']}")
    return "\n".join(lines)


def _jsonable(value: Any) -> Any:
    if isinstance(value, float):
        return value if math.isfinite(value) else None
    if isinstance(value, (np.floating, np.integer)):
        return _jsonable(value.item())
    if isinstance(value, Mapping):
        return {str(k): _jsonable(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_jsonable(v) for v in value]
    if isinstance(value, np.ndarray):
        return None  # arrays stay out of the report
    if isinstance(value, Path):
        return str(value)
    return value


# -- plots ----------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class PlotEvent:
    """A labelled segment that was missed, or a false alarm, chosen for a plot."""

    kind: Literal["miss", "false-alarm", "alert"]
    series: str
    start: int
    end: int
    badness: float  # higher is worse: threshold over peak score for misses, peak over threshold for alarms
    error_ratio: float = 0.0  # peak error over the error threshold (breaks ties: range-rule alarms all score 1)


def find_plot_events(series: Sequence[EvalSeries], n: int) -> list[PlotEvent]:
    """The ``n`` worst misses (labelled segments without a flag, lowest peak score first) and the ``n`` worst
    false alarms (flagged runs outside every segment, highest peak score first) over all series; without
    labels the flagged runs are plain alerts.

    A flag within ``window - 1`` rows after a segment is not a false alarm: the window ending there still holds
    the segment's last row.

    Examples
    --------
    >>> s = EvalSeries("a", np.zeros(10), np.array([0, 0, .2, 0, 0, .9, 0, 0, 0, 0.]), np.zeros(10),
    ...                np.array([0, 1, 1, 1, 0, 0, 0, 0, 0, 0], bool), 0, 0.5, [(1, 3)])
    >>> [(e.kind, e.start, e.end) for e in find_plot_events([s], 3)]
    [('miss', 1, 3), ('false-alarm', 5, 5)]
    """
    misses: list[PlotEvent] = []
    alarms: list[PlotEvent] = []
    for s in series:
        sc = np.where(np.arange(s.scores.size) < s.n_train, np.nan, s.scores)
        inside = np.zeros(sc.size, dtype=bool)
        tail = int(s.info.get("window", 1)) - 1  # rows whose window still holds the segment's last row
        for a, b in s.segments:
            inside[a : b + 1 + tail] = True
            seg = sc[a : b + 1]
            if seg.size and not np.any(seg > s.threshold):
                peak = float(np.nanmax(seg)) if np.isfinite(seg).any() else 0.0
                if b >= s.n_train:
                    misses.append(PlotEvent("miss", s.name, a, b, s.threshold / max(peak, 1e-12)))
        flags = (sc > s.threshold) & ~inside
        gap = int(s.info.get("window", 32))
        rows = np.flatnonzero(flags)
        if rows.size:
            breaks = np.flatnonzero(np.diff(rows) > gap) + 1
            for run in np.split(rows, breaks):
                peak = float(np.nanmax(sc[run]))
                err = s.errors[run[0] : run[-1] + 1]
                ratio = (float(np.nanmax(err)) / s.error_threshold if s.error_threshold and np.isfinite(err).any()
                         else 0.0)
                kind: Literal["false-alarm", "alert"] = "false-alarm" if s.labels is not None else "alert"
                alarms.append(PlotEvent(kind, s.name, int(run[0]), int(run[-1]),
                                        peak / max(abs(s.threshold), 1e-12), ratio))
    misses.sort(key=lambda e: -e.badness)
    alarms.sort(key=lambda e: (-e.badness, -e.error_ratio))
    return misses[:n] + alarms[:n]


def plot_event(s: EvalSeries, event: PlotEvent, path: Path) -> Path:
    """Plot one event in the reference blog's style (Agg backend, PNG).

    Top: the original series and its reconstruction (for SMD: the three metrics that contribute most).
    Middle: the reconstruction error, with its threshold when the operating threshold is on the error.
    Bottom: the normalised score with the operating threshold (left out when the score is the error).
    Labelled segments are shaded in every panel; the training part is greyed.
    """
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    n = s.scores.size
    span = event.end - event.start + 1
    pad = max(3 * int(s.info.get("window", 32)), span, 50)
    lo, hi = max(0, event.start - pad), min(n, event.end + pad + 1)
    x = np.arange(lo, hi)
    score_is_error = s.scores is s.errors
    panels = 2 if score_is_error else 3
    fig, axes = plt.subplots(panels, 1, figsize=(11, 2.4 * panels + 0.6), sharex=True)
    top = axes[0]
    if s.values.ndim == 1:
        top.plot(x, s.values[lo:hi], lw=0.9, label="original")
        if s.reconstruction is not None:
            top.plot(x, s.reconstruction[lo:hi], lw=0.9, label="reconstruction")
    else:
        ms = s.info.get("metric_scores")
        if isinstance(ms, np.ndarray):
            best = np.argsort(-np.nanmax(ms[event.start : event.end + 1], axis=0))[:3]
        else:
            best = np.arange(min(3, s.values.shape[1]))
        for j in best:
            top.plot(x, s.values[lo:hi, j], lw=0.9, label=f"metric {j + 1}")
    top.legend(loc="upper left", fontsize=8)
    top.set_title(f"{event.kind}: {s.name}, rows {event.start}-{event.end}")
    err_ax = axes[1]
    err_ax.plot(x, s.errors[lo:hi], lw=0.9, color="tab:red", label="reconstruction error")
    thr_err = s.threshold if score_is_error else s.error_threshold
    if thr_err is not None and math.isfinite(thr_err):
        err_ax.axhline(thr_err, color="k", ls="--", lw=0.8,
                       label="threshold" if score_is_error else "training threshold")
    err_ax.legend(loc="upper left", fontsize=8)
    if not score_is_error:
        axes[2].plot(x, s.scores[lo:hi], lw=0.9, color="tab:purple", label="score")
        if math.isfinite(s.threshold):
            axes[2].axhline(s.threshold, color="k", ls="--", lw=0.8, label="threshold")
        axes[2].set_ylim(-0.02, 1.05)
        axes[2].legend(loc="upper left", fontsize=8)
    for ax in axes:
        for a, b in s.segments:
            if b >= lo and a < hi:
                ax.axvspan(max(a, lo), min(b, hi - 1), color="tab:orange", alpha=0.2, lw=0)
        if s.n_train > lo:
            ax.axvspan(lo, min(s.n_train, hi - 1), color="grey", alpha=0.15, lw=0)
    axes[-1].set_xlabel("row")
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=90)
    plt.close(fig)
    return path


def _no_plots_reason(series: Sequence[EvalSeries]) -> str:
    """Why `find_plot_events` found nothing to plot, for the ``wrote 0 plots`` line."""
    if all(s.labels is None for s in series):
        return (": no labels, so no miss or false alarm to plot, and no row was flagged, so no alert either "
                "(add a label column / --labels, or lower --threshold)")
    return (": no miss (every labelled segment after the training rows has a flagged row) and no false alarm "
            "(no row flagged outside the segments)")


def _safe(name: str) -> str:
    return "".join(c if c.isalnum() or c in "-_." else "_" for c in name).strip("_")


# -- entry point ------------------------------------------------------------------------------------------


def run(args: argparse.Namespace) -> int:
    """Run ``anomalyd evaluate`` with the options of `add_arguments`; return the exit status.

    Trains the default causal detector on each series' training part (or scores with ``--model``), applies
    the operating or tuned threshold, prints the table, and writes JSON, plots and the tuned threshold as
    asked. Problems with the input are reported on stderr with exit status 1 (2 for bad option combinations).
    """
    import sys

    try:
        return _run(args)
    except _UsageError as exc:
        print(f"anomalyd evaluate: {exc}", file=sys.stderr)
        return 2
    except (OSError, ValueError) as exc:
        log.debug("evaluate failed", exc_info=True)
        print(f"anomalyd evaluate: {exc}", file=sys.stderr)
        return 1


def _run(args: argparse.Namespace) -> int:
    import time

    started = time.perf_counter()
    fmt = _resolve_format(args)
    if args.model is not None and fmt not in ("csv", "influx"):
        raise _UsageError("--model scores one CSV series or an InfluxDB range; NAB and SMD folders are evaluated "
                          "with the default detector trained on each file's training part")
    if args.write_threshold and (args.model is None or args.tune == "none"):
        raise _UsageError("--write-threshold needs --model PATH and --tune: only a threshold tuned on the stored "
                          "model's own max_error means the same thing to the daemon")
    if not 0.0 <= args.validation < 1.0:
        raise _UsageError(f"--validation {args.validation} must be in [0, 1)")
    if args.n_plots < 0:
        raise _UsageError(f"--n-plots {args.n_plots} must be >= 0")
    cfg = _detector_spec(args)
    corpus: NabCorpus | None = None
    input_desc = str(args.input)
    stored_models = args.model is not None
    if fmt == "influx":
        series, input_desc, stored_models = _load_influx_series(args, cfg)
    elif fmt == "csv":
        series = _load_csv_series(args, cfg)
    elif fmt == "nab":
        series, corpus = _load_nab_series(args, cfg)
    elif fmt == "smd":
        series = _load_smd_series(args, cfg)
    elif fmt == "ucr":
        series = _load_ucr_series(args, cfg)
    else:  # pragma: no cover - argparse restricts the choices
        raise _UsageError(f"--format {fmt!r} is not one of {', '.join(FORMATS)}")
    summary = _evaluate(series, args, corpus)
    print(format_table(series, summary))
    plots: list[str] = []
    if args.plots is not None and args.n_plots > 0:
        by_name = {s.name: s for s in series}
        counts = {"miss": 0, "false-alarm": 0, "alert": 0}
        for event in find_plot_events(series, args.n_plots):
            counts[event.kind] += 1
            path = args.plots / f"{event.kind}-{counts[event.kind]:02d}-{_safe(event.series)}-{event.start}.png"
            plots.append(str(plot_event(by_name[event.series], event, path)))
        print(f"wrote {len(plots)} plots to {args.plots}{_no_plots_reason(series) if not plots else ''}")
    if args.write_threshold:
        from ..service.catalog import set_threshold

        if len({s.threshold for s in series}) != 1:
            raise ValueError(f"--write-threshold: the {len(series)} series got different tuned thresholds; tune "
                             "one threshold for all of them with --tune nab-standard, or evaluate one series")
        tau = series[0].threshold
        if not math.isfinite(tau):
            raise ValueError(f"the tuned threshold is {tau}: flagging nothing scored best, so nothing was written "
                             f"to {args.model}")
        # evaluate flags score > tau; the daemon flags score >= its level: the next float up is the same decision.
        set_threshold(args.model, float(np.nextafter(tau, np.inf)), f"anomalyd evaluate --tune {args.tune} on "
                      f"{input_desc}")
        print(f"wrote threshold {tau:.6g} (tuned: {args.tune}) to {args.model}")
    if args.json is not None:
        report = {
            "input": input_desc, "format": fmt,
            "detector": "stored model" if stored_models else cfg.to_dict(),
            "summary": summary,
            "series": [{"name": s.name, "n_rows": int(s.scores.size), "n_train": s.n_train, **s.info,
                        **s.metrics} for s in series],
            "plots": plots,
            "seconds": time.perf_counter() - started,
        }
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps(_jsonable(report), indent=2) + "\n")
        print(f"wrote {args.json}")
    return 0
