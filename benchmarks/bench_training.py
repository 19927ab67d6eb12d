"""Benchmark (d): training time and peak memory against training length, up to 10 million samples.

``Detector(DetectorSpec(window=32)).fit([x])`` -- the daemon's defaults (`anomalyd.config`) with the window fixed at
32: train slide 2, at most 150 shapes, 3 K-Means restarts, hold-out 20%, subsample 50,000 -- on one gap-free
stretch of the synthetic ECG. ``fit`` scales the data, clusters the training windows into the shape catalog,
matches the hold-out windows (every window, slide 1) for the thresholds and warms the score normaliser up on
their errors. The scaling rule, in `anomalyd.core.model.ShapeCatalog`: above ``max_train_windows`` (50,000) training
windows, K-Means is fitted on a seeded uniform random subsample of 50,000 windows, so the clustering costs the
same at 1M and 10M samples.

Variants: ``fit`` (the defaults) at every length; ``all windows`` (the same fit with ``max_train_windows`` raised
so K-Means sees every training window: the cost the subsample avoids, and what it changes in the fit) at the
lengths up to ``--all-max`` samples that have more than 50,000 training windows (below that both are the same
fit). Reported: fit seconds, peak RSS (``ru_maxrss``, including the interpreter, libraries and the generated
input), the tracemalloc peak during ``fit``, training windows, shapes, and the 0.999 quantile of the hold-out
window errors (``error_threshold_``, the score's input; lower is a closer catalog).

Each (length, variant) runs in ``--repeat`` fresh subprocesses (so peak RSS is its own); the table gives the
fastest run's seconds (the machine may be shared) and the largest peaks (they hardly vary).

Usage::

    .venv/bin/python benchmarks/bench_training.py [--lengths 10000 100000 1000000 10000000] [--all-max 1000000]
        [--repeat 2]
"""

from __future__ import annotations

import argparse
import json
import resource
import subprocess
import sys
import time
import tracemalloc
from typing import Any

from anomalyd.core.detector import Detector, DetectorSpec
from anomalyd.demo.synthetic import ecg

SPEC = DetectorSpec(window=32)


def one(length: int, variant: str) -> dict[str, Any]:
    """Fit once in this process; return seconds, peak memory and what was learned."""
    x, _ = ecg(length, seed=0)
    spec = SPEC if variant == "fit" else SPEC.with_overrides(max_train_windows=length)  # >= training windows
    base_rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    tracemalloc.start()
    t0 = time.perf_counter()
    det = Detector(spec).fit([x])
    seconds = time.perf_counter() - t0
    _, peak = tracemalloc.get_traced_memory()
    tracemalloc.stop()
    rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return {"length": length, "variant": variant, "seconds": seconds, "traced_peak_mib": peak / 2**20,
            "rss_peak_mib": rss / 1024, "rss_before_mib": base_rss / 1024, "input_mib": x.nbytes / 2**20,
            "train_windows": int(det.catalog_.n_train_windows_), "shapes": len(det.catalog_.cluster_centers_),
            "error_q999": float(det.error_threshold_), "threshold": float(det.threshold_)}


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--lengths", type=int, nargs="+", default=[10_000, 100_000, 1_000_000, 10_000_000])
    p.add_argument("--all-max", type=int, default=1_000_000,
                   help="largest length for the 'all windows' variant (0: never)")
    p.add_argument("--repeat", type=int, default=2, help="fresh processes per (length, variant)")
    p.add_argument("--one", type=int, help=argparse.SUPPRESS)
    p.add_argument("--variant", default="fit", help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    if args.one:
        print(json.dumps(one(args.one, args.variant)))
        return 0
    print(f"## Training time and peak memory (window {SPEC.window}, train slide {SPEC.train_slide}, at most "
          f"{SPEC.n_clusters} shapes, n_init {SPEC.n_init}, hold-out {SPEC.holdout:.0%}, subsample "
          f"{SPEC.max_train_windows:,})\n")
    print("| samples | variant | training windows | shapes | fit (s) | peak RSS (MiB) | RSS before fit (MiB) "
          "| traced peak (MiB) | input (MiB) | hold-out error q0.999 |")
    print("|---|---|---|---|---|---|---|---|---|---|")
    for length in args.lengths:
        train_windows = (length - round(SPEC.holdout * length)) // SPEC.train_slide  # about: the first 80%, slide 2
        subsampled = train_windows > SPEC.max_train_windows
        variants = ["fit", "all windows"] if subsampled and length <= args.all_max else ["fit"]
        for variant in variants:
            runs = []
            for _ in range(args.repeat):
                out = subprocess.run([sys.executable, __file__, "--one", str(length), "--variant", variant],
                                     capture_output=True, text=True, check=True)
                runs.append(json.loads(out.stdout.strip().splitlines()[-1]))
            r = min(runs, key=lambda run: run["seconds"])
            for key in ("rss_peak_mib", "rss_before_mib", "traced_peak_mib"):
                r[key] = max(run[key] for run in runs)
            print(f"| {length:,} | {variant} | {r['train_windows']:,} | {r['shapes']} | {r['seconds']:.1f} | "
                  f"{r['rss_peak_mib']:,.0f} | {r['rss_before_mib']:,.0f} | {r['traced_peak_mib']:,.0f} | "
                  f"{r['input_mib']:.0f} | {r['error_q999']:.4f} |", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
