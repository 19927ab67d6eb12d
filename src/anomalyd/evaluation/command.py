"""`anomalyd evaluate`: its options (`add_arguments`), the input layout, the evaluation loop (operating or tuned
thresholds, metrics per series, the corpus summary) and the entry point (`run`).

The series come from `anomalyd.evaluation.series`, the measures from `anomalyd.evaluation.metrics` and
`anomalyd.evaluation.nab`, the table, JSON and plots from `anomalyd.evaluation.report`.
"""

from __future__ import annotations

import argparse
import logging
import math
from pathlib import Path
from typing import Any, Literal

import numpy as np
from numpy.typing import NDArray

from .metrics import (
    alert_events,
    best_f1_threshold,
    point_adjusted_metrics,
    point_metrics,
    pr_auc,
    roc_auc,
    window_metrics,
)
from .nab import NAB_PROFILES, NabCorpus, NabFile, NabFileResult, best_nab_threshold, nab_score
from .report import format_table, no_plots_reason, write_json, write_plots
from .series import (
    EvalSeries,
    UsageError,
    load_csv_series,
    load_influx_series,
    load_nab_series,
    load_smd_series,
    load_ucr_series,
)

log = logging.getLogger(__name__)

__all__ = ["FORMATS", "TUNE_CHOICES", "add_arguments", "run"]

TUNE_CHOICES = ("none", "f1", "point-adjusted", "window", *(f"nab-{p}" for p in NAB_PROFILES))
FORMATS = ("auto", "csv", "nab", "smd", "ucr", "influx")
_F1_KIND: dict[str, Literal["point", "point_adjusted", "window"]] = {
    "f1": "point", "point-adjusted": "point_adjusted", "window": "window"}


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """Add the options of ``anomalyd evaluate`` to an `argparse.ArgumentParser`.

    Parameters
    ----------
    parser : argparse.ArgumentParser
        The (sub)parser to extend; `run` reads the namespace it produces.
    """
    parser.add_argument("input", type=Path, nargs="?",
                        help="a labelled CSV (timestamp,value[,label]), a NAB folder (data/ and labels/) or an SMD "
                             "folder (machine-<id>_train/test/test_label.npy); none with --format influx")
    parser.add_argument("--format", choices=FORMATS, default="auto",
                        help="input layout (default: guessed; influx when -c/--config is given)")
    influx = parser.add_argument_group(
        "InfluxDB range (--format influx)",
        "Reads every series of a signal of an anomalyd config between --start and --end, on the signal's grid "
        "(period, gaps up to max_gap filled, as the daemon does). Scoring: with --model, that stored model's "
        "max_error; otherwise the signal's trained models in paths.models (the daemon's own models, thresholds "
        "and max_error; series without a model are left out, as the daemon skips them); with no trained model "
        "at all, the default causal detector trained on the first --train-rows rows of each series. Rows up to "
        "a stored model's training end are not evaluated.")
    influx.add_argument("-c", "--config", type=Path,
                        help="anomalyd TOML config to read InfluxDB, the signal and paths.models from (with "
                             "--format influx, default config.toml)")
    influx.add_argument("--signal", help="signal of the config to evaluate (default: the only one)")
    influx.add_argument("--start", help="start of the range: RFC 3339 time, 'now' or 'now-2h'")
    influx.add_argument("--end", default="now", help="end of the range (default now)")
    influx.add_argument("--labels", type=Path,
                        help="label windows as JSON: a list of [start, end] RFC 3339 pairs for every series, or "
                             "{\"<series>\": [[start, end], ...]} keyed by the series' tags as k=v,k=v (sorted, "
                             "e.g. \"host=h1\"; an empty list means no anomaly); without it, alerts are counted "
                             "only")
    parser.add_argument("--model", type=Path,
                        help="score a CSV or an InfluxDB range with this stored model (catalog JSON) instead of "
                             "training a detector (InfluxDB: a per-series model scores its own series only, a shared "
                             "one every series); the threshold then applies to max_error, as in the daemon")
    parser.add_argument("--train-rows", type=int,
                        help="CSV, and InfluxDB series without a trained model: rows of the training part (default: "
                             "NAB's rule, min(15%%, 750 rows))")
    parser.add_argument("--window", default="auto",
                        help="window length, or 'auto' for the dominant-period rule (default auto)")
    parser.add_argument("--slide", type=int, default=None,
                        help="score one window every N rows, as the daemon does with signals.slide = N (default 1: "
                             "every row; rows in between score 0). A stored model (--model, or the signal's trained "
                             "models) scores at its own stride, set at training: a different --slide is refused")
    parser.add_argument("--max-gap", type=int, default=8,
                        help="CSV and NAB: gaps of up to N samples are filled, as signals.max_gap does (default 8)")
    parser.add_argument("--jobs", type=int, default=1, help="NAB: files evaluated in parallel (default 1)")
    parser.add_argument("--machines", nargs="+", help="SMD: only these machine ids (default: all found)")
    parser.add_argument("--every", type=int, default=1,
                        help="UCR: evaluate every N-th series of index.csv (default 1: all 234)")
    parser.add_argument("--detector", default=None, metavar="NAME",
                        help="the window scorer (DetectorSpec.scorer): kmeans (default), fft, saliency, generalized, "
                             "discord, nodata, or several joined by '+' (e.g. kmeans+discord)")
    parser.add_argument("--threshold", type=float,
                        help="operating threshold (default: 0.5 on normalised scores; the threshold learned "
                             "from training data for SMD, --model and InfluxDB stored models)")
    parser.add_argument("--tune", choices=TUNE_CHOICES, default="none",
                        help="choose the threshold from the labels: best F1 (point, point-adjusted or window; "
                             "per series) or best NAB profile score (one threshold for the corpus)")
    parser.add_argument("--validation", type=float, default=0.0,
                        help="with --tune: tune on the first share of each series' scored rows and report on the "
                             "rest (default 0: tune and report on the same rows, an optimistic oracle)")
    parser.add_argument("--window-size", type=int, default=100,
                        help="rows per window of the window-level F1 (default 100, as the LSTM-ED paper)")
    parser.add_argument("--delta", type=int, default=0,
                        help="window-level F1: a window is flagged when more than DELTA rows exceed the threshold "
                             "(default 0; tuned with --tune window)")
    parser.add_argument("--write-threshold", action="store_true",
                        help="with --model and --tune: write the tuned threshold into the model's catalog JSON")
    parser.add_argument("--json", type=Path, help="write the full report as JSON to this file")
    parser.add_argument("--plots", type=Path, help="write PNG plots of the worst misses and false alarms here")
    parser.add_argument("--n-plots", type=int, default=3, help="plots of each kind (default 3)")
    parser.add_argument("--no-progress", action="store_true", help="no progress bar")


