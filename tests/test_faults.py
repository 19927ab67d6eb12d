"""Bad input and failures: InfluxDB down at start or mid-run, dirty data, too little training data, new series,
models that disagree with the config, and `anomalyd check` on a corrupt model or a dead server.

Nothing may be lost: after an outage every window on the grid is scored exactly once, and a tick whose writes
failed leaves no trace in the score histories. Every window is scored (slide 1): the windows due in a range are
the samples in it, and every expected count below is derived from the data written.
"""

from __future__ import annotations

import logging
import shutil
import time
from collections import Counter
from collections.abc import Iterable, Iterator
from pathlib import Path

import numpy as np
import pytest

from anomalyd.cli import main
from anomalyd.config import Config, TrainRange
from anomalyd.core.detector import Detector, DetectorSpec
from anomalyd.core.grid import align, align_many
from anomalyd.demo.run import feed
from anomalyd.demo.synthetic import ecg
from anomalyd.service import training
from anomalyd.service.catalog import Catalog, StoredModel, model_id_for, save
from anomalyd.service.daemon import Service
from anomalyd.service.state import Watermarks
from anomalyd.service.worker import TickReport, Worker
from anomalyd.store.base import Point, Query, SeriesData, SeriesPoints, StoreError, expand, line_protocol
from anomalyd.store.influx1 import InfluxDB1Store
from anomalyd.store.local import LocalInfluxd, free_port
from anomalyd.telemetry import REGISTRY
from conftest import make_config, with_signal

S = 10**9
W = 16  # the test model's fixed window
T0 = 1_700_000_000 * S  # the test models' training end: the first due window ends one period later
P1 = (("patient", "p1"),)
P2 = (("patient", "p2"),)


# -- helpers ---------------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def model() -> Detector:
    """A small heartbeat model fitted offline (no InfluxDB needed): a fixed window of W samples, 8 shapes."""
    x, _ = ecg(6000, seed=21)
    det = Detector(DetectorSpec(window=W, n_clusters=8, n_init=1)).fit([x])
    assert det.window_ == W
    return det


def save_model(cfg: Config, model: Detector, tags: tuple[tuple[str, str], ...], train_end: int = T0,
               signal: str = "heartbeat", period: int = S) -> None:
    save(cfg.paths.models, StoredModel(model_id_for(signal, tags, "series"), signal, tags, "series", model, period,
                                       train_end - 3600 * S, train_end, meta={"fields": ["value"]}))


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


def grid(a: int, b: int) -> list[int]:
    """The grid times (1 s) in ``(a, b]``: the ends of the windows due in that range, one per sample."""
    return list(range(a + S, b + 1, S))


class FakeStore:
    """A store that returns what a real one might (NaN, duplicates, disorder, jitter), honouring the time range.

    ``fail_on`` names a measurement: a write fails at its first point of it, as an unreachable server would."""

    def __init__(self, series: dict[tuple[tuple[str, str], ...], tuple[np.ndarray, np.ndarray]]) -> None:
        self.series = series
        self.points: list[Point] = []
        self.reads = 0
        self.fail_on: str | None = None

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

    def write(self, points: Iterable[Point | SeriesPoints], retention_policy: str = "") -> None:
        for p in expand(list(points)):
            if p.measurement == self.fail_on:  # the points before it are written, as by a server dying mid-write
                raise StoreError("InfluxDB at http://fake is unreachable (ConnectionError)")
            line_protocol(p)  # every point must be writable: no NaN or infinite field
            self.points.append(p)

    def latest(self, measurement: str, tags: tuple[tuple[str, str], ...]) -> dict[int, dict[str, object]]:
        """Fields per timestamp for one series, the later write winning (as InfluxDB overwrites a point)."""
        return {p.time_ns: dict(p.fields) for p in self.points
                if p.measurement == measurement and set(tags) <= set(p.tags)}

    def errors(self, tags: tuple[tuple[str, str], ...]) -> dict[int, dict[str, object]]:
        """Output fields per window end, for one series."""
        return self.latest("anomaly_error", tags)


def fake_worker(cfg: Config, store: FakeStore, tmp: Path, now: int = T0 + 1000 * S) -> Worker:
    return Worker(cfg, store, Catalog(cfg.paths.models), Watermarks(tmp / "wm.json"), alerts=None,
                  clock=lambda: now)


