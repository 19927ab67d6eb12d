"""Causal detectors over whole labelled series, for evaluation and benchmarks.

The daemon scores windows as they arrive; evaluation needs the same thing over a stored series, with labels
kept aside. The detectors here are *fair*: they train on the first part of a series only (NAB's probationary
period, or SMD's training file), every score at row ``t`` uses rows ``<= t`` only, and one default configuration
(`DetectorConfig`) serves every file.

Univariate (`detect_series`)
----------------------------
1. Per-series scaling: standardise with the training part's mean and standard deviation (a zero deviation is
   replaced by ``max(1e-3 * |mean|, 1e-12)`` so a flat training part does not divide by zero).
2. Window: `choose_window` -- the dominant period of the training part (the first autocorrelation peak above
   ``min_acf`` past the first zero crossing), halved, clipped to ``[min_window, max_window]``; 32 (the
   reference) when there is no clear period. Half a period keeps windows short enough for short training
   parts while still covering one rise or fall of the cycle.
3. Model: `anomalyd.model.WindowReconstructor` on the training part. ``n_clusters`` is capped at a quarter of
   the training windows (at least 2), so a 750-row NAB probation gets about 70 shapes rather than 150
   shapes for 285 windows.
4. Error: the *mean* absolute difference between the tapered window and its nearest centroid (``error="mean"``;
   the daemon's ``max_error`` is ``error="max"``). On NAB the mean error scores 66.9 against 59.6 for the max
   (benchmarks/RESULTS.md): the max of 32 differences is dominated by the noisiest sample.
5. Alignment: row ``t`` gets the error of the window that *ends* at ``t`` (slide 1), i.e. it is scored as soon
   as one window containing it is complete. The sin² taper gives the newest sample zero weight, so a change
   at ``t`` weighs ``sin²(pi * k / (w - 1))`` in the error of row ``t + k``: a spike is seen a few rows late
   (10% of its size after 3 rows, half after 8 at window 32). The out-of-range rule below has no delay.
6. Score: `anomalyd.postprocess.ScoreNormaliser` with its defaults (anomaly likelihood of the errors plus the
   out-of-range rule over the raw values), warmed up on the out-of-sample errors of the training hold-out and
   on the training values' range. The default threshold on the score is 0.5 (a likelihood of 0.99999).
7. Threshold on the error itself (``SeriesDetection.threshold``, for plots and for operators who alert on the
   raw error): ``threshold_policy`` over the hold-out errors.
8. Refit (optional, ``refit_every`` rows, off by default): the model is refitted on the last ``refit_length``
   rows with the rows around high scores (``>= normal_score``) left out, so slow drift is learned while
   anomalies are not. On NAB it costs 2 points (64.8 against 66.9), so it is not the default.

Multivariate (`detect_multivariate`, SMD)
----------------------------------------
Windows of ``window`` rows (default 32) over all ``d`` metrics are concatenated into ``window * d`` values (each
metric tapered), after per-metric scaling with the training mean and standard deviation (floored at
``min_scale``, 0.01 in the data's units -- 1% of SMD's min-max range -- so that metrics nearly constant in
training do not turn every small change into a huge error). K-Means on the training windows. The error of a
window is computed per metric (mean absolute difference over the window's rows), divided by that metric's
99th percentile on the training hold-out (floored at the median of those percentiles), and the window's
score is the largest of them: one drifting metric no longer drowns the others, and the per-metric errors say
which metric explains an alert. The threshold is the 0.999 quantile of the hold-out scores: training data
alone.
"""

from __future__ import annotations

import logging
import math
import warnings
from dataclasses import dataclass, field, replace
from typing import Any

import numpy as np
from numpy.typing import ArrayLike, NDArray
from sklearn.cluster import KMeans
from sklearn.exceptions import ConvergenceWarning

from .model import WindowReconstructor, sliding_windows, taper, threshold_from_errors
from .postprocess import NormaliserParams, ScoreNormaliser

log = logging.getLogger(__name__)

