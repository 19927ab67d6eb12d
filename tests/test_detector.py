"""The one detector (anomalyd.core.detector): spec, fit, window rule, streaming invariance, stride, missing data,
multivariate attribution, persistence, and the quality floors (synthetic anomalies and the reference EKG)."""

from __future__ import annotations

import itertools
import json
import math
from dataclasses import fields, replace
from pathlib import Path
from typing import Any, cast

import numpy as np
import pytest

from anomalyd.core.detector import (
    Detector,
    DetectorSpec,
    SeriesState,
    TooLittleDataError,
    WindowBatch,
    choose_window,
    dominant_period,
)
from anomalyd.core.normaliser import NormaliserParams

PERIOD = 50


def sine(n: int, seed: int = 0, period: float = PERIOD, noise: float = 0.05) -> np.ndarray:
    """A sine with bounded (uniform) noise: later data never leaves the training range by more than the
    out-of-range rule's tolerance, so every alarm on it comes from the shapes."""
    rng = np.random.default_rng(seed)
    t = np.arange(n)
    return np.sin(2 * np.pi * t / period) + rng.uniform(-noise, noise, n)


def assert_same_batch(a: WindowBatch, b: WindowBatch) -> None:
    for f in fields(WindowBatch):
        x, y = getattr(a, f.name), getattr(b, f.name)
        assert x.shape == y.shape, f.name
        assert np.array_equal(x, y, equal_nan=x.dtype.kind == "f"), f"{f.name} differs"


def concat_batches(parts: list[WindowBatch], axis: int = 0) -> WindowBatch:
    return WindowBatch(**{f.name: np.concatenate([getattr(p, f.name) for p in parts], axis=axis)
                          for f in fields(WindowBatch)})


def covering(position: np.ndarray, window: int, start: int, end: int) -> np.ndarray:
    """Windows (by last sample) that hold at least one of the samples ``[start, end)``."""
    return (position >= start) & (position - window + 1 < end)


@pytest.fixture(scope="module")
def sine_data() -> np.ndarray:
    return sine(8000, seed=1)


@pytest.fixture(scope="module")
def sine_det(sine_data: np.ndarray) -> Detector:
    return Detector(DetectorSpec(n_clusters=40, n_init=1)).fit([sine_data[:3000]])


# -- the spec --------------------------------------------------------------------------------------


@pytest.mark.parametrize(("changes", "message"), [
    ({"error": "rms"}, "detector error='rms' is not one of mean, max"),
    ({"field_norm": "z"}, "field_norm='z' is not one of q99, none"),
    ({"aggregate": "sum"}, "aggregate='sum' is not one of max, mean"),
    ({"threshold_policy": "median"}, "threshold_policy='median' is not one of max, quantile, sigma"),
    ({"decision": "vote"}, "decision='vote' is not one of score, error, either"),
    ({"window": 3}, "window=3 is too small"),
    ({"min_window": 40}, r"min_window \(40\) <= default_window \(32\) <= max_window \(64\)"),
    ({"default_window": 80}, r"default_window \(80\) <= max_window \(64\)"),
    ({"n_clusters": 1}, "n_clusters=1 must be >= 2"),
    ({"clusters_per_window": 0}, "clusters_per_window=0 >= 1"),
    ({"holdout": 0.0}, "holdout=0.0 must be between 0 and 1"),
    ({"holdout": 1.0}, "holdout=1.0 must be between 0 and 1"),
    ({"train_slide": 0}, "train_slide=0 and stride=1 must be at least 1"),
    ({"stride": 0}, "stride=0 must be at least 1"),
    ({"score_threshold": 0.0}, r"score_threshold=0.0 must be in \(0, 1\]"),
    ({"score_threshold": 1.5}, r"score_threshold=1.5 must be in \(0, 1\]"),
])
def test_spec_validation_names_the_value(changes: dict, message: str) -> None:
    with pytest.raises(ValueError, match=message):
        DetectorSpec(**changes)


def test_spec_roundtrips_through_json_and_overrides() -> None:
    spec = DetectorSpec(window=24, n_clusters=70, stride=3, decision="either",
                        normaliser=NormaliserParams(short_window=4, transform="log", range_tolerance=None))
    d = spec.to_dict()
    assert isinstance(d["normaliser"], dict) and d["normaliser"]["short_window"] == 4
    assert DetectorSpec.from_dict(json.loads(json.dumps(d, allow_nan=False))) == spec
    with pytest.raises(ValueError, match=r"unknown detector parameters \['colour'\]"):
        DetectorSpec.from_dict({**d, "colour": "red"})
    changed = spec.with_overrides(window=None, normaliser_learning=7, normaliser_red=0.0)
    assert changed.window is None and changed.normaliser.learning == 7 and changed.normaliser.red == 0.0
    assert changed.normaliser.short_window == 4 and changed.n_clusters == 70  # the rest is kept
    assert spec.window == 24 and spec.normaliser.learning == 32  # frozen: the original is unchanged
    with pytest.raises(ValueError, match="stride=0"):
        spec.with_overrides(stride=0)  # overrides are validated like the constructor
    with pytest.raises(ValueError, match="short_window=0"):
        spec.with_overrides(normaliser_short_window=0)


# -- fit -------------------------------------------------------------------------------------------


