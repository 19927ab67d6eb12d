"""The answer formats of InfluxDB 1.x's /query, fetched and decoded into the arrays the daemon works on (issue 12).

Usage: .venv/bin/python benchmarks/bench_read_formats.py                       # the four cases below
       .venv/bin/python benchmarks/bench_read_formats.py --cases 10000x1 1000x8
       .venv/bin/python benchmarks/bench_read_formats.py --render run.log        # the table of a run's output

Cases (``NxF``: N series of F fields, 48 samples each at 1 Hz, one measurement, tag ``host``): 10000x1,
100000x1, 1000x8 and 1000x8n (8 fields, every third row of each series missing one field: nulls). For each, the
daemon's exact query (`InfluxDB1Store.build_select`, GROUP BY host, ms epochs, ``chunk_size`` 100,000) is asked
in every format, all measured in the same run, best of 3, the formats taking turns:

- curl: ``curl`` fetching the body to /dev/null (the floor), with the CPU time influxd spent on it;
- fetch + decode: the body streamed by `requests` and decoded into ``{tags: (int64 ns times, float64 values
  (rows,) or (rows, fields))}``, wall time and the client's CPU time:
  - json: chunked JSON, one document per line, orjson, rows to arrays (the read path before this issue, kept as
    ``InfluxDB1Store.read_format = "json"``);
  - csv, csv-chunked: ``Accept: application/csv``, Python's csv module, columns to arrays (influxd chunks CSV
    too: the same rows, header once);
  - msgpack-generic: ``Accept: application/x-msgpack``, chunked (documents back to back), decoded by
    ``msgpack.Unpacker`` into lists, rows to arrays as for JSON;
  - msgpack: the same answer read by ``InfluxDB1Store`` (``read_format = "msgpack"``): regular rows kept packed
    and turned into arrays in one numpy call per batch;
- decode only: the captured body decoded from memory in 64 KiB pieces (no server, no socket), best of 3, and the
  tracemalloc peak of one more such decode.

Every decoder's arrays are checked against the JSON path's: the same series, times and values, NaN in the same
places.
"""

from __future__ import annotations

import argparse
import csv
import io
import json
import os
import subprocess
import tempfile
import time
import tracemalloc
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import msgpack
import numpy as np
import requests

from anomalyd.config import InfluxConfig
from anomalyd.store.base import Query, SeriesData
from anomalyd.store.influx1 import InfluxDB1Store
from anomalyd.store.local import LocalInfluxd

SEC = 10**9
T0 = 1_700_000_000 * SEC
N_SAMPLES = 48
CHUNK = 100_000
ACCEPT = {"json": "application/json", "csv": "application/csv", "msgpack": "application/x-msgpack"}


def case_query(n_fields: int) -> Query:
    if n_fields == 1:
        return Query("m", "v", (), ("host",), SEC)
    return Query("m", "", (), ("host",), SEC, fields=tuple(f"f{j}" for j in range(n_fields)))


def write_case(server: LocalInfluxd, db: str, n: int, n_fields: int, nulls: bool) -> None:
    server.query(f'CREATE DATABASE "{db}"')
    rng = np.random.default_rng(n * 10 + n_fields)
    vals = rng.normal(50, 20, (N_SAMPLES, n_fields, 1000))  # full float64 precision
    lines: list[str] = []
    for i in range(n):
        for k in range(N_SAMPLES):
            x = vals[k, :, (i * 7 + k) % 1000]
            fields = [f"{'v' if n_fields == 1 else f'f{j}'}={float(x[j])!r}" for j in range(n_fields)
                      if not (nulls and k % 3 == 0 and j == (i + k) % n_fields)]
            lines.append(f"m,host=h{i:06d} {','.join(fields)} {T0 + k * SEC}")
        if len(lines) >= 200_000:
            server.write_lines(db, "\n".join(lines))
            lines = []
    if lines:
        server.write_lines(db, "\n".join(lines))


def query_params(store: InfluxDB1Store, query: Query, chunked: bool) -> dict[str, Any]:
    q, params = store.build_select(query)
    params.update(start=T0, end=T0 + (N_SAMPLES - 1) * SEC)
    out = store._query_params(q, params, "ms")
    if not chunked:
        del out["chunked"], out["chunk_size"]
    return out


