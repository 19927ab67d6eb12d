"""Tools for the fault suite (tests/test_fault_suite.py): data with injected anomalies, a straight reference run,
counting at InfluxDB and at the Slack stand-in, a recording store wrapper, an InfluxDB proxy and a Slack stand-in
that kill the daemon at chosen moments, and a small tmpfs for the state directory.

Nothing here decides what the expected counts are: they come from the data each test writes (the grid of window
ends) and from a straight, fault-free run of the same worker over the same data.
"""

from __future__ import annotations

import contextlib
import errno
import os
import signal
import subprocess
import threading
import time
from collections import Counter
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field, replace
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any

import numpy as np
import requests

from anomalyd.alerts.manager import AlertManager
from anomalyd.alerts.policy import Transition
from anomalyd.alerts.sinks import Sink
from anomalyd.config import Config
from anomalyd.demo.synthetic import ecg
from anomalyd.service.catalog import Catalog
from anomalyd.service.state import Watermarks
from anomalyd.service.worker import Worker
from anomalyd.store.base import Point, Query, SeriesData, SeriesPoints
from anomalyd.store.local import LocalInfluxd
from http_stubs import Recorded, Reply, SlackStub
from test_faults import FakeStore, points_for, rows

S = 10**9
Tags = tuple[tuple[str, str], ...]
Data = dict[Tags, tuple[np.ndarray, np.ndarray]]


# -- data ---------------------------------------------------------------------------------------------------------


def heartbeat(start_ns: int, n: int, seed: int, anomalies: Sequence[int] = (), width: int = 6,
              amp: float = 8.0) -> tuple[np.ndarray, np.ndarray]:
    """``n`` samples of the synthetic heartbeat at 1 s from ``start_ns``; at each time in ``anomalies`` (epoch ns)
    a bump of ``amp`` standard deviations over ``width`` samples is added."""
    x, _ = ecg(n, seed=seed)
    t = start_ns + np.arange(n, dtype=np.int64) * S
    sd = float(np.std(x))
    for a in anomalies:
        hit = (t >= a) & (t < a + width * S)
        assert hit.any(), f"anomaly at {a} is outside the data"
        x[hit] += amp * sd
    return t, x


def write_data(store: Any, measurement: str, data: Data) -> None:
    for tags, (t, x) in data.items():
        store.write(points_for(measurement, tags, t, x))


def grid(a: int, b: int, step: int = S) -> list[int]:
    """Window ends on the grid in ``(a, b]``: with slide 1, one per sample."""
    return list(range(a + step, b + 1, step))


# -- counting at InfluxDB -----------------------------------------------------------------------------------------


@dataclass
class WindowCount:
    expected: int
    written: int
    missing: int
    extra: int
    duplicated: int
    #: a few of the missing and extra window ends (seconds from the first expected end), for the message
    sample: str = ""

    @property
    def ok(self) -> bool:
        return self.missing == 0 and self.extra == 0 and self.duplicated == 0


def count_windows(influxd: LocalInfluxd, db: str, signal_name: str, tag: str, expected: Mapping[str, Iterable[int]],
                  measurement: str = "anomaly_error", gaps: Mapping[str, Iterable[int]] | None = None
                  ) -> dict[str, WindowCount]:
    """Per series (value of ``tag``), the output points of ``signal_name`` against the window ends expected.

    Points are grouped by *every* tag, so a window written twice under different tags (another model id, another
    series key) counts as duplicated; a window written as missing data counts as missing. ``gaps`` lists, per
    series, the ends of windows that hold a gap: written as missing data, they are neither expected nor extra."""
    q = (f'SELECT "max_error", "missing" FROM "{measurement}" WHERE "signal" = \'{signal_name}\' GROUP BY *')
    got = rows(influxd, db, q)
    out: dict[str, WindowCount] = {}
    for value, ends in expected.items():
        want = set(ends)
        mine = [r for r in got if r.get(tag) == value]
        per_time = Counter(r["time"] for r in mine)
        scored = {r["time"] for r in mine if r["missing"] is False and r["max_error"] is not None}
        missing = sorted(want - scored)
        allowed = {r["time"] for r in mine if r["missing"] is True} & set((gaps or {}).get(value, ()))
        extra = sorted(set(per_time) - want - allowed)
        first = min(want) if want else 0
        sample = ""
        if missing or extra:
            sample = (f"missing {[(m - first) // S for m in missing[:8]]}{'...' if len(missing) > 8 else ''}, "
                      f"extra {[(e - first) // S for e in extra[:8]]}{'...' if len(extra) > 8 else ''}")
        out[value] = WindowCount(len(want), len(scored & want), len(missing), len(extra),
                                 sum(n - 1 for n in per_time.values() if n > 1), sample)
    return out


