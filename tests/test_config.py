"""Configuration: malformed files name the key path, every problem at once, env overrides, secrets kept out."""

from __future__ import annotations

import copy
from dataclasses import FrozenInstanceError, replace
from pathlib import Path
from typing import Any

import pytest
from pydantic import ValidationError

from anomalyd.config import AlertsConfig, ConfigError, DaemonConfig, FieldSpec, from_dict, load
from anomalyd.core.detector import DetectorSpec

ROOT = Path(__file__).resolve().parents[1]
SECRET = "hunter2-s3cr3t-VALUE"


def minimal() -> dict[str, Any]:
    """The smallest valid configuration, as a parsed TOML document."""
    return {
        "influxdb": {"url": "http://127.0.0.1:8086", "database": "db"},
        "daemon": {"health_listen": ""},
        "signals": [{"name": "cpu", "measurement": "m", "field": "f", "period": "1s", "group_by": ["host"],
                     "train_range": ["now-4h", "now-1h"]}],
    }


def problems_of(raw: dict[str, Any], env: dict[str, str] | None = None) -> list[str]:
    with pytest.raises(ConfigError) as info:
        from_dict(raw, env={} if env is None else env)
    err = info.value
    # Every problem is also in the exception's text, so the CLI prints all of them.
    for p in err.problems:
        assert p in str(err)
    return err.problems


def set_path(raw: dict[str, Any], path: str, value: Any) -> dict[str, Any]:
    """Return a copy of ``raw`` with ``a.b[0].c`` set (or deleted when ``value`` is ``DELETE``)."""
    out = copy.deepcopy(raw)
    parts: list[str | int] = []
    for part in path.split("."):
        if "[" in part:
            name, idx = part[:-1].split("[")
            parts += [name, int(idx)]
        else:
            parts.append(part)
    node: Any = out
    for p in parts[:-1]:
        node = node.setdefault(p, {}) if isinstance(p, str) else node[p]
    if value is DELETE:
        del node[parts[-1]]
    else:
        node[parts[-1]] = value
    return out


DELETE = object()

