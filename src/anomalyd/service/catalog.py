"""The persisted models: ``<model_id>.npz`` arrays plus ``<model_id>.json`` metadata, written atomically.

A model is the whole `anomalyd.core.detector.Detector`: its spec, the learned arrays (scaling, catalog shapes, field
references) and the warm score state, so a series starts scoring exactly where training left it.

Never pickle: ``np.load(allow_pickle=False)`` reads plain arrays only, and the JSON carries a SHA-256 of the
``.npz`` bytes so a truncated or tampered file is refused. The JSON is written last; it is the commit record.
"""

from __future__ import annotations

import hashlib
import io
import json
import logging
import zipfile
import zlib
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

import numpy as np
import sklearn

from .. import __version__
from ..core.detector import Detector, DetectorSpec
from ..core.records import Tags, legacy_tags_str, tags_str
from ..files import atomic_write

log = logging.getLogger(__name__)
SCHEMA_VERSION = 2
_ARRAYS = ("cluster_centers", "mean", "scale", "field_ref", "norm_hist", "norm_tail", "norm_lo", "norm_hi")


class CatalogError(ValueError):
    """A model file is missing, corrupt, tampered with, or from an incompatible version."""


def model_id_for(signal: str, tags: Tags, scope: str, legacy: bool = False) -> str:
    """A stable model id: the signal for a shared model, ``signal-<hash of the series key>`` per series.

    Examples
    --------
    >>> model_id_for("ekg", (), "shared")
    'ekg'
    >>> model_id_for("cpu", (("host", "h1"),), "series")
    'cpu-8ab6552e621e'
    """
    if scope == "shared":
        return signal
    key = legacy_tags_str(tags) if legacy else tags_str(tags)  # legacy: the id models had before keys were escaped
    return f"{signal}-{hashlib.sha1(key.encode()).hexdigest()[:12]}"


@dataclass(frozen=True)
class StoredModel:
    """A fitted model with its metadata, as saved in the catalog."""

    model_id: str
    signal: str
    tags: Tags
    scope: str
    model: Detector
    period_ns: int
    train_start_ns: int
    train_end_ns: int
    meta: dict[str, Any] = field(default_factory=dict, compare=False)

    @property
    def threshold(self) -> float:
        """The level on ``max_error`` learned from the hold-out (informational; the decision is the detector's)."""
        return float(self.model.threshold_)

    @property
    def fields(self) -> tuple[str, ...]:
        """The fields the model was trained on, in window order."""
        return tuple(self.meta.get("fields", ()))


def model_mismatch(stored: StoredModel, sig: Any) -> str | None:
    """Why a stored model cannot score a signal as configured now (None when it can).

    ``sig`` is a `anomalyd.config.SignalConfig`; a window of ``None`` (automatic) accepts any learned window.
    """
    det = stored.model
    problems = []
    if stored.period_ns != sig.period_ns:
        problems.append(f"period {stored.period_ns}ns (config: {sig.period_ns}ns)")
    if sig.window is not None and det.window_ != sig.window:
        problems.append(f"window {det.window_} (config: {sig.window})")
    if stored.scope != sig.scope:
        problems.append(f"scope {stored.scope} (config: {sig.scope})")
    fields = stored.fields
    names = tuple(getattr(sig, "field_names", (sig.field,)))
    if fields and tuple(fields) != names:
        added = [f for f in names if f not in fields] if len(names) > 1 else []
        problems.append(f"fields {', '.join(fields)} (config: {', '.join(names)}"
                        + (f"; new: {', '.join(added)}" if added else "") + ")")
    # Settings the model's state is built on (the score's history, the per-field history).
    want = getattr(sig, "score_history", None)
    if want is not None and det.spec.normaliser.long_window != want:
        problems.append(f"score_history {det.spec.normaliser.long_window} (config: {want})")
    want = getattr(sig, "field_history", None)
    if want is not None and len(names) > 1 and det.spec.field_surprise and det.spec.field_surprise != want:
        # (a model trained before the per-field history existed, 0, keeps scoring as it was trained)
        problems.append(f"field_history {det.spec.field_surprise} (config: {want})")
    if not problems:
        return None
    return (f"trained with {'; '.join(problems)}; retrain with `anomalyd train` or restore the config")


