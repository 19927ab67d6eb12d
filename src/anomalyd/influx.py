"""Store adapters: read many series of a signal in one query, write error points in one batch.

The worker only sees the :class:`Store` protocol, so an InfluxDB 2.x adapter (influxdb-client, Flux) can
slot in beside :class:`InfluxDB1Store` without touching it. Identifiers are always double-quoted with escaping
and tag values and times are always bound parameters: nothing from the config or the data is pasted into
InfluxQL.
"""

from __future__ import annotations

import functools
import gc
import json
import logging
import math
import time
from collections.abc import Callable, Iterable, Iterator, Sequence
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass
from typing import Any, Protocol, TypeVar
from urllib.parse import urlsplit

import numpy as np
import orjson
import requests
from influxdb import InfluxDBClient
from influxdb.exceptions import InfluxDBClientError, InfluxDBServerError
from numpy.typing import NDArray

from .config import InfluxConfig
from .metrics import INFLUX_ERRORS
from .records import Tags

log = logging.getLogger(__name__)

SeriesData = dict[Tags, tuple[NDArray[np.int64], NDArray[np.float64]]]


class StoreError(ConnectionError):
    """The store could not be reached or refused a request; the message says which and why."""


T = TypeVar("T")

#: The first pause before a retry; each further retry waits twice as long, at most `RETRY_MAX_S`.
RETRY_BASE_S = 0.25
RETRY_MAX_S = 4.0


def with_retries(call: Callable[[], T], retries: int, what: str, url: str,
                 retryable: Callable[[Exception], str | None], base_s: float = RETRY_BASE_S) -> T:
    """``call()``, tried again up to ``retries`` times after a failure ``retryable`` names (it returns the reason
    to log, or None for a failure that must not be retried), with a short exponential backoff and one log line
    per retry. The last failure is raised as it is.
    """
    attempt = 0
    while True:
        try:
            return call()
        except Exception as exc:
            reason = retryable(exc)
            if reason is None or attempt >= retries:
                raise
            attempt += 1
            delay = min(RETRY_MAX_S, base_s * 2 ** (attempt - 1))
            log.warning("InfluxDB at %s: the %s failed (%s); retry %d of %d in %.2gs", url, what, reason, attempt,
                        retries, delay)
            time.sleep(delay)


def _after(retries: int) -> str:
    return f" after {retries} {'retry' if retries == 1 else 'retries'}" if retries else ""


def _retryable_v1(exc: Exception) -> str | None:
    """Connection errors, timeouts and 5xx answers are worth another try; 4xx answers are not."""
    if isinstance(exc, requests.ConnectionError | requests.Timeout):
        return type(exc).__name__
    if isinstance(exc, InfluxDBServerError):
        return f"server error: {str(exc).strip()[:200]}"
    return None


@dataclass(frozen=True, slots=True)
class Point:
    """One point to write: measurement, tags, fields and an epoch-ns timestamp."""

    measurement: str
    tags: Tags
    fields: tuple[tuple[str, float | int | bool | str], ...]
    time_ns: int


@dataclass(frozen=True, slots=True)
class SeriesPoints:
    """Many points of one series (one measurement and tag set, the same fields), column by column.

    Formatting them is much cheaper than one `Point` each: the measurement and tags are escaped once, and each
    column is converted in one pass. ``columns[i][j]`` is field ``names[i]`` of the point at ``times[j]``; a
    column that is a single value (not a list or tuple) holds that value for every point.
    """

    measurement: str
    tags: Tags
    names: tuple[str, ...]
    columns: tuple[Sequence[float | int | bool | str] | float | int | bool | str, ...]
    times: Sequence[int]

    def only(self, times: set[int]) -> SeriesPoints | None:
        """The points of this block at ``times`` (None if there are none)."""
        idx = [j for j, t in enumerate(self.times) if t in times]
        if not idx:
            return None
        cols = tuple([c[j] for j in idx] if isinstance(c, list | tuple) else c for c in self.columns)
        return SeriesPoints(self.measurement, self.tags, self.names, cols, [self.times[j] for j in idx])

    def points(self) -> list[Point]:
        """The same points one by one."""
        n = len(self.times)
        cols = [c if isinstance(c, list | tuple) else [c] * n for c in self.columns]
        return [Point(self.measurement, self.tags, tuple(zip(self.names, row, strict=True)), int(t))
                for row, t in zip(zip(*cols, strict=True), self.times, strict=True)]


