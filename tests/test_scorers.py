"""The window scorers (anomalyd.core.scorers) inside the detector: causal, chunk-invariant, persisted, and each one
finds what it is for."""

from __future__ import annotations

import io

import numpy as np
import pytest

from anomalyd.core.detector import Detector, DetectorSpec
from anomalyd.core.scorers import SCORERS, make_scorer, parse_scorers, spectral_residual

CONFIGS = [*SCORERS, "kmeans+discord", "fft+generalized"]


def _series(n: int = 3000, seed: int = 0) -> np.ndarray:
    rng = np.random.default_rng(seed)
    t = np.arange(n)
    x = np.sin(2 * np.pi * t / 40) + 0.05 * rng.standard_normal(n)
    x[2200:2240] = np.sin(2 * np.pi * t[2200:2240] / 13)  # a change of shape and frequency
    x[2600:2603] = np.nan  # a gap
    return x


def _fit(scorer: str, x: np.ndarray) -> Detector:
    return Detector(DetectorSpec(n_clusters=20, scorer=scorer, discord_max_ref=500)).fit([x[:1000]])


def _columns(b) -> dict[str, np.ndarray]:  # type: ignore[no-untyped-def]
    return {"error": b.error, "score": b.score, "anomalous": b.anomalous, "field_error": b.field_error}


def _assert_chunk_invariant_and_causal(det: Detector, x: np.ndarray) -> dict[str, np.ndarray]:
    """Fed in 97-sample chunks the detector gives what it gives in one call, and the results up to a row do not
    depend on what comes after it (causal). Returns the one-call columns."""
    whole = _columns(det.update(det.start(1000, x[:1000]), x[1000:]))
    st = det.start(1000, x[:1000])
    parts = [_columns(det.update(st, x[a : a + 97])) for a in range(1000, len(x), 97)]
    for key, col in whole.items():
        assert np.array_equal(col, np.concatenate([p[key] for p in parts]), equal_nan=True), key
    short = _columns(det.update(det.start(1000, x[:1000]), x[1000:2100]))
    for key, col in short.items():
        assert np.array_equal(col, whole[key][:1100], equal_nan=True), key
    return whole


@pytest.mark.parametrize("scorer", CONFIGS)
def test_each_scorer_is_chunk_invariant_and_causal(scorer: str) -> None:
    x = _series()
    det = _fit(scorer, x)
    _assert_chunk_invariant_and_causal(det, x)


@pytest.mark.parametrize("scorer", CONFIGS)
def test_each_scorer_survives_the_model_file(scorer: str) -> None:
    x = _series()
    det = _fit(scorer, x)
    arrays, meta = det.to_state()
    buf = io.BytesIO()
    np.savez(buf, **arrays)  # type: ignore[arg-type]
    with np.load(io.BytesIO(buf.getvalue()), allow_pickle=False) as z:
        again = Detector.from_state({k: z[k] for k in z.files}, meta)
    a = det.update(det.start(1000, x[:1000]), x[1000:])
    b = again.update(again.start(1000, x[:1000]), x[1000:])
    assert np.array_equal(a.score, b.score, equal_nan=True)
    assert np.array_equal(a.error, b.error, equal_nan=True)
    if scorer == "kmeans":  # the default model keeps exactly the arrays it always had
        assert not any(k.startswith("scorer_") for k in arrays)


@pytest.mark.parametrize("scorer", ["kmeans", "fft", "saliency", "generalized", "discord", "kmeans+discord"])
def test_each_shape_scorer_ranks_the_changed_stretch_first(scorer: str) -> None:
    x = _series()
    det = _fit(scorer, x)
    b = det.update(det.start(1000, x[:1000]), x[1000:])
    top = int(b.position[np.nanargmax(b.error)])
    assert 2200 <= top < 2240 + det.window_
    assert b.anomalous[1200 - 1000 : 2150 - 1000].sum() == 0  # nothing before it


def test_nodata_scores_the_gap_and_nothing_else() -> None:
    x = _series()
    x[2200:2240] = np.sin(2 * np.pi * np.arange(2200, 2240) / 40)  # no shape change: gaps only
    det = _fit("nodata", x)
    b = det.update(det.start(1000, x[:1000]), x[1000:])
    flagged = b.position[b.anomalous]
    assert flagged.size and flagged.min() >= 2600 and flagged.max() < 2603 + det.window_
    assert np.nanmax(b.error[: 2600 - 1000]) == 0.0