def _detector_spec(args: Any) -> Any:
    """The detector's parameters for ``evaluate``: the defaults every signal gets, with ``--window`` and
    ``--slide``."""
    from ..core.detector import DetectorSpec

    window: int | None
    if str(args.window).lower() == "auto":
        window = None
    else:
        try:
            window = int(args.window)
        except ValueError:
            raise ValueError(f"--window {args.window!r} must be a whole number of rows or 'auto'") from None
        if window < 4:
            raise ValueError(f"--window {window} is too small; use at least 4 rows or 'auto'")
    slide = 1 if args.slide is None else args.slide
    if slide < 1:
        raise ValueError(f"--slide {slide} must be at least 1 (1 scores every row)")
    if args.max_gap < 0:
        raise ValueError(f"--max-gap {args.max_gap} must be >= 0")
    spec = DetectorSpec(window=window, stride=slide)
    detector = getattr(args, "detector", None)
    if detector is not None:
        try:
            spec = spec.with_overrides(scorer=str(detector))
        except ValueError as exc:
            raise UsageError(f"--detector {detector!r}: {exc}") from None
    return spec


def _guess_format(path: Path) -> str:
    if path.is_file():
        return "csv"
    if path.is_dir():
        if (path / "labels" / "combined_windows.json").is_file() and (path / "data").is_dir():
            return "nab"
        if any(path.glob("machine-*_train.npy")):
            return "smd"
        if (path / "series.npz").is_file() and (path / "index.csv").is_file():
            return "ucr"
        raise ValueError(f"{path} is a folder but neither NAB (data/ and labels/combined_windows.json), SMD "
                         "(machine-<id>_train.npy ...) nor UCR (series.npz and index.csv); pass a CSV file or one "
                         "of those folders")
    raise FileNotFoundError(f"input {path} does not exist")