def expand(items: Sequence[Point | SeriesPoints]) -> list[Point]:
    """Every point of ``items`` as a `Point` (for stores that keep points one by one)."""
    out: list[Point] = []
    for it in items:
        if isinstance(it, SeriesPoints):
            out.extend(it.points())
        else:
            out.append(it)
    return out


def _column_text(col: Sequence[float | int | bool | str]) -> list[str]:
    """Line-protocol field values of one column, converted in one pass (floats checked finite)."""
    if not len(col):
        return []
    first = col[0]
    if isinstance(first, bool):
        return ["true" if v else "false" for v in col]
    if isinstance(first, int):
        return [f"{v}i" for v in col]
    if isinstance(first, float):
        if not math.isfinite(math.fsum(col)):  # type: ignore[arg-type]
            bad = [v for v in col if not math.isfinite(v)]  # type: ignore[arg-type]
            raise ValueError(f"field value {bad[0] if bad else 'sum'} is not finite; InfluxDB cannot store it")
        return list(map(repr, col))
    return [_field_value(v) for v in col]


def series_lines(sp: SeriesPoints) -> list[str]:
    """Line protocol for a `SeriesPoints` block (single-value columns are formatted once).

    Examples
    --------
    >>> series_lines(SeriesPoints("m", (("h", "a"),), ("x", "ok", "n"), ((1.5, 2.0), (True, False), 3), (10, 20)))
    ['m,h=a x=1.5,ok=true,n=3i 10', 'm,h=a x=2.0,ok=false,n=3i 20']
    """
    n = len(sp.times)
    if n == 0:
        return []
    fmt = [f"{_escape_measurement(sp.measurement)}{_tag_string(sp.tags)} ".replace("%", "%%")]
    varying: list[Sequence[str | float]] = []
    for i, (k, col) in enumerate(zip(sp.names, sp.columns, strict=True)):
        key = ("," if i else "") + f"{_escape_key(k)}=".replace("%", "%%")
        if isinstance(col, list | tuple) and len(col) and type(col[0]) is float:
            if not math.isfinite(math.fsum(col)):
                _column_text(col)  # raises, naming the value
            fmt.append(key + "%r")  # repr: the shortest text that reads back as the same float
            varying.append(col)
        elif isinstance(col, list | tuple):
            fmt.append(key + "%s")
            varying.append(_column_text(col))
        else:
            fmt.append(key + _column_text([col])[0].replace("%", "%%"))  # type: ignore[list-item]
    fmt.append(" %d")
    template = "".join(fmt)
    return [template % row for row in zip(*varying, sp.times, strict=True)]


@dataclass(frozen=True)
class Query:
    """What to read: one field of one measurement, filtered by tag equalities, split by ``group_by`` tags."""

    measurement: str
    field: str
    where: Tags
    group_by: tuple[str, ...]
    #: The series' sample period; when it is a whole number of milliseconds, times are fetched in ms.
    period_ns: int = 1
    #: Retention policy to read from ("" = ``influxdb.retention_policy``, else the database's default).
    retention_policy: str = ""
    #: Only these series (their ``group_by`` tag values; "" matches a series without the tag); () reads all.
    series: tuple[Tags, ...] = ()
    #: Several fields of the measurement in one read (``field`` is then ignored): each series' values are then
    #: shaped ``(rows, len(fields))``, NaN where a row lacks a field or holds a string there.
    fields: tuple[str, ...] = ()

    @property
    def columns(self) -> tuple[str, ...]:
        """The fields read, in the order of the values' columns."""
        return self.fields or (self.field,)


