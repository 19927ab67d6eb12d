"""InfluxDB 2.x and 3.x: the Flux store and the token on the InfluxQL path, against a local HTTP stand-in.

No real 2.x or 3.x server runs here: the stand-in answers as the 2.x API documents (``/api/v2/query`` takes a JSON
body and answers annotated CSV; ``/api/v2/write`` takes line protocol and answers 204; errors are JSON with a
``message``; a wrong token is a 401), with the recorded answers in ``tests/data/flux_*``. It checks what it is
sent (token header, org, bucket, precision, the Flux script) and refuses what a real server would refuse.
"""

from __future__ import annotations

import json
import logging
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from anomalyd.cli import _store
from anomalyd.config import ConfigError, InfluxConfig, from_dict
from anomalyd.store.base import Point, Query, SeriesPoints, StoreError
from anomalyd.store.influx1 import InfluxDB1Store
from anomalyd.store.influx2 import InfluxDB2FluxStore, build_flux, parse_annotated_csv
from anomalyd.store.local import free_port
from conftest import make_config
from http_stubs import Recorded, Reply, StubServer

DATA = Path(__file__).parent / "data"
S = 10**9
T0 = 1_700_000_000 * S  # 2023-11-14T22:13:20Z
TOKEN = "s3cr3t-T0ken_value=="
ORG, BUCKET = "acme", "telemetry"


def recorded(name: str) -> bytes:
    return (DATA / name).read_bytes()


def unauthorized() -> Reply:
    return Reply(401, json.loads(recorded("flux_unauthorized.json")))


class Influx2Stub(StubServer):
    """InfluxDB 2.x as its API documents: /ping, /api/v2/query (Flux), /api/v2/write, and the 1.x compatibility
    endpoints /query and /write (the InfluxQL path through a DBRP mapping). Every request but /ping needs
    ``Authorization: Token <token>``; the query answer is ``self.answer`` (annotated CSV)."""

    def __init__(self, token: str = TOKEN) -> None:
        super().__init__()
        self.token = token
        self.answer = recorded("flux_empty.csv")
        self.influxql_answer: dict[str, Any] = {"results": [{"statement_id": 0}]}

    def default_reply(self, rec: Recorded) -> Reply:
        if rec.path == "/ping":
            return Reply(204, headers={"X-Influxdb-Version": "v2.7.10", "X-Influxdb-Build": "OSS"})
        if rec.headers.get("Authorization") != f"Token {self.token}":
            return unauthorized()
        if rec.path == "/api/v2/query":
            if rec.query.get("org") != [ORG]:
                return Reply(404, {"code": "not found", "message": f"organization name \"{rec.query.get('org')}\" "
                                                                   "not found"})
            body = rec.json or {}
            if body.get("type") != "flux" or not isinstance(body.get("query"), str):
                return Reply(400, {"code": "invalid", "message": "failed to decode request body"})
            if f'from(bucket: "{BUCKET}")' not in body["query"]:
                return Reply(404, {"code": "not found", "message": "failed to initialize execute state: could not "
                                                                   "find bucket \"other\""})
            return Reply(200, self.answer)
        if rec.path == "/api/v2/write":
            if rec.query.get("org") != [ORG] or rec.query.get("bucket") != [BUCKET]:
                return Reply(404, {"code": "not found", "message": f"bucket \"{rec.query.get('bucket')}\" not found"})
            if rec.query.get("precision") != ["ns"]:
                return Reply(400, {"code": "invalid", "message": "precision missing"})
            return Reply(204)
        if rec.path == "/query":
            return Reply(200, self.influxql_answer)
        if rec.path == "/write":
            return Reply(204)
        return Reply(404, {"code": "not found", "message": "path not found"})


@pytest.fixture
def stub() -> Any:
    with Influx2Stub() as s:
        yield s


def flux_cfg(url: str, **changes: Any) -> InfluxConfig:
    base = dict(url=url, api="flux", org=ORG, bucket=BUCKET, token=TOKEN, timeout_s=5.0, retries=0)
    base.update(changes)
    return InfluxConfig(**base)


def fast(store: Any) -> Any:
    store.retry_base_s = 0.01
    return store


# -- reads ---------------------------------------------------------------------------------------------------


