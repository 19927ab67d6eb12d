"""The InfluxDB 1.x store against a real influxd: grouped reads, bound values, quoted identifiers, escaping, errors.

Injection attempts come from the config (``where`` values, measurement/field/tag names) and from the data (tag
values already in InfluxDB, read back and written again in the output points).
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import replace
from pathlib import Path

import numpy as np
import pytest

from anomalyd.config import Config, InfluxConfig
from anomalyd.core.detector import Detector, DetectorSpec
from anomalyd.core.records import parse_tags, tags_str
from anomalyd.demo.synthetic import ecg
from anomalyd.service.catalog import Catalog, StoredModel, model_id_for, save
from anomalyd.service.state import Watermarks
from anomalyd.service.worker import Worker
from anomalyd.store.base import Point, Query, SeriesPoints, StoreError, line_protocol, pipelined_write, series_lines
from anomalyd.store.influx1 import InfluxDB1Store
from anomalyd.store.local import LocalInfluxd, free_port
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


@pytest.mark.parametrize("columns", [
    ((1.5, 2.0, -0.0), (True, False, True), 3, "up"),  # varying floats and flags, single int and text
    (7.25, False, -3, 'say "hi", x=1 %s {x} %%'),  # every column a single value: no varying column at all
    ([1e308, 1e308, 1.0], ["a\\", "b", "a\\"], [1, 2, 3], [True, True, False]),  # two values near 1e308 overflow a sum
    ([0.1, 1e-300, 5e-324], ['{t}', "%r", '"q"'], 2.5, [0, -1, 2**62]),
])
def test_a_block_is_written_as_its_points_one_by_one(columns: tuple[object, ...]) -> None:
    """`series_lines` (formatted column by column, with a compiled formatter per layout) writes exactly what
    `line_protocol` writes for each point alone, whatever the layout, text and escapes."""
    sp = SeriesPoints("m m,{x}%", (("h", "a b{c}%"), ("k=1", "v,1")), ("f", "f b", "n%", "t"), columns,
                      [T0, T0 + 1, T0 + 2])
    assert series_lines(sp) == [line_protocol(p) for p in sp.points()]


def test_a_block_of_several_series_split_by_a_tag_is_written_as_its_points_one_by_one() -> None:
    """The attribution's block: a series per field (``split``), the columns series after series; its lines, its
    points and its ``only`` are those of one block per series."""
    names = ("a b", "f,1", "z=2")
    cols = ([0.25, 0.5, 0.125, 1.0, 0.0, 0.75], [1.0, -1.0, 1.0, -1.0, 1.0, -1.0], 3, "up")
    sp = SeriesPoints("m m", (("h", "x y"), ("series", "h=x y")), ("share", "direction", "n", "t"), cols,
                      [T0, T0 + 7], split=("field", names))
    apart = [SeriesPoints("m m", (("h", "x y"), ("series", "h=x y"), ("field", f)), sp.names,
                          (cols[0][2 * i : 2 * i + 2], cols[1][2 * i : 2 * i + 2], 3, "up"), [T0, T0 + 7])
             for i, f in enumerate(names)]
    assert sp.n_points == 6
    assert series_lines(sp) == [line for b in apart for line in series_lines(b)]
    assert series_lines(sp) == [line_protocol(p) for p in sp.points()]
    assert sp.points() == [p for b in apart for p in b.points()]
    later = sp.only({T0 + 7})
    assert later is not None and later.points() == [p for b in apart for p in b.points() if p.time_ns == T0 + 7]
    assert sp.only({T0 + 1}) is None
    with pytest.raises(ValueError, match="field value nan is not finite"):
        series_lines(SeriesPoints("m", (), ("v",), ([1.0, float("nan")],), [1], split=("field", ("a", "b"))))


@pytest.mark.parametrize(("tags", "expected"), [
    ((("b", "2"), ("a", "1"), ("e", "")), ",a=1,b=2"),  # sorted by key, the empty value left out
    ((("series", "host=h1"), ("k ,=", "v ,=")), ",k\\ \\,\\==v\\ \\,\\=,series=host\\=h1"),
    ((("k", "a\\b"), ("w", "x y")), ",k=a\\b,w=x\\ y"),  # an inner backslash is kept as it is
])
def test_tags_are_escaped_exactly(tags: tuple[tuple[str, str], ...], expected: str) -> None:
    assert series_lines(SeriesPoints("m", tags, ("v",), (1.0,), [5])) == [f"m{expected} v=1.0 5"]


@pytest.mark.parametrize("tags", [(("k", "v\\"),), (("k\\", "v"),), (("k", "a\nb"),)])
def test_a_tag_that_line_protocol_cannot_hold_is_refused_naming_it(tags: tuple[tuple[str, str], ...]) -> None:
    with pytest.raises(ValueError, match=r"cannot be written in InfluxDB 1\.x line protocol"):
        series_lines(SeriesPoints("m", tags, ("v",), (1.0,), [5]))


def _bodies(n: int) -> list[Point]:
    return [Point("m", (), (("v", float(i)),), i) for i in range(n)]


@pytest.mark.parametrize("ahead", [0, 1, 4])
def test_pipelined_bodies_go_in_order_and_whole(ahead: int) -> None:
    sent: list[bytes] = []
    with ThreadPoolExecutor(1) as sender:
        pipelined_write(_bodies(23), 5, sender, lambda body: (time.sleep(0.002), sent.append(body))[1], ahead=ahead)
    assert [b.decode().split("\n") for b in sent] == [
        [f"m v={float(i)} {i}" for i in range(a, min(a + 5, 23))] for a in range(0, 23, 5)]


def test_a_failed_body_is_raised_and_the_bodies_queued_behind_it_are_not_sent() -> None:
    sent: list[int] = []
    release = threading.Event()

    def post(body: bytes) -> None:
        first = int(body.split(b"\n")[0].split(b" ")[-1])
        if first == 0:
            release.wait(5)  # the formatting runs ahead meanwhile and queues the next bodies
            raise StoreError("write refused")
        sent.append(first)

    points = iter(_bodies(40))

    def feed() -> Iterator[Point]:
        for i, p in enumerate(points):
            if i == 17:
                release.set()  # bodies 1 and 2 are queued behind it; the first now fails
                time.sleep(0.05)
            yield p

    with ThreadPoolExecutor(1) as sender, pytest.raises(StoreError, match="write refused"):
        pipelined_write(feed(), 5, sender, post, ahead=2)
    assert sent == []  # what was queued behind the failure was cancelled: the retry writes it all again


def test_a_failure_while_the_points_are_made_waits_for_the_body_in_flight() -> None:
    done: list[int] = []

    def post(body: bytes) -> None:
        time.sleep(0.05)
        done.append(len(body))

    def feed() -> Iterator[Point]:
        yield from _bodies(5)
        raise RuntimeError("scoring failed")

    with ThreadPoolExecutor(1) as sender:
        with pytest.raises(RuntimeError, match="scoring failed"):
            pipelined_write(feed(), 5, sender, post)
        assert len(done) == 1  # the body in flight had ended when the failure went up


def test_a_block_with_a_non_finite_value_is_refused_naming_it() -> None:
    with pytest.raises(ValueError, match="field value inf is not finite"):
        series_lines(SeriesPoints("m", (), ("v",), ([1.0, float("inf")],), [1, 2]))


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
    return [r.getMessage() for r in caplog.records
            if r.name.startswith("anomalyd.store.") and "retry" in r.getMessage()]


def test_reads_and_writes_are_retried_after_server_errors(caplog: pytest.LogCaptureFixture) -> None:
    with _Influx1Stub() as stub:
        store = InfluxDB1Store(InfluxConfig(url=stub.url, database="db", timeout_s=5, retries=2))
        store.retry_base_s = 0.01
        stub.script(Reply.error(503, path="/write"), Reply.error(500, b'{"error":"timeout"}', path="/write"))
        with caplog.at_level(logging.WARNING, logger="anomalyd.store"):
            store.write([Point("m", (), (("v", 1.0),), T0)])
        assert [r.status for r in stub.recorded("/write")] == [503, 500, 204]
        assert stub.recorded("/write")[0].body == stub.recorded("/write")[2].body  # the same batch again
        lines = _retry_lines(caplog)
        assert len(lines) == 2 and "the write failed" in lines[0] and "retry 1 of 2" in lines[0]
        assert "retry 2 of 2" in lines[1] and stub.url in lines[1]
        caplog.clear()
        stub.script(Reply.error(502, path="/query"), Reply.error(503, path="/query"))
        with caplog.at_level(logging.WARNING, logger="anomalyd.store"):
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
        with caplog.at_level(logging.WARNING, logger="anomalyd.store"):
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
        with caplog.at_level(logging.WARNING, logger="anomalyd.store"):
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
            with caplog.at_level(logging.WARNING, logger="anomalyd.store"):
                patient.write([Point("m", (("host", "h1"),), (("v", 2.0),), T0 + S)])
        finally:
            restart.join()
        assert _retry_lines(caplog) and all("the write failed (ConnectionError)" in m for m in _retry_lines(caplog))
        data = patient.read(Query("m", "v", (), ("host",), S), T0, T0 + S)
        assert data[(("host", "h1"),)][1].tolist() == [1.0, 2.0]
    finally:
        server.stop()


# -- MessagePack reads (issue 12): the same arrays as the JSON path --------------------------------------------------
# (their imports kept here, with them)

import io  # noqa: E402
import socket  # noqa: E402
from typing import Any  # noqa: E402

import msgpack  # noqa: E402
import requests  # noqa: E402

from conftest import AuthInfluxd  # noqa: E402


@pytest.fixture
def decoded(monkeypatch: pytest.MonkeyPatch) -> dict[str, int]:
    """How many documents the MessagePack reads handed to the msgpack package (not the packed-rows scan), and how
    many scans ran."""
    from anomalyd.store import influx1 as influx

    counts = {"scan": 0, "msgpack": 0}
    scan, unpack = influx._scan, influx._unpack_next

    def counting_scan(*a: Any) -> Any:
        counts["scan"] += 1
        return scan(*a)

    def counting_unpack(*a: Any) -> Any:
        doc = unpack(*a)
        counts["msgpack"] += doc is not None
        return doc

    monkeypatch.setattr(influx, "_scan", counting_scan)
    monkeypatch.setattr(influx, "_unpack_next", counting_unpack)
    return counts


def _read_both(store: InfluxDB1Store, query: Query, start: int, end: int) -> tuple[dict, dict]:
    """The same read as MessagePack (the default) and as JSON (the read path before issue 12)."""
    assert store.read_format == "msgpack"
    packed = store.read(query, start, end)
    store.read_format = "json"
    try:
        plain = store.read(query, start, end)
    finally:
        store.read_format = "msgpack"
    return packed, plain


def _assert_identical(packed: dict, plain: dict) -> None:
    assert list(packed) == list(plain)  # the same series, in the same order
    for key, (t, v) in plain.items():
        t2, v2 = packed[key]
        assert (t2.dtype, v2.dtype, t2.shape, v2.shape) == (t.dtype, v.dtype, t.shape, v.shape), key
        assert np.array_equal(t2, t), key
        assert np.array_equal(np.isnan(v2), np.isnan(v)), key
        assert np.array_equal(v2, v, equal_nan=True), key


def test_msgpack_reads_one_field_exactly_as_json_without_decoding_values(
        store: InfluxDB1Store, influxd: LocalInfluxd, database: str, decoded: dict[str, int]) -> None:
    rng = np.random.default_rng(12)
    values = np.concatenate([rng.normal(0, 1, 500) * 10.0 ** rng.integers(-300, 300, 500), [5e-324, 1.7e308]])
    lines = [raw_line("cpu", {"host": f"h{j:02d}", **({"dc": "eu"} if j % 3 else {})}, "load",
                      float(values[(i * 7 + j) % len(values)]), T0 + i * S) for j in range(40) for i in range(60)]
    influxd.write_lines(database, "\n".join(lines))
    q = Query("cpu", "load", (), ("host", "dc"), S)
    packed, plain = _read_both(store, q, T0, T0 + 59 * S)
    assert len(plain) == 40 and all(len(t) == 60 for t, _ in plain.values())
    assert (("dc", ""), ("host", "h00")) in plain  # a series without the tag keys it as ""
    _assert_identical(packed, plain)
    assert decoded["scan"] > 0 and decoded["msgpack"] == 0  # every row read as packed, no value decoded alone
    ungrouped = _read_both(store, Query("cpu", "load", (("host", "h07"),), (), S), T0, T0 + 59 * S)
    assert list(ungrouped[0]) == [()]
    _assert_identical(*ungrouped)


def test_msgpack_reads_several_fields_with_nulls_exactly_as_json(store: InfluxDB1Store, influxd: LocalInfluxd,
                                                                  database: str, decoded: dict[str, int]) -> None:
    lines = []
    for j in range(6):
        for i in range(50):
            fields = {"a": i + 0.5, "b": -i * 1.25 - 1, "c": j + i / 7}
            if j % 2 and i % 4 == 1:  # odd hosts miss a field now and then
                del fields["abc"[i % 3]]
            body = ",".join(f"{k}={v!r}" for k, v in fields.items())
            lines.append(f"multi,host=h{j} {body} {T0 + i * S}")
    influxd.write_lines(database, "\n".join(lines))
    q = Query("multi", "", (), ("host",), S, fields=("c", "a", "b"))
    packed, plain = _read_both(store, q, T0, T0 + 49 * S)
    _assert_identical(packed, plain)
    _, v = packed[(("host", "h1"),)]
    assert v.shape == (50, 3) and np.isnan(v).sum() == 13 and v[0].tolist() == [1.0, 0.5, -1.0]
    assert not np.isnan(packed[(("host", "h0"),)][1]).any()
    # the hosts with nulls decoded by msgpack (and, after them, maybe hosts without), the first host read packed
    assert 3 <= decoded["msgpack"] <= 5
    unknown = _read_both(store, replace(q, fields=("a", "zz")), T0, T0 + 49 * S)  # a field never written: NaN
    _assert_identical(*unknown)
    assert np.isnan(unknown[0][(("host", "h0"),)][1][:, 1]).all()


def test_msgpack_reads_a_field_holding_strings_in_some_shards_as_json_does(
        store: InfluxDB1Store, influxd: LocalInfluxd, database: str, caplog: pytest.LogCaptureFixture) -> None:
    from anomalyd.store import influx1 as influx

    week = 8 * 24 * 3600 * S  # another shard group (7 days each): there the field may have another type
    lines = [f"mixed,host=h{j} a={i}.5,s={i * 2}.0 {T0 + i * S}" for j in range(3) for i in range(10)]
    lines += [f'mixed,host=h{j} a={i}.5,s="text {i}" {T0 + week + i * S}' for j in range(3) for i in range(10)]
    influxd.write_lines(database, "\n".join(lines))
    q = Query("mixed", "", (), ("host",), S, fields=("a", "s"))
    influx._reported_strings.discard(("mixed", "s"))
    with caplog.at_level(logging.WARNING, logger="anomalyd.store"):
        packed, plain = _read_both(store, q, T0 + week, T0 + week + 9 * S)  # the shard where "s" holds strings
    _assert_identical(packed, plain)
    t, v = packed[(("host", "h2"),)]
    assert len(t) == 10 and np.isnan(v[:, 1]).all() and v[:, 0].tolist() == [i + 0.5 for i in range(10)]
    warned = [r.getMessage() for r in caplog.records if "holds strings" in r.getMessage()]
    assert len(warned) == 1 and "'s'" in warned[0]  # once per field, not once per read or per series
    # Over both shards influxd answers the float values and leaves the strings out (nulls).
    both = _read_both(store, q, T0, T0 + week + 9 * S)
    _assert_identical(*both)
    t, v = both[0][(("host", "h2"),)]
    assert len(t) == 20 and np.isnan(v[:, 1]).tolist() == [False] * 10 + [True] * 10
    # One field holding strings fails the read the same way in both formats.
    single = Query("mixed", "s", (), ("host",), S)
    errors = []
    for fmt in ("msgpack", "json"):
        store.read_format = fmt
        with pytest.raises(ValueError) as info:
            store.read(single, T0 + week, T0 + week + 9 * S)
        errors.append(type(info.value))
    store.read_format = "msgpack"
    assert errors[0] is errors[1]


def test_msgpack_reads_ms_and_ns_epochs_and_integer_fields_as_json(store: InfluxDB1Store, influxd: LocalInfluxd,
                                                                   database: str, decoded: dict[str, int]) -> None:
    lines = [raw_line("fast", {"host": "a"}, "v", i / 3, T0 + i * 250_001) for i in range(100)]
    lines += [raw_line("fast", {"host": "b"}, "v", -i / 3, i * 1_000_000) for i in range(100)]  # small epochs
    lines += [f"ints,host=a v={i * 1_000_003}i {T0 + i * S}" for i in range(100)]
    lines += [f"ints,host=b v={2**62 + i}i {T0 + i * S}" for i in range(100)]
    influxd.write_lines(database, "\n".join(lines))
    ns = _read_both(store, Query("fast", "v", (), ("host",), 250_001), 0, T0 + S)  # not whole ms: ns epochs
    _assert_identical(*ns)
    assert ns[0][(("host", "a"),)][0].tolist() == [T0 + i * 250_001 for i in range(100)]
    assert ns[0][(("host", "b"),)][0].tolist() == [i * 1_000_000 for i in range(100)]
    assert decoded["scan"] > 0 and decoded["msgpack"] >= 1  # the small epochs are packed shorter: decoded alone
    ms = _read_both(store, Query("fast", "v", (), ("host",), 4 * S), 0, T0 + S)  # whole ms: ms epochs, ns kept
    assert ms[0][(("host", "b"),)][0].tolist() == [i * 1_000_000 for i in range(100)]
    _assert_identical(*ms)
    ints = _read_both(store, Query("ints", "v", (), ("host",), S), T0, T0 + 100 * S)
    _assert_identical(*ints)
    assert ints[0][(("host", "b"),)][1][3] == float(2**62 + 3)


def test_msgpack_reads_an_empty_answer_as_json(store: InfluxDB1Store, influxd: LocalInfluxd, database: str) -> None:
    influxd.write_lines(database, raw_line("cpu", {"host": "h1"}, "load", 1.0, T0))
    for q, lo, hi in [(Query("cpu", "load", (), ("host",), S), T0 + S, T0 + 9 * S),  # nothing in the range
                      (Query("cpu", "load", (("host", "nope"),), ("host",), S), T0, T0),
                      (Query("nothing", "load", (), ("host",), S), T0, T0),
                      (Query("cpu", "", (), ("host",), S, fields=("load", "x")), T0 + S, T0 + S)]:
        assert _read_both(store, q, lo, hi) == ({}, {})


def test_msgpack_error_answers_are_store_errors_naming_the_query(influxd: LocalInfluxd) -> None:
    store = InfluxDB1Store(InfluxConfig(url=influxd.url, database="no_such_db_mp", timeout_s=5))
    q = Query("m", "v", (), ("host",), S)
    with pytest.raises(StoreError) as info:
        store.read(q, 0, S)
    assert "database not found: no_such_db_mp" in str(info.value)
    assert store.build_select(q)[0] in str(info.value) and store.read_format == "msgpack"
    # An HTTP error answered in MessagePack is decoded for the message (not shown as bytes).
    params = store._query_params("SELEKT nothing", {}, "ms")
    with pytest.raises(StoreError, match=r'refused the query \(HTTP 400\): \{"error":"error parsing query: found '
                                         r"SELEKT"):
        store._request("query", "query", "POST", params, send=lambda: store._send_query(params))


def test_msgpack_long_answers_across_many_chunks_and_batches_are_read_exactly(
        store: InfluxDB1Store, influxd: LocalInfluxd, database: str, decoded: dict[str, int]) -> None:
    rng = np.random.default_rng(3)
    lines = [raw_line("long", {"host": f"h{j}"}, "v", float(rng.normal()), T0 + i * S)
             for j in range(7) for i in range(100)]
    lines += [raw_line("long", {"host": "huge"}, "v", float(rng.normal()), T0 + i * S) for i in range(30_000)]
    influxd.write_lines(database, "\n".join(lines))
    q = Query("long", "v", (), ("host",), S)
    whole = _read_both(store, q, T0, T0 + 30_000 * S)  # one document of 570 kB for "huge", read in pieces
    _assert_identical(*whole)
    assert len(whole[0][(("host", "huge"),)][0]) == 30_000 and decoded["msgpack"] == 0
    store.chunk_size = 7  # every series in many documents, each continuing the one before
    chunked = _read_both(store, q, T0, T0 + 30_000 * S)
    _assert_identical(*chunked)
    _assert_identical(chunked[0], whole[1])
    batches = list(store.read_batches(q, T0, T0 + 30_000 * S, 3))
    assert [len(b) for b in batches] == [3, 3, 2]  # complete series, three at a time
    merged = {k: v for b in batches for k, v in b.items()}
    assert sum(len(b) for b in batches) == len(merged) == 8
    _assert_identical(merged, whole[1])
    assert decoded["msgpack"] == 0


def test_a_server_refusing_msgpack_is_asked_for_json_from_then_on(caplog: pytest.LogCaptureFixture) -> None:
    with _Influx1Stub() as stub:  # InfluxDB 3 answers 400 to an Accept header it does not know
        store = InfluxDB1Store(InfluxConfig(url=stub.url, database="db", timeout_s=5, retries=0, token="tok"))
        stub.script(Reply(400, {"error": "invalid mime type: application/x-msgpack"}, path="/query"))
        with caplog.at_level(logging.INFO, logger="anomalyd.store"):
            data = store.read(Query("m", "v", (), ("host",), S), T0, T0 + S)
        assert data[(("host", "h1"),)][1].tolist() == [1.0, 2.0] and store.read_format == "json"
        assert any("does not answer in MessagePack" in r.getMessage() for r in caplog.records)
        store.read(Query("m", "v", (), ("host",), S), T0, T0 + S)
        sent = stub.recorded("/query")
        assert [r.headers["Accept"] for r in sent] == ["application/x-msgpack", "application/json",
                                                       "application/json"]
        assert all(r.headers.get("Authorization") == "Token tok" for r in sent)
        assert all(r.query["chunked"] == ["true"] and r.query["epoch"] == ["ms"] for r in sent)
        # A refused read that JSON cannot fix either keeps MessagePack and reports the JSON answer.
        store.read_format = "msgpack"
        stub.script(Reply(400, {"error": "nope"}, path="/query"), Reply(400, {"error": "still no"}, path="/query"))
        with pytest.raises(StoreError, match=r"HTTP 400.*still no"):
            store.read(Query("m", "v", (), ("host",), S), T0, T0 + S)
        assert store.read_format == "msgpack"


def test_msgpack_reads_send_user_and_password(influxd_auth: AuthInfluxd) -> None:
    influxd_auth.query('CREATE DATABASE "mp"')
    requests.post(f"{influxd_auth.url}/write", params={"db": "mp"}, data=f"m,host=a v=1.5 {T0}",
                  auth=(influxd_auth.user, influxd_auth.password), timeout=10).raise_for_status()
    cfg = InfluxConfig(url=influxd_auth.url, database="mp", timeout_s=5, retries=0, username=influxd_auth.user,
                       password=influxd_auth.password)
    assert InfluxDB1Store(cfg).read(Query("m", "v", (), ("host",), S), T0, T0)[(("host", "a"),)][1].tolist() == [1.5]
    with pytest.raises(StoreError, match=r"HTTP 401.*ANOMALYD_INFLUXDB_USERNAME"):
        InfluxDB1Store(replace(cfg, password="wrong")).read(Query("m", "v", (), ("host",), S), T0, T0)


class _RawHTTP:
    """One loopback server that answers each request with the same raw bytes (status line, headers and a body as
    given, chunked or not) and closes the connection: answers influxd would not send, or sent only in part."""

    def __init__(self, payload: bytes) -> None:
        self.payload = payload
        self.sock = socket.create_server(("127.0.0.1", 0))
        self.url = f"http://127.0.0.1:{self.sock.getsockname()[1]}"
        self.thread = threading.Thread(target=self._serve, daemon=True)
        self.thread.start()

    def _serve(self) -> None:
        while True:
            try:
                conn, _ = self.sock.accept()
            except OSError:
                return
            with conn:
                data = b""
                while b"\r\n\r\n" not in data:
                    more = conn.recv(65536)
                    if not more:
                        break
                    data += more
                conn.sendall(self.payload)

    def close(self) -> None:
        self.sock.close()


def _msgpack_answer(*docs: bytes, end: bool = True) -> bytes:
    head = b"HTTP/1.1 200 OK\r\nContent-Type: application/x-msgpack\r\nTransfer-Encoding: chunked\r\n\r\n"
    body = b"".join(b"%x\r\n%s\r\n" % (len(d), d) for d in docs)
    return head + body + (b"0\r\n\r\n" if end else b"")


def _doc(host: str, values: list[list[Any]], partial: bool = True) -> bytes:
    res: dict[str, Any] = {"statement_id": 0, "series": [{"name": "m", "tags": {"host": host},
                                                          "columns": ["time", "v"], "values": values}]}
    if partial:
        res["partial"] = True
    return msgpack.packb({"results": [res]})


@pytest.mark.parametrize("case", ["broken", "cut", "error", "plain"])
def test_msgpack_answers_broken_off_or_erroneous_are_store_errors(case: str) -> None:
    ms = T0 // 1_000_000
    first = _doc("h1", [[ms, 1.0], [ms + 1000, None]])
    second = _doc("h2", [[ms, 3.0]], partial=False)
    payload = {"broken": _msgpack_answer(first, second[:20], end=False),  # the connection drops mid-chunk
               "cut": _msgpack_answer(first, second[:20]),  # the answer ends inside a document
               "error": _msgpack_answer(first, msgpack.packb({"error": "query interrupted"})),
               "plain": _msgpack_answer(first[:7], first[7:], second)}[case]
    server = _RawHTTP(payload)
    try:
        store = InfluxDB1Store(InfluxConfig(url=server.url, database="db", timeout_s=5, retries=0))
        q = Query("m", "v", (), ("host",), S)
        if case == "plain":  # the same documents, whole: read (with a null, by msgpack)
            data = store.read(q, T0, T0 + S)
            assert data[(("host", "h1"),)][1].tolist()[0] == 1.0 and np.isnan(data[(("host", "h1"),)][1][1])
            assert data[(("host", "h2"),)][0].tolist() == [T0]  # ms epochs, as asked
            return
        with pytest.raises(StoreError) as info:
            store.read(q, T0, T0 + S)
        msg = str(info.value)
        if case == "error":
            assert "query interrupted" in msg and store.build_select(q)[0] in msg
        else:
            assert server.url in msg and "broke off the answer" in msg
    finally:
        server.close()


class _Pieces(io.RawIOBase):
    """A body handed over ``size`` bytes at a time, as a slow network would."""

    def __init__(self, body: bytes, size: int) -> None:
        self.body, self.size, self.at = body, size, 0

    def read(self, n: int = -1) -> bytes:
        out = self.body[self.at : self.at + self.size]
        self.at += len(out)
        return out


@pytest.mark.parametrize("piece", [1, 7, 500, 4096, 1 << 16])
def test_msgpack_answers_arriving_in_pieces_of_any_size_are_read_exactly(
        store: InfluxDB1Store, influxd: LocalInfluxd, database: str, piece: int) -> None:
    # Runs of hosts with nulls (a row with "a" only, between two seconds) and of hosts without, in this order:
    # h00-h09 with, h10-h19 without, h20-h24 with, h25-h29 without.
    irregular = [*range(10), *range(20, 25)]
    lines = [f"p,host=h{j:02d} a={i + j / 3!r},b={-i * 0.5 - j!r} {T0 + i * S}" for j in range(30) for i in range(40)]
    lines += [f"p,host=h{j:02d} a={i}.25 {T0 + i * S + S // 2}" for j in irregular for i in range(3)]
    influxd.write_lines(database, "\n".join(lines))
    store.chunk_size = 25  # series over several documents, some regular and some not
    q = Query("p", "", (), ("host",), S // 2, fields=("a", "b"))  # whole ms: ms epochs
    sel, params = store.build_select(q)
    params.update(start=T0, end=T0 + 40 * S)
    qp = store._query_params(sel, params, "ms")
    body = requests.post(f"{influxd.url}/query", params=qp, headers={"Accept": "application/x-msgpack"},
                         timeout=10).content
    store.read_format = "json"
    plain = store.read(q, T0, T0 + 40 * S)
    store.read_format = "msgpack"

    def canned(*_: Any, **__: Any) -> requests.Response:
        r = requests.Response()
        r.status_code, r.raw = 200, _Pieces(body, piece)
        r.headers["Content-Type"] = "application/x-msgpack"
        return r

    store._request = canned  # type: ignore[method-assign]
    packed = store.read(q, T0, T0 + 40 * S)
    assert len(packed) == 30 and sum(len(t) for t, _ in packed.values()) == len(lines)
    assert [bool(np.isnan(packed[(("host", f"h{j:02d}"),)][1]).any()) for j in range(30)] == [
        j in irregular for j in range(30)]
    _assert_identical(packed, plain)
    for cut in (len(body) - 1, len(body) // 2, 30):  # the same answer cut inside a document: an error
        body_full, body = body, body[:cut]
        with pytest.raises(StoreError, match="broke off the answer"):
            store.read(q, T0, T0 + 40 * S)
        body = body_full


def test_msgpack_reads_sixteen_fields_and_series_half_regular_exactly_as_json(
        store: InfluxDB1Store, influxd: LocalInfluxd, database: str, decoded: dict[str, int]) -> None:
    names = [f"f{j:02d}" for j in range(16)]  # 17 columns: rows packed with a 3-byte array header
    lines = [f"wide,host=h{h} " + ",".join(f"{n}={i * 16 + j + h / 8!r}" for j, n in enumerate(names))
             + f" {T0 + i * S}" for h in range(3) for i in range(30)]
    # One series whose first chunk is regular and whose second has nulls: its packed rows meet decoded ones.
    lines += [f"half,host=a x={i}.5{'' if i < 20 else ',y=1.0' if i % 2 else ''} {T0 + i * S}" for i in range(40)]
    lines[-40:-20] = [f"half,host=a x={i}.5,y={i}.0 {T0 + i * S}" for i in range(20)]
    influxd.write_lines(database, "\n".join(lines))
    wide = _read_both(store, Query("wide", "", (), ("host",), S, fields=tuple(names)), T0, T0 + 30 * S)
    _assert_identical(*wide)
    assert wide[0][(("host", "h2"),)][1].shape == (30, 16) and decoded["msgpack"] == 0
    store.chunk_size = 20
    half = _read_both(store, Query("half", "", (), ("host",), S, fields=("x", "y")), T0, T0 + 40 * S)
    _assert_identical(*half)
    v = half[0][(("host", "a"),)][1]
    assert v.shape == (40, 2) and np.isnan(v[:, 1]).tolist() == [False] * 20 + [i % 2 == 0 for i in range(20, 40)]
    assert decoded["msgpack"] == 1  # the second chunk only
