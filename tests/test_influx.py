"""The InfluxDB 1.x store against a real influxd: grouped reads, bound values, quoted identifiers, escaping, errors.

Injection attempts come from the config (``where`` values, measurement/field/tag names) and from the data (tag
values already in InfluxDB, read back and written again in the output points).
"""

from __future__ import annotations

import logging
import threading
from dataclasses import replace
from pathlib import Path

import numpy as np
import pytest

from anomalyd.catalog import Catalog, StoredModel, model_id_for, save
from anomalyd.config import Config, InfluxConfig
from anomalyd.detector import Detector, DetectorSpec
from anomalyd.influx import InfluxDB1Store, Point, Query, StoreError, line_protocol
from anomalyd.localinflux import LocalInfluxd, free_port
from anomalyd.records import parse_tags, tags_str
from anomalyd.state import Watermarks
from anomalyd.synthetic import ecg
from anomalyd.worker import Worker
from conftest import make_config
from http_stubs import Recorded, Reply, StubServer

S = 10**9
T0 = 1_700_000_000 * S


def lp_key(s: str) -> str:
    """Tag key/value or field key as InfluxDB 1.x parses them: only ',', '=' and ' ' are escaped."""
    assert not s.endswith("\\") and "\n" not in s, "not representable in 1.x line protocol"
    return s.replace(",", "\\,").replace("=", "\\=").replace(" ", "\\ ")


def lp_measurement(s: str) -> str:
    return s.replace(",", "\\,").replace(" ", "\\ ")


def raw_line(measurement: str, tags: dict[str, str], fld: str, value: float, t: int) -> str:
    """A line written the way another client (Telegraf, curl) puts data in: the data as it really is."""
    tag_part = "".join(f",{lp_key(k)}={lp_key(v)}" for k, v in sorted(tags.items()))
    return f"{lp_measurement(measurement)}{tag_part} {lp_key(fld)}={value!r} {t}"


def databases(influxd: LocalInfluxd) -> set[str]:
    res = influxd.query("SHOW DATABASES")["results"][0]
    return {v[0] for s in res.get("series", []) for v in s["values"]}


def measurements(influxd: LocalInfluxd, db: str) -> set[str]:
    res = influxd.query("SHOW MEASUREMENTS", db)["results"][0]
    return {v[0] for s in res.get("series", []) for v in s["values"]}


# -- reads ---------------------------------------------------------------------------------------------------


def test_read_groups_series_and_filters_by_bound_tags(store: InfluxDB1Store, influxd: LocalInfluxd,
                                                      database: str) -> None:
    lines = [raw_line("cpu", {"host": h, "dc": dc}, "load", float(i + 10 * j), T0 + i * S)
             for j, (h, dc) in enumerate([("h1", "eu"), ("h2", "eu"), ("h3", "us")]) for i in range(5)]
    lines.append(raw_line("cpu", {"host": "h1", "dc": "eu"}, "other", 99.0, T0))  # another field
    influxd.write_lines(database, "\n".join(lines))
    data = store.read(Query("cpu", "load", (("dc", "eu"),), ("host",), S), T0 + S, T0 + 3 * S)
    assert set(data) == {(("host", "h1"),), (("host", "h2"),)}
    t, v = data[(("host", "h2"),)]
    assert t.dtype == np.int64 and t.tolist() == [T0 + S, T0 + 2 * S, T0 + 3 * S]  # both ends included
    assert v.tolist() == [11.0, 12.0, 13.0]
    both = store.read(Query("cpu", "load", (), ("dc", "host"), S), T0, T0 + 10 * S)
    assert set(both) == {(("dc", "eu"), ("host", "h1")), (("dc", "eu"), ("host", "h2")),
                         (("dc", "us"), ("host", "h3"))}
    ungrouped = store.read(Query("cpu", "load", (("host", "h3"),), (), S), T0, T0 + 10 * S)
    assert list(ungrouped) == [()] and ungrouped[()][1].tolist() == [20.0, 21.0, 22.0, 23.0, 24.0]
    assert store.read(Query("cpu", "load", (("host", "nope"),), ("host",), S), T0, T0 + 10 * S) == {}
    assert store.read(Query("nothing", "load", (), ("host",), S), T0, T0 + 10 * S) == {}


