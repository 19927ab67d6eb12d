"""Benchmark (c): in-memory scoring throughput on one core, next to a numpy matrix-multiply bound.

Scoring a window means: taper it, find its nearest centroid (one row of ``windows @ centroids.T`` plus an
argmin), and take the error against that centroid. The matrix product is the irreducible work, so the bound is
the time of ``windows @ centroids.T`` alone for the same shapes (float64, one BLAS thread; the faster of one
product and a product in 4096-row chunks into a reused buffer). Measured:

* ``model.score_windows`` -- what the daemon's worker calls (max error, flag, normalised score);
* ``window_error(kind="mean")`` -- the error the evaluation detector feeds to the normaliser;
* ``ScoreNormaliser.update`` -- the likelihood post-processing, per error.

Usage::

    .venv/bin/python benchmarks/bench_throughput.py [--windows 10000 100000 1000000] [--clusters 150]
"""

from __future__ import annotations

import os

os.environ.setdefault("OMP_NUM_THREADS", "1")
os.environ.setdefault("OPENBLAS_NUM_THREADS", "1")
os.environ.setdefault("MKL_NUM_THREADS", "1")

import argparse
import sys
import time
from collections.abc import Callable

import numpy as np
from threadpoolctl import threadpool_limits

from anomalyd.detect import window_error
from anomalyd.model import WindowReconstructor, sliding_windows, taper
from anomalyd.postprocess import ScoreNormaliser
from anomalyd.synthetic import ecg


def best_time(fn: Callable[[], object], repeat: int) -> float:
    """Best wall time of ``repeat`` calls (after one warm-up call)."""
    fn()
    times = []
    for _ in range(repeat):
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
    return min(times)


def fast_window_errors(model: WindowReconstructor, windows: np.ndarray, chunk: int = 4096) -> np.ndarray:
    """The max error as the proposed ``model.window_errors`` patch computes it: chunked, in place.

    Same result as ``model.window_errors``: the ``-2`` is folded into a transposed copy of the centroids, the
    distance matrix is built in a reused buffer of ``chunk`` rows (it stays in cache instead of a
    ``n x clusters`` temporary), and the error comes from the same tapered chunk.
    """
    centers = model.cluster_centers_
    m2t = np.ascontiguousarray(-2.0 * centers.T)
    csq = (centers**2).sum(axis=1)
    tap = taper(model.window)
    out = np.empty(len(windows))
    buf = np.empty((chunk, len(centers)))
    for a in range(0, len(windows), chunk):
        wt = windows[a : a + chunk] * tap
        d = buf[: len(wt)]
        np.matmul(wt, m2t, out=d)
        d += csq
        idx = d.argmin(axis=1)
        wt -= centers[idx]
        np.abs(wt, out=wt)
        out[a : a + chunk] = wt.max(axis=1)
    return out


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--windows", type=int, nargs="+", default=[1_000, 10_000, 100_000, 1_000_000])
    p.add_argument("--window", type=int, default=32)
    p.add_argument("--clusters", type=int, default=150)
    p.add_argument("--repeat", type=int, default=3)
    args = p.parse_args(argv)
    w, k = args.window, args.clusters
    x, _ = ecg(20_000, seed=0)
    model = WindowReconstructor(window=w, n_clusters=k, n_init=1).fit(x)
    centers = model.cluster_centers_
    print(f"## Scoring throughput, one core (window {w}, {k} centroids, float64)\n")
    print("| windows | matmul bound (win/s) | score_windows (win/s) | / bound | chunked in-place max error "
          "(win/s) | / bound | mean error (win/s) | normaliser (err/s) |")
    print("|---|---|---|---|---|---|---|---|")
    rng = np.random.default_rng(0)
    y, _ = ecg(max(args.windows) * 16 + w, seed=1)
    with threadpool_limits(limits=1):
        for n in args.windows:
            wins = np.ascontiguousarray(sliding_windows(y, w, 16)[:n])
            tapered = wins * taper(w)
            buf = np.empty((4096, k))
            ct = np.ascontiguousarray(centers.T)

            def chunked_matmul(t: np.ndarray = tapered, b: np.ndarray = buf, c: np.ndarray = ct) -> None:
                for a in range(0, len(t), len(b)):
                    part = t[a : a + len(b)]
                    np.matmul(part, c, out=b[: len(part)])

            t_bound = min(best_time(lambda t=tapered: t @ centers.T, args.repeat),
                          best_time(chunked_matmul, args.repeat))
            t_score = best_time(lambda v=wins: model.score_windows(v), args.repeat)
            assert np.allclose(fast_window_errors(model, wins), model.window_errors(wins))
            t_fast = best_time(lambda v=wins: fast_window_errors(model, v), args.repeat)
            t_mean = best_time(lambda v=wins: window_error(model, v, "mean"), args.repeat)
            errors = rng.gamma(2.0, 1.0, n)

            def normalise(e: np.ndarray = errors) -> None:
                ScoreNormaliser().update(e)

            t_norm = best_time(normalise, args.repeat)
            print(f"| {n:,} | {n / t_bound:,.0f} | {n / t_score:,.0f} | {t_bound / t_score:.2f} | "
                  f"{n / t_fast:,.0f} | {t_bound / t_fast:.2f} | {n / t_mean:,.0f} | {n / t_norm:,.0f} |", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
