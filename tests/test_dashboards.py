"""The Grafana and Chronograf dashboards: well-formed, and every query proven against a real InfluxDB.

Each query is rendered the way the tool renders it (Grafana: ``$timeFilter``, ``$__interval`` and the ``$signal`` /
``$series`` variables; Chronograf: ``:dashboardTime:``, ``:upperDashboardTime:``, ``:interval:`` and the
``:signal:`` / ``:series:`` templates, with Chronograf's quoting rules), sent to a real ``influxd`` holding
anomalyd's output, and must parse and return rows. The anomalous-window queries (the Grafana annotation, the
Chronograf table) must return exactly the anomalous windows, "series anomalous now" exactly the series whose
latest window is anomalous, and "anomalous windows per series" exactly their counts; the expected sets are
computed in Python from the raw points, not from the query under test. "Anomalous" is the detector's decision,
the ``anomalous`` field: the hand-made output holds windows whose max_error passes the threshold while the
detector calls them normal, and anomalous windows below the threshold, so a panel deciding on max_error vs
threshold fails.

The attribution panels (issue 10; docs/multivariate.md) read a multi-field signal: the share of each field per
window (``anomaly_attribution``, ``GROUP BY "field"``) must give one series per field with exactly the raw shares'
means per time bucket, and the table of the latest anomalous windows exactly their ``top_fields``, ``top_field`` and
``direction``, newest first, computed here from ``SELECT *`` of the raw points.

Every test runs twice, on the fixtures named in ``DATA_FIXTURES``: a private influxd holding points of anomalyd's
output schema written as line protocol (two series with anomalous and missing-data windows, a second signal on the
same patient, the daemon's stats, a multi-field signal with its attribution points, and windows written before
and after anomalyd wrote the attribution fields), and the session's real demo run (``demo_db`` in conftest.py:
feed, train, one live tick).
"""

from __future__ import annotations

import json
import math
import os
import re
import shutil
import socket
import subprocess
import time
import tomllib
from collections.abc import Iterator
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import requests
import yaml

from anomalyd.service.catalog import model_id_for

ROOT = Path(__file__).resolve().parents[1]
CONFIG = tomllib.loads((ROOT / "config.toml").read_text())
GRAFANA_JSON = ROOT / "grafana" / "dashboards" / "anomalyd.json"
GRAFANA_DATASOURCES = ROOT / "grafana" / "provisioning" / "datasources"
CHRONOGRAF_JSON = ROOT / "chronograf" / "anomalyd.dashboard"

OUT = CONFIG.get("output", {})
MEASUREMENT = OUT.get("measurement", "anomaly_error")
RECON_MEASUREMENT = OUT.get("reconstruction_measurement", "anomaly_reconstruction")
STATS_MEASUREMENT = OUT.get("stats_measurement", "anomalyd_stats")
ATTR_MEASUREMENT = OUT.get("attribution_measurement") or "anomaly_attribution"
DATABASE = CONFIG["influxdb"]["database"]
SIGNAL = CONFIG["signals"][0]["name"]
GROUP_TAG = CONFIG["signals"][0]["group_by"][0]


def load_grafana() -> dict[str, Any]:
    return dict(json.loads(GRAFANA_JSON.read_text()))


def load_chronograf() -> dict[str, Any]:
    return dict(json.loads(CHRONOGRAF_JSON.read_text()))