def test_reads_are_plain_unless_gzip_is_asked_and_equal_either_way(store: InfluxDB1Store, influxd: LocalInfluxd,
                                                                  database: str) -> None:
    influxd.write_lines(database, "\n".join(raw_line("cpu", {"host": f"h{j}"}, "load", float(i * j), T0 + i * S)
                                            for j in range(20) for i in range(200)))
    q = Query("cpu", "load", (), ("host",), S)
    plain = store.read(q, T0, T0 + 300 * S)
    r = store._request("query", "query", "POST", {"q": "SHOW MEASUREMENTS", "db": database})
    assert "Content-Encoding" not in r.headers  # influxd did not spend CPU compressing
    zipped_store = InfluxDB1Store(replace(store.cfg, gzip=True))
    r = zipped_store._request("query", "query", "POST", {"q": "SHOW MEASUREMENTS", "db": database})
    assert r.headers.get("Content-Encoding") == "gzip"
    zipped = zipped_store.read(q, T0, T0 + 300 * S)
    assert plain.keys() == zipped.keys() and len(plain) == 20
    for k in plain:
        assert np.array_equal(plain[k][0], zipped[k][0]) and np.array_equal(plain[k][1], zipped[k][1])


def test_sub_millisecond_periods_keep_nanosecond_times(store: InfluxDB1Store, influxd: LocalInfluxd,
                                                       database: str) -> None:
    influxd.write_lines(database, "\n".join(raw_line("fast", {}, "v", float(i), T0 + i * 250_001) for i in range(4)))
    (t, v), = store.read(Query("fast", "v", (), (), 250_001), T0, T0 + S).values()
    assert t.tolist() == [T0 + i * 250_001 for i in range(4)] and v.tolist() == [0.0, 1.0, 2.0, 3.0]


EVIL_VALUES = [
    "x' OR 1=1 --",
    "x\" OR 1=1 --",
    '"; DROP DATABASE victim; --',
    "'; DROP MEASUREMENT canary; SELECT '",
    "a b,c=d",
    "$start",
    "/.*/",
    "tab\tand\u00a0nbsp",
    "ünïcødé 😀 \u202etxt",
    "back\\slash",
    "\\\\server\\share",
    "quote\\\"escape",
]


def test_injection_through_where_values_from_the_config(store: InfluxDB1Store, influxd: LocalInfluxd,
                                                        database: str) -> None:
    influxd.query('CREATE DATABASE "victim"')
    lines = [raw_line("canary", {"host": v}, "value", float(i), T0) for i, v in enumerate(EVIL_VALUES)]
    lines += [raw_line("canary", {"host": "h1"}, "value", -1.0, T0)]
    influxd.write_lines(database, "\n".join(lines))
    q = Query("canary", "value", (), ("host",), S)
    for i, evil in enumerate(EVIL_VALUES):
        got = store.read(replace(q, where=(("host", evil),)), T0, T0)
        assert {k: v[1].tolist() for k, v in got.items()} == {(("host", evil),): [float(i)]}, evil
    for evil in ("newline\nDROP DATABASE victim", "x' OR 'a'='a", "\\", "h1' OR host='h2"):
        assert store.read(replace(q, where=(("host", evil),)), T0, T0) == {}, evil
    assert {"victim", database} <= databases(influxd)
    assert measurements(influxd, database) == {"canary"}
    everything = store.read(q, T0, T0)
    assert len(everything) == len(EVIL_VALUES) + 1


WEIRD_NAMES = ['we"ird', "with space", "com,ma", "eq=ual", "back\\slash", "it's", "semi;DROP DATABASE x",
               "ünï 😀"]


@pytest.mark.parametrize("name", WEIRD_NAMES)
def test_identifiers_from_the_config_are_quoted(cfg: Config, store: InfluxDB1Store, influxd: LocalInfluxd,
                                                database: str, name: str) -> None:
    meas, fld, tag = f"m {name}", f"f {name}", f"t {name}"
    influxd.write_lines(database, "\n".join([
        raw_line(meas, {tag: "a", "plain": "x"}, fld, 1.0, T0),
        raw_line(meas, {tag: name, "plain": "y"}, fld, 2.0, T0),
        raw_line(meas, {tag: name, "plain": "y"}, "other", 3.0, T0),
    ]))
    got = store.read(Query(meas, fld, ((tag, name),), (tag, "plain"), S), T0, T0)
    assert {k: v[1].tolist() for k, v in got.items()} == {tuple(sorted({tag: name, "plain": "y"}.items())): [2.0]}
    assert len(store.read(Query(meas, fld, (), (tag,), S), T0, T0)) == 2
    assert measurements(influxd, database) == {meas}