def influxd_cpu(pid: int) -> float:
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def curl(url: str, params: dict[str, Any], accept: str, out: str = "/dev/null") -> float:
    args = ["curl", "-sf", "-o", out, "-XPOST", f"{url}/query", "-H", f"Accept: {accept}",
            "-H", "Accept-Encoding: identity"]
    for k, v in params.items():
        args += ["--data-urlencode", f"{k}={v}"]
    t0 = time.perf_counter()
    subprocess.run(args, check=True)
    return time.perf_counter() - t0


# -- decoders that are not the store's -------------------------------------------------------------------------


def _unescape_key(s: str) -> str:
    return s.replace("\\,", ",").replace("\\=", "=").replace("\\ ", " ")


def _split_unescaped(s: str, sep: str) -> list[str]:
    out, cur, i = [], [], 0
    while i < len(s):
        c = s[i]
        if c == "\\" and i + 1 < len(s):
            cur.append(s[i : i + 2])
            i += 2
            continue
        if c == sep:
            out.append("".join(cur))
            cur = []
        else:
            cur.append(c)
        i += 1
    out.append("".join(cur))
    return out


def csv_tags(hash_key: str, group_by: tuple[str, ...]) -> tuple[tuple[str, str], ...]:
    """A CSV answer's tags column (influxd's series hash key ``k=v,k2=v2``, escaped as in line protocol; tags with
    an empty value left out) as the JSON path's tags."""
    tags = dict.fromkeys(group_by, "")
    if hash_key:
        for part in _split_unescaped(hash_key, ","):
            k, v = _split_unescaped(part, "=")[:2]
            tags[_unescape_key(k)] = _unescape_key(v)
    return tuple(sorted(tags.items()))


def _floats(col: list[str]) -> np.ndarray:
    a = np.array(col)
    a[a == ""] = "nan"
    try:
        return a.astype(np.float64)
    except ValueError:  # a string field: NaN, as the JSON path reads it
        def num(s: str) -> float:
            try:
                return float(s)
            except ValueError:
                return float("nan")
        return np.array([num(s) for s in col], dtype=np.float64)


def decode_csv(pieces: Iterator[bytes], query: Query) -> SeriesData:
    """influxd's CSV (``name,tags,time,<fields>``, nulls empty) into the JSON path's arrays. CSV cannot tell a
    string "1.5" from the number, nor an empty string from a null: this decoder is for measuring."""
    text = io.TextIOWrapper(_PiecesIO(pieces), encoding="utf-8", newline="")
    k = len(query.columns)
    by_tags: dict[str, list[list[str]]] = {}
    order: list[str] = []
    for row in csv.reader(text):
        if not row or (row[0] == "name" and row[1] == "tags"):
            continue
        rows = by_tags.get(row[1])
        if rows is None:
            rows = by_tags[row[1]] = []
            order.append(row[1])
        rows.append(row)
    out: SeriesData = {}
    for key in order:
        rows = by_tags[key]
        cols = list(zip(*rows, strict=True))
        t = np.array(cols[2]).astype(np.int64) * 1_000_000
        v = np.stack([_floats(list(c)) for c in cols[3:]], axis=1) if query.fields else _floats(list(cols[3]))
        out[csv_tags(key, query.group_by)] = (t, v.reshape(-1, k) if query.fields else v)
    return out


class _PiecesIO(io.RawIOBase):
    def __init__(self, pieces: Iterator[bytes]) -> None:
        self.pieces, self.rest = pieces, b""

    def readable(self) -> bool:
        return True

    def readinto(self, b: Any) -> int:
        while not self.rest:
            self.rest = next(self.pieces, b"")
            if not self.rest:
                return 0
        n = min(len(b), len(self.rest))
        b[:n] = self.rest[:n]
        self.rest = self.rest[n:]
        return n


class GenericMsgpackStore(InfluxDB1Store):
    """MessagePack decoded by ``msgpack.Unpacker`` into lists, read as JSON documents are."""

    def _msgpack_series(self, r: requests.Response, q: str, query: Query, rows: Any) -> Iterator[Any]:
        up = msgpack.Unpacker(raw=False, strict_map_key=False)
        for piece in self._pieces(r):
            up.feed(piece)
            for doc in up:
                yield from self._doc_series(doc, q, query)


def canned(body: bytes, content_type: str) -> requests.Response:
    """A `requests.Response` whose body is ``body``."""
    r = requests.Response()
    r.status_code = 200
    r.headers["Content-Type"] = content_type
    r.raw = io.BytesIO(body)
    return r


