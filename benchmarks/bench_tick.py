"""One tick over many series against a real local influxd, next to the server floor and the blog's loop.

Usage: .venv/bin/python benchmarks/bench_tick.py --series 1000 10000
       .venv/bin/python benchmarks/bench_tick.py --series 1000 --fields 8

With ``--fields F`` (F > 1) each series is a host of F fields, two per measurement (``m0`` .. ``m{F/2-1}``, fields
``v0``/``v1``, as Telegraf writes cpu, mem, disk, net), one multi-field signal over all of them: the tick issues
one query per measurement, joins the fields per host, and writes each window's point (with its attribution fields)
plus F points of the attribution measurement; the floor reads the same measurements and writes the same points.

For each N: N series at 1 Hz, one shared model (window 32), the shipped defaults (every window scored, one point
per window), watermarks one interval (16 s) behind, so the tick has 16 due windows per series and writes 16
points per series. Reported, all measured in the same run:
- tick: wall time of ``Worker.tick`` (read the samples of all due windows, score, write all points, advance
  watermarks);
- floor: curl fetching exactly what the tick reads (the same InfluxQL queries over the same range) plus curl
  posting exactly the lines the tick writes (captured from a tick that keeps them instead of sending them), in
  bodies of ``daemon.write_batch`` lines;
- baseline: the blog's loop, one client and one query per series per window and one write per point
  (measured on min(N, --baseline-max) series and scaled linearly to N when fewer);
- peak memory: tracemalloc peak of a further tick run (Python + numpy allocations).
Tick and floor are each the best of ``--repeat`` runs (three by default), run in turn (floor, tick, floor, ...);
every run is printed beside them, with the median over the runs of each tick against the floor measured just
before it (on a shared machine the load moves between runs; a pair measured together moves with it).
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
import time
import tracemalloc
from pathlib import Path

import numpy as np
from influxdb import InfluxDBClient

from anomalyd.config import from_dict
from anomalyd.core.detector import Detector
from anomalyd.core.model import sliding_windows
from anomalyd.core.records import SeriesKey
from anomalyd.demo.synthetic import ecg
from anomalyd.service import catalog
from anomalyd.service.catalog import Catalog, StoredModel
from anomalyd.service.state import ScoreStates, Watermarks
from anomalyd.service.worker import Worker

try:
    from anomalyd.service.worker import tune_gc
except ImportError:  # an older tree, measured for a before/after figure: it did not tune the collector
    def tune_gc() -> None:
        return None
from anomalyd.store.base import SeriesPoints, line_protocol, series_lines
from anomalyd.store.influx1 import InfluxDB1Store
from anomalyd.store.local import LocalInfluxd

SEC = 10**9
INTERVAL = 16 * SEC  # the daemon's tick interval: 16 new samples per series
N_SAMPLES = 112  # per series: a warm-up tick and a tick (2 x 16 new + 31 context + the gap margins) and more
COLD: dict[int, float] = {}  # series -> the first tick after a restart (whole windows read)
NOW: dict[int, int] = {}  # series -> the time their samples were written up to (the ticks' and the RSS child's now)


def field_layout(n_fields: int) -> list[tuple[str, str]]:
    """(measurement, field) of each field: one field ``m.v``, else two per measurement."""
    if n_fields == 1:
        return [("m", "v")]
    return [(f"m{j // 2}", f"v{j % 2}") for j in range(n_fields)]


def bench_config(url: str, n: int, root: Path, n_fields: int):  # type: ignore[no-untyped-def]
    """The daemon's config for N series (one shared model, window 32, lateness 0)."""
    layout = field_layout(n_fields)
    signal: dict[str, object] = {"name": "bench", "group_by": ["host"], "period": "1s", "scope": "shared",
                                 "window": 32}
    if n_fields == 1:
        signal.update(measurement="m", field="v")
    else:
        signal["fields"] = [{"measurement": m, "field": f} for m, f in layout]
    return from_dict({
        # A long timeout: at 100,000 series on a loaded machine influxd can take more than the default 10 s to
        # start answering, which would fail the tick rather than measure it.
        "influxdb": {"url": url, "database": f"bench{n}x{n_fields}", "timeout": "600s"},
        "paths": {"models": str(root / "models"), "state": str(root / f"state{n}x{n_fields}")},
        "daemon": {"lateness": "0s", "health_listen": ""},
        "signals": [signal],
    }, env={})