def windows_message(counts: dict[str, WindowCount]) -> str:
    return "; ".join(f"{k}: expected {c.expected}, written {c.written}, missing {c.missing}, extra {c.extra}, "
                     f"duplicated {c.duplicated} {c.sample}".rstrip() for k, c in counts.items())


# -- alerts -------------------------------------------------------------------------------------------------------


class RecordingSink(Sink):
    """Delivers every alert into a list (the reference run's sink)."""

    name = "record"

    def __init__(self) -> None:
        self.sent: list[Transition] = []

    def send(self, t: Transition, deadline: float) -> None:
        self.sent.append(t)


def reference_alerts(cfg: Config, data_by_measurement: dict[str, Data], train_end: int, end: int,
                     state_dir: Path) -> list[str]:
    """The dedupe keys of the alerts a straight, fault-free run delivers: one tick at ``end`` over the same data
    (in memory), the same models and the same alert policy."""
    sink = RecordingSink()

    class Multi(FakeStore):
        def read(self, query: Query, start_ns: int, end_ns: int) -> SeriesData:
            self.series = data_by_measurement.get(query.measurement, {})
            return super().read(query, start_ns, end_ns)

    store = Multi({})
    manager = AlertManager(cfg.alerts, state_dir / "alerts", sinks=[sink])
    worker = Worker(cfg, store, Catalog(cfg.paths.models), Watermarks(state_dir / "wm.json"), manager,
                    clock=lambda: end)
    worker.tick(now_ns=end)
    assert train_end < end
    return [t.dedupe_key for t in sink.sent]


def alert_key(payload: dict[str, Any]) -> str:
    """The dedupe key of a delivered Slack message (the last context block: ``anomalyd · kind · `key` ``)."""
    text = payload["blocks"][-1]["elements"][0]["text"]
    return str(text.rsplit("`", 2)[1])


def delivered_keys(stub: SlackStub) -> list[str]:
    return [alert_key(p) for p in stub.delivered()]


@dataclass
class AlertCount:
    expected: int
    delivered: int
    lost: int
    duplicated: int
    unexpected: int
    detail: str = ""

    @property
    def ok(self) -> bool:
        return self.lost == 0 and self.duplicated == 0 and self.unexpected == 0


def count_alerts(expected: Sequence[str], delivered: Sequence[str]) -> AlertCount:
    want = Counter(expected)
    assert set(want.values()) <= {1}, f"the reference delivered an alert twice: {want}"
    got = Counter(delivered)
    lost = sorted(set(want) - set(got))
    dup = {k: n - 1 for k, n in got.items() if n > 1}
    unexpected = sorted(set(got) - set(want))
    detail = ""
    if lost or dup or unexpected:
        detail = f"lost {lost[:6]}, duplicated {dict(list(dup.items())[:6])}, unexpected {unexpected[:6]}"
    return AlertCount(len(want), len(set(got) & set(want)), len(lost), sum(dup.values()), len(unexpected), detail)


# -- stores -------------------------------------------------------------------------------------------------------

MISSING_RP = "anomalyd_fault_suite_no_such_rp"


@dataclass
class ReadCall:
    measurement: str
    start_ns: int
    end_ns: int
    tick: int


