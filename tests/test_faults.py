"""Bad input and failures: InfluxDB down at start or mid-run, dirty data, too little training data, new series,
models that disagree with the config, and `anomalyd check` on a corrupt model or a dead server.

Nothing may be lost: after an outage every window on the grid is scored exactly once.
"""

from __future__ import annotations

import logging
import time
from collections import Counter
from collections.abc import Sequence
from pathlib import Path

import numpy as np
import pytest

from anomalyd import training
from anomalyd.catalog import Catalog, StoredModel, model_id_for, save
from anomalyd.cli import main
from anomalyd.config import Config, TrainRange
from anomalyd.demo import feed
from anomalyd.influx import InfluxDB1Store, Point, Query, SeriesData, line_protocol
from anomalyd.localinflux import LocalInfluxd, free_port
from anomalyd.metrics import REGISTRY
from anomalyd.model import WindowReconstructor
from anomalyd.service import Service
from anomalyd.state import Watermarks
from anomalyd.synthetic import ecg
from anomalyd.worker import Worker, align, align_many
from conftest import make_config, with_signal

S = 10**9
STEP = 16 * S
T0 = 1_700_000_000 * S  # a multiple of 16 s: on the scoring grid
P1 = (("patient", "p1"),)
P2 = (("patient", "p2"),)


# -- helpers ---------------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def model() -> WindowReconstructor:
    """A heartbeat model fitted offline (no InfluxDB needed), window 32, 50 clusters."""
    x, _ = ecg(6000, seed=21)
    return WindowReconstructor(window=32, n_clusters=50, n_init=1, random_state=0).fit(x)


def save_model(cfg: Config, model: WindowReconstructor, tags: tuple[tuple[str, str], ...], train_end: int = T0,
               signal: str = "heartbeat", period: int = S) -> None:
    save(cfg.paths.models, StoredModel(model_id_for(signal, tags, "series"), signal, tags, "series", model, period,
                                       train_end - 3600 * S, train_end))


def points_for(measurement: str, tags: tuple[tuple[str, str], ...], times: np.ndarray, values: np.ndarray
               ) -> list[Point]:
    return [Point(measurement, tags, (("value", float(v)),), int(t)) for t, v in zip(times, values, strict=True)]


def rows(influxd: LocalInfluxd, db: str, q: str) -> list[dict]:
    res = influxd.query(q, db)["results"][0]
    assert "error" not in res, res
    out = []
    for s in res.get("series", []):
        for v in s["values"]:
            out.append({**(s.get("tags") or {}), **dict(zip(s["columns"], v, strict=True))})
    return out


def metric(name: str, **labels: str) -> float:
    return REGISTRY.get_sample_value(name, labels) or 0.0


class FakeStore:
    """A store that returns what a real one might (NaN, duplicates, disorder, jitter), honouring the time range."""

    def __init__(self, series: dict[tuple[tuple[str, str], ...], tuple[np.ndarray, np.ndarray]]) -> None:
        self.series = series
        self.points: list[Point] = []
        self.reads = 0

    def ping(self) -> str:
        return "fake"

    def read(self, query: Query, start_ns: int, end_ns: int) -> SeriesData:
        self.reads += 1
        out: SeriesData = {}
        for tags, (t, v) in self.series.items():
            keep = (t >= start_ns) & (t <= end_ns)
            if keep.any():
                out[tags] = (t[keep], v[keep])
        return out

    def write(self, points: Sequence[Point], retention_policy: str = "") -> None:
        for p in points:
            line_protocol(p)  # every point must be writable: no NaN or infinite field
        self.points.extend(points)

    def errors(self, tags: tuple[tuple[str, str], ...]) -> dict[int, dict[str, object]]:
        """Output fields per window end, for one series."""
        return {p.time_ns: dict(p.fields) for p in self.points
                if p.measurement == "anomaly_error" and set(tags) <= set(p.tags)}