__all__ = [
    "ERROR_KINDS",
    "DetectorConfig",
    "MultiDetection",
    "MultiWindowReconstructor",
    "SeriesDetection",
    "choose_window",
    "detect_multivariate",
    "detect_series",
    "dominant_period",
    "nab_probation",
    "overlap_reconstruction",
    "score_with_model",
    "standardise",
    "with_overrides",
]


#: Window errors: largest, root-mean-square and mean absolute difference to the nearest centroid.
ERROR_KINDS = ("max", "rms", "mean")


def nab_probation(n: int, fraction: float = 0.15) -> int:
    """Rows in NAB's probationary period: ``min(floor(fraction * n), fraction * 5000)`` (750 at 0.15).

    Examples
    --------
    >>> nab_probation(4032), nab_probation(22695)
    (604, 750)
    """
    return math.ceil(min(math.floor(fraction * n), fraction * 5000))


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


@dataclass(frozen=True)
class DetectorConfig:
    """One configuration for every file of a corpus (defaults documented in the module docstring).

    Parameters
    ----------
    window : int or None
        Window length; None applies `choose_window` to each series' training part.
    default_window, min_window, max_window, min_acf, period_fraction, max_lag_fraction
        Parameters of `choose_window` (the autocorrelation is searched up to ``max_lag_fraction`` of the
        training length).
    n_clusters : int
        Catalog size, capped at ``max(2, training windows // clusters_per_window)``.
    clusters_per_window : int
        Training windows per cluster at least (the cap above).
    train_slide : int
        Step between training windows.
    holdout : float
        Share of the training part kept out of the clustering (threshold, normaliser warm-up).
    n_init : int
        K-Means restarts.
    random_state : int
        Seed.
    refit_every : int
        Rows between refits on recent normal data; 0 disables refitting.
    refit_length : int or None
        Rows used by a refit (the most recent ones); None means the training length.
    normal_score : float
        Rows within one window of a score at or above this are left out of refits.
    score_slide : int
        Score one window every ``score_slide`` rows (the daemon's ``slide``); the rows between get score 0.
        1 scores every row.
    normaliser : NormaliserParams
        Error-to-score mapping.
    error : {"mean", "max", "rms"}
        Window error fed to the score (see `window_error`).
    min_scale : float
        Floor of the per-metric scale in `detect_multivariate` (values are in the data's units).
    metric_norm : {"q99", "median", "none"}
        `detect_multivariate`: what each metric's error is divided by (its hold-out 99th percentile, median,
        or nothing).
    aggregate : {"max", "mean"}
        `detect_multivariate`: how the per-metric errors of a window become its score.
    threshold_policy, margin, quantile, sigma_k
        How thresholds on errors are learned from hold-out errors (`anomalyd.model.threshold_from_errors`).
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
    refit_every: int = 0
    refit_length: int | None = None
    normal_score: float = 0.5
    score_slide: int = 1
    normaliser: NormaliserParams = field(default_factory=NormaliserParams)
    error: str = "mean"
    min_scale: float = 0.01
    metric_norm: str = "q99"
    aggregate: str = "max"
    threshold_policy: str = "quantile"
    margin: float = 1.0
    quantile: float = 0.999
    sigma_k: float = 6.0

    def __post_init__(self) -> None:
        choices = {"error": ERROR_KINDS, "metric_norm": ("q99", "median", "none"), "aggregate": ("max", "mean")}
        for name, allowed in choices.items():
            if getattr(self, name) not in allowed:
                raise ValueError(f"DetectorConfig {name}={getattr(self, name)!r} is not one of {', '.join(allowed)}")
        if not 4 <= self.min_window <= self.default_window <= self.max_window:
            raise ValueError(f"DetectorConfig needs 4 <= min_window ({self.min_window}) <= default_window "
                             f"({self.default_window}) <= max_window ({self.max_window})")
        if self.refit_every < 0:
            raise ValueError(f"DetectorConfig refit_every={self.refit_every} must be >= 0 (0 disables refits)")
        if self.score_slide < 1:
            raise ValueError(f"DetectorConfig score_slide={self.score_slide} must be >= 1")

    def to_dict(self) -> dict[str, Any]:
        """The configuration as plain JSON-able values (for reports)."""
        out: dict[str, Any] = {}
        for name in self.__dataclass_fields__:
            value = getattr(self, name)
            out[name] = value.__dict__.copy() if isinstance(value, NormaliserParams) else value
        return out


@dataclass
class SeriesDetection:
    """Outcome of `detect_series` over one series (arrays have one entry per row).

    Attributes
    ----------
    scores : ndarray
        Scores in [0, 1]; 0 in the training part (it is not scored).
    errors : ndarray
        Reconstruction error (``config.error``) of the window ending at each row, in the series' units (NaN
        before the first complete window). Rows of the training part are in-sample.
    reconstruction : ndarray
        The overlap-added reconstruction (half-window slide, as the reference plots it), in the series' units.
    threshold : float
        Threshold on ``errors`` learned from the training hold-out (``config.threshold_policy``).
    window, n_train, n_clusters, refits : int
        What was used.
    """

    scores: NDArray[np.float64]
    errors: NDArray[np.float64]
    reconstruction: NDArray[np.float64]
    threshold: float
    window: int
    n_train: int
    n_clusters: int
    refits: int = 0


def window_error(model: WindowReconstructor, windows: NDArray[np.float64], kind: str = "max") -> NDArray[np.float64]:
    """Error of each (untapered) window against its nearest tapered centroid.

    ``max`` is the model's own error (largest absolute difference, what the daemon writes as ``max_error``);
    ``rms`` and ``mean`` are the root-mean-square and mean absolute differences.
    """
    if kind in ("max", "mean"):  # the model's own chunked pass (the daemon's max_error and score input)
        return model.window_errors(windows, kind)
    if kind != "rms":
        raise ValueError(f"error kind {kind!r} is not one of {', '.join(ERROR_KINDS)}")
    if len(windows) == 0:
        return np.empty(0)
    diff = np.abs(windows * taper(model.window) - model.reconstruct(windows))
    return np.asarray(np.sqrt((diff * diff).mean(axis=1)))


def _row_errors(model: WindowReconstructor, z: NDArray[np.float64], lo: int, hi: int,
                kind: str = "max") -> NDArray[np.float64]:
    """Errors of the windows ending at rows ``lo .. hi - 1`` (NaN where the window would start before 0)."""
    w = model.window
    out = np.full(hi - lo, np.nan)
    first = max(lo, w - 1)
    if first >= hi:
        return out
    wins = sliding_windows(z[first - w + 1 : hi], w, 1)
    out[first - lo :] = window_error(model, wins, kind)
    return out


def _fit_model(stretches: list[NDArray[np.float64]], window: int, cfg: DetectorConfig) -> WindowReconstructor:
    usable = [s for s in stretches if len(s) >= 2 * window]
    n_windows = sum(max(0, (len(s) - max(round(cfg.holdout * len(s)), window) - window) // cfg.train_slide + 1)
                    for s in usable)
    k = int(min(cfg.n_clusters, max(2, n_windows // cfg.clusters_per_window)))
    model = WindowReconstructor(window=window, train_slide=cfg.train_slide, n_clusters=k,
                                random_state=cfg.random_state, holdout=cfg.holdout, n_init=cfg.n_init)
    with warnings.catch_warnings():  # repeated windows (flat or perfectly periodic series) are fine
        warnings.simplefilter("ignore", ConvergenceWarning)
        return model.fit(usable)


def overlap_reconstruction(model: WindowReconstructor, z: ArrayLike) -> NDArray[np.float64]:
    """The reference blog's reconstruction: nearest centroids every ``window // 2`` rows, overlap-added.

    Each row is divided by the summed taper weights covering it, so rows covered by less than 0.3 of a taper
    (the very ends, and windows with NaN) are NaN.

    Examples
    --------
    >>> x = np.sin(2 * np.pi * np.arange(1000) / 40)
    >>> m = WindowReconstructor(window=16, n_clusters=20).fit(x)
    >>> r = overlap_reconstruction(m, x)
    >>> bool(np.nanmax(np.abs(r - x)) < 0.3)
    True
    """
    z = np.asarray(z, dtype=np.float64)
    w = model.window
    slide = max(1, w // 2)
    out = np.full(z.shape[0], np.nan)
    wins = sliding_windows(z, w, slide)
    if len(wins) == 0:
        return out
    ok_win = np.isfinite(wins).all(axis=1)
    recon = np.zeros(wins.shape)
    if ok_win.any():
        recon[ok_win] = model.reconstruct(wins[ok_win])
    acc = np.zeros(z.shape[0])
    wsum = np.zeros(z.shape[0])
    tap = taper(w)
    for i in np.flatnonzero(ok_win):
        acc[i * slide : i * slide + w] += recon[i]
        wsum[i * slide : i * slide + w] += tap
    ok = wsum > 0.3
    out[ok] = acc[ok] / wsum[ok]
    return out


def detect_series(values: ArrayLike, n_train: int, config: DetectorConfig | None = None) -> SeriesDetection:
    """Score a univariate series causally, training on its first ``n_train`` rows only.

    Parameters
    ----------
    values : array_like of float, shape (n,)
        The series, one row per sample in time order (NaN is filled with the previous value).
    n_train : int
        Rows of the training part (NAB: the probationary period, see `nab_probation`).
    config : DetectorConfig, optional
        Defaults if omitted.

    Returns
    -------
    SeriesDetection
        Scores, errors and reconstruction, one per row.

    Raises
    ------
    ValueError
        When ``n_train`` is too short for the window (``2 * window`` rows at least) or beyond the series.

    Examples
    --------
    >>> t = np.arange(3000)
    >>> x = np.sin(2 * np.pi * t / 50)
    >>> x[2000:2004] += 3.0
    >>> det = detect_series(x, 750)
    >>> int(np.argmax(det.scores)) in range(2000, 2032)
    True
    """
    cfg = config or DetectorConfig()
    x = np.asarray(values, dtype=np.float64)
    if x.ndim != 1:
        raise ValueError(f"detect_series needs a 1-d series, got shape {x.shape}; use detect_multivariate")
    n = x.shape[0]
    if not 0 < n_train <= n:
        raise ValueError(f"n_train={n_train} must be between 1 and the series length {n}")
    if np.isnan(x).any():  # forward-fill (causal); leading NaNs take the first value
        idx = np.where(np.isnan(x), 0, np.arange(n))
        np.maximum.accumulate(idx, out=idx)
        x = x[idx]
        x[np.isnan(x)] = np.nanmean(x) if np.isfinite(x).any() else 0.0
    mean, scale = standardise(x[:n_train])
    z = (x - mean[0]) / scale[0]
    window = cfg.window or choose_window(z[:n_train], cfg.default_window, cfg.min_window, cfg.max_window,
                                         cfg.min_acf, cfg.period_fraction, cfg.max_lag_fraction)
    if n_train < 2 * window + 2:
        raise ValueError(f"window={window} needs a training part of at least {2 * window + 2} rows, got "
                         f"n_train={n_train}; give a longer training part or a smaller window")
    model = first_model = _fit_model([z[:n_train]], window, cfg)
    n_clusters = model.n_clusters
    errors = np.full(n, np.nan)
    errors[:n_train] = _row_errors(model, z, 0, n_train, cfg.error)
    scores = np.zeros(n)
    norm = ScoreNormaliser(cfg.normaliser)
    n_val = max(round(cfg.holdout * n_train), window)
    on_grid = np.arange(n) % cfg.score_slide == 0  # rows whose window is scored (all rows with score_slide 1)
    warm = slice(n_train - n_val + window - 1, n_train)
    norm.update(np.where(on_grid[warm], errors[warm], np.nan))  # out-of-sample warm-up, scores dropped
    norm.observe_range(x[:n_train])
    holdout_errors = errors[n_train - n_val + window - 1 : n_train]
    threshold = threshold_from_errors(holdout_errors[np.isfinite(holdout_errors)], cfg.threshold_policy, cfg.margin,
                                      cfg.quantile, cfg.sigma_k) * scale[0]
    refits = 0
    pos = n_train
    step = cfg.refit_every if cfg.refit_every > 0 else n
    length = cfg.refit_length or n_train
    while pos < n:
        end = min(n, pos + step)
        errors[pos:end] = _row_errors(model, z, pos, end, cfg.error)
        scores[pos:end] = norm.update(np.where(on_grid[pos:end], errors[pos:end], np.nan), x[pos:end])
        pos = end
        if cfg.refit_every > 0 and pos < n:
            lo = max(0, pos - length)
            bad = scores[lo:pos] >= cfg.normal_score
            if bad.any():  # leave out a window's span around each high score
                bad = np.convolve(bad.astype(np.int8), np.ones(2 * window - 1, dtype=np.int8), "same") > 0
            good = np.flatnonzero(~bad)
            if good.size < 2 * window + 2:
                continue
            cuts = np.flatnonzero(np.diff(good) > 1) + 1
            stretches = [z[lo + g[0] : lo + g[-1] + 1] for g in np.split(good, cuts)]
            try:
                model = _fit_model(stretches, window, cfg)
                refits += 1
            except ValueError as exc:  # too little normal data: keep the current model
                log.debug("refit at row %d skipped: %s", pos, exc)
    scores[np.isnan(scores)] = 0.0
    recon = overlap_reconstruction(first_model, z)
    return SeriesDetection(scores=scores, errors=errors * scale[0], reconstruction=recon * scale[0] + mean[0],
                           threshold=float(threshold), window=window, n_train=n_train, n_clusters=n_clusters,
                           refits=refits)


def score_with_model(model: WindowReconstructor, values: ArrayLike) -> NDArray[np.float64]:
    """The daemon's ``max_error`` of the window ending at each row, with a stored (fitted) model.

    Rows before the first complete window, and windows holding NaN, get NaN. No scaling: the model works in
    the series' own units, as in the daemon.

    Examples
    --------
    >>> x = np.sin(2 * np.pi * np.arange(1000) / 40)
    >>> m = WindowReconstructor(window=16, n_clusters=20).fit(x)
    >>> e = score_with_model(m, x)
    >>> bool(np.isnan(e[:15]).all() and np.isfinite(e[15:]).all())
    True
    """
    x = np.asarray(values, dtype=np.float64)
    if x.ndim != 1:
        raise ValueError(f"expected a 1-d series, got shape {x.shape}")
    w = model.window
    out = np.full(x.shape[0], np.nan)
    wins = sliding_windows(x, w, 1)
    if len(wins):
        ok = np.isfinite(wins).all(axis=1)
        errs = np.full(len(wins), np.nan)
        if ok.any():
            errs[ok] = model.window_errors(wins[ok])
        out[w - 1 :] = errs
    return out


# ---------------------------------------------------------------------------------------------------------
# Multivariate (SMD)
# ---------------------------------------------------------------------------------------------------------


def _windows_3d(x: NDArray[np.float64], window: int, slide: int) -> NDArray[np.float64]:
    """Windows of ``window`` rows every ``slide`` rows: shape (n_windows, window, d) (a view)."""
    if x.shape[0] < window:
        return np.empty((0, window, x.shape[1]))
    v = np.lib.stride_tricks.sliding_window_view(x, window, axis=0)  # (n - w + 1, d, w)
    return np.swapaxes(v, 1, 2)[::slide]


class MultiWindowReconstructor:
    """K-Means catalog of concatenated multivariate window shapes (each metric tapered with sin²).

    Parameters
    ----------
    window, train_slide, n_clusters, random_state, holdout, n_init, max_train_windows
        As in `anomalyd.model.WindowReconstructor`.

    Examples
    --------
    >>> t = np.arange(1500)
    >>> x = np.column_stack([np.sin(2 * np.pi * t / 40), np.cos(2 * np.pi * t / 40)])
    >>> m = MultiWindowReconstructor(window=16, n_clusters=20).fit(x)
    >>> m.metric_errors(_windows_3d(x[:200], 16, 8)).shape
    (24, 2)
    """

    def __init__(self, window: int = 32, train_slide: int = 2, n_clusters: int = 150, random_state: int = 0,
                 holdout: float = 0.2, n_init: int = 3, max_train_windows: int = 20_000) -> None:
        self.window = window
        self.train_slide = train_slide
        self.n_clusters = n_clusters
        self.random_state = random_state
        self.holdout = holdout
        self.n_init = n_init
        self.max_train_windows = max_train_windows

    def fit(self, x: ArrayLike) -> MultiWindowReconstructor:
        """Learn the catalog from ``x`` of shape (n, d); keep the hold-out's per-metric errors."""
        arr = np.asarray(x, dtype=np.float64)
        if arr.ndim != 2:
            raise ValueError(f"expected rows x metrics, got shape {arr.shape}")
        if not np.isfinite(arr).all():
            raise ValueError("training data has NaN or infinite values; fill or drop them first")
        n = arr.shape[0]
        n_val = max(round(self.holdout * n), self.window)
        if n - n_val < 2 * self.window:
            raise ValueError(f"window={self.window} needs at least {2 * self.window + n_val} training rows, "
                             f"got {n}")
        wins = _windows_3d(arr[: n - n_val], self.window, self.train_slide)
        rng = np.random.default_rng(self.random_state)
        self.n_train_windows_ = len(wins)
        if len(wins) > self.max_train_windows:
            wins = wins[np.sort(rng.choice(len(wins), self.max_train_windows, replace=False))]
        tap = taper(self.window)[None, :, None]
        flat = (wins * tap).reshape(len(wins), -1)
        k = min(self.n_clusters, len(flat))
        km = KMeans(k, n_init=self.n_init, random_state=self.random_state)
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", ConvergenceWarning)
            km.fit(flat)
        self.cluster_centers_ = np.ascontiguousarray(km.cluster_centers_, dtype=np.float64)
        self._center_sq = (self.cluster_centers_**2).sum(axis=1)
        self.val_windows_ = _windows_3d(arr[n - n_val :], self.window, 1)
        return self

    def metric_errors(self, windows: NDArray[np.float64], kind: str = "max",
                      chunk: int = 4096) -> NDArray[np.float64]:
        """Per-metric error of each window against its nearest centroid, shape (n_windows, d).

        ``kind`` is ``"max"`` (largest absolute difference over the window's rows), ``"mean"`` (mean absolute
        difference) or ``"rms"``.
        """
        n, w, d = windows.shape
        out = np.empty((n, d))
        tap = taper(self.window)[None, :, None]
        for a in range(0, n, chunk):
            flat = (windows[a : a + chunk] * tap).reshape(-1, w * d)
            dist = self._center_sq[None, :] - 2.0 * (flat @ self.cluster_centers_.T)
            diff = np.abs(flat - self.cluster_centers_[dist.argmin(axis=1)]).reshape(-1, w, d)
            if kind == "max":
                out[a : a + chunk] = diff.max(axis=1)
            elif kind == "mean":
                out[a : a + chunk] = diff.mean(axis=1)
            elif kind == "rms":
                out[a : a + chunk] = np.sqrt((diff * diff).mean(axis=1))
            else:
                raise ValueError(f"error kind {kind!r} is not one of {', '.join(ERROR_KINDS)}")
        return out