def _resolve_format(args: Any) -> str:
    """The input layout: ``--format``, else influx with ``-c/--config``, else guessed from the input path."""
    fmt = str(args.format)
    config = getattr(args, "config", None)
    if fmt == "auto":
        if config is not None:
            fmt = "influx"
        elif args.input is None:
            raise UsageError("give an input (a labelled CSV, a NAB or an SMD folder), or -c CONFIG --start T to "
                             "evaluate a signal over an InfluxDB range")
        else:
            fmt = _guess_format(args.input)
    if fmt == "influx":
        if args.input is not None:
            raise UsageError(f"--format influx reads InfluxDB, not {args.input}; drop the input, or drop "
                             "-c/--config to evaluate the file")
        if getattr(args, "start", None) is None:
            raise UsageError("--format influx needs --start T (RFC 3339, 'now' or 'now-2h'); --end defaults to now")
        return fmt
    if args.input is None:
        raise UsageError(f"--format {fmt} needs an input path")
    given = [f"--{name}" for name in ("config", "signal", "start", "labels") if getattr(args, name, None) is not None]
    if given:
        raise UsageError(f"{', '.join(given)} select an InfluxDB range (--format influx); a {fmt} input does not "
                         "take them")
    return fmt


# ---------------------------------------------------------------------------------------------------------
# The evaluation loop
# ---------------------------------------------------------------------------------------------------------


def _split_rows(s: EvalSeries, validation: float) -> tuple[slice, slice]:
    """Rows to tune on and rows to report on (the same with no validation share)."""
    n = s.scores.shape[0]
    if validation <= 0:
        return slice(s.n_train, n), slice(s.n_train, n)
    cut = s.n_train + round(validation * (n - s.n_train))
    return slice(s.n_train, cut), slice(cut, n)


def _f1_block(labels: NDArray[np.bool_], scores: NDArray[np.float64], tau: float, size: int,
              delta: int) -> dict[str, Any]:
    flags = scores > tau
    pm = point_metrics(labels, flags)
    pa = point_adjusted_metrics(labels, flags)
    wm = window_metrics(labels, scores, tau, size, delta)
    scored = np.isfinite(scores)  # NaN (a stored model's missing-data windows) is never flagged, and not ranked
    return {"precision": pm["precision"], "recall": pm["recall"], "f1": pm["f1"],
            "pa_precision": pa["precision"], "pa_recall": pa["recall"], "pa_f1": pa["f1"],
            "window_precision": wm["precision"], "window_recall": wm["recall"], "window_f1": wm["f1"],
            "roc_auc": roc_auc(labels[scored], scores[scored]), "pr_auc": pr_auc(labels[scored], scores[scored])}


def _alert_counts(s: EvalSeries, rows: slice) -> dict[str, Any]:
    """``flagged``: rows over the threshold; ``alerts``: the alert events the daemon's alert policy would raise on
    them (runs of flagged windows, see `alert_events`), with that policy's ``for_windows`` and ``recover_windows``
    (the ``[alerts]`` defaults, or the config's with ``--format influx``)."""
    from ..config import AlertsConfig

    flags = s.scores[rows] > s.threshold
    errors = s.errors[rows]
    scored = np.isfinite(errors) if errors.ndim == 1 and errors.shape == flags.shape else None
    if scored is not None:
        flags &= scored  # a missing-data window (no max_error) is never flagged
    for_w = int(s.info.get("for_windows", AlertsConfig.for_windows))
    recover_w = int(s.info.get("recover_windows", AlertsConfig.recover_windows))
    return {"flagged": int(np.count_nonzero(flags)), "alerts": len(alert_events(flags, for_w, recover_w, scored))}


def _nab_single(s: EvalSeries) -> NabCorpus:
    """A one-file NAB corpus over row numbers, with the series' labelled segments as windows."""
    n = s.scores.shape[0]
    return NabCorpus({s.name: NabFile(s.name, np.arange(n), tuple(s.segments))})


