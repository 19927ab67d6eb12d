"""The series `anomalyd evaluate` scores (`EvalSeries`), and each input read and scored through the daemon's path.

A labelled CSV, a NAB folder, SMD machines, the UCR archive or a signal's range in InfluxDB becomes a list of
`EvalSeries`: values, scores, errors and labels, one entry per row. CSV, NAB, UCR and InfluxDB series go through
`anomalyd.core.stored_run` (grid alignment, ``max_gap`` filling, the one streaming entry point); SMD machines
through the detector directly (`smd_run`). The detector, tqdm, the stored models and the InfluxDB client are
imported only when a loader runs.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
from numpy.typing import NDArray

from ..core.records import rfc3339
from .datasets import (
    UcrSeries,
    find_smd_machines,
    load_label_windows,
    load_labelled_csv,
    load_nab_corpus,
    load_smd_machine,
    load_ucr_index,
)
from .metrics import label_segments, ucr_top1
from .nab import NabCorpus, NabFile, nab_probation

log = logging.getLogger(__name__)

__all__ = [
    "EvalSeries",
    "UsageError",
    "load_csv_series",
    "load_influx_series",
    "load_nab_series",
    "load_smd_series",
    "load_ucr_series",
    "smd_run",
    "ucr_run",
]


class UsageError(ValueError):
    """Options that do not go together (``anomalyd evaluate`` exits with status 2)."""


@dataclass
class EvalSeries:
    """One evaluated series (a CSV, a NAB file, an SMD machine, a UCR series or a series of an InfluxDB range);
    arrays have one entry per row.

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


def _check_slide(args: Any, stored: Any) -> None:
    """Refuse a ``--slide`` that differs from a stored model's own stride (it scores at the stride it was trained
    with, ``signals.slide`` at training; its score normaliser was warmed up on that cadence)."""
    stride = int(stored.model.spec.stride)
    if args.slide is not None and args.slide != stride:
        raise UsageError(f"--slide {args.slide}: stored model {stored.model_id} scores one window every {stride} "
                         f"row(s), its own stride from training (signals.slide); leave out --slide, or retrain "
                         f"with signals.slide = {args.slide}")


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
                      (label_segments(labels) if labels is not None else []),
                      reconstruction=recon[np.clip(slot, 0, len(recon) - 1)], error_threshold=float(det.threshold_),
                      info={"window": det.window_, "n_clusters": len(det.catalog_.cluster_centers_),
                            "error_threshold": float(det.threshold_), "decisions": int(flags.sum()),
                            **(info or {})})


def _progress(items: Sequence[Any], args: Any, desc: str) -> Any:
    from tqdm import tqdm

    return tqdm(items, desc=desc, unit="file", disable=args.no_progress or len(items) < 2)


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


# ---------------------------------------------------------------------------------------------------------
# A labelled CSV, a NAB folder, SMD machines, the UCR archive
# ---------------------------------------------------------------------------------------------------------


def _csv_times(stamps: list[str]) -> tuple[NDArray[np.int64], bool]:
    """Epoch-ns times of a CSV's timestamps, or the row numbers (one per second) when they are not times."""
    try:
        t = np.array(stamps, dtype="datetime64[ns]").astype(np.int64)
        if len(t) < 2 or not np.any(np.diff(t) > 0):
            raise ValueError("no two distinct times")
        return t, True
    except ValueError:
        return np.arange(len(stamps), dtype=np.int64) * 10**9, False


def load_csv_series(args: Any, spec: Any) -> list[EvalSeries]:
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


def _nab_run(job: tuple[NabFile, Any, int]) -> tuple[NDArray[np.int64], int, Any]:
    """One NAB file through the daemon's path: trained on its probationary period, every later row scored."""
    from ..core.stored_run import run_stored

    f, spec, max_gap = job
    times = np.asarray(f.timestamps).astype("datetime64[ns]").astype(np.int64)
    n_train = nab_probation(len(times))
    return times, n_train, run_stored(times, np.asarray(f.values, dtype=np.float64), int(times[n_train - 1]), spec,
                                      max_gap=max_gap)


def load_nab_series(args: Any, spec: Any) -> tuple[list[EvalSeries], NabCorpus]:
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


