"""The one detector: scaling, window, shape catalog, window errors, score normaliser and decision (pure).

`Detector` is what the daemon runs and what `anomalyd evaluate` and the benchmarks measure: there is no second
implementation. It has one streaming entry point, `Detector.update_many` (`Detector.update` for one series):
feed newly aligned samples, get a result for every completed window. The daemon calls it tick by tick with a few
samples per series; an evaluation calls it once over a stored series. Both give the same results bit for bit
(`anomalyd.core.normaliser` is chunk-invariant).

Following scikit-learn, the constructor only stores the `DetectorSpec`; `fit` sets the learned attributes
(ending in ``_``). Following river, learning is kept apart from scoring: the per-series running state (the last
``window - 1`` samples, the score history, the stride position) lives in a `SeriesState` the caller owns.

What it does, with the defaults of `DetectorSpec`:

1. **Scaling**: per field, the training mean and standard deviation (floored at ``max(min_scale,
   1e-3 * |mean|, 1e-12)`` so a flat field does not divide by zero).
2. **Window**: `choose_window` -- half the dominant period of the training data (autocorrelation), clipped to
   ``[min_window, max_window]``; ``default_window`` (32, the reference) when there is no clear period or when a
   window spans several fields. A fixed ``window`` overrides it. Chosen at training time and persisted.
3. **Catalog**: `anomalyd.core.model.ShapeCatalog` (K-Means over sin²-tapered windows) on the first ``1 - holdout`` of
   every gap-free training stretch. The number of shapes adapts to the data: ``min(n_clusters, max(2,
   training windows // clusters_per_window))``.
4. **Errors** of a window against its nearest shape, per field: the mean absolute difference (the score's input;
   divided by that field's 99th percentile on the hold-out when there are several fields, so one noisy field
   does not drown the others; the window's error is the largest), the max absolute difference (``max_error``,
   in the series' units for one field), and the direction (the signed mean: above or below the shape).
5. **Score**: `anomalyd.core.normaliser` -- the anomaly likelihood of the error against the series' own recent
   history, on NAB's log scale, plus the out-of-range rule; warmed up on the hold-out and the training range.
6. **Decision**: ``anomalous = score >= score_threshold`` (0.5: a tail probability of 1e-5). ``threshold_``, a
   level on ``max_error`` learned from the hold-out (``threshold_policy``), is reported beside it for operators
   who read raw errors.
7. **Cadence**: every window is scored (``stride = 1``, as IBM's anomaly functions do); ``stride = s`` scores
   the windows whose last sample has a grid index divisible by ``s``.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field, fields, replace
from typing import Any

import numpy as np
from numpy.typing import ArrayLike, NDArray

from .model import ShapeCatalog, TooLittleDataError, sliding_windows, taper, threshold_from_errors
from .normaliser import NormaliserParams, ScoreNormaliser, field_surprise, params_from_dict, range_excess, update_block
from .scorers import WindowScorer, make_scorer, parse_scorers

__all__ = [
    "Detector",
    "DetectorSpec",
    "SeriesState",
    "TooLittleDataError",
    "WindowBatch",
    "choose_window",
    "dominant_period",
]

ERROR_KINDS = ("mean", "max")
FIELD_NORMS = ("q99", "none")
AGGREGATES = ("max", "mean")
THRESHOLD_POLICIES = ("max", "quantile", "sigma")
DECISIONS = ("score", "error", "either")
ATTRIBUTIONS = ("error", "movement")
RANGE_BY = ("window", "sample")



def standardise(train: NDArray[np.float64], min_scale: float = 0.0) -> tuple[NDArray[np.float64],
                                                                           NDArray[np.float64]]:
    """Per-column mean and scale of ``train`` (1-d or 2-d), the scale floored so it is never zero.

    The scale is ``max(std, min_scale, 1e-3 * |mean|, 1e-12)``.

    Examples
    --------
    >>> m, s = standardise(np.array([1.0, 3.0]))
    >>> float(m[0]), float(s[0])
    (2.0, 1.0)
    >>> float(standardise(np.array([5.0, 5.0]))[1][0])
    0.005
    """
    a = np.asarray(train, dtype=np.float64)
    a2 = a[:, None] if a.ndim == 1 else a
    mean = np.nanmean(a2, axis=0)
    std = np.nanstd(a2, axis=0)
    scale = np.maximum.reduce([std, np.full_like(std, min_scale), 1e-3 * np.abs(mean), np.full_like(std, 1e-12)])
    return np.asarray(mean), np.asarray(scale)


def field_resolution(rows: ArrayLike) -> NDArray[np.float64]:
    """Per column of ``rows`` (rows x fields), the smallest positive step between its distinct values (0 for a
    constant column): the field's resolution, e.g. 1 for a counter, 0.1 for a reading with one decimal.

    Examples
    --------
    >>> field_resolution(np.array([[1.0, 5.0], [3.0, 5.0], [2.0, 5.0]])).tolist()
    [1.0, 0.0]
    """
    a = np.asarray(rows, dtype=np.float64)
    a = a[:, None] if a.ndim == 1 else a
    out = np.zeros(a.shape[1])
    for j in range(a.shape[1]):
        u = np.unique(a[:, j][np.isfinite(a[:, j])])
        if len(u) > 1:
            out[j] = float(np.diff(u).min())
    return out


def dominant_period(x: ArrayLike, max_lag: int | None = None, min_acf: float = 0.3) -> int | None:
    """The dominant period of ``x`` from its autocorrelation, or None when there is no clear one.

    The autocorrelation (FFT, mean removed) is searched past its first zero crossing for its highest peak up
    to ``max_lag`` (default ``len(x) // 3``); the lag of that peak is the period when its value is at least
    ``min_acf``.

    Examples
    --------
    >>> t = np.arange(1200)
    >>> dominant_period(np.sin(2 * np.pi * t / 48))
    48
    >>> dominant_period(np.random.default_rng(0).normal(size=1200)) is None
    True
    """
    v = np.asarray(x, dtype=np.float64)
    v = v[np.isfinite(v)]
    n = v.shape[0]
    if n < 8:
        return None
    v = v - v.mean()
    denom = float(v @ v)
    if denom <= 0:
        return None
    size = 1 << (2 * n - 1).bit_length()
    f = np.fft.rfft(v, size)
    acf = np.fft.irfft(f * np.conj(f), size)[:n] / denom
    top = min(max_lag if max_lag is not None else n // 3, n - 1)
    neg = np.flatnonzero(acf[1 : top + 1] <= 0)
    if neg.size == 0:
        return None
    start = int(neg[0]) + 1
    if start >= top:
        return None
    seg = acf[start : top + 1]
    peaks = np.flatnonzero((seg[1:-1] >= seg[:-2]) & (seg[1:-1] >= seg[2:])) + 1
    if peaks.size == 0:
        return None
    best = int(peaks[np.argmax(seg[peaks])])
    if seg[best] < min_acf:
        return None
    return start + best


def choose_window(x: ArrayLike, default: int = 32, min_window: int = 16, max_window: int = 64,
                  min_acf: float = 0.3, period_fraction: float = 0.5, max_lag_fraction: float = 1 / 3) -> int:
    """Window length for a series: half its dominant period, clipped to ``[min_window, max_window]``.

    Falls back to ``default`` (the reference's 32) when `dominant_period` finds no clear period. The rule is
    automatic and the same for every series: no window is picked by hand.

    Examples
    --------
    >>> t = np.arange(3000)
    >>> choose_window(np.sin(2 * np.pi * t / 80)), choose_window(np.sin(2 * np.pi * t / 288))
    (40, 64)
    >>> choose_window(np.random.default_rng(0).normal(size=3000))
    32
    """
    v = np.asarray(x)
    period = dominant_period(v, max_lag=int(len(v) * max_lag_fraction), min_acf=min_acf)
    if period is None:
        return default
    return int(np.clip(round(period * period_fraction), min_window, max_window))




#: Parameters added after models were first saved, with the value that reproduces how those models were trained.
_BEFORE_KEYS: dict[str, Any] = {"resolution_floor": 0.0, "field_surprise": 0, "range_by": "window",
                                 "normaliser": NormaliserParams()}


@dataclass(frozen=True)
class DetectorSpec:
    """The detector's parameters: one configuration for every series (defaults: the module docstring).

    Parameters
    ----------
    window : int or None
        Window length in samples; None chooses it from the training data (`choose_window`).
    default_window, min_window, max_window, min_acf, period_fraction, max_lag_fraction
        Parameters of `choose_window`.
    n_clusters : int
        Most shapes in the catalog.
    clusters_per_window : int
        At least this many training windows per shape (caps the catalog on short training data).
    train_slide : int
        Step between training windows.
    holdout : float
        Share of each training stretch (its end) kept out of the clustering: the threshold and the score's
        warm-up are learned on it.
    n_init, random_state, max_train_windows
        K-Means restarts, seed, and subsample size.
    min_scale : float
        Floor of each field's scale, in the data's units.
    error : {"mean", "max"}
        Per-field error fed to the score.
    field_norm : {"q99", "none"}
        With several fields, what each field's error is divided by (its 99th percentile on the hold-out).
    aggregate : {"max", "mean"}
        How the fields' errors make the window's error.
    threshold_policy, margin, quantile, sigma_k
        How the hold-out's max errors become ``threshold_`` (`anomalyd.core.model.threshold_from_errors`).
    normaliser : NormaliserParams
        Error-to-score mapping; the detector's default caps how far one window widens the seen range at its
        width (``range_growth = 1``, with ``range_by = "sample"``) and keeps the order of scores above 0.9
        (``unsaturated``: no tie at 1; every score up to 0.9, so every decision at 0.5, is the same), and a
        flagged window whose error is a record (above every error seen, the hold-out's included) scores just above
        the highest score seen (``record_factor = 1``, ``record_scope = "flagged"``: only the order among
        flagged windows changes, no decision).
    score_threshold : float
        The decision: a window is anomalous when its score is at least this.
    stride : int
        Score the windows whose last sample's grid index is a multiple of this (1: every window).
    range_by : {"sample", "window"}
        What the out-of-range rule checks: the window's newest sample only (default: each sample once, so a
        glitch widens the seen range once, by at most ``normaliser.range_growth``, and a later spike is still out
        of range), or the window's smallest and largest value (before 2026-11-30; models trained then keep it).
    scorer : str
        The window error fed to the score (`anomalyd.core.scorers`): ``kmeans`` (the shape catalog's reconstruction
        error), ``fft``, ``saliency``, ``generalized``, ``discord`` or ``nodata``, or several joined by ``+``
        (each divided by its hold-out 99th percentile, the largest wins). ``max_error``, ``threshold_``, the
        nearest shape and the reconstruction are always the catalog's.
    discord_max_ref : int
        ``discord``: at most this many training windows in its reference (every k-th).
    resolution_floor : float
        Floor of each field's scale in units of that field's *resolution* in training (the smallest positive
        step between its distinct values): a field that is almost constant in training (a counter that moved
        by one unit) cannot make a one-step change a hundred-sigma event. 1 (default): a one-step change is at
        most one standard unit; 0: off.
    range_floor : float
        Floor of each field's scale as a share of its training range (max - min). 0 (default): off.
    field_surprise : int
        With several fields: each field's error is replaced by its *surprise*, the error against that field's
        own recent errors (an exponentially weighted mean and variance over about this many windows;
        `anomalyd.core.normaliser.field_surprise`), clipped at 0, before the fields are aggregated; the threshold
        and the score's warm-up are learned on the hold-out's surprises, and ``field_error`` (the attribution)
        is the surprise. 500 (default): a field that is always a little off (its shape fits the catalog less
        well) does not dominate every window and its attribution; 0: off. One field: no effect.
    surprise_floor : float
        The surprise's spread is at least this share of the field's mean error.
    surprise_gate : float or None
        A field's window with a surprise above this does not update the field's history (None: every window
        does).
    surprise_rebaseline : int
        With ``surprise_gate``: after this many gated windows in a row the field re-baselines (its history's
        mean becomes the current error: a sustained level shift becomes the new normal) and
        ``WindowBatch.field_rebased`` says so. 0: never.
    attribution : {"error", "movement"}
        With several fields, what a window's attribution (``WindowBatch.field_weight``: each field's share, the
        top field) is proportional to. ``"error"`` (default): the field's error (``field_error``, its part in
        the window's score). ``"movement"``: how far the field moved within the window (its largest minus its
        smallest value) in units of its training scale -- which fields changed, in units of their normal
        spread; it ranks SMD's labelled metrics better (benchmarks/RESULTS.md, "Attribution by movement") but
        misses a change of shape that stays inside a field's usual range (a bump at the trough of a periodic
        field), which the error sees. Detection and ``field_error`` are the same either way.
    """

    window: int | None = None
    default_window: int = 32
    min_window: int = 16
    max_window: int = 64
    min_acf: float = 0.3
    period_fraction: float = 0.5
    max_lag_fraction: float = 1 / 3
    n_clusters: int = 150
    clusters_per_window: int = 4
    train_slide: int = 2
    holdout: float = 0.2
    n_init: int = 3
    random_state: int = 0
    max_train_windows: int = 50_000
    min_scale: float = 0.0
    error: str = "mean"
    field_norm: str = "q99"
    aggregate: str = "max"
    threshold_policy: str = "quantile"
    margin: float = 1.0
    quantile: float = 0.999
    sigma_k: float = 6.0
    normaliser: NormaliserParams = field(
        default_factory=lambda: NormaliserParams(range_growth=1.0, unsaturated=True, record_factor=1.0,
                                                 record_scope="flagged"))
    score_threshold: float = 0.5
    decision: str = "score"
    stride: int = 1
    range_by: str = "sample"
    scorer: str = "kmeans"
    discord_max_ref: int = 4000
    resolution_floor: float = 1.0
    range_floor: float = 0.0
    field_surprise: int = 500
    surprise_floor: float = 0.05
    surprise_gate: float | None = None
    surprise_rebaseline: int = 0
    attribution: str = "error"

    def __post_init__(self) -> None:
        choices = {"error": ERROR_KINDS, "field_norm": FIELD_NORMS, "aggregate": AGGREGATES,
                   "threshold_policy": THRESHOLD_POLICIES, "decision": DECISIONS,
                   "range_by": RANGE_BY, "attribution": ATTRIBUTIONS}
        for name, allowed in choices.items():
            if getattr(self, name) not in allowed:
                raise ValueError(f"detector {name}={getattr(self, name)!r} is not one of {', '.join(allowed)}")
        if self.window is not None and self.window < 4:
            raise ValueError(f"window={self.window} is too small; use at least 4 samples, or None for automatic")
        if not 4 <= self.min_window <= self.default_window <= self.max_window:
            raise ValueError(f"detector needs 4 <= min_window ({self.min_window}) <= default_window "
                             f"({self.default_window}) <= max_window ({self.max_window})")
        if self.n_clusters < 2 or self.clusters_per_window < 1:
            raise ValueError(f"n_clusters={self.n_clusters} must be >= 2 and clusters_per_window="
                             f"{self.clusters_per_window} >= 1")
        if not 0.0 < self.holdout < 1.0:
            raise ValueError(f"holdout={self.holdout} must be between 0 and 1 (exclusive)")
        if self.train_slide < 1 or self.stride < 1:
            raise ValueError(f"train_slide={self.train_slide} and stride={self.stride} must be at least 1")
        parse_scorers(self.scorer)
        if self.discord_max_ref < 1:
            raise ValueError(f"discord_max_ref={self.discord_max_ref} must be at least 1 window")
        if not (self.resolution_floor >= 0 and self.range_floor >= 0 and self.field_surprise >= 0
                and self.surprise_floor >= 0 and self.surprise_rebaseline >= 0):
            raise ValueError("resolution_floor, range_floor, field_surprise, surprise_floor and surprise_rebaseline "
                             "must be >= 0")
        if not 0.0 < self.score_threshold <= 1.0:
            raise ValueError(f"score_threshold={self.score_threshold} must be in (0, 1]")

    def to_dict(self) -> dict[str, Any]:
        """Plain JSON-able values (the normaliser's parameters as a nested dict)."""
        out = {f.name: getattr(self, f.name) for f in fields(self)}
        out["normaliser"] = asdict(self.normaliser)
        return out

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> DetectorSpec:
        """The inverse of `to_dict`; unknown keys are refused."""
        names = {f.name for f in fields(cls)}
        unknown = sorted(set(d) - names)
        if unknown:
            raise ValueError(f"unknown detector parameters {unknown}")
        kw = {**_BEFORE_KEYS, **d}  # a model saved before a parameter existed was trained without it
        if isinstance(kw.get("normaliser"), dict):
            kw["normaliser"] = params_from_dict(kw["normaliser"])  # an older model's normaliser scores as it did
        return cls(**kw)

    def with_overrides(self, **changes: Any) -> DetectorSpec:
        """A copy with ``changes``; ``normaliser_<name>`` keys change the normaliser's parameters.

        Examples
        --------
        >>> s = DetectorSpec().with_overrides(window=16, normaliser_short_window=4)
        >>> s.window, s.normaliser.short_window
        (16, 4)
        """
        norm = {k.removeprefix("normaliser_"): v for k, v in changes.items() if k.startswith("normaliser_")}
        rest = {k: v for k, v in changes.items() if not k.startswith("normaliser_")}
        return replace(self, normaliser=replace(self.normaliser, **norm), **rest)


@dataclass
class SeriesState:
    """The running state of one series: what the detector needs to continue it (owned by the caller).

    ``position`` is the grid index of the next sample (time / period for the daemon), ``tail`` the last
    ``window - 1`` samples (scaled; NaN where missing) and ``norm`` the score history.
    """

    position: int
    tail: NDArray[np.float64]
    norm: ScoreNormaliser


@dataclass
class WindowBatch:
    """Results of `Detector.update_many`: one row per series, one column per new sample (the window ending there).

    Attributes
    ----------
    position : ndarray of int, shape (n, m)
        Grid index of each window's last sample.
    scored : ndarray of bool
        The window is on the stride grid (otherwise every other field is meaningless).
    complete : ndarray of bool
        The window has an error: it has no missing sample or, with several fields, at least one of its fields is
        complete (it is then scored on those, `n_missing` counts the rest). A scored window that is not complete is
        a missing-data window.
    error, max_error, score : ndarray of float
        Score input, max absolute error (series' units for one field) and score; NaN unless scored and complete.
    anomalous : ndarray of bool
        The decision.
    nearest : ndarray of int
        Index of the nearest shape (-1 unless scored and complete).
    field_error, field_sign : ndarray, shape (n, m, fields)
        Per field, its error (the score input's units) and direction (+1 above the shape, -1 below).
    field_excess : ndarray, shape (n, m, fields)
        With several fields, how far each field leaves the range seen before the window (beyond the out-of-range
        rule's tolerance, in widths of that range; positive above, negative below; `postprocess.range_excess`):
        the fields that made the rule score the window 1. Zero inside the range, and with one field.
    field_weight : ndarray, shape (n, m, fields)
        What the window's attribution is proportional to (`DetectorSpec.attribution`): each field's movement
        within the window (largest minus smallest value, in units of its training scale) or its error. NaN for
        a field missing in the window.
    field_rebased : ndarray of bool, shape (n, m, fields)
        With ``DetectorSpec.surprise_rebaseline``: the field re-baselined at this window (a sustained level shift
        became its new normal). All False otherwise.
    n_missing : ndarray of int
        Missing samples in each window.
    last_present : ndarray of bool
        The window's last sample is there (real or filled; with several fields, of at least one field): the daemon
        writes a point only for such windows.
    """

    position: NDArray[np.int64]
    scored: NDArray[np.bool_]
    complete: NDArray[np.bool_]
    error: NDArray[np.float64]
    max_error: NDArray[np.float64]
    score: NDArray[np.float64]
    anomalous: NDArray[np.bool_]
    nearest: NDArray[np.intp]
    field_error: NDArray[np.float64]
    field_sign: NDArray[np.float64]
    field_excess: NDArray[np.float64]
    field_weight: NDArray[np.float64]
    field_rebased: NDArray[np.bool_]
    n_missing: NDArray[np.int64]
    last_present: NDArray[np.bool_]


class Detector:
    """The detector (see the module docstring).

    Examples
    --------
    >>> t = np.arange(3000)
    >>> x = np.sin(2 * np.pi * t / 50)
    >>> x[2000:2004] += 3.0
    >>> det = Detector(DetectorSpec(n_clusters=40)).fit([x[:750]])
    >>> state = det.start(750, context=x[:750])
    >>> out = det.update(state, x[750:])
    >>> int(out.position[np.argmax(np.nan_to_num(out.score))]) in range(2000, 2040)
    True
    >>> bool(out.anomalous[1250:1290].any()), int(out.anomalous[:1200].sum())
    (True, 0)
    """

    def __init__(self, spec: DetectorSpec | None = None) -> None:
        self.spec = spec or DetectorSpec()

    # -- training ----------------------------------------------------------------------------------
    def fit(self, data: Sequence[ArrayLike], starts: Sequence[int] | None = None) -> Detector:
        """Learn scaling, window, catalog, threshold and the score's warm state from normal data.

        Parameters
        ----------
        data : list of array_like, each shape (rows,) or (rows, fields)
            Gap-free stretches of regularly sampled, finite training data (of one or several series; windows
            never straddle two stretches). Stretches shorter than ``2 * window`` are left out.
        starts : list of int, optional
            Grid index of each stretch's first row (for the stride grid of the score's warm-up); 0 each.

        Raises
        ------
        TooLittleDataError
            No stretch is long enough for the window; the message says how many samples are needed.
        ValueError
            NaN or infinite values, or stretches with different numbers of fields.
        """
        s = self.spec
        segs = [np.asarray(p, dtype=np.float64) for p in data]
        segs = [p[:, None] if p.ndim == 1 else p for p in segs]
        starts = list(starts) if starts is not None else [0] * len(segs)
        if not segs or sum(len(p) for p in segs) == 0:
            raise TooLittleDataError("no training samples; widen the training range")
        d = segs[0].shape[1]
        for p in segs:
            if p.ndim != 2 or p.shape[1] != d:
                raise ValueError(f"training stretches must all have {d} field(s), got shape {p.shape}")
            if not np.isfinite(p).all():
                raise ValueError(f"training data has {int((~np.isfinite(p)).sum())} NaN or infinite values; "
                                 "align it and split it at gaps first")
        rows = np.concatenate(segs)
        mean = rows.mean(axis=0)
        std = rows.std(axis=0)
        self.mean_ = mean
        floors = [std, np.full(d, s.min_scale), 1e-3 * np.abs(mean), np.full(d, 1e-12)]
        if s.range_floor > 0:
            floors.append(s.range_floor * (rows.max(axis=0) - rows.min(axis=0)))
        if s.resolution_floor > 0:
            floors.append(s.resolution_floor * field_resolution(rows))
        self.scale_ = np.maximum.reduce(floors)
        zs = [(p - mean) / self.scale_ for p in segs]
        longest = max(zs, key=len)
        if s.window is not None:
            w = s.window
        elif d == 1:
            w = choose_window(longest[:, 0], s.default_window, s.min_window, s.max_window, s.min_acf,
                              s.period_fraction, s.max_lag_fraction)
        else:
            w = s.default_window
        if s.window is None:  # short training stretches (gaps, little data) get a shorter window, to min_window
            w = max(min(w, (len(longest) - 2) // 2), min(w, s.min_window))
        need = 2 * w + 2
        if len(longest) < need:
            raise TooLittleDataError(
                f"window={w} needs a gap-free training stretch of at least {need} samples, the longest has "
                f"{len(longest)} (of {len(rows)} in all); widen the training range, raise max_gap, or set a "
                f"smaller window")
        train_w, val_w, val_end, train_all = [], [], [], []
        for z, a in zip(zs, starts, strict=True):
            if len(z) < need:
                continue
            n_val = max(round(s.holdout * len(z)), w)
            train_w.append(sliding_windows(z[: len(z) - n_val], w, s.train_slide))
            train_all.append(sliding_windows(z[: len(z) - n_val], w, 1))
            val_w.append(sliding_windows(z[len(z) - n_val :], w, 1))
            val_end.append(a + len(z) - n_val + w - 1 + np.arange(n_val - w + 1))
        n_windows = sum(len(t) for t in train_w)
        k = int(min(s.n_clusters, max(2, n_windows // s.clusters_per_window)))
        self.window_ = w
        self.n_fields_ = d
        self.catalog_ = ShapeCatalog(n_clusters=k, random_state=s.random_state, n_init=s.n_init,
                                     max_train_windows=s.max_train_windows).fit(train_w)  # views: no copy
        ends = np.concatenate(val_end)
        matched = [self.catalog_.match(v) for v in val_w]  # chunked per stretch: the hold-out is never copied
        mean_abs = np.concatenate([m[1] for m in matched])
        max_abs = np.concatenate([m[2] for m in matched])
        names = parse_scorers(s.scorer)
        self.scorers_: dict[str, WindowScorer] = {}
        parts, refs = [], []
        for name in names:
            if name == "kmeans":
                pf = mean_abs if s.error == "mean" else max_abs
            else:
                sc = make_scorer(name, discord_max_ref=s.discord_max_ref).fit(train_all, s.max_train_windows,
                                                                              s.random_state)
                self.scorers_[name] = sc
                pf = np.concatenate([sc.errors(v) for v in val_w])
            if name == "nodata" or ((d == 1 or s.field_norm == "none") and len(names) == 1):
                ref = np.ones(d)
            else:
                ref = np.quantile(pf, 0.99, axis=0)
                ref = np.maximum(ref, max(float(np.median(ref)), 1e-9))
            parts.append(pf / ref)
            refs.append(ref)
        self.scorer_refs_ = np.stack(refs)
        self.field_ref_ = refs[0]
        per_field = parts[0] if len(parts) == 1 else np.maximum.reduce(parts)
        norm = ScoreNormaliser(s.normaliser)
        if self._surprise_on(d):  # the hold-out's surprises, from a history started at the hold-out's own level
            norm.fm, norm.fv = per_field.mean(axis=0), per_field.var(axis=0)
            z, _ = field_surprise([norm], per_field[None], s.field_surprise, s.surprise_floor, s.surprise_gate,
                                  s.surprise_rebaseline)
            per_field = np.maximum(z[0], 0.0)
        errors = self._aggregate(per_field)
        max_errors = max_abs.max(axis=1) * (self.scale_[0] if d == 1 else 1.0)
        self.threshold_ = threshold_from_errors(max_errors, s.threshold_policy, s.margin, s.quantile, s.sigma_k)
        self.error_threshold_ = threshold_from_errors(errors, s.threshold_policy, s.margin, s.quantile, s.sigma_k)
        # Out-of-sample warm-up. The normaliser remembers its last long_window averages only, so the last few
        # long windows of hold-out errors give it the same state as all of them, in bounded time and memory.
        keep = 4 * s.normaliser.long_window + s.normaliser.short_window
        on_grid = np.where(ends % s.stride == 0, errors, np.nan)
        norm.update(on_grid[-keep:])
        norm.fit_tail(on_grid)  # the peaks-over-threshold tail (``normaliser.tail``), when on
        norm.observe_range(np.concatenate(zs))
        self.normaliser_ = norm
        self.n_train_samples_ = len(rows)
        return self

    def _check_fitted(self) -> None:
        if not hasattr(self, "catalog_"):
            raise ValueError("this detector is not fitted yet; call fit (or load a trained model) first")

    def _surprise_on(self, d: int) -> bool:
        return self.spec.field_surprise > 0 and d > 1 and self.spec.scorer != "nodata"

    def _aggregate(self, per_field: NDArray[np.float64]) -> NDArray[np.float64]:
        if per_field.shape[1] == 1:
            return per_field[:, 0].copy()
        return per_field.max(axis=1) if self.spec.aggregate == "max" else per_field.mean(axis=1)

    # -- streaming ---------------------------------------------------------------------------------
    def start(self, position: int, context: ArrayLike | None = None,
              norm: ScoreNormaliser | None = None) -> SeriesState:
        """A state for a series whose next sample has grid index ``position``.

        ``context`` holds the samples just before it (data units; its last ``window - 1`` rows are kept), e.g.
        the end of the training data, so the first new windows are complete. ``norm`` continues a score history
        kept elsewhere (the daemon's); by default the series starts from the warm state learned in training.
        """
        self._check_fitted()
        return SeriesState(int(position), self.context_tail(context),
                           self.normaliser_.copy() if norm is None else norm)

    def context_tail(self, context: ArrayLike | None) -> NDArray[np.float64]:
        """The scaled last ``window - 1`` rows of one series' ``context``, NaN-padded in front."""
        d = self.n_fields_
        c = np.empty((0, d)) if context is None else np.asarray(context, dtype=np.float64).reshape(-1, d)
        return self.context_tails(c[None])[0]

    def context_tails(self, contexts: ArrayLike) -> NDArray[np.float64]:
        """`context_tail` for a stack of series, ``(n, rows)`` or ``(n, rows, fields)``, in one operation."""
        w, d = self.window_, self.n_fields_
        c = np.asarray(contexts, dtype=np.float64)
        if c.ndim == 2:
            c = c[:, :, None]
        tail = np.full((c.shape[0], w - 1, d), np.nan)
        c = c[:, max(0, c.shape[1] - (w - 1)) :] if w > 1 else c[:, :0]
        if c.shape[1]:
            tail[:, w - 1 - c.shape[1] :] = (c - self.mean_) / self.scale_
        return tail

    def update(self, state: SeriesState, samples: ArrayLike) -> WindowBatch:
        """Feed one series' newly aligned samples (rows, or rows x fields; NaN = missing); `update_many` of one."""
        x = np.asarray(samples, dtype=np.float64)
        b = self.update_many([state], x[None])
        return WindowBatch(**{f.name: getattr(b, f.name)[0] for f in fields(b)})

    def update_many(self, states: list[SeriesState], samples: ArrayLike) -> WindowBatch:
        """Feed ``samples[i]`` (the next ``m`` aligned samples) to ``states[i]``, for many series at once.

        Parameters
        ----------
        states : list of SeriesState
            One per series, from `start`; advanced in place.
        samples : array_like, shape (n, m) or (n, m, fields)
            The new samples in the data's units, NaN where missing.

        Returns
        -------
        WindowBatch
            One column per new sample: the window that ends on it.
        """
        self._check_fitted()
        s, w, d = self.spec, self.window_, self.n_fields_
        x = np.asarray(samples, dtype=np.float64)
        if x.ndim == 2:
            x = x[:, :, None]
        n, m = x.shape[0], x.shape[1]
        if x.shape[2] != d or n != len(states):
            raise ValueError(f"expected samples of shape ({len(states)}, m, {d}), got {np.shape(samples)}")
        if m == 0:
            e = np.empty((n, 0))
            return WindowBatch(position=np.empty((n, 0), dtype=np.int64), scored=e.astype(bool),
                               complete=e.astype(bool),
                               error=e, max_error=e, score=e, anomalous=e.astype(bool), nearest=e.astype(np.intp),
                               field_error=np.empty((n, 0, d)), field_sign=np.empty((n, 0, d)),
                               field_excess=np.empty((n, 0, d)), field_weight=np.empty((n, 0, d)),
                               field_rebased=np.empty((n, 0, d), dtype=bool),
                               n_missing=e.astype(np.int64), last_present=e.astype(bool))
        z = (x - self.mean_) / self.scale_
        ext = np.concatenate((np.stack([st.tail for st in states]) if n else np.empty((0, w - 1, d)), z), axis=1)
        wins = sliding_windows(ext, w)  # (n, m, w, d)
        pos = np.fromiter((st.position for st in states), dtype=np.int64, count=n)[:, None] + np.arange(m)
        scored = (pos % s.stride) == 0
        n_missing = np.isnan(wins).sum(axis=(2, 3))
        complete = n_missing == 0
        partial = np.zeros_like(complete)
        if d > 1 and s.scorer == "kmeans":  # several fields, some complete: scored on those (see _match_partial)
            field_ok: NDArray[np.bool_] = np.asarray(~np.isnan(wins).any(axis=2))
            partial = scored & ~complete & field_ok.any(axis=2)
        sel = scored & complete
        picked = wins[sel]
        near, mean_abs, max_abs, signed = self.catalog_.match(picked)
        error = np.full((n, m), np.nan)
        if s.scorer == "kmeans":  # the default, as it always was
            per_field = (mean_abs if s.error == "mean" else max_abs) / self.field_ref_
        elif s.scorer == "nodata":  # every scored window, complete or not
            sel = scored
            per_field = self.scorers_["nodata"].errors(wins[sel])
        else:
            parts = [((mean_abs if s.error == "mean" else max_abs) if name == "kmeans"
                      else self.scorers_[name].errors(picked)) / ref
                     for name, ref in zip(parse_scorers(s.scorer), self.scorer_refs_, strict=True)]
            per_field = parts[0] if len(parts) == 1 else np.maximum.reduce(parts)
        error[sel] = self._aggregate(per_field)
        sel = scored & complete
        max_error = np.full((n, m), np.nan)
        max_error[sel] = max_abs.max(axis=1) * (self.scale_[0] if d == 1 else 1.0)
        lo = np.full((n, m, d), np.nan)
        hi = np.full((n, m, d), np.nan)
        moved = np.full((n, m, d), np.nan)  # each field's movement within the window (scaled units)
        if s.range_by == "window" or (d > 1 and s.attribution == "movement"):
            lo[sel] = picked.min(axis=1)
            hi[sel] = picked.max(axis=1)
            moved[sel] = hi[sel] - lo[sel]
        if s.range_by == "sample":  # each sample checked (and widening the range) once: the window's newest
            lo[sel] = picked[:, -1]
            hi[sel] = picked[:, -1]
        if partial.any():
            p_near, p_field, p_max, p_signed = self._match_partial(wins[partial], field_ok[partial])
            max_error[partial] = np.nanmax(p_max, axis=1)
            pw = np.where(field_ok[partial][:, None, :], wins[partial], np.nan)
            lo[partial] = np.fmin.reduce(pw, axis=1)
            hi[partial] = np.fmax.reduce(pw, axis=1)
            moved[partial] = hi[partial] - lo[partial]
        rebased = np.zeros((n, m, d), dtype=bool)
        if self._surprise_on(d) and n:
            fe = np.full((n, m, d), np.nan)
            fe[sel] = per_field
            if partial.any():
                fe[partial] = p_field
            for st in states:  # a state saved without the per-field history starts from the trained one
                if st.norm.fm is None or len(st.norm.fm) != d:
                    st.norm.fm, st.norm.fv = self.normaliser_.fm, self.normaliser_.fv
                    st.norm.fn = self.normaliser_.fn
            z, rebased = field_surprise([st.norm for st in states], fe, s.field_surprise, s.surprise_floor,
                                        s.surprise_gate, s.surprise_rebaseline)
            with np.errstate(invalid="ignore"):
                z = np.maximum(z, 0.0)
            per_field = z[sel]
            error[sel] = self._aggregate(per_field)
            if partial.any():
                p_field = z[partial]
        if partial.any():
            with np.errstate(invalid="ignore"):
                error[partial] = (np.nanmax(p_field, axis=1) if s.aggregate == "max"
                                  else np.nanmean(p_field, axis=1))
        # Which fields leave the range seen so far (the out-of-range rule's reason), before the range widens.
        excess = (range_excess([st.norm for st in states], lo, hi) if d > 1 and n and s.scorer != "nodata"
                  else np.zeros((n, m, d)))
        score = update_block([st.norm for st in states], error, lo, hi) if n else np.empty((0, m))
        nearest = np.full((n, m), -1, dtype=np.intp)
        nearest[sel] = near
        f_err = np.full((n, m, d), np.nan)
        if s.scorer == "nodata":
            f_err[scored] = per_field
        else:
            f_err[sel] = per_field
        f_sign = np.zeros((n, m, d))
        f_sign[sel] = np.sign(signed)
        if partial.any():
            nearest[partial] = p_near
            f_err[partial] = p_field
            f_sign[partial] = np.nan_to_num(np.sign(p_signed))
            complete = complete | partial
        for i, st in enumerate(states):
            st.position += m
            if w > 1:
                st.tail = ext[i, -(w - 1) :].copy()
        with np.errstate(invalid="ignore"):
            by_score = np.nan_to_num(score, nan=-1.0) >= s.score_threshold
            by_error = np.nan_to_num(error, nan=-np.inf) > self.error_threshold_
        anomalous = by_score if s.decision == "score" else by_error if s.decision == "error" else by_score | by_error
        return WindowBatch(position=pos, scored=scored, complete=complete, error=error, max_error=max_error,
                           score=score, anomalous=anomalous, nearest=nearest, field_error=f_err, field_sign=f_sign,
                           field_excess=excess, field_rebased=rebased,
                           field_weight=moved if s.attribution == "movement" else f_err,
                           n_missing=n_missing.astype(np.int64), last_present=np.asarray(np.isfinite(x).any(axis=2)))

    def _match_partial(self, wins: NDArray[np.float64], ok: NDArray[np.bool_]) -> tuple[
            NDArray[np.intp], NDArray[np.float64], NDArray[np.float64], NDArray[np.float64]]:
        """Windows of several fields where only the fields ``ok`` marks are complete: each matched on those fields
        (the nearest shape on them), with their errors; the other fields' errors are NaN.

        A field that stops (its measurement disappeared, its input broke) thus leaves the others scored with the
        same catalog, the same per-field references and the same score history."""
        s, d = self.spec, self.n_fields_
        near = np.empty(len(wins), dtype=np.intp)
        per_field, max_abs, signed = (np.full((len(wins), d), np.nan) for _ in range(3))
        patterns, inverse = np.unique(ok, axis=0, return_inverse=True)
        for g, mask in enumerate(patterns):
            rows = np.flatnonzero(inverse.reshape(-1) == g)
            nn, mean_a, max_a, sg = self.catalog_.match(wins[rows][:, :, mask], fields=mask)
            near[rows] = nn
            per_field[np.ix_(rows, np.flatnonzero(mask))] = ((mean_a if s.error == "mean" else max_a)
                                                            / self.field_ref_[mask])
            max_abs[np.ix_(rows, np.flatnonzero(mask))] = max_a
            signed[np.ix_(rows, np.flatnonzero(mask))] = sg
        return near, per_field, max_abs, signed

    # -- display -----------------------------------------------------------------------------------
    def shape(self, nearest: int) -> NDArray[np.float64]:
        """Shape ``nearest`` of the catalog in the data's units, un-tapered (NaN where the taper is ~0),
        shape ``(window, fields)``: what a window was reconstructed as, for plots."""
        w, d = self.window_, self.n_fields_
        tap = taper(w)
        c = self.catalog_.cluster_centers_[nearest].reshape(w, d)
        with np.errstate(invalid="ignore", divide="ignore"):
            u = np.where(tap[:, None] > 0.05, c / tap[:, None], np.nan)
        return np.asarray(u * self.scale_ + self.mean_)

    def overlap_reconstruction(self, x: ArrayLike, first_index: int = 0) -> NDArray[np.float64]:
        """The reference blog's picture: nearest shapes every ``window // 2`` rows, overlap-added (data units).

        Windows start on grid indices divisible by ``window // 2`` (``first_index`` is the grid index of
        ``x[0]``), so every call over overlapping data draws the same picture. Each row is divided by the summed
        taper weights covering it; rows covered by less than 0.3 of a taper (the ends, and windows with NaN) are
        NaN.
        """
        self._check_fitted()
        w, d = self.window_, self.n_fields_
        xa = np.asarray(x, dtype=np.float64).reshape(-1, d)
        z = (xa - self.mean_) / self.scale_
        slide = max(1, w // 2)
        off = (-first_index) % slide
        wins = sliding_windows(z[off:], w, slide)
        out = np.full(z.shape, np.nan)
        if not len(wins):
            return out[:, 0] if d == 1 else out
        ok = np.isfinite(wins).all(axis=(1, 2))
        near, *_ = self.catalog_.match(wins[ok])
        centers = self.catalog_.cluster_centers_[near].reshape(-1, w, d)
        acc = np.zeros(z.shape)
        wsum = np.zeros(len(z))
        tap = taper(w)
        for c, i in zip(centers, np.flatnonzero(ok), strict=True):
            a = off + i * slide
            acc[a : a + w] += c
            wsum[a : a + w] += tap
        good = wsum > 0.3
        out[good] = acc[good] / wsum[good, None] * self.scale_ + self.mean_
        return out[:, 0] if d == 1 else out

    # -- persistence -------------------------------------------------------------------------------
    def to_state(self) -> tuple[dict[str, NDArray[Any]], dict[str, Any]]:
        """The fitted detector as plain arrays and JSON-able metadata (`from_state` restores it exactly)."""
        self._check_fitted()
        norm = self.normaliser_
        arrays = {"cluster_centers": self.catalog_.cluster_centers_, "mean": self.mean_, "scale": self.scale_,
                  "field_ref": self.field_ref_, "norm_hist": norm.hist, "norm_tail": norm.tail,
                  "norm_lo": norm.lo if norm.lo is not None else np.full(self.n_fields_, np.nan),
                  "norm_hi": norm.hi if norm.hi is not None else np.full(self.n_fields_, np.nan)}
        if self.spec.scorer != "kmeans":  # a model of the default scorer has exactly the arrays it always had
            arrays["scorer_refs"] = self.scorer_refs_
            for name, sc in self.scorers_.items():
                arrays.update({f"scorer_{name}_{k}": v for k, v in sc.state().items()})
        meta = {"spec": self.spec.to_dict(), "window": self.window_, "n_fields": self.n_fields_,
                "threshold": _finite_or_none(self.threshold_),
                "error_threshold": _finite_or_none(self.error_threshold_),
                "n_clusters": len(self.catalog_.cluster_centers_),
                "n_train_windows": int(self.catalog_.n_train_windows_), "n_train_samples": int(self.n_train_samples_),
                "normaliser": {"s1": norm.s1, "s2": norm.s2, "seen": norm.seen, "since_red": norm.since_red}}
        for k in ("fm", "fv", "fn"):  # the per-field surprise's warm state (JSON: the model file's arrays are fixed)
            if getattr(norm, k) is not None:
                meta["normaliser"][k] = [float(v) for v in getattr(norm, k)]
        if norm.params.record_factor is not None or norm.params.history_gate > 0:  # only with those options
            meta["normaliser"].update(rec_err=_finite_or_none(norm.rec_err), top_score=_finite_or_none(norm.top_score),
                                      red_run=norm.red_run)
        for k in ("pot", "peak"):  # the tail and peak-filter options' small states, only with those options
            if getattr(norm, k) is not None:
                meta["normaliser"][k] = [_finite_or_none(float(v)) for v in getattr(norm, k)]
        return arrays, meta

    @classmethod
    def from_state(cls, arrays: dict[str, NDArray[Any]], meta: dict[str, Any]) -> Detector:
        """Rebuild a fitted detector from `to_state`'s output (raises KeyError/ValueError when malformed)."""
        det = cls(DetectorSpec.from_dict(meta["spec"]))
        w, d = int(meta["window"]), int(meta["n_fields"])
        det.window_, det.n_fields_ = w, d
        cat = ShapeCatalog(n_clusters=int(meta["n_clusters"]), random_state=det.spec.random_state,
                           n_init=det.spec.n_init, max_train_windows=det.spec.max_train_windows)
        cat.set_centers(np.asarray(arrays["cluster_centers"], dtype=np.float64), w, d)
        cat.n_train_windows_ = int(meta["n_train_windows"])
        det.catalog_ = cat
        for name in ("mean", "scale", "field_ref"):
            a = np.asarray(arrays[name], dtype=np.float64).reshape(-1)
            if a.shape != (d,):
                raise ValueError(f"{name} has shape {a.shape}, expected ({d},)")
            setattr(det, f"{name}_", a)
        names = parse_scorers(det.spec.scorer)
        det.scorer_refs_ = (np.asarray(arrays["scorer_refs"], dtype=np.float64).reshape(len(names), d)
                            if det.spec.scorer != "kmeans" else det.field_ref_[None, :].copy())
        det.scorers_ = {}
        for name in names:
            if name != "kmeans":
                pre = f"scorer_{name}_"
                det.scorers_[name] = make_scorer(name, {k[len(pre):]: v for k, v in arrays.items()
                                                        if k.startswith(pre)}, det.spec.discord_max_ref)
        det.threshold_ = math.nan if meta["threshold"] is None else float(meta["threshold"])
        det.error_threshold_ = math.nan if meta["error_threshold"] is None else float(meta["error_threshold"])
        det.n_train_samples_ = int(meta["n_train_samples"])
        nm = meta["normaliser"]
        lo = np.asarray(arrays["norm_lo"], dtype=np.float64)
        hi = np.asarray(arrays["norm_hi"], dtype=np.float64)
        det.normaliser_ = ScoreNormaliser.from_dict({
            "version": 2, "params": det.spec.normaliser, "hist": arrays["norm_hist"], "tail": arrays["norm_tail"],
            "s1": nm["s1"], "s2": nm["s2"], "seen": nm["seen"], "since_red": nm["since_red"],
            "lo": None if np.isnan(lo).all() else lo, "hi": None if np.isnan(hi).all() else hi,
            **{k: nm.get(k) for k in ("fm", "fv", "fn", "rec_err", "top_score", "red_run", "pot", "peak")}})
        return det


def _finite_or_none(v: float) -> float | None:
    return float(v) if math.isfinite(v) else None
