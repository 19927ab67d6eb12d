"""The Numenta Anomaly Benchmark score (NAB v1.1), re-implemented from NAB's published scoring rules and vectorised
so that a whole corpus scores in milliseconds; `best_nab_threshold` tunes the threshold as NAB's optimiser does.

Pure: numpy and the standard library, no I/O (NAB's files are read by `anomalyd.evaluation.datasets`).

Conventions
-----------
* NAB flags a row when ``score >= threshold``, as NAB does.
* A NaN score is never flagged.
"""

from __future__ import annotations

import itertools
import math
from collections.abc import Mapping
from dataclasses import dataclass, field
from types import MappingProxyType
from typing import Any

import numpy as np
from numpy.typing import ArrayLike, NDArray

__all__ = [
    "NAB_PROFILES",
    "NabCorpus",
    "NabFile",
    "NabFileResult",
    "NabProfile",
    "best_nab_threshold",
    "nab_probation",
    "nab_score",
]


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


def nab_probation(n: int, fraction: float = 0.15) -> int:
    """Rows in NAB's probationary period: ``min(floor(fraction * n), fraction * 5000)`` (750 at 0.15).

    Examples
    --------
    >>> nab_probation(4032), nab_probation(22695)
    (604, 750)
    """
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
    probation = nab_probation(n, probation_fraction)

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

