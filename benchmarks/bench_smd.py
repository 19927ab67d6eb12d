"""Benchmark (b): SMD F1 on machines 1-6, 2-1, 2-7 and 3-3, next to the LSTM encoder-decoder paper.

`anomalyd.detect.detect_multivariate` with the default `DetectorConfig`: windows of 32 rows over all 38 metrics
concatenated (each metric tapered), per-metric scaling from the training file, K-Means on the training file;
the threshold is learned from the training file's hold-out (its last 20%) alone. Reported per machine:

* point-wise, point-adjusted and window-level F1 (windows of 100 rows, flagged when more than delta=0 rows are
  above the threshold) at the training-only threshold;
* window-level F1 with delta learned from training too (the largest count of hold-out rows above the threshold
  in any 100-row hold-out window, so that no training window would be flagged);
* the best-threshold oracle (threshold, and delta for windows, chosen on the test labels) for reference.

Usage::

    .venv/bin/python benchmarks/bench_smd.py [--data ../shared/data/smd] [--ablation]
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

from anomalyd.detect import DetectorConfig, detect_multivariate, with_overrides
from anomalyd.evaluate import (
    best_f1_threshold,
    load_smd_machine,
    point_adjusted_metrics,
    point_metrics,
    roc_auc,
    window_metrics,
)

ROOT = Path(__file__).resolve().parents[1]
DEFAULT_DATA = Path(os.environ.get("ANOMALYD_SHARED_DATA") or ROOT.parent / "shared" / "data") / "smd"
PAPER = {"1-6": 0.4820, "2-1": 0.5696, "2-7": 0.3792, "3-3": 0.4130}
SIZE = 100

#: Variants of the default configuration (name -> overrides), one change each.
ABLATIONS: dict[str, dict[str, Any]] = {
    "max error per metric (the reference's error)": {"error": "max"},
    "no per-metric error normalisation": {"metric_norm": "none"},
    "mean over metrics instead of max": {"aggregate": "mean"},
    "threshold = max hold-out score": {"threshold_policy": "max", "margin": 1.0},
    "threshold = hold-out mean + 6 sd": {"threshold_policy": "sigma", "sigma_k": 6.0},
    "per-metric scale floor 0.005": {"min_scale": 0.005},
    "per-metric scale floor 0.02": {"min_scale": 0.02},
    "per-metric scale floor 0.05": {"min_scale": 0.05},
}


def learned_delta(train_scores: np.ndarray, threshold: float, size: int = SIZE) -> int:
    """Largest number of hold-out rows above ``threshold`` in any full ``size``-row hold-out window."""
    n = train_scores.size // size
    if n == 0:
        return 0
    return int((train_scores[: n * size].reshape(n, size) > threshold).sum(axis=1).max())


def evaluate_machine(data: Path, machine: str, cfg: DetectorConfig) -> dict[str, Any]:
    train, test, labels = load_smd_machine(data, machine)
    t0 = time.perf_counter()
    det = detect_multivariate(train, test, cfg)
    seconds = time.perf_counter() - t0
    s, tau = det.scores, det.threshold
    delta = learned_delta(det.train_scores, tau)
    flags = s > tau
    return {
        "seconds": seconds, "threshold": tau, "learned_delta": delta,
        "point_f1": point_metrics(labels, flags)["f1"],
        "pa_f1": point_adjusted_metrics(labels, flags)["f1"],
        "window_f1": window_metrics(labels, s, tau, SIZE, 0)["f1"],
        "window_f1_learned_delta": window_metrics(labels, s, tau, SIZE, delta)["f1"],
        "window_precision": window_metrics(labels, s, tau, SIZE, 0)["precision"],
        "window_recall": window_metrics(labels, s, tau, SIZE, 0)["recall"],
        "oracle_point_f1": best_f1_threshold(labels, s, "point")[2],
        "oracle_pa_f1": best_f1_threshold(labels, s, "point_adjusted")[2],
        "oracle_window_f1": best_f1_threshold(labels, s, "window", SIZE)[2],
        "roc_auc": roc_auc(labels, s),
    }


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--data", type=Path, default=DEFAULT_DATA, help="SMD folder (default %(default)s)")
    p.add_argument("--ablation", action="store_true", help="also run the variants in ABLATIONS")
    p.add_argument("--json", type=Path, help="write all figures to this JSON file")
    args = p.parse_args(argv)
    if not args.data.is_dir():
        print(f"SMD data not found at {args.data}; pass --data", file=sys.stderr)
        return 2
    cfg = DetectorConfig()
    report: dict[str, Any] = {"default": {}}
    print("## SMD, training-only threshold (window-level F1: 100-row windows, delta 0)\n")
    print("| machine | paper window F1 | **window F1** | window F1, learned delta | window P / R | point F1 | "
          "point-adjusted F1 | oracle window / point / PA F1 | ROC-AUC | seconds |")
    print("|---|---|---|---|---|---|---|---|---|---|")
    for machine, paper in PAPER.items():
        r = evaluate_machine(args.data, machine, cfg)
        report["default"][machine] = r
        mark = "above" if r["window_f1"] > paper else "below"
        print(f"| {machine} | {paper:.4f} | **{r['window_f1']:.4f}** ({mark}) | {r['window_f1_learned_delta']:.4f} "
              f"(delta {r['learned_delta']}) | {r['window_precision']:.3f} / {r['window_recall']:.3f} | "
              f"{r['point_f1']:.4f} | {r['pa_f1']:.4f} | {r['oracle_window_f1']:.4f} / {r['oracle_point_f1']:.4f} / "
              f"{r['oracle_pa_f1']:.4f} | {r['roc_auc']:.3f} | {r['seconds']:.0f} |", flush=True)
    if args.ablation:
        print("\n| variant (one change from the default) | " + " | ".join(
            f"{m} window F1 (oracle)" for m in PAPER) + " |")
        print("|---|" + "---|" * len(PAPER))
        report["ablation"] = {}
        for label, changes in ABLATIONS.items():
            rows = {m: evaluate_machine(args.data, m, with_overrides(cfg, **changes)) for m in PAPER}
            report["ablation"][label] = rows
            print(f"| {label} | " + " | ".join(f"{rows[m]['window_f1']:.3f} ({rows[m]['oracle_window_f1']:.3f})"
                                               for m in PAPER) + " |", flush=True)
    if args.json:
        args.json.write_text(json.dumps(report, indent=2, default=float) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
