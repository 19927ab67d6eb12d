"""The shape catalog (anomalyd.core.model): taper, windowing, K-Means catalog matching, threshold policies.

Expected values are computed by hand (or from the definition, independently of the code), never measured.
"""

from __future__ import annotations

import math

import numpy as np
import pytest
from sklearn.exceptions import NotFittedError

from anomalyd.core.model import ShapeCatalog, TooLittleDataError, sliding_windows, taper, threshold_from_errors
from anomalyd.demo.synthetic import ecg

# -- taper and windows -----------------------------------------------------------------------------


def test_taper_is_sin_squared_over_the_window() -> None:
    assert taper(5).tolist() == pytest.approx([0.0, 0.5, 1.0, 0.5, 0.0], abs=1e-15)
    t = taper(32)
    assert t.shape == (32,)
    assert t[0] == 0.0 and t[-1] == pytest.approx(0.0, abs=1e-15)
    assert np.allclose(t, t[::-1])  # symmetric
    assert t.max() <= 1.0 and (t >= 0).all()
    i = 7
    assert t[i] == pytest.approx(math.sin(math.pi * i / 31) ** 2)


def test_sliding_windows_of_one_field() -> None:
    w = sliding_windows(np.arange(10.0), 4, 3)
    assert w.shape == (3, 4, 1)  # one field
    assert w[:, :, 0].tolist() == [[0, 1, 2, 3], [3, 4, 5, 6], [6, 7, 8, 9]]
    assert sliding_windows(np.arange(10.0), 4).shape == (7, 4, 1)  # slide 1: n - w + 1 windows
    assert sliding_windows(np.arange(3.0), 4, 1).shape == (0, 4, 1)  # shorter than a window


def test_sliding_windows_of_several_fields_keep_rows_and_fields_apart() -> None:
    x = np.arange(24.0).reshape(8, 3)  # x[r, f] = 3 r + f
    w = sliding_windows(x, 5, 2)
    assert w.shape == (2, 5, 3)
    for i in range(2):
        for r in range(5):
            for f in range(3):
                assert w[i, r, f] == 3 * (2 * i + r) + f
    assert np.shares_memory(w, x)  # a view, no copy of a long series
    assert sliding_windows(x[:4], 5).shape == (0, 5, 3)
    many = sliding_windows(np.stack([x, x + 100]), 5, 2)  # several series of the same length (the detector's tick)
    assert many.shape == (2, 2, 5, 3) and np.array_equal(many[1], w + 100)
    with pytest.raises(ValueError, match=r"shape \(\)"):
        sliding_windows(np.float64(1.0), 2)


# -- threshold policies ----------------------------------------------------------------------------


def test_threshold_policies_by_hand() -> None:
    e = np.array([1.0, 2.0, 3.0, 10.0])
    assert threshold_from_errors(e, "max", 1.2, 0.5, 3.0) == pytest.approx(12.0)
    # linear interpolation between 2 and 3 at the median, then the margin
    assert threshold_from_errors(e, "quantile", 1.0, 0.5, 3.0) == pytest.approx(2.5)
    assert threshold_from_errors(e, "quantile", 2.0, 1.0, 3.0) == pytest.approx(20.0)
    # mean 4, population std sqrt(((-3)^2 + (-2)^2 + (-1)^2 + 6^2) / 4) = sqrt(12.5); the margin is not used
    assert threshold_from_errors(e, "sigma", 5.0, 0.5, 2.0) == pytest.approx(4.0 + 2.0 * math.sqrt(12.5))
    assert math.isnan(threshold_from_errors(np.empty(0), "max", 1.0, 0.5, 3.0))
    with pytest.raises(ValueError, match="policy 'median' is not one of max, quantile, sigma"):
        threshold_from_errors(e, "median", 1.0, 0.5, 1.0)


# -- the catalog -------------------------------------------------------------------------------------


def _sawtooth_windows() -> np.ndarray:
    """A period-16 sawtooth: at slide 1 exactly 16 distinct windows of 16 samples."""
    return sliding_windows(np.tile(np.arange(16.0), 30), 16, 1)


def _min_distance(windows: np.ndarray) -> float:
    flat = (windows * taper(windows.shape[1])[None, :, None]).reshape(len(windows), -1)
    d = np.sqrt(((flat[:, None, :] - flat[None, :, :]) ** 2).sum(axis=2))
    return float(d[~np.eye(len(flat), dtype=bool)].min())


def test_catalog_reproduces_the_training_shapes_of_a_periodic_signal() -> None:
    wins = _sawtooth_windows()
    cat = ShapeCatalog(n_clusters=16, random_state=0, n_init=3).fit(wins)
    assert cat.cluster_centers_.shape == (16, 16)
    assert cat.n_train_windows_ == len(wins)
    near, mean_abs, max_abs, signed = cat.match(wins)
    assert near.shape == (len(wins),) and mean_abs.shape == max_abs.shape == signed.shape == (len(wins), 1)
    assert max_abs.max() == pytest.approx(0.0, abs=1e-9)  # each distinct window is its own centroid
    assert mean_abs.max() == pytest.approx(0.0, abs=1e-9)
    assert np.abs(signed).max() == pytest.approx(0.0, abs=1e-9)
    # windows one period apart are the same shape
    assert np.array_equal(near[:-16], near[16:])
    assert len(set(near[:16].tolist())) == 16


