"""The demo: feed synthetic signals with injected anomalies, train, run the daemon, print findings.

Two signals: an ECG-like signal (one field; anomalies every few minutes from the last hour on) for the first
single-field signal, and hosts' cpu, memory and network (Telegraf's ``cpu``, ``mem`` and ``net``; one fault per
host in the last hour, in one metric) for each multi-field signal over those metrics.
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, replace
from datetime import UTC, datetime
from pathlib import Path

import numpy as np

from ..config import Config, SignalConfig
from ..core.records import WindowResult, describe_shares
from ..service import training
from ..service.catalog import Catalog
from ..service.state import ScoreStates, Watermarks
from ..service.worker import Worker
from ..store.base import Point
from ..store.influx1 import InfluxDB1Store
from .synthetic import ANOMALY_KINDS, HOST_METRICS, HostSeries, Injected, ecg, host, inject, inject_host

log = logging.getLogger(__name__)
PATIENTS = ("p1", "p2")
#: Anomalies are injected this long after the start of the fed history's last hour, then every `spacing`.
ANOMALY_SPACING = 600
HOSTS = ("web-1", "web-2")
#: The host faults, one per host in turn: kind, seconds after the start of the fed history's last hour, seconds.
HOST_FAULTS = (("memory_leak", 600, 1200), ("network_drop", 2100, 480))


@dataclass
class FedSeries:
    """One fed series: a patient's ECG (``values``), or a host's metrics (``host``; ``values`` is its load)."""

    tag: str
    origin_ns: int
    values: np.ndarray
    anomalies: list[Injected]
    written: int = 0  # samples already written to InfluxDB
    signal: str = ""  # the signal it feeds
    period_ns: int = 0
    host: HostSeries | None = None

    def points(self, sig: SignalConfig, k: int) -> list[Point]:
        """Sample ``k`` as the points a collector writes: the ECG's one field, or Telegraf's ``cpu``, ``mem`` and
        ``net`` (the signal's and each field's ``where`` tags too)."""
        tag = sig.group_by[0] if sig.group_by else ("host" if self.host is not None else "patient")
        t = self.origin_ns + k * self.period_ns
        if self.host is None:
            return [Point(sig.measurement, ((tag, self.tag), *sig.where), ((sig.field, float(self.values[k])),), t)]
        out = []
        for f in sig.fields:
            v = self.host.metric(f"{f.measurement}.{f.field}")[k]
            value = int(v) if isinstance(v, np.integer) else float(v)  # a counter: an integer, as Telegraf writes it
            out.append(Point(f.measurement, ((tag, self.tag), *sig.where, *f.where), ((f.field, value),), t))
        return out


def make_series(sig: SignalConfig, origin_ns: int, n: int, anomalies_from: int, seed: int) -> FedSeries:
    """A synthetic series of ``n`` samples from ``origin_ns``; anomalies from sample ``anomalies_from`` on."""
    x, beats = ecg(n, seed=seed)
    found: list[Injected] = []
    pos = anomalies_from
    for k in range(n):  # one anomaly at a time, cycling through the kinds, until the series is full
        try:
            x, got = inject(x, beats, (ANOMALY_KINDS[k % len(ANOMALY_KINDS)],), pos, seed=seed + pos)
        except ValueError:  # no whole beat left
            break
        found.extend(got)
        pos = got[-1].end + ANOMALY_SPACING
    return FedSeries("", origin_ns, x, found)


def make_host(sig: SignalConfig, origin_ns: int, n: int, faults_from: int, fault: int, seed: int) -> FedSeries:
    """A synthetic host of ``n`` samples from ``origin_ns``, with fault ``HOST_FAULTS[fault]`` placed from sample
    ``faults_from`` on (the start of the last hour)."""
    period_s = sig.period_ns / 1e9
    h = host(n, period_s, seed=seed)
    kind, after_s, length_s = HOST_FAULTS[fault % len(HOST_FAULTS)]
    start = max(faults_from + round(after_s / period_s), 1)
    length = max(round(length_s / period_s), 1)
    if start + length <= n:
        inject_host(h, kind, start, length)
    return FedSeries("", origin_ns, h.load, list(h.faults), signal=sig.name, period_ns=sig.period_ns, host=h)


def host_signals(cfg: Config) -> list[SignalConfig]:
    """The multi-field signals the host generator can feed: every field one of `HOST_METRICS`."""
    known = {f"{m}.{f}" for m, f in HOST_METRICS}
    return [s for s in cfg.signals if s.multi and all(f"{f.measurement}.{f.field}" in known for f in s.fields)]


def ecg_signal(cfg: Config) -> SignalConfig | None:
    """The signal the ECG feeds: the first single-field signal."""
    return next((s for s in cfg.signals if not s.multi), None)


def feed(cfg: Config, store: InfluxDB1Store, history_s: float, now_ns: int | None = None,
         future_s: float = 86400.0) -> list[FedSeries]:
    """Write ``history_s`` of the demo's signals up to now, anomalies only in their last hour: the ECG of two
    patients for the first single-field signal, and two hosts for each multi-field signal over the host metrics
    (`host_signals`).

    The series are generated ``future_s`` beyond now so :func:`feed_live` can keep writing them live.
    """
    store.ensure_database()
    fed: list[FedSeries] = []
    now0 = time.time_ns() if now_ns is None else now_ns
    sig = ecg_signal(cfg)
    if sig is not None:
        period, origin, n_hist, n_live, anomalies_from = _layout(sig.period_ns, now0, history_s, future_s)
        for i, p in enumerate(PATIENTS):
            s = make_series(sig, origin, n_hist + n_live + 1, anomalies_from + 137 * i, seed=11 + i)
            s.tag, s.written, s.signal, s.period_ns = p, n_hist, sig.name, period
            fed.append(s)
    for sig in host_signals(cfg):
        period, origin, n_hist, n_live, faults_from = _layout(sig.period_ns, now0, history_s, future_s)
        for i, name in enumerate(HOSTS):
            s = make_host(sig, origin, n_hist + n_live + 1, faults_from, i, seed=21 + i)
            s.tag, s.written = name, n_hist
            fed.append(s)
    signals = {s.name: s for s in cfg.signals}
    for name in dict.fromkeys(s.signal for s in fed):
        group = [s for s in fed if s.signal == name]
        n_hist = group[0].written
        step = max(20_000 // len(group[0].points(signals[name], 0)), 1)
        for lo in range(0, n_hist, step):
            store.write([p for s in group for k in range(lo, min(lo + step, n_hist))
                         for p in s.points(signals[name], k)])
        log.info("fed %d samples per series of %s for %s", n_hist, name, ", ".join(s.tag for s in group))
    return fed


def _layout(period: int, now_ns: int, history_s: float, future_s: float) -> tuple[int, int, int, int, int]:
    """A fed signal's grid: its period, first sample, samples of history and of the future, and the first sample
    of the last hour (where the demo injects its anomalies)."""
    n_hist = int(history_s * 1e9 // period)
    origin = now_ns // period * period - n_hist * period
    return period, origin, n_hist, int(future_s * 1e9 // period), max(n_hist - int(3600e9 // period), 0)


def _fmt(ns: int) -> str:
    return datetime.fromtimestamp(ns / 1e9, UTC).strftime("%H:%M:%S")


def _injected_in(r: WindowResult, fed: list[FedSeries]) -> Iterator[tuple[FedSeries, Injected]]:
    """The injected anomalies of the window's series that overlap the window."""
    tags = set(dict(r.key.tags).values())
    for s in fed:
        if s.tag in tags:
            for a in s.anomalies:
                first, last = s.origin_ns + a.start * s.period_ns, s.origin_ns + (a.end - 1) * s.period_ns
                if first <= r.end_ns and last >= r.start_ns:
                    yield s, a


