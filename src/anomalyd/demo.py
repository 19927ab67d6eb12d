"""The demo: feed a synthetic ECG-like signal with injected anomalies, train, run the daemon, print findings."""

from __future__ import annotations

import logging
import threading
import time
from dataclasses import dataclass, replace
from datetime import UTC, datetime
from pathlib import Path

import numpy as np

from . import training
from .catalog import Catalog
from .config import Config, SignalConfig
from .influx import InfluxDB1Store, Point
from .records import WindowResult
from .state import ScoreStates, Watermarks
from .synthetic import ANOMALY_KINDS, Injected, ecg, inject
from .worker import Worker

log = logging.getLogger(__name__)
PATIENTS = ("p1", "p2")
#: Anomalies are injected this long after the start of the fed history's last hour, then every `spacing`.
ANOMALY_SPACING = 600


@dataclass
class FedSeries:
    tag: str
    origin_ns: int
    values: np.ndarray
    anomalies: list[Injected]
    written: int = 0  # samples already written to InfluxDB


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


def feed(cfg: Config, store: InfluxDB1Store, history_s: float, now_ns: int | None = None,
         future_s: float = 86400.0) -> list[FedSeries]:
    """Write ``history_s`` of the demo signal up to now, anomalies only in its last hour.

    The series are generated ``future_s`` beyond now so :func:`feed_live` can keep writing them live.
    """
    sig = cfg.signals[0]
    period = sig.period_ns
    now = (time.time_ns() if now_ns is None else now_ns) // period * period
    n_hist = int(history_s * 1e9 // period)
    n_live = int(future_s * 1e9 // period)
    origin = now - n_hist * period
    anomalies_from = max(n_hist - int(3600e9 // period), 0)
    store.ensure_database()
    fed = []
    tag = sig.group_by[0] if sig.group_by else "patient"
    for i, p in enumerate(PATIENTS):
        s = make_series(sig, origin, n_hist + n_live + 1, anomalies_from + 137 * i, seed=11 + i)
        s.tag = p
        s.written = n_hist
        fed.append(s)
    for lo in range(0, n_hist, 20_000):
        store.write([Point(sig.measurement, ((tag, s.tag), *sig.where), ((sig.field, float(s.values[k])),),
                           origin + k * period)
                     for s in fed for k in range(lo, min(lo + 20_000, n_hist))])
    log.info("fed %d samples per series for %s", n_hist, ", ".join(s.tag for s in fed))
    return fed


def _fmt(ns: int) -> str:
    return datetime.fromtimestamp(ns / 1e9, UTC).strftime("%H:%M:%S")


def report_findings(results: list[WindowResult], fed: list[FedSeries], period_ns: int) -> str:
    """Which windows the detector flagged (score, and max_error against its threshold), and which injected anomaly
    they hit."""
    lines = ["", "anomalous windows found:"]
    flagged = [r for r in results if r.anomalous]
    hit: set[tuple[str, int]] = set()
    for r in sorted(flagged, key=lambda r: (str(r.key), r.end_ns)):
        series = dict(r.key.tags)
        what = "no injected anomaly (false alarm)"
        for s in fed:
            if s.tag not in series.values():
                continue
            for a in s.anomalies:
                a0, a1 = s.origin_ns + a.start * period_ns, s.origin_ns + (a.end - 1) * period_ns
                if a0 <= r.end_ns and a1 >= r.start_ns:
                    what = f"injected {a.kind}"
                    hit.add((s.tag, a.start))
        score = f"{r.score:.2f}" if r.score is not None else "-"
        lines.append(f"  {r.key!s:28} {_fmt(r.start_ns)}-{_fmt(r.end_ns)} UTC  score {score}  max_error "
                     f"{r.max_error:8.2f} (threshold {r.threshold:7.2f}, x{r.ratio:.2f})  {what}")
    if not flagged:
        lines.append("  (none)")
    scored_until = max((r.end_ns for r in results), default=0)
    due = [(s.tag, a) for s in fed for a in s.anomalies if s.origin_ns + a.end * period_ns <= scored_until]
    missed = [f"{t}:{a.kind}" for t, a in due if (t, a.start) not in hit]
    lines.append(f"injected anomalies in the scored range: {len(due)}, caught: {len(due) - len(missed)}"
                 + (f", missed: {', '.join(missed)}" if missed else ""))
    windows = sum(1 for r in results if not r.missing)
    false = sum(1 for line in lines if line.endswith("(false alarm)"))
    lines.append(f"windows scored: {windows}, anomalous: {len(flagged)} ({false} false alarms), missing-data: "
                 f"{sum(1 for r in results if r.missing)}")
    return "\n".join(lines)


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
    sig = cfg.signals[0]
    from .alerts import AlertManager

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
    return report_findings(results, fed, sig.period_ns)


def feed_live(cfg: Config, store: InfluxDB1Store, fed: list[FedSeries], stop: threading.Event) -> None:
    """Keep writing the already generated series' samples as their time comes."""
    sig = cfg.signals[0]
    tag = sig.group_by[0] if sig.group_by else "patient"
    period = sig.period_ns
    k = fed[0].written  # go on from where the history stopped, catching up to now first
    while not stop.is_set() and k < len(fed[0].values):
        t = fed[0].origin_ns + k * period
        if t > time.time_ns():
            time.sleep(0.2)
            continue
        try:
            store.write([Point(sig.measurement, ((tag, s.tag), *sig.where), ((sig.field, float(s.values[k])),), t)
                         for s in fed])
        except Exception as exc:  # the demo feeder must not die with a blip
            log.warning("live feed write failed: %s", exc)
            time.sleep(1)
            continue
        k += 1


def demo_config(cfg: Config, root: Path, url: str) -> Config:
    """The example config pointed at a local InfluxDB and project-local model/state directories."""
    return replace(cfg, influxdb=replace(cfg.influxdb, url=url),
                   paths=replace(cfg.paths, models=root / "models", state=root / "state"))