# (what is wrong, key set, value, the key path the message must name, a fragment of the accepted values/fix)
MALFORMED = [
    ("window too small", "signals[0].window", 2, "signals[0].window", "at least 4"),
    ("window not an integer", "signals[0].window", "32 samples", "signals[0].window", "or \"auto\""),
    ("window not auto", "signals[0].window", "automatic", "signals[0].window", "\"auto\""),
    ("window a float", "signals[0].window", 24.5, "signals[0].window", "whole number of samples"),
    ("slide zero", "signals[0].slide", 0, "signals[0].slide", "must be between 1 and"),
    ("train_slide larger than window", "signals[0].train_slide", 64, "signals[0].train_slide",
     "between 1 and window=32"),
    ("write_every zero", "signals[0].write_every", 0, "signals[0].write_every", "greater than 0"),
    ("max_gap negative", "signals[0].max_gap", -1, "signals[0].max_gap", "0 or more"),
    ("n_init zero", "signals[0].n_init", 0, "signals[0].n_init", "greater than 0"),
    ("score_history too short", "signals[0].score_history", 4, "signals[0].score_history", "at least 8"),
    ("score_threshold zero", "signals[0].score_threshold", 0, "signals[0].score_threshold", "(0, 1]"),
    ("score_threshold above 1", "signals[0].score_threshold", 1.5, "signals[0].score_threshold", "(0, 1]"),
    ("score_threshold not a number", "signals[0].score_threshold", "high", "signals[0].score_threshold",
     "expected a number"),
    ("decision unknown", "signals[0].decision", "vote", "signals[0].decision", "score, error, either"),
    ("field_history negative", "signals[0].field_history", -1, "signals[0].field_history", "0 or more"),
    ("rebaseline_gate zero", "signals[0].rebaseline_gate", 0, "signals[0].rebaseline_gate", "greater than 0"),
    ("rebaseline_after on one field", "signals[0].rebaseline_after", 200, "signals[0].rebaseline_after",
     "needs a signal with several fields"),
    ("max_backlog_windows zero", "daemon.max_backlog_windows", 0, "daemon.max_backlog_windows",
     "greater than 0"),
    ("recover_windows zero", "alerts.recover_windows", 0, "alerts.recover_windows", "greater than 0"),
    ("url not http", "influxdb.url", "ftp://db.example", "influxdb.url", "http:// or https://"),
    ("url not a string", "influxdb.url", 8086, "influxdb.url", "expected a string"),
    ("interval not a duration", "daemon.interval", "soon", "daemon.interval", "e.g. '16s'"),
    ("interval zero", "daemon.interval", "0s", "daemon.interval", "greater than 0"),
    ("lateness negative", "daemon.lateness", "-5s", "daemon.lateness", "is not a duration"),
    # issue 14: durations need a unit, ports are range-checked, output names must survive line protocol
    ("interval a bare number", "daemon.interval", 16, "daemon.interval", 'write it as a string with one, e.g. "16s"'),
    ("lateness a bare float", "daemon.lateness", 2.5, "daemon.lateness", '"2.5s"'),
    ("period a bare number", "signals[0].period", 1, "signals[0].period", '"1s"'),
    ("timeout too short", "influxdb.timeout", "1us", "influxdb.timeout", 'under 0.1s; use e.g. "10s"'),
    ("timeout 99ms", "influxdb.timeout", "99ms", "influxdb.timeout", "0.1s"),
    ("url port too large", "influxdb.url", "http://db:70000", "influxdb.url", "port 70000; use a port between 1 "
                                                                              "and 65535"),
    ("url port zero", "influxdb.url", "http://db:0", "influxdb.url", "port 0"),
    ("url port not a number", "influxdb.url", "http://db:80x", "influxdb.url", "port 80x"),
    ("kapacitor url port", "kapacitor.url", "http://k:99999", "kapacitor.url", "between 1 and 65535"),
    ("health_listen port too large", "daemon.health_listen", "127.0.0.1:70000", "daemon.health_listen",
     "port 70000; use a port between 1 and 65535"),
    ("health_listen port zero", "daemon.health_listen", "127.0.0.1:0", "daemon.health_listen", "port 0"),
    ("output measurement with a newline", "output.measurement", "a\nb", "output.measurement", "line break"),
    ("output measurement with a trailing backslash", "output.measurement", "err\\", "output.measurement",
     "ends with a backslash"),
    ("output measurement starting with #", "output.measurement", "#errors", "output.measurement", "comment"),
    ("stats measurement with a CR", "output.stats_measurement", "s\r", "output.stats_measurement", "line break"),
    ("reconstruction measurement with #", "output.reconstruction_measurement", "#r",
     "output.reconstruction_measurement", "comment"),
    ("deadman negative", "alerts.deadman", "-1m", "alerts.deadman", "not a duration"),
    ("deadman a bare number", "alerts.deadman", 600, "alerts.deadman", '"600s"'),
    ("rescore_horizon a word", "daemon.rescore_horizon", "forever", "daemon.rescore_horizon", "e.g. '16s'"),
    ("period in fortnights", "signals[0].period", "1 fortnight", "signals[0].period", "a number and a unit"),
    ("unknown policy", "signals[0].threshold.policy", "p99", "signals[0].threshold.policy",
     "max, quantile, sigma"),
    ("quantile above 1", "signals[0].threshold.quantile", 1.5, "signals[0].threshold.quantile", "(0, 1]"),
    ("threshold not a table", "signals[0].threshold", "max", "signals[0].threshold", "must be a table"),
    ("unknown influxdb key", "influxdb.hots", "x", "influxdb.hots", "accepted: api, bucket, database"),
    ("unknown signal key", "signals[0].windw", 32, "signals[0].windw", "accepted: attribution, clusters"),
    ("unknown threshold key", "signals[0].threshold.margn", 2, "signals[0].threshold.margn", "accepted: k"),
    ("unknown section", "influx", {"url": "x"}, "influx", "accepted: alerts"),
    ("password in the file", "influxdb.password", SECRET, "influxdb.password", "ANOMALYD_INFLUXDB_PASSWORD"),
    ("username in the file", "influxdb.username", SECRET, "influxdb.username", "username_file"),
    ("slack webhook in the file", "alerts.slack.webhook_url", SECRET, "alerts.slack.webhook_url",
     "ANOMALYD_SLACK_WEBHOOK_URL"),
    ("slack token in the file", "alerts.slack.token", SECRET, "alerts.slack.token", "ANOMALYD_SLACK_TOKEN"),
    ("password file unreadable", "influxdb.password_file", "/nonexistent/pw", "influxdb.password_file",
     "cannot be read"),
    ("missing measurement", "signals[0].measurement", DELETE, "signals[0].measurement", "is required"),
    ("missing period", "signals[0].period", DELETE, "signals[0].period", "is required"),
    ("no signals", "signals", DELETE, "signals", "[[signals]]"),
    ("signals a table", "signals", {"name": "x"}, "signals", "[[signals]]"),
    ("empty database", "influxdb.database", "", "influxdb.database", "must not be empty"),
    ("train_range end before start", "signals[0].train_range", ["2024-01-08T00:00:00Z", "2024-01-01T00:00:00Z"],
     "signals[0].train_range", "start must be before the end"),
    ("train_range relative, reversed", "signals[0].train_range", ["now-1h", "now-4h"], "signals[0].train_range",
     "start must be before the end"),
    ("train_range words", "signals[0].train_range", "last fortnight", "signals[0].train_range", "last 7 days"),
    ("train_range bad time", "signals[0].train_range", ["yesterday", "now"], "signals[0].train_range",
     "RFC 3339"),
    ("train_range three items", "signals[0].train_range", ["now-3h", "now-2h", "now"], "signals[0].train_range",
     "[start, end] pair"),
    ("where not a table", "signals[0].where", "host=h1", "signals[0].where", "table of tag"),
    ("where value not a string", "signals[0].where", {"host": 1}, "signals[0].where", "table of tag"),
    ("train_where a list", "signals[0].train_where", ["host"], "signals[0].train_where", "table of tag"),
    ("group_by a string", "signals[0].group_by", "host", "signals[0].group_by", "list of tag names"),
    ("group_by reserved tag", "signals[0].group_by", ["model"], "signals[0].group_by", "clash"),
    ("scope unknown", "signals[0].scope", "global", "signals[0].scope", "series, shared"),
    ("clusters one", "signals[0].clusters", 1, "signals[0].clusters", "at least 2"),
    ("holdout out of range", "signals[0].holdout", 1.0, "signals[0].holdout", "(0, 1)"),
    ("name with a slash", "signals[0].name", "../etc", "signals[0].name", "model files"),
    ("section not a table", "daemon", 5, "daemon", "must be a table"),
    ("bool not a bool", "influxdb.verify_ssl", "maybe", "influxdb.verify_ssl", "true or false"),
    ("health_listen without port", "daemon.health_listen", "localhost", "daemon.health_listen", "host:port"),
    ("unknown sink", "alerts.sinks", ["pager"], "alerts.sinks", "log, slack"),
    ("slack sink without secret", "alerts.sinks", ["slack"], "alerts.sinks", "ANOMALYD_SLACK_WEBHOOK_URL"),
    ("kapacitor prefix", "kapacitor.task_prefix", "a b", "kapacitor.task_prefix", "letters, digits"),
]


