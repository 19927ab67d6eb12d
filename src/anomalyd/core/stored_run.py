"""A stored series through the daemon's path, in memory: align, train on the first part, stream the rest (pure).

This is what `anomalyd evaluate` and the benchmarks run for a file. It does exactly what `anomalyd train` and
`anomalyd score` do with the same samples in InfluxDB -- the same grid alignment (`anomalyd.core.grid`), the same
split of the training range into gap-free stretches, the same `anomalyd.core.detector.Detector` fed through its one
streaming entry point -- so its figures are the daemon's (``benchmarks/bench_replay.py`` checks it through a real
InfluxDB).
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
from numpy.typing import NDArray

from .detector import Detector, DetectorSpec, WindowBatch
from .grid import align, align_fields, stretches


@dataclass
class StoredRun:
    """The outcome of `run_stored`.

    ``stamps`` is the output timestamp of each window (the time of its last real sample), one per ``batch``
    column; ``written`` marks the windows the daemon writes a point for (scored, with their last sample there);
    ``t0`` is the grid origin and ``first`` the first scored grid slot.
    """

    detector: Detector
    batch: WindowBatch
    stamps: NDArray[np.int64]
    values: NDArray[np.float64]
    t0: int
    first: int
    period: int

    @property
    def written(self) -> NDArray[np.bool_]:
        return np.asarray(self.batch.scored & self.batch.last_present)


def infer_period(times: NDArray[np.int64]) -> int:
    """The sampling period of a series: the median positive step between its timestamps (ns).

    Examples
    --------
    >>> infer_period(np.array([0, 300, 600, 900, 1500]))
    300
    """
    steps = np.diff(np.unique(np.asarray(times, dtype=np.int64)))
    if steps.size == 0:
        raise ValueError("a series needs at least two distinct timestamps to have a period")
    return int(np.median(steps))


def training_stretches(times: NDArray[np.int64], values: NDArray[np.float64], period_ns: int,
                       max_gap: int) -> tuple[list[NDArray[np.float64]], list[int], dict[str, int]]:
    """Align a training range on its grid and split it at the gaps longer than ``max_gap``.

    Returns the gap-free stretches, the grid index (time / period) of each one's first sample, and the data
    problems found (`anomalyd.core.grid.align`).
    """
    t = np.asarray(times, dtype=np.int64)
    if t.size == 0:
        return [], [], {}
    t0 = int(t.min()) // period_ns * period_ns
    n = int((int(t.max()) - t0 + period_ns // 2) // period_ns) + 1
    aligned, problems = align(t, values, period_ns, t0, n, max_gap)
    parts = stretches(aligned.values)
    return [p for _, p in parts], [t0 // period_ns + a for a, _ in parts], problems


def training_stretches_fields(fields: list[tuple[NDArray[np.int64], NDArray[np.float64]]], period_ns: int,
                              max_gap: int) -> tuple[list[NDArray[np.float64]], list[int], dict[str, int]]:
    """`training_stretches` for a signal of several fields, each with its own timestamps: every field aligned
    on one grid (short gaps filled per field), the rows split wherever any field is missing. The stretches are
    ``(rows, fields)``."""
    if len(fields) == 1:
        return training_stretches(fields[0][0], fields[0][1], period_ns, max_gap)
    present = [t for t, _ in fields if len(t)]
    if len(present) < len(fields):
        return [], [], {}
    t0 = min(int(t.min()) for t in present) // period_ns * period_ns
    n = int((max(int(t.max()) for t in present) - t0 + period_ns // 2) // period_ns) + 1
    cols: list[NDArray[np.float64]] = []
    problems: dict[str, int] = {}
    for t, v in fields:
        aligned, pr = align(np.asarray(t, dtype=np.int64), np.asarray(v, dtype=np.float64), period_ns, t0, n,
                            max_gap)
        cols.append(aligned.values)
        for kind, count in pr.items():
            problems[kind] = problems.get(kind, 0) + count
    parts = stretches(np.stack(cols, axis=1))
    return [p for _, p in parts], [t0 // period_ns + a for a, _ in parts], problems


def output_stamps(aligned_stamps: NDArray[np.int64] | None, t0: int, period_ns: int,
                  slots: NDArray[np.int64]) -> NDArray[np.int64]:
    """The output timestamp of the windows ending at grid ``slots`` (relative to ``t0``): the time of the sample
    on that slot when it was off the grid, else the grid time."""
    if aligned_stamps is None:
        return t0 + slots.astype(np.int64) * period_ns
    return aligned_stamps[slots]


def run_stored(times: NDArray[np.int64], values: NDArray[np.float64] | None, train_end_ns: int,
               spec: DetectorSpec | None = None, period_ns: int | None = None, max_gap: int = 2,
               detector: Detector | None = None,
               fields: list[tuple[NDArray[np.int64], NDArray[np.float64]]] | None = None) -> StoredRun:
    """Train on the samples up to ``train_end_ns`` and score every later window, as train + score would.

    Parameters
    ----------
    times, values : ndarray
        The stored series (epoch ns, any order; duplicates keep the later row, as InfluxDB does).
    train_end_ns : int
        Last timestamp of the training range (inclusive). Windows ending after it are scored.
    spec : DetectorSpec, optional
        The detector's parameters (defaults if omitted).
    period_ns : int, optional
        The grid; `infer_period` if omitted.
    max_gap : int
        Gaps up to this many samples are filled (``signals.max_gap``).
    detector : Detector, optional
        An already fitted detector (a stored model) instead of training one.
    fields : list of (times, values), optional
        A signal of several fields, each with its own timestamps (``times``/``values`` are then ignored): aligned
        and scored as the daemon does (`anomalyd.core.grid.align_fields`); ``values`` becomes ``(rows, fields)``.
    """
    per = fields if fields is not None else [(np.asarray(times, dtype=np.int64), np.asarray(values, dtype=np.float64))]
    per = [(np.asarray(a, dtype=np.int64), np.asarray(b, dtype=np.float64)) for a, b in per]
    t = np.concatenate([a for a, _ in per])
    period = period_ns or infer_period(t)
    if detector is None:
        parts, starts, _ = training_stretches_fields([(a[a <= train_end_ns], b[a <= train_end_ns]) for a, b in per],
                                                     period, max_gap)
        detector = Detector(spec).fit(parts, starts)
    t0 = int(t.min()) // period * period
    n = int((int(t.max()) - t0 + period // 2) // period) + 1
    matrix, _, stamps = align_fields([per], period, t0, n, max_gap)
    aligned = matrix[0]
    first = max(0, (train_end_ns - t0) // period + 1)
    w = detector.window_
    state = detector.start(t0 // period + first, aligned[max(0, first - (w - 1)) : first])
    batch = detector.update(state, aligned[first:])
    slots = np.arange(first, n, dtype=np.int64)
    return StoredRun(detector, batch, output_stamps(stamps.get(0), t0, period, slots), aligned, t0, first, period)


def by_timestamp(run: StoredRun, times: NDArray[np.int64], column: NDArray[np.float64]) -> NDArray[np.float64]:
    """``column`` (a per-window array of ``run.batch``) at each of ``times`` (NaN where no window was written with
    that timestamp): how the points read back from InfluxDB line up with the rows of a file."""
    keep = run.written
    lookup = dict(zip(run.stamps[keep].tolist(), np.asarray(column)[keep].tolist(), strict=True))
    return np.array([lookup.get(int(x), np.nan) for x in np.asarray(times, dtype=np.int64)], dtype=np.float64)
