"""Watermarks: persisted, never moving backwards, written atomically, a corrupt file is a clear StateError.
Score states: a restart continues the same history; a corrupt file is moved aside."""

from __future__ import annotations

import json
import os
from pathlib import Path

import numpy as np
import pytest

from anomalyd import files as durable_files
from anomalyd.core.normaliser import NormaliserParams, ScoreNormaliser
from anomalyd.files import atomic_write
from anomalyd.service import state
from anomalyd.service.state import ScoreStates, StateError, Watermarks


def test_watermarks_persist_across_instances(tmp_path: Path) -> None:
    path = tmp_path / "state" / "watermarks.json"
    w = Watermarks(path)
    assert w.get("cpu|host=h1") is None and w.items() == []
    w.advance("cpu|host=h1", 1_700_000_000_000_000_000)
    w.advance("cpu|host=a b,c=d", 16)
    w.advance("ünï|x=\"y\"", 32)
    w.save()
    again = Watermarks(path)
    assert again.get("cpu|host=h1") == 1_700_000_000_000_000_000
    assert again.get("cpu|host=a b,c=d") == 16 and again.get("ünï|x=\"y\"") == 32
    assert sorted(again.items()) == sorted(w.items())


def test_watermarks_never_move_backwards(tmp_path: Path) -> None:
    path = tmp_path / "wm.json"
    w = Watermarks(path)
    w.advance("s|", 100)
    w.advance("s|", 50)
    w.advance("s|", 100)
    assert w.get("s|") == 100
    w.save()
    reloaded = Watermarks(path)
    reloaded.advance("s|", 99)
    reloaded.save()
    assert Watermarks(path).get("s|") == 100
    reloaded.advance("s|", 101)
    reloaded.save()
    assert Watermarks(path).get("s|") == 101


def test_save_without_changes_does_not_write(tmp_path: Path) -> None:
    path = tmp_path / "wm.json"
    w = Watermarks(path)
    w.save()
    assert not path.exists()  # nothing advanced, nothing written
    w.advance("s|", 1)
    w.save()
    before = path.stat().st_mtime_ns
    os.utime(path, ns=(before - 10**9, before - 10**9))
    w.advance("s|", 0)  # backwards: not a change
    w.save()
    assert path.stat().st_mtime_ns == before - 10**9


def test_atomic_write_leaves_no_temporary_files(tmp_path: Path) -> None:
    path = tmp_path / "wm.json"
    w = Watermarks(path)
    for i in range(20):
        w.advance(f"s|k={i}", i + 1)
        w.save()
    assert [p.name for p in tmp_path.iterdir()] == ["wm.json"]
    assert json.loads(path.read_text())["watermarks"]["s|k=19"] == 20