@pytest.mark.parametrize(("path", "value", "key", "hint"), [m[1:] for m in MALFORMED],
                         ids=[m[0] for m in MALFORMED])
def test_malformed_config_names_the_key(path: str, value: Any, key: str, hint: str) -> None:
    raw = minimal()
    if "train_slide" in path:
        raw = set_path(raw, "signals[0].window", 32)
    problems = problems_of(set_path(raw, path, value))
    mine = [p for p in problems if p.startswith(f"{key}:")]
    assert len(mine) == 1, f"expected one problem naming {key!r}, got {problems}"
    assert hint in mine[0], mine[0]
    # Secrets written in the file are refused without being echoed back.
    assert SECRET not in "\n".join(problems)


def test_the_minimal_config_is_valid() -> None:
    cfg = from_dict(minimal(), env={})
    sig = cfg.signal("cpu")
    assert (sig.window, sig.slide, sig.write_every, sig.train_slide, sig.period_ns) == (None, 1, 1, 2, 10**9)
    assert sig.train_range.resolve(10 * 3600 * 10**9) == (6 * 3600 * 10**9, 9 * 3600 * 10**9)
    with pytest.raises(KeyError, match="configured: cpu"):
        cfg.signal("nope")


def test_the_defaults() -> None:
    cfg = from_dict(minimal(), env={})
    sig = cfg.signal("cpu")
    assert sig.window is None  # "auto": chosen at training
    assert (sig.clusters, sig.n_init, sig.max_gap, sig.score_history) == (150, 3, 8, 2000)
    assert (sig.score_threshold, sig.decision, sig.scope, sig.holdout) == (0.5, "score", "series", 0.2)
    assert (sig.threshold.policy, sig.threshold.quantile, sig.threshold.margin) == ("quantile", 0.999, 1.0)
    assert sig.step_ns == sig.period_ns  # one point per window, every window
    assert cfg.daemon.max_backlog_windows == 10_000 and cfg.alerts.recover_windows == 32
    assert cfg.alerts.for_windows == 1
    # The signal's defaults are the detector's: one configuration for the daemon and the evaluation.
    assert sig.spec() == DetectorSpec()


