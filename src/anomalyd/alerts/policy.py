"""When an alert fires and when it recovers: the per-series state machine and the transitions it emits (pure).

Policy, per series (``SeriesKey.id``), over the scored windows in time order of their last sample:

- OK → ANOMALOUS after ``for_windows`` consecutive anomalous windows: one ``anomalous`` alert;
- ANOMALOUS → OK after ``recover_windows`` consecutive normal windows: one ``recovered`` alert;
- while ANOMALOUS, a ``reminder`` at most every ``repeat_every`` of wall time (0 turns reminders off);
- with ``missing_data`` on, a ``missing`` alert when a series' windows start coming back as missing data and a
  ``resumed`` alert when scored windows come back. Missing windows neither count as anomalous nor as normal;
- a ``deadman`` alert (Kapacitor's name) when a series' newest written window is older than ``deadman_s``
  (the worker asks, see :func:`deadman`), and a ``resumed`` alert when its windows come back.

Windows at or before the last one observed for a series are ignored (:func:`apply`). Nothing here reads or writes
files: `anomalyd.alerts.manager` keeps the states on disk and queues the transitions.
"""

from __future__ import annotations

import logging
import math
from collections.abc import Mapping, Sequence
from dataclasses import asdict, dataclass, field
from dataclasses import fields as dataclass_fields
from typing import TYPE_CHECKING, Any

import numpy as np

from ..core.records import FieldShare, SeriesKey, Tags, WindowResult, tags_str

if TYPE_CHECKING:
    from ..config import AlertsConfig

log = logging.getLogger(__name__)

ANOMALOUS = "anomalous"
RECOVERED = "recovered"
REMINDER = "reminder"
MISSING = "missing"
RESUMED = "resumed"
DEADMAN = "deadman"
KINDS = (ANOMALOUS, RECOVERED, REMINDER, MISSING, RESUMED, DEADMAN)
#: A window's attribution as a transition keeps it: ``(field, share, direction +1/-1, value or None)``, largest
#: share first (see :class:`anomalyd.core.records.FieldShare`).
Attribution = tuple[tuple[str, float, int, float | None], ...]
#: At most this many fields of a window's attribution go into a transition (and its outbox item).
MAX_ATTRIBUTION = 5
#: At most this many fields' samples go into a transition (the fields with the largest shares): its plot panels.
MAX_PLOTTED_FIELDS = 3


