"""The demo's multivariate signal (issue 10, item 6): the synthetic hosts (cpu, memory, a network counter) are what
the generator claims, the demo writes them as Telegraf does with one fault per host in the last hour only, and the
daemon flags the faults naming the faulty metric as the window's top field."""

from __future__ import annotations

import time
from dataclasses import replace
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from anomalyd.config import Config, load
from anomalyd.demo.run import HOSTS, FedSeries, demo_config, feed, host_signals, report_host_findings
from anomalyd.demo.synthetic import HOST_FAULTS, HostSeries, host, inject_host
from anomalyd.service import training
from anomalyd.service.catalog import Catalog
from anomalyd.service.state import Watermarks
from anomalyd.service.worker import Worker
from anomalyd.store.base import Point
from anomalyd.store.influx1 import InfluxDB1Store
from anomalyd.store.local import LocalInfluxd

ROOT = Path(__file__).resolve().parents[1]
S = 10**9
HOUR = 3600 * S


def _config() -> Config:
    return load(ROOT / "config.toml", env={})


def _rate(h: HostSeries) -> np.ndarray:
    return h.net_rate()[1:]


# -- the generator ---------------------------------------------------------------------------------------------


@pytest.mark.parametrize("seed", [0, 21, 22])
def test_a_normal_host_s_metrics_move_together(seed: int) -> None:
    h = host(2520, seed=seed)
    cpu, mem, rate = h.cpu[1:], h.mem[1:], _rate(h)
    assert np.corrcoef(cpu, rate)[0, 1] > 0.8  # both follow the load sample by sample
    assert np.corrcoef(cpu, mem)[0, 1] > 0.5  # memory follows it a minute behind
    assert np.corrcoef(mem, rate)[0, 1] > 0.5
    # plausible units: percent, and a few MB/s
    assert 0 < cpu.min() and cpu.max() < 100 and 0 < mem.min() and mem.max() < 100
    assert 1e5 < rate.min() and rate.max() < 1e8
    # noisy, not a clean function of the load
    assert np.std(cpu - (5 + 60 * h.load[1:])) > 0.5


def test_the_network_counter_only_ever_increases_and_is_an_integer() -> None:
    h = host(5000, seed=3)
    assert h.net.dtype == np.int64 and h.net[0] > 10**9
    assert (np.diff(h.net) > 0).all()
    inject_host(h, "network_drop", 100, 300)
    assert (np.diff(h.net) >= 0).all()  # a drop slows it, never turns it back


def test_the_generator_is_seeded() -> None:
    a, b, c = host(500, seed=5), host(500, seed=5), host(500, seed=6)
    assert np.array_equal(a.cpu, b.cpu) and np.array_equal(a.net, b.net) and np.array_equal(a.mem, b.mem)
    assert not np.array_equal(a.cpu, c.cpu)


@pytest.mark.parametrize("kind", sorted(HOST_FAULTS))
def test_a_fault_changes_only_its_metric_and_only_in_its_samples(kind: str) -> None:
    clean, h = host(2000, seed=7), host(2000, seed=7)
    fault = inject_host(h, kind, 1500, 120)
    assert (fault.kind, fault.start, fault.end, fault.field) == (kind, 1500, 1620, HOST_FAULTS[kind])
    changed = {"cpu.usage_user": np.nonzero(h.cpu != clean.cpu)[0],
               "mem.used_percent": np.nonzero(h.mem != clean.mem)[0],
               "net.bytes_recv": np.nonzero(_rate(h) != _rate(clean))[0] + 1}  # the rate InfluxDB derives
    assert {name for name, idx in changed.items() if len(idx)} == {fault.field}
    idx = changed[fault.field]
    assert idx.min() >= fault.start and idx.max() < fault.end
    assert len(idx) > 0.9 * (fault.end - fault.start)  # the whole fault, not a blip
    if kind == "memory_leak":
        assert h.mem[fault.end - 1] - clean.mem[fault.end - 1] == pytest.approx(20.0)  # 1 point a minute
        assert (h.mem[fault.start:fault.end] > clean.mem[fault.start:fault.end]).all()
    else:
        rate, normal = _rate(h)[fault.start + 12 : fault.end - 1], _rate(clean)[fault.start + 12 : fault.end - 1]
        assert np.allclose(rate / normal, 0.03, atol=0.002)  # 3% of the traffic once it has faded (2 minutes)


