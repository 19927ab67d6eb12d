"""A tick as a commit, through a real InfluxDB: each signal's points, then its durable alert decisions, then its
watermarks; per-series read starts (a stopped series does not widen the others' reads) and the deadman alert;
late samples scored when they come; windows written as missing re-scored when their samples arrive; one
signal's failure leaving the others alone; unambiguous series keys and the keys saved before they were escaped."""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import replace
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from anomalyd.alerts.manager import AlertManager
from anomalyd.alerts.policy import Transition
from anomalyd.alerts.sinks import Sink
from anomalyd.config import Config
from anomalyd.core.detector import Detector, DetectorSpec
from anomalyd.core.records import SeriesKey, legacy_tags_str, tags_str
from anomalyd.demo.synthetic import ecg
from anomalyd.service.catalog import Catalog, StoredModel, model_id_for, save
from anomalyd.service.state import Watermarks
from anomalyd.service.worker import Worker
from anomalyd.store.base import Query, SeriesData
from anomalyd.store.influx1 import InfluxDB1Store
from anomalyd.store.local import LocalInfluxd
from anomalyd.telemetry import REGISTRY
from conftest import make_config
from test_influx import raw_line

S = 10**9
T0 = 1_700_000_000 * S
W = 32


class RecordingStore(InfluxDB1Store):
    """The real store, noting the range and series filter of every read."""

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.reads: list[tuple[int, int, tuple]] = []

    def read_batches(self, query: Query, start_ns: int, end_ns: int, size: int) -> Iterator[SeriesData]:
        self.reads.append((start_ns, end_ns, query.series))
        yield from super().read_batches(query, start_ns, end_ns, size)


class ListSink(Sink):
    name = "test"

    def __init__(self) -> None:
        self.sent: list[Transition] = []

    def send(self, t: Transition, deadline: float) -> None:
        self.sent.append(t)


@pytest.fixture(scope="module")
def model() -> Detector:
    x, _ = ecg(3000, seed=5)
    return Detector(DetectorSpec(window=W, n_clusters=20, n_init=1)).fit([x])


def _signal(name: str = "ekg", measurement: str = "ecg", group_by: tuple[str, ...] = ("patient",)) -> dict:
    return {"name": name, "measurement": measurement, "field": "value", "group_by": list(group_by), "period": "1s",
            "window": W, "scope": "shared", "clusters": 20, "train_range": ["now-2h", "now-1h"]}


def _setup(influxd: LocalInfluxd, database: str, tmp: Path, model: Detector, signals: list[dict] | None = None,
           **sections: dict) -> Config:
    sections["output"] = {"write_reconstruction": False, **sections.get("output", {})}
    cfg = make_config(influxd.url, database, tmp, signals=signals or [_signal()], **sections)
    for sig in cfg.signals:
        save(cfg.paths.models, StoredModel(model_id_for(sig.name, (), "shared"), sig.name, (), "shared", model, S,
                                           T0 - 3600 * S, T0))
    return cfg


def _write(influxd: LocalInfluxd, database: str, tags: dict[str, str], idx: range, seed: int = 1,
           measurement: str = "ecg") -> None:
    x, _ = ecg(max(idx) + 1, seed=seed)
    influxd.write_lines(database, "\n".join(raw_line(measurement, tags, "value", float(x[i]), T0 + i * S)
                                            for i in idx))


