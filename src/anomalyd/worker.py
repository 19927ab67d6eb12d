"""One tick: from due windows to written error points, observed alerts and advanced watermarks.

Everything the worker touches (config, store, catalog, watermarks, alerts, clock) is passed in. Per signal, a
tick issues one read (GROUP BY the series tags) covering every due window of every series, scores all windows
that share a model in one vectorised call, and writes all points in one batch.

Windows sit on a fixed grid: a window's last sample is a multiple of ``slide * period`` since the epoch, so the
same window always gets the same output timestamp and re-scoring it overwrites the same point.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Protocol

import numpy as np
from numpy.typing import NDArray

from .catalog import Catalog, StoredModel, model_id_for
from .config import Config, SignalConfig
from .influx import Point, Query, Store
from .metrics import DATA_PROBLEMS, LAG_SECONDS, UNTRAINED_SERIES, WINDOWS
from .model import taper
from .postprocess import NormaliserParams, ScoreNormaliser, update_many
from .records import SeriesKey, Tags, WindowResult, tags_str
from .state import ScoreStates, Watermarks

log = logging.getLogger(__name__)


class AlertObserver(Protocol):
    def observe(self, results: Sequence[WindowResult], now_ns: int | None = None) -> object: ...

    def flush(self, deadline_s: float | None = None) -> int: ...


@dataclass
class SignalReport:
    series: int = 0
    windows: int = 0
    anomalous: int = 0
    missing: int = 0
    untrained: int = 0
    skipped_backlog: int = 0
    lag_s: float = 0.0


@dataclass
class TickReport:
    """What one tick (or one backfill) did, per signal."""

    signals: dict[str, SignalReport] = field(default_factory=dict)
    results: list[WindowResult] = field(default_factory=list)
    seconds: float = 0.0

    @property
    def windows(self) -> int:
        return sum(s.windows for s in self.signals.values())

    @property
    def anomalous(self) -> int:
        return sum(s.anomalous for s in self.signals.values())

    @property
    def missing(self) -> int:
        return sum(s.missing for s in self.signals.values())


@dataclass
class _Aligned:
    """A series on its regular grid: ``values[i]`` is the sample at ``t0 + i * period`` (NaN when absent)."""

    t0: int
    values: NDArray[np.float64]


def align(times: NDArray[np.int64], values: NDArray[np.float64], period_ns: int, t0: int, n: int,
          max_gap: int) -> tuple[_Aligned, dict[str, int]]:
    """Put samples on the grid ``t0 + i * period``; fill gaps of up to ``max_gap`` samples linearly.

    Samples are rounded to the nearest grid point. Out-of-order samples are sorted, duplicates (two samples on
    one grid point) keep the later-written value, non-finite values are dropped; each is counted in the
    returned problems so the caller can report them.

    Examples
    --------
    >>> a, p = align(np.array([0, 10, 40]), np.array([1.0, 2.0, 5.0]), 10, 0, 5, max_gap=2)
    >>> a.values.tolist(), p
    ([1.0, 2.0, 3.0, 4.0, 5.0], {'filled': 2})
    >>> a, p = align(np.array([0, 40]), np.array([1.0, 5.0]), 10, 0, 5, max_gap=2)
    >>> a.values.tolist()
    [1.0, nan, nan, nan, 5.0]
    """
    problems: dict[str, int] = {}
    if len(times) and np.any(np.diff(times) < 0):
        problems["out_of_order"] = int((np.diff(times) < 0).sum())
        order = np.argsort(times, kind="stable")
        times, values = times[order], values[order]
    finite = np.isfinite(values)
    if not finite.all():
        problems["non_finite"] = int((~finite).sum())
        times, values = times[finite], values[finite]
    idx = np.rint((times - t0) / period_ns).astype(np.int64)
    inside = (idx >= 0) & (idx < n)
    idx, values = idx[inside], values[inside]
    off_grid = np.abs(times[inside] - (t0 + idx * period_ns)) > 0
    if off_grid.any():
        problems["off_grid"] = int(off_grid.sum())
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
    return _Aligned(t0, out), problems


def align_many(series: Sequence[tuple[NDArray[np.int64], NDArray[np.float64]]], period_ns: int, t0: int, n: int,
               max_gap: int) -> tuple[NDArray[np.float64], list[dict[str, int]]]:
    """:func:`align` for many series on one grid at once: returns an ``(len(series), n)`` matrix.

    The common case (sorted, finite, on-grid samples without duplicates or short gaps) is handled for all
    series together in a few numpy calls; only series that need repairs go through :func:`align` one by one.

    Examples
    --------
    >>> m, p = align_many([(np.array([0, 10]), np.array([1.0, 2.0])), (np.array([10]), np.array([5.0]))], 10, 0, 2, 0)
    >>> m.tolist(), p
    ([[1.0, 2.0], [nan, 5.0]], [{}, {}])
    """
    out = np.full((len(series), n), np.nan)
    problems: list[dict[str, int]] = [{} for _ in series]
    if not series:
        return out, problems
    lengths = np.fromiter((len(t) for t, _ in series), dtype=np.int64, count=len(series))
    times = np.concatenate([t for t, _ in series]) if lengths.sum() else np.empty(0, np.int64)
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
        has_hole = holes.any(axis=1) & ~bad
        for r in np.flatnonzero(has_hole):
            present = np.flatnonzero(~holes[r])
            if len(present) >= 2 and np.any((np.diff(present) > 1) & (np.diff(present) <= max_gap + 1)):
                bad[r] = True
    starts = np.concatenate([[0], np.cumsum(lengths)])
    for r in np.flatnonzero(bad):
        a, b = starts[r], starts[r + 1]
        aligned, problems[r] = align(times[a:b], values[a:b], period_ns, t0, n, max_gap)
        out[r] = aligned.values
    return out, problems


@dataclass
class _Batch:
    """Windows of many series that share one model, scored in one call."""

    stored: StoredModel
    rows: list[NDArray[np.float64]] = field(default_factory=list)
    owners: list[tuple[SeriesKey, NDArray[np.int64], NDArray[np.bool_], _Aligned]] = field(default_factory=list)


class Worker:
    """Runs ticks (and backfills) over every configured signal."""

    def __init__(self, cfg: Config, store: Store, catalog: Catalog, watermarks: Watermarks,
                 alerts: AlertObserver | None = None, clock: Callable[[], int] = time.time_ns,
                 scores: ScoreStates | None = None) -> None:
        self.cfg = cfg
        self.store = store
        self.catalog = catalog
        self.watermarks = watermarks
        self.alerts = alerts
        self.clock = clock
        self.scores = scores if scores is not None else ScoreStates(None)
        self._backfill_scores = ScoreStates(None)  # replaced by each score_range: never the live history
        self._reported_untrained: set[str] = set()
        self._reported_mismatch: set[str] = set()

    # -- public entry points ---------------------------------------------------------------------------
    def tick(self, now_ns: int | None = None) -> TickReport:
        """Score every due window since each series' watermark, write, alert, advance the watermarks."""
        t_start = time.perf_counter()
        now = self.clock() if now_ns is None else now_ns
        report = TickReport()
        for sig in self.cfg.signals:
            step = sig.slide * sig.period_ns
            hi = (now - self.cfg.daemon.lateness_ns) // step * step
            report.signals[sig.name] = self._run_signal(sig, None, hi, report, live=True)
        report.seconds = time.perf_counter() - t_start
        self._finish(report, now, live=True)
        return report

    def score_range(self, start_ns: int, end_ns: int, alert: bool = False) -> TickReport:
        """Backfill: score every window whose last sample lies in ``(start_ns, end_ns]`` (same path as tick).

        Watermarks are left alone. The range is processed in chunks of ``daemon.max_backlog_windows`` windows
        so memory stays bounded.
        """
        t_start = time.perf_counter()
        report = TickReport()
        # A backfill scores from each model's warm-up state in memory: it never disturbs the live score history.
        self._backfill_scores = ScoreStates(None)
        for sig in self.cfg.signals:
            step = sig.slide * sig.period_ns
            lo = start_ns // step * step
            hi = end_ns // step * step
            total = SignalReport()
            chunk = self.cfg.daemon.max_backlog_windows * step
            for a in range(lo, hi, chunk):
                part = self._run_signal(sig, a, min(a + chunk, hi), report, live=False)
                for name in ("windows", "anomalous", "missing", "untrained", "skipped_backlog"):
                    setattr(total, name, getattr(total, name) + getattr(part, name))
                total.series = max(total.series, part.series)
            report.signals[sig.name] = total
        report.seconds = time.perf_counter() - t_start
        self._finish(report, self.clock(), live=alert)
        return report

    # -- internals -------------------------------------------------------------------------------------
    def _model_for(self, sig: SignalConfig, tags: Tags) -> StoredModel | None:
        mid = model_id_for(sig.name, tags, sig.scope)
        stored = self.catalog.get(mid)
        if stored is None:
            return None
        p = stored.model
        expected = (sig.window, sig.period_ns)
        if (p.window, stored.period_ns) != expected:
            if mid not in self._reported_mismatch:
                log.error("model %s was trained with window=%d period=%dns but signal %s is configured with "
                          "window=%d period=%dns; retrain with `anomalyd train` or restore the config",
                          mid, p.window, stored.period_ns, sig.name, sig.window, sig.period_ns)
                self._reported_mismatch.add(mid)
            return None
        return stored

    def _run_signal(self, sig: SignalConfig, lo: int | None, hi: int, report: TickReport,
                    live: bool) -> SignalReport:
        """Score windows with last sample in ``(lo, hi]``; ``lo=None`` means: from each series' watermark."""
        rep = SignalReport()
        step = sig.slide * sig.period_ns
        backlog = self.cfg.daemon.max_backlog_windows * step
        floor = hi - backlog
        if lo is None:
            marks = [v for k, v in self.watermarks.items() if k.startswith(sig.name + "|")]
            q_lo = max(min(marks), floor) if marks else floor
        else:
            q_lo = lo
        if q_lo >= hi:
            return rep
        # Context: earlier windows overlapping the first new one, so reconstructions can be stitched.
        n_ctx = -(-sig.window // sig.slide) - 1 if self.cfg.output.write_reconstruction else 0
        span = (sig.window - 1) * sig.period_ns
        read_lo = q_lo - span - n_ctx * step + sig.period_ns
        # Samples are rounded to the nearest grid point: read half a period beyond both ends so that a jittered
        # sample of the first or last grid point is not left out.
        half = sig.period_ns // 2
        data = self.store.read(Query(sig.measurement, sig.field, sig.where, sig.group_by, sig.period_ns),
                               read_lo - half, hi + half)
        batches: dict[str, _Batch] = {}
        untrained = 0
        shared = self._model_for(sig, ()) if sig.scope == "shared" else None
        groups: dict[int, list[tuple[SeriesKey, StoredModel, NDArray[np.int64], NDArray[np.float64]]]] = {}
        for tags, (times, values) in data.items():
            key = SeriesKey(sig.name, tags)
            stored = shared if sig.scope == "shared" else self._model_for(sig, tags)
            if stored is None:
                untrained += 1
                mismatched = model_id_for(sig.name, tags, sig.scope) in self._reported_mismatch
                if key.id not in self._reported_untrained and not mismatched:
                    self._reported_untrained.add(key.id)
                    log.warning("series %s has no model yet (new since training?); skipping it until "
                                "`anomalyd train` covers it", key)
                continue
            if lo is None:
                wm = self.watermarks.get(key.id)
                s_lo = wm if wm is not None else stored.train_end_ns // step * step
                if s_lo < floor:
                    skipped = (floor - s_lo) // step
                    rep.skipped_backlog += skipped
                    log.warning("series %s is %d windows behind, more than daemon.max_backlog_windows=%d; "
                                "skipping the oldest %d windows", key, (hi - s_lo) // step,
                                self.cfg.daemon.max_backlog_windows, skipped)
                    s_lo = floor
            else:
                s_lo = lo
            if s_lo < hi:
                groups.setdefault(s_lo, []).append((key, stored, times, values))
        # Series with the same watermark share one grid and are aligned together.
        for s_lo, members in groups.items():
            ends = np.arange(s_lo + step - n_ctx * step, hi + 1, step, dtype=np.int64)
            emit = ends > s_lo
            t0 = int(ends[0]) - span
            n = int((hi - t0) // sig.period_ns + 1)
            matrix, problems = align_many([(t, v) for _, _, t, v in members], sig.period_ns, t0, n, sig.max_gap)
            wins = np.lib.stride_tricks.sliding_window_view(matrix, sig.window, axis=1)[:, :: sig.slide][:, : len(ends)]
            for r, (key, stored, _, _) in enumerate(members):
                for kind, count in problems[r].items():
                    DATA_PROBLEMS.labels(signal=sig.name, kind=kind).inc(count)
                    if kind != "filled":
                        log.info("series %s: %d %s samples in (%d, %d]", key, count, kind, read_lo, hi)
                batch = batches.setdefault(stored.model_id, _Batch(stored))
                batch.rows.append(wins[r])
                batch.owners.append((key, ends, emit, _Aligned(t0, matrix[r])))
                rep.series += 1
        rep.untrained = untrained
        UNTRAINED_SERIES.labels(signal=sig.name).set(untrained)
        points: list[Point] = []
        recon_points: list[Point] = []
        results: list[WindowResult] = []
        for batch in batches.values():
            self._score_batch(sig, batch, rep, results, points, recon_points,
                              self.scores if live else self._backfill_scores)
        if points:
            self.store.write(points, self.cfg.output.retention_policy)
        if recon_points:
            self.store.write(recon_points, self.cfg.output.retention_policy)
        report.results.extend(results)
        if live:
            for key_id, end in self._new_marks(results).items():
                self.watermarks.advance(key_id, end)
            marks = [v for k, v in self.watermarks.items() if k.startswith(sig.name + "|")]
            rep.lag_s = (self.clock() - min(marks)) / 1e9 if marks else 0.0
            LAG_SECONDS.labels(signal=sig.name).set(rep.lag_s)
        return rep

    @staticmethod
    def _new_marks(results: Sequence[WindowResult]) -> dict[str, int]:
        marks: dict[str, int] = {}
        for r in results:
            if r.end_ns > marks.get(r.key.id, -(2**63)):
                marks[r.key.id] = r.end_ns
        return marks

    def _score_batch(self, sig: SignalConfig, batch: _Batch, rep: SignalReport, results: list[WindowResult],
                     points: list[Point], recon_points: list[Point], score_states: ScoreStates) -> None:
        out = self.cfg.output
        model = batch.stored.model
        allw = np.concatenate(batch.rows) if batch.rows else np.empty((0, sig.window))
        complete = np.asarray(~np.isnan(allw).any(axis=1), dtype=bool)
        errors = np.full(len(allw), np.nan)
        mean_errors = np.full(len(allw), np.nan)
        centroids = np.zeros_like(allw)
        if complete.any():
            nearest, errors[complete], mean_errors[complete] = model.score_stats(allw[complete])
            centroids[complete] = model.cluster_centers_[nearest]
        meta = batch.stored.meta
        scores = self._scores(batch, allw, complete, mean_errors, score_states,
                              meta.get("normaliser") or ScoreNormaliser(
                                  NormaliserParams.for_windows(sig.window, sig.slide, sig.score_history)).to_dict())
        thr = float(model.threshold_)
        tap = taper(sig.window)
        safe_tap = np.where(tap > 0.05, tap, np.nan)
        period = sig.period_ns
        i = 0
        for key, ends, emit, aligned in batch.owners:
            n = len(ends)
            sl = slice(i, i + n)
            i += n
            base_tags: Tags = (("signal", sig.name), ("series", tags_str(key.tags)),
                               ("model", batch.stored.model_id), *key.tags)
            e_s, s_s, ok = errors[sl], scores[sl], complete[sl]
            w_s, c_s = allw[sl], centroids[sl]
            for j in np.flatnonzero(emit):
                end = int(ends[j])
                start = end - (sig.window - 1) * period
                if not ok[j]:
                    n_miss = int(np.isnan(w_s[j]).sum())
                    results.append(WindowResult(key, batch.stored.model_id, start, end, thr, missing=True,
                                                n_missing=n_miss))
                    points.append(Point(out.measurement, base_tags,
                                        (("threshold", thr), ("anomalous", False), ("missing", True),
                                         ("n_missing", n_miss)), end))
                    rep.missing += 1
                    continue
                err, sc = float(e_s[j]), float(s_s[j])
                anomalous = err > thr
                rep.windows += 1
                rep.anomalous += int(anomalous)
                results.append(WindowResult(key, batch.stored.model_id, start, end, thr, max_error=err,
                                            anomalous=anomalous, score=sc, values=w_s[j].copy(),
                                            reconstruction=c_s[j] / safe_tap))
                points.append(Point(out.measurement, base_tags,
                                    (("max_error", err), ("threshold", thr), ("anomalous", anomalous),
                                     ("score", sc), ("missing", False), ("n_missing", 0)), end))
            if out.write_reconstruction:
                self._reconstruction_points(sig, base_tags, ends, emit, ok, c_s, aligned, recon_points)
        WINDOWS.labels(signal=sig.name, result="scored").inc(rep.windows)
        WINDOWS.labels(signal=sig.name, result="anomalous").inc(rep.anomalous)
        WINDOWS.labels(signal=sig.name, result="missing").inc(rep.missing)

    @staticmethod
    def _scores(batch: _Batch, allw: NDArray[np.float64], complete: NDArray[np.bool_],
                mean_errors: NDArray[np.float64], score_states: ScoreStates,
                initial: dict[str, object]) -> NDArray[np.float64]:
        """The ``score`` of every new window of the batch (NaN for missing or context windows).

        The anomaly likelihood of each new window's mean error against its series' own recent history, plus the
        out-of-range rule (`anomalyd.postprocess`), in time order per series. Series with one new window (the
        live tick's usual case) are updated together by `update_many`; a catch-up goes series by series.
        """
        model_tag = str(batch.stored.meta.get("npz_sha256", batch.stored.model_id))
        scores = np.full(len(allw), np.nan)
        errs = np.where(complete, mean_errors, np.nan)
        single: list[tuple[ScoreNormaliser, int]] = []
        i = 0
        for key, ends, emit, _ in batch.owners:
            new = np.flatnonzero(emit) + i
            i += len(ends)
            if not new.size:
                continue
            norm = score_states.get(key.id, model_tag, initial)
            if new.size == 1:
                single.append((norm, int(new[0])))
            else:
                scores[new] = norm.update(errs[new], allw[new])
        if single:
            rows = np.fromiter((r for _, r in single), dtype=np.intp, count=len(single))
            scores[rows] = update_many([n for n, _ in single], errs[rows], allw[rows])
        score_states.touch()
        return scores

    def _reconstruction_points(self, sig: SignalConfig, tags: Tags, ends: NDArray[np.int64],
                               emit: NDArray[np.bool_], ok: NDArray[np.bool_], centroids: NDArray[np.float64],
                               aligned: _Aligned, out: list[Point]) -> None:
        """Overlap-add the windows' centroids and write, for each new window, its first ``slide`` samples.

        Those samples are covered only by this window and earlier ones, so their reconstruction is final.
        """
        period, w, s = sig.period_ns, sig.window, sig.slide
        n = len(aligned.values)
        acc = np.zeros(n)
        wsum = np.zeros(n)
        tap = taper(w)
        for j in range(len(ends)):
            if not ok[j]:
                continue
            a = int((ends[j] - (w - 1) * period - aligned.t0) // period)
            acc[a : a + w] += centroids[j]
            wsum[a : a + w] += tap
        meas = self.cfg.output.reconstruction_measurement
        for jj in np.flatnonzero(emit & ok):
            first = int((ends[jj] - (w - 1) * period - aligned.t0) // period)
            for k in range(first, first + s):
                v = aligned.values[k]
                if wsum[k] > 0.05 and np.isfinite(v):
                    out.append(Point(meas, tags, (("value", float(v)), ("reconstruction", float(acc[k] / wsum[k]))),
                                     aligned.t0 + k * period))

    def _finish(self, report: TickReport, now: int, live: bool) -> None:
        out = self.cfg.output
        stats = [Point(out.stats_measurement, (("signal", name),),
                       (("lag_seconds", float(r.lag_s)), ("windows", r.windows), ("anomalous", r.anomalous),
                        ("missing", r.missing), ("tick_seconds", float(report.seconds)),
                        ("untrained_series", r.untrained)), now)
                 for name, r in report.signals.items()]
        if live and stats:
            self.store.write(stats, out.retention_policy)
        if live and self.alerts is not None:
            if report.results:
                self.alerts.observe(report.results, now)  # queues durably, then delivers
            else:
                self.alerts.flush()  # drain what an earlier outage left queued
        if live:
            self.watermarks.save()
            self.scores.maybe_save()

    def close(self) -> None:
        """Save what is kept between ticks only in memory (the score history); call on shutdown."""
        self.scores.save()