def test_fit_errors_say_what_is_wrong() -> None:
    with pytest.raises(TooLittleDataError, match="no training samples"):
        Detector().fit([])
    # two stretches of 20 are not one of 40: the window shrinks to min_window=16, which needs 2 * 16 + 2
    with pytest.raises(TooLittleDataError, match=r"window=16 needs a gap-free training stretch of at least 34 "
                                                 r"samples, the longest has 20 \(of 40 in all\)"):
        Detector().fit([np.zeros(20), np.ones(20)])
    # a fixed window is kept as it is: 2 * 32 + 2 samples are needed
    with pytest.raises(TooLittleDataError, match=r"window=32 needs .* at least 66 samples, the longest has 60"):
        Detector(DetectorSpec(window=32)).fit([sine(60)])
    x = sine(500)
    x[[3, 9]] = [np.nan, np.inf]
    with pytest.raises(ValueError, match="2 NaN or infinite values"):
        Detector().fit([x])
    with pytest.raises(ValueError, match=r"must all have 2 field\(s\), got shape \(300, 3\)"):
        Detector().fit([np.zeros((300, 2)), np.zeros((300, 3))])
    with pytest.raises(ValueError, match="not fitted"):
        Detector().start(0)


def test_short_stretches_shrink_an_automatic_window_and_are_left_out() -> None:
    # two fields: the automatic window is default_window (32); on a 50-sample stretch (50 - 2) // 2 = 24 fits,
    # and 2 * 24 + 2 = 50 samples
    two = np.column_stack([sine(50), sine(50, seed=1)])
    det = Detector(DetectorSpec(n_clusters=4, n_init=1)).fit([two])
    assert det.window_ == 24
    # never below min_window (16, which needs 34 samples)
    with pytest.raises(TooLittleDataError, match=r"window=16 needs .* at least 34 samples, the longest has 33"):
        Detector(DetectorSpec(n_clusters=4, n_init=1)).fit([two[:33]])
    # a fixed window is not shrunk, and stretches shorter than 2 * window + 2 are left out
    long = sine(2000, seed=2)
    spec = DetectorSpec(window=20, n_clusters=10, n_init=1)
    alone = Detector(spec).fit([long])
    with_short = Detector(spec).fit([long, sine(41, seed=3)])
    assert alone.window_ == with_short.window_ == 20
    assert with_short.catalog_.n_train_windows_ == alone.catalog_.n_train_windows_


def test_windows_never_straddle_two_stretches() -> None:
    w = 20
    spec = DetectorSpec(window=w, n_clusters=10, n_init=1)
    lengths = [700, 450]
    det = Detector(spec).fit([sine(n, seed=i) for i, n in enumerate(lengths)])

    def train_windows(n: int) -> int:  # the first 1 - holdout of the stretch, every train_slide samples
        n_val = max(round(spec.holdout * n), w)
        return (n - n_val - w) // spec.train_slide + 1

    # by hand: 700 samples hold out 140 and leave (560 - 20) // 2 + 1 = 271 windows; 450 hold out 90: 171
    assert train_windows(700) == 271 and train_windows(450) == 171
    assert det.catalog_.n_train_windows_ == 271 + 171  # one more would be a window across the cut


def test_the_window_is_chosen_from_the_training_data() -> None:
    t = np.arange(3000)
    assert Detector(DetectorSpec(n_clusters=10, n_init=1)).fit([np.sin(2 * np.pi * t / 60)]).window_ == 30
    assert Detector(DetectorSpec(n_clusters=10, n_init=1)).fit([np.sin(2 * np.pi * t / 20)]).window_ == 16
    noise = np.random.default_rng(0).normal(size=3000)
    assert Detector(DetectorSpec(n_clusters=10, n_init=1)).fit([noise]).window_ == 32  # no period: the default
    two = np.column_stack([np.sin(2 * np.pi * t / 60), np.cos(2 * np.pi * t / 60)])
    assert Detector(DetectorSpec(n_clusters=10, n_init=1)).fit([two]).window_ == 32  # several fields: the default
    fixed = Detector(DetectorSpec(window=12, n_clusters=10, n_init=1)).fit([np.sin(2 * np.pi * t / 60)])
    assert fixed.window_ == 12


def test_window_rule_and_dominant_period() -> None:
    t = np.arange(3000)
    noisy = np.sin(2 * np.pi * t / 60) + 0.1 * np.random.default_rng(0).normal(size=3000)
    assert dominant_period(noisy) == 60
    assert dominant_period(np.random.default_rng(1).normal(size=3000)) is None
    assert dominant_period(np.ones(500)) is None  # no variance
    assert dominant_period(np.arange(5.0)) is None  # too short
    assert choose_window(np.sin(2 * np.pi * t / 80)) == 40  # half the period
    assert choose_window(np.sin(2 * np.pi * t / 20)) == 16  # clipped up to min_window
    assert choose_window(np.sin(2 * np.pi * t / 500)) == 64  # clipped down to max_window
    assert choose_window(np.random.default_rng(2).normal(size=3000)) == 32  # no period: the default
    assert choose_window(np.random.default_rng(2).normal(size=3000), default=24) == 24


def test_the_catalog_size_adapts_to_short_training_data() -> None:
    # 400 samples, window 16: the last 80 are held out, 320 leave (320 - 16) // 2 + 1 = 153 training windows,
    # so at most 153 // 4 = 38 shapes instead of 150
    det = Detector(DetectorSpec(window=16)).fit([sine(400)])
    assert det.catalog_.n_train_windows_ == 153
    assert det.catalog_.cluster_centers_.shape == (38, 16)
    # enough data: the cap is n_clusters
    det = Detector(DetectorSpec(window=16, n_clusters=30, n_init=1)).fit([sine(3000)])
    assert det.catalog_.cluster_centers_.shape == (30, 16)


