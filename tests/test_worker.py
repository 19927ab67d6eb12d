"""The worker end to end through a real InfluxDB: the reference EKG case, the daemon path against the offline
path (three NAB files, exactly), the synthetic signal, summaries, timestamps, catch-up and the backlog limit."""

from __future__ import annotations

import csv
import time
from dataclasses import replace
from pathlib import Path

import numpy as np
import pytest

from anomalyd.config import Config, load
from anomalyd.core.stored_run import infer_period, run_stored
from anomalyd.demo.run import feed
from anomalyd.evaluation.nab import nab_probation
from anomalyd.service import training
from anomalyd.service.catalog import Catalog
from anomalyd.service.state import Watermarks
from anomalyd.service.worker import Worker
from anomalyd.store.influx1 import InfluxDB1Store
from anomalyd.store.local import LocalInfluxd
from conftest import make_config

ROOT = Path(__file__).resolve().parents[1]
EKG_T0 = 1536778426 * 10**9  # first sample of ../shared/data/ekg/*.txt
EKG_ANOMALIES = [(210, 214), (8010, 8013)]  # 0-based inclusive sample ranges set to 0 in anomaly.txt
#: Three NAB files: one regular, one irregularly sampled (off-grid timestamps, gaps), one with a backwards step and
#: long enough to be backfilled in several chunks.
NAB_FILES = ("artificialWithAnomaly/art_daily_jumpsup.csv", "realTraffic/speed_7578.csv",
             "realKnownCause/machine_temperature_system_failure.csv")


def output_rows(influxd: LocalInfluxd, db: str, measurement: str = "anomaly_error", where: str = "") -> list[dict]:
    res = influxd.query(f'SELECT * FROM "{measurement}" {where}', db)["results"][0]
    rows = []
    for s in res.get("series", []):
        cols = s["columns"]
        rows.extend(dict(zip(cols, v, strict=True)) for v in s["values"])
    return rows


def _worker(cfg: Config, store: InfluxDB1Store, clock: object = time.time_ns) -> Worker:
    return Worker(cfg, store, Catalog(cfg.paths.models), Watermarks(cfg.paths.state / "watermarks.json"),
                  clock=clock)  # type: ignore[arg-type]


@pytest.fixture
def ekg(influxd: LocalInfluxd, database: str, tmp_path: Path, shared_data: Path) -> Config:
    """The shipped examples/ekg/config.toml pointed at the test server, with the reference data loaded."""
    for name in ("norm.txt", "anomaly.txt"):
        influxd.write_lines(database, (shared_data / "ekg" / name).read_bytes())
    cfg = load(ROOT / "examples" / "ekg" / "config.toml", env={})
    return replace(cfg, influxdb=replace(cfg.influxdb, url=influxd.url, database=database),
                   paths=replace(cfg.paths, models=tmp_path / "models", state=tmp_path / "state"))


def _ekg_values(path: Path) -> tuple[np.ndarray, np.ndarray]:
    t, v = [], []
    for line in path.read_text().splitlines():
        _, fields, stamp = line.split(" ")
        t.append(int(stamp))
        v.append(float(fields.split("=")[1]))
    return np.array(t, dtype=np.int64), np.array(v)


