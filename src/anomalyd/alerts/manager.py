"""Alert policy and delivery: a per-series state machine, a persistent outbox, and the log and Slack sinks.

Policy, per series (``SeriesKey.id``), over the scored windows in time order of their last sample:

- OK → ANOMALOUS after ``for_windows`` consecutive anomalous windows: one ``anomalous`` alert;
- ANOMALOUS → OK after ``recover_windows`` consecutive normal windows: one ``recovered`` alert;
- while ANOMALOUS, a ``reminder`` at most every ``repeat_every`` of wall time (0 turns reminders off);
- with ``missing_data`` on, a ``missing`` alert when a series' windows start coming back as missing data and a
  ``resumed`` alert when scored windows come back. Missing windows neither count as anomalous nor as normal;
- a ``deadman`` alert (Kapacitor's name) when a series' newest written window is older than ``deadman_s``
  (the worker asks, see :meth:`AlertManager.silent`), and a ``resumed`` alert when its windows come back.

Delivery is at-least-once and deduplicated: every transition has a dedupe key (series id, kind, window end),
is written to ``state_dir/outbox/`` (one file per transition and sink, fsynced) and the per-series state to
``state_dir/alerts.json`` (atomic replace) before anything is sent. A delivered item is removed, or kept as a
``.sent`` marker until the state file covers its window, so that re-observing windows after a crash cannot
enqueue it again. Windows at or before the last one observed for a series are ignored. A failed send stays
queued for the next :meth:`AlertManager.flush`; a message Slack rejects as malformed is moved to
``outbox/rejected/`` so it cannot block the queue. The one remaining duplicate is a send that reached Slack
just before a crash, before its outbox file was retired.

Secrets (the webhook URL and the bot token) never reach a log record: slack-sdk's own logging goes through a
logger kept at WARNING with a filter that masks them, and errors are reported without URLs.
"""

from __future__ import annotations

import contextlib
import fcntl
import hashlib
import io
import json
import logging
import math
import os
import random
import re
import threading
import time
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import asdict, dataclass, field
from dataclasses import fields as dataclass_fields
from datetime import UTC, datetime
from pathlib import Path
from typing import Any, cast
from urllib.parse import quote

import numpy as np
from slack_sdk import WebClient
from slack_sdk.errors import SlackApiError
from slack_sdk.http_retry.builtin_handlers import (
    ConnectionErrorRetryHandler,
    RateLimitErrorRetryHandler,
    ServerErrorRetryHandler,
)
from slack_sdk.http_retry.builtin_interval_calculators import BackoffRetryIntervalCalculator
from slack_sdk.http_retry.handler import RetryHandler
from slack_sdk.http_retry.jitter import Jitter
from slack_sdk.http_retry.request import HttpRequest
from slack_sdk.http_retry.response import HttpResponse
from slack_sdk.http_retry.state import RetryState
from slack_sdk.webhook import WebhookClient

from ..config import AlertsConfig, SlackConfig
from ..core.records import FieldShare, SeriesKey, Tags, WindowResult, tags_str
from ..files import atomic_write, fsync_dir
from ..telemetry import ALERTS, ALERTS_QUEUED

log = logging.getLogger(__name__)

ANOMALOUS = "anomalous"
RECOVERED = "recovered"
REMINDER = "reminder"
MISSING = "missing"
RESUMED = "resumed"
DEADMAN = "deadman"
KINDS = (ANOMALOUS, RECOVERED, REMINDER, MISSING, RESUMED, DEADMAN)
STATE_VERSION = 1
_SINK_NAME_RE = re.compile(r"^[a-z0-9_]+$")
#: A window's attribution as a transition keeps it: ``(field, share, direction +1/-1, value or None)``, largest
#: share first (see :class:`anomalyd.core.records.FieldShare`).
Attribution = tuple[tuple[str, float, int, float | None], ...]
#: At most this many fields of a window's attribution go into a transition (and its outbox item).
MAX_ATTRIBUTION = 5
#: At most this many fields' samples go into a transition (the fields with the largest shares): its plot panels.
MAX_PLOTTED_FIELDS = 3
#: At most this many fields are named in a message.
MAX_NAMED_FIELDS = 3
_SENT_RETENTION_S = 7 * 86400
# Slack errors caused by the message itself: retrying the same payload cannot succeed.
_REJECTED_ERRORS = {"invalid_blocks", "invalid_blocks_format", "invalid_arguments", "msg_too_long",
                    "invalid_payload", "no_text", "too_many_attachments"}


class AlertStateError(ValueError):
    """The alert state file or an outbox item exists but cannot be used."""


class DeliveryError(RuntimeError):
    """A sink could not deliver an alert now; it stays queued.

    ``retry_after_s`` asks to wait that long before trying that sink again.
    """

    def __init__(self, message: str, retry_after_s: float | None = None) -> None:
        super().__init__(message)
        self.retry_after_s = retry_after_s


class AlertRejectedError(DeliveryError):
    """The receiver refused the message itself (e.g. malformed blocks): retrying it cannot succeed."""


# ---------------------------------------------------------------------------------------------------------
# Transitions and their messages


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