def test_a_fault_that_does_not_fit_is_refused() -> None:
    h = host(100, seed=1)
    with pytest.raises(ValueError, match="no room"):
        inject_host(h, "memory_leak", 90, 20)
    with pytest.raises(ValueError, match="not one of"):
        inject_host(h, "disk_full", 10, 20)
    assert h.faults == []


# -- what the demo writes --------------------------------------------------------------------------------------


class _Capture:
    """A store that keeps what is written."""

    def __init__(self) -> None:
        self.points: list[Point] = []

    def ensure_database(self) -> None:
        pass

    def write(self, points: Any, retention_policy: str = "") -> None:
        self.points.extend(points)


def test_the_repo_config_has_the_multivariate_host_signal() -> None:
    cfg = _config()
    (sig,) = host_signals(cfg)
    assert sig.name == "host" and sig.group_by == ("host",) and sig.period_ns == 10 * S
    assert sig.field_names == ("cpu.usage_user", "mem.used_percent", "net.bytes_recv")
    assert [(f.measurement, f.field, dict(f.where), f.transform) for f in sig.fields] == [
        ("cpu", "usage_user", {"cpu": "cpu-total"}, ""), ("mem", "used_percent", {}, ""),
        ("net", "bytes_recv", {}, "non_negative_derivative")]
    assert sig.train_range.resolve(0) == (-7 * HOUR, -HOUR)  # the heartbeat's convention
    assert cfg.signals[0].name == "heartbeat"  # still the first signal (dashboards default to it)


def test_the_demo_writes_both_signals_telegraf_style_with_host_faults_in_the_last_hour_only() -> None:
    cfg = _config()
    store = _Capture()
    now = 1_700_000_000 * S + 3 * S  # not on the 10 s grid: the host samples are
    fed = feed(cfg, store, 7 * 3600, now_ns=now, future_s=600)  # type: ignore[arg-type]
    hosts = [s for s in fed if s.signal == "host"]
    assert [s.tag for s in fed if s.signal == "heartbeat"] == ["p1", "p2"]
    assert [s.tag for s in hosts] == list(HOSTS)
    by_meas: dict[str, list[Point]] = {}
    for p in store.points:
        by_meas.setdefault(p.measurement, []).append(p)
    assert set(by_meas) == {"ecg", "cpu", "mem", "net"}
    grid_end = now // (10 * S) * (10 * S)
    for m, field, tags in (("cpu", "usage_user", {"cpu": "cpu-total"}), ("mem", "used_percent", {}),
                           ("net", "bytes_recv", {})):
        pts = by_meas[m]
        assert len(pts) == 2 * 2520  # 7 h at 10 s, two hosts: the demo stays quick
        assert {p.fields[0][0] for p in pts} == {field}
        assert {tuple(sorted(p.tags)) for p in pts} == {tuple(sorted({"host": h, **tags}.items())) for h in HOSTS}
        times = sorted({p.time_ns for p in pts})
        assert times[0] == grid_end - 2520 * 10 * S and times[-1] == grid_end - 10 * S
        assert all(t % (10 * S) == 0 for t in times)
    for h in HOSTS:
        values = [p.fields[0][1] for p in sorted(by_meas["net"], key=lambda p: p.time_ns) if ("host", h) in p.tags]
        assert all(type(v) is int for v in values)  # written as an integer counter (bytes_recv=...i)
        assert (np.diff(np.asarray(values, dtype=np.int64)) >= 0).all()
    # One fault per host, a different metric each, inside the fed history's last hour.
    faults = [(s.tag, a) for s in hosts for a in s.anomalies]
    assert sorted((t, a.kind, a.field) for t, a in faults) == [
        ("web-1", "memory_leak", "mem.used_percent"), ("web-2", "network_drop", "net.bytes_recv")]
    for s in hosts:
        (a,) = s.anomalies
        assert 2520 - 360 <= a.start < a.end <= 2520
        assert s.host is not None
        clean = host(len(s.values), 10.0, seed=21 + HOSTS.index(s.tag))
        # the rest is the clean host: the fault is only in its metric, only in its samples
        for name, got, want in (("cpu.usage_user", s.host.cpu, clean.cpu), ("mem.used_percent", s.host.mem, clean.mem),
                                ("net.bytes_recv", s.host.net_rate(), clean.net_rate())):
            diff = np.nonzero(~np.isclose(got, want, equal_nan=True))[0]
            assert (len(diff) == 0) == (name != a.field) and all(a.start <= k < a.end for k in diff), name


