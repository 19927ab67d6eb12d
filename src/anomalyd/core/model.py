"""The K-Means shape catalog: windowing, taper, clustering, nearest-shape errors (pure numpy/scikit-learn).

Nothing here does I/O, logging or reads configuration. Windows are ``(window, fields)`` blocks of a regularly
sampled series; each field is tapered with sin² and the block is flattened, so one catalog covers a single field
or several fields scaled alike (see `anomalyd.core.detector`, which does the scaling).
"""

from __future__ import annotations

import warnings
from contextlib import AbstractContextManager

import numpy as np
from numpy.typing import ArrayLike, NDArray
from sklearn.base import BaseEstimator
from sklearn.cluster import KMeans
from sklearn.exceptions import ConvergenceWarning
from sklearn.utils.validation import check_is_fitted
from threadpoolctl import ThreadpoolController, threadpool_limits

THRESHOLD_POLICIES = ("max", "quantile", "sigma")

_BLAS: list[ThreadpoolController] = []  # made at the first match, once numpy's and scipy's BLAS are loaded


def _one_blas_thread() -> AbstractContextManager[object]:
    """A context that runs BLAS on one thread. The products of `ShapeCatalog.match` (a few thousand windows by
    ~150 shapes of 32 values) are too small to split: with OpenBLAS' default of one thread per core, each waits
    for the others and they took 3-6x as long as on one thread (benchmarks/RESULTS.md, "Tick against its floor,
    third pass"). The limit holds for the whole process while a match runs."""
    if not _BLAS:
        _BLAS.append(ThreadpoolController())
    return _BLAS[0].limit(limits=1, user_api="blas")


class TooLittleDataError(ValueError):
    """The training data cannot support the requested window."""


def taper(window: int) -> NDArray[np.float64]:
    """Return the sin² window function used to taper every window.

    Examples
    --------
    >>> taper(5).round(3).tolist()
    [0.0, 0.5, 1.0, 0.5, 0.0]
    """
    return np.sin(np.linspace(0.0, np.pi, window)) ** 2


def sliding_windows(x: ArrayLike, window: int, slide: int = 1) -> NDArray[np.float64]:
    """Windows of ``window`` rows every ``slide`` rows, shape ``(..., n_windows, window, fields)`` (a view).

    A 1-d series is one field; leading axes (several series of the same length) are kept.

    Examples
    --------
    >>> sliding_windows(np.arange(6.0), 4, 2)[:, :, 0].tolist()
    [[0.0, 1.0, 2.0, 3.0], [2.0, 3.0, 4.0, 5.0]]
    >>> sliding_windows(np.zeros((3, 10, 2)), 4).shape  # 3 series of 10 rows x 2 fields
    (3, 7, 4, 2)
    """
    arr = np.asarray(x, dtype=np.float64)
    if arr.ndim == 1:
        arr = arr[:, None]
    if arr.ndim < 2:
        raise ValueError(f"expected rows or rows x fields, got shape {arr.shape}")
    if arr.shape[-2] < window:
        return np.empty((*arr.shape[:-2], 0, window, arr.shape[-1]))
    v = np.lib.stride_tricks.sliding_window_view(arr, window, axis=-2)  # (..., n - w + 1, d, w)
    return np.swapaxes(v, -1, -2)[..., ::slide, :, :]


def threshold_from_errors(errors: NDArray[np.float64], policy: str, margin: float, quantile: float,
                          k: float) -> float:
    """Turn the errors of normal data into a threshold.

    ``max``: largest error times ``margin``; ``quantile``: that quantile times ``margin``; ``sigma``: mean + ``k``
    standard deviations.

    Examples
    --------
    >>> errs = np.array([1.0, 2.0, 3.0, 4.0])
    >>> threshold_from_errors(errs, "max", 1.5, 0.99, 3.0)
    6.0
    >>> round(threshold_from_errors(errs, "sigma", 1.0, 0.99, 2.0), 4)
    4.7361
    """
    if errors.size == 0:
        return float("nan")
    if policy == "max":
        return float(errors.max() * margin)
    if policy == "quantile":
        return float(np.quantile(errors, quantile) * margin)
    if policy == "sigma":
        return float(errors.mean() + k * errors.std())
    raise ValueError(f"threshold policy {policy!r} is not one of {', '.join(THRESHOLD_POLICIES)}")