def iso_utc(ns: int) -> str:
    """Epoch nanoseconds as an ISO 8601 UTC time, with milliseconds only when they are not zero.

    Examples
    --------
    >>> iso_utc(0)
    '1970-01-01T00:00:00Z'
    >>> iso_utc(1_500_000_000)
    '1970-01-01T00:00:01.500Z'
    """
    dt = datetime.fromtimestamp(ns // 10**9, UTC).replace(microsecond=(ns % 10**9) // 1000)
    spec = "seconds" if dt.microsecond == 0 else "milliseconds"
    return dt.isoformat(timespec=spec).replace("+00:00", "Z")


def _num(v: float | None) -> str:
    return "n/a" if v is None else f"{v:.4g}"


def dashboard_link(template: str, t: Transition) -> str | None:
    """Fill the dashboard URL template for the transition's series and time, or None without a template.

    Placeholders: ``{signal}``, ``{series}`` (``k=v,k=v``), ``{model}`` (URL-encoded) and ``{from_ms}``,
    ``{to_ms}`` (epoch milliseconds: the window, or the whole episode for a recovery, padded by one window
    length on each side).

    Examples
    --------
    >>> t = Transition("anomalous", "ekg|patient=p1", "ekg", (("patient", "p1"),), "m", 10_000_000_000,
    ...                20_000_000_000, 1.0)
    >>> dashboard_link("http://g/d/x?var-series={series}&from={from_ms}&to={to_ms}", t)
    'http://g/d/x?var-series=patient%3Dp1&from=0&to=30000'
    """
    if not template:
        return None
    pad = max(t.end_ns - t.start_ns, 0)
    start = t.since_ns - pad if t.kind == RECOVERED and t.since_ns is not None else t.start_ns
    values = {"signal": quote(t.signal, safe=""), "series": quote(t.series, safe=""),
              "model": quote(t.model_id, safe=""), "from_ms": str((start - pad) // 10**6),
              "to_ms": str((t.end_ns + pad) // 10**6)}
    try:
        return template.format_map(values)
    except (KeyError, IndexError, ValueError) as exc:
        log.warning("alerts.dashboard_url %r cannot be filled (%s); use only the placeholders {signal}, "
                    "{series}, {model}, {from_ms} and {to_ms}", template, exc)
        return None


_TITLES = {ANOMALOUS: ("ANOMALY", ":rotating_light:"), RECOVERED: ("RECOVERED", ":white_check_mark:"),
           REMINDER: ("STILL ANOMALOUS", ":warning:"), MISSING: ("MISSING DATA", ":grey_question:"),
           RESUMED: ("DATA RESUMED", ":arrow_forward:"), DEADMAN: ("NO DATA", ":skull:")}


def _windows(n: int) -> str:
    return f"{n} anomalous window{'' if n == 1 else 's'}"


def _mrkdwn_escape(s: str) -> str:
    return s.replace("&", "&amp;").replace("<", "&lt;").replace(">", "&gt;")


def _arrow(direction: int) -> str:
    return "up" if direction >= 0 else "down"


def _pct(share: float) -> str:
    return f"{share:.0%}" if math.isfinite(share) else "n/a"


def describe_attribution(a: Attribution, values: bool = True, top: int = MAX_NAMED_FIELDS) -> str:
    """The ``top`` fields of an attribution as one line of plain text.

    Examples
    --------
    >>> a = (("cpu.usage_user", 0.62, 1, 97.1), ("mem.used_percent", 0.21, -1, 3.2), ("disk", 0.17, 1, None))
    >>> describe_attribution(a[:2])
    'cpu.usage_user up (62%, value 97.1), mem.used_percent down (21%, value 3.2)'
    >>> describe_attribution(a, values=False)
    'cpu.usage_user up 62%, mem.used_percent down 21%, disk up 17%'
    """
    if values:
        return ", ".join(f"{f} {_arrow(d)} ({_pct(sh)}" + ("" if v is None else f", value {_num(v)}") + ")"
                         for f, sh, d, v in a[:top])
    return ", ".join(f"{f} {_arrow(d)} {_pct(sh)}" for f, sh, d, _ in a[:top])


def _mrkdwn_field(name: str) -> str:
    """A field's name as inline code in mrkdwn (escaped; a backtick would end the code span)."""
    return "`" + _mrkdwn_escape(name).replace("`", "'") + "`"


def _mrkdwn_attribution(a: Attribution, values: bool = True, top: int = MAX_NAMED_FIELDS) -> str:
    lines = []
    for f, sh, d, v in a[:top]:
        value = "" if v is None or not values else f", value {_num(v)}"
        lines.append(f"• {_mrkdwn_field(f)} *{_arrow(d)}* {_pct(sh)}{value}")
    return "\n".join(lines)


def format_message(t: Transition, dashboard_template: str = "") -> tuple[str, list[dict[str, Any]]]:
    """The fallback text and the Block Kit blocks of a transition's message.

    An anomaly or reminder of a multi-field signal names its top fields (direction, share and newest value);
    of a single field, the direction of its deviation. A recovery of a multi-field signal names the top fields
    of the episode's worst window.

    Examples
    --------
    >>> t = Transition("anomalous", "ekg|patient=p1", "ekg", (("patient", "p1"),), "ekg-1", 0, 31 * 10**9,
    ...                1.5, max_error=3.0, ratio=2.0, windows=1)
    >>> print(format_message(t)[0])
    ANOMALY ekg [patient=p1]: max error 3 vs threshold 1.5 (ratio 2) in window 1970-01-01T00:00:00Z .. \
1970-01-01T00:00:31Z, model ekg-1
    """
    title, emoji = _TITLES[t.kind]
    series = t.series or "(no tags)"
    window = f"{iso_utc(t.start_ns)} .. {iso_utc(t.end_ns)}"
    link = dashboard_link(dashboard_template, t)
    if t.kind == DEADMAN:
        what = f"no window written since {iso_utc(t.end_ns)} (the last window was {window})"
    elif t.kind in (MISSING, RESUMED):
        what = (f"{t.n_missing} missing samples in window {window}" if t.kind == MISSING
                else f"scored again from window {window}")
    else:
        score = "" if t.score is None else f"score {t.score:.2f}; "
        what = (f"{score}max error {_num(t.max_error)} vs threshold {_num(t.threshold)} (ratio {_num(t.ratio)}) "
                f"in window {window}")
        if t.kind == RECOVERED and t.since_ns is not None:
            what += (f"; anomalous since {iso_utc(t.since_ns)} ({_windows(t.windows)}, "
                     f"peak error {_num(t.peak_error)}, ratio {_num(t.peak_ratio)})")
        elif t.kind == REMINDER and t.since_ns is not None:
            what += f"; anomalous since {iso_utc(t.since_ns)} ({_windows(t.windows)})"
    raised = t.kind in (ANOMALOUS, REMINDER)
    multi = t.multi_field
    text = f"{title} {t.signal} [{series}]: {what}, model {t.model_id}"
    if raised and t.attribution:
        text += (f"; top fields: {describe_attribution(t.attribution)}" if multi
                 else f"; direction {_arrow(t.attribution[0][2])}")
    elif t.kind == RECOVERED and multi and t.peak_attribution:
        text += f"; peak top fields: {describe_attribution(t.peak_attribution, values=False)}"
    if link:
        text += f"; dashboard: {link}"

    esc = _mrkdwn_escape
    fields = [f"*Signal*\n{esc(t.signal)}", f"*Series*\n`{esc(series)}`"]
    if t.kind == DEADMAN:
        fields.append(f"*No data since*\n{iso_utc(t.end_ns)}")
    elif t.kind in (MISSING, RESUMED):
        fields.append(f"*Missing samples*\n{t.n_missing}")
    else:
        fields += ([] if t.score is None else [f"*Score*\n{t.score:.2f}"])
        fields += [f"*Max error / threshold*\n{_num(t.max_error)} / {_num(t.threshold)}",
                   f"*Ratio*\n{_num(t.ratio)}"]
        if raised and t.attribution and not multi:
            fields.append(f"*Direction*\n{_arrow(t.attribution[0][2])}")
    fields += [f"*Window (UTC)*\n{iso_utc(t.start_ns)}\n{iso_utc(t.end_ns)}", f"*Model*\n`{esc(t.model_id)}`"]
    if t.kind in (RECOVERED, REMINDER) and t.since_ns is not None:
        fields.append(f"*Anomalous since*\n{iso_utc(t.since_ns)} ({_windows(t.windows)})")
    blocks: list[dict[str, Any]] = [
        {"type": "header", "text": {"type": "plain_text", "emoji": True,
                                    "text": f"{emoji} {title}: {t.signal} [{series}]"[:150]}},
        {"type": "section", "fields": [{"type": "mrkdwn", "text": f[:2000]} for f in fields[:10]]},
    ]
    if multi and raised and t.attribution:
        blocks.append({"type": "section", "text": {
            "type": "mrkdwn", "text": f"*Top fields*\n{_mrkdwn_attribution(t.attribution)}"[:3000]}})
    elif multi and t.kind == RECOVERED and t.peak_attribution:
        blocks.append({"type": "section", "text": {
            "type": "mrkdwn",
            "text": f"*Peak top fields*\n{_mrkdwn_attribution(t.peak_attribution, values=False)}"[:3000]}})
    if link:
        blocks.append({"type": "actions", "elements": [
            {"type": "button", "text": {"type": "plain_text", "text": "Open dashboard"},
             "url": link[:3000]}]})
    blocks.append({"type": "context", "elements": [
        {"type": "mrkdwn", "text": f"anomalyd · {t.kind} · `{esc(t.dedupe_key)}`"[:3000]}]})
    return text, blocks


def plot_error(t: Transition) -> list[float] | None:
    """Per sample, the quantity ``max_error`` is the maximum of and ``threshold`` applies to: the absolute
    difference between the tapered window and the nearest (tapered) shape, ``|(x - mean) * taper - c|`` in the
    series' units.

    ``values`` are the raw samples ``x`` and ``reconstruction`` the shape un-tapered, ``u = c / taper + mean``
    (`anomalyd.core.detector.Detector.shape`), so the difference is ``taper * |x - u|``: the mean cancels. It is NaN
    where ``u`` is (the ends, where the taper is ~0 and contributes next to nothing) and where a sample is
    missing. None when the transition carries no samples, or several fields (each field's error is scaled by
    the detector, see :func:`plot_figure`).

    Examples
    --------
    >>> t = Transition("anomalous", "s|", "s", (), "m", 0, 4, 1.0, values=(9.0, 2.0, 3.0, 2.0, 9.0),
    ...                reconstruction=(math.nan, 1.0, 1.0, 1.0, math.nan))
    >>> [round(v, 3) for v in plot_error(t)]
    [nan, 0.5, 2.0, 0.5, nan]
    """
    if t.fields or t.values is None or t.reconstruction is None or len(t.values) != len(t.reconstruction):
        return None
    from ..core.model import taper

    tap = taper(len(t.values)).tolist()
    return [w * abs(a - b) for w, a, b in zip(tap, t.values, t.reconstruction, strict=True)]


def _decision(t: Transition) -> str:
    """The detector's decision on the transition's window, in words."""
    return "anomalous" if t.kind in (ANOMALOUS, REMINDER) else "normal"


def _plain(s: str) -> str:
    """Text for a matplotlib title or label: a ``$`` would start math mode."""
    return s.replace("$", r"\$")


def _headline(t: Transition) -> str:
    score = "score n/a" if t.score is None else f"score {t.score:.2f}"
    return _plain(f"{t.signal} [{t.series}]: {score} -> {_decision(t)}\n"
                  f"max error {_num(t.max_error)} / threshold {_num(t.threshold)} = {_num(t.ratio)}")


def plot_figure(t: Transition) -> Any:
    """The figure of :func:`render_plot` (a matplotlib ``Figure``), or None without samples.

    One field: top, the window and its reconstruction (the nearest shape, un-tapered); bottom,
    :func:`plot_error`, the tapered difference whose maximum is ``max_error``, against ``threshold``. The title
    gives the score (the decision's input), the decision, and max_error against its threshold.

    Several fields: one panel per plotted field (``Transition.fields``: the window's largest shares), its samples
    against its reconstruction, titled with the field's name, direction and share; the last panel is each
    field's error against ``threshold``. A field's error is the detector's (scaled so that fields compare, its
    maximum over the fields is ``max_error``), derived from the shares: ``max_error * share / top share``.
    """
    if t.fields:
        return _plot_fields(t)
    err = plot_error(t)
    if err is None or t.values is None or t.reconstruction is None:
        return None
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    n = len(t.values)
    step_s = (t.end_ns - t.start_ns) / 1e9 / max(n - 1, 1)
    x = [i * step_s for i in range(n)]
    fig = Figure(figsize=(6.0, 3.8), dpi=100)
    FigureCanvasAgg(fig)
    top, bottom = fig.subplots(2, 1, sharex=True, gridspec_kw={"height_ratios": [2, 1]})
    top.plot(x, t.values, color="#1f77b4", lw=1.4, label="window")
    top.plot(x, t.reconstruction, color="#ff7f0e", lw=1.2, ls="--", label="reconstruction")
    top.legend(loc="upper right", fontsize=7)
    top.set_title(_headline(t), fontsize=8)
    bottom.plot(x, err, color="#d62728", lw=1.0, label="|tapered difference|")
    bottom.axhline(t.threshold, color="black", ls=":", lw=1.0, label=f"threshold {_num(t.threshold)}")
    bottom.legend(loc="upper right", fontsize=7)
    bottom.set_xlabel(f"seconds from {iso_utc(t.start_ns)}", fontsize=7)
    for ax in (top, bottom):
        ax.tick_params(labelsize=7)
    fig.tight_layout()
    return fig


def _plot_fields(t: Transition) -> Any:
    """:func:`plot_figure` of a multi-field transition."""
    cols = [(f, v, u) for f, v, u in t.columns() if u is not None]
    if not cols:
        return None
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    n = len(cols[0][1])
    step_s = (t.end_ns - t.start_ns) / 1e9 / max(n - 1, 1)
    x = [i * step_s for i in range(n)]
    fig = Figure(figsize=(6.0, 1.5 * len(cols) + 2.1), dpi=100, layout="constrained")
    FigureCanvasAgg(fig)
    axes = list(fig.subplots(len(cols) + 1, 1, gridspec_kw={"height_ratios": [2] * len(cols) + [1.5]}))
    shares = {f: (sh, d) for f, sh, d, _ in t.attribution}
    for ax, (name, v, u) in zip(axes, cols, strict=False):
        ax.plot(x, v, color="#1f77b4", lw=1.4, label="window")
        ax.plot(x, u, color="#ff7f0e", lw=1.2, ls="--", label="reconstruction")
        sh, d = shares.get(name, (math.nan, 0))
        what = "" if name not in shares else f": {_arrow(d)}, {_pct(sh)} of the error"
        ax.set_title(_plain(f"{name}{what}"), fontsize=8, loc="left")
        ax.tick_params(labelsize=7)
    axes[0].legend(loc="upper right", fontsize=7)
    axes[len(cols) - 1].set_xlabel(f"seconds from {iso_utc(t.start_ns)}", fontsize=7)
    fig.suptitle(_headline(t), fontsize=8)
    err_ax = axes[-1]
    a = t.attribution
    top_share = a[0][1] if a else math.nan
    scale = t.max_error / top_share if t.max_error is not None and math.isfinite(top_share) and top_share > 0 \
        else None
    scaled = scale is not None
    names = [_plain(f) for f, *_ in a][::-1]  # the largest share at the top
    heights = [sh if scale is None else sh * scale for _, sh, _, _ in a][::-1]
    colors = ["#d62728" if d >= 0 else "#1f77b4" for _, _, d, _ in a][::-1]
    if a:
        bars = err_ax.barh(names, [h if math.isfinite(h) else 0.0 for h in heights], color=colors, height=0.6)
        err_ax.bar_label(bars, labels=[f"{_arrow(d)} {_pct(sh)}" for _, sh, d, _ in a][::-1], fontsize=7,
                         padding=2)
    if scaled:
        err_ax.axvline(t.threshold, color="black", ls=":", lw=1.0, label=f"threshold {_num(t.threshold)}")
        err_ax.legend(loc="lower right", fontsize=7)
        err_ax.set_title("field error (red: up, blue: down; labels: share of the window's error)", fontsize=8,
                         loc="left")
    else:
        err_ax.set_title("share of the window's error (red: up, blue: down)", fontsize=8, loc="left")
    err_ax.margins(x=0.25)
    err_ax.tick_params(labelsize=7)
    return fig


def render_plot(t: Transition) -> bytes | None:
    """A small PNG of :func:`plot_figure`: the window against its reconstruction, and the per-sample tapered
    difference (what ``max_error`` is the maximum of) against the threshold; for several fields, a panel per
    plotted field and the fields' errors against the threshold.

    Returns None when the transition carries no samples (missing data).
    """
    fig = plot_figure(t)
    if fig is None:
        return None
    buf = io.BytesIO()
    fig.savefig(buf, format="png")
    return buf.getvalue()


# ---------------------------------------------------------------------------------------------------------
# Sinks


class Sink:
    """Where alerts go. ``send`` delivers one transition before ``deadline`` (``time.monotonic()`` seconds) or
    raises :class:`DeliveryError` (stays queued) / :class:`AlertRejectedError` (dead-lettered)."""

    name = "sink"

    def send(self, t: Transition, deadline: float) -> None:
        """Deliver ``t``.

        Parameters
        ----------
        t
            The transition to announce.
        deadline
            ``time.monotonic()`` value by which the send must be over, retries included.

        Raises
        ------
        DeliveryError
            Not delivered now; the alert stays queued (``retry_after_s`` asks for a pause).
        AlertRejectedError
            The receiver refuses this message for good; it is moved to ``outbox/rejected/``.
        """
        raise NotImplementedError


class LogSink(Sink):
    """Writes each alert's text to the ``anomalyd.alerts.manager`` logger (WARNING when raised, INFO otherwise)."""

    name = "log"

    def __init__(self, dashboard_url: str = "") -> None:
        self.dashboard_url = dashboard_url

    def send(self, t: Transition, deadline: float) -> None:
        text, _ = format_message(t, self.dashboard_url)
        level = logging.WARNING if t.kind in (ANOMALOUS, REMINDER, MISSING) else logging.INFO
        log.log(level, "alert: %s", text)


class _RedactSecrets(logging.Filter):
    """Masks registered secrets in records of slack-sdk's logger (which can print URLs)."""

    def __init__(self) -> None:
        super().__init__()
        self.secrets: set[str] = set()

    def add(self, secret: str) -> None:
        if secret:
            self.secrets.add(secret)

    def redact(self, text: str) -> str:
        for s in sorted(self.secrets, key=len, reverse=True):
            text = text.replace(s, "***")
        return text

    def filter(self, record: logging.LogRecord) -> bool:
        if self.secrets:
            record.msg = self.redact(record.getMessage())
            record.args = None
        return True


# slack-sdk logs request URLs (an incoming-webhook URL is a secret) at DEBUG/INFO whenever its logger's own
# level is NOTSET; hand it a logger of ours that stays at WARNING and masks secrets in what remains.
_SDK_LOG = logging.getLogger("anomalyd.alerts.manager.slack_sdk")
_SDK_LOG.setLevel(logging.WARNING)
_REDACT = _RedactSecrets()
_SDK_LOG.addFilter(_REDACT)


@dataclass
class _Budget:
    """Time left for one send: the HTTP timeout per attempt and the deadline for all attempts."""

    deadline: float
    attempt_timeout: float
    retry_after_s: float | None = None

    def fits(self, sleep_s: float) -> bool:
        return time.monotonic() + sleep_s + self.attempt_timeout <= self.deadline


class _BoundedRetry(RetryHandler):
    """Retry only when the backoff sleep plus another attempt still fit in the send's deadline."""

    budget: _Budget
    _sleep_s: float = 0.0

    def _bounded(self, state: RetryState) -> bool:
        self._sleep_s = self.interval_calculator.calculate_sleep_duration(state.current_attempt)
        return self.budget.fits(self._sleep_s)

    def prepare_for_next_attempt(self, *, state: RetryState, request: HttpRequest,
                                 response: HttpResponse | None = None,
                                 error: Exception | None = None) -> None:
        state.next_attempt_requested = True
        time.sleep(self._sleep_s)
        state.increment_current_attempt()


class _ConnectionRetry(_BoundedRetry, ConnectionErrorRetryHandler):
    def __init__(self, budget: _Budget, max_retry_count: int) -> None:
        ConnectionErrorRetryHandler.__init__(self, max_retry_count, _backoff())
        self.budget = budget

    def _can_retry(self, *, state: RetryState, request: HttpRequest, response: HttpResponse | None = None,
                   error: Exception | None = None) -> bool:
        return (ConnectionErrorRetryHandler._can_retry(self, state=state, request=request, response=response,
                                                       error=error) and self._bounded(state))


class _ServerErrorRetry(_BoundedRetry, ServerErrorRetryHandler):
    """Retries every 5xx (slack-sdk's own handler only 500 and 503)."""

    def __init__(self, budget: _Budget, max_retry_count: int) -> None:
        ServerErrorRetryHandler.__init__(self, max_retry_count, _backoff())
        self.budget = budget

    def _can_retry(self, *, state: RetryState, request: HttpRequest, response: HttpResponse | None = None,
                   error: Exception | None = None) -> bool:
        return response is not None and response.status_code >= 500 and self._bounded(state)


class _RateLimitRetry(RateLimitErrorRetryHandler):
    """Honours Retry-After when the wait fits in the deadline; otherwise gives up and reports the wait."""

    def __init__(self, budget: _Budget, max_retry_count: int) -> None:
        super().__init__(max_retry_count)
        self.budget = budget
        self._sleep_s = 1.0

    def _can_retry(self, *, state: RetryState, request: HttpRequest, response: HttpResponse | None = None,
                   error: Exception | None = None) -> bool:
        if response is None or response.status_code != 429:
            return False
        self._sleep_s = _retry_after(response.headers) or 1.0
        if self.budget.fits(self._sleep_s):
            return True
        self.budget.retry_after_s = self._sleep_s
        return False

    def prepare_for_next_attempt(self, *, state: RetryState, request: HttpRequest,
                                 response: HttpResponse | None = None,
                                 error: Exception | None = None) -> None:
        state.next_attempt_requested = True
        time.sleep(self._sleep_s)
        state.increment_current_attempt()


def _retry_after(headers: Any) -> float | None:
    """Seconds from a Retry-After header in any of the header shapes slack-sdk passes around."""
    if headers is None:
        return None
    items = headers.items() if hasattr(headers, "items") else []
    for k, v in items:
        if str(k).lower() == "retry-after":
            if isinstance(v, list | tuple):
                v = v[0] if v else None
            try:
                return max(float(v), 0.0)
            except (TypeError, ValueError):
                return None
    return None


class _ProportionalJitter(Jitter):
    """Adds up to 100 % of the backoff (slack-sdk's default adds up to a whole second, even to 0.25 s)."""

    def recalculate(self, duration: float) -> float:
        return duration * (1.0 + random.random())


def _backoff() -> BackoffRetryIntervalCalculator:
    return BackoffRetryIntervalCalculator(backoff_factor=0.25, jitter=_ProportionalJitter())


def _handlers(budget: _Budget, max_retries: int) -> list[RetryHandler]:
    return [_ConnectionRetry(budget, max_retries), _RateLimitRetry(budget, max_retries),
            _ServerErrorRetry(budget, max_retries)]


class _SlackSink(Sink):
    name = "slack"

    def __init__(self, cfg: SlackConfig, dashboard_url: str) -> None:
        self.cfg = cfg
        self.dashboard_url = dashboard_url

    def _budget(self, deadline: float) -> _Budget:
        remaining = deadline - time.monotonic()
        if remaining <= 0.05:
            raise DeliveryError("no time left in this flush; the alert stays queued")
        return _Budget(deadline, min(self.cfg.timeout_s, remaining))

    @staticmethod
    def _failed(what: str, exc: BaseException) -> DeliveryError:
        return DeliveryError(f"{what} failed ({type(exc).__name__}: {_REDACT.redact(str(exc))[:300]}); "
                             "the alert stays queued")


class SlackWebhookSink(_SlackSink):
    """Posts Block Kit messages to a Slack incoming webhook (``ANOMALYD_SLACK_WEBHOOK_URL``)."""

    def __init__(self, cfg: SlackConfig, dashboard_url: str = "") -> None:
        if not cfg.webhook_url:
            raise ValueError("the Slack webhook sink needs a webhook URL; set ANOMALYD_SLACK_WEBHOOK_URL or "
                             "alerts.slack.webhook_url_file")
        super().__init__(cfg, dashboard_url)
        _REDACT.add(cfg.webhook_url)

    def send(self, t: Transition, deadline: float) -> None:
        text, blocks = format_message(t, self.dashboard_url)
        budget = self._budget(deadline)
        # urllib takes float seconds; slack-sdk merely annotates the timeout as int.
        client = WebhookClient(self.cfg.webhook_url, timeout=cast(int, budget.attempt_timeout),
                               logger=_SDK_LOG, retry_handlers=_handlers(budget, self.cfg.max_retries))
        try:
            resp = client.send(text=text, blocks=blocks, unfurl_links=False)
        except Exception as exc:
            raise self._failed("Slack webhook request", exc) from None
        if resp.status_code == 200:
            return
        body = _REDACT.redact(str(resp.body))[:200]
        if resp.status_code == 429:
            wait = _retry_after(resp.headers) or budget.retry_after_s
            raise DeliveryError(f"Slack webhook rate-limited (HTTP 429, Retry-After {wait}s); the alert "
                                "stays queued", retry_after_s=wait)
        if resp.status_code == 400:
            raise AlertRejectedError(f"Slack webhook rejected the message (HTTP 400 {body})")
        hint = "; check ANOMALYD_SLACK_WEBHOOK_URL" if resp.status_code in (403, 404, 410) else ""
        raise DeliveryError(f"Slack webhook answered HTTP {resp.status_code} {body}{hint}; the alert stays "
                            "queued")


class SlackBotSink(_SlackSink):
    """Posts with a bot token (``chat.postMessage`` to ``alerts.slack.channel``).

    With ``attach_plot``, a PNG of the window goes into the message's thread (``files_upload_v2``); a failed
    upload never loses the message, which is sent first.
    """

    def __init__(self, cfg: SlackConfig, dashboard_url: str = "") -> None:
        if not (cfg.token and cfg.channel):
            raise ValueError("the Slack bot sink needs ANOMALYD_SLACK_TOKEN (or alerts.slack.token_file) and "
                             "alerts.slack.channel")
        super().__init__(cfg, dashboard_url)
        _REDACT.add(cfg.token)

    def send(self, t: Transition, deadline: float) -> None:
        text, blocks = format_message(t, self.dashboard_url)
        budget = self._budget(deadline)
        client = WebClient(token=self.cfg.token, base_url=self.cfg.base_url, logger=_SDK_LOG,
                           timeout=cast(int, budget.attempt_timeout),
                           retry_handlers=_handlers(budget, self.cfg.max_retries))
        try:
            resp = client.chat_postMessage(channel=self.cfg.channel, text=text, blocks=blocks,
                                           unfurl_links=False)
        except SlackApiError as exc:
            status = exc.response.status_code
            error = str(exc.response.get("error", "")) if isinstance(exc.response.data, dict) else ""
            if status == 429:
                wait = _retry_after(exc.response.headers) or budget.retry_after_s
                raise DeliveryError(f"Slack rate-limited chat.postMessage (Retry-After {wait}s); the alert "
                                    "stays queued", retry_after_s=wait) from None
            if error in _REJECTED_ERRORS:
                raise AlertRejectedError(f"Slack rejected the message ({error})") from None
            hint = {"channel_not_found": "; check alerts.slack.channel and invite the bot to it",
                    "not_in_channel": "; invite the bot to alerts.slack.channel",
                    "invalid_auth": "; check ANOMALYD_SLACK_TOKEN",
                    "not_authed": "; check ANOMALYD_SLACK_TOKEN",
                    "token_revoked": "; check ANOMALYD_SLACK_TOKEN"}.get(error, "")
            raise DeliveryError(f"Slack chat.postMessage failed (HTTP {status}, {error or 'no error code'})"
                                f"{hint}; the alert stays queued") from None
        except Exception as exc:
            raise self._failed("Slack chat.postMessage", exc) from None
        if self.cfg.attach_plot and t.kind in (ANOMALOUS, REMINDER):
            self._attach(client, t, str(resp.get("channel", "")), str(resp.get("ts", "")), budget)

    def _attach(self, client: WebClient, t: Transition, channel_id: str, ts: str, budget: _Budget) -> None:
        if not budget.fits(0.0):
            log.warning("no time left to upload the plot for %s %s; the message was sent without it", t.kind,
                        t.series_id)
            return
        try:
            png = render_plot(t)
            if png is None:
                return
            client.files_upload_v2(channel=channel_id or self.cfg.channel, thread_ts=ts or None, file=png,
                                   filename=f"{t.signal}-{t.end_ns}.png",
                                   title=f"{t.signal} [{t.series}] window vs reconstruction")
        except Exception as exc:
            if _plots_not_installed(exc):
                return
            log.warning("plot upload for %s %s failed (%s: %s); the message was sent without it", t.kind,
                        t.series_id, type(exc).__name__, _REDACT.redact(str(exc))[:300])


_told_no_plots = False


def _plots_not_installed(exc: BaseException) -> bool:
    """Whether ``exc`` says matplotlib (the ``plots`` extra) is not installed. The first time, one log line says
    so: every message is then sent without its plot."""
    global _told_no_plots
    if not (isinstance(exc, ModuleNotFoundError) and (exc.name or "").partition(".")[0] == "matplotlib"):
        return False
    if not _told_no_plots:
        _told_no_plots = True
        log.warning("alerts.slack.attach_plot: matplotlib is not installed, so Slack messages are sent without "
                    "the plot; pip install 'anomalyd[plots]' to attach it")
    return True


def sinks_from_config(cfg: AlertsConfig) -> list[Sink]:
    """The sinks named in ``alerts.sinks``; Slack uses the bot token when one is set, else the webhook."""
    out: list[Sink] = []
    for name in cfg.sinks:
        if name == "log":
            out.append(LogSink(cfg.dashboard_url))
        elif name == "slack":
            if cfg.slack.token and cfg.slack.channel:
                out.append(SlackBotSink(cfg.slack, cfg.dashboard_url))
            else:
                out.append(SlackWebhookSink(cfg.slack, cfg.dashboard_url))
        else:
            raise ValueError(f"alerts.sinks: unknown sink {name!r}; accepted: log, slack")
    return out


# ---------------------------------------------------------------------------------------------------------
# State machine


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


def _state_json(st: SeriesState) -> dict[str, Any]:
    """A series' state as saved; without ``peak_attribution`` when empty, so that the state of series outside an
    episode reads as before multi-field signals (also by older versions)."""
    d = asdict(st)
    if not st.peak_attribution:
        del d["peak_attribution"]
    return d


@dataclass
class _Item:
    path: Path
    sink: str
    transition: Transition


class AlertManager:
    """Turns window results into alert transitions, persists them, and delivers them through the sinks.

    Parameters
    ----------
    cfg
        The ``[alerts]`` configuration.
    state_dir
        Directory of ``alerts.json`` (per-series state) and ``outbox/`` (queued alerts).
    dry_run
        Compute and log transitions only: nothing is persisted, queued or sent.
    sinks
        The sinks to deliver to; default: built from ``cfg.sinks``.
    """

    def __init__(self, cfg: AlertsConfig, state_dir: Path, *, dry_run: bool = False,
                 sinks: list[Sink] | None = None) -> None:
        self.cfg = cfg
        self.state_dir = Path(state_dir)
        self.dry_run = dry_run
        self.sinks: list[Sink] = sinks_from_config(cfg) if sinks is None else list(sinks)
        names = [s.name for s in self.sinks]
        for n in names:
            if not _SINK_NAME_RE.match(n):
                raise ValueError(f"sink name {n!r} must be lower-case letters, digits or '_' "
                                 "(it names files)")
        if len(set(names)) != len(names):
            raise ValueError(f"sink names must be unique, got {names}")
        self.state_path = self.state_dir / "alerts.json"
        self.outbox = self.state_dir / "outbox"
        self._mutex = threading.RLock()
        self._not_before: dict[str, float] = {}
        self.series: dict[str, SeriesState] = self._load_state()
        if not self.dry_run:
            self.outbox.mkdir(parents=True, exist_ok=True)
            ALERTS_QUEUED.set(len(self._pending()))

    # -- persistence -------------------------------------------------------------------------------------

    def _load_state(self) -> dict[str, SeriesState]:
        try:
            raw = json.loads(self.state_path.read_text())
        except FileNotFoundError:
            return {}
        except (OSError, ValueError) as exc:
            raise AlertStateError(f"alert state {self.state_path} is unreadable ({exc}); move it away to "
                                  "start with every series OK") from exc
        if not isinstance(raw, dict) or raw.get("version") != STATE_VERSION:
            got = raw.get("version") if isinstance(raw, dict) else None
            raise AlertStateError(f"alert state {self.state_path} has version={got!r}, this anomalyd reads "
                                  f"{STATE_VERSION}; move it away to start with every series OK")
        known = {f.name for f in dataclass_fields(SeriesState)}
        try:
            # keys this version does not know (written by a newer one) are dropped rather than refused
            return {sid: SeriesState(**{k: v for k, v in s.items() if k in known})
                    for sid, s in raw["series"].items()}
        except (KeyError, TypeError, AttributeError) as exc:
            raise AlertStateError(f"alert state {self.state_path} is malformed ({exc!s}); move it away to "
                                  "start with every series OK") from exc

    def _save_state(self) -> None:
        doc = {"version": STATE_VERSION, "series": {sid: _state_json(s) for sid, s in sorted(self.series.items())}}
        atomic_write(self.state_path, json.dumps(doc, indent=1, sort_keys=True).encode(), sync_dir=False)
        fsync_dir(self.state_dir)

    @contextlib.contextmanager
    def _locked(self) -> Iterator[None]:
        """Serialise state and outbox changes with other threads and with other anomalyd processes."""
        with self._mutex:
            self.state_dir.mkdir(parents=True, exist_ok=True)
            with open(self.state_dir / "alerts.lock", "a+b") as lock:
                fcntl.flock(lock, fcntl.LOCK_EX)
                try:
                    yield
                finally:
                    fcntl.flock(lock, fcntl.LOCK_UN)

    def _item_stem(self, t: Transition, sink: str) -> str:
        digest = hashlib.sha1(t.dedupe_key.encode()).hexdigest()[:16]
        return f"{t.end_ns:020d}-{digest}-{sink}"

    def _pending(self) -> list[Path]:
        return sorted(self.outbox.glob("*.json"))

    def _enqueue(self, transitions: Sequence[Transition]) -> int:
        written = 0
        for t in transitions:
            for sink in self.sinks:
                stem = self._item_stem(t, sink.name)
                path = self.outbox / f"{stem}.json"
                if path.exists() or (self.outbox / f"{stem}.sent").exists():
                    log.debug("alert %s for %s already queued or sent; not queued again", t.dedupe_key,
                              sink.name)
                    continue
                doc = {"version": STATE_VERSION, "sink": sink.name, "key": t.dedupe_key,
                       "queued_ns": time.time_ns(), "transition": t.to_dict()}
                atomic_write(path, json.dumps(doc).encode(), sync_dir=False)
                written += 1
        if written:
            fsync_dir(self.outbox)
        return written

    def _retire(self, item: _Item) -> None:
        """Forget a delivered item, keeping a marker while a re-observation could still recreate it."""
        st = self.series.get(item.transition.series_id)
        if st is not None and st.last_end_ns >= item.transition.end_ns:
            item.path.unlink(missing_ok=True)
        else:
            os.replace(item.path, item.path.with_suffix(".sent"))

    def _prune_markers(self) -> None:
        now = time.time()
        for marker in self.outbox.glob("*.sent"):
            try:
                doc = json.loads(marker.read_text())
                t = doc["transition"]
                st = self.series.get(str(t["series_id"]))
                covered = st is not None and st.last_end_ns >= int(t["end_ns"])
            except (OSError, ValueError, KeyError, TypeError):
                covered = True
            if covered or now - marker.stat().st_mtime > _SENT_RETENTION_S:
                marker.unlink(missing_ok=True)

    def _load_item(self, path: Path) -> _Item:
        try:
            doc = json.loads(path.read_text())
            return _Item(path, str(doc["sink"]), Transition.from_dict(doc["transition"]))
        except (OSError, ValueError, KeyError, TypeError) as exc:
            raise AlertStateError(f"outbox item {path} is unreadable ({exc!s})") from exc

    def _dead_letter(self, path: Path, reason: str) -> None:
        rejected = self.outbox / "rejected"
        rejected.mkdir(exist_ok=True)
        os.replace(path, rejected / path.name)
        log.error("%s; moved %s to %s for inspection", reason, path.name, rejected)

    # -- the policy --------------------------------------------------------------------------------------

    def _step(self, st: SeriesState, r: WindowResult, now_ns: int) -> list[Transition]:
        cfg = self.cfg
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

    def _apply(self, results: Sequence[WindowResult], now_ns: int) -> list[Transition]:
        transitions: list[Transition] = []
        for r in sorted(results, key=lambda r: (r.end_ns, r.key.id)):
            st = self.series.setdefault(r.key.id, SeriesState())
            if r.end_ns <= st.last_end_ns:
                continue  # already observed (a re-scored window after a restart)
            transitions += self._step(st, r, now_ns)
        return transitions

    # -- public API --------------------------------------------------------------------------------------

    def observe(self, results: Sequence[WindowResult], now_ns: int | None = None,
                deliver: bool = True) -> list[Transition]:
        """Update every series' state with ``results``, queue the transitions durably, then :meth:`flush`
        (unless ``deliver`` is False: the worker commits each signal's alerts, then delivers once per tick).

        When this returns, every transition is on disk (outbox item and state); an exception (state dir read-only
        or full) means nothing of ``results`` was recorded, and observing them again later is safe.

        Parameters
        ----------
        results
            Window results of any series, in any order; windows at or before the last one observed for their
            series are ignored.
        now_ns
            Wall time (epoch ns) used to space reminders; default: now.

        Returns
        -------
        list of Transition
            The transitions these results caused, in time order.
        """
        now = time.time_ns() if now_ns is None else now_ns
        if self.dry_run:
            with self._mutex:
                transitions = self._apply(results, now)
            for t in transitions:
                log.info("dry-run, not sent: %s", format_message(t, self.cfg.dashboard_url)[0])
            return transitions
        transitions = self._commit(lambda: self._apply(results, now))
        if deliver:
            self.flush()
        return transitions

    def _commit(self, make: Callable[[], list[Transition]]) -> list[Transition]:
        """Compute transitions against the state on disk, queue them and save the state; on any failure the
        in-memory state is reloaded from disk, so a retry computes the same transitions again."""
        with self._locked():
            try:
                self.series = self._load_state()  # another process may have moved it on
                transitions = make()
                if transitions:
                    self._enqueue(transitions)
                self._save_state()
            except BaseException:
                with contextlib.suppress(AlertStateError, OSError):
                    self.series = self._load_state()
                raise
            try:
                self._prune_markers()
                ALERTS_QUEUED.set(len(self._pending()))
            except OSError as exc:  # housekeeping only
                log.warning("could not prune delivered-alert markers in %s: %s", self.outbox, exc)
        for t in transitions:
            log.info("alert transition %s for %s at %s (model %s)", t.kind, t.series_id, iso_utc(t.end_ns),
                     t.model_id)
        return transitions

    def silent(self, series: Sequence[tuple[SeriesKey, str, int, int]], now_ns: int) -> list[Transition]:
        """Raise one ``deadman`` alert for each series that stopped writing windows.

        ``series`` holds ``(key, model id, start of its last window, end of its last window)`` of the series whose
        last window ended more than ``deadman_s`` ago (the worker picks them); a series already flagged, or
        observed past that window, is skipped. Queued durably like :meth:`observe`; delivered by :meth:`flush`.
        """
        def make() -> list[Transition]:
            out = []
            for key, model_id, start_ns, end_ns in series:
                st = self.series.setdefault(key.id, SeriesState())
                if st.dead or st.last_end_ns > end_ns:
                    continue
                st.dead = True
                st.last_end_ns = max(st.last_end_ns, end_ns)
                out.append(Transition(kind=DEADMAN, series_id=key.id, signal=key.signal,
                                      tags=tuple(sorted(key.tags)), model_id=model_id, start_ns=start_ns,
                                      end_ns=end_ns, threshold=0.0, since_ns=end_ns))
            return out

        if self.dry_run:
            with self._mutex:
                return make()
        return self._commit(make)

    def default_flush_s(self) -> float:
        """The time a flush may take when none is given: two Slack timeouts, at least five seconds."""
        return max(5.0, 2.0 * self.cfg.slack.timeout_s)

    def flush(self, deadline_s: float | None = None) -> int:
        """Deliver queued alerts, oldest first, for at most ``deadline_s`` seconds (default
        :meth:`default_flush_s`).

        A sink that fails stops receiving for the rest of this flush (its alerts keep their order and stay
        queued); after a rate limit it is not tried again before Retry-After has passed. In dry-run mode
        nothing is sent.

        Returns
        -------
        int
            The number of deliveries made.
        """
        if self.dry_run:
            return 0
        budget = self.default_flush_s() if deadline_s is None else deadline_s
        deadline = time.monotonic() + budget
        delivered = 0
        by_name = {s.name: s for s in self.sinks}
        with self._locked():
            self.series = self._load_state()
            blocked: set[str] = set()
            unknown: set[str] = set()
            for path in self._pending():
                try:
                    item = self._load_item(path)
                except AlertStateError as exc:
                    self._dead_letter(path, str(exc))
                    continue
                sink = by_name.get(item.sink)
                if sink is None:
                    unknown.add(item.sink)
                    continue
                if item.sink in blocked:
                    continue
                if time.monotonic() < self._not_before.get(item.sink, 0.0):
                    blocked.add(item.sink)
                    log.info("sink %s is rate-limited for another %.1fs; its alerts stay queued", item.sink,
                             self._not_before[item.sink] - time.monotonic())
                    continue
                if time.monotonic() >= deadline:
                    log.warning("alert flush reached its %.1fs deadline; the rest stays queued", budget)
                    break
                try:
                    sink.send(item.transition, deadline)
                except AlertRejectedError as exc:
                    ALERTS.labels(sink=item.sink, outcome="failed").inc()
                    self._dead_letter(path, f"sink {item.sink} rejected {item.transition.dedupe_key}: {exc}")
                    continue
                except DeliveryError as exc:
                    ALERTS.labels(sink=item.sink, outcome="failed").inc()
                    blocked.add(item.sink)
                    if exc.retry_after_s:
                        self._not_before[item.sink] = time.monotonic() + exc.retry_after_s
                    log.warning("sink %s could not deliver %s: %s", item.sink, item.transition.dedupe_key,
                                exc)
                    continue
                self._retire(item)
                delivered += 1
                ALERTS.labels(sink=item.sink, outcome="sent").inc()
            if unknown:
                log.warning("queued alerts for sink(s) %s are kept but not sent: those sinks are not "
                            "configured in alerts.sinks", ", ".join(sorted(unknown)))
            ALERTS_QUEUED.set(len(self._pending()))
        return delivered

    def queued(self) -> int:
        """Number of alert deliveries waiting in the outbox."""
        return len(self._pending()) if self.outbox.exists() else 0