def smd_run(train: NDArray[np.float64], test: NDArray[np.float64], spec: Any) -> Any:
    """An SMD machine through the detector: trained on its training file, every test row scored (one sample per
    row, the training file's end as the first windows' context)."""
    from ..core.detector import Detector

    det = Detector(spec).fit([train], [0])
    state = det.start(len(train), train)
    return det, det.update(state, test)


def load_smd_series(args: Any, spec: Any) -> list[EvalSeries]:
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
                              segments=label_segments(labels), error_threshold=float(det.error_threshold_),
                              info={"window": det.window_, "n_clusters": len(det.catalog_.cluster_centers_),
                                    "metric_scores": batch.field_weight}))
    return out


def ucr_run(job: tuple[UcrSeries, NDArray[np.float64], Any, int]) -> Any:
    from ..core.stored_run import run_stored

    u, values, spec, max_gap = job
    times = np.arange(values.size, dtype=np.int64) * 10**9
    return run_stored(times, values, int(times[u.train_end - 1]), spec, period_ns=10**9, max_gap=max_gap)


def load_ucr_series(args: Any, spec: Any) -> list[EvalSeries]:
    """Every ``--every``-th UCR series through the daemon's path: trained on its training part, every later row
    scored (one sample per second)."""
    index = load_ucr_index(args.input)
    if args.every < 1:
        raise UsageError(f"--every {args.every} must be at least 1")
    index = index[:: args.every]
    out: list[EvalSeries] = []
    from ..core.stored_run import by_timestamp

    with np.load(Path(args.input) / "series.npz") as z:
        for u in _progress(index, args, "evaluate UCR"):
            values = np.asarray(z[u.name], dtype=np.float64)
            run = ucr_run((u, values, spec, args.max_gap))
            times = np.arange(values.size, dtype=np.int64) * 10**9
            labels = np.zeros(values.size, dtype=bool)
            labels[u.anomaly_first : u.anomaly_last + 1] = True
            s = _series_from_run(u.name, times, values, labels, u.train_end, run)
            for key, col in (("score", s.scores), ("error", np.nan_to_num(  # the score's input, per row
                    by_timestamp(run, times, run.batch.error), nan=-np.inf))):
                at, hit = ucr_top1(col, u.train_end, u.anomaly_first, u.anomaly_last)
                s.info[f"ucr_top1_{key}"] = at
                s.info[f"ucr_hit_{key}"] = hit
            out.append(s)
    return out


# ---------------------------------------------------------------------------------------------------------
# A signal's range in InfluxDB
# ---------------------------------------------------------------------------------------------------------


def load_influx_series(args: Any, spec: Any) -> tuple[list[EvalSeries], str, bool]:
    """Read, align, label and score the series of one signal over an InfluxDB range.

    Returns the series, the input's description for the report, and whether stored models scored them.
    """
    import time

    from ..config import ConfigError, parse_time_ns
    from ..config import load as load_config
    from ..core.records import SeriesKey, Tags, tags_str
    from ..core.stored_run import run_stored
    from ..service.catalog import Catalog, StoredModel, apply_live_settings, model_id_for, model_mismatch
    from ..service.catalog import load as load_model
    from ..store.influx1 import InfluxDB1Store
    from ..store.sources import describe, read_signal

    config_path = args.config if args.config is not None else Path("config.toml")
    try:
        cfg = load_config(config_path)
    except ConfigError as exc:
        raise UsageError(str(exc)) from None
    names = [s.name for s in cfg.signals]
    if args.signal is None:
        if len(names) != 1:
            raise UsageError(f"{cfg.source} configures {len(names)} signals ({', '.join(names)}); pick one with "
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
        configured = sig.spec()
        for tags, _ in items:
            stored = catalog.get(model_id_for(sig.name, tags, sig.scope))
            if stored is None:
                continue
            why = model_mismatch(stored, sig)
            if why:
                log.warning("model %s %s; the daemon ignores it and so does this evaluation", stored.model_id, why)
                continue
            note = apply_live_settings(stored, configured)  # as the daemon scores it
            if note:
                log.warning("%s", note)
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