def setup(server: LocalInfluxd, n: int, root: Path, now: int, n_fields: int = 1) -> tuple[object, np.ndarray]:
    cfg = bench_config(server.url, n, root, n_fields)
    server.query(f'CREATE DATABASE "{cfg.influxdb.database}"')
    layout = field_layout(n_fields)
    x, _ = ecg(20_000, seed=1)
    train = np.stack([x[97 * j : 97 * j + 8000] for j in range(n_fields)], axis=1)
    model = Detector(cfg.signals[0].spec()).fit([train[:, 0] if n_fields == 1 else train])  # type: ignore
    (cfg.paths.models / "bench.json").unlink(missing_ok=True)  # type: ignore[attr-defined]
    catalog.save(cfg.paths.models, StoredModel("bench", "bench", (), "shared", model, SEC, 0, 0,  # type: ignore
                                               meta={"fields": list(cfg.signals[0].field_names)}))  # type: ignore
    hi = now // INTERVAL * INTERVAL
    t = hi - (N_SAMPLES - 1) * SEC + np.arange(N_SAMPLES) * SEC
    lines = []
    for i in range(n):
        a = (i * 37) % 10_000
        for m in dict.fromkeys(meas for meas, _ in layout):
            cols = [(j, f) for j, (mm, f) in enumerate(layout) if mm == m]
            for k, ts in enumerate(t.tolist()):
                fv = ",".join(f"{f}={x[a + 97 * j + k]:.3f}" for j, f in cols)
                lines.append(f"{m},host=h{i:05d} {fv} {ts}")
        if len(lines) >= 100_000 or i == n - 1:  # written as generated: 100,000 series do not sit in memory
            server.write_lines(cfg.influxdb.database, "\n".join(lines))
            lines = []
    wm = Watermarks(cfg.paths.state / "watermarks.json")
    for i in range(n):
        wm.advance(SeriesKey("bench", (("host", f"h{i:05d}"),)).id, hi - INTERVAL)
    wm.save()
    return cfg, x


def tick_read_range(cfg, hi: int) -> tuple[int, int]:  # type: ignore[no-untyped-def]
    """The range a steady `Worker` tick reads for windows ending in (hi - INTERVAL, hi]: only the samples after the
    watermark (the window before it is kept from the last tick; see worker._run_signal), plus the gap margin."""
    sig = cfg.signals[0]
    margin = (sig.max_gap + 1) * SEC
    return hi - INTERVAL + SEC // 2 + 1, hi + margin + SEC // 2


class CapturingStore(InfluxDB1Store):
    """Reads from influxd, and keeps the line protocol of every write instead of sending it: the floor then posts
    exactly the bytes a tick writes."""

    def __init__(self, *args, **kwargs) -> None:  # type: ignore[no-untyped-def]
        super().__init__(*args, **kwargs)
        self.lines: list[str] = []

    def write(self, points, retention_policy: str = "") -> None:  # type: ignore[no-untyped-def]
        for p in points:
            self.lines.extend(series_lines(p) if isinstance(p, SeriesPoints) else [line_protocol(p)])


def floor_lines(cfg, n: int, hi: int, now: int) -> list[str]:  # type: ignore[no-untyped-def]
    """The lines a tick writes (its points, with their attribution, and its statistics), from a tick that
    keeps them instead of sending them."""
    store = CapturingStore(cfg.influxdb)
    w = fresh_worker(cfg, store, n, hi, now, ScoreStates(None))
    store.lines.clear()  # the warm-up tick's
    w.tick(now)
    return store.lines