def fake_worker(cfg: Config, store: FakeStore, tmp: Path, now: int = T0 + 1000 * S) -> Worker:
    return Worker(cfg, store, Catalog(cfg.paths.models), Watermarks(tmp / "wm.json"), alerts=None,
                  clock=lambda: now)


def run_until_called(service: Service, calls: list[float], n: int, timeout_s: float = 10.0) -> list[object]:
    """Call ``service.run_tick`` in a tight loop (as a scheduler would, only faster) until the worker ran ``n``
    more times; return what every run_tick returned."""
    target = len(calls) + n
    deadline = time.monotonic() + timeout_s
    returned = []
    while len(calls) < target:
        assert time.monotonic() < deadline, f"the worker ran {len(calls)} times, expected {target}"
        returned.append(service.run_tick())
        time.sleep(0.005)
    return returned


def spy_on_ticks(worker: Worker) -> list[float]:
    """Record when the service actually calls ``worker.tick``."""
    calls: list[float] = []
    real = worker.tick

    def tick(now_ns: int | None = None):  # type: ignore[no-untyped-def]
        calls.append(time.monotonic())
        return real(now_ns)

    worker.tick = tick  # type: ignore[method-assign]
    return calls


# -- (1) InfluxDB unreachable at start ---------------------------------------------------------------------------


def test_influxdb_unreachable_at_start_backs_off_and_never_raises(tmp_path: Path,
                                                                   caplog: pytest.LogCaptureFixture) -> None:
    url = f"http://127.0.0.1:{free_port()}"
    cfg = make_config(url, "db", tmp_path)
    worker = Worker(cfg, InfluxDB1Store(cfg.influxdb), Catalog(cfg.paths.models),
                    Watermarks(cfg.paths.state / "watermarks.json"), alerts=None, clock=lambda: T0)
    calls = spy_on_ticks(worker)
    service = Service(worker, interval_s=0.05, max_backoff_s=0.4, health_listen="")
    failed_before = metric("anomalyd_ticks_total", outcome="failed")
    returned = run_until_called(service, calls, 6)
    assert all(r is None for r in returned)
    assert service.health.consecutive_failures == 6 and not service.health.ok()
    assert url in service.health.last_error and "unreachable" in service.health.last_error
    assert metric("anomalyd_ticks_total", outcome="failed") - failed_before == 6
    # Exponential backoff: the wait between attempts doubles up to max_backoff (minus the regular interval).
    # After n failures the next attempt waits interval * 2**(n-1), capped, less the interval the scheduler adds.
    gaps = np.diff(calls)
    waits = [0.0, 0.05, 0.15, 0.35, 0.35]
    assert all(g >= w - 0.005 for g, w in zip(gaps, waits, strict=True)), gaps
    assert gaps.max() < 0.35 + 0.3, gaps  # capped by max_backoff
    assert len(returned) > 6  # run_tick was called while backing off and returned without calling the worker
    assert "tick failed (6 in a row)" in caplog.text and "influxdb.url" in caplog.text
    assert not (tmp_path / "state" / "watermarks.json").exists()


# -- (2) InfluxDB stopped during a run, restarted: catch up, every window exactly once ------------------------