def _evaluate(series: list[EvalSeries], args: Any, corpus: NabCorpus | None) -> dict[str, Any]:
    """Tune (optionally), then fill each series' metrics; return the corpus-level summary."""
    summary: dict[str, Any] = {"tune": args.tune, "validation": args.validation}
    size, delta = args.window_size, args.delta
    if size < 1 or delta < 0:
        raise ValueError(f"--window-size {size} must be >= 1 and --delta {delta} >= 0")
    if args.threshold is not None:
        for s in series:
            s.threshold = float(args.threshold)
    nab_tuned: dict[str, float] = {}
    if args.tune.startswith("nab-"):
        profile = args.tune.removeprefix("nab-")
        if args.validation > 0:
            raise ValueError("--validation applies to the F1 tunings; NAB tuning uses the whole corpus, as NAB does")
        tuned_corpus = corpus
        if tuned_corpus is None:
            if len(series) != 1 or not series[0].segments:
                raise ValueError(f"--tune {args.tune} needs labelled windows: a NAB folder, or a CSV with a label "
                                 "column holding at least one 1")
            tuned_corpus = _nab_single(series[0])
        scores = {s.name: np.where(np.arange(s.scores.size) < s.n_train, np.nan, s.scores) for s in series}
        thr, normalised, _raw = best_nab_threshold(tuned_corpus, scores, profile)
        tau = float(np.nextafter(thr, -np.inf)) if math.isfinite(thr) else math.inf  # >= thr  <=>  > tau
        for s in series:
            s.threshold = tau
        nab_tuned = {"profile": profile, "threshold": tau, "normalised": normalised}
        summary["tuned"] = nab_tuned
    for s in series:
        if s.labels is None:
            if args.tune != "none":
                raise UsageError(f"--tune {args.tune} needs labels, and {s.name} has no label column; add "
                                 "'label' (0/1) to the CSV")
            s.metrics = {"threshold": s.threshold, "rows": int(s.scores.size - s.n_train),
                         **_alert_counts(s, slice(s.n_train, s.scores.size))}
            continue
        tune_rows, report_rows = _split_rows(s, args.validation)
        if args.tune in _F1_KIND:
            kind = _F1_KIND[args.tune]
            lab, sc = s.labels[tune_rows], s.scores[tune_rows]
            if not lab.any():
                raise ValueError(f"{s.name}: the tuning rows hold no labelled anomaly; lower --validation or give "
                                 "labels")
            tau, d, f1 = best_f1_threshold(lab, sc, kind, size=size)
            s.threshold, delta_s = tau, d if kind == "window" else delta
            s.metrics["tuned_f1"] = f1
        else:
            delta_s = delta
        lab, sc = s.labels[report_rows], s.scores[report_rows]
        s.metrics.update(_f1_block(lab, sc, s.threshold, size, delta_s))
        s.metrics.update({"threshold": s.threshold, "delta": delta_s, "rows": int(lab.size),
                          "labelled_rows": int(np.count_nonzero(lab)), "segments": len(s.segments),
                          **_alert_counts(s, report_rows)})
    # NAB scores at the operating thresholds and with NAB's own per-profile optimisation.
    nab_corpus = corpus
    if nab_corpus is None and len(series) == 1 and series[0].segments and series[0].labels is not None:
        nab_corpus = _nab_single(series[0])
    if nab_corpus is not None and len({s.threshold for s in series}) == 1:
        scores = {s.name: np.where(np.arange(s.scores.size) < s.n_train, np.nan, s.scores) for s in series}
        tau = series[0].threshold
        nab: dict[str, Any] = {"threshold": tau}
        per_file: dict[str, NabFileResult] = {}
        for profile in NAB_PROFILES:
            at = float(np.nextafter(tau, np.inf)) if math.isfinite(tau) else math.inf
            normalised, raw, files = nab_score(nab_corpus, scores, at, profile)
            best_thr, best_norm, _ = best_nab_threshold(nab_corpus, scores, profile)
            nab[profile] = {"score": normalised, "raw": raw, "optimised_threshold": best_thr,
                            "optimised_score": best_norm}
            if profile == "standard":
                per_file = files
        for s in series:
            r = per_file.get(s.name)
            if r is not None:
                s.metrics.update({"nab_raw": r.score, "nab_detected": r.detected_windows,
                                  "nab_missed": r.missed_windows, "nab_fp_rows": r.fp})
        summary["nab"] = nab
    ucr = [s for s in series if "ucr_hit_score" in s.info]
    if ucr:
        summary["ucr"] = {"series": len(ucr), **{f"top1_{k}": float(np.mean([s.info[f"ucr_hit_{k}"] for s in ucr]))
                                                 for k in ("score", "error")},
                          **{f"hits_{k}": int(sum(s.info[f"ucr_hit_{k}"] for s in ucr)) for k in ("score", "error")}}
    labelled = [s for s in series if s.labels is not None]
    if labelled:
        keys = ("f1", "pa_f1", "window_f1", "roc_auc", "pr_auc")
        summary["mean"] = {k: float(np.nanmean([s.metrics[k] for s in labelled])) if any(
            math.isfinite(s.metrics[k]) for s in labelled) else math.nan for k in keys}
    return summary


