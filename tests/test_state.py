"""Watermarks: persisted, never moving backwards, written atomically, a corrupt file is a clear StateError.
Score states: a restart continues the same history; a corrupt file is moved aside."""

from __future__ import annotations

import json
import os
from pathlib import Path

import numpy as np
import pytest

from anomalyd import state
from anomalyd.postprocess import NormaliserParams, ScoreNormaliser
from anomalyd.state import ScoreStates, StateError, Watermarks, atomic_write


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

    monkeypatch.setattr(state.os, "replace", broken_replace)
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


def _errors(seed: int, n: int) -> np.ndarray:
    return np.abs(np.random.default_rng(seed).normal(1.0, 0.1, n))


def test_score_states_restart_continues_the_same_history(tmp_path: Path) -> None:

    initial = ScoreNormaliser(NormaliserParams.for_windows(32, 16, 100)).to_dict()
    e = _errors(0, 300)
    e[250] = 8.0
    # One process scoring everything...
    one = ScoreStates(tmp_path / "a.npz")
    whole = one.get("s|k=v", "m1", initial).update(e)
    # ...and one that is stopped (state saved on close) and restarted halfway.
    path = tmp_path / "b.npz"
    first = ScoreStates(path, save_every_s=3600)
    part1 = first.get("s|k=v", "m1", initial).update(e[:150])
    first.touch()
    first.maybe_save()
    assert not path.exists()  # not yet: saves are rate-limited
    first.close()
    again = ScoreStates(path)
    part2 = again.get("s|k=v", "m1", initial).update(e[150:])
    np.testing.assert_allclose(np.concatenate([part1, part2]), whole, rtol=1e-9)  # same up to rounding
    assert whole[250] >= 0.5 and (whole[:250] < 0.5).all()
    # A retrained model (another tag) starts from its own warm-up state, not the old history.
    fresh = again.get("s|k=v", "m2", initial)
    assert fresh.n_seen == 0


def test_score_states_corrupt_file_is_moved_aside_with_a_warning(tmp_path: Path,
                                                                caplog: pytest.LogCaptureFixture) -> None:
    path = tmp_path / "scores.npz"
    path.write_bytes(b"PK\x03\x04 truncated")
    states = ScoreStates(path)
    assert "unreadable" in caplog.text and path.with_suffix(".corrupt").exists() and not path.exists()
    assert states.get("s", "m", None).n_seen == 0
    states.close()
    assert ScoreStates(path).get("s", "m", None).n_seen == 0


def test_score_states_forget_series_not_scored_for_a_long_time(tmp_path: Path) -> None:
    now = [0.0]
    path = tmp_path / "scores.npz"
    states = ScoreStates(path, save_every_s=0, forget_after_s=100.0, clock=lambda: now[0])
    states.get("a", "m", None).update([1.0])
    states.get("b", "m", None).update([1.0])
    states.close()
    now[0] = 60.0
    again = ScoreStates(path, save_every_s=0, forget_after_s=100.0, clock=lambda: now[0])
    now[0] = 120.0
    again.get("a", "m", None)  # still scored; "b" is not
    now[0] = 170.0
    again.touch()
    again.save()  # "b" was last seen at load time (60 s), more than 100 s ago
    kept = ScoreStates(path, clock=lambda: now[0])
    assert kept.get("a", "m", None).n_seen == 1 and kept.get("b", "m", None).n_seen == 0