@dataclass(frozen=True)
class Transition:
    """One change of alert state of one series, with what its message needs.

    ``end_ns``/``start_ns`` are the window that caused the transition; ``since_ns`` the end of the window that
    opened the episode; ``windows`` the number of anomalous windows in the episode so far; ``peak_error`` and
    ``peak_ratio`` its worst window.

    ``attribution`` is the window's attribution (`WindowResult.attribution`): ``(field, share, direction, value)``
    per field, largest share first, at most `MAX_ATTRIBUTION` fields; ``direction`` is +1 (above the
    reconstruction) or -1 (below), ``value`` the field's newest sample in the window (None when missing). A
    single-field signal has one entry (or none: a missing-data window, or a result without attribution).
    ``peak_attribution`` is the same for the episode's worst window (the one ``peak_error`` comes from).

    ``values``/``reconstruction`` hold the window's samples and its reconstruction:

    - single field (``fields == ()``): ``window`` floats each, as before multi-field signals;
    - several fields: ``fields`` names the plotted fields (at most `MAX_PLOTTED_FIELDS`, those with the largest
      shares, in that order) and ``values``/``reconstruction`` are their columns concatenated field by field,
      ``window`` floats per field (``len(values) == window * len(fields)``; see :meth:`columns`).

    In JSON (:meth:`to_dict`) the tuples become lists and non-finite floats ``null``; the keys added with
    multi-field signals (``attribution``, ``peak_attribution``, ``fields``) are optional when reading, so outbox
    items written before them still load.
    """

    kind: str
    series_id: str
    signal: str
    tags: Tags
    model_id: str
    start_ns: int
    end_ns: int
    threshold: float
    max_error: float | None = None
    ratio: float | None = None
    n_missing: int = 0
    since_ns: int | None = None
    windows: int = 0
    peak_error: float | None = None
    peak_ratio: float | None = None
    values: tuple[float, ...] | None = None
    reconstruction: tuple[float, ...] | None = None
    score: float | None = None
    attribution: Attribution = ()
    peak_attribution: Attribution = ()
    fields: tuple[str, ...] = ()

    @property
    def dedupe_key(self) -> str:
        """``series id|kind|window end``: the same transition always gets the same key.

        Examples
        --------
        >>> Transition("anomalous", "ekg|patient=p1", "ekg", (("patient", "p1"),), "m", 0, 31, 1.0).dedupe_key
        'ekg|patient=p1|anomalous|31'
        """
        return f"{self.series_id}|{self.kind}|{self.end_ns}"

    @property
    def series(self) -> str:
        """The series' tags as ``k=v,k=v``."""
        return tags_str(self.tags)

    @property
    def multi_field(self) -> bool:
        """Whether the transition comes from a signal of several fields (as far as it tells)."""
        return len(self.attribution) > 1 or len(self.peak_attribution) > 1 or bool(self.fields)

    def columns(self) -> list[tuple[str, tuple[float, ...], tuple[float, ...] | None]]:
        """``(field, values, reconstruction)`` per plotted field of a multi-field transition (empty for a single
        field, or when the samples do not fit ``fields``).

        Examples
        --------
        >>> t = Transition("anomalous", "h|", "h", (), "m", 0, 2, 1.0, fields=("cpu", "mem"),
        ...                values=(1.0, 2.0, 3.0, 4.0), reconstruction=(0.0, 0.0, 1.0, 1.0))
        >>> t.columns()
        [('cpu', (1.0, 2.0), (0.0, 0.0)), ('mem', (3.0, 4.0), (1.0, 1.0))]
        """
        n = len(self.fields)
        if not n or self.values is None or not self.values or len(self.values) % n:
            return []
        w = len(self.values) // n
        rec = self.reconstruction if self.reconstruction is not None and len(self.reconstruction) == n * w else None
        return [(f, self.values[i * w:(i + 1) * w], None if rec is None else rec[i * w:(i + 1) * w])
                for i, f in enumerate(self.fields)]

    def to_dict(self) -> dict[str, Any]:
        """A JSON-serialisable dict (see :meth:`from_dict`)."""
        d = asdict(self)
        d["tags"] = [list(t) for t in self.tags]
        for k in ("values", "reconstruction"):
            if d[k] is not None:
                d[k] = [None if not math.isfinite(v) else v for v in d[k]]
        d["attribution"] = _attribution_json(self.attribution)
        d["peak_attribution"] = _attribution_json(self.peak_attribution)
        d["fields"] = list(self.fields)
        return d

    @classmethod
    def from_dict(cls, d: Mapping[str, Any]) -> Transition:
        """Inverse of :meth:`to_dict`."""
        if d.get("kind") not in KINDS:
            raise ValueError(f"unknown transition kind {d.get('kind')!r}; expected one of {', '.join(KINDS)}")

        def arr(v: Any) -> tuple[float, ...] | None:
            return None if v is None else tuple(math.nan if x is None else float(x) for x in v)

        return cls(kind=str(d["kind"]), series_id=str(d["series_id"]), signal=str(d["signal"]),
                   tags=tuple((str(k), str(v)) for k, v in d["tags"]), model_id=str(d["model_id"]),
                   start_ns=int(d["start_ns"]), end_ns=int(d["end_ns"]), threshold=float(d["threshold"]),
                   max_error=_opt_float(d.get("max_error")), ratio=_opt_float(d.get("ratio")),
                   n_missing=int(d.get("n_missing", 0)), since_ns=_opt_int(d.get("since_ns")),
                   windows=int(d.get("windows", 0)), peak_error=_opt_float(d.get("peak_error")),
                   peak_ratio=_opt_float(d.get("peak_ratio")), values=arr(d.get("values")),
                   reconstruction=arr(d.get("reconstruction")), score=_opt_float(d.get("score")),
                   attribution=_attribution_from_json(d.get("attribution")),
                   peak_attribution=_attribution_from_json(d.get("peak_attribution")),
                   fields=tuple(str(f) for f in d.get("fields") or ()))


def _opt_float(v: Any) -> float | None:
    return None if v is None else float(v)


def _opt_int(v: Any) -> int | None:
    return None if v is None else int(v)


def _floats(a: Any) -> tuple[float, ...] | None:
    return None if a is None else tuple(float(v) for v in a)


def _finite_or_none(v: float | None) -> float | None:
    return None if v is None or not math.isfinite(v) else v


def _attribution_json(a: Attribution) -> list[list[Any]]:
    return [[f, _finite_or_none(share), d, _finite_or_none(v)] for f, share, d, v in a]


