"""Refitting on recent normal data: training leaves out the windows anomalyd flagged; the daemon's refit job."""

from __future__ import annotations

import logging
import time
from dataclasses import replace
from pathlib import Path

import numpy as np
import pytest

from anomalyd.config import Config, TrainRange
from anomalyd.core.records import SeriesKey
from anomalyd.demo.run import feed
from anomalyd.service import training
from anomalyd.service.catalog import Catalog, model_id_for
from anomalyd.service.catalog import load as load_model
from anomalyd.service.daemon import Service
from anomalyd.service.state import Watermarks
from anomalyd.service.worker import Worker
from anomalyd.store.base import Point
from anomalyd.store.influx1 import InfluxDB1Store
from anomalyd.store.local import LocalInfluxd
from anomalyd.telemetry import REFITS
from conftest import make_config, with_signal


def _thresholds(cfg: Config) -> dict[str, tuple[float, int]]:
    out = {}
    for p in sorted(cfg.paths.models.glob("*.json")):
        m = load_model(p)
        out[m.model_id] = (m.threshold, int(m.meta["n_samples"]))
    return out


def test_prepare_cuts_the_flagged_windows_out_like_gaps(tmp_path: Path) -> None:
    """`training.prepare` drops every sample a flagged window (its ``window`` samples up to its end) covers; the
    hole is longer than max_gap, so training sees separate gap-free stretches, each with its grid index."""
    cfg = make_config("http://127.0.0.1:9", "unused", tmp_path, signals=[{
        "name": "s", "measurement": "m", "field": "v", "period": "1s", "window": 16, "max_gap": 8}])
    sig = cfg.signals[0]
    t0 = 1_700_000_000  # seconds: the grid index of the first sample
    times = (t0 + np.arange(1000, dtype=np.int64)) * 10**9
    values = np.random.default_rng(0).normal(size=1000)
    key = SeriesKey("s", ())
    parts, starts = training.prepare(times, values, sig, key)
    assert len(parts) == 1 and starts == [t0] and np.array_equal(parts[0], values)
    # two overlapping flagged windows ending on samples 500 and 505: samples 485 .. 505 are left out
    parts, starts = training.prepare(times, values, sig, key, exclude_ends=times[[505, 500]])
    assert starts == [t0, t0 + 506]
    assert np.array_equal(parts[0], values[:485]) and np.array_equal(parts[1], values[506:])
    # a flagged window at the very end only shortens the data
    parts, starts = training.prepare(times, values, sig, key, exclude_ends=times[[999]])
    assert starts == [t0] and np.array_equal(parts[0], values[:984])
    with pytest.raises(ValueError, match=r"series s\[\] has no samples"):
        training.prepare(times[:0], values[:0], sig, key)


def test_refit_leaves_out_the_flagged_windows(cfg: Config, store: InfluxDB1Store) -> None:
    now = time.time_ns() // 10**9 * 10**9
    fed = feed(cfg, store, 7 * 3600, now_ns=now, future_s=0)
    assert not training.train(cfg, store, now_ns=now, progress=False).failed
    first = _thresholds(cfg)
    report = Worker(cfg, store, Catalog(cfg.paths.models), Watermarks(cfg.paths.state / "wm.json"),
                    clock=lambda: now).tick()  # scores the last hour, where the anomalies are
    flagged = [r for r in report.results if r.anomalous]
    assert flagged
    # Retrain on the whole 7 h, anomalies included: the last 20% (the hold-out that sets the threshold) now
    # holds the injected anomalies.
    recent = with_signal(cfg, train_range=TrainRange("now-7h", "now"))
    assert not training.train(recent, store, now_ns=now, progress=False).failed
    polluted = _thresholds(recent)
    assert not training.train(recent, store, now_ns=now, progress=False, exclude_anomalous=True).failed
    clean = _thresholds(recent)
    n_fed = sum(1 for s in fed for a in s.anomalies if s.origin_ns + a.end * 10**9 <= now)
    for mid, (thr0, _) in first.items():
        thr_p, n_p = polluted[mid]
        thr_c, n_c = clean[mid]
        print(f"\n{mid}: threshold trained on 6 h {thr0:.2f}; on 7 h with the anomalies {thr_p:.2f}; "
              f"without the flagged windows {thr_c:.2f} ({n_p - n_c} samples left out)")
        assert n_c < n_p  # the flagged windows' samples were cut out...
        w = cfg.signals[0].window or cfg.signals[0].spec().max_window
        n_flagged = sum(1 for r in flagged if model_id_for("heartbeat", r.key.tags, "series") == mid)
        assert n_p - n_c <= w * n_flagged  # ...and only those: at most a window's samples per flagged window
        assert thr_c < thr_p  # the anomalies no longer inflate the threshold learned from the hold-out...
        assert thr_c < 1.5 * thr0  # ...which stays close to the one learned from clean data
    assert n_fed >= 8


