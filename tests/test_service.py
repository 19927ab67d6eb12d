"""The service loop: health and metrics endpoint, backoff, systemd notify, SIGTERM between ticks."""

from __future__ import annotations

import logging
import os
import signal
import socket
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest
import requests

from anomalyd.service.daemon import Health, Service, sd_notify, serve_http
from anomalyd.service.worker import SignalReport, TickReport
from anomalyd.store.local import LocalInfluxd, free_port


class FlakyWorker:
    """Fails the first ``failures`` ticks, then succeeds."""

    def __init__(self, failures: int) -> None:
        self.failures = failures
        self.calls = 0

    def tick(self) -> TickReport:
        self.calls += 1
        if self.calls <= self.failures:
            raise RuntimeError(f"boom {self.calls}")
        return TickReport()


def test_failed_ticks_back_off_and_never_raise(caplog: pytest.LogCaptureFixture) -> None:
    svc = Service(FlakyWorker(2), interval_s=0.2, max_backoff_s=10.0)  # type: ignore[arg-type]
    assert svc.run_tick() is None  # first failure: retried at the next regular tick
    assert "tick failed (1 in a row)" in caplog.text and "boom 1" in caplog.text
    assert svc.run_tick() is None and svc.health.consecutive_failures == 2
    assert not svc.health.ok() or svc.health.last_success is None
    # Two failures in a row: the wait doubles, so the next regular tick is skipped without calling the worker.
    assert svc.run_tick() is None
    assert svc.worker.calls == 2  # type: ignore[attr-defined]
    time.sleep(0.25)
    assert svc.run_tick() is not None
    assert svc.health.consecutive_failures == 0 and svc.health.ok()


def test_health_and_metrics_endpoint() -> None:
    health = Health(interval_s=0.01)
    port = free_port()
    server = serve_http(f"127.0.0.1:{port}", health)
    try:
        base = f"http://127.0.0.1:{port}"
        health.consecutive_failures, health.last_error = 1, "InfluxDB unreachable"
        r = requests.get(f"{base}/healthz", timeout=5)
        assert r.status_code == 503 and "InfluxDB unreachable" in r.text
        health.last_success, health.consecutive_failures = time.time(), 0
        assert requests.get(f"{base}/healthz", timeout=5).status_code == 200
        m = requests.get(f"{base}/metrics", timeout=5).text
        for name in ("anomalyd_ticks_total", "anomalyd_tick_duration_seconds", "anomalyd_windows_total",
                     "anomalyd_lag_seconds", "anomalyd_influxdb_errors_total", "anomalyd_alerts_total",
                     "anomalyd_alerts_queued"):
            assert name in m, name
        assert requests.get(f"{base}/nope", timeout=5).status_code == 404
    finally:
        server.shutdown()


def test_sd_notify_reaches_a_datagram_socket(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    path = tmp_path / "notify.sock"
    with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM) as s:
        s.bind(str(path))
        monkeypatch.setenv("NOTIFY_SOCKET", str(path))
        assert sd_notify("READY=1") and sd_notify("WATCHDOG=1")
        assert s.recv(100) == b"READY=1" and s.recv(100) == b"WATCHDOG=1"
    monkeypatch.delenv("NOTIFY_SOCKET")
    assert sd_notify("READY=1") is False


def test_sigterm_stops_the_daemon_cleanly(influxd: LocalInfluxd, database: str, tmp_path: Path) -> None:
    cfg = tmp_path / "config.toml"
    cfg.write_text(f"""
[influxdb]
url = "{influxd.url}"
database = "{database}"
[paths]
models = "models"
state = "state"
[daemon]
interval = "1s"
health_listen = "127.0.0.1:{free_port()}"
[[signals]]
name = "s"
measurement = "m"
field = "v"
period = "1s"
""")
    notify = tmp_path / "n.sock"
    with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM) as s:
        s.bind(str(notify))
        s.settimeout(30)
        proc = subprocess.Popen([sys.executable, "-m", "anomalyd.cli", "run", "-c", str(cfg)],
                                env={**os.environ, "NOTIFY_SOCKET": str(notify)}, stderr=subprocess.PIPE, text=True)
        try:
            assert s.recv(100) == b"READY=1"  # after the first successful tick
            proc.send_signal(signal.SIGTERM)
            _, err = proc.communicate(timeout=30)
            got = []
            s.settimeout(0.5)
            try:
                while True:
                    got.append(s.recv(100))
            except TimeoutError:
                pass
        finally:
            proc.kill()
    assert proc.returncode == 0, err
    assert b"STOPPING=1" in got
    assert "received SIGTERM" in err and "stopped" in err
    assert "apscheduler" not in err, err  # no "Running job" / "executed successfully" line per tick


# -- issue 14: two signals, and the silent states in /healthz ------------------------------------------------


class SlowWorker:
    """A tick that takes ``seconds`` and records that it ran to its end."""

    def __init__(self, seconds: float) -> None:
        self.seconds = seconds
        self.started = threading.Event()
        self.finished = 0

    def tick(self) -> TickReport:
        self.started.set()
        time.sleep(self.seconds)
        self.finished += 1
        return TickReport()


