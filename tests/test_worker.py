"""The worker end to end through a real InfluxDB: the reference EKG case, the synthetic signal, catch-up."""

from __future__ import annotations

import time
from dataclasses import replace
from pathlib import Path

import numpy as np
import pytest

from anomalyd import training
from anomalyd.catalog import Catalog
from anomalyd.config import Config, load
from anomalyd.demo import feed
from anomalyd.influx import InfluxDB1Store
from anomalyd.kapacitor import render
from anomalyd.localinflux import LocalInfluxd
from anomalyd.state import Watermarks
from anomalyd.synthetic import ANOMALY_KINDS
from anomalyd.worker import Worker
from test_kapacitor import batch_query, kapacitor_range

ROOT = Path(__file__).resolve().parents[1]
EKG_T0 = 1536778426 * 10**9  # first sample of ../shared/data/ekg/*.txt
EKG_ANOMALIES = [(210, 214), (8010, 8013)]  # 0-based inclusive sample ranges set to 0 in anomaly.txt


def output_rows(influxd: LocalInfluxd, db: str, measurement: str = "anomaly_error", where: str = "") -> list[dict]:
    res = influxd.query(f'SELECT * FROM "{measurement}" {where}', db)["results"][0]
    rows = []
    for s in res.get("series", []):
        cols = s["columns"]
        rows.extend(dict(zip(cols, v, strict=True)) for v in s["values"])
    return rows


@pytest.fixture
def ekg(influxd: LocalInfluxd, database: str, tmp_path: Path, shared_data: Path) -> Config:
    """The shipped examples/ekg/config.toml pointed at the test server, with the reference data loaded."""
    for name in ("norm.txt", "anomaly.txt"):
        influxd.write_lines(database, (shared_data / "ekg" / name).read_bytes())
    cfg = load(ROOT / "examples" / "ekg" / "config.toml", env={})
    return replace(cfg, influxdb=replace(cfg.influxdb, url=influxd.url, database=database),
                   paths=replace(cfg.paths, models=tmp_path / "models", state=tmp_path / "state"))


