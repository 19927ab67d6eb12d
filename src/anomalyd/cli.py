"""Command line: argument parsing and logging set-up only; the work is done by the modules it calls."""

# Only the standard library is imported at the top: `anomalyd --version` and `--help` load no numpy,
# scikit-learn, config (which loads the detector), InfluxDB client or evaluate. Each subcommand imports what it
# needs in its branch (tests/test_cli.py checks this).
from __future__ import annotations

import argparse
import heapq
import logging
import sys
import time
from collections import Counter
from collections.abc import Iterable, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

from . import __version__

if TYPE_CHECKING:
    from .config import Config

log = logging.getLogger("anomalyd")

#: Installs what ``anomalyd evaluate`` needs beyond the daemon (matplotlib for ``--plots``; the benchmarks' stumpy).
EVALUATE_EXTRA = "pip install 'anomalyd[evaluate]'"

_EVALUATE_HELP = "measure detection quality on labelled data (CSV, NAB, SMD, InfluxDB)"


def _parser(evaluate_options: bool = False) -> argparse.ArgumentParser:
    """The command line. ``evaluate``'s options come from `anomalyd.evaluation.command` (numpy, scikit-learn), so they
    are added only with ``evaluate_options`` (the command line names ``evaluate``); ``anomalyd --help`` lists the
    subcommand all the same."""
    p = argparse.ArgumentParser(prog="anomalyd", description=__doc__)
    p.add_argument("--version", action="version", version=f"anomalyd {__version__}")
    p.add_argument("-v", "--verbose", action="store_true", help="debug logging")
    sub = p.add_subparsers(dest="cmd", required=True)

    def cmd(name: str, help: str) -> argparse.ArgumentParser:
        sp = sub.add_parser(name, help=help, description=help)
        sp.add_argument("-c", "--config", default="config.toml", type=Path, help="TOML config (default %(default)s)")
        return sp

    sp = cmd("train", "fit a model per series (or per signal) from its training range")
    sp.add_argument("--signal", action="append", help="only this signal (repeatable)")
    sp.add_argument("--exclude-anomalous", action="store_true",
                    help="leave out the windows anomalyd flagged anomalous in the training range (a refit on "
                         "recent normal data)")
    where = sp.add_mutually_exclusive_group()
    where.add_argument("--jobs", type=_positive_int, metavar="N",
                       help="fit per-series models in N local processes (default: one per CPU, or 1 when a signal "
                            "has fewer than 32 series)")
    where.add_argument("--dask", metavar="ADDRESS",
                       help="fit per-series models on the Dask cluster whose scheduler is at ADDRESS (such as "
                            "tcp://scheduler:8786); needs the dask extra; the models are saved here")
    sp = cmd("run", "run the daemon: score new windows every interval")
    sp.add_argument("--once", action="store_true", help="run a single tick and exit (for cron and tests)")
    sp.add_argument("--dry-run", action="store_true",
                    help="score as usual and log what would be written and which alerts would be sent, but write "
                         "no point, send no alert, and advance no watermark (no state file is changed)")
    sp = cmd("score", "backfill: score every window in a time range through the same path as run")
    sp.add_argument("--start", required=True, help="RFC 3339 time, 'now' or 'now-2h'")
    sp.add_argument("--end", default="now", help="RFC 3339 time, 'now' or 'now-2h' (default now)")
    sp.add_argument("--alert", action="store_true", help="also pass the results to the alert sinks")
    sp.add_argument("--signal", action="append", help="only this signal (repeatable)")
    cmd("check", "validate the config, InfluxDB connectivity and the models")
    sp = cmd("feed", "write the synthetic demo signal (with injected anomalies) to InfluxDB")
    sp.add_argument("--history", default="7h", help="how much history to write up to now (default 7h)")
    sp.add_argument("--follow", action="store_true", help="keep writing live samples until stopped")
    sp = cmd("demo", "all-in-one: local influxd, feed, train, catch up, live ticks, print findings")
    sp.add_argument("--ticks", type=int, default=3, help="live ticks after the catch-up (default 3)")
    sp.add_argument("--dir", type=Path, default=Path("var/demo"), help="working directory (default var/demo)")
    sp.add_argument("--external", action="store_true", help="use influxdb.url from the config, start no influxd")
    ev = sub.add_parser("evaluate", help=_EVALUATE_HELP,
                        description="measure detection quality on labelled data: F1, point-adjusted F1, window "
                                    "F1, ROC/PR-AUC, NAB scores; tune the threshold from labels")
    if evaluate_options:
        from .evaluation import command as evaluate

        evaluate.add_arguments(ev)
    sp = cmd("kapacitor", "render the TICKscripts or define the tasks in Kapacitor")
    sp.add_argument("action", choices=["render", "define"])
    sp.add_argument("--out", type=Path, default=Path("var/tickscripts"),
                    help="where render writes (default %(default)s)")
    sp.add_argument("--url", help="Kapacitor URL (default kapacitor.url from the config)")
    sp.add_argument("--enable", default="stream,deadman",
                    help="comma-separated tasks to create enabled: stream, batch, fixed, deadman (default "
                         "%(default)s)")
    return p