class RecordingStore:
    """A thin wrapper around a real store: records every read (measurement, start, end, tick number) and, for the
    measurements in ``reject``, reads from a retention policy that does not exist, so the real influxd rejects
    the query ("retention policy not found"). Everything else goes to the real store unchanged."""

    def __init__(self, inner: Any) -> None:
        self.inner = inner
        self.reads: list[ReadCall] = []
        self.reject: set[str] = set()
        self.tick = 0

    def __getattr__(self, name: str) -> Any:
        return getattr(self.inner, name)

    def _query(self, query: Query, start_ns: int, end_ns: int) -> Query:
        self.reads.append(ReadCall(query.measurement, int(start_ns), int(end_ns), self.tick))
        if query.measurement in self.reject:
            return replace(query, retention_policy=MISSING_RP)
        return query

    def read(self, query: Query, start_ns: int, end_ns: int) -> SeriesData:
        return self.inner.read(self._query(query, start_ns, end_ns), start_ns, end_ns)

    def read_batches(self, query: Query, start_ns: int, end_ns: int, size: int) -> Iterator[SeriesData]:
        return self.inner.read_batches(self._query(query, start_ns, end_ns), start_ns, end_ns, size)

    def write(self, points: Iterable[Point | SeriesPoints], retention_policy: str = "") -> None:
        self.inner.write(points, retention_policy)


def try_tick(worker: Worker, now: int) -> tuple[Any, BaseException | None]:
    """``worker.tick(now)``: (report, None), or (None, the exception) when the tick raised."""
    try:
        return worker.tick(now_ns=now), None
    except Exception as exc:  # the faults make ticks fail; the test looks at what was lost
        return None, exc


# -- killing the daemon at chosen moments -------------------------------------------------------------------------


def kill9(proc: subprocess.Popen[Any]) -> None:
    """SIGKILL and reap ``proc`` (the daemon this test started)."""
    with contextlib.suppress(ProcessLookupError):
        os.kill(proc.pid, signal.SIGKILL)
    proc.wait(10)


@dataclass
class KillPoint:
    """Kill ``victim`` at the ``nth`` request (counted from when it was armed) that ``match`` accepts; with
    ``after`` the request is first served (a write lands in influxd; Slack accepts the message)."""

    victim: subprocess.Popen[Any]
    match: Callable[[str, str, bytes], bool]
    nth: int = 1
    after: bool = True
    seen: int = 0
    fired: threading.Event = field(default_factory=threading.Event)
    what: str = ""  # filled when fired: what was being done

    def hit(self, method: str, path: str, body: bytes) -> bool:
        if self.fired.is_set() or not self.match(method, path, body):
            return False
        self.seen += 1
        return self.seen >= self.nth


class _ProxyHandler(BaseHTTPRequestHandler):
    server: _ProxyServer
    protocol_version = "HTTP/1.1"

    def log_message(self, format: str, *args: Any) -> None:
        pass

    def _handle(self) -> None:
        proxy = self.server.proxy
        length = int(self.headers.get("Content-Length") or 0)
        body = self.rfile.read(length) if length else b""
        point = proxy.kill_point
        hit = point is not None and point.hit(self.command, self.path, body)
        if hit and point is not None and not point.after:
            point.what = f"{self.command} {self.path[:60]} (before it reached influxd)"
            kill9(point.victim)
            point.fired.set()
            self.close_connection = True
            return
        headers = {k: v for k, v in self.headers.items()
                   if k.lower() in ("content-type", "accept", "accept-encoding", "authorization")}
        r = requests.request(self.command, proxy.upstream + self.path, data=body, headers=headers, timeout=30)
        if hit and point is not None:
            point.what = f"{self.command} {self.path[:60]} (served by influxd: HTTP {r.status_code})"
            kill9(point.victim)
            point.fired.set()
            self.close_connection = True
            return
        data = r.content
        self.send_response(r.status_code)
        for k, v in r.headers.items():
            if k.lower() in ("content-type", "x-influxdb-version", "x-influxdb-build", "request-id",
                             "x-influxdb-error"):
                self.send_header(k, v)
        self.send_header("Content-Length", str(len(data)))
        self.end_headers()
        if data:
            self.wfile.write(data)

    do_GET = do_POST = _handle


class _ProxyServer(ThreadingHTTPServer):
    daemon_threads = True
    proxy: InfluxProxy

    def handle_error(self, request: Any, client_address: Any) -> None:
        pass  # a daemon killed mid-request leaves a broken pipe: expected here


