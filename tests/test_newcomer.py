"""A new user's first hour (issue 13): what `score`, `check`, `run --once` and `--dry-run` tell them, through the
console script and a real InfluxDB."""

from __future__ import annotations

import logging
import re
import time
import tomllib
from datetime import UTC, datetime
from pathlib import Path

import pytest

from anomalyd import cli
from anomalyd.cli import main
from anomalyd.config import load
from anomalyd.demo.run import feed
from anomalyd.store.influx1 import InfluxDB1Store
from anomalyd.store.local import LocalInfluxd
from conftest import cli_config

ROOT = Path(__file__).resolve().parents[1]

#: The query the README gives to see the anomalous windows a backfill wrote (here for the last hour).
ANOMALOUS_QUERY = ('SELECT "score", "max_error", "threshold" FROM "anomaly_error" '
                   'WHERE "signal" = \'heartbeat\' AND "anomalous" = true AND time > now() - 1h')


def _config(tmp_path: Path, url: str, db: str, extra: str = "") -> Path:
    path = tmp_path / "config.toml"
    path.write_text(cli_config(url, db, extra))
    return path


def _fed(tmp_path: Path, url: str, db: str, extra: str = "", end_ago_s: int = 0) -> Path:
    """A config whose signal has 3 h of the demo's ECG in InfluxDB (injected anomalies in its last hour)."""
    path = _config(tmp_path, url, db, extra)
    cfg = load(path, env={})
    now = time.time_ns() // 10**9 * 10**9 - end_ago_s * 10**9
    feed(cfg, InfluxDB1Store(cfg.influxdb), 3 * 3600, now_ns=now, future_s=0)
    return path


def _measurements(influxd: LocalInfluxd, db: str) -> set[str]:
    res = influxd.query("SHOW MEASUREMENTS", db=db)
    return {row[0] for s in res["results"][0].get("series", []) for row in s["values"]}


# -- item 3: `score` lists what it found -------------------------------------------------------------------------


