"""Multi-field signals through a real InfluxDB: one query per measurement, fields joined per host on the grid, a
counter turned into a rate, per-field attribution on every point and in the attribution measurement, and the bad
inputs (a field that stops, strings in a field, a field added after training)."""

from __future__ import annotations

import logging
from collections.abc import Iterator
from dataclasses import replace
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from anomalyd.config import Config, FieldSpec
from anomalyd.service import training
from anomalyd.service.catalog import Catalog
from anomalyd.service.state import Watermarks
from anomalyd.service.worker import Worker
from anomalyd.store.base import Query, SeriesData, SeriesPoints, StoreError
from anomalyd.store.influx1 import InfluxDB1Store
from anomalyd.store.local import LocalInfluxd
from anomalyd.store.sources import rate, read_signal, signal_reads
from conftest import make_config

S = 10**9
P = 10 * S  # 10 s period
T0 = 1_700_000_000 * S // P * P
N_TRAIN = 6 * 360  # 6 h
N_TEST = 360  # 1 h
HOSTS = ("h1", "h2")
FAULT = slice(N_TRAIN + 200, N_TRAIN + 230)  # h1's memory jumps for 5 minutes


class CountingStore(InfluxDB1Store):
    """The real store, counting the queries of each tick (`read` goes through `read_batches`)."""

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.queries: list[Query] = []

    def read_batches(self, query: Query, start_ns: int, end_ns: int, size: int) -> Iterator[SeriesData]:
        self.queries.append(query)
        yield from super().read_batches(query, start_ns, end_ns, size)


def host_data(seed: int, n: int, fault: bool, shift: bool = False) -> dict[str, np.ndarray]:
    """A host whose cpu, memory and network rate follow one load pattern (period 60 samples). ``fault``: its
    memory jumps for 5 minutes (with ``shift``: from then on)."""
    rng = np.random.default_rng(seed)
    k = np.arange(n)
    load = 0.5 + 0.4 * np.sin(2 * np.pi * k / 60) + 0.03 * rng.standard_normal(n)
    cpu = 20 + 50 * load + rng.standard_normal(n)
    mem = 40 + 10 * load + 0.5 * rng.standard_normal(n)
    net_rate = 1e6 * (1 + load) + 2e4 * rng.standard_normal(n)
    if fault:
        mem[slice(FAULT.start, None) if shift else FAULT] += 25.0  # memory alone: cpu and network stay normal
    counter = 1e9 + np.cumsum(np.maximum(net_rate, 0) * (P / S))
    return {"cpu": cpu, "mem": mem, "net": counter}


SIGNAL = {"name": "host", "group_by": ["host"], "period": "10s", "window": 16, "clusters": 40,
          "train_range": [str(np.datetime64(T0, "ns")) + "Z", str(np.datetime64(T0 + (N_TRAIN - 1) * P, "ns")) + "Z"],
          "fields": [{"measurement": "cpu", "field": "usage_user", "where": {"cpu": "cpu-total"}},
                     {"measurement": "mem", "field": "used_percent"},
                     {"measurement": "net", "field": "bytes_recv", "transform": "non_negative_derivative"}]}


def write_hosts(store: InfluxDB1Store, n: int, skip: dict[tuple[str, str], slice] | None = None,
                shift: bool = False) -> None:
    times = (T0 + np.arange(n) * P).tolist()
    skip = skip or {}
    for i, host in enumerate(HOSTS):
        d = host_data(i, n, fault=host == "h1", shift=shift)
        blocks = [("cpu", (("cpu", "cpu-total"), ("host", host)), "usage_user", d["cpu"]),
                  # another cpu of the same host: the field's where leaves it out
                  ("cpu", (("cpu", "cpu0"), ("host", host)), "usage_user", d["cpu"] * 0 + 99.0),
                  ("mem", (("host", host),), "used_percent", d["mem"]),
                  ("net", (("host", host),), "bytes_recv", d["net"])]
        for meas, tags, fname, values in blocks:
            keep = np.ones(n, dtype=bool)
            if (host, meas) in skip:
                keep[skip[(host, meas)]] = False
            idx = np.flatnonzero(keep)
            store.write([SeriesPoints(meas, tags, (fname,), (values[idx].tolist(),), [times[j] for j in idx])])