def curl_floor(cfg, store: InfluxDB1Store, hi: int, n: int, root: Path,  # type: ignore[no-untyped-def]
               lines: list[str]) -> float:
    from anomalyd.store.sources import signal_reads

    sig = cfg.signals[0]
    lo, end = tick_read_range(cfg, hi)
    reads: list[str] = []
    for r in signal_reads(sig):
        q, params = store.build_select(r.query)
        params.update(start=lo, end=end)
        if reads:
            reads.append("--next")
        reads += ["-sf", "-o", "/dev/null", "-XPOST", f"{cfg.influxdb.url}/query",
                  "--data-urlencode", f"q={q}", "--data-urlencode", f"db={cfg.influxdb.database}",
                  "--data-urlencode", "epoch=ms", "--data-urlencode", "chunked=true",
                  "--data-urlencode", "chunk_size=100000", "--data-urlencode", f"params={json.dumps(params)}",
                  "-H", f"Accept: {'application/x-msgpack' if store.read_format == 'msgpack' else 'application/json'}"]
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
    subprocess.run(["curl", *reads], check=True)
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
                 scores: ScoreStates, warm: bool = True) -> Worker:
    """A worker in its steady state: its watermarks two intervals back and one tick run (warm), so the next tick
    has one interval (16 windows) per series due and keeps the samples before them from that tick. The score
    history is kept in memory across ticks, as in the daemon. ``warm=False``: the first tick after a restart."""
    (cfg.paths.state / "bench.json").unlink(missing_ok=True)  # the previous run's tick saved its watermarks
    wm = Watermarks(cfg.paths.state / "bench.json")
    for i in range(n):
        wm.advance(SeriesKey("bench", (("host", f"h{i:05d}"),)).id, hi - (2 if warm else 1) * INTERVAL)
    w = Worker(cfg, store, Catalog(cfg.paths.models), wm, clock=lambda: now, scores=scores)
    if warm:
        w.tick(now - INTERVAL)
    return w


SPREAD: dict[int, tuple[list[float], list[float]]] = {}  # series -> (every tick, every floor)


def measure(server: LocalInfluxd, n: int, root: Path, baseline_max: int,
            n_fields: int = 1, repeat: int = 3, trace: bool = True) -> tuple[float, float, float, int, int]:
    now = time.time_ns() // INTERVAL * INTERVAL  # the tick is due exactly one interval after the watermarks
    NOW[n] = now
    cfg, _ = setup(server, n, root, now, n_fields)
    store = InfluxDB1Store(cfg.influxdb)  # type: ignore[attr-defined]
    hi = now // INTERVAL * INTERVAL
    lines = floor_lines(cfg, n, hi, now)
    floors, ticks = [], []
    scores = ScoreStates(None)
    for _ in range(repeat):  # floor and tick in turn, so that a change in the machine's load hits both alike
        floors.append(curl_floor(cfg, store, hi, n, root, lines))
        w = fresh_worker(cfg, store, n, hi, now, scores)
        t0 = time.perf_counter()
        rep = w.tick(now)
        ticks.append(time.perf_counter() - t0)
        assert rep.windows == 16 * n, (rep.windows, n)
    floor = min(floors)
    cold = []
    for _ in range(repeat):  # the first tick after a restart reads whole windows
        w = fresh_worker(cfg, store, n, hi, now, scores, warm=False)
        t0 = time.perf_counter()
        w.tick(now)
        cold.append(time.perf_counter() - t0)
    COLD[n] = min(cold)
    SPREAD[n] = (ticks, floors)
    peak = 0
    if trace:
        w = fresh_worker(cfg, store, n, hi, now, scores)
        tracemalloc.start()
        w.tick(now)
        peak = tracemalloc.get_traced_memory()[1]
        tracemalloc.stop()
    nb = min(n, baseline_max)
    if n_fields > 1 or nb == 0:  # the blog's loop has no multi-field form
        return min(ticks), floor, float("nan"), 0, peak
    model = catalog.load(cfg.paths.models / "bench.json").model  # type: ignore[attr-defined]
    base = blog_loop(cfg, model, nb, hi) * n / nb
    return min(ticks), floor, base, nb, peak


def peak_rss_self() -> int:
    """This process's own peak resident memory in bytes: ``VmHWM``, the high-water mark of its address space.

    Not ``getrusage(RUSAGE_SELF).ru_maxrss``: a process started by `subprocess` (vfork, then exec) inherits in it the
    peak of the parent that started it, so a child of this benchmark's parent (which has run ticks over N series
    itself) reported the parent's peak whenever it was the larger (the figures of this file before 2026-11-30's
    second pass)."""
    with open("/proc/self/status") as f:
        return next(int(line.split()[1]) for line in f if line.startswith("VmHWM:")) * 1024


