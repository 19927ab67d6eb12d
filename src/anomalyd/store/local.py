"""Start and stop a private ``influxd`` (InfluxDB 1.x) on loopback in a directory of its own.

Used by ``anomalyd demo`` and by the test suite, which both need a real InfluxDB without touching the system's.
"""

from __future__ import annotations

import logging
import os
import shutil
import socket
import subprocess
import time
from pathlib import Path
from typing import Any

import requests

log = logging.getLogger(__name__)


class InfluxdMissingError(FileNotFoundError):
    """No ``influxd`` binary on PATH."""


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


class LocalInfluxd:
    """One ``influxd`` process with its data under ``root``, HTTP on ``127.0.0.1:port``."""

    def __init__(self, root: Path, port: int | None = None) -> None:
        binary = shutil.which("influxd") or ("/usr/bin/influxd" if Path("/usr/bin/influxd").exists() else None)
        if binary is None:
            raise InfluxdMissingError("influxd is not installed; install it with `apt-get install -y influxdb` "
                                      "(Debian/Ubuntu) and try again")
        self.binary = binary
        self.root = root
        self.port = port or free_port()
        self.rpc_port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.proc: subprocess.Popen[bytes] | None = None

    def start(self, timeout_s: float = 30.0) -> LocalInfluxd:
        self.root.mkdir(parents=True, exist_ok=True)
        env = dict(os.environ,
                   INFLUXDB_META_DIR=str(self.root / "meta"), INFLUXDB_DATA_DIR=str(self.root / "data"),
                   INFLUXDB_DATA_WAL_DIR=str(self.root / "wal"),
                   INFLUXDB_HTTP_BIND_ADDRESS=f"127.0.0.1:{self.port}",
                   INFLUXDB_BIND_ADDRESS=f"127.0.0.1:{self.rpc_port}", INFLUXDB_REPORTING_DISABLED="true",
                   INFLUXDB_HTTP_LOG_ENABLED="false", INFLUXDB_DATA_QUERY_LOG_ENABLED="false",
                   INFLUXDB_HTTP_MAX_ROW_LIMIT="0", INFLUXDB_LOGGING_LEVEL="warn",
                   INFLUXDB_MONITOR_STORE_ENABLED="false")
        logf = open(self.root / "influxd.log", "ab")
        self.proc = subprocess.Popen([self.binary], env=env, stdout=logf, stderr=subprocess.STDOUT,
                                     start_new_session=True)
        logf.close()
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError(f"influxd exited with code {self.proc.returncode}; see {self.root}/influxd.log")
            try:
                if requests.get(f"{self.url}/ping", timeout=1).status_code == 204:
                    return self
            except requests.RequestException:
                pass
            time.sleep(0.1)
        self.stop()
        raise TimeoutError(f"influxd did not answer on {self.url} within {timeout_s:.0f}s; see "
                           f"{self.root}/influxd.log")

    def stop(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(15)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(5)
        self.proc = None

    def query(self, q: str, db: str = "") -> dict[str, Any]:
        r = requests.post(f"{self.url}/query", params={"q": q, "db": db, "epoch": "ns"}, timeout=30)
        r.raise_for_status()
        return dict(r.json())

    def write_lines(self, db: str, lines: str | bytes) -> None:
        r = requests.post(f"{self.url}/write", params={"db": db, "precision": "ns"},
                          data=lines if isinstance(lines, bytes) else lines.encode(), timeout=60)
        if r.status_code != 204:
            raise RuntimeError(f"write to {db} failed: HTTP {r.status_code} {r.text}")