@pytest.fixture
def mcfg(influxd: LocalInfluxd, database: str, tmp_path: Path) -> Config:
    return make_config(influxd.url, database, tmp_path, signals=[dict(SIGNAL)],
                       output={"write_reconstruction": False})


def trained(cfg: Config, n: int = N_TRAIN + N_TEST, skip: dict | None = None) -> CountingStore:
    store = CountingStore(cfg.influxdb, cfg.daemon.write_batch)
    write_hosts(store, n, skip)
    report = training.train(cfg, store, now_ns=T0 + n * P, progress=False)
    assert not report.failed, report.failed
    return store


def query(influxd: LocalInfluxd, db: str, q: str) -> list[dict]:
    res = influxd.query(q, db=db)
    return res["results"][0].get("series", [])


def test_rate_is_influxqls_non_negative_derivative() -> None:
    t = np.array([0, 10, 20, 40]) * S
    got = rate(t, np.array([0.0, 100.0, 50.0, 250.0]))
    assert got[0].tolist() == [10 * S, 40 * S] and got[1].tolist() == [10.0, 10.0]


def test_one_query_per_measurement(mcfg: Config) -> None:
    reads = signal_reads(mcfg.signals[0])
    assert [(r.query.measurement, r.query.fields) for r in reads] == [
        ("cpu", ("usage_user",)), ("mem", ("used_percent",)), ("net", ("bytes_recv",))]
    assert reads[0].query.where == (("cpu", "cpu-total"),)
    two = replace(mcfg.signals[0], fields=(FieldSpec("a", "m", "a"), FieldSpec("b", "m", "b")))
    assert [r.query.fields for r in signal_reads(two)] == [("a", "b")]


def test_fields_are_joined_per_host_and_the_counter_is_a_rate(mcfg: Config) -> None:
    store = CountingStore(mcfg.influxdb, mcfg.daemon.write_batch)
    write_hosts(store, 100)
    data = read_signal(store, mcfg.signals[0], T0, T0 + 99 * P)
    assert sorted(data) == [(("host", "h1"),), (("host", "h2"),)]
    cpu, mem, net = data[(("host", "h1"),)]
    want = host_data(0, 100, fault=True)
    assert np.allclose(cpu[1], want["cpu"]) and np.allclose(mem[1], want["mem"])  # not cpu0's 99s
    assert len(net[1]) == 99 and np.allclose(net[1], np.diff(want["net"]) / 10.0)


def test_a_tick_explains_each_window_and_names_the_faulty_field(mcfg: Config, influxd: LocalInfluxd,
                                                                  database: str) -> None:
    store = trained(mcfg)
    worker = Worker(mcfg, store, Catalog(mcfg.paths.models), Watermarks(mcfg.paths.state / "wm.json"),
                    clock=lambda: T0 + (N_TRAIN + N_TEST) * P)
    store.queries.clear()
    report = worker.tick()
    assert report.signals["host"].failed == "" and report.signals["host"].windows > 2 * (N_TEST - 20)
    assert len(store.queries) == 3  # one per measurement, every host at once

    rows = query(influxd, database, 'SELECT "anomalous","top_field","direction","top_share","top_fields" FROM '
                                    '"anomaly_error" WHERE "signal" = \'host\' GROUP BY "host"')
    by_host = {s["tags"]["host"]: s["values"] for s in rows}
    t_fault = {(T0 + k * P) for k in range(FAULT.start, FAULT.stop + 16)}
    flagged = [v for v in by_host["h1"] if v[1]]
    assert flagged, "the memory fault was not flagged"
    in_fault = [v for v in flagged if v[0] in t_fault]
    assert len(in_fault) >= 0.8 * len(flagged), "most flags must be in the fault"
    assert all(v[2] == "mem.used_percent" and v[3] == "up" for v in in_fault[:10]), in_fault[:10]
    assert all(v[2] in ("cpu.usage_user", "mem.used_percent", "net.bytes_recv") for v in by_host["h2"])
    assert all(0 < v[4] <= 1 for v in by_host["h2"]) and "%" in by_host["h2"][0][5]
    assert sum(v[1] for v in by_host["h2"]) <= 3, "the healthy host is (nearly) never flagged"

    shares = query(influxd, database, 'SELECT sum("share") FROM "anomaly_attribution" WHERE "host" = \'h1\' '
                                      "GROUP BY time(10s) fill(none)")
    sums = [v[1] for v in shares[0]["values"]]
    assert len(sums) == len(by_host["h1"]) and np.allclose(sums, 1.0, atol=2e-4)  # shares have 4 decimals
    per_field = query(influxd, database, 'SELECT count("share") FROM "anomaly_attribution" GROUP BY "field"')
    assert sorted(s["tags"]["field"] for s in per_field) == ["cpu.usage_user", "mem.used_percent", "net.bytes_recv"]

    results = [r for r in report.results if r.anomalous and r.key.tags == (("host", "h1"),)]
    top = results[0].attribution[0]
    assert top.field == "mem.used_percent" and top.direction == 1 and top.value is not None and top.value > 60
    assert results[0].values is not None and results[0].values.shape == (16, 3)
    assert results[0].fields == ("cpu.usage_user", "mem.used_percent", "net.bytes_recv")


