"""Benchmark (b): SMD F1 on machines 1-6, 2-1, 2-7 and 3-3, next to the LSTM encoder-decoder paper.

The daemon's detector (`anomalyd.core.detector.Detector`, through `anomalyd.evaluation.series.smd_run`) with the default
`DetectorSpec`: windows of 32 rows over all 38 metrics (each metric tapered), per-metric scaling from the training
file, K-Means on the training file, every test row scored causally, the training file's end as context. Reported
per machine, with the detector's own decision (``anomalous``; learned from training data alone):

* window-level F1 (windows of 100 rows, flagged when more than delta=0 rows are anomalous), point-wise and
  point-adjusted F1;
* the same with ``decision="error"`` (the window's error above the 0.999 quantile of the hold-out's errors), one
  shared alternative configuration;
* the best-threshold oracle on the score (chosen on the test labels) and ROC-AUC of the score and of the raw error,
  for reference.

With ``--attribution``, also the quality of the per-field attribution (issue 10): OmniAnomaly's HitRate@100% and
@150% against ``interpretation_label/machine-<id>.txt`` (`anomalyd.core.attribution`), per segment then averaged over
segments, from each window's field shares (what the daemon writes into ``anomaly_attribution``):

* *as stamped*: the windows ending inside the segment, each ranking the fields by its own shares (the figure of
  a segment is the mean over its rows);
* *centred*: the windows whose taper centre falls in the segment (ending ``window // 2`` rows later);
* *centred, one ranking*: one ranking per segment, by the mean share over those windows;
* *flagged only*: the windows flagged ``anomalous`` among those containing a row of the segment (OmniAnomaly
  scores detected anomalies only); segments without one are left out (their count is shown); also averaged
  over those windows rather than segments (*per point*, the closest to OmniAnomaly's own average);
* *per point*: OmniAnomaly's average over rows rather than segments (centred windows);
* *random*: the expected HitRate of a uniformly random ranking, ``min(⌊P%·|GT|⌋, 38) / 38`` averaged over segments;
* *label-timed reference*: a ranking that knows each segment's rows (`label_timed_hit_rate`): how far the labelled
  metrics are the ones that move there, a ceiling of sorts for any attribution that follows what moved;

and the same figure for other attribution definitions computed from the same model (``ATTRIBUTIONS``).

Usage::

    .venv/bin/python benchmarks/bench_smd.py [--data ../shared/data/smd] [--ablation] [--attribution] [--machines 1-6]
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
from numpy.typing import NDArray

from anomalyd.core.attribution import (
    Segment,
    field_shares,
    hit_rate,
    load_interpretation,
    shift_segments,
    summarise,
    trailing_zscore,
)
from anomalyd.core.detector import Detector, DetectorSpec
from anomalyd.evaluation.datasets import load_smd_machine
from anomalyd.evaluation.metrics import (
    best_f1_threshold,
    point_adjusted_metrics,
    point_metrics,
    roc_auc,
    window_metrics,
)
from anomalyd.evaluation.series import smd_run

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
    "out-of-range rule on whole windows, no growth cap (the default before 2026-11-30)": {
        "range_by": "window", "normaliser_range_growth": None},
    "robust reference (median / IQR history)": {"normaliser_reference": "robust"},
    "scorer fft": {"scorer": "fft"},
    "scorer generalized": {"scorer": "generalized"},
    "scorer kmeans+discord": {"scorer": "kmeans+discord"},
    "per-field surprise over 500 windows": {"field_surprise": 500},
    "scale floor of one resolution step, per-field surprise over 500 windows": {
        "resolution_floor": 1.0, "field_surprise": 500},
    "scale floor of one resolution step, decision on the error": {"resolution_floor": 1.0, "decision": "error"},
}


Errors = dict[str, NDArray[np.float64]]

#: Attribution definitions compared (name -> per-field scores of every test window from the per-window errors of
#: `window_errors`: ``mean_abs``/``max_abs`` (test) and ``ho_mean_abs``/``ho_max_abs`` (the training hold-out),
#: in scaled units). The first is what the detector returns (``WindowBatch.field_error``) and the daemon writes.
ATTRIBUTIONS: dict[str, Callable[[Errors], NDArray[np.float64]]] = {
    "mean abs. difference / hold-out q99 (the detector's field error, default)":
        lambda e: e["mean_abs"] / _q99(e["ho_mean_abs"]),
    "mean abs. difference (scaled units, no normalisation)": lambda e: e["mean_abs"],
    "max abs. difference / hold-out q99": lambda e: e["max_abs"] / _q99(e["ho_max_abs"]),
    "max abs. difference (scaled units, no normalisation)": lambda e: e["max_abs"],
    "mean abs. difference / hold-out q99, z-score vs the field's last 2000 windows": lambda e: trailing_zscore(
        e["ho_mean_abs"] / _q99(e["ho_mean_abs"]), e["mean_abs"] / _q99(e["ho_mean_abs"])),
    "max abs. difference, z-score vs the field's last 2000 windows":
        lambda e: trailing_zscore(e["ho_max_abs"], e["max_abs"]),
}


def _q99(ho: NDArray[np.float64]) -> NDArray[np.float64]:
    """The detector's per-field reference: the hold-out's 99th percentile, floored at the fields' median."""
    ref = np.quantile(ho, 0.99, axis=0)
    return np.asarray(np.maximum(ref, max(float(np.median(ref)), 1e-9)))


