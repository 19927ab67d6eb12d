"""The score normaliser (anomalyd.core.normaliser): hand-computed likelihoods, chunk invariance, state, rules."""

from __future__ import annotations

import itertools
import json
import math
from typing import Literal

import numpy as np
import pytest

from anomalyd.core.normaliser import (
    HISTORY_DTYPE,
    HistoryPool,
    NormaliserParams,
    ScoreNormaliser,
    log_score,
    update_block,
)


def upper_tail(z: float) -> float:
    """P(Z > z) for a standard normal, written out."""
    return 0.5 * math.erfc(z / math.sqrt(2.0))


def nab_log(tail: float) -> float:
    """NAB's log scale, written out: log(tail) / log(1e-10), clipped to [0, 1]."""
    return min(1.0, max(0.0, math.log(tail) / math.log(1e-10))) if tail > 0 else 1.0


def bare(long_window: int, short_window: int, transform: Literal["none", "log"] = "none") -> NormaliserParams:
    """No learning period, no red-zone filter, no range rule: the bare likelihood."""
    return NormaliserParams(long_window=long_window, short_window=short_window, learning=0, red=0.0,
                            range_tolerance=None, transform=transform)


# -- log scale -------------------------------------------------------------------------------------


def test_log_score_hand_values() -> None:
    s = log_score([1.0, 0.5, 0.1, 1e-3, 1e-5, 0.0])
    assert s[0] == 0.0
    assert s[1] == pytest.approx(nab_log(0.5))
    assert s[2] == pytest.approx(0.1, abs=1e-8)
    assert s[3] == pytest.approx(0.3, abs=1e-6)
    assert s[4] == 0.5  # the red zone's edge is the decision's edge: red <=> score >= 0.5
    assert s[5] == 1.0
    assert log_score([-1.0, 2.0]).tolist() == [1.0, 0.0]  # tails are clipped into [0, 1] first
    assert np.all(np.diff(log_score(np.logspace(0, -12, 50))) >= 0)  # smaller tail, larger score


# -- the likelihood by hand --------------------------------------------------------------------------


def test_likelihood_short_window_one_by_hand() -> None:
    s = ScoreNormaliser(bare(4, 1)).update([0.0, 2.0, 0.0, 2.0, 3.0])
    neutral = nab_log(0.5)
    assert s[0] == pytest.approx(neutral) and s[1] == pytest.approx(neutral)  # fewer than 2 in the reference
    # 0 against [0, 2]: mean 1, std 1 -> z = -1
    assert s[2] == pytest.approx(nab_log(upper_tail(-1.0)), rel=1e-9)
    # 2 against [0, 2, 0]: mean 2/3, variance 4/3 - 4/9 = 8/9 -> z = (4/3) / sqrt(8/9) = sqrt(2)
    assert s[3] == pytest.approx(nab_log(upper_tail(math.sqrt(2.0))), rel=1e-9)
    # 3 against [0, 2, 0, 2]: mean 1, std 1 -> z = 2
    assert s[4] == pytest.approx(nab_log(upper_tail(2.0)), rel=1e-9)


def test_likelihood_averages_the_short_window_by_hand() -> None:
    s = ScoreNormaliser(bare(4, 2)).update([0.0, 2.0, 0.0, 2.0, 3.0])
    # averages of the last two errors: 0, 1, 1, 1, 2.5
    # row 3: 1 against [0, 1, 1]: mean 2/3, variance 2/3 - 4/9 = 2/9 -> z = (1/3) / sqrt(2/9)
    assert s[3] == pytest.approx(nab_log(upper_tail((1 / 3) / math.sqrt(2 / 9))), rel=1e-9)
    # row 4: 2.5 against [0, 1, 1, 1]: mean 0.75, variance 0.75 - 0.5625 = 0.1875
    assert s[4] == pytest.approx(nab_log(upper_tail(1.75 / math.sqrt(0.1875))), rel=1e-9)


def test_the_reference_forgets_beyond_long_window_by_hand() -> None:
    s = ScoreNormaliser(bare(2, 1)).update([0.0, 2.0, 0.0, 2.0, 3.0])
    # row 3: 2 against the last two [2, 0] (the first 0 is forgotten): z = 1; row 4: 3 against [0, 2]: z = 2
    assert s[3] == pytest.approx(nab_log(upper_tail(1.0)), rel=1e-9)
    assert s[4] == pytest.approx(nab_log(upper_tail(2.0)), rel=1e-9)


def test_spread_floor_is_relative_without_transform_and_absolute_with_log() -> None:
    # 12 against [10, 10, 10]: std 0, floored at 0.05 * 10 = 0.5 -> z = 4
    s = ScoreNormaliser(bare(10, 1)).update([10.0, 10.0, 10.0, 12.0])
    assert s[3] == pytest.approx(nab_log(upper_tail(4.0)), rel=1e-6)
    # log: log(10 e^0.2) - log(10) = 0.2 against a spread floored at 0.05 (absolute) -> z = 4
    p = bare(10, 1, "log")
    s = ScoreNormaliser(p).update([10.0, 10.0, 10.0, 10.0 * math.exp(0.2)])
    assert s[3] == pytest.approx(nab_log(upper_tail(4.0)), rel=1e-6)
    # log: 0, 1, 0, 1 then 3 (errors e^0, e^1, ...) -> mean 0.5, std 0.5 -> z = 5
    s = ScoreNormaliser(p).update(np.exp([0.0, 1.0, 0.0, 1.0, 3.0]))
    assert s[4] == pytest.approx(nab_log(upper_tail(5.0)), rel=1e-6)


def test_learning_period_scores_the_neutral_likelihood() -> None:
    p = NormaliserParams(long_window=50, short_window=1, learning=5, range_tolerance=None)
    # NaN errors are not counted: the spike is the 5th finite error, still in the learning period
    s = ScoreNormaliser(p).update([1.0, 1.1, np.nan, 0.9, 1.0, 50.0])
    assert math.isnan(s[2])
    assert s[[0, 1, 3, 4, 5]].tolist() == [nab_log(0.5)] * 5
    assert s[5] == log_score(0.5)
    # the same spike as the 6th finite error is scored, and high
    s = ScoreNormaliser(p).update([1.0, 1.1, 0.95, 0.9, 1.0, 50.0])
    assert s[5] >= 0.5


# -- out-of-range rule --------------------------------------------------------------------------------


def _warm(p: NormaliserParams, n: int = 60, seed: int = 0) -> ScoreNormaliser:
    norm = ScoreNormaliser(p)
    norm.update(1.0 + 0.1 * np.random.default_rng(seed).standard_normal(n))
    return norm


