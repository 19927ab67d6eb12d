"""HitRate@P% (OmniAnomaly's interpretation score) on hand-made inputs, and on a slice of one SMD machine."""

from __future__ import annotations

import math
from pathlib import Path

import numpy as np
import pytest

from anomalyd.core.attribution import (
    Segment,
    field_shares,
    hit_rate,
    load_interpretation,
    parse_interpretation,
    rank_fields,
    row_hit_rates,
    segment_hit_rates,
    shift_segments,
    summarise,
    trailing_zscore,
)


def test_hit_rate_counts_labelled_fields_in_the_top_floor_p_times_gt() -> None:
    scores = [0.05, 0.4, 0.1, 0.3, 0.15]  # ranking: 1, 3, 4, 2, 0
    assert hit_rate(scores, [1, 3]) == 1.0
    assert hit_rate(scores, [1, 2]) == 0.5  # top 2 = {1, 3}
    assert hit_rate(scores, [1, 2], p=150) == 0.5  # top 3 = {1, 3, 4}
    assert hit_rate(scores, [0, 2, 4]) == 1 / 3  # top 3 = {1, 3, 4}
    assert hit_rate(scores, [0, 2, 4], p=150) == 2 / 3  # top floor(4.5) = 4 = {1, 3, 4, 2}
    assert hit_rate(scores, [0], p=150) == 0.0  # floor(1.5) = 1: @150% is @100% for one labelled field
    assert hit_rate(scores, [0, 1, 2, 3, 4], p=150) == 1.0  # the top is capped by the number of fields


def test_hit_rate_ranks_nan_last_and_keeps_index_order_on_ties() -> None:
    assert rank_fields([np.nan, 1.0, 1.0, -np.inf]).tolist() == [1, 2, 3, 0]
    assert hit_rate([np.nan, 0.0, 0.0], [0]) == 0.0
    assert hit_rate([0.5, 0.5, 0.1], [1]) == 0.0  # the tie goes to field 0
    with pytest.raises(ValueError, match="no labelled fields"):
        hit_rate([1.0, 2.0], [])


def test_parse_interpretation_reads_smd_lines_rows_half_open_metrics_one_based() -> None:
    segs = parse_interpretation("15849-16368:1,9,10,12,13,14,15\n246-252:38\n")
    assert segs == [Segment(15849, 16368, (0, 8, 9, 11, 12, 13, 14)), Segment(246, 252, (37,))]
    for bad, msg in (("3-3:1", "empty row range"), ("3-5:0", "outside"), ("3-5", "expected")):
        with pytest.raises(ValueError, match=msg):
            parse_interpretation(bad, n_fields=38)


def test_field_shares_sum_to_one_per_row() -> None:
    e = np.array([[1.0, 1.0, 2.0], [np.nan, 0.0, 3.0], [0.0, 0.0, 0.0]])
    s = field_shares(e)
    assert s[0].tolist() == [0.25, 0.25, 0.5]
    assert np.nansum(s[1]) == 1.0 and math.isnan(s[1, 0])
    assert np.isnan(s[2]).all()


def test_segment_hit_rates_rows_mean_peak_and_selected_rows() -> None:
    # three fields, rows 2..5 are a segment labelled with fields 0 and 2
    sc = np.array([
        [0.9, 0.05, 0.05],
        [0.9, 0.05, 0.05],
        [0.5, 0.4, 0.1],   # top 2 = {0, 1}: 0.5
        [0.1, 0.2, 0.7],   # top 2 = {2, 1}: 0.5
        [0.45, 0.1, 0.45],  # top 2 = {0, 2}: 1.0
        [np.nan] * 3,      # no attribution: left out
        [0.0, 1.0, 0.0],
    ])
    seg = [Segment(2, 6, (0, 2))]
    assert segment_hit_rates(sc, seg, 100, "rows")[0] == pytest.approx(2 / 3)
    # mean shares over rows 2-4: 0.35, 0.233, 0.417 -> top 2 = {2, 0}
    assert segment_hit_rates(sc, seg, 100, "mean")[0] == 1.0
    assert segment_hit_rates(sc, seg, 100, "peak", row_score=[0, 0, 1, 5, 2, 9, 0])[0] == 0.5
    assert segment_hit_rates(sc, seg, 100, "rows", rows=[0, 0, 0, 0, 1, 0, 0])[0] == 1.0
    assert math.isnan(segment_hit_rates(sc, seg, 100, "rows", rows=np.zeros(7))[0])
    assert math.isnan(segment_hit_rates(sc, [Segment(5, 6, (0,))], 100)[0])
    seg_i, row_i, hit = row_hit_rates(sc, seg, 100)
    assert row_i.tolist() == [2, 3, 4] and hit.tolist() == [0.5, 0.5, 1.0] and seg_i.tolist() == [0, 0, 0]
    with pytest.raises(ValueError, match="outside"):
        segment_hit_rates(sc, [Segment(5, 9, (0,))], 100)
    with pytest.raises(ValueError, match="peak"):
        segment_hit_rates(sc, seg, 100, "peak")


def test_summarise_averages_over_segments_and_over_points() -> None:
    sc = np.array([[1.0, 0.0], [1.0, 0.0], [1.0, 0.0], [0.0, 1.0]])
    r = summarise(sc, [Segment(0, 3, (0,)), Segment(3, 4, (0,))], ps=(100, 150))
    assert r["hit@100"] == 0.5  # segment 1: 1.0, segment 2: 0.0
    assert r["points@100"] == 0.75  # 3 of 4 rows
    assert r["segments"] == 2.0
    assert r["hit@150"] == 0.5


def test_shift_segments_and_trailing_zscore() -> None:
    assert shift_segments([Segment(1, 3, (0,)), Segment(9, 10, (1,))], 2, n_rows=10) == [Segment(3, 5, (0,))]
    hist = np.tile([[1.0, 5.0]], (10, 1))
    hist[::2, 0] = 3.0  # field 0: mean 2, std 1; field 1: constant 5
    z = trailing_zscore(hist, [[4.0, 5.0], [2.0, 6.0]], length=10)
    assert z[0].tolist() == [2.0, 0.0]  # (4 - 2) / 1 and no excess
    assert z[1, 1] > 3.0  # a jump of a constant field, against the floored spread (0.05 * 5)




def test_smd_slice_attribution_beats_a_random_ranking(shared_data: Path) -> None:
    """Machine 2-7, the first 4,000 training and test rows (three labelled segments): the detector's field shares
    of the windows centred on each segment put the labelled metrics far above a random ranking's expectation."""
    from anomalyd.core.detector import DetectorSpec
    from anomalyd.evaluation.datasets import load_smd_machine
    from anomalyd.evaluation.series import smd_run

    root = shared_data / "smd"
    train, test, _ = load_smd_machine(root, "2-7")
    n = 4000
    segs = [g for g in load_interpretation(root / "interpretation_label" / "machine-2-7.txt", 38) if g.end + 16 <= n]
    assert len(segs) == 3
    det, b = smd_run(train[:n], test[:n], DetectorSpec(n_init=1))
    shares = field_shares(b.field_weight)  # what the daemon writes (`explain`), here without the range rule
    ok = np.isfinite(shares).any(axis=1)
    assert np.allclose(np.nansum(shares[ok], axis=1), 1.0)
    centred = summarise(shares, shift_segments(segs, det.window_ // 2, n))
    random = np.mean([math.floor(1.5 * len(g.fields)) / 38 for g in segs])
    assert centred["segments"] == 3
    assert centred["hit@150"] >= 0.5 > 2 * random, (centred, random)
