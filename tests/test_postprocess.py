"""Tests of anomalyd.postprocess: hand-computed cases, causality, chunking invariance, persistence."""

from __future__ import annotations

import doctest
import itertools
import json
import math

import numpy as np
import pytest

from anomalyd import postprocess
from anomalyd.postprocess import (
    NormaliserParams,
    ScoreNormaliser,
    anomaly_likelihood,
    log_score,
    out_of_range,
    running_rank,
    tail_probability,
    update_many,
)


def Phi(z: float) -> float:
    """Standard normal CDF, written out."""
    return 0.5 * (1.0 + math.erf(z / math.sqrt(2.0)))


def test_doctests() -> None:
    result = doctest.testmod(postprocess)
    assert result.attempted > 0
    assert result.failed == 0


def test_tail_probability_and_log_score_hand_values() -> None:
    assert tail_probability([0.0])[0] == pytest.approx(0.5)
    assert tail_probability([1.96])[0] == pytest.approx(0.0249979, abs=1e-6)
    # log(1 + 1e-10 - L) / log(1e-10): L = 0.99999 -> log(1.0001e-5) / log(1e-10) = 0.499998
    assert log_score([0.99999])[0] == pytest.approx(math.log(1e-5 + 1e-10) / math.log(1e-10))
    assert log_score([0.5])[0] == pytest.approx(math.log(0.5 + 1e-10) / math.log(1e-10))
    assert log_score([-1.0, 2.0]).tolist() == pytest.approx([0.0, 1.0])  # clipped into [0, 1]


def test_running_rank_hand_case() -> None:
    # 4 vs [1, 3] -> 1.0; 2 vs [1, 3, 4] -> 1/3; 3 vs [1, 3, 4, 2] -> (2 below + 0.5 tie) / 4 = 0.625
    r = running_rank([1.0, 3.0, 4.0, 2.0, 3.0])
    assert r.tolist() == pytest.approx([0.5, 1.0, 1.0, 1 / 3, 0.625])
    # window 2: 3 vs [4, 2] -> 0.5
    assert running_rank([1.0, 3.0, 4.0, 2.0, 3.0], window=2)[-1] == pytest.approx(0.5)
    r = running_rank([np.nan, 2.0])
    assert math.isnan(r[0]) and r[1] == 0.5  # NaN is not remembered
    with pytest.raises(ValueError, match="window=0"):
        running_rank([1.0], window=0)


def test_anomaly_likelihood_hand_case() -> None:
    # short_window 1: the last error 3 against [0, 2, 0, 2] (mean 1, population std 1): z = 2
    lik = anomaly_likelihood([0.0, 2.0, 0.0, 2.0, 3.0], long_window=4, short_window=1, learning=0)
    assert lik[:2].tolist() == [0.5, 0.5]  # fewer than two errors of history
    assert lik[4] == pytest.approx(Phi(2.0))
    # at row 2: 0 against [0, 2] (mean 1, std 1): z = -1
    assert lik[2] == pytest.approx(Phi(-1.0))
    # short_window 2: averages 0, 1, 1, 1, 2.5; the last against [0, 1, 1, 1]: mean 0.75, var 0.1875
    lik = anomaly_likelihood([0.0, 2.0, 0.0, 2.0, 3.0], long_window=4, short_window=2, learning=0)
    assert lik[4] == pytest.approx(Phi(1.75 / math.sqrt(0.1875)))
    # long_window 2: the last average 2.5 against [1, 1] only: std 0 floored at min_std * mean = 0.05
    lik = anomaly_likelihood([0.0, 2.0, 0.0, 2.0, 3.0], long_window=2, short_window=2, learning=0)
    assert lik[4] == pytest.approx(Phi((2.5 - 1.0) / 0.05))
    # learning period: no opinion
    assert anomaly_likelihood([0.0, 2.0, 0.0, 2.0, 3.0], long_window=4, short_window=1,
                              learning=5).tolist() == [0.5] * 5


def test_out_of_range_hand_case() -> None:
    # seen range [1, 2] (width 1, tolerance 0.1 -> [0.9, 2.1]): 2.05 is inside, 3 is out, 0 is out
    assert out_of_range([1.0, 2.0, 1.5, 2.05, 3.0, 0.0], 0.1).tolist() == [False, False, False, False, True, True]
    # with a prior range and rows of several values (a window): [1.5, 2.5] leaves [0.9, 2.1]; the range is
    # then [1, 2.5] (tolerance 0.15), so 0.9 is inside
    rows = np.array([[1.0, 2.0], [1.5, 2.5], [0.9, 1.0]])
    assert out_of_range(rows, 0.1, lo=1.0, hi=2.0).tolist() == [False, True, False]
    # a zero-width range flags nothing
    assert out_of_range([5.0, 5.0, 6.0]).tolist() == [False, False, False]