def store_from(store: InfluxDB1Store, body: bytes | None, content_type: str, cls: type = InfluxDB1Store,
               read_format: str = "msgpack") -> InfluxDB1Store:
    """A store like ``store`` that reads ``body`` instead of asking influxd (when body is given)."""
    s = cls(store.cfg, chunk_size=CHUNK)
    s.read_format = read_format
    if body is not None:
        s._request = lambda *a, **k: canned(body, content_type)  # type: ignore[method-assign]
    return s


def same(ref: SeriesData, got: SeriesData) -> str:
    if set(ref) != set(got):
        return f"series differ: {len(set(ref) ^ set(got))} keys"
    for k, (t, v) in ref.items():
        t2, v2 = got[k]
        if t.dtype != t2.dtype or v.dtype != v2.dtype or t.shape != t2.shape or v.shape != v2.shape:
            return f"{k}: {t.dtype}{t.shape} {v.dtype}{v.shape} vs {t2.dtype}{t2.shape} {v2.dtype}{v2.shape}"
        if not np.array_equal(t, t2) or not np.array_equal(v, v2, equal_nan=True):
            return f"{k}: values differ"
    return ""


# -- the measurement -------------------------------------------------------------------------------------------


def measure_case(server: LocalInfluxd, n: int, n_fields: int, nulls: bool, reps: int) -> list[dict[str, Any]]:
    db = f"rf{n}x{n_fields}{'n' if nulls else ''}"
    write_case(server, db, n, n_fields, nulls)
    cfg = InfluxConfig(url=server.url, database=db, timeout_s=600)
    base = InfluxDB1Store(cfg, chunk_size=CHUNK)
    query = case_query(n_fields)
    assert server.proc is not None
    pid = server.proc.pid

    def fetch_csv(chunked: bool) -> Callable[[], SeriesData]:
        def run() -> SeriesData:
            r = requests.post(f"{server.url}/query", params=query_params(base, query, chunked), stream=True,
                              headers={"Accept": ACCEPT["csv"], "Accept-Encoding": "identity"})
            r.raise_for_status()
            with r:
                return decode_csv(r.iter_content(1 << 16), query)
        return run

    def fetch_store(cls: type, fmt: str) -> Callable[[], SeriesData]:
        return lambda: store_from(base, None, "", cls, fmt).read(query, T0, T0 + (N_SAMPLES - 1) * SEC)

    fetchers: dict[str, Callable[[], SeriesData]] = {
        "json": fetch_store(InfluxDB1Store, "json"),
        "csv": fetch_csv(False),
        "csv-chunked": fetch_csv(True),
        "msgpack-generic": fetch_store(GenericMsgpackStore, "msgpack"),
        "msgpack": fetch_store(InfluxDB1Store, "msgpack"),
    }
    curl_variants = {"json": ("json", True), "csv": ("csv", False), "csv-chunked": ("csv", True),
                     "msgpack": ("msgpack", True), "msgpack-unchunked": ("msgpack", False)}
    bodies: dict[str, bytes] = {}
    with tempfile.TemporaryDirectory() as tmp:
        for name, (fmt, chunked) in curl_variants.items():
            path = Path(tmp) / name
            curl(server.url, query_params(base, query, chunked), ACCEPT[fmt], str(path))
            bodies[name] = path.read_bytes()
    wall: dict[str, float] = {}
    cpu: dict[str, float] = {}
    srv: dict[str, float] = {}
    results: dict[str, SeriesData] = {}
    for _ in range(reps):  # the formats take turns, so a slow spell of the shared machine hits them all
        for name, (fmt, chunked) in curl_variants.items():
            c0 = influxd_cpu(pid)
            w = curl(server.url, query_params(base, query, chunked), ACCEPT[fmt])
            key = f"curl:{name}"
            wall[key] = min(wall.get(key, 1e9), w)
            srv[key] = min(srv.get(key, 1e9), influxd_cpu(pid) - c0)
        for name, fetch in fetchers.items():
            c0, p0, t0 = influxd_cpu(pid), time.process_time(), time.perf_counter()
            results[name] = fetch()
            w, c = time.perf_counter() - t0, time.process_time() - p0
            wall[name] = min(wall.get(name, 1e9), w)
            cpu[name] = min(cpu.get(name, 1e9), c)
            srv[name] = min(srv.get(name, 1e9), influxd_cpu(pid) - c0)
    ref = results["json"]
    assert len(ref) == n and all(len(t) == N_SAMPLES for t, _ in ref.values()), "the JSON path read short"
    if nulls:
        assert any(np.isnan(v).any() for _, v in ref.values())

    # decode only, from memory
    decoders: dict[str, tuple[str, Callable[[], SeriesData]]] = {
        "json": ("json", lambda: store_from(base, bodies["json"], ACCEPT["json"], InfluxDB1Store, "json")
                 .read(query, 0, 1)),
        "csv": ("csv", lambda: decode_csv(canned(bodies["csv"], "").iter_content(1 << 16), query)),
        "csv-chunked": ("csv-chunked", lambda: decode_csv(canned(bodies["csv-chunked"], "").iter_content(1 << 16),
                                                          query)),
        "msgpack-generic": ("msgpack", lambda: store_from(base, bodies["msgpack"], ACCEPT["msgpack"],
                                                          GenericMsgpackStore).read(query, 0, 1)),
        "msgpack": ("msgpack", lambda: store_from(base, bodies["msgpack"], ACCEPT["msgpack"]).read(query, 0, 1)),
    }
    rows = []
    for name, (body_name, dec) in decoders.items():
        best = 1e9
        for _ in range(reps):
            t0 = time.perf_counter()
            got = dec()
            best = min(best, time.perf_counter() - t0)
        tracemalloc.start()
        dec()
        peak = tracemalloc.get_traced_memory()[1]
        tracemalloc.stop()
        diff = same(ref, results[name]) or same(ref, got)
        if diff:
            raise AssertionError(f"{db} {name}: {diff}")
        floor_key = "curl:" + ("msgpack" if name.startswith("msgpack") else name)
        rows.append(dict(case=f"{n}x{n_fields}{' nulls' if nulls else ''}", decoder=name,
                         bytes=len(bodies[body_name]), curl=wall[floor_key], curl_srv=srv[floor_key],
                         fetch=wall[name], fetch_cpu=cpu[name], srv=srv[name], decode=best, peak=peak))
    rows.append(dict(case=f"{n}x{n_fields}{' nulls' if nulls else ''}", decoder="(msgpack unchunked, curl only)",
                     bytes=len(bodies["msgpack-unchunked"]), curl=wall["curl:msgpack-unchunked"],
                     curl_srv=srv["curl:msgpack-unchunked"], fetch=float("nan"), fetch_cpu=float("nan"),
                     srv=float("nan"), decode=float("nan"), peak=0))
    server.query(f'DROP DATABASE "{db}"')
    return rows


