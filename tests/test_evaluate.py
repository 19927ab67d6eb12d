"""Tests of anomalyd.evaluation's metrics, NAB scorer and readers: hand-computed cases, NAB v1.1 conformance on the
published scores, tuning."""

from __future__ import annotations

import doctest
import gzip
import json
import math
from collections.abc import Callable
from pathlib import Path
from types import ModuleType
from typing import Any, Literal

import numpy as np
import pytest

from anomalyd.evaluation import datasets, metrics, nab, report
from anomalyd.evaluation.datasets import load_nab_corpus, load_nab_profiles, load_published_scores
from anomalyd.evaluation.metrics import (
    Metrics,
    alert_events,
    best_f1_threshold,
    point_adjust,
    point_adjusted_metrics,
    point_metrics,
    pr_auc,
    roc_auc,
    window_metrics,
)
from anomalyd.evaluation.nab import (
    NAB_PROFILES,
    NabCorpus,
    NabFile,
    NabFileResult,
    NabProfile,
    best_nab_threshold,
    nab_score,
)
from conftest import NAB, WHERE

DETECTORS = ("numenta", "randomCutForest", "windowedGaussian")
PROFILES = ("standard", "reward_low_FP_rate", "reward_low_FN_rate")


def S(y: float) -> float:
    """NAB's scaled sigmoid, written out from the published rule: 2 * sigmoid(-5 y) - 1, -1 beyond y > 3."""
    return -1.0 if y > 3.0 else 2.0 / (1.0 + math.exp(5.0 * y)) - 1.0


@pytest.mark.parametrize("module", [metrics, nab, datasets, report], ids=lambda m: m.__name__)
def test_doctests(module: ModuleType) -> None:
    result = doctest.testmod(module, optionflags=doctest.ELLIPSIS)
    assert result.attempted > 0
    assert result.failed == 0


# --------------------------------------------------------------------------------------------------------
# Point-wise, point-adjusted, window metrics and AUCs
# --------------------------------------------------------------------------------------------------------


def test_point_metrics_hand_case() -> None:
    labels = [1, 1, 0, 0, 1, 0, 1, 0]
    flags = [1, 0, 1, 0, 1, 0, 0, 1]
    # tp: rows 0, 4 -> 2; fp: rows 2, 7 -> 2; fn: rows 1, 6 -> 2
    # precision = 2/4 = 0.5, recall = 2/4 = 0.5, f1 = 2*2 / (2*2 + 2 + 2) = 0.5
    m = point_metrics(labels, flags)
    assert (m["tp"], m["fp"], m["fn"]) == (2, 2, 2)
    assert m["precision"] == pytest.approx(0.5)
    assert m["recall"] == pytest.approx(0.5)
    assert m["f1"] == pytest.approx(0.5)

    # 3 flags, 1 right; 1 anomaly found of 1: precision 1/3, recall 1, f1 = 2 / (2 + 2 + 0) = 0.5
    m = point_metrics([0, 1, 0, 0], [True, True, True, False])
    assert m["precision"] == pytest.approx(1 / 3)
    assert m["recall"] == pytest.approx(1.0)
    assert m["f1"] == pytest.approx(0.5)


def test_point_metrics_zero_over_zero_is_zero() -> None:
    # no anomaly and no flag: every ratio is 0/0 -> 0.0
    assert point_metrics([0, 0, 0], [0, 0, 0]) == {
        "precision": 0.0, "recall": 0.0, "f1": 0.0, "tp": 0, "fp": 0, "fn": 0,
    }
    # anomalies but no flag: precision 0/0 -> 0, recall 0/2 -> 0
    m = point_metrics([1, 1, 0], [0, 0, 0])
    assert (m["precision"], m["recall"], m["f1"], m["fn"]) == (0.0, 0.0, 0.0, 2)


def test_point_metrics_rejects_bad_input() -> None:
    with pytest.raises(ValueError, match="same length"):
        point_metrics([0, 1], [0, 1, 1])
    with pytest.raises(ValueError, match="one-dimensional"):
        point_metrics([[0, 1]], [[0, 1]])
    with pytest.raises(ValueError, match="NaN"):
        point_metrics([0.0, math.nan], [0, 1])


def test_point_adjust_hand_case() -> None:
    # segments: rows 0-1 (hit at row 1), rows 4-6 (missed), rows 9-10 (hit at row 10, runs to the end)
    labels = [1, 1, 0, 0, 1, 1, 1, 0, 0, 1, 1]
    flags = [0, 1, 0, 1, 0, 0, 0, 0, 0, 0, 1]
    adjusted = point_adjust(labels, flags)
    assert adjusted.astype(int).tolist() == [1, 1, 0, 1, 0, 0, 0, 0, 0, 1, 1]
    # adjusted: tp = rows 0,1,9,10 = 4; fp = row 3 = 1; fn = rows 4,5,6 = 3
    # precision = 4/5 = 0.8, recall = 4/7, f1 = 8 / (8 + 1 + 3) = 2/3
    m = point_adjusted_metrics(labels, flags)
    assert (m["tp"], m["fp"], m["fn"]) == (4, 1, 3)
    assert m["precision"] == pytest.approx(0.8)
    assert m["recall"] == pytest.approx(4 / 7)
    assert m["f1"] == pytest.approx(2 / 3)
    # without adjustment: tp = rows 1,10 = 2, fp = 1, fn = 5 -> f1 = 4 / (4 + 1 + 5) = 0.4
    assert point_metrics(labels, flags)["f1"] == pytest.approx(0.4)


