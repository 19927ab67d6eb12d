"""Window scorers besides the K-Means reconstruction: IBM's anomaly functions as per-window errors (pure numpy).

Each scorer maps a window of scaled samples, ``(window, fields)``, to one error per field; the detector
(`anomalyd.core.detector.Detector`) turns those errors into its score and decision exactly as it does the K-Means
reconstruction error (``DetectorSpec.scorer``). Every scorer is learned on the training windows only and then
fixed, so scoring a window uses that window alone: the scores are causal and the same however a series is
chunked (the daemon's ticks and one `anomalyd evaluate` call agree bit for bit), and the learned state is a few
arrays that the model file stores.

* ``fft`` (IBM's FFTbasedGeneralizedAnomalyScore): the magnitude spectrum of the window (its mean removed),
  scored by its Mahalanobis distance from the training windows' spectra (Ledoit-Wolf shrunk covariance).
* ``saliency`` (SaliencybasedGeneralizedAnomalyScore; spectral residual, Hou & Zhang 2007, Ren et al. 2019): the
  window's saliency map (log amplitude minus its local average, back to the time domain), scored the same way.
* ``generalized`` (GeneralizedAnomalyScore): the window's values themselves, scored the same way.
* ``discord`` (matrix-profile discord, as `stumpy`'s AB-join): the z-normalised Euclidean distance from the
  window to its nearest training window, divided by ``sqrt(window)``. The reference is the training windows
  (every ``step``-th, at most ``discord_max_ref``); it is not `stumpy.stumpi`'s growing self-join, which would
  keep the whole series in the daemon's state and forget that a repeated anomaly is still one.
* ``nodata`` (NoDataAnomalyScore): the share of the window's samples that are missing (gaps as a score).

`parse_scorers` reads ``DetectorSpec.scorer`` (e.g. ``"kmeans"``, ``"discord"``, ``"kmeans+discord"``).
"""

from __future__ import annotations

import math
from typing import Any

import numpy as np
from numpy.typing import NDArray

__all__ = ["SCORERS", "WindowScorer", "make_scorer", "parse_scorers"]

#: Every scorer name; ``kmeans`` is the detector's own shape catalog.
SCORERS = ("kmeans", "fft", "saliency", "generalized", "discord", "nodata")


def parse_scorers(text: str) -> tuple[str, ...]:
    """The scorers of a ``scorer`` setting: names joined by ``+``, each once.

    Examples
    --------
    >>> parse_scorers("kmeans+discord")
    ('kmeans', 'discord')
    """
    names = tuple(p.strip() for p in str(text).split("+"))
    bad = [n for n in names if n not in SCORERS]
    if bad or not names:
        raise ValueError(f"detector scorer={text!r}: {', '.join(bad) or 'nothing'} is not one of "
                         f"{', '.join(SCORERS)} (join several with '+')")
    if len(set(names)) != len(names):
        raise ValueError(f"detector scorer={text!r} names a scorer twice")
    if "nodata" in names and len(names) > 1:
        raise ValueError(f"detector scorer={text!r}: nodata scores gaps only and is not combined with others")
    return names


class WindowScorer:
    """A per-window error, per field, learned from training windows (see the module docstring).

    Subclasses set `name` and implement `fit`, `errors`, `state` and `_load`.
    """

    name = ""
    #: The scorer scores windows with missing samples too (they are NaN to every other scorer).
    scores_gaps = False

    def fit(self, windows: list[NDArray[np.float64]], max_windows: int, seed: int) -> WindowScorer:
        """Learn from training windows (a list of ``(n, window, fields)`` views, finite)."""
        return self

    def errors(self, windows: NDArray[np.float64]) -> NDArray[np.float64]:
        """Per-field errors of ``(n, window, fields)`` windows, ``(n, fields)``."""
        raise NotImplementedError

    def state(self) -> dict[str, NDArray[Any]]:
        """The learned arrays (`make_scorer` with them restores the scorer exactly)."""
        return {}

    def _load(self, arrays: dict[str, NDArray[Any]]) -> None:
        """Restore from `state`."""


