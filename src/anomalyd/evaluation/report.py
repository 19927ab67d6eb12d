"""What `anomalyd evaluate` prints and writes: the table, the JSON report, and PNG plots of the worst misses and
false alarms (matplotlib is imported only by `plot_event`)."""

from __future__ import annotations

import json
import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

import numpy as np

from .nab import NAB_PROFILES
from .series import EvalSeries

__all__ = [
    "PlotEvent",
    "find_plot_events",
    "format_table",
    "no_plots_reason",
    "plot_event",
    "write_json",
    "write_plots",
]


# ---------------------------------------------------------------------------------------------------------
# The table and the JSON report
# ---------------------------------------------------------------------------------------------------------


def _fmt(v: Any, width: int) -> str:
    if isinstance(v, float):
        text = "-" if not math.isfinite(v) else f"{v:.3f}" if abs(v) < 1000 else f"{v:.4g}"
    else:
        text = str(v)
    return text.rjust(width)


def format_table(series: Sequence[EvalSeries], summary: Mapping[str, Any]) -> str:
    """Render the per-series metrics and the summary as a plain-text table."""
    has_nab = "nab" in summary
    cols = [("rows", 7), ("segs", 5), ("alerts", 7), ("flagged", 8), ("thresh", 9), ("P", 6), ("R", 6), ("F1", 6),
            ("PA-F1", 6), ("win-F1", 6), ("ROC", 6), ("PR", 6)]
    if has_nab:
        cols += [("NAB", 6), ("det", 4), ("miss", 4)]
    keys = {"rows": "rows", "segs": "segments", "alerts": "alerts", "flagged": "flagged", "thresh": "threshold",
            "P": "precision",
            "R": "recall", "F1": "f1", "PA-F1": "pa_f1", "win-F1": "window_f1", "ROC": "roc_auc", "PR": "pr_auc",
            "NAB": "nab_raw", "det": "nab_detected", "miss": "nab_missed"}
    name_w = max([len("series"), *(len(s.name) for s in series)])
    lines = ["series".ljust(name_w) + "".join(_fmt(c, w + 1) for c, w in cols)]
    lines.append("-" * len(lines[0]))
    for s in series:
        lines.append(s.name.ljust(name_w) + "".join(_fmt(s.metrics.get(keys[c], ""), w + 1) for c, w in cols))
    if "mean" in summary:
        m = summary["mean"]
        lines.append(f"mean over series: F1 {m['f1']:.3f}  PA-F1 {m['pa_f1']:.3f}  window-F1 {m['window_f1']:.3f}  "
                     f"ROC-AUC {m['roc_auc']:.3f}  PR-AUC {m['pr_auc']:.3f}")
    if has_nab:
        nab = summary["nab"]
        at = "; ".join(f"{p} {nab[p]['score']:.2f}" for p in NAB_PROFILES)
        lines.append(f"NAB normalised score at the operating threshold (score > {nab['threshold']:.4g}, what the "
                     f"daemon flags): {at}")
        best = "; ".join(f"{p} {nab[p]['optimised_score']:.2f} (score >= {nab[p]['optimised_threshold']:.4g})"
                         for p in NAB_PROFILES)
        lines.append(f"NAB normalised score at NAB's optimised threshold per profile (tuned on these labels, "
                     f"optimistic): {best}")
    if "ucr" in summary:
        u = summary["ucr"]
        lines.append(f"UCR top-1 within 100 rows of the anomaly: score {u['hits_score']}/{u['series']} "
                     f"({u['top1_score']:.3f}), the score's input (error) {u['hits_error']}/{u['series']} "
                     f"({u['top1_error']:.3f})")
    if "tuned" in summary:
        lines.append(f"tuned ({summary['tune']}): {summary['tuned']}")
    return "\n".join(lines)