def test_influxdb_stopped_and_restarted_during_a_run_loses_nothing(tmp_path: Path) -> None:
    port = free_port()
    server = LocalInfluxd(tmp_path / "ifx", port=port).start()
    try:
        t0 = time.time_ns() // STEP * STEP
        now = [t0]
        cfg = make_config(server.url, "faults", tmp_path)
        cfg = with_signal(cfg, clusters=50, n_init=2, train_range=TrainRange("now-3h", "now-20m"))
        store = InfluxDB1Store(cfg.influxdb, cfg.daemon.write_batch)
        # Data up to 15 minutes after the first tick, as if the sensors kept writing to a buffer/relay.
        feed(cfg, store, 3 * 3600 + 15 * 60, now_ns=t0 + 15 * 60 * S, future_s=0)
        trained = training.train(cfg, store, now_ns=t0, progress=False)
        assert not trained.failed and len(trained.trained) == 2

        worker = Worker(cfg, store, Catalog(cfg.paths.models), Watermarks(cfg.paths.state / "watermarks.json"),
                        alerts=None, clock=lambda: now[0])
        calls = spy_on_ticks(worker)
        service = Service(worker, interval_s=0.05, max_backoff_s=0.2, health_listen="")
        reports = [service.run_tick()]
        assert reports[0] is not None and reports[0].windows == 2 * 20 * 60 // 16

        server.stop()
        failures = []
        for _ in range(4):  # several intervals pass while InfluxDB is down
            now[0] += 2 * 60 * S
            failures += run_until_called(service, calls, 1)
        assert all(r is None for r in failures)
        # (Health stays ok for 3 intervals + 30 s after the last success, so a short outage is not flapped.)
        assert service.health.consecutive_failures == 4 and "unreachable" in service.health.last_error
        gaps = np.diff(calls[1:5])  # between the failed attempts: the backoff grows, capped at max_backoff
        assert all(g >= w - 0.005 for g, w in zip(gaps, [0.0, 0.05, 0.15], strict=True)), gaps

        server.start()  # same port, same data directory
        assert server.port == port
        deadline = time.monotonic() + 10
        while (rep := service.run_tick()) is None:
            assert time.monotonic() < deadline, service.health.last_error
            time.sleep(0.01)
        reports.append(rep)
        assert rep.windows == 2 * 8 * 60 // 16  # the whole outage, caught up in one tick
        assert service.health.consecutive_failures == 0 and service.health.ok()

        # InfluxDB dies in the middle of a tick: the error points are written, the reconstruction write fails.
        real_write = store.write
        writes = []

        def write_then_die(points: Sequence[Point], retention_policy: str = "") -> None:
            writes.append(len(points))
            real_write(points, retention_policy)
            if len(writes) == 1:
                server.stop()

        store.write = write_then_die  # type: ignore[method-assign]
        now[0] += 3 * STEP
        assert run_until_called(service, calls, 1) == [None] and writes[0] == 2 * 3
        store.write = real_write  # type: ignore[method-assign]
        server.start()
        now[0] += STEP
        while (rep := service.run_tick()) is None:
            assert time.monotonic() < deadline + 20, service.health.last_error
            time.sleep(0.01)
        reports.append(rep)
        assert rep.windows == 2 * 4  # the three windows of the broken tick again, and one new

        # A daemon restarted afterwards resumes from the persisted watermarks.
        now[0] += 5 * STEP
        fresh = Worker(cfg, store, Catalog(cfg.paths.models), Watermarks(cfg.paths.state / "watermarks.json"),
                       alerts=None, clock=lambda: now[0])
        reports.append(fresh.tick())
        assert reports[-1].windows == 2 * 5

        train_end = t0 - 20 * 60 * S
        expected = set(range(train_end + STEP, now[0] + 1, STEP))
        out = rows(server, "faults", 'SELECT "max_error", "missing", "model" FROM "anomaly_error" GROUP BY "patient"')
        for patient in ("p1", "p2"):
            mine = [r for r in out if r["patient"] == patient]
            per_time = Counter(r["time"] for r in mine)
            assert set(per_time) == expected, (sorted(expected - set(per_time)), sorted(set(per_time) - expected))
            assert set(per_time.values()) == {1}
            assert all(r["missing"] is False and r["max_error"] is not None for r in mine)
            assert len({r["model"] for r in mine}) == 1
        # The daemon itself scored each window once (the server would hide a double write by overwriting it).
        scored = Counter((r.key.id, r.end_ns) for rep in reports for r in rep.results)  # type: ignore[union-attr]
        assert set(scored.values()) == {1} and len(scored) == 2 * len(expected)
        # The reconstruction has every sample once: from the first new window's start to the last one's slide.
        recon = rows(server, "faults", 'SELECT "reconstruction" FROM "anomaly_reconstruction" GROUP BY "patient"')
        for patient in ("p1", "p2"):
            per_time = Counter(r["time"] for r in recon if r["patient"] == patient)
            assert set(per_time.values()) == {1}
            assert set(per_time) == set(range(train_end + STEP - 31 * S, now[0] - 15 * S, S))
    finally:
        server.stop()