def test_out_of_range_rule_is_per_field() -> None:
    norm = _warm(NormaliserParams(long_window=100, short_window=1, learning=0))
    norm.observe_range([[0.0, 0.0], [10.0, 1.0]])  # field 0 seen in [0, 10], field 1 in [0, 1]
    assert norm.lo is not None and norm.hi is not None
    assert norm.lo.tolist() == [0.0, 0.0] and norm.hi.tolist() == [10.0, 1.0]
    errors = [1.0, 1.0, 1.0, 1.0, 1.0]
    # tolerance 2% of the width: field 0 may reach 10.2, field 1 1.02 (and -0.02 below)
    lo = [[0.0, 0.0], [0.0, 0.0], [0.0, 0.5], [0.0, -0.03], [0.0, 0.0]]
    hi = [[10.15, 1.0], [5.0, 1.05], [5.0, 0.9], [5.0, 0.5], [5.0, 1.05]]
    s = norm.update(errors, lo, hi)
    assert s[0] < 0.5  # 10.15 is inside field 0's tolerance
    assert s[1] == 1.0  # 1.05 leaves field 1's range (it would be fine in field 0)
    assert s[2] < 0.5
    assert s[3] == 1.0  # below field 1's range
    assert s[4] < 0.5  # field 1's range now includes 1.05: it was widened by the window that left it
    assert norm.lo.tolist() == [0.0, -0.03] and norm.hi.tolist() == [10.15, 1.05]


def test_out_of_range_rule_can_be_turned_off_and_ignores_a_flat_range() -> None:
    off = _warm(NormaliserParams(long_window=100, short_window=1, learning=0, range_tolerance=None))
    off.observe_range([0.0, 1.0])
    assert off.update([1.0], [0.0], [5.0])[0] < 0.5
    flat = _warm(NormaliserParams(long_window=100, short_window=1, learning=0))
    flat.observe_range([3.0, 3.0])  # zero width: nothing to compare against
    assert flat.update([1.0], [3.0], [9.0])[0] < 0.5


# -- red-zone filter ----------------------------------------------------------------------------------


def test_a_second_consecutive_red_is_demoted_to_yellow() -> None:
    p = NormaliserParams(long_window=100, short_window=1, learning=0, range_tolerance=None)
    s = _warm(p).update([100.0, 100.0, 1.0, 100.0])
    assert s[0] >= 0.5
    assert s[1] == log_score(p.yellow)  # red right after red: the yellow tail, exactly
    assert s[1] == pytest.approx(0.3, abs=1e-6)
    assert s[2] < 0.5
    assert s[3] >= 0.5  # a red after a quiet error counts again
    # across calls: the memory of the last red is part of the state
    norm = _warm(p)
    assert norm.update([100.0])[0] >= 0.5
    assert norm.update([100.0])[0] == log_score(p.yellow)
    # a longer refractory period demotes a red a few quiet errors later
    s5 = _warm(NormaliserParams(long_window=100, short_window=1, learning=0, range_tolerance=None,
                                refractory=5)).update([100.0, 1.0, 1.0, 1.0, 100.0])
    s1 = _warm(p).update([100.0, 1.0, 1.0, 1.0, 100.0])
    assert s5[0] >= 0.5 and s5[4] == log_score(p.yellow)
    assert s1[0] >= 0.5 and s1[4] >= 0.5
    # red = 0 turns the filter off
    s0 = _warm(NormaliserParams(long_window=100, short_window=1, learning=0, range_tolerance=None,
                                red=0.0)).update([100.0, 100.0])
    assert (s0 >= 0.5).all()


def test_a_second_consecutive_out_of_range_window_is_demoted_too() -> None:
    p = NormaliserParams(long_window=100, short_window=1, learning=0)
    norm = _warm(p)
    norm.observe_range([0.0, 1.0])
    twin = norm.copy()  # the same likelihood, without the range rule
    lo, hi = [[0.0], [0.0], [0.0]], [[2.0], [3.0], [0.5]]
    s = norm.update([1.0, 1.0, 1.0], lo, hi)
    plain = twin.update([1.0, 1.0, 1.0])
    assert s[0] == 1.0 and plain[0] < 0.5
    # out of range again (3 > 2.04) right after: demoted, it keeps only its likelihood (at most yellow's score)
    assert s[1] == plain[1] and s[1] <= log_score(p.yellow)
    assert s[2] == plain[2]


# -- chunk invariance, many series ---------------------------------------------------------------------


def _stream(seed: int, k: int, d: int = 3) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    rng = np.random.default_rng(seed)
    errors = rng.gamma(2.0, 1.0, k)
    errors[rng.choice(k, 8, replace=False)] = rng.uniform(20.0, 80.0, 8)  # spikes
    errors[rng.choice(k, 12, replace=False)] = np.nan  # windows that could not be scored
    errors[100:104] = [60.0, 70.0, 65.0, np.nan]  # a lasting anomaly
    centre = np.cumsum(rng.standard_normal((k, d)), axis=0)
    lo = centre - rng.uniform(0.0, 1.0, (k, d))
    hi = centre + rng.uniform(0.0, 1.0, (k, d))
    hi[rng.choice(k, 5, replace=False), rng.integers(0, d)] += 40.0  # out of range
    return errors, lo, hi


@pytest.mark.parametrize("transform", ["none", "log"])
@pytest.mark.parametrize("seed", [0, 1, 2])
def test_scores_are_bit_identical_however_the_stream_is_chunked(transform: str, seed: int) -> None:
    p = NormaliserParams(long_window=60, short_window=5, learning=20, transform=transform)  # type: ignore[arg-type]
    errors, lo, hi = _stream(seed, 700)
    one = ScoreNormaliser(p)
    whole = one.update(errors, lo, hi)
    assert np.isnan(whole).sum() == np.isnan(errors).sum()
    assert np.nanmin(whole) >= 0.0 and np.nanmax(whole) <= 1.0
    rng = np.random.default_rng(100 + seed)
    # random cuts, always with single errors and chunks longer than long_window (several exact
    # recomputations inside one call)
    cuts = np.unique(np.concatenate(([0, 1, 2, 250, 251, 700], rng.integers(0, 700, 25))))
    assert np.diff(cuts).max() > p.long_window
    norm = ScoreNormaliser(p)
    parts = [norm.update(errors[:0])]
    for i, (a, b) in enumerate(itertools.pairwise(cuts)):
        if i % 3 == 0:  # persisted and restored between ticks, through JSON, as the daemon does
            norm = ScoreNormaliser.from_dict(json.loads(json.dumps(norm.to_dict())))
        parts.append(norm.update(errors[a:b], lo[a:b], hi[a:b]))
    chunked = np.concatenate(parts)
    assert np.array_equal(whole, chunked, equal_nan=True)
    assert norm.to_dict() == one.to_dict()


def test_one_error_at_a_time_equals_one_call() -> None:
    p = NormaliserParams(long_window=40, short_window=3, learning=10)
    errors, lo, hi = _stream(5, 300, d=2)
    whole = ScoreNormaliser(p).update(errors, lo, hi)
    norm = ScoreNormaliser(p)
    single = np.concatenate([norm.update(errors[i : i + 1], lo[i : i + 1], hi[i : i + 1]) for i in range(300)])
    assert np.array_equal(whole, single, equal_nan=True)
    assert (whole == 1.0).any()  # the out-of-range rule took part


