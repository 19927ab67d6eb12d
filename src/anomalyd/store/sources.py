"""What a signal reads: its fields, one query per measurement, joined per series, counters turned into rates.

A single-field signal is one query, as it always was. A signal over several fields issues one query per
measurement (and per extra ``where``), selecting all of that measurement's fields at once; the answers are joined
per series on the signal's ``group_by`` tags. Each field keeps its own timestamps: the worker aligns every field on
the signal's grid (`anomalyd.core.grid`), so fields written by different Telegraf inputs at slightly different times
line up.
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass

import numpy as np
from numpy.typing import NDArray

from ..config import SignalConfig
from ..core.records import Tags
from .base import Query, SeriesData, Store

#: One field's samples: epoch-ns times and float values (NaN where a row lacked it).
FieldSamples = tuple[NDArray[np.int64], NDArray[np.float64]]
#: Per series (its ``group_by`` tags), one `FieldSamples` per field of the signal, in window order.
SignalData = dict[Tags, list[FieldSamples]]

_EMPTY: FieldSamples = (np.empty(0, dtype=np.int64), np.empty(0))
#: Queries of one signal in flight at once (one per measurement, up to this many).
_PARALLEL_READS = 4


@dataclass(frozen=True)
class _Read:
    query: Query
    #: For each of the signal's fields read by this query: (field index in the signal, column in the answer).
    columns: tuple[tuple[int, int], ...]


def signal_reads(sig: SignalConfig, where: Tags = (), series: tuple[Tags, ...] = ()) -> list[_Read]:
    """The queries of a signal: one per measurement and extra ``where``, each selecting all of its fields.

    ``where`` adds tag equalities (e.g. ``train_where``); ``series`` restricts the read to those series.
    """
    groups: dict[tuple[str, Tags], list[int]] = {}
    for j, f in enumerate(sig.fields):
        w = tuple(sorted({**dict(sig.where), **dict(f.where), **dict(where)}.items()))
        groups.setdefault((f.measurement, w), []).append(j)
    out = []
    for (meas, w), idx in groups.items():
        names = list(dict.fromkeys(sig.fields[j].field for j in idx))  # a field read twice is selected once
        q = Query(meas, names[0], w, sig.group_by, sig.period_ns, series=series,
                  fields=tuple(names) if sig.multi else ())
        out.append(_Read(q, tuple((j, names.index(sig.fields[j].field)) for j in idx)))
    return out


def rate(times: NDArray[np.int64], values: NDArray[np.float64], non_negative: bool = True) -> FieldSamples:
    """InfluxQL's ``derivative(1s)`` / ``non_negative_derivative(1s)``: per second, stamped at the later sample.

    A counter reset (a negative difference) gives no sample with ``non_negative``.

    Examples
    --------
    >>> t = np.array([0, 10, 20, 30]) * 10**9
    >>> rate(t, np.array([100.0, 200.0, 50.0, 150.0]))[1].tolist()
    [10.0, 10.0]
    >>> rate(t, np.array([100.0, 200.0, 50.0, 150.0]), non_negative=False)[1].tolist()
    [10.0, -15.0, 10.0]
    """
    ok = np.isfinite(values)
    t, v = times[ok], values[ok]
    if len(t) < 2:
        return _EMPTY
    dt = np.diff(t).astype(np.float64) / 1e9
    with np.errstate(divide="ignore", invalid="ignore"):
        r = np.diff(v) / dt
    keep = (dt > 0) & np.isfinite(r)
    if non_negative:
        keep &= r >= 0
    return t[1:][keep], r[keep]


def _transform(samples: FieldSamples, kind: str) -> FieldSamples:
    if kind == "":
        return samples
    return rate(samples[0], samples[1], non_negative=kind == "non_negative_derivative")


def _join(sig: SignalConfig, answers: Sequence[tuple[_Read, SeriesData]]) -> SignalData:
    """The answers of `signal_reads`' queries as one entry per series, one samples pair per field."""
    out: SignalData = {}
    d = len(sig.fields)
    for read, data in answers:
        for tags, (times, values) in data.items():
            per = out.get(tags)
            if per is None:
                per = out[tags] = [_EMPTY] * d
            for j, col in read.columns:
                v = values if values.ndim == 1 else values[:, col]
                if values.ndim > 1:  # rows where only another field of this measurement was written
                    ok = ~np.isnan(v)
                    per[j] = _transform((times[ok], v[ok]), sig.fields[j].transform)
                else:
                    per[j] = _transform((times, v), sig.fields[j].transform)
    return out


def _read_all(store: Store, reads: list[_Read], start_ns: int, end_ns: int) -> list[tuple[_Read, SeriesData]]:
    """Every query's answer; several queries run side by side (influxd answers one while the other is parsed)."""
    if len(reads) == 1:
        return [(reads[0], store.read(reads[0].query, start_ns, end_ns))]
    with ThreadPoolExecutor(min(len(reads), _PARALLEL_READS), thread_name_prefix="read") as pool:
        answers = list(pool.map(lambda r: store.read(r.query, start_ns, end_ns), reads))
    return list(zip(reads, answers, strict=True))


def read_signal(store: Store, sig: SignalConfig, start_ns: int, end_ns: int, where: Tags = (),
                series: tuple[Tags, ...] = ()) -> SignalData:
    """Every series of the signal with samples in ``[start_ns, end_ns]``, each field's samples apart."""
    return _join(sig, _read_all(store, signal_reads(sig, where, series), start_ns, end_ns))


def read_signal_batches(store: Store, sig: SignalConfig, start_ns: int, end_ns: int, size: int,
                        series: tuple[Tags, ...] = ()) -> Iterator[SignalData]:
    """`read_signal`, ``size`` series at a time as the store answers (a one-query signal is handed over while
    the store is still sending the rest; a signal over several measurements is joined first)."""
    reads = signal_reads(sig, (), series)
    if len(reads) == 1:
        batches = getattr(store, "read_batches", None)
        parts = (batches(reads[0].query, start_ns, end_ns, size) if batches is not None
                 else iter([store.read(reads[0].query, start_ns, end_ns)]))
        for data in parts:
            yield _join(sig, [(reads[0], data)])
        return
    whole = _join(sig, _read_all(store, reads, start_ns, end_ns))
    keys = list(whole)
    for i in range(0, len(keys), size):
        yield {k: whole[k] for k in keys[i : i + size]}


def describe(sig: SignalConfig) -> str:
    """The signal's fields for messages: ``measurement.field`` (one field) or ``a, b, c (measurements m, n)``."""
    if not sig.multi:
        return f"{sig.measurement}.{sig.field}"
    meas = sorted({f.measurement for f in sig.fields})
    return f"{', '.join(sig.field_names)} (measurement{'s' if len(meas) > 1 else ''} {', '.join(meas)})"
