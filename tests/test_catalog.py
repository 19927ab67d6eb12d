"""The model catalog: npz + JSON round trip; truncated, tampered, pickle-bearing or foreign files are refused."""

from __future__ import annotations

import copy
import io
import json
import logging
import os
from dataclasses import fields, replace
from pathlib import Path

import numpy as np
import pytest

from anomalyd.config import from_dict
from anomalyd.core.detector import Detector, DetectorSpec, WindowBatch
from anomalyd.demo.synthetic import ecg
from anomalyd.service import catalog
from anomalyd.service.catalog import (
    Catalog,
    CatalogError,
    StoredModel,
    apply_live_settings,
    model_id_for,
    model_mismatch,
)

TAGS = (("patient", "p1"),)
SPEC = DetectorSpec(window=32, n_clusters=20, n_init=1, random_state=1)


@pytest.fixture(scope="module")
def fitted() -> Detector:
    x, _ = ecg(4000, seed=3)
    return Detector(SPEC).fit([x])


@pytest.fixture(scope="module")
def test_data() -> np.ndarray:
    x, _ = ecg(2000, seed=4)
    x[700:712] = 300.0  # a saturated stretch, so some windows are anomalous
    return x


def run(det: Detector, x: np.ndarray) -> WindowBatch:
    """Stream ``x`` through the detector from its warm state, as the daemon does."""
    return det.update(det.start(0), x)


def assert_same_batch(a: WindowBatch, b: WindowBatch) -> None:
    for f in fields(a):
        np.testing.assert_array_equal(getattr(a, f.name), getattr(b, f.name), err_msg=f.name)


def stored(model: Detector, tags: tuple[tuple[str, str], ...] = TAGS, **meta: object) -> StoredModel:
    return StoredModel(model_id=model_id_for("heartbeat", tags, "series"), signal="heartbeat", tags=tags,
                       scope="series", model=model, period_ns=10**9, train_start_ns=10, train_end_ns=20,
                       meta={"n_samples": 4000, **meta})


@pytest.fixture
def saved(tmp_path: Path, fitted: Detector) -> Path:
    return catalog.save(tmp_path / "models", stored(fitted))


def save_consistent(models_dir: Path, model: Detector) -> Path:
    """Save through ``catalog.save`` itself, so every checksum matches: what a buggy writer, or an attacker who
    can write the model directory and recompute checksums, produces. Only the content can refuse it."""
    return catalog.save(models_dir, stored(model))


def rewrite_meta(path: Path, meta: dict) -> None:
    """Write edited metadata with a recomputed checksum (a consistent file whose content is wrong)."""
    meta["meta_sha256"] = catalog._meta_digest(meta)
    path.write_text(json.dumps(meta, indent=2, sort_keys=True))


def test_round_trip_scores_identically(saved: Path, fitted: Detector, test_data: np.ndarray) -> None:
    assert sorted(p.name for p in saved.parent.iterdir()) == [saved.name, saved.with_suffix(".npz").name]
    back = catalog.load(saved)
    assert (back.model_id, back.signal, back.tags, back.scope, back.period_ns) == (
        model_id_for("heartbeat", TAGS, "series"), "heartbeat", TAGS, "series", 10**9)
    assert (back.train_start_ns, back.train_end_ns) == (10, 20)
    assert back.threshold == fitted.threshold_
    det = back.model
    assert isinstance(det, Detector) and det is not fitted
    assert det.spec == fitted.spec and (det.window_, det.n_fields_) == (fitted.window_, fitted.n_fields_) == (32, 1)
    assert det.error_threshold_ == fitted.error_threshold_
    np.testing.assert_array_equal(det.catalog_.cluster_centers_, fitted.catalog_.cluster_centers_)
    for name in ("mean_", "scale_", "field_ref_"):
        np.testing.assert_array_equal(getattr(det, name), getattr(fitted, name), err_msg=name)
    assert det.normaliser_.to_dict() == fitted.normaliser_.to_dict()  # the warm score state, exactly
    expected = run(fitted, test_data)
    got = run(det, test_data)
    assert_same_batch(expected, got)
    assert expected.anomalous.any() and not expected.anomalous.all()  # the comparison covers both outcomes
    assert np.isfinite(expected.score).sum() > 1000
    meta = json.loads(saved.read_text())
    assert meta["schema_version"] == catalog.SCHEMA_VERSION == 2 and meta["n_samples"] == 4000
    assert {"anomalyd", "numpy", "scikit-learn"} <= set(meta["versions"])
    assert meta["series"] == "patient=p1" and meta["detector"]["window"] == 32
    assert DetectorSpec.from_dict(meta["detector"]["spec"]) == SPEC


