"""Each sample is read once: a steady tick asks InfluxDB only for the samples after its watermarks (the window
before them is kept from the last tick), and scores exactly as a tick that reads the whole window again; a series
new since the last tick, and a restart, read in full."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from anomalyd.config import Config
from anomalyd.core.detector import Detector, DetectorSpec
from anomalyd.demo.synthetic import ecg
from anomalyd.service.catalog import Catalog, StoredModel, model_id_for, save
from anomalyd.service.state import Watermarks
from anomalyd.service.worker import Worker
from anomalyd.store.base import Query, SeriesData
from anomalyd.store.influx1 import InfluxDB1Store
from anomalyd.store.local import LocalInfluxd
from conftest import make_config

S = 10**9
T0 = 1_700_000_000 * S
W = 16


class Reads(InfluxDB1Store):
    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.reads: list[tuple[str, int, tuple]] = []

    def read_batches(self, query: Query, start_ns: int, end_ns: int, size: int) -> Iterator[SeriesData]:
        self.reads.append((query.measurement, start_ns, query.series))
        yield from super().read_batches(query, start_ns, end_ns, size)


def _write(influxd: LocalInfluxd, db: str, hosts: list[str], lo: int, hi: int) -> None:
    lines = []
    for j, h in enumerate(hosts):
        x, _ = ecg(hi + 1, seed=j)
        counter = np.cumsum(300 + 10 * x)  # a counter: its rate follows the ECG
        lines += [f"ecg,host={h} value={float(x[i])!r} {T0 + i * S}" for i in range(lo, hi + 1)]
        lines += [f"net,host={h} bytes={float(counter[i])!r},load={float(x[i])!r} {T0 + i * S}"
                  for i in range(lo, hi + 1)
                  if i % 97 != 5]  # a few samples missing: gaps to fill at the tick boundaries too
    influxd.write_lines(db, "\n".join(lines))


def _config(influxd: LocalInfluxd, db: str, tmp: Path, measurement: str) -> Config:
    signals = [
        {"name": "ekg", "measurement": "ecg", "field": "value", "group_by": ["host"], "period": "1s", "window": W,
         "scope": "shared", "clusters": 20},
        {"name": "net", "measurement": "net", "fields": ["load", {"field": "bytes",
                                                                  "transform": "non_negative_derivative"}],
         "group_by": ["host"], "period": "1s", "window": W, "scope": "shared", "clusters": 20}]
    cfg = make_config(influxd.url, db, tmp, signals=signals, alerts={"deadman": "0s"},
                      output={"measurement": measurement, "write_reconstruction": True,
                              "reconstruction_measurement": measurement + "_recon"})
    x, _ = ecg(3000, seed=9)
    one = Detector(DetectorSpec(window=W, n_clusters=20, n_init=1)).fit([x])
    two = Detector(DetectorSpec(window=W, n_clusters=20, n_init=1)).fit([np.stack([x, 300 + 10 * x], axis=1)])
    for name, det in (("ekg", one), ("net", two)):
        fields = ["value"] if name == "ekg" else ["load", "bytes"]
        save(cfg.paths.models, StoredModel(model_id_for(name, (), "shared"), name, (), "shared", det, S,
                                           T0 - 3600 * S, T0, meta={"fields": fields}))
    return cfg


def _points(influxd: LocalInfluxd, db: str, measurement: str) -> dict:
    res = influxd.query(f'SELECT * FROM "{measurement}" GROUP BY "series", "signal"', db)["results"][0]
    return {(s["tags"]["signal"], s["tags"]["series"]): [[v for k, v in zip(s["columns"], row, strict=True)
                                                         if k not in ("model",)] for row in s["values"]]
            for s in res.get("series", [])}


def test_a_steady_tick_reads_only_new_samples_and_scores_the_same(influxd: LocalInfluxd, database: str,
                                                                  tmp_path: Path) -> None:
    hosts = ["a", "b", "c"]
    _write(influxd, database, hosts, 0, 400)
    once = _config(influxd, database, tmp_path / "once", "out_once")
    full = _config(influxd, database, tmp_path / "full", "out_full")
    store = Reads(once.influxdb)
    w_once = Worker(once, store, Catalog(once.paths.models), Watermarks(once.paths.state / "wm.json"),
                    clock=lambda: 0)
    w_full = Worker(full, InfluxDB1Store(full.influxdb), Catalog(full.paths.models),
                    Watermarks(full.paths.state / "wm.json"), clock=lambda: 0)
    for t in range(100, 401, 30):
        if t == 250:
            _write(influxd, database, ["d"], 0, 400)  # a series new since the last tick
        store.reads.clear()
        for w in (w_once, w_full):
            if w is w_full:
                w._kept.clear()  # as if every tick were the first: whole windows read again
            report = w.tick(T0 + t * S)
            assert not any(r.failed for r in report.signals.values())
        if t > 100:
            main = [r for r in store.reads if r[2] == ()]
            assert {m for m, _, _ in main} == {"ecg", "net"}
            for m, start, _ in main:  # after the watermark (t - 30 s), one sample back for the counter's rate
                assert start >= T0 + (t - 30) * S - (10 if m == "net" else 0) * S, (t, m, start)
        if t == 250:  # the new series is read in full, on its own
            assert any(r[2] == ((("host", "d"),),) for r in store.reads)
    got, want = _points(influxd, database, "out_once"), _points(influxd, database, "out_full")
    assert sorted(got) == sorted(want) and len(got) == 8
    for key in want:
        assert len(got[key]) == len(want[key]) > 100, key
        for a, b in zip(got[key], want[key], strict=True):
            assert a == pytest.approx(b, rel=1e-12, abs=1e-12) if all(isinstance(v, float) for v in a) else a == b
    assert _points(influxd, database, "out_once_recon") == _points(influxd, database, "out_full_recon")


def test_the_kept_samples_are_a_few_shared_arrays_with_a_bounded_size_per_series(influxd: LocalInfluxd,
                                                                                database: str,
                                                                                tmp_path: Path) -> None:
    """The memory side of reading each sample once (issue 12): the samples kept between ticks are, per scored group
    of series, one pair of arrays per field (a series holds its group's block and its index, its samples are views
    into the block), at most the window before the watermark plus the gap margin per series and field."""
    hosts = ["a", "b", "c", "d"]
    _write(influxd, database, hosts, 0, 400)
    cfg = _config(influxd, database, tmp_path, "out")
    w = Worker(cfg, InfluxDB1Store(cfg.influxdb), Catalog(cfg.paths.models), Watermarks(cfg.paths.state / "wm.json"),
               clock=lambda: 0)
    for t in (200, 230):
        w.tick(T0 + t * S)
        for sig in cfg.signals:
            kept = w._kept[sig.name]
            assert len(kept) == len(hosts)
            blocks = {id(b): b for _, b, _ in kept.values()}
            assert len(blocks) < len(hosts)  # shared by the series of a group, not one per series
            back = (W - 1) * 2  # the reconstruction is written: one more window back
            per_field = (back + sig.max_gap + 3) * 16 + 16  # times and values of each sample, and its offsets
            assert sum(b.nbytes for b in blocks.values()) <= len(hosts) * len(sig.fields) * per_field
            for _, b, i in kept.values():
                for (t_, v_), bt, bv in zip(b.fields(i), b.times, b.values, strict=True):
                    assert t_.base is bt and v_.base is bv and len(t_) > back