def test_point_adjust_without_labels_keeps_flags() -> None:
    assert point_adjust([0, 0, 0], [0, 1, 0]).tolist() == [False, True, False]


def test_window_metrics_hand_case() -> None:
    # 25 rows, size 10 -> windows rows 0-9, 10-19, 20-24 (the short last window counts)
    labels = np.zeros(25, dtype=int)
    labels[12] = 1  # window 1 anomalous
    labels[22] = 1  # window 2 anomalous
    scores = np.zeros(25)
    scores[[3]] = 0.9  # window 0: 1 point above 0.5
    scores[[11, 15]] = 0.8  # window 1: 2 points above 0.5
    scores[[20]] = 0.6  # window 2: 1 point above 0.5
    scores[[21]] = 0.5  # not above tau=0.5 (strictly greater is required)
    # delta=0: every window flagged -> tp = windows 1, 2 = 2; fp = window 0 = 1; fn = 0
    # precision 2/3, recall 1, f1 = 4 / (4 + 1) = 0.8
    m = window_metrics(labels, scores, tau=0.5, size=10, delta=0)
    assert (m["tp"], m["fp"], m["fn"]) == (2, 1, 0)
    assert m["f1"] == pytest.approx(0.8)
    # delta=1: only window 1 (2 > 1 points) flagged -> tp 1, fp 0, fn 1 (window 2): f1 = 2 / (2 + 0 + 1) = 2/3
    m = window_metrics(labels, scores, tau=0.5, size=10, delta=1)
    assert (m["tp"], m["fp"], m["fn"]) == (1, 0, 1)
    assert m["f1"] == pytest.approx(2 / 3)
    # tau=0.7, delta=0: window 2 (0.6) is lost -> tp 1, fp 1, fn 1 -> f1 = 2 / (2 + 1 + 1) = 0.5
    assert window_metrics(labels, scores, tau=0.7, size=10)["f1"] == pytest.approx(2 / 4)


def test_window_metrics_default_size_is_100() -> None:
    labels = np.zeros(250, dtype=int)
    labels[150] = 1
    scores = np.zeros(250)
    scores[[160, 210]] = 1.0
    # windows 0-99, 100-199 (anomalous, flagged), 200-249 (flagged, normal): tp 1, fp 1, fn 0
    m = window_metrics(labels, scores, tau=0.5)
    assert (m["tp"], m["fp"], m["fn"]) == (1, 1, 0)


def test_roc_and_pr_auc_hand_cases() -> None:
    labels = [0, 0, 1, 1]
    scores = [0.1, 0.4, 0.35, 0.8]
    # pairs (anomaly, normal): (0.35, 0.1) ok, (0.35, 0.4) wrong, (0.8, 0.1) ok, (0.8, 0.4) ok -> 3/4
    assert roc_auc(labels, scores) == pytest.approx(0.75)
    # ranked: 0.8 (1) -> P=1, R=0.5; 0.4 (0); 0.35 (1) -> P=2/3, R=1: AP = 0.5 * 1 + 0.5 * 2/3 = 5/6
    assert pr_auc(labels, scores) == pytest.approx(5 / 6)
    # perfect ranking
    assert roc_auc([0, 1, 0, 1], [0.1, 0.9, 0.2, 0.8]) == pytest.approx(1.0)
    assert pr_auc([0, 1, 0, 1], [0.1, 0.9, 0.2, 0.8]) == pytest.approx(1.0)


def test_aucs_are_nan_with_one_class() -> None:
    assert math.isnan(roc_auc([0, 0, 0], [0.1, 0.2, 0.3]))
    assert math.isnan(pr_auc([1, 1], [0.1, 0.2]))


# --------------------------------------------------------------------------------------------------------
# F1 threshold tuning
# --------------------------------------------------------------------------------------------------------


def test_best_f1_threshold_point_hand_case() -> None:
    labels = [0, 0, 1, 1, 0, 1, 0, 0]
    scores = [0.1, 0.5, 0.9, 0.6, 0.2, 0.4, 0.3, 0.7]
    # flags are score > tau; 3 anomalies (0.9, 0.6, 0.4):
    # tau=0.7: {0.9} tp1 fp0 fn2 -> f1 = 2 / (2 + 0 + 2) = 0.5; tau=0.6: + 0.7 -> 2/5
    # tau=0.5: {0.9,0.7,0.6} tp2 fp1 fn1 -> 4/6; tau=0.4: + 0.5 -> 4/7
    # tau=0.3: + 0.4 -> tp3 fp2 fn0 -> 6/8 = 0.75 (best); tau=0.2: + 0.3 -> 6/9
    assert best_f1_threshold(labels, scores) == (0.3, 0, pytest.approx(0.75))


