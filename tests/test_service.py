"""The service loop: health and metrics endpoint, backoff, systemd notify, SIGTERM between ticks."""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest
import requests

from anomalyd.localinflux import LocalInfluxd, free_port
from anomalyd.service import Health, Service, sd_notify, serve_http
from anomalyd.worker import TickReport


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
