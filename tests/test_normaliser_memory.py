"""Issue 12: the score normaliser's state as rows of shared pool blocks -- no Python objects per series per
update, an undo journal that empties, histories sized to what they hold -- and the rollback through all of it."""

from __future__ import annotations

import gc
import sys

import numpy as np

from anomalyd.core.normaliser import NormaliserParams, ScoreNormaliser, update_block


def _warm(n: int, p: NormaliserParams) -> list[ScoreNormaliser]:
    init = ScoreNormaliser(p)
    init.update(1.0 + 0.1 * np.random.default_rng(0).standard_normal(p.long_window // 2 + 7),
                np.zeros((p.long_window // 2 + 7, 1)), np.ones((p.long_window // 2 + 7, 1)))
    return [init.copy() for _ in range(n)]


def test_update_block_makes_no_python_objects_per_series() -> None:
    """An update of 2,000 series leaves no more allocated blocks than a handful (before issue 12: new floats and
    ints per series for the scalars, and new arrays for the tail and range)."""
    p = NormaliserParams(long_window=300, short_window=8)
    norms = _warm(2000, p)
    rng = np.random.default_rng(1)
    lo, hi = rng.uniform(-1, 0, (2000, 16, 1)), rng.uniform(1, 2, (2000, 16, 1))
    update_block(norms, 1.0 + 0.1 * rng.standard_normal((2000, 16)), lo, hi)  # pools and blocks made
    gc.collect()
    before = sys.getallocatedblocks()
    for _ in range(3):
        update_block(norms, 1.0 + 0.1 * rng.standard_normal((2000, 16)), lo, hi)
    gc.collect()
    assert sys.getallocatedblocks() - before < 200
    # What a normaliser holds of its own is its row number: the rest is shared (its pool and parameters) or None.
    own = [o for o in gc.get_referents(norms[5]) if o is not None and o is not p and o is not norms[5]._pool
           and o is not type(norms[5])]
    assert own == [norms[5]._row]


def test_refs_cost_a_mark_and_the_journal_empties_after_release() -> None:
    p = NormaliserParams(long_window=100, short_window=4)
    norms = _warm(500, p)
    rng = np.random.default_rng(2)
    for _ in range(10):  # full histories: the updates overwrite values, which the journal logs
        update_block(norms, 1.0 + 0.1 * rng.standard_normal((500, 16)))
    pool = norms[0]._pool
    marks = [nm.refs() for nm in norms]
    assert all(len(m) == 1 and isinstance(m[0], int) for m in marks)
    update_block(norms, 1.0 + 0.1 * rng.standard_normal((500, 16)))
    assert pool._logging == 500 and pool._jn == 1000  # a snapshot and an overwritten run per series
    for nm in norms:
        nm.release()
    assert pool._logging == 0 and pool._jn == 0 and not pool._jpay


def test_a_normaliser_dropped_with_its_log_open_does_not_keep_the_journal() -> None:
    p = NormaliserParams(long_window=64, short_window=3)
    a, b = _warm(2, p)
    pool = a._pool
    a.refs()
    b.refs()
    a.update(np.ones(5))
    del a
    gc.collect()
    b.release()
    assert pool._logging == 1  # a's chain: open until its row is taken again
    c = ScoreNormaliser(p)  # takes a's row back
    assert pool._logging == 0 and pool._jn == 0
    assert c.history_length == 0 and c.seen == 0 and c._journal_head == -1


def test_rollback_of_a_gated_update_inside_a_tick_and_of_a_history_that_grew() -> None:
    """The worker's refs, an update with the history gate (which takes and restores its own marks inside), then
    the worker's restore: the state is as before, also when the update moved the history to a larger row."""
    p = NormaliserParams(long_window=500, short_window=4, history_gate=2, learning=4)
    norm = ScoreNormaliser(p)
    rng = np.random.default_rng(3)
    norm.update(1.0 + 0.01 * rng.standard_normal(120))
    before, row_bytes = norm.to_dict(), norm.history_bytes
    mark = norm.refs()
    burst = np.r_[1.0 + 0.01 * rng.standard_normal(5), [50.0, 60.0, 70.0, 80.0], 1.0 + 0.01 * rng.standard_normal(30)]
    first = norm.update(burst)
    assert norm.history_bytes > row_bytes  # it grew past its row
    norm.restore(mark)
    assert norm.to_dict() == before and norm._journal_head == -1
    assert np.array_equal(norm.update(burst), first)


def test_histories_not_full_take_rows_of_their_size() -> None:
    """100 series with 1,569 averages each (the benchmark model's warm history) hold 1,664-value rows (6,656
    bytes), not long_window-value ones (8,000 bytes)."""
    p = NormaliserParams()
    init = ScoreNormaliser(p)
    init.hist = np.ones(1569)
    norms = [init.copy() for _ in range(100)]
    assert {nm.history_bytes for nm in norms} == {1664 * 4}
    update_block(norms, np.ones((100, 16)))
    assert {nm.history_bytes for nm in norms} == {1664 * 4}
    update_block(norms, np.ones((100, 100)))  # 1,685: the next size
    assert {nm.history_bytes for nm in norms} == {1792 * 4}


def test_the_tail_and_peak_filter_state_is_in_the_pool_row_and_rolled_back() -> None:
    """The options' state (``pot``, ``peak``) are columns of the row, after its tail: a normaliser with them on holds
    nothing of its own but its row, a row taken again starts without them, and the worker's rollback around a gated
    update puts them back with the rest (a run held, a tail fitted)."""
    p = NormaliserParams(long_window=200, short_window=4, learning=4, history_gate=2, tail="gpd", peak_wait=4,
                         unsaturated=True)
    norm = ScoreNormaliser(p)
    rng = np.random.default_rng(4)
    hold = 1.0 + 0.01 * rng.standard_normal(150)
    norm.update(hold)
    norm.fit_tail(hold)
    norm.update(np.r_[1.0 + 0.01 * rng.standard_normal(10), [3.0, 6.0]])  # a run rising at the end: held
    own = [o for o in gc.get_referents(norm) if o is not None and o is not p and o is not norm._pool
           and o is not type(norm)]
    assert own == [norm._row]
    assert norm.peak is not None and norm.peak[0] >= 0 and norm.pot is not None
    before = norm.to_dict()
    mark = norm.refs()
    burst = np.r_[[9.0, 12.0, 20.0, 30.0], 1.0 + 0.01 * rng.standard_normal(20)]
    first = norm.update(burst)
    assert norm.to_dict()["pot"] != before["pot"] and norm.to_dict()["peak"] != before["peak"]
    norm.restore(mark)
    assert norm.to_dict() == before and norm._journal_head == -1
    assert np.array_equal(norm.update(burst), first)
    row, pool = norm._row, norm._pool
    del norm
    gc.collect()
    fresh = [ScoreNormaliser(p) for _ in range(4)]  # the row given back is among the next ones taken
    again = [nm for nm in fresh if nm._row == row]
    assert again and again[0]._pool is pool and again[0].pot is None and again[0].peak is None


def test_a_push_longer_than_the_history_onto_one_not_full_rolls_back_without_reading_unwritten_memory() -> None:
    """A first tick after a long outage pushes more windows than the history holds onto a history not full yet:
    the journal logs every position the push keeps, also those never written (their memory holds arbitrary
    bits); the rollback restores the state, and no arbitrary value is read as a number on the way (a signalling
    NaN there raised 'invalid value encountered in cast', which failed the tick where warnings are errors)."""
    import warnings

    p = NormaliserParams(long_window=200, short_window=4, learning=4)
    rng = np.random.default_rng(7)
    norm = ScoreNormaliser(p)
    norm.update(1.0 + 0.01 * rng.standard_normal(50))
    count = norm.history_length
    norm._pool.ensure_capacity(norm._row, p.long_window)  # a full-size row whose unused part is ...
    ring = norm._ring
    assert ring.dtype == np.float32 and len(ring) == p.long_window
    ring[count:].view(np.uint32)[:] = 0x7FA00000  # ... a signalling NaN, as reused memory may hold
    before = norm.to_dict()
    mark = norm.refs()
    push = 1.0 + 0.01 * rng.standard_normal(3 * p.long_window)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        first = norm.update(push)
        norm.restore(mark)
    assert norm.to_dict() == before and norm._journal_head == -1
    assert np.array_equal(norm.update(push), first)