def test_explicit_auto_window_and_integer_window() -> None:
    auto = from_dict(set_path(minimal(), "signals[0].window", "auto"), env={}).signal("cpu")
    assert auto.window is None and auto.spec().window is None
    fixed = from_dict(set_path(minimal(), "signals[0].window", 24), env={}).signal("cpu")
    assert fixed.window == 24 and fixed.spec().window == 24


def test_the_signal_spec_reflects_the_config() -> None:
    raw = minimal()
    raw["signals"][0].update(window=24, slide=2, write_every=4, train_slide=3, clusters=40, n_init=2,
                             random_state=7, holdout=0.3, max_train_windows=1000, score_history=500,
                             score_threshold=0.7, decision="either",
                             threshold={"policy": "sigma", "margin": 1.5, "quantile": 0.99, "k": 4.0})
    sig = from_dict(raw, env={}).signal("cpu")
    spec = sig.spec()
    assert isinstance(spec, DetectorSpec)
    assert (spec.window, spec.stride, spec.train_slide, spec.n_clusters, spec.n_init, spec.random_state) == (
        24, 2, 3, 40, 2, 7)
    assert (spec.holdout, spec.max_train_windows, spec.score_threshold, spec.decision) == (0.3, 1000, 0.7, "either")
    assert (spec.threshold_policy, spec.margin, spec.quantile, spec.sigma_k) == ("sigma", 1.5, 0.99, 4.0)
    assert spec.normaliser == replace(DetectorSpec().normaliser, long_window=500)
    # Everything the config does not set is the detector's default.
    assert replace(spec, window=None, stride=1, train_slide=2, n_clusters=150, n_init=3, random_state=0, holdout=0.2,
                   max_train_windows=50_000, score_threshold=0.5, decision="score", threshold_policy="quantile",
                   margin=1.0, quantile=0.999, sigma_k=6.0, normaliser=DetectorSpec().normaliser) == DetectorSpec()
    # Points: one summary per write_every windows of slide samples.
    assert sig.step_ns == 2 * 4 * 10**9
    assert (sig.write_every, sig.slide, sig.max_gap) == (4, 2, 8)


def test_the_level_shift_keys_reach_the_spec() -> None:
    """field_history, rebaseline_gate and rebaseline_after set the per-field history (several fields); the gate
    applies only with re-baselining on, and re-baselining needs the history."""
    raw = minimal()
    raw["signals"][0].update(fields=["usage_user", "usage_system"], field_history=800)
    del raw["signals"][0]["field"]
    spec = from_dict(raw, env={}).signal("cpu").spec()
    assert (spec.field_surprise, spec.surprise_gate, spec.surprise_rebaseline) == (800, None, 0)
    raw["signals"][0].update(rebaseline_after=200, rebaseline_gate=5.0)
    spec = from_dict(raw, env={}).signal("cpu").spec()
    assert (spec.field_surprise, spec.surprise_gate, spec.surprise_rebaseline) == (800, 5.0, 200)
    raw["signals"][0].update(field_history=0)
    (problem,) = problems_of(raw)
    assert problem.startswith("signals[0].rebaseline_after") and "needs field_history > 0" in problem, problem


def test_duplicate_signal_names() -> None:
    raw = minimal()
    raw["signals"].append(dict(raw["signals"][0]))
    problems = problems_of(raw)
    assert problems == ["signals[1].name: 'cpu' is used by two signals; names must be unique"]