def _names_evaluate(argv: Sequence[str]) -> bool:
    """Whether the subcommand of ``argv`` is ``evaluate`` (the top-level options take no value, so it is the
    first argument that is not an option)."""
    return next((a for a in argv if not a.startswith("-")), None) == "evaluate"


def _positive_int(text: str) -> int:
    try:
        n = int(text)
    except ValueError:
        n = 0
    if n < 1:
        raise argparse.ArgumentTypeError(f"{text!r} is not a whole number of at least 1")
    return n


def _store(cfg: Config):  # type: ignore[no-untyped-def]
    if cfg.influxdb.api == "flux":
        from .store.influx2 import InfluxDB2FluxStore

        return InfluxDB2FluxStore(cfg.influxdb, cfg.daemon.write_batch)
    from .store.influx1 import InfluxDB1Store

    return InfluxDB1Store(cfg.influxdb, cfg.daemon.write_batch)


class _DryRunStore:
    """Reads through the real store; ``write`` consumes the points (the worker scores while they are drawn),
    counts them per measurement and logs what would have been written."""

    def __init__(self, inner: Any, database: str, sample: int = 5) -> None:
        self._inner = inner
        self._database = database
        self._sample = sample

    def __getattr__(self, name: str) -> Any:  # ping, read, read_batches, query_raw...
        return getattr(self._inner, name)

    def write(self, points: Iterable[Any], retention_policy: str = "") -> None:
        from .store.base import SeriesPoints, line_protocol, series_lines

        counts: Counter[str] = Counter()
        shown: list[str] = []
        for p in points:
            n = p.n_points if isinstance(p, SeriesPoints) else 1
            counts[p.measurement] += n
            if len(shown) < self._sample and log.isEnabledFor(logging.DEBUG):
                shown += (series_lines(p) if isinstance(p, SeriesPoints) else [line_protocol(p)])[: self._sample]
        if counts:
            rp = f", retention policy {retention_policy!r}" if retention_policy else ""
            log.info("dry-run, not written to database %r%s: %s", self._database, rp,
                     ", ".join(f"{n} points of {m}" for m, n in sorted(counts.items())))
            for line in shown[: self._sample]:
                log.debug("dry-run, not written: %s", line)


