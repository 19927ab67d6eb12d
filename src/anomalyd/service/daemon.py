"""The long-running service: APScheduler 3.x interval job, backoff, signals, health/metrics, systemd notify."""

from __future__ import annotations

import logging
import os
import signal
import socket
import threading
import time
from collections.abc import Callable
from datetime import datetime, timedelta
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any, NamedTuple

from apscheduler.schedulers.background import BackgroundScheduler
from prometheus_client import CONTENT_TYPE_LATEST, generate_latest

from ..config import redact_url
from ..store.base import StoreError
from ..telemetry import LAST_SUCCESS, REFITS, REGISTRY, TICK_SECONDS, TICKS
from .worker import TickReport, Worker

log = logging.getLogger(__name__)


def sd_notify(message: str) -> bool:
    """Send ``message`` (e.g. ``READY=1``) to systemd's ``$NOTIFY_SOCKET``; False when not under systemd."""
    addr = os.environ.get("NOTIFY_SOCKET")
    if not addr:
        return False
    if addr.startswith("@"):
        addr = "\0" + addr[1:]
    try:
        with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM) as s:
            s.connect(addr)
            s.sendall(message.encode())
        return True
    except OSError as exc:
        log.warning("cannot notify systemd at %s: %s", os.environ.get("NOTIFY_SOCKET"), exc)
        return False


#: How often `Service.run_forever` looks whether a signal asked it to stop.
STOP_POLL_S = 0.1
#: Series ids (and reasons) shown per signal in /healthz and the log when series are not scored.
SHOW_UNSCORED = 5


class SignalStatus(NamedTuple):
    """What of one signal was not scored in a tick, and why."""

    signal: str
    failed: str
    problem: str
    unscored: dict[str, str]

    @property
    def nothing_scored(self) -> bool:
        """The signal as a whole scored nothing: it failed, or has a problem (no model, no series)."""
        return bool(self.failed or self.problem)

    def describe(self, show: int = SHOW_UNSCORED) -> str:
        """One line: ``signal cpu: failed: ...; 3 series not scored: host=a (no model), ...``."""
        parts = []
        if self.failed:
            parts.append(f"failed: {self.failed}")
        if self.problem:
            parts.append(self.problem.removeprefix(f"signal {self.signal}: "))
        if self.unscored:
            items = sorted(self.unscored.items())
            shown = ", ".join(f"{sid} ({why})" for sid, why in items[:show])
            more = f", and {len(items) - show} more" if len(items) > show else ""
            parts.append(f"{len(items)} series not scored: {shown}{more}")
        return redact_url(f"signal {self.signal}: " + "; ".join(parts))


def not_scored(report: TickReport) -> list[SignalStatus]:
    """The signals of ``report`` with anything not scored (a failure, a problem, series without a score)."""
    out = []
    for name, rep in report.signals.items():
        if rep.failed or rep.problem or rep.unscored:
            out.append(SignalStatus(name, rep.failed, rep.problem, rep.unscored))
    return out