def test_every_problem_is_reported_at_once() -> None:
    raw = minimal()
    raw["influxdb"].update(url="ftp://x", password="p", timeout="forever")
    raw["daemon"].update(interval="soon", max_backlog_windows="many")
    raw["output"] = {"measurement": ""}
    raw["nonsense"] = 1
    raw["signals"][0].update(window=2, where="host=h1", train_range="fortnight",
                             threshold={"policy": "p99"}, windw=1)
    raw["signals"].append({"name": "cpu", "field": "f", "period": "1 fortnight"})
    problems = problems_of(raw)
    keys = {p.split(":", 1)[0] for p in problems}
    expected = {"influxdb.url", "influxdb.password", "influxdb.timeout", "daemon.interval",
                "daemon.max_backlog_windows", "output.measurement", "nonsense", "signals[0].window",
                "signals[0].where", "signals[0].train_range", "signals[0].threshold.policy", "signals[0].windw",
                "signals[1].name", "signals[1].measurement", "signals[1].period"}
    assert expected <= keys, expected - keys
    assert len(problems) >= len(expected)


def test_toml_syntax_error_names_the_file_and_line(tmp_path: Path) -> None:
    path = tmp_path / "broken.toml"
    path.write_text('[influxdb]\nurl = "http://x:8086"\ndatabase = \n[[signals]]\n')
    with pytest.raises(ConfigError) as info:
        load(path, env={})
    msg = str(info.value)
    assert str(path) in msg and "not valid TOML" in msg and "line 3" in msg


def test_missing_file_is_a_config_error(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="file not found"):
        load(tmp_path / "nope.toml", env={})


def test_toml_datetimes_are_accepted_as_train_range(tmp_path: Path) -> None:
    path = tmp_path / "c.toml"
    path.write_text('[[signals]]\nname = "s"\nmeasurement = "m"\nfield = "f"\nperiod = "1s"\n'
                    "train_range = [2024-01-01T00:00:00Z, 2024-01-02T00:00:00Z]\n")
    start, end = load(path, env={}).signals[0].train_range.resolve(0)
    assert end - start == 86400 * 10**9


def test_relative_paths_are_relative_to_the_config_file(tmp_path: Path) -> None:
    path = tmp_path / "sub" / "c.toml"
    path.parent.mkdir()
    path.write_text('[paths]\nmodels = "m"\nstate = "../s"\n[[signals]]\nname = "s"\nmeasurement = "m"\n'
                    'field = "f"\nperiod = "1s"\n')
    cfg = load(path, env={})
    assert cfg.paths.models == tmp_path / "sub" / "m"
    assert cfg.paths.state.resolve() == tmp_path / "s"


# -- environment overrides ----------------------------------------------------------------------------------


def test_env_overrides_connection_and_daemon_settings() -> None:
    env = {"ANOMALYD_INFLUXDB_URL": "https://influx.example:8443/", "ANOMALYD_INFLUXDB_DATABASE": "prod",
           "ANOMALYD_INFLUXDB_RETRIES": "7", "ANOMALYD_INFLUXDB_VERIFY_SSL": "false",
           "ANOMALYD_INFLUXDB_TIMEOUT": "2s", "ANOMALYD_DAEMON_INTERVAL": "30s",
           "ANOMALYD_DAEMON_HEALTH_LISTEN": "0.0.0.0:9999", "ANOMALYD_DAEMON_MAX_BACKLOG_WINDOWS": "5",
           "ANOMALYD_OUTPUT_MEASUREMENT": "errs", "ANOMALYD_SLACK_CHANNEL": "#ops",
           "ANOMALYD_KAPACITOR_URL": "http://k:9092", "ANOMALYD_ALERTS_FOR_WINDOWS": "3",
           "OTHER_INFLUXDB_URL": "http://ignored:1"}
    cfg = from_dict(minimal(), env=env)
    assert cfg.influxdb.url == "https://influx.example:8443"  # and it beats the file's value
    assert (cfg.influxdb.database, cfg.influxdb.retries, cfg.influxdb.verify_ssl, cfg.influxdb.timeout_s) == (
        "prod", 7, False, 2.0)
    assert (cfg.daemon.interval_s, cfg.daemon.health_listen, cfg.daemon.max_backlog_windows) == (
        30.0, "0.0.0.0:9999", 5)
    assert cfg.output.measurement == "errs" and cfg.alerts.slack.channel == "#ops"
    assert cfg.kapacitor.url == "http://k:9092" and cfg.alerts.for_windows == 3


