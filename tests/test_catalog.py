"""The model catalog: npz + JSON round trip; truncated, tampered, pickle-bearing or foreign files are refused."""

from __future__ import annotations

import copy
import io
import json
import logging
import os
from pathlib import Path

import numpy as np
import pytest

from anomalyd import catalog
from anomalyd.catalog import Catalog, CatalogError, StoredModel, model_id_for
from anomalyd.model import WindowReconstructor, sliding_windows
from anomalyd.synthetic import ecg

TAGS = (("patient", "p1"),)


@pytest.fixture(scope="module")
def fitted() -> WindowReconstructor:
    x, _ = ecg(4000, seed=3)
    return WindowReconstructor(window=32, n_clusters=20, n_init=1, random_state=1).fit(x)


@pytest.fixture(scope="module")
def test_windows() -> np.ndarray:
    x, _ = ecg(2000, seed=4)
    x[700:712] = 300.0  # a saturated stretch, so some windows are anomalous
    return sliding_windows(x, 32, 16)


def stored(model: WindowReconstructor, tags: tuple[tuple[str, str], ...] = TAGS) -> StoredModel:
    return StoredModel(model_id=model_id_for("heartbeat", tags, "series"), signal="heartbeat", tags=tags,
                       scope="series", model=model, period_ns=10**9, train_start_ns=10, train_end_ns=20,
                       meta={"n_samples": 4000})


@pytest.fixture
def saved(tmp_path: Path, fitted: WindowReconstructor) -> Path:
    return catalog.save(tmp_path / "models", stored(fitted))


def save_consistent(models_dir: Path, model: WindowReconstructor) -> Path:
    """Save through ``catalog.save`` itself, so every checksum matches: what a buggy writer, or an attacker who
    can write the model directory and recompute checksums, produces. Only the content can refuse it."""
    return catalog.save(models_dir, stored(model))


def test_round_trip_scores_identically(saved: Path, fitted: WindowReconstructor, test_windows: np.ndarray) -> None:
    assert sorted(p.name for p in saved.parent.iterdir()) == [saved.name, saved.with_suffix(".npz").name]
    back = catalog.load(saved)
    assert (back.model_id, back.signal, back.tags, back.scope, back.period_ns) == (
        model_id_for("heartbeat", TAGS, "series"), "heartbeat", TAGS, "series", 10**9)
    assert (back.train_start_ns, back.train_end_ns) == (10, 20)
    assert back.threshold == fitted.threshold_
    assert back.model.get_params() == fitted.get_params()
    np.testing.assert_array_equal(back.model.cluster_centers_, fitted.cluster_centers_)
    e1, a1, s1 = fitted.score_windows(test_windows)
    e2, a2, s2 = back.model.score_windows(test_windows)
    np.testing.assert_array_equal(e1, e2)
    np.testing.assert_array_equal(a1, a2)
    np.testing.assert_array_equal(s1, s2)
    assert a1.any() and not a1.all()  # the comparison covers both outcomes
    meta = json.loads(saved.read_text())
    assert meta["schema_version"] == catalog.SCHEMA_VERSION and meta["n_samples"] == 4000
    assert {"anomalyd", "numpy", "scikit-learn"} <= set(meta["versions"])
    assert meta["series"] == "patient=p1" and meta["params"]["window"] == 32


def test_save_leaves_no_temporary_files(tmp_path: Path, fitted: WindowReconstructor) -> None:
    for i in range(3):
        catalog.save(tmp_path, stored(fitted, (("patient", f"p{i}"),)))
    assert all(not p.name.startswith(".") for p in tmp_path.iterdir())
    assert len(list(tmp_path.iterdir())) == 6


