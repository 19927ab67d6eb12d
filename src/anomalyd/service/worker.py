"""One tick: from due windows to written points, observed alerts and advanced watermarks.

Everything the worker touches (config, store, catalog, watermarks, alerts, clock) is passed in. Per signal, a
tick issues one read (GROUP BY the series tags) covering every due window of every series, aligns the samples on
the signal's grid (`anomalyd.core.grid`), feeds the new samples of all series that share a model to the detector in
one call (`anomalyd.core.detector.Detector.update_many`, the entry point `anomalyd evaluate` also runs), and writes
all points in one batch.

Windows sit on a fixed grid: a written point covers the windows up to a grid time that is a multiple of
``slide * write_every * period`` since the epoch, so re-scoring the same range overwrites the same points. A point
carries the timestamp of its window's last sample (the grid time when that sample was interpolated), so it joins
the raw data on time. A window whose last sample is missing (before a series' first sample, after its last, inside
an outage) is not written.
"""

from __future__ import annotations

import gc
import glob
import logging
import time
import uuid
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from typing import Protocol

import numpy as np
from numpy.typing import NDArray

from ..config import Config, SignalConfig
from ..core.attribution import explain
from ..core.detector import Detector, DetectorSpec, SeriesState, WindowBatch
from ..core.grid import align_fields
from ..core.normaliser import ScoreNormaliser
from ..core.records import FieldShare, SeriesKey, Tags, WindowResult, parse_tags, rfc3339, share_text, tags_str
from ..core.stored_run import output_stamps
from ..store.base import Point, SeriesPoints, Store, StoreError
from ..store.sources import FieldSamples, SignalData, describe, read_signal, read_signal_batches, signal_reads
from ..telemetry import (
    DATA_PROBLEMS,
    FIELD_REBASELINES,
    LAG_SECONDS,
    SHARD_CONFLICT,
    SIGNAL_FAILED,
    UNSCORED_SERIES,
    UNTRAINED_SERIES,
    WINDOWS,
)
from .catalog import Catalog, StoredModel, apply_live_settings, model_id_for, model_mismatch
from .handover import claimants, last_written, series_keys
from .sharding import Shard
from .state import ScoreStates, Watermarks

log = logging.getLogger(__name__)
_SLICE = 2000  # series scored together before their points go to the store (fewer with several fields, see below)
_LATE_BATCH = 100  # series behind the others read again per query
_OWNED_BATCH = 500  # a sharded replica's series per query (a tag filter of this many alternatives)
_DISCOVER_S = 600.0  # a sharded replica looks for new series this often (SHOW SERIES: the index, no samples)
_ATTRIBUTION_FIELDS = ("share", "error", "direction", "value")
#: The plots and attribution of a series' results when none of its windows is anomalous (read, never written).
_NO_PLOTS: dict[int, tuple[NDArray[np.float64], NDArray[np.float64]]] = {}
_NO_SHARES: dict[int, tuple[FieldShare, ...]] = {}
#: The cyclic garbage collector's first threshold in a scoring process (CPython's default: 700 allocations).
GC_THRESHOLD = 50_000


def tune_gc() -> None:
    """Let the cyclic garbage collector run less often in a process that scores (`anomalyd run`, `score`).

    A tick allocates tens of thousands of short-lived containers, freed by reference counting (none is in a
    cycle), and at the default threshold the collector ran about 45 times in a tick of 10,000 series, one of them
    a full pass over every object the daemon keeps: 50-170 ms of the tick, growing with the number of series
    (measured with `gc.callbacks`, see benchmarks/RESULTS.md). At `GC_THRESHOLD` it runs about once a tick, and
    objects in cycles are still collected.
    """
    g0, g1, g2 = gc.get_threshold()
    gc.set_threshold(max(g0, GC_THRESHOLD), g1, g2)


class AlertObserver(Protocol):
    def observe(self, results: Sequence[WindowResult], now_ns: int | None = None,
                deliver: bool = True) -> object: ...

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
    #: Why nothing of this signal could be scored (no model at all, no series matching), "" when it could.
    problem: str = ""
    #: Why this signal's tick failed (read, write, alert commit or state save), "" when it did not. Its watermarks
    #: did not advance: the same windows are scored again next tick.
    failed: str = ""
    #: Series of this signal that are not being scored, with the reason (no model, mismatched model, no data).
    unscored: dict[str, str] = field(default_factory=dict)
    #: Fields that re-baselined (``rebaseline_after``): series, field, the window's end; said once committed.
    rebased: list[tuple[SeriesKey, str, int]] = field(default_factory=list)


@dataclass(slots=True)
class _SeriesResults:
    """The window results of one series in one tick, column by column; `WindowResult` objects are made only when
    someone asks for them (the alert policy, a report), not for every window of every tick."""

    key: SeriesKey
    model_id: str
    threshold: float
    span_ns: int
    ends: list[int]
    worst_ends: list[int]
    #: A steady series' ``max_error`` and ``score`` are rows (views) of its slice's arrays, and its ``missing`` and
    #: ``n_missing`` lists are shared by the slice: a tick's results hold a few objects per series, not a Python
    #: float per window (they are kept until the tick ends, amid the state that outlives it).
    max_error: list[float] | NDArray[np.float64]
    anomalous: list[bool]
    score: list[float] | NDArray[np.float64]
    missing: list[bool]
    n_missing: list[int]
    plots: dict[int, tuple[NDArray[np.float64], NDArray[np.float64]]]
    #: The series' first sample when it lies within this read (its first windows reach before it).
    data_start_ns: int | None = None
    #: Per anomalous window (as ``plots``): every field by share, largest first.
    attribution: dict[int, tuple[FieldShare, ...]] = field(default_factory=dict)
    #: With several fields, the names of the plot arrays' columns.
    fields: tuple[str, ...] = ()

    def results(self) -> list[WindowResult]:
        out = []
        max_error, score = list(map(float, self.max_error)), list(map(float, self.score))
        for g, end in enumerate(self.ends):
            if self.missing[g]:
                out.append(WindowResult(self.key, self.model_id, end - self.span_ns, end, self.threshold,
                                        missing=True, n_missing=self.n_missing[g]))
                continue
            values, recon = self.plots.get(g, (None, None))
            out.append(WindowResult(self.key, self.model_id, self.worst_ends[g] - self.span_ns, end, self.threshold,
                                    max_error=max_error[g], anomalous=self.anomalous[g], score=score[g],
                                    n_missing=self.n_missing[g], values=values, reconstruction=recon,
                                    attribution=self.attribution.get(g, ()), fields=self.fields))
        return out


@dataclass
class TickReport:
    """What one tick (or one backfill) did, per signal; ``results`` lists every written window's outcome."""

    signals: dict[str, SignalReport] = field(default_factory=dict)
    seconds: float = 0.0
    blocks: list[_SeriesResults] = field(default_factory=list, repr=False)
    _results: list[WindowResult] | None = field(default=None, repr=False)

    @property
    def results(self) -> list[WindowResult]:
        if self._results is None or len(self._results) != sum(len(b.ends) for b in self.blocks):
            self._results = [r for b in self.blocks for r in b.results()]
        return self._results

    @property
    def windows(self) -> int:
        return sum(s.windows for s in self.signals.values())

    @property
    def anomalous(self) -> int:
        return sum(s.anomalous for s in self.signals.values())

    @property
    def missing(self) -> int:
        return sum(s.missing for s in self.signals.values())


class _FrozenScores(ScoreStates):
    """Copies of the live score histories: windows scored again late are scored against them without changing
    them."""

    def __init__(self, live: ScoreStates) -> None:
        super().__init__(None)
        self.live = live

    def get(self, series_id: str, model_tag: str, initial: ScoreNormaliser) -> ScoreNormaliser:
        return self.live.get(series_id, model_tag, initial).copy()


