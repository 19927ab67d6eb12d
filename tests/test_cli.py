"""The console script end to end: train, check, run --once, score, through a real InfluxDB."""

from __future__ import annotations

import logging
import time
from pathlib import Path

import pytest

from anomalyd.cli import main
from anomalyd.config import load
from anomalyd.demo import feed
from anomalyd.influx import InfluxDB1Store, Point
from anomalyd.localinflux import LocalInfluxd
from anomalyd.synthetic import ecg
from conftest import cli_config


def test_train_check_run_once_and_score(influxd: LocalInfluxd, database: str, tmp_path: Path,
                                        capsys: pytest.CaptureFixture[str]) -> None:
    path = tmp_path / "config.toml"
    path.write_text(cli_config(influxd.url, database))
    cfg = load(path, env={})
    feed(cfg, InfluxDB1Store(cfg.influxdb), 3 * 3600, future_s=0)

    assert main(["check", "-c", str(path)]) == 1  # no model yet
    assert "no model" in capsys.readouterr().out
    assert main(["train", "-c", str(path)]) == 0
    assert capsys.readouterr().out.count("trained heartbeat-") == 2
    assert main(["check", "-c", str(path)]) == 0
    assert main(["run", "-c", str(path), "--once", "--dry-run"]) == 0
    assert not (tmp_path / "state" / "watermarks.json").exists()  # a dry run advances no watermark
    assert main(["run", "-c", str(path), "--once"]) == 0
    assert (tmp_path / "state" / "watermarks.json").exists()
    assert main(["score", "-c", str(path), "--start", "now-30m", "--end", "now"]) == 0
    assert "scored" in capsys.readouterr().out
    time.sleep(0.01)


def test_train_exits_1_when_any_series_fails(influxd: LocalInfluxd, database: str, tmp_path: Path,
                                             capsys: pytest.CaptureFixture[str]) -> None:
    path = tmp_path / "config.toml"
    path.write_text(cli_config(influxd.url, database))
    cfg = load(path, env={})
    store = InfluxDB1Store(cfg.influxdb)
    now = time.time_ns() // 10**9 * 10**9
    x, _ = ecg(2 * 3600, seed=1)
    t0 = now - 3 * 3600 * 10**9
    store.write([Point("ecg", (("patient", "good"),), (("value", float(v)),), t0 + i * 10**9)
                 for i, v in enumerate(x)])
    store.write([Point("ecg", (("patient", "short"),), (("value", float(v)),), t0 + i * 10**9)
                 for i, v in enumerate(x[:20])])  # far too little to train on
    assert main(["train", "-c", str(path)]) == 1
    out, err = capsys.readouterr()
    assert out.count("trained heartbeat-") == 1  # the good series is trained all the same
    assert "FAILED  heartbeat|patient=short" in err and "1 of 2 failed" in err
    assert len(list((tmp_path / "models").glob("*.json"))) == 1


def test_bad_config_exits_2_with_every_problem(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    path = tmp_path / "bad.toml"
    path.write_text('[influxdb]\nurl = "ftp://x"\n[[signals]]\nname = "a"\nmeasurement = "m"\nfield = "f"\n'
                    'period = "1 fortnight"\nwindow = 2\n')
    assert main(["check", "-c", str(path)]) == 2
    err = capsys.readouterr().err
    assert "influxdb.url" in err and "signals[0].period" in err and "signals[0].window" in err


def test_influxdb_down_is_one_clear_line(tmp_path: Path, capsys: pytest.CaptureFixture[str],
                                        caplog: pytest.LogCaptureFixture) -> None:
    from anomalyd.localinflux import free_port

    path = tmp_path / "config.toml"
    path.write_text(cli_config(f"http://127.0.0.1:{free_port()}", "x"))
    with caplog.at_level(logging.INFO):
        assert main(["run", "-c", str(path), "--once"]) == 1
    assert "tick failed: InfluxDB at" in caplog.text and "next try" not in caplog.text  # --once tries once
    assert main(["check", "-c", str(path)]) == 1
    out = capsys.readouterr().out
    assert "unreachable" in out and "influxdb.url" in out
