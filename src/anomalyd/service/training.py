"""Training: read each series' training range, fit its model, save it to the catalog.

One bad series (too little data, NaN only, ...) is reported and the others go on.

Per-series models (scope "series") can be fitted in parallel: in local processes (``jobs``, joblib's loky
backend) or on a Dask cluster (``dask``: a scheduler address, joblib's dask backend). Only the fitting is
shipped: this process reads each signal (one query, as always), prepares each series' gap-free stretches and
sends them out ``BATCH`` series at a time; the workers send back each fitted detector as plain arrays and metadata
(`Detector.to_state`), and this process alone writes the model files. A series' raw samples are dropped as soon
as its stretches are prepared, so the raw data and the fitted models are never both held whole. A worker fits
with as many OpenMP threads as this process has (K-Means' sums depend on that number in their last bits), so a
model is the same bit for bit whether it was fitted here, in a local process or on a Dask worker, and the same as
an in-memory ``Detector.fit`` here.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections import deque
from collections.abc import Callable, Iterator
from contextlib import closing
from dataclasses import dataclass, field
from typing import Any

import numpy as np
from tqdm import tqdm

from .. import __version__
from ..config import Config, SignalConfig
from ..core.detector import Detector, DetectorSpec
from ..core.records import SeriesKey, Tags, tags_str
from ..core.stored_run import training_stretches_fields
from ..store.base import Query, Store
from ..store.sources import FieldSamples, describe, read_signal
from . import catalog
from .catalog import StoredModel, model_id_for

log = logging.getLogger(__name__)

#: Below this many series of a signal, per-series training stays in this process unless ``jobs`` is given:
#: starting worker processes (and importing scikit-learn in each) costs more than it saves.
PARALLEL_MIN_SERIES = 32
#: Series prepared and fitted per round: bounds the prepared stretches (and results) in flight.
BATCH = 256
#: OpenMP threads of each fit in a worker; None: as many as this process has, which makes a worker's model
#: identical to one fitted here. (K-Means is what uses them; BLAS runs on one thread in the workers, which
#: does not change the results.)
WORKER_THREADS: int | None = None


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


#: Per signal, the series whose constant fields are named one by one; the rest are counted in one summary line.
CONSTANT_LINES = 10


def warn_constant(what: str, sig: SignalConfig, parts: list[np.ndarray], quiet: bool = False) -> list[str]:
    """The fields that hold one value over the whole training data, each named in a warning (unless ``quiet``):
    with no spread to scale its changes by, any change scores as an anomaly until a retrain on data where it
    moves."""
    if not parts:
        return []
    rows = np.concatenate([p.reshape(len(p), -1) for p in parts])
    flat = [j for j in range(rows.shape[1]) if rows[0, j] == rows[:, j].min() == rows[:, j].max()]
    for j in [] if quiet else flat:
        field = f"field {sig.field_names[j]} of {what}" if sig.multi else what
        log.warning("%s was constant (%g) over its whole training range: any change will score as anomalous until "
                    "it is retrained on data where it moves; widen train_range%s", field, rows[0, j],
                    " or leave the field out" if sig.multi else "")
    return [sig.field_names[j] for j in flat]


def train(cfg: Config, store: Store, now_ns: int | None = None, signals: list[str] | None = None,
          progress: bool = True, clock: Callable[[], int] = time.time_ns,
          exclude_anomalous: bool = False, jobs: int | None = 1, dask: str | None = None) -> TrainReport:
    """Train every configured signal (or those named) and save the models.

    With ``exclude_anomalous``, windows that anomalyd itself flagged anomalous in the training range (read back
    from the output measurement) are left out, so a refit on recent data learns only what was normal.

    Per-series models are fitted in ``jobs`` local processes (1: in this process; None: one per CPU, or 1 when
    the first per-series signal has fewer than `PARALLEL_MIN_SERIES` series), or, with ``dask`` (a scheduler
    address such as ``tcp://scheduler:8786``), on that Dask cluster's workers. A shared model is fitted here.
    Raises RuntimeError (one line) when the Dask cluster cannot be used.
    """
    now = clock() if now_ns is None else now_ns
    report = TrainReport()
    pool: list[_Pool] = []  # opened for the first per-series signal with data
    try:
        _train(cfg, store, now, signals, progress, exclude_anomalous, jobs, dask, report, pool)
    finally:
        for p in pool:
            p.close()
    return report


def _train(cfg: Config, store: Store, now: int, signals: list[str] | None, progress: bool, exclude_anomalous: bool,
           jobs: int | None, dask: str | None, report: TrainReport, pool: list[_Pool]) -> None:
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
                warn_constant(f"signal {sig.name} (shared model)", sig, parts)
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
            continue
        if not pool:
            pool.append(_Pool.open(jobs, dask, len(data)))
        _train_series(cfg, sig, data, flagged, start, end, report, pool[0], progress)


def _train_series(cfg: Config, sig: SignalConfig, data: dict[Tags, list[FieldSamples]],
                  flagged: dict[str, np.ndarray], start: int, end: int, report: TrainReport, pool: _Pool,
                  progress: bool) -> None:
    """Fit and save one model per series of ``sig``, ``BATCH`` series at a time; the report lists them in series
    order whatever order the fits finish in."""
    queue = deque(enumerate(sorted(data.items())))
    data.clear()  # the queue holds the raw samples now; each series' are dropped once prepared
    n = len(queue)
    spec = sig.spec()
    trained: dict[int, StoredModel] = {}
    failed: dict[int, tuple[str, str]] = {}
    constant: list[str] = []  # series with a field constant over their training range
    with tqdm(total=n, desc=f"train {sig.name}", unit="series", disable=not progress or n < 10) as bar:
        while queue:
            batch: list[tuple[int, Tags, tuple[list[np.ndarray], list[int]]]] = []
            while queue and len(batch) < pool.batch:
                i, (tags, per_field) = queue.popleft()
                key = SeriesKey(sig.name, tags)
                try:
                    batch.append((i, tags, prepare(per_field, None, sig, key, flagged.get(tags_str(tags)))))
                    if warn_constant(f"series {key}", sig, batch[-1][2][0], quiet=len(constant) >= CONSTANT_LINES):
                        constant.append(str(key))
                except ValueError as exc:
                    failed[i] = (key.id, str(exc))
                    log.error("cannot train %s: %s", key, exc)
                    bar.update(1)
            by_index = {i: (tags, stretches) for i, tags, stretches in batch}
            for i, result in pool.fit(spec, [(i, stretches) for i, _, stretches in batch]):
                tags, (parts, _) = by_index.pop(i)
                key = SeriesKey(sig.name, tags)
                if isinstance(result, str):
                    failed[i] = (key.id, result)
                    log.error("cannot train %s: %s", key, result)
                else:
                    trained[i] = _save(cfg, sig, tags, Detector.from_state(*result), sum(len(p) for p in parts),
                                       start, end)
                bar.update(1)
    if len(constant) > CONSTANT_LINES:
        log.warning("signal %s: %d more series have a field constant over their training range (e.g. %s); the "
                    "same applies to them", sig.name, len(constant) - CONSTANT_LINES, constant[CONSTANT_LINES])
    report.trained += [trained[i] for i in sorted(trained)]
    report.failed.update(failed[i] for i in sorted(failed))


def _fit_save(cfg: Config, sig: SignalConfig, tags: Tags, data: tuple[list[np.ndarray], list[int]], start: int,
              end: int, report: TrainReport, n_series: int = 1) -> None:
    parts, starts = data
    model = Detector(sig.spec()).fit(parts, starts)
    report.trained.append(_save(cfg, sig, tags, model, sum(len(p) for p in parts), start, end, n_series))


def _save(cfg: Config, sig: SignalConfig, tags: Tags, model: Detector, n: int, start: int, end: int,
          n_series: int = 1) -> StoredModel:
    mid = model_id_for(sig.name, tags, sig.scope)
    stored = StoredModel(model_id=mid, signal=sig.name, tags=tags, scope=sig.scope, model=model,
                         period_ns=sig.period_ns, train_start_ns=start, train_end_ns=end,
                         meta={"n_samples": n, "n_series": n_series, "fields": list(sig.field_names)})
    catalog.save(cfg.paths.models, stored)
    log.info("trained %s on %d samples: window %d, %d shapes, max_error threshold %.4g", mid, n, model.window_,
             len(model.catalog_.cluster_centers_), model.threshold_)
    return stored


#: A fitted detector as `Detector.to_state` gives it (arrays, metadata), or why it could not be fitted.
_Fitted = tuple[dict[str, np.ndarray], dict[str, Any]] | str
_threads: Any = None


def _fit_one(spec: DetectorSpec, index: int, stretches: tuple[list[np.ndarray], list[int]],
             threads: int | None = None) -> tuple[int, _Fitted]:
    """Fit one series' detector, here (``threads`` None: as any fit here) or in a worker (``threads``: its OpenMP
    threads, BLAS on one); a series that cannot be fitted (too little data, ...) answers its message instead of
    failing the others."""
    global _threads
    try:
        if threads is None:
            return index, Detector(spec).fit(*stretches).to_state()
        if _threads is None:
            from threadpoolctl import ThreadpoolController

            _threads = ThreadpoolController()
        with _threads.limit(limits={"openmp": threads, "blas": 1}):
            return index, Detector(spec).fit(*stretches).to_state()
    except ValueError as exc:  # TooLittleDataError too
        return index, str(exc)


def _openmp_threads() -> int | None:
    """This process's OpenMP threads (scikit-learn's K-Means uses them), None when no OpenMP library is loaded."""
    from threadpoolctl import threadpool_info

    counts = [int(i["num_threads"]) for i in threadpool_info() if i.get("user_api") == "openmp"]
    return max(counts) if counts else None


def _versions() -> dict[str, str]:
    """What a model file records of the process that fitted it (compared with each Dask worker's)."""
    import sklearn

    return {"anomalyd": __version__, "numpy": np.__version__, "scikit-learn": sklearn.__version__}


@dataclass
class _Pool:
    """Where per-series fits run: here (``jobs`` 1), in local processes, or on a Dask cluster (``client``)."""

    jobs: int = 1
    client: Any = None
    batch: int = BATCH
    threads: int | None = None  # each worker fit's OpenMP threads

    @classmethod
    def open(cls, jobs: int | None, dask: str | None, n_series: int) -> _Pool:
        if dask:
            client = _dask_client(dask)
            threads = sum(client.nthreads().values())
            log.info("training on the Dask cluster at %s: %d workers, %d threads", dask, len(client.nthreads()),
                     threads)
            return cls(jobs=threads, client=client, batch=max(BATCH, 8 * threads),
                       threads=WORKER_THREADS or _openmp_threads())
        if jobs is None:
            from joblib import cpu_count  # the CPUs this process may use (affinity, cgroup quota)

            jobs = 1 if n_series < PARALLEL_MIN_SERIES else cpu_count()
        if jobs < 1:
            raise ValueError(f"jobs must be at least 1, not {jobs}")
        if jobs > 1:
            log.info("training in %d local processes", jobs)
        return cls(jobs=jobs, threads=WORKER_THREADS or _openmp_threads())

    def fit(self, spec: DetectorSpec, tasks: list[tuple[int, tuple[list[np.ndarray], list[int]]]]
            ) -> Iterator[tuple[int, _Fitted]]:
        """Each task's (index, fitted state or message), as the fits complete (in no particular order)."""
        if self.client is None and (self.jobs == 1 or len(tasks) == 1):
            for index, stretches in tasks:
                yield _fit_one(spec, index, stretches)
            return
        from joblib import Parallel, delayed, parallel_config

        if self.client is not None:
            with parallel_config(backend="dask", client=self.client):
                parallel = Parallel(n_jobs=-1, return_as="generator_unordered")
        else:
            parallel = Parallel(n_jobs=min(self.jobs, len(tasks)), backend="loky", return_as="generator_unordered")
        with closing(parallel(delayed(_fit_one)(spec, i, s, self.threads) for i, s in tasks)) as results:
            yield from results

    def close(self) -> None:
        if self.client is not None:
            self.client.close()
            self.client = None


def _one_line(exc: BaseException) -> str:
    text = str(exc).strip().splitlines()
    return f"{type(exc).__name__}: {text[0]}" if text else type(exc).__name__


def _dask_client(address: str) -> Any:
    """A client of the Dask scheduler at ``address`` whose workers run this anomalyd, numpy and scikit-learn;
    RuntimeError (one line, with the fix) otherwise."""
    try:
        import dask.config
        import distributed
        from dask.utils import parse_timedelta
        from distributed.comm import connect
        from distributed.security import Security
    except ImportError as exc:
        raise RuntimeError(f"--dask needs the dask extra ({_one_line(exc)}): pip install 'anomalyd[dask]'"
                           ) from None
    fix = (f"start a scheduler there (`dask scheduler`) and workers (`dask worker {address}`), or fix --dask "
           "(tcp://HOST:8786)")
    timeout = parse_timedelta(dask.config.get("distributed.comm.timeouts.connect"), "s")

    async def probe() -> None:  # a failed Client leaves a noisy, slow finaliser behind: try the address first
        comm = await connect(address, timeout=timeout, **Security().get_connection_args("client"))
        await comm.close()

    try:
        asyncio.run(probe())
        client = distributed.Client(address, set_as_default=False)
    except Exception as exc:  # OSError (refused, timed out), ValueError (not an address), TypeError...
        raise RuntimeError(f"cannot reach the Dask scheduler at {address} ({_one_line(exc)}); {fix}") from None
    try:
        try:
            client.wait_for_workers(1, timeout=timeout)
        except Exception:
            raise RuntimeError(f"the Dask scheduler at {address} has no workers (waited {timeout:g} s); start some: "
                               f"`dask worker {address}` with anomalyd installed") from None
        try:
            theirs = client.run(_versions)
        except Exception as exc:
            raise RuntimeError(f"the Dask workers of {address} cannot run anomalyd's training ({_one_line(exc)});"
                               " install anomalyd (pip install 'anomalyd[dask]') on every worker") from None
        ours = _versions()
        for worker, versions in sorted(theirs.items()):
            if versions != ours:
                diff = ", ".join(f"{k} {versions.get(k)} (here {v})" for k, v in ours.items() if versions.get(k) != v)
                raise RuntimeError(f"Dask worker {worker} runs {diff}: the models would not be what their files "
                                   "record; install the same versions on every worker")
    except BaseException:
        client.close()
        raise
    return client


def refit(cfg: Config, store: Store) -> TrainReport:
    """The daemon's scheduled refit (``daemon.refit_every``): retrain on the training range, resolved now, without
    the windows flagged anomalous. Models that cannot be refitted keep their current version."""
    absolute = [s.name for s in cfg.signals if "now" not in s.train_range.start + s.train_range.end]
    if absolute:
        log.warning("signals %s have an absolute train_range: a refit trains on the same data again; use a "
                    "relative range such as \"last 7 days\"", ", ".join(absolute))
    report = train(cfg, store, progress=False, exclude_anomalous=True)  # in the daemon's process, one series at a time
    if report.failed:
        log.error("refit: %d models could not be refitted and keep their current version: %s", len(report.failed),
                  "; ".join(f"{k}: {v}" for k, v in list(report.failed.items())[:5]))
    if not report.trained and report.failed:
        raise RuntimeError(f"no model could be refitted ({len(report.failed)} failures)")
    return report