def test_a_database_name_needing_quotes(influxd: LocalInfluxd) -> None:
    name = 'we"ird db; DROP'
    store = InfluxDB1Store(InfluxConfig(url=influxd.url, database=name, timeout_s=5))
    store.ensure_database()
    store.write([Point("m", (("h", "x"),), (("v", 1.5),), T0)])
    assert store.read(Query("m", "v", (("h", "x"),), (), S), T0, T0)[()][1].tolist() == [1.5]
    assert name in databases(influxd)
    influxd.query(f'DROP DATABASE "{name.replace(chr(34), chr(92) + chr(34))}"')


# -- writes: line protocol through the real server --------------------------------------------------------------

# InfluxDB 1.x unescapes only "\\,", "\\=" and "\\ ": backslashes must be written as they are.
ROUND_TRIP = EVIL_VALUES


def _rows(influxd: LocalInfluxd, db: str, q: str) -> list[dict]:
    res = influxd.query(q, db)["results"][0]
    return [dict(zip(s["columns"], v, strict=True)) for s in res.get("series", []) for v in s["values"]]


def test_line_protocol_round_trips_through_the_server(store: InfluxDB1Store, influxd: LocalInfluxd,
                                                      database: str) -> None:
    p = Point("m m,x=y", (("k=1", "v 1,2"), ("z", "")),
              (("f", 1.5), ("i", -3), ("b", True), ("nb", False), ("s", 'say "hi", x=1'), ("big", 1e300)), T0 + 7)
    assert line_protocol(p).startswith("m\\ m\\,x=y,k\\=1=v\\ 1\\,2 ")  # the empty tag is left out
    store.write([p])
    (row,) = _rows(influxd, database, 'SELECT * FROM "m m,x=y"')
    assert row == {"time": T0 + 7, "k=1": "v 1,2", "f": 1.5, "i": -3, "b": True, "nb": False,
                   "s": 'say "hi", x=1', "big": 1e300}


@pytest.mark.parametrize("bad", [float("nan"), float("inf"), float("-inf")])
def test_non_finite_fields_are_refused_before_sending(bad: float) -> None:
    with pytest.raises(ValueError, match="not finite"):
        line_protocol(Point("m", (), (("v", bad),), 1))


@pytest.mark.parametrize("value", ROUND_TRIP)
def test_tag_values_written_back_exactly(store: InfluxDB1Store, influxd: LocalInfluxd, database: str,
                                         value: str) -> None:
    store.write([Point("out", (("host", value), ("series", f"host={value}")), (("v", 1.0),), T0)])
    got = store.read(Query("out", "v", (("host", value),), ("host", "series"), S), T0, T0)
    assert list(got) == [(("host", value), ("series", f"host={value}"))]


@pytest.mark.parametrize("name", WEIRD_NAMES)
def test_output_measurement_and_tag_names_written_back_exactly(store: InfluxDB1Store, influxd: LocalInfluxd,
                                                               database: str, name: str) -> None:
    store.write([Point(f"out {name}", ((f"t {name}", "v"),), ((f"f {name}", 1.0),), T0)])
    got = store.read(Query(f"out {name}", f"f {name}", (), (f"t {name}",), S), T0, T0)
    assert list(got) == [((f"t {name}", "v"),)]


def test_a_measurement_that_would_be_a_comment_is_not_silently_dropped(store: InfluxDB1Store,
                                                                       influxd: LocalInfluxd, database: str) -> None:
    try:
        store.write([Point("#errors", (), (("v", 1.0),), T0)])
    except (ValueError, StoreError):
        return
    assert _rows(influxd, database, 'SELECT * FROM "#errors"')


# -- tag values from the data, through a whole scoring pass ----------------------------------------------------


@pytest.fixture(scope="module")
def shared_model() -> Detector:
    x, _ = ecg(3000, seed=5)
    return Detector(DetectorSpec(window=32, n_clusters=20, n_init=1)).fit([x])


