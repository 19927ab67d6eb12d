"""One tick over many series against a real local influxd, next to the server floor and the blog's loop.

Usage: .venv/bin/python benchmarks/bench_tick.py --series 1000 10000

For each N: N series at 1 Hz, one shared model (window 32), the shipped defaults (every window scored, one point
per window), watermarks one interval (16 s) behind, so the tick has 16 due windows per series and writes 16
points per series. Reported, all measured in the same run:
- tick: wall time of ``Worker.tick`` (read the samples of all due windows, score, write all points, advance
  watermarks);
- floor: curl fetching exactly what the tick reads (the same InfluxQL query over the same range) plus curl
  writing the same points (same measurement, tags and fields);
- baseline: the blog's loop, one client and one query per series per window and one write per point
  (measured on min(N, --baseline-max) series and scaled linearly to N when fewer);
- peak memory: tracemalloc peak of a further tick run (Python + numpy allocations).
Tick and floor are each the best of three runs.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import tempfile
import time
import tracemalloc
from pathlib import Path

import numpy as np
from influxdb import InfluxDBClient

from anomalyd import catalog
from anomalyd.catalog import Catalog, StoredModel
from anomalyd.config import from_dict
from anomalyd.detector import Detector
from anomalyd.influx import InfluxDB1Store, Query
from anomalyd.localinflux import LocalInfluxd
from anomalyd.model import sliding_windows
from anomalyd.records import SeriesKey
from anomalyd.state import ScoreStates, Watermarks
from anomalyd.synthetic import ecg
from anomalyd.worker import Worker

SEC = 10**9
INTERVAL = 16 * SEC  # the daemon's tick interval: 16 new samples per series
N_SAMPLES = 96  # per series: the tick's read (31 context + 16 new + the gap margins) and more


def setup(server: LocalInfluxd, n: int, root: Path, now: int) -> tuple[object, np.ndarray]:
    db = f"bench{n}"
    server.query(f'CREATE DATABASE "{db}"')
    cfg = from_dict({
        "influxdb": {"url": server.url, "database": db},
        "paths": {"models": str(root / "models"), "state": str(root / f"state{n}")},
        "daemon": {"lateness": "0s", "health_listen": ""},
        "signals": [{"name": "bench", "measurement": "m", "field": "v", "group_by": ["host"], "period": "1s",
                     "scope": "shared", "window": 32}],
    }, env={})
    x, _ = ecg(20_000, seed=1)
    model = Detector(cfg.signals[0].spec()).fit([x[:8000]])  # type: ignore[attr-defined]
    catalog.save(cfg.paths.models, StoredModel("bench", "bench", (), "shared", model, SEC, 0, 0,
                                               meta={"fields": ["v"]}))
    hi = now // INTERVAL * INTERVAL
    t = hi - (N_SAMPLES - 1) * SEC + np.arange(N_SAMPLES) * SEC
    lines = []
    for i in range(n):
        vals = x[(i * 37) % 10_000 : (i * 37) % 10_000 + N_SAMPLES]
        lines.extend(f"m,host=h{i:05d} v={v:.3f} {ts}" for v, ts in zip(vals, t, strict=True))
    for k in range(0, len(lines), 100_000):
        server.write_lines(db, "\n".join(lines[k : k + 100_000]))
    wm = Watermarks(cfg.paths.state / "watermarks.json")
    for i in range(n):
        wm.advance(SeriesKey("bench", (("host", f"h{i:05d}"),)).id, hi - INTERVAL)
    wm.save()
    return cfg, x


def tick_read_range(cfg, hi: int) -> tuple[int, int]:  # type: ignore[no-untyped-def]
    """The range `Worker` reads for a tick whose windows end in (hi - INTERVAL, hi] (see worker._run_signal)."""
    sig = cfg.signals[0]
    margin = (sig.max_gap + 1) * SEC
    return hi - INTERVAL + SEC - 31 * SEC - margin - SEC // 2, hi + margin + SEC // 2


def curl_floor(cfg, store: InfluxDB1Store, hi: int, n: int, root: Path) -> float:  # type: ignore[no-untyped-def]
    sig = cfg.signals[0]
    q, params = store.build_select(Query(sig.measurement, sig.field, sig.where, sig.group_by, sig.period_ns))
    lo, end = tick_read_range(cfg, hi)
    params.update(start=lo, end=end)
    lines = [f"anomaly_error,host=h{i:05d},model=bench,series=host\\=h{i:05d},signal=bench max_error=1.5,"
             f"threshold=2.5,anomalous=false,score=0.4,missing=false,n_missing=0i {hi - k * SEC}"
             for i in range(n) for k in range(16)]
    batch = cfg.daemon.write_batch  # the daemon writes in batches of this many points: so does the floor
    write_args: list[str] = []
    for b in range(0, len(lines), batch):
        body = root / f"points{b // batch}.txt"
        body.write_text("\n".join(lines[b : b + batch]))
        if write_args:
            write_args.append("--next")
        write_args += ["-sf", "-XPOST", f"{cfg.influxdb.url}/write?db={cfg.influxdb.database}&precision=ns",
                       "--data-binary", f"@{body}"]
    t0 = time.perf_counter()
    subprocess.run(["curl", "-sf", "-o", "/dev/null", "-XPOST", f"{cfg.influxdb.url}/query",
                    "--data-urlencode", f"q={q}", "--data-urlencode", f"db={cfg.influxdb.database}",
                    "--data-urlencode", "epoch=ms", "--data-urlencode", "chunked=true",
                    "--data-urlencode", "chunk_size=100000", "--data-urlencode", f"params={json.dumps(params)}"],
                   check=True)
    subprocess.run(["curl", *write_args], check=True)
    return time.perf_counter() - t0


def blog_loop(cfg, model: Detector, n: int, hi: int) -> float:  # type: ignore[no-untyped-def]
    """One client, one query and one write per series per window, as the blog's live loop does (one window of
    32 samples every 16 s per series)."""
    port = int(cfg.influxdb.url.rsplit(":", 1)[1])
    t0 = time.perf_counter()
    for i in range(n):
        client = InfluxDBClient("127.0.0.1", port, database=cfg.influxdb.database)
        rs = client.query('SELECT "v" FROM "m" WHERE "host" = $h AND time > $lo AND time <= $hi',
                          bind_params={"h": f"h{i:05d}", "lo": hi - 32 * SEC, "hi": hi}, epoch="ns")
        vals = np.array([p["v"] for p in rs.get_points()])
        if len(vals) == 32:
            z = (vals - model.mean_) / model.scale_
            err = float(model.catalog_.match(sliding_windows(z, 32, 16))[2].max())
            client.write_points([{"measurement": "baseline_error", "tags": {"host": f"h{i:05d}"},
                                  "fields": {"max_error": err}, "time": hi}], time_precision="n")
        client.close()
    return time.perf_counter() - t0


def fresh_worker(cfg, store: InfluxDB1Store, n: int, hi: int, now: int,  # type: ignore[no-untyped-def]
                 scores: ScoreStates) -> Worker:
    """A worker whose watermarks put one interval (16 windows) per series due (the score history is kept in
    memory across ticks, as in the daemon)."""
    (cfg.paths.state / "bench.json").unlink(missing_ok=True)  # the previous run's tick saved its watermarks
    wm = Watermarks(cfg.paths.state / "bench.json")
    for i in range(n):
        wm.advance(SeriesKey("bench", (("host", f"h{i:05d}"),)).id, hi - INTERVAL)
    return Worker(cfg, store, Catalog(cfg.paths.models), wm, clock=lambda: now, scores=scores)


def measure(server: LocalInfluxd, n: int, root: Path, baseline_max: int) -> tuple[float, float, float, int, int]:
    now = time.time_ns() // INTERVAL * INTERVAL  # the tick is due exactly one interval after the watermarks
    cfg, _ = setup(server, n, root, now)
    store = InfluxDB1Store(cfg.influxdb)  # type: ignore[attr-defined]
    hi = now // INTERVAL * INTERVAL
    floor = min(curl_floor(cfg, store, hi, n, root) for _ in range(3))
    ticks = []
    scores = ScoreStates(None)
    for _ in range(3):  # best of three, like the floor
        w = fresh_worker(cfg, store, n, hi, now, scores)
        t0 = time.perf_counter()
        rep = w.tick()
        ticks.append(time.perf_counter() - t0)
        assert rep.windows == 16 * n, (rep.windows, n)
    w = fresh_worker(cfg, store, n, hi, now, scores)
    tracemalloc.start()
    w.tick()
    peak = tracemalloc.get_traced_memory()[1]
    tracemalloc.stop()
    nb = min(n, baseline_max)
    model = catalog.load(cfg.paths.models / "bench.json").model  # type: ignore[attr-defined]
    base = blog_loop(cfg, model, nb, hi) * n / nb
    return min(ticks), floor, base, nb, peak


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--series", type=int, nargs="+", default=[1000, 10000])
    ap.add_argument("--baseline-max", type=int, default=2000)
    args = ap.parse_args()
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp)
        server = LocalInfluxd(root / "influxd").start()
        try:
            for n in args.series:
                tick, floor, base, nb, peak = measure(server, n, root, args.baseline_max)
                rows.append((n, tick, floor, base, nb, peak))
                print(f"N={n}: tick {tick:.2f}s, floor {floor:.2f}s ({tick / floor:.2f}x), blog loop "
                      f"{base:.1f}s{' (scaled from ' + str(nb) + ')' if nb < n else ''} "
                      f"({base / tick:.0f}x slower), peak {peak / 2**20:.1f} MiB", flush=True)
        finally:
            server.stop()
    print("\n| series | tick (s) | curl floor (s) | tick / floor | blog loop (s) | blog / tick | peak MiB |")
    print("|---|---|---|---|---|---|---|")
    for n, tick, floor, base, nb, peak in rows:
        note = f" (measured on {nb}, scaled)" if nb < n else ""
        print(f"| {n} | {tick:.2f} | {floor:.2f} | {tick / floor:.2f} | {base:.1f}{note} | {base / tick:.0f} | "
              f"{peak / 2**20:.1f} |")


if __name__ == "__main__":
    main()
