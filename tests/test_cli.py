"""The console script end to end: train, check, run --once, score, through a real InfluxDB."""

from __future__ import annotations

import json
import logging
import time
from pathlib import Path

import pytest
import requests

from anomalyd.cli import main
from anomalyd.config import load
from anomalyd.demo.run import feed
from anomalyd.demo.synthetic import ecg
from anomalyd.store.base import Point
from anomalyd.store.influx1 import InfluxDB1Store
from anomalyd.store.local import LocalInfluxd
from conftest import AuthInfluxd, cli_config


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
    from anomalyd.store.local import free_port

    path = tmp_path / "config.toml"
    path.write_text(cli_config(f"http://127.0.0.1:{free_port()}", "x"))
    with caplog.at_level(logging.INFO):
        assert main(["run", "-c", str(path), "--once"]) == 1
    assert "tick failed: InfluxDB at" in caplog.text and "next try" not in caplog.text  # --once tries once
    assert main(["check", "-c", str(path)]) == 1
    out = capsys.readouterr().out
    assert "unreachable" in out and "influxdb.url" in out


# -- issue 14: check fails on wrong credentials, a missing database, measurement or field -------------------


def _signals_config(url: str, db: str, signals: list[tuple[str, str, str]]) -> str:
    text = f'[influxdb]\nurl = "{url}"\ndatabase = "{db}"\nretries = 0\n[paths]\nmodels = "models"\n' \
           f'state = "state"\n[daemon]\nlateness = "0s"\nhealth_listen = ""\n'
    for name, m, f in signals:
        text += f'[[signals]]\nname = "{name}"\nmeasurement = {json.dumps(m)}\nfield = {json.dumps(f)}\nperiod = "1s"\n'
    return text


def _fails(out: str) -> list[str]:
    """The FAIL lines of `check`, but for the missing models (none is trained in these tests)."""
    return [line for line in out.splitlines() if line.startswith("FAIL") and "no model in" not in line]


def test_check_fails_on_wrong_credentials_missing_database_measurement_or_field(
        influxd_auth: AuthInfluxd, tmp_path: Path, capsys: pytest.CaptureFixture[str],
        monkeypatch: pytest.MonkeyPatch) -> None:
    db = "checkdb"
    influxd_auth.query(f'CREATE DATABASE "{db}"')
    now = time.time_ns()
    lines = "\n".join(f'cpu,host=h1 usage={i % 7}.5,state="up" {now - (300 - i) * 10**9}' for i in range(300))
    r = requests.post(f"{influxd_auth.url}/write", params={"db": db}, data=lines,
                      auth=(influxd_auth.user, influxd_auth.password), timeout=30)
    assert r.status_code == 204, r.text
    path = tmp_path / "config.toml"
    path.write_text(_signals_config(influxd_auth.url, db, [("cpu", "cpu", "usage")]))
    for var in ("ANOMALYD_INFLUXDB_USERNAME", "ANOMALYD_INFLUXDB_PASSWORD", "ANOMALYD_INFLUXDB_TOKEN"):
        monkeypatch.delenv(var, raising=False)

    # no credentials at all: ping works, the query does not
    assert main(["check", "-c", str(path)]) == 1
    out = capsys.readouterr().out
    assert out.startswith("ok   InfluxDB")
    (fail,) = _fails(out)
    assert "refused the credentials of no user" in fail and "ANOMALYD_INFLUXDB_USERNAME" in fail

    # a wrong password: named by its user, never printed
    monkeypatch.setenv("ANOMALYD_INFLUXDB_USERNAME", influxd_auth.user)
    monkeypatch.setenv("ANOMALYD_INFLUXDB_PASSWORD", "wrong-pw-XYZ")
    assert main(["check", "-c", str(path)]) == 1
    out = capsys.readouterr().out
    (fail,) = _fails(out)
    assert "refused the credentials of user 'admin' (HTTP 401" in fail and "ANOMALYD_INFLUXDB_PASSWORD" in fail
    assert "wrong-pw-XYZ" not in out

    # the right password: the data checks run (only the model is missing)
    monkeypatch.setenv("ANOMALYD_INFLUXDB_PASSWORD", influxd_auth.password)
    assert main(["check", "-c", str(path)]) == 1
    out = capsys.readouterr().out
    assert _fails(out) == [], out
    assert "ok   signal cpu: field cpu.usage exists (float)" in out and f"ok   database '{db}' exists" in out

    # a missing database
    path.write_text(_signals_config(influxd_auth.url, "nodb", [("cpu", "cpu", "usage")]))
    assert main(["check", "-c", str(path)]) == 1
    (fail,) = _fails(capsys.readouterr().out)
    assert "database 'nodb' does not exist" in fail and "influxdb.database" in fail

    # a missing measurement, a missing field, a string field; the good signal passes; no data check on the others
    path.write_text(_signals_config(influxd_auth.url, db, [
        ("good", "cpu", "usage"), ("nomeas", "cpu_typo", "usage"), ("nofield", "cpu", "usgae"),
        ("text", "cpu", "state"), ("quoted", 'c"p\\u', "x")]))
    assert main(["check", "-c", str(path)]) == 1
    fails = _fails(capsys.readouterr().out)
    assert len(fails) == 4, fails
    assert "signal nomeas: measurement 'cpu_typo' does not exist in database 'checkdb'" in fails[0]
    assert "signals[1].measurement" in fails[0]
    assert fails[1] == ("FAIL signal nofield: measurement 'cpu' has no field 'usgae' (its fields: state, usage); "
                        "fix signals[2].field")
    assert "signal text: field 'state' of 'cpu' holds string values, not numbers" in fails[2]
    assert "signal quoted: measurement 'c\"p\\\\u' does not exist" in fails[3]  # quoted, not pasted, in InfluxQL
    influxd_auth.query(f'DROP DATABASE "{db}"')