def test_a_config_without_a_host_signal_gets_only_the_ecg() -> None:
    cfg = _config()
    cfg = replace(cfg, signals=cfg.signals[:1])
    store = _Capture()
    fed = feed(cfg, store, 1800, now_ns=1_700_000_000 * S, future_s=0)  # type: ignore[arg-type]
    assert {p.measurement for p in store.points} == {"ecg"} and {s.signal for s in fed} == {"heartbeat"}


# -- end to end: the daemon names the faulty metric ---------------------------------------------------------------


@pytest.fixture(scope="module")
def host_run(influxd: LocalInfluxd, tmp_path_factory: pytest.TempPathFactory) -> tuple[Config, list[FedSeries],
                                                                                         list[Any], str]:
    """config.toml's host signal through the demo's path on a real influxd: feed 7 h, train, catch up."""
    base = _config()
    cfg = demo_config(base, tmp_path_factory.mktemp("demo_host"), influxd.url)
    cfg = replace(cfg, influxdb=replace(cfg.influxdb, database=f"demo_host_{time.time_ns()}"),
                  signals=tuple(host_signals(base)))
    store = InfluxDB1Store(cfg.influxdb, cfg.daemon.write_batch)
    now = time.time_ns() // (10 * S) * (10 * S)
    fed = feed(cfg, store, 7 * 3600, now_ns=now, future_s=0)
    # As in the demo, training starts a few seconds after the feed (its range then leaves out the first sample).
    report = training.train(cfg, store, now_ns=now + 5 * S, progress=False)
    assert not report.failed, report.failed
    worker = Worker(cfg, store, Catalog(cfg.paths.models), Watermarks(cfg.paths.state / "watermarks.json"),
                    clock=lambda: now + 30 * S)
    try:
        results = worker.tick().results
    finally:
        worker.close()
    return cfg, fed, results, report_host_findings(results, fed, "host")


def _fault_ns(s: FedSeries) -> tuple[int, int]:
    (a,) = s.anomalies
    return s.origin_ns + a.start * s.period_ns, s.origin_ns + (a.end - 1) * s.period_ns


#: The direction the faulty metric takes against its reconstruction.
DIRECTION = {"memory_leak": "up", "network_drop": "down"}


def _flagged(influxd: LocalInfluxd, run: tuple[Config, list[FedSeries], list[Any], str]) -> tuple[
        dict[str, list[list[Any]]], int]:
    """What InfluxDB holds for the host signal: per host, its flagged windows that overlap its fault (time,
    top_field, direction, top_fields), and the number of flagged windows that overlap none."""
    cfg, fed, results, _ = run
    q = (f'SELECT "top_field", "direction", "top_fields" FROM "{cfg.output.measurement}" '
         f'WHERE "signal" = \'host\' AND "anomalous" = true GROUP BY "host"')
    res = influxd.query(q, db=cfg.influxdb.database)["results"][0].get("series", [])
    rows = {s["tags"]["host"]: s["values"] for s in res}
    span = max(r.end_ns - r.start_ns for r in results if not r.missing)
    in_fault: dict[str, list[list[Any]]] = {}
    false_alarms = 0
    for s in fed:
        lo, hi = _fault_ns(s)
        mine = rows.get(s.tag, [])
        in_fault[s.tag] = [r for r in mine if lo <= r[0] and r[0] - span <= hi]  # time: epoch ns
        false_alarms += len(mine) - len(in_fault[s.tag])
    return in_fault, false_alarms