def parse_case(s: str) -> tuple[int, int, bool]:
    nulls = s.endswith("n")
    n, f = s.rstrip("n").split("x")
    return int(n), int(f), nulls


def render(table: list[dict[str, Any]]) -> None:
    print("\n| case | decoder | body MB | curl floor s (influxd CPU s) | fetch + decode s | / its floor | / JSON floor "
          "| client CPU s | decode only s | / JSON | decode peak MiB |")
    print("|---|---|---|---|---|---|---|---|---|---|---|")
    json_row = {r["case"]: r for r in table if r["decoder"] == "json"}
    for r in table:
        j = json_row[r["case"]]
        print(f"| {r['case']} | {r['decoder']} | {r['bytes'] / 1e6:.1f} | {r['curl']:.2f} ({r['curl_srv']:.2f}) | "
              f"{r['fetch']:.2f} | {r['fetch'] / r['curl']:.2f} | {r['fetch'] / j['curl']:.2f} | "
              f"{r['fetch_cpu']:.2f} | {r['decode']:.3f} | {r['decode'] / j['decode']:.2f} | "
              f"{r['peak'] / 2**20:.1f} |")


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--cases", nargs="+", default=["10000x1", "100000x1", "1000x8", "1000x8n"])
    ap.add_argument("--reps", type=int, default=3)
    ap.add_argument("--render", type=Path, help="print the table of a run's output (its JSON lines) and stop")
    args = ap.parse_args()
    if args.render:
        render([json.loads(line) for line in args.render.read_text().splitlines() if line.startswith("{")])
        return
    table = []
    with tempfile.TemporaryDirectory() as tmp:
        server = LocalInfluxd(Path(tmp) / "influxd").start()
        try:
            for c in args.cases:
                n, f, nulls = parse_case(c)
                rows = measure_case(server, n, f, nulls, args.reps)
                table += rows
                for r in rows:
                    print(json.dumps(r), flush=True)
        finally:
            server.stop()
    render(table)


if __name__ == "__main__":
    main()