def test_check_fails_when_the_user_may_not_read_the_database(
        influxd_auth: AuthInfluxd, tmp_path: Path, capsys: pytest.CaptureFixture[str],
        monkeypatch: pytest.MonkeyPatch) -> None:
    influxd_auth.query('CREATE DATABASE "private"')
    influxd_auth.query("CREATE USER nobody WITH PASSWORD 'nobody-pw'")
    path = tmp_path / "config.toml"
    path.write_text(_signals_config(influxd_auth.url, "private", [("cpu", "cpu", "usage")]))
    monkeypatch.setenv("ANOMALYD_INFLUXDB_USERNAME", "nobody")
    monkeypatch.setenv("ANOMALYD_INFLUXDB_PASSWORD", "nobody-pw")
    monkeypatch.delenv("ANOMALYD_INFLUXDB_TOKEN", raising=False)
    assert main(["check", "-c", str(path)]) == 1
    (fail,) = _fails(capsys.readouterr().out)
    assert "does not let user 'nobody' read database 'private' (HTTP 403)" in fail and "GRANT ALL ON" in fail


def test_credentials_in_the_url_are_refused_and_never_shown(tmp_path: Path, capsys: pytest.CaptureFixture[str]
                                                           ) -> None:
    path = tmp_path / "config.toml"
    path.write_text(cli_config("http://admin:pw-in-url-123@127.0.0.1:8086", "x"))
    assert main(["check", "-c", str(path)]) == 2
    out, err = capsys.readouterr()
    assert "pw-in-url-123" not in out + err
    assert "influxdb.url: 'http://***@127.0.0.1:8086' carries credentials" in err
    assert "ANOMALYD_INFLUXDB_USERNAME and ANOMALYD_INFLUXDB_PASSWORD" in err