def test_fit_learns_scaling_and_warm_state(sine_data: np.ndarray, sine_det: Detector) -> None:
    train = sine_data[:3000]
    assert sine_det.mean_ == pytest.approx([train.mean()]) and sine_det.scale_ == pytest.approx([train.std()])
    assert sine_det.n_fields_ == 1 and sine_det.window_ == PERIOD // 2
    assert sine_det.n_train_samples_ == 3000
    # the score history was warmed up on the hold-out: one error per hold-out window
    n_val = round(0.2 * 3000)
    assert sine_det.normaliser_.seen == n_val - sine_det.window_ + 1
    assert math.isfinite(sine_det.threshold_) and sine_det.threshold_ > 0
    assert math.isfinite(sine_det.error_threshold_) and sine_det.error_threshold_ > 0
    # a flat training series does not divide by zero
    flat = Detector(DetectorSpec(window=8, n_clusters=2, n_init=1)).fit([np.full(100, 5.0)])
    assert flat.scale_[0] == pytest.approx(5e-3)


# -- streaming -------------------------------------------------------------------------------------


def _stream_input(sine_data: np.ndarray) -> np.ndarray:
    y = sine_data[3000:].copy()
    y[400] += 1.5  # a spike
    y[1500:1506] = 0.0  # a dropout
    y[2500:2503] = np.nan  # missing samples
    return y


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_update_in_chunks_of_random_sizes_equals_one_update(sine_data: np.ndarray, sine_det: Detector,
                                                            seed: int) -> None:
    y = _stream_input(sine_data)
    one = sine_det.start(3000, context=sine_data[:3000])
    whole = sine_det.update(one, y)
    assert whole.position.tolist() == list(range(3000, 8000)) and one.position == 8000
    rng = np.random.default_rng(seed)
    cuts = np.unique(np.concatenate(([0, 1, 2, 300, 301, len(y)], rng.integers(0, len(y), 40))))
    state = sine_det.start(3000, context=sine_data[:3000])
    parts = [sine_det.update(state, y[a:b]) for a, b in itertools.pairwise(cuts)]
    assert_same_batch(whole, concat_batches(parts))
    assert state.position == one.position
    assert np.array_equal(state.tail, one.tail, equal_nan=True)
    assert state.norm.to_dict() == one.norm.to_dict()
    assert whole.anomalous.any()  # something was there to find


@pytest.mark.parametrize("attribution", ["error", "movement"])
def test_several_fields_leaving_their_range_in_chunks_equal_one_update(attribution: str) -> None:
    """Fields that leave the range seen so far again and again (a ramp, jumps far beyond the range, a 1e12 glitch),
    so that the default's cap on how far one window widens the range binds: the out-of-range excess and the
    attribution are the same fed at once or in chunks (the daemon's ticks; on SMD 2-1 one window's attribution
    once differed between the daemon and the in-memory run)."""
    rng = np.random.default_rng(11)
    t = np.arange(6000)
    x = np.column_stack([np.sin(2 * np.pi * t / 40), 0.1 * rng.standard_normal(6000), np.cos(2 * np.pi * t / 25)])
    spec = DetectorSpec(window=16, n_clusters=20, n_init=1, attribution=attribution)
    assert (spec.range_by, spec.normaliser.range_growth) == ("sample", 1.0)
    det = Detector(spec).fit([x[:3000]])
    y = x[3000:].copy()
    y[500:900, 0] += np.linspace(0.0, 8.0, 400)  # a ramp out of the range, widening it step by step
    y[1200, 1] = 25.0  # far beyond the range: the cap binds ...
    y[1230:1240, 1] = 2.0  # ... so this is beyond the range as kept, though below the spike
    y[1500:1503, 2] = -40.0
    y[2000, 0] = 1e12  # a glitch
    whole = det.update(det.start(3000, context=x[:3000]), y)
    assert (whole.field_excess != 0).sum() > 5
    for seed in (0, 1):
        cuts = np.unique(np.concatenate(([0, 501, 1200, 1201, len(y)],
                                         np.random.default_rng(seed).integers(0, len(y), 30))))
        state = det.start(3000, context=x[:3000])
        parts = [det.update(state, y[a:b]) for a, b in itertools.pairwise(cuts)]
        assert_same_batch(whole, concat_batches(parts))


def test_update_many_over_several_series_equals_update_each(sine_data: np.ndarray, sine_det: Detector) -> None:
    rng = np.random.default_rng(5)
    series = np.stack([sine(1200, seed=10 + i) for i in range(5)])
    series[1, 300:305] = np.nan
    series[2, 600] += 2.0
    series[3, :40] = np.nan
    starts = [3000, 17, 123456, 5, 999]
    contexts = [sine_data[:3000], None, sine(10, seed=3), sine(100, seed=4), None]
    each = [sine_det.start(p, c) for p, c in zip(starts, contexts, strict=True)]
    many = [sine_det.start(p, c) for p, c in zip(starts, contexts, strict=True)]
    cuts = [0, 1, 64, 65, 700, 1200]
    for a, b in itertools.pairwise(cuts):
        one_by_one = [sine_det.update(st, series[i, a:b]) for i, st in enumerate(each)]
        together = sine_det.update_many(many, series[:, a:b])
        for i, batch in enumerate(one_by_one):
            assert_same_batch(batch, WindowBatch(**{f.name: getattr(together, f.name)[i]
                                                    for f in fields(WindowBatch)}))
    for x, y in zip(each, many, strict=True):
        assert x.position == y.position and x.norm.to_dict() == y.norm.to_dict()
    with pytest.raises(ValueError, match=r"expected samples of shape \(5, m, 1\)"):
        sine_det.update_many(many, rng.normal(size=(4, 10)))


