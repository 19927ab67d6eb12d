"""The pure model: windowing, taper, K-Means catalog, reconstruction, error, threshold.

Nothing here does I/O, logging or reads configuration: it is a scikit-learn style estimator over a
regularly sampled 1-d array (or over windows already cut from one).
"""

from __future__ import annotations

from typing import Any

import numpy as np
from numpy.typing import ArrayLike, NDArray
from sklearn.base import BaseEstimator
from sklearn.cluster import KMeans
from sklearn.utils.validation import check_is_fitted

THRESHOLD_POLICIES = ("max", "quantile", "sigma")
#: Window errors `WindowReconstructor.window_errors` computes.
ERROR_KINDS = ("max", "mean")
#: Number of validation-error quantiles kept to map an error to a normalised score in [0, 1].
N_SCORE_QUANTILES = 201


class TooLittleDataError(ValueError):
    """The training data cannot support the requested window and number of clusters."""


def taper(window: int) -> NDArray[np.float64]:
    """Return the sin² window function used to taper every window.

    Parameters
    ----------
    window : int
        Window length in samples.

    Returns
    -------
    ndarray of shape (window,)
        ``sin(linspace(0, pi, window)) ** 2``: zero at both ends, one in the middle.

    Examples
    --------
    >>> taper(5).round(3).tolist()
    [0.0, 0.5, 1.0, 0.5, 0.0]
    """
    return np.sin(np.linspace(0.0, np.pi, window)) ** 2


def sliding_windows(x: ArrayLike, window: int, slide: int) -> NDArray[np.float64]:
    """Cut ``x`` into windows of ``window`` samples, one every ``slide`` samples (a view, no copy).

    Examples
    --------
    >>> sliding_windows(np.arange(6.0), 4, 2).tolist()
    [[0.0, 1.0, 2.0, 3.0], [2.0, 3.0, 4.0, 5.0]]
    """
    arr = np.asarray(x, dtype=np.float64)
    if arr.ndim != 1:
        raise ValueError(f"expected a 1-d series, got shape {arr.shape}")
    if len(arr) < window:
        return np.empty((0, window))
    return np.lib.stride_tricks.sliding_window_view(arr, window)[::slide]


def overlap_add(recon: NDArray[np.float64], slide: int) -> NDArray[np.float64]:
    """Stitch tapered window reconstructions taken every ``slide`` samples back into a series.

    Examples
    --------
    >>> overlap_add(np.array([[1.0, 1.0, 1.0], [2.0, 2.0, 2.0]]), 2).tolist()
    [1.0, 1.0, 3.0, 2.0, 2.0]
    """
    n, window = recon.shape
    out = np.zeros((n - 1) * slide + window if n else 0)
    for i in range(n):
        out[i * slide : i * slide + window] += recon[i]
    return out


def threshold_from_errors(errors: NDArray[np.float64], policy: str, margin: float, quantile: float,
                          k: float) -> float:
    """Turn the reconstruction errors of normal data into an alert threshold.

    ``max``: largest error times ``margin``; ``quantile``: that quantile of the errors times ``margin``;
    ``sigma``: mean + ``k`` standard deviations.

    Examples
    --------
    >>> errs = np.array([1.0, 2.0, 3.0, 4.0])
    >>> threshold_from_errors(errs, "max", 1.5, 0.99, 3.0)
    6.0
    >>> round(threshold_from_errors(errs, "sigma", 1.0, 0.99, 2.0), 4)
    4.7361
    """
    if policy == "max":
        return float(errors.max() * margin)
    if policy == "quantile":
        return float(np.quantile(errors, quantile) * margin)
    if policy == "sigma":
        return float(errors.mean() + k * errors.std())
    raise ValueError(f"threshold policy {policy!r} is not one of {', '.join(THRESHOLD_POLICIES)}")


