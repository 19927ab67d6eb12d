"""`anomalyd evaluate` over an InfluxDB range with label windows, against the session's real influxd.

One module-wide database holds 3 h of the synthetic heartbeat signal (two patients, anomalies injected in the
last hour only, as `anomalyd.demo.run.feed` writes it) and the models `anomalyd.service.training.train` fits on the two
hours before them; the labels are the injected anomalies, each with the window's length after it (every window that
holds the anomaly).

With trained models the evaluation is the daemon's detector on the daemon's grid: its per-row scores are those
`anomalyd.core.stored_run.run_stored` computes from the same samples with the same stored `Detector`, and those the
daemon's own tick writes.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import shutil
import time
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path

import numpy as np
import pytest

from anomalyd.config import load
from anomalyd.core.detector import DetectorSpec
from anomalyd.core.stored_run import run_stored
from anomalyd.demo.run import FedSeries, feed
from anomalyd.evaluation.command import _detector_spec, add_arguments, run
from anomalyd.evaluation.series import EvalSeries, load_influx_series
from anomalyd.service import catalog, training
from anomalyd.service.catalog import Catalog, StoredModel, model_id_for
from anomalyd.service.state import Watermarks
from anomalyd.service.worker import Worker
from anomalyd.store.influx1 import InfluxDB1Store
from anomalyd.store.local import LocalInfluxd, free_port

HOUR = 3600 * 10**9
SECOND = 10**9


def parse(*argv: str | Path | float) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="anomalyd evaluate")
    add_arguments(parser)
    return parser.parse_args([str(a) for a in argv])


def evaluate(*argv: str | Path | float) -> int:
    return run(parse(*argv))


def influx_series(*argv: str | Path | float) -> list[EvalSeries]:
    """The series `anomalyd evaluate -c ...` scores (one row per grid time, before thresholds and metrics)."""
    args = parse(*argv, "--no-progress")
    series, _, _ = load_influx_series(args, _detector_spec(args))
    return series


def iso(ns: int) -> str:
    return datetime.fromtimestamp(ns // 10**9, UTC).strftime("%Y-%m-%dT%H:%M:%SZ")


def write_config(path: Path, url: str, database: str, models: Path) -> Path:
    path.write_text(f"""
[influxdb]
url = "{url}"
database = "{database}"
timeout = "5s"
retries = 0

[paths]
models = "{models}"
state = "{path.parent / 'state'}"

[daemon]
health_listen = ""

