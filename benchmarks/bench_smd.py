"""Benchmark (b): SMD F1 on machines 1-6, 2-1, 2-7 and 3-3, next to the LSTM encoder-decoder paper.

The daemon's detector (`anomalyd.detector.Detector`, through `anomalyd.evaluate.smd_run`) with the default
`DetectorSpec`: windows of 32 rows over all 38 metrics (each metric tapered), per-metric scaling from the training
file, K-Means on the training file, every test row scored causally, the training file's end as context. Reported
per machine, with the detector's own decision (``anomalous``; learned from training data alone):

* window-level F1 (windows of 100 rows, flagged when more than delta=0 rows are anomalous), point-wise and
  point-adjusted F1;
* the same with ``decision="error"`` (the window's error above the 0.999 quantile of the hold-out's errors), one
  shared alternative configuration;
* the best-threshold oracle on the score (chosen on the test labels) and ROC-AUC of the score and of the raw error,
  for reference.

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

from anomalyd.detector import DetectorSpec
from anomalyd.evaluate import (
    best_f1_threshold,
    load_smd_machine,
    point_adjusted_metrics,
    point_metrics,
    roc_auc,
    smd_run,
    window_metrics,
)

ROOT = Path(__file__).resolve().parents[1]
DEFAULT_DATA = Path(os.environ.get("ANOMALYD_SHARED_DATA") or ROOT.parent / "shared" / "data") / "smd"
PAPER = {"1-6": 0.4820, "2-1": 0.5696, "2-7": 0.3792, "3-3": 0.4130}
SIZE = 100

#: Variants of the default configuration (name -> `DetectorSpec.with_overrides` arguments), one change each.
ABLATIONS: dict[str, dict[str, Any]] = {
    "decision on the error (hold-out 0.999 quantile)": {"decision": "error"},
    "max error per metric fed to the score": {"error": "max"},
    "no per-metric error normalisation": {"field_norm": "none"},
    "mean over metrics instead of max": {"aggregate": "mean"},
    "per-metric scale floor 0.01 (data units)": {"min_scale": 0.01},
    "out-of-range rule on the newest sample, range growth capped at its width": {
        "range_by": "sample", "normaliser_range_growth": 1.0},
    "robust reference (median / IQR history)": {"normaliser_reference": "robust"},
    "scorer fft": {"scorer": "fft"},
    "scorer generalized": {"scorer": "generalized"},
    "scorer kmeans+discord": {"scorer": "kmeans+discord"},
}


def evaluate_machine(data: Path, machine: str, spec: DetectorSpec) -> dict[str, Any]:
    train, test, labels = load_smd_machine(data, machine)
    t0 = time.perf_counter()
    det, b = smd_run(train, test, spec)
    seconds = time.perf_counter() - t0
    flags = b.anomalous
    s = np.nan_to_num(b.score)
    f = flags.astype(np.float64)
    return {
        "seconds": seconds, "window": det.window_, "anomalous_rows": int(flags.sum()),
        "point_f1": point_metrics(labels, flags)["f1"],
        "pa_f1": point_adjusted_metrics(labels, flags)["f1"],
        "window_f1": window_metrics(labels, f, 0.5, SIZE, 0)["f1"],
        "window_precision": window_metrics(labels, f, 0.5, SIZE, 0)["precision"],
        "window_recall": window_metrics(labels, f, 0.5, SIZE, 0)["recall"],
        "oracle_window_f1": best_f1_threshold(labels, s, "window", SIZE)[2],
        "roc_auc_score": roc_auc(labels, s),
        "roc_auc_error": roc_auc(labels, np.nan_to_num(b.error)),
    }


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--data", type=Path, default=DEFAULT_DATA, help="SMD folder (default %(default)s)")
    p.add_argument("--ablation", action="store_true", help="also run the variants in ABLATIONS")
    p.add_argument("--only", help="with --ablation: only the variants whose name contains this text")
    p.add_argument("--json", type=Path, help="write all figures to this JSON file")
    args = p.parse_args(argv)
    if not args.data.is_dir():
        print(f"SMD data not found at {args.data}; pass --data", file=sys.stderr)
        return 2
    cfg = DetectorSpec()
    report: dict[str, Any] = {"default": {}}
    print("## SMD, the detector's own decision (window-level F1: 100-row windows, delta 0)\n")
    print("| machine | paper window F1 | **window F1** | window P / R | point F1 | point-adjusted F1 | "
          "oracle window F1 (score) | ROC-AUC score / error | anomalous rows | seconds |")
    print("|---|---|---|---|---|---|---|---|---|---|")
    for machine, paper in PAPER.items():
        r = evaluate_machine(args.data, machine, cfg)
        report["default"][machine] = r
        mark = "above" if r["window_f1"] > paper else "below"
        print(f"| {machine} | {paper:.4f} | **{r['window_f1']:.4f}** ({mark}) | {r['window_precision']:.3f} / "
              f"{r['window_recall']:.3f} | {r['point_f1']:.4f} | {r['pa_f1']:.4f} | {r['oracle_window_f1']:.4f} | "
              f"{r['roc_auc_score']:.3f} / {r['roc_auc_error']:.3f} | {r['anomalous_rows']} | {r['seconds']:.0f} |",
              flush=True)
    if args.ablation:
        print("\n| variant (one change from the default) | " + " | ".join(
            f"{m} window F1 (oracle)" for m in PAPER) + " |")
        print("|---|" + "---|" * len(PAPER))
        report["ablation"] = {}
        for label, changes in ABLATIONS.items():
            if args.only and args.only not in label:
                continue
            rows = {m: evaluate_machine(args.data, m, cfg.with_overrides(**changes)) for m in PAPER}
            report["ablation"][label] = rows
            print(f"| {label} | " + " | ".join(f"{rows[m]['window_f1']:.3f} ({rows[m]['oracle_window_f1']:.3f})"
                                               for m in PAPER) + " |", flush=True)
    if args.json:
        args.json.write_text(json.dumps(report, indent=2, default=float) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