def test_best_f1_threshold_point_adjusted_hand_case() -> None:
    labels = [0, 1, 1, 1, 0, 0, 1, 1, 0, 0]
    scores = [0.1, 0.2, 0.8, 0.3, 0.6, 0.1, 0.2, 0.4, 0.5, 0.1]
    # segments A = rows 1-3 (max 0.8), B = rows 6-7 (max 0.4); normals 0.1, 0.6, 0.1, 0.5, 0.1
    # tau=0.6: A only -> tp3 fp0 fn2 -> 6/8 = 0.75
    # tau=0.3: A and B -> tp5, fp = {0.6, 0.5} = 2 -> 10/12 = 0.8333 (ties at 0.2 and 0.1; highest tau wins)
    tau, delta, f1 = best_f1_threshold(labels, scores, kind="point_adjusted")
    assert (tau, delta) == (0.3, 0)
    assert f1 == pytest.approx(10 / 12)
    assert point_adjusted_metrics(labels, np.asarray(scores) > tau)["f1"] == pytest.approx(f1)


@pytest.mark.parametrize("seed", range(6))
def test_best_f1_threshold_matches_brute_force(seed: int) -> None:
    # Many short segments (isolated points and pairs) and normal points scoring as high as anomalous ones,
    # with ties: every candidate threshold is tried one by one with the plain metric functions.
    rng = np.random.default_rng(seed)
    labels = (rng.random(200) < 0.08).astype(int)
    labels[np.flatnonzero(labels)[:5] + 1] = 1
    scores = np.round(rng.random(200) ** (1 + 2 * (1 - labels)), 2)
    candidates = np.concatenate(([-1.0], np.unique(scores)))
    kinds: tuple[tuple[Literal["point", "point_adjusted"], Callable[..., Metrics]], ...] = (
        ("point", point_metrics),
        ("point_adjusted", point_adjusted_metrics),
    )
    for kind, metric in kinds:
        brute = max(metric(labels, scores > t)["f1"] for t in candidates)
        tau, _, f1 = best_f1_threshold(labels, scores, kind=kind)
        assert f1 == pytest.approx(brute)
        assert metric(labels, scores > tau)["f1"] == pytest.approx(f1)
    brute = max(window_metrics(labels, scores, t, size=15, delta=d)["f1"] for t in candidates for d in (0, 2))
    tau, delta, f1 = best_f1_threshold(labels, scores, kind="window", size=15, deltas=(0, 2))
    assert f1 == pytest.approx(brute)
    assert window_metrics(labels, scores, tau, size=15, delta=delta)["f1"] == pytest.approx(f1)


def test_best_f1_threshold_recovers_known_threshold() -> None:
    # Normal points score in [0, 0.6), anomalies in [0.7, 1): any tau in [max normal, 0.7) gives F1 = 1, and
    # the highest such candidate is the largest normal score.
    rng = np.random.default_rng(0)
    labels = np.zeros(800, dtype=int)
    for start in (100, 300, 520, 700):
        labels[start : start + 12] = 1
    scores = np.where(labels == 1, 0.7 + 0.3 * rng.random(800), 0.6 * rng.random(800))
    tau, delta, f1 = best_f1_threshold(labels, scores, kind="point")
    assert f1 == 1.0
    assert delta == 0
    assert tau == scores[labels == 0].max()
    # point-adjusted: one strong point per segment is enough
    weak = np.where(labels == 1, 0.3 * rng.random(800), 0.6 * rng.random(800))
    weak[[105, 305, 525, 705]] = 0.9
    tau, _, f1 = best_f1_threshold(labels, weak, kind="point_adjusted")
    assert f1 == 1.0
    assert tau == weak[labels == 0].max()


def test_best_f1_threshold_window_finds_delta() -> None:
    # 20 windows of 10 rows; anomalous windows hold 3 spikes at 0.9, five normal windows hold 1 or 2 spikes
    # at 0.9: only "more than 2 points above tau" with tau in [max noise, 0.9) separates them perfectly.
    rng = np.random.default_rng(3)
    scores = 0.5 * rng.random(200)
    labels = np.zeros(200, dtype=int)
    for w in (2, 7, 11, 16):
        rows = w * 10 + np.array([2, 4, 6])
        scores[rows] = 0.9
        labels[rows] = 1
    for w, k in ((0, 1), (5, 2), (9, 2), (13, 1), (19, 2)):
        scores[w * 10 + np.arange(k)] = 0.9
    tau, delta, f1 = best_f1_threshold(labels, scores, kind="window", size=10, deltas=(0, 1, 2, 3))
    assert (delta, f1) == (2, 1.0)
    assert tau == scores[scores < 0.9].max()
    assert window_metrics(labels, scores, tau, size=10, delta=delta)["f1"] == 1.0
    # with delta fixed at 0 the spikes in normal windows cost precision: 4 tp, 5 fp -> f1 = 8 / 13
    assert best_f1_threshold(labels, scores, kind="window", size=10, deltas=(0,))[2] == pytest.approx(8 / 13)