class Health:
    """Tracks tick outcomes for /healthz: healthy while the last success is recent; degraded while a successful
    tick left anything unscored (a signal failed or has a problem, or series have no score)."""

    def __init__(self, interval_s: float) -> None:
        self.interval_s = interval_s
        self.last_success: float | None = None
        self.last_error: str = ""
        self.consecutive_failures = 0
        self.started = time.time()
        #: The last successful tick's signals with anything not scored, one line each ("" when none).
        self.degraded: str = ""
        self._degraded_key: tuple[Any, ...] = ()
        self._signals = 0

    def observe(self, report: TickReport) -> None:
        """Take a successful tick's report: set `degraded`, and log a line when that status changes."""
        statuses = not_scored(report)
        self._signals = len(report.signals)
        self.degraded = "\n".join(s.describe() for s in statuses)
        key = tuple((s.signal, bool(s.failed), bool(s.problem), frozenset(s.unscored)) for s in statuses)
        if key != self._degraded_key:
            if statuses:
                # A signal's problem alone (no model, no series) was already warned about by the worker, once.
                level = logging.WARNING if any(s.failed or s.unscored for s in statuses) else logging.INFO
                log.log(level, "degraded: %s", "; ".join(s.describe() for s in statuses))
            elif self._degraded_key:
                log.info("no longer degraded: every signal and series is scored")
            self._degraded_key = key

    def body(self) -> tuple[int, str]:
        """The /healthz answer: 200 ``ok``, 200 ``degraded: ...`` or 503 ``unhealthy: ...``."""
        if not self.ok():
            return 503, redact_url(f"unhealthy: {self.last_error or 'no successful tick yet'}\n")
        if self.degraded:
            n = self.degraded.count("\n") + 1
            return 200, (f"degraded: {n} of {self._signals} signal(s) not fully scored\n{self.degraded}\n")
        return 200, "ok\n"

    def ok(self) -> bool:
        # Healthy if a tick succeeded within three intervals (plus a grace period after start-up).
        ref = self.last_success or self.started
        return time.time() - ref <= 3 * self.interval_s + 30 and (
            self.last_success is not None or self.consecutive_failures == 0)


def serve_http(listen: str, health: Health) -> ThreadingHTTPServer:
    """Start /healthz and /metrics on ``host:port`` in a daemon thread."""
    host, _, port = listen.rpartition(":")

    class Handler(BaseHTTPRequestHandler):
        def do_GET(self) -> None:
            if self.path.startswith("/metrics"):
                body, ctype, code = generate_latest(REGISTRY), CONTENT_TYPE_LATEST, 200
            elif self.path.startswith("/healthz"):
                code, text = health.body()
                body, ctype = text.encode(), "text/plain; charset=utf-8"
            else:
                body, ctype, code = b"not found; try /healthz or /metrics\n", "text/plain", 404
            self.send_response(code)
            self.send_header("Content-Type", ctype)
            self.send_header("Content-Length", str(len(body)))
            self.end_headers()
            self.wfile.write(body)

        def log_message(self, format: str, *args: Any) -> None:
            log.debug("http: " + format, *args)

    server = ThreadingHTTPServer((host.strip("[]") or "127.0.0.1", int(port)), Handler)
    threading.Thread(target=server.serve_forever, name="anomalyd-http", daemon=True).start()
    log.info("health and metrics on http://%s/healthz and /metrics", listen)
    return server