def _subsample(windows: list[NDArray[np.float64]], max_windows: int, seed: int) -> NDArray[np.float64]:
    """At most ``max_windows`` of the windows (a seeded random subset, in order), copied."""
    sizes = np.array([len(p) for p in windows], dtype=np.int64)
    n = int(sizes.sum())
    if n <= max_windows:
        return np.concatenate(windows)
    pick = np.sort(np.random.default_rng(seed).choice(n, max_windows, replace=False))
    bounds = np.concatenate(([0], np.cumsum(sizes)))
    return np.concatenate([p[pick[(pick >= a) & (pick < b)] - a]
                           for p, a, b in zip(windows, bounds[:-1], bounds[1:], strict=True)])


def spectral_residual(x: NDArray[np.float64], avg: int = 3) -> NDArray[np.float64]:
    """Saliency map of each row of ``x`` (last axis = time): spectral residual (Hou & Zhang 2007).

    ``A = |FFT(x)|``, ``R = log A - (log A averaged over avg neighbouring frequencies)``, saliency
    ``|IFFT(exp(R + i phase))|``.

    Examples
    --------
    >>> x = np.zeros(32)
    >>> x[20] = 5.0
    >>> int(np.argmax(spectral_residual(x[None])[0]))
    20
    """
    f = np.fft.fft(x, axis=-1)
    amp = np.abs(f)
    log_amp = np.log(np.maximum(amp, 1e-8))
    pad = avg // 2
    padded = np.concatenate((log_amp[..., -pad:], log_amp, log_amp[..., :pad]), axis=-1) if pad else log_amp
    kernel = np.ones(avg) / avg
    smooth = np.apply_along_axis(lambda r: np.convolve(r, kernel, mode="valid"), -1, padded)
    resid = log_amp - smooth
    phase = f / np.maximum(amp, 1e-8)
    return np.asarray(np.abs(np.fft.ifft(np.exp(resid) * phase, axis=-1)))


class _Generalized(WindowScorer):
    """Mahalanobis distance of per-field window features from the training windows' (Ledoit-Wolf covariance)."""

    name = "generalized"

    def features(self, windows: NDArray[np.float64]) -> NDArray[np.float64]:
        """``(n, fields, features)`` from ``(n, window, fields)``."""
        return np.swapaxes(windows, 1, 2)

    def fit(self, windows: list[NDArray[np.float64]], max_windows: int, seed: int) -> WindowScorer:
        from sklearn.covariance import LedoitWolf

        feats = self.features(_subsample(windows, max_windows, seed))
        _, d, p = feats.shape
        self.loc_ = feats.mean(axis=0)  # (d, p)
        prec = np.empty((d, p, p))
        for j in range(d):
            prec[j] = LedoitWolf().fit(feats[:, j, :]).precision_
        self.precision_ = prec
        return self

    def errors(self, windows: NDArray[np.float64]) -> NDArray[np.float64]:
        if len(windows) == 0:
            return np.empty((0, windows.shape[2]))
        c = self.features(windows) - self.loc_  # (n, d, p)
        m2 = np.einsum("ndp,dpq,ndq->nd", c, self.precision_, c, optimize=False)
        return np.asarray(np.sqrt(np.maximum(m2, 0.0) / c.shape[2]))

    def state(self) -> dict[str, NDArray[Any]]:
        return {"loc": self.loc_, "precision": self.precision_}

    def _load(self, arrays: dict[str, NDArray[Any]]) -> None:
        self.loc_ = np.asarray(arrays["loc"], dtype=np.float64)
        self.precision_ = np.asarray(arrays["precision"], dtype=np.float64)


class _FFT(_Generalized):
    name = "fft"

    def features(self, windows: NDArray[np.float64]) -> NDArray[np.float64]:
        x = np.swapaxes(windows, 1, 2)
        return np.abs(np.fft.rfft(x - x.mean(axis=2, keepdims=True), axis=2))


