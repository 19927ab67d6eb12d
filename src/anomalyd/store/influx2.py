"""InfluxDB 2.x through its native API: Flux reads on ``/api/v2/query``, line-protocol writes on ``/api/v2/write``.

The same :class:`~anomalyd.store.base.Store` protocol as :class:`~anomalyd.store.influx1.InfluxDB1Store` (``[influxdb]
api = "flux"`` with ``org`` and ``bucket``). Plain ``requests``, not ``influxdb-client``: that client turns every
row of an answer into a Python record with a ``datetime`` (microseconds: nanosecond times would be cut), and its
write API has its own batching thread, retry policy and exceptions; here the answer's annotated CSV is parsed
straight into arrays, and retries, backoff and error messages are the 1.x store's.

One Flux query per read: ``range`` (both ends included, as InfluxQL's ``time >= start AND time <= end``),
``filter`` on measurement, field and the ``where`` tags, ``group`` by the ``group_by`` tags, ``sort`` by time.
A read has one field, so no ``pivot`` is needed. Every string in a query is a Flux string literal with its
escapes (``\\``, ``"``, ``${``): nothing from the config or the data is pasted in raw.
"""

from __future__ import annotations

import csv
import json
import logging
from collections.abc import Iterable
from concurrent.futures import ThreadPoolExecutor
from typing import Any

import numpy as np
import requests
from numpy.typing import NDArray

from ..config import InfluxConfig
from ..core.records import Tags
from ..telemetry import INFLUX_ERRORS
from .base import (
    RETRY_BASE_S,
    Point,
    Query,
    SeriesData,
    SeriesPoints,
    StoreError,
    pipelined_write,
    retried,
    with_retries,
)

log = logging.getLogger(__name__)

#: The dialect asked of /api/v2/query: annotated CSV with nanosecond times.
DIALECT = {"header": True, "delimiter": ",", "annotations": ["datatype", "group", "default"],
           "commentPrefix": "#", "dateTimeFormat": "RFC3339Nano"}
_NUMERIC = ("double", "long", "unsignedLong")


class _ServerError(Exception):
    """A 5xx answer (retried)."""

    def __init__(self, response: requests.Response) -> None:
        self.response = response
        super().__init__(f"HTTP {response.status_code}")


def flux_string(s: str) -> str:
    """A Flux string literal holding exactly ``s``.

    Examples
    --------
    >>> print(flux_string('a"b\\\\c${x}'))
    "a\\"b\\\\c\\${x}"
    """
    out = (s.replace("\\", "\\\\").replace('"', '\\"').replace("${", "\\${").replace("\n", "\\n")
           .replace("\r", "\\r").replace("\t", "\\t"))
    return f'"{out}"'


def build_flux(bucket: str, query: Query, start_ns: int, end_ns: int) -> str:
    """The Flux script of a read: samples in ``[start_ns, end_ns]``, one table per ``group_by`` tag set.

    Examples
    --------
    >>> print(build_flux("b", Query("cpu", "load", (("dc", "eu"),), ("host",)), 10, 20))
    from(bucket: "b")
      |> range(start: time(v: 10), stop: time(v: 21))
      |> filter(fn: (r) => r["_measurement"] == "cpu" and r["_field"] == "load" and r["dc"] == "eu")
      |> group(columns: ["host"])
      |> sort(columns: ["_time"])
      |> keep(columns: ["_time", "_value", "host"])
    """
    fields = " or ".join(f'r["_field"] == {flux_string(f)}' for f in query.columns)
    cond = [f'r["_measurement"] == {flux_string(query.measurement)}',
            fields if len(query.columns) == 1 else f"({fields})"]
    cond += [f"r[{flux_string(k)}] == {flux_string(v)}" for k, v in query.where]
    if query.series and all(query.series):  # a series without tags: all of them
        def equal(k: str, v: str) -> str:
            col = f"r[{flux_string(k)}]"
            return f"{col} == {flux_string(v)}" if v else f"(not exists {col} or {col} == \"\")"

        cond.append("(" + " or ".join("(" + " and ".join(equal(k, v) for k, v in tags) + ")"
                                      for tags in query.series) + ")")
    by = (*query.group_by, "_field") if query.fields else query.group_by
    group = ", ".join(flux_string(g) for g in by)
    keep = ", ".join(flux_string(c) for c in ("_time", "_value", *by))
    return (f"from(bucket: {flux_string(bucket)})\n"
            f"  |> range(start: time(v: {int(start_ns)}), stop: time(v: {int(end_ns) + 1}))\n"
            f"  |> filter(fn: (r) => {' and '.join(cond)})\n"
            f"  |> group(columns: [{group}])\n"
            f'  |> sort(columns: ["_time"])\n'
            f"  |> keep(columns: [{keep}])")