def test_best_f1_threshold_is_bounded_and_vectorised(monkeypatch: pytest.MonkeyPatch) -> None:
    """What keeps the search fast on long series, counted rather than timed: at most ``max_candidates`` thresholds,
    all evaluated by one sorted count per class (and per delta), never one pass over the rows per threshold."""
    candidate_sets: list[int] = []
    counts: list[int] = []  # thresholds evaluated by each call of the counting step
    real_candidates, real_count = metrics._candidate_thresholds, metrics._count_above

    def candidates(scores: np.ndarray, max_candidates: int) -> Any:
        out = real_candidates(scores, max_candidates)
        candidate_sets.append(out.size)
        return out

    def count_above(sorted_values: np.ndarray, thresholds: np.ndarray) -> Any:
        counts.append(thresholds.size)
        return real_count(sorted_values, thresholds)

    monkeypatch.setattr(metrics, "_candidate_thresholds", candidates)
    monkeypatch.setattr(metrics, "_count_above", count_above)
    rng = np.random.default_rng(1)
    n = 300_000
    labels = (rng.random(n) < 0.02).astype(int)
    scores = np.where(labels == 1, 0.7 + 0.3 * rng.random(n), 0.6 * rng.random(n))
    kinds: tuple[Literal["point", "point_adjusted", "window"], ...] = ("point", "point_adjusted", "window")
    for kind in kinds:
        _, _, f1 = best_f1_threshold(labels, scores, kind=kind, deltas=(0, 1))
        assert f1 > 0.95  # ~300 rows between candidate quantiles
    # 300,000 distinct scores, 1,000 candidates (999 quantiles and one below the minimum) per search
    assert candidate_sets == [1000, 1000, 1000]
    # point: normal and anomalous rows; point-adjusted: normal rows (segments by one searchsorted); window: normal
    # and anomalous windows for each of the 2 deltas. Every call counts all 1,000 thresholds at once.
    assert counts == [1000] * (2 + 1 + 2 * 2)


def test_best_f1_threshold_rejects_unknown_kind() -> None:
    with pytest.raises(ValueError, match="kind"):
        best_f1_threshold([0, 1], [0.1, 0.2], kind="segment")  # type: ignore[arg-type]


# --------------------------------------------------------------------------------------------------------
# NAB scorer: hand-computed cases
# --------------------------------------------------------------------------------------------------------


def one_file_corpus(n: int = 20, windows: tuple[tuple[int, int], ...] = ((10, 14),)) -> NabCorpus:
    """A file of n rows with integer timestamps 0..n-1; probation = floor(0.15 n) rows (3 for n=20)."""
    return NabCorpus({"a.csv": NabFile("a.csv", np.arange(n), windows)})


def raw_with_detections(corpus: NabCorpus, rows: list[int], profile: str = "standard") -> float:
    n = corpus.files["a.csv"].timestamps.size
    scores = np.zeros(n)
    scores[rows] = 1.0
    return nab_score(corpus, {"a.csv": scores}, 0.5, profile)[1]


def test_nab_true_positive_weights() -> None:
    corpus = one_file_corpus()  # window rows 10-14: width 5, right edge row 14
    # first row: y = -(14 - 10 + 1) / 5 = -1 -> A_tp * S(-1) / S(-1) = 1
    assert raw_with_detections(corpus, [10]) == pytest.approx(1.0)
    # row 12: y = -(14 - 12 + 1) / 5 = -0.6 -> S(-0.6) / S(-1) = 0.905148 / 0.986614 = 0.917428
    assert raw_with_detections(corpus, [12]) == pytest.approx(S(-0.6) / S(-1.0))
    assert raw_with_detections(corpus, [12]) == pytest.approx(0.917428, abs=1e-6)
    # last row: y = -1/5 -> S(-0.2) / S(-1) = 0.462117 / 0.986614 = 0.468387
    assert raw_with_detections(corpus, [14]) == pytest.approx(0.468387, abs=1e-6)
    # later detections in the same window add nothing: rows 12, 13, 14 score as row 12 alone
    assert raw_with_detections(corpus, [12, 13, 14]) == pytest.approx(raw_with_detections(corpus, [12]))