def pipelined_write(points: Iterable[Point | SeriesPoints], batch: int, sender: ThreadPoolExecutor,
                    post: Callable[[bytes], None]) -> None:
    """Format ``points`` as line protocol and ``post`` them in bodies of ``batch`` lines on the ``sender`` thread,
    one body in flight at a time and in order, the next formatted while the previous is sent. The first failure is
    raised once the body in flight is done (the points come from a generator the caller may still be filling)."""
    pending: Future[None] | None = None
    buf: list[str] = []
    try:
        for p in points:
            if isinstance(p, SeriesPoints):
                buf += series_lines(p)
            else:
                buf.append(line_protocol(p))
            while len(buf) >= batch:
                body = "\n".join(buf[:batch]).encode()
                del buf[:batch]
                if pending is not None:
                    pending.result()
                pending = sender.submit(post, body)
        if buf:
            if pending is not None:
                pending.result()
            pending = sender.submit(post, "\n".join(buf).encode())
    finally:
        if pending is not None:
            pending.result()


class Store(Protocol):
    """What the worker needs from a time-series store."""

    def ping(self) -> str:
        """Check connectivity; return the server version."""
        ...

    def read(self, query: Query, start_ns: int, end_ns: int) -> SeriesData:
        """Every series of ``query`` with samples in ``[start_ns, end_ns]``: tags → (times ns, values)."""
        ...

    def write(self, points: Iterable[Point | SeriesPoints], retention_policy: str = "") -> None:
        """Write the points (`Point` or `SeriesPoints` blocks, in batches if needed); overwrites points with the
        same series and time."""
        ...


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


def _check_representable(s: str) -> None:
    # InfluxDB 1.x unescapes only "\,", "\=" and "\ " and keeps every other backslash as it is, so backslashes
    # must not be doubled; a trailing backslash would escape the delimiter after it, and a newline ends the line.
    if s.endswith("\\") or "\n" in s:
        raise ValueError(f"{s!r} cannot be written in InfluxDB 1.x line protocol (trailing backslash or newline)")


@functools.lru_cache(maxsize=65536)
def _escape_key(s: str) -> str:
    _check_representable(s)
    return s.replace(",", "\\,").replace("=", "\\=").replace(" ", "\\ ")


@functools.lru_cache(maxsize=65536)
def _tag_string(tags: Tags) -> str:
    return "".join(f",{_escape_key(k)}={_escape_key(v)}" for k, v in sorted(tags) if v != "")


def _escape_measurement(s: str) -> str:
    _check_representable(s)
    if s.startswith("#"):
        raise ValueError(f"measurement {s!r} starts with '#': InfluxDB would read the line as a comment and drop it")
    return s.replace(",", "\\,").replace(" ", "\\ ")


def _field_value(v: float | int | bool | str) -> str:
    if isinstance(v, bool):
        return "true" if v else "false"
    if isinstance(v, int):
        return f"{v}i"
    if isinstance(v, float):
        if not math.isfinite(v):
            raise ValueError(f"field value {v} is not finite; InfluxDB cannot store it")
        return repr(v)
    return '"' + v.replace("\\", "\\\\").replace('"', '\\"').replace("\n", "\\n") + '"'


def line_protocol(p: Point) -> str:
    """Render a point as InfluxDB line protocol, escaping every part.

    Examples
    --------
    >>> line_protocol(Point("m", (("host", "a b"),), (("x", 1.5), ("ok", True)), 10))
    'm,host=a\\\\ b x=1.5,ok=true 10'
    """
    tags = _tag_string(p.tags)
    fields = ",".join(f"{_escape_key(k)}={_field_value(v)}" for k, v in p.fields)
    return f"{_escape_measurement(p.measurement)}{tags} {fields} {p.time_ns}"


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