def _times_ns(texts: list[str]) -> NDArray[np.int64]:
    """RFC 3339 UTC times (``...Z``, up to nanoseconds) to epoch nanoseconds, in one numpy call."""
    if not texts:
        return np.empty(0, dtype=np.int64)
    bare = [t[:-1] if t.endswith("Z") else t for t in texts]
    return np.array(bare, dtype="datetime64[ns]").astype(np.int64)


def _values(texts: list[str], kind: str, default: str) -> NDArray[np.float64]:
    if kind == "boolean":
        return np.array([np.nan if (t or default) == "" else float((t or default) == "true") for t in texts])
    return np.array([t or default or "nan" for t in texts], dtype=np.float64)


def parse_annotated_csv(lines: Iterable[str], group_by: tuple[str, ...], where: str = "InfluxDB",
                        skip_strings: bool = False) -> SeriesData:
    """An annotated-CSV answer of `build_flux` as ``{tags: (times ns, values)}``, keyed like the 1.x store (every
    ``group_by`` tag, "" where a series has none). An error table in the answer raises `StoreError`, and so does a
    table of strings unless ``skip_strings`` (it is then left out, and said).
    """
    parts: dict[Tags, tuple[list[str], list[str]]] = {}
    kinds: dict[Tags, str] = {}
    header: list[str] | None = None
    datatypes: list[str] = []
    defaults: list[str] = []
    error = skipping = False
    i_time = i_value = i_table = -1
    tag_idx: list[int] = []
    table = key = None
    times: list[str] = []
    values: list[str] = []
    value_kind = "double"
    value_default = ""
    for row in csv.reader(lines):
        if not row or row == [""]:  # a blank line ends a block of tables; annotations and a header follow
            header = None
            continue
        if row[0].startswith("#"):  # annotations: a new block of tables begins
            header = None
            if row[0] == "#datatype":
                datatypes = row
            elif row[0] == "#default":
                defaults = row
            continue
        if header is None:
            header = row
            skipping = False
            error = row[1:3] == ["error", "reference"]
            if error:
                continue
            try:
                i_time, i_value, i_table = row.index("_time"), row.index("_value"), row.index("table")
            except ValueError:
                raise StoreError(f"{where} answered a table without _time and _value columns: {row!r}") from None
            tag_idx = [row.index(g) if g in row else -1 for g in group_by]
            value_kind = datatypes[i_value] if len(datatypes) > i_value else "double"
            value_default = defaults[i_value] if len(defaults) > i_value else ""
            if value_kind not in (*_NUMERIC, "boolean") and skip_strings:
                log.warning("%s: a table of %s values is read as missing (%s); write numbers to the field",
                            where, value_kind, ",".join(row))
                skipping = True  # its rows are skipped until the next header
                continue
            if value_kind not in (*_NUMERIC, "boolean"):
                raise StoreError(f"{where}: the field holds {value_kind} values; anomalyd reads numbers (float, "
                                 "integer or boolean fields)")
            table = None
            continue
        if skipping:
            continue
        if error:
            msg = row[1] if len(row) > 1 else ",".join(row)
            ref = f" (reference {row[2]})" if len(row) > 2 and row[2] else ""
            raise StoreError(f"{where} rejected the query: {msg}{ref}")
        if row[i_table] != table:
            table = row[i_table]
            key = tuple(sorted((g, row[i] if i >= 0 else "") for g, i in zip(group_by, tag_idx, strict=True)))
            times, values = parts.setdefault(key, ([], []))
            kinds[key] = value_kind + "\0" + value_default
        times.append(row[i_time])
        values.append(row[i_value])
    out: SeriesData = {}
    for key, (ts, vs) in parts.items():
        kind, default = kinds[key].split("\0")
        t = _times_ns(ts)
        v = _values(vs, kind, default)
        if len(t) > 1 and np.any(np.diff(t) < 0):  # a key split over several tables: keep time order
            order = np.argsort(t, kind="stable")
            t, v = t[order], v[order]
        out[key] = (t, v)
    return out