def _worker(cfg: Config, dry_run: bool = False):  # type: ignore[no-untyped-def]
    from .alerts.manager import AlertManager
    from .service.catalog import Catalog
    from .service.state import ScoreStates, Watermarks
    from .service.worker import Worker, tune_gc

    tune_gc()
    alerts = AlertManager(cfg.alerts, cfg.paths.state, dry_run=dry_run)
    if not dry_run:
        return Worker(cfg, _store(cfg), Catalog(cfg.paths.models), Watermarks(cfg.paths.state / "watermarks.json"),
                      alerts, scores=ScoreStates(cfg.paths.state / "scores.npz"))

    class DryWatermarks(Watermarks):
        """Read from the file and advanced in memory (so that ticks go on from one another), never saved."""

        def save(self) -> None:
            return None

    class DryScores(ScoreStates):
        """The live score history, updated in memory, never saved."""

        def save(self) -> None:
            return None

        close = save

    log.info("dry run: nothing is written to InfluxDB, no alert is sent, no watermark or state file changes")
    return Worker(cfg, _DryRunStore(_store(cfg), cfg.influxdb.database), Catalog(cfg.paths.models),
                  DryWatermarks(cfg.paths.state / "watermarks.json"), alerts,
                  scores=DryScores(cfg.paths.state / "scores.npz"))


def _check(cfg: Config) -> int:
    from .config import redact_url
    from .service.catalog import CatalogError, apply_live_settings, model_id_for, model_mismatch
    from .service.catalog import load as load_model
    from .store.base import StoreError

    problems = 0
    store = _store(cfg)
    reachable = False
    try:
        version = store.ping()
        print(f"ok   InfluxDB {redact_url(cfg.influxdb.url)} answers (version {version})")
        reachable = True
    except StoreError as exc:
        print(f"FAIL {exc}")
        problems += 1
    untrained = set()
    for sig in cfg.signals:
        stem = model_id_for(sig.name, (), "shared")
        paths = [p for p in sorted(cfg.paths.models.glob(f"{stem}*.json"))
                 if p.stem == stem or (p.stem[len(stem) + 1 :].isalnum() and p.stem[len(stem)] == "-")]
        if not paths:
            untrained.add(sig.name)
            print(f"FAIL signal {sig.name}: no model in {cfg.paths.models}; run `anomalyd train -c {cfg.source}`")
            problems += 1
        for path in paths:
            try:
                m = load_model(path)
            except CatalogError as exc:
                print(f"FAIL {exc}")
                problems += 1
                continue
            if m.signal != sig.name:
                continue
            why = model_mismatch(m, sig)
            if why:
                print(f"FAIL model {m.model_id}: {why}")
                problems += 1
            else:
                note = apply_live_settings(m, sig.spec())  # what the daemon scores with
                if note:
                    print(f"WARN {note}")
                print(f"ok   model {m.model_id} ({m.scope}, window {m.model.window_}, max_error threshold "
                      f"{m.threshold:.4g}, decision score >= {m.model.spec.score_threshold:g})")
    if reachable:
        try:
            problems += _check_data(cfg, store, untrained)
        except StoreError as exc:
            print(f"FAIL {exc}")
            problems += 1
    return 1 if problems else 0


def _series_with_data(cfg: Config, store: Any, sig: Any, where: tuple[tuple[str, str], ...], start: int,
                      end: int) -> int:
    """How many series of the signal (filtered by ``where``) have samples in ``[start, end]``: with several
    measurements, the fewest over its measurements (a measurement that stopped shows as 0)."""
    from .store.sources import signal_reads

    return min(_count_series(cfg, store, r.query, start, end) for r in signal_reads(sig, where))


def _count_series(cfg: Config, store: Any, query: Any, start: int, end: int) -> int:
    from .store.base import StoreError
    from .store.influx1 import quote_ident

    query_raw = getattr(store, "query_raw", None)
    if query_raw is None:  # a store without InfluxQL: read the samples
        return len(store.read(query, start, end))
    where = query.where
    rp = cfg.influxdb.retention_policy
    source = (quote_ident(rp) + "." if rp else "") + quote_ident(query.measurement)
    params: dict[str, Any] = {"start": start, "end": end}
    cond = ["time >= $start", "time <= $end"]
    for i, (k, v) in enumerate(where):
        params[f"w{i}"] = v
        cond.append(f"{quote_ident(k)} = $w{i}")
    q = f"SELECT COUNT({quote_ident(query.field)}) FROM {source} WHERE {' AND '.join(cond)}"
    if query.group_by:
        q += " GROUP BY " + ",".join(quote_ident(g) for g in query.group_by)
    n = 0
    for res in query_raw(q, params):
        if "error" in res:
            raise StoreError(f"InfluxDB rejected {q!r}: {res['error']}")
        n += len(res.get("series", []))
    return n