def test_reference_ekg_case(ekg: Config, influxd: LocalInfluxd, database: str, tmp_path: Path) -> None:
    store = InfluxDB1Store(ekg.influxdb)
    report = training.train(ekg, store)
    assert not report.failed and [m.model_id for m in report.trained] == ["ekg"]
    threshold = report.trained[0].threshold
    worker = Worker(ekg, store, Catalog(ekg.paths.models), Watermarks(ekg.paths.state / "wm.json"))
    rep = worker.score_range(EKG_T0 - 60 * 10**9, EKG_T0 + 8192 * 10**9)
    assert rep.signals["ekg"].series == 1

    rows = output_rows(influxd, database)
    assert {r["type"] for r in rows} == {"anomaly"} and {r["model"] for r in rows} == {"ekg"}
    # Windows that are complete inside the data; their last sample is the point's timestamp.
    first = {(r["time"] - EKG_T0) // 10**9 - 31: r for r in rows}
    complete = {s: r for s, r in first.items() if 0 <= s and s + 31 < 8192}
    assert len(complete) >= 8192 // 16 - 2
    # Only windows reaching past either end of the data are missing-data windows.
    assert all(r["missing"] == (s not in complete) for s, r in first.items())
    assert all(r["threshold"] == pytest.approx(threshold) for r in rows)

    def covers(start: int, a: tuple[int, int]) -> bool:
        return start <= a[1] and start + 31 >= a[0]

    first_dropout = [r for s, r in complete.items() if covers(s, EKG_ANOMALIES[0])]
    assert any(r["anomalous"] for r in first_dropout), [r["max_error"] for r in first_dropout]
    normal = [r for s, r in complete.items() if not any(covers(s, a) for a in EKG_ANOMALIES)]
    flagged = [(s, r["max_error"]) for s, r in complete.items() if r["anomalous"] and
               not any(covers(s, a) for a in EKG_ANOMALIES)]
    assert not flagged, f"false alarms on normal windows: {flagged} (threshold {threshold:.2f})"
    # The Kapacitor batch task's query, rendered for this config, returns exactly the anomalous windows.
    render(ekg, tmp_path / "tick", report.trained)
    q = kapacitor_range(batch_query(tmp_path / "tick"), EKG_T0 - 60 * 10**9, EKG_T0 + 8300 * 10**9)
    res = influxd.query(q, database)["results"][0]
    got = {v[0] for s in res.get("series", []) for v in s["values"]}
    assert got == {r["time"] for r in rows if r["anomalous"]} and got
    second = max(r["max_error"] for s, r in complete.items() if covers(s, EKG_ANOMALIES[1]))
    # Reported, not asserted: the second dropout sits on a beat's steep edge (see README).
    print(f"\nEKG: threshold {threshold:.2f}; first dropout max {max(r['max_error'] for r in first_dropout):.2f}; "
          f"second dropout max {second:.2f} ({second / threshold:.2f}x); normal max "
          f"{max(r['max_error'] for r in normal):.2f}")
    second_dropout = [r for s, r in complete.items() if covers(s, EKG_ANOMALIES[1])]
    print(f"EKG score: first dropout max {max(r['score'] for r in first_dropout):.2f}, second dropout max "
          f"{max(r['score'] for r in second_dropout):.2f}, normal windows >= 0.5: "
          f"{sum(r['score'] >= 0.5 for r in normal)} of {len(normal)} (max {max(r['score'] for r in normal):.2f})")


def _fresh_worker(cfg: Config, store: InfluxDB1Store, clock: object = time.time_ns) -> Worker:
    return Worker(cfg, store, Catalog(cfg.paths.models), Watermarks(cfg.paths.state / "watermarks.json"),
                  clock=clock)  # type: ignore[arg-type]


def test_synthetic_signal_catch_up_flags_every_injected_anomaly(cfg: Config, store: InfluxDB1Store,
                                                                 influxd: LocalInfluxd, database: str) -> None:
    now = time.time_ns() // 10**9 * 10**9
    fed = feed(cfg, store, 7 * 3600, now_ns=now, future_s=0)
    assert not training.train(cfg, store, now_ns=now, progress=False).failed
    worker = _fresh_worker(cfg, store, clock=lambda: now)
    report = worker.tick()
    # Catch-up starts at the end of the training range (now - 1h): 3600 s / 16 s windows per series.
    assert report.signals["heartbeat"].series == 2
    assert report.windows == pytest.approx(2 * 3600 / 16, abs=4)
    flagged = [r for r in report.results if r.anomalous]
    injected = [a for s in fed for a in s.anomalies if s.origin_ns + a.end * 10**9 <= now]
    assert {a.kind for a in injected} == set(ANOMALY_KINDS) and len(injected) >= 8
    for s in fed:
        for a in s.anomalies:
            a0, a1 = s.origin_ns + a.start * 10**9, s.origin_ns + (a.end - 1) * 10**9
            if a1 >= now:
                continue
            assert any(dict(r.key.tags)["patient"] == s.tag and r.start_ns <= a1 and r.end_ns >= a0
                       for r in flagged), f"{s.tag} {a.kind} not flagged"
    for r in flagged:
        tag = dict(r.key.tags)["patient"]
        s = next(f for f in fed if f.tag == tag)
        assert any(s.origin_ns + a.start * 10**9 <= r.end_ns and s.origin_ns + (a.end - 1) * 10**9 >= r.start_ns
                   for a in s.anomalies), f"false alarm at {r.key} {r.end_ns}: {r.max_error:.2f} vs {r.threshold:.2f}"
    # The likelihood score (0..1, >= 0.5 is its red zone) gives no false alarm on a normal window (one that
    # neither covers an anomaly nor starts within a window's length after one) and reaches
    # the red zone on most injected anomalies (measured 6 to 9 of 10 across runs, as the grid phase moves with the
    # clock: it is the weaker signal on this data; the threshold on max_error above catches all of them).
    covering, normal = [], []
    for r in report.results:
        if r.missing:
            continue
        s = next(f for f in fed if f.tag == dict(r.key.tags)["patient"])
        hit = any(s.origin_ns + a.start * 10**9 <= r.end_ns and s.origin_ns + (a.end - 1) * 10**9 >= r.start_ns
                  for a in s.anomalies)
        # The score averages a window's error with the previous window's (about one window's span), so the
        # window right after an anomaly may still score high: a late echo of it, not a false alarm.
        echo = any(0 < r.start_ns - (s.origin_ns + (a.end - 1) * 10**9) <= 32 * 10**9 for a in s.anomalies)
        if hit:
            covering.append(r)
        elif not echo:
            normal.append(r)
    best = [max((r.score for r in covering if dict(r.key.tags)["patient"] == s.tag and r.start_ns <= a1
                 and r.end_ns >= a0), default=0.0)
            for s in fed for a in s.anomalies
            for a0, a1 in [(s.origin_ns + a.start * 10**9, s.origin_ns + (a.end - 1) * 10**9)] if a1 < now]
    print(f"\nscore >= 0.5 on {sum(b >= 0.5 for b in best)}/{len(best)} injected anomalies, "
          f"{sum(r.score >= 0.5 for r in normal)}/{len(normal)} normal windows")
    assert all(r.score is not None and 0.0 <= r.score <= 1.0 for r in covering + normal)
    assert not [r for r in normal if r.score >= 0.5]
    assert sum(b >= 0.5 for b in best) * 2 > len(best)
    # Written once per window, with the documented fields; the reconstruction was written too.
    rows = output_rows(influxd, database)
    assert len(rows) == report.windows + report.missing
    assert {"max_error", "threshold", "anomalous", "score", "missing", "series", "model", "signal",
            "patient"} <= set(rows[0])
    recon = output_rows(influxd, database, "anomaly_reconstruction", "LIMIT 100")
    assert recon and all(abs(r["reconstruction"] - r["value"]) < 60 for r in recon)
    stats = output_rows(influxd, database, "anomalyd_stats")
    assert stats and stats[0]["windows"] == report.windows

    # A second tick at the same time finds nothing new; re-scoring the range overwrites the same points.
    assert _fresh_worker(cfg, store, clock=lambda: now).tick().windows == 0
    worker.score_range(now - 3600 * 10**9, now)
    again = output_rows(influxd, database)
    assert len(again) == len(rows)


def test_backlog_limit_cuts_with_a_warning(cfg: Config, store: InfluxDB1Store, caplog: pytest.LogCaptureFixture
                                           ) -> None:
    now = time.time_ns() // 10**9 * 10**9
    feed(cfg, store, 7 * 3600, now_ns=now, future_s=0)
    training.train(cfg, store, now_ns=now, progress=False)
    small = replace(cfg, daemon=replace(cfg.daemon, max_backlog_windows=50))
    report = _fresh_worker(small, store, clock=lambda: now).tick()
    assert report.windows + report.missing == 2 * 50  # the window ending now lacks its last sample
    assert report.signals["heartbeat"].skipped_backlog > 0
    assert "more than daemon.max_backlog_windows=50" in caplog.text


def test_grid_windows_are_deterministic() -> None:
    # Window ends are multiples of slide * period since the epoch, whatever the query range.
    ends = np.arange(0, 10) * 16
    assert all(e % 16 == 0 for e in ends)