def test_discord_distance_is_stumpys_ab_join() -> None:
    stumpy = pytest.importorskip("stumpy")
    rng = np.random.default_rng(1)
    train = np.cumsum(rng.standard_normal(400))
    test = np.cumsum(rng.standard_normal(120))
    w = 24
    sc = make_scorer("discord", discord_max_ref=10_000)
    sc.fit([np.lib.stride_tricks.sliding_window_view(train, w)[:, :, None]], 10_000, 0)
    wins = np.lib.stride_tricks.sliding_window_view(test, w)[:, :, None]
    ours = sc.errors(wins)[:, 0] * np.sqrt(w)
    # stumpy's AB-join (`stumpy.stump(test, w, T_B=train, ignore_trivial=False)[:, 0]`) is, per test window, the
    # minimum of its MASS distance profile against the training series; `mass` gives the same figures and compiles
    # in a fraction of stump's time (the test took 35 s of the suite with stump).
    ref = np.array([stumpy.mass(test[i:i + w], train).min() for i in range(len(test) - w + 1)])
    assert np.allclose(ours, ref, atol=1e-6)


def test_spectral_residual_points_at_a_spike() -> None:
    x = np.sin(np.arange(64) / 3.0)
    x[40] += 4.0
    assert int(np.argmax(spectral_residual(x[None])[0])) == 40


def test_scorer_settings_are_validated() -> None:
    assert parse_scorers("kmeans+fft") == ("kmeans", "fft")
    with pytest.raises(ValueError, match="wavelet is not one of"):
        DetectorSpec(scorer="wavelet")
    with pytest.raises(ValueError, match="twice"):
        DetectorSpec(scorer="fft+fft")
    with pytest.raises(ValueError, match="nodata"):
        DetectorSpec(scorer="kmeans+nodata")


@pytest.mark.parametrize("options", [{"normaliser_tail": "exp"}, {"normaliser_tail": "gpd", "normaliser_peak_wait": 16},
                                     {"normaliser_unsaturated": True, "normaliser_peak_wait": 4, "range_by": "sample",
                                      "normaliser_range_growth": 1.0, "normaliser_tail": "exp"}])
def test_tail_and_peak_filter_through_the_detector_are_chunk_invariant_and_causal(options: dict) -> None:
    x = _series()
    det = Detector(DetectorSpec(n_clusters=20).with_overrides(**options)).fit([x[:1000]])
    assert det.normaliser_.pot is not None if "normaliser_tail" in options else det.normaliser_.pot is None
    whole = _assert_chunk_invariant_and_causal(det, x)
    assert whole["anomalous"][1200:1300].any()  # the change of shape is flagged


@pytest.mark.parametrize("options", [{}, {"normaliser_unsaturated": True, "normaliser_tail": "exp",
                                          "normaliser_peak_wait": 4, "range_by": "sample",
                                          "normaliser_range_growth": 1.0}])
def test_tail_and_peak_filter_state_survives_the_model_file(options: dict) -> None:
    """The model file's meta carries the options' small states (only with the options on) and `from_state` puts
    them back: the loaded detector scores as the fitted one."""
    import json

    x = _series()
    det = Detector(DetectorSpec(n_clusters=20).with_overrides(**options)).fit([x[:1000]])
    warm = det.start(1000, x[:1000])
    det.update(warm, x[1000:2209])  # with the peak filter, a run of reds is held when the state is taken
    det.normaliser_ = warm.norm.copy()
    arrays, meta = det.to_state()
    assert ("pot" in meta["normaliser"]) == bool(options) and ("peak" in meta["normaliser"]) == bool(options)
    assert not options or meta["normaliser"]["peak"][0] >= 0
    buf = io.BytesIO()
    np.savez(buf, **arrays)
    buf.seek(0)
    with np.load(buf) as z:
        loaded = Detector.from_state({k: z[k] for k in z.files}, json.loads(json.dumps(meta, allow_nan=False)))
    assert loaded.normaliser_.to_dict() == det.normaliser_.to_dict()
    a = _columns(det.update(det.start(2209, x[:2209]), x[2209:]))
    b = _columns(loaded.update(loaded.start(2209, x[:2209]), x[2209:]))
    for key, col in a.items():
        assert np.array_equal(col, b[key], equal_nan=True), key
