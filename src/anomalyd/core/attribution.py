"""Attribution quality: which fields explain an anomaly, scored against labelled fields (pure numpy).

The Server Machine Dataset (SMD) ships, per machine, ``interpretation_label/machine-<id>.txt``: one line per
labelled anomaly segment, ``start-end:m,m,...`` with the test rows ``[start, end)`` (0-based, half-open: the
segments coincide exactly with the runs of 1 in ``machine-<id>_test_label.npy``) and the metrics that explain
it, 1-based (1..38). `parse_interpretation` turns them into `Segment` records with 0-based metric indices.

The score is OmniAnomaly's (Su et al., KDD 2019) **HitRate@P%**: for an anomaly whose labelled metrics are
``GT`` and a ranking of all metrics by attribution (largest first),

    HitRate@P% = |GT ∩ top ⌊P% * |GT|⌋ ranked metrics| / |GT|

(`hit_rate`), with P = 100 and 150. OmniAnomaly ranks the metrics of each anomalous *point* (row) by that row's
reconstruction probability and averages over points; here the attribution of a row is each field's share of the
window that ends on it (``WindowBatch.field_weight`` divided by its sum, as the daemon writes it into the
``anomaly_attribution`` measurement; `field_shares`). Three ways to turn a segment's rows into one figure
(`segment_hit_rates`, ``how``):

``"rows"`` (the default, the per-point definition)
    every row of the segment ranks the fields by its own attribution; the segment's figure is the mean of its
    rows' HitRates. Averaging over segments (not rows) keeps one 400-row anomaly from outweighing twenty short
    ones; `row_hit_rates` gives the rows themselves for a per-point mean.
``"mean"``
    one ranking per segment, by the mean over its rows of each field's share.
``"peak"``
    one ranking per segment, at its row of the highest ``row_score`` (e.g. the window's score or error).

Rows without an attribution (no finite field score) are left out; a segment with none has NaN.

**Which windows explain a segment.** The daemon stamps a window with its last sample's time, and the detector's
windows are sin²-tapered: the window ending on row ``t`` weighs the rows around ``t - window/2`` most and its newest
rows hardly at all. The windows ending inside a short segment therefore see little of it; the windows centred on it
end ``window // 2`` rows later. `shift_segments` moves the segments by that lag, so a benchmark can report both
(the windows as stamped, and the windows centred on the segment).
"""

from __future__ import annotations

import math
import re
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from numpy.typing import ArrayLike, NDArray

__all__ = [
    "HOWS",
    "Segment",
    "field_shares",
    "hit_rate",
    "load_interpretation",
    "parse_interpretation",
    "rank_fields",
    "row_hit_rates",
    "segment_hit_rates",
    "shift_segments",
    "summarise",
    "trailing_zscore",
]

HOWS = ("rows", "mean", "peak")
_LINE = re.compile(r"^\s*(\d+)\s*-\s*(\d+)\s*:\s*(\d+(?:\s*,\s*\d+)*)\s*$")


@dataclass(frozen=True)
class Segment:
    """One labelled anomaly: test rows ``[start, end)`` and the 0-based indices of the fields that explain it."""

    start: int
    end: int
    fields: tuple[int, ...]


def parse_interpretation(text: str, n_fields: int | None = None) -> list[Segment]:
    """Parse an SMD ``interpretation_label`` file: ``start-end:m,m,...`` per line (rows ``[start, end)``,
    metrics 1-based), blank lines ignored; metric numbers become 0-based field indices.

    Raises ValueError on a malformed line, an empty or reversed range, metric 0, or (with ``n_fields``) a
    metric above ``n_fields``.

    Examples
    --------
    >>> parse_interpretation("15849-16368:1,9,10\\n\\n3-5:38\\n")
    [Segment(start=15849, end=16368, fields=(0, 8, 9)), Segment(start=3, end=5, fields=(37,))]
    >>> parse_interpretation("3-5:39", n_fields=38)
    Traceback (most recent call last):
    ...
    ValueError: line 1: metric 39 is outside 1..38 (metrics are 1-based): '3-5:39'
    """
    out: list[Segment] = []
    for i, line in enumerate(text.splitlines(), start=1):
        if not line.strip():
            continue
        m = _LINE.match(line)
        if m is None:
            raise ValueError(f"line {i}: expected 'start-end:m,m,...', got {line!r}")
        start, end = int(m.group(1)), int(m.group(2))
        metrics = [int(x) for x in m.group(3).split(",")]
        if end <= start:
            raise ValueError(f"line {i}: empty row range {start}-{end} (rows are [start, end)): {line!r}")
        top = n_fields if n_fields is not None else math.inf
        bad = [x for x in metrics if not 1 <= x <= top]
        if bad:
            span = f"1..{n_fields}" if n_fields is not None else "1 and above"
            raise ValueError(f"line {i}: metric {bad[0]} is outside {span} (metrics are 1-based): {line!r}")
        out.append(Segment(start, end, tuple(sorted({x - 1 for x in metrics}))))
    return out