def _plot(det: Detector, row: NDArray[np.float64], k: int, nearest: int) -> tuple[NDArray[np.float64],
                                                                                  NDArray[np.float64]]:
    """The window ending at ``row[k]`` and its nearest shape, in data units, for the plot in an alert message
    (one field: 1-D; several: ``(window, fields)``)."""
    w = det.window_
    values, shape = row[k - w + 1 : k + 1].copy(), det.shape(nearest)
    return (values, shape[:, 0]) if det.n_fields_ == 1 else (values, shape)


class _Explanations:
    """Which fields explain the windows of a batch (every series of one model at once, in a few array
    operations): the top field and its direction for every signal; with several fields also each field's share of
    the window's attribution (`DetectorSpec.attribution`), its error, direction and newest value. `row` hands out
    one series' windows."""

    def __init__(self, sig: SignalConfig, b: WindowBatch, matrix: NDArray[np.float64],
                 slots: NDArray[np.int64]) -> None:
        self.sig = sig
        self.field_names = sig.field_names
        self.names_arr = np.array(self.field_names, dtype=object)
        self.err, self.sign = b.field_error, b.field_sign  # (n, m, fields)
        self.matrix, self.slots = matrix, slots
        # Consecutive slots (as `_score_group` makes them) are a slice: a series' values are then a view.
        consecutive = len(slots) > 0 and int(slots[-1]) - int(slots[0]) == len(slots) - 1
        self.span: slice | NDArray[np.int64] = slice(int(slots[0]), int(slots[-1]) + 1) if consecutive else slots
        self.share: NDArray[np.float64] | None = None
        if sig.multi:  # the shares, directions and top fields, as `anomalyd.core.attribution.explain` defines them
            self.share, self.sign, self.top = explain(b.field_weight, self.sign, b.field_excess)
            self.err = np.round(self.err, 4)  # four decimals are all an error or a share says (shorter points)
            self.order = np.argsort(-np.nan_to_num(self.share, nan=-1.0), axis=2, kind="stable")
        else:
            self.top = np.zeros(self.err.shape[:2], dtype=np.intp)
        self.up = np.take_along_axis(self.sign, self.top[:, :, None], axis=2)[:, :, 0] >= 0
        self._texts: tuple[list[list[str]], list[list[str]] | None] | None = None

    def row(self, r: int, cols: NDArray[np.intp] | None = None) -> _Explained:
        """Series ``r``'s windows at ``cols`` (None: all of them, the steady case)."""
        return _Explained(self, r, cols)

    def texts(self) -> tuple[list[list[str]], list[list[str]] | None]:
        """Every window's direction and (several fields) top field as text, made once for the whole batch: the
        steady path's columns for each series are then rows of these lists."""
        if self._texts is None:
            direction = [["up" if u else "down" for u in row] for row in self.up.tolist()]
            self._texts = direction, self.names_arr[self.top].tolist() if self.sig.multi else None
        return self._texts


class _Explained:
    """`_Explanations` of one series' windows (``cols``: their columns in the batch), and the output point's
    fields that carry them: ``top_field``, ``direction`` and, with several fields, ``top_share`` and
    ``top_fields``."""

    def __init__(self, ex: _Explanations, r: int, cols: NDArray[np.intp] | None) -> None:
        self.field_names = ex.field_names
        self.names: tuple[str, ...] = ("top_field", "direction")
        self.columns: list[list[float | int | bool | str] | float | bool | str]
        at: slice | NDArray[np.intp]
        if cols is None:  # every window of the batch: rows of the batch's arrays and texts, no copies
            at = slice(None)
            top, up = ex.top[r], ex.up[r]
            direction, top_names = ex.texts()
            first: list[str] | str = top_names[r] if top_names is not None else self.field_names[0]
            self.columns = [first, direction[r]]  # type: ignore[list-item]
            row = ex.matrix[r, ex.span]
        else:
            at = cols
            top, up = ex.top[r, cols], ex.up[r, cols]
            self.columns = [ex.names_arr[top].tolist() if ex.sig.multi else self.field_names[0],
                            ["up" if u else "down" for u in up.tolist()]]
            row = ex.matrix[r, ex.slots[cols]]
        self.value = row if row.ndim == 2 else row[:, None]
        self.share: NDArray[np.float64] | None = None
        self._up = up
        if ex.share is None:  # one field: `shares` works it out when asked (an alert), not for every window
            return
        self.share, self.error, self.sign = ex.share[r, at], ex.err[r, at], ex.sign[r, at]
        self._order = ex.order[r, at]
        at = np.arange(len(top))
        names = self.field_names
        texts: list[float | int | bool | str] = []
        for order, share, sign in zip(self._order[:, :3].tolist(), self.share.tolist(), self.sign.tolist(),
                                      strict=True):
            texts.append(", ".join(share_text(names[j], sign[j], share[j]) for j in order if share[j] == share[j]))
        self.names += ("top_share", "top_fields")
        self.columns += [self.share[at, top].tolist(), texts]

    def shares(self, g: int, top: int | None = None) -> tuple[FieldShare, ...]:
        """Window ``g``'s fields by share, largest first (its missing fields left out)."""
        v = self.value[g].tolist()
        if self.share is None:
            return (FieldShare(self.field_names[0], 1.0, 1 if self._up[g] else -1, v[0] if v[0] == v[0] else None),)
        out = []
        for j in self._order[g, :top].tolist():
            sh = float(self.share[g, j])
            if sh != sh:
                break
            out.append(FieldShare(self.field_names[j], sh, 1 if self.sign[g, j] >= 0 else -1,
                                  v[j] if v[j] == v[j] else None))
        return tuple(out)


class _Kept:
    """The kept samples (see `_keep`) of the series of one scored group, one pair of arrays per field for all of
    them: a series holds this object and its index rather than arrays of its own, so a tick leaves a few large
    allocations per group behind, not four small ones per series (which pinned the allocator's memory)."""

    __slots__ = ("starts", "times", "values")

    def __init__(self, per_series: Sequence[list[FieldSamples]], wms: Sequence[int], period: int, back: int,
                 margin: int) -> None:
        d = len(per_series[0]) if per_series else 0
        n = len(per_series)
        self.times: list[NDArray[np.int64]] = []
        self.values: list[NDArray[np.float64]] = []
        self.starts = np.zeros((d, n + 1), dtype=np.int64)
        # Each series keeps its samples in [lo, hi] (see `_keep_bounds`), for all series in a few array operations.
        w = np.asarray(wms, dtype=np.int64)
        lo, hi = _keep_bounds(w, period, back, margin)
        for j in range(d):
            ts = [f[j][0] for f in per_series]
            lengths = np.fromiter((len(t) for t in ts), dtype=np.int64, count=n)
            t_all = np.concatenate(ts).astype(np.int64, copy=False) if n else np.empty(0, dtype=np.int64)
            row = np.repeat(np.arange(n), lengths)
            keep = (t_all >= lo[row]) & (t_all <= hi[row])
            self.starts[j, 1:] = np.cumsum(np.bincount(row[keep], minlength=n))
            self.times.append(t_all[keep])
            self.values.append(np.concatenate([f[j][1] for f in per_series])[keep] if n else np.empty(0))

    def fields(self, i: int) -> list[FieldSamples]:
        """Series ``i``'s kept samples (views)."""
        return [(t[a:b], v[a:b]) for t, v, a, b in zip(self.times, self.values, self.starts[:, i].tolist(),
                                                       self.starts[:, i + 1].tolist(), strict=True)]

    @property
    def nbytes(self) -> int:
        return int(self.starts.nbytes + sum(a.nbytes for a in (*self.times, *self.values)))