@pytest.mark.parametrize("transform", ["none", "log"])
def test_update_block_over_many_series_equals_one_by_one(transform: str) -> None:
    rng = np.random.default_rng(11)
    p = NormaliserParams(long_window=50, short_window=3, learning=10, transform=transform)  # type: ignore[arg-type]
    n, d = 30, 2
    a = [ScoreNormaliser(p) for _ in range(n)]
    for i, nm in enumerate(a):  # one new, some still learning, some with a full history
        w = int(rng.integers(1, 150))
        if i:
            nm.update(rng.gamma(2.0, 1.0, w), rng.standard_normal((w, d)) - 1, rng.standard_normal((w, d)) + 1)
    b = [nm.copy() for nm in a]
    for step in range(25):
        k = int(rng.integers(1, 5))
        errors = rng.gamma(2.0, 1.0, (n, k))
        errors[step % n] = 40.0  # an anomaly somewhere, every step
        errors[(step * 7) % n, 0] = np.nan
        lo = rng.standard_normal((n, k, d)) - 1
        hi = lo + 2.0
        hi[(step * 3) % n, -1, 1] = 50.0  # out of range
        one = np.stack([nm.update(errors[i], lo[i], hi[i]) for i, nm in enumerate(a)])
        many = update_block(b, errors, lo, hi)
        assert np.array_equal(one, many, equal_nan=True)
    for x, y in zip(a, b, strict=True):
        assert x.to_dict() == y.to_dict()
    assert (many[~np.isnan(many)] >= 0).all()


def test_update_block_refuses_mixed_parameters_and_handles_empty_blocks() -> None:
    norms = [ScoreNormaliser(), ScoreNormaliser(NormaliserParams(long_window=20))]
    with pytest.raises(ValueError, match="same parameters"):
        update_block(norms, np.ones((2, 3)))
    assert update_block([], np.empty((0, 4))).shape == (0, 4)
    before = norms[0].to_dict()
    assert update_block(norms[:1], np.empty((1, 0))).shape == (1, 0)
    out = update_block(norms[:1], np.full((1, 3), np.nan))
    assert np.isnan(out).all() and norms[0].to_dict() == before  # NaN errors are not remembered


def test_an_empty_chunk_with_ranges_is_a_no_op() -> None:
    """A tick with no new window: nothing to score, nothing changes (update_block already does this; `update`
    with lo/hi must too: reshaping an empty lo to (1, 0, -1) is ambiguous)."""
    norm = _warm(NormaliserParams(long_window=30, short_window=2))
    before = norm.to_dict()
    for lo in (np.empty((0, 2)), np.empty(0)):
        out = norm.update(np.empty(0), lo, lo)
        assert out.shape == (0,)
    assert norm.to_dict() == before


def test_running_sums_are_recomputed_exactly_after_a_huge_spike() -> None:
    """Without the exact recomputation every long_window errors, adding and later subtracting a 1e12 spike
    (and 1e24 in the sum of squares) would leave the sums wrong for good."""
    L = 100
    p = NormaliserParams(long_window=L, short_window=1, learning=0, range_tolerance=None)
    rng = np.random.default_rng(3)
    norm = ScoreNormaliser(p)
    norm.update(1.0 + 0.1 * rng.standard_normal(150))
    norm.update([1e12])
    for _ in range(40):  # the spike leaves the reference and several recomputations happen, in chunks of 17
        norm.update(1.0 + 0.1 * rng.standard_normal(17))
    # stop right at a recomputation (seen is a multiple of long_window)
    norm.update(1.0 + 0.1 * rng.standard_normal(L - norm.seen % L))
    assert norm.seen % L == 0 and len(norm.hist) == L
    assert norm.hist.max() < 2.0  # the spike is gone from the reference
    assert norm.s1 == pytest.approx(math.fsum(norm.hist), rel=1e-14)  # recomputed from the history itself
    assert norm.s2 == pytest.approx(math.fsum(norm.hist * norm.hist), rel=1e-14)
    # between recomputations the step-by-step sums stay close, and the likelihood works again
    more = 1.0 + 0.1 * rng.standard_normal(37)
    norm.update(more)
    assert norm.s1 == pytest.approx(math.fsum(norm.hist), rel=1e-12)
    assert norm.s2 == pytest.approx(math.fsum(norm.hist * norm.hist), rel=1e-12)
    assert norm.update([3.0])[0] >= 0.5  # 20 sigma above the reference
    assert norm.update([1.0])[0] < 0.5


# -- state ----------------------------------------------------------------------------------------


def test_state_roundtrips_through_json_and_continues_identically() -> None:
    p = NormaliserParams(long_window=50, short_window=4, learning=5)
    errors, lo, hi = _stream(7, 400, d=2)
    lo[:, 1] = np.nan  # a field never seen: its range stays unknown (NaN, None in JSON)
    hi[:, 1] = np.nan
    norm = ScoreNormaliser(p)
    norm.update(errors[:300], lo[:300], hi[:300])
    state = norm.to_dict()
    text = json.dumps(state, allow_nan=False)  # strict JSON: no NaN or Infinity tokens
    assert len(state["hist"]) == 50 and len(state["tail"]) == 3 and state["version"] == 3
    assert state["seen"] == int(np.isfinite(errors[:300]).sum())
    assert state["lo"][1] is None and state["hi"][1] is None
    again = ScoreNormaliser.from_dict(json.loads(text))
    assert again.params == p
    assert again.to_dict() == state
    a = norm.update(errors[300:], lo[300:], hi[300:])
    b = again.update(errors[300:], lo[300:], hi[300:])
    assert np.array_equal(a, b, equal_nan=True)


def test_snapshot_and_copy_are_independent() -> None:
    norm = _warm(NormaliserParams(long_window=30, short_window=2))
    norm.observe_range([0.0, 1.0])
    twin = norm.copy()
    snap = norm.snapshot()
    norm.update([5.0, 6.0], [-1.0, -2.0], [3.0, 4.0])
    assert twin.seen == snap["seen"] == norm.seen - 2
    assert twin.lo is not None and twin.lo.tolist() == [0.0] and snap["hi"].tolist() == [1.0]
    assert ScoreNormaliser.from_dict(snap).to_dict() == twin.to_dict()


def test_refs_and_restore_undo_an_update() -> None:
    """The daemon takes `refs` before a tick and `restore`s them when the tick's writes fail: whatever update_block
    changes in place (the history ring, the small arrays) comes back as it was."""
    p = NormaliserParams(long_window=20, short_window=3, learning=2)
    errors, lo, hi = _stream(8, 200, d=2)
    norm = ScoreNormaliser(p)
    norm.update(errors[:150], lo[:150], hi[:150])
    before = norm.to_dict()
    refs = norm.refs()
    first = norm.update(errors[150:], lo[150:], hi[150:])
    assert norm.to_dict() != before
    norm.restore(refs)
    assert norm.to_dict() == before
    assert np.array_equal(norm.update(errors[150:], lo[150:], hi[150:]), first, equal_nan=True)