def test_a_field_that_stops_leaves_the_others_scored(mcfg: Config, influxd: LocalInfluxd, database: str,
                                                     caplog: pytest.LogCaptureFixture) -> None:
    gone = slice(N_TRAIN + 100, N_TRAIN + N_TEST)
    store = trained(mcfg, skip={("h2", "net"): gone})
    worker = Worker(mcfg, store, Catalog(mcfg.paths.models), Watermarks(mcfg.paths.state / "wm.json"),
                    clock=lambda: T0 + (N_TRAIN + N_TEST) * P)
    with caplog.at_level(logging.WARNING):
        report = worker.tick()
    assert report.signals["host"].failed == ""
    assert sum("net.bytes_recv" in r.message and "no samples" in r.message for r in caplog.records) <= 1
    rows = query(influxd, database, 'SELECT "max_error","n_missing","top_field" FROM "anomaly_error" '
                                    "WHERE \"host\" = 'h2' AND time > " + str(T0 + (N_TRAIN + 130) * P))
    assert len(rows[0]["values"]) > 200, "h2's windows go on being written"
    assert all(v[1] > 0 and v[3] != "net.bytes_recv" for v in rows[0]["values"])
    late = query(influxd, database, 'SELECT count("share") FROM "anomaly_attribution" WHERE "host" = \'h2\' AND '
                                    f"time > {T0 + (N_TRAIN + 130) * P} GROUP BY \"field\"")
    assert sorted(s["tags"]["field"] for s in late) == ["cpu.usage_user", "mem.used_percent"]


def test_strings_in_a_field_are_gaps_and_check_says_so(mcfg: Config, capsys: pytest.CaptureFixture[str],
                                                       caplog: pytest.LogCaptureFixture) -> None:
    from anomalyd.cli import _check_fields
    from anomalyd.store.influx1 import _rows_to_matrix

    store = CountingStore(mcfg.influxdb, mcfg.daemon.write_batch)
    write_hosts(store, 100)
    # Another shard (a week later) where the field was written as a string: InfluxDB 1.x accepts it there, and
    # a query returns the field's points of one type only.
    late = T0 + 8 * 86400 * S
    store.write_lines([f'mem,host=h1 used_percent="n/a" {late}'])
    data = read_signal(store, mcfg.signals[0], T0, late + P)
    mem = data[(("host", "h1"),)][1]
    assert len(mem[1]) == 100 and np.isfinite(mem[1]).all()
    assert _check_fields(mcfg, store.query_raw) == set()
    out = capsys.readouterr().out
    assert "WARN signal host: field 'used_percent' of 'mem' holds float/string values" in out
    assert out.count("ok   signal host") == 2
    # A store that hands over mixed rows (strings among numbers): read as missing, said once per field.
    q = Query("mem", "a", (), (), fields=("a", "b"))
    with caplog.at_level(logging.WARNING):
        t, v = _rows_to_matrix([[1, 1.0, "x"], [2, None, 2.0], [3, 3, 3]], False, q)
    assert t.tolist() == [1, 2, 3] and np.isnan(v[0, 1]) and np.isnan(v[1, 0]) and v[2].tolist() == [3.0, 3.0]
    assert [r.message.count("holds strings") for r in caplog.records] == [1]