def test_a_read_of_two_series_grouped_by_tags(stub: Influx2Stub) -> None:
    stub.answer = recorded("flux_two_series.csv")
    store = InfluxDB2FluxStore(flux_cfg(stub.url))
    q = Query("cpu", "load", (("region", 'we"st'),), ("dc", "host"), S)
    data = store.read(q, T0, T0 + 10 * S)
    assert set(data) == {(("dc", "eu"), ("host", "h1")), (("dc", ""), ("host", "h2"))}  # "" as 1.x: no such tag
    t, v = data[(("dc", "eu"), ("host", "h1"))]
    assert t.dtype == np.int64 and t.tolist() == [T0, T0 + S + 1, T0 + 2 * S]  # nanoseconds kept
    assert v.dtype == np.float64 and v.tolist() == [1.5, 2.5, -3.25]
    assert data[(("dc", ""), ("host", "h2"))][1].tolist() == [10.0, 11.0]
    [rec] = stub.recorded("/api/v2/query")
    assert rec.method == "POST" and rec.query["org"] == [ORG]
    assert rec.headers["Authorization"] == f"Token {TOKEN}" and rec.headers["Accept"] == "application/csv"
    body = rec.json
    assert body["type"] == "flux" and body["dialect"]["annotations"] == ["datatype", "group", "default"]
    assert body["dialect"]["dateTimeFormat"] == "RFC3339Nano"
    flux = body["query"]
    assert flux == build_flux(BUCKET, q, T0, T0 + 10 * S)
    assert f"range(start: time(v: {T0}), stop: time(v: {T0 + 10 * S + 1}))" in flux  # the end is included
    assert 'r["_measurement"] == "cpu"' in flux and 'r["_field"] == "load"' in flux
    assert 'r["region"] == "we\\"st"' in flux  # the quote is escaped, not closing the literal
    assert 'group(columns: ["dc", "host"])' in flux


def test_a_long_answer_arriving_in_many_chunks_is_read_exactly(stub: Influx2Stub) -> None:
    n = 6000  # ~300 kB: several 64 kB chunks
    head = recorded("flux_two_series.csv").split(b"\r\n")[:4]
    rows = [f",,{j},{np.datetime_as_string(np.datetime64(T0 + i * S + j, 'ns'))}Z,{i * 0.5 + j},d{j},h{j}"
            for j in range(2) for i in range(n)]
    body = b"\r\n".join(head) + b"\r\n" + "\r\n".join(rows).encode() + b"\r\n\r\n"
    # Lengthen the #default row's (unused) default for `result` so that the first 64 kB chunk ends on a "\r".
    pad = 65535 - body.rindex(b"\r", 0, 65536)
    stub.answer = body.replace(b"#default,_result", b"#default,_result" + b"x" * pad, 1)
    assert stub.answer[65535:65537] == b"\r\n"
    data = InfluxDB2FluxStore(flux_cfg(stub.url)).read(Query("cpu", "load", (), ("dc", "host"), S), T0, T0 + n * S)
    for j in range(2):
        t, v = data[(("dc", f"d{j}"), ("host", f"h{j}"))]
        assert t.tolist() == [T0 + i * S + j for i in range(n)] and v.tolist() == [i * 0.5 + j for i in range(n)]


def test_an_empty_answer_is_no_series(stub: Influx2Stub) -> None:
    stub.answer = recorded("flux_empty.csv")
    assert InfluxDB2FluxStore(flux_cfg(stub.url)).read(Query("cpu", "load", (), ("host",), S), T0, T0 + S) == {}


