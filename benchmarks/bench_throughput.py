"""Benchmark (c): in-memory scoring throughput on one core, next to a numpy matrix-multiply bound.

The detector is `anomalyd.core.detector.Detector` with window 32 and a 150-shape catalog, fitted on 20,000 samples of
the synthetic ECG. Scoring a window means: taper it, find its nearest shape (one row of ``windows @ centroids.T``
plus an argmin), and take the errors against that shape. The matrix product is the irreducible work, so the bound
is the time of ``windows @ centroids.T`` alone for the same shapes (float64, one BLAS thread; the faster of one
product and a product in 4096-row chunks into a reused buffer). Measured, on the same windows or errors, each
also as a ratio to the bound of the same run:

* ``ShapeCatalog.match`` -- what the detector calls: nearest shape and, per field, the mean, max and signed
  errors of each window, in 4096-window chunks (windows of the ECG at slide 16, already scaled);
* ``Detector.update_many`` -- the whole detector per window, as the daemon's tick at slide 1: ``n / 16`` series
  (distinct stretches of the ECG, each started with 31 samples of context) get 16 new samples each, so every
  call scores ``n`` windows (scaling, windows, ``match``, the score and the decision). The series go in slices of
  ``anomalyd.service.worker._SLICE`` (2,000), as the worker does; the states carry over from call to call;
* ``update_block`` -- the score normaliser alone, from the detector's warm state, on the errors of ``match``
  (with the windows' ranges for the out-of-range rule): one row of ``n`` errors (a backfill or
  ``anomalyd evaluate``: one series in one call), and ``n / 16`` rows of 16 errors (the tick), in the same slices.

Each figure is the best of ``--repeat`` calls after one warm-up call. The two tick measurements report one call
apart: every ``long_window`` (2,000) errors a normaliser recomputes its running sums exactly, and series started
from the same warm state all do so in the same tick (here the second call: the warm state has seen 3,969 errors,
so 16 + 16 new ones cross 4,000). That "recompute tick" is shown on its own; the others are the typical tick.

Usage::

    .venv/bin/python benchmarks/bench_throughput.py [--windows 1000 10000 100000 1000000] [--repeat 3]

Then, per window scorer (`DetectorSpec.scorer`, ``--scorers``), the whole detector's cost per window beside
K-Means (the first), over one series and as a tick (the normaliser's state copied per call).
"""

from __future__ import annotations

import os

os.environ.setdefault("OMP_NUM_THREADS", "1")
os.environ.setdefault("OPENBLAS_NUM_THREADS", "1")
os.environ.setdefault("MKL_NUM_THREADS", "1")

import argparse
import math
import sys
import time
from collections.abc import Callable

import numpy as np
from threadpoolctl import threadpool_limits

from anomalyd.core.detector import Detector, DetectorSpec, SeriesState
from anomalyd.core.model import sliding_windows, taper
from anomalyd.core.normaliser import ScoreNormaliser, update_block
from anomalyd.demo.synthetic import ecg
from anomalyd.service.worker import _SLICE as TICK_SLICE

NEW = 16  # new samples per series per tick (the daemon's 16 s tick at 1 Hz)


def best_time(fn: Callable[[], object], repeat: int) -> float:
    """Best wall time of ``repeat`` calls (after one warm-up call)."""
    fn()
    times = []
    for _ in range(repeat):
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
    return min(times)


def call_times(fn: Callable[[], object], calls: int) -> list[float]:
    """Wall time of each of ``calls`` successive calls (the first one is the warm-up)."""
    times = []
    for _ in range(calls):
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
    return times


def split_ticks(times: list[float], recompute: int) -> tuple[float, float]:
    """(best timed call other than call ``recompute``, call ``recompute``); NaN where there is none."""
    typical = [t for i, t in enumerate(times) if i >= 1 and i != recompute]
    return (min(typical) if typical else math.nan,
            times[recompute] if 1 <= recompute < len(times) else math.nan)


def rate(count: int, seconds: float, bound: float) -> str:
    """``count / seconds`` and its ratio to ``bound``, as two table cells."""
    if math.isnan(seconds):
        return "n/a | n/a"
    r = count / seconds
    return f"{r:,.0f} | {r / bound:.3f}"