# --------------------------------------------------------------------------------------------------------------
# A real InfluxDB holding anomalyd output
# --------------------------------------------------------------------------------------------------------------
@dataclass
class OutputDB:
    """Where the output lives; ``query`` returns the result's series (a list of dicts), failing on any error."""

    url: str
    database: str
    origin: str = ""  # the fixture it comes from

    def query(self, q: str) -> list[dict[str, Any]]:
        try:
            r = requests.get(f"{self.url}/query", params={"db": self.database, "q": q, "epoch": "ms"}, timeout=30)
        except requests.RequestException as exc:
            pytest.fail(f"InfluxDB at {self.url} did not answer: {exc}\nquery: {q}")
        if r.status_code != 200:
            pytest.fail(f"InfluxDB rejected the query (HTTP {r.status_code}): {r.text.strip()}\nquery: {q}")
        results = r.json().get("results", [])
        if len(results) != 1:
            pytest.fail(f"expected one statement result, got {len(results)}\nquery: {q}")
        if "error" in results[0]:
            pytest.fail(f"InfluxDB error: {results[0]['error']}\nquery: {q}")
        return list(results[0].get("series", []))

    def rows(self, q: str) -> list[dict[str, Any]]:
        """Every row as a dict of its columns plus its series' group-by tags."""
        out = []
        for s in self.query(q):
            for values in s["values"]:
                row = dict(s.get("tags") or {})
                row.update(zip(s["columns"], values, strict=True))
                out.append(row)
        return out


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def _start_influxd(root: Path) -> tuple[subprocess.Popen[bytes], str]:
    binary = shutil.which("influxd") or ("/usr/bin/influxd" if Path("/usr/bin/influxd").exists() else None)
    if binary is None:
        pytest.fail("influxd (InfluxDB 1.x) is not installed, and the dashboard queries must run against a real "
                    "InfluxDB: install it with `apt-get install -y influxdb` (.ci/run does)")
    port, rpc = _free_port(), _free_port()
    env = dict(os.environ, INFLUXDB_META_DIR=str(root / "meta"), INFLUXDB_DATA_DIR=str(root / "data"),
               INFLUXDB_DATA_WAL_DIR=str(root / "wal"), INFLUXDB_HTTP_BIND_ADDRESS=f"127.0.0.1:{port}",
               INFLUXDB_BIND_ADDRESS=f"127.0.0.1:{rpc}", INFLUXDB_REPORTING_DISABLED="true",
               INFLUXDB_HTTP_LOG_ENABLED="false", INFLUXDB_DATA_QUERY_LOG_ENABLED="false",
               INFLUXDB_MONITOR_STORE_ENABLED="false", INFLUXDB_LOGGING_LEVEL="warn")
    log = open(root / "influxd.log", "wb")
    proc = subprocess.Popen([binary], env=env, stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
    log.close()
    url = f"http://127.0.0.1:{port}"
    deadline = time.monotonic() + 30
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            pytest.fail(f"influxd exited with code {proc.returncode}: {(root / 'influxd.log').read_text()[-2000:]}")
        try:
            if requests.get(f"{url}/ping", timeout=1).status_code == 204:
                return proc, url
        except requests.RequestException:
            pass
        time.sleep(0.1)
    proc.terminate()
    pytest.fail(f"influxd did not answer on {url} within 30 s: {(root / 'influxd.log').read_text()[-2000:]}")


def _stop(proc: subprocess.Popen[bytes]) -> None:
    if proc.poll() is None:
        proc.terminate()
        try:
            proc.wait(15)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait(5)


# The synthetic demo run: what the daemon writes for two signals, on a fixed clock (2024-01-01T00:00:00Z).
T0_MS = 1_704_067_200_000
STEP_MS = 16_000  # one window every slide x period = 16 x 1 s
N_WINDOWS = 90
THRESHOLD = 12.63


@dataclass
class FakeSeries:
    signal: str
    tags: tuple[tuple[str, str], ...]
    anomalous: set[int]  # the detector's decision (the anomalous field)
    missing: dict[int, int]  # window index -> missing samples
    offset_ms: int = 0
    windows: list[int] = field(default_factory=lambda: list(range(N_WINDOWS)))
    loud: set[int] = field(default_factory=set)  # normal windows whose max_error passes the threshold
    quiet: set[int] = field(default_factory=set)  # anomalous windows whose max_error stays below it

    @property
    def key(self) -> str:
        return ",".join(f"{k}={v}" for k, v in sorted(self.tags))


FAKE = [
    # p1's latest window passes its threshold but is normal: p1 is not "anomalous now" at the end of the output.
    FakeSeries(SIGNAL, ((GROUP_TAG, "p1"),), anomalous={20, 21, 55}, missing={70: 9}, loud={30, 31, N_WINDOWS - 1},
               quiet={55}),
    FakeSeries(SIGNAL, ((GROUP_TAG, "p2"),), anomalous={40, N_WINDOWS - 1}, missing={10: 32, 11: 17}, loud={60},
               quiet={40}),
    # A second signal on the same patient (same series key), written last: its anomalies must never show up on
    # the first signal's panels, nor make p1 look "anomalous now".
    FakeSeries("resp", ((GROUP_TAG, "p1"),), anomalous={6, 34, N_WINDOWS - 1}, missing={}, offset_ms=4_000,
               windows=[*range(0, N_WINDOWS - 1, 2), N_WINDOWS - 1]),
]


def _esc(v: str) -> str:
    return v.replace("\\", "\\\\").replace(",", "\\,").replace("=", "\\=").replace(" ", "\\ ")


def _multi_signal_spec() -> tuple[str, str, list[str]]:
    """config.toml's first multi-field signal: its name, its first group_by tag and its field names as the output
    names them (docs/multivariate.md: ``name``, else ``field`` when every field comes from one measurement, else
    ``measurement.field``); a stand-in when config.toml has none."""
    for sig in CONFIG["signals"]:
        fields = sig.get("fields") or []
        if len(fields) > 1:
            entries = [f if isinstance(f, dict) else {"field": f} for f in fields]
            one = len({e.get("measurement", sig.get("measurement")) for e in entries}) == 1
            names = [e.get("name") or (e["field"] if one else f"{e['measurement']}.{e['field']}") for e in entries]
            return str(sig["name"]), str((sig.get("group_by") or ["host"])[0]), names
    return "host", "host", ["cpu.usage_user", "mem.used_percent", "net.bytes_recv"]


MULTI_SIGNAL, MULTI_TAG, MULTI_FIELDS = _multi_signal_spec()
#: The single-field signals' field name (their top_field).
SINGLE_FIELD = CONFIG["signals"][0].get("field", "value")
#: The multi-field signal's series: window index -> what happens in it. Anomalous windows are explained by field
#: ``k % n_fields``; "gap" windows miss their last field (no attribution point for it, shares over the others);
#: "missing" windows are missing-data windows (no attribution at all).
MULTI = {"h1": {"anomalous": {12, 13, 30}, "gap": {20}, "missing": {5}},
         "h2": {"anomalous": {25, 39}, "gap": {25}, "missing": set()}}
N_MULTI = 40
MULTI_OFFSET_MS = 8_000
#: Since this window index, the single-field signals' points carry top_field and direction (anomalyd upgraded);
#: the earlier ones were written before it wrote them.
UPGRADE_AT = N_WINDOWS // 2
#: (time ms, series) -> top_fields of each scored window of the multi-field signal, as written.
MULTI_TOP: dict[tuple[int, str], str] = {}


def _line_str(v: str) -> str:
    return '"' + v.replace("\\", "\\\\").replace('"', '\\"') + '"'


def _multivariate_lines() -> list[str]:
    """The output of a multi-field signal: window points with top_field, direction, top_share and top_fields, and
    one attribution point per present field (share, error, direction +1/-1, value), tagged with "field"."""
    lines = []
    n = len(MULTI_FIELDS)
    for host, spec in MULTI.items():
        gtags = ((MULTI_TAG, host),)
        key = ",".join(f"{k}={v}" for k, v in gtags)
        tags = {"signal": MULTI_SIGNAL, "series": key, "model": model_id_for(MULTI_SIGNAL, gtags, "series"),
                MULTI_TAG: host}
        tagstr = ",".join(f"{_esc(k)}={_esc(v)}" for k, v in sorted(tags.items()))
        for k in range(N_MULTI):
            end = T0_MS + MULTI_OFFSET_MS + k * STEP_MS
            if k in spec["missing"]:
                lines.append(f"{MEASUREMENT},{tagstr} threshold=1.0,anomalous=false,missing=true,n_missing=90i "
                             f"{end * 1_000_000}")
                continue
            present = MULTI_FIELDS[:-1] if k in spec["gap"] else MULTI_FIELDS
            errors = {f: round(0.2 + 0.1 * abs(math.sin(k + 3 * j)), 4) for j, f in enumerate(present)}
            directions = {f: 1.0 if math.sin(k * 7 + j) >= 0 else -1.0 for j, f in enumerate(present)}
            anomalous = k in spec["anomalous"]
            if anomalous:
                errors[present[k % len(present)]] = 3.0 + k / 100
            total = sum(errors.values())
            shares = {f: e / total for f, e in errors.items()}
            ranked = sorted(present, key=lambda f: -shares[f])
            word = {1.0: "up", -1.0: "down"}
            top = ", ".join(f"{f} {word[directions[f]]} {round(100 * shares[f])}%" for f in ranked[:3])
            MULTI_TOP[(end, key)] = top
            fields = (f"max_error={max(errors.values())},threshold=1.0,anomalous={str(anomalous).lower()},"
                      f"score={1.0 if anomalous else 0.2},missing=false,n_missing={0 if len(present) == n else 10}i,"
                      f"top_field={_line_str(ranked[0])},direction={_line_str(word[directions[ranked[0]]])},"
                      f"top_share={shares[ranked[0]]},top_fields={_line_str(top)}")
            lines.append(f"{MEASUREMENT},{tagstr} {fields} {end * 1_000_000}")
            for j, f in enumerate(present):
                lines.append(f"{ATTR_MEASUREMENT},{tagstr},field={_esc(f)} share={shares[f]},error={errors[f]},"
                             f"direction={directions[f]},value={50.0 + 10 * j + k} {end * 1_000_000}")
    return lines


def _output_lines() -> str:
    """Line protocol for the three measurements, exactly as the worker writes them (tags, field names and types)."""
    lines = []
    for s in FAKE:
        tags = {"signal": s.signal, "series": s.key, "model": model_id_for(s.signal, s.tags, "series"), **dict(s.tags)}
        tagstr = ",".join(f"{_esc(k)}={_esc(v)}" for k, v in sorted(tags.items()))
        for k in s.windows:
            end = T0_MS + s.offset_ms + k * STEP_MS
            if k in s.missing:
                fields = f"threshold={THRESHOLD},anomalous=false,missing=true,n_missing={s.missing[k]}i"
            else:
                assert not (s.loud & s.anomalous) and s.quiet <= s.anomalous
                if k in s.anomalous:
                    err, score = THRESHOLD * (0.9 if k in s.quiet else 2.5), (0.8 if k in s.quiet else 1.0)
                elif k in s.loud:
                    err, score = THRESHOLD * 1.8, 0.3
                else:
                    err, score = THRESHOLD * (0.3 + 0.4 * abs(math.sin(k))), round(0.2 + 0.7 * abs(math.sin(k)), 3)
                anom = "true" if k in s.anomalous else "false"
                fields = (f"max_error={err:.4f},threshold={THRESHOLD},anomalous={anom},score={score},"
                          "missing=false,n_missing=0i")
                if k >= UPGRADE_AT:  # the attribution of a single-field signal: its field, and a direction
                    fields += f',top_field={_line_str(SINGLE_FIELD)},direction="{"up" if k % 3 else "down"}"'
            lines.append(f"{MEASUREMENT},{tagstr} {fields} {end * 1_000_000}")
            if k not in s.missing:  # the first `slide` samples of each scored window
                for j in range(16):
                    t = end - (31 - j) * 1000
                    v = 50 * math.sin(t / 7000) + (70 if k in s.anomalous and j == 8 else 0)
                    lines.append(f"{RECON_MEASUREMENT},{tagstr} value={v:.3f},reconstruction={0.95 * v:.3f} "
                                 f"{t * 1_000_000}")
    for signal in {s.signal for s in FAKE}:
        mine = [s for s in FAKE if s.signal == signal]
        for k in range(N_WINDOWS):
            tick = T0_MS + k * STEP_MS + 2_345  # ticks run at wall-clock times, a little after the window ends
            n_anom = sum(k in s.anomalous for s in mine)
            n_miss = sum(k in s.missing for s in mine)
            lines.append(f"{STATS_MEASUREMENT},signal={_esc(signal)} lag_seconds={18.3 + k % 3},"
                         f"windows={len(mine) - n_miss}i,anomalous={n_anom}i,missing={n_miss}i,"
                         f"tick_seconds=0.04{k % 10},untrained_series=0i {tick * 1_000_000}")
    return "\n".join(lines + _multivariate_lines())


#: The fixtures whose ``.url`` and ``.database`` hold the output the dashboards are proven on.
DATA_FIXTURES = ("private_output_db", "demo_db")


@pytest.fixture(scope="module", params=DATA_FIXTURES)
def output_db(request: pytest.FixtureRequest) -> OutputDB:
    """Both: the hand-made output (two signals, missing windows) and a real demo run's output."""
    data = request.getfixturevalue(request.param)
    return OutputDB(data.url, data.database, request.param)


@pytest.fixture(scope="module")
def private_output_db(tmp_path_factory: pytest.TempPathFactory) -> Iterator[OutputDB]:
    """A private influxd holding the synthetic output above, stopped after this module."""
    root = tmp_path_factory.mktemp("dashboards-influxd")
    proc, url = _start_influxd(root)
    try:
        db = OutputDB(url, DATABASE, "private_output_db")
        requests.post(f"{url}/query", params={"q": f'CREATE DATABASE "{DATABASE}"'}, timeout=10).raise_for_status()
        r = requests.post(f"{url}/write", params={"db": DATABASE, "precision": "ns"},
                          data=_output_lines().encode(), timeout=30)
        assert r.status_code == 204, f"writing the synthetic output failed: HTTP {r.status_code} {r.text}"
        yield db
    finally:
        _stop(proc)


# --------------------------------------------------------------------------------------------------------------
# Ground truth from the raw points, and the time ranges a user would look at
# --------------------------------------------------------------------------------------------------------------
@dataclass
class Truth:
    windows: list[dict[str, Any]]  # every anomaly_error point: time, signal, series, anomalous, missing, n_missing
    signal: str
    series: str  # the series the dashboards are looked at for
    lo: int  # full range of the output, ms
    hi: int
    multi: str | None = None  # a signal with attribution points (a multi-field signal), if the output holds one
    multi_series: str = ""  # the series of it the attribution panels are looked at for

    def of(self, signal: str, series: set[str] | None = None, lo: int | None = None,
           hi: int | None = None) -> list[dict[str, Any]]:
        lo = self.lo if lo is None else lo
        hi = self.hi if hi is None else hi
        return [w for w in self.windows if w["signal"] == signal and lo <= w["time"] <= hi
                and (series is None or w["series"] in series)]

    def all_series(self, signal: str) -> set[str]:
        return {w["series"] for w in self.windows if w["signal"] == signal}

    def view(self, query: str) -> tuple[int, int]:
        """The time range a query is looked at over: the whole output, except "series anomalous now", which is
        looked at while an anomaly is current (the range ends at the latest anomalous window of the signal)."""
        if 'last("anomalous")' in query:
            hi = max(w["time"] for w in self.of(self.signal) if w["anomalous"])
            return hi - 3600_000, hi
        return self.lo, self.hi

    def anomalous_counts(self, signal: str, lo: int, hi: int) -> dict[str, int]:
        counts: dict[str, int] = {}
        for w in self.of(signal, lo=lo, hi=hi):
            if w["anomalous"]:
                counts[w["series"]] = counts.get(w["series"], 0) + 1
        return counts

    def anomalous_now(self, signal: str, lo: int, hi: int) -> set[str]:
        last: dict[str, dict[str, Any]] = {}
        for w in sorted(self.of(signal, lo=lo, hi=hi), key=lambda w: w["time"]):
            last[w["series"]] = w
        return {s for s, w in last.items() if w["anomalous"]}


@pytest.fixture(scope="module")
def truth(output_db: OutputDB) -> Truth:
    windows = output_db.rows(f'SELECT "anomalous", "missing", "n_missing", "threshold", "signal", "series" '
                             f'FROM "{MEASUREMENT}"')
    assert windows, f"no {MEASUREMENT} points in {output_db.database}: the demo run wrote nothing to look at"
    signals = {w["signal"] for w in windows}
    assert SIGNAL in signals, f"config.toml's first signal {SIGNAL!r} has no output (signals: {sorted(signals)})"
    anomalous = [w for w in windows if w["signal"] == SIGNAL and w["anomalous"]]
    assert anomalous, f"the demo output holds no anomalous window of {SIGNAL!r}; the annotation cannot be proven"
    stats = output_db.rows(f'SELECT "lag_seconds" FROM "{STATS_MEASUREMENT}"')
    assert stats, f"no {STATS_MEASUREMENT} points: the daemon's lag panel has nothing to show"
    times = [w["time"] for w in windows] + [s["time"] for s in stats]
    # Look at the series whose latest anomaly is the most recent, over the whole output.
    series = max(anomalous, key=lambda w: w["time"])["series"]
    # The multi-field signal the attribution panels are proven on: one that wrote attribution points (the private
    # output always holds one; the demo run does when config.toml has one), and its series whose latest anomaly is
    # the most recent (or its first series).
    multi = sorted(r["value"] for r in output_db.rows(f'SHOW TAG VALUES FROM "{ATTR_MEASUREMENT}" WITH KEY = "signal"'))
    assert multi or output_db.origin != "private_output_db", "the private output holds no attribution points"
    multi_signal = MULTI_SIGNAL if MULTI_SIGNAL in multi else (multi[0] if multi else None)
    multi_series = ""
    if multi_signal is not None:
        mine = sorted((w for w in windows if w["signal"] == multi_signal), key=lambda w: (w["anomalous"], w["time"]))
        assert mine, f"{multi_signal!r} wrote attribution points but no {MEASUREMENT} points"
        multi_series = mine[-1]["series"]
    # epoch=ms truncates: the daemon stamps its stats with the wall clock in ns, so end one ms later.
    return Truth(windows, SIGNAL, series, min(times), max(times) + 1, multi_signal, multi_series)


# --------------------------------------------------------------------------------------------------------------
# Rendering, the way each tool does it
# --------------------------------------------------------------------------------------------------------------
def _regex_escape(v: str) -> str:
    return re.sub(r"([\\/^$*+?.()|\[\]{}])", r"\\\1", v)


def grafana_render(q: str, lo: int, hi: int, variables: dict[str, list[str]]) -> str:
    """Grafana's InfluxQL interpolation: ``$timeFilter`` in epoch ms, ``$__interval`` for ~1000 points, and
    variables in regex position as an escaped value or an ``(a|b)`` alternation (multi-value / All)."""
    seconds = max(1, math.ceil((hi - lo) / 1000 / 1000))
    out = q.replace("$timeFilter", f"time >= {lo}ms and time <= {hi}ms").replace("$__interval", f"{seconds}s")
    for name in sorted(variables, key=len, reverse=True):
        values = [_regex_escape(v) for v in variables[name]]
        out = out.replace(f"${name}", values[0] if len(values) == 1 else f"({'|'.join(values)})")
    leftover = re.findall(r"\$(?!/)[\w{]+", out)
    assert not leftover, f"unreplaced Grafana variables {leftover} in: {out}"
    return out


def _rfc3339(ms: int) -> str:
    return "'" + datetime.fromtimestamp(ms / 1000, UTC).strftime("%Y-%m-%dT%H:%M:%S.%f")[:-3] + "Z'"


def chronograf_render(q: str, lo: int, hi: int, templates: list[dict[str, Any]], values: dict[str, str],
                      database: str) -> str:
    """Chronograf's rendering (ui/src/tempVars/utils/replace.ts): a custom time range as quoted RFC 3339 bounds,
    ``:interval:`` in ms, ``tagValue`` values single-quoted (bare inside a regex), ``influxql`` values verbatim."""
    out = q.replace(":dashboardTime:", _rfc3339(lo - 1)).replace(":upperDashboardTime:", _rfc3339(hi + 1))
    out = out.replace(":interval:", f"{max(1, (hi - lo) // 1000)}ms")
    for t in templates:
        name, value = t["tempVar"], values[t["tempVar"]]
        vtype = t["values"][0]["type"]
        if vtype in {"tagKey", "fieldKey", "measurement", "database", "tagValue", "timeStamp"}:
            out = re.sub(r"(=~|!~)\s*/([^/]*)/",
                         lambda m, n=name, v=value: f"{m.group(1)} /{m.group(2).replace(n, v)}/", out)
        if vtype in {"tagKey", "fieldKey", "measurement", "database"}:
            out = out.replace(name, f'"{value}"')
        elif vtype in {"tagValue", "timeStamp"}:
            out = out.replace(name, f"'{value}'")
        else:  # csv, constant, map, influxql (a custom meta query): verbatim
            out = out.replace(name, value)
    out = out.replace(f'"{DATABASE}"', f'"{database}"')
    leftover = re.findall(r":[A-Za-z]\w*:", out)
    assert not leftover, f"unreplaced Chronograf template variables {leftover} in: {out}"
    return out


def chronograf_template_query(t: dict[str, Any]) -> str:
    """templateInternalReplace: ``:database:``, ``:measurement:``, ``:tagKey:`` of a non-custom template."""
    q = t["query"]
    text = str(q["influxql"])
    if t["type"] != "influxql":
        text = (text.replace(":database:", f'"{q["db"]}"').replace(":measurement:", f'"{q["measurement"]}"')
                .replace(":tagKey:", f'"{q["tagKey"]}"'))
    return text


# --------------------------------------------------------------------------------------------------------------
# Static checks: structure, references, agreement with config.toml and the provisioning
# --------------------------------------------------------------------------------------------------------------
def _grafana_datasource_uid() -> str:
    uids = []
    for path in sorted(GRAFANA_DATASOURCES.glob("*.yaml")):
        for ds in yaml.safe_load(path.read_text()).get("datasources", []):
            if ds.get("type") == "influxdb":
                uids.append(ds["uid"])
    assert len(uids) == 1, f"expected one provisioned InfluxDB data source, found uids {uids}"
    return str(uids[0])


def _grafana_targets(dash: dict[str, Any]) -> list[tuple[str, dict[str, Any]]]:
    out = []
    for p in dash["panels"]:
        for t in p.get("targets", []):
            out.append((p["title"], t))
    return out


def test_grafana_dashboard_structure_and_references() -> None:
    dash = load_grafana()
    uid = _grafana_datasource_uid()
    # alerts link here: the uid and the variable names must be the ones config.toml's dashboard_url uses.
    url = CONFIG["alerts"]["dashboard_url"]
    assert f"/d/{dash['uid']}/" in url, f"alerts.dashboard_url {url} does not open dashboard uid {dash['uid']}"
    names = [v["name"] for v in dash["templating"]["list"]]
    assert names == ["signal", "series"], names
    for name in names:
        assert f"var-{name}=" in url, f"alerts.dashboard_url does not set variable {name}: {url}"
    refs = [v["datasource"] for v in dash["templating"]["list"]]
    refs += [p["datasource"] for p in dash["panels"]]
    refs += [t["datasource"] for _, t in _grafana_targets(dash)]
    refs += [a["datasource"] for a in dash["annotations"]["list"] if not a.get("builtIn")]
    for ref in refs:
        assert ref == {"type": "influxdb", "uid": uid}, f"data source reference {ref} is not the provisioned {uid}"
    ids = [p["id"] for p in dash["panels"]]
    assert len(ids) == len(set(ids)), f"duplicate panel ids {ids}"
    for p in dash["panels"]:
        g = p["gridPos"]
        assert 0 <= g["x"] and g["x"] + g["w"] <= 24 and g["h"] > 0, f"panel {p['title']!r} is off the grid: {g}"
        for t in p["targets"]:
            assert t.get("rawQuery") is True and t.get("query"), f"panel {p['title']!r} has a non-raw query"
    # The panels the issue asks for, recognised by what they select.
    queries = [t["query"] for _, t in _grafana_targets(dash)]

    def has(*parts: str) -> bool:
        return any(all(part in q for part in parts) for q in queries)

    assert has(f'FROM "{RECON_MEASUREMENT}"', '"value"', '"reconstruction"'), "no signal + reconstruction panel"
    assert has(f'FROM "{MEASUREMENT}"', '"max_error"', '"threshold"', "GROUP BY time"), "no max_error panel"
    assert has('"n_missing"'), "no missing-data panel"
    assert has('last("anomalous")', '"anomalous" = true'), "no 'series anomalous now' table"
    assert has(f'FROM "{MEASUREMENT}"', 'count("anomalous")', '"anomalous" = true', 'GROUP BY "series"'), (
        "no count of anomalous windows per series")
    assert has(f'FROM "{STATS_MEASUREMENT}"', '"lag_seconds"'), "no daemon lag panel"
    assert has(f'FROM "{MEASUREMENT}"', 'max("score")', "GROUP BY time"), "no score panel"
    assert has(f'FROM "{ATTR_MEASUREMENT}"', '"share"', "GROUP BY time", '"field"'), "no attribution share panel"
    assert has(f'FROM "{MEASUREMENT}"', '"top_fields"', '"top_field"', '"direction"', '"max_error"', '"score"',
               '"anomalous" = true', "ORDER BY time DESC LIMIT"), "no table of the anomalous windows' top fields"
    share = next(p for p in dash["panels"] if any(_reads_attribution(t["query"]) for t in p["targets"]))
    assert [t["alias"] for t in share["targets"]] == ["$tag_field"], "the share lines are not named by field"
    assert share["fieldConfig"]["defaults"]["unit"] == "percentunit"
    error_panel = next(p for p in dash["panels"] if any('"threshold"' in t["query"] and "GROUP BY time" in t["query"]
                                                        for t in p["targets"]))
    styled = [o for o in error_panel["fieldConfig"]["overrides"] if "threshold" in o["matcher"]["options"]]
    assert styled, "the threshold is not drawn as its own (dashed) line"
    annotations = [a for a in dash["annotations"]["list"] if not a.get("builtIn")]
    assert len(annotations) == 1 and annotations[0]["enable"], annotations
    a = annotations[0]
    assert a["target"]["query"] == a["query"], "legacy and current annotation queries differ"
    assert '"anomalous" = true' in a["query"] and a["target"]["tagsColumn"] == "series"
    assert re.search(r'SELECT .*"series"', a["query"]), "the annotation's tagsColumn is not selected"
    for what, q in _grafana_all_queries(dash):
        assert not _decides_on_error(q), f"{what} decides on max_error/threshold, not on the anomalous field: {q}"
        assert not _unquoted_field(q), f"{what} uses the keyword field unquoted (InfluxQL refuses it): {q}"


def _unquoted_field(q: str) -> bool:
    """Whether a query names the attribution tag ``field`` without double quotes: ``field`` is an InfluxQL keyword,
    and ``GROUP BY field`` is a parse error."""
    return re.search(r'(?<!["\w])field(?!["\w])', q, re.I) is not None


def _decides_on_error(q: str) -> bool:
    """Whether a query's conditions compare max_error, threshold or the score: the detector's decision is the
    anomalous field, and max_error vs threshold no longer makes a window anomalous."""
    conditions = " ".join(part.split(" GROUP BY ")[0] for part in q.split(" WHERE ")[1:])
    return re.search(r'"(max_error|threshold|score)"\s*(?:[<>]=?|!?=)', conditions) is not None


# Go JSON field names of chronograf.Dashboard / DashboardCell / DashboardQuery / QueryConfig / Template:
# unknown keys are silently dropped by the server, so a typo would lose data without an error.
_CHRONO_KEYS = {
    "dashboard": {"id", "cells", "templates", "name", "organization"},
    "cell": {"i", "x", "y", "w", "h", "name", "queries", "axes", "type", "colors", "legend", "tableOptions",
             "fieldOptions", "timeFormat", "decimalPlaces", "note", "noteVisibility"},
    "query": {"query", "label", "range", "queryConfig", "source", "type"},
    "queryConfig": {"id", "database", "measurement", "retentionPolicy", "fields", "tags", "groupBy",
                    "areTagsAccepted", "fill", "rawText", "range", "shifts"},
    "template": {"tempVar", "values", "id", "type", "label", "query", "sourceID"},
    "templateQuery": {"influxql", "flux", "db", "rp", "measurement", "tagKey", "fieldKey"},
}


def test_chronograf_dashboard_is_valid_for_the_server() -> None:
    """A port of Chronograf's own checks (server/dashboards.go, cells.go, templates.go, queryconfig.go) for
    POST /chronograf/v1/dashboards, plus the resources-path loader (filestore/dashboards.go)."""
    assert CHRONOGRAF_JSON.suffix == ".dashboard", "the resources path only loads *.dashboard files"
    d = load_chronograf()
    assert set(d) <= _CHRONO_KEYS["dashboard"], set(d) - _CHRONO_KEYS["dashboard"]
    assert d["name"], "a dashboard file without a name is taken for an export wrapper"
    assert isinstance(d["id"], int) and d["id"] < 0, "file dashboards should use a negative id (no clash with UI ones)"
    assert d["organization"] == "default", "file dashboards show only in the organization they name"
    cell_ids = [c["i"] for c in d["cells"]]
    assert len(cell_ids) == len(set(cell_ids)), cell_ids
    for c in d["cells"]:
        assert set(c) <= _CHRONO_KEYS["cell"], set(c) - _CHRONO_KEYS["cell"]
        assert c["x"] >= 0 and c["w"] >= 1 and c["h"] >= 1 and c["x"] + c["w"] <= 12, (c["name"], c["x"], c["w"])
        assert c["type"] in {"line", "line-plus-single-stat", "line-stacked", "line-stepplot", "bar", "table",
                             "single-stat", "gauge"}, c["type"]
        for label, axis in c["axes"].items():
            assert label in {"x", "y", "y2"} and axis["scale"] in {"linear", "log", ""} and \
                axis["base"] in {"10", "2", ""}, (c["name"], label, axis)
        for color in c["colors"]:
            assert color["type"] in {"max", "min", "threshold", "text", "background", "scale"} and \
                re.fullmatch(r"#[0-9A-Fa-f]{6}", color["hex"]), color
        legend = c.get("legend") or {}
        assert not legend or (legend.get("type") == "static" and legend.get("orientation") in
                              {"top", "bottom", "right", "left"}), legend
        assert c["noteVisibility"] in {"default", "showWhenNoData"}
        assert c["queries"], f"cell {c['name']!r} has no query"
        for q in c["queries"]:
            assert set(q) <= _CHRONO_KEYS["query"] and set(q["queryConfig"]) <= _CHRONO_KEYS["queryConfig"]
            assert q["type"] == "influxql" and q["queryConfig"]["rawText"] == q["query"], c["name"]
            for fld in q["queryConfig"]["fields"]:
                assert fld["type"] in {"func", "field", "integer", "number", "regex", "wildcard"}
    names = [t["tempVar"] for t in d["templates"]]
    assert names == [":signal:", ":series:"], names
    for t in d["templates"]:
        assert set(t) <= _CHRONO_KEYS["template"] and set(t["query"]) <= _CHRONO_KEYS["templateQuery"]
        assert t["type"] in {"constant", "csv", "fieldKeys", "tagKeys", "tagValues", "measurements", "databases",
                             "map", "influxql", "text", "flux"}, t["type"]
        assert [v for v in t["values"] if v["selected"]], f"template {t['tempVar']} has no default selection"
        for v in t["values"]:
            assert v["type"] in {"csv", "map", "fieldKey", "tagKey", "tagValue", "measurement", "database",
                                 "constant", "influxql", "flux"}, v["type"]
    # Defaults and names agree with config.toml and the demo, so the dashboard shows data out of the box.
    signal_t, series_t = d["templates"]
    assert signal_t["values"][0]["value"] == SIGNAL
    assert signal_t["query"]["db"] == DATABASE and signal_t["query"]["measurement"] == MEASUREMENT
    assert series_t["values"][0]["value"].startswith(f"{GROUP_TAG}="), series_t["values"][0]
    for c in d["cells"]:
        for q in c["queries"]:
            dbs = set(re.findall(r'FROM "([^"]+)"\."autogen"\."([^"]+)"', q["query"]))
            assert dbs, f"cell {c['name']!r} does not name its database: {q['query']}"
            for db, meas in dbs:
                assert db == DATABASE and meas in {MEASUREMENT, RECON_MEASUREMENT, STATS_MEASUREMENT,
                                                   ATTR_MEASUREMENT}, (db, meas)
    # The same core cells as the Grafana dashboard.
    text = " ".join(q["query"] for c in d["cells"] for q in c["queries"])
    for part in ('"reconstruction"', '"max_error"', '"threshold"', '"n_missing"', 'last("anomalous")',
                 '"anomalous" = true', '"lag_seconds"', 'count("anomalous")', 'mean("share")',
                 'GROUP BY time(:interval:), "field"', '"top_fields", "top_field", "direction"'):
        assert part in text, f"no Chronograf cell selects {part}"
    for what, q in _chronograf_queries(d):
        assert not _decides_on_error(q), f"{what} decides on max_error/threshold, not on the anomalous field: {q}"
        assert not _unquoted_field(q), f"{what} uses the keyword field unquoted (InfluxQL refuses it): {q}"


# --------------------------------------------------------------------------------------------------------------
# Every query against the real InfluxDB
# --------------------------------------------------------------------------------------------------------------
def _grafana_all_queries(dash: dict[str, Any]) -> list[tuple[str, str]]:
    out = [(f"panel {title!r}", t["query"]) for title, t in _grafana_targets(dash)]
    out += [(f"annotation {a['name']!r}", a["target"]["query"]) for a in dash["annotations"]["list"]
            if not a.get("builtIn")]
    out += [(f"variable ${v['name']}", v["query"]) for v in dash["templating"]["list"]]
    return out


def test_grafana_variables_list_the_signals_and_their_series(output_db: OutputDB, truth: Truth) -> None:
    dash = load_grafana()
    by_name = {v["name"]: v for v in dash["templating"]["list"]}
    lo, hi = truth.lo, truth.hi
    got = {r["value"] for r in output_db.rows(grafana_render(by_name["signal"]["query"], lo, hi, {}))}
    assert got == {w["signal"] for w in truth.windows}
    for signal in got:
        q = grafana_render(by_name["series"]["query"], lo, hi, {"signal": [signal]})
        series = {r["value"] for r in output_db.rows(q)}
        assert series == truth.all_series(signal), (signal, series)


def _reads_attribution(q: str) -> bool:
    return f'"{ATTR_MEASUREMENT}"' in q


def _looked_at(q: str, truth: Truth, output_db: OutputDB) -> tuple[str, str] | None:
    """The signal and series a query is looked at for: the multi-field signal for the attribution panels (which
    a single-field signal leaves empty). None when the output holds no multi-field signal: only the demo run may
    lack one (config.toml without one), and the query must then still parse (run here)."""
    if not _reads_attribution(q):
        return truth.signal, truth.series
    if truth.multi is None:
        assert output_db.origin == "demo_db"
        return None
    return truth.multi, truth.multi_series


def test_every_grafana_query_parses_and_returns_rows(output_db: OutputDB, truth: Truth) -> None:
    dash = load_grafana()
    for what, q in _grafana_all_queries(dash):
        looked = _looked_at(q, truth, output_db)
        if looked is None:
            output_db.query(grafana_render(q, *truth.view(q), {"signal": [truth.signal], "series": [truth.series]}))
            continue
        signal, series = looked
        rendered = grafana_render(q, *truth.view(q), {"signal": [signal], "series": [series]})
        assert output_db.query(rendered), f"{what} returned no rows over the demo output:\n{rendered}"
        # "All" series (the variable is multi-value with includeAll) renders as an alternation and works too.
        all_series = sorted(truth.all_series(signal))
        rendered = grafana_render(q, *truth.view(q), {"signal": [signal], "series": all_series})
        assert output_db.query(rendered), f"{what} returned no rows for All series:\n{rendered}"


def test_grafana_panels_show_the_right_numbers(output_db: OutputDB, truth: Truth) -> None:
    dash = load_grafana()
    variables = {"signal": [truth.signal], "series": [truth.series]}
    by_title = {title: t["query"] for title, t in _grafana_targets(dash)}
    # Missing-data windows: the bars above zero are exactly the missing-data windows (one bucket per window at
    # the windows' own spacing, which the panel's minimum interval allows).
    mine = truth.of(truth.signal, {truth.series})
    spacing = f"{min(np.diff(sorted({w['time'] for w in mine})))}ms"  # times are epoch ms
    q = next(q for q in by_title.values() if '"n_missing"' in q).replace("$__interval", spacing)
    rows = output_db.rows(grafana_render(q, truth.lo, truth.hi, variables))
    above = {r["time"] for r in rows if r["missing samples"] and r["missing samples"] > 0}
    expected = {w["time"] for w in truth.of(truth.signal, {truth.series}) if w["missing"]}
    assert above == expected
    # Window error: the threshold line is the learned threshold; max_error is present on scored windows only.
    q = next(q for q in by_title.values() if '"threshold"' in q and "GROUP BY time" in q).replace("$__interval",
                                                                                                   spacing)
    rows = output_db.rows(grafana_render(q, truth.lo, truth.hi, variables))
    scored = [w for w in truth.of(truth.signal, {truth.series}) if not w["missing"]]
    assert len([r for r in rows if r["max_error"] is not None]) == len(scored)
    assert {r["threshold"] for r in rows} == {w["threshold"] for w in truth.of(truth.signal, {truth.series})}


def test_grafana_annotation_marks_exactly_the_anomalous_windows(output_db: OutputDB, truth: Truth) -> None:
    dash = load_grafana()
    ann = next(a for a in dash["annotations"]["list"] if not a.get("builtIn"))
    for series in ([truth.series], sorted(truth.all_series(truth.signal))):
        q = grafana_render(ann["target"]["query"], truth.lo, truth.hi, {"signal": [truth.signal], "series": series})
        got = sorted((r["time"], r[ann["target"]["tagsColumn"]]) for r in output_db.rows(q))
        expected = sorted((w["time"], w["series"]) for w in truth.of(truth.signal, set(series)) if w["anomalous"])
        assert got == expected, f"annotation for series {series}: got {got}, expected {expected}"
        assert all(r[ann["target"]["textColumn"]] is not None for r in output_db.rows(q))


def _anomaly_ends(truth: Truth) -> list[int]:
    ends = sorted({w["time"] for w in truth.of(truth.signal) if w["anomalous"]})
    return [*ends[-20:], truth.hi]


def test_grafana_anomalous_now_table(output_db: OutputDB, truth: Truth) -> None:
    """At the end of every anomalous window (the dashboard looked at right then) and over the whole output."""
    q = next(t["query"] for _, t in _grafana_targets(load_grafana()) if 'last("anomalous")' in t["query"])
    hits = 0
    for hi in _anomaly_ends(truth):
        lo = hi - 3600_000
        rows = output_db.rows(grafana_render(q, lo, hi, {"signal": [truth.signal]}))
        got = {r["series"] for r in rows}
        assert got == truth.anomalous_now(truth.signal, lo, hi), f"range ending {hi}: {rows}"
        assert all(r["anomalous"] is True for r in rows)
        hits += bool(rows)
    assert hits, "the table never listed a series, even at the end of an anomalous window"


def test_grafana_anomalous_windows_per_series(output_db: OutputDB, truth: Truth) -> None:
    """The count per series over the whole output and while each of the latest anomalies is current."""
    q = next(t["query"] for _, t in _grafana_targets(load_grafana()) if 'count("anomalous")' in t["query"])
    for hi in _anomaly_ends(truth):
        for lo in (truth.lo, hi - 3600_000):
            rows = output_db.rows(grafana_render(q, lo, hi, {"signal": [truth.signal]}))
            got = {r["series"]: r["anomalous windows"] for r in rows}
            assert got == truth.anomalous_counts(truth.signal, lo, hi), f"range {lo}..{hi}: {rows}"
    assert truth.anomalous_counts(truth.signal, truth.lo, truth.hi)


def _chronograf_queries(d: dict[str, Any]) -> list[tuple[str, str]]:
    return [(f"cell {c['name']!r}", q["query"]) for c in d["cells"] for q in c["queries"]]


def test_chronograf_templates_resolve(output_db: OutputDB, truth: Truth) -> None:
    d = load_chronograf()
    signal_t, series_t = d["templates"]
    q = chronograf_template_query(signal_t).replace(f'"{DATABASE}"', f'"{output_db.database}"')
    assert {r["value"] for r in output_db.rows(q)} == {w["signal"] for w in truth.windows}
    # The series template depends on :signal: (rendered first, as Chronograf's dependency graph does).
    q = chronograf_render(chronograf_template_query(series_t), truth.lo, truth.hi, [signal_t],
                          {":signal:": truth.signal}, output_db.database)
    assert {r["value"] for r in output_db.rows(q)} == truth.all_series(truth.signal)


def test_every_chronograf_query_parses_and_returns_rows(output_db: OutputDB, truth: Truth) -> None:
    d = load_chronograf()
    for what, q in _chronograf_queries(d):
        looked = _looked_at(q, truth, output_db)
        values = {":signal:": truth.signal, ":series:": truth.series}
        if looked is not None:
            values = {":signal:": looked[0], ":series:": looked[1]}
        rendered = chronograf_render(q, *truth.view(q), d["templates"], values, output_db.database)
        rows = output_db.query(rendered)
        assert rows or looked is None, f"{what} returned no rows over the demo output:\n{rendered}"


def test_chronograf_anomalous_cells_are_exact(output_db: OutputDB, truth: Truth) -> None:
    d = load_chronograf()
    queries = dict(_chronograf_queries(d))
    values = {":signal:": truth.signal, ":series:": truth.series}
    table = next(q for q in queries.values() if '"anomalous" = true' in q and "last(" not in q and "count(" not in q
                 and "LIMIT" not in q)
    rows = output_db.rows(chronograf_render(table, truth.lo, truth.hi, d["templates"], values, output_db.database))
    assert sorted((r["time"], r["series"]) for r in rows) == sorted(
        (w["time"], w["series"]) for w in truth.of(truth.signal) if w["anomalous"])
    now = next(q for q in queries.values() if 'last("anomalous")' in q)
    hits = 0
    for hi in _anomaly_ends(truth):
        lo = hi - 3600_000
        rows = output_db.rows(chronograf_render(now, lo, hi, d["templates"], values, output_db.database))
        assert {r["series"] for r in rows} == truth.anomalous_now(truth.signal, lo, hi), f"range ending {hi}"
        hits += bool(rows)
    assert hits
    count = next(q for q in queries.values() if 'count("anomalous")' in q)
    for hi in _anomaly_ends(truth):
        for lo in (truth.lo, hi - 3600_000):
            rows = output_db.rows(chronograf_render(count, lo, hi, d["templates"], values, output_db.database))
            got = {r["series"]: r["anomalous windows"] for r in rows}
            assert got == truth.anomalous_counts(truth.signal, lo, hi), f"range {lo}..{hi}: {rows}"


# --------------------------------------------------------------------------------------------------------------
# The attribution panels (issue 10): which field explains a window of a multi-field signal
# --------------------------------------------------------------------------------------------------------------
TOP_COLUMNS = ("top_fields", "top_field", "direction", "max_error", "score")


def _raw_windows(output_db: OutputDB, signal: str) -> list[dict[str, Any]]:
    """Every point of a signal in the output measurement, every field and tag (SELECT *), not the query under test."""
    return output_db.rows(f"SELECT * FROM \"{MEASUREMENT}\" WHERE \"signal\" = '{signal}'")


def _spacing_ms(truth: Truth, signal: str, series: str) -> int:
    """The closest two windows of a series: time buckets that short hold one window each."""
    times = sorted({w["time"] for w in truth.of(signal, {series})})
    return int(min(np.diff(times))) if len(times) > 1 else 1000


def _expected_shares(output_db: OutputDB, signal: str, series: set[str], bucket_ms: int, lo: int,
                     hi: int) -> dict[str, dict[int, float]]:
    """field -> {bucket start: mean share}: from the raw attribution points, bucketed as GROUP BY time does
    (epoch-aligned buckets of the interval)."""
    raw = output_db.rows(f'SELECT "share", "field", "series" FROM "{ATTR_MEASUREMENT}" WHERE "signal" = \'{signal}\'')
    sums: dict[str, dict[int, list[float]]] = {}
    for r in raw:
        if r["series"] in series and lo <= r["time"] <= hi:
            sums.setdefault(r["field"], {}).setdefault(r["time"] // bucket_ms * bucket_ms, []).append(r["share"])
    return {f: {t: sum(v) / len(v) for t, v in buckets.items()} for f, buckets in sums.items()}


def _shares_by_field(result: list[dict[str, Any]]) -> dict[str, dict[int, float]]:
    out: dict[str, dict[int, float]] = {}
    for s in result:
        assert set(s.get("tags") or {}) == {"field"}, f"the share panel is not grouped by field alone: {s.get('tags')}"
        assert s["columns"] == ["time", "share"], s["columns"]
        assert s["tags"]["field"] not in out, f"field {s['tags']['field']} answered twice"
        out[s["tags"]["field"]] = {t: v for t, v in s["values"]}
    return out


def _assert_shares(got: dict[str, dict[int, float]], expected: dict[str, dict[int, float]], what: str) -> None:
    assert got.keys() == expected.keys(), f"{what}: fields {sorted(got)}, expected {sorted(expected)}"
    for f in expected:
        assert got[f].keys() == expected[f].keys(), f"{what}: field {f} has other time buckets than its windows"
        assert all(math.isclose(got[f][t], v, abs_tol=1e-9) for t, v in expected[f].items()), (what, f)


def test_grafana_attribution_share_has_one_series_per_field(output_db: OutputDB, truth: Truth) -> None:
    """The share panel: one series per field (GROUP BY "field"), each bucket the mean of the raw shares; at one
    window per bucket, the shares of a window sum to 1. A single-field signal has no attribution points."""
    q = next(t["query"] for _, t in _grafana_targets(load_grafana()) if _reads_attribution(t["query"]))
    assert not output_db.query(grafana_render(q, truth.lo, truth.hi, {"signal": [truth.signal],
                                                                       "series": [truth.series]}))
    if truth.multi is None:
        assert output_db.origin == "demo_db"  # the demo run of a config.toml without a multi-field signal
        return
    spacing = _spacing_ms(truth, truth.multi, truth.multi_series)
    q = q.replace("$__interval", f"{spacing}ms")
    for series in ([truth.multi_series], sorted(truth.all_series(truth.multi))):
        rendered = grafana_render(q, truth.lo, truth.hi, {"signal": [truth.multi], "series": series})
        got = _shares_by_field(output_db.query(rendered))
        expected = _expected_shares(output_db, truth.multi, set(series), spacing, truth.lo, truth.hi)
        _assert_shares(got, expected, f"series {series}")
        if output_db.origin == "private_output_db":
            assert sorted(got) == sorted(MULTI_FIELDS), "not one series per field of the signal"
        if len(series) == 1:
            for t in {t for buckets in got.values() for t in buckets}:
                # shares are written with 4 decimals
                assert math.isclose(sum(b[t] for b in got.values() if t in b), 1.0, abs_tol=5e-4), t


def _limit(q: str) -> int:
    m = re.search(r"ORDER BY time DESC LIMIT (\d+)$", q)
    assert m is not None, f"not the latest windows first: {q}"
    return int(m.group(1))


def _assert_top_table(rows: list[dict[str, Any]], raw: list[dict[str, Any]], series: set[str], limit: int,
                      what: str, required: bool = True) -> None:
    """The latest ``limit`` anomalous windows of ``series`` (from the raw points), newest first, with their
    attribution. Rows at the same time (several series) may come in any order. Not ``required``: the output may
    hold no anomalous window of the signal (the demo run's multi-field signal), and the table is then empty."""
    anomalous = [r for r in raw if r["anomalous"] is True and r["series"] in series]
    if not anomalous and not required:
        assert rows == [], what
        return
    assert anomalous, f"{what}: the output holds no anomalous window to list"
    assert len(rows) == min(limit, len(anomalous)), f"{what}: {len(rows)} rows for {len(anomalous)} windows"
    times = [r["time"] for r in rows]
    assert times == sorted(times, reverse=True), f"{what}: not newest first"
    by_key = {(r["time"], r["series"]): r for r in anomalous}
    for r in rows:
        assert (r["time"], r["series"]) in by_key, f"{what}: {r} is not an anomalous window of the series"
        want = by_key[(r["time"], r["series"])]
        assert {c: r[c] for c in TOP_COLUMNS} == {c: want.get(c) for c in TOP_COLUMNS}, what
    newer = {k for k in by_key if k[0] > times[-1]}
    assert newer <= {(r["time"], r["series"]) for r in rows}, f"{what}: a later anomalous window is left out"


def test_grafana_top_fields_table_lists_the_latest_anomalous_windows(output_db: OutputDB, truth: Truth) -> None:
    panel = next(p for p in load_grafana()["panels"] if any('"top_fields"' in t["query"] for t in p["targets"]))
    (target,) = panel["targets"]
    assert target["resultFormat"] == "table"
    limit = _limit(target["query"])
    looked = [(truth.signal, truth.series)] + ([(truth.multi, truth.multi_series)] if truth.multi else [])
    for signal, one in looked:
        raw = _raw_windows(output_db, signal)
        for series in ([one], sorted(truth.all_series(signal))):
            rendered = grafana_render(target["query"], truth.lo, truth.hi, {"signal": [signal], "series": series})
            rows = output_db.rows(rendered)
            _assert_top_table(rows, raw, set(series), limit, f"{signal} {series}",
                              signal == truth.signal or output_db.origin == "private_output_db")
            if output_db.origin == "private_output_db":
                _assert_private_attribution(signal, rows)


def _assert_private_attribution(signal: str, rows: list[dict[str, Any]]) -> None:
    """On the hand-made output, what was written: the multi-field signal's top_fields strings; the single-field
    signal's windows from before the upgrade without attribution, those after it with its field."""
    if signal == MULTI_SIGNAL:
        assert rows and all(r["top_fields"] == MULTI_TOP[(r["time"], r["series"])] for r in rows)
        assert all(r["top_field"] in MULTI_FIELDS and r["direction"] in {"up", "down"} for r in rows)
        assert all(r["top_fields"].startswith(f"{r['top_field']} {r['direction']} ") for r in rows)
    else:
        cut = T0_MS + UPGRADE_AT * STEP_MS
        assert {(r["top_field"], r["top_fields"]) for r in rows if r["time"] >= cut} == {(SINGLE_FIELD, None)}
        assert {(r["top_field"], r["direction"]) for r in rows if r["time"] < cut} == {(None, None)}


def test_private_output_has_old_and_new_single_field_windows_and_a_gap() -> None:
    """The hand-made output exercises what the attribution panels must survive: anomalous windows of the single-field
    signal on both sides of the upgrade, and a multi-field window missing one field (no share for it)."""
    first = FAKE[0]
    assert {k < UPGRADE_AT for k in first.anomalous} == {True, False}
    assert any(MULTI[h]["gap"] & MULTI[h]["anomalous"] for h in MULTI) and len(MULTI_FIELDS) >= 3


def test_chronograf_attribution_cells(output_db: OutputDB, truth: Truth) -> None:
    d = load_chronograf()
    queries = dict(_chronograf_queries(d))
    share = next(q for q in queries.values() if _reads_attribution(q))
    top = next(q for q in queries.values() if '"top_fields"' in q)
    limit = _limit(top)
    looked = [(truth.signal, truth.series)] + ([(truth.multi, truth.multi_series)] if truth.multi else [])
    for signal, series in looked:
        values = {":signal:": signal, ":series:": series}
        rows = output_db.rows(chronograf_render(top, truth.lo, truth.hi, d["templates"], values, output_db.database))
        _assert_top_table(rows, _raw_windows(output_db, signal), truth.all_series(signal), limit, f"{signal}",
                          signal == truth.signal or output_db.origin == "private_output_db")
        if output_db.origin == "private_output_db":
            _assert_private_attribution(signal, rows)
    rendered = chronograf_render(share, truth.lo, truth.hi, d["templates"],
                                 {":signal:": truth.signal, ":series:": truth.series}, output_db.database)
    assert not output_db.query(rendered), "a single-field signal has no attribution points"
    if truth.multi is None:
        assert output_db.origin == "demo_db"
        return
    spacing = _spacing_ms(truth, truth.multi, truth.multi_series)
    rendered = chronograf_render(share.replace(":interval:", f"{spacing}ms"), truth.lo, truth.hi, d["templates"],
                                 {":signal:": truth.multi, ":series:": truth.multi_series}, output_db.database)
    got = _shares_by_field(output_db.query(rendered))
    # Chronograf's range is exclusive at both ends, one ms beyond the output's
    _assert_shares(got, _expected_shares(output_db, truth.multi, {truth.multi_series}, spacing, truth.lo, truth.hi),
                   "Chronograf")
    if output_db.origin == "private_output_db":
        assert sorted(got) == sorted(MULTI_FIELDS)
