"""Benchmark (a): NAB v1.1 scores of the default causal detector over all 58 files, next to the scoreboard.

Every file is scored by `anomalyd.detect.detect_series` with the one default `DetectorConfig`: trained on the
file's probationary period only (NAB's rule, min(15%, 750 rows)), causal scores, no per-file setting. The NAB
scorer is `anomalyd.evaluate` (conformance-tested against NAB's published results). Two thresholds are reported:
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

from anomalyd.detect import DetectorConfig, detect_series, nab_probation, with_overrides
from anomalyd.evaluate import NAB_PROFILES, NabCorpus, best_nab_threshold, load_nab_corpus, nab_score

log = logging.getLogger("bench_nab")
ROOT = Path(__file__).resolve().parents[1]
DEFAULT_DATA = Path(os.environ.get("ANOMALYD_SHARED_DATA") or ROOT.parent / "shared" / "data") / "nab"

#: Variants of the default configuration (name -> overrides), each one change away from the default.
ABLATIONS: dict[str, dict[str, Any]] = {
    "max error (the daemon's max_error)": {"error": "max"},
    "rms error": {"error": "rms"},
    "window 32 for every file": {"window": 32},
    "no out-of-range rule": {"normaliser_range_tolerance": None},
    "range tolerance 0.05": {"normaliser_range_tolerance": 0.05},
    "log-transformed errors": {"normaliser_transform": "log"},
    "running rank instead of raw errors": {"normaliser_transform": "rank"},
    "no red-zone filter": {"normaliser_red": 0.0},
    "short window 1 (no averaging)": {"normaliser_short_window": 1},
    "long window 8640 (HTM's)": {"normaliser_long_window": 8640},
    "refit every 750 rows on recent normal data": {"refit_every": 750},
    "random_state 1": {"random_state": 1},
    "random_state 2": {"random_state": 2},
    # The daemon's cadence: one window scored every 16 rows, the score's averaging over ~one window (2 errors)
    # and a 500-window history (NormaliserParams.for_windows(32, 16, 500)).
    "daemon cadence: score every 16th row, short window 2, history 500": {
        "score_slide": 16, "normaliser_short_window": 2, "normaliser_long_window": 500},
    "score every 16th row only": {"score_slide": 16},
    "score every 4th row, short window 8, history 500": {
        "score_slide": 4, "normaliser_short_window": 8, "normaliser_long_window": 500},
    "short window 2, history 500 only (every row scored)": {
        "normaliser_short_window": 2, "normaliser_long_window": 500},
    "history 500 only (every row scored)": {"normaliser_long_window": 500},
    "short window 32 (one window's span at slide 1)": {"normaliser_short_window": 32},
    "score every 16th row, short window 1, history 500": {
        "score_slide": 16, "normaliser_short_window": 1, "normaliser_long_window": 500},
    "score every 16th row, short window 1, history 2000": {
        "score_slide": 16, "normaliser_short_window": 1},
}

_CORPUS: NabCorpus | None = None


def _init(data: str) -> None:
    global _CORPUS
    _CORPUS = load_nab_corpus(data)


def _score_file(job: tuple[str, DetectorConfig]) -> tuple[str, np.ndarray, int, float]:
    name, cfg = job
    assert _CORPUS is not None
    values = np.asarray(_CORPUS.files[name].values, dtype=np.float64)
    t0 = time.perf_counter()
    det = detect_series(values, nab_probation(values.size), cfg)
    scores = np.where(np.arange(values.size) < det.n_train, np.nan, det.scores)
    return name, scores, det.window, time.perf_counter() - t0


def score_corpus(corpus: NabCorpus, data: Path, cfg: DetectorConfig, jobs: int) -> tuple[dict[str, np.ndarray],
                                                                                        dict[str, int], float]:
    """Scores of every file (NaN in the probationary period), the windows used, and the CPU seconds."""
    work = [(name, cfg) for name in corpus.files]
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
        fixed, _, _ = nab_score(corpus, scores, 0.5, profile)
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
    args = p.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(message)s", stream=sys.stderr)
    if not (args.data / "data").is_dir():
        print(f"NAB data not found at {args.data}; pass --data", file=sys.stderr)
        return 2
    corpus = load_nab_corpus(args.data)
    default = DetectorConfig()
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
    print(f"| anomalyd default, fixed threshold 0.5 | {s['standard']['fixed_0.5']:.2f} | "
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
            sc, _, _ = score_corpus(corpus, args.data, with_overrides(default, **changes), args.jobs)
            t = nab_table(corpus, sc)
            report["ablation"][label] = t
            print(f"| {label} | {t['standard']['optimised']:.2f} | {t['reward_low_FP_rate']['optimised']:.2f} | "
                  f"{t['reward_low_FN_rate']['optimised']:.2f} |", flush=True)
    if args.json:
        args.json.write_text(json.dumps(report, indent=2, default=float) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