Due = list[tuple[str, Injected, int]]
"""The injected anomalies due by the end of the scored range: the series' tag, the anomaly, its first sample's time."""


def _report(results: list[WindowResult], fed: list[FedSeries], title: str, describe: Callable[[WindowResult, str], str],
            judge: Callable[[WindowResult, FedSeries, Injected], tuple[str, bool]], kinds: str,
            summary: Callable[[Due, dict[tuple[str, int], bool]], str]) -> str:
    """The flagged windows, one line each (``describe``), with what they hit (``judge``: the text and whether the
    window names the injected anomaly), then a line on the injected anomalies due by the end of the scored range,
    and the counts of windows."""
    lines = ["", title]
    flagged = [r for r in results if r.anomalous]
    hit: dict[tuple[str, int], bool] = {}
    for r in sorted(flagged, key=lambda r: (str(r.key), r.end_ns)):
        what = f"no injected {kinds} (false alarm)"
        for s, a in _injected_in(r, fed):
            what, right = judge(r, s, a)
            hit[(s.tag, a.start)] = hit.get((s.tag, a.start), False) or right
        score = f"{r.score:.2f}" if r.score is not None else "-"
        lines.append(f"  {describe(r, score)}  {what}")
    if not flagged:
        lines.append("  (none)")
    scored_until = max((r.end_ns for r in results), default=0)
    due = [(s.tag, a, s.origin_ns + a.start * s.period_ns) for s in fed for a in s.anomalies
           if s.origin_ns + a.end * s.period_ns <= scored_until]
    lines.append(summary(due, hit))
    false = sum(1 for line in lines if line.endswith("(false alarm)"))
    lines.append(f"windows scored: {sum(1 for r in results if not r.missing)}, anomalous: {len(flagged)} ({false} "
                 f"false alarms), missing-data: {sum(1 for r in results if r.missing)}")
    return "\n".join(lines)


