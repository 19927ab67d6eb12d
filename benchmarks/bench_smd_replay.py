"""SMD through the daemon path: each machine's 38 metrics written into a real InfluxDB as the fields of one series,
`anomalyd train` + `anomalyd score`, the points read back and scored, next to the same run in memory.

Usage::

    .venv/bin/python benchmarks/bench_smd_replay.py [--data ../shared/data/smd] [--machines 1-6 2-1 2-7 3-3]
                                                    [--keep DIR] [--json FILE]

What it does, per machine (one at a time), with the shipped defaults:

1. starts a private influxd (as the tests do; one for the whole run) and writes the machine's rows as ONE series:
   measurement ``smd``, tag ``machine``, fields ``m1`` ... ``m38`` (SMD's 1-based metric numbers, as
   ``interpretation_label`` names them), one row per minute from 2020-01-01T00:00:00Z, the training rows first and
   the test rows right after;
2. writes a config with one signal, ``smd-<machine>``: ``measurement = "smd"``, ``fields = ["m1", ..., "m38"]``,
   ``where = { machine = "<machine>" }``, ``group_by = ["machine"]``, ``period = "1m"``, ``train_range`` = the
   training rows' times; everything else left at its default;
3. runs the CLI as an operator would: ``anomalyd train -c smd.toml --signal smd-<machine>``, then ``anomalyd score -c
   smd.toml --signal smd-<machine> --start <last training row> --end <last test row>`` (the windows ending on
   the test rows);
4. reads back ``anomaly_error`` (``anomalous``, ``score``, ``max_error``, ``top_field``) and ``anomaly_attribution``
   (``share`` per ``field``) and lines them up with the test rows by timestamp (each point carries the time of
   its window's last sample);
5. scores the written ``anomalous`` field with the window-level F1 of `bench_smd` (``window_metrics``, 100-row
   windows, delta 0; the decision is learned from training data alone) and the read-back shares with
   HitRate@100%/150% (`anomalyd.core.attribution`, as `bench_smd --attribution` does);
6. runs the same machine in memory (`anomalyd.evaluation.series.smd_run` with the signal's `DetectorSpec`) and compares
   window by window: the written windows, ``anomalous``, ``score`` and ``max_error`` (float tolerance), the top
   field and every field's share. Any difference is printed (which windows, which columns) and the exit status
   is 1.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import numpy as np
from numpy.typing import NDArray

from anomalyd.config import load
from anomalyd.core.attribution import explain, load_interpretation, shift_segments, summarise
from anomalyd.core.detector import DetectorSpec
from anomalyd.evaluation.datasets import load_smd_machine
from anomalyd.evaluation.metrics import window_metrics
from anomalyd.evaluation.series import smd_run
from anomalyd.store.local import LocalInfluxd

ROOT = Path(__file__).resolve().parents[1]
DEFAULT_DATA = Path(os.environ.get("ANOMALYD_SHARED_DATA") or ROOT.parent / "shared" / "data") / "smd"
ANOMALYD = str(Path(sys.executable).with_name("anomalyd"))
PAPER = {"1-6": 0.4820, "2-1": 0.5696, "2-7": 0.3792, "3-3": 0.4130}
SIZE = 100
START_NS = 1_577_836_800 * 10**9  # 2020-01-01T00:00:00Z
MINUTE = 60 * 10**9
DB = "smd"


def _iso(ns: int) -> str:
    return str(np.datetime64(int(ns), "ns")) + "Z"


def _cli(*args: str) -> float:
    t = time.perf_counter()
    r = subprocess.run([ANOMALYD, *args], capture_output=True, text=True)
    if r.returncode != 0:
        raise RuntimeError(f"anomalyd {' '.join(args)} exited {r.returncode}:\n{r.stdout[-2000:]}\n"
                           f"{r.stderr[-4000:]}")
    return time.perf_counter() - t


def field_names(d: int) -> list[str]:
    return [f"m{j + 1}" for j in range(d)]


def write_machine(server: LocalInfluxd, machine: str, rows: NDArray[np.float64],
                  chunk: int = 2000) -> NDArray[np.int64]:
    """Write the rows (training then test) as one series, one per minute; returns their times."""
    names = field_names(rows.shape[1])
    times = START_NS + np.arange(len(rows), dtype=np.int64) * MINUTE
    for a in range(0, len(rows), chunk):
        lines = [f"smd,machine={machine} " + ",".join(f"{n}={v!r}" for n, v in zip(names, r, strict=True))
                 + f" {t}" for r, t in zip(rows[a : a + chunk].tolist(), times[a : a + chunk].tolist(), strict=True)]
        server.write_lines(DB, "\n".join(lines))
    return times


def signal_toml(machine: str, d: int, train_times: NDArray[np.int64], attribution: str = "") -> str:
    fields = ", ".join(f'"{n}"' for n in field_names(d))
    return (f'[[signals]]\nname = "smd-{machine}"\nmeasurement = "smd"\nfields = [{fields}]\n'
            f'where = {{ machine = "{machine}" }}\ngroup_by = ["machine"]\nperiod = "1m"\n'
            f'train_range = ["{_iso(int(train_times[0]))}", "{_iso(int(train_times[-1]))}"]\n'
            + (f'attribution = "{attribution}"\n' if attribution else ""))


def _select(server: LocalInfluxd, q: str) -> list[list[Any]]:
    res = server.query(q, DB)["results"][0]
    if "error" in res:
        raise RuntimeError(f"{q}: {res['error']}")
    return [r for s in res.get("series", []) for r in s["values"]]


def read_back(server: LocalInfluxd, signal: str, test_times: NDArray[np.int64], names: list[str],
              measurement: str, attribution: str) -> dict[str, Any]:
    """The written points of one signal lined up with the test rows (NaN / None where no point was written)."""
    n = len(test_times)
    at = {int(t): i for i, t in enumerate(test_times.tolist())}
    out: dict[str, Any] = {"written": np.zeros(n, dtype=bool), "anomalous": np.zeros(n, dtype=bool),
                           "score": np.full(n, np.nan), "max_error": np.full(n, np.nan),
                           "top_field": [None] * n, "share": np.full((n, len(names)), np.nan),
                           "stray": 0}
    rows = _select(server, f'SELECT "anomalous", "score", "max_error", "top_field" FROM "{measurement}" '
                           f"WHERE \"signal\" = '{signal}'")
    for t, anom, score, max_error, top in rows:
        i = at.get(int(t))
        if i is None:
            out["stray"] += 1
            continue
        out["written"][i] = True
        out["anomalous"][i] = bool(anom)
        out["score"][i] = np.nan if score is None else score
        out["max_error"][i] = np.nan if max_error is None else max_error
        out["top_field"][i] = top
    col = {name: j for j, name in enumerate(names)}
    for name in names:  # one query per field: 38 answers of one row per window, not one of 38 rows per window
        for t, share in _select(server, f'SELECT "share" FROM "{attribution}" WHERE "signal" = \'{signal}\' '
                                        f"AND \"field\" = '{name}'"):
            i = at.get(int(t))
            if i is not None and share is not None:
                out["share"][i, col[name]] = share
    return out


def compare(daemon: dict[str, Any], b: Any, names: list[str], rtol: float = 1e-9) -> dict[str, Any]:
    """Window-by-window differences between the read-back points and the in-memory batch ``b`` (test rows)."""
    written_off = np.asarray(b.scored & b.last_present)
    diffs: dict[str, list[int]] = {}

    def note(what: str, rows: NDArray[np.bool_]) -> None:
        idx = np.flatnonzero(rows)
        if idx.size:
            diffs[what] = idx.tolist()

    note("written by one side only", daemon["written"] != written_off)
    both = daemon["written"] & written_off
    note("anomalous", both & (daemon["anomalous"] != b.anomalous))
    for name in ("score", "max_error"):
        d, o = daemon[name], np.asarray(getattr(b, name))
        same = (np.isnan(d) & np.isnan(o)) | np.isclose(d, o, rtol=rtol, atol=1e-12)
        note(name, both & ~same)
    # The same code as the daemon's (`anomalyd.core.attribution.explain`): shares with 4 decimals, the
    # out-of-range rule.
    off_share, _, top_off = explain(b.field_weight, b.field_sign, b.field_excess)
    d_share = daemon["share"]
    same = (np.isnan(d_share) & np.isnan(off_share)) | np.isclose(d_share, off_share, rtol=1e-7, atol=1e-12)
    note("share", both & ~same.all(axis=1))
    top_d = np.array([names.index(t) if t in names else -1 for t in daemon["top_field"]])
    note("top_field", both & (top_d != top_off))
    with np.errstate(invalid="ignore"):
        max_score_diff = float(np.nanmax(np.abs(daemon["score"] - b.score)[both])) if both.any() else 0.0
    return {"differences": {k: {"count": len(v), "first_rows": v[:10]} for k, v in diffs.items()},
            "max_abs_score_difference": max_score_diff, "windows_compared": int(both.sum())}


def hit_rates(shares: NDArray[np.float64], segments: list[Any], window: int) -> dict[str, dict[str, float]]:
    centred = shift_segments(segments, window // 2, len(shares))
    return {"stamped": summarise(shares, segments, how="rows"), "centred": summarise(shares, centred, how="rows")}


def run_machine(server: LocalInfluxd, work: Path, data: Path, machine: str,
                attribution: str = "") -> dict[str, Any]:
    train, test, labels = load_smd_machine(data, machine)
    d = train.shape[1]
    names = field_names(d)
    t0 = time.perf_counter()
    times = write_machine(server, machine, np.concatenate((train, test)))
    t_write = time.perf_counter() - t0
    train_times, test_times = times[: len(train)], times[len(train) :]
    cfg_path = work / f"smd-{machine}.toml"
    cfg_path.write_text(f'[influxdb]\nurl = "{server.url}"\ndatabase = "{DB}"\n\n[paths]\nmodels = "models"\n'
                        f'state = "state"\n\n[daemon]\nhealth_listen = ""\n\n'
                        + signal_toml(machine, d, train_times, attribution))
    cfg = load(cfg_path, env={})
    sig = cfg.signals[0]
    assert sig.field_names == tuple(names), sig.field_names
    spec = sig.spec()
    if spec != DetectorSpec(attribution=spec.attribution):
        print(f"note: the signal's spec differs from DetectorSpec(): {spec}", file=sys.stderr)
    t_train = _cli("train", "-c", str(cfg_path), "--signal", sig.name)
    t_score = _cli("score", "-c", str(cfg_path), "--signal", sig.name, "--start", _iso(int(train_times[-1])),
                   "--end", _iso(int(test_times[-1])))
    back = read_back(server, sig.name, test_times, names, cfg.output.measurement, cfg.output.attribution_measurement)
    t1 = time.perf_counter()
    det, b = smd_run(train, test, spec)
    t_offline = time.perf_counter() - t1
    segs = load_interpretation(data / "interpretation_label" / f"machine-{machine}.txt", d)
    f_daemon = window_metrics(labels, back["anomalous"].astype(np.float64), 0.5, SIZE, 0)
    f_offline = window_metrics(labels, np.asarray(b.anomalous, dtype=np.float64), 0.5, SIZE, 0)
    cmp = compare(back, b, names)
    return {
        "rows_train": len(train), "rows_test": len(test), "window": det.window_,
        "seconds": {"write": round(t_write, 1), "train": round(t_train, 1), "score": round(t_score, 1),
                    "offline": round(t_offline, 1)},
        "points_written": int(back["written"].sum()), "points_outside_test_rows": back["stray"],
        "anomalous_daemon": int(back["anomalous"].sum()), "anomalous_offline": int(b.anomalous.sum()),
        "window_f1_daemon": f_daemon["f1"], "window_f1_offline": f_offline["f1"],
        "window_precision_daemon": f_daemon["precision"], "window_recall_daemon": f_daemon["recall"],
        "hit_daemon": hit_rates(back["share"], segs, det.window_),
        "hit_offline": hit_rates(explain(b.field_weight, b.field_sign, b.field_excess)[0], segs, det.window_),
        "compare": cmp,
    }


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--data", type=Path, default=DEFAULT_DATA, help="SMD folder (default %(default)s)")
    ap.add_argument("--machines", nargs="+", choices=list(PAPER), default=list(PAPER))
    ap.add_argument("--keep", type=Path, help="work in this folder and keep it (default: a temporary one)")
    ap.add_argument("--json", type=Path, help="write all figures to this JSON file")
    ap.add_argument("--attribution", choices=("error", "movement"), default="",
                    help="the signal's `attribution` setting (default: not set, the detector's default)")
    args = ap.parse_args(argv)
    if not args.data.is_dir():
        print(f"SMD data not found at {args.data}; pass --data", file=sys.stderr)
        return 2
    work = (args.keep or Path(tempfile.mkdtemp(prefix="anomalyd-smd-replay-"))).resolve()
    work.mkdir(parents=True, exist_ok=True)
    out_json = args.json.resolve() if args.json else None
    data = args.data.resolve()
    server = LocalInfluxd(work / "influxd").start()
    report: dict[str, Any] = {}
    ok = True
    try:
        server.query(f'CREATE DATABASE "{DB}"')
        os.chdir(work)  # the config's relative model and state paths
        for machine in args.machines:
            r = run_machine(server, work, data, machine, args.attribution)
            report[machine] = r
            same_f1 = r["window_f1_daemon"] == r["window_f1_offline"]
            equal = same_f1 and not r["compare"]["differences"] and r["points_outside_test_rows"] == 0
            ok &= equal
            print(f"machine {machine}: {json.dumps(r, default=float)}", flush=True)
            if not equal:
                print(f"machine {machine}: the daemon path DIFFERS from the in-memory run: "
                      f"{json.dumps(r['compare']['differences'])}", flush=True)
    finally:
        server.stop()
    print("\n| machine | paper window F1 | window F1, daemon | window F1, in memory | equal windows | "
          "HitRate@100 / @150 as stamped, daemon | centred, daemon | centred, in memory | seconds write / train / "
          "score |")
    print("|---|---|---|---|---|---|---|---|---|")
    for m, r in report.items():
        c = r["compare"]
        hd, ho = r["hit_daemon"], r["hit_offline"]
        same = "yes" if not c["differences"] else "NO: " + ", ".join(f"{k} {v['count']}"
                                                                     for k, v in c["differences"].items())
        print(f"| {m} | {PAPER[m]:.4f} | **{r['window_f1_daemon']:.4f}** | {r['window_f1_offline']:.4f} | "
              f"{same} ({c['windows_compared']} windows, max score diff {c['max_abs_score_difference']:.1e}) | "
              f"{hd['stamped']['hit@100']:.3f} / {hd['stamped']['hit@150']:.3f} | "
              f"{hd['centred']['hit@100']:.3f} / {hd['centred']['hit@150']:.3f} | "
              f"{ho['centred']['hit@100']:.3f} / {ho['centred']['hit@150']:.3f} | "
              f"{r['seconds']['write']:.0f} / {r['seconds']['train']:.0f} / {r['seconds']['score']:.0f} |")
    print("\ndaemon path == in-memory run on every machine:", "yes" if ok else "NO")
    if out_json:
        out_json.write_text(json.dumps(report, indent=2, default=float) + "\n")
    return 0 if ok else 1


if __name__ == "__main__":
    raise SystemExit(main())