def load_interpretation(path: Path | str, n_fields: int | None = None) -> list[Segment]:
    """`parse_interpretation` of a file."""
    return parse_interpretation(Path(path).read_text(), n_fields)


def field_shares(field_error: ArrayLike) -> NDArray[np.float64]:
    """Each field's share of its row's error: ``error / sum(errors)`` over the last axis (NaN errors count as
    absent). Rows with no finite error, or errors summing to 0, are all NaN.

    Examples
    --------
    >>> field_shares([[1.0, 3.0], [np.nan, 2.0], [0.0, 0.0]]).tolist()
    [[0.25, 0.75], [nan, 1.0], [nan, nan]]
    """
    e = np.asarray(field_error, dtype=np.float64)
    with np.errstate(invalid="ignore", divide="ignore"):
        total = np.nansum(e, axis=-1, keepdims=True)
        out = e / total
    out[~np.isfinite(out)] = np.nan
    out[np.broadcast_to(~(total > 0), out.shape)] = np.nan
    return out


def explain(field_weight: ArrayLike, field_sign: ArrayLike, field_excess: ArrayLike | None = None) -> tuple[
        NDArray[np.float64], NDArray[np.float64], NDArray[np.intp]]:
    """What the daemon writes as a window's attribution (`anomalyd.service.worker`): each field's share, direction
    and the top field, for windows of several fields (any leading shape, fields last).

    The share is the field's weight (``WindowBatch.field_weight``: its movement within the window, or its error;
    `DetectorSpec.attribution`) over the sum of the present fields' weights, with 4 decimals (all zero: the
    present fields share equally). A window where some field left the range seen so far (``field_excess`` not 0:
    the out-of-range rule scored it 1, whatever its error) is explained by those fields instead, in proportion to
    how far out they are, and their direction is the side they left by. The top field is the largest share (ties:
    the first).

    Examples
    --------
    >>> share, sign, top = explain([[1.0, 3.0], [1.0, 3.0]], [[1, -1], [1, -1]], [[0.0, 0.0], [-0.5, 0.0]])
    >>> share.tolist(), sign.tolist(), top.tolist()
    ([[0.25, 0.75], [1.0, 0.0]], [[1.0, -1.0], [-1.0, -1.0]], [1, 0])
    """
    err = np.asarray(field_weight, dtype=np.float64)
    sign = np.asarray(field_sign, dtype=np.float64)
    weight = err
    if field_excess is not None:
        excess = np.asarray(field_excess, dtype=np.float64)
        ranged = (excess != 0).any(axis=-1, keepdims=True)
        if ranged.any():
            weight = np.where(ranged, np.where(np.isnan(err), np.nan, np.abs(excess)), err)
            sign = np.where(ranged & (excess != 0), np.sign(excess), sign)
    total = np.nansum(weight, axis=-1, keepdims=True)
    with np.errstate(invalid="ignore", divide="ignore"):
        even = np.where(np.isnan(weight), np.nan, 1.0 / np.isfinite(weight).sum(axis=-1, keepdims=True))
        share = np.where(total > 0, weight / np.where(total > 0, total, 1.0), even)
    share = np.asarray(np.round(share, 4), dtype=np.float64)
    top = np.asarray(np.nan_to_num(weight, nan=-1.0).argmax(axis=-1), dtype=np.intp)
    return share, sign, top


def rank_fields(scores: ArrayLike) -> NDArray[np.intp]:
    """Field indices by score, largest first; ties keep index order; NaN fields come last.

    Examples
    --------
    >>> rank_fields([0.1, np.nan, 0.5, 0.1]).tolist()
    [2, 0, 3, 1]
    """
    s = np.asarray(scores, dtype=np.float64)
    key = np.where(np.isnan(s), -np.inf, -s)
    order = np.argsort(key, kind="stable")
    # NaN after every finite score, even -inf ones
    return np.concatenate((order[~np.isnan(s[order])], order[np.isnan(s[order])]))