class InfluxProxy:
    """A forwarding HTTP proxy in front of influxd that can kill the daemon at a chosen request."""

    def __init__(self, upstream: str) -> None:
        self.upstream = upstream.rstrip("/")
        self.kill_point: KillPoint | None = None
        self._server = _ProxyServer(("127.0.0.1", 0), _ProxyHandler)
        self._server.proxy = self
        self._thread = threading.Thread(target=self._server.serve_forever, args=(0.05,), daemon=True)

    @property
    def url(self) -> str:
        host, port = self._server.server_address[:2]
        return f"http://{host!s}:{port}"

    def start(self) -> InfluxProxy:
        self._thread.start()
        return self

    def stop(self) -> None:
        self._server.shutdown()
        self._server.server_close()
        self._thread.join(5)


class KillingSlack(SlackStub):
    """The Slack stand-in; armed with a `KillPoint`, it accepts the matching message (Slack has it) and kills the
    daemon before answering, so the daemon never learns it was delivered: the one case allowed to duplicate."""

    def __init__(self) -> None:
        super().__init__()
        self.kill_point: KillPoint | None = None
        self.killed_keys: list[str] = []
        self._server.handle_error = lambda request, client_address: None  # type: ignore[method-assign]

    def _next_reply(self, rec: Recorded) -> Reply:
        point = self.kill_point
        if point is not None and rec.path == self.WEBHOOK_PATH and point.hit(rec.method, rec.path, rec.body):
            key = alert_key(rec.json) if isinstance(rec.json, dict) else "?"
            self.killed_keys.append(key)
            point.what = f"Slack send of {key} (accepted by Slack)"
            kill9(point.victim)
            point.fired.set()
            return Reply.ok("ok")  # recorded as delivered: the message reached the channel
        return super()._next_reply(rec)


# -- a small tmpfs for the state directory ------------------------------------------------------------------------


class Tmpfs:
    """A 256 KiB tmpfs mounted at ``path`` (root only), to make the state dir read-only or full for real."""

    def __init__(self, path: Path, size: str = "256k") -> None:
        self.path = path
        self.size = size
        self.mounted = False
        self.filler = path / "filler.bin"

    def _run(self, *args: str) -> None:
        subprocess.run(list(args), check=True, capture_output=True, text=True)

    def mount(self) -> Tmpfs:
        self.path.mkdir(parents=True, exist_ok=True)
        self._run("mount", "-t", "tmpfs", "-o", f"size={self.size}", "tmpfs", str(self.path))
        self.mounted = True
        return self

    def read_only(self) -> None:
        self._run("mount", "-o", "remount,ro", str(self.path))

    def read_write(self) -> None:
        self._run("mount", "-o", "remount,rw", str(self.path))

    def fill(self) -> None:
        """Fill the file system: any write of data fails with ENOSPC until `unfill`."""
        fd = os.open(self.filler, os.O_WRONLY | os.O_CREAT | os.O_TRUNC)
        try:
            block = b"\0" * 4096
            while True:
                os.write(fd, block)
        except OSError as exc:
            assert exc.errno == errno.ENOSPC, exc
        finally:
            os.close(fd)
        fd = os.open(self.path / "probe", os.O_WRONLY | os.O_CREAT | os.O_TRUNC)
        try:
            os.write(fd, b"x" * 4096)
        except OSError as exc:
            assert exc.errno == errno.ENOSPC, exc
        else:
            raise AssertionError(f"{self.path} is not full")
        finally:
            os.close(fd)

    def unfill(self) -> None:
        self.filler.unlink(missing_ok=True)
        (self.path / "probe").unlink(missing_ok=True)

    def umount(self) -> None:
        if self.mounted:
            with contextlib.suppress(subprocess.CalledProcessError):
                self.read_write()
            for _ in range(20):
                try:
                    self._run("umount", str(self.path))
                    break
                except subprocess.CalledProcessError:
                    time.sleep(0.1)
            self.mounted = False


def mount_allowed(probe_dir: Path) -> bool:
    """Whether this process may mount a tmpfs (root with CAP_SYS_ADMIN)."""
    fs = Tmpfs(probe_dir / "probe-mount")
    try:
        fs.mount()
    except (subprocess.CalledProcessError, FileNotFoundError, PermissionError):
        return False
    fs.umount()
    return True