def _access_problem(cfg: Config, exc: Exception) -> str:
    """One line for an InfluxQL query refused for its credentials (HTTP 401) or privileges (403), else ""."""
    from .config import redact_url

    code = getattr(exc.__cause__, "code", None)
    url, db, user = redact_url(cfg.influxdb.url), cfg.influxdb.database, cfg.influxdb.username
    if code == 401:
        if cfg.influxdb.token:
            return (f"InfluxDB at {url} refused the API token (HTTP 401, a query of database {db!r}); set "
                    "ANOMALYD_INFLUXDB_TOKEN (or influxdb.token_file) to a valid token with read and write access")
        who = f"user {user!r}" if user else "no user (ANOMALYD_INFLUXDB_USERNAME is not set)"
        return (f"InfluxDB at {url} refused the credentials of {who} (HTTP 401: authentication is on and ping "
                "works, but queries do not); fix ANOMALYD_INFLUXDB_USERNAME and ANOMALYD_INFLUXDB_PASSWORD (or "
                "influxdb.password_file; ANOMALYD_INFLUXDB_TOKEN for an API token)")
    if code == 403:
        who = f"user {user!r}" if user else "this token"
        return (f"InfluxDB at {url} does not let {who} read database {db!r} (HTTP 403); grant it: GRANT ALL ON "
                f"{db} TO {user or '<user>'} (anomalyd reads and writes), or fix influxdb.database")
    return ""


def _check_fields(cfg: Config, query_raw: Any) -> set[str]:
    """Every signal's measurement exists and has its field as a number (``SHOW FIELD KEYS``); one FAIL line per
    problem. Returns the names of the signals that failed, whose data need not be looked for."""
    from .store.base import StoreError
    from .store.influx1 import quote_ident

    db, rp = cfg.influxdb.database, cfg.influxdb.retention_policy
    failed: set[str] = set()
    fields_of: dict[str, dict[str, set[str]] | None] = {}
    numeric = {"float", "integer", "unsigned"}
    for i, sig in enumerate(cfg.signals):
        for j, f in enumerate(sig.fields):
            key = f"signals[{i}].fields[{j}]" if sig.multi else f"signals[{i}]"
            if f.measurement not in fields_of:
                source = (quote_ident(rp) + "." if rp else "") + quote_ident(f.measurement)
                q = f"SHOW FIELD KEYS FROM {source}"
                found: dict[str, set[str]] | None = None
                for res in query_raw(q):
                    if "error" in res:
                        raise StoreError(f"InfluxDB rejected {q!r}: {res['error']}")
                    for series in res.get("series", []):
                        found = found or {}
                        for k, t in series.get("values", []):  # a field of several types is listed once per type
                            found.setdefault(str(k), set()).add(str(t))
                fields_of[f.measurement] = found
            fields = fields_of[f.measurement]
            if fields is None:
                print(f"FAIL signal {sig.name}: measurement {f.measurement!r} does not exist in database {db!r}"
                      f"{' (retention policy ' + repr(rp) + ')' if rp else ''}; fix {key}.measurement (SHOW "
                      "MEASUREMENTS lists them), or write the data first")
                failed.add(sig.name)
            elif f.field not in fields:
                names = sorted(fields)
                listed = ", ".join(names[:10]) + (f" and {len(names) - 10} more" if len(names) > 10 else "")
                print(f"FAIL signal {sig.name}: measurement {f.measurement!r} has no field {f.field!r} (its "
                      f"fields: {listed}); fix {key}.field")
                failed.add(sig.name)
            elif not fields[f.field] & numeric:
                print(f"FAIL signal {sig.name}: field {f.field!r} of {f.measurement!r} holds "
                      f"{'/'.join(sorted(fields[f.field]))} values, not numbers; point {key}.field at a numeric "
                      "field")
                failed.add(sig.name)
            elif fields[f.field] - numeric - {"boolean"}:
                kinds = "/".join(sorted(fields[f.field]))
                print(f"WARN signal {sig.name}: field {f.field!r} of {f.measurement!r} holds {kinds} values in "
                      f"different shards; InfluxDB returns one type per query, so the others read as gaps; write "
                      f"numbers only to it (or rename the field written as text)")
            else:
                print(f"ok   signal {sig.name}: field {f.measurement}.{f.field} exists "
                      f"({'/'.join(sorted(fields[f.field]))})")
    return failed