class ShapeCatalog(BaseEstimator):
    """K-Means catalog of normal window shapes (tapered, flattened ``window x fields`` blocks).

    Parameters
    ----------
    n_clusters : int
        Catalog size.
    random_state : int
        Seed, so training is reproducible.
    n_init : int
        K-Means restarts (the best is kept).
    max_train_windows : int
        Above this many windows, K-Means is fitted on a seeded random subsample (bounded time and memory).

    Examples
    --------
    >>> t = np.arange(2000)
    >>> w = sliding_windows(np.sin(2 * np.pi * t / 50), 16, 2)
    >>> cat = ShapeCatalog(n_clusters=20).fit(w)
    >>> near, mean_abs, max_abs, signed = cat.match(w[:5])
    >>> bool(max_abs.max() < 0.2), mean_abs.shape
    (True, (5, 1))
    """

    def __init__(self, n_clusters: int = 150, random_state: int = 0, n_init: int = 3,
                 max_train_windows: int = 50_000) -> None:
        self.n_clusters = n_clusters
        self.random_state = random_state
        self.n_init = n_init
        self.max_train_windows = max_train_windows

    def fit(self, windows: NDArray[np.float64] | list[NDArray[np.float64]]) -> ShapeCatalog:
        """Cluster ``windows`` (shape ``(n, window, fields)``, untapered, finite), or a list of such arrays (views
        of several stretches: the subsample is drawn first and only its windows are copied, so memory stays
        bounded by ``max_train_windows`` whatever the training length)."""
        parts = windows if isinstance(windows, list) else [windows]
        sizes = np.array([len(p) for p in parts], dtype=np.int64)
        n = int(sizes.sum())
        if n < 2:
            raise TooLittleDataError(f"{n} training window(s) is too few for a catalog; give more data")
        _, w, d = parts[0].shape
        rng = np.random.default_rng(self.random_state)
        self.n_train_windows_ = n
        if n > self.max_train_windows:
            pick = np.sort(rng.choice(n, self.max_train_windows, replace=False))
            bounds = np.concatenate(([0], np.cumsum(sizes)))
            chosen = np.concatenate([p[pick[(pick >= a) & (pick < b)] - a]
                                     for p, a, b in zip(parts, bounds[:-1], bounds[1:], strict=True)])
        else:
            chosen = np.concatenate(parts)
        flat = (chosen * taper(w)[None, :, None]).reshape(len(chosen), -1)
        k = int(min(self.n_clusters, len(flat)))
        km = KMeans(k, n_init=self.n_init, random_state=self.random_state)
        with warnings.catch_warnings():  # repeated windows (flat or perfectly periodic series) are fine
            warnings.simplefilter("ignore", ConvergenceWarning)
            # One OpenMP thread: K-Means' sums depend on the thread count in their last bits, so a model is the same
            # on any machine and in any training worker; at these sizes a second thread mostly spin-waits.
            with threadpool_limits(1, user_api="openmp"):
                km.fit(flat)
        self.set_centers(km.cluster_centers_, w, d)
        return self

    def set_centers(self, centers: NDArray[np.float64], window: int, fields: int) -> None:
        """Install learned centroids (``(k, window * fields)``, tapered), e.g. when loading a stored model."""
        c = np.ascontiguousarray(centers, dtype=np.float64)
        if c.ndim != 2 or c.shape[1] != window * fields:
            raise ValueError(f"centroids of shape {c.shape} do not match window={window} x fields={fields}")
        self.cluster_centers_ = c
        self.window_ = window
        self.n_fields_ = fields
        self._center_sq = (c * c).sum(axis=1)
        self._centers_t = np.ascontiguousarray(c.T)  # the product's right operand, laid out as BLAS reads it

    def match(self, windows: NDArray[np.float64], chunk: int = 4096,
              fields: NDArray[np.bool_] | None = None) -> tuple[
            NDArray[np.intp], NDArray[np.float64], NDArray[np.float64], NDArray[np.float64]]:
        """Nearest centroid of each window and, per field, the mean and max absolute and the mean signed
        difference between the tapered window and that centroid.

        Computed in chunks, so the ``n x n_clusters`` distance matrix stays small. With ``fields`` (a mask over
        the catalog's fields), the windows hold only those fields and the nearest centroid is the nearest on
        them: the shapes' marginal on the fields that are there.

        Returns
        -------
        nearest : ndarray of int, shape (n,)
        mean_abs, max_abs, signed : ndarray, shape (n, fields)
        """
        check_is_fitted(self, "cluster_centers_")
        w, d = self.window_, self.n_fields_
        centers, center_sq, centers_t = self.cluster_centers_, self._center_sq, self._centers_t
        if fields is not None and not np.all(fields):
            sub = self.cluster_centers_.reshape(-1, w, d)[:, :, fields]
            d = int(np.count_nonzero(fields))
            centers = np.ascontiguousarray(sub.reshape(len(sub), w * d))
            center_sq = (centers * centers).sum(axis=1)
            centers_t = np.ascontiguousarray(centers.T)
        win = np.asarray(windows, dtype=np.float64)
        n = len(win)
        if n == 0:
            return np.empty(0, dtype=np.intp), np.empty((0, d)), np.empty((0, d)), np.empty((0, d))
        if win.shape[1:] != (w, d):
            raise ValueError(f"expected windows of {w} rows x {d} fields, got shape {win.shape}")
        tap = taper(w)[None, :, None]
        near = np.empty(n, dtype=np.intp)
        mean_abs, max_abs, signed = np.empty((n, d)), np.empty((n, d)), np.empty((n, d))
        with _one_blas_thread():
            for lo in range(0, n, chunk):
                t = (win[lo : lo + chunk] * tap).reshape(-1, w * d)
                dist = t @ centers_t
                dist *= -2.0
                dist += center_sq
                nn = dist.argmin(axis=1)
                near[lo : lo + len(t)] = nn
                diff = (t - centers[nn]).reshape(-1, w, d)
                signed[lo : lo + len(t)] = diff.mean(axis=1)
                np.abs(diff, out=diff)
                mean_abs[lo : lo + len(t)] = diff.mean(axis=1)
                # One field: the max along the contiguous last axis, which numpy runs several times faster than
                # over the middle axis of (n, window, 1) (the same values: a max does not depend on the order).
                max_abs[lo : lo + len(t)] = diff.reshape(-1, w).max(axis=1)[:, None] if d == 1 else diff.max(axis=1)
        return near, mean_abs, max_abs, signed