def _jsonable(value: Any) -> Any:
    if isinstance(value, float):
        return value if math.isfinite(value) else None
    if isinstance(value, (np.floating, np.integer)):
        return _jsonable(value.item())
    if isinstance(value, Mapping):
        return {str(k): _jsonable(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_jsonable(v) for v in value]
    if isinstance(value, np.ndarray):
        return None  # arrays stay out of the report
    if isinstance(value, Path):
        return str(value)
    return value


def write_json(path: Path, report: Mapping[str, Any]) -> None:
    """Write ``report`` as indented JSON (non-finite floats as null, arrays left out), creating the folder."""
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(_jsonable(report), indent=2) + "\n")


# ---------------------------------------------------------------------------------------------------------
# Plots
# ---------------------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class PlotEvent:
    """A labelled segment that was missed, or a false alarm, chosen for a plot."""

    kind: Literal["miss", "false-alarm", "alert"]
    series: str
    start: int
    end: int
    badness: float  # higher is worse: threshold over peak score for misses, peak over threshold for alarms
    error_ratio: float = 0.0  # peak error over the error threshold (breaks ties: saturated range-rule alarms score 1)


def find_plot_events(series: Sequence[EvalSeries], n: int) -> list[PlotEvent]:
    """The ``n`` worst misses (labelled segments without a flag, lowest peak score first) and the ``n`` worst
    false alarms (flagged runs outside every segment, highest peak score first) over all series; without
    labels the flagged runs are plain alerts.

    A flag within ``window - 1`` rows after a segment is not a false alarm: the window ending there still holds
    the segment's last row.

    Examples
    --------
    >>> s = EvalSeries("a", np.zeros(10), np.array([0, 0, .2, 0, 0, .9, 0, 0, 0, 0.]), np.zeros(10),
    ...                np.array([0, 1, 1, 1, 0, 0, 0, 0, 0, 0], bool), 0, 0.5, [(1, 3)])
    >>> [(e.kind, e.start, e.end) for e in find_plot_events([s], 3)]
    [('miss', 1, 3), ('false-alarm', 5, 5)]
    """
    misses: list[PlotEvent] = []
    alarms: list[PlotEvent] = []
    for s in series:
        sc = np.where(np.arange(s.scores.size) < s.n_train, np.nan, s.scores)
        inside = np.zeros(sc.size, dtype=bool)
        tail = int(s.info.get("window", 1)) - 1  # rows whose window still holds the segment's last row
        for a, b in s.segments:
            inside[a : b + 1 + tail] = True
            seg = sc[a : b + 1]
            if seg.size and not np.any(seg > s.threshold):
                peak = float(np.nanmax(seg)) if np.isfinite(seg).any() else 0.0
                if b >= s.n_train:
                    misses.append(PlotEvent("miss", s.name, a, b, s.threshold / max(peak, 1e-12)))
        flags = (sc > s.threshold) & ~inside
        gap = int(s.info.get("window", 32))
        rows = np.flatnonzero(flags)
        if rows.size:
            breaks = np.flatnonzero(np.diff(rows) > gap) + 1
            for run in np.split(rows, breaks):
                peak = float(np.nanmax(sc[run]))
                err = s.errors[run[0] : run[-1] + 1]
                ratio = (float(np.nanmax(err)) / s.error_threshold if s.error_threshold and np.isfinite(err).any()
                         else 0.0)
                kind: Literal["false-alarm", "alert"] = "false-alarm" if s.labels is not None else "alert"
                alarms.append(PlotEvent(kind, s.name, int(run[0]), int(run[-1]),
                                        peak / max(abs(s.threshold), 1e-12), ratio))
    misses.sort(key=lambda e: -e.badness)
    alarms.sort(key=lambda e: (-e.badness, -e.error_ratio))
    return misses[:n] + alarms[:n]


