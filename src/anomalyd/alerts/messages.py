"""The text of alert messages: the fallback text and Slack Block Kit blocks of a transition, with the fields
that explain it (attribution), its times and its dashboard link (pure)."""

from __future__ import annotations

import logging
import math
from datetime import UTC, datetime
from typing import Any
from urllib.parse import quote

from .policy import ANOMALOUS, DEADMAN, MISSING, RECOVERED, REMINDER, RESUMED, Attribution, Transition

log = logging.getLogger(__name__)

#: At most this many fields are named in a message.
MAX_NAMED_FIELDS = 3


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


def num(v: float | None) -> str:
    """A number as a message shows it (4 significant digits), ``n/a`` for None."""
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


def arrow(direction: int) -> str:
    """A field's direction (+1/-1) in words."""
    return "up" if direction >= 0 else "down"


def pct(share: float) -> str:
    """A share as a percentage, ``n/a`` when not finite."""
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
        return ", ".join(f"{f} {arrow(d)} ({pct(sh)}" + ("" if v is None else f", value {num(v)}") + ")"
                         for f, sh, d, v in a[:top])
    return ", ".join(f"{f} {arrow(d)} {pct(sh)}" for f, sh, d, _ in a[:top])


def _mrkdwn_field(name: str) -> str:
    """A field's name as inline code in mrkdwn (escaped; a backtick would end the code span)."""
    return "`" + _mrkdwn_escape(name).replace("`", "'") + "`"


def _mrkdwn_attribution(a: Attribution, values: bool = True, top: int = MAX_NAMED_FIELDS) -> str:
    lines = []
    for f, sh, d, v in a[:top]:
        value = "" if v is None or not values else f", value {num(v)}"
        lines.append(f"• {_mrkdwn_field(f)} *{arrow(d)}* {pct(sh)}{value}")
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
        if t.kind in (ANOMALOUS, REMINDER) and t.score is not None and t.ratio is not None and t.ratio < 1.0:
            # flagged by the score (its likelihood or the out-of-range rule), not by the error's threshold:
            # say so, rather than "max error vs threshold" with a ratio below 1 under an ANOMALY title
            what = (f"score {t.score:.2f} flags it (the max error {num(t.max_error)} is under its threshold "
                    f"{num(t.threshold)}, ratio {num(t.ratio)}) in window {window}")
        else:
            what = (f"{score}max error {num(t.max_error)} vs threshold {num(t.threshold)} (ratio {num(t.ratio)}) "
                    f"in window {window}")
        if t.kind == RECOVERED and t.since_ns is not None:
            what += (f"; anomalous since {iso_utc(t.since_ns)} ({_windows(t.windows)}, "
                     f"peak error {num(t.peak_error)}, ratio {num(t.peak_ratio)})")
        elif t.kind == REMINDER and t.since_ns is not None:
            what += f"; anomalous since {iso_utc(t.since_ns)} ({_windows(t.windows)})"
    raised = t.kind in (ANOMALOUS, REMINDER)
    multi = t.multi_field
    text = f"{title} {t.signal} [{series}]: {what}, model {t.model_id}"
    if raised and t.attribution:
        text += (f"; top fields: {describe_attribution(t.attribution)}" if multi
                 else f"; direction {arrow(t.attribution[0][2])}")
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
        fields += [f"*Max error / threshold*\n{num(t.max_error)} / {num(t.threshold)}",
                   f"*Ratio*\n{num(t.ratio)}"]
        if raised and t.attribution and not multi:
            fields.append(f"*Direction*\n{arrow(t.attribution[0][2])}")
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