def test_truncated_npz_is_refused(saved: Path) -> None:
    npz = saved.with_suffix(".npz")
    npz.write_bytes(npz.read_bytes()[: npz.stat().st_size // 2])
    with pytest.raises(CatalogError, match=r"fail their checksum \(truncated or modified\); retrain") as info:
        catalog.load(saved)
    assert str(npz) in str(info.value)


@pytest.mark.parametrize("where", [0.1, 0.5, 0.9, -1])
def test_one_flipped_byte_in_the_npz_is_refused(saved: Path, where: float) -> None:
    npz = saved.with_suffix(".npz")
    blob = bytearray(npz.read_bytes())
    i = int(len(blob) * where) if where >= 0 else len(blob) - 1
    blob[i] ^= 0x01
    npz.write_bytes(bytes(blob))
    with pytest.raises(CatalogError, match="checksum"):
        catalog.load(saved)


def test_truncated_npz_with_a_matching_checksum_is_refused(tmp_path: Path, fitted: WindowReconstructor,
                                                           monkeypatch: pytest.MonkeyPatch) -> None:
    real_savez = np.savez

    def truncated_savez(buf: io.BytesIO, **arrays: np.ndarray) -> None:
        real_savez(buf, **arrays)
        buf.truncate(200)

    monkeypatch.setattr(catalog.np, "savez", truncated_savez)
    path = save_consistent(tmp_path, fitted)
    monkeypatch.undo()
    with pytest.raises(CatalogError, match=r"malformed.*retrain") as info:
        catalog.load(path)
    assert str(path) in str(info.value)


def test_truncated_or_garbage_json_is_refused(saved: Path) -> None:
    text = saved.read_text()
    saved.write_text(text[: len(text) // 2])
    with pytest.raises(CatalogError, match=r"unreadable.*retrain"):
        catalog.load(saved)
    saved.write_bytes(b"\xff\xfe\x00\x01")
    with pytest.raises(CatalogError, match="unreadable"):
        catalog.load(saved)


@pytest.mark.parametrize("version", [2, 0, "1", None])
def test_wrong_schema_version_is_refused(saved: Path, version: object) -> None:
    meta = json.loads(saved.read_text())
    if version is None:
        del meta["schema_version"]
    else:
        meta["schema_version"] = version
    saved.write_text(json.dumps(meta))
    with pytest.raises(CatalogError, match=rf"schema_version={version!r}, this anomalyd reads 1; retrain"):
        catalog.load(saved)


def test_missing_files_are_refused(saved: Path, tmp_path: Path) -> None:
    with pytest.raises(CatalogError, match="does not exist; run `anomalyd train`"):
        catalog.load(tmp_path / "nope.json")
    saved.with_suffix(".npz").unlink()
    with pytest.raises(CatalogError, match="unreadable"):
        catalog.load(saved)


def test_metadata_that_disagrees_with_the_arrays_is_refused(tmp_path: Path, fitted: WindowReconstructor,
                                                           saved: Path) -> None:
    wrong = copy.deepcopy(fitted)
    wrong.window = 16  # the params say 16, the centroids have 32 columns
    with pytest.raises(CatalogError, match="do not match window=16"):
        catalog.load(save_consistent(tmp_path / "wrong", wrong))
    meta = json.loads(saved.read_text())
    del meta["params"]
    saved.write_text(json.dumps(meta))
    with pytest.raises(CatalogError, match="retrain") as info:
        catalog.load(saved)
    assert str(saved) in str(info.value)


class _Payload:
    """Unpickling this would create ``marker``: proof that a model file ran code."""

    def __init__(self, marker: Path) -> None:
        self.marker = marker

    def __reduce__(self) -> tuple[object, tuple[str, str]]:
        return (open, (str(self.marker), "w"))


def test_a_pickle_bearing_npz_is_refused_without_running_it(tmp_path: Path, fitted: WindowReconstructor) -> None:
    marker = tmp_path / "pwned"
    evil = copy.deepcopy(fitted)
    evil.cluster_centers_ = np.empty((1, 32), dtype=object)
    evil.cluster_centers_[0, 0] = _Payload(marker)
    path = save_consistent(tmp_path / "models", evil)  # np.savez pickles object arrays; checksums all match
    assert b"pwned" in path.with_suffix(".npz").read_bytes()
    with pytest.raises(CatalogError, match=r"malformed.*retrain"):
        catalog.load(path)
    assert not marker.exists()


def test_a_tampered_threshold_in_the_json_is_refused(saved: Path) -> None:
    meta = json.loads(saved.read_text())
    meta["threshold"] = 1e12  # nothing would ever be flagged again
    saved.write_text(json.dumps(meta, indent=2, sort_keys=True))
    with pytest.raises(CatalogError):
        catalog.load(saved)


def test_set_threshold_rewrites_a_consistent_model(saved: Path, test_windows: np.ndarray) -> None:
    catalog.set_threshold(saved, 1.0, source="labels")
    back = catalog.load(saved)
    assert back.threshold == 1.0 and back.meta["threshold_source"] == "labels"
    assert back.model.score_windows(test_windows)[1].all()


def test_list_models_skips_and_logs_bad_ones(tmp_path: Path, fitted: WindowReconstructor,
                                             caplog: pytest.LogCaptureFixture) -> None:
    good = catalog.save(tmp_path, stored(fitted, (("patient", "good"),)))
    bad = catalog.save(tmp_path, stored(fitted, (("patient", "bad"),)))
    bad.with_suffix(".npz").write_bytes(b"PK\x03\x04 not really")
    with caplog.at_level(logging.ERROR, logger="anomalyd.catalog"):
        models = catalog.list_models(tmp_path)
    assert [m.tags for m in models] == [(("patient", "good"),)]
    assert good.exists()
    assert [r.getMessage() for r in caplog.records if str(bad.with_suffix(".npz")) in r.getMessage()]


# -- the cached catalog the worker uses -----------------------------------------------------------------------


def _bump_mtime(path: Path) -> None:
    st = path.stat()
    os.utime(path, ns=(st.st_atime_ns, st.st_mtime_ns + 10**9))


def test_catalog_caches_and_reloads_on_change(tmp_path: Path, fitted: WindowReconstructor) -> None:
    cat = Catalog(tmp_path)
    mid = model_id_for("heartbeat", TAGS, "series")
    assert cat.get(mid) is None  # not trained yet
    path = catalog.save(tmp_path, stored(fitted))
    first = cat.get(mid)
    assert first is not None and first.threshold == fitted.threshold_
    assert cat.get(mid) is first  # unchanged file: served from the cache
    retrained = WindowReconstructor(**{**fitted.get_params(), "margin": 2 * fitted.margin})
    retrained.fit(ecg(4000, seed=3)[0])
    catalog.save(tmp_path, stored(retrained))
    _bump_mtime(path)
    second = cat.get(mid)
    assert second is not None and second is not first
    assert second.threshold == pytest.approx(fitted.threshold_ * 2) and second.model.margin == 2 * fitted.margin
    path.unlink()
    assert cat.get(mid) is None  # removed: forgotten


def test_catalog_returns_none_for_a_corrupt_model_with_one_log_line(
        tmp_path: Path, fitted: WindowReconstructor, caplog: pytest.LogCaptureFixture) -> None:
    cat = Catalog(tmp_path)
    mid = model_id_for("heartbeat", TAGS, "series")
    path = catalog.save(tmp_path, stored(fitted))
    text = path.read_text()
    path.write_text(text[:-40])
    with caplog.at_level(logging.DEBUG, logger="anomalyd.catalog"):
        for _ in range(5):
            assert cat.get(mid) is None
    errors = [r for r in caplog.records if r.levelno >= logging.ERROR]
    assert len(errors) == 1, [r.getMessage() for r in errors]
    assert str(path) in errors[0].getMessage() and "retrain" in errors[0].getMessage()
    # Retraining (a new file) is picked up without a restart.
    catalog.save(tmp_path, stored(fitted))
    _bump_mtime(path)
    assert cat.get(mid) is not None


def test_catalog_recovers_when_the_npz_arrives_after_the_json(tmp_path: Path, fitted: WindowReconstructor) -> None:
    cat = Catalog(tmp_path)
    mid = model_id_for("heartbeat", TAGS, "series")
    path = catalog.save(tmp_path, stored(fitted))
    npz = path.with_suffix(".npz")
    blob = npz.read_bytes()
    npz.unlink()
    assert cat.get(mid) is None
    npz.write_bytes(blob)
    assert cat.get(mid) is not None