[[signals]]
name = "heartbeat"
measurement = "ecg"
field = "value"
group_by = ["patient"]
period = "1s"
window = 32
clusters = 50
n_init = 2
train_range = ["now-3h", "now-1h"]
""")
    return path


@dataclass
class Fed:
    config: Path
    url: str
    database: str
    now: int
    series: list[FedSeries]
    models: Path

    def windows(self, s: FedSeries, tail: int = 31) -> list[list[str]]:
        """The label windows of one fed series: each injected anomaly and the ``tail`` rows after it."""
        return [[iso(s.origin_ns + a.start * 10**9), iso(s.origin_ns + (a.end - 1 + tail) * 10**9)]
                for a in s.anomalies if s.origin_ns + (a.end - 1 + tail) * 10**9 < self.now]

    def samples(self, s: FedSeries) -> tuple[np.ndarray, np.ndarray]:
        """The samples of one fed series, as written to InfluxDB (one per second up to now, exclusive)."""
        return s.origin_ns + np.arange(s.written, dtype=np.int64) * SECOND, s.values[: s.written]

    def stored(self, s: FedSeries) -> StoredModel:
        """The model `anomalyd train` saved for one fed series."""
        return catalog.load(self.models / f"{model_id_for('heartbeat', (('patient', s.tag),), 'series')}.json")


@pytest.fixture(scope="module")
def fed(influxd: LocalInfluxd, tmp_path_factory: pytest.TempPathFactory) -> Fed:
    root = tmp_path_factory.mktemp("evaluate_influx")
    database = f"evalinflux{os.getpid()}"
    influxd.query(f'CREATE DATABASE "{database}"')
    path = write_config(root / "config.toml", influxd.url, database, root / "models")
    cfg = load(path, env={})
    store = InfluxDB1Store(cfg.influxdb, cfg.daemon.write_batch)
    now = time.time_ns() // 10**9 * 10**9
    series = feed(cfg, store, 3 * 3600, now_ns=now, future_s=0)
    report = training.train(cfg, store, now_ns=now, progress=False)
    assert not report.failed and len(report.trained) == 2, report.failed
    return Fed(path, influxd.url, database, now, series, root / "models")


def labels_by_series(fed: Fed, path: Path) -> Path:
    path.write_text(json.dumps({f"patient={s.tag}": fed.windows(s) for s in fed.series}))
    return path


def test_stored_models_detect_the_labelled_anomalies(fed: Fed, tmp_path: Path,
                                                     capsys: pytest.CaptureFixture[str]) -> None:
    labels = labels_by_series(fed, tmp_path / "labels.json")
    out_json, plots = tmp_path / "report.json", tmp_path / "plots"
    code = evaluate("-c", fed.config, "--start", iso(fed.now - HOUR), "--end", iso(fed.now), "--labels", labels,
                    "--json", out_json, "--plots", plots, "--n-plots", 1, "--no-progress")
    assert code == 0, capsys.readouterr().err
    printed = capsys.readouterr().out
    assert "heartbeat[patient=p1]" in printed and "heartbeat[patient=p2]" in printed
    report = json.loads(out_json.read_text())
    assert report["format"] == "influx" and report["detector"] == "stored model"
    assert fed.database in report["input"] and "heartbeat" in report["input"]
    assert [r["name"] for r in report["series"]] == ["heartbeat[patient=p1]", "heartbeat[patient=p2]"]
    for row, s in zip(report["series"], fed.series, strict=True):
        stored = fed.stored(s)
        # the daemon's own model and decision (score >= score_threshold, i.e. score > the level just below it),
        # with the max_error level beside it as information
        assert row["model"] == stored.model_id
        assert row["threshold"] == np.nextafter(stored.model.spec.score_threshold, -np.inf)
        assert row["model_threshold"] == pytest.approx(stored.threshold)
        assert row["flagged"] == row["decisions"]  # the rows flagged are the detector's decisions
        # on the daemon's grid, one row per sample from the end of the model's training range on
        times, _ = fed.samples(s)
        assert row["n_train"] == 0 and row["first_timestamp"] == iso(stored.train_end_ns + SECOND)
        assert row["n_rows"] == int(((times > stored.train_end_ns) & (times <= fed.now)).sum())
        assert row["missing_rows"] == 0
        assert row["segments"] == len(fed.windows(s)) > 0
        # the injected anomalies are found (point-adjusted: most labelled rows lie in a segment with an alert),
        # with hardly an alert outside the labels
        assert row["pa_recall"] > 0.4 and row["window_recall"] > 0 and row["pa_precision"] > 0.8
    assert report["summary"]["mean"]["window_f1"] > 0
    assert report["plots"] and all(Path(p).is_file() for p in report["plots"])


def test_stored_model_scores_are_run_stored_and_the_daemons_on_the_same_samples(fed: Fed, tmp_path: Path) -> None:
    """One detector: evaluate's per-row scores over InfluxDB are `run_stored`'s on the same samples with the same
    stored model, and what the daemon's tick computes for the same windows, bit for bit."""
    cfg = load(fed.config, env={})
    sig = cfg.signals[0]
    series = influx_series("-c", fed.config, "--start", iso(fed.now - HOUR), "--end", iso(fed.now))
    store = InfluxDB1Store(cfg.influxdb, cfg.daemon.write_batch)
    tick = Worker(cfg, store, Catalog(fed.models), Watermarks(tmp_path / "watermarks.json"),
                  clock=lambda: fed.now).tick()
    for got, s in zip(series, fed.series, strict=True):
        stored = fed.stored(s)
        times, values = fed.samples(s)
        run = run_stored(times, values, stored.train_end_ns, period_ns=sig.period_ns, max_gap=sig.max_gap,
                         detector=stored.model)
        assert run.written.all() and run.batch.complete.all()  # no gap: every row has its complete window
        expected = run.batch.score[run.stamps <= fed.now]
        assert got.scores.shape == expected.shape and np.isfinite(expected).all()
        np.testing.assert_array_equal(got.scores, expected)
        flags = got.scores > got.threshold
        np.testing.assert_array_equal(flags, run.batch.anomalous[run.stamps <= fed.now])
        assert 0 < flags.sum() < 0.05 * flags.size  # the anomalies of the last hour, not every row
        # the daemon's tick scores the same windows (up to now - lateness) with the same scores and decisions
        stamps = run.stamps[run.stamps <= fed.now]
        daemon = {r.end_ns: (r.score, r.anomalous) for r in tick.results
                  if r.key.tags == (("patient", s.tag),) and not r.missing}
        assert len(daemon) > 0.95 * len(stamps)
        mine = dict(zip(stamps.tolist(), zip(got.scores.tolist(), flags.tolist(), strict=True), strict=True))
        assert set(daemon) <= set(mine)
        assert {t: mine[t] for t in daemon} == daemon