def test_a_field_added_after_training_asks_for_a_retrain(mcfg: Config, caplog: pytest.LogCaptureFixture) -> None:
    store = trained(mcfg, n=N_TRAIN + 10)
    more = replace(mcfg.signals[0], fields=(*mcfg.signals[0].fields, FieldSpec("disk", "disk", "used")))
    cfg = replace(mcfg, signals=(more,))
    worker = Worker(cfg, store, Catalog(cfg.paths.models), Watermarks(cfg.paths.state / "wm.json"),
                    clock=lambda: T0 + (N_TRAIN + 10) * P)
    with caplog.at_level(logging.ERROR):
        worker.tick()
    lines = [r.message for r in caplog.records if "cannot score" in r.message]
    assert lines and all("new: disk" in m and "retrain" in m for m in lines)


@pytest.mark.parametrize("after", [20, 0])
def test_a_field_that_settles_at_a_new_level_is_rebaselined_and_the_daemon_says_so(
        influxd: LocalInfluxd, database: str, tmp_path: Path, caplog: pytest.LogCaptureFixture, after: int) -> None:
    """h1's memory jumps by 25 and stays there. With ``rebaseline_after``, once its windows have been above its
    history that many times in a row, the daemon accepts the level as its new normal and says so: a warning line
    naming the series, the field and the time, and ``anomalyd_field_rebaselines``. Without it, nothing is said."""
    from anomalyd.telemetry import FIELD_REBASELINES
    cfg = make_config(influxd.url, database, tmp_path, signals=[dict(SIGNAL, rebaseline_after=after)],
                      output={"write_reconstruction": False})
    store = CountingStore(cfg.influxdb, cfg.daemon.write_batch)
    write_hosts(store, N_TRAIN + N_TEST, shift=True)
    assert not training.train(cfg, store, now_ns=T0 + (N_TRAIN + N_TEST) * P, progress=False).failed
    worker = Worker(cfg, store, Catalog(cfg.paths.models), Watermarks(cfg.paths.state / "wm.json"),
                    clock=lambda: T0 + (N_TRAIN + N_TEST) * P)
    counter = FIELD_REBASELINES.labels(signal="host", field="mem.used_percent")
    before = counter._value.get()
    # The first tick's write fails: its windows are scored again by the next, and a re-baseline is said once.
    real_write = store.write
    fail = [True]

    def write(points: Any, rp: str | None = None) -> Any:
        if fail[0]:  # every point is scored, then the write fails
            fail[0] = False
            for _ in points:
                pass
            raise StoreError("injected: influxd refused the write")
        return real_write(points, rp)

    store.write = write  # type: ignore[method-assign]
    with caplog.at_level(logging.WARNING):
        with pytest.raises(StoreError, match="injected"):  # the daemon's loop logs it and backs off
            worker.tick()
        report = worker.tick()
    assert report.signals["host"].failed == ""
    said = [r.getMessage() for r in caplog.records if "re-baselined" in r.getMessage()]
    rows = query(influxd, database, 'SELECT "anomalous" FROM "anomaly_error" WHERE "host" = \'h1\'')[0]["values"]
    flagged = [(t - T0) // P - N_TRAIN for t, a in rows if a]
    shift = FAULT.start - N_TRAIN
    assert any(shift <= k <= shift + 16 for k in flagged), flagged  # the shift itself is flagged
    assert sum(k > shift + after + 16 for k in flagged) <= 2, flagged  # and then no flood
    if not after:
        assert not said and counter._value.get() == before
        return
    # The shifted field first (the joint shape's other fields may follow: their reconstruction moved with it).
    assert said and said[0].startswith("series host[host=h1]: field mem.used_percent re-baselined at the window "
                                       "ending 2023-"), said
    assert all(m.startswith("series host[host=h1]") for m in said), said
    assert sum("field mem.used_percent " in m for m in said) == 1, said  # not again for the failed tick's scoring
    assert counter._value.get() == before + 1


def test_a_decision_level_changed_after_training_applies_without_a_retrain(mcfg: Config, influxd: LocalInfluxd,
                                                                           database: str) -> None:
    """Trained at score_threshold 0.5, run with 1.0 in the config: the daemon decides at 1.0 (the level is
    applied to the loaded model), which no score reaches, so the windows scored above 0.5 are written as not
    anomalous."""
    store = trained(mcfg)
    sig = replace(mcfg.signals[0], score_threshold=1.0)
    cfg = replace(mcfg, signals=(sig,))
    worker = Worker(cfg, store, Catalog(cfg.paths.models), Watermarks(cfg.paths.state / "wm.json"),
                    clock=lambda: T0 + (N_TRAIN + N_TEST) * P)
    assert worker.tick().signals["host"].failed == ""
    rows = query(influxd, database, 'SELECT "score", "anomalous" FROM "anomaly_error" WHERE "host" = \'h1\'')
    values = rows[0]["values"]
    assert any(0.5 <= v[1] < 1.0 for v in values), "no window scored between the two levels"
    assert not any(v[2] for v in values)


def test_a_field_constant_in_training_is_named_at_training(mcfg: Config, caplog: pytest.LogCaptureFixture) -> None:
    """h2's memory holds one value over the whole training range: training says so (its changes will all score
    as anomalous), names the field and the series, and still trains; h1 is not named."""
    store = CountingStore(mcfg.influxdb, mcfg.daemon.write_batch)
    write_hosts(store, N_TRAIN + 10)
    times = (T0 + np.arange(N_TRAIN) * P).tolist()
    store.write([SeriesPoints("mem", (("host", "h2"),), ("used_percent",), ([50.0] * N_TRAIN,), times)])
    with caplog.at_level(logging.WARNING):
        report = training.train(mcfg, store, now_ns=T0 + (N_TRAIN + 10) * P, progress=False)
    assert not report.failed and len(report.trained) == 2
    said = [r.getMessage() for r in caplog.records if "constant" in r.getMessage()]
    assert said == ["field mem.used_percent of series host[host=h2] was constant (50) over its whole training "
                    "range: any change will score as anomalous until it is retrained on data where it moves; "
                    "widen train_range or leave the field out"], said
    # A single-field series says it without a field name; a field that moves is never named.
    from anomalyd.config import from_dict
    from anomalyd.service.training import warn_constant
    one = from_dict({"signals": [{"name": "s", "measurement": "m", "field": "v", "period": "1s"}]}, env={}).signals[0]
    caplog.clear()
    with caplog.at_level(logging.WARNING):
        assert warn_constant("series s[]", one, [np.zeros(50), np.zeros(20)]) == ["v"]
        assert warn_constant("series s[]", one, [np.zeros(50), np.ones(20)]) == []
    assert [r.getMessage() for r in caplog.records] == [
        "series s[] was constant (0) over its whole training range: any change will score as anomalous until it "
        "is retrained on data where it moves; widen train_range"]


def test_many_constant_series_are_summarised(mcfg: Config, caplog: pytest.LogCaptureFixture,
                                             monkeypatch: pytest.MonkeyPatch) -> None:
    """Past `training.CONSTANT_LINES` series, the rest are counted in one line, not one line each."""
    monkeypatch.setattr(training, "CONSTANT_LINES", 1)
    store = CountingStore(mcfg.influxdb, mcfg.daemon.write_batch)
    write_hosts(store, N_TRAIN + 10)
    times = (T0 + np.arange(N_TRAIN) * P).tolist()
    for host in HOSTS:
        store.write([SeriesPoints("mem", (("host", host),), ("used_percent",), ([50.0] * N_TRAIN,), times)])
    with caplog.at_level(logging.WARNING):
        assert not training.train(mcfg, store, now_ns=T0 + (N_TRAIN + 10) * P, progress=False).failed
    said = [r.getMessage() for r in caplog.records if "constant" in r.getMessage()]
    assert len(said) == 2 and said[0].startswith("field mem.used_percent of series host[host=h1] was constant"), said
    assert said[1].startswith("signal host: 1 more series have a field constant over their training range (e.g. "
                              "host[host=h2]"), said
