"""Benchmark (e): the UCR anomaly archive (KDD Cup 2021), top-1 location per series, per window scorer.

Every series goes through `anomalyd.evaluation.series`'s UCR path -- `anomalyd.core.stored_run.run_stored`, the daemon's
own path in memory: trained on the series' training part only, every later row scored by the one
`anomalyd.core.detector.Detector` -- once per scorer configuration. A series is a hit when the row with the highest
value after the training part (the first on ties) is within 100 rows of the labelled anomaly (the archive's rule,
``../shared/data/ucr``). Two columns per configuration: the detector's ``score`` (the decision's input) and the raw
window ``error`` (the score's own input).

Measured in the same run, as baselines:

* the plain matrix-profile discord: `stumpy.stump` AB-join of the test part against the training part, window =
  the training part's dominant period (`anomalyd.core.detector.dominant_period`; 100 when it has none), the location
  is the middle of the test subsequence farthest from its nearest training neighbour;
* the trivial baseline: the largest absolute first difference after the training part (77 of 234 in the data's
  README).

With ``--discord-lengths``, also the same discord at half and twice that window, and the discord over the three
lengths together (the location whose distance divided by sqrt(window) is the largest: the z-normalised distance
grows with sqrt(window)), which is how a multi-length discord search such as MERLIN compares lengths.

Usage::

    .venv/bin/python benchmarks/bench_ucr.py [--data ../shared/data/ucr] [--every 4] [--configs kmeans discord]
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from pathlib import Path
from typing import Any

import numpy as np

from anomalyd.core.detector import DetectorSpec, TooLittleDataError, dominant_period
from anomalyd.core.stored_run import by_timestamp
from anomalyd.evaluation.datasets import load_ucr_index
from anomalyd.evaluation.metrics import ucr_top1
from anomalyd.evaluation.series import ucr_run

ROOT = Path(__file__).resolve().parents[1]
DEFAULT_DATA = Path(os.environ.get("ANOMALYD_SHARED_DATA") or ROOT.parent / "shared" / "data") / "ucr"

#: Configurations (name -> `DetectorSpec.with_overrides` arguments); "kmeans" is the shipped default.
CONFIGS: dict[str, dict[str, Any]] = {
    "kmeans": {},
    "fft": {"scorer": "fft"},
    "saliency": {"scorer": "saliency"},
    "generalized": {"scorer": "generalized"},
    "discord": {"scorer": "discord"},
    "kmeans+discord": {"scorer": "kmeans+discord"},
    "discord, window = one period (to 256)": {"scorer": "discord", "period_fraction": 1.0, "max_window": 256},
    "kmeans, robust reference, range per sample": {"normaliser_reference": "robust", "range_by": "sample",
                                                   "normaliser_range_growth": 1.0},
    "kmeans, range per window, no growth cap (the default before 2026-11-30)": {"range_by": "window",
                                                                               "normaliser_range_growth": None},
    "kmeans, resolution floor 1, per-field surprise 500": {"resolution_floor": 1.0, "field_surprise": 500},
}


def discord_window(x: np.ndarray, train_end: int) -> int:
    """The baseline's window: the training part's dominant period (100 without one), within what both parts allow."""
    train, test = x[:train_end], x[train_end:]
    period = dominant_period(train, max_lag=len(train) // 3)
    return int(np.clip(period or 100, 8, max(8, min(len(train) // 2, len(test) // 2))))


def stumpy_discord(x: np.ndarray, train_end: int, m: int | None = None) -> tuple[int, int, float]:
    """The plain AB-join discord's location, its window (default `discord_window`) and its distance (see the module
    docstring)."""
    import stumpy

    m = m or discord_window(x, train_end)
    mp = stumpy.stump(x[train_end:], m, T_B=x[:train_end], ignore_trivial=False)
    d = np.asarray(mp[:, 0], dtype=np.float64)
    d[~np.isfinite(d)] = -np.inf
    return train_end + int(np.argmax(d)) + m // 2, m, float(d.max())


#: ``--discord-lengths``: the baseline's window times these factors.
LENGTHS = {"half the period": 0.5, "twice the period": 2.0}


def first_difference(x: np.ndarray, train_end: int) -> int:
    return train_end + int(np.argmax(np.abs(np.diff(x[train_end - 1 :]))))


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--data", type=Path, default=DEFAULT_DATA, help="UCR folder (default %(default)s)")
    p.add_argument("--every", type=int, default=1, help="every N-th series of index.csv (default 1: all)")
    p.add_argument("--offset", type=int, default=0, help="start at this series of index.csv (default 0): "
                   "--every 8 --offset 4 is a subset disjoint from --every 8")
    p.add_argument("--configs", nargs="+", default=list(CONFIGS), help="configurations to run (default all)")
    p.add_argument("--max-gap", type=int, default=8, help="signals.max_gap (default 8)")
    p.add_argument("--no-baselines", action="store_true", help="skip the stumpy and first-difference baselines")
    p.add_argument("--discord-lengths", action="store_true", help="also the discord at half and twice the period, "
                   "and over the three lengths together")
    p.add_argument("--json", type=Path, help="write per-series results to this JSON file")
    p.add_argument("--spec", help="JSON of `DetectorSpec.with_overrides` arguments, measured as configuration "
                   "'spec' (e.g. '{\"normaliser_unsaturated\": true}'); with --configs, add 'spec' to run it")
    args = p.parse_args(argv)
    if args.spec is not None:
        CONFIGS["spec"] = json.loads(args.spec)
        if "spec" not in args.configs:
            args.configs = [*args.configs, "spec"] if "--configs" in (argv or sys.argv) else ["spec"]
    if not (args.data / "series.npz").is_file():
        print(f"UCR data not found at {args.data}; pass --data", file=sys.stderr)
        return 2
    unknown = [c for c in args.configs if c not in CONFIGS]
    if unknown:
        print(f"unknown configurations {unknown}; choose from {list(CONFIGS)}", file=sys.stderr)
        return 2
    index = load_ucr_index(args.data)[args.offset :: args.every]
    hits: dict[str, dict[str, int]] = {c: {"score": 0, "error": 0, "ties": 0, "failed": 0} for c in args.configs}
    seconds = dict.fromkeys(args.configs, 0.0)
    base = {"stumpy discord (AB-join, window = period)": 0, "largest first difference": 0}
    if args.discord_lengths:
        base.update({f"stumpy discord, window = {k}": 0 for k in LENGTHS})
        base["stumpy discord, the three windows (largest distance / sqrt(window))"] = 0
    base_s = 0.0
    rows: list[dict[str, Any]] = []
    with np.load(args.data / "series.npz") as z:
        for i, u in enumerate(index):
            x = np.asarray(z[u.name], dtype=np.float64)
            row: dict[str, Any] = {"name": u.name}
            times = np.arange(x.size, dtype=np.int64) * 10**9
            for c in args.configs:
                spec = DetectorSpec().with_overrides(**CONFIGS[c])
                t0 = time.perf_counter()
                try:
                    run = ucr_run((u, x, spec, args.max_gap))
                except TooLittleDataError:
                    hits[c]["failed"] += 1
                    continue
                seconds[c] += time.perf_counter() - t0
                score = np.nan_to_num(by_timestamp(run, times, run.batch.score), nan=-np.inf)
                error = np.nan_to_num(by_timestamp(run, times, run.batch.error), nan=-np.inf)
                for key, col in (("score", score), ("error", error)):
                    at, hit = ucr_top1(col, u.train_end, u.anomaly_first, u.anomaly_last)
                    hits[c][key] += hit
                    row[f"{c}/{key}"] = [at, hit]
                top = score[u.train_end :].max()
                hits[c]["ties"] += int(np.count_nonzero(score[u.train_end :] == top) > 1)
            if not args.no_baselines:
                t0 = time.perf_counter()
                at, m, dist = stumpy_discord(x, u.train_end)
                ok = u.anomaly_first - 100 <= at <= u.anomaly_last + 100
                base["stumpy discord (AB-join, window = period)"] += ok
                if args.discord_lengths:
                    cap = max(8, min(u.train_end // 2, (x.size - u.train_end) // 2))
                    found = [(dist / np.sqrt(m), at)]
                    for k, f in LENGTHS.items():
                        at_k, m_k, d_k = stumpy_discord(x, u.train_end, int(np.clip(round(m * f), 8, cap)))
                        base[f"stumpy discord, window = {k}"] += u.anomaly_first - 100 <= at_k <= u.anomaly_last + 100
                        found.append((d_k / np.sqrt(m_k), at_k))
                    at_all = max(found)[1]
                    base["stumpy discord, the three windows (largest distance / sqrt(window))"] += (
                        u.anomaly_first - 100 <= at_all <= u.anomaly_last + 100)
                at2 = first_difference(x, u.train_end)
                base["largest first difference"] += u.anomaly_first - 100 <= at2 <= u.anomaly_last + 100
                base_s += time.perf_counter() - t0
                row.update(stumpy=[at, bool(ok), m], first_difference=at2)
            rows.append(row)
            print(f"{i + 1}/{len(index)} {u.name}: " + " ".join(
                f"{c}={int(row.get(f'{c}/score', [0, False])[1])}{int(row.get(f'{c}/error', [0, False])[1])}"
                for c in args.configs) + (f" stumpy={int(row['stumpy'][1])}" if "stumpy" in row else ""),
                file=sys.stderr, flush=True)
    n = len(index)
    print(f"## UCR anomaly archive, {n} series (every {args.every}th from {args.offset} of "
          f"{len(load_ucr_index(args.data))}), top-1 within 100 rows\n")
    print("| configuration | top-1 by `score` | top-1 by `error` | series with a tie at the top score | "
          "seconds |")
    print("|---|---|---|---|---|")
    for c in args.configs:
        h = hits[c]
        fail = f" ({h['failed']} not trainable)" if h["failed"] else ""
        print(f"| {c} | {h['score']}/{n} ({h['score'] / n:.3f}){fail} | {h['error']}/{n} ({h['error'] / n:.3f}) | "
              f"{h['ties']} | {seconds[c]:.0f} |")
    if not args.no_baselines:
        for name, got in base.items():
            print(f"| baseline: {name} | {got}/{n} ({got / n:.3f}) | | | {base_s:.0f} (all baselines) |")
    if args.json:
        args.json.write_text(json.dumps({"hits": hits, "baselines": base, "series": rows}, indent=1,
                                        default=float) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