class Service:
    """Runs ``worker.tick`` every interval; survives failed ticks with exponential backoff."""

    def __init__(self, worker: Worker, interval_s: float, max_backoff_s: float = 300.0,
                 health_listen: str = "", refit: Callable[[], object] | None = None,
                 refit_every_s: float = 0.0) -> None:
        self.worker = worker
        self.refit = refit
        self.refit_every_s = refit_every_s
        self.interval_s = interval_s
        self.max_backoff_s = max_backoff_s
        self.health = Health(interval_s)
        self.health_listen = health_listen
        self._next_attempt = 0.0
        self._ready = False
        self._stopping = False
        self.scheduler = BackgroundScheduler(job_defaults={"coalesce": True, "max_instances": 1,
                                                         "misfire_grace_time": None})

    def run_tick(self, retry: bool = True) -> TickReport | None:
        """One guarded tick: never raises; failures are logged, counted and backed off (``retry=False``: a single
        tick, as ``run --once``, whose failure is logged without a next try)."""
        now = time.monotonic()
        if now < self._next_attempt:
            sd_notify("WATCHDOG=1")  # backing off, but alive
            return None
        t0 = time.perf_counter()
        try:
            report = self.worker.tick()
        except StoreError as exc:
            self._failed(f"{exc}", traceback=False, retry=retry)
            return None
        except Exception as exc:  # the loop must survive any single bad tick
            self._failed(f"{type(exc).__name__}: {exc}", traceback=True, retry=retry)
            return None
        statuses = not_scored(report)
        if report.signals and len(statuses) == len(report.signals) and all(s.failed for s in statuses):
            # Every signal failed: nothing was scored, so back off as for any failed tick.
            self._failed("every signal failed: " + "; ".join(s.describe() for s in statuses), traceback=False,
                         retry=retry)
            return None
        TICK_SECONDS.observe(time.perf_counter() - t0)
        TICKS.labels(outcome="ok").inc()
        LAST_SUCCESS.set(time.time())
        self.health.last_success = time.time()
        self.health.consecutive_failures = 0
        self.health.observe(report)
        self._next_attempt = 0.0
        if not self._ready:
            self._ready = True
            sd_notify("READY=1")
        sd_notify("WATCHDOG=1")
        log.info("tick: %d windows scored, %d anomalous, %d missing in %.2fs", report.windows,
                 report.anomalous, report.missing, report.seconds)
        return report

    def run_refit(self) -> bool:
        """One guarded refit (retraining on the recent, unflagged data); never raises."""
        if self.refit is None:
            return False
        t0 = time.perf_counter()
        try:
            self.refit()
        except Exception as exc:  # a failed refit keeps the current models; the ticks go on
            REFITS.labels(outcome="failed").inc()
            log.error("refit failed, keeping the current models: %s: %s", type(exc).__name__, exc,
                      exc_info=not isinstance(exc, StoreError))
            return False
        REFITS.labels(outcome="ok").inc()
        log.info("refit done in %.1fs", time.perf_counter() - t0)
        return True

    def _failed(self, msg: str, traceback: bool, retry: bool = True) -> None:
        TICKS.labels(outcome="failed").inc()
        self.health.consecutive_failures += 1
        self.health.last_error = msg
        if not retry:
            log.error("tick failed: %s", msg, exc_info=traceback)
            return
        backoff = min(self.interval_s * 2 ** (self.health.consecutive_failures - 1), self.max_backoff_s)
        self._next_attempt = time.monotonic() + backoff - self.interval_s
        log.error("tick failed (%d in a row), next try in %.0fs: %s", self.health.consecutive_failures,
                  max(backoff, self.interval_s), msg, exc_info=traceback)
        sd_notify("WATCHDOG=1")  # the process is alive and retrying; systemd should not kill it

    def run_forever(self) -> None:
        """Block until SIGTERM/SIGINT; stop cleanly between ticks."""
        server = serve_http(self.health_listen, self.health) if self.health_listen else None
        signal.signal(signal.SIGTERM, self.stop)
        signal.signal(signal.SIGINT, self.stop)
        self.scheduler.add_job(self.run_tick, "interval", seconds=self.interval_s, id="tick",
                               next_run_time=datetime.now())
        if self.refit is not None and self.refit_every_s > 0:
            # Its own job (thread): ticks go on while models are refitted; the catalog swaps them atomically.
            self.scheduler.add_job(self.run_refit, "interval", seconds=self.refit_every_s, id="refit",
                                   next_run_time=datetime.now() + timedelta(seconds=self.refit_every_s))
        try:
            # The scheduler runs in its own thread; this one waits for a signal, then stops it. The handler only
            # sets a flag: stopping the scheduler from inside it could deadlock on a lock this thread holds.
            self.scheduler.start()
            while not self._stopping:
                time.sleep(STOP_POLL_S)
            sd_notify("STOPPING=1")
            self.scheduler.shutdown(wait=True)  # the tick in progress finishes
        finally:
            if server is not None:
                server.shutdown()
            self.close_worker()
            log.info("stopped")

    def stop(self, signum: int, _frame: Any = None) -> None:
        """The SIGTERM/SIGINT handler: ask `run_forever` to stop once the current tick is done. A second signal
        while stopping is logged and ignored (the tick in progress finishes; the exit stays clean)."""
        name = signal.Signals(signum).name
        if self._stopping:
            log.info("received %s, already stopping (after the current tick)", name)
            return
        self._stopping = True
        log.info("received %s, stopping after the current tick", name)

    def close_worker(self) -> None:
        """Let the worker save what it keeps in memory between ticks (the score history)."""
        close = getattr(self.worker, "close", None)
        if close is None:
            return
        try:
            close()
        except OSError as exc:
            log.error("could not save the score history on shutdown: %s", exc)