class InfluxDB1Store:
    """InfluxDB 1.x through the ``influxdb`` package (HTTP API, chunked JSON reads, line-protocol writes)."""

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

    # -- low level ---------------------------------------------------------------------------------
    def _request(self, op: str, url: str, method: str, params: dict[str, Any], data: str | bytes | None = None,
                 expected: int = 200, stream: bool = False) -> requests.Response:
        retries = self.cfg.retries

        def attempt() -> requests.Response:
            # JSON, not the client's default msgpack: chunked responses are newline-delimited JSON objects.
            return self.client.request(url=url, method=method, params=params, data=data, stream=stream,
                                       expected_response_code=expected, headers=self._headers)

        try:
            return with_retries(attempt, retries, op, self.cfg.url, _retryable_v1, self.retry_base_s)
        except (requests.ConnectionError, requests.Timeout) as exc:
            INFLUX_ERRORS.labels(op=op).inc()
            raise StoreError(f"InfluxDB at {self.cfg.url} is unreachable ({type(exc).__name__}){_after(retries)}; "
                             f"check influxdb.url and that influxd is running") from exc
        except InfluxDBServerError as exc:
            INFLUX_ERRORS.labels(op=op).inc()
            raise StoreError(f"InfluxDB at {self.cfg.url} failed the {op}{_after(retries)}: {exc}") from exc
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
        r = self._request("query", "query", "POST", {
            "q": q, "db": self.cfg.database, "epoch": epoch, "chunked": "true", "chunk_size": self.chunk_size,
            "params": json.dumps(params)}, stream=True)
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
        keys: list[Tags] = []
        blocks: list[list[list[Any]]] = []
        # The cyclic GC is paused while many short-lived row lists are alive (it would otherwise run full
        # collections over a growing heap); each batch's rows become arrays in one numpy call.
        gc_was_enabled = gc.isenabled()
        gc.disable()
        try:
            for chunk in self._chunks(q, params, "ms" if ms else "ns"):
                for res in chunk.get("results", []):
                    if "error" in res:
                        INFLUX_ERRORS.labels(op="query").inc()
                        raise StoreError(f"InfluxDB rejected the query {q!r}: {res['error']}")
                    for s in res.get("series", []):
                        if query.fields and s.get("columns", [])[1:] != list(query.fields):
                            raise StoreError(f"InfluxDB answered columns {s.get('columns')} to {q!r}")
                        key = tuple(sorted((s.get("tags") or {}).items()))
                        if keys and key == keys[-1]:  # a series continued in the next chunk
                            blocks[-1] = blocks[-1] + s["values"]
                            continue
                        if len(keys) >= size:  # a new series begins: the ones before are complete
                            yield self._batch(keys, blocks, ms, query)
                            keys, blocks = [], []
                        keys.append(key)
                        blocks.append(s["values"])
            if keys:
                yield self._batch(keys, blocks, ms, query)
        finally:
            if gc_was_enabled:
                gc.enable()

    @staticmethod
    def _batch(keys: list[Tags], blocks: list[list[list[Any]]], ms: bool, query: Query) -> SeriesData:
        lengths = [len(b) for b in blocks]
        rows = [row for b in blocks for row in b]
        # One field holding strings fails the read (the signal reports it each tick); among several fields,
        # they are read as missing (`_rows_to_matrix` says so once) and the other fields go on.
        t, v = _rows_to_matrix(rows, ms, query) if query.fields else _rows_to_arrays(rows, ms)
        out: SeriesData = {}
        pos = 0
        for key, n in zip(keys, lengths, strict=True):
            piece = (t[pos : pos + n], v[pos : pos + n])
            pos += n
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
        """Format and send in batches of ``write_batch`` lines; the next batch is formatted while the previous one
        is in flight (one at a time, in order). The first failure is raised once the batch in flight is done."""
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