def run_until_called(service: Service, calls: list[float], n: int, timeout_s: float = 10.0) -> list[object]:
    """Call ``service.run_tick`` in a tight loop (as a scheduler would, only faster) until the worker ran ``n``
    more times; return what every run_tick returned."""
    target = len(calls) + n
    deadline = time.monotonic() + timeout_s
    returned: list[object] = []
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


def _clean(n: int = 1200, seed: int = 22) -> tuple[np.ndarray, np.ndarray]:
    """A clean heartbeat at 1 s from 200 s before T0: context for the first windows, and 999 s after T0."""
    x, _ = ecg(n, seed=seed)
    return T0 - 200 * S + np.arange(n, dtype=np.int64) * S, x


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
        cfg = make_config(server.url, "faults", tmp_path)
        cfg = with_signal(cfg, clusters=50, n_init=2, train_range=TrainRange("now-3h", "now-20m"))
        step = cfg.signals[0].step_ns  # one window per sample (slide 1, write_every 1)
        t0 = time.time_ns() // step * step
        now = [t0]
        store = InfluxDB1Store(cfg.influxdb, cfg.daemon.write_batch)
        # Data up to 15 minutes after the first tick, as if the sensors kept writing to a buffer/relay.
        feed(cfg, store, 3 * 3600 + 15 * 60, now_ns=t0 + 15 * 60 * S, future_s=0)
        trained = training.train(cfg, store, now_ns=t0, progress=False)
        assert not trained.failed and len(trained.trained) == 2
        train_end = trained.trained[0].train_end_ns
        assert {m.train_end_ns for m in trained.trained} == {train_end} == {t0 - 20 * 60 * S}

        def due(a: int, b: int) -> int:
            """Windows due for the two series between watermark ``a`` and ``b``: one per sample."""
            return 2 * (b - a) // step

        worker = Worker(cfg, store, Catalog(cfg.paths.models), Watermarks(cfg.paths.state / "watermarks.json"),
                        alerts=None, clock=lambda: now[0])
        calls = spy_on_ticks(worker)
        service = Service(worker, interval_s=0.05, max_backoff_s=0.2, health_listen="")
        reports = [service.run_tick()]
        assert reports[0] is not None and reports[0].windows == due(train_end, t0)

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
        assert rep.windows == due(t0, now[0])  # the whole outage, caught up in one tick
        assert service.health.consecutive_failures == 0 and service.health.ok()

        # InfluxDB dies in the middle of a tick: once every error point of the tick is handed to the store, before
        # the reconstruction (whether the worker writes them in one call or two).
        real_write = store.write
        handed: list[str] = []

        def die_after_the_errors(points: Iterable[Point | SeriesPoints], retention_policy: str = "") -> None:
            def items() -> Iterator[Point | SeriesPoints]:
                for p in points:
                    if p.measurement == cfg.output.reconstruction_measurement and server.proc is not None:
                        server.stop()
                    handed.extend([p.measurement] * len(expand([p])))
                    yield p

            real_write(items(), retention_policy)

        store.write = die_after_the_errors  # type: ignore[method-assign]
        mark = now[0]
        now[0] += 3 * step
        assert run_until_called(service, calls, 1) == [None] and server.proc is None
        assert handed.count(cfg.output.measurement) == due(mark, now[0]) and handed.count(
            cfg.output.reconstruction_measurement) > 0
        assert Watermarks(cfg.paths.state / "watermarks.json").get("heartbeat|patient=p1") == mark
        store.write = real_write  # type: ignore[method-assign]
        server.start()
        now[0] += step
        while (rep := service.run_tick()) is None:
            assert time.monotonic() < deadline + 20, service.health.last_error
            time.sleep(0.01)
        reports.append(rep)
        assert rep.windows == due(mark, now[0])  # the windows of the broken tick again, and the new one

        # A daemon restarted afterwards resumes from the persisted watermarks.
        mark = now[0]
        now[0] += 5 * step
        fresh = Worker(cfg, store, Catalog(cfg.paths.models), Watermarks(cfg.paths.state / "watermarks.json"),
                       alerts=None, clock=lambda: now[0])
        last = fresh.tick()
        reports.append(last)
        assert last.windows == due(mark, now[0])

        expected = set(grid(train_end, now[0]))
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
        # The reconstruction covers every new sample without a hole, tick boundaries and outage included, up to
        # the samples whose windows the last tick could not complete yet (fewer than a window's worth).
        w = trained.trained[0].model.window_
        recon = rows(server, "faults", 'SELECT "reconstruction" FROM "anomaly_reconstruction" GROUP BY "patient"')
        for patient in ("p1", "p2"):
            times = sorted(r["time"] for r in recon if r["patient"] == patient)
            assert len(times) == len(set(times)) and times[0] >= train_end + S - (w - 1) * S
            new = [x for x in times if x > train_end]
            assert new == list(range(train_end + S, new[-1] + 1, S)) and now[0] - w * S < new[-1] <= now[0]
    finally:
        server.stop()