def hit_rate(scores: ArrayLike, truth: Sequence[int], p: float = 100) -> float:
    """OmniAnomaly's HitRate@P%: the share of the labelled fields ``truth`` among the top ``⌊P% * |truth|⌋``
    fields by ``scores`` (largest first, `rank_fields`).

    Examples
    --------
    Labelled fields 1 and 3; fields by score: 3, 0, 1, 2. The top 2 hold one of them, the top 3 both:

    >>> hit_rate([0.3, 0.2, 0.1, 0.4], [1, 3], p=100), hit_rate([0.3, 0.2, 0.1, 0.4], [1, 3], p=150)
    (0.5, 1.0)

    One labelled field: ⌊1.5 * 1⌋ = 1, so @150% is @100%:

    >>> hit_rate([0.1, 0.9], [0], p=150)
    0.0
    """
    gt = set(int(x) for x in truth)
    if not gt:
        raise ValueError("no labelled fields: HitRate is undefined")
    k = math.floor(p / 100 * len(gt) + 1e-9)
    top = set(rank_fields(scores)[:k].tolist())
    return len(gt & top) / len(gt)


def _check(field_scores: ArrayLike, segments: Sequence[Segment]) -> NDArray[np.float64]:
    s = np.asarray(field_scores, dtype=np.float64)
    if s.ndim != 2:
        raise ValueError(f"field scores must be (rows, fields), got shape {s.shape}")
    for g in segments:
        if g.end > s.shape[0] or (g.fields and max(g.fields) >= s.shape[1]):
            raise ValueError(f"segment rows [{g.start}, {g.end}) fields {g.fields} outside the scores' shape "
                             f"{s.shape}")
    return s


def row_hit_rates(field_scores: ArrayLike, segments: Sequence[Segment], p: float = 100,
                  rows: ArrayLike | None = None) -> tuple[NDArray[np.intp], NDArray[np.intp], NDArray[np.float64]]:
    """Per row of every segment, the HitRate of that row's own ranking.

    ``rows`` (bool per row) keeps only those rows, e.g. the detected ones; rows with no finite score are left out.

    Returns
    -------
    segment, row : ndarray of int
        The segment's index (in ``segments``) and the row of each figure.
    hit : ndarray of float
        HitRate@P% of the row.

    Examples
    --------
    >>> sc = np.array([[0.9, 0.1], [0.2, 0.8], [np.nan, np.nan]])
    >>> seg, row, hit = row_hit_rates(sc, [Segment(0, 3, (1,))])
    >>> row.tolist(), hit.tolist()
    ([0, 1], [0.0, 1.0])
    """
    s = _check(field_scores, segments)
    keep = np.ones(s.shape[0], dtype=bool) if rows is None else np.asarray(rows, dtype=bool)
    seg_i, row_i, hits = [], [], []
    for i, g in enumerate(segments):
        for r in range(g.start, g.end):
            if keep[r] and np.isfinite(s[r]).any():
                seg_i.append(i)
                row_i.append(r)
                hits.append(hit_rate(s[r], g.fields, p))
    return (np.asarray(seg_i, dtype=np.intp), np.asarray(row_i, dtype=np.intp), np.asarray(hits, dtype=np.float64))


def segment_hit_rates(field_scores: ArrayLike, segments: Sequence[Segment], p: float = 100, how: str = "rows",
                      row_score: ArrayLike | None = None, rows: ArrayLike | None = None) -> NDArray[np.float64]:
    """HitRate@P% of every segment (NaN when none of its rows has a finite score); ``how`` as in the module
    docstring. ``row_score`` is needed by ``"peak"``; ``rows`` (bool per row) keeps only those rows.

    Examples
    --------
    Two fields, a segment of three rows labelled with field 1:

    >>> sc = np.array([[0.6, 0.4], [0.45, 0.55], [0.3, 0.7], [0.5, 0.5]])
    >>> segs = [Segment(0, 3, (1,))]
    >>> float(segment_hit_rates(sc, segs, how="rows")[0])  # rows 1 and 2 hit, row 0 does not
    0.6666666666666666
    >>> float(segment_hit_rates(sc, segs, how="mean")[0])  # mean shares 0.45 and 0.55
    1.0
    >>> float(segment_hit_rates(sc, segs, how="peak", row_score=[3.0, 1.0, 2.0, 0.0])[0])  # row 0 peaks
    0.0
    """
    if how not in HOWS:
        raise ValueError(f"how={how!r} is not one of {', '.join(HOWS)}")
    s = _check(field_scores, segments)
    keep = np.ones(s.shape[0], dtype=bool) if rows is None else np.asarray(rows, dtype=bool)
    if how == "peak":
        if row_score is None:
            raise ValueError('how="peak" needs row_score')
        rs = np.asarray(row_score, dtype=np.float64)
    out = np.full(len(segments), np.nan)
    for i, g in enumerate(segments):
        r = np.arange(g.start, g.end)
        r = r[keep[r] & np.isfinite(s[r]).any(axis=1)]
        if not r.size:
            continue
        if how == "rows":
            out[i] = float(np.mean([hit_rate(s[j], g.fields, p) for j in r]))
        elif how == "mean":
            out[i] = hit_rate(np.nanmean(field_shares(s[r]), axis=0), g.fields, p)
        else:
            j = r[int(np.argmax(np.nan_to_num(rs[r], nan=-np.inf)))]
            out[i] = hit_rate(s[j], g.fields, p)
    return out