def test_a_second_sigterm_while_stopping_is_harmless(caplog: pytest.LogCaptureFixture) -> None:
    """Two SIGTERMs 0.3 s apart during a tick: the tick finishes, run_forever returns normally (no
    SchedulerNotRunningError), and the second signal is logged as such. Real signals, to this process."""
    worker = SlowWorker(1.0)
    svc = Service(worker, interval_s=60.0)  # type: ignore[arg-type]
    old = signal.getsignal(signal.SIGTERM), signal.getsignal(signal.SIGINT)

    def kill_twice() -> None:
        assert worker.started.wait(10)
        os.kill(os.getpid(), signal.SIGTERM)
        time.sleep(0.3)
        os.kill(os.getpid(), signal.SIGTERM)

    killer = threading.Thread(target=kill_twice)
    try:
        with caplog.at_level(logging.INFO, logger="anomalyd.service.daemon"):
            killer.start()
            svc.run_forever()  # returns once stopped; a traceback here fails the test
    finally:
        signal.signal(signal.SIGTERM, old[0])
        signal.signal(signal.SIGINT, old[1])
        killer.join(5)
    assert worker.finished == 1  # the tick in progress was not abandoned
    assert "received SIGTERM, stopping after the current tick" in caplog.text
    assert "received SIGTERM, already stopping" in caplog.text
    assert "stopped" in caplog.text


def test_the_stop_handler_called_twice_and_before_the_start() -> None:
    svc = Service(FlakyWorker(0), interval_s=1.0)  # type: ignore[arg-type]
    svc.stop(signal.SIGTERM)  # the scheduler is not running yet: no SchedulerNotRunningError
    svc.stop(signal.SIGINT)
    assert svc._stopping


def _report(**signals: SignalReport) -> TickReport:
    return TickReport(signals=dict(signals))


class ReportWorker:
    def __init__(self, *reports: TickReport) -> None:
        self.reports = list(reports)

    def tick(self) -> TickReport:
        return self.reports.pop(0) if len(self.reports) > 1 else self.reports[0]


def _signal(windows: int = 0, problem: str = "", failed: str = "", unscored: dict[str, str] | None = None
            ) -> SignalReport:
    rep = SignalReport(windows=windows, problem=problem)
    # `failed` and `unscored` are the worker's (the lead's change); set them whether or not the dataclass has them
    object.__setattr__(rep, "failed", failed)
    object.__setattr__(rep, "unscored", dict(unscored or {}))
    return rep


def test_healthz_is_degraded_while_anything_is_not_scored(caplog: pytest.LogCaptureFixture) -> None:
    unscored = {f"host=h{i}": "no model" for i in range(7)} | {"host=x": "deadman: no data since 2024-01-01T00:00:00Z"}
    bad = _report(cpu=_signal(10, unscored=unscored), mem=_signal(problem="signal mem: no model in var/models"),
                  disk=_signal(failed="InfluxDB at http://u:pw@db:8086 is unreachable"), net=_signal(5))
    good = _report(cpu=_signal(10), mem=_signal(3), disk=_signal(2), net=_signal(5))
    svc = Service(ReportWorker(bad, bad, good), interval_s=1.0)  # type: ignore[arg-type]
    port = free_port()
    server = serve_http(f"127.0.0.1:{port}", svc.health)
    try:
        with caplog.at_level(logging.INFO, logger="anomalyd.service.daemon"):
            assert svc.run_tick() is not None
            r = requests.get(f"http://127.0.0.1:{port}/healthz", timeout=5)
            assert r.status_code == 200
            lines = r.text.splitlines()
            assert lines[0] == "degraded: 3 of 4 signal(s) not fully scored"
            cpu = next(line for line in lines if line.startswith("signal cpu: "))
            assert "8 series not scored: host=h0 (no model)" in cpu and "and 3 more" in cpu
            assert cpu.count("(no model)") == 5  # up to 5 examples, sorted
            assert "signal mem: no model in var/models" in lines
            disk = next(line for line in lines if line.startswith("signal disk: "))
            assert disk == "signal disk: failed: InfluxDB at http://***@db:8086 is unreachable"  # no password
            assert not any(line.startswith("signal net") for line in lines)
            assert caplog.text.count("degraded: ") == 1
            svc.run_tick()  # the same status: not logged again
            assert caplog.text.count("degraded: ") == 1
            svc.run_tick()  # all scored again
            assert requests.get(f"http://127.0.0.1:{port}/healthz", timeout=5).text == "ok\n"
            assert "no longer degraded" in caplog.text
    finally:
        server.shutdown()


def test_a_tick_in_which_every_signal_failed_counts_as_failed(caplog: pytest.LogCaptureFixture) -> None:
    failed = _report(a=_signal(failed="read failed: timeout"), b=_signal(failed="write failed: HTTP 500"))
    svc = Service(ReportWorker(failed), interval_s=0.2, max_backoff_s=10.0)  # type: ignore[arg-type]
    assert svc.run_tick() is None
    assert svc.health.consecutive_failures == 1
    assert "every signal failed: signal a: failed: read failed: timeout; signal b: failed: write" in caplog.text
    assert svc.health.body()[0] == 503 or svc.health.last_success is None
    # one failing signal of two is a degraded, successful tick
    partly = _report(a=_signal(failed="read failed"), b=_signal(3))
    svc = Service(ReportWorker(partly), interval_s=0.2)  # type: ignore[arg-type]
    assert svc.run_tick() is not None and svc.health.consecutive_failures == 0
    code, body = svc.health.body()
    assert code == 200 and body.startswith("degraded: 1 of 2") and "signal a: failed: read failed" in body
    # no signal at all is not "every signal failed"
    assert Service(ReportWorker(TickReport()), interval_s=0.2).run_tick() is not None  # type: ignore[arg-type]
