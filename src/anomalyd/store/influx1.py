"""The InfluxDB 1.x adapter (InfluxQL): read many series of a signal in one query, write points in batches.

Identifiers are always double-quoted with escaping, and tag values and times are always bound parameters:
nothing from the config or the data is pasted into InfluxQL. Answers are read as MessagePack (see
`InfluxDB1Store.read_format`).
"""

from __future__ import annotations

import functools
import gc
import json
import logging
import math
import struct
from collections.abc import Callable, Iterable, Iterator, Sequence
from concurrent.futures import ThreadPoolExecutor
from typing import Any
from urllib.parse import urlsplit

import msgpack
import numpy as np
import orjson
import requests
from influxdb import InfluxDBClient
from influxdb.exceptions import InfluxDBClientError, InfluxDBServerError
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


def quote_ident(name: str) -> str:
    """Quote an InfluxQL identifier, escaping backslashes and double quotes.

    Examples
    --------
    >>> quote_ident('cpu')
    '"cpu"'
    >>> quote_ident('a"b')
    '"a\\\\"b"'
    """
    return '"' + name.replace("\\", "\\\\").replace('"', '\\"') + '"'



def _retryable_v1(exc: Exception) -> str | None:
    """Connection errors, timeouts and 5xx answers are worth another try; 4xx answers are not."""
    if isinstance(exc, requests.ConnectionError | requests.Timeout):
        return type(exc).__name__
    if isinstance(exc, InfluxDBServerError):
        return f"server error: {str(exc).strip()[:200]}"
    return None



_reported_strings: set[tuple[str, str]] = set()


def _number(v: Any) -> float:
    """A field value as a float: null and strings (a field written as a string in some points) are NaN."""
    if v is None or isinstance(v, str):
        return math.nan
    return float(v)


def _rows_to_matrix(rows: list[list[Any]], ms: bool, query: Query) -> tuple[NDArray[np.int64], NDArray[np.float64]]:
    """``[[time, v1, v2, ...], ...]`` rows of a several-field read to (times ns, values ``(rows, fields)``); a
    string value is read as missing, and said once per field."""
    k = len(query.columns)
    scale = 1_000_000 if ms else 1
    t = np.fromiter((r[0] for r in rows), dtype=np.int64, count=len(rows)) * scale
    try:
        v = np.array(rows, dtype=np.float64)[:, 1:].reshape(-1, k)
    except (TypeError, ValueError):  # nulls or strings: the careful path
        v = np.array([[_number(x) for x in r[1:]] for r in rows], dtype=np.float64).reshape(-1, k)
        for j, name in enumerate(query.columns):
            n_str = sum(isinstance(r[j + 1], str) for r in rows)
            if n_str and (query.measurement, name) not in _reported_strings:
                _reported_strings.add((query.measurement, name))
                log.warning("field %r of measurement %r holds strings in %d points: they are read as missing; "
                            "write numbers to it (or drop the field from the signal)", name, query.measurement,
                            n_str)
    return t, v


def _rows_to_arrays(rows: list[list[Any]], ms: bool) -> tuple[NDArray[np.int64], NDArray[np.float64]]:
    """``[[time, value], ...]`` rows to (epoch-ns int64 times, float values; null becomes NaN)."""
    if ms:
        try:
            a = np.array(rows, dtype=np.float64).reshape(-1, 2)
            return a[:, 0].astype(np.int64) * 1_000_000, a[:, 1].copy()
        except (TypeError, ValueError):  # a null value in a row: take the careful path
            pass
    scale = 1_000_000 if ms else 1
    t = np.fromiter((r[0] for r in rows), dtype=np.int64, count=len(rows)) * scale
    v = np.fromiter((np.nan if r[1] is None else r[1] for r in rows), dtype=np.float64, count=len(rows))
    return t, v