@pytest.mark.parametrize("bump", [1.0, -1.0])
def test_a_bumped_window_has_the_hand_computed_error_and_sign(bump: float) -> None:
    wins = _sawtooth_windows()
    cat = ShapeCatalog(n_clusters=16, random_state=0).fit(wins)
    w0 = np.array(wins[3])
    row = 6
    tap = taper(16)[row]
    # the bump is smaller than half the distance between two shapes: the nearest shape cannot change
    assert abs(bump) * tap < _min_distance(wins[:16]) / 2
    bumped = w0.copy()
    bumped[row, 0] += bump
    near0, *_ = cat.match(w0[None])
    near, mean_abs, max_abs, signed = cat.match(bumped[None])
    assert near[0] == near0[0]
    assert max_abs[0, 0] == pytest.approx(abs(bump) * tap, abs=1e-9)
    assert mean_abs[0, 0] == pytest.approx(abs(bump) * tap / 16, abs=1e-9)
    assert signed[0, 0] == pytest.approx(bump * tap / 16, abs=1e-9)
    assert np.sign(signed[0, 0]) == np.sign(bump)


def test_multi_field_windows_report_errors_per_field() -> None:
    t = np.arange(1600)
    x = np.column_stack([np.tile(np.arange(16.0), 100), 10.0 * np.sin(2 * np.pi * t / 16)])
    wins = sliding_windows(x, 16, 1)
    cat = ShapeCatalog(n_clusters=16, random_state=1).fit(wins)
    assert cat.cluster_centers_.shape == (16, 32)  # window x fields, flattened
    _, mean_abs, max_abs, _ = cat.match(wins[:40])
    assert mean_abs.shape == (40, 2) and max_abs.max() == pytest.approx(0.0, abs=1e-9)
    bumped = np.array(wins[5])
    bumped[8, 1] -= 2.0  # field 1 only, at the taper's top (taper(16)[8] = sin(8 pi / 15)^2)
    near, mean_abs, max_abs, signed = cat.match(bumped[None])
    near0, *_ = cat.match(wins[5:6])
    assert near[0] == near0[0]
    assert max_abs[0, 0] == pytest.approx(0.0, abs=1e-9)  # field 0 is untouched
    assert max_abs[0, 1] == pytest.approx(2.0 * math.sin(8 * math.pi / 15) ** 2, abs=1e-9)
    assert signed[0, 1] < 0 and signed[0, 0] == pytest.approx(0.0, abs=1e-9)
    with pytest.raises(ValueError, match=r"expected windows of 16 rows x 2 fields"):
        cat.match(wins[:3, :, :1])


def test_matching_in_chunks_gives_the_same_answer() -> None:
    x, _ = ecg(3000, seed=6)
    wins = sliding_windows(x, 32, 1)
    cat = ShapeCatalog(n_clusters=20, random_state=0, n_init=1).fit(wins[::4])
    whole = cat.match(wins)
    chunked = cat.match(wins, chunk=97)
    for a, b in zip(whole, chunked, strict=True):
        np.testing.assert_allclose(a, b, rtol=0, atol=1e-9)
    empty = cat.match(np.empty((0, 32, 1)))
    assert [a.shape for a in empty] == [(0,), (0, 1), (0, 1), (0, 1)]


def test_fit_is_reproducible_with_random_state_including_the_subsample() -> None:
    x, _ = ecg(6000, seed=2)
    wins = sliding_windows(x, 32, 2)
    kw = {"n_clusters": 30, "n_init": 1, "max_train_windows": 1000}  # subsampled: len(wins) > 1000
    a = ShapeCatalog(random_state=7, **kw).fit(wins)
    b = ShapeCatalog(random_state=7, **kw).fit(wins)
    c = ShapeCatalog(random_state=8, **kw).fit(wins)
    assert np.array_equal(a.cluster_centers_, b.cluster_centers_)
    assert not np.array_equal(a.cluster_centers_, c.cluster_centers_)
    assert a.n_train_windows_ == len(wins) > 1000  # the full count is recorded, not the subsample's


def test_catalog_quality_on_unseen_ecg_windows() -> None:
    """A floor: the catalog trained on 4000 samples matches later normal beats far better than a bad catalog."""
    x, _ = ecg(8000, seed=3)
    train, test = sliding_windows(x[:4000], 32, 2), sliding_windows(x[4000:], 32, 1)
    cat = ShapeCatalog(n_clusters=60, random_state=0, n_init=1).fit(train)
    _, mean_abs, max_abs, _ = cat.match(test)
    # the beat's R peak is ~100 and the noise sigma 1: a good match leaves a few units at most
    assert np.median(mean_abs) < 2.0
    assert np.quantile(max_abs, 0.99) < 20.0
    few = ShapeCatalog(n_clusters=2, random_state=0, n_init=1).fit(train)
    _, few_mean, _, _ = few.match(test)
    assert np.median(few_mean) > 2 * np.median(mean_abs)


def test_misuse_is_a_clear_error() -> None:
    with pytest.raises(TooLittleDataError, match="1 training window"):
        ShapeCatalog().fit(np.zeros((1, 8, 1)))
    with pytest.raises(NotFittedError):
        ShapeCatalog().match(np.zeros((1, 8, 1)))
    cat = ShapeCatalog(n_clusters=2)
    with pytest.raises(ValueError, match=r"centroids of shape \(2, 10\) do not match window=4 x fields=2"):
        cat.set_centers(np.zeros((2, 10)), 4, 2)
    # more clusters than windows: the catalog has one shape per window
    small = ShapeCatalog(n_clusters=150, n_init=1).fit(sliding_windows(np.arange(20.0), 8, 4))
    assert small.cluster_centers_.shape == (4, 8)


def test_set_centers_installs_a_stored_catalog() -> None:
    wins = _sawtooth_windows()
    cat = ShapeCatalog(n_clusters=16, random_state=0).fit(wins)
    other = ShapeCatalog(n_clusters=16)
    other.set_centers(cat.cluster_centers_.copy(), 16, 1)
    for a, b in zip(cat.match(wins), other.match(wins), strict=True):
        assert np.array_equal(a, b)