def summarise(field_scores: ArrayLike, segments: Sequence[Segment], ps: Sequence[float] = (100, 150),
              how: str = "rows", row_score: ArrayLike | None = None,
              rows: ArrayLike | None = None) -> dict[str, float]:
    """Mean HitRate over the segments that have one, per P (keys ``"hit@100"``, ``"hit@150"``, ...), plus
    ``"segments"`` (how many had a figure) and ``"points@P"``: the mean over every scored row of the segments
    (OmniAnomaly's per-point average, long segments weighing more).

    Examples
    --------
    >>> sc = np.array([[0.6, 0.4], [0.45, 0.55], [0.3, 0.7], [0.5, 0.5]])
    >>> r = summarise(sc, [Segment(0, 3, (1,)), Segment(3, 4, (0,))], ps=(100,))
    >>> r["hit@100"], r["segments"], r["points@100"]
    (0.8333333333333333, 2.0, 0.75)
    """
    out: dict[str, float] = {}
    for p in ps:
        seg = segment_hit_rates(field_scores, segments, p, how, row_score, rows)
        ok = np.isfinite(seg)
        out[f"hit@{p:g}"] = float(seg[ok].mean()) if ok.any() else math.nan
        out["segments"] = float(ok.sum())
        _, _, hits = row_hit_rates(field_scores, segments, p, rows)
        out[f"points@{p:g}"] = float(hits.mean()) if hits.size else math.nan
    return out


def shift_segments(segments: Sequence[Segment], lag: int, n_rows: int | None = None) -> list[Segment]:
    """The segments moved ``lag`` rows later (the windows whose centre falls in the segment, for ``lag =
    window // 2``), clipped to ``n_rows``; segments left empty are dropped.

    Examples
    --------
    >>> shift_segments([Segment(0, 3, (1,)), Segment(8, 10, (0,))], 2, n_rows=10)
    [Segment(start=2, end=5, fields=(1,))]
    """
    out = []
    for g in segments:
        a, b = g.start + lag, g.end + lag
        if n_rows is not None:
            a, b = min(a, n_rows), min(b, n_rows)
        if b > a:
            out.append(Segment(a, b, g.fields))
    return out


def trailing_zscore(history: ArrayLike, errors: ArrayLike, length: int = 2000,
                    min_rel_std: float = 0.05) -> NDArray[np.float64]:
    """Each field's error against that field's own recent errors: ``max(0, (e_t - mean) / std)`` over the
    ``length`` errors before row ``t`` (causal), ``history`` (e.g. the training hold-out's errors) preceding
    ``errors``. The spread is floored at ``min_rel_std * |mean|`` (and 1e-9), as the score's normaliser floors
    its own. A field whose error is high all the time then stops dominating every window's ranking.

    NaN errors are not supported (pass complete windows).

    Examples
    --------
    >>> hist = np.array([[1.0, 10.0], [3.0, 10.0]])
    >>> trailing_zscore(hist, [[2.0, 30.0], [5.0, 10.0]], length=2).round(3).tolist()
    [[0.0, 40.0], [5.0, 0.0]]
    """
    h = np.asarray(history, dtype=np.float64)
    e = np.asarray(errors, dtype=np.float64)
    if h.ndim != 2 or e.ndim != 2 or h.shape[1] != e.shape[1] or len(h) == 0:
        raise ValueError(f"history {h.shape} and errors {e.shape} must be (rows, fields) with the same fields, "
                         "and history not empty")
    x = np.concatenate((h, e))
    zero = np.zeros((1, x.shape[1]))
    c1 = np.concatenate((zero, np.cumsum(x, axis=0)))
    c2 = np.concatenate((zero, np.cumsum(x * x, axis=0)))
    idx = np.arange(len(h), len(x))
    lo = np.maximum(idx - length, 0)
    cnt = (idx - lo)[:, None]
    mean = (c1[idx] - c1[lo]) / cnt
    std = np.sqrt(np.maximum((c2[idx] - c2[lo]) / cnt - mean**2, 0.0))
    return np.asarray(np.maximum((e - mean) / np.maximum(std, min_rel_std * np.abs(mean) + 1e-9), 0.0))