# ---------------------------------------------------------------------------------------------------------
# Entry point
# ---------------------------------------------------------------------------------------------------------


def run(args: argparse.Namespace) -> int:
    """Run ``anomalyd evaluate`` with the options of `add_arguments`; return the exit status.

    Trains the default causal detector on each series' training part (or scores with ``--model``), applies
    the operating or tuned threshold, prints the table, and writes JSON, plots and the tuned threshold as
    asked. Problems with the input are reported on stderr with exit status 1 (2 for bad option combinations).
    """
    import sys

    try:
        return _run(args)
    except UsageError as exc:
        print(f"anomalyd evaluate: {exc}", file=sys.stderr)
        return 2
    except (OSError, ValueError) as exc:
        log.debug("evaluate failed", exc_info=True)
        print(f"anomalyd evaluate: {exc}", file=sys.stderr)
        return 1


def _run(args: argparse.Namespace) -> int:
    import time

    started = time.perf_counter()
    fmt = _resolve_format(args)
    if args.model is not None and fmt not in ("csv", "influx"):
        raise UsageError("--model scores one CSV series or an InfluxDB range; NAB and SMD folders are evaluated "
                         "with the default detector trained on each file's training part")
    if args.write_threshold and (args.model is None or args.tune == "none"):
        raise UsageError("--write-threshold needs --model PATH and --tune: only a threshold tuned on the stored "
                         "model's own max_error means the same thing to the daemon")
    if not 0.0 <= args.validation < 1.0:
        raise UsageError(f"--validation {args.validation} must be in [0, 1)")
    if args.n_plots < 0:
        raise UsageError(f"--n-plots {args.n_plots} must be >= 0")
    cfg = _detector_spec(args)
    corpus: NabCorpus | None = None
    input_desc = str(args.input)
    stored_models = args.model is not None
    if fmt == "influx":
        series, input_desc, stored_models = load_influx_series(args, cfg)
    elif fmt == "csv":
        series = load_csv_series(args, cfg)
    elif fmt == "nab":
        series, corpus = load_nab_series(args, cfg)
    elif fmt == "smd":
        series = load_smd_series(args, cfg)
    elif fmt == "ucr":
        series = load_ucr_series(args, cfg)
    else:  # pragma: no cover - argparse restricts the choices
        raise UsageError(f"--format {fmt!r} is not one of {', '.join(FORMATS)}")
    summary = _evaluate(series, args, corpus)
    print(format_table(series, summary))
    plots: list[str] = []
    if args.plots is not None and args.n_plots > 0:
        plots = write_plots(series, args.n_plots, args.plots)
        print(f"wrote {len(plots)} plots to {args.plots}{no_plots_reason(series) if not plots else ''}")
    if args.write_threshold:
        from ..service.catalog import set_threshold

        if len({s.threshold for s in series}) != 1:
            raise ValueError(f"--write-threshold: the {len(series)} series got different tuned thresholds; tune "
                             "one threshold for all of them with --tune nab-standard, or evaluate one series")
        tau = series[0].threshold
        if not math.isfinite(tau):
            raise ValueError(f"the tuned threshold is {tau}: flagging nothing scored best, so nothing was written "
                             f"to {args.model}")
        # evaluate flags score > tau; the daemon flags score >= its level: the next float up is the same decision.
        set_threshold(args.model, float(np.nextafter(tau, np.inf)), f"anomalyd evaluate --tune {args.tune} on "
                      f"{input_desc}")
        print(f"wrote threshold {tau:.6g} (tuned: {args.tune}) to {args.model}")
    if args.json is not None:
        report = {
            "input": input_desc, "format": fmt,
            "detector": "stored model" if stored_models else cfg.to_dict(),
            "summary": summary,
            "series": [{"name": s.name, "n_rows": int(s.scores.size), "n_train": s.n_train, **s.info,
                        **s.metrics} for s in series],
            "plots": plots,
            "seconds": time.perf_counter() - started,
        }
        write_json(args.json, report)
        print(f"wrote {args.json}")
    return 0

