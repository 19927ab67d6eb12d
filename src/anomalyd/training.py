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
from .detector import Detector
from .influx import Query, Store
from .records import SeriesKey, Tags, tags_str
from .sources import FieldSamples, describe, read_signal
from .stored import training_stretches_fields

log = logging.getLogger(__name__)


@dataclass
class TrainReport:
    trained: list[StoredModel] = field(default_factory=list)
    failed: dict[str, str] = field(default_factory=dict)


def flagged_windows(cfg: Config, store: Store, sig: SignalConfig, start: int, end: int) -> dict[str, np.ndarray]:
    """End times (ns) of the windows anomalyd flagged anomalous in ``[start, end]``, per ``series`` tag value."""
    q = Query(cfg.output.measurement, "anomalous", (("signal", sig.name),), ("series",), sig.slide * sig.period_ns,
              cfg.output.retention_policy)
    out: dict[str, np.ndarray] = {}
    w = sig.window or sig.spec().max_window
    for tags, (t, v) in store.read(q, start, end + (w - 1) * sig.period_ns).items():
        ends = t[v == 1]
        if len(ends):
            out[dict(tags).get("series", "")] = ends
    return out


def prepare(times: np.ndarray | list[FieldSamples], values: np.ndarray | None, sig: SignalConfig, key: SeriesKey,
            exclude_ends: np.ndarray | None = None) -> tuple[list[np.ndarray], list[int]]:
    """Align a training series to its period, fill short gaps, split it at the longer ones.

    ``times, values`` are one field's samples, or ``times`` is the list of every field's ``(times, values)`` (a
    several-field signal; ``values`` None). ``exclude_ends`` are the end times of windows to leave out (windows
    flagged anomalous by an earlier run): their samples are cut out like a gap. Returns the gap-free stretches and
    the grid index of each one's first sample; raises ValueError naming the series (and the field) when there are
    no samples.
    """
    fields = list(times) if values is None else [(np.asarray(times), np.asarray(values))]
    for f, (t, _) in zip(sig.fields, fields, strict=True):
        if len(t) == 0:
            what = f"field {f.name} of series {key}" if sig.multi else f"series {key}"
            raise ValueError(f"{what} has no samples in the training range; widen signals.train_range"
                             + (" or check what writes it" if sig.multi else ""))
    if exclude_ends is not None and len(exclude_ends):
        w = sig.window or sig.spec().max_window
        ends = np.sort(np.asarray(exclude_ends, dtype=np.int64))
        dropped = 0
        for j, (t, v) in enumerate(fields):
            # A sample is dropped when a flagged window (the w samples up to its end) covers it.
            nxt = np.searchsorted(ends, t, side="left")
            covered = nxt < len(ends)
            covered[covered] = ends[nxt[covered]] - t[covered] < w * sig.period_ns
            fields[j] = (t[~covered], v[~covered])
            dropped += int(covered.sum())
        log.info("series %s: leaving %d samples of %d windows flagged anomalous out of training", key, dropped,
                 len(exclude_ends))
    parts, starts, problems = training_stretches_fields(fields, sig.period_ns, sig.max_gap)
    for kind, count in problems.items():
        if kind != "filled":
            log.warning("series %s: %d %s samples in the training range", key, count, kind)
    if len(parts) > 1:
        log.info("series %s: training on %d gap-free stretches (gaps longer than max_gap=%d split it)", key,
                 len(parts), sig.max_gap)
    return parts, starts


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
            data = read_signal(store, sig, start, end, where=sig.train_where)
            key = SeriesKey(sig.name, ())
            try:
                if not data:
                    raise ValueError(f"signal {sig.name} has no series matching {dict(where)} in the training "
                                     f"range; check signals.train_where and signals.train_range")
                # Windows never straddle two series: each series' stretches are fitted as separate segments.
                parts: list[np.ndarray] = []
                starts: list[int] = []
                for tags, per_field in sorted(data.items()):
                    p, a = prepare(per_field, None, sig, SeriesKey(sig.name, tags), flagged.get(tags_str(tags)))
                    parts += p
                    starts += a
                _fit_save(cfg, sig, (), (parts, starts), start, end, report, n_series=len(data))
            except ValueError as exc:
                report.failed[key.id] = str(exc)
                log.error("cannot train %s: %s", key, exc)
            continue
        data = read_signal(store, sig, start, end, where=sig.train_where)
        if not data:
            report.failed[sig.name] = "no series in the training range"
            log.error("signal %s: no series of %s in the training range; check train_range and where",
                      sig.name, describe(sig))
        items = sorted(data.items())
        for tags, per_field in tqdm(items, desc=f"train {sig.name}", unit="series", disable=not progress
                                    or len(items) < 10):
            key = SeriesKey(sig.name, tags)
            try:
                _fit_save(cfg, sig, tags, prepare(per_field, None, sig, key, flagged.get(tags_str(tags))), start,
                          end, report)
            except ValueError as exc:
                report.failed[key.id] = str(exc)
                log.error("cannot train %s: %s", key, exc)
    return report


def _fit_save(cfg: Config, sig: SignalConfig, tags: Tags, data: tuple[list[np.ndarray], list[int]], start: int,
              end: int, report: TrainReport, n_series: int = 1) -> None:
    parts, starts = data
    model = Detector(sig.spec()).fit(parts, starts)
    mid = model_id_for(sig.name, tags, sig.scope)
    n = sum(len(p) for p in parts)
    stored = StoredModel(model_id=mid, signal=sig.name, tags=tags, scope=sig.scope, model=model,
                         period_ns=sig.period_ns, train_start_ns=start, train_end_ns=end,
                         meta={"n_samples": n, "n_series": n_series, "fields": list(sig.field_names)})
    catalog.save(cfg.paths.models, stored)
    report.trained.append(stored)
    log.info("trained %s on %d samples: window %d, %d shapes, max_error threshold %.4g", mid, n, model.window_,
             len(model.catalog_.cluster_centers_), model.threshold_)


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
