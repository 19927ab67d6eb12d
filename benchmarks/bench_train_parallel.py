"""Per-series training in parallel (issue 12): 1 process, 2 local processes and a 2-worker Dask LocalCluster.

``--series`` series (default 1,000) of the synthetic ECG (`anomalyd.demo.synthetic.ecg`, one seed each) are written to
a private influxd, ``--samples`` samples each (default 4,320: 12 hours at 10 s), one per-series signal over them
at the daemon's defaults (window "auto", at most 150 shapes, train slide 2, hold-out 20%). Then `training.train`,
the code behind ``anomalyd train``, runs once per mode, each in a fresh process:

- ``1 process``: ``jobs=1`` (``anomalyd train --jobs 1``);
- ``2 processes``: ``jobs=2`` (``anomalyd train --jobs 2``, joblib's loky processes; their start is included);
- ``LocalCluster``: a ``distributed.LocalCluster(n_workers=2, threads_per_worker=1, processes=True)`` started
  first (its start is reported apart: a cluster outlives one training), then ``dask=<its address>`` (``anomalyd
  train --dask ADDRESS``);
- ``2 processes, 1 OpenMP thread each``: as ``2 processes`` with ``training.WORKER_THREADS = 1``. By default a
  worker fits with as many OpenMP threads as the coordinator has (2 here), so that its models are bit for bit
  those of one process; on 2 cores, 2 processes of 2 threads each are oversubscribed. This row shows what one
  thread per fit would give (its models differ from the others in the last bits: the largest difference is
  reported);
- ``1 process, 1 OpenMP thread``: as ``1 process`` with ``OMP_NUM_THREADS=1`` (the same models as the row
  before).

``--modes`` picks some of them (by the short names jobs1, jobs2, dask, jobs2-1thread, jobs1-1thread).

Each timing covers the whole training: the one query of the signal, preparing each series, the fits, saving the
1,000 model files. The part that stays serial in the coordinator (the query and the preparation, measured apart
in this process) is reported so the ceiling on the speed-up is visible. The saved models of the three modes are
compared array by array (``1 process``, ``2 processes`` and ``LocalCluster`` must be identical).

Usage::

    .venv/bin/python benchmarks/bench_train_parallel.py [--series 1000] [--samples 4320]
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import numpy as np

from anomalyd.config import Config, from_dict
from anomalyd.core.records import SeriesKey
from anomalyd.demo.synthetic import ecg
from anomalyd.service import training
from anomalyd.store.influx1 import InfluxDB1Store
from anomalyd.store.local import LocalInfluxd
from anomalyd.store.sources import read_signal

SEC = 10**9
PERIOD_S = 10
MODES = {"1 process": "jobs1", "2 processes": "jobs2", "2-worker LocalCluster": "dask",
         "2 processes, 1 OpenMP thread each": "jobs2-1thread", "1 process, 1 OpenMP thread": "jobs1-1thread"}


def config(url: str, db: str, models: Path) -> Config:
    return from_dict({
        "influxdb": {"url": url, "database": db, "timeout": "120s"},
        "paths": {"models": str(models), "state": str(models.parent / "state")},
        "daemon": {"health_listen": ""},
        "signals": [{"name": "bench", "measurement": "ecg", "field": "value", "group_by": ["host"],
                     "period": f"{PERIOD_S}s", "train_range": ["now-2d", "now"]}],
    }, env={})


def write(server: LocalInfluxd, db: str, n_series: int, n_samples: int, end_ns: int) -> None:
    server.query(f'CREATE DATABASE "{db}"')
    t = (end_ns - np.arange(n_samples, dtype=np.int64)[::-1] * PERIOD_S * SEC).tolist()
    lines: list[str] = []
    for i in range(n_series):
        x, _ = ecg(n_samples, seed=1000 + i)
        lines += [f"ecg,host=h{i:05d} value={v:.3f} {ts}" for v, ts in zip(x.tolist(), t, strict=True)]
        if len(lines) >= 200_000 or i == n_series - 1:
            server.write_lines(db, "\n".join(lines))
            lines = []


def run(mode: str, url: str, db: str, models: Path, now_ns: int) -> dict[str, Any]:
    """One training in this (fresh) process."""
    cfg = config(url, db, models)
    store = InfluxDB1Store(cfg.influxdb, cfg.daemon.write_batch)
    out: dict[str, Any] = {}
    cluster = None
    kwargs: dict[str, Any] = {"jobs": 1}
    if mode.startswith("jobs2"):  # jobs1-1thread: jobs=1, OMP_NUM_THREADS=1 set by the caller
        kwargs = {"jobs": 2}
        if mode == "jobs2-1thread":
            training.WORKER_THREADS = 1
    elif mode == "dask":
        from distributed import LocalCluster

        t0 = time.perf_counter()
        cluster = LocalCluster(n_workers=2, threads_per_worker=1, processes=True, dashboard_address=None)
        out["cluster_start_s"] = time.perf_counter() - t0
        kwargs = {"dask": cluster.scheduler_address}
    t0 = time.perf_counter()
    report = training.train(cfg, store, now_ns=now_ns, progress=False, **kwargs)
    out["seconds"] = time.perf_counter() - t0
    out["trained"], out["failed"] = len(report.trained), len(report.failed)
    out["rss_peak_mib"] = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    if cluster is not None:
        cluster.close()
    return out


def serial_part(cfg: Config, store: InfluxDB1Store, now_ns: int) -> tuple[float, float]:
    """Seconds of the signal's query and of preparing every series (what the coordinator does alone)."""
    sig = cfg.signals[0]
    start, end = sig.train_range.resolve(now_ns)
    t0 = time.perf_counter()
    data = read_signal(store, sig, start, end)
    t1 = time.perf_counter()
    for tags, per_field in data.items():
        training.prepare(per_field, None, sig, SeriesKey(sig.name, tags))
    return t1 - t0, time.perf_counter() - t1


