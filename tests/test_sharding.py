"""Sharded replicas on a real InfluxDB: rendezvous ownership, each replica reading only its series, the output
measurement as the durable watermark (3 replicas, one killed, the rest restarted as 2: no window missing, none
scored twice), and two replicas claiming one index."""

from __future__ import annotations

import logging
from collections.abc import Iterable, Iterator
from dataclasses import replace
from pathlib import Path
from typing import Any

import pytest

from anomalyd.config import Config, from_dict
from anomalyd.core.detector import Detector, DetectorSpec
from anomalyd.core.records import SeriesKey
from anomalyd.demo.synthetic import ecg
from anomalyd.service.catalog import Catalog, StoredModel, model_id_for, save
from anomalyd.service.sharding import Shard, owner
from anomalyd.service.state import Watermarks
from anomalyd.service.worker import Worker
from anomalyd.store.base import Point, Query, SeriesData, SeriesPoints
from anomalyd.store.influx1 import InfluxDB1Store
from anomalyd.store.local import LocalInfluxd
from anomalyd.telemetry import REGISTRY
from conftest import make_config
from test_influx import raw_line

S = 10**9
T0 = 1_700_000_000 * S
W = 16
HOSTS = [f"h{i:02d}" for i in range(12)]


class Recording(InfluxDB1Store):
    """The real store, noting every output point written (series, time) and the series filter of every read."""

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.written: list[tuple[str, int]] = []
        self.filters: list[tuple] = []

    def read_batches(self, query: Query, start_ns: int, end_ns: int, size: int) -> Iterator[SeriesData]:
        self.filters.append(query.series)
        yield from super().read_batches(query, start_ns, end_ns, size)

    def write(self, points: Iterable[Point | SeriesPoints], retention_policy: str = "") -> None:
        items = list(points)
        for p in items:
            if p.measurement == "anomaly_error":
                series = dict(p.tags)["series"]
                times = p.times if isinstance(p, SeriesPoints) else [p.time_ns]
                self.written.extend((series, int(t)) for t in times)
        super().write(items, retention_policy)


@pytest.fixture(scope="module")
def model() -> Detector:
    x, _ = ecg(3000, seed=5)
    return Detector(DetectorSpec(window=W, n_clusters=20, n_init=1)).fit([x])


def _config(influxd: LocalInfluxd, database: str, tmp: Path, model: Detector, shard: str) -> Config:
    sig = {"name": "ekg", "measurement": "ecg", "field": "value", "group_by": ["host"], "period": "1s",
           "window": W, "scope": "shared", "clusters": 20, "train_range": ["now-2h", "now-1h"]}
    cfg = make_config(influxd.url, database, tmp, signals=[sig], output={"write_reconstruction": False},
                      daemon={"shard": shard, "interval": "10s"}, alerts={"deadman": "0s"})
    save(cfg.paths.models, StoredModel(model_id_for("ekg", (), "shared"), "ekg", (), "shared", model, S,
                                       T0 - 3600 * S, T0))
    return cfg


def _replica(influxd: LocalInfluxd, database: str, root: Path, model: Detector, index: int,
             count: int) -> tuple[Worker, Recording]:
    """A replica with its own state directory (``root/replica-<index>``, kept across restarts, as a StatefulSet's
    volume is) and the shared models."""
    cfg = _config(influxd, database, root / f"replica-{index}", model, f"{index}/{count}")
    cfg = replace(cfg, paths=replace(cfg.paths, models=root / "models"))
    save(cfg.paths.models, StoredModel(model_id_for("ekg", (), "shared"), "ekg", (), "shared", model, S,
                                       T0 - 3600 * S, T0))
    store = Recording(cfg.influxdb)
    return Worker(cfg, store, Catalog(cfg.paths.models), Watermarks(cfg.paths.state / "watermarks.json"),
                  clock=lambda: T0), store


def _write(influxd: LocalInfluxd, database: str, lo: int, hi: int) -> None:
    for j, h in enumerate(HOSTS):
        x, _ = ecg(hi + 1, seed=j)
        influxd.write_lines(database, "\n".join(raw_line("ecg", {"host": h}, "value", float(x[i]), T0 + i * S)
                                                for i in range(lo, hi + 1)))