def _keep_bounds(wm: NDArray[np.int64], period: int, back: int, margin: int) -> tuple[NDArray[np.int64],
                                                                                    NDArray[np.int64]]:
    """The times of the samples a series keeps for the next tick, ``[lo, hi]`` per watermark: the ``back`` samples
    before the first window after the watermark and the gap margin before them (half a period either side)."""
    return wm + period - back * period - margin - period // 2, wm + period // 2


def _joined(kept: list[FieldSamples], new: list[FieldSamples], after: int) -> list[FieldSamples]:
    """The kept samples followed by the newly read ones after them (a read may overlap what was kept)."""
    out = []
    for (kt, kv), (nt, nv) in zip(kept, new, strict=True):
        if len(nt) and nt[0] > after:  # the steady case: the read starts after what was kept
            out.append((np.concatenate((kt, nt)), np.concatenate((kv, nv))))
            continue
        a = np.searchsorted(nt, after, side="right")
        out.append((np.concatenate((kt, nt[a:])), np.concatenate((kv, nv[a:]))))
    return out


def _out_tags(sig: SignalConfig, stored: StoredModel, key: SeriesKey) -> Tags:
    """The tags of a series' output points."""
    return (("signal", sig.name), ("series", tags_str(key.tags)), ("model", stored.model_id), *key.tags)