def test_one_stored_model_tunes_and_writes_its_threshold(fed: Fed, tmp_path: Path,
                                                         capsys: pytest.CaptureFixture[str]) -> None:
    p1 = fed.series[0]
    mid = model_id_for("heartbeat", (("patient", p1.tag),), "series")
    for suffix in (".json", ".npz"):  # a copy, so the module's catalog stays as trained
        shutil.copy(fed.models / f"{mid}{suffix}", tmp_path / f"{mid}{suffix}")
    model = tmp_path / f"{mid}.json"
    before = catalog.load(model)
    labels = tmp_path / "labels.json"
    labels.write_text(json.dumps(fed.windows(p1)))  # a plain list: the windows of every series read
    out_json = tmp_path / "report.json"
    assert evaluate("-c", fed.config, "--start", iso(fed.now - HOUR), "--labels", labels, "--model", model,
                    "--tune", "point-adjusted", "--write-threshold", "--json", out_json, "--no-progress") == 0
    assert "wrote threshold" in capsys.readouterr().out
    (row,) = json.loads(out_json.read_text())["series"]  # a per-series model scores its own series only
    assert row["name"] == "heartbeat[patient=p1]" and row["model"] == mid and row["pa_recall"] > 0
    written = catalog.load(model)
    # the tuned level is the detector's decision now; the informational max_error level is left as trained
    assert written.model.spec.score_threshold == pytest.approx(row["threshold"])
    assert written.model.spec.score_threshold != before.model.spec.score_threshold
    assert written.threshold == before.threshold
    assert "influx" in written.meta["threshold_source"]


def test_without_trained_models_the_default_detector_is_evaluated(fed: Fed, tmp_path: Path,
                                                                  caplog: pytest.LogCaptureFixture) -> None:
    config = write_config(tmp_path / "config.toml", fed.url, fed.database, tmp_path / "no-models")
    labels = labels_by_series(fed, tmp_path / "labels.json")
    out_json = tmp_path / "report.json"
    start, end = fed.now - 2 * HOUR, fed.now
    with caplog.at_level(logging.WARNING, logger="anomalyd.evaluation.series"):
        assert evaluate("--format", "influx", "-c", config, "--signal", "heartbeat", "--start", iso(start),
                        "--end", iso(end), "--labels", labels, "--train-rows", 1800, "--json", out_json,
                        "--no-progress") == 0
    assert "has no trained model" in caplog.text
    report = json.loads(out_json.read_text())
    assert isinstance(report["detector"], dict) and report["detector"]["error"] == "mean"
    assert report["detector"]["score_threshold"] == 0.5 and report["detector"]["stride"] == 1
    for row, s in zip(report["series"], fed.series, strict=True):
        times, _ = fed.samples(s)
        # the first 1800 rows of the range train the detector, every later row is evaluated
        assert row["train_rows"] == 1800 and row["n_train"] == 0
        assert row["n_rows"] == int(((times > start) & (times <= end)).sum()) - 1800
        assert row["window_recall"] > 0 and row["flagged"] == row["decisions"]