def test_an_empty_update_returns_an_empty_batch_and_changes_nothing(sine_data: np.ndarray,
                                                                    sine_det: Detector) -> None:
    """A tick with no new sample (m = 0) is a no-op, like an empty chunk of the normaliser (`update_block`) or of
    the catalog (`ShapeCatalog.match`); it must not fail inside numpy's sliding_window_view."""
    state = sine_det.start(3000, context=sine_data[:3000])
    before = (state.position, state.tail.copy(), state.norm.to_dict())
    b = sine_det.update(state, np.empty(0))
    assert b.position.shape == (0,) and b.score.shape == (0,) and b.field_error.shape == (0, 1)
    assert state.position == before[0] and np.array_equal(state.tail, before[1]) and state.norm.to_dict() == before[2]
    many = sine_det.update_many([state, sine_det.start(5)], np.empty((2, 0)))
    assert many.score.shape == (2, 0)


def test_stride_scores_only_positions_divisible_by_it(sine_data: np.ndarray, sine_det: Detector) -> None:
    stride = 4
    det4 = Detector(DetectorSpec(n_clusters=40, n_init=1, stride=stride)).fit([sine_data[:3000]])
    assert np.array_equal(det4.catalog_.cluster_centers_, sine_det.catalog_.cluster_centers_)
    y = _stream_input(sine_data)[:2000]
    first = 3001  # not on the stride grid
    b4 = det4.update(det4.start(first, context=sine_data[:first]), y[1:])
    b1 = sine_det.update(sine_det.start(first, context=sine_data[:first]), y[1:])
    on = b4.position % stride == 0
    assert np.array_equal(b4.scored, on) and on.sum() == len(on) // stride
    assert np.isnan(b4.score[~on]).all() and np.isnan(b4.error[~on]).all()
    assert not b4.anomalous[~on].any() and (b4.nearest[~on] == -1).all()
    assert np.isfinite(b4.score[on]).all()
    # the errors on the grid are the same windows' errors as with stride 1
    np.testing.assert_allclose(b4.error[on], b1.error[on], rtol=1e-12)
    # the spike at 3400 is still flagged by a window on the grid
    w = det4.window_
    assert b4.anomalous[covering(b4.position, w, 3400, 3401)].any()


def test_a_start_without_context_has_incomplete_first_windows(sine_det: Detector) -> None:
    w = sine_det.window_
    b = sine_det.update(sine_det.start(0), sine(200, seed=9))
    j = np.arange(200)
    expected = np.maximum(w - 1 - j, 0)  # the samples before 0 are missing
    assert b.n_missing.tolist() == expected.tolist()
    assert np.array_equal(b.complete, expected == 0)
    assert np.isnan(b.score[: w - 1]).all() and np.isfinite(b.score[w - 1 :]).all()
    assert b.last_present.all()


def test_missing_samples_make_incomplete_windows_and_do_not_break_later_scores(sine_data: np.ndarray,
                                                                              sine_det: Detector) -> None:
    w = sine_det.window_
    clean = sine_data[3000:6000]
    y = clean.copy()
    gap = (1000, 1005)  # 5 missing samples
    y[gap[0] : gap[1]] = np.nan
    ctx = sine_data[:3000]
    b = sine_det.update(sine_det.start(3000, context=ctx), y)
    ref = sine_det.update(sine_det.start(3000, context=ctx), clean)
    idx = np.arange(len(y))
    expected = np.clip(np.minimum(idx, gap[1] - 1) - np.maximum(idx - w + 1, gap[0]) + 1, 0, None)
    assert b.n_missing.tolist() == expected.tolist()
    assert expected.max() == 5 and (expected > 0).sum() == w + 4
    incomplete = expected > 0
    assert np.array_equal(b.complete, ~incomplete) and b.scored.all()
    assert np.isnan(b.score[incomplete]).all() and np.isnan(b.error[incomplete]).all()
    assert not b.anomalous[incomplete].any() and (b.nearest[incomplete] == -1).all()
    assert np.array_equal(b.last_present, np.isfinite(y))
    # after the gap: the same windows have the same errors, the scores are finite and nothing is flagged
    after = idx >= gap[1] + w - 1
    np.testing.assert_allclose(b.error[after], ref.error[after], rtol=1e-12)
    assert np.isfinite(b.score[after]).all()
    assert not b.anomalous.any() and not ref.anomalous.any()
    assert np.array_equal(b.score[: gap[0]], ref.score[: gap[0]])  # causal: nothing before the gap changes


def test_the_decision_modes(sine_data: np.ndarray, sine_det: Detector) -> None:
    y = _stream_input(sine_data)[:2000]
    arrays, meta = sine_det.to_state()
    out = {}
    for decision in ("score", "error", "either"):
        det = Detector.from_state(arrays, {**meta, "spec": {**meta["spec"], "decision": decision}})
        out[decision] = det.update(det.start(3000, context=sine_data[:3000]), y)
    b = out["score"]
    by_score = np.nan_to_num(b.score, nan=0.0) >= 0.5
    by_error = np.nan_to_num(b.error, nan=-np.inf) > sine_det.error_threshold_
    assert np.array_equal(b.anomalous, by_score)
    assert np.array_equal(out["error"].anomalous, by_error)
    assert np.array_equal(out["either"].anomalous, by_score | by_error)
    assert by_error.sum() > by_score.sum() > 0  # the two rules differ here, so the test tells them apart