def test_run_once_and_score_exit_1_naming_why_when_nothing_could_be_scored(
        influxd: LocalInfluxd, database: str, tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    path = tmp_path / "config.toml"
    path.write_text(_signals_config(influxd.url, database, [("ghost", "nothing_here", "v")]))
    assert main(["run", "-c", str(path), "--once"]) == 1
    err = capsys.readouterr().err
    assert "signal ghost: " in err and "anomalyd run --once: nothing could be scored" in err
    assert main(["score", "-c", str(path), "--start", "now-10m"]) == 1
    err = capsys.readouterr().err
    assert "signal ghost: " in err and "anomalyd score: nothing could be scored" in err


def test_check_against_influxdb_2x_flux_and_influxql_with_a_token(tmp_path: Path, capsys: pytest.CaptureFixture[str],
                                                                monkeypatch: pytest.MonkeyPatch) -> None:
    """The 2.x paths of check, against the 2.x stand-in of test_influx2: a wrong token fails the Flux read and the
    InfluxQL query with one line naming ANOMALYD_INFLUXDB_TOKEN, never the token."""
    from test_influx2 import BUCKET, ORG, TOKEN, Influx2Stub

    for var in ("ANOMALYD_INFLUXDB_USERNAME", "ANOMALYD_INFLUXDB_PASSWORD"):
        monkeypatch.delenv(var, raising=False)
    with Influx2Stub() as stub:
        flux = tmp_path / "flux.toml"
        flux.write_text(_signals_config(stub.url, "db", [("cpu", "cpu", "usage")]).replace(
            "retries = 0\n", f'retries = 0\napi = "flux"\norg = "{ORG}"\nbucket = "{BUCKET}"\n'))
        influxql = tmp_path / "influxql.toml"
        influxql.write_text(_signals_config(stub.url, "db", [("cpu", "cpu", "usage")]))
        for path in (flux, influxql):
            monkeypatch.setenv("ANOMALYD_INFLUXDB_TOKEN", "wrong-token-42")
            assert main(["check", "-c", str(path)]) == 1
            out = capsys.readouterr().out
            (fail,) = _fails(out)
            assert "HTTP 401" in fail and "ANOMALYD_INFLUXDB_TOKEN" in fail and "wrong-token-42" not in out
            monkeypatch.setenv("ANOMALYD_INFLUXDB_TOKEN", TOKEN)
            assert main(["check", "-c", str(path)]) == 1  # the stand-in holds no data
            out = capsys.readouterr().out
            # (not "401" alone: the stand-in's port, in every line's URL, may hold it: 127.0.0.1:40115)
            assert [f for f in _fails(out) if "HTTP 401" in f] == [] and TOKEN not in out


#: What `anomalyd --version` and `--help` must not load: the numeric stack, the plotting and InfluxDB clients, the
#: evaluation back end, and the config (it loads the detector, hence scikit-learn).
HEAVY = ("numpy", "sklearn", "scipy", "matplotlib", "pandas", "influxdb", "requests", "anomalyd.evaluation",
         "anomalyd.config", "anomalyd.core.detector")


@pytest.mark.parametrize("flag", ["--version", "--help"])
def test_version_and_help_import_only_the_standard_library(flag: str) -> None:
    """No wall clock: ``-X importtime`` lists every module a fresh interpreter imports for the flag."""
    import subprocess
    import sys

    r = subprocess.run([sys.executable, "-X", "importtime", "-m", "anomalyd", flag], capture_output=True,
                       text=True, check=True)
    assert r.stdout.startswith("anomalyd 0.1.0" if flag == "--version" else "usage: anomalyd")
    imported = {line.split("|")[-1].strip() for line in r.stderr.splitlines() if line.startswith("import time:")}
    assert "anomalyd.cli" in imported
    heavy = sorted(m for m in imported if any(m == h or m.startswith(h + ".") for h in HEAVY))
    assert heavy == []


def test_evaluate_without_its_extra_is_one_line_naming_it(tmp_path: Path, capsys: pytest.CaptureFixture[str],
                                                          monkeypatch: pytest.MonkeyPatch) -> None:
    import builtins
    import sys

    csv = tmp_path / "x.csv"
    csv.write_text("timestamp,value,label\n")
    monkeypatch.setitem(sys.modules, "matplotlib", None)  # as if not installed: find_spec answers None
    assert main(["evaluate", str(csv), "--plots", str(tmp_path / "plots")]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "--plots needs matplotlib" in err and "pip install 'anomalyd[evaluate]'" in err
    assert not (tmp_path / "plots").exists()

    real_import = builtins.__import__

    def no_evaluate_deps(name: str, globals: object = None, locals: object = None, fromlist: object = (),
                         level: int = 0) -> object:
        if fromlist and name.split(".")[-1] == "evaluation":  # the CLI's lazy import of the evaluate command
            raise ModuleNotFoundError("No module named 'stumpy'", name="stumpy")
        return real_import(name, globals, locals, fromlist, level)  # type: ignore[arg-type]

    monkeypatch.setattr(builtins, "__import__", no_evaluate_deps)
    assert main(["evaluate", str(csv)]) == 2
    err = capsys.readouterr().err
    assert err == "anomalyd evaluate: stumpy is not installed; pip install 'anomalyd[evaluate]'\n"