class _Saliency(_Generalized):
    name = "saliency"

    def features(self, windows: NDArray[np.float64]) -> NDArray[np.float64]:
        x = np.swapaxes(windows, 1, 2)
        return spectral_residual(x - x.mean(axis=2, keepdims=True))


def _znorm(windows: NDArray[np.float64]) -> NDArray[np.float64]:
    """Each window and field z-normalised along time, ``(n, fields, window)``; a flat one becomes zeros (as
    `stumpy` treats constant subsequences: distance 0 to another flat one, ``sqrt(window)`` to any other)."""
    x = np.swapaxes(windows, 1, 2)
    mu = x.mean(axis=2, keepdims=True)
    sd = x.std(axis=2, keepdims=True)
    flat = sd <= 1e-8 * np.maximum(1.0, np.abs(mu))
    return np.asarray(np.where(flat, 0.0, (x - mu) / np.where(flat, 1.0, sd)))


class _Discord(WindowScorer):
    """Distance to the nearest training window (z-normalised Euclidean, per field), as a matrix-profile AB-join."""

    name = "discord"

    def __init__(self, max_ref: int = 4000) -> None:
        self.max_ref = max_ref

    def fit(self, windows: list[NDArray[np.float64]], max_windows: int, seed: int) -> WindowScorer:
        n = sum(len(p) for p in windows)
        step = max(1, math.ceil(n / self.max_ref))
        ref = np.concatenate([p for p in windows])[::step] if len(windows) > 1 else windows[0][::step]
        z = _znorm(np.ascontiguousarray(ref))  # (r, d, w)
        self.ref_ = np.ascontiguousarray(np.swapaxes(z, 0, 1))  # (d, r, w)
        self.step_ = step
        return self

    def errors(self, windows: NDArray[np.float64], chunk: int = 2048) -> NDArray[np.float64]:
        n, w, d = windows.shape
        out = np.empty((n, d))
        ref_sq = (self.ref_ * self.ref_).sum(axis=2)  # (d, r): w or 0
        for a in range(0, n, chunk):
            q = _znorm(windows[a : a + chunk])  # (c, d, w)
            q_sq = (q * q).sum(axis=2)  # (c, d)
            for j in range(d):
                dot = q[:, j, :] @ self.ref_[j].T  # (c, r)
                d2 = q_sq[:, j, None] + ref_sq[j][None, :] - 2.0 * dot
                out[a : a + len(q), j] = np.sqrt(np.maximum(d2.min(axis=1), 0.0) / w)
        return out

    def state(self) -> dict[str, NDArray[Any]]:
        return {"ref": self.ref_, "step": np.array(self.step_)}

    def _load(self, arrays: dict[str, NDArray[Any]]) -> None:
        self.ref_ = np.ascontiguousarray(arrays["ref"], dtype=np.float64)
        self.step_ = int(arrays["step"])


class _NoData(WindowScorer):
    """Share of the window's samples that are missing, per field."""

    name = "nodata"
    scores_gaps = True

    def errors(self, windows: NDArray[np.float64]) -> NDArray[np.float64]:
        return np.asarray(np.isnan(windows).mean(axis=1))


def make_scorer(name: str, arrays: dict[str, NDArray[Any]] | None = None, discord_max_ref: int = 4000
                ) -> WindowScorer:
    """A scorer by name (not ``kmeans``: that is the detector's catalog), restored from `WindowScorer.state`
    when ``arrays`` is given."""
    classes: dict[str, type[WindowScorer]] = {"fft": _FFT, "saliency": _Saliency, "generalized": _Generalized,
                                              "nodata": _NoData}
    sc: WindowScorer = _Discord(discord_max_ref) if name == "discord" else classes[name]()
    if arrays is not None:
        sc._load(arrays)
    return sc