def _attribution_from_json(raw: Any) -> Attribution:
    """The attribution of a transition or series state read back from JSON (lists; ``null`` for non-finite)."""
    out = []
    for f, share, d, v in raw or ():
        out.append((str(f), math.nan if share is None else float(share), 1 if float(d) >= 0 else -1,
                    _opt_float(v)))
    return tuple(out)


def _share_key(share: float) -> float:
    return -share if math.isfinite(share) else math.inf


def attribution_of(shares: Sequence[FieldShare]) -> Attribution:
    """A window's attribution as a transition keeps it: the `MAX_ATTRIBUTION` largest shares, largest first,
    directions as +1/-1 and non-finite values as None.

    Examples
    --------
    >>> attribution_of([FieldShare("mem", 0.2, -3, 3.5), FieldShare("cpu", 0.8, 1, float("nan"))])
    (('cpu', 0.8, 1, None), ('mem', 0.2, -1, 3.5))
    """
    ranked = sorted(shares, key=lambda s: _share_key(float(s.share)))[:MAX_ATTRIBUTION]
    return tuple((str(s.field), float(s.share), 1 if s.direction >= 0 else -1,
                  None if s.value is None else _finite_or_none(float(s.value))) for s in ranked)


def _window_samples(r: WindowResult) -> tuple[tuple[str, ...], tuple[float, ...] | None, tuple[float, ...] | None]:
    """``(fields, values, reconstruction)`` of a transition from the window ``r`` (see :class:`Transition`).

    A 1-D window (one field) is kept whole. Of a ``(window, fields)`` window only the columns of the
    `MAX_PLOTTED_FIELDS` fields with the largest shares are kept, concatenated field by field (the first columns
    when the window has no attribution).
    """
    v, u = r.values, r.reconstruction
    if v is None or np.ndim(v) <= 1:
        return (), _floats(v), _floats(u) if u is None or np.ndim(u) <= 1 else None
    va = np.asarray(v, dtype=np.float64)
    ua = None if u is None else np.asarray(u, dtype=np.float64)
    if ua is not None and ua.shape != va.shape:
        ua = None
    if va.ndim != 2:
        log.debug("window of %s has values shaped %s; not kept for the alert", r.key, va.shape)
        return (), None, None
    names = tuple(r.fields)
    if len(names) != va.shape[1]:
        if va.shape[1] == 1:  # one column without a name: a single field
            return (), _floats(va[:, 0]), None if ua is None else _floats(ua[:, 0])
        log.debug("window of %s has %d columns but names %d fields; samples not kept for the alert", r.key,
                  va.shape[1], len(names))
        return (), None, None
    ranked = sorted((s for s in r.attribution if s.field in names), key=lambda s: _share_key(float(s.share)))
    chosen = [s.field for s in ranked][:MAX_PLOTTED_FIELDS] or list(names[:MAX_PLOTTED_FIELDS])
    cols = [names.index(f) for f in chosen]
    values = tuple(float(x) for c in cols for x in va[:, c])
    recon = None if ua is None else tuple(float(x) for c in cols for x in ua[:, c])
    return tuple(chosen), values, recon


@dataclass
class SeriesState:
    """The persisted alert state of one series."""

    status: str = "OK"
    above: int = 0
    below: int = 0
    last_end_ns: int = -1
    since_ns: int | None = None
    windows: int = 0
    peak_error: float | None = None
    peak_ratio: float | None = None
    last_notified_wall_ns: int | None = None
    data_missing: bool = False
    #: A deadman alert was raised: the series stopped writing windows (cleared, with ``resumed``, by the next one).
    dead: bool = False
    #: The attribution of the episode's worst window (`Transition.attribution`'s entries as lists); not saved
    #: when empty.
    peak_attribution: list[list[Any]] = field(default_factory=list)


    def to_dict(self) -> dict[str, Any]:
        """The state as saved; without ``peak_attribution`` when empty, so that the state of series outside an
        episode reads as before multi-field signals (also by older versions)."""
        d = asdict(self)
        if not self.peak_attribution:
            del d["peak_attribution"]
        return d

    @classmethod
    def from_dict(cls, d: Mapping[str, Any]) -> SeriesState:
        """Inverse of :meth:`to_dict`; keys this version does not know (written by a newer one) are dropped
        rather than refused."""
        known = {f.name for f in dataclass_fields(cls)}
        return cls(**{k: v for k, v in d.items() if k in known})


