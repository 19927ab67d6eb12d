"""Training: read each series' training range, fit its model, save it to the catalog.

One bad series (too little data, NaN only, ...) is reported and the others go on.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable
from dataclasses import dataclass, field

import numpy as np
from tqdm import tqdm

from . import catalog
from .catalog import StoredModel, model_id_for
from .config import Config, SignalConfig
from .influx import Query, Store
from .model import WindowReconstructor, sliding_windows
from .postprocess import NormaliserParams, ScoreNormaliser
from .records import SeriesKey, Tags, tags_str
from .worker import align

log = logging.getLogger(__name__)


@dataclass
class TrainReport:
    trained: list[StoredModel] = field(default_factory=list)
    failed: dict[str, str] = field(default_factory=dict)


def _estimator(sig: SignalConfig) -> WindowReconstructor:
    th = sig.threshold
    return WindowReconstructor(window=sig.window, train_slide=sig.train_slide, n_clusters=sig.clusters,
                               random_state=sig.random_state, holdout=sig.holdout, threshold_policy=th.policy,
                               margin=th.margin, quantile=th.quantile, sigma_k=th.k,
                               max_train_windows=sig.max_train_windows, n_init=sig.n_init)


def warm_normaliser(model: WindowReconstructor, parts: list[np.ndarray], sig: SignalConfig) -> ScoreNormaliser:
    """A score normaliser that has seen the hold-out windows (at the scoring slide) and the training range.

    The hold-out is out of sample for the clustering, so its errors are what normal data scores like; every
    series starts its ``score`` history from this state instead of a blank one.
    """
    norm = ScoreNormaliser(NormaliserParams.for_windows(sig.window, sig.slide, sig.score_history))
    for seg in parts:
        if len(seg) < 2 * sig.window:
            continue
        n_val = max(round(sig.holdout * len(seg)), sig.window)
        _, mean_errors = model.window_error_stats(sliding_windows(seg[len(seg) - n_val :], sig.window, sig.slide))
        norm.update(mean_errors)
        norm.observe_range(seg)
    return norm


def flagged_windows(cfg: Config, store: Store, sig: SignalConfig, start: int, end: int) -> dict[str, np.ndarray]:
    """End times (ns) of the windows anomalyd flagged anomalous in ``[start, end]``, per ``series`` tag value."""
    q = Query(cfg.output.measurement, "anomalous", (("signal", sig.name),), ("series",), sig.slide * sig.period_ns,
              cfg.output.retention_policy)
    out: dict[str, np.ndarray] = {}
    for tags, (t, v) in store.read(q, start, end + (sig.window - 1) * sig.period_ns).items():
        ends = t[v == 1]
        if len(ends):
            out[dict(tags).get("series", "")] = ends
    return out


def prepare(times: np.ndarray, values: np.ndarray, sig: SignalConfig, key: SeriesKey,
            exclude_ends: np.ndarray | None = None) -> list[np.ndarray]:
    """Align a training series to its period, fill short gaps, and split it at the longer ones.

    ``exclude_ends`` are the end times of windows to leave out (windows flagged anomalous by an earlier run):
    their samples are cut out like a gap. Returns the gap-free stretches; raises ValueError naming the series
    when there are no samples.
    """
    if len(times) == 0:
        raise ValueError(f"series {key} has no samples in the training range; widen signals.train_range")
    t0 = int(times.min()) // sig.period_ns * sig.period_ns
    n = int((int(times.max()) - t0) // sig.period_ns) + 1
    aligned, problems = align(times, values, sig.period_ns, t0, n, sig.max_gap)
    for kind, count in problems.items():
        if kind != "filled":
            log.warning("series %s: %d %s samples in the training range", key, count, kind)
    x = aligned.values
    if exclude_ends is not None and len(exclude_ends):
        last = (np.asarray(exclude_ends, dtype=np.int64) - t0) // sig.period_ns
        cut = np.zeros(n + 1, dtype=np.int64)  # +1 at each flagged window's first sample, -1 after its last
        np.add.at(cut, np.clip(last - sig.window + 1, 0, n), 1)
        np.add.at(cut, np.clip(last + 1, 0, n), -1)
        drop = np.cumsum(cut[:n]) > 0
        x = np.where(drop, np.nan, x)
        log.info("series %s: leaving %d samples of %d windows flagged anomalous out of training", key,
                 int(drop.sum()), len(exclude_ends))
    holes = np.isnan(x)
    if not holes.any():
        return [x]
    edges = np.flatnonzero(np.diff(np.concatenate([[1], holes.astype(np.int8), [1]])))
    runs = edges.reshape(-1, 2)
    gaps = int(np.isnan(aligned.values).sum())
    if gaps:
        log.warning("series %s has %d samples missing in gaps longer than max_gap=%d; training on its %d gap-free "
                    "stretches", key, gaps, sig.max_gap, len(runs))
    return [x[a:b] for a, b in runs]


def train(cfg: Config, store: Store, now_ns: int | None = None, signals: list[str] | None = None,
          progress: bool = True, clock: Callable[[], int] = time.time_ns,
          exclude_anomalous: bool = False) -> TrainReport:
    """Train every configured signal (or those named) and save the models.

    With ``exclude_anomalous``, windows that anomalyd itself flagged anomalous in the training range (read back
    from the output measurement) are left out, so a refit on recent data learns only what was normal.
    """
    now = clock() if now_ns is None else now_ns
    report = TrainReport()
    for sig in cfg.signals:
        if signals and sig.name not in signals:
            continue
        start, end = sig.train_range.resolve(now)
        flagged = flagged_windows(cfg, store, sig, start, end) if exclude_anomalous else {}
        if sig.scope == "shared":
            where = tuple(sorted({**dict(sig.where), **dict(sig.train_where)}.items()))
            data = store.read(Query(sig.measurement, sig.field, where, sig.group_by, sig.period_ns), start, end)
            key = SeriesKey(sig.name, ())
            try:
                if not data:
                    raise ValueError(f"signal {sig.name} has no series matching {dict(where)} in the training "
                                     f"range; check signals.train_where and signals.train_range")
                # Windows never straddle two series: each series' stretches are fitted as separate segments.
                parts = [p for tags, (t, v) in sorted(data.items())
                         for p in prepare(t, v, sig, SeriesKey(sig.name, tags), flagged.get(tags_str(tags)))]
                _fit_save(cfg, sig, (), parts, start, end, report, n_series=len(data))
            except ValueError as exc:
                report.failed[key.id] = str(exc)
                log.error("cannot train %s: %s", key, exc)
            continue
        query = Query(sig.measurement, sig.field, tuple(sorted({**dict(sig.where), **dict(sig.train_where)}.items())),
                      sig.group_by, sig.period_ns)
        data = store.read(query, start, end)
        if not data:
            report.failed[sig.name] = "no series in the training range"
            log.error("signal %s: no series of %s.%s in the training range; check train_range and where",
                      sig.name, sig.measurement, sig.field)
        items = sorted(data.items())
        for tags, (t, v) in tqdm(items, desc=f"train {sig.name}", unit="series", disable=not progress
                                 or len(items) < 10):
            key = SeriesKey(sig.name, tags)
            try:
                _fit_save(cfg, sig, tags, prepare(t, v, sig, key, flagged.get(tags_str(tags))), start, end, report)
            except ValueError as exc:
                report.failed[key.id] = str(exc)
                log.error("cannot train %s: %s", key, exc)
    return report


def _fit_save(cfg: Config, sig: SignalConfig, tags: Tags, x: list[np.ndarray], start: int, end: int,
              report: TrainReport, n_series: int = 1) -> None:
    model = _estimator(sig).fit(x)
    mid = model_id_for(sig.name, tags, sig.scope)
    stored = StoredModel(model_id=mid, signal=sig.name, tags=tags, scope=sig.scope, model=model,
                         period_ns=sig.period_ns, train_start_ns=start, train_end_ns=end,
                         meta={"n_samples": sum(len(p) for p in x), "n_series": n_series,
                               "normaliser": warm_normaliser(model, x, sig).to_dict()})
    catalog.save(cfg.paths.models, stored)
    report.trained.append(stored)
    log.info("trained %s on %d samples: threshold %.4g (%s policy)", mid, sum(len(p) for p in x), model.threshold_,
             sig.threshold.policy)


def refit(cfg: Config, store: Store) -> TrainReport:
    """The daemon's scheduled refit (``daemon.refit_every``): retrain on the training range, resolved now, without
    the windows flagged anomalous. Models that cannot be refitted keep their current version."""
    absolute = [s.name for s in cfg.signals if "now" not in s.train_range.start + s.train_range.end]
    if absolute:
        log.warning("signals %s have an absolute train_range: a refit trains on the same data again; use a "
                    "relative range such as \"last 7 days\"", ", ".join(absolute))
    report = train(cfg, store, progress=False, exclude_anomalous=True)
    if report.failed:
        log.error("refit: %d models could not be refitted and keep their current version: %s", len(report.failed),
                  "; ".join(f"{k}: {v}" for k, v in list(report.failed.items())[:5]))
    if not report.trained and report.failed:
        raise RuntimeError(f"no model could be refitted ({len(report.failed)} failures)")
    return report