@dataclass
class _Member:
    key: SeriesKey
    #: One (times, values) pair per field of the signal.
    fields: list[FieldSamples]


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
        self._reported_mismatch: dict[str, str] = {}
        self._live: dict[str, StoredModel] = {}  # the model each id had when the config's live settings were applied
        self._specs: dict[str, DetectorSpec] = {}  # per signal, its spec as configured (made once)
        self._reported_behind: set[str] = set()
        self._silenced: dict[str, int] = {}  # series id -> the watermark its deadman alert was raised at
        #: series id -> ends of windows written as missing data, re-scored if their samples arrive late
        self._holes: dict[str, list[int]] = {}
        self._reported_problem: dict[str, str] = {}
        self._reported_fields: set[str] = set()
        #: This replica's share of the series (``daemon.shard``), None when it scores them all.
        self.shard = Shard(*cfg.daemon.shard) if cfg.daemon.shard else None
        #: Names this process in the statistics, so that two replicas claiming one shard are told apart.
        self.instance = uuid.uuid4().hex[:12]
        self._started_ns = clock()
        #: The durable watermarks of a sharded replica (signal -> series id -> end of its last point in the output
        #: measurement), read once per signal: a series taken over resumes after them. A series' own watermark
        #: wins unless the output is further ahead than an interrupted commit can leave it (two intervals): the
        #: windows of a tick killed between its points and its alert decisions are scored (and alerted) again.
        self._durable: dict[str, dict[str, int]] = {}
        self._use_durable = self.shard is not None
        self._handover_ns = int(2 * cfg.daemon.interval_s * 1e9)
        self._owned: dict[str, tuple[float, list[Tags]]] = {}
        #: signal -> series id -> (its watermark, the `_Kept` of its group, its index there): its raw samples of
        #: the window before the watermark, which the next tick does not read again. Only the series scored in the
        #: last committed tick; empty after a restart.
        self._kept: dict[str, dict[str, tuple[int, _Kept, int]]] = {}
        self._conflict: set[str] = set()

    # -- public entry points ---------------------------------------------------------------------------
    def tick(self, now_ns: int | None = None) -> TickReport:
        """Score every due window since each series' watermark, write, alert, advance the watermarks.

        Each signal is its own commit: its points are written, its alert decisions queued durably, and only then
        its watermarks advance and are saved. A signal that fails anywhere in that chain is reported
        (``SignalReport.failed``) and scored again from the same watermarks next tick; the other signals go on.
        The tick raises only when every signal failed. Queued alerts are delivered once, at the end.
        """
        t_start = time.perf_counter()
        now = self.clock() if now_ns is None else now_ns
        report = TickReport()
        errors: list[Exception] = []
        for sig in self.cfg.signals:
            step = sig.step_ns
            hi = (now - self.cfg.daemon.lateness_ns) // step * step
            try:
                report.signals[sig.name] = self._run_signal(sig, None, hi, report, live=True, now=now)
                try:
                    self._fill_holes(sig)
                except (StoreError, OSError, ValueError) as exc:  # best effort; the windows stay remembered
                    log.warning("signal %s: could not re-score windows written as missing: %s", sig.name, exc)
            except Exception as exc:  # one signal's failure must neither block nor lose another's windows
                errors.append(exc)
                why = str(exc) if isinstance(exc, StoreError | OSError) else f"{type(exc).__name__}: {exc}"
                report.signals[sig.name] = SignalReport(failed=why)
                log.error("signal %s failed; its windows are scored again next tick: %s", sig.name, why,
                          exc_info=not isinstance(exc, StoreError | OSError))
        for name, r in report.signals.items():
            SIGNAL_FAILED.labels(signal=name).set(1 if r.failed else 0)
            if not r.failed:
                for reason, prefix in (("no_model", "no model"), ("mismatch", "model "), ("no_data", "no data")):
                    UNSCORED_SERIES.labels(signal=name, reason=reason).set(
                        sum(v.startswith(prefix) for v in r.unscored.values()))
        self._finish(report, now, live=True, t_start=t_start)
        if errors and len(errors) == len(self.cfg.signals):
            raise errors[0]
        return report

    def score_range(self, start_ns: int, end_ns: int, alert: bool = False) -> TickReport:
        """Backfill: score every window whose last sample lies in ``(start_ns, end_ns]`` (same path as tick).

        Watermarks are left alone. The range is processed in chunks of ``daemon.max_backlog_windows`` windows
        so memory stays bounded; each series' running state carries over from chunk to chunk.
        """
        t_start = time.perf_counter()
        report = TickReport()
        # A backfill scores from each model's warm-up state in memory: it never disturbs the live score history.
        self._backfill_scores = ScoreStates(None)
        for sig in self.cfg.signals:
            step = sig.step_ns
            lo = start_ns // step * step
            hi = end_ns // step * step
            total = SignalReport()
            chunk = self.cfg.daemon.max_backlog_windows * step
            for a in range(lo, hi, chunk):  # Python ints: exact at any range
                part = self._run_signal(sig, a, min(a + chunk, hi), report, live=False)
                for name in ("windows", "anomalous", "missing", "untrained", "skipped_backlog"):
                    setattr(total, name, getattr(total, name) + getattr(part, name))
                total.series = max(total.series, part.series)
                total.problem = part.problem if not total.series else ""
            report.signals[sig.name] = total
        self._finish(report, self.clock(), live=False, t_start=t_start, alert=alert)
        return report

    # -- internals -------------------------------------------------------------------------------------
    def _has_models(self, sig: SignalConfig) -> bool:
        """Whether the models directory holds any model of this signal (shared, or of one of its series)."""
        stem = sig.name
        models_dir = getattr(self.catalog, "models_dir", None)
        if models_dir is None:  # a catalog that cannot list: assume it has some
            return True
        for p in models_dir.glob(f"{glob.escape(stem)}*.json"):
            rest = p.stem[len(stem):]
            if not rest or (rest[0] == "-" and rest[1:].isalnum()):
                return True
        return False

    def _model_for(self, sig: SignalConfig, tags: Tags) -> StoredModel | None:
        mid = model_id_for(sig.name, tags, sig.scope)
        stored = self.catalog.get(mid)
        if stored is None and sig.scope != "shared":
            # A model trained before series keys were escaped: found under its old id if it is this series'.
            old = self.catalog.get(model_id_for(sig.name, tags, sig.scope, legacy=True))
            stored = old if old is not None and tuple(sorted(old.tags)) == tuple(sorted(tags)) else None
        if stored is None:
            return None
        why = model_mismatch(stored, sig)
        if why:
            if mid not in self._reported_mismatch:
                log.error("model %s cannot score signal %s: %s", mid, sig.name, why)
                self._reported_mismatch[mid] = why
            return None
        if self._live.get(mid) is not stored:  # once per loaded model: the config's decision, attribution, ...
            spec = self._specs.get(sig.name)
            if spec is None:
                spec = self._specs[sig.name] = sig.spec()
            note = apply_live_settings(stored, spec)
            if note:
                log.warning("%s", note)
            self._live[mid] = stored
        return stored

    def _watermark(self, key: SeriesKey) -> int | None:
        wm = self.watermarks.get(key.id)
        if wm is None and key.legacy_id != key.id:  # saved before series keys were escaped
            wm = self.watermarks.get(key.legacy_id)
        durable = self._durable.get(key.signal, {}).get(key.id)
        if durable is not None and (wm is None or durable > wm + self._handover_ns):  # another replica wrote since
            wm = durable
        return wm

    def _mine(self, series_id: str) -> bool:
        return self.shard is None or self.shard.owns(series_id)

    def _load_durable(self, sig: SignalConfig, floor: int, hi: int) -> None:
        """The output measurement's last point per series of the signal (once per signal), see ``_durable``."""
        if not self._use_durable or sig.name in self._durable:
            return
        out = self.cfg.output
        got = last_written(self.store, out.measurement, sig.name, floor, hi, out.retention_policy)
        self._durable[sig.name] = {SeriesKey(sig.name, t).id: end for t, end in (got or {}).items()
                                   if self._mine(SeriesKey(sig.name, t).id)}
        if got:
            log.info("signal %s: shard %s found the last points of %d of its series in %s (a series taken over "
                     "resumes after them)", sig.name, self.shard, len(self._durable[sig.name]), out.measurement)

    def _owned_series(self, sig: SignalConfig) -> list[Tags] | None:
        """A sharded replica's series of the signal (found in InfluxDB's index every ``_DISCOVER_S``, plus those
        it knows from its watermarks); None when not sharded or the store cannot list series."""
        if self.shard is None:
            return None
        cached = self._owned.get(sig.name)
        if cached is not None and time.monotonic() - cached[0] < _DISCOVER_S:
            return cached[1]
        keys: set[Tags] = set()
        rp = self.cfg.influxdb.retention_policy
        for r in signal_reads(sig):
            got = series_keys(self.store, r.query.measurement, r.query.where, sig.group_by, rp)
            if got is None:
                return None
            keys |= got
        prefix = sig.name + "|"
        for sid in [k for k, _ in self.watermarks.items() if k.startswith(prefix)]:
            try:
                keys.add(parse_tags(sid[len(prefix):]))
            except ValueError:
                continue
        owned = sorted(t for t in keys if self.shard.owns(SeriesKey(sig.name, t).id))
        self._owned[sig.name] = (time.monotonic(), owned)
        log.info("signal %s: shard %s owns %d of %d series", sig.name, self.shard, len(owned), len(keys))
        return owned

    def _run_signal(self, sig: SignalConfig, lo: int | None, hi: int, report: TickReport,
                    live: bool, now: int | None = None) -> SignalReport:
        """Score windows whose end lies in ``(lo, hi]``; ``lo=None`` means: from each series' watermark.

        Live, the signal's read starts at its live series' watermark; a series that lags further (it stopped,
        or its newest samples are late) does not widen that read: when it shows up again it is read on its own
        from its watermark. Its watermark is the end of its last written window, so late samples are scored when
        they come (within ``daemon.max_backlog_windows``).
        """
        rep = SignalReport()
        step, period = sig.step_ns, sig.period_ns
        backlog = self.cfg.daemon.max_backlog_windows * step
        floor = hi - backlog
        w_max = sig.window or sig.spec().max_window
        if lo is None:
            self._load_durable(sig, floor, hi)
            mine = {k: v for k, v in self.watermarks.items() if k.startswith(sig.name + "|") and self._mine(k)}
            for k, v in self._durable.get(sig.name, {}).items():
                if k not in mine or v > mine[k] + self._handover_ns:
                    mine[k] = v
            marks = list(mine.values())
            # The live series share the newest watermark; those a little behind (a late last sample) come along.
            newest = max(marks, default=floor)
            q_lo = max(min((v for v in marks if v >= newest - w_max * step), default=floor), floor)
        else:
            q_lo = lo
        if q_lo >= hi:
            return rep
        # Read one longest window of context before the first due window, plus max_gap + 1 samples beyond both
        # ends so that gaps at the edges are filled exactly as over the whole series.
        # With the reconstruction written, one more window back: the previous tick's last samples are drawn again.
        back = (w_max - 1) * (2 if self.cfg.output.write_reconstruction else 1)
        margin = (sig.max_gap + 1) * period
        half = period // 2
        shared = self._model_for(sig, ()) if sig.scope == "shared" else None
        points: list[SeriesPoints] = []
        recon_points: list[Point] = []
        results: list[_SeriesResults] = []
        done: dict[str, int] = {}
        keep: dict[str, tuple[int, _Kept, int]] = {}  # the samples the next tick need not read again
        gaps: dict[str, list[int]] = {}  # windows left unwritten inside the scored range (their last sample late)
        states = self.scores if live else self._backfill_scores
        before: list[tuple[ScoreNormaliser, tuple[object, ...]]] = []
        late: dict[tuple[str, int], tuple[StoredModel, list[_Member]]] = {}
        found = [0, 0]  # series read, series with a model
        no_models: list[bool] = []  # computed at the first series without a model: has the signal none at all?

        def start_of(key: SeriesKey, stored: StoredModel) -> int:
            """Where this series' due windows start (after its watermark, or its model's training end)."""
            if lo is not None:
                return lo
            wm = self._watermark(key)
            s_lo = wm if wm is not None else stored.train_end_ns // step * step
            if s_lo < floor:
                skipped = (floor - s_lo) // step
                rep.skipped_backlog += skipped
                if key.id not in self._reported_behind:  # once per series, not every tick
                    self._reported_behind.add(key.id)
                    log.warning("series %s is %d points behind, more than daemon.max_backlog_windows=%d; "
                                "skipping the oldest %d", key, (hi - s_lo) // step,
                                self.cfg.daemon.max_backlog_windows, skipped)
                s_lo = floor
            return s_lo

        def score(groups: dict[tuple[str, int], tuple[StoredModel, list[_Member]]]) -> Iterator[SeriesPoints]:
            for (_, s_lo), (stored, members) in groups.items():
                settled = self._score_group(sig, stored, members, s_lo, hi, states, rep, results, points,
                                            recon_points, before, settle=lo is None, gaps=gaps)
                rep.series += len(members)
                for m, end in zip(members, settled, strict=True):
                    if end > s_lo:
                        done[m.key.id] = end
                if lo is None:
                    wms = [max(end, s_lo) for end in settled]
                    kept = _Kept([m.fields for m in members], wms, period, back, margin)
                    for i, (m, wm) in enumerate(zip(members, wms, strict=True)):
                        keep[m.key.id] = (wm, kept, i)
                yield from points
                points.clear()

        def scored() -> Iterator[Point | SeriesPoints]:
            """Series are scored a batch at a time as influxd sends them, and each batch's points go to the store
            while the next batch is read and scored."""
            full_lo = q_lo + period - back * period - margin - half
            # Read each sample once: with the samples before the watermark kept from the last tick (see `_keep`),
            # only the newer ones are asked for; a series without them is read again on its own, in full.
            cached = self._kept.get(sig.name) if lo is None else None
            read_lo = q_lo + half + 1 if cached else full_lo
            if cached and any(f.transform for f in sig.fields):  # a rate needs the sample before it
                read_lo -= margin
            # A series of several fields writes a point per field per window too: fewer series per slice keep the
            # slices' points (and the overlap of scoring one slice with writing the previous) about the same.
            size = max(100, _SLICE // len(sig.fields))
            owned = self._owned_series(sig) if lo is None else None
            reads = ([()] if owned is None else
                     [tuple(owned[i : i + _OWNED_BATCH]) for i in range(0, len(owned), _OWNED_BATCH)])
            for data in (d for series in reads
                         for d in read_signal_batches(self.store, sig, read_lo, hi + margin + half, size,
                                                      series=series)):
                self._check_fields(sig, data)
                groups: dict[tuple[str, int], tuple[StoredModel, list[_Member]]] = {}
                for tags, per_field in data.items():
                    key = SeriesKey(sig.name, tags)
                    if not self._mine(key.id):  # another replica's (a store that cannot filter by series)
                        continue
                    found[0] += 1
                    stored = shared if sig.scope == "shared" else self._model_for(sig, tags)
                    if stored is None:
                        rep.untrained += 1
                        if not no_models:
                            no_models.append(not self._has_models(sig))
                        mid = model_id_for(sig.name, tags, sig.scope)
                        mismatch = self._reported_mismatch.get(mid)
                        if not no_models[0]:  # (with no model at all, the signal's problem says it once)
                            rep.unscored[key.id] = (f"model {mid} does not fit the config: {mismatch}" if mismatch
                                                    else f"no model {mid}; run `anomalyd train`")
                        if key.id not in self._reported_untrained and not mismatch and not no_models[0]:
                            self._reported_untrained.add(key.id)
                            log.warning("series %s has no model; it is skipped until `anomalyd train` covers it",
                                        key)
                        continue
                    found[1] += 1
                    s_lo = start_of(key, stored)
                    if s_lo >= hi:
                        continue
                    # A series behind the others (new since training, back after an outage, late samples) is read
                    # again on its own from its own start, below; so is one whose samples before its watermark were
                    # not kept (new since the last tick).
                    if cached:
                        # Taken out as it is used, so that the last tick's kept samples are let go group by group
                        # rather than held beside the new ones until the tick ends. A tick that fails reads the
                        # series it took in full next time, which scores them the same.
                        kept = cached.pop(key.id, None)
                        if kept is None or kept[0] != s_lo:
                            late.setdefault((stored.model_id, s_lo), (stored, []))[1].append(_Member(key, per_field))
                            continue
                        per_field = _joined(kept[1].fields(kept[2]), per_field, s_lo + half)
                    target = late if s_lo < q_lo else groups
                    target.setdefault((stored.model_id, s_lo), (stored, []))[1].append(_Member(key, per_field))
                yield from score(groups)
            if late:
                yield from score(self._reread(sig, late, hi + margin + half, period, back, margin))
            yield from recon_points

        try:
            self.store.write(scored(), self.cfg.output.retention_policy)
            if live and self.alerts is not None and results:
                # The alert decisions of these windows are durable before their watermarks advance: a failure
                # here scores and observes them again next tick (the alert state ignores windows it has seen).
                self.alerts.observe([r for b in results for r in b.results()], now, deliver=False)
        except BaseException:
            # Nothing of this signal's windows counts as seen: the score histories go back to where they were, so
            # the retry (from the same watermarks) scores the same windows the same way (newest refs first: each
            # undoes the history writes made since it was taken).
            for norm, refs in reversed(before):
                norm.restore(refs)
            raise
        for norm, _ in before:  # committed: the undo logs of the histories are no longer needed
            norm.release()
        self._say_rebased(sig, rep)
        UNTRAINED_SERIES.labels(signal=sig.name).set(rep.untrained)
        if not found[0] and self.shard is not None and lo is None and not self._owned_series(sig):
            rep.problem = (f"signal {sig.name}: shard {self.shard} owns none of its series (the other replicas score "
                           "them); fewer replicas, or more series, give it some")
        elif not found[0]:
            where = "{" + ", ".join(f"{k}={v!r}" for k, v in sig.where) + "}"
            rep.problem = (f"signal {sig.name}: no series of {describe(sig)} matches where {where} "
                           f"in database {self.cfg.influxdb.database!r} between {rfc3339(q_lo)} and {rfc3339(hi)}")
        elif not found[1] and no_models and no_models[0]:
            rep.problem = (f"signal {sig.name}: no model in {self.cfg.paths.models}; run "
                           f"`anomalyd train -c {self.cfg.source}`")
        if live and rep.problem and self._reported_problem.get(sig.name) != rep.problem:
            log.warning("%s", rep.problem)  # once, not every tick
        if live:
            if rep.problem:
                self._reported_problem[sig.name] = rep.problem
            else:
                self._reported_problem.pop(sig.name, None)
        report.blocks.extend(results)
        WINDOWS.labels(signal=sig.name, result="scored").inc(rep.windows)
        WINDOWS.labels(signal=sig.name, result="anomalous").inc(rep.anomalous)
        WINDOWS.labels(signal=sig.name, result="missing").inc(rep.missing)
        if live:
            for key_id, end in done.items():
                self.watermarks.advance(key_id, end)
                self._reported_behind.discard(key_id)
            self.watermarks.save()
            self._kept[sig.name] = keep  # committed: the next tick starts where these end
            all_marks = [(k, v) for k, v in self.watermarks.items() if k.startswith(sig.name + "|") and self._mine(k)]
            rep.lag_s = (self.clock() - min(v for _, v in all_marks)) / 1e9 if all_marks else 0.0
            LAG_SECONDS.labels(signal=sig.name).set(rep.lag_s)
            self._deadman(sig, all_marks, hi, now if now is not None else self.clock(), rep)
            self._remember_holes(sig, results, gaps, hi)
        return rep

    def _remember_holes(self, sig: SignalConfig, results: list[_SeriesResults], gaps: dict[str, list[int]],
                        hi: int) -> None:
        """Keep the windows just written as missing data, or left unwritten for want of their last sample (within
        ``daemon.rescore_horizon``), for `_fill_holes`."""
        horizon = int(self.cfg.daemon.rescore_horizon_s * 1e9)
        if horizon <= 0:
            return
        for b in results:
            # Not the windows that reach before the series' first sample: nothing can fill those.
            after = -(2**63) if b.data_start_ns is None else b.data_start_ns + b.span_ns
            ends = [e for e, miss in zip(b.ends, b.missing, strict=True) if miss and e >= after]
            if ends:
                self._holes.setdefault(b.key.id, []).extend(ends)
        for sid, ends in gaps.items():
            self._holes.setdefault(sid, []).extend(ends)
        prefix, oldest = sig.name + "|", hi - horizon
        for sid in [k for k in self._holes if k.startswith(prefix)]:
            kept = sorted({e for e in self._holes[sid] if e > oldest})
            if kept:
                self._holes[sid] = kept
            else:
                del self._holes[sid]

    def _fill_holes(self, sig: SignalConfig) -> int:
        """Score again the windows written as missing data whose samples arrived since, overwriting their points.

        Bounded: only windows within ``daemon.rescore_horizon`` are kept, and each series with such windows is
        read again over their range only. Their scores use a copy of the series' current score history (which
        they do not change), and they raise no alert (the alert state has moved past them); they are logged.
        """
        prefix = sig.name + "|"
        todo = {sid: ends for sid, ends in self._holes.items() if sid.startswith(prefix)}
        if not todo:
            return 0
        period, step = sig.period_ns, sig.step_ns
        w_max = sig.window or sig.spec().max_window
        margin = (sig.max_gap + 1) * period
        frozen = _FrozenScores(self.scores)
        filled: list[SeriesPoints] = []
        n_filled = n_anomalous = 0
        items = sorted(todo.items(), key=lambda kv: kv[1][0])
        for i in range(0, len(items), _LATE_BATCH):
            part = items[i : i + _LATE_BATCH]
            keys = [SeriesKey(sig.name, parse_tags(sid[len(prefix):])) for sid, _ in part]
            lo = min(ends[0] for _, ends in part) - 2 * step
            hi = max(ends[-1] for _, ends in part) + step
            data = read_signal(self.store, sig, lo + period - (w_max - 1) * period - margin - period // 2,
                               hi + margin + period // 2, series=tuple(k.tags for k in keys))
            for key, (sid, ends) in zip(keys, part, strict=True):
                got = data.get(key.tags)
                stored = self._model_for(sig, () if sig.scope == "shared" else key.tags)
                if got is None or stored is None:
                    continue
                results: list[_SeriesResults] = []
                points: list[SeriesPoints] = []
                # On the grid (a point's time is its last real sample's, off the grid by less than half a period).
                s_lo = (ends[0] + period // 2) // step * step - step
                s_hi = (ends[-1] + period // 2) // step * step
                self._score_group(sig, stored, [_Member(key, got)], s_lo, s_hi, frozen, SignalReport(),
                                  results, points, [], [])
                # Only the points of the remembered windows: their last sample came (the others are left alone). One
                # that is still incomplete is written as missing again and stays remembered.
                remembered = set(ends)
                filled += [p for p in (sp.only(remembered) for sp in points) if p is not None]
                now_scored = [r for b in results for r in b.results() if r.end_ns in remembered and not r.missing]
                wanted = remembered - {r.end_ns for r in now_scored}
                n_filled += len(now_scored)
                n_anomalous += sum(r.anomalous for r in now_scored)
                if wanted:
                    self._holes[sid] = sorted(wanted)
                else:
                    self._holes.pop(sid, None)
        if filled:
            self.store.write(filled, self.cfg.output.retention_policy)
            log.info("signal %s: late samples filled %d windows written as missing; %d of them anomalous (no "
                     "alert: the series has moved on)", sig.name, n_filled, n_anomalous)
        return n_filled

    def _reread(self, sig: SignalConfig, late: dict[tuple[str, int], tuple[StoredModel, list[_Member]]], end: int,
                period: int, back: int, margin: int) -> dict[tuple[str, int], tuple[StoredModel, list[_Member]]]:
        """The series behind the others read again from their own starts (``_LATE_BATCH`` series per query,
        oldest first), so that one of them never widens the read of the rest."""
        members = sorted(((s_lo, stored, m) for (_, s_lo), (stored, ms) in late.items() for m in ms),
                         key=lambda x: x[0])
        for i in range(0, len(members), _LATE_BATCH):
            part = members[i : i + _LATE_BATCH]
            again = read_signal(self.store, sig, part[0][0] + period - back * period - margin - period // 2, end,
                                series=tuple(m.key.tags for _, _, m in part))
            for _, _, m in part:
                m.fields = again.get(m.key.tags, m.fields)
        return late

    def _check_fields(self, sig: SignalConfig, data: SignalData) -> None:
        """Say once when a field of a several-field signal has no samples in a read for some series (its
        measurement disappeared, its input broke; the other fields go on being scored), and once when it is back."""
        if not sig.multi or not data:
            return
        for j, f in enumerate(sig.fields):
            absent = sum(not len(per[j][0]) for per in data.values())
            key = f"{sig.name}|{f.name}"
            if absent and key not in self._reported_fields:
                self._reported_fields.add(key)
                log.warning("signal %s: field %s (%s.%s) has no samples for %d of %d series in this read; their "
                            "windows are scored on the other fields until it is back; check what writes it",
                            sig.name, f.name, f.measurement, f.field, absent, len(data))
            elif not absent and key in self._reported_fields:
                self._reported_fields.discard(key)
                log.info("signal %s: field %s has samples again", sig.name, f.name)

    def _deadman(self, sig: SignalConfig, marks: list[tuple[str, int]], hi: int, now: int,
                 rep: SignalReport) -> None:
        """Series whose newest written window is older than ``alerts.deadman`` are reported as not scored and
        raise one ``deadman`` alert each (Kapacitor's name for it)."""
        delay = self.cfg.alerts.deadman_s
        if delay <= 0:
            return
        cutoff = hi - int(delay * 1e9)
        period = sig.period_ns
        w = sig.window or sig.spec().max_window
        fresh = []
        for sid, end in marks:
            if end >= cutoff:
                self._silenced.pop(sid, None)
                continue
            rep.unscored[sid] = f"no data: no window written since {rfc3339(end)}"
            if self._silenced.get(sid) == end:
                continue
            try:
                tags = parse_tags(sid[len(sig.name) + 1 :])
            except ValueError:
                continue
            fresh.append((SeriesKey(sig.name, tags), model_id_for(sig.name, tags, sig.scope),
                          end - (w - 1) * period, end))
        if not fresh or self.alerts is None:
            return
        silent = getattr(self.alerts, "silent", None)
        if silent is None:
            return
        silent(fresh, now)  # durable before it is marked as raised
        for key, _, _, end in fresh:
            self._silenced[key.id] = end

    def _score_group(self, sig: SignalConfig, stored: StoredModel, members: list[_Member], s_lo: int, hi: int,
                     score_states: ScoreStates, rep: SignalReport, results: list[_SeriesResults],
                     points: list[SeriesPoints], recon_points: list[Point],
                     before: list[tuple[ScoreNormaliser, tuple[object, ...]]], settle: bool = False,
                     gaps: dict[str, list[int]] | None = None) -> list[int]:
        """Align the series of one model with one watermark, run the detector over their new samples, and
        turn the results into points and window results.

        With ``settle``, a series' samples after its newest present one (rounded down to a written point) are
        left for the next tick: its windows there are neither scored nor written now, so nothing is decided
        before its samples are in. Returns, per series, the end of its last written window (``s_lo`` if none).
        ``gaps`` receives, per series, the ends of the windows left unwritten before that (their last sample is
        missing), for `_fill_holes`.
        """
        det = stored.model
        period, w = sig.period_ns, det.window_
        gap = sig.max_gap + 1
        extra = (w - 1) if self.cfg.output.write_reconstruction else 0  # see _reconstruction_points
        first = s_lo + period  # grid time of the first new sample (the end of the first due window)
        t0 = first - (w - 1 + extra + gap) * period
        n_new = int((hi - s_lo) // period)
        n = (w - 1 + extra + gap) + n_new + gap
        matrix, problems, stamps = align_fields([m.fields for m in members], period, t0, n, sig.max_gap)
        # A sample row is there when any field of it is (one field: when it is).
        there = np.asarray(np.isfinite(matrix) if matrix.ndim == 2 else np.isfinite(matrix).any(axis=2))
        for r, m in enumerate(members):
            for kind, count in problems[r].items():
                DATA_PROBLEMS.labels(signal=sig.name, kind=kind).inc(count)
                if kind != "filled":
                    log.info("series %s: %d %s samples before %d", m.key, count, kind, hi)
        ctx = slice(extra + gap, extra + gap + w - 1)
        new = slice(w - 1 + extra + gap, w - 1 + extra + gap + n_new)
        settled = [hi] * len(members)
        if settle and n_new:
            present = there[:, new]
            last = n_new - 1 - np.argmax(present[:, ::-1], axis=1)  # newest present sample (if any)
            ends = np.where(present.any(axis=1), first + last * period, s_lo)
            step = sig.step_ns
            ends = ends // step * step  # a written point covers whole steps
            settled = ends.tolist()
            for r in np.flatnonzero(ends < hi).tolist():
                k = int((settled[r] - first) // period) + 1  # first column left for the next tick
                matrix[r, new.start + max(k, 0) :] = np.nan
                there[r, new.start + max(k, 0) :] = False
            if gaps is not None and sig.write_every == 1:
                for r in np.flatnonzero((~present).any(axis=1)).tolist():
                    seen = np.flatnonzero(there[r])
                    after = -(2**63) if not seen.size or seen[0] == 0 else t0 + int(seen[0] + w - 1) * period
                    cols = np.flatnonzero(~present[r])
                    unwritten = [e for e in (first + cols * period).tolist() if after <= e <= settled[r]]
                    if unwritten:
                        gaps.setdefault(members[r].key.id, []).extend(unwritten)
        model_tag = str(stored.meta.get("npz_sha256", stored.model_id))
        tails = det.context_tails(matrix[:, ctx])
        states = [SeriesState(first // period, tails[r], score_states.get(m.key.id, model_tag, det.normaliser_))
                  for r, m in enumerate(members)]
        before.extend((st.norm, st.norm.refs()) for st in states)
        batch = det.update_many(states, matrix[:, new])
        score_states.touch()
        slots = np.arange(n_new, dtype=np.int64) + (w - 1 + extra + gap)
        if batch.field_rebased.any():
            rep.rebased += [(members[r].key, sig.field_names[j], t0 + int(slots[g]) * period)
                            for r, g, j in zip(*np.nonzero(batch.field_rebased), strict=True)]
        ex = _Explanations(sig, batch, matrix, slots)
        # A window whose last sample is missing (before a series starts, after it stops, inside a long outage)
        # is not written; one with a gap before its last sample is a missing-data window.
        keep = batch.last_present
        # The steady state -- every new window scored, complete and written, one point each, samples on the grid --
        # takes a path with a few list operations per series; everything else goes through `_emit`.
        fast = np.zeros(len(members), dtype=bool)
        if sig.write_every == 1:
            fast = np.asarray((batch.scored & keep & batch.complete).all(axis=1))
        if fast.any():
            lists = (batch.max_error.tolist(), batch.anomalous.tolist(), batch.score.tolist())
            grid_ends = (t0 + slots * period).tolist()
            shared = ([False] * n_new, [0] * n_new)  # every steady series' missing and n_missing
        for r, m in enumerate(members):
            if fast[r] and r not in stamps:
                self._emit_steady(sig, stored, m.key, [col[r] for col in lists], grid_ends, batch, r, matrix[r],
                                  slots, rep, results, points, ex, shared)
            else:
                ends = output_stamps(stamps.get(r), t0, period, slots)
                n_blocks = len(results)
                self._emit(sig, stored, m.key, batch, r, keep[r], ends, matrix[r], slots, rep, results, points, ex)
                seen = np.flatnonzero(there[r])
                if len(results) > n_blocks and seen.size and seen[0] > 0:
                    results[-1].data_start_ns = t0 + int(seen[0]) * period
            if self.cfg.output.write_reconstruction:
                self._reconstruction_points(sig, stored, m.key, matrix[r], t0, first, hi, recon_points)
        return settled

    @staticmethod
    def _say_rebased(sig: SignalConfig, rep: SignalReport) -> None:
        """One line and a count per field that re-baselined (``rebaseline_after`` shifted windows in a row): its
        new level is its normal from that window on, so its alerts stop there by design, not by accident. Called
        once the windows are committed (a failed tick scores them again and would say it twice)."""
        for key, name, end in rep.rebased:
            FIELD_REBASELINES.labels(signal=sig.name, field=name).inc()
            log.warning("series %s: field %s re-baselined at the window ending %s: %d windows in a row above its "
                        "history (rebaseline_gate %g), so its new level is now its normal; retrain if the shift "
                        "is a fault", key, name, rfc3339(end), sig.rebaseline_after, sig.rebaseline_gate)

    def _emit_steady(self, sig: SignalConfig, stored: StoredModel, key: SeriesKey, cols: list[list],
                     ends: list[int], b: WindowBatch, r: int, row: NDArray[np.float64], slots: NDArray[np.int64],
                     rep: SignalReport, results: list[_SeriesResults], points: list[SeriesPoints],
                     ex: _Explanations, shared: tuple[list[bool], list[int]]) -> None:
        """`_emit` for a series whose new windows are all complete, each written as its own point."""
        max_error, anomalous, score = cols
        det = stored.model
        thr = float(det.threshold_)
        n = len(ends)
        tags = _out_tags(sig, stored, key)
        why = ex.row(r)
        points.append(SeriesPoints(self.cfg.output.measurement, tags,
                                   ("max_error", "threshold", "anomalous", "score", "missing", "n_missing",
                                    *why.names),
                                   (max_error, thr, anomalous, score, False, 0, *why.columns), ends))
        self._attribution_points(sig, tags, why, ends, points)
        n_anom = sum(anomalous)
        rep.windows += n
        rep.anomalous += n_anom
        plots, shares = _NO_PLOTS, _NO_SHARES  # shared and never written: most series have no anomalous window
        if n_anom:
            plots, shares = {}, {}
            for g in np.flatnonzero(b.anomalous[r]).tolist():
                plots[g] = _plot(det, row, int(slots[g]), int(b.nearest[r, g]))
                shares[g] = why.shares(g)
        results.append(_SeriesResults(key, stored.model_id, thr, (det.window_ - 1) * sig.period_ns, ends, ends,
                                      b.max_error[r], anomalous, b.score[r], *shared, plots, None, shares,
                                      sig.field_names if sig.multi else ()))

    def _emit(self, sig: SignalConfig, stored: StoredModel, key: SeriesKey, b: WindowBatch, r: int,
              keep: NDArray[np.bool_], ends: NDArray[np.int64], row: NDArray[np.float64],
              slots: NDArray[np.int64], rep: SignalReport, results: list[_SeriesResults],
              points: list[SeriesPoints], ex: _Explanations) -> None:
        """Points and results of one series' new windows: one per window, or one summary per ``write_every``
        windows (the largest max_error and score, anomalous if any window was, and which window was worst)."""
        cols = np.flatnonzero(b.scored[r] & keep)
        if not cols.size:
            return
        det = stored.model
        thr = float(det.threshold_)
        w, period = det.window_, sig.period_ns
        every = sig.write_every
        ok = b.complete[r, cols]
        sc = np.where(ok, b.score[r, cols], -1.0)
        if every > 1:
            group = (b.position[r, cols] // sig.slide - 1) // every  # (lo, hi] ranges: a group ends on a step
            starts = np.flatnonzero(np.concatenate(([True], group[1:] != group[:-1])))
            last = np.concatenate((starts[1:], [len(cols)])) - 1
            n_ok = np.add.reduceat(ok.astype(np.int64), starts)
            with np.errstate(invalid="ignore"):
                max_err = np.fmax.reduceat(b.max_error[r, cols], starts)
            anom = np.logical_or.reduceat(b.anomalous[r, cols], starts)
            n_miss = np.maximum.reduceat(b.n_missing[r, cols], starts)
            worst = np.array([a + int(np.argmax(sc[a : z + 1])) for a, z in zip(starts, last, strict=True)])
        else:
            last = worst = np.arange(len(cols))
            n_ok, max_err, anom, n_miss = ok.astype(np.int64), b.max_error[r, cols], b.anomalous[r, cols], \
                b.n_missing[r, cols]
        good = n_ok > 0
        end_all = ends[cols[last]]
        worst_end = ends[cols[worst]]
        out = self.cfg.output
        tags = _out_tags(sig, stored, key)
        n_good = int(good.sum())
        why = ex.row(r, cols[worst[good]])
        if n_good:
            g_end = end_all[good].tolist()
            names = ["max_error", "threshold", "anomalous", "score", "missing", "n_missing"]
            columns: list[list[float | int | bool | str] | float | bool | str] = [
                max_err[good].tolist(), thr, anom[good].tolist(), sc[worst[good]].tolist(), False,
                n_miss[good].tolist()]
            if every > 1:
                names += ["windows", "worst_end"]
                columns += [n_ok[good].tolist(), worst_end[good].tolist()]
            names += why.names
            columns += why.columns
            points.append(SeriesPoints(out.measurement, tags, tuple(names), tuple(columns), g_end))
            self._attribution_points(sig, tags, why, g_end, points)
        bad = ~good
        if bad.any():
            points.append(SeriesPoints(out.measurement, tags, ("threshold", "anomalous", "missing", "n_missing"),
                                       (thr, False, True, n_miss[bad].tolist()), end_all[bad].tolist()))
        rep.windows += n_good
        rep.missing += int(bad.sum())
        rep.anomalous += int(anom[good].sum())
        plots = {}
        shares = {}
        at_good = np.cumsum(good) - 1  # the row of `why` of each good group
        for g in np.flatnonzero(anom & good).tolist():  # the window behind an alert, for the plot in the message
            j = int(cols[worst[g]])
            plots[g] = _plot(det, row, int(slots[j]), int(b.nearest[r, j]))
            shares[g] = why.shares(int(at_good[g]))
        results.append(_SeriesResults(
            key, stored.model_id, thr, (w - 1) * period, end_all.tolist(), worst_end.tolist(),
            np.where(good, max_err, np.nan).tolist(), (anom & good).tolist(),
            np.where(good, sc[worst], np.nan).tolist(), bad.tolist(), n_miss.tolist(), plots, None, shares,
            sig.field_names if sig.multi else ()))

    def _attribution_points(self, sig: SignalConfig, tags: Tags, why: _Explained, ends: list[int],
                            points: list[SeriesPoints]) -> None:
        """A several-field signal's attribution measurement: per field, its share, error, direction and value at
        each written window (not at windows where the field was missing)."""
        meas = self.cfg.output.attribution_measurement
        if not sig.multi or not meas or why.share is None:
            return
        ok = np.isfinite(why.share)
        share, error, value = why.share, why.error, why.value
        direction = np.where(why.sign >= 0, 1.0, -1.0)
        if ok.all():  # the common case: every field of every window, one block (a series per field)
            points.append(SeriesPoints(meas, tags, _ATTRIBUTION_FIELDS,
                                       tuple(a.T.ravel().tolist() for a in (share, error, direction, value)), ends,
                                       split=("field", sig.field_names)))
            return
        for j, name in enumerate(sig.field_names):
            idx = np.flatnonzero(ok[:, j])
            if idx.size:
                points.append(SeriesPoints(meas, (*tags, ("field", name)), _ATTRIBUTION_FIELDS,
                                           tuple(a[idx, j].tolist() for a in (share, error, direction, value)),
                                           [ends[i] for i in idx.tolist()]))

    def _reconstruction_points(self, sig: SignalConfig, stored: StoredModel, key: SeriesKey,
                               row: NDArray[np.float64], t0: int, first: int, hi: int, out: list[Point]) -> None:
        """The series and its overlap-added reconstruction (the reference blog's picture) for the new samples."""
        period = sig.period_ns
        tags = _out_tags(sig, stored, key)
        recon = stored.model.overlap_reconstruction(row, first_index=t0 // period)
        meas = self.cfg.output.reconstruction_measurement
        # The last samples of the previous tick lacked the windows after them: they are written again, complete
        # now (same points, overwritten).
        a = max(0, int((first - t0) // period) - (stored.model.window_ - 1))
        z = min(int((hi - t0) // period) + 1, len(row))
        if row.ndim == 1:
            row, recon = row[:, None], recon[:, None]
        for j, name in enumerate(sig.field_names):
            ftags = (*tags, ("field", name)) if sig.multi else tags
            for k in range(a, z):
                v, rc = row[k, j], recon[k, j]
                if np.isfinite(v) and np.isfinite(rc):
                    out.append(Point(meas, ftags, (("value", float(v)), ("reconstruction", float(rc))),
                                     t0 + k * period))

    def _finish(self, report: TickReport, now: int, live: bool, t_start: float, alert: bool = False) -> None:
        """Deliver queued alerts, then record the tick's statistics (its time includes the delivery)."""
        if live and self.alerts is not None:
            try:
                self.alerts.flush()  # this tick's alerts and what an earlier outage left queued
            except Exception as exc:  # they stay queued; the next tick tries again
                log.error("could not deliver alerts now, they stay queued: %s: %s", type(exc).__name__, exc)
        elif alert and self.alerts is not None and report.results:
            self.alerts.observe(report.results, now)  # a backfill asked to alert: queues durably, then delivers
        report.seconds = time.perf_counter() - t_start
        if not live:
            return
        out = self.cfg.output
        shard: Tags = (("shard", str(self.shard)),) if self.shard else ()
        ident: tuple[tuple[str, str], ...] = (("instance", self.instance),) if self.shard else ()
        stats = [Point(out.stats_measurement, (("signal", name), *shard),
                       (("lag_seconds", float(r.lag_s)), ("windows", r.windows), ("anomalous", r.anomalous),
                        ("missing", r.missing), ("tick_seconds", float(report.seconds)),
                        ("untrained_series", r.untrained), ("unscored_series", len(r.unscored)),
                        ("failed", bool(r.failed)), *ident), now)
                 for name, r in report.signals.items()]
        try:
            if stats:
                self.store.write(stats, out.retention_policy)
            self._check_claimants(now)
            self.watermarks.save()  # a signal whose save failed: try again (its alerts are queued already)
            self.scores.maybe_save()
        except (StoreError, OSError) as exc:  # bookkeeping: the windows and alerts are committed already
            log.warning("could not record the tick's statistics or state: %s", exc)

    def _check_claimants(self, now: int) -> None:
        """Two replicas configured with the same shard index both score (and write) its series: each sees the
        other's statistics, says so once in the log, and sets ``anomalyd_shard_conflict``."""
        if self.shard is None:
            return
        since = max(self._started_ns, now - int(3 * self.cfg.daemon.interval_s * 1e9))
        others = claimants(self.store, self.cfg.output.stats_measurement, str(self.shard), since,
                           self.cfg.output.retention_policy)
        if others is None:
            return
        others.discard(self.instance)
        SHARD_CONFLICT.set(1 if others else 0)
        if others - self._conflict:
            log.error("another replica (instance %s) also runs as shard %s: both score and write the same series; "
                      "give every replica its own index (a StatefulSet's pod ordinal) and N the same everywhere",
                      ", ".join(sorted(others)), self.shard)
        self._conflict = others

    def close(self) -> None:
        """Save what is kept between ticks only in memory (the score history); call on shutdown."""
        self.scores.save()
