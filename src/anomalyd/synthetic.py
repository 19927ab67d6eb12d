"""A synthetic ECG-like signal with labelled anomalies, for the demo and the tests (no data files needed).

Each beat is a P wave, a QRS complex and a T wave (sums of Gaussians), in units like the reference EKG (R peak
about 100). Beat length, amplitude and baseline wander vary a little from beat to beat, with white noise on
top, so the model must generalise rather than memorise.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
from numpy.typing import NDArray

ANOMALY_KINDS = ("dropout", "spike", "beat_shape", "noise_burst")


@dataclass(frozen=True)
class Injected:
    """An injected anomaly covering samples ``[start, end)``."""

    kind: str
    start: int
    end: int


def _beat(n: int, amp: float, rng: np.random.Generator, *, inverted_t: bool = False,
          wide_qrs: bool = False) -> NDArray[np.float64]:
    x = np.linspace(0.0, 1.0, n, endpoint=False)

    def g(mu: float, sigma: float, a: float) -> NDArray[np.float64]:
        return a * np.exp(-0.5 * ((x - mu) / sigma) ** 2)

    w = 2.5 if wide_qrs else 1.0
    beat = (g(0.18, 0.035, 12) + g(0.35, 0.015 * w, -14) + g(0.40, 0.022 * w, 100) + g(0.45, 0.015 * w, -22)
            + g(0.68, 0.055, -28 if inverted_t else 28))
    return np.asarray(amp * beat)


def ecg(n: int, seed: int = 0, beat_len: int = 80, noise: float = 1.0) -> tuple[NDArray[np.float64],
                                                                             NDArray[np.intp]]:
    """Generate ``n`` samples of a normal ECG-like signal; also return the start index of each beat.

    Examples
    --------
    >>> x, beats = ecg(500, seed=1)
    >>> x.shape, bool(80 < x.max() < 130)
    ((500,), True)
    """
    rng = np.random.default_rng(seed)
    parts = []
    starts = []
    total = 0
    while total < n:
        starts.append(total)
        length = round(beat_len * rng.uniform(0.96, 1.04))
        parts.append(_beat(length, rng.uniform(0.97, 1.03), rng))
        total += length
    out = np.concatenate(parts)[:n]
    t = np.arange(n)
    wander = 3.0 * np.sin(2 * np.pi * t / (beat_len * 23.7) + rng.uniform(0, 2 * np.pi))
    return out + wander + rng.normal(0.0, noise, n), np.asarray(starts, dtype=np.intp)


def inject(x: NDArray[np.float64], beats: NDArray[np.intp], kinds: tuple[str, ...], start: int,
           seed: int = 0, spacing: int = 400) -> tuple[NDArray[np.float64], list[Injected]]:
    """Inject one anomaly of each kind in ``kinds``, ``spacing`` samples apart from ``start`` on.

    Sizes are what an operator would call obvious on a plot:

    - ``dropout``: 6 samples flat at 0 right after a beat's R peak (a lead losing contact);
    - ``spike``: one sample +70 (70% of the R peak) between two beats;
    - ``beat_shape``: one beat with a 2.5x wider QRS and an inverted T wave;
    - ``noise_burst``: 40 samples of added Gaussian noise with sigma 15.
    """
    rng = np.random.default_rng(seed)
    y = x.copy()
    found: list[Injected] = []
    pos = start
    for kind in kinds:
        if kind not in ANOMALY_KINDS:
            raise ValueError(f"anomaly kind {kind!r} is not one of {', '.join(ANOMALY_KINDS)}")
        i = int(np.searchsorted(beats, pos))
        if i + 1 >= len(beats):
            raise ValueError(f"no room for a {kind} anomaly at sample {pos} in a series of {len(x)}")
        b0, b1 = int(beats[i]), int(beats[i + 1])
        n = b1 - b0
        if kind == "dropout":
            s = b0 + int(0.41 * n)
            y[s : s + 6] = 0.0
            found.append(Injected(kind, s, s + 6))
        elif kind == "spike":
            s = b0 + int(0.88 * n)
            y[s] += 70.0
            found.append(Injected(kind, s, s + 1))
        elif kind == "beat_shape":
            y[b0:b1] += _beat(n, 1.0, rng, inverted_t=True, wide_qrs=True) - _beat(n, 1.0, rng)
            found.append(Injected(kind, b0, b1))
        else:
            y[b0 : b0 + 40] += rng.normal(0.0, 15.0, 40)
            found.append(Injected(kind, b0, b0 + 40))
        pos = b1 + spacing
    return y, found