@pytest.mark.parametrize("value", ROUND_TRIP)
def test_tag_values_from_the_data_reach_the_output_exactly(influxd: LocalInfluxd, database: str, tmp_path: Path,
                                                           shared_model: Detector, value: str) -> None:
    cfg = make_config(influxd.url, database, tmp_path, signals=[{
        "name": "ekg", "measurement": "ecg", "field": "value", "group_by": ["patient"], "period": "1s",
        "scope": "shared", "clusters": 20, "train_range": ["now-2h", "now-1h"]}])
    n = 96
    x, _ = ecg(n, seed=6)
    influxd.write_lines(database, "\n".join(raw_line("ecg", {"patient": p}, "value", float(x[i]), T0 + i * S)
                                            for p in (value, "plain") for i in range(n)))
    save(cfg.paths.models, StoredModel(model_id_for("ekg", (), "shared"), "ekg", (), "shared", shared_model, S, 0, T0))
    store = InfluxDB1Store(cfg.influxdb)
    worker = Worker(cfg, store, Catalog(cfg.paths.models), Watermarks(tmp_path / "wm.json"))
    report = worker.score_range(T0, T0 + (n - 1) * S)
    # Every window is scored: per series, one per sample from the first whole window to the last sample.
    w = shared_model.window_
    assert report.signals["ekg"].series == 2 and report.windows == 2 * (n - w + 1)
    rows = _rows(influxd, database, 'SELECT "max_error", "patient", "series" FROM "anomaly_error" '
                                    "WHERE missing = false")
    assert len(rows) == report.windows and {r["patient"] for r in rows} == {value, "plain"}
    # The series key escapes "\\", "," and "=" so that it names one tag set only, and parses back.
    assert {r["series"] for r in rows} == {tags_str((("patient", value),)), "patient=plain"}
    assert {parse_tags(r["series"]) for r in rows} == {(("patient", value),), (("patient", "plain"),)}
    recon = _rows(influxd, database, 'SELECT "value", "patient" FROM "anomaly_reconstruction"')
    assert {r["patient"] for r in recon} == {value, "plain"}
    assert {"ecg", "anomaly_error", "anomaly_reconstruction", "anomalyd_stats"} >= measurements(influxd, database)


# -- errors --------------------------------------------------------------------------------------------------


def test_a_closed_port_is_a_clear_store_error() -> None:
    url = f"http://127.0.0.1:{free_port()}"
    store = InfluxDB1Store(InfluxConfig(url=url, database="db", timeout_s=2, retries=1))
    calls = [store.ping, lambda: store.read(Query("m", "v", (), (), S), 0, S),
             lambda: store.write([Point("m", (), (("v", 1.0),), 1)])]
    for call in calls:
        with pytest.raises(StoreError) as info:
            call()
        msg = str(info.value)
        assert url in msg and "unreachable" in msg and "after 1 retry;" in msg and "influxdb.url" in msg
        assert isinstance(info.value, ConnectionError) and info.value.__cause__ is not None


def test_a_missing_database_is_a_clear_store_error(influxd: LocalInfluxd) -> None:
    store = InfluxDB1Store(InfluxConfig(url=influxd.url, database="no_such_db", timeout_s=5))
    assert store.ping()  # the server itself is fine
    with pytest.raises(StoreError, match="database not found: no_such_db"):
        store.read(Query("m", "v", (), (), S), 0, S)
    with pytest.raises(StoreError, match=r"(?s)HTTP 404.*database not found.*fix influxdb.database='no_such_db'"):
        store.write([Point("m", (), (("v", 1.0),), 1)])
    assert "no_such_db" not in databases(influxd)


def test_a_field_of_the_wrong_type_is_a_clear_store_error(store: InfluxDB1Store, influxd: LocalInfluxd,
                                                          database: str) -> None:
    influxd.write_lines(database, "m v=1.0 1")
    with pytest.raises(StoreError, match=r"refused the write \(HTTP 400\).*conflict"):
        store.write([Point("m", (), (("v", "text"),), 2)])


# -- retries (influxdb.retries) ------------------------------------------------------------------------------


class _Influx1Stub(StubServer):
    """InfluxDB 1.x's /query (one chunk of JSON) and /write (204), for scripting failures in front of them."""

    def default_reply(self, rec: Recorded) -> Reply:
        if rec.path == "/query":
            return Reply(200, {"results": [{"statement_id": 0, "series": [
                {"name": "m", "tags": {"host": "h1"}, "columns": ["time", "v"],
                 "values": [[T0, 1.0], [T0 + S, 2.0]]}]}]})
        if rec.path == "/write":
            return Reply(204)
        return Reply(404, b"404 page not found")