def test_the_small_arrays_are_rows_of_the_pool_written_in_place_and_refs_snapshots_them() -> None:
    """Issue 12: a series' scalars, tail and seen range live in its row of the pool's state blocks (no Python object
    per series per update), of the size the settings give (short_window - 1 values, one per field); the
    attributes give copies; `refs` snapshots them into the pool's journal, so a rollback still restores."""
    p = NormaliserParams(long_window=20, short_window=3, learning=2)
    errors, lo, hi = _stream(8, 200, d=2)
    norm = ScoreNormaliser(p)
    norm.update(errors[:100], lo[:100], hi[:100])
    pool = norm._pool
    state = pool.state(norm._row)
    assert state.base is not None and any(state.base is blk for blk in pool.states)
    assert pool.tail_width == p.short_window - 1
    tail, n_lo, n_hi = norm.tail, norm.lo, norm.hi
    assert n_lo is not None and n_hi is not None
    assert tail.nbytes == (p.short_window - 1) * 8 and n_lo.nbytes == n_hi.nbytes == 2 * 8
    assert np.array_equal(state[-len(tail) :], tail)
    assert np.array_equal(pool.range_row(norm._row, 2), np.stack([n_lo, n_hi]))
    saved = [a.copy() for a in (tail, n_lo, n_hi)]
    scalars = (norm.s1, norm.s2, norm.seen, norm.since_red)
    refs = norm.refs()
    assert len(refs) == 1 and isinstance(refs[0], int)  # a mark in the journal, not copies
    norm.update(errors[100:150], lo[100:150] - 50, hi[100:150] + 50)
    assert pool.state(norm._row).base is state.base  # written in place
    assert norm.lo is not None and not np.array_equal(norm.lo, saved[1])
    norm.restore(refs)
    for a, b in zip((norm.tail, norm.lo, norm.hi), saved, strict=True):
        assert a is not None and np.array_equal(a, b)
    assert (norm.s1, norm.s2, norm.seen, norm.since_red) == scalars


def test_refs_and_restore_undo_updates_that_wrap_the_ring_and_nested_refs() -> None:
    """The history is a ring updated in place: `restore` undoes the writes since `refs` from an undo log, also when
    an update wraps around the ring or pushes more than a whole history at once, and refs taken one after the other
    are undone newest first (as the worker does)."""
    L = 16
    p = NormaliserParams(long_window=L, short_window=3, learning=2)
    errors, lo, hi = _stream(9, 200, d=1)
    norm = ScoreNormaliser(p)
    norm.update(errors[:23], lo[:23], hi[:23])  # full, head not at 0
    start = norm.to_dict()
    r1 = norm.refs()
    norm.update(errors[23:30], lo[23:30], hi[23:30])  # wraps
    mid = norm.to_dict()
    r2 = norm.refs()
    norm.update(errors[30:70], lo[30:70], hi[30:70])  # more than a whole history
    norm.restore(r2)
    assert norm.to_dict() == mid
    norm.update(errors[30:70], lo[30:70], hi[30:70])
    norm.restore(r2)
    norm.restore(r1)
    assert norm.to_dict() == start
    again = norm.update(errors[23:], lo[23:], hi[23:])
    fresh = ScoreNormaliser(p)
    fresh.update(errors[:23], lo[:23], hi[:23])
    assert np.array_equal(again, fresh.update(errors[23:], lo[23:], hi[23:]), equal_nan=True)
    # After `release` the log is gone: what the next refs undoes starts there.
    norm.refs()
    norm.update(errors[:5])
    norm.release()
    assert norm._journal_head == -1
    assert norm._pool._logging == 0 and norm._pool._jn == 0  # no chain open: the journal is emptied


def test_the_undo_log_holds_only_what_an_update_overwrote() -> None:
    """The rollback of a tick costs the values a tick overwrote, not a copy of the history: nothing for a history
    that is not full yet (the update only wrote past its end), 16 values for a full one."""
    from anomalyd.core.normaliser import _J_KIND, _J_LEN

    for n_before, logged in ((1000, 0), (2500, 16)):
        p = NormaliserParams()
        norm = ScoreNormaliser(p)
        norm.update(1.0 + 0.01 * np.arange(float(n_before)) % 1.0)
        (mark,) = norm.refs()
        norm.update(np.ones(16))
        pool = norm._pool
        head = norm._journal_head
        recs = pool._jrec[mark + 1 : head + 1] if head > mark else pool._jrec[:0]
        assert all(int(r[_J_KIND]) >= 0 for r in recs)  # where each overwritten run starts
        assert sum(int(r[_J_LEN]) for r in recs) == logged
        norm.release()