def child_rss(url: str, n: int, root: str, n_fields: int, now: int, full: bool = False) -> None:
    """In a fresh process: a worker in its steady state over N series (two ticks: whole windows after the start,
    then a steady tick, score histories and kept samples in memory); print its own peak RSS in bytes.

    ``full``: before the steady tick, every score history is filled to ``long_window`` averages (16 windows per
    update, as ticks add them): the daemon once it has run for ``long_window`` windows, when no history row is
    smaller than a full one (the model's own history holds fewer, so the plain run measures younger rows)."""
    cfg = bench_config(url, n, Path(root), n_fields)
    store = InfluxDB1Store(cfg.influxdb)  # type: ignore[attr-defined]
    scores = ScoreStates(None)
    w = fresh_worker(cfg, store, n, now, now, scores)
    if full:
        from anomalyd.core.normaliser import update_block

        norms = [nm for _, nm in scores._norms.values()]
        size = norms[0].params.long_window
        rng = np.random.default_rng(0)
        for a in range(0, len(norms), 2000):
            part = norms[a : a + 2000]
            while min(nm.history_length for nm in part) < size:
                update_block(part, 1.0 + 0.01 * rng.standard_normal((len(part), 16)))
            for nm in part:
                nm.release()
        assert all(nm.history_length == size for nm in norms)
    rep = w.tick(now)
    assert rep.windows == 16 * n, (rep.windows, n)  # it scored what the daemon would
    print(peak_rss_self())


def child_state(phase: str, n: int, root: str) -> None:
    """In a fresh process: save (``phase="save"``) or load the score states of N series with full histories
    (long_window 2000, then one tick of 16 windows each), as `ScoreStates` does every ``save_every_s`` and at a
    restart; print the resident memory before and the peak after, in MiB."""
    from anomalyd.core.normaliser import NormaliserParams, ScoreNormaliser, update_block

    def vm_rss() -> float:
        with open("/proc/self/status") as f:
            return next(int(line.split()[1]) for line in f if line.startswith("VmRSS")) / 1024

    def peak() -> float:
        return peak_rss_self() / 2**20

    init = ScoreNormaliser(NormaliserParams())
    init.update(1.0 + 0.1 * np.random.default_rng(0).standard_normal(2100))
    base = peak()
    states = ScoreStates(Path(root) / "scores.npz", save_every_s=0)
    norms = [states.get(f"bench|host=h{i:06d}", "m", init) for i in range(n)]
    if phase == "save":
        rng = np.random.default_rng(1)
        for a in range(0, n, 2000):
            update_block(norms[a : a + 2000], 1.0 + 0.1 * rng.standard_normal((len(norms[a : a + 2000]), 16)))
        states.touch()
        before = vm_rss()
        t0 = time.perf_counter()
        states.save()
        print(f"save: resident {before:.0f} MiB before, peak {peak():.0f} MiB, {time.perf_counter() - t0:.1f} s, "
              f"file {(Path(root) / 'scores.npz').stat().st_size / 2**20:.0f} MiB")
    else:
        assert all(nm.seen == init.seen + 16 for nm in norms)
        print(f"load: resident {vm_rss():.0f} MiB after, peak {peak():.0f} MiB (imports {base:.0f} MiB)")


def state_io(n: int) -> None:
    with tempfile.TemporaryDirectory() as tmp:
        for phase in ("save", "load"):
            out = subprocess.run([sys.executable, __file__, "--child-state", phase, str(n), tmp], check=True,
                                 capture_output=True, text=True).stdout
            print(f"N={n} score states, full histories: {out.strip()}", flush=True)


def peak_rss(server: LocalInfluxd, n: int, root: Path, n_fields: int, now: int, full: bool = False) -> int:
    """The RSS child's peak, its ticks at ``now`` of the samples `setup` wrote (a later clock would find no samples
    in its windows once the measurements took more than a minute, and score nothing); ``full``: histories full."""
    out = subprocess.run([sys.executable, __file__, "--child-rss", server.url, str(n), str(root), str(n_fields),
                          str(now), *(["full"] if full else [])], check=True, capture_output=True, text=True).stdout
    return int(out.split()[-1])