def test_a_value_outside_the_training_range_scores_one_on_either_side(sine_data: np.ndarray,
                                                                      sine_det: Detector) -> None:
    y = sine_data[3000:4000].copy()
    y[300] = -1.5  # the training range is about [-1.05, 1.05]; the tolerance 2% of its width
    y[700] = 1.5
    b = sine_det.update(sine_det.start(3000, context=sine_data[:3000]), y)
    # the first window holding the value has it at its last row, where the taper is 0: its error is normal,
    # only the out-of-range rule can give it a score above 0.9 (unsaturated, the default: below 1, by how far the
    # value leaves the range; saturated: exactly 1)
    arrays, meta = sine_det.to_state()
    assert meta["spec"]["normaliser"]["unsaturated"] is True
    spec = {**meta["spec"], "normaliser": {**meta["spec"]["normaliser"], "range_tolerance": None}}
    no_rule = Detector.from_state(arrays, {**meta, "spec": spec})
    r = no_rule.update(no_rule.start(3000, context=sine_data[:3000]), y)
    spec = {**meta["spec"], "normaliser": {**meta["spec"]["normaliser"], "unsaturated": False}}
    saturated = Detector.from_state(arrays, {**meta, "spec": spec})
    s = saturated.update(saturated.start(3000, context=sine_data[:3000]), y)
    for i in (300, 700):
        assert 0.9 < b.score[i] < 1.0 and b.anomalous[i]
        assert s.score[i] == 1.0 and s.anomalous[i]
        assert r.score[i] < 0.5 and b.error[i] == r.error[i]
    assert np.array_equal(b.anomalous, s.anomalous)  # unsaturated changes no decision
    assert np.array_equal(np.minimum(b.score, 0.9), np.minimum(s.score, 0.9), equal_nan=True)
    top = np.flatnonzero(b.score > 0.9)
    assert all(any(0 <= i - j < sine_det.window_ for j in (300, 700)) for i in top), top  # only near the values


# -- quality: injected anomalies --------------------------------------------------------------------


@pytest.mark.parametrize("seed", range(6))
def test_a_spike_and_a_dropout_are_flagged_and_nothing_far_from_them(seed: int) -> None:
    """Default spec, a sine of random period and phase; a +1 spike at a random sample and a 6-sample dropout to 0
    on a crest. Each must be covered by an anomalous window; no window away from them may be anomalous."""
    rng = np.random.default_rng(seed)
    n = 8000
    t = np.arange(n)
    period, phase = rng.uniform(40, 70), rng.uniform(0, 2 * np.pi)
    clean = np.sin(2 * np.pi * t / period + phase)
    x = clean + rng.uniform(-0.05, 0.05, n)
    det = Detector().fit([x[:3000]])
    y = x.copy()
    spike = int(rng.integers(4000, 5000))
    y[spike] += 1.0
    crest = 6000 + int(np.argmax(np.abs(clean[6000 : 6000 + int(period)])))
    y[crest - 3 : crest + 3] = 0.0
    b = det.update(det.start(3000, context=x[:3000]), y[3000:])
    w, short = det.window_, det.spec.normaliser.short_window
    near = np.zeros(len(b.position), dtype=bool)
    margins = []
    for start, end in ((spike, spike + 1), (crest - 3, crest + 3)):
        cov = covering(b.position, w, start, end)
        assert b.anomalous[cov].any(), f"anomaly at {start}-{end} not flagged (max score {b.score[cov].max():.3f})"
        margins.append(float(b.score[cov].max()))
        near |= (b.position >= start) & (b.position < end + w - 1 + short)  # the short-window average lingers
    normal_max = float(np.nanmax(b.score[~near]))
    print(f"seed {seed} window {w}: max score spike {margins[0]:.3f}, dropout {margins[1]:.3f}, "
          f"normal windows {normal_max:.3f}")
    assert not b.anomalous[~near].any(), f"false alarms at {b.position[~near & b.anomalous][:10]}"


@pytest.mark.parametrize(("seed", "sign"), [(0, 1.0), (0, -1.0), (1, 1.0), (1, -1.0), (3, 1.0), (3, -1.0)])
def test_a_deviation_in_one_field_is_attributed_to_it(seed: int, sign: float) -> None:
    rng = np.random.default_rng(seed)
    n = 6000
    t = np.arange(n)
    amp = np.array([1.0, 10.0, 100.0])  # fields of very different scales
    x = np.column_stack([np.sin(2 * np.pi * t / 50 + ph) for ph in (0.0, 1.0, 2.5)]) * amp
    x += rng.uniform(-0.05, 0.05, (n, 3)) * amp
    det = Detector(DetectorSpec(n_clusters=60, n_init=1)).fit([x[:3000]])
    assert det.n_fields_ == 3
    field = int(rng.integers(0, 3))
    start = int(rng.integers(4000, 5000))
    y = x.copy()
    y[start : start + 8, field] += sign * 0.8 * amp[field]
    b = det.update(det.start(3000, context=x[:3000]), y[3000:])
    w = det.window_
    cov = covering(b.position, w, start, start + 8)
    worst = np.flatnonzero(cov)[np.nanargmax(b.error[cov])]
    fe = b.field_error[worst]
    assert int(np.argmax(fe)) == field, f"field errors {fe}"
    assert fe[field] > 1.5 * np.delete(fe, field).max()
    assert b.field_sign[worst, field] == sign
    assert b.error[worst] == fe.max()  # the window's error is the largest field's (aggregate "max")
    assert b.anomalous[cov].any()
    near = (b.position >= start) & (b.position < start + 8 + w - 1 + det.spec.normaliser.short_window)
    assert not b.anomalous[~near].any()
    assert b.field_error.shape == (3000, 3) and b.field_sign.shape == (3000, 3)
    # The attribution is the error by default; by movement it would miss a bump inside a sine's usual range.
    assert np.array_equal(b.field_weight, b.field_error, equal_nan=True)