def window_errors(det: Detector, train: NDArray[np.float64], test: NDArray[np.float64]) -> Errors:
    """Per-field mean and max absolute difference of every test window (the training file's end as context, as
    `smd_run` scores them) and of the training hold-out's windows, against their nearest shape."""
    from anomalyd.core.model import sliding_windows

    w = det.window_
    z_tr = (train - det.mean_) / det.scale_
    z_te = (test - det.mean_) / det.scale_
    wins = np.swapaxes(np.lib.stride_tricks.sliding_window_view(
        np.concatenate((z_tr[len(z_tr) - (w - 1):], z_te)), w, axis=0), 1, 2)
    n_val = max(round(det.spec.holdout * len(z_tr)), w)
    _, mean_abs, max_abs, _ = det.catalog_.match(wins)
    _, ho_mean, ho_max, _ = det.catalog_.match(sliding_windows(z_tr[len(z_tr) - n_val:], w, 1))
    return {"mean_abs": mean_abs, "max_abs": max_abs, "ho_mean_abs": ho_mean, "ho_max_abs": ho_max}


def label_timed_hit_rate(train: NDArray[np.float64], test: NDArray[np.float64], segments: list[Segment],
                         p: float = 150, before: int = 100) -> float:
    """A reference no detector can reach: each segment's metrics ranked by how far they move *inside the segment's
    labelled rows* from their mean over the ``before`` rows before it, in units of their training std (largest
    absolute deviation). It knows where the anomaly is; it says how far the labelled metrics are the ones that
    move (a HitRate well under 1 means the labels name metrics that hardly change), averaged over segments."""
    sd = np.maximum(train.std(axis=0), 1e-3)
    hits = []
    for g in segments:
        base = test[max(0, g.start - before) : g.start].mean(axis=0) if g.start else train[-before:].mean(axis=0)
        hits.append(hit_rate(np.abs(test[g.start : g.end] - base).max(axis=0) / sd, g.fields, p))
    return float(np.mean(hits))


def random_hit_rate(segments: list[Segment], p: float, n_fields: int) -> float:
    """Expected HitRate@P% of a uniformly random ranking, averaged over the segments."""
    return float(np.mean([min(int(p / 100 * len(g.fields) + 1e-9), n_fields) / n_fields for g in segments]))