# -- MessagePack answers ------------------------------------------------------------------------------------------
# influxd 1.4 and later (and 2.x's /query) answer ``Accept: application/x-msgpack`` with the documents of the JSON
# answer, packed and back to back: one per chunk, and a chunk holds one series (or a part of a long one). A row of an
# int64 time and float64 values is then a record of fixed size, so `_scan` finds each series by its few header
# bytes, checks the type bytes of its rows, and keeps the rows as they are: a batch of them becomes arrays in one
# numpy call, with no Python object per value. A document of any other shape (nulls, strings, integers, errors,
# messages, a key order of another server) is decoded by the msgpack package and read as a JSON document is.

MSGPACK = "application/x-msgpack"
_U16 = struct.Struct(">H").unpack_from
_U32 = struct.Struct(">I").unpack_from
_DOC = b"\x81\xa7results\x91"  # {"results": [ one result
_STATEMENT_ID = b"\xacstatement_id"
_SERIES = b"\xa6series"
_PARTIAL = b"\xa7partial"
_NAME = b"\xa4name"
_TAGS = b"\xa4tags"


class _Irregular(Exception):
    """The document is not of the shape `_scan` reads (or the buffer ends before it can tell)."""


def _mp_str(buf: bytes, pos: int) -> tuple[str, int]:
    """The packed string at ``buf[pos]`` and the position after it (IndexError if the buffer ends first)."""
    b = buf[pos]
    if 0xA0 <= b <= 0xBF:
        start = pos + 1
        end = start + b - 0xA0
    elif b == 0xD9:
        start = pos + 2
        end = start + buf[pos + 1]
    elif b == 0xDA:
        start = pos + 3
        end = start + _U16(buf, pos + 1)[0]
    elif b == 0xDB:
        start = pos + 5
        end = start + _U32(buf, pos + 1)[0]
    else:
        raise _Irregular
    if end > len(buf):
        raise IndexError
    return buf[start:end].decode(errors="replace"), end


_LONG = {0x80: (0xDE, 0xDF), 0x90: (0xDC, 0xDD)}  # map 16/32, array 16/32


def _mp_len(buf: bytes, pos: int, fix: int) -> tuple[int, int]:
    """The length of the packed map (``fix`` 0x80) or array (0x90) at ``buf[pos]`` and the position after its
    header."""
    b = buf[pos]
    if fix <= b <= fix + 15:
        return b - fix, pos + 1
    b16, b32 = _LONG[fix]
    if b == b16:
        return _U16(buf, pos + 1)[0], pos + 3
    if b == b32:
        return _U32(buf, pos + 1)[0], pos + 5
    raise _Irregular


class _Rows:
    """How influxd packs the rows ``[time, v1, .., vk]`` of a read of ``columns`` (k fields) when the time is an
    int64 and every value a float64: records of ``stride`` bytes (array header, 0xd3 and 8 bytes, k times 0xcb and
    8 bytes), all big-endian."""

    def __init__(self, columns: tuple[str, ...]) -> None:
        k = len(columns)
        head = bytes([0x91 + k]) if k + 1 < 16 else b"\xdc" + struct.pack(">H", k + 1)
        h = len(head)
        self.k = k
        self.stride = h + 9 + 9 * k
        #: (offset in a row, byte) of every type byte of a row
        self.marks = (*enumerate(head), (h, 0xD3), *((h + 9 + 9 * j, 0xCB) for j in range(k)))
        self.dtype = np.dtype({"names": ["t", *(f"v{j}" for j in range(k))],
                               "formats": [">i8"] + [">f8"] * k,
                               "offsets": [h + 1] + [h + 10 + 9 * j for j in range(k)],
                               "itemsize": self.stride})
        #: a series' bytes from its columns to its rows: "columns", ["time", *columns], "values"
        self.head = b"\xa7columns" + msgpack.packb(["time", *columns]) + b"\xa6values"

    def regular(self, block: bytes, n: int) -> bool:
        """Whether ``block`` holds ``n`` rows of this layout (every type byte where it should be)."""
        stride = self.stride
        return all(block[o::stride].count(b) == n for o, b in self.marks)

    def arrays(self, block: bytes, ms: bool, matrix: bool) -> tuple[NDArray[np.int64], NDArray[np.float64]]:
        """Rows to (epoch-ns times, values ``(rows,)``, or ``(rows, k)`` when ``matrix``)."""
        a = np.frombuffer(block, self.dtype)
        t = a["t"].astype(np.int64)
        if ms:
            t *= 1_000_000
        if not matrix:
            return t, a["v0"].astype(np.float64)
        v = np.empty((len(a), self.k))
        for j in range(self.k):
            v[:, j] = a[f"v{j}"]
        return t, v

    def lists(self, block: bytes) -> list[list[Any]]:
        """The rows of ``block`` as the lists a decoded document holds."""
        n = len(block) // self.stride
        rows: list[list[Any]] = msgpack.unpackb(b"\xdd" + struct.pack(">I", n) + block)
        return rows