def _check_data(cfg: Config, store: Any, untrained: set[str]) -> int:
    """The credentials are accepted and the database exists; every signal's measurement and field exist, every
    signal has recent data (what the next tick scores), and an untrained signal has data in its training range.
    One line per problem, naming the value to fix."""
    from .config import redact_url
    from .core.records import rfc3339
    from .store.base import StoreError
    from .store.sources import describe

    db = cfg.influxdb.database
    query_raw = getattr(store, "query_raw", None)
    skip: set[str] = set()
    if query_raw is not None:
        # A real query: with authentication on, /ping answers whatever the credentials, a query does not.
        try:
            query_raw("SHOW MEASUREMENTS LIMIT 1")
        except StoreError as exc:
            why = _access_problem(cfg, exc)
            if why:
                print(f"FAIL {why}")
                return 1
            raise
        res = query_raw("SHOW DATABASES")
        if res and "error" not in res[0]:
            names = [row[0] for s in res[0].get("series", []) for row in s.get("values", [])]
            if db not in names:
                print(f"FAIL database {db!r} does not exist at {redact_url(cfg.influxdb.url)} (it has: "
                      f"{', '.join(names) or 'none'}); fix influxdb.database (or ANOMALYD_INFLUXDB_DATABASE), or "
                      f"create it: CREATE DATABASE {db}")
                return 1
            print(f"ok   database {db!r} exists")
        skip = _check_fields(cfg, query_raw)
    problems = len(skip)
    now = time.time_ns() // 10**9 * 10**9
    for sig in cfg.signals:
        if sig.name in skip:
            continue
        where_txt = "{" + ", ".join(f"{k} = {v!r}" for k, v in sig.where) + "}"
        what = describe(sig) + (f" where {where_txt}" if sig.where else "")
        if sig.name in untrained:
            start, end = sig.train_range.resolve(now)
            where = tuple(sorted({**dict(sig.where), **dict(sig.train_where)}.items()))
            n = _series_with_data(cfg, store, sig, where, start, end)
            tw = "{" + ", ".join(f"{k} = {v!r}" for k, v in where) + "}"
            if not n:
                print(f"FAIL signal {sig.name}: no data of {describe(sig)}"
                      f"{' where ' + tw if where else ''} in its training range {rfc3339(start)} to "
                      f"{rfc3339(end)} (database {db!r}); fix signals.train_range, measurement, field or where, "
                      f"or write the data first")
                problems += 1
            else:
                print(f"ok   signal {sig.name}: {n} series with data in the training range")
        # The last scoring interval: what the next tick reads (lateness included), at least max_gap + 1 samples.
        span = max(round(cfg.daemon.interval_s * 1e9), (sig.max_gap + 1) * sig.period_ns) + cfg.daemon.lateness_ns
        n = _series_with_data(cfg, store, sig, sig.where, now - span, now)
        if not n:
            print(f"FAIL signal {sig.name}: no data of {what} since {rfc3339(now - span)} (the last scoring "
                  f"interval, {span / 1e9:g}s) in database {db!r}; check that the collector writes it, and "
                  f"signals.measurement, field and where")
            problems += 1
        else:
            print(f"ok   signal {sig.name}: {n} series with data in the last {span / 1e9:g}s")
    return problems