def step(cfg: AlertsConfig, st: SeriesState, r: WindowResult, now_ns: int) -> list[Transition]:
    """Move the series state ``st`` on by its next window ``r`` (``now_ns``: wall time, spacing reminders);
    the transitions this causes, in order."""
    out: list[Transition] = []

    def make(kind: str) -> Transition:
        fields, values, recon = _window_samples(r)
        return Transition(
            kind=kind, series_id=r.key.id, signal=r.key.signal, tags=tuple(sorted(r.key.tags)),
            model_id=r.model_id, start_ns=r.start_ns, end_ns=r.end_ns, threshold=float(r.threshold),
            max_error=None if r.max_error is None else float(r.max_error), ratio=r.ratio,
            n_missing=int(r.n_missing), since_ns=st.since_ns, windows=st.windows,
            peak_error=st.peak_error, peak_ratio=st.peak_ratio, values=values, reconstruction=recon,
            score=None if r.score is None or not math.isfinite(r.score) else float(r.score),
            attribution=attribution_of(r.attribution), peak_attribution=_attribution_from_json(st.peak_attribution),
            fields=fields)

    def peak() -> None:
        st.peak_error, st.peak_ratio = r.max_error, r.ratio
        st.peak_attribution = _attribution_json(attribution_of(r.attribution))

    st.last_end_ns = r.end_ns
    if st.dead:
        st.dead = False
        out.append(make(RESUMED))
    if r.missing:
        if cfg.missing_data and not st.data_missing:
            st.data_missing = True
            out.append(make(MISSING))
        return out
    if st.data_missing:
        st.data_missing = False
        if cfg.missing_data:
            out.append(make(RESUMED))
    if st.status == "OK":
        if r.anomalous:
            st.above += 1
            if st.above >= cfg.for_windows:
                st.status, st.below, st.since_ns = "ANOMALOUS", 0, r.end_ns
                st.windows = st.above
                peak()
                st.last_notified_wall_ns = now_ns
                out.append(make(ANOMALOUS))
        else:
            st.above = 0
        return out
    # ANOMALOUS
    if r.anomalous:
        st.below = 0
        st.windows += 1
        if r.ratio is not None and (st.peak_ratio is None or r.ratio > st.peak_ratio):
            peak()
        repeat_ns = int(cfg.repeat_every_s * 1e9)
        last = st.last_notified_wall_ns
        if repeat_ns > 0 and (last is None or now_ns - last >= repeat_ns):
            st.last_notified_wall_ns = now_ns
            out.append(make(REMINDER))
    else:
        st.below += 1
        if st.below >= cfg.recover_windows:
            out.append(make(RECOVERED))
            st.status, st.above, st.below, st.since_ns = "OK", 0, 0, None
            st.windows, st.peak_error, st.peak_ratio, st.last_notified_wall_ns = 0, None, None, None
            st.peak_attribution = []
    return out


def apply(cfg: AlertsConfig, states: dict[str, SeriesState], results: Sequence[WindowResult],
          now_ns: int) -> list[Transition]:
    """:func:`step` every series of ``states`` (by series id; a new series starts OK) through ``results``, in
    time order; windows at or before the last one observed for their series are skipped."""
    transitions: list[Transition] = []
    for r in sorted(results, key=lambda r: (r.end_ns, r.key.id)):
        st = states.setdefault(r.key.id, SeriesState())
        if r.end_ns <= st.last_end_ns:
            continue  # already observed (a re-scored window after a restart)
        transitions += step(cfg, st, r, now_ns)
    return transitions


def deadman(states: dict[str, SeriesState], series: Sequence[tuple[SeriesKey, str, int, int]]) -> list[Transition]:
    """One ``deadman`` transition for each series that stopped writing windows.

    ``series`` holds ``(key, model id, start of its last window, end of its last window)`` of the series whose
    last window ended more than ``deadman_s`` ago; a series already flagged, or observed past that window, is
    skipped. Its next window brings a ``resumed`` transition (:func:`step`).
    """
    out = []
    for key, model_id, start_ns, end_ns in series:
        st = states.setdefault(key.id, SeriesState())
        if st.dead or st.last_end_ns > end_ns:
            continue
        st.dead = True
        st.last_end_ns = max(st.last_end_ns, end_ns)
        out.append(Transition(kind=DEADMAN, series_id=key.id, signal=key.signal, tags=tuple(sorted(key.tags)),
                              model_id=model_id, start_ns=start_ns, end_ns=end_ns, threshold=0.0, since_ns=end_ns))
    return out