def _missed(due: Due, hit: dict[tuple[str, int], bool]) -> str:
    """The missed ones, each with its time: a series holds several anomalies of one kind."""
    missed = [f"{t}:{a.kind} at {_fmt(ns)}" for t, a, ns in due if (t, a.start) not in hit]
    return f", missed: {', '.join(missed)}" if missed else ""


def report_findings(results: list[WindowResult], fed: list[FedSeries]) -> str:
    """Which windows the detector flagged (score, and max_error against its threshold), and which injected anomaly
    they hit."""
    def describe(r: WindowResult, score: str) -> str:
        return (f"{r.key!s:28} {_fmt(r.start_ns)}-{_fmt(r.end_ns)} UTC  score {score}  max_error "
                f"{r.max_error:8.2f} (threshold {r.threshold:7.2f}, x{r.ratio:.2f})")

    def summary(due: Due, hit: dict[tuple[str, int], bool]) -> str:
        caught = sum(1 for t, a, _ in due if (t, a.start) in hit)
        return f"injected anomalies in the scored range: {len(due)}, caught: {caught}" + _missed(due, hit)

    return _report(results, fed, "anomalous windows found:", describe,
                   lambda r, s, a: (f"injected {a.kind}", True), "anomaly", summary)


def report_host_findings(results: list[WindowResult], fed: list[FedSeries], signal: str) -> str:
    """A multi-field signal's flagged windows: score, the fields that explain each (top_fields: name, direction,
    share), and which injected fault they hit, with whether the top field is the faulty metric."""
    def describe(r: WindowResult, score: str) -> str:
        return (f"{r.key!s:18} {_fmt(r.start_ns)}-{_fmt(r.end_ns)} UTC  score {score}  "
                f"{describe_shares(r.attribution) or '-'}")

    def judge(r: WindowResult, s: FedSeries, a: Injected) -> tuple[str, bool]:
        right = (r.attribution[0].field if r.attribution else "") == a.field
        return f"injected {a.kind} ({a.field}" + (")" if right else "; not the top field)"), right

    def summary(due: Due, hit: dict[tuple[str, int], bool]) -> str:
        caught = [(t, a) for t, a, _ in due if (t, a.start) in hit]
        named = [(t, a) for t, a in caught if hit[(t, a.start)]]
        return (f"injected faults in the scored range: {len(due)}, caught: {len(caught)}, named by a flagged "
                f"window's top field: {len(named)}" + _missed(due, hit))

    return _report(results, fed, f"anomalous windows of the multi-field signal {signal!r} (top fields: direction, "
                   "share of the error):", describe, judge, "fault", summary)