def test_the_movement_attribution_is_each_fields_range_in_the_window_in_scaled_units() -> None:
    rng = np.random.default_rng(3)
    x = rng.normal(size=(2000, 2)) * [1.0, 50.0] + [0.0, 1000.0]
    det = Detector(DetectorSpec(window=16, n_clusters=20, n_init=1)).fit([x[:1500]])
    assert det.spec.attribution == "error"
    det = Detector(replace(det.spec, attribution="movement")).fit([x[:1500]])
    b = det.update(det.start(1500, context=x[:1500]), x[1500:])
    z = (np.concatenate((x[1500 - 15 : 1500], x[1500:])) - det.mean_) / det.scale_
    ranges = np.lib.stride_tricks.sliding_window_view(z, 16, axis=0).max(axis=2) - \
        np.lib.stride_tricks.sliding_window_view(z, 16, axis=0).min(axis=2)
    assert np.allclose(b.field_weight, ranges, rtol=1e-12, atol=1e-12)
    with pytest.raises(ValueError, match="attribution='share' is not one of error, movement"):
        DetectorSpec(attribution="share")


def test_by_movement_a_step_in_one_quiet_field_among_noisy_ones_is_attributed_to_it() -> None:
    """The SMD case: fields of very different spreads, one steps up by 6 of its training spreads. By movement it
    is the top field; detection (score, error, decision) is the same as with the default attribution."""
    rng = np.random.default_rng(5)
    x = rng.normal(size=(5000, 4)) * [1.0, 0.01, 30.0, 5.0]
    y = x[4000:].copy()
    y[500:, 1] += 0.06
    specs = [DetectorSpec(window=16, n_clusters=30, n_init=1, attribution=a) for a in ("movement", "error")]
    batches = []
    for spec in specs:
        det = Detector(spec).fit([x[:4000]])
        batches.append(det.update(det.start(4000, context=x[:4000]), y))
    moved, err = batches
    at = np.arange(500, 515)  # the windows that hold the step (the one ending at 515 starts after it)
    assert (np.argmax(moved.field_weight[at], axis=1) == 1).all(), moved.field_weight[at]
    for name in ("score", "error", "anomalous", "field_error"):
        assert np.array_equal(getattr(moved, name), getattr(err, name), equal_nan=True), name


# -- persistence and display ----------------------------------------------------------------------


@pytest.mark.parametrize("n_fields, ranking", [(1, {}), (2, {}),
                                               (1, {"normaliser_unsaturated": True, "normaliser_record_factor": 1.0,
                                                    "normaliser_history_gate": 8})])
def test_to_state_from_state_scores_identically(tmp_path: Path, sine_data: np.ndarray, n_fields: int,
                                                ranking: dict) -> None:
    x = sine_data if n_fields == 1 else np.column_stack([sine_data, 3.0 * np.roll(sine_data, 7) + 10.0])
    det = Detector(DetectorSpec(n_clusters=30, n_init=1, stride=2).with_overrides(**ranking)).fit(
        [x[:2000], x[2000:3000]], starts=[0, 2000])
    arrays, meta = det.to_state()
    np.savez(tmp_path / "m.npz", **cast(dict[str, Any], arrays))
    (tmp_path / "m.json").write_text(json.dumps(meta, allow_nan=False))
    with np.load(tmp_path / "m.npz") as z:
        loaded = Detector.from_state({k: z[k] for k in z.files}, json.loads((tmp_path / "m.json").read_text()))
    assert loaded.spec == det.spec and loaded.window_ == det.window_ and loaded.n_fields_ == n_fields
    assert np.array_equal(loaded.catalog_.cluster_centers_, det.catalog_.cluster_centers_)
    assert loaded.threshold_ == det.threshold_ and loaded.error_threshold_ == det.error_threshold_
    assert loaded.normaliser_.to_dict() == det.normaliser_.to_dict()
    y = x[3000:5000].copy()
    y[700] += 2.0
    a = det.update(det.start(3000, x[:3000]), y)
    b = loaded.update(loaded.start(3000, x[:3000]), y)
    assert_same_batch(a, b)
    bad = {**arrays, "mean": np.zeros(n_fields + 1)}
    with pytest.raises(ValueError, match="mean has shape"):
        Detector.from_state(bad, meta)


def test_start_continues_a_given_score_history(sine_data: np.ndarray, sine_det: Detector) -> None:
    y = _stream_input(sine_data)[:1000]
    a = sine_det.start(3000, context=sine_data[:3000])
    sine_det.update(a, y[:500])
    b = SeriesState(a.position, a.tail.copy(), a.norm.copy())
    c = sine_det.start(3500, context=np.concatenate((sine_data[:3000], y[:500])), norm=a.norm.copy())
    assert np.array_equal(b.tail, c.tail)
    assert_same_batch(sine_det.update(b, y[500:]), sine_det.update(c, y[500:]))
    fresh = sine_det.start(0)
    assert fresh.norm is not sine_det.normaliser_  # the learned warm state is copied, never shared
    sine_det.update(fresh, y[:100])
    assert sine_det.normaliser_.seen == round(0.2 * 3000) - sine_det.window_ + 1