_DEFAULT_SCORE_THRESHOLD = DetectorSpec().score_threshold

#: A signal's settings that act after the reconstruction and its score's state (the decision, what a share is
#: proportional to, re-baselining): a trained model takes the config's values without retraining.
LIVE_SETTINGS = ("decision", "score_threshold", "attribution", "surprise_gate", "surprise_rebaseline")


def apply_live_settings(stored: StoredModel, want: DetectorSpec) -> str | None:
    """Give a stored model the `LIVE_SETTINGS` of ``want``, its signal's spec as configured now (in place; callers
    make the spec once per signal, not once per model: `SignalConfig.spec` costs about 20 us).

    A ``score_threshold`` tuned into the model (``anomalyd evaluate --tune``, ``meta["threshold_source"]``) is kept;
    the returned line says so when the config sets another level than the default (None otherwise: a tuned model
    under a config that leaves the level alone is the usual case, not a conflict).
    """
    det = stored.model
    changes = {k: getattr(want, k) for k in LIVE_SETTINGS if getattr(det.spec, k) != getattr(want, k)}
    note = None
    source = stored.meta.get("threshold_source")
    if "score_threshold" in changes and source:
        level = changes.pop("score_threshold")
        if level != _DEFAULT_SCORE_THRESHOLD:
            note = (f"model {stored.model_id} keeps its tuned score_threshold {det.spec.score_threshold:g} "
                    f"({source}), not the config's {level:g}; retrain to use the config's")
    if changes:
        det.spec = replace(det.spec, **changes)
    return note


def _meta_digest(meta: dict[str, Any]) -> str:
    """SHA-256 of the metadata (without its own digest), canonically serialised."""
    body = {k: v for k, v in meta.items() if k != "meta_sha256"}
    return hashlib.sha256(json.dumps(body, sort_keys=True, separators=(",", ":")).encode()).hexdigest()


def save(models_dir: Path, stored: StoredModel) -> Path:
    """Write the model atomically; return the path of its JSON metadata."""
    arrays, det_meta = stored.model.to_state()
    buf = io.BytesIO()
    np.savez(buf, **arrays)  # type: ignore[arg-type]
    blob = buf.getvalue()
    meta = {
        **{k: v for k, v in stored.meta.items() if k not in ("schema_version", "npz_sha256", "meta_sha256")},
        "schema_version": SCHEMA_VERSION,
        "model_id": stored.model_id,
        "signal": stored.signal,
        "series": tags_str(stored.tags),
        "tags": [list(t) for t in stored.tags],
        "scope": stored.scope,
        "detector": det_meta,
        "threshold": det_meta["threshold"],
        "period_ns": stored.period_ns,
        "train_start_ns": stored.train_start_ns,
        "train_end_ns": stored.train_end_ns,
        "versions": {"anomalyd": __version__, "numpy": np.__version__, "scikit-learn": sklearn.__version__},
        "npz_sha256": hashlib.sha256(blob).hexdigest(),
    }
    meta["meta_sha256"] = _meta_digest(meta)
    models_dir.mkdir(parents=True, exist_ok=True)
    atomic_write(models_dir / f"{stored.model_id}.npz", blob)
    path = models_dir / f"{stored.model_id}.json"
    atomic_write(path, json.dumps(meta, indent=2, sort_keys=True).encode())
    return path


