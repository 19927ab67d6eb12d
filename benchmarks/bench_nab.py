"""Benchmark (a): NAB v1.1 scores of the daemon's detector over all 58 files, next to the scoreboard.

Every file goes through `anomalyd.core.stored_run.run_stored` -- the daemon's own path in memory (grid alignment,
training on the probationary period only, NAB's rule min(15%, 750 rows), the `anomalyd.core.detector.Detector` fed
through its streaming entry point) -- with the one default `DetectorSpec`; a row's score is the score of the window
whose point carries its timestamp. ``benchmarks/bench_replay.py`` checks that the same files through InfluxDB and the
CLI give the same points. The NAB
scorer is `anomalyd.evaluation.nab` (conformance-tested against NAB's published results). Two thresholds are reported:
the fixed default 0.5 (the likelihood's red zone, chosen before looking at NAB) and NAB's own procedure, one
threshold per profile optimised over the whole corpus, which is how every scoreboard entry was scored.

Usage::

    .venv/bin/python benchmarks/bench_nab.py [--data ../shared/data/nab] [--jobs 2] [--ablation]

``--ablation`` also scores the variants that were tried on the way to the defaults (listed in ``ABLATIONS``),
so the choice of defaults is visible: they were selected on this corpus, like every scoreboard entry's.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import sys
import time
from concurrent.futures import ProcessPoolExecutor
from pathlib import Path
from typing import Any

import numpy as np

from anomalyd.core.detector import DetectorSpec, TooLittleDataError
from anomalyd.core.stored_run import by_timestamp, run_stored
from anomalyd.evaluation.datasets import load_nab_corpus
from anomalyd.evaluation.nab import NAB_PROFILES, NabCorpus, best_nab_threshold, nab_probation, nab_score

log = logging.getLogger("bench_nab")
ROOT = Path(__file__).resolve().parents[1]
DEFAULT_DATA = Path(os.environ.get("ANOMALYD_SHARED_DATA") or ROOT.parent / "shared" / "data") / "nab"

#: Variants of the default configuration (name -> `DetectorSpec.with_overrides` arguments, or ``max_gap``), each
#: one change away from the default.
ABLATIONS: dict[str, dict[str, Any]] = {
    "max error (the daemon's max_error) fed to the score": {"error": "max"},
    "window 32 for every file": {"window": 32},
    "no out-of-range rule": {"normaliser_range_tolerance": None},
    "log-transformed errors": {"normaliser_transform": "log"},
    "no red-zone filter": {"normaliser_red": 0.0},
    "short window 1 (no averaging)": {"normaliser_short_window": 1},
    "history 500 windows": {"normaliser_long_window": 500},
    "score every 16th window (slide 16, the blog's cadence)": {"stride": 16},
    "max_gap 2 (fill fewer gaps)": {"max_gap": 2},
    "max_gap 4": {"max_gap": 4},
    "random_state 1": {"random_state": 1},
    "random_state 2": {"random_state": 2},
    "out-of-range rule on whole windows, no growth cap (the default before 2026-11-30)": {
        "range_by": "window", "normaliser_range_growth": None},
    "range growth capped at 0.02 of its width per window": {"normaliser_range_growth": 0.02},
    "robust reference (median / IQR history)": {"normaliser_reference": "robust"},
    "scorer fft": {"scorer": "fft"},
    "scorer saliency": {"scorer": "saliency"},
    "scorer generalized": {"scorer": "generalized"},
    "scorer discord": {"scorer": "discord"},
    "scorer kmeans+discord": {"scorer": "kmeans+discord"},
    "scorer kmeans+fft": {"scorer": "kmeans+fft"},
}
MAX_GAP = 8  # signals.max_gap's default

_CORPUS: NabCorpus | None = None


def _init(data: str) -> None:
    global _CORPUS
    _CORPUS = load_nab_corpus(data)


def _score_file(job: tuple[str, DetectorSpec, int]) -> tuple[str, np.ndarray, int, float]:
    name, spec, max_gap = job
    assert _CORPUS is not None
    f = _CORPUS.files[name]
    times = np.asarray(f.timestamps).astype("datetime64[ns]").astype(np.int64)
    values = np.asarray(f.values, dtype=np.float64)
    n_train = nab_probation(values.size)
    t0 = time.perf_counter()
    try:
        run = run_stored(times, values, int(times[n_train - 1]), spec, max_gap=max_gap)
    except TooLittleDataError as exc:  # the daemon would have no model: no point, no detection
        logging.getLogger("bench_nab").warning("%s: %s", name, exc)
        scores = np.zeros(values.size)
        scores[:n_train] = np.nan
        return name, scores, 0, time.perf_counter() - t0
    scores = np.nan_to_num(by_timestamp(run, times, run.batch.score), nan=0.0)
    scores[:n_train] = np.nan
    return name, scores, run.detector.window_, time.perf_counter() - t0


def score_corpus(corpus: NabCorpus, data: Path, spec: DetectorSpec, jobs: int, max_gap: int = MAX_GAP
                 ) -> tuple[dict[str, np.ndarray], dict[str, int], float]:
    """Scores of every file (NaN in the probationary period), the windows used, and the CPU seconds."""
    work = [(name, spec, max_gap) for name in corpus.files]
    if jobs > 1:
        with ProcessPoolExecutor(jobs, initializer=_init, initargs=(str(data),)) as pool:
            results = list(pool.map(_score_file, work))
    else:
        _init(str(data))
        results = [_score_file(w) for w in work]
    return ({n: s for n, s, _, _ in results}, {n: w for n, _, w, _ in results},
            sum(t for _, _, _, t in results))


def nab_table(corpus: NabCorpus, scores: dict[str, np.ndarray]) -> dict[str, dict[str, float]]:
    """Normalised scores per profile at the fixed 0.5 threshold and at NAB's corpus-optimised threshold."""
    out: dict[str, dict[str, float]] = {}
    for profile in NAB_PROFILES:
        fixed, _, _ = nab_score(corpus, scores, float(np.nextafter(0.5, -np.inf)), profile)  # score >= 0.5
        thr, best, _ = best_nab_threshold(corpus, scores, profile)
        out[profile] = {"fixed_0.5": fixed, "optimised": best, "optimised_threshold": thr}
    return out


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--data", type=Path, default=DEFAULT_DATA, help="NAB folder (default %(default)s)")
    p.add_argument("--jobs", type=int, default=2, help="worker processes (default 2)")
    p.add_argument("--ablation", action="store_true", help="also score the variants in ABLATIONS")
    p.add_argument("--only", help="with --ablation: only the variants whose name contains this text")
    p.add_argument("--json", type=Path, help="write all figures to this JSON file")
    p.add_argument("--spec", default="{}", help="JSON of `DetectorSpec.with_overrides` arguments for the run "
                   "measured in place of the default")
    args = p.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(message)s", stream=sys.stderr)
    if not (args.data / "data").is_dir():
        print(f"NAB data not found at {args.data}; pass --data", file=sys.stderr)
        return 2
    corpus = load_nab_corpus(args.data)
    default = DetectorSpec().with_overrides(**json.loads(args.spec))
    t0 = time.perf_counter()
    scores, windows, cpu = score_corpus(corpus, args.data, default, args.jobs)
    wall = time.perf_counter() - t0
    table = nab_table(corpus, scores)
    report: dict[str, Any] = {"files": len(corpus.files), "windows": corpus.n_windows, "wall_s": wall,
                              "cpu_s": cpu, "default": table, "window_counts": {}}
    for w in windows.values():
        report["window_counts"][str(w)] = report["window_counts"].get(str(w), 0) + 1

    print(f"## NAB v1.1, {len(corpus.files)} files, {corpus.n_windows} windows "
          f"(scored in {wall:.1f} s wall, {cpu:.1f} s CPU)\n")
    print("| detector | standard | reward_low_FP_rate | reward_low_FN_rate |")
    print("|---|---|---|---|")
    s = table
    print(f"| **anomalyd default, NAB-optimised threshold** | **{s['standard']['optimised']:.2f}** | "
          f"**{s['reward_low_FP_rate']['optimised']:.2f}** | **{s['reward_low_FN_rate']['optimised']:.2f}** |")
    print(f"| anomalyd default, its own decision (score >= 0.5) | {s['standard']['fixed_0.5']:.2f} | "
          f"{s['reward_low_FP_rate']['fixed_0.5']:.2f} | {s['reward_low_FN_rate']['fixed_0.5']:.2f} |")
    board_path = args.data / "results" / "final_results.json"
    if board_path.is_file():
        board = json.loads(board_path.read_text())
        for name, row in sorted(board.items(), key=lambda kv: -kv[1]["standard"]):
            print(f"| {name} | {row['standard']:.2f} | {row['reward_low_FP_rate']:.2f} | "
                  f"{row['reward_low_FN_rate']:.2f} |")
    thr = ", ".join(f"{k} {v['optimised_threshold']:.4g}" for k, v in table.items())
    print(f"\nOptimised thresholds: {thr}. Windows chosen by the rule: {report['window_counts']}.")

    # Per category at the standard profile's optimised threshold.
    _, _, per_file = nab_score(corpus, scores, table["standard"]["optimised_threshold"], "standard")
    cats: dict[str, list[float]] = {}
    for name, r in per_file.items():
        c = cats.setdefault(name.split("/")[0], [0.0, 0, 0, 0])
        c[0] += r.score
        c[1] += r.detected_windows
        c[2] += r.missed_windows
        c[3] += r.fp
    print("\n| category | raw score | windows detected | missed | false-positive rows |")
    print("|---|---|---|---|---|")
    for c, (raw, det, miss, fp) in sorted(cats.items()):
        print(f"| {c} | {raw:.2f} | {int(det)} | {int(miss)} | {int(fp)} |")
    report["categories"] = cats

    if args.ablation:
        print("\n| variant (one change from the default) | standard | low FP | low FN |")
        print("|---|---|---|---|")
        report["ablation"] = {}
        for label, changes in ABLATIONS.items():
            if args.only and args.only not in label:
                continue
            gap = changes.get("max_gap", MAX_GAP)
            spec = default.with_overrides(**{k: v for k, v in changes.items() if k != "max_gap"})
            sc, _, _ = score_corpus(corpus, args.data, spec, args.jobs, gap)
            t = nab_table(corpus, sc)
            report["ablation"][label] = t
            print(f"| {label} | {t['standard']['optimised']:.2f} | {t['reward_low_FP_rate']['optimised']:.2f} | "
                  f"{t['reward_low_FN_rate']['optimised']:.2f} |", flush=True)
    if args.json:
        args.json.write_text(json.dumps(report, indent=2, default=float) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