def test_rendezvous_moves_only_what_must_move() -> None:
    ids = [f"ekg|host=h{i}" for i in range(3000)]
    three = {s: owner(s, 3) for s in ids}
    two = {s: owner(s, 2) for s in ids}
    assert all(two[s] == three[s] for s in ids if three[s] < 2)  # replica 2 went away: only its series move
    assert 800 < sum(v == 2 for v in three.values()) < 1200  # about a third each
    shard = Shard(1, 3)
    assert [shard.owns(s) for s in ids[:50]] == [three[s] == 1 for s in ids[:50]]
    with pytest.raises(ValueError, match=r"0\.\.2"):
        Shard(3, 3)


def test_three_replicas_then_two_score_every_window_once(influxd: LocalInfluxd, database: str, tmp_path: Path,
                                                         model: Detector) -> None:
    _write(influxd, database, 0, 400)
    replicas = [_replica(influxd, database, tmp_path, model, i, 3) for i in range(3)]
    for t in (100, 150, 200):
        for worker, _ in replicas:
            report = worker.tick(T0 + t * S)
            assert not report.signals["ekg"].failed
    # Each replica read only its own series, by a tag filter.
    for i, (_, store) in enumerate(replicas):
        filtered = {dict(tags)["host"] for f in store.filters for tags in f}
        assert filtered == {h for h in HOSTS if owner(SeriesKey("ekg", (("host", h),)).id, 3) == i}
    # Replica 2 is lost (its state with it); later 0 and 1 come back as a deployment of 2 with their own state.
    lost = replicas.pop()
    for t in (250,):
        for worker, _ in replicas:
            worker.tick(T0 + t * S)
    restarted = [_replica(influxd, database, tmp_path, model, i, 2) for i in range(2)]
    for t in (300, 350, 400):
        for worker, _ in restarted:
            report = worker.tick(T0 + t * S)
            assert not report.signals["ekg"].failed
    written = [w for _, store in [*replicas, lost, *restarted] for w in store.written]
    per_series: dict[str, list[int]] = {}
    for series, t in written:
        per_series.setdefault(series, []).append((t - T0) // S)
    assert sorted(per_series) == sorted(f"host={h}" for h in HOSTS)
    for series, ends in per_series.items():
        assert len(ends) == len(set(ends)), f"{series}: {len(ends) - len(set(ends))} windows scored twice"
        assert sorted(ends) == list(range(1, 401)), f"{series}: windows missing"
    # The lost replica's series were taken over where its output ends (none of their windows twice, above).
    moved = {f"host={h}" for h in HOSTS if owner(SeriesKey("ekg", (("host", h),)).id, 3) == 2}
    taken = {s for _, store in restarted for s, _ in store.written}
    assert moved and moved <= taken


def test_two_replicas_with_one_index_are_told(influxd: LocalInfluxd, database: str, tmp_path: Path,
                                              model: Detector, caplog: pytest.LogCaptureFixture) -> None:
    _write(influxd, database, 0, 200)
    a, _ = _replica(influxd, database, tmp_path / "a", model, 0, 2)
    b, _ = _replica(influxd, database, tmp_path / "b", model, 0, 2)
    with caplog.at_level(logging.ERROR):
        a.tick(T0 + 100 * S)
        b.tick(T0 + 110 * S)
        a.tick(T0 + 120 * S)
    lines = [r.message for r in caplog.records if "also runs as shard 0/2" in r.message]
    assert len(lines) == 2 and b.instance in lines[-1]
    assert REGISTRY.get_sample_value("anomalyd_shard_conflict") == 1
    c, _ = _replica(influxd, database, tmp_path / "c", model, 1, 2)
    c.tick(T0 + 130 * S)
    assert REGISTRY.get_sample_value("anomalyd_shard_conflict") == 0


def test_a_bad_shard_is_one_line() -> None:
    for bad, word in (("3/2", "indices run from 0 to 1"), ("0/0", "N must be at least 1"), ("x", "must be \"I/N\"")):
        with pytest.raises(ValueError, match=r"daemon\.shard") as exc:
            from_dict({"daemon": {"shard": bad}, "signals": [{"name": "a", "measurement": "m", "field": "f",
                                                                "period": "1s"}]}, env={})
        assert word in str(exc.value) and len(str(exc.value).splitlines()) == 2