def _setup_logging(verbose: bool) -> None:
    logging.basicConfig(level=logging.DEBUG if verbose else logging.INFO,
                        format="%(asctime)s %(levelname)s %(name)s: %(message)s", stream=sys.stderr)
    # APScheduler logs two INFO lines per tick ("Running job", "executed successfully"); its warnings (a missed
    # tick) and errors stay. With -v its lines are shown as well.
    logging.getLogger("apscheduler").setLevel(logging.DEBUG if verbose else logging.WARNING)


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else list(argv)
    try:
        parser = _parser(evaluate_options=_names_evaluate(argv))
    except ModuleNotFoundError as exc:  # evaluate needs a module of its extra
        print(f"anomalyd evaluate: {exc.name} is not installed; {EVALUATE_EXTRA}", file=sys.stderr)
        return 2
    args = parser.parse_args(argv)
    _setup_logging(args.verbose)
    if args.cmd == "evaluate":  # reads its own inputs (and its own config, for an InfluxDB range)
        return _evaluate(args)
    from .config import ConfigError, load

    try:
        cfg = load(args.config)
    except ConfigError as exc:
        print(f"anomalyd: {exc}", file=sys.stderr)
        return 2
    try:
        return _dispatch(args, cfg)
    except KeyboardInterrupt:
        return 130
    except (OSError, ValueError, RuntimeError) as exc:
        log.debug("failure", exc_info=True)
        print(f"anomalyd {args.cmd}: {exc}", file=sys.stderr)
        return 1


def _evaluate(args: argparse.Namespace) -> int:
    from importlib.util import find_spec

    if args.plots is not None and find_spec("matplotlib") is None:
        print(f"anomalyd evaluate: --plots needs matplotlib, which is not installed; {EVALUATE_EXTRA}",
              file=sys.stderr)
        return 2
    from .evaluation import command as evaluate

    return evaluate.run(args)


def _dispatch(args: argparse.Namespace, cfg: Config) -> int:
    if args.cmd == "check":
        return _check(cfg)
    if args.cmd == "train":
        from .service.training import train

        report = train(cfg, _store(cfg), signals=args.signal, exclude_anomalous=args.exclude_anomalous,
                       jobs=args.jobs, dask=args.dask)
        for m in report.trained:
            print(f"trained {m.model_id}: window {m.model.window_}, {len(m.model.catalog_.cluster_centers_)} shapes, "
                  f"max_error threshold {m.threshold:.4g}")
        for key, why in report.failed.items():
            print(f"FAILED  {key}: {why}", file=sys.stderr)
        if report.failed:
            print(f"anomalyd train: {len(report.failed)} of {len(report.failed) + len(report.trained)} failed "
                  "(see above); those series are not scored until they are trained", file=sys.stderr)
        return 1 if report.failed else 0
    if args.cmd == "run":
        from .service.daemon import Service
        from .service.training import refit

        worker = _worker(cfg, dry_run=args.dry_run)
        service = Service(worker, cfg.daemon.interval_s, cfg.daemon.max_backoff_s, cfg.daemon.health_listen,
                          refit=lambda: refit(cfg, _store(cfg)), refit_every_s=cfg.daemon.refit_every_s)
        if args.once:
            tick = service.run_tick(retry=False)
            service.close_worker()
            if tick is None:  # the failure (or "every signal failed: ...") is logged
                return 1
            return _nothing_scored(tick, "run --once")
        service.run_forever()
        return 0
    if args.cmd == "score":
        from dataclasses import replace

        from .config import parse_time_ns

        now = time.time_ns()
        start, end = parse_time_ns(args.start, now), parse_time_ns(args.end, now)
        if start >= end:
            raise ValueError(f"--start {args.start} must be before --end {args.end}")
        if args.signal:
            unknown = sorted(set(args.signal) - {s.name for s in cfg.signals})
            if unknown:
                raise ValueError(f"--signal {', '.join(unknown)}: not a signal of {cfg.source}; configured: "
                                 f"{', '.join(s.name for s in cfg.signals)}")
            cfg = replace(cfg, signals=tuple(s for s in cfg.signals if s.name in args.signal))
        report = _worker(cfg).score_range(start, end, alert=args.alert)
        print(f"scored {report.windows} windows: {report.anomalous} anomalous, {report.missing} missing-data "
              f"in {report.seconds:.2f}s")
        _print_anomalous(report, cfg.output.measurement)
        return _nothing_scored(report, "score")
    if args.cmd == "feed":
        from .config import parse_duration_ns
        from .demo.run import feed, feed_live

        store = _store(cfg)
        fed = feed(cfg, store, parse_duration_ns(args.history) / 1e9)
        if args.follow:
            import threading

            feed_live(cfg, store, fed, threading.Event())
        return 0
    if args.cmd == "demo":
        return _demo(args, cfg)
    if args.cmd == "kapacitor":
        from .alerts import kapacitor
        from .service.catalog import list_models

        models = list_models(cfg.paths.models)
        enable = tuple(e.strip() for e in args.enable.split(",") if e.strip())
        if args.action == "render":
            for path in kapacitor.render(cfg, args.out, models, enable=enable):
                print(f"wrote {path}")
        else:
            for task in kapacitor.define(cfg, args.url or cfg.kapacitor.url, args.out, models, enable=enable):
                print(f"defined {task}")
        return 0
    raise AssertionError(args.cmd)  # pragma: no cover