def join_fields(per_field: SeriesData, fields: tuple[str, ...]) -> SeriesData:
    """Series keyed by their tags plus ``_field`` joined into one series per tag set, values shaped
    ``(times, len(fields))`` over the union of the fields' times, NaN where a field has no sample.

    Examples
    --------
    >>> import numpy as np
    >>> got = join_fields({(("_field", "a"), ("h", "x")): (np.array([1, 2]), np.array([1.0, 2.0])),
    ...                    (("_field", "b"), ("h", "x")): (np.array([2, 3]), np.array([5.0, 6.0]))}, ("a", "b"))
    >>> got[(("h", "x"),)][0].tolist(), got[(("h", "x"),)][1].tolist()
    ([1, 2, 3], [[1.0, nan], [2.0, 5.0], [nan, 6.0]])
    """
    groups: dict[Tags, dict[str, tuple[NDArray[np.int64], NDArray[np.float64]]]] = {}
    for key, tv in per_field.items():
        name = dict(key).get("_field", "")
        groups.setdefault(tuple(kv for kv in key if kv[0] != "_field"), {})[name] = tv
    out: SeriesData = {}
    for tags, by_name in groups.items():
        times = np.unique(np.concatenate([t for t, _ in by_name.values()]))
        values = np.full((len(times), len(fields)), np.nan)
        for j, name in enumerate(fields):
            if name in by_name:
                t, v = by_name[name]
                values[np.searchsorted(times, t), j] = v
        out[tags] = (times, values)
    return out


