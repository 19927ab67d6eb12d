"""The fault suite of issue 14: each failure scenario reproduced on a real influxd, with the counts asserted.

1. influxd stopped (between ticks and in the middle of one) and restarted: 0 windows missing, 0 extra.
2. kill -9 of the daemon process during ticks and during Slack sends, then a clean run: 0 windows missing, 0 alerts
   lost, duplicates only of the messages whose send was killed after Slack had them.
3. Slack answering 429 (Retry-After), 500 and hanging, with daemon restarts in between: every alert once.
4. The state dir read-only, then full (ENOSPC), then healthy: 0 alerts lost, 0 windows missing.
5. One of two signals failing for several ticks: the other is scored every tick and loses no alert; the failing
   one is caught up (0 windows missing) once it recovers.
6. A stopped series: the other series go on, the signal's reads do not widen tick after tick, and a ``deadman``
   alert is delivered once after ``alerts.deadman`` (then ``resumed`` when it scores again).

Expected counts come from the data written: the windows due are the grid of window ends (slide 1: one per sample),
and the alerts due are those a straight, fault-free run of the same worker delivers over the same data
(`fault_helpers.reference_alerts`). The models decide on the window error (``decision="error"``), a per-window
decision that does not depend on the score history a crash shortens, so the alerts due are well defined however
often the daemon dies. Except for (2), which needs a real process to kill, the worker runs in this process on an
injected clock, over data written in the past.

Each test prints one ``fault-suite`` line with its figures (run with ``-s`` to see them).
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
import types
from collections.abc import Callable, Iterator
from dataclasses import replace
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from anomalyd.alerts.manager import AlertManager
from anomalyd.config import Config, load
from anomalyd.core.detector import Detector, DetectorSpec
from anomalyd.demo.synthetic import ecg
from anomalyd.service.catalog import Catalog
from anomalyd.service.state import Watermarks
from anomalyd.service.worker import Worker
from anomalyd.store.influx1 import InfluxDB1Store
from anomalyd.store.local import LocalInfluxd
from conftest import make_config
from fault_helpers import (
    AlertCount,
    Data,
    InfluxProxy,
    KillingSlack,
    KillPoint,
    RecordingStore,
    S,
    Tags,
    Tmpfs,
    WindowCount,
    count_alerts,
    count_windows,
    delivered_keys,
    grid,
    heartbeat,
    mount_allowed,
    reference_alerts,
    try_tick,
    windows_message,
    write_data,
)
from http_stubs import Reply, SlackStub
from test_faults import T0, W, save_model

P1: Tags = (("patient", "p1"),)
P2: Tags = (("patient", "p2"),)
P3: Tags = (("patient", "p3"),)
HEARTBEAT = {"name": "heartbeat", "measurement": "ecg", "field": "value", "group_by": ["patient"], "period": "1s",
             "window": W, "clusters": 8, "decision": "error"}  # as the model (the config's decision applies)
OTHER = {**HEARTBEAT, "name": "other", "measurement": "ecg2"}
ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def fault_model() -> Detector:
    """A small heartbeat model fitted offline: window W, 8 shapes, deciding on the window error."""
    x, _ = ecg(6000, seed=21)
    det = Detector(DetectorSpec(window=W, n_clusters=8, n_init=1, decision="error")).fit([x])
    assert det.window_ == W
    return det


@pytest.fixture
def slack() -> Iterator[SlackStub]:
    stub = SlackStub().start()
    yield stub
    stub.stop()


def suite_config(url: str, db: str, tmp: Path, slack: SlackStub | None, signals: list[dict] | None = None,
                 **alerts: Any) -> Config:
    """A config for the in-process scenarios: no reconstruction points, alerts on the first anomalous window and
    back to OK after 4 normal ones, delivered to the Slack stand-in (0.5 s per attempt, one retry)."""
    cfg = make_config(url, db, tmp, signals=signals or [HEARTBEAT], output={"write_reconstruction": False},
                      alerts={"for_windows": 1, "recover_windows": 4, **alerts})
    if slack is not None:
        cfg = replace(cfg, alerts=replace(cfg.alerts, sinks=("slack",), slack=replace(
            cfg.alerts.slack, webhook_url=slack.webhook_url, timeout_s=0.5, max_retries=1, attach_plot=False)))
    return cfg


def new_worker(cfg: Config, store: Any, now: list[int]) -> Worker:
    """A worker as a (re)started daemon builds it: state read back from the state dir."""
    return Worker(cfg, store, Catalog(cfg.paths.models), Watermarks(cfg.paths.state / "watermarks.json"),
                  AlertManager(cfg.alerts, cfg.paths.state), clock=lambda: now[0])


def two_series(start: int = T0 - 200 * S, n: int = 900, anomalies1: tuple[int, ...] = (),
               anomalies2: tuple[int, ...] = (), seeds: tuple[int, int] = (22, 23)) -> Data:
    return {P1: heartbeat(start, n, seeds[0], [T0 + a * S for a in anomalies1]),
            P2: heartbeat(start, n, seeds[1], [T0 + a * S for a in anomalies2])}


def report(name: str, windows: dict[str, WindowCount], alerts: AlertCount | None, extra: str = "") -> None:
    w = [sum(getattr(c, f) for c in windows.values()) for f in ("expected", "written", "missing", "duplicated")]
    line = f"fault-suite {name}: windows expected {w[0]} written {w[1]} missing {w[2]} duplicated {w[3]}"
    if alerts is not None:
        line += (f"; alerts expected {alerts.expected} delivered {alerts.delivered} lost {alerts.lost} "
                 f"duplicated {alerts.duplicated}")
    print(line + (f"; {extra}" if extra else ""))


def check(windows: dict[str, WindowCount], alerts: AlertCount | None, notes: list[str], context: str = "") -> None:
    problems = list(notes)
    if not all(c.ok for c in windows.values()):
        problems.append("windows: " + windows_message(windows))
    if alerts is not None and not alerts.ok:
        problems.append(f"alerts: expected {alerts.expected}, delivered {alerts.delivered}, lost {alerts.lost}, "
                        f"duplicated {alerts.duplicated}, unexpected {alerts.unexpected}: {alerts.detail}")
    assert not problems, "\n".join(problems + ([context] if context else []))


# -- (1) influxd outage during a run ------------------------------------------------------------------------------


def test_influxd_outage_during_a_run_loses_no_window_and_no_alert(
        tmp_path: Path, fault_model: Detector, slack: SlackStub) -> None:
    """influxd is stopped between ticks (three failed ticks), restarted, then stopped again in the middle of a tick
    (right after that tick's error points reached it) and restarted: every window is written once, every alert
    is delivered once."""
    server = LocalInfluxd(tmp_path / "ifx").start()
    try:
        cfg = suite_config(server.url, "outage", tmp_path, slack)
        store = InfluxDB1Store(cfg.influxdb, cfg.daemon.write_batch)
        store.ensure_database()
        data = two_series(anomalies1=(60, 200, 330, 420), anomalies2=(120, 260, 400))
        write_data(store, "ecg", data)
        for tags in data:
            save_model(cfg, fault_model, tags)
        now = [T0]
        worker = new_worker(cfg, store, now)
        real_write = store.write
        die_in_write = [False]

        def write(points: Any, retention_policy: str = "") -> None:
            items = list(points)
            real_write(items, retention_policy)
            if die_in_write[0] and any(p.measurement == cfg.output.measurement for p in items):
                die_in_write[0] = False
                server.stop()  # the error points are in; whatever the tick does next finds influxd gone

        store.write = write  # type: ignore[method-assign]
        failed: list[int] = []
        plan: list[tuple[int, Callable[[], object] | None]] = [
            (100, None), (160, server.stop), (220, None), (280, None), (340, server.start), (400, None),
            (460, None), (520, server.start), (580, None)]
        for at, before in plan:
            if before is not None:
                before()
            if at == 400:
                die_in_write[0] = True
            now[0] = T0 + at * S
            _, exc = try_tick(worker, now[0])
            if exc is not None:
                failed.append(at)
        assert {160, 220, 280, 460} <= set(failed), f"the ticks while influxd was down did not fail: {failed}"
        assert server.proc is not None
        end = now[0]
        windows = count_windows(server, "outage", "heartbeat", "patient", {"p1": grid(T0, end), "p2": grid(T0, end)})
        expected = reference_alerts(cfg, {"ecg": data}, T0, end, tmp_path / "ref")
        alerts = count_alerts(expected, delivered_keys(slack))
        report("influxd outage", windows, alerts, f"{len(failed)} failed ticks")
        check(windows, alerts, [])
    finally:
        server.stop()


# -- (2) kill -9 during ticks and during Slack sends ------------------------------------------------------------

DAEMON_CONFIG = """
[influxdb]
url = "{url}"
database = "{db}"
timeout = "5s"
retries = 0
[output]
write_reconstruction = false
[paths]
models = "models"
state = "state"
[daemon]
interval = "1s"
lateness = "0s"
max_backoff = "2s"
health_listen = ""
[alerts]
sinks = ["slack"]
for_windows = 1
recover_windows = 4
[alerts.slack]
timeout = "1s"
max_retries = 1
attach_plot = false
[[signals]]
name = "heartbeat"
measurement = "ecg"
field = "value"
group_by = ["patient"]
period = "1s"
clusters = 8
"""


def test_kill_9_during_ticks_and_sends_loses_nothing(influxd: LocalInfluxd, database: str, tmp_path: Path,
                                                    fault_model: Detector) -> None:
    """The daemon (a real ``anomalyd run`` process) is killed with SIGKILL seven times: while its read is in
    flight, right after its error points reached influxd (before it could record alerts or watermarks), and while
    sending to Slack (Slack has accepted the message; the daemon never hears back). Then a clean ``run --once``.
    Every window is written; every alert arrives; the only duplicates are messages whose send was killed."""
    proxy = InfluxProxy(influxd.url).start()
    slack = KillingSlack().start()
    try:
        path = tmp_path / "config.toml"
        path.write_text(DAEMON_CONFIG.format(url=proxy.url, db=database))
        env = {**os.environ, "ANOMALYD_SLACK_WEBHOOK_URL": slack.webhook_url}
        cfg = load(path, env=env)
        real_now = time.time_ns() // S * S
        train_end = real_now - 200 * S
        data_end = real_now + 90 * S  # samples keep coming (written ahead) while the daemon runs
        n = (data_end - (train_end - 200 * S)) // S + 1
        offsets1, offsets2 = (30, 70, 110, 150), (50, 90, 130, 170)
        data = {P1: heartbeat(train_end - 200 * S, n, 22, [train_end + a * S for a in offsets1]),
                P2: heartbeat(train_end - 200 * S, n, 23, [train_end + a * S for a in offsets2])}
        write_data(InfluxDB1Store(replace(cfg.influxdb, url=influxd.url)), "ecg", data)
        for tags in data:
            save_model(cfg, fault_model, tags, train_end=train_end)

        def reads(method: str, path: str, body: bytes) -> bool:
            return path.startswith("/query") and "%22ecg%22" in path

        def error_writes(method: str, path: str, body: bytes) -> bool:
            return path.startswith("/write") and body.startswith(cfg.output.measurement.encode())

        def sends(method: str, path: str, body: bytes) -> bool:
            return True

        # (where, match, nth, after): the nth matching request since the daemon started
        plan: list[tuple[str, Callable[[str, str, bytes], bool], int, bool]] = [
            ("influx", reads, 1, False), ("influx", error_writes, 1, True), ("slack", sends, 1, True),
            ("slack", sends, 2, True), ("slack", sends, 3, True), ("influx", error_writes, 2, True),
            ("influx", reads, 2, False)]
        kills: list[str] = []
        for i, (where, match, nth, after) in enumerate(plan):
            log = tmp_path / f"daemon{i}.log"
            with open(log, "wb") as out:
                proc = subprocess.Popen([sys.executable, "-m", "anomalyd.cli", "run", "-c", str(path)], env=env,
                                        stdout=out, stderr=subprocess.STDOUT, cwd=tmp_path)
            point = KillPoint(proc, match, nth, after)
            if where == "influx":
                proxy.kill_point = point
            else:
                slack.kill_point = point
            try:
                fired = point.fired.wait(30)
            finally:
                proxy.kill_point = slack.kill_point = None
                if proc.poll() is None:
                    proc.kill()
                proc.wait(10)
            tail = log.read_text(errors="replace")[-3000:]
            assert fired, f"kill {i} ({where} request {nth}) never came; the daemon said:\n{tail}"
            assert proc.returncode == -9, (proc.returncode, tail)
            kills.append(point.what)
        # A clean run: it scores every window due when it starts (and records how far in its watermarks).
        started = time.time_ns() // S * S
        clean = subprocess.run([sys.executable, "-m", "anomalyd.cli", "run", "--once", "-c", str(path)], env=env,
                               capture_output=True, text=True, cwd=tmp_path, timeout=60)
        assert clean.returncode == 0, clean.stderr[-3000:]
        marks = set(json.loads((tmp_path / "state" / "watermarks.json").read_text())["watermarks"].values())
        assert len(marks) == 1, marks
        end = marks.pop()
        assert started <= end < data_end, (started, end, data_end)

        expect = grid(train_end, end)
        windows = count_windows(influxd, database, "heartbeat", "patient", {"p1": expect, "p2": expect})
        expected = reference_alerts(cfg, {"ecg": data}, train_end, end, tmp_path / "ref")
        got = delivered_keys(slack)
        alerts = count_alerts(expected, got)
        in_send = sum(1 for k in kills if k.startswith("Slack"))
        # A message whose send was killed after Slack had it may come twice, nothing else.
        allowed = {k: slack.killed_keys.count(k) for k in slack.killed_keys}
        bad_dups = {k: got.count(k) - 1 for k in set(got) if got.count(k) - 1 > allowed.get(k, 0)}
        report("kill -9", windows, alerts, f"{len(kills)} kills, {in_send} inside a Slack send")
        notes = [f"duplicated although no kill hit their send: {bad_dups}"] if bad_dups else []
        assert len(expected) >= 2 * (len(offsets1) + len(offsets2)), expected  # the anomalies written raise alerts
        check(windows, replace(alerts, duplicated=0), notes, "kills: " + "; ".join(kills))
    finally:
        proxy.stop()
        slack.stop()


# -- (3) Slack 429 / 500 / hanging, with restarts -------------------------------------------------------------------


def test_slack_rate_limit_errors_and_hangs_across_restarts_deliver_every_alert_once(
        influxd: LocalInfluxd, database: str, tmp_path: Path, fault_model: Detector, slack: SlackStub) -> None:
    cfg = suite_config(influxd.url, database, tmp_path, slack)
    store = InfluxDB1Store(cfg.influxdb, cfg.daemon.write_batch)
    data = two_series(anomalies1=(60, 200, 330, 420), anomalies2=(120, 260, 400, 520))
    write_data(store, "ecg", data)
    for tags in data:
        save_model(cfg, fault_model, tags)
    now = [T0]
    worker = new_worker(cfg, store, now)
    notes: list[str] = []

    def tick(at: int) -> None:
        now[0] = T0 + at * S
        _, exc = try_tick(worker, now[0])
        if exc is not None:
            notes.append(f"tick at +{at}s raised {type(exc).__name__}: {exc}")

    webhook = slack.WEBHOOK_PATH
    slack.script(Reply.rate_limited(1, path=webhook))  # a short Retry-After: honoured within the tick
    tick(100)
    first = slack.recorded(webhook)
    assert [r.status for r in first[:2]] == [429, 200] and first[1].at - first[0].at >= 1.0, first[:2]
    slack.outage = Reply.rate_limited(30)  # a long one: the alerts stay queued, Slack is left alone
    tick(160)
    tick(220)
    worker = new_worker(cfg, store, now)  # restart
    slack.outage = Reply.error(500)
    tick(280)
    slack.outage = Reply.hang(2.0)
    tick(340)
    worker = new_worker(cfg, store, now)  # restart
    slack.outage = None
    tick(400)
    tick(460)
    tick(580)
    statuses = {r.status for r in slack.requests}
    assert {429, 500, None} <= statuses, statuses  # every fault was met (None: hung up)
    windows = count_windows(influxd, database, "heartbeat", "patient",
                            {"p1": grid(T0, now[0]), "p2": grid(T0, now[0])})
    expected = reference_alerts(cfg, {"ecg": data}, T0, now[0], tmp_path / "ref")
    alerts = count_alerts(expected, delivered_keys(slack))
    report("Slack 429/500/hang", windows, alerts, f"{len(slack.requests)} requests to Slack")
    check(windows, alerts, notes)


# -- (4) state dir read-only, then full ---------------------------------------------------------------------------


@pytest.fixture
def state_fs(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Iterator[Any]:
    """The state dir on a 256 KiB tmpfs that can be made read-only and full for real. Without the right to mount,
    a stand-in: `tempfile.mkstemp` in `anomalyd.files` (every atomic write of watermarks, alert state and outbox
    goes through it) raises OSError(EROFS) or OSError(ENOSPC)."""
    import errno

    import anomalyd.files as files_mod

    path = tmp_path / "state"
    if mount_allowed(tmp_path):
        fs = Tmpfs(path).mount()
        try:
            yield fs
        finally:
            fs.umount()
        return

    class Patched:
        mounted = False
        error: int | None = None

        def __init__(self) -> None:
            real = files_mod.tempfile

            def mkstemp(*args: Any, **kwargs: Any) -> Any:
                if self.error is not None:
                    raise OSError(self.error, os.strerror(self.error))
                return real.mkstemp(*args, **kwargs)

            monkeypatch.setattr(files_mod, "tempfile", types.SimpleNamespace(mkstemp=mkstemp))

        def read_only(self) -> None:
            self.error = errno.EROFS

        def read_write(self) -> None:
            self.error = None

        def fill(self) -> None:
            self.error = errno.ENOSPC

        def unfill(self) -> None:
            self.error = None

    path.mkdir()
    yield Patched()


def test_state_dir_read_only_then_full_loses_no_alert(influxd: LocalInfluxd, database: str, tmp_path: Path,
                                                      fault_model: Detector, slack: SlackStub, state_fs: Any) -> None:
    cfg = suite_config(influxd.url, database, tmp_path, slack)
    assert cfg.paths.state == tmp_path / "state"
    store = InfluxDB1Store(cfg.influxdb, cfg.daemon.write_batch)
    # Anomalies while the state dir is read-only (160-280) and full (280-400).
    data = two_series(anomalies1=(60, 150, 250, 330), anomalies2=(190, 300, 420))
    write_data(store, "ecg", data)
    for tags in data:
        save_model(cfg, fault_model, tags)
    now = [T0]
    worker = new_worker(cfg, store, now)
    outcome: dict[int, str] = {}
    plan: list[tuple[int, Callable[[], object] | None]] = [
        (100, None), (160, state_fs.read_only), (220, None), (280, None),
        (340, lambda: (state_fs.read_write(), state_fs.fill())), (400, None), (460, None),
        (520, state_fs.unfill), (580, None), (640, None)]
    for at, before in plan:
        if before is not None:
            before()
        now[0] = T0 + at * S
        rep, exc = try_tick(worker, now[0])
        failed = [f"{n}: {s.failed}" for n, s in (rep.signals.items() if rep else ()) if getattr(s, "failed", "")]
        outcome[at] = f"raised {type(exc).__name__}: {exc}" if exc else ("; ".join(failed) or "ok")
    faulty = [at for at in (160, 220, 280, 340, 400, 460) if outcome[at] == "ok"]
    assert not faulty, f"ticks that should have met the fault went through: {faulty} ({outcome}; mounted: " \
                       f"{state_fs.mounted})"
    bad_after = {at: o for at, o in outcome.items() if at >= 520 and o != "ok"}
    windows = count_windows(influxd, database, "heartbeat", "patient",
                            {"p1": grid(T0, now[0]), "p2": grid(T0, now[0])})
    expected = reference_alerts(cfg, {"ecg": data}, T0, now[0], tmp_path / "ref")
    alerts = count_alerts(expected, delivered_keys(slack))
    how = "tmpfs remounted ro, then filled" if state_fs.mounted else "mkstemp raising EROFS, then ENOSPC"
    report("state dir read-only then full", windows, alerts, how)
    check(windows, alerts, [f"ticks failed after the state dir was healthy again: {bad_after}"] * bool(bad_after))


# -- (5) one of two signals failing --------------------------------------------------------------------------------


def test_one_failing_signal_neither_blocks_nor_loses_the_other(
        influxd: LocalInfluxd, database: str, tmp_path: Path, fault_model: Detector, slack: SlackStub) -> None:
    """The read of signal ``other`` is rejected by the real influxd for three ticks (the wrapper points it at a
    retention policy that does not exist), then works again."""
    cfg = suite_config(influxd.url, database, tmp_path, slack, signals=[HEARTBEAT, OTHER])
    real = InfluxDB1Store(cfg.influxdb, cfg.daemon.write_batch)
    store = RecordingStore(real)
    beat = two_series(anomalies1=(60, 170, 250, 330), anomalies2=(200, 270))
    other = two_series(anomalies1=(90, 190), anomalies2=(230, 300), seeds=(24, 25))
    write_data(real, "ecg", beat)
    write_data(real, "ecg2", other)
    for tags in beat:
        save_model(cfg, fault_model, tags, signal="heartbeat")
        save_model(cfg, fault_model, tags, signal="other")
    expected = reference_alerts(cfg, {"ecg": beat, "ecg2": other}, T0, T0 + 400 * S, tmp_path / "ref")
    expected_beat = [k for k in expected if k.startswith("heartbeat|")]
    now = [T0]
    worker = new_worker(cfg, store, now)
    notes: list[str] = []
    for at in (100, 160, 220, 280, 340, 400):
        failing = 160 <= at <= 280
        store.reject = {"ecg2"} if failing else set()
        now[0] = T0 + at * S
        rep, exc = try_tick(worker, now[0])
        if exc is not None:
            notes.append(f"tick at +{at}s raised {type(exc).__name__}: {exc}")
        elif failing and not getattr(rep.signals["other"], "failed", ""):
            notes.append(f"tick at +{at}s: signals['other'].failed is empty although its read was rejected")
        # The healthy signal: every window so far written, every alert so far delivered, at this very tick.
        beat_now = count_windows(influxd, database, "heartbeat", "patient",
                                 {"p1": grid(T0, now[0]), "p2": grid(T0, now[0])})
        if not all(c.ok for c in beat_now.values()):
            notes.append(f"tick at +{at}s, heartbeat windows: {windows_message(beat_now)}")
        due = [k for k in expected_beat if int(k.rsplit("|", 1)[1]) <= now[0]]
        got = [k for k in delivered_keys(slack) if k.startswith("heartbeat|")]
        sofar = count_alerts(due, got)
        if not sofar.ok:
            notes.append(f"tick at +{at}s, heartbeat alerts: {sofar.detail}")
    rejected = [r for r in store.reads if r.measurement == "ecg2"]
    assert rejected, "signal other was never read"
    windows = count_windows(influxd, database, "heartbeat", "patient",
                            {"p1": grid(T0, now[0]), "p2": grid(T0, now[0])})
    windows_other = count_windows(influxd, database, "other", "patient",
                                  {"p1": grid(T0, now[0]), "p2": grid(T0, now[0])})
    alerts = count_alerts(expected, delivered_keys(slack))
    both = {**{f"heartbeat {k}": v for k, v in windows.items()}, **{f"other {k}": v for k, v in windows_other.items()}}
    report("one signal failing", both, alerts, f"{len(expected_beat)} alerts of the healthy signal")
    check(both, alerts, notes)


# -- (6) a stopped series -----------------------------------------------------------------------------------------


def _stopped_series_setup(cfg: Config, store: Any, fault_model: Detector, stop: int, resume: int | None,
                          end: int) -> dict[str, np.ndarray]:
    """Three series; p3 has no samples in (T0 + stop, T0 + resume). Returns each series' sample times."""
    data = two_series(n=end + 260)
    t3, x3 = heartbeat(T0 - 200 * S, end + 260, 26)
    keep = (t3 <= T0 + stop * S) | ((t3 >= T0 + resume * S) if resume is not None else False)
    data[P3] = (t3[keep], x3[keep])
    write_data(store, "ecg", data)
    for tags in data:
        save_model(cfg, fault_model, tags)
    return {dict(tags)["patient"]: t for tags, (t, _) in data.items()}


def _complete_windows(times: np.ndarray, lo: int, hi: int) -> tuple[list[int], list[int]]:
    """Window ends in ``(lo, hi]`` whose W samples are all present, and those whose last sample is present but
    not all the others (missing-data windows)."""
    have = set(times.tolist())
    full: list[int] = []
    partial: list[int] = []
    for e in grid(lo, hi):
        if e not in have:
            continue
        (full if all(e - k * S in have for k in range(W)) else partial).append(e)
    return full, partial


def test_a_stopped_series_does_not_widen_the_reads_and_the_others_go_on(
        influxd: LocalInfluxd, database: str, tmp_path: Path, fault_model: Detector) -> None:
    """p3 stops at +100 s and comes back at +260 s; ticks every 10 s. Each read's start is recorded by a thin
    wrapper around the real store."""
    cfg = suite_config(influxd.url, database, tmp_path, None)
    real = InfluxDB1Store(cfg.influxdb, cfg.daemon.write_batch)
    store = RecordingStore(real)
    times = _stopped_series_setup(cfg, real, fault_model, stop=100, resume=260, end=330)
    now = [T0]
    worker = Worker(cfg, store, Catalog(cfg.paths.models), Watermarks(cfg.paths.state / "watermarks.json"),
                    clock=lambda: now[0])
    notes: list[str] = []
    widths: dict[int, int] = {}
    for i, at in enumerate(range(40, 331, 10)):
        store.tick = at
        now[0] = T0 + at * S
        _, exc = try_tick(worker, now[0])
        if exc is not None:
            notes.append(f"tick at +{at}s raised {type(exc).__name__}: {exc}")
        mine = [r for r in store.reads if r.tick == at]
        if mine and i > 0:
            widths[at] = max(r.end_ns - r.start_ns for r in mine) // S
        live = count_windows(influxd, database, "heartbeat", "patient",
                             {"p1": grid(T0, now[0]), "p2": grid(T0, now[0])})
        if not all(c.ok for c in live.values()):
            notes.append(f"tick at +{at}s, live series: {windows_message(live)}")
    # While p3 is stopped (+100 to +260) its last samples stay in the read's context (a window and max_gap
    # samples) for a tick or two, and it may be read on its own from its watermark meanwhile: the widest read
    # may grow by that much, for that long, and then must be back at the live series' width for good.
    steady = max(w for at, w in widths.items() if at <= 100)
    stopped = {at: w for at, w in widths.items() if 100 < at < 260}
    allowance = 2 * W + 10
    settled = {at: w for at, w in stopped.items() if at > 100 + allowance + 10}
    if max(stopped.values()) > steady + allowance or max(settled.values()) > steady:
        notes.append(f"the signal's read widened while p3 was stopped: widest read per tick (s) {widths}; before "
                     f"the stop at most {steady} s; allowed: {steady + allowance} s until +{100 + allowance + 10}s, "
                     f"then {steady} s")
    full, partial = _complete_windows(times["p3"], T0, now[0])
    expected = {"p1": grid(T0, now[0]), "p2": grid(T0, now[0]), "p3": full}
    windows = count_windows(influxd, database, "heartbeat", "patient", expected, gaps={"p3": partial})
    report("stopped series", windows, None, f"widest read per tick: {steady} s before the stop, "
           f"{min(stopped.values())}-{max(stopped.values())} s while stopped, {max(settled.values())} s from "
           f"{allowance + 10} s after the stop on")
    check(windows, None, notes)


def test_a_stopped_series_raises_one_deadman_alert_then_resumed(
        influxd: LocalInfluxd, database: str, tmp_path: Path, fault_model: Detector, slack: SlackStub) -> None:
    """``[alerts] deadman = "30s"``: p3 stops at +100 s (its last window ends there), so the first tick with
    ``now - lateness - watermark > 30 s`` (+140 s) delivers one ``deadman`` alert for it; p3 comes back at +200 s
    and a ``resumed`` alert follows once it is scored again. p1 and p2 get neither."""
    cfg = suite_config(influxd.url, database, tmp_path, slack, deadman="30s")
    assert cfg.alerts.deadman_s == 30
    store = InfluxDB1Store(cfg.influxdb, cfg.daemon.write_batch)
    _stopped_series_setup(cfg, store, fault_model, stop=100, resume=200, end=300)
    now = [T0]
    worker = new_worker(cfg, store, now)
    notes: list[str] = []
    first_seen: dict[str, int] = {}
    for at in range(40, 301, 10):
        now[0] = T0 + at * S
        rep, exc = try_tick(worker, now[0])
        if exc is not None:
            notes.append(f"tick at +{at}s raised {type(exc).__name__}: {exc}")
        elif 140 <= at < 200:  # p3 is reported as not scored while it is silent
            unscored = getattr(rep.signals["heartbeat"], "unscored", {})
            if not any("p3" in k for k in unscored) or any("p1" in k or "p2" in k for k in unscored):
                notes.append(f"tick at +{at}s: signals['heartbeat'].unscored = {unscored} (expected p3 only)")
        for k in delivered_keys(slack):
            first_seen.setdefault(k, at)
    got = delivered_keys(slack)
    kinds = [(k.rsplit("|", 2)[0], k.rsplit("|", 2)[1]) for k in got]
    dead = [k for k in got if k.rsplit("|", 2)[1] == "deadman"]
    resumed = [k for k in got if k.rsplit("|", 2)[1] == "resumed"]
    if len(dead) != 1 or "p3" not in dead[0].rsplit("|", 2)[0]:
        notes.append(f"deadman alerts delivered: {dead} (expected one, for p3); all: {kinds}")
    elif first_seen[dead[0]] != 140:
        notes.append(f"the deadman alert came at the tick of +{first_seen[dead[0]]}s, expected +140s (the first "
                     "tick more than 30 s after p3's last window at +100s)")
    if len(resumed) != 1 or "p3" not in resumed[0].rsplit("|", 2)[0]:
        notes.append(f"resumed alerts delivered: {resumed} (expected one, for p3, after it came back at +200s)")
    elif dead and first_seen[resumed[0]] < first_seen[dead[0]]:
        notes.append("the resumed alert came before the deadman alert")
    elif first_seen[resumed[0]] < 200:
        notes.append(f"the resumed alert came at +{first_seen[resumed[0]]}s, before p3 came back")
    windows = count_windows(influxd, database, "heartbeat", "patient",
                            {"p1": grid(T0, now[0]), "p2": grid(T0, now[0])})
    report("deadman", windows, None, f"deadman alerts {len(dead)}, resumed {len(resumed)}"
           + (f" (deadman at +{first_seen[dead[0]]}s)" if dead else ""))
    check(windows, None, notes)