def test_histories_are_rows_of_shared_blocks_with_a_bounded_size_per_series() -> None:
    """The memory claim of issue 12, as structure: each series' history is a row (a view) of a block shared by the
    normalisers of that long_window, `HISTORY_DTYPE` values, sized to what it holds (steps of `_RING_STEP` values)
    until it holds long_window of them, and updates write into that row (no new array per series per update)."""
    from anomalyd.core.normaliser import _RING_STEP

    L = 3 * _RING_STEP + 44
    p = NormaliserParams(long_window=L, short_window=4)
    norms = [ScoreNormaliser(p) for _ in range(50)]
    pool = HistoryPool.of(L, HISTORY_DTYPE, p.short_window)
    assert pool.dtype == HISTORY_DTYPE and HISTORY_DTYPE.itemsize <= 4
    assert all(nm.history_bytes == 0 for nm in norms)  # nothing held yet, no row
    rng = np.random.default_rng(1)
    sizes = set()
    for _ in range(40):  # 40 ticks of 16 windows: more than a whole history
        rings = [nm._ring for nm in norms]
        update_block(norms, 1.0 + 0.1 * rng.standard_normal((50, 16)))
        for nm, ring in zip(norms, rings, strict=True):
            held = nm.history_length
            cap = nm.history_bytes // HISTORY_DTYPE.itemsize
            assert held <= cap == min(L, -(-held // _RING_STEP) * _RING_STEP)  # the smallest step that holds it
            blocks = {id(b) for b in pool.rings[pool.class_for(np.array([held]))[0]].blocks if b is not None}
            assert nm._ring.base is not None and id(nm._ring.base) in blocks
            if len(ring) == cap:  # it did not move: written in place
                assert np.shares_memory(nm._ring, ring)
            sizes.add(cap)
        assert len({id(nm._ring.base) for nm in norms}) <= 2  # 50 series: one block (two if they straddle)
    assert sizes == {_RING_STEP, 2 * _RING_STEP, 3 * _RING_STEP, L}
    assert all(nm.history_length == len(nm.hist) == L for nm in norms)
    # The smaller rows are free again, and their blocks let go.
    assert all(all(b is None for b in rings.blocks) for rings in pool.rings[:-1])
    # A normaliser that goes away gives its row back for the next one.
    row = norms[-1]._row
    del norms[-1], rings, nm, ring
    assert ScoreNormaliser(p)._row == row


def test_the_history_is_stored_rounded_and_the_sums_follow_the_stored_values() -> None:
    p = NormaliserParams(long_window=40, short_window=3, learning=5)
    norm = ScoreNormaliser(p)
    e = 1.0 + 0.1 * np.random.default_rng(5).standard_normal(97)
    norm.update(e)
    h = norm.hist
    assert h.dtype == np.float64 and np.array_equal(h, h.astype(HISTORY_DTYPE).astype(np.float64))
    assert norm.s1 == pytest.approx(math.fsum(h), rel=1e-12)
    # An average beyond the storage type's range is stored as its largest value, not as inf.
    norm.update([1e60] * 3)
    assert np.isfinite(norm.hist).all() and np.isfinite(norm.s2)


def test_pickled_normalisers_carry_their_state_not_the_pool() -> None:
    import pickle

    norm = _warm(NormaliserParams(long_window=30, short_window=2))
    blob = pickle.dumps(norm)
    assert len(blob) < 4000
    again = pickle.loads(blob)
    assert again.to_dict() == norm.to_dict() and again._row != norm._row


def test_a_version_2_state_loads_with_its_history_rounded() -> None:
    """States saved before the float32 history (version 2, float64) are continued."""
    from pathlib import Path

    old = json.loads((Path(__file__).parent / "data" / "scores_v2.json").read_text())["dict_v2"]
    assert old["version"] == 2
    norm = ScoreNormaliser.from_dict(old)
    assert norm.seen == old["seen"] and norm.s1 == old["s1"] and norm.s2 == old["s2"]
    assert norm.hist.tolist() == np.asarray(old["hist"], dtype=HISTORY_DTYPE).astype(np.float64).tolist()
    assert norm.to_dict()["version"] == 3


def test_other_versions_and_malformed_states_are_refused() -> None:
    state = _warm(NormaliserParams()).to_dict()
    with pytest.raises(ValueError, match="version 1 is not 3"):
        ScoreNormaliser.from_dict({**state, "version": 1})
    with pytest.raises(ValueError, match="version None"):
        ScoreNormaliser.from_dict({k: v for k, v in state.items() if k != "version"})
    with pytest.raises(ValueError, match="malformed"):
        ScoreNormaliser.from_dict({k: v for k, v in state.items() if k != "hist"})
    with pytest.raises(ValueError, match="malformed"):
        ScoreNormaliser.from_dict({**state, "seen": "many"})


@pytest.mark.parametrize(("changes", "message"), [
    ({"long_window": 1}, "long_window=1 must be at least 2"),
    ({"short_window": 0}, "short_window=0 must be between 1 and long_window=2000"),
    ({"long_window": 10, "short_window": 11}, "short_window=11 must be between 1 and long_window=10"),
    ({"min_std": -0.1}, r"min_std=-0.1 must be a finite number >= 0"),
    ({"min_std": math.inf}, r"min_std=inf must be a finite number"),
    ({"learning": -1}, "learning=-1 must be >= 0"),
    ({"red": 0.1, "yellow": 0.01}, "red=0.1 and yellow=0.01 must satisfy 0 <= red <= yellow < 1"),
    ({"yellow": 1.0}, "yellow=1.0 must satisfy"),
    ({"range_tolerance": -1.0}, r"range_tolerance=-1.0 must be >= 0, or None"),
    ({"refractory": 0}, "refractory=0 must be at least 1"),
    ({"transform": "rank"}, "transform='rank' is not one of none, log"),
])
def test_bad_parameters_name_the_value(changes: dict, message: str) -> None:
    with pytest.raises(ValueError, match=message):
        NormaliserParams(**changes)


# -- overflow (issue 14 item 7), capped range growth, robust reference -----------------------------


def _ranged(k: int, seed: int = 0) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """k windows of a well-behaved series: errors around 1, values within [-1, 1]."""
    rng = np.random.default_rng(seed)
    err = 1.0 + 0.1 * rng.standard_normal(k)
    lo = -1.0 + 0.01 * rng.random(k)
    hi = 1.0 - 0.01 * rng.random(k)
    return err, lo, hi


def test_an_overflowing_range_width_does_not_disable_the_rule() -> None:
    p = NormaliserParams(long_window=200, short_window=1, learning=0, range_growth=1.0)
    err, lo, hi = _ranged(300)
    norm = ScoreNormaliser(p)
    norm.update(err[:100], lo[:100], hi[:100])
    # One window spanning -1e308..1e308: hi - lo overflows to infinity.
    with np.errstate(over="raise"):
        norm.update([1.0], [-1e308], [1e308])
    assert np.isfinite(norm.hi).all() and np.isfinite(norm.lo).all()
    assert float(norm.hi[0] - norm.lo[0]) < 10.0  # widened by at most its own width on each side
    normal = norm.update(err[100:200], lo[100:200], hi[100:200])
    assert float(normal.max()) < 1.0
    spike = norm.update([1.0], [0.0], [50.0])  # a later spike out of the range: the rule still fires
    assert float(spike[0]) == 1.0


def test_without_a_growth_cap_the_glitch_widens_the_range_for_good() -> None:
    # The behaviour the cap fixes (so the test above can fail): the glitch's range swallows the later spike.
    p = NormaliserParams(long_window=200, short_window=1, learning=0, range_growth=None)
    err, lo, hi = _ranged(200)
    norm = ScoreNormaliser(p)
    norm.update(err[:100], lo[:100], hi[:100])
    norm.update([1.0], [-1e308], [1e308])
    norm.update(err[100:200], lo[100:200], hi[100:200])
    assert float(norm.update([1.0], [0.0], [50.0])[0]) < 1.0


def test_non_finite_window_bounds_never_enter_the_range() -> None:
    p = NormaliserParams(long_window=200, short_window=1, learning=0, range_growth=None)
    err, lo, hi = _ranged(100)
    norm = ScoreNormaliser(p)
    norm.update(err, lo, hi)
    norm.update([1.0, 1.0], [-np.inf, np.nan], [np.inf, np.nan])
    assert np.isfinite(norm.hi).all() and np.isfinite(norm.lo).all()
    assert float(norm.update([1.0], [0.0], [50.0])[0]) == 1.0


def test_huge_errors_do_not_overflow_the_running_sums() -> None:
    p = NormaliserParams(long_window=50, short_window=2, learning=0, range_tolerance=None)
    norm = ScoreNormaliser(p)
    with np.errstate(over="raise", invalid="raise"):
        out = norm.update(np.concatenate([np.ones(60), [1e308], np.ones(60)]))
    assert np.isfinite(out).all() and math.isfinite(norm.s2)


@pytest.mark.parametrize("reference", ["gaussian", "robust"])
@pytest.mark.parametrize("growth", [None, 0.0, 1.0])
def test_capped_range_and_robust_reference_are_chunk_invariant(reference: str, growth: float | None) -> None:
    p = NormaliserParams(long_window=60, short_window=3, learning=5, range_growth=growth,
                         reference=reference)  # type: ignore[arg-type]
    rng = np.random.default_rng(7)
    k = 400
    err = np.abs(1.0 + 0.2 * rng.standard_normal(k))
    err[[50, 51, 200, 330]] = [9.0, 12.0, 30.0, np.nan]
    lo = rng.uniform(-1.0, -0.5, k)
    hi = rng.uniform(0.5, 1.0, k) + np.where(np.arange(k) % 97 == 5, 3.0 + np.arange(k) / 50, 0.0)
    one = ScoreNormaliser(p)
    whole = one.update(err, lo, hi)
    many = ScoreNormaliser(p)
    parts = [many.update(err[a : a + c], lo[a : a + c], hi[a : a + c])
             for a, c in zip(range(0, k, 37), itertools.repeat(37), strict=False)]
    assert np.array_equal(whole, np.concatenate(parts), equal_nan=True)
    assert one.to_dict() == many.to_dict()


def test_robust_reference_keeps_a_larger_later_error_above_an_earlier_burst() -> None:
    # An earlier burst widens the Gaussian reference so that a later, larger rise scores lower than the burst;
    # the median/IQR reference keeps the ranking.
    rng = np.random.default_rng(3)
    err = 1.0 + 0.05 * rng.standard_normal(1400)
    err[1000:1100] = 4.0  # a burst (under a quarter of the history)
    err[1300] = 6.0  # later, clearly larger than anything seen
    scores = {}
    for ref in ("gaussian", "robust"):
        p = NormaliserParams(long_window=500, short_window=1, learning=0, red=0.0, range_tolerance=None,
                             reference=ref)  # type: ignore[arg-type]
        scores[ref] = ScoreNormaliser(p).update(err)
    assert scores["robust"][1300] >= scores["robust"][1000]
    assert scores["gaussian"][1300] < scores["gaussian"][1000]  # the failure the option fixes


def test_field_surprise_against_the_fields_own_history() -> None:
    from anomalyd.core.normaliser import field_surprise

    nm = ScoreNormaliser()
    nm.fm, nm.fv = np.array([1.0, 10.0]), np.array([0.01, 1.0])
    z, rebased = field_surprise([nm], np.array([[[1.5, 12.0]]]), span=3)
    assert z[0, 0].tolist() == pytest.approx([5.0, 2.0])  # (1.5 - 1) / 0.1, (12 - 10) / 1
    assert not rebased.any()
    a = 0.5  # 2 / (span + 1)
    assert nm.fm.tolist() == pytest.approx([1.0 + a * 0.5, 10.0 + a * 2.0])
    assert nm.fv.tolist() == pytest.approx([(1 - a) * (0.01 + a * 0.25), (1 - a) * (1.0 + a * 4.0)])
    # The spread is floored at surprise_floor of the mean: a field with a flat history is not infinitely surprised.
    nm2 = ScoreNormaliser()
    nm2.fm, nm2.fv = np.array([2.0]), np.array([0.0])
    z2, _ = field_surprise([nm2], np.array([[[3.0]]]), span=10, min_rel_std=0.1)
    assert float(z2[0, 0, 0]) == pytest.approx(5.0)


def test_field_surprise_gate_and_rebaseline_and_state_round_trip() -> None:
    from anomalyd.core.normaliser import field_surprise

    nm = ScoreNormaliser()
    nm.fm, nm.fv = np.array([1.0]), np.array([0.01])
    e = np.full((1, 6, 1), 5.0)  # a sustained jump
    z, rebased = field_surprise([nm], e, span=10, gate=3.0, rebaseline=4)
    assert rebased[0, :, 0].tolist() == [False, False, False, True, False, False]
    assert z[0, :4, 0].tolist() == pytest.approx([40.0] * 4)  # gated: the history did not move
    assert abs(float(z[0, 4, 0])) < 1.0  # re-baselined at the new level
    state = json.loads(json.dumps(nm.to_dict()))
    again = ScoreNormaliser.from_dict(state)
    assert again.fm is not None and again.fm.tolist() == nm.fm.tolist()
    fm = again.fm
    mark = again.refs()
    again.fm = None
    again.restore(mark)
    assert again.fm is fm  # refs keeps the per-field arrays (field_surprise replaces them)
    old = {k: v for k, v in state.items() if k not in ("fm", "fv", "fn")}  # a state saved before the option
    assert ScoreNormaliser.from_dict(old).fm is None


# -- ranking options (issue 11 item 3): unsaturated top, record rule, history gate ------------------------------

RANKING_OPTIONS = [{"unsaturated": True}, {"record_factor": 1.0}, {"record_factor": 1.5, "unsaturated": True},
                   {"record_factor": 1.0, "record_scope": "flagged", "unsaturated": True},
                   {"record_factor": 1.0, "record_scope": "red", "history_gate": 3},
                   {"history_gate": 4}, {"history_gate": 2, "range_growth": 1.0, "unsaturated": True,
                                          "record_factor": 1.0},
                   {"peak_wait": 4}, {"peak_wait": 16, "unsaturated": True, "range_growth": 1.0},
                   {"peak_wait": 3, "refractory": 2, "record_factor": 1.0, "record_scope": "flagged"},
                   {"peak_wait": 4, "history_gate": 2, "unsaturated": True}]


def _ranking_stream(seed: int, k: int = 700) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    rng = np.random.default_rng(seed)
    err = np.abs(1.0 + 0.2 * rng.standard_normal(k))
    err[[50, 51, 200, 330, 331]] = [9.0, 12.0, 30.0, np.nan, 50.0]
    err[400:460] += 4.0  # a lasting burst: longer than any gate
    lo = rng.uniform(-1.0, -0.5, k)
    hi = rng.uniform(0.5, 1.0, k) + np.where(np.arange(k) % 97 == 5, 3.0 + np.arange(k) / 50, 0.0)
    return err, lo, hi


@pytest.mark.parametrize("options", RANKING_OPTIONS)
@pytest.mark.parametrize("chunk", [1, 37, 97])
def test_ranking_options_are_chunk_invariant(options: dict, chunk: int) -> None:
    p = NormaliserParams(long_window=60, short_window=3, learning=5, **options)
    err, lo, hi = _ranking_stream(11)
    one = ScoreNormaliser(p)
    whole = one.update(err, lo, hi)
    assert np.nanmin(whole) >= 0.0 and np.nanmax(whole) <= 1.0
    many = ScoreNormaliser(p)
    parts = []
    for i, a in enumerate(range(0, len(err), chunk)):
        if i % 3 == 0:  # persisted and restored between ticks, through JSON, as the daemon does
            many = ScoreNormaliser.from_dict(json.loads(json.dumps(many.to_dict())))
        parts.append(many.update(err[a : a + chunk], lo[a : a + chunk], hi[a : a + chunk]))
    assert np.array_equal(whole, np.concatenate(parts), equal_nan=True)
    assert one.to_dict() == many.to_dict()


@pytest.mark.parametrize("options", RANKING_OPTIONS)
def test_ranking_options_over_many_series_equal_one_by_one_and_undo(options: dict) -> None:
    p = NormaliserParams(long_window=50, short_window=3, learning=10, **options)
    rng = np.random.default_rng(4)
    n = 12
    a = [ScoreNormaliser(p) for _ in range(n)]
    b = [ScoreNormaliser(p) for _ in range(n)]
    for step in range(30):
        k = int(rng.integers(1, 6))
        errors = rng.gamma(2.0, 1.0, (n, k))
        errors[step % n] = 40.0 + step
        errors[(step * 7) % n, 0] = np.nan
        lo = rng.standard_normal((n, k, 1)) - 1
        hi = lo + 2.0
        hi[(step * 3) % n, -1, 0] = 50.0
        one = np.stack([nm.update(errors[i], lo[i], hi[i]) for i, nm in enumerate(a)])
        refs = [nm.refs() for nm in b]
        update_block(b, errors * 3.0, lo, hi)  # a tick whose writes failed: undone
        for nm, r in zip(b, refs, strict=True):
            nm.restore(r)
        many = update_block(b, errors, lo, hi)
        assert np.array_equal(one, many, equal_nan=True)
    for x, y in zip(a, b, strict=True):
        assert x.to_dict() == y.to_dict()


def test_unsaturated_keeps_decisions_and_scores_up_to_the_soft_top_and_orders_the_rest() -> None:
    err, lo, hi = _ranking_stream(2)
    base = ScoreNormaliser(NormaliserParams(long_window=60, short_window=3, learning=5)).update(err, lo, hi)
    soft = ScoreNormaliser(NormaliserParams(long_window=60, short_window=3, learning=5,
                                            unsaturated=True)).update(err, lo, hi)
    ok = ~np.isnan(base)
    assert np.array_equal(base[ok] >= 0.5, soft[ok] >= 0.5)
    low = ok & (base <= 0.9)
    assert np.array_equal(base[low], soft[low])
    assert (base == 1.0).sum() > 2 and (soft[ok] < 1.0).all()
    top = soft[ok & (base == 1.0)]
    assert len(np.unique(top)) == len(top)  # the former ties at 1 are ordered


def test_unsaturated_orders_out_of_range_windows_by_how_far_they_leave() -> None:
    p = NormaliserParams(long_window=50, short_window=1, learning=0, red=0.0, unsaturated=True)
    norm = ScoreNormaliser(p)
    norm.update(np.ones(20), np.zeros(20), np.ones(20))
    s = norm.update([1.0, 1.0], [0.0, 0.0], [1.5, 3.0])  # 0.48 and (after the first widened it) 0.98 widths out
    assert 0.95 < s[0] < s[1] < 1.0


def test_record_rule_lifts_a_clearly_larger_error_above_an_earlier_burst() -> None:
    # The earlier burst widens the Gaussian reference, so the later, larger rise scores lower; the record rule
    # (with the unsaturated top, so that nothing ties at 1) puts it above everything before it.
    rng = np.random.default_rng(3)
    err = 1.0 + 0.05 * rng.standard_normal(1400)
    err[1000:1100] = 4.0
    err[1300] = 6.0
    kw = {"long_window": 500, "short_window": 1, "learning": 0, "range_tolerance": None}
    plain = ScoreNormaliser(NormaliserParams(**kw)).update(err)
    assert plain[1300] < plain[1000]
    rec = ScoreNormaliser(NormaliserParams(**kw, record_factor=1.0, unsaturated=True)).update(err)
    assert rec[1300] > np.max(rec[:1300])
    assert np.array_equal(rec[:1000], ScoreNormaliser(NormaliserParams(**kw, unsaturated=True)).update(err[:1000]))


def test_history_gate_keeps_a_short_burst_out_of_the_reference_but_learns_a_lasting_shift() -> None:
    rng = np.random.default_rng(5)
    err = 1.0 + 0.05 * rng.standard_normal(3000)
    err[1000:1004] = 4.0  # a burst of 4 red windows
    err[2000:] += 3.0  # a lasting shift
    kw = {"long_window": 500, "short_window": 1, "learning": 0, "range_tolerance": None}
    plain = ScoreNormaliser(NormaliserParams(**kw))
    plain.update(err[:1100])
    gated = ScoreNormaliser(NormaliserParams(**kw, history_gate=8))
    gated.update(err[:1100])
    assert plain.hist.max() > 3.9 and gated.hist.max() < 2.0  # the burst stayed out
    s = gated.update(err[1100:])
    assert gated.hist[-100:].min() > 3.5  # the shift entered after 8 red windows in a row
    assert (s[-500:] < 0.5).all()


@pytest.mark.parametrize("changes, message", [({"record_factor": 0.0}, "record_factor"),
                                              ({"record_factor": math.inf}, "record_factor"),
                                              ({"history_gate": -1}, "history_gate")])
def test_bad_ranking_options_name_the_value(changes: dict, message: str) -> None:
    with pytest.raises(ValueError, match=message):
        NormaliserParams(**changes)


def test_record_rule_on_flagged_windows_only_keeps_every_decision() -> None:
    err, lo, hi = _ranking_stream(6, 1500)
    err[900:960] += np.linspace(0.0, 6.0, 60)  # a ramp: a record on every window
    kw = {"long_window": 60, "short_window": 3, "learning": 5, "unsaturated": True}
    soft = ScoreNormaliser(NormaliserParams(**kw)).update(err, lo, hi)
    every = ScoreNormaliser(NormaliserParams(**kw, record_factor=1.0)).update(err, lo, hi)
    flagged = ScoreNormaliser(NormaliserParams(**kw, record_factor=1.0, record_scope="flagged")).update(err, lo, hi)
    ok = ~np.isnan(soft)
    assert np.array_equal(soft[ok] >= 0.5, flagged[ok] >= 0.5)
    assert (every[ok] >= 0.5).sum() > (soft[ok] >= 0.5).sum()  # lifting every record flags more
    rng = np.random.default_rng(3)  # the burst case: the later, larger error is flagged and now ranks first
    err = 1.0 + 0.05 * rng.standard_normal(1400)
    err[1000:1100] = 4.0
    err[1300] = 10.0
    kw = {"long_window": 500, "short_window": 1, "learning": 0, "range_tolerance": None, "unsaturated": True}
    soft = ScoreNormaliser(NormaliserParams(**kw)).update(err)
    flagged = ScoreNormaliser(NormaliserParams(**kw, record_factor=1.0, record_scope="flagged")).update(err)
    assert 0.5 <= soft[1300] < soft[:1300].max() < flagged[1300]
    assert np.array_equal(soft >= 0.5, flagged >= 0.5)


# -- peak filter and peaks-over-threshold tail (issue 11, univariate targets) -----------------------------------


def _bump(k: int = 800, at: int = 600, seed: int = 0) -> np.ndarray:
    """Quiet errors with one anomaly that builds up over 6 windows, peaks, and fades over 6 (as a short event does
    while it slides through a tapered window)."""
    rng = np.random.default_rng(seed)
    err = np.abs(1.0 + 0.1 * rng.standard_normal(k))
    err[at : at + 13] = 1.0 + 0.5 * np.array([1, 2, 3, 4, 5, 6, 7, 6, 5, 4, 3, 2, 1], dtype=float)
    return err


def test_peak_filter_flags_a_run_once_at_its_peak_not_at_its_onset() -> None:
    kw = dict(long_window=1000, short_window=1, learning=10, unsaturated=True)
    err = _bump()
    onset = ScoreNormaliser(NormaliserParams(**kw)).update(err)
    peak = ScoreNormaliser(NormaliserParams(**kw, peak_wait=16)).update(err)
    free = ScoreNormaliser(NormaliserParams(**kw, red=0.0)).update(err)  # no red-zone filter: every surprise
    assert np.flatnonzero(onset >= 0.5).tolist() == [600]  # one flag for the run, at its onset
    flagged = np.flatnonzero(peak >= 0.5).tolist()
    assert len(flagged) == 1  # still one flag for the run
    j = flagged[0]
    assert free[j] < free[j - 1] and (np.diff(free[600:j]) >= 0).all()  # the first window past the peak
    assert peak[j] == free[600 : j + 1].max() > onset[600] + 0.3  # reported with the run's highest surprise
    assert (peak[600:j] < 0.5).all() and (peak[j + 1 : 613] < 0.5).all()  # held while rising, demoted after
    assert peak.max() == peak[j]
    # peak_wait caps the delay: held for 3 windows, the 4th is flagged with the highest surprise so far.
    capped = ScoreNormaliser(NormaliserParams(**kw, peak_wait=3)).update(err)
    assert np.flatnonzero(capped >= 0.5).tolist() == [603]
    assert capped[603] == free[600:604].max()


def test_peak_filter_reports_a_run_that_ends_while_rising_and_one_held_across_calls() -> None:
    kw = dict(long_window=1000, short_window=1, learning=10, unsaturated=True)
    err = _bump()
    err[603:613] = 1.0  # the run stops while still rising: the first quiet window reports it
    p = NormaliserParams(**kw, peak_wait=8)
    a = ScoreNormaliser(p).update(err)
    free = ScoreNormaliser(NormaliserParams(**kw, red=0.0)).update(err)
    assert np.flatnonzero(a >= 0.5).tolist() == [603]
    assert a[603] == free[600:603].max()
    nm = ScoreNormaliser(p)
    first = nm.update(err[:602])
    assert nm.peak is not None and nm.peak[0] >= 0  # saved while the run is held
    b = np.concatenate([first, ScoreNormaliser.from_dict(json.loads(json.dumps(nm.to_dict()))).update(err[602:])])
    assert np.array_equal(a, b)


def _tail_warm(p: NormaliserParams, seed: int = 3) -> ScoreNormaliser:
    nm = ScoreNormaliser(p)
    hold = np.abs(1.0 + 0.2 * np.random.default_rng(seed).standard_normal(600))
    nm.update(hold)
    nm.fit_tail(hold)
    return nm


@pytest.mark.parametrize("tail", ["exp", "gpd"])
@pytest.mark.parametrize("chunk", [1, 37, 97])
@pytest.mark.parametrize("more", [{}, {"peak_wait": 4, "unsaturated": True, "range_growth": 1.0},
                                  {"peak_wait": 4, "history_gate": 3}])
def test_tail_is_chunk_invariant_and_persisted(tail: Literal["exp", "gpd"], chunk: int, more: dict) -> None:
    p = NormaliserParams(long_window=60, short_window=3, learning=5, tail=tail, **more)
    err, lo, hi = _ranking_stream(5)
    one = _tail_warm(p)
    assert one.pot is not None and one.pot[1] == 600 and one.pot[2] == 12  # 2% of 600 hold-out errors are peaks
    whole = one.update(err, lo, hi)
    many = _tail_warm(p)
    parts = []
    for i, a in enumerate(range(0, len(err), chunk)):
        if i % 3 == 0:
            many = ScoreNormaliser.from_dict(json.loads(json.dumps(many.to_dict())))
        parts.append(many.update(err[a : a + chunk], lo[a : a + chunk], hi[a : a + chunk]))
    assert np.array_equal(whole, np.concatenate(parts), equal_nan=True)
    assert one.to_dict() == many.to_dict()
    assert one.pot is not None and one.pot[1] == 600 + np.isfinite(err).sum()


@pytest.mark.parametrize("tail", ["exp", "gpd"])
def test_tail_over_many_series_equals_one_by_one_and_undo(tail: Literal["exp", "gpd"]) -> None:
    p = NormaliserParams(long_window=50, short_window=3, learning=10, tail=tail, peak_wait=4)
    rng = np.random.default_rng(8)
    n = 6
    a = [_tail_warm(p, i) for i in range(n)]
    b = [_tail_warm(p, i) for i in range(n)]
    for step in range(30):
        k = int(rng.integers(1, 6))
        errors = np.abs(1.0 + 0.3 * rng.standard_normal((n, k)))
        errors[step % n] = 4.0 + step / 5
        errors[(step * 5) % n, 0] = np.nan
        one = np.stack([nm.update(errors[i]) for i, nm in enumerate(a)])
        refs = [nm.refs() for nm in b]
        update_block(b, errors * 3.0)
        for nm, r in zip(b, refs, strict=True):
            nm.restore(r)
        assert np.array_equal(one, update_block(b, errors), equal_nan=True)
    for x, y in zip(a, b, strict=True):
        assert x.to_dict() == y.to_dict()


def test_tail_scores_one_window_spike_the_averaged_likelihood_dilutes() -> None:
    kw = dict(long_window=500, short_window=8, learning=10, range_tolerance=None)
    err = np.abs(1.0 + 0.2 * np.random.default_rng(1).standard_normal(300))
    err[150] = 3.0  # one window, 10 sigma: diluted 8-fold by the short window's average
    plain = _tail_warm(NormaliserParams(**kw)).update(err)
    with_tail = _tail_warm(NormaliserParams(**kw, tail="exp")).update(err)
    assert plain[150] < 0.5 <= with_tail[150]
    quiet = np.delete(np.arange(300), 150)
    assert (with_tail[quiet] < 0.5).all()
    assert (with_tail >= plain).all()  # the lower of two tail probabilities: never below the likelihood's score


def test_tail_needs_fit_tail_and_older_states_load_without_it() -> None:
    p = NormaliserParams(long_window=50, short_window=2, learning=5, tail="exp", peak_wait=4)
    err = _bump(120, 60)
    err[90] = 20.0
    bare = ScoreNormaliser(p)
    assert bare.pot is None
    fitted = _tail_warm(p)
    state = fitted.to_dict()
    old = {k: v for k, v in state.items() if k not in ("pot", "peak")}  # saved before the options
    again = ScoreNormaliser.from_dict(old)
    assert again.pot is None and again.peak is None
    assert np.array_equal(again.update(err), ScoreNormaliser.from_dict(
        {**state, "pot": None}).update(err), equal_nan=True)
    with pytest.raises(ValueError, match="state array of 5 values"):
        ScoreNormaliser.from_dict({**state, "pot": [1.0, 2.0]})


def test_tail_and_peak_filter_off_keep_no_state_and_the_row_of_before() -> None:
    """Both options off (the default): no state of theirs, and a pool row as wide as before them; on: their
    columns follow the tail in the row of a pool of their own."""
    p = NormaliserParams(long_window=50, short_window=3, learning=5)
    off = ScoreNormaliser(p)
    off.update(_bump(100, 60))
    off.fit_tail(np.ones(10))  # no-op with tail "off"
    assert off.pot is None and off.peak is None
    assert off.to_dict()["pot"] is None and off.to_dict()["peak"] is None
    assert off._pool.options == 0 and off._pool.state(off._row).shape == (15 + 2,)
    on = ScoreNormaliser(NormaliserParams(long_window=50, short_window=3, learning=5, peak_wait=2))
    assert on._pool is not off._pool and on._pool.state(on._row).shape == (15 + 2 + 8,)
    assert on.pot is None and on.peak is None
    on.update(_bump(100, 60))
    assert on.pot is None and on.peak is not None and on.tail.tolist() == off.tail.tolist()


@pytest.mark.parametrize("changes, message", [({"tail": "pareto"}, "tail="), ({"tail_level": 1.0}, "tail_level"),
                                              ({"tail_min_peaks": 1}, "tail_min_peaks"),
                                              ({"peak_wait": -1}, "peak_wait")])
def test_bad_tail_and_peak_options_name_the_value(changes: dict, message: str) -> None:
    with pytest.raises(ValueError, match=message):
        NormaliserParams(**changes)