# -- (3) dirty data --------------------------------------------------------------------------------------------


def test_align_drops_non_finite_values_and_fills_short_gaps() -> None:
    t = np.arange(10) * 10
    v = np.arange(10, dtype=float)
    v[3], v[6] = np.nan, np.inf
    a, problems = align(t, v, 10, 0, 10, max_gap=2)
    assert a.values.tolist() == list(range(10))  # linear fill recovers the ramp
    assert problems == {"non_finite": 2, "filled": 2}
    v[4] = v[5] = -np.inf
    a, problems = align(t, v, 10, 0, 10, max_gap=2)
    assert np.isnan(a.values[3:7]).all() and not np.isnan(a.values[[0, 1, 2, 7, 8, 9]]).any()
    assert problems == {"non_finite": 4}


def test_align_sorts_out_of_order_samples_and_keeps_the_later_duplicate() -> None:
    t = np.array([30, 0, 10, 20, 20, 40])
    v = np.array([3.0, 0.0, 1.0, 2.0, 2.5, 4.0])
    a, problems = align(t, v, 10, 0, 5, max_gap=0)
    assert a.values.tolist() == [0.0, 1.0, 2.5, 3.0, 4.0]
    assert problems == {"out_of_order": 1, "duplicate": 1}


def test_align_rounds_jittered_timestamps_to_the_grid() -> None:
    rng = np.random.default_rng(1)
    period = 1000
    grid = np.arange(200) * period
    jitter = rng.uniform(-0.3, 0.3, 200) * period
    v = rng.normal(size=200)
    a, problems = align((grid + jitter).astype(np.int64), v, period, 0, 200, max_gap=2)
    np.testing.assert_array_equal(a.values, v)
    assert problems == {"off_grid": int(np.count_nonzero(jitter.astype(np.int64)))}


def test_align_many_matches_align_row_by_row() -> None:
    rng = np.random.default_rng(2)
    period, n = 10, 40
    series = []
    for kind in range(8):
        t = np.arange(-3, n + 3) * period
        v = rng.normal(size=len(t))
        if kind == 1:
            t, v = np.delete(t, [10, 11]), np.delete(v, [10, 11])  # short gap
        elif kind == 2:
            t, v = np.delete(t, range(10, 20)), np.delete(v, range(10, 20))  # long gap
        elif kind == 3:
            v[[5, 9]] = [np.nan, np.inf]
        elif kind == 4:
            t = t + rng.integers(-3, 4, len(t))
        elif kind == 5:
            order = rng.permutation(len(t))
            t, v = t[order], v[order]
        elif kind == 6:
            t, v = np.append(t, t[7]), np.append(v, 99.0)
        elif kind == 7:
            t, v = t[:0], v[:0]
        series.append((t.astype(np.int64), v))
    matrix, problems = align_many(series, period, 0, n, max_gap=2)
    for r, (t, v) in enumerate(series):
        one, p = align(t, v, period, 0, n, max_gap=2)
        np.testing.assert_array_equal(matrix[r], one.values, err_msg=f"row {r}")
        assert problems[r] == p, r


def _clean(n: int = 1200, seed: int = 22) -> tuple[np.ndarray, np.ndarray]:
    x, _ = ecg(n, seed=seed)
    return T0 - 200 * S + np.arange(n, dtype=np.int64) * S, x