def _nothing_scored(report: Any, cmd: str) -> int:
    """Print (stderr) every signal with anything not scored and why; 1 when no signal could be scored at all
    (each failed, or has no model or no series), else 0."""
    from .service.daemon import not_scored

    statuses = not_scored(report)
    for st in statuses:
        print(st.describe(), file=sys.stderr)
    dead = [st for st in statuses if st.nothing_scored]
    if report.signals and len(dead) == len(report.signals):
        print(f"anomalyd {cmd}: nothing could be scored: each of the {len(dead)} signal(s) failed or has no "
              "model or no series (the lines above say why)", file=sys.stderr)
        return 1
    return 0


SHOW_ANOMALOUS = 20  # windows listed by `anomalyd score`; the rest are counted


def _print_anomalous(report: Any, measurement: str, limit: int | None = None) -> None:
    """The anomalous windows of a backfill, earliest first, at most ``limit`` (`SHOW_ANOMALOUS`) of them."""
    from .core.records import rfc3339

    limit = SHOW_ANOMALOUS if limit is None else limit
    rows = ((end, str(b.key), score, err, b.threshold)
            for b in report.blocks
            for end, anom, score, err in zip(b.ends, b.anomalous, b.score, b.max_error, strict=True) if anom)
    first = heapq.nsmallest(limit, rows)
    if not first:
        return
    print("anomalous windows (series, window end, score, max_error against the threshold):")
    for end, key, score, err, thr in first:
        ratio = f"x{err / thr:.2f}" if thr > 0 else ""
        print(f"  {key:30} {rfc3339(end)}  score {score:.3f}  max_error {err:10.4g}  threshold {thr:10.4g}  "
              f"{ratio}")
    more = report.anomalous - len(first)
    if more > 0:
        print(f"  ... and {more} more (every window is in the measurement {measurement!r}: anomalous = true)")


def _demo(args: argparse.Namespace, cfg: Config) -> int:
    import shutil

    from .demo.run import demo_config, run_demo
    from .store.local import LocalInfluxd

    root = args.dir.resolve()
    for sub in ("models", "state"):
        shutil.rmtree(root / sub, ignore_errors=True)
    server = None
    url = cfg.influxdb.url
    if not args.external:
        shutil.rmtree(root / "influxdb", ignore_errors=True)
        server = LocalInfluxd(root / "influxdb").start()
        url = server.url
        print(f"started influxd on {url} (data in {root / 'influxdb'})")
    try:
        print(run_demo(demo_config(cfg, root, url), live_ticks=args.ticks))
    finally:
        if server is not None:
            server.stop()
    return 0


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
