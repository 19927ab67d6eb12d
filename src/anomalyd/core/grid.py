"""Regular grids: put irregular samples on a series' period grid, fill short gaps, split at long ones (pure).

K-Means over windows needs regularly sampled data. Every path (training, the daemon's tick, a backfill,
`anomalyd evaluate`) aligns samples with these functions, so they all see the same values.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
from numpy.typing import NDArray


@dataclass
class Aligned:
    """A series on its regular grid: ``values[i]`` is the sample at ``t0 + i * period`` (NaN when absent).

    ``stamps`` holds, for grid points whose sample was off the grid, the sample's own timestamp (None when every
    sample sat on its grid point): a window's output point carries the time of its last real sample, so it joins
    the raw data on time.
    """

    t0: int
    values: NDArray[np.float64]
    stamps: NDArray[np.int64] | None = None


def align(times: NDArray[np.int64], values: NDArray[np.float64], period_ns: int, t0: int, n: int,
          max_gap: int) -> tuple[Aligned, dict[str, int]]:
    """Put samples on the grid ``t0 + i * period``; fill gaps of up to ``max_gap`` samples linearly.

    Samples are rounded to the nearest grid point. Out-of-order samples are sorted, duplicates (two samples on
    one grid point) keep the later-written value, non-finite values are dropped; each is counted in the
    returned problems so the caller can report them.

    Examples
    --------
    >>> a, p = align(np.array([0, 10, 40]), np.array([1.0, 2.0, 5.0]), 10, 0, 5, max_gap=2)
    >>> a.values.tolist(), p
    ([1.0, 2.0, 3.0, 4.0, 5.0], {'filled': 2})
    >>> a, p = align(np.array([0, 41]), np.array([1.0, 5.0]), 10, 0, 5, max_gap=2)
    >>> a.values.tolist(), a.stamps.tolist(), p
    ([1.0, nan, nan, nan, 5.0], [0, 10, 20, 30, 41], {'off_grid': 1})
    """
    problems: dict[str, int] = {}
    times = np.asarray(times, dtype=np.int64)
    values = np.asarray(values, dtype=np.float64)
    if len(times) and np.any(np.diff(times) < 0):
        problems["out_of_order"] = int((np.diff(times) < 0).sum())
        order = np.argsort(times, kind="stable")
        times, values = times[order], values[order]
    finite = np.isfinite(values)
    if not finite.all():
        problems["non_finite"] = int((~finite).sum())
        times, values = times[finite], values[finite]
    rel = times - t0
    idx = (rel + period_ns // 2) // period_ns  # nearest grid point, in integer arithmetic
    inside = (idx >= 0) & (idx < n)
    idx, values, times = idx[inside], values[inside], times[inside]
    off = times - (t0 + idx * period_ns)
    stamps = None
    if np.any(off != 0):
        problems["off_grid"] = int(np.count_nonzero(off))
        stamps = t0 + np.arange(n, dtype=np.int64) * period_ns
        stamps[idx] = times  # with duplicates, the later sample (as for the values)
    out = np.full(n, np.nan)
    if len(idx) and np.any(idx[1:] == idx[:-1]):
        problems["duplicate"] = int((idx[1:] == idx[:-1]).sum())
    out[idx] = values  # with duplicates, numpy keeps the last assignment: the later sample
    if max_gap > 0 and len(idx) >= 2:
        present = np.flatnonzero(~np.isnan(out))
        gaps = np.diff(present) - 1
        fill = np.flatnonzero((gaps > 0) & (gaps <= max_gap))
        for g in fill:
            a, b = present[g], present[g + 1]
            out[a + 1 : b] = np.interp(np.arange(a + 1, b), [a, b], [out[a], out[b]])
        if len(fill):
            problems["filled"] = int(gaps[fill].sum())
    return Aligned(t0, out, stamps), problems


def align_many(series: Sequence[tuple[NDArray[np.int64], NDArray[np.float64]]], period_ns: int, t0: int, n: int,
               max_gap: int) -> tuple[NDArray[np.float64], list[dict[str, int]], dict[int, NDArray[np.int64]]]:
    """:func:`align` for many series on one grid at once: an ``(len(series), n)`` matrix.

    The common case (sorted, finite, on-grid samples without duplicates or short gaps) is handled for all
    series together in a few numpy calls; only series that need repairs go through :func:`align` one by one.
    Returns the matrix, each series' problems, and the ``stamps`` of the series that had off-grid samples.

    Examples
    --------
    >>> m, p, s = align_many([(np.array([0, 10]), np.array([1.0, 2.0])), (np.array([10]), np.array([5.0]))],
    ...                      10, 0, 2, 0)
    >>> m.tolist(), p, s
    ([[1.0, 2.0], [nan, 5.0]], [{}, {}], {})
    """
    out = np.full((len(series), n), np.nan)
    problems: list[dict[str, int]] = [{} for _ in series]
    stamps: dict[int, NDArray[np.int64]] = {}
    if not series:
        return out, problems, stamps
    lengths = np.fromiter((len(t) for t, _ in series), dtype=np.int64, count=len(series))
    times = np.concatenate([t for t, _ in series]).astype(np.int64) if lengths.sum() else np.empty(0, np.int64)
    values = np.concatenate([v for _, v in series]) if lengths.sum() else np.empty(0)
    rows = np.repeat(np.arange(len(series)), lengths)
    rel = times - t0
    idx = rel // period_ns
    same_row = rows[1:] == rows[:-1]
    bad = np.zeros(len(series), dtype=bool)
    # Out of order or duplicate (within a row), off the grid, or not finite: repair those series one by one.
    step_bad = same_row & (idx[1:] <= idx[:-1])
    bad[rows[1:][step_bad]] = True
    bad[rows[(rel % period_ns) != 0]] = True
    bad[rows[~np.isfinite(values)]] = True
    inside = (idx >= 0) & (idx < n)
    good = ~bad[rows] & inside
    out[rows[good], idx[good]] = values[good]
    if max_gap > 0:
        # Series with interior gaps short enough to fill also take the careful path.
        holes = np.isnan(out)
        # Only holes between a series' first and last sample can be filled (the common trailing and leading
        # ones cannot): look closer at the series that have such holes.
        present = ~holes
        first = present.argmax(axis=1)
        last = n - 1 - present[:, ::-1].argmax(axis=1)
        cols = np.arange(n)
        inner = holes & (cols >= first[:, None]) & (cols <= last[:, None])
        has_hole = inner.any(axis=1) & ~bad
        for r in np.flatnonzero(has_hole):
            present = np.flatnonzero(~holes[r])
            if len(present) >= 2 and np.any((np.diff(present) > 1) & (np.diff(present) <= max_gap + 1)):
                bad[r] = True
    starts = np.concatenate([[0], np.cumsum(lengths)])
    for r in np.flatnonzero(bad):
        a, b = starts[r], starts[r + 1]
        aligned, problems[r] = align(times[a:b], values[a:b], period_ns, t0, n, max_gap)
        out[r] = aligned.values
        if aligned.stamps is not None:
            stamps[int(r)] = aligned.stamps
    return out, problems, stamps


def align_fields(series: Sequence[Sequence[tuple[NDArray[np.int64], NDArray[np.float64]]]], period_ns: int, t0: int,
                 n: int, max_gap: int) -> tuple[NDArray[np.float64], list[dict[str, int]],
                                                dict[int, NDArray[np.int64]]]:
    """:func:`align_many` for series of one or several fields, each field with its own timestamps.

    ``series[i]`` holds one ``(times, values)`` pair per field. One field: exactly `align_many`, an ``(len(series),
    n)`` matrix. Several: an ``(len(series), n, fields)`` array, each field aligned (and its short gaps filled)
    on its own; the problems are summed per series, and the output stamps are the grid's (fields written at
    different times share no single "time of the last sample").

    Examples
    --------
    >>> m, p, s = align_fields([[(np.array([0, 10]), np.array([1.0, 2.0])), (np.array([10]), np.array([5.0]))]],
    ...                        10, 0, 2, 0)
    >>> m.tolist(), p, s
    ([[[1.0, nan], [2.0, 5.0]]], [{}], {})
    """
    d = len(series[0]) if series else 1
    if d == 1:
        return align_many([f[0] for f in series], period_ns, t0, n, max_gap)
    out = np.full((len(series), n, d), np.nan)
    problems: list[dict[str, int]] = [{} for _ in series]
    for j in range(d):
        m, pj, _ = align_many([f[j] for f in series], period_ns, t0, n, max_gap)
        out[:, :, j] = m
        for r, p in enumerate(pj):
            for kind, count in p.items():
                problems[r][kind] = problems[r].get(kind, 0) + count
    return out, problems, {}


def stretches(x: NDArray[np.float64]) -> list[tuple[int, NDArray[np.float64]]]:
    """The gap-free stretches of an aligned series (rows, or rows x fields): ``(first row, rows)`` each.

    A row is a gap when any of its fields is NaN.

    Examples
    --------
    >>> [(a, s.tolist()) for a, s in stretches(np.array([1.0, 2.0, np.nan, 4.0]))]
    [(0, [1.0, 2.0]), (3, [4.0])]
    """
    holes = np.isnan(x).any(axis=1) if x.ndim == 2 else np.isnan(x)
    if not holes.any():
        return [(0, x)]
    edges = np.flatnonzero(np.diff(np.concatenate([[1], holes.astype(np.int8), [1]])))
    return [(int(a), x[a:b]) for a, b in edges.reshape(-1, 2)]
