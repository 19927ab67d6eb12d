"""Command line: argument parsing and logging set-up only; the work is done by the modules it calls."""

from __future__ import annotations

import argparse
import logging
import sys
import time
from dataclasses import replace
from pathlib import Path

from . import __version__
from .config import Config, ConfigError, load, parse_duration_ns, parse_time_ns

log = logging.getLogger("anomalyd")


def _parser() -> argparse.ArgumentParser:
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
    sp = cmd("run", "run the daemon: score new windows every interval")
    sp.add_argument("--once", action="store_true", help="run a single tick and exit (for cron and tests)")
    sp.add_argument("--dry-run", action="store_true", help="compute alerts but do not send them")
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
    from . import evaluate

    ev = sub.add_parser("evaluate", help="measure detection quality on labelled data (CSV, NAB, SMD, InfluxDB)",
                        description="measure detection quality on labelled data: F1, point-adjusted F1, window "
                                    "F1, ROC/PR-AUC, NAB scores; tune the threshold from labels")
    evaluate.add_arguments(ev)
    sp = cmd("kapacitor", "render the TICKscripts or define the tasks in Kapacitor")
    sp.add_argument("action", choices=["render", "define"])
    sp.add_argument("--out", type=Path, default=Path("var/tickscripts"),
                    help="where render writes (default %(default)s)")
    sp.add_argument("--url", help="Kapacitor URL (default kapacitor.url from the config)")
    sp.add_argument("--enable", default="stream",
                    help="comma-separated tasks to create enabled: stream, batch, fixed (default %(default)s)")
    return p


def _store(cfg: Config):  # type: ignore[no-untyped-def]
    from .influx import InfluxDB1Store

    return InfluxDB1Store(cfg.influxdb, cfg.daemon.write_batch)


def _worker(cfg: Config, dry_run: bool = False):  # type: ignore[no-untyped-def]
    from .alerts import AlertManager
    from .catalog import Catalog
    from .state import ScoreStates, Watermarks
    from .worker import Worker

    alerts = AlertManager(cfg.alerts, cfg.paths.state, dry_run=dry_run)
    return Worker(cfg, _store(cfg), Catalog(cfg.paths.models), Watermarks(cfg.paths.state / "watermarks.json"),
                  alerts, scores=ScoreStates(cfg.paths.state / "scores.npz"))


def _check(cfg: Config) -> int:
    from .catalog import CatalogError, model_id_for, model_mismatch
    from .catalog import load as load_model
    from .influx import StoreError

    problems = 0
    try:
        version = _store(cfg).ping()
        print(f"ok   InfluxDB {cfg.influxdb.url} answers (version {version})")
    except StoreError as exc:
        print(f"FAIL {exc}")
        problems += 1
    for sig in cfg.signals:
        stem = model_id_for(sig.name, (), "shared")
        paths = [p for p in sorted(cfg.paths.models.glob(f"{stem}*.json"))
                 if p.stem == stem or (p.stem[len(stem) + 1 :].isalnum() and p.stem[len(stem)] == "-")]
        if not paths:
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
                print(f"ok   model {m.model_id} ({m.scope}, window {m.model.window_}, max_error threshold "
                      f"{m.threshold:.4g}, decision score >= {m.model.spec.score_threshold:g})")
    return 1 if problems else 0


def main(argv: list[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    logging.basicConfig(level=logging.DEBUG if args.verbose else logging.INFO,
                        format="%(asctime)s %(levelname)s %(name)s: %(message)s", stream=sys.stderr)
    if args.cmd == "evaluate":  # reads its own inputs (and its own config, for an InfluxDB range)
        from . import evaluate

        return evaluate.run(args)
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


def _dispatch(args: argparse.Namespace, cfg: Config) -> int:
    if args.cmd == "check":
        return _check(cfg)
    if args.cmd == "train":
        from .training import train

        report = train(cfg, _store(cfg), signals=args.signal, exclude_anomalous=args.exclude_anomalous)
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
        from .service import Service
        from .training import refit

        worker = _worker(cfg, dry_run=args.dry_run)
        service = Service(worker, cfg.daemon.interval_s, cfg.daemon.max_backoff_s, cfg.daemon.health_listen,
                          refit=lambda: refit(cfg, _store(cfg)), refit_every_s=cfg.daemon.refit_every_s)
        if args.once:
            ok = service.run_tick() is not None
            service.close_worker()
            return 0 if ok else 1
        service.run_forever()
        return 0
    if args.cmd == "score":
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
        return 0
    if args.cmd == "feed":
        from .demo import feed, feed_live

        store = _store(cfg)
        fed = feed(cfg, store, parse_duration_ns(args.history) / 1e9)
        if args.follow:
            import threading

            feed_live(cfg, store, fed, threading.Event())
        return 0
    if args.cmd == "demo":
        return _demo(args, cfg)
    if args.cmd == "kapacitor":
        from . import kapacitor
        from .catalog import list_models

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


def _demo(args: argparse.Namespace, cfg: Config) -> int:
    import shutil

    from .demo import demo_config, run_demo
    from .localinflux import LocalInfluxd

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