# -- (2b) a failed tick leaves no trace; the reconstruction has no holes -----------------------------------------


@pytest.mark.parametrize("failing", ["anomaly_error", "anomaly_reconstruction"],
                         ids=["error-write", "reconstruction-write"])
def test_a_tick_whose_writes_fail_leaves_no_trace_in_the_score_histories(
        cfg: Config, tmp_path: Path, model: Detector, failing: str) -> None:
    save_model(cfg, model, P1)
    save_model(cfg, model, P2)
    t, x = _clean()
    odd = x.copy()
    hit = (t > T0 + 130 * S) & (t <= T0 + 136 * S)
    odd[hit] += 8 * float(np.std(x))  # an anomaly inside the tick that fails
    data: dict[tuple[tuple[str, str], ...], tuple[np.ndarray, np.ndarray]] = {P1: (t, x), P2: (t, odd)}
    ticks = [T0 + 100 * S, T0 + 160 * S, T0 + 250 * S]

    def run(name: str, fail_at: int | None = None, replay_at: int | None = None
            ) -> tuple[FakeStore, list[TickReport]]:
        store = FakeStore(data)
        now = [T0]
        path = tmp_path / name / "wm.json"
        worker = Worker(cfg, store, Catalog(cfg.paths.models), Watermarks(path), alerts=None, clock=lambda: now[0])
        reports = []
        for i, tick in enumerate(ticks):
            now[0] = tick
            if i == fail_at:
                store.fail_on = failing
                with pytest.raises(StoreError, match="unreachable"):
                    worker.tick()
                store.fail_on = None
                # Nothing of the failed tick counts: the retry starts from the same watermarks.
                assert {worker.watermarks.get(f"heartbeat|patient=p{k}") for k in (1, 2)} == {ticks[i - 1]}
            if i == replay_at:  # what a failed tick would leave if it kept its score histories
                shutil.copy(path, path.with_suffix(".before"))
                worker.tick()
                worker.watermarks = Watermarks(path.with_suffix(".before"))
            reports.append(worker.tick())
        return store, reports

    straight, plain = run("straight")
    broken, retried = run("broken", fail_at=1)
    for tags in (P1, P2):
        assert broken.errors(tags) == straight.errors(tags)
        assert set(straight.errors(tags)) == set(grid(T0, ticks[-1]))

    def outcome(rep: TickReport) -> list[tuple[object, ...]]:
        return [(r.key.id, r.end_ns, r.max_error, r.score, r.anomalous) for r in rep.results]

    assert [outcome(r) for r in retried] == [outcome(r) for r in plain]
    flagged = [r.end_ns for r in plain[1].results if r.anomalous]
    assert flagged and all(r.key.tags == P2 for r in plain[1].results if r.anomalous)
    # The comparison can fail: a retry on histories that had already seen the tick scores differently.
    _, replayed = run("replayed", replay_at=1)
    assert [r.score for r in replayed[1].results] != [r.score for r in plain[1].results]


TICK_SIZES = (5, 7, 13, 1, 16, 3, 8, 9, 2, 31, 4)  # samples per tick: boundaries at every offset in a window