def _retry_lines(caplog: pytest.LogCaptureFixture) -> list[str]:
    return [r.getMessage() for r in caplog.records if r.name == "anomalyd.influx" and "retry" in r.getMessage()]


def test_reads_and_writes_are_retried_after_server_errors(caplog: pytest.LogCaptureFixture) -> None:
    with _Influx1Stub() as stub:
        store = InfluxDB1Store(InfluxConfig(url=stub.url, database="db", timeout_s=5, retries=2))
        store.retry_base_s = 0.01
        stub.script(Reply.error(503, path="/write"), Reply.error(500, b'{"error":"timeout"}', path="/write"))
        with caplog.at_level(logging.WARNING, logger="anomalyd.influx"):
            store.write([Point("m", (), (("v", 1.0),), T0)])
        assert [r.status for r in stub.recorded("/write")] == [503, 500, 204]
        assert stub.recorded("/write")[0].body == stub.recorded("/write")[2].body  # the same batch again
        lines = _retry_lines(caplog)
        assert len(lines) == 2 and "the write failed" in lines[0] and "retry 1 of 2" in lines[0]
        assert "retry 2 of 2" in lines[1] and stub.url in lines[1]
        caplog.clear()
        stub.script(Reply.error(502, path="/query"), Reply.error(503, path="/query"))
        with caplog.at_level(logging.WARNING, logger="anomalyd.influx"):
            data = store.read(Query("m", "v", (), ("host",), S), T0, T0 + S)
        assert data[(("host", "h1"),)][1].tolist() == [1.0, 2.0]
        assert len(stub.recorded("/query")) == 3 and len(_retry_lines(caplog)) == 2
        stub.script(*[Reply.error(503, path="/write")] * 3)  # one more failure than retries
        with pytest.raises(StoreError, match=r"failed the write after 2 retries"):
            store.write([Point("m", (), (("v", 1.0),), T0)])
        assert len(stub.recorded("/write")) == 6


def test_client_errors_are_not_retried(caplog: pytest.LogCaptureFixture) -> None:
    with _Influx1Stub() as stub:
        store = InfluxDB1Store(InfluxConfig(url=stub.url, database="db", timeout_s=5, retries=3))
        stub.script(Reply(400, {"error": "partial write: field type conflict"}, path="/write"))
        with caplog.at_level(logging.WARNING, logger="anomalyd.influx"):
            with pytest.raises(StoreError, match=r"refused the write \(HTTP 400\).*conflict"):
                store.write([Point("m", (), (("v", 1.0),), T0)])
        assert len(stub.recorded("/write")) == 1 and not _retry_lines(caplog)


def test_a_stopped_influxd_is_retried_and_a_restart_within_the_retries_is_ridden_out(
        tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    server = LocalInfluxd(tmp_path / "influxd").start()
    try:
        server.query('CREATE DATABASE "r"')
        server.write_lines("r", f"m,host=h1 v=1.0 {T0}")
        server.stop()
        store = InfluxDB1Store(InfluxConfig(url=server.url, database="r", timeout_s=2, retries=2))
        store.retry_base_s = 0.05
        with caplog.at_level(logging.WARNING, logger="anomalyd.influx"):
            with pytest.raises(StoreError, match=r"unreachable \(ConnectionError\) after 2 retries; check "
                                                 r"influxdb.url and that influxd is running"):
                store.read(Query("m", "v", (), ("host",), S), T0, T0 + S)
        assert len(_retry_lines(caplog)) == 2
        # influxd comes back while a write is being retried: the write lands, once.
        patient = InfluxDB1Store(InfluxConfig(url=server.url, database="r", timeout_s=2, retries=8))
        restart = threading.Timer(0.5, server.start)
        caplog.clear()
        restart.start()
        try:
            with caplog.at_level(logging.WARNING, logger="anomalyd.influx"):
                patient.write([Point("m", (("host", "h1"),), (("v", 2.0),), T0 + S)])
        finally:
            restart.join()
        assert _retry_lines(caplog) and all("the write failed (ConnectionError)" in m for m in _retry_lines(caplog))
        data = patient.read(Query("m", "v", (), ("host",), S), T0, T0 + S)
        assert data[(("host", "h1"),)][1].tolist() == [1.0, 2.0]
    finally:
        server.stop()