def test_overlap_reconstruction_and_shapes_follow_the_signal(sine_data: np.ndarray, sine_det: Detector) -> None:
    w = sine_det.window_
    x = sine_data[3000:3600]
    rec = sine_det.overlap_reconstruction(x, first_index=3000)
    inner = slice(w, len(x) - w)
    assert np.isfinite(rec[inner]).all()
    assert np.abs(rec[inner] - x[inner]).max() < 0.25  # amplitude 1, noise 0.05
    assert np.isnan(rec[0])  # the very first row is covered by a taper's zero only
    # the windows sit on a fixed grid (grid indices divisible by window // 2): a call starting 7 rows later draws
    # the same picture away from its ends, where every covering window is in both calls
    shifted = sine_det.overlap_reconstruction(x[7:], first_index=3007)
    slide = w // 2
    first_start = -(-3007 // slide) * slide - 3000  # the shifted call's first window, in rows of x
    both = slice(first_start + w, len(x) - w)
    assert np.isfinite(rec[both]).all()
    np.testing.assert_allclose(shifted[both.start - 7 : both.stop - 7], rec[both], rtol=0, atol=1e-9)
    moved = sine_det.overlap_reconstruction(x[7:], first_index=3000)  # a different grid: a different picture
    assert np.nanmax(np.abs(moved[both.start - 7 : both.stop - 7] - rec[both])) > 1e-6
    # one shape in data units is close to the window it was matched to (where the taper is not ~0)
    b = sine_det.update(sine_det.start(3000, sine_data[:3000]), x)
    j = 300
    shape = sine_det.shape(int(b.nearest[j]))
    assert shape.shape == (w, 1)
    ok = np.isfinite(shape[:, 0])
    assert ok.sum() >= w - 4
    assert np.abs(shape[ok, 0] - x[j - w + 1 : j + 1][ok]).max() < 0.3


# -- the reference case ------------------------------------------------------------------------------


def _ekg(path: Path) -> np.ndarray:
    values, times = [], []
    for line in path.read_text().splitlines():
        _, field, stamp = line.split(" ")
        name, value = field.split("=")
        assert name == "signal_value"
        values.append(float(value))
        times.append(int(stamp))
    assert (np.diff(times) == 10**9).all()  # one sample a second, no gaps
    return np.asarray(values)


def test_reference_ekg_both_dropouts_and_no_false_alarm(shared_data: Path) -> None:
    """The reference case: train on norm.txt, score anomaly.txt with window 32. anomaly.txt is norm.txt with
    two dropouts to 0 (samples 210-214 and 8010-8013)."""
    norm = _ekg(shared_data / "ekg" / "norm.txt")
    anomaly = _ekg(shared_data / "ekg" / "anomaly.txt")
    changed = np.flatnonzero(norm != anomaly)
    assert changed.tolist() == [*range(210, 215), *range(8010, 8014)]
    det = Detector(DetectorSpec(window=32)).fit([norm])
    b = det.update(det.start(0), anomaly)
    w = det.window_
    assert w == 32
    hit = np.zeros(len(anomaly), dtype=bool)
    report = []
    for start, end in ((210, 215), (8010, 8014)):
        cov = covering(b.position, w, start, end) & b.complete
        assert cov.sum() == w + end - start - 1
        assert b.anomalous[cov].any(), f"dropout {start}-{end - 1} not flagged"
        report.append(f"dropout {start}-{end - 1}: max score {np.nanmax(b.score[cov]):.3f}")
        hit |= covering(b.position, w, start, end)
    normal = b.complete & ~hit
    report.append(f"normal windows ({normal.sum()}): max score {np.nanmax(b.score[normal]):.3f}")
    print("; ".join(report))
    assert not b.anomalous[~hit].any(), f"false alarms at {b.position[~hit & b.anomalous][:10]}"
    assert normal.sum() == len(anomaly) - (w - 1) - 2 * (w - 1) - 5 - 4


# -- per-field surprise, re-baselining and scale floors (issues 10/11) ------------------------------------------


def _shift_case(n_train: int = 3000, n_test: int = 3000, shift_at: int = 500) -> tuple[np.ndarray, np.ndarray]:
    """Two fields: a noisy sine, and a field almost constant in training that settles at a new level in test
    (issue 11's cause (a)); a burst on the sine field at test rows 2500-2511."""
    rng = np.random.default_rng(7)
    t = np.arange(n_train + n_test)
    a = np.sin(2 * np.pi * t / PERIOD) + 0.05 * rng.standard_normal(t.size)
    b = 1.0 + 0.005 * rng.standard_normal(t.size)
    b[n_train + shift_at :] += 0.1  # 20 training sigmas, for good
    a[n_train + 2500 : n_train + 2512] += 5.0
    x = np.stack([a, b], axis=1)
    return x[:n_train], x[n_train:]


def _run(spec: DetectorSpec, train: np.ndarray, test: np.ndarray) -> tuple[Detector, WindowBatch]:
    det = Detector(spec).fit([train])
    return det, det.update(det.start(len(train), train), test)


def test_field_surprise_settles_after_a_level_shift_and_keeps_a_later_spike() -> None:
    train, test = _shift_case()
    base = DetectorSpec(window=24, n_clusters=30, decision="error", field_surprise=0, resolution_floor=0.0)
    _, plain = _run(base, train, test)
    _, surp = _run(base.with_overrides(field_surprise=200), train, test)
    late = slice(1200, 2450)  # long after the shift, before the spike
    assert plain.anomalous[late].mean() > 0.9  # without it the shifted field floods the threshold
    assert surp.anomalous[late].mean() < 0.05  # with it the field's history has taken the new level
    assert surp.anomalous[500:560].any()  # the shift itself is flagged
    assert surp.anomalous[2500:2530].any()  # and so is the later spike, on the other field
    assert int(np.nanargmax(surp.field_error[2510])) == 0  # attributed to the sine field


def test_field_surprise_is_chunk_invariant_and_persisted() -> None:
    train, test = _shift_case()
    spec = DetectorSpec(window=24, n_clusters=30, field_surprise=300, surprise_gate=6.0, surprise_rebaseline=50)
    det = Detector(spec).fit([train])
    one = det.update(det.start(len(train), train), test)
    st = det.start(len(train), train)
    parts = [det.update(st, test[i : i + 97]) for i in range(0, len(test), 97)]
    for name in ("error", "score", "field_error", "anomalous", "field_rebased"):
        assert np.array_equal(np.concatenate([getattr(p, name) for p in parts]), getattr(one, name),
                              equal_nan=True), name
    arrays, meta = det.to_state()
    again = Detector.from_state(arrays, json.loads(json.dumps(meta)))
    two = again.update(again.start(len(train), train), test)
    assert np.array_equal(two.error, one.error, equal_nan=True)
    # A saved score state without the per-field history (older daemons) continues from the trained one.
    st2 = det.start(len(train), train)
    st2.norm.fm = st2.norm.fv = st2.norm.fn = None
    three = det.update(st2, test)
    assert np.array_equal(three.error, one.error, equal_nan=True)


def test_surprise_gate_rebaselines_a_sustained_shift_and_says_so() -> None:
    train, test = _shift_case()
    spec = DetectorSpec(window=24, n_clusters=30, decision="error", field_surprise=2000, surprise_gate=6.0,
                        surprise_rebaseline=100)
    _, b = _run(spec, train, test)
    rows, cols = np.nonzero(b.field_rebased)
    assert len(rows) and set(cols.tolist()) == {1}  # only the shifted field
    assert 500 <= rows.min() <= 700  # about 100 windows after the shift
    assert not b.anomalous[int(rows.min()) + 50 : 2450].any()  # then the new level is normal
    assert b.anomalous[2500:2530].any()
    _, off = _run(DetectorSpec(window=24, n_clusters=30, decision="error"), train, test)
    assert not off.field_rebased.any()


def test_new_spec_defaults_and_old_models_load_as_they_were_trained() -> None:
    spec = DetectorSpec()
    assert (spec.field_surprise, spec.resolution_floor, spec.range_floor, spec.surprise_gate,
            spec.surprise_rebaseline) == (500, 1.0, 0.0, None, 0)
    old = spec.to_dict()
    for k in ("field_surprise", "surprise_floor", "surprise_gate", "surprise_rebaseline", "resolution_floor",
              "range_floor"):
        old.pop(k)
    # A model saved before these parameters existed was trained without the surprise and the floor.
    assert DetectorSpec.from_dict(old) == replace(spec, field_surprise=0, resolution_floor=0.0)
    with pytest.raises(ValueError):
        DetectorSpec(field_surprise=-1)
    # The out-of-range rule on each newest sample, a window widening the seen range by at most its width: the
    # default since 2026-11-30. A model saved without `range_by` (or without a normaliser) checked whole windows
    # with no cap; one saved with them keeps what it was saved with.
    assert (spec.range_by, spec.normaliser.range_growth) == ("sample", 1.0)
    older = spec.to_dict()
    older.pop("range_by")
    older.pop("normaliser")
    back = DetectorSpec.from_dict(older)
    assert (back.range_by, back.normaliser) == ("window", NormaliserParams())
    assert DetectorSpec.from_dict(replace(spec, range_by="window").to_dict()).range_by == "window"
    assert DetectorSpec.from_dict(json.loads(json.dumps(spec.to_dict()))) == spec


def test_resolution_and_range_floors_bound_a_near_constant_field() -> None:
    from anomalyd.core.detector import field_resolution

    rng = np.random.default_rng(0)
    counter = np.zeros(3000)
    counter[::500] = 1.0  # a counter that moved by one unit six times: std ~0.045
    x = np.stack([np.sin(np.arange(3000) / 8) + 0.05 * rng.standard_normal(3000), counter], axis=1)
    assert field_resolution(x)[1] == 1.0
    plain = Detector(DetectorSpec(window=16, n_clusters=20, resolution_floor=0.0)).fit([x])
    res = Detector(DetectorSpec(window=16, n_clusters=20, resolution_floor=0.5)).fit([x])
    rng_f = Detector(DetectorSpec(window=16, n_clusters=20, range_floor=0.25, resolution_floor=0.0)).fit([x])
    assert plain.scale_[1] < 0.1
    assert res.scale_[1] == pytest.approx(0.5)
    assert rng_f.scale_[1] == pytest.approx(0.25)
    assert res.scale_[0] == plain.scale_[0]  # a field with a fine resolution keeps its std