def test_nab_false_positive_and_missed_window_weights() -> None:
    corpus = one_file_corpus()
    # nothing flagged: the window is missed, -A_fn = -1
    assert raw_with_detections(corpus, []) == pytest.approx(-1.0)
    # row 5, before any window: -A_fp = -0.11, plus the missed window
    assert raw_with_detections(corpus, [5]) == pytest.approx(-1.11)
    # row 17, after the window: y = |14 - 17| / (5 - 1) = 0.75 -> 0.11 * S(0.75) = 0.11 * -0.954045
    assert raw_with_detections(corpus, [17]) == pytest.approx(-1.0 + 0.11 * S(0.75))
    assert raw_with_detections(corpus, [17]) == pytest.approx(-1.104945, abs=1e-6)
    # far after the window: row 30 of 40, y = 16/4 = 4 > 3 -> weight -1 -> -0.11
    long = one_file_corpus(n=40)  # probation floor(6.0) = 6
    assert raw_with_detections(long, [30]) == pytest.approx(-1.11)
    # reward_low_FN_rate: a missed window costs 2
    assert raw_with_detections(corpus, [17], "reward_low_FN_rate") == pytest.approx(-2.0 + 0.11 * S(0.75))
    # reward_low_FP_rate: false positives weigh 0.22
    assert raw_with_detections(corpus, [5], "reward_low_FP_rate") == pytest.approx(-1.22)


def test_nab_probationary_rows_are_not_scored() -> None:
    corpus = one_file_corpus()  # probation = floor(0.15 * 20) = 3 rows: 0, 1, 2
    assert raw_with_detections(corpus, [0, 1, 2]) == pytest.approx(-1.0)
    assert raw_with_detections(corpus, [3]) == pytest.approx(-1.11)
    # the cap: min(floor(0.15 * 6000), 750) = 750 rows
    big = NabCorpus({"a.csv": NabFile("a.csv", np.arange(6000), ((5000, 5100),))})
    scores = np.zeros(6000)
    scores[749] = 1.0
    assert nab_score(big, {"a.csv": scores}, 0.5)[1] == pytest.approx(-1.0)
    scores[750] = 1.0
    assert nab_score(big, {"a.csv": scores}, 0.5)[1] == pytest.approx(-1.11)


def test_nab_window_in_probation_is_not_scored() -> None:
    # window rows 1-2 lies inside the 3-row probation: neither missed nor detectable; row 5 is a false
    # positive measured from that window: y = |2 - 5| / (2 - 1) = 3 -> 0.11 * S(3)
    corpus = one_file_corpus(windows=((1, 2), (10, 14)))
    assert raw_with_detections(corpus, [5]) == pytest.approx(-1.0 + 0.11 * S(3.0))
    # null = -1 (one scored window); perfect = 2 windows * A_tp = 2 (NAB counts every labelled window)
    normalised, raw, _ = nab_score(corpus, {"a.csv": np.zeros(20)}, 0.5)
    assert (normalised, raw) == (0.0, -1.0)


def test_nab_threshold_is_inclusive_and_nan_never_detects() -> None:
    corpus = one_file_corpus()
    scores = np.zeros(20)
    scores[10] = 0.5
    assert nab_score(corpus, {"a.csv": scores}, 0.5)[1] == pytest.approx(1.0)  # 0.5 >= 0.5
    assert nab_score(corpus, {"a.csv": scores}, 0.5000001)[1] == pytest.approx(-1.0)
    scores[10] = math.nan
    # threshold 0 flags every scored row but row 10: rows 3-9 are false positives before any window
    # (7 * -0.11); the window's first detection is row 11, y = -(14 - 11 + 1) / 5 = -0.8; rows 15-19 are
    # false positives at y = (i - 14) / 4
    expected = -0.77 + S(-0.8) / S(-1.0) + sum(0.11 * S((i - 14) / 4) for i in range(15, 20))
    assert nab_score(corpus, {"a.csv": scores}, 0.0)[1] == pytest.approx(expected)


def test_nab_normalisation_and_details() -> None:
    corpus = NabCorpus({
        "a.csv": NabFile("a.csv", np.arange(20), ((10, 14),)),
        "b.csv": NabFile("b.csv", np.arange(40), ((20, 29),)),
    })
    a = np.zeros(20)
    a[[12, 17]] = 1.0
    b = np.zeros(40)
    # file a: 0.917428 - 0.104945; file b: missed -> -1; raw = -0.187517
    # null = -2, perfect = 2 -> normalised = 100 * (raw + 2) / 4
    normalised, raw, per_file = nab_score(corpus, {"a.csv": a, "b.csv": b, "extra.csv": [1.0]}, 0.5)
    expected_a = S(-0.6) / S(-1.0) + 0.11 * S(0.75)
    assert raw == pytest.approx(expected_a - 1.0)
    assert normalised == pytest.approx(100 * (expected_a - 1.0 + 2.0) / 4.0)
    assert per_file["a.csv"].score == pytest.approx(expected_a)
    # file a after probation (rows 3-19): inside rows 10-14 -> tp 1 (row 12), fn 4;
    # 12 rows outside -> fp 1 (row 17), tn 11
    assert per_file["a.csv"] == NabFileResult(
        score=per_file["a.csv"].score, tp=1, fp=1, tn=11, fn=4, detected_windows=1, missed_windows=0
    )
    assert (per_file["b.csv"].detected_windows, per_file["b.csv"].missed_windows) == (0, 1)
    # perfect detector: first row of each window -> 100
    a2, b2 = np.zeros(20), np.zeros(40)
    a2[10], b2[20] = 1.0, 1.0
    assert nab_score(corpus, {"a.csv": a2, "b.csv": b2}, 0.5)[0] == pytest.approx(100.0)