def test_red_zone_filter_keeps_only_the_first_of_a_run() -> None:
    p = NormaliserParams(long_window=100, short_window=1, learning=0, range_tolerance=None)
    norm = ScoreNormaliser(p)
    rng = np.random.default_rng(0)
    norm.update(1.0 + 0.1 * rng.standard_normal(50))
    s = norm.update([100.0, 100.0, 100.0, 1.0, 100.0])
    assert s[0] >= 0.5  # red
    # the next two are red again and demoted to the yellow tail 1e-3: log_score(0.999) = 0.3
    assert s[1] == pytest.approx(log_score([0.999])[0])
    assert s[2] == pytest.approx(log_score([0.999])[0])
    # a refractory of 5 also demotes a red that comes a few quiet errors after the last one
    norm1 = ScoreNormaliser(NormaliserParams(long_window=100, short_window=1, learning=0, range_tolerance=None))
    norm1.update(1.0 + 0.1 * rng.standard_normal(50))
    s1 = norm1.update([100.0, 1.0, 1.0, 1.0, 100.0])
    assert s1[0] >= 0.5 and s1[4] >= 0.5
    norm5 = ScoreNormaliser(NormaliserParams(long_window=100, short_window=1, learning=0, range_tolerance=None,
                                             refractory=5))
    norm5.update(1.0 + 0.1 * rng.standard_normal(50)[::-1])
    s5 = norm5.update([100.0, 1.0, 1.0, 1.0, 100.0])
    assert s5[0] >= 0.5 and s5[4] < 0.5


def test_out_of_range_rule_scores_one() -> None:
    norm = ScoreNormaliser(NormaliserParams(learning=0))
    norm.observe_range([0.0, 10.0])
    s = norm.update([1.0, 1.0, 1.0], values=[5.0, 10.1, 10.5])  # tolerance 0.02 * 10 = 0.2 -> 10.2
    assert s[2] == 1.0 and s[1] < 1.0
    with pytest.raises(ValueError, match="values has 2 rows but errors has 3"):
        norm.update([1.0, 1.0, 1.0], values=[1.0, 2.0])


@pytest.mark.parametrize("transform", ["none", "log", "rank"])
def test_chunked_updates_equal_one_update(transform: str) -> None:
    rng = np.random.default_rng(1)
    errors = rng.gamma(2.0, 1.0, 600)
    errors[[100, 400, 401]] = [40.0, 60.0, 55.0]
    errors[250] = np.nan
    values = np.cumsum(rng.standard_normal(600))
    p = NormaliserParams(long_window=150, short_window=5, learning=20, transform=transform)  # type: ignore[arg-type]
    whole = ScoreNormaliser(p).update(errors, values)
    norm = ScoreNormaliser(p)
    cuts = [0, 1, 7, 150, 151, 320, 599, 600]
    parts = []
    for a, b in itertools.pairwise(cuts):
        # persist and restore between chunks, through JSON, as the daemon does
        norm = ScoreNormaliser.from_dict(json.loads(json.dumps(norm.to_dict())))
        parts.append(norm.update(errors[a:b], values[a:b]))
    chunked = np.concatenate(parts)
    assert np.isnan(whole[250]) and np.isnan(chunked[250])
    assert np.allclose(whole, chunked, equal_nan=True, atol=1e-9)
    assert np.nanmax(whole) <= 1.0 and np.nanmin(whole) >= 0.0


def test_scores_are_causal() -> None:
    rng = np.random.default_rng(2)
    errors = rng.gamma(2.0, 1.0, 400)
    a = ScoreNormaliser().update(errors, errors)
    changed = errors.copy()
    changed[300:] *= 10
    b = ScoreNormaliser().update(changed, changed)
    assert np.array_equal(a[:300], b[:300])
    assert not np.array_equal(a[300:], b[300:])


