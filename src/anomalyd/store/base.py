"""The store interface every adapter implements, and what they share (pure: no client library).

The worker, training and evaluation see only the :class:`Store` protocol and these types (`Query`, `Point`,
`SeriesPoints`, `SeriesData`, `StoreError`), so the InfluxDB 1.x adapter (`anomalyd.store.influx1`) and the 2.x
Flux adapter (`anomalyd.store.influx2`) stand side by side without importing each other. Also here: line
protocol (both versions accept it), the pipelined writer and the retry loop with backoff.
"""

from __future__ import annotations

import functools
import logging
import math
import time
from collections import deque
from collections.abc import Callable, Iterable, Sequence
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass
from typing import Any, Protocol, TypeVar

import numpy as np
from numpy.typing import NDArray

from ..core.records import Tags

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


def retried(retries: int) -> str:
    return f" after {retries} {'retry' if retries == 1 else 'retries'}" if retries else ""


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

    ``split = (key, values)``: the block holds one series per value, ``tags`` plus the tag ``key = value`` (a
    several-field signal's attribution: a series per field), each with a point at every one of ``times``; the
    columns hold the series one after the other (``columns[i][v * len(times) + j]``).
    """

    measurement: str
    tags: Tags
    names: tuple[str, ...]
    columns: tuple[Sequence[float | int | bool | str] | float | int | bool | str, ...]
    times: Sequence[int]
    split: tuple[str, tuple[str, ...]] | None = None

    @property
    def n_series(self) -> int:
        return 1 if self.split is None else len(self.split[1])

    @property
    def n_points(self) -> int:
        return self.n_series * len(self.times)

    def series_tags(self) -> list[Tags]:
        """The tags of each series of the block."""
        if self.split is None:
            return [self.tags]
        key, values = self.split
        return [(*self.tags, (key, v)) for v in values]

    def only(self, times: set[int]) -> SeriesPoints | None:
        """The points of this block at ``times`` (None if there are none)."""
        keep = [j for j, t in enumerate(self.times) if t in times]
        if not keep or not self.n_series:
            return None
        m = len(self.times)
        idx = [v * m + j for v in range(self.n_series) for j in keep]
        cols = tuple([c[k] for k in idx] if isinstance(c, list | tuple) else c for c in self.columns)
        return SeriesPoints(self.measurement, self.tags, self.names, cols, [self.times[j] for j in keep], self.split)

    def points(self) -> list[Point]:
        """The same points one by one."""
        n = self.n_points
        cols = [c if isinstance(c, list | tuple) else [c] * n for c in self.columns]
        rows = zip(*cols, strict=True) if cols else iter([()] * n)
        return [Point(self.measurement, tags, tuple(zip(self.names, next(rows), strict=True)), int(t))
                for tags in self.series_tags() for t in self.times]


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
    if not len(col):
        return []
    first = col[0]
    if isinstance(first, bool):
        return ["true" if v else "false" for v in col]
    if isinstance(first, int):
        return [f"{v}i" for v in col]
    if isinstance(first, float):
        if not all(map(math.isfinite, col)):  # type: ignore[arg-type]
            bad = next(v for v in col if not math.isfinite(v))  # type: ignore[arg-type]
            raise ValueError(f"field value {bad} is not finite; InfluxDB cannot store it")
        return list(map(repr, col))
    if type(first) is str:  # a text column holds a few distinct values (a direction, a field name): each once
        distinct = set(col)
        if all(type(v) is str for v in distinct):
            text = {v: _field_value(v) for v in distinct}
            return [text[v] for v in col]
    return [_field_value(v) for v in col]


@functools.lru_cache(maxsize=256)  # a block's single values repeat across series (flags, a shared threshold)
def _value_text(kind: type, v: float | int | bool | str) -> str:
    """One field value as line protocol (``kind``, its type, keeps ``1``, ``1.0`` and ``True`` apart in the
    cache)."""
    return _column_text([v])[0]


@functools.lru_cache(maxsize=64)
def _line_maker(kinds: str) -> Callable[..., Callable[..., list[str]]]:
    """A function that makes the line formatter of one layout of varying columns (``kinds``: a letter per
    column, ``r`` for a float column written as its ``repr``, ``s`` for a column already text).

    ``_line_maker("rs")(p0, p1, p2)`` returns ``lines(c0, c1, times)``, which makes ``f"{p0}{x0!r}{p1}{x1}{p2}{t}"``
    for each row ``x0, x1, t`` of the columns and the times. The formatter is compiled once per layout (like the
    code `dataclasses` writes): an f-string is about 40% faster than ``%`` formatting of the same line, which
    parses its template again for every line. Only variable names enter the compiled text; the pieces of the
    line (measurement, tags, field names, single values) are arguments.
    """
    n = len(kinds)
    body = "".join(f"{{p{i}}}{{x{i}{'!r' if k == 'r' else ''}}}" for i, k in enumerate(kinds)) + f"{{p{n}}}{{t}}"
    cols = "".join(f"c{i}, " for i in range(n))
    rows = f"for {''.join(f'x{i}, ' for i in range(n))}t in zip({cols}times, strict=True)" if n else "for t in times"
    src = (f"def make({', '.join(f'p{i}' for i in range(n + 1))}):\n"
           f"    def lines({cols}times):\n"
           f"        return [f\"{body}\" {rows}]\n"
           f"    return lines\n")
    scope: dict[str, Any] = {}
    exec(compile(src, f"<line formatter {kinds!r}>", "exec"), scope)  # only variable names: see the docstring
    return scope["make"]


def series_lines(sp: SeriesPoints) -> list[str]:
    """Line protocol for a `SeriesPoints` block (single-value columns are formatted once).

    Examples
    --------
    >>> series_lines(SeriesPoints("m", (("h", "a"),), ("x", "ok", "n"), ((1.5, 2.0), (True, False), 3), (10, 20)))
    ['m,h=a x=1.5,ok=true,n=3i 10', 'm,h=a x=2.0,ok=false,n=3i 20']
    """
    if not sp.n_points:
        return []
    meas = _escape_measurement(sp.measurement)
    kinds: list[str] = []
    varying: list[Sequence[str | float]] = []
    times = sp.times
    if sp.split is None:
        pieces = [f"{meas}{_tag_string(sp.tags)} "]
    else:  # each series' measurement and tags: a column of its own, ahead of the fields
        m = len(sp.times)
        pieces = ["", ""]
        kinds.append("s")
        varying.append([head for tags in sp.series_tags() for head in [f"{meas}{_tag_string(tags)} "] * m])
        times = list(sp.times) * sp.n_series
    for i, (k, col) in enumerate(zip(sp.names, sp.columns, strict=True)):
        key = _field_key(k, bool(i))
        if isinstance(col, list | tuple):
            if len(col) and type(col[0]) is float:
                if not all(map(math.isfinite, col)):
                    _column_text(col)  # raises, naming the value
                kinds.append("r")  # repr: the shortest text that reads back as the same float
                varying.append(col)
            else:
                kinds.append("s")
                varying.append(_column_text(col))
            pieces[-1] += key
            pieces.append("")
        else:
            pieces[-1] += key + _value_text(type(col), col)  # type: ignore[arg-type]
    pieces[-1] += " "
    return _line_maker("".join(kinds))(*pieces)(*varying, times)


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


#: Bodies formatted ahead of the one being sent (`pipelined_write`): enough that the sender keeps busy while the
#: worker scores its next slice of series (the bodies of one slice come in a burst), few enough to bound memory.
WRITE_AHEAD = 4


def pipelined_write(points: Iterable[Point | SeriesPoints], batch: int, sender: ThreadPoolExecutor,
                    post: Callable[[bytes], None], ahead: int = WRITE_AHEAD) -> None:
    """Format ``points`` as line protocol and ``post`` them in bodies of ``batch`` lines on the ``sender`` thread
    (one thread: the bodies go in order, one at a time), formatting up to ``ahead`` bodies beyond the one in
    flight, so that the sender keeps sending while the points are still being made. The first failure is raised
    as soon as the formatting notices it, and the bodies queued behind it are not sent (the caller writes them
    again on its retry). A failure while the points are made is raised once the body in flight has ended; the
    bodies queued are not sent either."""
    pending: deque[Future[None]] = deque()
    buf: list[str] = []
    failed: list[BaseException] = []

    def send(body: bytes) -> None:
        if failed:  # an earlier body failed: this one is written again with it, on the caller's retry
            return
        try:
            post(body)
        except BaseException as exc:
            failed.append(exc)
            raise

    def submit(body: bytes) -> None:
        while pending and (len(pending) > ahead or pending[0].done()):
            pending.popleft().result()  # raises the first failure
        if failed:
            raise failed[0]
        pending.append(sender.submit(send, body))

    try:
        for p in points:
            if isinstance(p, SeriesPoints):
                buf += series_lines(p)
            else:
                buf.append(line_protocol(p))
            while len(buf) >= batch:
                body = "\n".join(buf[:batch]).encode()
                del buf[:batch]
                submit(body)
        if buf:
            submit("\n".join(buf).encode())
        while pending:
            pending.popleft().result()
        if failed:
            raise failed[0]
    except BaseException:
        for f in pending:
            f.cancel()  # not started: not sent
        for f in pending:
            if not f.cancelled():
                try:
                    f.result()  # the body in flight ends before the failure goes up (no write left running)
                except Exception:  # the first failure is the one raised
                    pass
        raise


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


def _check_representable(s: str) -> None:
    # InfluxDB 1.x unescapes only "\,", "\=" and "\ " and keeps every other backslash as it is, so backslashes
    # must not be doubled; a trailing backslash would escape the delimiter after it, and a newline ends the line.
    if s.endswith("\\") or "\n" in s:
        raise ValueError(f"{s!r} cannot be written in InfluxDB 1.x line protocol (trailing backslash or newline)")


def _escape_key(s: str) -> str:
    _check_representable(s)
    return _escape(s)


def _escape(s: str) -> str:
    """A tag key, tag value or field key with ``,``, ``=`` and space escaped (`_check_representable` passed)."""
    if "," in s or "=" in s or " " in s:
        return s.replace(",", "\\,").replace("=", "\\=").replace(" ", "\\ ")
    return s


@functools.lru_cache(maxsize=1024)  # field names: a few per signal
def _field_key(name: str, after: bool) -> str:
    """A field's ``name=`` (``,name=`` after another field), escaped."""
    return ("," if after else "") + f"{_escape_key(name)}="


def _tag_string(tags: Tags) -> str:
    # Not cached: 100,000 series would cycle through any cache every tick (each lookup missing and keeping a key
    # alive). One test over all the tags' text finds whether any needs `_escape_key`'s refusal (a backslash or a
    # newline, rare); the rest are escaped by `_escape`.
    pairs = sorted(tags)
    text = "".join([k + v for k, v in pairs])
    if "\\" in text or "\n" in text:
        return "".join(f",{_escape_key(k)}={_escape_key(v)}" for k, v in pairs if v != "")
    return "".join([f",{_escape(k)}={_escape(v)}" for k, v in pairs if v != ""])


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


