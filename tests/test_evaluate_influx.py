"""`anomalyd evaluate` over an InfluxDB range with label windows, against the session's real influxd.

One module-wide database holds 3 h of the synthetic heartbeat signal (two patients, anomalies injected in the
last hour only, as `anomalyd.demo.feed` writes it) and the models `anomalyd.training.train` fits on the two hours
before them; the labels are the injected anomalies, each with the window's length after it (every window that
holds the anomaly).
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

import pytest

from anomalyd import catalog, training
from anomalyd.catalog import model_id_for
from anomalyd.config import load
from anomalyd.demo import FedSeries, feed
from anomalyd.evaluate import add_arguments, run
from anomalyd.influx import InfluxDB1Store
from anomalyd.localinflux import LocalInfluxd, free_port

HOUR = 3600 * 10**9


def evaluate(*argv: str | Path) -> int:
    parser = argparse.ArgumentParser(prog="anomalyd evaluate")
    add_arguments(parser)
    return run(parser.parse_args([str(a) for a in argv]))


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
        stored = catalog.load(fed.models / f"{model_id_for('heartbeat', (('patient', s.tag),), 'series')}.json")
        # the daemon's own model and threshold, on the daemon's grid, from the end of its training range on
        assert row["model"] == stored.model_id and row["threshold"] == pytest.approx(stored.threshold)
        assert row["n_rows"] == 3601 and row["n_train"] == stored.model.window - 1
        assert row["segments"] == len(fed.windows(s)) > 0
        assert row["window_recall"] > 0 and row["pa_recall"] > 0
    assert report["summary"]["mean"]["window_f1"] > 0
    assert report["plots"] and all(Path(p).is_file() for p in report["plots"])


def test_one_stored_model_tunes_and_writes_its_threshold(fed: Fed, tmp_path: Path,
                                                         capsys: pytest.CaptureFixture[str]) -> None:
    p1 = fed.series[0]
    mid = model_id_for("heartbeat", (("patient", p1.tag),), "series")
    for suffix in (".json", ".npz"):  # a copy, so the module's catalog stays as trained
        shutil.copy(fed.models / f"{mid}{suffix}", tmp_path / f"{mid}{suffix}")
    model = tmp_path / f"{mid}.json"
    labels = tmp_path / "labels.json"
    labels.write_text(json.dumps(fed.windows(p1)))  # a plain list: the windows of every series read
    out_json = tmp_path / "report.json"
    assert evaluate("-c", fed.config, "--start", iso(fed.now - HOUR), "--labels", labels, "--model", model,
                    "--tune", "point-adjusted", "--write-threshold", "--json", out_json, "--no-progress") == 0
    assert "wrote threshold" in capsys.readouterr().out
    (row,) = json.loads(out_json.read_text())["series"]  # a per-series model scores its own series only
    assert row["name"] == "heartbeat[patient=p1]" and row["pa_recall"] > 0
    written = catalog.load(model)
    assert written.threshold == pytest.approx(row["threshold"])
    assert "influx" in written.meta["threshold_source"]


def test_without_trained_models_the_default_detector_is_evaluated(fed: Fed, tmp_path: Path,
                                                                  caplog: pytest.LogCaptureFixture) -> None:
    config = write_config(tmp_path / "config.toml", fed.url, fed.database, tmp_path / "no-models")
    labels = labels_by_series(fed, tmp_path / "labels.json")
    out_json = tmp_path / "report.json"
    with caplog.at_level(logging.WARNING, logger="anomalyd.evaluate"):
        assert evaluate("--format", "influx", "-c", config, "--signal", "heartbeat", "--start",
                        iso(fed.now - 2 * HOUR), "--end", iso(fed.now), "--labels", labels, "--train-rows", 1800,
                        "--json", out_json, "--no-progress") == 0
    assert "has no trained model" in caplog.text
    report = json.loads(out_json.read_text())
    assert isinstance(report["detector"], dict) and report["detector"]["error"] == "mean"
    for row in report["series"]:
        assert row["n_train"] == 1800 and row["window_recall"] > 0


def test_bad_input_exits_with_one_line_naming_the_fix(fed: Fed, tmp_path: Path,
                                                      capsys: pytest.CaptureFixture[str]) -> None:
    start = ("--start", iso(fed.now - HOUR), "--end", iso(fed.now))

    def fails(code: int, *argv: str | Path) -> str:
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