def test_env_overrides_from_the_process_environment(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    path = tmp_path / "c.toml"
    path.write_text('[influxdb]\nurl = "http://file:8086"\n[[signals]]\nname = "s"\nmeasurement = "m"\n'
                    'field = "f"\nperiod = "1s"\n')
    monkeypatch.setenv("ANOMALYD_INFLUXDB_URL", "http://from-env:8086")
    assert load(path).influxdb.url == "http://from-env:8086"
    assert load(path, env={}).influxdb.url == "http://file:8086"  # an explicit env mapping replaces os.environ


def test_a_bad_env_override_names_the_key() -> None:
    problems = problems_of(minimal(), env={"ANOMALYD_DAEMON_INTERVAL": "soon", "ANOMALYD_INFLUXDB_URL": "x"})
    assert {p.split(":", 1)[0] for p in problems} == {"daemon.interval", "influxdb.url"}


# -- secrets -------------------------------------------------------------------------------------------------


def test_secrets_from_files_are_read_and_never_printed(tmp_path: Path) -> None:
    files = {}
    for name in ("user", "password", "webhook", "token"):
        files[name] = tmp_path / name
        files[name].write_text(f"{SECRET}-{name}\n")
    raw = minimal()
    raw["influxdb"].update(username_file=str(files["user"]), password_file=str(files["password"]))
    raw["alerts"] = {"sinks": ["log", "slack"], "slack": {"webhook_url_file": str(files["webhook"]),
                                                          "token_file": str(files["token"]), "channel": "#a"}}
    cfg = from_dict(raw, env={})
    assert cfg.influxdb.username == f"{SECRET}-user" and cfg.influxdb.password == f"{SECRET}-password"
    assert cfg.alerts.slack.webhook_url == f"{SECRET}-webhook" and cfg.alerts.slack.token == f"{SECRET}-token"
    assert SECRET not in repr(cfg) and SECRET not in str(cfg)


def test_secret_file_named_by_env(tmp_path: Path) -> None:
    pw = tmp_path / "pw"
    pw.write_text(SECRET)
    cfg = from_dict(minimal(), env={"ANOMALYD_INFLUXDB_PASSWORD_FILE": str(pw)})
    assert cfg.influxdb.password == SECRET and SECRET not in repr(cfg)


SECRET_VARS = [("ANOMALYD_INFLUXDB_USERNAME", "influxdb", "username"),
               ("ANOMALYD_INFLUXDB_PASSWORD", "influxdb", "password"),
               ("ANOMALYD_SLACK_WEBHOOK_URL", "slack", "webhook_url"),
               ("ANOMALYD_SLACK_TOKEN", "slack", "token")]


def _secret_of(cfg: Any, section: str, key: str) -> str:
    return str(getattr(cfg.influxdb if section == "influxdb" else cfg.alerts.slack, key))


@pytest.mark.parametrize(("var", "section", "key"), SECRET_VARS)
def test_secrets_from_the_process_environment(monkeypatch: pytest.MonkeyPatch, var: str, section: str,
                                              key: str) -> None:
    monkeypatch.setenv(var, SECRET)
    cfg = from_dict(minimal())
    assert _secret_of(cfg, section, key) == SECRET
    assert SECRET not in repr(cfg)


@pytest.mark.parametrize(("var", "section", "key"), SECRET_VARS)
def test_secrets_from_an_env_mapping(monkeypatch: pytest.MonkeyPatch, var: str, section: str, key: str) -> None:
    monkeypatch.delenv(var, raising=False)
    cfg = from_dict(minimal(), env={var: SECRET})
    assert _secret_of(cfg, section, key) == SECRET
    assert SECRET not in repr(cfg)


# -- the shipped configurations -------------------------------------------------------------------------------


def test_the_repo_config_loads() -> None:
    cfg = load(ROOT / "config.toml", env={})
    sig = cfg.signal("heartbeat")
    assert (sig.measurement, sig.field, sig.group_by, sig.window, sig.slide, sig.period_ns) == (
        "ecg", "value", ("patient",), None, 1, 10**9)
    assert sig.threshold.policy in ("max", "quantile", "sigma")
    assert (sig.score_threshold, sig.decision, sig.write_every) == (0.5, "score", 1)
    assert cfg.paths.models.is_absolute() and cfg.paths.models.parent.parent == ROOT
    assert cfg.influxdb.password == "" and "password" not in repr(cfg.influxdb)


def test_the_ekg_example_config_loads() -> None:
    cfg = load(ROOT / "examples" / "ekg" / "config.toml", env={})
    (sig,) = cfg.signals
    assert (sig.measurement, sig.field, sig.period_ns, sig.window, sig.slide) == ("EKG", "signal_value", 10**9,
                                                                                  32, 1)
    assert sig.scope == "shared" and dict(sig.train_where) == {"type": "norm"}
    assert dict(sig.where) == {"type": "anomaly"} and sig.group_by == ("type",)
    start, end = sig.train_range.resolve(0)
    assert 0 < start < end


def test_a_misspelled_env_variable_is_reported_as_one() -> None:
    problems = problems_of(minimal(), env={"ANOMALYD_INFLUXDB_ULR": "http://db:8086", "ANOMALYD_SLACK_CHANEL": "#x"})
    ulr = next(p for p in problems if "ULR" in p)
    assert ulr.startswith("ANOMALYD_INFLUXDB_ULR (environment variable): no setting influxdb.ulr; accepted: ")
    accepted = ulr.split("accepted: ", 1)[1].split(", ")
    assert "ANOMALYD_INFLUXDB_URL" in accepted and "ANOMALYD_INFLUXDB_DATABASE" in accepted
    assert all(a.startswith("ANOMALYD_INFLUXDB_") for a in accepted)
    chanel = next(p for p in problems if "CHANEL" in p)
    assert "no setting alerts.slack.chanel" in chanel and "ANOMALYD_SLACK_CHANNEL" in chanel
    # A bad value from the environment names its variable too; a file's mistake does not mention one.
    bad = problems_of(minimal(), env={"ANOMALYD_DAEMON_INTERVAL": "soon"})
    assert bad[0].startswith("daemon.interval: ") and bad[0].endswith(
        "(set by the environment variable ANOMALYD_DAEMON_INTERVAL)")
    raw = minimal()
    raw["influxdb"]["ulr"] = "http://db:8086"
    assert problems_of(raw)[0].startswith("influxdb.ulr: unknown setting; accepted: ")


# -- issue 14 -----------------------------------------------------------------------------------------------


@pytest.mark.parametrize("url", [f"http://admin:{SECRET}@db:8086", f"https://{SECRET}@db",
                                 f"http://u:{SECRET}@db:99999"])
def test_credentials_in_the_url_are_refused_without_echoing_them(url: str) -> None:
    problems = problems_of(set_path(minimal(), "influxdb.url", url))
    assert len(problems) == 1, problems
    (msg,) = problems
    assert msg.startswith("influxdb.url: ") and "\n" not in msg
    assert "carries credentials" in msg and "ANOMALYD_INFLUXDB_USERNAME" in msg
    assert "ANOMALYD_INFLUXDB_PASSWORD" in msg and "ANOMALYD_INFLUXDB_TOKEN" in msg
    assert SECRET not in msg and "admin" not in msg and "***@db" in msg
    # the same through the environment variable, which is named
    env_problems = problems_of(minimal(), env={"ANOMALYD_INFLUXDB_URL": url})
    assert SECRET not in "\n".join(env_problems) and "ANOMALYD_INFLUXDB_URL" in env_problems[0]


def test_redact_url() -> None:
    from anomalyd.config import redact_url

    assert redact_url(f"http://a:{SECRET}@h:1/p?q=1") == "http://***@h:1/p?q=1"
    assert redact_url("http://[::1]:8086") == "http://[::1]:8086"
    assert SECRET not in redact_url(f"http://a:{SECRET}@[bad")


def test_good_urls_and_ports_pass() -> None:
    for url, listen in (("http://db:1", "[::1]:65535"), ("https://[::1]:8086/influx", "0.0.0.0:9108"),
                        ("http://db", "localhost:1")):
        cfg = from_dict(set_path(set_path(minimal(), "influxdb.url", url), "daemon.health_listen", listen), env={})
        assert cfg.influxdb.url == url.rstrip("/") and cfg.daemon.health_listen == listen


def test_deadman_and_rescore_horizon() -> None:
    cfg = from_dict(minimal(), env={})
    assert cfg.alerts.deadman_s == 600.0 and cfg.daemon.rescore_horizon_s == 3600.0
    raw = set_path(set_path(minimal(), "alerts.deadman", "90s"), "daemon.rescore_horizon", "0s")
    cfg = from_dict(raw, env={})
    assert cfg.alerts.deadman_s == 90.0 and cfg.daemon.rescore_horizon_s == 0.0
    cfg = from_dict(minimal(), env={"ANOMALYD_ALERTS_DEADMAN": "0s", "ANOMALYD_DAEMON_RESCORE_HORIZON": "2h"})
    assert cfg.alerts.deadman_s == 0.0 and cfg.daemon.rescore_horizon_s == 7200.0
    (msg,) = problems_of(minimal(), env={"ANOMALYD_ALERTS_DEADMAN": "10"})
    assert msg.startswith("alerts.deadman: '10'") and "ANOMALYD_ALERTS_DEADMAN" in msg


def test_a_shipped_config_uses_no_bare_number_for_a_duration() -> None:
    for path in (ROOT / "config.toml", *sorted((ROOT / "examples").glob("*/config.toml"))):
        load(path, env={})  # a bare number would be refused


# -- the declared sections (pydantic dataclasses) ---------------------------------------------------------------


def test_several_fields_are_named_and_their_problems_name_the_field() -> None:
    raw = minimal()
    sig = raw["signals"][0]
    del sig["field"]
    sig["fields"] = ["a", {"field": "b", "where": {"cpu": "x"}, "transform": "non_negative_derivative"},
                     {"field": "c", "name": "cc"}]
    got = from_dict(raw, env={}).signal("cpu")
    assert got.field_names == ("a", "b", "cc") and got.multi and (got.measurement, got.field) == ("m", "a")
    assert got.fields[1] == FieldSpec("b", "m", "b", (("cpu", "x"),), "non_negative_derivative")
    del sig["measurement"]
    sig["fields"] = [{"measurement": "cpu", "field": "u"}, {"measurement": "net", "field": "r"}]
    assert from_dict(raw, env={}).signal("cpu").field_names == ("cpu.u", "net.r")  # several measurements
    sig["fields"] = ["a", {"measurement": "n"}, 5, {"field": "b", "measurement": "n", "transform": "rate"}]
    by_key = {p.split(": ", 1)[0]: p for p in problems_of(raw)}
    assert set(by_key) == {f"signals[0].fields[{j}]{k}" for j, k in
                           ((0, ".measurement"), (1, ".field"), (2, ""), (3, ".transform"))}
    assert "here or as the signal's measurement" in by_key["signals[0].fields[0].measurement"]
    assert "must be a field name or a table" in by_key["signals[0].fields[2]"]
    sig["fields"] = [{"measurement": "m", "field": "a"}, {"measurement": "m", "field": "a"}]
    assert problems_of(raw) == ["signals[0].fields[1]: name 'a' is used twice; give one of them a name = \"...\""]


def test_a_file_uses_keys_and_python_uses_attributes() -> None:
    # The file's key is `interval`, the attribute `interval_s`: a file cannot use the attribute's name.
    (msg,) = problems_of(set_path(minimal(), "daemon.interval_s", "5s"))
    assert msg.startswith("daemon.interval_s: unknown setting; accepted: ") and " interval," in msg
    # Python builds a section by attribute, in the attribute's unit; `dataclasses.replace` checks the value too.
    daemon = DaemonConfig(interval_s=5, lateness_ns=10**9)
    assert (daemon.interval_s, daemon.lateness_ns, daemon.health_listen) == (5.0, 10**9, "127.0.0.1:9108")
    assert replace(daemon, max_backlog_windows=7).max_backlog_windows == 7
    with pytest.raises(ValidationError, match="must be greater than 0"):
        replace(daemon, max_backlog_windows=0)
    with pytest.raises(FrozenInstanceError):
        daemon.interval_s = 1.0  # type: ignore[misc]
    # The class attributes are the defaults (evaluate reads AlertsConfig's).
    assert (AlertsConfig.for_windows, AlertsConfig.recover_windows, DaemonConfig.interval_s) == (1, 32, 16.0)
    # A single-field signal's one field follows `replace(sig, field=...)`.
    sig = replace(from_dict(minimal(), env={}).signal("cpu"), field="g")
    assert sig.fields == (FieldSpec("g", "m", "g"),)