def tick(det: Detector, states: list[SeriesState], block: np.ndarray) -> None:
    """One tick: ``block[i]`` (the next 16 samples) to ``states[i]``, in the worker's slices of series."""
    for a in range(0, len(states), TICK_SLICE):
        batch = det.update_many(states[a : a + TICK_SLICE], block[a : a + TICK_SLICE])
        assert batch.scored.all() and batch.complete.all()  # every window is scored


def normaliser_tick(norms: list[ScoreNormaliser], errors: np.ndarray, lo: np.ndarray, hi: np.ndarray) -> None:
    """`update_block` as `Detector.update_many` calls it in a tick: one row of errors per series, in slices."""
    for a in range(0, len(norms), TICK_SLICE):
        update_block(norms[a : a + TICK_SLICE], errors[a : a + TICK_SLICE], lo[a : a + TICK_SLICE],
                     hi[a : a + TICK_SLICE])


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--windows", type=int, nargs="+", default=[1_000, 10_000, 100_000, 1_000_000])
    p.add_argument("--window", type=int, default=32)
    p.add_argument("--clusters", type=int, default=150)
    p.add_argument("--repeat", type=int, default=3)
    p.add_argument("--scorers", nargs="*", default=["kmeans", "fft", "saliency", "generalized", "discord",
                                                     "nodata", "kmeans+discord"],
                   help="window scorers whose cost per window is measured beside kmeans (the first is the base)")
    p.add_argument("--scorer-windows", type=int, default=20_000, help="windows per scorer measurement")
    args = p.parse_args(argv)
    w, reps = args.window, args.repeat
    with threadpool_limits(limits=1):
        x, _ = ecg(20_000, seed=0)
        det = Detector(DetectorSpec(window=w, n_clusters=args.clusters)).fit([x])
        cat = det.catalog_
        centers = cat.cluster_centers_
        k = len(centers)
        warm = det.normaliser_
        long_window = warm.params.long_window
        # The call (0: warm-up) in which the series' normalisers cross a multiple of long_window errors seen.
        recompute = math.ceil((math.ceil((warm.seen + 1) / long_window) * long_window - warm.seen) / NEW) - 1
        print(f"## Scoring throughput, one core (window {w}, {k} shapes, float64)\n")
        print(f"warm state: {warm.seen:,} errors seen; the recompute tick is call {recompute} (0: warm-up, "
              f"{reps} timed)\n")
        print("| windows | series x 16 | matmul bound (win/s) | `match` (win/s) | / bound | `update_many` (win/s) "
              "| / bound | `update_many`, recompute tick (win/s) | / bound | `update_block`, one row (err/s) "
              "| / bound | `update_block`, rows of 16 (err/s) | / bound | `update_block`, rows of 16, recompute "
              "tick (err/s) | / bound |")
        print("|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|")
        y, _ = ecg(max(args.windows) * NEW + w, seed=1)
        z = (y - det.mean_) / det.scale_
        for n in args.windows:
            wins = np.ascontiguousarray(sliding_windows(z, w, NEW)[:n])  # (n, w, 1), scaled
            tapered = np.ascontiguousarray((wins * taper(w)[None, :, None]).reshape(n, w))
            buf = np.empty((4096, k))
            ct = np.ascontiguousarray(centers.T)

            def chunked_matmul(t: np.ndarray = tapered, b: np.ndarray = buf, c: np.ndarray = ct) -> None:
                for a in range(0, len(t), len(b)):
                    part = t[a : a + len(b)]
                    np.matmul(part, c, out=b[: len(part)])

            t_bound = min(best_time(lambda t=tapered: t @ centers.T, reps), best_time(chunked_matmul, reps))
            r_bound = n / t_bound
            t_match = best_time(lambda v=wins: cat.match(v), reps)
            near, mean_abs, _, _ = cat.match(wins)
            n_check = min(n, 20_000)  # check the nearest shapes on a prefix (an n x k matrix at 1M is 1.2 GB)
            d2 = (centers**2).sum(axis=1)[None, :] - 2.0 * (tapered[:n_check] @ centers.T)
            assert (near[:n_check] == d2.argmin(axis=1)).mean() > 0.999  # the same nearest shapes (up to exact ties)

            # The whole detector: n_series series x 16 new samples per call, in the worker's slices.
            n_series = max(1, round(n / NEW))
            span = (w - 1) + NEW * (reps + 1)  # context, then one block of 16 per call
            raw, _ = ecg(n_series * span, seed=2)
            raw = raw.reshape(n_series, span)
            tails = det.context_tails(raw[:, : w - 1])
            states = [SeriesState(w - 1, tails[i], warm.copy()) for i in range(n_series)]
            blocks = iter([raw[:, w - 1 + NEW * c : w - 1 + NEW * (c + 1)] for c in range(reps + 1)])
            t_many, t_many_re = split_ticks(call_times(lambda st=states, b=blocks: tick(det, st, next(b)), reps + 1),
                                            recompute)
            del states
            # The normaliser alone, from the detector's warm state, on match's errors and the windows' ranges.
            errors = mean_abs[:, 0] / det.field_ref_[0]
            lo, hi = wins.min(axis=1), wins.max(axis=1)  # (n, 1)

            def one_row(e: np.ndarray = errors, a: np.ndarray = lo, b: np.ndarray = hi) -> None:
                update_block([warm.copy()], e[None], a[None], b[None])

            t_row = best_time(one_row, reps)
            m = min(n_series * NEW, n)
            rows = m // NEW
            e16 = errors[: rows * NEW].reshape(rows, NEW)
            lo16, hi16 = lo[: rows * NEW].reshape(rows, NEW, 1), hi[: rows * NEW].reshape(rows, NEW, 1)
            bank = [warm.copy() for _ in range(rows)]
            t_rows, t_rows_re = split_ticks(
                call_times(lambda nb=bank, e=e16, a=lo16, b=hi16: normaliser_tick(nb, e, a, b), reps + 1), recompute)
            del bank
            r_match = n / t_match
            print(f"| {n:,} | {n_series:,} | {r_bound:,.0f} | {r_match:,.0f} | {r_match / r_bound:.2f} | "
                  f"{rate(n_series * NEW, t_many, r_bound)} | {rate(n_series * NEW, t_many_re, r_bound)} | "
                  f"{rate(n, t_row, r_bound)} | {rate(rows * NEW, t_rows, r_bound)} | "
                  f"{rate(rows * NEW, t_rows_re, r_bound)} |", flush=True)
        if args.scorers:
            scorer_costs(x, w, args.clusters, reps, args.scorer_windows, args.scorers)
    return 0