def attribution_figures(field_scores: NDArray[np.float64], segments: list[Segment], window: int,
                        anomalous: NDArray[np.bool_] | None = None) -> dict[str, dict[str, float]]:
    """HitRate@100/150 of one attribution (per-field scores of every test window) in the ways of the module
    docstring."""
    n = len(field_scores)
    shares = field_shares(field_scores)
    centred = shift_segments(segments, window // 2, n)
    out = {"stamped": summarise(shares, segments, how="rows"),
           "centred": summarise(shares, centred, how="rows"),
           "centred_mean": summarise(shares, centred, how="mean")}
    if anomalous is not None:
        covering = [Segment(g.start, min(g.end + window - 1, n), g.fields) for g in segments]
        out["flagged"] = summarise(shares, covering, how="rows", rows=anomalous)
    return out


def evaluate_attribution(data: Path, machine: str, det: Detector, b: Any, train: NDArray[np.float64],
                         test: NDArray[np.float64]) -> dict[str, Any]:
    segs = load_interpretation(data / "interpretation_label" / f"machine-{machine}.txt", test.shape[1])
    out: dict[str, Any] = {"segments": len(segs),
                           "random": {f"hit@{p}": random_hit_rate(segs, p, test.shape[1]) for p in (100, 150)},
                           "label_timed": {f"hit@{p}": label_timed_hit_rate(train, test, segs, p) for p in (100, 150)}}
    out.update(attribution_figures(b.field_weight, segs, det.window_, b.anomalous))
    errs = window_errors(det, train, test)
    if det.spec.field_surprise == 0:  # with the per-field surprise, field_error is the surprise, not this
        assert np.allclose(ATTRIBUTIONS[next(iter(ATTRIBUTIONS))](errs), b.field_error, rtol=1e-9, atol=1e-12), \
            "window_errors no longer reproduces the detector's field_error"
    out["variants"] = {name: attribution_figures(f(errs), segs, det.window_) for name, f in ATTRIBUTIONS.items()}
    return out


def evaluate_machine(data: Path, machine: str, spec: DetectorSpec, attribution: bool = False) -> dict[str, Any]:
    train, test, labels = load_smd_machine(data, machine)
    t0 = time.perf_counter()
    det, b = smd_run(train, test, spec)
    seconds = time.perf_counter() - t0
    flags = b.anomalous
    s = np.nan_to_num(b.score)
    f = flags.astype(np.float64)
    extra = {"attribution": evaluate_attribution(data, machine, det, b, train, test)} if attribution else {}
    return {**extra,
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


def _pair(r: dict[str, float]) -> str:
    return f"{r['hit@100']:.3f} / {r['hit@150']:.3f}"


def print_attribution(rows: dict[str, dict[str, Any]]) -> None:
    """The attribution tables (module docstring) of the machines in ``rows``."""
    print("\n## SMD attribution: HitRate@100% / @150% per segment, averaged over segments\n")
    print("| machine | segments | as stamped | centred | centred, one ranking | flagged only (segments) | "
          "flagged only, per point | per point (centred) | random | label-timed reference |")
    print("|---|---|---|---|---|---|---|---|---|---|")
    for m, r in rows.items():
        a = r["attribution"]
        fl = a["flagged"]
        print(f"| {m} | {a['segments']} | {_pair(a['stamped'])} | **{_pair(a['centred'])}** | "
              f"{_pair(a['centred_mean'])} | {_pair(fl)} ({int(fl['segments'])}) | "
              f"{fl['points@100']:.3f} / {fl['points@150']:.3f} | "
              f"{a['centred']['points@100']:.3f} / {a['centred']['points@150']:.3f} | {_pair(a['random'])} | "
              f"{_pair(a['label_timed'])} |")
    names = list(next(iter(rows.values()))["attribution"]["variants"])
    print("\nHitRate@150% by attribution definition (as stamped / centred / centred, one ranking per segment):\n")
    print("| attribution | " + " | ".join(rows) + " | lowest centred |")
    print("|---|" + "---|" * (len(rows) + 1))
    for name in names:
        v = {m: r["attribution"]["variants"][name] for m, r in rows.items()}
        low = min(x["centred"]["hit@150"] for x in v.values())
        print(f"| {name} | " + " | ".join(
            f"{x['stamped']['hit@150']:.3f} / {x['centred']['hit@150']:.3f} / {x['centred_mean']['hit@150']:.3f}"
            for x in v.values()) + f" | {low:.3f} |", flush=True)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--data", type=Path, default=DEFAULT_DATA, help="SMD folder (default %(default)s)")
    p.add_argument("--ablation", action="store_true", help="also run the variants in ABLATIONS")
    p.add_argument("--only", help="with --ablation: only the variants whose name contains this text")
    p.add_argument("--attribution", action="store_true",
                   help="also HitRate@100%%/150%% of the per-field attribution (interpretation_label)")
    p.add_argument("--machines", nargs="+", choices=list(PAPER), default=list(PAPER), help="machines to run")
    p.add_argument("--json", type=Path, help="write all figures to this JSON file")
    p.add_argument("--spec", default="{}", help="JSON of `DetectorSpec.with_overrides` arguments for the run "
                   "measured in place of the default, e.g. '{\"field_surprise\": 500}'")
    args = p.parse_args(argv)
    if not args.data.is_dir():
        print(f"SMD data not found at {args.data}; pass --data", file=sys.stderr)
        return 2
    cfg = DetectorSpec().with_overrides(**json.loads(args.spec))
    report: dict[str, Any] = {"default": {}}
    print("## SMD, the detector's own decision (window-level F1: 100-row windows, delta 0)\n")
    print("| machine | paper window F1 | **window F1** | window P / R | point F1 | point-adjusted F1 | "
          "oracle window F1 (score) | ROC-AUC score / error | anomalous rows | seconds |")
    print("|---|---|---|---|---|---|---|---|---|---|")
    for machine in args.machines:
        paper = PAPER[machine]
        r = evaluate_machine(args.data, machine, cfg, args.attribution)
        report["default"][machine] = r
        mark = "above" if r["window_f1"] > paper else "below"
        print(f"| {machine} | {paper:.4f} | **{r['window_f1']:.4f}** ({mark}) | {r['window_precision']:.3f} / "
              f"{r['window_recall']:.3f} | {r['point_f1']:.4f} | {r['pa_f1']:.4f} | {r['oracle_window_f1']:.4f} | "
              f"{r['roc_auc_score']:.3f} / {r['roc_auc_error']:.3f} | {r['anomalous_rows']} | {r['seconds']:.0f} |",
              flush=True)
    if args.attribution:
        print_attribution(report["default"])
    if args.ablation:
        print("\n| variant (one change from the default) | " + " | ".join(
            f"{m} window F1 (oracle)" for m in args.machines) + " |")
        print("|---|" + "---|" * len(args.machines))
        report["ablation"] = {}
        for label, changes in ABLATIONS.items():
            if args.only and args.only not in label:
                continue
            rows = {m: evaluate_machine(args.data, m, cfg.with_overrides(**changes)) for m in args.machines}
            report["ablation"][label] = rows
            print(f"| {label} | " + " | ".join(f"{rows[m]['window_f1']:.3f} ({rows[m]['oracle_window_f1']:.3f})"
                                               for m in args.machines) + " |", flush=True)
    if args.json:
        args.json.write_text(json.dumps(report, indent=2, default=float) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
