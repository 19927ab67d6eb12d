"""The persisted models: ``<model_id>.npz`` arrays plus ``<model_id>.json`` metadata, written atomically.

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
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import sklearn

from . import __version__
from .model import WindowReconstructor
from .records import Tags, tags_str
from .state import atomic_write

log = logging.getLogger(__name__)
SCHEMA_VERSION = 1
_PARAMS = ("window", "train_slide", "n_clusters", "random_state", "holdout", "threshold_policy", "margin",
           "quantile", "sigma_k", "max_train_windows", "n_init")


class CatalogError(ValueError):
    """A model file is missing, corrupt, tampered with, or from an incompatible version."""


def model_id_for(signal: str, tags: Tags, scope: str) -> str:
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
    return f"{signal}-{hashlib.sha1(tags_str(tags).encode()).hexdigest()[:12]}"


@dataclass(frozen=True)
class StoredModel:
    """A fitted model with its metadata, as saved in the catalog."""

    model_id: str
    signal: str
    tags: Tags
    scope: str
    model: WindowReconstructor
    period_ns: int
    train_start_ns: int
    train_end_ns: int
    meta: dict[str, Any] = field(default_factory=dict, compare=False)

    @property
    def threshold(self) -> float:
        return float(self.model.threshold_)


def _meta_digest(meta: dict[str, Any]) -> str:
    """SHA-256 of the metadata (without its own digest), canonically serialised."""
    body = {k: v for k, v in meta.items() if k != "meta_sha256"}
    return hashlib.sha256(json.dumps(body, sort_keys=True, separators=(",", ":")).encode()).hexdigest()


def save(models_dir: Path, stored: StoredModel) -> Path:
    """Write the model atomically; return the path of its JSON metadata."""
    m = stored.model
    buf = io.BytesIO()
    np.savez(buf, cluster_centers=m.cluster_centers_, error_quantiles=m.error_quantiles_)
    blob = buf.getvalue()
    meta = {
        **{k: v for k, v in stored.meta.items() if k not in ("schema_version", "npz_sha256", "meta_sha256")},
        "schema_version": SCHEMA_VERSION,
        "model_id": stored.model_id,
        "signal": stored.signal,
        "series": tags_str(stored.tags),
        "tags": [list(t) for t in stored.tags],
        "scope": stored.scope,
        "params": {p: getattr(m, p) for p in _PARAMS},
        "threshold": float(m.threshold_),
        "n_train_windows": int(m.n_train_windows_),
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
        raise CatalogError(f"model {path} has schema_version={got!r}, this anomalyd reads {SCHEMA_VERSION}; "
                           f"retrain with `anomalyd train`")
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
        with np.load(io.BytesIO(blob), allow_pickle=False) as arrays:
            centers = np.asarray(arrays["cluster_centers"], dtype=np.float64)
            quantiles = np.asarray(arrays["error_quantiles"], dtype=np.float64)
        params = {p: meta["params"][p] for p in _PARAMS}
        model = WindowReconstructor(**params)
        if centers.ndim != 2 or centers.shape[1] != model.window:
            raise ValueError(f"centroids of shape {centers.shape} do not match window={model.window}")
        model.cluster_centers_ = centers
        model.error_quantiles_ = quantiles
        model.threshold_ = float(meta["threshold"])
        model.n_train_windows_ = int(meta.get("n_train_windows", 0))
        model.n_features_in_ = model.window
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
    """Replace a stored model's threshold (e.g. one tuned from labels), keeping everything else."""
    stored = load(path)
    stored.model.threshold_ = float(threshold)
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