def test_score_lists_the_anomalous_windows_that_the_readme_query_returns(
        influxd: LocalInfluxd, database: str, tmp_path: Path, capsys: pytest.CaptureFixture[str],
        monkeypatch: pytest.MonkeyPatch) -> None:
    path = _fed(tmp_path, influxd.url, database)
    assert main(["train", "-c", str(path)]) == 0
    capsys.readouterr()
    monkeypatch.setattr(cli, "SHOW_ANOMALOUS", 3)
    assert main(["score", "-c", str(path), "--start", "now-1h"]) == 0
    out = capsys.readouterr().out
    total = int(re.search(r"scored \d+ windows: (\d+) anomalous", out).group(1))  # type: ignore[union-attr]
    assert total > 3, out  # the injected anomalies are found (and more than the listing shows)
    listed = re.findall(r"^  (heartbeat\[patient=\w+\]) +(\S+Z)  score (\S+)  max_error +(\S+)  threshold +(\S+)",
                        out, re.M)
    assert len(listed) == 3, out
    assert f"  ... and {total - 3} more" in out
    # The listing is what InfluxDB holds: the earliest anomalous windows, with their score and errors.
    res = influxd.query(ANOMALOUS_QUERY + ' GROUP BY "patient"', db=database)
    rows = sorted((r[0], f"heartbeat[patient={s['tags']['patient']}]", r[1], r[2], r[3])
                  for s in res["results"][0]["series"] for r in s["values"])
    assert len(rows) == total
    for (key, when, score, err, thr), (t, k, s, e, th) in zip(listed, rows[:3], strict=True):
        assert (when, key) == (datetime.fromtimestamp(t // 10**9, UTC).strftime("%Y-%m-%dT%H:%M:%SZ"), k)
        assert t % 10**9 == 0  # the demo's samples are on whole seconds
        assert float(score) == pytest.approx(s, abs=5e-4) and s >= 0.5
        assert float(err) == pytest.approx(e, rel=1e-3) and float(thr) == pytest.approx(th, rel=1e-3)


# -- item 4: `check` fails on what would make the daemon score nothing --------------------------------------------


def test_check_fails_on_a_database_that_does_not_exist(influxd: LocalInfluxd, tmp_path: Path,
                                                       capsys: pytest.CaptureFixture[str]) -> None:
    path = _config(tmp_path, influxd.url, "no_such_db")
    assert main(["check", "-c", str(path)]) == 1
    out = capsys.readouterr().out
    fails = [line for line in out.splitlines() if line.startswith("FAIL database")]
    assert len(fails) == 1, out
    assert "'no_such_db' does not exist" in fails[0] and "influxdb.database" in fails[0]


def test_check_fails_on_a_signal_without_data(influxd: LocalInfluxd, database: str, tmp_path: Path,
                                              capsys: pytest.CaptureFixture[str]) -> None:
    path = _fed(tmp_path, influxd.url, database)
    path.write_text(path.read_text() + 'where = { patient = "p9" }\n')  # no such patient
    assert main(["check", "-c", str(path)]) == 1
    out = capsys.readouterr().out
    assert re.search(r"^FAIL signal heartbeat: no data of ecg\.value where \{patient = 'p9'\} in its training "
                     r"range \S+ to \S+ \(database '\w+'\); fix signals\.train_range", out, re.M), out
    assert re.search(r"^FAIL signal heartbeat: no data of ecg\.value where \{patient = 'p9'\} since \S+ \(the last "
                     r"scoring interval, 16s\)", out, re.M), out


def test_check_fails_when_the_data_stopped_and_passes_when_it_flows(
        influxd: LocalInfluxd, database: str, tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    path = _fed(tmp_path, influxd.url, database, end_ago_s=600)  # the collector stopped 10 minutes ago
    assert main(["train", "-c", str(path)]) == 0
    capsys.readouterr()
    assert main(["check", "-c", str(path)]) == 1
    out = capsys.readouterr().out
    assert [line for line in out.splitlines() if line.startswith("FAIL")] == [
        line for line in out.splitlines() if line.startswith("FAIL signal heartbeat: no data of ecg.value since")]
    assert "FAIL" in out and "training range" not in out  # trained: its training range is not checked again
    cfg = load(path, env={})
    feed(cfg, InfluxDB1Store(cfg.influxdb), 900, future_s=0)  # it writes again
    assert main(["check", "-c", str(path)]) == 0, capsys.readouterr().out


# -- item 5: `run` says why nothing is scored ------------------------------------------------------------------


def test_run_once_without_any_model_says_so_once_and_fails(
        influxd: LocalInfluxd, database: str, tmp_path: Path, caplog: pytest.LogCaptureFixture,
        capsys: pytest.CaptureFixture[str]) -> None:
    path = _fed(tmp_path, influxd.url, database)
    with caplog.at_level(logging.INFO):
        assert main(["run", "-c", str(path), "--once"]) == 1
    lines = [r.getMessage() for r in caplog.records if r.levelno >= logging.WARNING]
    models = load(path, env={}).paths.models
    assert lines == [f"signal heartbeat: no model in {models}; run `anomalyd train -c {path}`"], lines
    assert "next try" not in caplog.text
    assert "nothing could be scored" in capsys.readouterr().err


def test_run_once_with_a_where_that_matches_nothing_says_so(
        influxd: LocalInfluxd, database: str, tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    path = _fed(tmp_path, influxd.url, database)
    assert main(["train", "-c", str(path)]) == 0
    path.write_text(path.read_text() + 'where = { patient = "p9" }\n')
    with caplog.at_level(logging.INFO):
        assert main(["run", "-c", str(path), "--once"]) == 1
    lines = [r.getMessage() for r in caplog.records if r.levelno >= logging.WARNING]
    assert len(lines) == 1 and lines[0].startswith(
        "signal heartbeat: no series of ecg.value matches where {patient='p9'} in database"), lines


def test_a_signal_problem_is_logged_once_not_every_tick(
        influxd: LocalInfluxd, database: str, tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    path = _fed(tmp_path, influxd.url, database)
    worker = cli._worker(load(path, env={}))
    with caplog.at_level(logging.WARNING):
        first, second = worker.tick(), worker.tick()
    assert first.signals["heartbeat"].problem and second.signals["heartbeat"].problem
    assert first.signals["heartbeat"].untrained == 2
    assert len([r for r in caplog.records if "no model in" in r.getMessage()]) == 1
    assert "has no model" not in caplog.text  # not one line per series on top of the signal's


# -- item 6: `--dry-run` writes nothing ------------------------------------------------------------------------


def test_dry_run_writes_no_point_and_advances_no_watermark(
        influxd: LocalInfluxd, database: str, tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    path = _fed(tmp_path, influxd.url, database)
    assert main(["train", "-c", str(path)]) == 0
    before = _measurements(influxd, database)
    with caplog.at_level(logging.INFO):
        assert main(["run", "-c", str(path), "--once", "--dry-run"]) == 0
    assert _measurements(influxd, database) == before == {"ecg"}
    assert not (tmp_path / "state" / "watermarks.json").exists()
    assert not (tmp_path / "state" / "scores.npz").exists()
    m = re.search(r"dry-run, not written to database '\w+': .*?(\d+) points of anomaly_error", caplog.text)
    assert m and int(m.group(1)) > 0, caplog.text
    # The same tick for real writes what the dry run said it would.
    assert main(["run", "-c", str(path), "--once"]) == 0
    assert {"anomaly_error", "anomalyd_stats"} <= _measurements(influxd, database)
    assert (tmp_path / "state" / "watermarks.json").exists()


def test_dry_run_help_and_docs_say_it_writes_nothing(capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit):
        main(["run", "--help"])
    text = " ".join(capsys.readouterr().out.split())
    assert "write no point" in text and "advance no watermark" in text
    doc = " ".join((ROOT / "docs" / "deploy.md").read_text().split())
    assert "--dry-run" in doc and "no point is written" in doc and "no watermark" in doc


# -- item 9: no noise -------------------------------------------------------------------------------------------


def test_the_package_metadata_uses_the_spdx_license_string() -> None:
    meta = tomllib.loads((ROOT / "pyproject.toml").read_text())
    assert meta["project"]["license"] == "MIT"  # a table here is deprecated by setuptools (PEP 639)
    req = [r for r in meta["build-system"]["requires"] if r.startswith("setuptools")]
    assert req == ["setuptools>=77"]  # the first setuptools that reads the string form


def test_apscheduler_info_lines_are_silenced() -> None:
    cli._setup_logging(verbose=False)
    try:
        assert not logging.getLogger("apscheduler.executors.default").isEnabledFor(logging.INFO)
        assert logging.getLogger("apscheduler.scheduler").isEnabledFor(logging.WARNING)
    finally:
        logging.getLogger("apscheduler").setLevel(logging.NOTSET)