def test_save_leaves_no_temporary_files(tmp_path: Path, fitted: Detector) -> None:
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


def test_truncated_npz_with_a_matching_checksum_is_refused(tmp_path: Path, fitted: Detector,
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


@pytest.mark.parametrize("version", [3, 0, "2", None])
def test_wrong_schema_version_is_refused(saved: Path, version: object) -> None:
    meta = json.loads(saved.read_text())
    if version is None:
        del meta["schema_version"]
    else:
        meta["schema_version"] = version
    rewrite_meta(saved, meta)
    with pytest.raises(CatalogError, match=rf"schema_version={version!r} .*this anomalyd reads 2; retrain") as info:
        catalog.load(saved)
    assert str(saved) in str(info.value)


def test_a_schema_1_model_is_refused_with_a_message_to_retrain(saved: Path) -> None:
    """A model written by anomalyd before the one detector (a K-Means model without the detector's state)."""
    meta = json.loads(saved.read_text())
    meta["schema_version"] = 1
    del meta["detector"]
    meta["params"] = {"window": 32, "slide": 16, "n_clusters": 20, "margin": 1.0}
    rewrite_meta(saved, meta)
    with pytest.raises(CatalogError, match="schema_version=1") as info:
        catalog.load(saved)
    assert "retrain" in str(info.value) and "anomalyd train" in str(info.value) and str(saved) in str(info.value)


def test_missing_files_are_refused(saved: Path, tmp_path: Path) -> None:
    with pytest.raises(CatalogError, match="does not exist; run `anomalyd train`"):
        catalog.load(tmp_path / "nope.json")
    saved.with_suffix(".npz").unlink()
    with pytest.raises(CatalogError, match="unreadable"):
        catalog.load(saved)


def test_metadata_that_disagrees_with_the_arrays_is_refused(tmp_path: Path, fitted: Detector,
                                                           saved: Path) -> None:
    wrong = copy.deepcopy(fitted)
    wrong.window_ = 16  # the metadata says 16, the shapes have 32 columns
    with pytest.raises(CatalogError, match=r"malformed.*do not match window=16.*retrain"):
        catalog.load(save_consistent(tmp_path / "wrong", wrong))
    wrong = copy.deepcopy(fitted)
    wrong.mean_ = np.zeros(2)  # two fields' scaling for a one-field model
    with pytest.raises(CatalogError, match=r"malformed.*mean has shape \(2,\), expected \(1,\)"):
        catalog.load(save_consistent(tmp_path / "wrong2", wrong))
    meta = json.loads(saved.read_text())
    del meta["detector"]["normaliser"]  # consistent checksums, a key missing
    rewrite_meta(saved, meta)
    with pytest.raises(CatalogError, match=r"malformed.*retrain") as info:
        catalog.load(saved)
    assert str(saved) in str(info.value)


def test_an_unknown_detector_parameter_is_refused(saved: Path) -> None:
    meta = json.loads(saved.read_text())
    meta["detector"]["spec"]["new_knob"] = 1  # from a newer anomalyd
    rewrite_meta(saved, meta)
    with pytest.raises(CatalogError, match=r"malformed.*new_knob.*retrain"):
        catalog.load(saved)


class _Payload:
    """Unpickling this would create ``marker``: proof that a model file ran code."""

    def __init__(self, marker: Path) -> None:
        self.marker = marker

    def __reduce__(self) -> tuple[object, tuple[str, str]]:
        return (open, (str(self.marker), "w"))


def test_a_pickle_bearing_npz_is_refused_without_running_it(tmp_path: Path, fitted: Detector) -> None:
    marker = tmp_path / "pwned"
    evil = copy.deepcopy(fitted)
    centers = np.empty((1, 32), dtype=object)
    centers[0, 0] = _Payload(marker)
    evil.catalog_.cluster_centers_ = centers
    path = save_consistent(tmp_path / "models", evil)  # np.savez pickles object arrays; checksums all match
    assert b"pwned" in path.with_suffix(".npz").read_bytes()
    with pytest.raises(CatalogError, match=r"malformed.*retrain"):
        catalog.load(path)
    assert not marker.exists()


@pytest.mark.parametrize("edit", ["threshold", "score_threshold", "window"])
def test_a_tampered_json_is_refused(saved: Path, edit: str) -> None:
    meta = json.loads(saved.read_text())
    if edit == "threshold":
        meta["threshold"] = 1e12  # the reported max_error level
    elif edit == "score_threshold":
        meta["detector"]["spec"]["score_threshold"] = 1.0  # almost nothing would be flagged again
    else:
        meta["detector"]["window"] = 16
    saved.write_text(json.dumps(meta, indent=2, sort_keys=True))
    with pytest.raises(CatalogError, match=r"fails its checksum.*retrain"):
        catalog.load(saved)


def test_set_threshold_changes_the_decision_and_keeps_the_model_consistent(
        saved: Path, fitted: Detector, test_data: np.ndarray) -> None:
    # An earlier, larger fault: the later one is then no record, so it keeps its likelihood score (a record would
    # score above every score before it, at the top of the range with the first).
    test_data = test_data.copy()
    test_data[300:312] = 400.0
    before = run(fitted, test_data)
    scores = np.nan_to_num(before.score, nan=-1.0)
    # A level between the default 0.5 and the highest score: some windows flagged before are not any more.
    tau = float((fitted.spec.score_threshold + scores.max()) / 2)
    assert ((scores >= fitted.spec.score_threshold) & (scores < tau)).any()
    catalog.set_threshold(saved, tau, source="labels")
    back = catalog.load(saved)  # the checksums were rewritten: it loads
    assert back.model.spec.score_threshold == tau and back.meta["threshold_source"] == "labels"
    assert back.model.spec == replace(fitted.spec, score_threshold=tau)
    assert back.threshold == fitted.threshold_  # the reported max_error level is unchanged
    after = run(back.model, test_data)
    np.testing.assert_array_equal(after.score, before.score)  # the scores do not change, only the decision
    np.testing.assert_array_equal(after.anomalous, scores >= tau)
    assert 0 < after.anomalous.sum() < before.anomalous.sum()
    meta = json.loads(saved.read_text())
    assert meta["detector"]["spec"]["score_threshold"] == tau and meta["n_samples"] == 4000


def test_model_mismatch_names_what_differs(fitted: Detector) -> None:
    raw = {"signals": [{"name": "heartbeat", "measurement": "ecg", "field": "value", "period": "1s",
                        "window": 32}]}
    sig = from_dict(raw, env={}).signal("heartbeat")
    model = stored(fitted, fields=["value"])
    assert model_mismatch(model, sig) is None
    assert model_mismatch(model, replace(sig, window=None)) is None  # automatic: any learned window
    assert model_mismatch(stored(fitted), replace(sig, field="other")) is None  # fields unknown: not checked
    why = model_mismatch(model, replace(sig, window=16))
    assert why is not None and "window 32 (config: 16)" in why and "retrain with `anomalyd train`" in why
    why = model_mismatch(model, replace(sig, period_ns=2 * 10**9))
    assert why is not None and "period 1000000000ns (config: 2000000000ns)" in why and "retrain" in why
    why = model_mismatch(model, replace(sig, scope="shared"))
    assert why is not None and "scope series (config: shared)" in why
    why = model_mismatch(model, replace(sig, field="other"))
    assert why is not None and "fields value (config: other)" in why
    why = model_mismatch(model, replace(sig, window=16, period_ns=2 * 10**9))
    assert why is not None and "window 32 (config: 16)" in why and "period 1000000000ns" in why


def test_the_score_and_field_histories_need_a_retrain(fitted: Detector) -> None:
    """The score's history length and the per-field history shape the model's score state: changed in the config,
    the model is refused with a message to retrain (a model from before the per-field history keeps scoring)."""
    raw = {"signals": [{"name": "heartbeat", "measurement": "ecg", "fields": ["a", "b"], "period": "1s"}]}
    sig = from_dict(raw, env={}).signal("heartbeat")
    model = stored(fitted, fields=["a", "b"])
    assert model_mismatch(model, sig) is None
    n = fitted.spec.normaliser.long_window
    why = model_mismatch(model, replace(sig, score_history=n // 2))
    assert why is not None and f"score_history {n} (config: {n // 2})" in why and "retrain" in why
    why = model_mismatch(model, replace(sig, field_history=800))
    assert why is not None and f"field_history {fitted.spec.field_surprise} (config: 800)" in why
    old = copy.copy(fitted)
    old.spec = replace(fitted.spec, field_surprise=0)
    assert model_mismatch(stored(old, fields=["a", "b"]), replace(sig, field_history=800)) is None
    one = from_dict({"signals": [{**raw["signals"][0], "fields": ["a"]}]}, env={}).signal("heartbeat")
    assert model_mismatch(stored(fitted, fields=["a"]), replace(one, field_history=800)) is None  # no effect


def test_the_configs_decision_settings_reach_a_trained_model(saved: Path, fitted: Detector) -> None:
    """decision, score_threshold, attribution and re-baselining act after the reconstruction: a trained model
    takes the config's values without a retrain; a threshold tuned into the model is kept, and said so."""
    raw = {"signals": [{"name": "heartbeat", "measurement": "ecg", "field": "value", "period": "1s",
                        "score_threshold": 0.7, "decision": "either", "attribution": "movement"}]}
    sig = from_dict(raw, env={}).signal("heartbeat")
    back = catalog.load(saved)
    assert model_mismatch(back, sig) is None and apply_live_settings(back, sig.spec()) is None
    assert back.model.spec == replace(fitted.spec, score_threshold=0.7, decision="either", attribution="movement")
    catalog.set_threshold(saved, 0.8, source="labels")
    tuned = catalog.load(saved)
    note = apply_live_settings(tuned, sig.spec())
    assert (tuned.model.spec.score_threshold, tuned.model.spec.decision) == (0.8, "either")
    assert note is not None and "keeps its tuned score_threshold 0.8 (labels), not the config's 0.7" in note, note
    # A config that leaves the level at its default: the tuned level wins without a word (the usual workflow).
    plain = from_dict({"signals": [{**raw["signals"][0], "score_threshold": 0.5}]}, env={}).signal("heartbeat")
    again = catalog.load(saved)
    assert apply_live_settings(again, plain.spec()) is None and again.model.spec.score_threshold == 0.8


def test_list_models_skips_and_logs_bad_ones(tmp_path: Path, fitted: Detector,
                                             caplog: pytest.LogCaptureFixture) -> None:
    good = catalog.save(tmp_path, stored(fitted, (("patient", "good"),)))
    bad = catalog.save(tmp_path, stored(fitted, (("patient", "bad"),)))
    bad.with_suffix(".npz").write_bytes(b"PK\x03\x04 not really")
    with caplog.at_level(logging.ERROR, logger="anomalyd.service.catalog"):
        models = catalog.list_models(tmp_path)
    assert [m.tags for m in models] == [(("patient", "good"),)]
    assert good.exists()
    assert [r.getMessage() for r in caplog.records if str(bad.with_suffix(".npz")) in r.getMessage()]


# -- the cached catalog the worker uses -----------------------------------------------------------------------


def _bump_mtime(path: Path) -> None:
    st = path.stat()
    os.utime(path, ns=(st.st_atime_ns, st.st_mtime_ns + 10**9))


def test_catalog_caches_and_reloads_on_change(tmp_path: Path, fitted: Detector) -> None:
    cat = Catalog(tmp_path)
    mid = model_id_for("heartbeat", TAGS, "series")
    assert cat.get(mid) is None  # not trained yet
    path = catalog.save(tmp_path, stored(fitted))
    first = cat.get(mid)
    assert first is not None and first.threshold == fitted.threshold_
    assert cat.get(mid) is first  # unchanged file: served from the cache
    retrained = Detector(fitted.spec.with_overrides(margin=2 * fitted.spec.margin))
    retrained.fit([ecg(4000, seed=3)[0]])
    catalog.save(tmp_path, stored(retrained))
    _bump_mtime(path)
    second = cat.get(mid)
    assert second is not None and second is not first
    assert second.threshold == pytest.approx(fitted.threshold_ * 2)
    assert second.model.spec.margin == 2 * fitted.spec.margin
    path.unlink()
    assert cat.get(mid) is None  # removed: forgotten


def test_catalog_returns_none_for_a_corrupt_model_with_one_log_line(
        tmp_path: Path, fitted: Detector, caplog: pytest.LogCaptureFixture) -> None:
    cat = Catalog(tmp_path)
    mid = model_id_for("heartbeat", TAGS, "series")
    path = catalog.save(tmp_path, stored(fitted))
    text = path.read_text()
    path.write_text(text[:-40])
    with caplog.at_level(logging.DEBUG, logger="anomalyd.service.catalog"):
        for _ in range(5):
            assert cat.get(mid) is None
    errors = [r for r in caplog.records if r.levelno >= logging.ERROR]
    assert len(errors) == 1, [r.getMessage() for r in errors]
    assert str(path) in errors[0].getMessage() and "retrain" in errors[0].getMessage()
    # Retraining (a new file) is picked up without a restart.
    catalog.save(tmp_path, stored(fitted))
    _bump_mtime(path)
    assert cat.get(mid) is not None


def test_catalog_recovers_when_the_npz_arrives_after_the_json(tmp_path: Path, fitted: Detector) -> None:
    cat = Catalog(tmp_path)
    mid = model_id_for("heartbeat", TAGS, "series")
    path = catalog.save(tmp_path, stored(fitted))
    npz = path.with_suffix(".npz")
    blob = npz.read_bytes()
    npz.unlink()
    assert cat.get(mid) is None
    npz.write_bytes(blob)
    assert cat.get(mid) is not None