def test_nab_repeated_timestamps_follow_row_order() -> None:
    # A repeated timestamp (as at a DST change): rows 11 and 12 are both stamped 11. The window [9, 11] is
    # entered at row 9 and left at the FIRST row stamped 11 (row 11): width 3, right edge row 11. Row 12 is
    # then a false positive one row after the window: y = |11 - 12| / (3 - 1) = 0.5.
    ts = np.array([*range(12), 11, *range(12, 19)])
    assert ts.size == 20
    corpus = NabCorpus({"a.csv": NabFile("a.csv", ts, ((9, 11),))})
    scores = np.zeros(20)
    scores[12] = 1.0
    assert nab_score(corpus, {"a.csv": scores}, 0.5)[1] == pytest.approx(-1.0 + 0.11 * S(0.5))
    scores[11] = 1.0  # y = -(11 - 11 + 1) / 3
    assert nab_score(corpus, {"a.csv": scores}, 0.5)[1] == pytest.approx(S(-1 / 3) / S(-1) + 0.11 * S(0.5))


def test_nab_rejects_bad_windows_and_scores() -> None:
    with pytest.raises(ValueError, match="not a timestamp"):
        one_file_corpus(windows=((10, 99),))
    with pytest.raises(ValueError, match="not a timestamp"):
        one_file_corpus(windows=((50, 60),))
    corpus = one_file_corpus()
    with pytest.raises(ValueError, match="no scores"):
        nab_score(corpus, {"b.csv": np.zeros(20)}, 0.5)
    with pytest.raises(ValueError, match="one score per row"):
        nab_score(corpus, {"a.csv": np.zeros(19)}, 0.5)
    with pytest.raises(ValueError, match="profile"):
        nab_score(corpus, {"a.csv": np.zeros(20)}, 0.5, "lenient")


def reference_nab_raw(ts: list[int], scores: list[float], windows: list[tuple[int, int]], threshold: float,
                      profile: NabProfile) -> float:
    """NAB v1.1's sweep, row by row, written from its published rules (the oracle for the vectorised code)."""
    n = len(ts)
    probation = min(math.floor(0.15 * n), 0.15 * 5000)
    pending = list(windows)
    current = None  # (name, right, width, end)
    previous = None  # (right, width)
    by_window: dict[int, float] = {}
    false_positives = 0.0
    for i, (t, s) in enumerate(zip(ts, scores, strict=True)):
        if pending and t == pending[0][0]:
            start, end = pending.pop(0)
            right = ts.index(end)
            current = (start, right, right - ts.index(start) + 1, end)
        if i >= probation:
            if current is not None:
                name, right, width, _ = current
                by_window.setdefault(name, -profile.fn_weight)
                if s >= threshold:
                    tp = S(-(right - i + 1) / width) * profile.tp_weight / S(-1.0)
                    by_window[name] = max(by_window[name], tp)
            elif s >= threshold:
                if previous is None:
                    false_positives -= profile.fp_weight
                else:
                    false_positives += S(abs(previous[0] - i) / (previous[1] - 1)) * profile.fp_weight
        if current is not None and t == current[3]:
            previous = (current[1], current[2])
            current = None
    return sum(by_window.values()) + false_positives


def random_corpus(seed: int) -> tuple[NabCorpus, dict[str, np.ndarray]]:
    rng = np.random.default_rng(seed)
    files: dict[str, NabFile] = {}
    scores: dict[str, np.ndarray] = {}
    for k in range(4):
        n = int(rng.integers(60, 400))
        ts = np.arange(n)
        for i in rng.choice(np.arange(2, n, 3), size=4, replace=False):
            ts[i] = ts[i - 1]  # isolated repeated timestamps
        n_windows = int(rng.integers(0, 4))
        cuts = np.sort(rng.choice(np.arange(int(0.1 * n), n - 1), size=2 * n_windows, replace=False))
        windows = tuple(
            (int(ts[a]), int(ts[b])) for a, b in zip(cuts[::2], cuts[1::2], strict=True) if ts[b] - ts[a] >= 2
        )
        name = f"cat/f{k}.csv"
        files[name] = NabFile(name, ts, windows)
        scores[name] = np.round(rng.random(n) ** 3, 2)  # many ties, mostly low
    return NabCorpus(files), scores


