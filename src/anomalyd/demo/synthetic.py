"""Synthetic signals with labelled anomalies, for the demo and the tests (no data files needed): an ECG-like
signal (`ecg`, `inject`) and a host's cpu, memory and network, Telegraf style (`host`, `inject_host`).

The ECG: each beat is a P wave, a QRS complex and a T wave (sums of Gaussians), in units like the reference EKG (R peak
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
    """An injected anomaly covering samples ``[start, end)`` (``field``: the one metric it changes, when the
    series has several)."""

    kind: str
    start: int
    end: int
    field: str = ""


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


# -- a host's cpu, memory and network, Telegraf style ------------------------------------------------------------

#: The host generator's metrics, as Telegraf writes them: (measurement, field). ``cpu`` also carries the tag
#: ``cpu = "cpu-total"``; ``net.bytes_recv`` is a counter (read it with ``non_negative_derivative``).
HOST_METRICS = (("cpu", "usage_user"), ("mem", "used_percent"), ("net", "bytes_recv"))
#: The faults `inject_host` knows, and the one metric each of them changes.
HOST_FAULTS = {"memory_leak": "mem.used_percent", "network_drop": "net.bytes_recv"}


@dataclass
class HostSeries:
    """One synthetic host: samples ``0..n-1``, one every ``period_s`` seconds.

    ``cpu`` is ``cpu.usage_user`` (percent), ``mem`` ``mem.used_percent`` (percent) and ``net`` ``net.bytes_recv``
    (bytes received since boot: a monotonically increasing integer counter); ``load`` (0..1) is what drives all
    three. ``faults`` are the faults injected so far, each naming the one metric it changes (``Injected.field``).
    """

    period_s: float
    load: NDArray[np.float64]
    cpu: NDArray[np.float64]
    mem: NDArray[np.float64]
    net: NDArray[np.int64]
    faults: list[Injected]

    def metric(self, name: str) -> NDArray[np.float64] | NDArray[np.int64]:
        """A metric by its ``measurement.field`` name (`HOST_METRICS`)."""
        if name == "net.bytes_recv":
            return self.net
        if name in ("cpu.usage_user", "mem.used_percent"):
            return self.cpu if name == "cpu.usage_user" else self.mem
        raise KeyError(f"{name!r} is not one of the host metrics ({', '.join(f'{m}.{f}' for m, f in HOST_METRICS)})")

    def net_rate(self) -> NDArray[np.float64]:
        """``net.bytes_recv`` as InfluxQL's ``non_negative_derivative(1s)`` reads it: bytes per second, sample
        ``k`` from ``k - 1`` to ``k`` (NaN for the first sample)."""
        return np.concatenate(([np.nan], np.diff(self.net).astype(np.float64) / self.period_s))


#: Noise is Gaussian cut at this many standard deviations, and the load is held between a floor (idle
#: housekeeping) and a cap (the worker pool is full): a few hours of history then already hold the extremes, so
#: the last hour's normal data does not leave the range the model saw (the score's out-of-range rule flags that).
NOISE_CUT = 2.0
LOAD_FLOOR, LOAD_CAP = 0.2, 0.6


def _normal(rng: np.random.Generator, sigma: float, n: int) -> NDArray[np.float64]:
    """Gaussian noise cut at `NOISE_CUT` sigma."""
    return np.clip(rng.normal(0.0, sigma, n), -NOISE_CUT * sigma, NOISE_CUT * sigma)


def _ar1(n: int, phi: float, sigma: float, rng: np.random.Generator) -> NDArray[np.float64]:
    """AR(1) noise with stationary standard deviation about ``sigma``, never beyond `NOISE_CUT` sigma."""
    e = _normal(rng, sigma * np.sqrt(1.0 - phi**2), n)
    out = np.empty(n)
    prev = float(_normal(rng, sigma, 1)[0])
    for k in range(n):
        prev = phi * prev + e[k]
        out[k] = prev
    return np.clip(out, -NOISE_CUT * sigma, NOISE_CUT * sigma)


def host(n: int, period_s: float = 10.0, seed: int = 0) -> HostSeries:
    """Generate ``n`` samples of a normal host, one every ``period_s`` seconds (pure numpy, seeded).

    One load drives the three metrics, so they move together:

    - the load: a base that swells and ebbs every hour, a batch job every 15 minutes (3 minutes of extra load with
      soft edges) and correlated noise, held between `LOAD_FLOOR` and `LOAD_CAP` (an hourly cycle rather than a
      daily one, so the demo's 6 hours of training hold every level its last hour reaches);
    - ``cpu`` (percent): about 5 + 60 x load, plus correlated noise (sigma 1.5);
    - ``mem`` (percent): about 38 + 14 x the load averaged over a minute (buffers grow with the work), with little
      noise (sigma 0.25);
    - ``net`` (a bytes counter): a rate of about 0.3 + 4 x load MB/s with 5% multiplicative noise, summed from a
      random boot value; it never decreases.

    Every noise is cut at `NOISE_CUT` sigma.

    Examples
    --------
    >>> h = host(2000, seed=1)
    >>> bool(np.corrcoef(h.cpu, h.mem)[0, 1] > 0.5), bool((np.diff(h.net) >= 0).all())
    (True, True)
    """
    rng = np.random.default_rng(seed)
    t = np.arange(n) * period_s
    swell = 0.30 + 0.12 * np.sin(2 * np.pi * t / 3600.0 + rng.uniform(0, 2 * np.pi))
    job_every, job_len, edge = 900.0, 180.0, 30.0
    phase = (t + rng.uniform(0, job_every)) % job_every
    job = 0.25 * (np.clip(phase / edge, 0, 1) * np.clip((job_len - phase) / edge, 0, 1))
    load = np.clip(swell + job + _ar1(n, 0.9, 0.03, rng), LOAD_FLOOR, LOAD_CAP)
    cpu = np.clip(5.0 + 60.0 * load + _ar1(n, 0.5, 1.5, rng), 0.0, 100.0)
    alpha = 1.0 - np.exp(-period_s / 60.0)  # a one-minute exponential average of the load
    smooth = np.empty(n)
    acc = float(load[0]) if n else 0.0
    for k in range(n):
        acc += alpha * (load[k] - acc)
        smooth[k] = acc
    mem = np.clip(38.0 + 14.0 * smooth + _normal(rng, 0.25, n), 0.0, 100.0)
    rate = (0.3 + 4.0 * load) * 1e6 * np.exp(_normal(rng, 0.05, n))
    net = int(rng.integers(10**9, 10**11)) + np.cumsum(np.round(rate * period_s)).astype(np.int64)
    return HostSeries(period_s, load, cpu, mem, net, [])


def inject_host(h: HostSeries, kind: str, start: int, length: int) -> Injected:
    """Inject one fault into samples ``[start, start + length)`` of ``h`` (in place); only its metric changes.

    - ``memory_leak``: ``mem`` climbs 1 percentage point a minute above its normal level, then the leaking
      process is restarted and memory is back to normal (cpu and network are unchanged);
    - ``network_drop``: the host's received traffic fades over 2 minutes to 3% of its usual rate (a link or
      upstream problem) while cpu and memory carry on, then comes back at once; the counter keeps increasing,
      more slowly.
    """
    if kind not in HOST_FAULTS:
        raise ValueError(f"host fault {kind!r} is not one of {', '.join(HOST_FAULTS)}")
    n = len(h.cpu)
    if not (0 < start and length > 0 and start + length <= n):
        raise ValueError(f"no room for a {length}-sample {kind} at sample {start} in a series of {n}")
    end = start + length
    if kind == "memory_leak":
        leak = np.arange(1, length + 1) * h.period_s / 60.0
        h.mem[start:end] = np.minimum(h.mem[start:end] + leak, 100.0)
    else:
        inc = np.diff(h.net)  # inc[k - 1]: the bytes sample k adds
        fade = max(round(120.0 / h.period_s), 1)  # traffic fades over 2 minutes, then 3% of it is left
        keep = np.concatenate((np.linspace(1.0, 0.03, fade + 1)[1:], np.full(max(length - fade, 0), 0.03)))[:length]
        inc[start - 1 : end - 1] = np.round(inc[start - 1 : end - 1] * keep).astype(np.int64)
        h.net[1:] = h.net[0] + np.cumsum(inc)
    fault = Injected(kind, start, end, HOST_FAULTS[kind])
    h.faults.append(fault)
    return fault