@functools.lru_cache(maxsize=256)
def _rows_layout(columns: tuple[str, ...]) -> _Rows:
    return _Rows(columns)


def _scan(buf: bytes, pos: int, rows: _Rows, out: list[tuple[Tags, bytes]]) -> tuple[int, bool]:
    """Read the documents of the usual shape in ``buf[pos:]``, appending each series' tags and rows to ``out``.

    Returns the position after the last whole document read, and whether the document there is of another shape
    (or may be: the buffer ends inside a header) rather than cut by the end of the buffer.
    """
    stride, head, n_head, end_buf = rows.stride, rows.head, len(rows.head), len(buf)
    while pos < end_buf:
        start, mark = pos, len(out)
        try:
            if not buf.startswith(_DOC, pos):
                raise _Irregular
            n_res = buf[pos + 10]  # statement_id, series and, in all but the last chunk, partial
            if n_res not in (0x82, 0x83) or not buf.startswith(_STATEMENT_ID, pos + 11) or buf[pos + 24] > 0x7F:
                raise _Irregular
            if not buf.startswith(_SERIES, pos + 25):
                raise _Irregular
            n_series, pos = _mp_len(buf, pos + 32, 0x90)
            for _ in range(n_series):
                n_keys = buf[pos] - 0x80  # name, tags, columns, values, partial: in this order, some left out
                if not 2 <= n_keys <= 5:
                    raise _Irregular
                pos += 1
                if buf.startswith(_NAME, pos):
                    pos = _mp_str(buf, pos + 5)[1]
                    n_keys -= 1
                tags: Tags = ()
                if buf.startswith(_TAGS, pos):
                    n_tags, pos = _mp_len(buf, pos + 5, 0x80)
                    if n_tags == 1:
                        k, pos = _mp_str(buf, pos)
                        v, pos = _mp_str(buf, pos)
                        tags = ((k, v),)
                    else:
                        items = []
                        for _ in range(n_tags):
                            k, pos = _mp_str(buf, pos)
                            v, pos = _mp_str(buf, pos)
                            items.append((k, v))
                        tags = tuple(sorted(items))
                    n_keys -= 1
                if not buf.startswith(head, pos):
                    raise _Irregular
                n, pos = _mp_len(buf, pos + n_head, 0x90)
                end = pos + n * stride
                if end > end_buf:  # cut by the end of the buffer, unless the rows there are already irregular
                    n_in = (end_buf - pos) // stride
                    if rows.regular(buf[pos : pos + n_in * stride], n_in):
                        raise IndexError
                    raise _Irregular
                block = buf[pos:end]
                if not rows.regular(block, n):
                    raise _Irregular
                pos = end
                if n_keys == 3 and buf.startswith(_PARTIAL, pos) and buf[pos + 8] in (0xC2, 0xC3):
                    pos += 9
                    n_keys -= 1
                if n_keys != 2:
                    raise _Irregular
                out.append((tags, block))
            if n_res == 0x83:
                if not buf.startswith(_PARTIAL, pos) or buf[pos + 8] not in (0xC2, 0xC3):
                    raise _Irregular
                pos += 9
        except (IndexError, struct.error):
            del out[mark:]
            return start, False
        except _Irregular:
            del out[mark:]
            return start, True
    return pos, False