@pytest.mark.parametrize("seed", range(5))
def test_nab_score_matches_row_by_row_reference(seed: int) -> None:
    corpus, scores = random_corpus(seed)
    for profile_name, profile in NAB_PROFILES.items():
        for threshold in (0.0, 0.3, 0.5, 0.81, 0.99, 1.0):
            expected = sum(
                reference_nab_raw(f.timestamps.tolist(), scores[name].tolist(), list(f.windows), threshold,
                                  profile)
                for name, f in corpus.files.items()
            )
            assert nab_score(corpus, scores, threshold, profile_name)[1] == pytest.approx(expected, abs=1e-9)


@pytest.mark.parametrize("seed", range(5))
def test_best_nab_threshold_matches_exhaustive_search(seed: int) -> None:
    corpus, scores = random_corpus(seed)
    candidates = [*np.unique(np.concatenate(list(scores.values()))).tolist(), math.inf]
    for profile in PROFILES:
        raws = np.array([nab_score(corpus, scores, t, profile)[1] for t in candidates])
        threshold, normalised, raw = best_nab_threshold(corpus, scores, profile)
        assert raw == pytest.approx(raws.max(), abs=1e-9)
        # among equally good thresholds the highest is returned (fewest alerts), as NAB's optimiser does
        assert threshold == max(t for t, r in zip(candidates, raws, strict=True) if r >= raws.max() - 1e-9)
        assert nab_score(corpus, scores, threshold, profile)[:2] == (normalised, raw)


def test_best_nab_threshold_recovers_known_threshold() -> None:
    # Two files; each window's first row scores 0.8 and its other rows 0.7, noise stays below 0.6 except
    # for one spike at 0.9 far after each window. Flagging at 0.8 catches every window on its first row;
    # 0.9 misses the windows; 0.7 scores the same as 0.8 (later detections in a window add nothing), and
    # the tie goes to the higher threshold; lower thresholds only add false positives.
    rng = np.random.default_rng(5)
    files, scores = {}, {}
    for name, n, window in (("x/a.csv", 500, (200, 240)), ("x/b.csv", 800, (500, 560))):
        files[name] = NabFile(name, np.arange(n), (window,))
        s = 0.6 * rng.random(n)
        s[window[0]] = 0.8
        s[window[0] + 1 : window[1] + 1] = 0.7
        s[n - 10] = 0.9
        scores[name] = s
    corpus = NabCorpus(files)
    threshold, normalised, _ = best_nab_threshold(corpus, scores, "standard")
    assert threshold == 0.8
    # the spikes at 0.9 are still flagged at 0.8: each costs 0.11 * S(y) with y > 3 -> -0.11 (far away)
    # raw = 2 - 2 * 0.11 = 1.78; null = -2, perfect = 2 -> normalised = 100 * 3.78 / 4 = 94.5
    assert normalised == pytest.approx(94.5)


# --------------------------------------------------------------------------------------------------------
# NAB loaders
# --------------------------------------------------------------------------------------------------------


def write_mini_nab(root: Path, windows: list[list[str]]) -> None:
    (root / "data" / "cat").mkdir(parents=True)
    (root / "labels").mkdir()
    rows = [f"2020-01-01 00:{m:02d}:00,{m * 1.5}" for m in range(40)]
    (root / "data" / "cat" / "s.csv").write_text("timestamp,value\n" + "\n".join(rows) + "\n")
    (root / "labels" / "combined_windows.json").write_text(json.dumps({"cat/s.csv": windows}))


def test_load_nab_corpus_and_published_scores(tmp_path: Path) -> None:
    write_mini_nab(tmp_path, [["2020-01-01 00:20:00.000000", "2020-01-01 00:24:00.000000"]])
    corpus = load_nab_corpus(tmp_path)
    f = corpus.files["cat/s.csv"]
    assert f.timestamps.size == 40
    assert f.values is not None and f.values[2] == 3.0
    assert corpus.n_windows == 1
    lines = ["file,timestamp,anomaly_score"]
    lines += [f"cat/s.csv,2020-01-01 00:{m:02d}:00,{1.0 if m == 20 else 0.0}" for m in range(40)]
    path = tmp_path / "published_x_scores.csv.gz"
    path.write_bytes(gzip.compress(("\n".join(lines) + "\n").encode()))
    scores = load_published_scores(path, corpus)
    assert nab_score(corpus, scores, 0.5)[0] == pytest.approx(100.0)
    # a score file whose timestamps are not the data file's is rejected
    lines[5] = "cat/s.csv,2021-01-01 00:00:00,0.0"
    path.write_bytes(gzip.compress(("\n".join(lines) + "\n").encode()))
    with pytest.raises(ValueError, match="timestamps"):
        load_published_scores(path, corpus)


def test_load_nab_corpus_rejects_unknown_window_bound(tmp_path: Path) -> None:
    write_mini_nab(tmp_path, [["2020-01-01 00:20:30.000000", "2020-01-01 00:24:00.000000"]])
    with pytest.raises(ValueError, match="not a timestamp"):
        load_nab_corpus(tmp_path)