class WindowReconstructor(BaseEstimator):
    """K-Means catalog of normal window shapes; scores windows by their max reconstruction error.

    Parameters
    ----------
    window : int
        Samples per window (default 32, as in the reference).
    train_slide : int
        Step between training windows (reference: 2).
    n_clusters : int
        Size of the shape catalog (reference: 150).
    random_state : int
        Seed for K-Means, so training is reproducible.
    holdout : float
        Share of the training series, taken from its end, kept out of the clustering and used to learn
        the threshold (0.2, as the LSTM encoder-decoder paper does).
    threshold_policy : {"max", "quantile", "sigma"}
        How validation errors become the threshold; see :func:`threshold_from_errors`.
    margin, quantile, sigma_k : float
        Parameters of the threshold policies.
    max_train_windows : int
        Above this many training windows, K-Means is fitted on a seeded random subsample of this many,
        so training time and memory stay bounded whatever the training length.
    n_init : int
        K-Means restarts; the best of them is kept (more restarts give a steadier catalog).

    Examples
    --------
    >>> t = np.arange(2000)
    >>> x = np.sin(2 * np.pi * t / 50)
    >>> m = WindowReconstructor(window=16, n_clusters=20).fit(x)
    >>> bool(m.threshold_ > 0)
    True
    >>> errors = m.window_errors(sliding_windows(x, 16, 8))
    >>> bool((errors <= m.threshold_).all())
    True
    """

    def __init__(self, window: int = 32, train_slide: int = 2, n_clusters: int = 150, random_state: int = 0,
                 holdout: float = 0.2, threshold_policy: str = "max", margin: float = 1.2,
                 quantile: float = 0.999, sigma_k: float = 6.0, max_train_windows: int = 50_000,
                 n_init: int = 5) -> None:
        self.window = window
        self.train_slide = train_slide
        self.n_clusters = n_clusters
        self.random_state = random_state
        self.holdout = holdout
        self.threshold_policy = threshold_policy
        self.margin = margin
        self.quantile = quantile
        self.sigma_k = sigma_k
        self.max_train_windows = max_train_windows
        self.n_init = n_init

    # -- fitting -----------------------------------------------------------------------------------
    def _check_params(self) -> None:
        if self.window < 4:
            raise ValueError(f"window={self.window} is too small; use at least 4 samples")
        if not 1 <= self.train_slide <= self.window:
            raise ValueError(f"train_slide={self.train_slide} must be between 1 and window={self.window}")
        if self.n_clusters < 1:
            raise ValueError(f"n_clusters={self.n_clusters} must be at least 1")
        if not 0.0 < self.holdout < 1.0:
            raise ValueError(f"holdout={self.holdout} must be between 0 and 1 (exclusive)")
        if self.threshold_policy not in THRESHOLD_POLICIES:
            raise ValueError(f"threshold_policy={self.threshold_policy!r} is not one of "
                             f"{', '.join(THRESHOLD_POLICIES)}")

    def fit(self, x: ArrayLike | list[ArrayLike], y: Any = None) -> WindowReconstructor:
        """Learn the shape catalog and the threshold from regularly sampled, finite data.

        ``x`` is one 1-d series, or a list of gap-free stretches (of one or several series): windows never
        straddle two stretches, and the last ``holdout`` share of each stretch is kept for validation.
        Stretches shorter than ``2 * window`` are left out.

        Raises
        ------
        TooLittleDataError
            Fewer than ``2 * window`` usable samples, or fewer training windows than clusters.
        ValueError
            NaN or infinite values, or a series that is not 1-d.
        """
        self._check_params()
        parts = [x] if isinstance(x, np.ndarray) else list(x) if isinstance(x, list) else [x]
        segments = [np.asarray(p, dtype=np.float64) for p in parts]
        if segments and all(np.ndim(p) == 0 for p in segments):
            segments = [np.asarray(parts, dtype=np.float64)]
        tap = taper(self.window)
        train_w, val_w = [], []
        n = 0
        for seg in segments:
            if seg.ndim != 1:
                raise ValueError(f"expected a 1-d series, got shape {seg.shape}")
            if not np.isfinite(seg).all():
                bad = int((~np.isfinite(seg)).sum())
                raise ValueError(f"training series has {bad} NaN or infinite values; fill or drop them first")
            if len(seg) < 2 * self.window:
                continue
            n += len(seg)
            n_val = max(round(self.holdout * len(seg)), self.window)
            train_w.append(sliding_windows(seg[: len(seg) - n_val], self.window, self.train_slide))  # views
            val_w.append(sliding_windows(seg[len(seg) - n_val :], self.window, 1))
        if n < 2 * self.window:
            got = sum(len(s) for s in segments)
            raise TooLittleDataError(f"window={self.window} needs at least {2 * self.window} samples in a "
                                     f"gap-free stretch, got {got}")
        n_windows = sum(len(w) for w in train_w)
        if n_windows < self.n_clusters:
            raise TooLittleDataError(
                f"n_clusters={self.n_clusters} needs at least {self.n_clusters} training windows, got "
                f"{n_windows} from {n} samples (window={self.window}, train_slide={self.train_slide}, "
                f"holdout={self.holdout}); give more data or fewer clusters")
        rng = np.random.default_rng(self.random_state)
        self.n_train_windows_ = n_windows
        if n_windows > self.max_train_windows:
            # Draw the subsample's indices first and copy only those windows: memory stays bounded by
            # max_train_windows whatever the training length.
            pick = np.sort(rng.choice(n_windows, self.max_train_windows, replace=False))
            bounds = np.cumsum([0] + [len(w) for w in train_w])
            windows = np.concatenate([w[pick[(pick >= lo) & (pick < hi)] - lo]
                                      for w, lo, hi in zip(train_w, bounds[:-1], bounds[1:], strict=True)])
        else:
            windows = np.concatenate(train_w)
        windows = windows * tap
        km = KMeans(self.n_clusters, n_init=self.n_init, random_state=self.random_state)
        km.fit(windows)
        self.cluster_centers_ = np.ascontiguousarray(km.cluster_centers_, dtype=np.float64)
        self._center_sq = (self.cluster_centers_**2).sum(axis=1)
        val_errors = np.concatenate([self.window_errors(v) for v in val_w])
        self.threshold_ = threshold_from_errors(val_errors, self.threshold_policy, self.margin,
                                                self.quantile, self.sigma_k)
        self.error_quantiles_ = np.quantile(val_errors, np.linspace(0.0, 1.0, N_SCORE_QUANTILES))
        self.n_features_in_ = self.window
        return self

    # -- scoring -----------------------------------------------------------------------------------
    def nearest(self, windows: ArrayLike) -> NDArray[np.intp]:
        """Index of the nearest centroid of each tapered window (rows of ``windows`` are untapered)."""
        check_is_fitted(self, "cluster_centers_")
        w = np.asarray(windows, dtype=np.float64) * taper(self.window)
        if w.ndim != 2 or w.shape[1] != self.window:
            raise ValueError(f"expected windows of {self.window} samples, got shape {w.shape}")
        if not hasattr(self, "_center_sq"):
            self._center_sq = (self.cluster_centers_**2).sum(axis=1)
        # ||w - c||² = ||w||² - 2 w·c + ||c||²; ||w||² is constant per row so it does not change the argmin.
        d = self._center_sq[None, :] - 2.0 * (w @ self.cluster_centers_.T)
        return np.asarray(d.argmin(axis=1))

    def reconstruct(self, windows: ArrayLike) -> NDArray[np.float64]:
        """Each window's reconstruction: its nearest centroid (a tapered shape)."""
        idx = self.nearest(windows)
        return np.asarray(self.cluster_centers_[idx])

    def window_errors(self, windows: ArrayLike, kind: str = "max") -> NDArray[np.float64]:
        """Error of each tapered window against its nearest centroid.

        ``kind="max"`` is the largest absolute difference (the daemon's ``max_error``), ``"mean"`` the mean
        absolute difference (what the anomaly likelihood is fed, see `anomalyd.postprocess`).
        """
        if kind not in ERROR_KINDS:
            raise ValueError(f"error kind {kind!r} is not one of {', '.join(ERROR_KINDS)}")
        return self.window_error_stats(windows)[ERROR_KINDS.index(kind)]

    def window_error_stats(self, windows: ArrayLike, chunk: int = 4096) -> tuple[NDArray[np.float64],
                                                                             NDArray[np.float64]]:
        """Max and mean absolute reconstruction error of each window (see `score_stats`)."""
        _, e_max, e_mean = self.score_stats(windows, chunk)
        return e_max, e_mean

    def score_stats(self, windows: ArrayLike, chunk: int = 4096) -> tuple[NDArray[np.intp], NDArray[np.float64],
                                                                        NDArray[np.float64]]:
        """Nearest centroid, max and mean absolute reconstruction error of each window, in one pass.

        Computed in chunks, so the ``n x n_clusters`` distance matrix stays small (bounded memory, in cache),
        and each window is tapered once.
        """
        check_is_fitted(self, "cluster_centers_")
        w = np.asarray(windows, dtype=np.float64)
        if w.ndim != 2 or w.shape[1] != self.window:
            if len(w) == 0:
                return np.empty(0, dtype=np.intp), np.empty(0), np.empty(0)
            raise ValueError(f"expected windows of {self.window} samples, got shape {w.shape}")
        if not hasattr(self, "_center_sq"):
            self._center_sq = (self.cluster_centers_**2).sum(axis=1)
        tap = taper(self.window)
        n = len(w)
        idx = np.empty(n, dtype=np.intp)
        e_max, e_mean = np.empty(n), np.empty(n)
        for lo in range(0, n, chunk):
            t = w[lo : lo + chunk] * tap
            d = t @ self.cluster_centers_.T
            d *= -2.0
            d += self._center_sq
            near = d.argmin(axis=1)
            idx[lo : lo + len(t)] = near
            t -= self.cluster_centers_[near]
            np.abs(t, out=t)
            e_max[lo : lo + len(t)] = t.max(axis=1)
            e_mean[lo : lo + len(t)] = t.mean(axis=1)
        return idx, e_max, e_mean

    def normalised_score(self, errors: ArrayLike) -> NDArray[np.float64]:
        """Map errors to [0, 1]: the share of validation errors below each error (1 above all of them).

        A score of 0.99 reads "larger than 99% of the errors seen on normal data".
        """
        check_is_fitted(self, "error_quantiles_")
        e = np.asarray(errors, dtype=np.float64)
        q = self.error_quantiles_
        return np.interp(e, q, np.linspace(0.0, 1.0, len(q)), left=0.0, right=1.0)

    def score_windows(self, windows: ArrayLike) -> tuple[NDArray[np.float64], NDArray[np.bool_],
                                                         NDArray[np.float64]]:
        """Errors, anomaly flags (error above ``threshold_``) and normalised scores of ``windows``."""
        errors = self.window_errors(windows)
        return errors, errors > self.threshold_, self.normalised_score(errors)