def test_nan_and_infinite_values_from_a_store(cfg: Config, tmp_path: Path, model: WindowReconstructor) -> None:
    save_model(cfg, model, P1)
    save_model(cfg, model, P2)
    t, x = _clean()
    dirty = x.copy()
    isolated = [T0 + 40 * S, T0 + 100 * S + 3 * S]  # one NaN, one inf: short gaps, filled
    block = range(300, 306)  # six NaN in a row: longer than max_gap=2
    i_iso = [int((s - t[0]) // S) for s in isolated]
    dirty[i_iso[0]], dirty[i_iso[1]] = np.nan, np.inf
    dirty[[int((T0 - t[0]) // S) + k for k in block]] = np.nan
    store = FakeStore({P1: (t, x), P2: (t, dirty)})
    before = metric("anomalyd_data_problems_total", signal="heartbeat", kind="non_finite")
    report = fake_worker(cfg, store, tmp_path).score_range(T0, T0 + 800 * S)
    assert metric("anomalyd_data_problems_total", signal="heartbeat", kind="non_finite") - before == 8
    clean, got = store.errors(P1), store.errors(P2)
    assert set(clean) == set(got) and len(got) == 50
    gap = (T0 + block[0] * S, T0 + block[-1] * S)
    for end, fields in got.items():
        start = end - 31 * S
        if start <= gap[1] and end >= gap[0]:
            n_gap = sum(1 for k in block if start <= T0 + k * S <= end)
            assert fields["missing"] is True and fields["n_missing"] == n_gap and "max_error" not in fields
            continue
        assert fields["missing"] is False and np.isfinite(fields["max_error"])
        if not any(start <= s <= end for s in isolated):
            assert fields["max_error"] == clean[end]["max_error"]
    n_missing = sum(1 for end in got if end - 31 * S <= gap[1] and end >= gap[0])
    assert n_missing == 3 and report.missing == n_missing == sum(1 for f in got.values() if f["missing"])


def test_long_gaps_are_missing_windows_and_short_gaps_are_filled(
        cfg: Config, store: InfluxDB1Store, influxd: LocalInfluxd, database: str, tmp_path: Path,
        model: WindowReconstructor) -> None:
    save_model(cfg, model, P1)
    t, x = _clean()
    long_gap = np.arange(400, 410)  # 10 samples: a lead off, say
    short_gap = np.arange(600, 602)  # 2 samples = max_gap: filled
    keep = np.ones(len(t), dtype=bool)
    keep[[int((T0 - t[0]) // S) + k for k in (*long_gap, *short_gap)]] = False
    store.write(points_for("ecg", P1, t[keep], x[keep]))
    missing_before = metric("anomalyd_windows_total", signal="heartbeat", result="missing")
    report = fake_worker(cfg, store, tmp_path).score_range(T0, T0 + 800 * S)  # type: ignore[arg-type]
    out = rows(influxd, database, 'SELECT "max_error", "missing", "n_missing", "anomalous" FROM "anomaly_error"')
    assert len(out) == 50
    for r in out:
        end = (r["time"] - T0) // S
        covers_long = bool(end - 31 <= long_gap[-1] and end >= long_gap[0])
        assert r["missing"] is covers_long, r
        if covers_long:
            n_gap = sum(1 for k in long_gap if end - 31 <= k <= end)
            assert r["max_error"] is None and r["n_missing"] == n_gap and r["anomalous"] is False
        else:
            assert r["max_error"] is not None and r["n_missing"] == 0
    assert report.missing == sum(r["missing"] for r in out) == 3  # windows ending at 400, 416 and 432 s
    assert metric("anomalyd_windows_total", signal="heartbeat", result="missing") - missing_before == 3
    assert report.windows == 47


def test_duplicate_and_out_of_order_timestamps(cfg: Config, tmp_path: Path, model: WindowReconstructor,
                                               caplog: pytest.LogCaptureFixture) -> None:
    save_model(cfg, model, P1)
    save_model(cfg, model, P2)
    t, x = _clean()
    rng = np.random.default_rng(3)
    order = rng.permutation(len(t))
    dup = rng.choice(len(t), 30, replace=False)
    # Each duplicate comes first with a wrong value, then the original: the later sample wins.
    t2 = np.concatenate([t[dup], t[order]])
    x2 = np.concatenate([x[dup] + 500.0, x[order]])
    store = FakeStore({P1: (t, x), P2: (t2, x2)})
    with caplog.at_level(logging.INFO, logger="anomalyd.worker"):
        fake_worker(cfg, store, tmp_path).score_range(T0, T0 + 800 * S)
    clean, got = store.errors(P1), store.errors(P2)
    assert len(got) == 50 and got == clean
    assert "out_of_order samples" in caplog.text and "duplicate samples" in caplog.text
    assert "heartbeat[patient=p2]" in caplog.text


def test_irregular_timestamps_are_scored_like_regular_ones(cfg: Config, tmp_path: Path,
                                                           model: WindowReconstructor) -> None:
    save_model(cfg, model, P1)
    save_model(cfg, model, P2)
    t, x = _clean()
    rng = np.random.default_rng(4)
    jitter = (rng.uniform(-0.3, 0.3, len(t)) * S).astype(np.int64)
    end = T0 + 800 * S
    jitter[t == end] = -S // 4  # the newest window's last sample is off-grid (early)
    store = FakeStore({P1: (t, x), P2: (t + jitter, x)})
    fake_worker(cfg, store, tmp_path).score_range(T0, end)
    clean, got = store.errors(P1), store.errors(P2)
    assert len(got) == 50 and got == clean


def test_a_late_jittered_last_sample_does_not_lose_the_newest_window(cfg: Config, tmp_path: Path,
                                                                      model: WindowReconstructor) -> None:
    save_model(cfg, model, P1)
    save_model(cfg, model, P2)
    t, x = _clean()
    jitter = np.where(t == T0 + 800 * S, 3 * S // 10, 0)  # +0.3 period on the newest window's last sample
    store = FakeStore({P1: (t, x), P2: (t + jitter, x)})
    report = fake_worker(cfg, store, tmp_path, now=T0 + 800 * S + S // 2).tick()
    assert report.missing == 0
    assert store.errors(P2) == store.errors(P1)


# -- (4) too little training data ------------------------------------------------------------------------------


def test_too_little_training_data_fails_that_series_only(cfg: Config, store: InfluxDB1Store,
                                                         caplog: pytest.LogCaptureFixture) -> None:
    now = T0
    cfg = with_signal(cfg, clusters=50, n_init=1, train_range=TrainRange("now-3h", "now"))
    x, _ = ecg(3 * 3600, seed=23)
    t = now - 3 * 3600 * S + np.arange(len(x), dtype=np.int64) * S
    store.write(points_for("ecg", P1, t, x))
    store.write(points_for("ecg", P2, t[:40], x[:40]))  # fewer than 2 x window samples
    store.write(points_for("ecg", (("patient", "p3"),), t[:100], x[:100]))  # fewer windows than clusters
    gappy = np.arange(0, 3000) % 50 < 30  # 3000 samples, but no gap-free stretch of 64
    store.write(points_for("ecg", (("patient", "p4"),), t[:3000][gappy], x[:3000][gappy]))
    report = training.train(cfg, store, now_ns=now, progress=False)
    assert [m.tags for m in report.trained] == [P1]
    assert set(report.failed) == {"heartbeat|patient=p2", "heartbeat|patient=p3", "heartbeat|patient=p4"}
    assert "window=32 needs at least 64 samples" in report.failed["heartbeat|patient=p2"]
    assert "got 40" in report.failed["heartbeat|patient=p2"]
    assert "n_clusters=50 needs at least 50 training windows" in report.failed["heartbeat|patient=p3"]
    assert "needs at least 64 samples in a gap-free stretch" in report.failed["heartbeat|patient=p4"]
    assert "cannot train heartbeat[patient=p2]" in caplog.text
    assert Catalog(cfg.paths.models).get(model_id_for("heartbeat", P1, "series")) is not None
    assert len(list(cfg.paths.models.glob("*.json"))) == 1


# -- (5) a series that appears after training --------------------------------------------------------------------


def test_a_series_that_appears_after_training_is_logged_once_counted_and_skipped(
        cfg: Config, store: InfluxDB1Store, influxd: LocalInfluxd, database: str, tmp_path: Path,
        model: WindowReconstructor, caplog: pytest.LogCaptureFixture) -> None:
    save_model(cfg, model, P1, train_end=T0)
    t, x = _clean()
    store.write(points_for("ecg", P1, t, x) + points_for("ecg", P2, t, x))
    now = [T0 + 200 * S]
    worker = Worker(cfg, store, Catalog(cfg.paths.models), Watermarks(tmp_path / "wm.json"), alerts=None,
                    clock=lambda: now[0])
    reports = []
    with caplog.at_level(logging.WARNING, logger="anomalyd.worker"):
        for _ in range(3):
            reports.append(worker.tick())
            assert metric("anomalyd_untrained_series", signal="heartbeat") == 1
            now[0] += 2 * STEP
    assert all(r.signals["heartbeat"].untrained == 1 and r.signals["heartbeat"].series == 1 for r in reports)
    warnings = [r.getMessage() for r in caplog.records if "patient=p2" in r.getMessage()]
    assert len(warnings) == 1 and "has no model yet" in warnings[0] and "anomalyd train" in warnings[0]
    out = rows(influxd, database, 'SELECT "max_error" FROM "anomaly_error" GROUP BY "patient"')
    assert {r["patient"] for r in out} == {"p1"} and len(out) == sum(r.windows for r in reports) > 0
    assert Watermarks(tmp_path / "wm.json").get("heartbeat|patient=p2") is None
    # Once trained, it is picked up without a restart.
    save_model(cfg, model, P2, train_end=T0)
    rep = worker.tick()
    assert rep.signals["heartbeat"].untrained == 0 and rep.signals["heartbeat"].series == 2
    assert metric("anomalyd_untrained_series", signal="heartbeat") == 0


# -- (6) a model that disagrees with the config ------------------------------------------------------------------


@pytest.mark.parametrize("change", [{"window": 16, "slide": 8, "train_slide": 2}, {"period_ns": 2 * S}],
                         ids=["window", "period"])
def test_a_model_that_disagrees_with_the_config_is_skipped_with_a_clear_error(
        influxd: LocalInfluxd, database: str, tmp_path: Path, model: WindowReconstructor,
        caplog: pytest.LogCaptureFixture, change: dict) -> None:
    signals = [{"name": "heartbeat", "measurement": "ecg", "field": "value", "group_by": ["patient"],
                "period": "1s", "clusters": 50},
               {"name": "other", "measurement": "ecg2", "field": "value", "group_by": ["patient"],
                "period": "1s", "clusters": 50}]
    cfg = with_signal(make_config(influxd.url, database, tmp_path, signals=signals), **change)
    store = InfluxDB1Store(cfg.influxdb)
    t, x = _clean()
    store.write(points_for("ecg", P1, t, x) + points_for("ecg2", P1, t, x))
    save_model(cfg, model, P1, signal="heartbeat")  # trained with window 32, period 1 s
    save_model(cfg, model, P1, signal="other")
    now = [T0 + 200 * S]
    worker = Worker(cfg, store, Catalog(cfg.paths.models), Watermarks(tmp_path / "wm.json"), alerts=None,
                    clock=lambda: now[0])
    service = Service(worker, interval_s=1.0, max_backoff_s=2.0, health_listen="")
    with caplog.at_level(logging.WARNING, logger="anomalyd.worker"):
        first = service.run_tick()
        now[0] += 4 * STEP
        second = service.run_tick()
    assert first is not None and second is not None and service.health.ok()
    assert first.signals["heartbeat"].windows == 0 and first.signals["heartbeat"].series == 0
    assert first.signals["other"].windows > 0 and second.signals["other"].windows == 4
    errors = [r.getMessage() for r in caplog.records if r.levelno >= logging.ERROR]
    assert len(errors) == 1, errors
    assert "trained with window=32 period=1000000000ns" in errors[0] and "retrain" in errors[0]
    sig = cfg.signal("heartbeat")
    assert f"configured with window={sig.window} period={sig.period_ns}ns" in errors[0]
    out = rows(influxd, database, 'SELECT "max_error" FROM "anomaly_error" GROUP BY "signal"')
    assert {r["signal"] for r in out} == {"other"}


# -- (7) `anomalyd check` ------------------------------------------------------------------------------------------

CHECK_CONFIG = """
[influxdb]
url = "{url}"
database = "{db}"
timeout = "2s"
[paths]
models = "models"
state = "state"
[daemon]
health_listen = ""
[[signals]]
name = "heartbeat"
measurement = "ecg"
field = "value"
group_by = ["patient"]
period = "1s"
clusters = 50
"""


def _check_setup(tmp_path: Path, url: str, db: str, model: WindowReconstructor) -> tuple[Path, Config]:
    path = tmp_path / "config.toml"
    path.write_text(CHECK_CONFIG.format(url=url, db=db))
    cfg = make_config(url, db, tmp_path)
    for tags in (P1, P2):
        save_model(cfg, model, tags)
    return path, cfg


def test_check_fails_clearly_on_a_corrupt_model(influxd: LocalInfluxd, database: str, tmp_path: Path,
                                                model: WindowReconstructor, capsys: pytest.CaptureFixture[str]
                                                ) -> None:
    path, cfg = _check_setup(tmp_path, influxd.url, database, model)
    assert main(["check", "-c", str(path)]) == 0
    assert capsys.readouterr().out.count("ok   model heartbeat-") == 2
    npz = cfg.paths.models / f"{model_id_for('heartbeat', P2, 'series')}.npz"
    blob = bytearray(npz.read_bytes())
    blob[len(blob) // 2] ^= 0xFF
    npz.write_bytes(bytes(blob))
    assert main(["check", "-c", str(path)]) == 1
    out = capsys.readouterr().out
    assert "ok   InfluxDB" in out and out.count("ok   model heartbeat-") == 1
    assert f"FAIL model arrays {npz} fail their checksum (truncated or modified); retrain" in out
    # A truncated metadata file is just as clear.
    meta = npz.with_suffix(".json")
    meta.write_text(meta.read_text()[:50])
    assert main(["check", "-c", str(path)]) == 1
    assert f"FAIL model metadata {meta} is unreadable" in capsys.readouterr().out


def test_check_fails_clearly_when_influxdb_is_down(tmp_path: Path, model: WindowReconstructor,
                                                   capsys: pytest.CaptureFixture[str]) -> None:
    url = f"http://127.0.0.1:{free_port()}"
    path, _ = _check_setup(tmp_path, url, "db", model)
    assert main(["check", "-c", str(path)]) == 1
    out = capsys.readouterr().out
    assert f"FAIL InfluxDB at {url} is unreachable" in out and "influxdb.url" in out
    assert out.count("ok   model heartbeat-") == 2  # the other checks still ran


def test_check_fails_clearly_on_a_model_trained_with_another_window(
        influxd: LocalInfluxd, database: str, tmp_path: Path, model: WindowReconstructor,
        capsys: pytest.CaptureFixture[str]) -> None:
    path, _ = _check_setup(tmp_path, influxd.url, database, model)
    path.write_text(path.read_text() + "window = 16\nslide = 8\n")
    assert main(["check", "-c", str(path)]) == 1
    out = capsys.readouterr().out
    assert out.count("FAIL model heartbeat-") == 2
    assert "trained with window=32 period=1000000000ns" in out and "config says window=16" in out