def _unpack_next(up: msgpack.Unpacker) -> Any:
    """The next document ``up`` holds whole, or None."""
    try:
        return up.unpack()
    except msgpack.OutOfData:
        return None


def _is_msgpack(r: requests.Response) -> bool:
    return r.headers.get("Content-Type", "").split(";")[0].strip() == MSGPACK


def _join(a: bytes | list[list[Any]], b: bytes | list[list[Any]], rows: _Rows) -> bytes | list[list[Any]]:
    """Two parts of a series split across chunks, as one (packed if both are, else decoded)."""
    if isinstance(a, bytes) and isinstance(b, bytes):
        return a + b
    return (rows.lists(a) if isinstance(a, bytes) else a) + (rows.lists(b) if isinstance(b, bytes) else b)


class InfluxDB1Store:
    """InfluxDB 1.x through the ``influxdb`` package's session (HTTP API; chunked MessagePack reads, JSON where the
    server does not answer MessagePack; line-protocol writes)."""

    def __init__(self, cfg: InfluxConfig, write_batch: int = 10_000, chunk_size: int = 100_000) -> None:
        self.cfg = cfg
        self.write_batch = write_batch
        self._sender = ThreadPoolExecutor(1, thread_name_prefix="influx-write")  # formats and sends overlap
        self.chunk_size = chunk_size
        u = urlsplit(cfg.url)
        self.client = InfluxDBClient(
            host=u.hostname or "127.0.0.1", port=u.port or (443 if u.scheme == "https" else 8086),
            username=cfg.username or "root", password=cfg.password or "root", database=cfg.database,
            ssl=u.scheme == "https", verify_ssl=cfg.verify_ssl, timeout=cfg.timeout_s, retries=1,
            path=u.path.strip("/"))  # one attempt per call: `with_retries` retries, with backoff and a log line
        #: base of the backoff between retries (``influxdb.retries`` of them)
        self.retry_base_s = RETRY_BASE_S
        # Uncompressed answers unless asked: on loopback or a LAN, gzip costs influxd more CPU than it saves (a
        # 12 MB read of 10,000 series took 1.4 s gzipped and 1.05 s plain, as long as curl takes).
        self._headers = {"Accept": "application/json", "Content-Type": "application/octet-stream",
                         "Accept-Encoding": "gzip" if cfg.gzip else "identity"}
        if cfg.token:  # InfluxDB 2.x (through a DBRP mapping) and 3.x; the client then sends no user/password
            self._headers["Authorization"] = f"Token {cfg.token}"
        #: The answer format asked for reads: "msgpack" (decoded without a Python object per value; influxd 1.4+,
        #: 2.x) or "json". A server answering JSON to it is read as JSON; one refusing it is asked for JSON from
        #: then on.
        self.read_format = "msgpack"

    # -- low level ---------------------------------------------------------------------------------
    def _request(self, op: str, url: str, method: str, params: dict[str, Any], data: str | bytes | None = None,
                 expected: int = 200, stream: bool = False,
                 send: Callable[[], requests.Response] | None = None) -> requests.Response:
        """One call with retries, its failures as `StoreError`; ``send`` makes one attempt instead of the client."""
        retries = self.cfg.retries

        def attempt() -> requests.Response:
            if send is not None:
                return send()
            # JSON (reads ask for MessagePack in `_send_query`): chunked answers are newline-delimited JSON objects.
            return self.client.request(url=url, method=method, params=params, data=data, stream=stream,
                                       expected_response_code=expected, headers=self._headers)

        try:
            return with_retries(attempt, retries, op, self.cfg.url, _retryable_v1, self.retry_base_s)
        except (requests.ConnectionError, requests.Timeout) as exc:
            INFLUX_ERRORS.labels(op=op).inc()
            raise StoreError(f"InfluxDB at {self.cfg.url} is unreachable ({type(exc).__name__}){retried(retries)}; "
                             f"check influxdb.url and that influxd is running") from exc
        except InfluxDBServerError as exc:
            INFLUX_ERRORS.labels(op=op).inc()
            raise StoreError(f"InfluxDB at {self.cfg.url} failed the {op}{retried(retries)}: {exc}") from exc
        except InfluxDBClientError as exc:
            INFLUX_ERRORS.labels(op=op).inc()
            hint = ""
            if exc.code in (401, 403):
                hint = ("; check the API token (ANOMALYD_INFLUXDB_TOKEN or influxdb.token_file) and its read/write "
                        "access" if self.cfg.token else
                        "; set ANOMALYD_INFLUXDB_USERNAME and ANOMALYD_INFLUXDB_PASSWORD (or, for InfluxDB 2.x "
                        "and 3.x, ANOMALYD_INFLUXDB_TOKEN)")
            elif "database not found" in str(exc):
                hint = f"; create it or fix influxdb.database={self.cfg.database!r}"
            raise StoreError(f"InfluxDB refused the {op} (HTTP {exc.code}): {str(exc.content).strip()}{hint}") from exc

    def ping(self) -> str:
        try:
            r = self._request("ping", "ping", "GET", {}, expected=204)
        except StoreError as exc:  # InfluxDB 3.x answers 200 (with a JSON body) where 1.x and 2.x answer 204
            if isinstance(exc.__cause__, InfluxDBClientError) and exc.__cause__.code == 200:
                return "unknown (3.x?)"
            raise
        return r.headers.get("X-Influxdb-Version", "unknown")

    def ensure_database(self) -> None:
        """Create the configured database if it is missing (used by the demo and tests)."""
        self._request("query", "query", "POST", {"q": f"CREATE DATABASE {quote_ident(self.cfg.database)}"})

    # -- reads -------------------------------------------------------------------------------------
    def _source(self, measurement: str, rp: str = "") -> str:
        rp = rp or self.cfg.retention_policy
        return (f"{quote_ident(self.cfg.database)}.{quote_ident(rp) if rp else ''}."
                f"{quote_ident(measurement)}")

    def build_select(self, query: Query) -> tuple[str, dict[str, Any]]:
        """The InfluxQL statement and bound parameters of a read (start/end bound as ``$start``/``$end``)."""
        params: dict[str, Any] = {}
        cond = ["time >= $start", "time <= $end"]
        for i, (k, v) in enumerate(query.where):
            params[f"w{i}"] = v
            cond.append(f"{quote_ident(k)} = $w{i}")
        alternatives = []
        for j, tags in enumerate(query.series if all(query.series) else ()):  # a series without tags: all
            parts = []
            for i, (k, v) in enumerate(tags):
                params[f"s{j}_{i}"] = v
                parts.append(f"{quote_ident(k)} = $s{j}_{i}")
            alternatives.append("(" + " AND ".join(parts) + ")")
        if alternatives:
            cond.append("(" + " OR ".join(alternatives) + ")")
        source = self._source(query.measurement, query.retention_policy)
        q = f"SELECT {','.join(quote_ident(f) for f in query.columns)} FROM {source} WHERE {' AND '.join(cond)}"
        if query.group_by:
            q += " GROUP BY " + ",".join(quote_ident(g) for g in query.group_by)
        return q, params

    def _chunks(self, q: str, params: dict[str, Any], epoch: str = "ns") -> Iterator[dict[str, Any]]:
        """The result objects of a chunked query (one JSON document per line of the body)."""
        r = self._request("query", "query", "POST", self._query_params(q, params, epoch), stream=True)
        yield from self._json_documents(r)

    def _query_params(self, q: str, params: dict[str, Any], epoch: str) -> dict[str, Any]:
        return {"q": q, "db": self.cfg.database, "epoch": epoch, "chunked": "true", "chunk_size": self.chunk_size,
                "params": json.dumps(params)}

    def _pieces(self, r: requests.Response) -> Iterator[bytes]:
        """The body of a streamed answer as it arrives; a broken connection is a `StoreError` naming the URL."""
        with r:
            try:
                yield from r.iter_content(chunk_size=1 << 16)
            except (requests.ConnectionError, requests.exceptions.ChunkedEncodingError) as exc:
                INFLUX_ERRORS.labels(op="query").inc()
                raise StoreError(f"InfluxDB at {self.cfg.url} broke off the answer ({type(exc).__name__}); "
                                 "check that influxd is running") from exc

    def _json_documents(self, r: requests.Response) -> Iterator[dict[str, Any]]:
        # Parse each JSON document as it arrives, while influxd is still producing the next ones.
        with r:
            try:
                for line in r.iter_lines(chunk_size=1 << 16):
                    if line:
                        yield orjson.loads(line)
            except (requests.ConnectionError, requests.exceptions.ChunkedEncodingError) as exc:
                INFLUX_ERRORS.labels(op="query").inc()
                raise StoreError(f"InfluxDB at {self.cfg.url} broke off the answer ({type(exc).__name__}); "
                                 "check that influxd is running") from exc

    def _post_query(self, params: dict[str, Any], accept: str) -> requests.Response:
        """One streamed POST /query past `InfluxDBClient.request` (which reads a whole MessagePack answer before
        returning it), with the client's session, credentials, TLS check, proxies and timeout."""
        c = self.client
        headers = {**self._headers, "Accept": accept}
        auth = None if "Authorization" in headers or None in (c._username, c._password) else (c._username,
                                                                                             c._password)
        return c._session.request("POST", f"{c._baseurl}/query", params=params, auth=auth, stream=True,
                                  headers=headers, proxies=c._proxies, verify=c._verify_ssl, timeout=c._timeout)

    def _send_query(self, params: dict[str, Any]) -> requests.Response:
        """One attempt at a read, asking for MessagePack (JSON once ``read_format`` is "json"). A server that refuses
        the format (InfluxDB 3 answers 400 to an Accept header it does not know) is asked again for JSON, and only
        for JSON from then on. Errors are raised as the client raises them (5xx: `InfluxDBServerError`)."""
        r = self._post_query(params, MSGPACK if self.read_format == "msgpack" else "application/json")
        if self.read_format == "msgpack" and 400 <= r.status_code < 500 and not _is_msgpack(r):
            r.close()
            r = self._post_query(params, "application/json")
            if r.status_code == 200:
                log.info("InfluxDB at %s does not answer in MessagePack; reading JSON from now on", self.cfg.url)
                self.read_format = "json"
        if r.status_code == 200:
            return r
        with r:
            text: Any = r.content
            if _is_msgpack(r) and text:
                try:
                    text = json.dumps(msgpack.unpackb(text, raw=False, strict_map_key=False), separators=(",", ":"))
                except (ValueError, msgpack.UnpackException):
                    pass
        if r.status_code >= 500:
            raise InfluxDBServerError(text)
        raise InfluxDBClientError(text, r.status_code)

    def read(self, query: Query, start_ns: int, end_ns: int) -> SeriesData:
        out: SeriesData = {}
        for batch in self.read_batches(query, start_ns, end_ns, 1 << 62):
            out.update(batch)
        return out

    def read_batches(self, query: Query, start_ns: int, end_ns: int, size: int) -> Iterator[SeriesData]:
        """`read`, handed over ``size`` complete series at a time while influxd is still answering, so the caller
        can work on the first series while the next ones arrive."""
        q, params = self.build_select(query)
        params.update(start=int(start_ns), end=int(end_ns))
        ms = query.period_ns % 1_000_000 == 0  # whole-millisecond epochs are exact in float64
        rows = _rows_layout(query.columns)
        keys: list[Tags] = []
        segments: list[bytes | list[list[Any]]] = []
        # The cyclic GC is paused while many short-lived row lists are alive (it would otherwise run full
        # collections over a growing heap); each batch's rows become arrays in one numpy call.
        gc_was_enabled = gc.isenabled()
        gc.disable()
        try:
            qp = self._query_params(q, params, "ms" if ms else "ns")
            r = self._request("query", "query", "POST", qp, send=functools.partial(self._send_query, qp))
            series = self._msgpack_series(r, q, query, rows) if _is_msgpack(r) else (
                s for doc in self._json_documents(r) for s in self._doc_series(doc, q, query))
            for key, seg in series:
                if keys and key == keys[-1]:  # a series continued in the next chunk
                    segments[-1] = _join(segments[-1], seg, rows)
                    continue
                if len(keys) >= size:  # a new series begins: the ones before are complete
                    yield self._batch(keys, segments, ms, query, rows)
                    keys, segments = [], []
                keys.append(key)
                segments.append(seg)
            if keys:
                yield self._batch(keys, segments, ms, query, rows)
        finally:
            if gc_was_enabled:
                gc.enable()

    def _doc_series(self, doc: dict[str, Any], q: str, query: Query) -> Iterator[tuple[Tags, list[list[Any]]]]:
        """The series of one decoded answer document (JSON, or MessagePack of an unusual shape): tags and rows."""
        for res in [doc, *doc.get("results", [])]:
            if "error" in res:
                INFLUX_ERRORS.labels(op="query").inc()
                raise StoreError(f"InfluxDB rejected the query {q!r}: {res['error']}")
        for res in doc.get("results", []):
            for s in res.get("series", []):
                if query.fields and s.get("columns", [])[1:] != list(query.fields):
                    raise StoreError(f"InfluxDB answered columns {s.get('columns')} to {q!r}")
                yield tuple(sorted((s.get("tags") or {}).items())), s["values"]

    def _msgpack_series(self, r: requests.Response, q: str, query: Query,
                        rows: _Rows) -> Iterator[tuple[Tags, bytes | list[list[Any]]]]:
        """The series of a MessagePack answer as it arrives: tags and rows (packed rows as they came when they are
        regular, else decoded lists)."""
        pieces = self._pieces(r)
        buf, pos = b"", 0
        out: list[tuple[Tags, bytes]] = []
        # Documents `_scan` does not read go to msgpack's decoder, which then stays in step with the answer (fed
        # what arrives, ``buf[up_base:]`` at first) and reads the documents after them, `_scan` trying again
        # every few documents: a run of irregular documents is decoded as it arrives, without scanning each twice.
        up: msgpack.Unpacker | None = None
        up_base = since_scan = 0
        ended = False
        while True:
            irregular = True
            if up is None or since_scan >= 8:
                scanned, irregular = _scan(buf, pos, rows, out)
                yield from out
                out.clear()
                if scanned != pos:  # packed documents read: msgpack's decoder is behind
                    up, pos = None, scanned
                since_scan = 0
            # The scan stops at a document it does not read, or where the buffer ends (which it cannot always tell
            # apart: rows with a null are shorter than it counts), so a document left at the end is decoded too.
            if pos < len(buf) and (irregular or ended):
                if up is None:
                    up = msgpack.Unpacker(raw=False, strict_map_key=False, unicode_errors="replace",
                                          max_buffer_size=0)
                    up.feed(memoryview(buf)[pos:])
                    up_base = pos
                try:
                    doc = _unpack_next(up)
                except (ValueError, msgpack.UnpackException) as exc:
                    INFLUX_ERRORS.labels(op="query").inc()
                    raise StoreError(f"InfluxDB at {self.cfg.url} answered {q!r} with broken MessagePack "
                                     f"({exc})") from exc
                if doc is not None:
                    pos = up_base + up.tell()
                    since_scan += 1
                    if not isinstance(doc, dict):
                        raise StoreError(f"InfluxDB at {self.cfg.url} answered {q!r} with {type(doc).__name__}")
                    yield from self._doc_series(doc, q, query)
                    continue
                if ended:
                    INFLUX_ERRORS.labels(op="query").inc()
                    raise StoreError(f"InfluxDB at {self.cfg.url} broke off the answer (it ends inside a "
                                     "document); check that influxd is running")
            if ended:
                return
            # More of the answer: at least one piece, and twice what is left when a document is cut (a long
            # document is then scanned again only a few times).
            rest = len(buf) - pos
            parts, size = [buf[pos:]], rest
            for piece in pieces:
                parts.append(piece)
                size += len(piece)
                if size >= 2 * rest:
                    break
            if size == rest:
                ended = True
                continue
            if up is not None:
                up.feed(b"".join(parts[1:]))
                up_base -= pos
            buf, pos = b"".join(parts), 0

    @staticmethod
    def _batch(keys: list[Tags], segments: list[bytes | list[list[Any]]], ms: bool, query: Query,
               rows: _Rows | None = None) -> SeriesData:
        """The series of a batch as arrays: packed rows in one numpy call, decoded rows in one more."""
        layout = rows or _rows_layout(query.columns)
        packed = [s for s in segments if isinstance(s, bytes)]
        lists = [s for s in segments if not isinstance(s, bytes)]
        empty = (np.empty(0, np.int64), np.empty((0, len(query.columns)) if query.fields else 0, np.float64))
        tp, vp = layout.arrays(b"".join(packed), ms, bool(query.fields)) if packed else empty
        tl, vl = empty
        if lists:
            flat = [row for b in lists for row in b]
            # One field holding strings fails the read (the signal reports it each tick); among several fields,
            # they are read as missing (`_rows_to_matrix` says so once) and the other fields go on.
            tl, vl = _rows_to_matrix(flat, ms, query) if query.fields else _rows_to_arrays(flat, ms)
        out: SeriesData = {}
        at_p = at_l = 0
        for key, seg in zip(keys, segments, strict=True):
            if isinstance(seg, bytes):
                n = len(seg) // layout.stride
                piece = (tp[at_p : at_p + n], vp[at_p : at_p + n])
                at_p += n
            else:
                n = len(seg)
                piece = (tl[at_l : at_l + n], vl[at_l : at_l + n])
                at_l += n
            if key in out:
                piece = (np.concatenate([out[key][0], piece[0]]), np.concatenate([out[key][1], piece[1]]))
            out[key] = piece
        return out

    def query_raw(self, q: str, params: dict[str, Any] | None = None) -> list[dict[str, Any]]:
        """Run any InfluxQL statement (bound ``params``) and return its result objects."""
        out: list[dict[str, Any]] = []
        for chunk in self._chunks(q, params or {}):
            out.extend(chunk.get("results", []))
        return out

    # -- writes ------------------------------------------------------------------------------------
    def write(self, points: Iterable[Point | SeriesPoints], retention_policy: str = "") -> None:
        """Format and send in batches of ``write_batch`` lines, in order, one at a time, with a few batches
        formatted ahead while one is in flight (`pipelined_write`). The first failure is raised; the batches
        behind it are not sent."""
        params = self._write_params(retention_policy)
        pipelined_write(points, self.write_batch, self._sender, lambda body: self._post_write(params, body))

    def _write_params(self, retention_policy: str) -> dict[str, str]:
        params = {"db": self.cfg.database, "precision": "ns"}
        rp = retention_policy or self.cfg.retention_policy
        if rp:
            params["rp"] = rp
        return params

    def _post_write(self, params: dict[str, str], body: bytes) -> None:
        self._request("write", "write", "POST", params, data=body, expected=204)

    def write_lines(self, lines: Sequence[str], retention_policy: str = "") -> None:
        params = self._write_params(retention_policy)
        for i in range(0, len(lines), self.write_batch):
            body = "\n".join(lines[i : i + self.write_batch]).encode()
            self._request("write", "write", "POST", params, data=body, expected=204)