def plot_event(s: EvalSeries, event: PlotEvent, path: Path) -> Path:
    """Plot one event in the reference blog's style (Agg backend, PNG).

    Top: the original series and its reconstruction (for SMD: the three metrics that contribute most).
    Middle: the reconstruction error, with its threshold when the operating threshold is on the error.
    Bottom: the normalised score with the operating threshold (left out when the score is the error).
    Labelled segments are shaded in every panel; the training part is greyed.
    """
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    n = s.scores.size
    span = event.end - event.start + 1
    pad = max(3 * int(s.info.get("window", 32)), span, 50)
    lo, hi = max(0, event.start - pad), min(n, event.end + pad + 1)
    x = np.arange(lo, hi)
    score_is_error = s.scores is s.errors
    panels = 2 if score_is_error else 3
    fig, axes = plt.subplots(panels, 1, figsize=(11, 2.4 * panels + 0.6), sharex=True)
    top = axes[0]
    if s.values.ndim == 1:
        top.plot(x, s.values[lo:hi], lw=0.9, label="original")
        if s.reconstruction is not None:
            top.plot(x, s.reconstruction[lo:hi], lw=0.9, label="reconstruction")
    else:
        ms = s.info.get("metric_scores")
        if isinstance(ms, np.ndarray):
            best = np.argsort(-np.nanmax(ms[event.start : event.end + 1], axis=0))[:3]
        else:
            best = np.arange(min(3, s.values.shape[1]))
        for j in best:
            top.plot(x, s.values[lo:hi, j], lw=0.9, label=f"metric {j + 1}")
    top.legend(loc="upper left", fontsize=8)
    top.set_title(f"{event.kind}: {s.name}, rows {event.start}-{event.end}")
    err_ax = axes[1]
    err_ax.plot(x, s.errors[lo:hi], lw=0.9, color="tab:red", label="reconstruction error")
    thr_err = s.threshold if score_is_error else s.error_threshold
    if thr_err is not None and math.isfinite(thr_err):
        err_ax.axhline(thr_err, color="k", ls="--", lw=0.8,
                       label="threshold" if score_is_error else "training threshold")
    err_ax.legend(loc="upper left", fontsize=8)
    if not score_is_error:
        axes[2].plot(x, s.scores[lo:hi], lw=0.9, color="tab:purple", label="score")
        if math.isfinite(s.threshold):
            axes[2].axhline(s.threshold, color="k", ls="--", lw=0.8, label="threshold")
        axes[2].set_ylim(-0.02, 1.05)
        axes[2].legend(loc="upper left", fontsize=8)
    for ax in axes:
        for a, b in s.segments:
            if b >= lo and a < hi:
                ax.axvspan(max(a, lo), min(b, hi - 1), color="tab:orange", alpha=0.2, lw=0)
        if s.n_train > lo:
            ax.axvspan(lo, min(s.n_train, hi - 1), color="grey", alpha=0.15, lw=0)
    axes[-1].set_xlabel("row")
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=90)
    plt.close(fig)
    return path


def write_plots(series: Sequence[EvalSeries], n: int, folder: Path) -> list[str]:
    """Plot the events of `find_plot_events` into ``folder`` as ``<kind>-<nn>-<series>-<first row>.png``; return the
    paths written."""
    by_name = {s.name: s for s in series}
    counts = {"miss": 0, "false-alarm": 0, "alert": 0}
    plots: list[str] = []
    for event in find_plot_events(series, n):
        counts[event.kind] += 1
        path = folder / f"{event.kind}-{counts[event.kind]:02d}-{_safe(event.series)}-{event.start}.png"
        plots.append(str(plot_event(by_name[event.series], event, path)))
    return plots


def no_plots_reason(series: Sequence[EvalSeries]) -> str:
    """Why `find_plot_events` found nothing to plot, for the ``wrote 0 plots`` line."""
    if all(s.labels is None for s in series):
        return (": no labels, so no miss or false alarm to plot, and no row was flagged, so no alert either "
                "(add a label column / --labels, or lower --threshold)")
    return (": no miss (every labelled segment after the training rows has a flagged row) and no false alarm "
            "(no row flagged outside the segments)")


def _safe(name: str) -> str:
    return "".join(c if c.isalnum() or c in "-_." else "_" for c in name).strip("_")