def test_reference_ekg_case(ekg: Config, influxd: LocalInfluxd, database: str, shared_data: Path) -> None:
    store = InfluxDB1Store(ekg.influxdb)
    report = training.train(ekg, store)
    assert not report.failed and [m.model_id for m in report.trained] == ["ekg"]
    stored = report.trained[0]
    rep = _worker(ekg, store).score_range(EKG_T0 - 60 * 10**9, EKG_T0 + 8192 * 10**9)
    assert rep.signals["ekg"].series == 1
    rows = output_rows(influxd, database)
    assert {r["type"] for r in rows} == {"anomaly"} and {r["model"] for r in rows} == {"ekg"}
    # Every window is scored (slide 1); a window's point carries its last sample's time. Windows that hold no
    # sample (before the data) are not written; the first 31 reach before it and are missing-data windows.
    last = {(r["time"] - EKG_T0) // 10**9: r for r in rows}
    assert sorted(last) == list(range(8192))
    complete = {s: r for s, r in last.items() if s >= 31}
    assert all(r["missing"] == (s < 31) for s, r in last.items())

    def covers(end: int, a: tuple[int, int]) -> bool:
        return end >= a[0] and end - 31 <= a[1]

    first = [r for s, r in complete.items() if covers(s, EKG_ANOMALIES[0])]
    second = [r for s, r in complete.items() if covers(s, EKG_ANOMALIES[1])]
    normal = [r for s, r in complete.items() if not any(covers(s, a) for a in EKG_ANOMALIES)]
    top = max(r["score"] for r in normal)
    print(f"\nEKG (examples/ekg/config.toml): window {stored.model.window_}, decision score >= 0.5; first dropout "
          f"max score {max(r['score'] for r in first):.3f}, second {max(r['score'] for r in second):.3f}; normal "
          f"windows max {top:.3f} ({len(normal)} windows); max_error threshold {stored.threshold:.2f}")
    assert any(r["anomalous"] for r in first), "first dropout (samples 210-214) not flagged"
    assert any(r["anomalous"] for r in second), "second dropout (samples 8010-8013) not flagged"
    assert not [r["time"] for r in normal if r["anomalous"]], "a window covering no dropout sample was flagged"
    assert all(r["anomalous"] == (r["score"] >= 0.5) for r in complete.values())
    # The same detector over the stored series in memory (what `anomalyd evaluate` runs) wrote the same points.
    t, v = _ekg_values(shared_data / "ekg" / "anomaly.txt")
    run = run_stored(t, v, EKG_T0 - 60 * 10**9, period_ns=10**9, max_gap=ekg.signals[0].max_gap,
                     detector=stored.model)
    offline = {int(s): j for j, s in enumerate(run.stamps) if run.written[j]}
    assert set(offline) == {r["time"] for r in rows}
    for r in complete.values():
        j = offline[r["time"]]
        assert (r["score"], r["max_error"], r["anomalous"]) == (run.batch.score[j], run.batch.max_error[j],
                                                                 bool(run.batch.anomalous[j]))


def _read_nab(path: Path) -> tuple[np.ndarray, np.ndarray]:
    with path.open() as fh:
        rows = list(csv.reader(fh))[1:]
    t = np.array([r[0] for r in rows], dtype="datetime64[ns]").astype(np.int64)
    return t, np.array([float(r[1]) for r in rows])


def test_daemon_path_equals_offline_path_on_nab(influxd: LocalInfluxd, database: str, tmp_path: Path,
                                                shared_data: Path) -> None:
    """train + score through InfluxDB write, window for window, exactly what `run_stored` computes in memory."""
    data = {name: _read_nab(shared_data / "nab" / "data" / name) for name in NAB_FILES}
    lines = []
    signals = []
    for i, (_name, (t, v)) in enumerate(data.items()):
        tag = f"f{i}"
        lines += [f"nab,file={tag} value={x!r} {s}" for s, x in zip(t.tolist(), v.tolist(), strict=True)]
        n_train = nab_probation(len(t))
        iso = [str(np.datetime64(int(x), "ns")) + "Z" for x in (t.min(), t[n_train - 1])]
        signals.append({"name": tag, "measurement": "nab", "field": "value", "where": {"file": tag},
                        "group_by": ["file"], "period": f"{infer_period(t)}ns", "train_range": iso})
    influxd.write_lines(database, "\n".join(lines))
    # A small backlog makes the backfill run in several chunks: the state must carry over exactly.
    cfg = make_config(influxd.url, database, tmp_path, signals, daemon={"max_backlog_windows": 3000},
                      output={"write_reconstruction": False})
    store = InfluxDB1Store(cfg.influxdb, cfg.daemon.write_batch)
    report = training.train(cfg, store, progress=False)
    assert not report.failed, report.failed
    models = {m.signal: m for m in report.trained}
    end = max(int(t.max()) for t, _ in data.values()) + 10**12
    for sig in cfg.signals:  # `anomalyd score --start <training end>`, one signal at a time
        one = replace(cfg, signals=(sig,))
        _worker(one, store).score_range(models[sig.name].train_end_ns, end)
    for sig, (name, (t, v)) in zip(cfg.signals, data.items(), strict=True):
        rows = output_rows(influxd, database, where=f"WHERE \"signal\" = '{sig.name}'")
        stored = models[sig.name]
        run = run_stored(t, v, stored.train_end_ns, sig.spec(), sig.period_ns, sig.max_gap)
        fresh = run.detector
        assert fresh.window_ == stored.model.window_ and np.array_equal(fresh.catalog_.cluster_centers_,
                                                                        stored.model.catalog_.cluster_centers_)
        offline = {int(s): j for j, s in enumerate(run.stamps) if run.written[j]}
        assert {r["time"] for r in rows} == set(offline), name
        scored = 0
        for r in rows:
            j = offline[r["time"]]
            if r["missing"]:
                assert not run.batch.complete[j], name
                continue
            got = (r["max_error"], r["score"], r["anomalous"])
            want = (run.batch.max_error[j], run.batch.score[j], bool(run.batch.anomalous[j]))
            assert got == want, f"{name} at {r['time']}: daemon {got}, offline {want}"
            scored += 1
        assert scored > 0.9 * (len(t) - nab_probation(len(t))) or name == NAB_FILES[1], (name, scored)


def test_synthetic_signal_catch_up(cfg: Config, store: InfluxDB1Store, influxd: LocalInfluxd,
                                   database: str) -> None:
    now = time.time_ns() // 10**9 * 10**9
    fed = feed(cfg, store, 7 * 3600, now_ns=now, future_s=0)
    assert not training.train(cfg, store, now_ns=now, progress=False).failed
    report = _worker(cfg, store, clock=lambda: now).tick()
    # Catch-up starts at the end of the training range (now - 1h): every window (every second) of both series,
    # but the one ending now, whose last sample is not there yet.
    assert report.signals["heartbeat"].series == 2
    assert report.windows + report.missing == 2 * 3599
    injected = [(s, a) for s in fed for a in s.anomalies if s.origin_ns + a.end * 10**9 <= now]
    assert len(injected) >= 8
    w = 64  # the longest window the automatic rule can choose: a window within that span still sees the anomaly
    covering: list = []
    normal: list = []
    for r in report.results:
        if r.missing:
            continue
        s = next(f for f in fed if f.tag == dict(r.key.tags)["patient"])
        near = any(s.origin_ns + a.start * 10**9 <= r.end_ns and s.origin_ns + (a.end - 1 + w) * 10**9 >= r.start_ns
                   for a in s.anomalies)
        (covering if near else normal).append(r)
    caught = sum(any(dict(r.key.tags)["patient"] == s.tag and r.anomalous and r.start_ns <= s.origin_ns
                     + (a.end - 1 + w) * 10**9 and r.end_ns >= s.origin_ns + a.start * 10**9 for r in covering)
                 for s, a in injected)
    print(f"\nsynthetic: {caught}/{len(injected)} injected anomalies flagged; {sum(r.anomalous for r in normal)} "
          f"of {len(normal)} normal windows flagged")
    assert not [r.end_ns for r in normal if r.anomalous], "false alarms on normal windows"
    assert caught * 2 > len(injected)
    # Written once per window, with the documented fields; the reconstruction was written too.
    rows = output_rows(influxd, database)
    assert len(rows) == report.windows + report.missing
    assert {"max_error", "threshold", "anomalous", "score", "missing", "series", "model", "signal",
            "patient"} <= set(rows[0])
    assert sum(r["anomalous"] for r in rows) == report.anomalous
    recon = output_rows(influxd, database, "anomaly_reconstruction", "LIMIT 100")
    assert recon and all(abs(r["reconstruction"] - r["value"]) < 60 for r in recon)
    stats = output_rows(influxd, database, "anomalyd_stats")
    assert stats and stats[0]["windows"] == report.windows
    # A second tick at the same time finds nothing new; re-scoring the range overwrites the same points.
    assert _worker(cfg, store, clock=lambda: now).tick().windows == 0
    _worker(cfg, store).score_range(now - 3600 * 10**9, now)
    assert len(output_rows(influxd, database)) == len(rows)


def test_write_every_summarises_without_losing_an_anomalous_window(cfg: Config, store: InfluxDB1Store,
                                                                   influxd: LocalInfluxd, database: str) -> None:
    now = time.time_ns() // 10**9 * 10**9
    feed(cfg, store, 7 * 3600, now_ns=now, future_s=0)
    assert not training.train(cfg, store, now_ns=now, progress=False).failed
    step = 16 * 10**9
    lo, hi = (now - 3600 * 10**9) // step * step, (now - 60 * 10**9) // step * step
    _worker(cfg, store).score_range(lo, hi)
    summary = replace(cfg, signals=(replace(cfg.signals[0], write_every=16),),
                      output=replace(cfg.output, measurement="summary", write_reconstruction=False))
    _worker(summary, store).score_range(lo, hi)
    every = {(r["patient"], r["time"]): r for r in output_rows(influxd, database)}
    summ = output_rows(influxd, database, "summary")
    assert summ and len(summ) * 16 == len(every)
    for s in summ:
        inside = [r for (p, t), r in every.items() if p == s["patient"] and s["time"] - 16 * 10**9 < t <= s["time"]]
        assert len(inside) == 16
        scored = [r for r in inside if not r["missing"]]
        assert s["windows"] == len(scored)
        assert s["anomalous"] == any(r["anomalous"] for r in scored)
        assert s["max_error"] == max(r["max_error"] for r in scored)
        worst = max(scored, key=lambda r: r["score"])
        assert (s["score"], s["worst_end"]) == (worst["score"], worst["time"])
    assert sum(s["anomalous"] for s in summ) >= 1


def test_points_carry_the_time_of_their_last_real_sample(influxd: LocalInfluxd, database: str,
                                                         tmp_path: Path) -> None:
    """Off-grid samples: the points join the raw data on time; no point before the first sample or after the
    last, however wide the backfill."""
    rng = np.random.default_rng(3)
    t0 = 1_700_000_000 * 10**9
    n = 3000
    times = t0 + np.arange(n) * 10**9 + rng.integers(-300, 300, n) * 10**6  # +-0.3 s of jitter
    values = np.sin(np.arange(n) * 2 * np.pi / 40) * 10 + rng.normal(0, 0.3, n)
    influxd.write_lines(database, "\n".join(f"m,host=h value={v!r} {t}" for t, v in zip(times.tolist(),
                                                                                       values.tolist(), strict=True)))
    iso = [str(np.datetime64(int(x), "ns")) + "Z" for x in (times[0], times[1999])]
    cfg = make_config(influxd.url, database, tmp_path, [{"name": "s", "measurement": "m", "field": "value",
                                                         "group_by": ["host"], "period": "1s", "train_range": iso}],
                      output={"write_reconstruction": False})
    store = InfluxDB1Store(cfg.influxdb)
    assert not training.train(cfg, store, progress=False).failed
    _worker(cfg, store).score_range(t0 - 86400 * 10**9, t0 + 86400 * 10**9)  # a day on either side
    rows = output_rows(influxd, database)
    # One point per sample (its window's last), each at that sample's own time, and nothing outside the data.
    assert len(rows) == n
    assert {r["time"] for r in rows} == set(times.tolist())
    assert sum(r["missing"] for r in rows) == max(r["n_missing"] for r in rows)  # the first windows only


def test_window_ends_stay_exact_at_huge_ranges(influxd: LocalInfluxd, database: str, tmp_path: Path) -> None:
    """windows x step beyond 2**52 ns: every window of every chunk is written (integer arithmetic throughout)."""
    period = 2**42  # ns, about 73 minutes: 1,500 windows span 6.6e15 ns
    t0 = 2**60 // period * period
    n = 2100
    rng = np.random.default_rng(0)
    values = np.sin(np.arange(n) * 2 * np.pi / 24) + rng.normal(0, 0.05, n)
    influxd.write_lines(database, "\n".join(f"m value={v!r} {t0 + i * period}" for i, v in enumerate(values.tolist())))
    train_end = t0 + 599 * period
    iso = [str(np.datetime64(x, "ns")) + "Z" for x in (t0, train_end)]
    cfg = make_config(influxd.url, database, tmp_path, [{"name": "s", "measurement": "m", "field": "value",
                                                         "period": f"{period}ns", "train_range": iso}],
                      daemon={"max_backlog_windows": 700}, output={"write_reconstruction": False})
    store = InfluxDB1Store(cfg.influxdb)
    assert not training.train(cfg, store, progress=False).failed
    rep = _worker(cfg, store).score_range(train_end, t0 + (n - 1) * period)
    rows = output_rows(influxd, database)
    assert rep.windows + rep.missing == len(rows) == n - 600
    assert max(r["time"] for r in rows) == t0 + (n - 1) * period


def test_backlog_limit_cuts_with_a_warning(cfg: Config, store: InfluxDB1Store, caplog: pytest.LogCaptureFixture
                                           ) -> None:
    now = time.time_ns() // 10**9 * 10**9
    feed(cfg, store, 7 * 3600, now_ns=now, future_s=0)
    training.train(cfg, store, now_ns=now, progress=False)
    small = replace(cfg, daemon=replace(cfg.daemon, max_backlog_windows=50))
    report = _worker(small, store, clock=lambda: now).tick()
    # 50 windows per series; the one ending now has no last sample yet (the feed stops before now): not written.
    assert report.windows + report.missing == 2 * 49
    assert report.signals["heartbeat"].skipped_backlog > 0
    assert "more than daemon.max_backlog_windows=50" in caplog.text


def test_a_model_of_another_window_is_refused_with_one_line(cfg: Config, store: InfluxDB1Store,
                                                           caplog: pytest.LogCaptureFixture) -> None:
    now = time.time_ns() // 10**9 * 10**9
    feed(cfg, store, 7 * 3600, now_ns=now, future_s=0)
    training.train(cfg, store, now_ns=now, progress=False)
    trained = Catalog(cfg.paths.models).get(training.model_id_for("heartbeat", (("patient", "p1"),), "series"))
    assert trained is not None
    other = replace(cfg, signals=(replace(cfg.signals[0], window=trained.model.window_ + 1),))
    report = _worker(other, store, clock=lambda: now).tick()
    assert report.windows == 0 and report.signals["heartbeat"].untrained == 2
    assert "retrain with `anomalyd train`" in caplog.text


def test_a_scoring_process_runs_the_cyclic_collector_less_often_and_never_lowers_a_threshold() -> None:
    import gc

    from anomalyd.service.worker import GC_THRESHOLD, tune_gc

    before = gc.get_threshold()
    try:
        gc.set_threshold(700, 10, 10)
        tune_gc()
        assert gc.get_threshold() == (GC_THRESHOLD, 10, 10)
        gc.set_threshold(GC_THRESHOLD * 2, 5, 5)  # an operator's own, higher setting stays
        tune_gc()
        assert gc.get_threshold() == (GC_THRESHOLD * 2, 5, 5)
    finally:
        gc.set_threshold(*before)
