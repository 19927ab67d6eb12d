"""The pure model: hand-computed cases, reproducibility, threshold policies, and a quality floor."""

from __future__ import annotations

import numpy as np
import pytest

from anomalyd.model import (
    TooLittleDataError,
    WindowReconstructor,
    overlap_add,
    sliding_windows,
    taper,
    threshold_from_errors,
)
from anomalyd.synthetic import ANOMALY_KINDS, ecg, inject


def test_taper_is_sin_squared_and_halves_overlap_to_about_one() -> None:
    t = taper(32)
    assert t[0] == 0.0 and t[-1] == pytest.approx(0.0, abs=1e-12)
    assert t.max() <= 1.0
    # Two windows overlapping by half sum to ~1 in the overlap: that is what lets reconstructions stitch.
    s = t[16:] + t[:16]
    assert np.all(np.abs(s - 1.0) < 0.06)  # linspace(0, pi, 32) includes both ends: ~5% ripple


def test_sliding_windows_counts_and_values() -> None:
    w = sliding_windows(np.arange(10.0), 4, 3)
    assert w.tolist() == [[0, 1, 2, 3], [3, 4, 5, 6], [6, 7, 8, 9]]
    assert sliding_windows(np.arange(3.0), 4, 1).shape == (0, 4)


def test_overlap_add_of_tapered_windows_rebuilds_the_signal() -> None:
    x = np.sin(np.linspace(0, 20, 32 + 16 * 20))
    w = sliding_windows(x, 32, 16) * taper(32)
    y = overlap_add(w, 16)
    assert np.allclose(y[16:-16], x[16:-16], atol=0.06 * np.abs(x).max())


def test_threshold_policies() -> None:
    e = np.array([1.0, 2.0, 3.0, 10.0])
    assert threshold_from_errors(e, "max", 1.2, 0.5, 3) == pytest.approx(12.0)
    assert threshold_from_errors(e, "quantile", 1.0, 0.5, 3) == pytest.approx(2.5)
    assert threshold_from_errors(e, "sigma", 1.0, 0.5, 1.0) == pytest.approx(e.mean() + e.std())
    with pytest.raises(ValueError, match="policy 'median'"):
        threshold_from_errors(e, "median", 1.0, 0.5, 1.0)


def test_exact_reconstruction_of_a_repeated_shape_has_zero_error() -> None:
    # A period-16 signal has exactly 8 distinct windows at slide 2: with 8 clusters they are reproduced exactly.
    x = np.tile(np.arange(16.0), 40)
    m = WindowReconstructor(window=16, train_slide=2, n_clusters=8, holdout=0.2).fit(x)
    assert m.window_errors(sliding_windows(x, 16, 2)).max() == pytest.approx(0.0, abs=1e-9)
    bumped = x.copy()
    bumped[100] += 5.0
    errs = m.window_errors(sliding_windows(bumped, 16, 2))
    assert errs.max() > 2.0  # the bump is seen, scaled by the taper at its position


def test_fit_is_reproducible_with_random_state() -> None:
    x, _ = ecg(6000, seed=2)
    a = WindowReconstructor(n_clusters=60, random_state=7).fit(x)
    b = WindowReconstructor(n_clusters=60, random_state=7).fit(x)
    assert np.array_equal(a.cluster_centers_, b.cluster_centers_)
    assert a.threshold_ == b.threshold_


def test_too_little_data_and_bad_values_are_clear_errors() -> None:
    with pytest.raises(TooLittleDataError, match="window=32 needs at least 64 samples in a gap-free stretch, got 40"):
        WindowReconstructor().fit(np.zeros(40))
    with pytest.raises(TooLittleDataError, match="n_clusters=150 needs at least 150 training windows"):
        WindowReconstructor().fit(np.random.default_rng(0).normal(size=300))
    x = np.ones(500)
    x[3] = np.nan
    with pytest.raises(ValueError, match="1 NaN or infinite"):
        WindowReconstructor(n_clusters=5).fit(x)
    with pytest.raises(ValueError, match="threshold_policy='mean'"):
        WindowReconstructor(threshold_policy="mean").fit(np.zeros(1000))


def test_segments_never_straddle_and_short_ones_are_dropped() -> None:
    x, _ = ecg(3000, seed=4)
    m = WindowReconstructor(n_clusters=40).fit([x[:1500], x[1500:], x[:20]])
    single = WindowReconstructor(n_clusters=40).fit(x)
    assert m.n_train_windows_ < single.n_train_windows_ + 1  # no window across the cut


def test_normalised_score_is_monotone_in_0_1() -> None:
    x, _ = ecg(6000, seed=5)
    m = WindowReconstructor(n_clusters=60).fit(x)
    s = m.normalised_score(np.array([0.0, m.threshold_ / 2, m.threshold_, 1e9]))
    assert np.all(np.diff(s) >= 0) and s[0] == 0.0 and s[-1] == 1.0


def test_scoring_before_fit_is_refused() -> None:
    from sklearn.exceptions import NotFittedError

    with pytest.raises(NotFittedError):
        WindowReconstructor().window_errors(np.zeros((1, 32)))


@pytest.mark.parametrize("seed", [1, 2, 3])
def test_generalisation_every_injected_kind_flagged_and_no_false_alarm(seed: int) -> None:
    """Train on 4 h of the synthetic ECG, score a later stretch with one anomaly of each kind.

    Sizes (see anomalyd.synthetic.inject): dropout = 6 samples at 0 right after an R peak of ~100; spike = +70
    on one sample; beat shape = 2.5x wider QRS with inverted T wave; noise burst = 40 samples of sigma 15.
    """
    x, beats = ecg(24_000, seed=seed)
    m = WindowReconstructor().fit(x[:14_400])
    y, injected = inject(x, beats, ANOMALY_KINDS, 16_000, seed=seed)
    for offset in (0, 5, 11):  # the window grid's phase must not matter
        w = sliding_windows(y[14_400 + offset :], 32, 16)
        errors = m.window_errors(w)
        starts = 14_400 + offset + 16 * np.arange(len(w))
        covered = np.zeros(len(w), bool)
        for a in injected:
            hit = (starts < a.end) & (starts + 32 > a.start)
            covered |= hit
            assert (errors[hit] > m.threshold_).any(), f"{a.kind} at {a.start} not flagged (offset {offset})"
        assert not (errors[~covered] > m.threshold_).any(), f"false alarm on the normal stretch (offset {offset})"