def test_load_nab_corpus_missing_root(tmp_path: Path) -> None:
    with pytest.raises(FileNotFoundError, match="data"):
        load_nab_corpus(tmp_path)


# --------------------------------------------------------------------------------------------------------
# NAB conformance on the published detector outputs (real data)
# --------------------------------------------------------------------------------------------------------


def require_nab() -> Path:
    if not (NAB / "data").is_dir() or not (NAB / "results").is_dir():
        pytest.fail(f"NAB benchmark data not found at {NAB}; {WHERE} (see shared/data/README.md)")
    return NAB


@pytest.fixture(scope="module")
def nab_corpus() -> NabCorpus:
    return load_nab_corpus(require_nab())


@pytest.fixture(scope="module")
def published(nab_corpus: NabCorpus) -> dict[str, dict[str, np.ndarray]]:
    root = require_nab()
    return {
        d: load_published_scores(root / "results" / f"published_{d}_scores.csv.gz", nab_corpus)
        for d in DETECTORS
    }


def test_nab_profiles_file_matches_builtin_profiles() -> None:
    assert load_nab_profiles(require_nab() / "config" / "profiles.json") == dict(NAB_PROFILES)


def test_nab_corpus_shape(nab_corpus: NabCorpus) -> None:
    assert len(nab_corpus.files) == 58
    assert nab_corpus.n_windows == 116
    assert sum(f.timestamps.size for f in nab_corpus.files.values()) == 365_558


@pytest.mark.parametrize("profile", PROFILES)
@pytest.mark.parametrize("detector", DETECTORS)
def test_nab_conformance(
    nab_corpus: NabCorpus, published: dict[str, dict[str, np.ndarray]], detector: str, profile: str
) -> None:
    root = require_nab()
    thresholds = json.loads((root / "config" / "thresholds.json").read_text())
    final = json.loads((root / "results" / "final_results.json").read_text())
    threshold = thresholds[detector][profile]["threshold"]
    normalised, _, per_file = nab_score(nab_corpus, published[detector], threshold, profile)
    assert normalised == pytest.approx(final[detector][profile], abs=0.1)
    assert len(per_file) == 58


def test_nab_score_reuses_the_corpus_layout(nab_corpus: NabCorpus, published: dict[str, dict[str, np.ndarray]],
                                            monkeypatch: pytest.MonkeyPatch) -> None:
    """What makes scoring a corpus fast, counted rather than timed: NAB's sweep over each file's rows and windows
    (the Python part) runs once, when the corpus is built; scoring at a threshold, or sweeping every threshold,
    is array arithmetic over that layout and never sweeps a file again."""
    sweeps: list[str] = []
    real_file_layout = nab._file_layout

    def file_layout(f: NabFile, probation_fraction: float) -> Any:
        sweeps.append(f.name)
        return real_file_layout(f, probation_fraction)

    monkeypatch.setattr(nab, "_file_layout", file_layout)
    for profile in PROFILES:
        nab_score(nab_corpus, published["numenta"], 0.5, profile)
        best_nab_threshold(nab_corpus, published["numenta"], profile)
    assert sweeps == []
    rebuilt = NabCorpus(nab_corpus.files)  # the layout is built here: one sweep per file
    assert sweeps == list(nab_corpus.files)
    assert nab_score(rebuilt, published["numenta"], 0.5) == nab_score(nab_corpus, published["numenta"], 0.5)
    assert len(sweeps) == 58


def test_best_nab_threshold_on_published_scores(
    nab_corpus: NabCorpus, published: dict[str, dict[str, np.ndarray]]
) -> None:
    # The sweep is exact, so it can only match or beat the published thresholds' scores.
    final = json.loads((require_nab() / "results" / "final_results.json").read_text())
    for profile in PROFILES:
        threshold, normalised, _ = best_nab_threshold(nab_corpus, published["numenta"], profile)
        assert 0.0 <= threshold <= 1.0
        assert normalised >= final["numenta"][profile] - 1e-9


def test_alert_events_follow_the_alert_policy() -> None:
    f = np.array([0, 1, 1, 0, 0, 0, 1, 0, 0, 0, 0, 0], bool)
    assert alert_events(f, 1, 4) == [(1, 6)]  # a gap shorter than the recovery is the same event
    assert alert_events(f, 1, 2) == [(1, 2), (6, 6)]
    assert alert_events(f, 2, 2) == [(2, 2)]  # opens on the second flagged row in a row
    assert alert_events(f, 3, 2) == []
    # rows that are not scored (missing-data windows) neither raise nor clear
    scored = np.array([1, 1, 0, 1, 1, 1, 1, 1, 1, 1, 1, 1], bool)
    assert alert_events(np.array([0, 1, 0, 1, 0, 0, 0, 0, 0, 0, 0, 0], bool), 2, 2, scored) == [(3, 3)]
    assert alert_events(np.ones(5, bool), 1, 32) == [(0, 4)]  # still open at the end
    with pytest.raises(ValueError):
        alert_events(f, 0, 1)
