"""Watermarks: persisted, never moving backwards, written atomically, a corrupt file is a clear StateError."""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest

from anomalyd import state
from anomalyd.state import StateError, Watermarks, atomic_write


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