def test_without_trained_models_training_uses_only_the_first_rows_of_the_range(fed: Fed, tmp_path: Path) -> None:
    """``--train-rows N`` trains on the first N rows of --start .. --end (the help's "first --train-rows rows of
    each series"), not on the context read before --start."""
    config = write_config(tmp_path / "config.toml", fed.url, fed.database, tmp_path / "no-models")
    sig = load(config, env={}).signals[0]
    start, end = fed.now - 2 * HOUR, fed.now
    series = influx_series("-c", config, "--start", iso(start), "--end", iso(end), "--train-rows", 1800)
    for got, s in zip(series, fed.series, strict=True):
        times, values = fed.samples(s)
        inside = (times > start) & (times <= end)
        t, v = times[inside], values[inside]
        # evaluate's default detector (DetectorSpec()) trained on rows 0..1799 of the range, then streaming
        run = run_stored(t, v, int(t[1799]), DetectorSpec(), period_ns=sig.period_ns, max_gap=sig.max_gap)
        np.testing.assert_array_equal(got.scores, run.batch.score[run.stamps <= end],
                                      err_msg="the detector was not trained on the first 1800 rows of the range")


def test_bad_input_exits_with_one_line_naming_the_fix(fed: Fed, tmp_path: Path,
                                                      capsys: pytest.CaptureFixture[str]) -> None:
    start = ("--start", iso(fed.now - HOUR), "--end", iso(fed.now))

    def fails(code: int, *argv: str | Path | float) -> str:
        assert evaluate(*argv, "--no-progress") == code
        err = capsys.readouterr().err.strip()
        assert err.startswith("anomalyd evaluate: ") and "\n" not in err, err
        return err

    err = fails(1, "-c", fed.config, "--signal", "nope", *start)
    assert "--signal 'nope' is not a signal of" in err and "configured: heartbeat" in err
    assert "needs --start" in fails(2, "-c", fed.config)
    assert "drop the input" in fails(2, "-c", fed.config, tmp_path / "x.csv", *start)
    assert "select an InfluxDB range" in fails(2, tmp_path, "--format", "csv", "--labels", tmp_path / "l.json")
    assert "must be before --end" in fails(1, "-c", fed.config, "--start", iso(fed.now), "--end", iso(fed.now - 60))
    err = fails(1, "-c", fed.config, "--start", "2001-01-01T00:00:00Z", "--end", "2001-01-02T00:00:00Z")
    assert "no samples of ecg.value" in err and "check --start/--end" in err

    labels = tmp_path / "labels.json"
    assert "pass an existing JSON file to --labels" in fails(1, "-c", fed.config, *start, "--labels", labels)
    labels.write_text("[[\"2024-01-01T00:00:00Z\", ")
    assert "is not valid JSON" in fails(1, "-c", fed.config, *start, "--labels", labels)
    labels.write_text(json.dumps({"patient=p9": []}))
    err = fails(1, "-c", fed.config, *start, "--labels", labels)
    assert "'patient=p9' is not a series read" in err and "'patient=p1', 'patient=p2'" in err
    labels.write_text(json.dumps({"patient=p1": []}))
    assert "no windows for series 'patient=p2'" in fails(1, "-c", fed.config, *start, "--labels", labels)
    labels.write_text(json.dumps([["yesterday", iso(fed.now)]]))
    assert "window 1: 'yesterday' is not a time" in fails(1, "-c", fed.config, *start, "--labels", labels)
    labels.write_text(json.dumps([[iso(fed.now - 3 * HOUR), iso(fed.now - 2 * HOUR)]]))
    assert "lies outside the evaluated range" in fails(1, "-c", fed.config, *start, "--labels", labels)

    down = write_config(tmp_path / "down.toml", f"http://127.0.0.1:{free_port()}", fed.database, fed.models)
    err = fails(1, "-c", down, *start)
    assert "is unreachable" in err and "influxdb.url" in err