def _live_reconstruction(cfg: Config, tmp_path: Path, model: Detector
                         ) -> tuple[dict[int, float], np.ndarray, np.ndarray, int]:
    """Run live ticks of TICK_SIZES samples over a clean heartbeat; return the reconstruction as InfluxDB would
    hold it (later writes overwriting earlier ones), the data, and the last tick's end."""
    assert cfg.output.write_reconstruction
    save_model(cfg, model, P1)
    t, x = _clean()
    store = FakeStore({P1: (t, x)})
    now = [T0]
    worker = Worker(cfg, store, Catalog(cfg.paths.models), Watermarks(tmp_path / "wm.json"), alerts=None,
                    clock=lambda: now[0])
    for n in TICK_SIZES:
        now[0] += n * S
        assert worker.tick().windows == n
    recon = {k: float(f["reconstruction"])  # type: ignore[arg-type]
             for k, f in store.latest(cfg.output.reconstruction_measurement, P1).items()}
    for k, f in store.latest(cfg.output.reconstruction_measurement, P1).items():
        assert f["value"] == x[(k - t[0]) // S]
    return recon, t, x, now[0]


def test_live_ticks_write_the_reconstruction_of_every_sample(cfg: Config, tmp_path: Path, model: Detector) -> None:
    recon, t, x, hi = _live_reconstruction(cfg, tmp_path, model)
    # What the whole series draws offline, with the data a tick ending at `hi` reads (max_gap + 1 samples beyond).
    seen = t <= hi + (cfg.signals[0].max_gap + 1) * S
    offline = model.overlap_reconstruction(x[seen], first_index=int(t[0] // S))
    drawn = {int(k) for k, v in zip(t[seen], offline, strict=True) if T0 < k <= hi and np.isfinite(v)}
    assert len(drawn) > (hi - T0) // S - W  # only the last samples wait for windows of the next tick
    new = {k for k in recon if k > T0}
    assert new == drawn, (sorted((k - T0) // S for k in drawn - new), sorted((k - T0) // S for k in new - drawn))
    assert sorted(new) == grid(T0, max(new))  # no hole, at tick boundaries or elsewhere


def test_live_reconstruction_equals_the_whole_series_picture(cfg: Config, tmp_path: Path, model: Detector) -> None:
    """`Detector.overlap_reconstruction` draws the same picture from any stretch that holds a sample's windows:
    the values the ticks leave (rewritten samples included) are the whole series' picture, whatever the tick
    sizes, from the first due window's first sample on."""
    recon, t, x, hi = _live_reconstruction(cfg, tmp_path, model)
    seen = t <= hi + (cfg.signals[0].max_gap + 1) * S
    offline = model.overlap_reconstruction(x[seen], first_index=int(t[0] // S))
    first = T0 + S - (W - 1) * S  # the first sample of the first due window
    want = {int(k): float(v) for k, v in zip(t[seen], offline, strict=True) if first <= k <= hi and np.isfinite(v)}
    holes = sorted((k - T0) // S for k in set(want) - set(recon))
    extra = sorted((k - T0) // S for k in set(recon) - set(want))
    wrong = {(k - T0) // S: (round(recon[k], 3), round(want[k], 3)) for k in set(want) & set(recon)
             if not np.isclose(recon[k], want[k], rtol=1e-9)}
    assert not (holes or extra or wrong), (
        f"seconds after T0 -- not written: {holes}; written beyond the picture: {extra}; written (last) as another "
        f"value than the whole series' picture (written, picture): {wrong}; tick ends: "
        f"{np.cumsum(TICK_SIZES).tolist()}")


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
    ticks = np.arange(200) * period
    jitter = rng.uniform(-0.3, 0.3, 200) * period
    v = rng.normal(size=200)
    stamped = (ticks + jitter).astype(np.int64)
    a, problems = align(stamped, v, period, 0, 200, max_gap=2)
    np.testing.assert_array_equal(a.values, v)
    assert problems == {"off_grid": int(np.count_nonzero(jitter.astype(np.int64)))}
    assert a.stamps is not None and a.stamps.tolist() == stamped.tolist()  # each sample keeps its own time


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
    matrix, problems, stamps = align_many(series, period, 0, n, max_gap=2)
    for r, (t, v) in enumerate(series):
        one, p = align(t, v, period, 0, n, max_gap=2)
        np.testing.assert_array_equal(matrix[r], one.values, err_msg=f"row {r}")
        assert problems[r] == p, r
        if one.stamps is None:
            assert r not in stamps, r
        else:
            np.testing.assert_array_equal(stamps[r], one.stamps, err_msg=f"row {r}")
    assert set(stamps) == {4}  # only the jittered series has samples off the grid


def test_nan_and_infinite_values_from_a_store(cfg: Config, tmp_path: Path, model: Detector) -> None:
    save_model(cfg, model, P1)
    save_model(cfg, model, P2)
    sig = cfg.signals[0]
    t, x = _clean()
    dirty = x.copy()
    isolated = [T0 + 40 * S, T0 + 103 * S]  # one NaN, one inf: one-sample gaps, filled
    block = T0 + (300 + np.arange(sig.max_gap + 4)) * S  # NaN in a row, longer than max_gap: not filled
    dirty[(isolated[0] - t[0]) // S] = np.nan
    dirty[(isolated[1] - t[0]) // S] = np.inf
    dirty[(block - t[0]) // S] = np.nan
    store = FakeStore({P1: (t, x), P2: (t, dirty)})
    before = metric("anomalyd_data_problems_total", signal="heartbeat", kind="non_finite")
    report = fake_worker(cfg, store, tmp_path).score_range(T0, T0 + 800 * S)
    assert metric("anomalyd_data_problems_total", signal="heartbeat", kind="non_finite") - before == 2 + len(block)
    clean, got = store.errors(P1), store.errors(P2)
    ends = grid(T0, T0 + 800 * S)
    assert sorted(clean) == ends
    # A window whose last sample is lost in the long gap is not written at all; the windows after it that still
    # hold part of the gap are missing-data windows.
    assert sorted(got) == sorted(set(ends) - set(block.tolist()))
    for end, fields in got.items():
        start = end - (W - 1) * S
        n_gap = int(((block >= start) & (block <= end)).sum())
        if n_gap:
            assert fields["missing"] is True and fields["n_missing"] == n_gap and fields["anomalous"] is False
            assert "max_error" not in fields and "score" not in fields
            continue
        assert fields["missing"] is False and fields["n_missing"] == 0
        assert np.isfinite(float(fields["max_error"])) and np.isfinite(float(fields["score"]))  # type: ignore[arg-type]
        if end < isolated[0]:  # nothing dirty seen yet: the same window, scored the same way
            assert fields == clean[end]
        elif not any(start <= s <= end for s in isolated):
            assert fields["max_error"] == clean[end]["max_error"]
    n_missing = sum(1 for f in got.values() if f["missing"])
    assert n_missing == W - 1 == report.missing  # the windows ending on the W - 1 samples after the gap
    assert report.signals["heartbeat"].windows == len(clean) + len(got) - n_missing


def test_long_gaps_are_missing_windows_and_short_gaps_are_filled(
        cfg: Config, store: InfluxDB1Store, influxd: LocalInfluxd, database: str, tmp_path: Path,
        model: Detector) -> None:
    save_model(cfg, model, P1)
    sig = cfg.signals[0]
    t, x = _clean()
    long_gap = 400 + np.arange(sig.max_gap + 2)  # seconds after T0: a lead off, say
    short_gap = 600 + np.arange(sig.max_gap)  # exactly max_gap samples: filled
    keep = np.ones(len(t), dtype=bool)
    keep[(T0 - t[0]) // S + np.concatenate([long_gap, short_gap])] = False
    store.write(points_for("ecg", P1, t[keep], x[keep]))
    missing_before = metric("anomalyd_windows_total", signal="heartbeat", result="missing")
    report = fake_worker(cfg, store, tmp_path).score_range(T0, T0 + 800 * S)  # type: ignore[arg-type]
    out = rows(influxd, database,
               'SELECT "max_error", "score", "missing", "n_missing", "anomalous" FROM "anomaly_error"')
    # Every window is written except those whose last sample is in the long gap (a filled sample counts).
    assert sorted((r["time"] - T0) // S for r in out) == [k for k in range(1, 801) if k not in long_gap]
    for r in out:
        end = (r["time"] - T0) // S
        covers_long = bool(end - (W - 1) <= long_gap[-1] and end >= long_gap[0])
        assert r["missing"] is covers_long, r
        if covers_long:
            n_gap = sum(1 for k in long_gap if end - (W - 1) <= k <= end)
            assert r["max_error"] is None and r["score"] is None and r["n_missing"] == n_gap
            assert r["anomalous"] is False
        else:
            assert r["max_error"] is not None and r["score"] is not None and r["n_missing"] == 0
    n_missing = sum(r["missing"] for r in out)
    assert report.missing == n_missing == W - 1  # the windows ending on the W - 1 samples after the long gap
    assert metric("anomalyd_windows_total", signal="heartbeat", result="missing") - missing_before == n_missing
    assert report.windows == len(out) - n_missing


def test_duplicate_and_out_of_order_timestamps(cfg: Config, tmp_path: Path, model: Detector,
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
    with caplog.at_level(logging.INFO, logger="anomalyd.service.worker"):
        fake_worker(cfg, store, tmp_path).score_range(T0, T0 + 800 * S)
    clean, got = store.errors(P1), store.errors(P2)
    assert sorted(clean) == grid(T0, T0 + 800 * S) and got == clean
    assert "out_of_order samples" in caplog.text and "duplicate samples" in caplog.text
    assert "heartbeat[patient=p2]" in caplog.text


def test_irregular_timestamps_are_scored_like_regular_ones(cfg: Config, tmp_path: Path, model: Detector) -> None:
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
    # The same windows, scored the same; each point carries the time of its window's last (jittered) sample.
    stamp = dict(zip(t.tolist(), (t + jitter).tolist(), strict=True))
    assert sorted(clean) == grid(T0, end) and got == {stamp[k]: f for k, f in clean.items()}


def test_a_late_jittered_last_sample_does_not_lose_the_newest_window(cfg: Config, tmp_path: Path,
                                                                      model: Detector) -> None:
    save_model(cfg, model, P1)
    save_model(cfg, model, P2)
    t, x = _clean()
    newest = T0 + 800 * S
    t, x = t[t <= newest], x[t <= newest]  # live: the newest sample is the last one written
    late = 3 * S // 10  # +0.3 period on the newest window's last sample
    jitter = np.where(t == newest, late, 0)
    store = FakeStore({P1: (t, x), P2: (t + jitter, x)})
    report = fake_worker(cfg, store, tmp_path, now=newest + S // 2).tick()
    assert report.missing == 0 and report.windows == 2 * len(grid(T0, newest))
    clean = store.errors(P1)
    assert max(clean) == newest
    assert store.errors(P2) == {(k + late if k == newest else k): f for k, f in clean.items()}


# -- (4) too little training data ------------------------------------------------------------------------------


def test_too_little_training_data_fails_that_series_only(cfg: Config, store: InfluxDB1Store,
                                                         caplog: pytest.LogCaptureFixture) -> None:
    now = T0
    cfg = with_signal(cfg, clusters=50, n_init=1, train_range=TrainRange("now-3h", "now"))
    sig = cfg.signals[0]
    least = 2 * sig.spec().min_window + 2  # the shortest gap-free stretch an automatic window can train on
    x, _ = ecg(3 * 3600, seed=23)
    t = now - 3 * 3600 * S + np.arange(len(x), dtype=np.int64) * S
    store.write(points_for("ecg", P1, t, x))
    store.write(points_for("ecg", P2, t[: least - 1], x[: least - 1]))  # one sample too few
    p3 = (("patient", "p3"),)
    store.write(points_for("ecg", p3, t[:least], x[:least]))  # just enough: the catalog shrinks to the data
    present, absent = least - 4, sig.max_gap + 12  # gaps longer than max_gap split it into short stretches
    gappy = np.arange(3000) % (present + absent) < present
    store.write(points_for("ecg", (("patient", "p4"),), t[:3000][gappy], x[:3000][gappy]))
    report = training.train(cfg, store, now_ns=now, progress=False)
    assert [m.tags for m in report.trained] == [P1, p3]
    assert set(report.failed) == {"heartbeat|patient=p2", "heartbeat|patient=p4"}
    min_w = sig.spec().min_window
    assert (f"window={min_w} needs a gap-free training stretch of at least {least} samples, the longest has "
            f"{least - 1} (of {least - 1} in all)") in report.failed["heartbeat|patient=p2"]
    assert (f"the longest has {present} (of {int(gappy.sum())} in all)"
            in report.failed["heartbeat|patient=p4"])
    assert "widen the training range" in report.failed["heartbeat|patient=p4"]
    small = report.trained[1].model
    assert small.window_ == min_w and len(small.catalog_.cluster_centers_) < sig.clusters
    assert "cannot train heartbeat[patient=p2]" in caplog.text
    assert Catalog(cfg.paths.models).get(model_id_for("heartbeat", P1, "series")) is not None
    assert Catalog(cfg.paths.models).get(model_id_for("heartbeat", p3, "series")) is not None
    assert len(list(cfg.paths.models.glob("*.json"))) == 2


def test_a_fixed_window_on_too_little_data_fails_training_instead_of_shrinking(
        cfg: Config, store: InfluxDB1Store, caplog: pytest.LogCaptureFixture) -> None:
    window = 32
    need = 2 * window + 2
    short = need - 10  # too few for the fixed window, enough for an automatic one
    assert short >= 2 * DetectorSpec().min_window + 2
    cfg = with_signal(cfg, window=window, clusters=50, n_init=1, train_range=TrainRange("now-1h", "now"))
    x, _ = ecg(short, seed=24)
    t = T0 - short * S + np.arange(short, dtype=np.int64) * S
    store.write(points_for("ecg", P1, t, x))
    report = training.train(cfg, store, now_ns=T0, progress=False)
    assert not report.trained and set(report.failed) == {"heartbeat|patient=p1"}
    why = report.failed["heartbeat|patient=p1"]
    assert (f"window={window} needs a gap-free training stretch of at least {need} samples, the longest has "
            f"{short}") in why and "set a smaller window" in why
    assert "cannot train heartbeat[patient=p1]" in caplog.text
    assert not list(cfg.paths.models.glob("*.json")) and not list(cfg.paths.models.glob("*.npz"))
    # The same data trains with an automatic window: a fixed window silently shrunk would have saved that one.
    auto = training.train(with_signal(cfg, window=None), store, now_ns=T0, progress=False)
    assert not auto.failed and [m.model.window_ for m in auto.trained] != [window]


# -- (5) a series that appears after training --------------------------------------------------------------------


def test_a_series_that_appears_after_training_is_logged_once_counted_and_skipped(
        cfg: Config, store: InfluxDB1Store, influxd: LocalInfluxd, database: str, tmp_path: Path,
        model: Detector, caplog: pytest.LogCaptureFixture) -> None:
    save_model(cfg, model, P1, train_end=T0)
    step = cfg.signals[0].step_ns
    t, x = _clean()
    store.write(points_for("ecg", P1, t, x) + points_for("ecg", P2, t, x))
    now = [T0 + 200 * S]
    worker = Worker(cfg, store, Catalog(cfg.paths.models), Watermarks(tmp_path / "wm.json"), alerts=None,
                    clock=lambda: now[0])
    reports = []
    with caplog.at_level(logging.WARNING, logger="anomalyd.service.worker"):
        for _ in range(3):
            reports.append(worker.tick())
            assert metric("anomalyd_untrained_series", signal="heartbeat") == 1
            now[0] += 2 * step
    assert all(r.signals["heartbeat"].untrained == 1 and r.signals["heartbeat"].series == 1 for r in reports)
    assert [r.windows for r in reports] == [len(grid(T0, T0 + 200 * S)), 2, 2]
    warnings = [r.getMessage() for r in caplog.records if "patient=p2" in r.getMessage()]
    assert len(warnings) == 1 and "has no model" in warnings[0] and "anomalyd train" in warnings[0]
    out = rows(influxd, database, 'SELECT "max_error" FROM "anomaly_error" GROUP BY "patient"')
    assert {r["patient"] for r in out} == {"p1"} and len(out) == sum(r.windows for r in reports) > 0
    assert Watermarks(tmp_path / "wm.json").get("heartbeat|patient=p2") is None
    # Once trained, it is picked up without a restart, from its model's training end: every window since then.
    save_model(cfg, model, P2, train_end=T0)
    rep = worker.tick()
    assert rep.signals["heartbeat"].untrained == 0 and rep.signals["heartbeat"].series == 2
    assert metric("anomalyd_untrained_series", signal="heartbeat") == 0
    assert Watermarks(tmp_path / "wm.json").get("heartbeat|patient=p2") == now[0]
    p2 = rows(influxd, database, 'SELECT "max_error", "missing" FROM "anomaly_error" WHERE "patient" = \'p2\'')
    lost = sorted(set(grid(T0, now[0])) - {r["time"] for r in p2 if not r["missing"]})
    assert not lost, (f"{len(lost)} windows of the new series, from {(lost[0] - T0) // S} s to "
                      f"{(lost[-1] - T0) // S} s after its training end, were skipped or scored as missing data "
                      f"although InfluxDB holds their samples")
    assert rep.windows == 2 + len(grid(T0, now[0])) and rep.missing == 0


# -- (6) a model that disagrees with the config ------------------------------------------------------------------


@pytest.mark.parametrize("change", [{"window": 2 * W}, {"period_ns": 2 * S}], ids=["window", "period"])
def test_a_model_that_disagrees_with_the_config_is_skipped_with_a_clear_error(
        influxd: LocalInfluxd, database: str, tmp_path: Path, model: Detector,
        caplog: pytest.LogCaptureFixture, change: dict) -> None:
    signals = [{"name": "heartbeat", "measurement": "ecg", "field": "value", "group_by": ["patient"],
                "period": "1s", "clusters": 50},
               {"name": "other", "measurement": "ecg2", "field": "value", "group_by": ["patient"],
                "period": "1s", "clusters": 50}]
    cfg = with_signal(make_config(influxd.url, database, tmp_path, signals=signals), **change)
    store = InfluxDB1Store(cfg.influxdb)
    t, x = _clean()
    store.write(points_for("ecg", P1, t, x) + points_for("ecg2", P1, t, x))
    save_model(cfg, model, P1, signal="heartbeat")  # trained with window W, period 1 s
    save_model(cfg, model, P1, signal="other")
    step = cfg.signal("other").step_ns
    now = [T0 + 200 * S]
    worker = Worker(cfg, store, Catalog(cfg.paths.models), Watermarks(tmp_path / "wm.json"), alerts=None,
                    clock=lambda: now[0])
    service = Service(worker, interval_s=1.0, max_backoff_s=2.0, health_listen="")
    with caplog.at_level(logging.WARNING, logger="anomalyd.service.worker"):
        first = service.run_tick()
        now[0] += 4 * step
        second = service.run_tick()
    assert first is not None and second is not None and service.health.ok()
    assert first.signals["heartbeat"].windows == 0 and first.signals["heartbeat"].series == 0
    assert first.signals["other"].windows == len(grid(T0, T0 + 200 * S)) and second.signals["other"].windows == 4
    errors = [r.getMessage() for r in caplog.records if r.levelno >= logging.ERROR]
    assert len(errors) == 1, errors
    sig = cfg.signal("heartbeat")
    if "window" in change:
        assert f"trained with window {W} (config: {sig.window})" in errors[0]
    else:
        assert f"trained with period {S}ns (config: {sig.period_ns}ns)" in errors[0]
    assert "retrain" in errors[0]
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


def _check_setup(tmp_path: Path, url: str, db: str, model: Detector) -> tuple[Path, Config]:
    path = tmp_path / "config.toml"
    path.write_text(CHECK_CONFIG.format(url=url, db=db))
    cfg = make_config(url, db, tmp_path)
    if db != "db":  # a reachable InfluxDB: the collector writes (check fails on a signal without recent data)
        now = time.time_ns() // S * S
        t = now - np.arange(120, dtype=np.int64)[::-1] * S
        x = np.sin(np.arange(120) / 5.0)
        InfluxDB1Store(cfg.influxdb).write(points_for("ecg", P1, t, x) + points_for("ecg", P2, t, x))
    for tags in (P1, P2):
        save_model(cfg, model, tags)
    return path, cfg


def test_check_fails_clearly_on_a_corrupt_model(influxd: LocalInfluxd, database: str, tmp_path: Path,
                                                model: Detector, capsys: pytest.CaptureFixture[str]) -> None:
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


def test_check_fails_clearly_when_influxdb_is_down(tmp_path: Path, model: Detector,
                                                   capsys: pytest.CaptureFixture[str]) -> None:
    url = f"http://127.0.0.1:{free_port()}"
    path, _ = _check_setup(tmp_path, url, "db", model)
    assert main(["check", "-c", str(path)]) == 1
    out = capsys.readouterr().out
    assert f"FAIL InfluxDB at {url} is unreachable" in out and "influxdb.url" in out
    assert out.count("ok   model heartbeat-") == 2  # the other checks still ran


def test_check_fails_clearly_on_a_model_trained_with_another_window(
        influxd: LocalInfluxd, database: str, tmp_path: Path, model: Detector,
        capsys: pytest.CaptureFixture[str]) -> None:
    path, _ = _check_setup(tmp_path, influxd.url, database, model)
    path.write_text(path.read_text() + f"window = {2 * W}\n")
    assert main(["check", "-c", str(path)]) == 1
    out = capsys.readouterr().out
    assert out.count("FAIL model heartbeat-") == 2
    assert f"trained with window {W} (config: {2 * W})" in out and "retrain" in out