def test_refit_of_series_models_uses_each_series_flags(cfg: Config, store: InfluxDB1Store) -> None:
    """Per-series scope: each model leaves out only its own series' flagged windows."""
    now = time.time_ns() // 10**9 * 10**9
    feed(cfg, store, 5 * 3600, now_ns=now, future_s=0)
    cfg1 = with_signal(cfg, train_range=TrainRange("now-5h", "now-1h"), scope="series")
    assert not training.train(cfg1, store, now_ns=now, progress=False).failed
    Worker(cfg1, store, Catalog(cfg1.paths.models), Watermarks(cfg1.paths.state / "wm.json"),
           clock=lambda: now).tick()
    flagged = training.flagged_windows(cfg1, store, cfg1.signals[0], now - 5 * 3600 * 10**9, now)
    assert set(flagged) == {"patient=p1", "patient=p2"}
    recent = with_signal(cfg1, train_range=TrainRange("now-5h", "now"))
    rep = training.train(recent, store, now_ns=now, progress=False, exclude_anomalous=True)
    assert not rep.failed and {m.model_id for m in rep.trained} == {
        model_id_for("heartbeat", (("patient", p),), "series") for p in ("p1", "p2")}


class _Worker:
    def tick(self) -> None:  # pragma: no cover - not called
        raise AssertionError


def test_service_refit_job_survives_failures(caplog: pytest.LogCaptureFixture, tmp_path: Path) -> None:
    calls: list[int] = []

    def failing() -> None:
        calls.append(1)
        raise RuntimeError("InfluxDB went away")

    before_failed = REFITS.labels(outcome="failed")._value.get()
    before_ok = REFITS.labels(outcome="ok")._value.get()
    svc = Service(_Worker(), 1.0, refit=failing, refit_every_s=3600)  # type: ignore[arg-type]
    with caplog.at_level(logging.ERROR):
        assert svc.run_refit() is False
    assert "refit failed, keeping the current models: RuntimeError: InfluxDB went away" in caplog.text
    assert REFITS.labels(outcome="failed")._value.get() == before_failed + 1
    svc.refit = lambda: None
    assert svc.run_refit() is True and REFITS.labels(outcome="ok")._value.get() == before_ok + 1
    assert calls == [1]


def test_flagged_windows_are_read_from_the_output_retention_policy(cfg: Config, store: InfluxDB1Store,
                                                                  influxd: LocalInfluxd, database: str) -> None:
    influxd.query(f'CREATE RETENTION POLICY "scores" ON "{database}" DURATION 30d REPLICATION 1', database)
    out_cfg = replace(cfg, output=replace(cfg.output, retention_policy="scores"))
    end = time.time_ns() // 10**9 * 10**9 - 3600 * 10**9  # inside the 30-day policy
    tags = (("signal", "heartbeat"), ("series", "patient=p1"), ("model", "m"), ("patient", "p1"))
    store.write([Point(cfg.output.measurement, tags, (("max_error", 9.0), ("threshold", 1.0), ("anomalous", True)),
                       end)], "scores")
    sig = cfg.signals[0]
    found = training.flagged_windows(out_cfg, store, sig, end - 10**12, end)
    assert list(found) == ["patient=p1"] and found["patient=p1"].tolist() == [end]
    assert training.flagged_windows(cfg, store, sig, end - 10**12, end) == {}  # not in the default policy