def test_integer_and_boolean_fields_are_read_as_numbers(stub: Influx2Stub) -> None:
    store = InfluxDB2FluxStore(flux_cfg(stub.url))
    stub.answer = recorded("flux_integer_field.csv")
    data = store.read(Query("m", "n", (), (), S), T0, T0 + S)
    assert list(data) == [()] and data[()][1].tolist() == [7.0, -8.0]
    stub.answer = recorded("flux_boolean_field.csv")  # training reads the `anomalous` field back
    data = store.read(Query("anomaly_error", "anomalous", (("signal", "s"),), ("series",), S), T0, T0 + 10 * S)
    assert data[(("series", "patient=a"),)][1].tolist() == [0.0, 1.0]
    assert data[(("series", "patient=b,x"),)][0].tolist() == [T0 + S // 2]


def test_injection_through_flux_strings_is_escaped() -> None:
    flux = build_flux('b"); drop()', Query('m${x}', "f\\", (("t", '") or true or ("'),), ("g\n",), S), 0, 1)
    assert 'from(bucket: "b\\"); drop()")' in flux
    assert '"m\\${x}"' in flux and '"f\\\\"' in flux and '"\\") or true or (\\""' in flux and '"g\\n"' in flux


def test_an_error_answer_is_a_store_error_naming_the_url_and_not_retried(stub: Influx2Stub) -> None:
    stub.script(Reply(400, json.loads(recorded("flux_error_400.json")), path="/api/v2/query"))
    store = InfluxDB2FluxStore(flux_cfg(stub.url, retries=3))
    with pytest.raises(StoreError) as info:
        store.read(Query("cpu", "load", (), (), S), T0, T0 + S)
    msg = str(info.value)
    assert f"{stub.url}/api/v2/query" in msg and "HTTP 400" in msg
    assert "undefined identifier rnage" in msg and "{" not in msg  # the JSON's message, not the JSON
    assert len(stub.recorded("/api/v2/query")) == 1  # a 4xx is not retried
    assert TOKEN not in msg


def test_an_error_table_inside_a_200_answer_is_a_store_error(stub: Influx2Stub) -> None:
    stub.answer = recorded("flux_error_table.csv")
    with pytest.raises(StoreError, match=r'rejected the query: runtime error .*column "_value" is both'):
        InfluxDB2FluxStore(flux_cfg(stub.url)).read(Query("cpu", "load", (), (), S), T0, T0 + S)


def test_a_wrong_org_or_bucket_names_the_key_to_fix(stub: Influx2Stub) -> None:
    with pytest.raises(StoreError, match=r"HTTP 404.*organization.*fix influxdb.org='nope'"):
        InfluxDB2FluxStore(flux_cfg(stub.url, org="nope")).read(Query("m", "v", (), (), S), T0, T0 + S)
    with pytest.raises(StoreError, match=r"HTTP 404.*bucket.*influx bucket create -n other.*influxdb.bucket"):
        InfluxDB2FluxStore(flux_cfg(stub.url, bucket="other")).write([Point("m", (), (("v", 1.0),), T0)])


def test_a_text_field_is_refused_with_a_clear_message() -> None:
    text = ("#datatype,string,long,dateTime:RFC3339Nano,string\r\n,result,table,_time,_value\r\n"
            ",,0,2023-11-14T22:13:20Z,up\r\n")
    with pytest.raises(StoreError, match="holds string values; anomalyd reads numbers"):
        parse_annotated_csv(text.splitlines(), ())


# -- writes --------------------------------------------------------------------------------------------------


def test_a_write_goes_to_the_bucket_in_batches_as_line_protocol(stub: Influx2Stub) -> None:
    store = InfluxDB2FluxStore(flux_cfg(stub.url), write_batch=2)
    block = SeriesPoints("anomaly_error", (("series", "host=a b"), ("signal", "cpu")), ("error", "anomalous"),
                         ([0.5, 1.25, 2.0], [False, True, False]), [T0, T0 + S, T0 + 2 * S])
    store.write(iter([block, Point("anomalyd_stats", (), (("n", 3),), T0 + 3 * S)]))  # a generator, as the worker
    reqs = stub.recorded("/api/v2/write")
    assert [r.status for r in reqs] == [204, 204]
    for r in reqs:
        assert r.query == {"org": [ORG], "bucket": [BUCKET], "precision": ["ns"]}
        assert r.headers["Authorization"] == f"Token {TOKEN}"
    lines = b"\n".join(r.body for r in reqs).decode().split("\n")
    assert lines == [
        f"anomaly_error,series=host\\=a\\ b,signal=cpu error=0.5,anomalous=false {T0}",
        f"anomaly_error,series=host\\=a\\ b,signal=cpu error=1.25,anomalous=true {T0 + S}",
        f"anomaly_error,series=host\\=a\\ b,signal=cpu error=2.0,anomalous=false {T0 + 2 * S}",
        f"anomalyd_stats n=3i {T0 + 3 * S}"]


def test_writes_and_reads_are_retried_on_5xx_with_a_log_line_each(stub: Influx2Stub,
                                                                   caplog: pytest.LogCaptureFixture) -> None:
    store = fast(InfluxDB2FluxStore(flux_cfg(stub.url, retries=2)))
    stub.script(Reply(503, {"code": "unavailable", "message": "too many requests in flight"}, path="/api/v2/write"),
                Reply(500, {"code": "internal error", "message": "engine: cache full"}, path="/api/v2/write"))
    with caplog.at_level(logging.WARNING, logger="anomalyd.store.influx1"):
        store.write([Point("m", (), (("v", 1.0),), T0)])
    assert [r.status for r in stub.recorded("/api/v2/write")] == [503, 500, 204]
    retries = [r.getMessage() for r in caplog.records if "retry" in r.getMessage()]
    assert len(retries) == 2 and "retry 1 of 2" in retries[0] and "HTTP 503" in retries[0]
    assert "cache full" in retries[1] and TOKEN not in " ".join(retries)
    stub.script(*[Reply(502, b"bad gateway", path="/api/v2/query")] * 3)
    with pytest.raises(StoreError, match=r"failed the query after 2 retries \(HTTP 502\): bad gateway"):
        store.read(Query("m", "v", (), (), S), T0, T0 + S)
    assert len(stub.recorded("/api/v2/query")) == 3


def test_an_unreachable_server_is_retried_then_a_clear_store_error(caplog: pytest.LogCaptureFixture) -> None:
    url = f"http://127.0.0.1:{free_port()}"
    store = fast(InfluxDB2FluxStore(flux_cfg(url, retries=2)))
    for call in (store.ping, lambda: store.read(Query("m", "v", (), (), S), 0, S),
                 lambda: store.write([Point("m", (), (("v", 1.0),), 1)])):
        caplog.clear()
        with caplog.at_level(logging.WARNING, logger="anomalyd.store.influx1"):
            with pytest.raises(StoreError, match=r"unreachable \(ConnectionError\) after 2 retries; check "
                                                 r"influxdb.url"):
                call()
        assert sum("retry" in r.getMessage() for r in caplog.records) == 2


# -- tokens --------------------------------------------------------------------------------------------------


def test_a_wrong_or_missing_token_is_refused_with_the_fix_and_never_shown(stub: Influx2Stub) -> None:
    wrong = "wrong-token-value"
    with pytest.raises(StoreError) as info:
        InfluxDB2FluxStore(flux_cfg(stub.url, token=wrong)).read(Query("m", "v", (), (), S), T0, T0 + S)
    msg = str(info.value)
    assert "HTTP 401" in msg and "unauthorized access" in msg and "ANOMALYD_INFLUXDB_TOKEN" in msg
    assert wrong not in msg
    with pytest.raises(StoreError, match=r"HTTP 401.*set ANOMALYD_INFLUXDB_TOKEN"):
        InfluxDB2FluxStore(flux_cfg(stub.url, token="")).write([Point("m", (), (("v", 1.0),), T0)])
    assert "Authorization" not in stub.recorded("/api/v2/write")[-1].headers
    store = InfluxDB2FluxStore(flux_cfg(stub.url))
    assert TOKEN not in repr(store) and TOKEN not in repr(store.cfg)
    assert store.ping() == "v2.7.10"


def test_the_influxql_path_sends_the_token_to_2x_and_3x(stub: Influx2Stub) -> None:
    stub.influxql_answer = {"results": [{"statement_id": 0, "series": [
        {"name": "cpu", "tags": {"host": "h1"}, "columns": ["time", "load"], "values": [[T0, 1.5], [T0 + S, 2.5]]}]}]}
    store = InfluxDB1Store(InfluxConfig(url=stub.url, database="telegraf", token=TOKEN, username="u", password="p",
                                        timeout_s=5, retries=0))
    data = store.read(Query("cpu", "load", (), ("host",), S), T0, T0 + S)
    assert data[(("host", "h1"),)][1].tolist() == [1.5, 2.5]
    store.write([Point("m", (), (("v", 1.0),), T0)])
    for rec in stub.recorded("/query") + stub.recorded("/write"):
        assert rec.headers["Authorization"] == f"Token {TOKEN}"  # not Basic u:p
    assert stub.recorded("/query")[0].query["db"] == ["telegraf"]
    bad = InfluxDB1Store(InfluxConfig(url=stub.url, database="telegraf", token="nope", timeout_s=5, retries=0))
    with pytest.raises(StoreError, match=r"HTTP 401.*check the API token \(ANOMALYD_INFLUXDB_TOKEN") as info:
        bad.write([Point("m", (), (("v", 1.0),), T0)])
    assert "nope" not in str(info.value)
    assert TOKEN not in repr(store.cfg)


def test_influxql_ping_accepts_a_3x_answer() -> None:
    class V3(StubServer):
        def default_reply(self, rec: Recorded) -> Reply:
            return Reply(200, {"version": "3.1.0", "revision": "abc"}, path="/ping")

    with V3() as v3:
        assert InfluxDB1Store(InfluxConfig(url=v3.url, token=TOKEN, retries=0)).ping()
        assert v3.requests[0].headers["Authorization"] == f"Token {TOKEN}"


# -- configuration and the store factory ---------------------------------------------------------------------


def raw_cfg(**influx: Any) -> dict[str, Any]:
    return {"influxdb": {"url": "http://127.0.0.1:8086", **influx},
            "signals": [{"name": "s", "measurement": "m", "field": "v", "period": "1s"}]}


def test_token_is_a_secret_from_the_environment_or_a_file(tmp_path: Path) -> None:
    cfg = from_dict(raw_cfg(), env={"ANOMALYD_INFLUXDB_TOKEN": TOKEN})
    assert cfg.influxdb.token == TOKEN and TOKEN not in repr(cfg)
    f = tmp_path / "token"
    f.write_text(TOKEN + "\n")
    assert from_dict(raw_cfg(token_file=str(f)), env={}).influxdb.token == TOKEN
    with pytest.raises(ConfigError, match=r"influxdb.token: secrets are not read from the config file; set "
                                          r"ANOMALYD_INFLUXDB_TOKEN or token_file") as info:
        from_dict(raw_cfg(token=TOKEN), env={})
    assert TOKEN not in str(info.value)
    with pytest.raises(ConfigError, match=r"influxdb.token_file: .* cannot be read"):
        from_dict(raw_cfg(token_file=str(tmp_path / "missing")), env={})


def test_flux_needs_org_and_bucket_and_api_is_checked() -> None:
    with pytest.raises(ConfigError) as info:
        from_dict(raw_cfg(api="flux"), env={})
    assert any(p.startswith('influxdb.org: is required when influxdb.api = "flux"') for p in info.value.problems)
    assert any(p.startswith('influxdb.bucket: is required when influxdb.api = "flux"') for p in info.value.problems)
    with pytest.raises(ConfigError, match=r"influxdb.api: 'sql' is not one of: influxql, flux"):
        from_dict(raw_cfg(api="sql"), env={})
    cfg = from_dict(raw_cfg(api="flux", org=ORG), env={"ANOMALYD_INFLUXDB_BUCKET": BUCKET})
    assert (cfg.influxdb.api, cfg.influxdb.org, cfg.influxdb.bucket) == ("flux", ORG, BUCKET)
    assert from_dict(raw_cfg(), env={}).influxdb.api == "influxql"


def test_the_cli_picks_the_store_from_influxdb_api(tmp_path: Path) -> None:
    cfg = make_config("http://127.0.0.1:8086", "db", tmp_path)
    assert type(_store(cfg)) is InfluxDB1Store
    flux = make_config("http://127.0.0.1:8086", "db", tmp_path, influxdb={"api": "flux", "org": ORG,
                                                                          "bucket": BUCKET})
    store = _store(flux)
    assert isinstance(store, InfluxDB2FluxStore) and store.cfg.bucket == BUCKET


def test_several_fields_are_read_in_one_flux_query_and_joined_per_series(stub: Influx2Stub,
                                                                          caplog: pytest.LogCaptureFixture) -> None:
    # The answer's shape for group(columns: ["host", "_field"]): one table per host and field; a table of
    # another datatype starts a new block with its own annotations; a table of strings is read as missing.
    stub.answer = (
        b"#datatype,string,long,dateTime:RFC3339Nano,double,string,string\r\n"
        b"#group,false,false,false,false,true,true\r\n"
        b"#default,_result,,,,,\r\n"
        b",result,table,_time,_value,_field,host\r\n"
        b",,0,2023-11-14T22:13:20Z,1.5,a,h1\r\n"
        b",,0,2023-11-14T22:13:21Z,2.5,a,h1\r\n"
        b",,1,2023-11-14T22:13:21Z,7,b,h1\r\n"
        b",,2,2023-11-14T22:13:20Z,3,a,h2\r\n"
        b"\r\n"
        b"#datatype,string,long,dateTime:RFC3339Nano,string,string,string\r\n"
        b"#group,false,false,false,false,true,true\r\n"
        b"#default,_result,,,,,\r\n"
        b",result,table,_time,_value,_field,host\r\n"
        b",,3,2023-11-14T22:13:20Z,oops,b,h2\r\n"
        b"\r\n")
    store = InfluxDB2FluxStore(flux_cfg(stub.url))
    q = Query("m", "a", (), ("host",), S, fields=("a", "b"))
    with caplog.at_level(logging.WARNING):
        data = store.read(q, T0, T0 + 10 * S)
    t, v = data[(("host", "h1"),)]
    assert t.tolist() == [T0, T0 + S] and np.array_equal(v, [[1.5, np.nan], [2.5, 7.0]], equal_nan=True)
    t, v = data[(("host", "h2"),)]
    assert t.tolist() == [T0] and np.array_equal(v, [[3.0, np.nan]], equal_nan=True)
    assert any("string values is read as missing" in r.message for r in caplog.records)
    flux = stub.recorded("/api/v2/query")[0].json["query"]
    assert '(r["_field"] == "a" or r["_field"] == "b")' in flux and 'group(columns: ["host", "_field"])' in flux