def main() -> None:
    tune_gc()  # as `anomalyd run` does
    if len(sys.argv) > 1 and sys.argv[1] == "--child-rss":
        url, n, root, n_fields, now = sys.argv[2:7]
        child_rss(url, int(n), root, int(n_fields), int(now), full=sys.argv[7:8] == ["full"])
        return
    if len(sys.argv) > 1 and sys.argv[1] == "--child-state":
        child_state(sys.argv[2], int(sys.argv[3]), sys.argv[4])
        return
    ap = argparse.ArgumentParser()
    ap.add_argument("--series", type=int, nargs="+", default=[1000, 10000])
    ap.add_argument("--baseline-max", type=int, default=2000)
    ap.add_argument("--fields", type=int, default=1, help="fields per series (a multi-field signal when > 1)")
    ap.add_argument("--rss", action="store_true", help="also the peak RSS of a daemon process at each N, and of one "
                    "whose score histories are full")
    ap.add_argument("--repeat", type=int, default=3, help="runs of the floor and the ticks (the best is kept)")
    ap.add_argument("--no-tracemalloc", action="store_true", help="skip the tracemalloc tick (slow at 100,000)")
    ap.add_argument("--state-io", action="store_true", help="only the peak RSS of saving and of loading the score "
                    "states of each N (full histories; no influxd)")
    args = ap.parse_args()
    if args.state_io:
        for n in args.series:
            state_io(n)
        return
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp)
        server = LocalInfluxd(root / "influxd").start()
        try:
            for n in args.series:
                tick, floor, base, nb, peak = measure(server, n, root, args.baseline_max, args.fields, args.repeat,
                                                      not args.no_tracemalloc)
                rss = peak_rss(server, n, root, args.fields, NOW[n]) if args.rss else 0
                full = peak_rss(server, n, root, args.fields, NOW[n], full=True) if args.rss else 0
                rows.append((n, tick, floor, base, nb, peak, rss, full))
                ticks, floors = SPREAD[n]
                pairs = sorted(t / f for t, f in zip(ticks, floors, strict=True))
                print(f"N={n}: every tick {', '.join(f'{t:.2f}' for t in ticks)} s; every floor "
                      f"{', '.join(f'{f:.2f}' for f in floors)} s (measured in turn); slowest tick / slowest floor "
                      f"{max(ticks) / max(floors):.2f}; median of tick / the floor just before it "
                      f"{pairs[len(pairs) // 2]:.2f}", flush=True)
                print(f"N={n}: tick {tick:.2f}s, floor {floor:.2f}s ({tick / floor:.2f}x), first tick after a "
                      f"restart {COLD[n]:.2f}s, blog loop {base:.1f}s"
                      f"{' (scaled from ' + str(nb) + ')' if nb < n else ''} ({base / tick:.0f}x slower), "
                      f"tracemalloc peak {peak / 2**20:.1f} MiB" + (f", peak RSS {rss / 2**20:.0f} MiB, with full "
                                                                    f"histories {full / 2**20:.0f} MiB" if rss else ""),
                      flush=True)
        finally:
            server.stop()
    print("\n| series | tick (s) | curl floor (s) | tick / floor | first tick after a restart (s) | blog loop (s) "
          "| blog / tick | tracemalloc peak MiB | peak RSS MiB | peak RSS, full histories MiB |")
    print("|---|---|---|---|---|---|---|---|---|---|")
    for n, tick, floor, base, nb, peak, rss, full in rows:
        note = f" (measured on {nb}, scaled)" if nb < n else ""
        print(f"| {n} | {tick:.2f} | {floor:.2f} | {tick / floor:.2f} | {COLD[n]:.2f} | {base:.1f}{note} | "
              f"{base / tick:.0f} | {peak / 2**20:.1f} | {rss / 2**20:.0f} | {full / 2**20:.0f} |")


if __name__ == "__main__":
    main()