def compare(a: Path, b: Path) -> str:
    """"yes" when the two model folders hold the same models (every array of every model equal, bit for bit, and
    the same metadata; the files themselves differ: a .npz records when it was written), else the largest
    difference of the models' arrays (cluster centres, normaliser...) and thresholds."""
    names = sorted(p.name for p in a.glob("*.json"))
    if names != sorted(p.name for p in b.glob("*.json")):
        return "NO (other models)"
    differ, arrays, thresholds = 0, 0.0, 0.0
    for name in names:
        ma, mb = (json.loads((d / name).read_text()) for d in (a, b))
        for m in (ma, mb):
            for k in ("npz_sha256", "meta_sha256"):
                m.pop(k)
        same = ma == mb
        ta, tb = float(ma["threshold"]), float(mb["threshold"])
        thresholds = max(thresholds, abs(ta - tb) / abs(tb))
        npz = name.removesuffix(".json") + ".npz"
        with np.load(a / npz) as za, np.load(b / npz) as zb:
            for k in za.files:
                same = same and np.array_equal(za[k], zb[k], equal_nan=True)
                arrays = max(arrays, float(np.nanmax(np.abs(za[k] - zb[k]), initial=0.0)))
        differ += not same
    if not differ:
        return "yes"
    return (f"no: {differ} models differ, arrays by at most {arrays:.1e}, thresholds by at most {thresholds:.1e} "
            "(relative)")


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--series", type=int, default=1000)
    p.add_argument("--samples", type=int, default=4320, help="per series, 10 s apart (default 12 h)")
    p.add_argument("--modes", nargs="+", choices=list(MODES.values()), default=list(MODES.values())[:4],
                   help="the modes to run (default: the first four; jobs1 always runs first, as the reference)")
    p.add_argument("--run", help=argparse.SUPPRESS)
    p.add_argument("--url", help=argparse.SUPPRESS)
    p.add_argument("--db", help=argparse.SUPPRESS)
    p.add_argument("--models", type=Path, help=argparse.SUPPRESS)
    p.add_argument("--now", type=int, help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    if args.run:
        print(json.dumps(run(args.run, args.url, args.db, args.models, args.now)))
        return 0
    load_before = f"{os.getloadavg()[0]:.1f}"
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp)
        server = LocalInfluxd(root / "influxd").start()
        try:
            db = "bench"
            end = (time.time_ns() // SEC - 60) // PERIOD_S * PERIOD_S * SEC
            t0 = time.perf_counter()
            write(server, db, args.series, args.samples, end)
            print(f"wrote {args.series:,} series x {args.samples:,} samples in {time.perf_counter() - t0:.0f} s",
                  flush=True)
            now = end + PERIOD_S * SEC
            cfg = config(server.url, db, root / "unused")
            read_s, prepare_s = serial_part(cfg, InfluxDB1Store(cfg.influxdb, cfg.daemon.write_batch), now)
            print(f"serial part in the coordinator: query {read_s:.1f} s, prepare {prepare_s:.1f} s", flush=True)
            results: dict[str, dict[str, Any]] = {}
            modes = ["jobs1", *(m for m in args.modes if m != "jobs1")]
            for label, mode in sorted(MODES.items(), key=lambda lm: modes.index(lm[1]) if lm[1] in modes else 99):
                if mode not in modes:
                    continue
                models = root / mode / "models"
                env = {**os.environ, "OMP_NUM_THREADS": "1"} if mode == "jobs1-1thread" else None
                out = subprocess.run([sys.executable, __file__, "--run", mode, "--url", server.url, "--db", db,
                                      "--models", str(models), "--now", str(now)],
                                     capture_output=True, text=True, check=True, env=env)
                results[label] = r = json.loads(out.stdout.strip().splitlines()[-1])
                r["same"] = compare(models, root / "jobs1" / "models")
                print(f"{label}: {r['seconds']:.1f} s, {r['trained']} trained, {r['failed']} failed"
                      + (f" (cluster start {r['cluster_start_s']:.1f} s)" if "cluster_start_s" in r else ""),
                      flush=True)
        finally:
            server.stop()
    base = results["1 process"]["seconds"]
    print(f"\n{args.series:,} per-series models, {args.samples:,} samples each (serial part: query {read_s:.1f} s, "
          f"prepare {prepare_s:.1f} s)\n")
    print(f"load average before: {load_before}, after: {os.getloadavg()[0]:.1f} (2 cores, shared)\n")
    print("| mode | train (s) | speed-up vs 1 process | models trained / failed | identical to 1 process | "
          "coordinator peak RSS (MiB) |")
    print("|---|---|---|---|---|---|")
    for label, r in results.items():
        extra = f" (+ {r['cluster_start_s']:.1f} s cluster start)" if "cluster_start_s" in r else ""
        print(f"| {label} | {r['seconds']:.1f}{extra} | {base / r['seconds']:.2f}x | {r['trained']} / "
              f"{r['failed']} | {r['same']} | {r['rss_peak_mib']:,.0f} |")
    return 0


if __name__ == "__main__":
    sys.exit(main())