def scorer_costs(x: np.ndarray, w: int, clusters: int, reps: int, n: int, scorers: list[str]) -> None:
    """Cost per window of each window scorer (`DetectorSpec.scorer`) beside K-Means: the whole detector over one
    series of ``n`` new samples (a backfill or ``anomalyd evaluate``), and as a tick (``n / 16`` series x 16)."""
    print(f"\n## Window scorers: cost per window ({n:,} windows, window {w}, one core)\n")
    print("| scorer | fit (s) | one series (us/window) | / kmeans | tick, series x 16 (us/window) | / kmeans |")
    print("|---|---|---|---|---|---|")
    y, _ = ecg(n + 20_000 + w, seed=1)
    base: tuple[float, float] | None = None
    for name in scorers:
        t0 = time.perf_counter()
        det = Detector(DetectorSpec(window=w, n_clusters=clusters, scorer=name)).fit([x])
        fit_s = time.perf_counter() - t0
        t_row = best_time(lambda d=det: d.update(d.start(w - 1, y[: w - 1]), y[w - 1 : w - 1 + n]), reps)
        n_series = max(1, n // NEW)
        starts = [(i * 37) % 20_000 for i in range(n_series)]
        block = np.stack([y[a + w - 1 : a + w - 1 + NEW] for a in starts])
        ctxs = np.stack([y[a : a + w - 1] for a in starts])

        def one_tick(d: Detector = det, b: np.ndarray = block, c: np.ndarray = ctxs) -> None:
            states = [SeriesState(w - 1, t, d.normaliser_.copy()) for t in d.context_tails(c)]
            for lo in range(0, len(states), TICK_SLICE):
                d.update_many(states[lo : lo + TICK_SLICE], b[lo : lo + TICK_SLICE])

        t_tick = best_time(one_tick, reps)
        per_row, per_tick = 1e6 * t_row / n, 1e6 * t_tick / (n_series * NEW)
        if base is None:
            base = (per_row, per_tick)
        print(f"| {name} | {fit_s:.1f} | {per_row:.2f} | {per_row / base[0]:.1f} | {per_tick:.2f} | "
              f"{per_tick / base[1]:.1f} |", flush=True)


if __name__ == "__main__":
    sys.exit(main())