def test_state_is_bounded_and_restores() -> None:
    p = NormaliserParams(long_window=50, short_window=4)
    norm = ScoreNormaliser(p)
    norm.update(np.arange(1000.0), np.arange(1000.0))
    state = norm.to_dict()
    assert len(state["avg"]) == 50 and len(state["tail"]) == 3
    assert state["seen"] == 1000 and state["lo"] == 0.0 and state["hi"] == 999.0
    json.dumps(state)  # JSON-able
    with pytest.raises(ValueError, match="version 99"):
        ScoreNormaliser.from_dict({**state, "version": 99})
    with pytest.raises(ValueError, match="malformed"):
        ScoreNormaliser.from_dict({k: v for k, v in state.items() if k != "avg"})


@pytest.mark.parametrize(("changes", "message"), [
    ({"long_window": 1}, "long_window=1"),
    ({"short_window": 0}, "short_window=0"),
    ({"red": 0.1, "yellow": 0.01}, "red=0.1"),
    ({"transform": "sqrt"}, "transform='sqrt'"),
    ({"range_tolerance": -1.0}, "range_tolerance=-1.0"),
    ({"refractory": 0}, "refractory=0"),
])
def test_bad_parameters_name_the_value(changes: dict, message: str) -> None:
    with pytest.raises(ValueError, match=message):
        NormaliserParams(**changes)


@pytest.mark.parametrize("transform", ["none", "log"])
def test_one_error_at_a_time_scores_like_one_call(transform: str) -> None:
    """The daemon feeds one window per series per tick: that path must give the batch path's scores."""
    rng = np.random.default_rng(7)
    errors = rng.gamma(2.0, 1.0, 500)
    errors[[120, 300, 301, 302]] = [30.0, 45.0, 50.0, 41.0]
    errors[200] = np.nan
    values = rng.standard_normal((500, 8)).cumsum(axis=0)
    values[400, 3] = 1e3  # out of range
    values[410, :] = np.nan
    p = NormaliserParams(long_window=100, short_window=3, learning=10, transform=transform)  # type: ignore[arg-type]
    whole = ScoreNormaliser(p).update(errors, values)
    norm = ScoreNormaliser(p)
    single = np.concatenate([norm.update(errors[i : i + 1], values[i : i + 1]) for i in range(500)])
    assert np.isnan(single[200])
    np.testing.assert_allclose(single, whole, rtol=0, atol=1e-9, equal_nan=True)
    assert single[400] == 1.0  # the out-of-range rule fired on the single path too
    again = ScoreNormaliser(p)
    again.update(errors, values)
    assert again.to_dict()["avg"] == pytest.approx(norm.to_dict()["avg"], abs=1e-12)


@pytest.mark.parametrize("transform", ["none", "log"])
def test_update_many_scores_like_one_update_each(transform: str) -> None:
    """The daemon's tick updates many series' normalisers at once: same scores and states as one call each."""
    rng = np.random.default_rng(11)
    p = NormaliserParams(long_window=50, short_window=3, learning=10, transform=transform)  # type: ignore[arg-type]
    k = 40
    a = [ScoreNormaliser(p) for _ in range(k)]
    warm = [int(n) for n in rng.integers(0, 120, k)]  # some still learning or filling their history
    for n, w in zip(a, warm, strict=True):
        n.update(rng.gamma(2.0, 1.0, w), rng.standard_normal((w, 4)))
    b = [ScoreNormaliser.from_dict(n.to_dict()) for n in a]
    b[3] = ScoreNormaliser(NormaliserParams(long_window=20))  # other parameters: the one-by-one path
    a[3] = ScoreNormaliser.from_dict(b[3].to_dict())
    for step in range(30):
        errors = rng.gamma(2.0, 1.0, k)
        errors[step % k] = 40.0  # an anomaly somewhere, every step
        errors[(step * 7) % k] = np.nan
        values = rng.standard_normal((k, 4))
        values[(step * 3) % k, 1] = 50.0  # out of range
        one = np.array([n.update(errors[i : i + 1], values[i : i + 1])[0] for i, n in enumerate(a)])
        many = update_many(b, errors, values)
        np.testing.assert_allclose(many, one, rtol=0, atol=1e-9, equal_nan=True)
    for x, y in zip(a, b, strict=True):
        sx, sy = x.to_dict(), y.to_dict()
        for name in ("avg", "tail"):  # np.log and math.log may differ in the last bit
            np.testing.assert_allclose(sy.pop(name), sx.pop(name), rtol=0, atol=1e-12)
        assert sx == sy
    assert (many[~np.isnan(many)] >= 0).all() and np.nanmax(many) <= 1.0
