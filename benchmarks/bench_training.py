"""Benchmark (d): training time and peak memory against training length, up to 10 million samples.

`WindowReconstructor.fit` with the daemon's defaults (window 32, train slide 2, 150 clusters, 5 K-Means
restarts, hold-out 20%) on the synthetic ECG signal. The scaling rule, in `anomalyd.model`: above
``max_train_windows`` (50,000) training windows, K-Means is fitted on a seeded uniform random subsample of
50,000 windows, so the clustering costs the same at 1M and 10M samples. Plain K-Means on every window would
grow linearly (about 5M windows at 10M samples); MiniBatchKMeans is not needed with the subsample.

Around the clustering, ``fit`` draws the subsample's window *indices* first and copies only those windows, and
scores the hold-out in 4096-window chunks, so memory is bounded by the subsample plus the input. The ``before``
variant reproduces the earlier ``fit`` for comparison in the same run: it materialised every training window
(``np.concatenate`` of the strided views, times the taper) before subsampling and scored the whole hold-out in
one call (a ``n_windows x n_clusters`` distance matrix). Both give the same centroids and threshold (checked).

Each (length, variant) runs in a fresh subprocess so peak RSS (``ru_maxrss``) is its own.

Usage::

    .venv/bin/python benchmarks/bench_training.py [--lengths 10000 100000 1000000 10000000]
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

import numpy as np

from anomalyd.model import N_SCORE_QUANTILES, WindowReconstructor, sliding_windows, taper, threshold_from_errors
from anomalyd.synthetic import ecg


def before_fit(model: WindowReconstructor, x: np.ndarray) -> WindowReconstructor:
    """``WindowReconstructor.fit`` as it was before the memory fix, for one gap-free series (same result)."""
    from sklearn.cluster import KMeans

    w, slide = model.window, model.train_slide
    n_val = max(round(model.holdout * len(x)), w)
    windows = np.concatenate([sliding_windows(x[: len(x) - n_val], w, slide)]) * taper(w)  # every window
    val = np.concatenate([sliding_windows(x[len(x) - n_val :], w, 1)])
    rng = np.random.default_rng(model.random_state)
    model.n_train_windows_ = len(windows)
    if len(windows) > model.max_train_windows:
        windows = windows[np.sort(rng.choice(len(windows), model.max_train_windows, replace=False))]
    km = KMeans(model.n_clusters, n_init=model.n_init, random_state=model.random_state).fit(windows)
    model.cluster_centers_ = np.ascontiguousarray(km.cluster_centers_, dtype=np.float64)
    model._center_sq = (model.cluster_centers_**2).sum(axis=1)
    vt = val * taper(w)  # one n_val x n_clusters distance matrix
    d = model._center_sq[None, :] - 2.0 * (vt @ model.cluster_centers_.T)
    val_errors = np.abs(vt - model.cluster_centers_[d.argmin(axis=1)]).max(axis=1)
    model.threshold_ = threshold_from_errors(val_errors, model.threshold_policy, model.margin, model.quantile,
                                             model.sigma_k)
    model.error_quantiles_ = np.quantile(val_errors, np.linspace(0.0, 1.0, N_SCORE_QUANTILES))
    model.n_features_in_ = w
    return model


def one(length: int, variant: str) -> dict[str, Any]:
    """Fit once in this process; return seconds and peak memory."""
    x, _ = ecg(length, seed=0)
    base_rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    tracemalloc.start()
    t0 = time.perf_counter()
    model = WindowReconstructor()
    if variant == "before":
        before_fit(model, x)
    else:
        model.fit(x)
    seconds = time.perf_counter() - t0
    _, peak = tracemalloc.get_traced_memory()
    tracemalloc.stop()
    rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return {"length": length, "variant": variant, "seconds": seconds, "traced_peak_mib": peak / 2**20,
            "rss_peak_mib": rss / 1024, "rss_before_mib": base_rss / 1024, "input_mib": x.nbytes / 2**20,
            "train_windows": int(model.n_train_windows_), "threshold": float(model.threshold_)}


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--lengths", type=int, nargs="+", default=[10_000, 100_000, 1_000_000, 10_000_000])
    p.add_argument("--variants", nargs="+", default=["fit", "before"], choices=["fit", "before"])
    p.add_argument("--one", type=int, help=argparse.SUPPRESS)
    p.add_argument("--variant", default="fit", help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    if args.one:
        print(json.dumps(one(args.one, args.variant)))
        return 0
    # The fix must not have changed the model: same centroids and threshold on a length that subsamples.
    x, _ = ecg(200_000, seed=3)
    a, b = WindowReconstructor().fit(x), before_fit(WindowReconstructor(), x)
    same = np.allclose(a.cluster_centers_, b.cluster_centers_) and np.isclose(a.threshold_, b.threshold_)
    print("## Training time and peak memory (window 32, slide 2, 150 clusters, n_init 5, subsample 50,000)\n")
    print(f"the earlier fit gives the same centroids and threshold as model.fit at 200k samples: {same}\n")
    print("| samples | variant | training windows | fit (s) | peak RSS (MiB) | traced peak (MiB) | input (MiB) |")
    print("|---|---|---|---|---|---|---|")
    for length in args.lengths:
        for variant in args.variants:
            out = subprocess.run([sys.executable, __file__, "--one", str(length), "--variant", variant],
                                 capture_output=True, text=True, check=True)
            r = json.loads(out.stdout.strip().splitlines()[-1])
            print(f"| {length:,} | {variant} | {r['train_windows']:,} | {r['seconds']:.1f} | {r['rss_peak_mib']:.0f} | "
                  f"{r['traced_peak_mib']:.0f} | {r['input_mib']:.0f} |", flush=True)
    return 0 if same else 1


if __name__ == "__main__":
    sys.exit(main())
