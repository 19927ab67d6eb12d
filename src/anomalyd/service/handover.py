"""What sharded replicas ask InfluxDB (1.x, InfluxQL): which series exist, where each series' output ends, and
whether another replica claims the same shard.

The output measurement is the durable watermark: a replica that takes a series over (more or fewer replicas, a
lost state directory) resumes after the last point written for it, by whichever replica wrote it. Stores without
InfluxQL (the Flux adapter) answer None, and the worker falls back to reading every series and keeping its own.
"""

from __future__ import annotations

import re
from typing import Any

from ..core.records import Tags, parse_tags
from ..store.base import StoreError
from ..store.influx1 import quote_ident

_KEY_SPLIT = re.compile(r"(?<!\\),")


def _unescape(s: str) -> str:
    return re.sub(r"\\([,= \\])", r"\1", s)


def parse_series_key(key: str) -> tuple[str, dict[str, str]]:
    """A ``SHOW SERIES`` key (line protocol's escaping) as (measurement, tags).

    Examples
    --------
    >>> parse_series_key(r"cpu,cpu=cpu-total,host=h\\ 1\\,b")
    ('cpu', {'cpu': 'cpu-total', 'host': 'h 1,b'})
    """
    parts = _KEY_SPLIT.split(key)
    tags = {}
    for p in parts[1:]:
        k, _, v = re.split(r"(?<!\\)(=)", p, maxsplit=1)
        tags[_unescape(k)] = _unescape(v)
    return _unescape(parts[0]), tags


def _raw(store: Any, q: str, params: dict[str, Any]) -> list[dict[str, Any]] | None:
    query_raw = getattr(store, "query_raw", None)
    if query_raw is None:
        return None
    out: list[dict[str, Any]] = query_raw(q, params)
    for res in out:
        if "error" in res:
            raise StoreError(f"InfluxDB rejected {q!r}: {res['error']}")
    return out


def _source(rp: str, measurement: str) -> str:
    return (quote_ident(rp) + "." if rp else "") + quote_ident(measurement)


def _where(where: Tags, params: dict[str, Any], prefix: str = "w") -> list[str]:
    cond = []
    for i, (k, v) in enumerate(where):
        params[f"{prefix}{i}"] = v
        cond.append(f"{quote_ident(k)} = ${prefix}{i}")
    return cond


def series_keys(store: Any, measurement: str, where: Tags, group_by: tuple[str, ...], rp: str = "") -> \
        set[Tags] | None:
    """The distinct ``group_by`` tag sets of a measurement's series (matching ``where``), from the index (``SHOW
    SERIES``: no sample is read); None for a store without InfluxQL."""
    params: dict[str, Any] = {}
    cond = _where(where, params)
    q = f"SHOW SERIES FROM {_source(rp, measurement)}" + (f" WHERE {' AND '.join(cond)}" if cond else "")
    res = _raw(store, q, params)
    if res is None:
        return None
    out: set[Tags] = set()
    for r in res:
        for s in r.get("series", []):
            for (key,) in s.get("values", []):
                _, tags = parse_series_key(str(key))
                out.add(tuple(sorted((g, tags.get(g, "")) for g in group_by)))
    return out


def last_written(store: Any, measurement: str, signal: str, start: int, end: int, rp: str = "") -> \
        dict[Tags, int] | None:
    """Per series of ``signal`` (its tags), the time of the last point in the output ``measurement`` within
    ``[start, end]``: the end of its last written window. None for a store without InfluxQL."""
    params: dict[str, Any] = {"start": int(start), "end": int(end), "signal": signal}
    q = (f'SELECT last("n_missing") FROM {_source(rp, measurement)} WHERE "signal" = $signal AND time >= $start '
         f'AND time <= $end GROUP BY "series"')
    res = _raw(store, q, params)
    if res is None:
        return None
    out: dict[Tags, int] = {}
    for r in res:
        for s in r.get("series", []):
            try:
                tags = parse_tags((s.get("tags") or {}).get("series", ""))
            except ValueError:
                continue
            for row in s.get("values", []):
                out[tags] = int(row[0])
    return out


def claimants(store: Any, measurement: str, shard: str, since: int, rp: str = "") -> set[str] | None:
    """The ``instance`` ids that wrote statistics for ``shard`` since ``since``: more than one means two replicas
    run with the same index (both score, and write, the same series). None for a store without InfluxQL."""
    params: dict[str, Any] = {"shard": shard, "since": int(since)}
    q = f'SELECT "instance" FROM {_source(rp, measurement)} WHERE "shard" = $shard AND time >= $since'
    res = _raw(store, q, params)
    if res is None:
        return None
    return {str(row[1]) for r in res for s in r.get("series", []) for row in s.get("values", []) if row[1]}