def _points(influxd: LocalInfluxd, database: str, measurement: str = "anomaly_error") -> dict[str, dict[int, dict]]:
    res = influxd.query(f'SELECT * FROM "{measurement}" GROUP BY "series"', database)["results"][0]
    out: dict[str, dict[int, dict]] = {}
    for s in res.get("series", []):
        out[s["tags"]["series"]] = {(v[0] - T0) // S: dict(zip(s["columns"], v, strict=True)) for v in s["values"]}
    return out


def _worker(cfg: Config, store: InfluxDB1Store, alerts: AlertManager | None = None) -> Worker:
    return Worker(cfg, store, Catalog(cfg.paths.models), Watermarks(cfg.paths.state / "watermarks.json"),
                  alerts=alerts, clock=lambda: 0)


def test_a_stopped_series_neither_widens_the_reads_nor_goes_unnoticed(influxd: LocalInfluxd, database: str,
                                                                     tmp_path: Path, model: Detector) -> None:
    cfg = _setup(influxd, database, tmp_path, model, alerts={"deadman": "60s", "sinks": ["log"]})
    for p in ("p1", "p2"):
        _write(influxd, database, {"patient": p}, range(0, 601))
    _write(influxd, database, {"patient": "p3"}, range(0, 201))  # stops at 200 s
    store = RecordingStore(cfg.influxdb)
    sink = ListSink()
    alerts = AlertManager(cfg.alerts, cfg.paths.state, sinks=[sink])
    worker = _worker(cfg, store, alerts)
    for t in range(100, 601, 50):
        store.reads.clear()
        report = worker.tick(T0 + t * S)
        assert not report.signals["ekg"].failed
        # One read of the whole signal per tick, from the live series' watermark: p3's does not drag it back.
        assert len(store.reads) == 1 and store.reads[0][2] == ()
        if t > 100:  # (the first tick, without watermarks, reads back to the backlog limit)
            assert store.reads[0][0] >= T0 + (t - 50 - W - 10) * S
    p3 = SeriesKey("ekg", (("patient", "p3"),)).id
    assert report.signals["ekg"].unscored.keys() == {p3}
    assert "no data" in report.signals["ekg"].unscored[p3]
    assert REGISTRY.get_sample_value("anomalyd_unscored_series", {"signal": "ekg", "reason": "no_data"}) == 1
    assert REGISTRY.get_sample_value("anomalyd_signal_failed", {"signal": "ekg"}) == 0
    dead = [t for t in sink.sent if t.kind == "deadman"]
    assert [t.series_id for t in dead] == [p3] and dead[0].end_ns == T0 + 200 * S
    pts = _points(influxd, database)
    for p, last in (("p1", 600), ("p2", 600), ("p3", 200)):
        got = pts[f"patient={p}"]
        assert sorted(got) == list(range(1, last + 1)), p  # every window with a last sample, once
        assert not any(r["missing"] for k, r in got.items() if k >= W), p
    # p3 comes back: read on its own from its watermark, scored, and announced.
    _write(influxd, database, {"patient": "p3"}, range(400, 651))
    _write(influxd, database, {"patient": "p1"}, range(600, 651))
    _write(influxd, database, {"patient": "p2"}, range(600, 651))
    store.reads.clear()
    report = worker.tick(T0 + 650 * S)
    # The signal's read, then p3's own (and a look at its windows just written as missing, the gap's edge).
    assert [r[2] for r in store.reads][:2] == [(), ((("patient", "p3"),),)]
    assert {r[2] for r in store.reads[1:]} == {((("patient", "p3"),),)}
    assert store.reads[1][0] <= T0 + 200 * S
    assert [t.kind for t in sink.sent if t.series_id == p3] == ["deadman", "resumed"]
    assert not report.signals["ekg"].unscored
    got = _points(influxd, database)["patient=p3"]
    assert set(range(400, 651)) <= set(got) and not set(range(201, 400)) & set(got)


def test_late_samples_are_scored_when_they_come_exactly_as_in_one_pass(influxd: LocalInfluxd, database: str,
                                                                       tmp_path: Path, model: Detector) -> None:
    cfg = _setup(influxd, database, tmp_path, model)
    _write(influxd, database, {"patient": "p1"}, range(0, 281))  # 281..300 are late
    store = InfluxDB1Store(cfg.influxdb)
    worker = _worker(cfg, store)
    worker.tick(T0 + 300 * S)
    assert max(_points(influxd, database)["patient=p1"]) == 280  # nothing decided after the newest sample
    _write(influxd, database, {"patient": "p1"}, range(281, 311))
    worker.tick(T0 + 310 * S)
    live = _points(influxd, database)["patient=p1"]
    assert sorted(live) == list(range(1, 311)) and not any(r["missing"] for k, r in live.items() if k >= W)
    once = replace(cfg, output=replace(cfg.output, measurement="once"))
    _worker(once, store).score_range(T0, T0 + 310 * S)
    ref = _points(influxd, database, "once")["patient=p1"]
    assert {k: (r["max_error"], r["score"]) for k, r in live.items()} == \
        {k: (r["max_error"], r["score"]) for k, r in ref.items()}


def test_windows_written_as_missing_are_rescored_when_their_samples_arrive(influxd: LocalInfluxd, database: str,
                                                                          tmp_path: Path, model: Detector) -> None:
    cfg = _setup(influxd, database, tmp_path, model)
    _write(influxd, database, {"patient": "p1"}, range(0, 150))
    _write(influxd, database, {"patient": "p1"}, range(170, 301))  # a 20 s hole, longer than max_gap
    store = InfluxDB1Store(cfg.influxdb)
    worker = _worker(cfg, store)
    worker.tick(T0 + 300 * S)
    before = _points(influxd, database)["patient=p1"]
    holes = sorted(k for k, r in before.items() if r["missing"] and k >= W)
    assert holes and min(holes) >= 170 and max(holes) < 170 + W + 20
    _write(influxd, database, {"patient": "p1"}, range(150, 170))
    _write(influxd, database, {"patient": "p1"}, range(301, 311))
    worker.tick(T0 + 310 * S)
    after = _points(influxd, database)["patient=p1"]
    assert not [k for k in holes if after[k]["missing"]]
    assert all(np.isfinite(after[k]["max_error"]) for k in holes)
    assert sorted(after) == list(range(1, 311))


class FailingOnce(AlertManager):
    """A real alert manager whose state file cannot be written the first ``n`` times (a full state dir)."""

    def __init__(self, *args: Any, fail: int = 1, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.fail = fail

    def _save_state(self) -> None:
        if self.fail > 0:
            self.fail -= 1
            raise OSError(28, "No space left on device")
        super()._save_state()


def test_alerts_are_committed_before_the_watermarks_and_a_failing_signal_leaves_the_others_alone(
        influxd: LocalInfluxd, database: str, tmp_path: Path, model: Detector) -> None:
    sigs = [_signal(), _signal("logs", "logs")]
    x = ecg(400, seed=3)[0]
    x[200:203] += 8 * np.std(x)  # a spike: anomalous windows, so alerts
    x[300:303] -= 8 * np.std(x)
    influxd.write_lines(database, "\n".join(raw_line("ecg", {"patient": "p1"}, "value", float(x[i]), T0 + i * S)
                                            for i in range(400)))
    influxd.write_lines(database, "\n".join(f'logs,patient=p1 value="text {i}" {T0 + i * S}' for i in range(400)))
    results = {}
    for name, fail in (("control", 0), ("faulty", 2)):
        cfg = _setup(influxd, database, tmp_path / name, model, signals=sigs,
                     output={"measurement": f"out_{name}", "write_reconstruction": False},
                     alerts={"sinks": ["log"], "deadman": "0s"})
        sink = ListSink()
        alerts = FailingOnce(cfg.alerts, cfg.paths.state, sinks=[sink], fail=fail)
        worker = _worker(cfg, InfluxDB1Store(cfg.influxdb), alerts)
        failed_ekg = []
        for t in range(100, 401, 50):
            try:
                report = worker.tick(T0 + t * S)
            except OSError:  # both signals failed: the tick raises (the service backs off)
                failed_ekg.append(True)
                continue
            # The signal whose field holds strings fails every tick, with one line; the other is not held back.
            assert report.signals["logs"].failed
            failed_ekg.append(bool(report.signals["ekg"].failed))
        assert failed_ekg == [True] * fail + [False] * (len(failed_ekg) - fail)
        results[name] = ([(t.kind, t.end_ns) for t in sink.sent], _points(influxd, database, f"out_{name}"))
    assert any(k == "anomalous" for k, _ in results["control"][0])
    assert results["faulty"][0] == results["control"][0]  # none lost, none twice
    assert results["faulty"][1] == results["control"][1]  # every window written once, the same


def test_series_keys_are_unambiguous_and_old_keys_are_still_found(influxd: LocalInfluxd, database: str,
                                                                  tmp_path: Path, model: Detector) -> None:
    cfg = _setup(influxd, database, tmp_path, model, signals=[_signal(group_by=("dc", "host"))])
    a = (("dc", "a"), ("host", "b,host=c"))
    b = (("dc", "a,host=b"), ("host", "c"))
    assert legacy_tags_str(a) == legacy_tags_str(b) and tags_str(a) != tags_str(b)
    for tags in (a, b):
        _write(influxd, database, dict(tags), range(0, 201))
    plain = (("dc", "eu"), ("host", "h1"))
    _write(influxd, database, dict(plain), range(0, 201))
    marks = Watermarks(cfg.paths.state / "watermarks.json")
    marks.advance("ekg|dc=eu,host=h1", T0 + 150 * S)  # as saved before keys were escaped (the same for plain tags)
    marks.save()
    report = _worker(cfg, InfluxDB1Store(cfg.influxdb)).tick(T0 + 200 * S)
    assert report.signals["ekg"].series == 3
    pts = _points(influxd, database)
    assert {tags_str(a), tags_str(b), tags_str(plain)} == set(pts)
    assert len(pts[tags_str(a)]) == len(pts[tags_str(b)]) == 200
    assert min(pts[tags_str(plain)]) == 151  # resumed after the old watermark