class InfluxDB2FluxStore:
    """InfluxDB 2.x: Flux reads and line-protocol writes in ``influxdb.org`` / ``influxdb.bucket``, token auth."""

    def __init__(self, cfg: InfluxConfig, write_batch: int = 10_000) -> None:
        self.cfg = cfg
        self.write_batch = write_batch
        self.retry_base_s = RETRY_BASE_S
        self._sender = ThreadPoolExecutor(1, thread_name_prefix="influx2-write")
        self.session = requests.Session()
        self.session.verify = cfg.verify_ssl
        self.session.headers["Accept-Encoding"] = "gzip" if cfg.gzip else "identity"
        if cfg.token:
            self.session.headers["Authorization"] = f"Token {cfg.token}"

    def __repr__(self) -> str:
        return f"InfluxDB2FluxStore(url={self.cfg.url!r}, org={self.cfg.org!r}, bucket={self.cfg.bucket!r})"

    # -- low level ---------------------------------------------------------------------------------
    def _request(self, op: str, method: str, path: str, params: dict[str, str] | None = None,
                 data: bytes | None = None, headers: dict[str, str] | None = None,
                 expected: tuple[int, ...] = (200,), stream: bool = False) -> requests.Response:
        url = self.cfg.url + path
        retries = self.cfg.retries

        def attempt() -> requests.Response:
            r = self.session.request(method, url, params=params, data=data, headers=headers,
                                     timeout=self.cfg.timeout_s, stream=stream)
            if r.status_code >= 500:
                raise _ServerError(r)
            return r

        def retryable(exc: Exception) -> str | None:
            if isinstance(exc, requests.ConnectionError | requests.Timeout):
                return type(exc).__name__
            if isinstance(exc, _ServerError):
                return f"HTTP {exc.response.status_code}: {_message(exc.response)[:200]}"
            return None

        try:
            r = with_retries(attempt, retries, op, self.cfg.url, retryable, self.retry_base_s)
        except (requests.ConnectionError, requests.Timeout) as exc:
            INFLUX_ERRORS.labels(op=op).inc()
            raise StoreError(f"InfluxDB at {self.cfg.url} is unreachable ({type(exc).__name__}){retried(retries)}; "
                             "check influxdb.url and that influxd is running") from exc
        except _ServerError as exc:
            INFLUX_ERRORS.labels(op=op).inc()
            raise StoreError(f"InfluxDB at {self.cfg.url} failed the {op}{retried(retries)} (HTTP "
                             f"{exc.response.status_code}): {_message(exc.response)}") from exc
        if r.status_code not in expected:
            INFLUX_ERRORS.labels(op=op).inc()
            msg = _message(r)
            raise StoreError(f"InfluxDB at {url} refused the {op} (HTTP {r.status_code}): {msg}"
                             f"{self._hint(r.status_code, msg)}")
        return r

    def _hint(self, status: int, msg: str) -> str:
        low = msg.lower()
        if status in (401, 403):
            if not self.cfg.token:
                return "; set ANOMALYD_INFLUXDB_TOKEN (or influxdb.token_file) to an API token of the org"
            return (f"; check that the token (ANOMALYD_INFLUXDB_TOKEN or influxdb.token_file) is valid and may "
                    f"read and write bucket {self.cfg.bucket!r}")
        if status == 404 and "organization" in low:
            return f"; fix influxdb.org={self.cfg.org!r} (the org's name or ID)"
        if status == 404 and "bucket" in low:
            return f"; create the bucket (influx bucket create -n {self.cfg.bucket}) or fix influxdb.bucket"
        if status == 404:
            return ('; this server has no /api/v2 API (InfluxDB 1.x or 3.x?): use influxdb.api = "influxql"')
        if status == 413:
            return "; lower daemon.write_batch"
        return ""

    # -- Store -------------------------------------------------------------------------------------
    def ping(self) -> str:
        r = self._request("ping", "GET", "/ping", expected=(204, 200))
        return r.headers.get("X-Influxdb-Version", "unknown")

    def read(self, query: Query, start_ns: int, end_ns: int) -> SeriesData:
        flux = build_flux(self.cfg.bucket, query, start_ns, end_ns)
        body = json.dumps({"query": flux, "type": "flux", "dialect": DIALECT}).encode()
        r = self._request("query", "POST", "/api/v2/query", {"org": self.cfg.org}, body,
                          {"Content-Type": "application/json", "Accept": "application/csv"}, stream=True)
        # Parsed as it arrives; lines split on "\n" only (splitting on "\r" too would invent a blank line, which
        # ends a block of tables, wherever a chunk ends between "\r" and "\n").
        with r:
            lines = (b.rstrip(b"\r").decode() for b in r.iter_lines(chunk_size=1 << 16, delimiter=b"\n"))
            try:
                if query.fields:
                    return join_fields(parse_annotated_csv(lines, (*query.group_by, "_field"),
                                                           f"InfluxDB at {self.cfg.url}", skip_strings=True),
                                       query.fields)
                return parse_annotated_csv(lines, query.group_by, f"InfluxDB at {self.cfg.url}")
            except StoreError:
                INFLUX_ERRORS.labels(op="query").inc()
                raise
            except (requests.ConnectionError, requests.exceptions.ChunkedEncodingError) as exc:
                INFLUX_ERRORS.labels(op="query").inc()
                raise StoreError(f"InfluxDB at {self.cfg.url} broke off the answer ({type(exc).__name__}); "
                                 "check that influxd is running") from exc


    def write(self, points: Iterable[Point | SeriesPoints], retention_policy: str = "") -> None:
        """Line protocol to /api/v2/write in batches of ``write_batch`` lines (a few formatted ahead while one is
        in flight, `pipelined_write`). ``retention_policy`` has no meaning in 2.x: everything goes to the bucket."""
        pipelined_write(points, self.write_batch, self._sender, self._post_write)

    def _post_write(self, body: bytes) -> None:
        self._request("write", "POST", "/api/v2/write",
                      {"org": self.cfg.org, "bucket": self.cfg.bucket, "precision": "ns"}, body,
                      {"Content-Type": "text/plain; charset=utf-8"}, expected=(204,))


def _message(r: requests.Response) -> str:
    """The ``message`` of a 2.x JSON error body, else the body's text."""
    text = r.text.strip()
    try:
        doc: Any = json.loads(text)
    except ValueError:
        return text[:500] or r.reason or ""
    if isinstance(doc, dict) and doc.get("message"):
        return str(doc["message"])
    return text[:500]