def load(path: Path) -> StoredModel:
    """Load and verify one model from its JSON metadata path."""
    try:
        meta = json.loads(path.read_text())
    except FileNotFoundError:
        raise CatalogError(f"model file {path} does not exist; run `anomalyd train`") from None
    except (OSError, ValueError) as exc:
        raise CatalogError(f"model metadata {path} is unreadable ({exc}); retrain with `anomalyd train`") from exc
    if not isinstance(meta, dict) or meta.get("schema_version") != SCHEMA_VERSION:
        got = meta.get("schema_version") if isinstance(meta, dict) else None
        raise CatalogError(f"model {path} has schema_version={got!r} (an earlier anomalyd's model, without the "
                           f"whole detector), this anomalyd reads {SCHEMA_VERSION}; retrain with `anomalyd train`")
    if meta.get("meta_sha256") != _meta_digest(meta):
        raise CatalogError(f"model metadata {path} fails its checksum (edited or corrupt); retrain with "
                           f"`anomalyd train`, or change a threshold with catalog.set_threshold")
    npz = path.with_suffix(".npz")
    try:
        blob = npz.read_bytes()
    except OSError as exc:
        raise CatalogError(f"model arrays {npz} are unreadable ({exc.strerror}); retrain with `anomalyd train`"
                           ) from exc
    if hashlib.sha256(blob).hexdigest() != meta.get("npz_sha256"):
        raise CatalogError(f"model arrays {npz} fail their checksum (truncated or modified); retrain with "
                           f"`anomalyd train`")
    try:
        with np.load(io.BytesIO(blob), allow_pickle=False) as z:
            arrays = {name: np.asarray(z[name]) for name in _ARRAYS}
            arrays.update({name: np.asarray(z[name]) for name in z.files if name.startswith("scorer_")})
        model = Detector.from_state(arrays, meta["detector"])
        tags: Tags = tuple((str(k), str(v)) for k, v in meta["tags"])
        return StoredModel(model_id=str(meta["model_id"]), signal=str(meta["signal"]), tags=tags,
                           scope=str(meta["scope"]), model=model, period_ns=int(meta["period_ns"]),
                           train_start_ns=int(meta["train_start_ns"]), train_end_ns=int(meta["train_end_ns"]),
                           meta=meta)
    except (KeyError, TypeError, ValueError, EOFError, OSError, zipfile.BadZipFile, zlib.error) as exc:
        raise CatalogError(f"model {path} is malformed ({exc!s}); retrain with `anomalyd train`") from exc


def list_models(models_dir: Path) -> list[StoredModel]:
    """Every valid model in ``models_dir``; invalid ones are logged and left out."""
    out = []
    for path in sorted(models_dir.glob("*.json")):
        try:
            out.append(load(path))
        except CatalogError as exc:
            log.error("%s", exc)
    return out


def set_threshold(path: Path, threshold: float, source: str) -> None:
    """Replace a stored model's decision level (``score_threshold``, e.g. one tuned from labels), keeping
    everything else."""
    stored = load(path)
    det = stored.model
    det.spec = replace(det.spec, score_threshold=float(threshold))
    meta = dict(stored.meta)
    meta["threshold_source"] = source
    save(path.parent, StoredModel(**{**stored.__dict__, "meta": meta}))


class Catalog:
    """Cached access to the models of a directory; reloads a model when its file changes.

    A model that fails to load is reported once per change of its file and treated as absent.
    """

    def __init__(self, models_dir: Path) -> None:
        self.models_dir = models_dir
        self._cache: dict[str, tuple[tuple[int, ...], StoredModel | None]] = {}

    def get(self, model_id: str) -> StoredModel | None:
        path = self.models_dir / f"{model_id}.json"
        try:
            st = path.stat()
        except FileNotFoundError:
            self._cache.pop(model_id, None)
            return None
        try:
            nst = path.with_suffix(".npz").stat()
            npz_stamp = (nst.st_mtime_ns, nst.st_size)
        except FileNotFoundError:
            npz_stamp = (0, -1)
        stamp = (st.st_mtime_ns, st.st_size, *npz_stamp)
        cached = self._cache.get(model_id)
        if cached is not None and cached[0] == stamp:
            return cached[1]
        try:
            stored: StoredModel | None = load(path)
        except CatalogError as exc:
            log.error("%s", exc)
            stored = None
        self._cache[model_id] = (stamp, stored)
        return stored