def test_the_host_signal_flags_each_fault_and_names_the_faulty_metric(
        influxd: LocalInfluxd, host_run: tuple[Config, list[FedSeries], list[Any], str]) -> None:
    _, fed, results, text = host_run
    assert len([r for r in results if not r.missing]) >= 2 * 300  # the last hour of both hosts
    in_fault, false_alarms = _flagged(influxd, host_run)
    for s in fed:
        (a,) = s.anomalies
        rows = in_fault[s.tag]
        assert rows, f"{s.tag}: no flagged window overlaps its {a.kind}\n{text}"
        named = [r for r in rows if r[1] == a.field]
        assert named, f"{s.tag}: {a.kind} in {a.field}, but the flagged windows' top fields are " \
                      f"{[r[1] for r in rows]}\n{text}"
        assert all(r[2] == DIRECTION[a.kind] and r[3].startswith(f"{a.field} {DIRECTION[a.kind]} ")
                   for r in named), named
    assert false_alarms <= 2, text  # few or none in the normal part of the last hour
    # The demo's summary says the same.
    assert "missed" not in text and "named by a flagged window's top field: 2" in text, text
    for s in fed:
        (a,) = s.anomalies
        assert f"injected {a.kind} ({a.field})" in text, text


def test_every_flagged_window_of_a_fault_names_the_faulty_metric(
        influxd: LocalInfluxd, host_run: tuple[Config, list[FedSeries], list[Any], str]) -> None:
    in_fault, _ = _flagged(influxd, host_run)
    for s in host_run[1]:
        (a,) = s.anomalies
        assert [r[1] for r in in_fault[s.tag]] == [a.field] * len(in_fault[s.tag]), host_run[3]


def test_the_host_signal_writes_one_attribution_point_per_field(
        influxd: LocalInfluxd, host_run: tuple[Config, list[FedSeries], list[Any], str]) -> None:
    cfg = host_run[0]
    m = cfg.output.attribution_measurement
    res = influxd.query(f'SELECT count("share") FROM "{m}" WHERE "signal" = \'host\' GROUP BY "host", "field"',
                        db=cfg.influxdb.database)["results"][0].get("series", [])
    counts = {(s["tags"]["host"], s["tags"]["field"]): s["values"][0][1] for s in res}
    fields = ("cpu.usage_user", "mem.used_percent", "net.bytes_recv")
    assert set(counts) == {(h, f) for h in HOSTS for f in fields}
    assert len({counts[(h, f)] for f in fields for h in HOSTS[:1]}) == 1  # every window: one point per field


def test_the_summary_names_each_missed_anomaly_with_its_time() -> None:
    """A patient holds several anomalies of one kind, so a missed one is named with its time: "p1:dropout" alone
    would read as a contradiction of a flagged window marked "injected dropout"."""
    from anomalyd.core.records import SeriesKey, WindowResult
    from anomalyd.demo.run import report_findings
    from anomalyd.demo.synthetic import Injected
    origin = 1_700_000_000 * S  # 22:13:20 UTC
    fed = [FedSeries("p1", origin, np.zeros(1000), [Injected("dropout", 100, 106), Injected("dropout", 500, 506)],
                     signal="heartbeat", period_ns=S)]
    key = SeriesKey("heartbeat", (("patient", "p1"),))
    caught = WindowResult(key, "m", origin + 80 * S, origin + 110 * S, 1.0, 2.0, True, 0.7)
    last = WindowResult(key, "m", origin + 900 * S, origin + 999 * S, 1.0, 0.5, False, 0.1)
    text = report_findings([caught, last], fed)
    assert "injected anomalies in the scored range: 2, caught: 1, missed: p1:dropout at 22:21:40" in text, text