def run_demo(cfg: Config, history_s: float = 7 * 3600, live_ticks: int = 3) -> str:
    """Feed, train, catch up, run a few live ticks; return the findings as text."""
    store = InfluxDB1Store(cfg.influxdb, cfg.daemon.write_batch)
    stop = threading.Event()
    fed = feed(cfg, store, history_s)
    # The live feed starts before training, so no gap opens between the history and the live samples.
    live = threading.Thread(target=feed_live, args=(cfg, store, fed, stop), daemon=True)
    live.start()
    report = training.train(cfg, store)
    if report.failed:
        stop.set()
        raise RuntimeError(f"training failed: {report.failed}")
    from ..alerts.manager import AlertManager

    alerts = AlertManager(cfg.alerts, cfg.paths.state)
    worker = Worker(cfg, store, Catalog(cfg.paths.models), Watermarks(cfg.paths.state / "watermarks.json"),
                    alerts, scores=ScoreStates(cfg.paths.state / "scores.npz"))
    results = []
    try:
        first = worker.tick()
        log.info("catch-up tick: %d windows, %d anomalous", first.windows, first.anomalous)
        results.extend(first.results)
        for _ in range(live_ticks):
            time.sleep(cfg.daemon.interval_s)
            rep = worker.tick()
            log.info("live tick: %d windows, %d anomalous", rep.windows, rep.anomalous)
            results.extend(rep.results)
    finally:
        stop.set()
        live.join(5)
        worker.close()
    parts = []
    for name in dict.fromkeys(s.signal for s in fed):
        mine = [r for r in results if r.key.signal == name]
        series = [s for s in fed if s.signal == name]
        if series[0].host is None:
            parts.append(report_findings(mine, series))
        else:
            parts.append(report_host_findings(mine, series, name))
    return "\n".join(parts)


def feed_live(cfg: Config, store: InfluxDB1Store, fed: list[FedSeries], stop: threading.Event) -> None:
    """Keep writing the already generated series' samples as their time comes (each signal at its period)."""
    signals = {s.name: s for s in cfg.signals}
    groups = {name: [s for s in fed if s.signal == name] for name in dict.fromkeys(s.signal for s in fed)}
    # go on from where the history stopped, catching up to now first
    nxt = {name: group[0].written for name, group in groups.items()}
    while not stop.is_set() and any(nxt[n] < len(g[0].values) for n, g in groups.items()):
        now = time.time_ns()
        due = {n: k for n, g in groups.items() for k in [nxt[n]]
               if k < len(g[0].values) and g[0].origin_ns + k * g[0].period_ns <= now}
        if not due:
            time.sleep(0.2)
            continue
        try:
            store.write([p for n, k in due.items() for s in groups[n] for p in s.points(signals[n], k)])
        except Exception as exc:  # the demo feeder must not die with a blip
            log.warning("live feed write failed: %s", exc)
            time.sleep(1)
            continue
        for n, k in due.items():
            nxt[n] = k + 1


def demo_config(cfg: Config, root: Path, url: str) -> Config:
    """The example config pointed at a local InfluxDB and project-local model/state directories."""
    return replace(cfg, influxdb=replace(cfg.influxdb, url=url),
                   paths=replace(cfg.paths, models=root / "models", state=root / "state"))
