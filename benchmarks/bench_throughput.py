"""Benchmark (c): in-memory scoring throughput on one core, next to a numpy matrix-multiply bound.

Scoring a window means: taper it, find its nearest centroid (one row of ``windows @ centroids.T`` plus an
argmin), and take the error against that centroid. The matrix product is the irreducible work, so the bound is
the time of ``windows @ centroids.T`` alone for the same shapes (float64, one BLAS thread; the faster of one
product and a product in 4096-row chunks into a reused buffer). Measured:

* ``model.score_stats`` -- what the daemon's worker calls: nearest centroid, max error and mean error of each
  window, in 4096-window chunks;
* ``model.window_errors`` before this change (kept here as ``unchunked_max_errors`` for comparison: one
  ``n x clusters`` distance matrix, each window tapered twice);
* ``ScoreNormaliser.update`` -- the likelihood post-processing: all errors of a series in one call, and one
  error per call; and ``update_many`` -- one error for each of many series in one call (the daemon's tick:
  one new window per series), per error.

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

from anomalyd.model import WindowReconstructor, sliding_windows, taper
from anomalyd.postprocess import NormaliserParams, ScoreNormaliser, update_many
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


def unchunked_max_errors(model: WindowReconstructor, windows: np.ndarray) -> np.ndarray:
    """The max error as ``model.window_errors`` computed it before chunking (the comparison row)."""
    w = windows * taper(model.window)
    d = (model.cluster_centers_**2).sum(axis=1)[None, :] - 2.0 * (w @ model.cluster_centers_.T)
    recon = model.cluster_centers_[d.argmin(axis=1)]
    return np.asarray(np.abs(windows * taper(model.window) - recon).max(axis=1))


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
    print("| windows | matmul bound (win/s) | `score_stats` (win/s) | / bound | unchunked max error, before "
          "(win/s) | / bound | normaliser, one call (err/s) | normaliser, one error per call (err/s) | "
          "update_many, one error per series (err/s) |")
    print("|---|---|---|---|---|---|---|---|---|")
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
            t_stats = best_time(lambda v=wins: model.score_stats(v), args.repeat)
            assert np.allclose(unchunked_max_errors(model, wins), model.score_stats(wins)[1])
            t_old = best_time(lambda v=wins: unchunked_max_errors(model, v), args.repeat)
            errors = rng.gamma(2.0, 1.0, n)
            params = NormaliserParams.for_windows(w, 16, 500)

            def normalise(e: np.ndarray = errors, v: np.ndarray = wins,
                          p: NormaliserParams = params) -> None:
                ScoreNormaliser(p).update(e, v)

            t_norm = best_time(normalise, args.repeat)
            m = min(n, 20_000)  # the one-error path is per call: 20,000 calls are enough to time it
            warm = ScoreNormaliser(params)
            warm.update(errors[:600])
            state = warm.to_dict()

            def one_by_one(e: np.ndarray = errors[:m], v: np.ndarray = wins[:m],
                           st: dict = state) -> None:
                norm = ScoreNormaliser.from_dict(st)
                for i in range(len(e)):
                    norm.update(e[i : i + 1], v[i : i + 1])

            t_one = best_time(one_by_one, 1)
            bank = [ScoreNormaliser.from_dict(state) for _ in range(m)]  # m series, one new window each

            def many(e: np.ndarray = errors[:m], v: np.ndarray = wins[:m],
                     norms: list[ScoreNormaliser] = bank) -> None:
                update_many(norms, e, v)

            t_many = best_time(many, args.repeat)
            print(f"| {n:,} | {n / t_bound:,.0f} | {n / t_stats:,.0f} | {t_bound / t_stats:.2f} | "
                  f"{n / t_old:,.0f} | {t_bound / t_old:.2f} | {n / t_norm:,.0f} | {m / t_one:,.0f} | "
                  f"{m / t_many:,.0f} |", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