@dataclass
class MultiDetection:
    """Outcome of `detect_multivariate` (one entry per test row).

    Attributes
    ----------
    scores : ndarray, shape (n_test,)
        Score of the window ending at each row: the largest per-metric error, each divided by that metric's
        hold-out 99th percentile; the first ``window - 1`` rows use the last training rows as context.
    metric_scores : ndarray, shape (n_test, d)
        The per-metric errors behind ``scores`` (for interpretation).
    threshold : float
        Threshold on ``scores`` learned from the training hold-out alone.
    train_scores : ndarray
        Scores of the hold-out windows (what the threshold was learned from).
    window, n_clusters : int
        What was used.
    """

    scores: NDArray[np.float64]
    metric_scores: NDArray[np.float64]
    threshold: float
    train_scores: NDArray[np.float64]
    window: int
    n_clusters: int


def detect_multivariate(train: ArrayLike, test: ArrayLike, config: DetectorConfig | None = None) -> MultiDetection:
    """Train on ``train`` (rows x metrics) and score every row of ``test`` causally.

    Parameters
    ----------
    train, test : array_like of float, shape (n, d)
        Training and test rows with the same metrics.
    config : DetectorConfig, optional
        ``window`` (None means `default_window`: SMD metrics have no common period), ``n_clusters``, ``error``,
        ``min_scale``, ``metric_norm`` (``"q99"``, ``"median"`` or ``"none"``), ``aggregate`` (``"max"`` or
        ``"mean"`` over metrics) and the threshold policy are used.

    Returns
    -------
    MultiDetection
        Scores per test row and the threshold learned from training data alone.
    """
    cfg = config or DetectorConfig()
    tr = np.asarray(train, dtype=np.float64)
    te = np.asarray(test, dtype=np.float64)
    if tr.ndim != 2 or te.ndim != 2 or tr.shape[1] != te.shape[1]:
        raise ValueError(f"train and test must be rows x metrics with the same metrics, got {tr.shape} and "
                         f"{te.shape}")
    window = cfg.window or cfg.default_window
    mean, scale = standardise(tr, cfg.min_scale)
    ztr = (tr - mean) / scale
    zte = (te - mean) / scale
    model = MultiWindowReconstructor(window=window, train_slide=cfg.train_slide, n_clusters=cfg.n_clusters,
                                     random_state=cfg.random_state, holdout=cfg.holdout, n_init=cfg.n_init)
    model.fit(ztr)
    val = model.metric_errors(model.val_windows_, cfg.error)
    if cfg.metric_norm == "none":
        ref = np.ones(val.shape[1])
    else:
        q = 0.5 if cfg.metric_norm == "median" else 0.99
        ref = np.quantile(val, q, axis=0)
        ref = np.maximum(ref, max(float(np.median(ref)), 1e-9))
    agg = np.max if cfg.aggregate == "max" else np.mean
    train_scores = agg(val / ref, axis=1)
    threshold = threshold_from_errors(train_scores, cfg.threshold_policy, cfg.margin, cfg.quantile, cfg.sigma_k)
    context = np.concatenate((ztr[-(window - 1) :], zte)) if window > 1 else zte
    metric = model.metric_errors(_windows_3d(context, window, 1), cfg.error) / ref
    return MultiDetection(scores=agg(metric, axis=1), metric_scores=metric, threshold=float(threshold),
                          train_scores=train_scores, window=window, n_clusters=int(model.cluster_centers_.shape[0]))


def with_overrides(config: DetectorConfig, **changes: Any) -> DetectorConfig:
    """A copy of ``config`` with ``changes``; ``normaliser_<name>`` keys change the normaliser's parameters.

    Examples
    --------
    >>> c = with_overrides(DetectorConfig(), window=16, normaliser_short_window=4)
    >>> c.window, c.normaliser.short_window
    (16, 4)
    """
    norm_changes = {k.removeprefix("normaliser_"): v for k, v in changes.items() if k.startswith("normaliser_")}
    rest = {k: v for k, v in changes.items() if not k.startswith("normaliser_")}
    return replace(config, normaliser=replace(config.normaliser, **norm_changes), **rest)