def test_a_failed_write_keeps_the_old_file_and_cleans_up(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    path = tmp_path / "wm.json"
    w = Watermarks(path)
    w.advance("s|", 10)
    w.save()
    old = path.read_bytes()

    def broken_replace(src: str, dst: str) -> None:
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(durable_files.os, "replace", broken_replace)
    w.advance("s|", 20)
    with pytest.raises(OSError, match="No space left"):
        w.save()
    monkeypatch.undo()
    assert path.read_bytes() == old
    assert [p.name for p in tmp_path.iterdir()] == ["wm.json"]
    assert Watermarks(path).get("s|") == 10
    w.save()  # still dirty: the next save writes the new mark
    assert Watermarks(path).get("s|") == 20


def test_atomic_write_replaces_whole_file(tmp_path: Path) -> None:
    path = tmp_path / "deep" / "er" / "f.bin"
    atomic_write(path, b"a" * 1000)
    atomic_write(path, b"b")
    assert path.read_bytes() == b"b"
    assert [p.name for p in path.parent.iterdir()] == ["f.bin"]


@pytest.mark.parametrize("content", [
    b"",
    b"{\"watermarks\": {\"s|\": 1",  # truncated mid-write by something else
    b"\xff\xfe\x00garbage",
    b"null",
    b"[]",
    b"{}",
    b"{\"watermarks\": [1, 2]}",
    b"{\"watermarks\": {\"s|\": \"yesterday\"}}",
    b"{\"watermarks\": {\"s|\": null}}",
], ids=["empty", "truncated", "binary", "null", "list", "no-key", "marks-list", "mark-text", "mark-null"])
def test_a_corrupt_state_file_is_a_clear_state_error(tmp_path: Path, content: bytes) -> None:
    path = tmp_path / "watermarks.json"
    path.write_bytes(content)
    with pytest.raises(StateError) as info:
        Watermarks(path)
    msg = str(info.value)
    assert str(path) in msg and "corrupt" in msg and "move it aside" in msg
    assert isinstance(info.value, ValueError)
    assert path.read_bytes() == content  # left as it was, for the operator to inspect


PARAMS = NormaliserParams(long_window=100, short_window=4, learning=10)


def _errors(seed: int, n: int) -> np.ndarray:
    return np.abs(np.random.default_rng(seed).normal(1.0, 0.1, n))


def _ranges(seed: int, n: int, d: int = 2) -> tuple[np.ndarray, np.ndarray]:
    """Per-window, per-field min and max of the window's values (for the out-of-range rule)."""
    rng = np.random.default_rng(seed)
    return rng.uniform(-0.95, -0.5, (n, d)), rng.uniform(0.5, 0.95, (n, d))  # inside the range seen in training


def warm_initial() -> ScoreNormaliser:
    """What a model carries: a normaliser warmed up on its hold-out, with the training range seen."""
    norm = ScoreNormaliser(PARAMS)
    norm.update(_errors(9, 60))
    norm.observe_range(np.array([[-1.0, -1.0], [1.0, 1.0]]))
    return norm


def test_score_states_restart_continues_the_same_history(tmp_path: Path) -> None:
    initial = warm_initial()
    frozen = initial.to_dict()
    e = _errors(0, 300)
    e[250] = 8.0
    lo, hi = _ranges(1, 300)
    hi[200, 1] = 3.0  # out of the range seen so far scoring everything...
    one = ScoreStates(tmp_path / "a.npz")
    whole = one.get("s|k=v", "m1", initial).update(e, lo, hi)
    assert initial.to_dict() == frozen  # the model's normaliser is copied, never advanced
    # ...and one that is stopped (state saved on close) and restarted halfway.
    path = tmp_path / "b.npz"
    first = ScoreStates(path, save_every_s=3600)
    part1 = first.get("s|k=v", "m1", initial).update(e[:150], lo[:150], hi[:150])
    first.touch()
    first.maybe_save()
    assert not path.exists()  # not yet: saves are rate-limited
    first.close()
    again = ScoreStates(path)
    part2 = again.get("s|k=v", "m1", initial).update(e[150:], lo[150:], hi[150:])
    np.testing.assert_array_equal(np.concatenate([part1, part2]), whole)  # bit for bit
    assert np.flatnonzero(whole >= 0.5).tolist() == [200, 250]
    # A retrained model (another tag) starts from its own warm-up state, not the old history.
    fresh = again.get("s|k=v", "m2", initial)
    assert fresh.to_dict() == frozen and fresh is not initial
    assert again.get("s|k=v", "m2", initial) is fresh  # and keeps it while the model stays


def test_score_states_hand_out_one_normaliser_per_series(tmp_path: Path) -> None:
    initial = warm_initial()
    states = ScoreStates(tmp_path / "s.npz")
    a, b = states.get("a", "m", initial), states.get("b", "m", initial)
    assert a is not b and a is not initial and states.get("a", "m", initial) is a
    a.update([5.0])
    assert b.to_dict() == initial.to_dict() and a.seen == initial.seen + 1


def _assert_same_state(got: dict, want: dict) -> None:
    assert set(got) == set(want)
    for k, v in want.items():
        if isinstance(v, np.ndarray) or isinstance(got[k], np.ndarray):
            np.testing.assert_array_equal(np.asarray(got[k]), np.asarray(v), err_msg=k)
            assert len(np.asarray(got[k])) == len(np.asarray(v)), k
        elif k == "params":
            assert (NormaliserParams(**got[k]) if isinstance(got[k], dict) else got[k]) == v
        else:
            assert got[k] == v and type(got[k]) is type(v), k


def test_pack_and_unpack_round_trip_every_field_exactly() -> None:
    a = warm_initial()
    a.update(_errors(2, 150), *_ranges(3, 150))
    a.s1 += 1e-13  # running sums that are not a plain sum of the history must come back as they are
    b = ScoreNormaliser(NormaliserParams(long_window=50, short_window=1, learning=0, transform="log"))
    b.update(_errors(4, 7))  # no range seen: lo and hi stay None
    c = ScoreNormaliser(PARAMS)  # nothing seen at all
    d = warm_initial()
    d.observe_range(np.array([[np.nan, 5.0]]))
    d_lo = d.lo  # a copy of the row's range: set back below
    assert d_lo is not None
    d_lo[0] = np.nan  # a bound that is NaN (a field never seen finite) stays NaN
    d.lo = d_lo
    entries = {"a|x=1": ("m1", a.snapshot()), "b|ünï=\"y\"": ("m2", b.snapshot()), "c|": ("m1", c.snapshot()),
               "d|": ("m3", d.snapshot())}
    back = state._unpack_states(state._pack_states(entries))
    assert list(back) == list(entries)
    for sid, (tag, snap) in entries.items():
        got_tag, got = back[sid]
        assert got_tag == tag
        _assert_same_state(got, snap)
        restored = ScoreNormaliser.from_dict(got)
        assert restored.to_dict() == ScoreNormaliser.from_dict(snap).to_dict()
    assert back["a|x=1"][1]["s1"] == a.s1 and back["a|x=1"][1]["s2"] == a.s2
    assert back["b|ünï=\"y\""][1]["lo"] is None and back["c|"][1]["hi"] is None
    assert np.isnan(back["d|"][1]["lo"][0]) and back["d|"][1]["hi"].tolist() == [1.0, 5.0]
    # Restored normalisers go on exactly as the originals.
    for sid, norm in (("a|x=1", a), ("d|", d)):
        lo, hi = _ranges(5, 40)
        again = ScoreNormaliser.from_dict(back[sid][1])
        np.testing.assert_array_equal(again.update(_errors(6, 40), lo, hi), norm.copy().update(_errors(6, 40), lo, hi))


def test_a_saved_state_with_other_parameters_is_not_continued(tmp_path: Path) -> None:
    """A changed ``score_history`` (same model file) gives a normaliser the saved history does not fit."""
    path = tmp_path / "scores.npz"
    states = ScoreStates(path)
    states.get("s", "m", warm_initial()).update(_errors(7, 20))
    states.close()
    other = ScoreNormaliser(NormaliserParams(long_window=200, short_window=4, learning=10))
    assert ScoreStates(path).get("s", "m", other).to_dict() == other.to_dict()
    assert ScoreStates(path).get("s", "m", warm_initial()).seen == warm_initial().seen + 20


@pytest.mark.parametrize("content", ["garbage", "version1", "missing-key"])
def test_score_states_corrupt_file_is_moved_aside_with_a_warning(tmp_path: Path, caplog: pytest.LogCaptureFixture,
                                                                content: str) -> None:
    path = tmp_path / "scores.npz"
    if content == "garbage":
        path.write_bytes(b"PK\x03\x04 truncated")
    else:
        good = ScoreStates(path)
        good.get("s", "m", warm_initial()).update([1.0])
        good.close()
        with np.load(path) as z:
            arrays = {k: z[k] for k in z.files}
        if content == "version1":  # the format before the one detector
            arrays["version"] = np.array(1)
        else:
            del arrays["s2"]
        with path.open("wb") as f:
            np.savez(f, **arrays)
    bad = path.read_bytes()
    initial = warm_initial()
    states = ScoreStates(path)
    assert "unreadable" in caplog.text and str(path) in caplog.text
    assert path.with_suffix(".corrupt").read_bytes() == bad and not path.exists()
    assert states.get("s", "m", initial).to_dict() == initial.to_dict()
    states.close()
    assert ScoreStates(path).get("s", "m", initial).to_dict() == initial.to_dict()


def test_score_states_forget_series_not_scored_for_a_long_time(tmp_path: Path) -> None:
    now = [0.0]
    path = tmp_path / "scores.npz"
    initial = ScoreNormaliser(PARAMS)
    states = ScoreStates(path, save_every_s=0, forget_after_s=100.0, clock=lambda: now[0])
    states.get("a", "m", initial).update([1.0])
    states.get("b", "m", initial).update([1.0])
    states.close()
    now[0] = 60.0
    again = ScoreStates(path, save_every_s=0, forget_after_s=100.0, clock=lambda: now[0])
    now[0] = 120.0
    again.get("a", "m", initial)  # still scored; "b" is not
    now[0] = 170.0
    again.touch()
    again.save()  # "b" was last seen at load time (60 s), more than 100 s ago
    kept = ScoreStates(path, clock=lambda: now[0])
    assert kept.get("a", "m", initial).seen == 1 and kept.get("b", "m", initial).seen == 0


def test_a_version_2_score_state_file_is_continued(tmp_path: Path) -> None:
    """A file saved by the previous version (``tests/data/scores_v2.npz``: version 2, float64 histories, made with
    the code of commit cb65d8a) loads; the history is rounded to float32, so the continued scores match the old
    code's (``scores_v2.json``) up to that rounding, with the same anomalies."""
    data = Path(__file__).parent / "data"
    path = tmp_path / "scores.npz"
    path.write_bytes((data / "scores_v2.npz").read_bytes())
    want = np.array(json.loads((data / "scores_v2.json").read_text())["scores_after"])
    rng = np.random.default_rng(12)
    e = np.abs(rng.normal(1.0, 0.1, 400))
    e[330] = 6.0
    lo, hi = rng.uniform(-0.95, -0.5, (400, 2)), rng.uniform(0.5, 0.95, (400, 2))
    states = ScoreStates(path)
    p = NormaliserParams(long_window=100, short_window=4, learning=10)
    a = states.get("cpu|host=a", "m1", ScoreNormaliser(p))
    assert a.seen == 250 and states.get("cpu|host=b", "m1", ScoreNormaliser(p)).seen == 37
    got = a.update(e[250:], lo[250:], hi[250:])
    np.testing.assert_allclose(got, want, rtol=0, atol=1e-6)
    assert np.flatnonzero(got >= 0.5).tolist() == np.flatnonzero(want >= 0.5).tolist()
    states.touch()
    states.close()  # saved again as version 3
    with np.load(path) as z:
        assert int(z["version"]) == 3 and z["hist"].dtype == np.float32
    assert ScoreStates(path).get("cpu|host=a", "m1", ScoreNormaliser(p)).to_dict() == a.to_dict()


def test_saving_many_series_gathers_the_histories_in_chunks(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """The file is written member by member and the histories a chunk of series at a time (no copy of every
    history at once); normalisers and their snapshots pack the same."""
    monkeypatch.setattr(state, "_CHUNK", 3)
    norms = {f"s{i}|": warm_initial() for i in range(8)}
    for i, nm in enumerate(norms.values()):
        nm.update(_errors(i, 10 * i))
    live = state._pack_states({k: ("m", nm) for k, nm in norms.items()})
    snaps = state._pack_states({k: ("m", nm.snapshot()) for k, nm in norms.items()})
    back = state._unpack_states(live)
    assert list(back) == list(norms)
    for k, nm in norms.items():
        assert ScoreNormaliser.from_dict(back[k][1]).to_dict() == nm.to_dict()
    assert {k: ScoreNormaliser.from_dict(v[1]).to_dict() for k, v in state._unpack_states(snaps).items()} == {
        k: nm.to_dict() for k, nm in norms.items()}
    # A restart reads the file back the same way: each saved series is a normaliser at once (its history in a ring
    # row, no dict holding a second copy), handed out as it is.
    path = tmp_path / "scores.npz"
    path.write_bytes(live)
    again = ScoreStates(path)
    assert all(isinstance(v[1], ScoreNormaliser) and v[1]._ring.base is not None for v in again._saved.values())
    for k, nm in norms.items():
        got = again.get(k, "m", warm_initial())
        assert got.to_dict() == nm.to_dict()


def test_pack_and_unpack_keep_the_tail_and_peak_filter_state() -> None:
    p = NormaliserParams(long_window=1000, short_window=1, learning=10, tail="exp", peak_wait=16, unsaturated=True)
    a = ScoreNormaliser(p)
    hold = _errors(7, 600)
    a.update(hold)
    a.fit_tail(hold)
    err = _errors(8, 100)
    err[96:100] = [1.5, 2.0, 2.5, 3.0]  # a run still rising when saved: held
    a.update(err)
    assert a.pot is not None and a.peak is not None and a.peak[0] >= 0
    b = ScoreNormaliser(p)  # the options on, nothing fitted: both None
    back = state._unpack_states(state._pack_states({"a|": ("m", a.snapshot()), "b|": ("m", b.snapshot()),
                                                    "c|": ("m", a)}))  # a normaliser itself, as ScoreStates saves
    _assert_same_state(back["a|"][1], a.snapshot())
    _assert_same_state(back["c|"][1], a.snapshot())
    assert back["b|"][1]["pot"] is None and back["b|"][1]["peak"] is None
    again = ScoreNormaliser.from_dict(back["a|"][1])
    more = _errors(9, 30)
    np.testing.assert_array_equal(again.update(more), a.copy().update(more))


def test_a_score_state_file_saved_before_the_tail_and_peak_filter_loads(tmp_path: Path) -> None:
    """A file without the ``pot``/``peak`` members (saved before the options) loads, with neither state; a default
    normaliser saved now writes them empty."""
    path = tmp_path / "scores.npz"
    states = ScoreStates(path)
    a = states.get("s", "m", warm_initial())
    a.update(_errors(10, 30), *_ranges(11, 30))
    states.close()
    with np.load(path) as z:
        arrays = {k: z[k] for k in z.files}
    assert arrays["pot"].shape == (1, 0) and arrays["peak_len"].tolist() == [0]
    with path.open("wb") as f:
        np.savez(f, **{k: v for k, v in arrays.items() if not k.startswith(("pot", "peak"))})
    got = ScoreStates(path).get("s", "m", warm_initial())
    assert got.pot is None and got.peak is None and got.to_dict() == a.to_dict()
