"""Plain records passed between the modules: a series' identity and one scored window."""

from __future__ import annotations

import re
from dataclasses import dataclass
from datetime import UTC, datetime
from functools import lru_cache

import numpy as np
from numpy.typing import NDArray

Tags = tuple[tuple[str, str], ...]


def rfc3339(ns: int) -> str:
    """Epoch nanoseconds as an RFC 3339 UTC time, exact to the nanosecond (for messages and reports).

    Examples
    --------
    >>> rfc3339(10**9), rfc3339(1_500_000_000)
    ('1970-01-01T00:00:01Z', '1970-01-01T00:00:01.5Z')
    """
    sec, rest = divmod(int(ns), 10**9)
    text = datetime.fromtimestamp(sec, UTC).strftime("%Y-%m-%dT%H:%M:%S")
    return text + (f".{rest:09d}".rstrip("0") if rest else "") + "Z"


def _esc(s: str) -> str:
    return s.replace("\\", "\\\\").replace(",", "\\,").replace("=", "\\=")


@lru_cache(maxsize=1 << 17)  # called several times per series per tick; series keys repeat every tick
def tags_str(tags: Tags) -> str:
    """Render tags as ``k=v,k=v`` (sorted by key), the series' key; ``\\``, ``,`` and ``=`` inside a key or
    value are escaped with a backslash, so two different tag sets never render the same (`parse_tags` inverts it).

    Examples
    --------
    >>> tags_str((("host", "h1"), ("dc", "eu")))
    'dc=eu,host=h1'
    >>> tags_str(())
    ''
    >>> tags_str((("dc", "a"), ("host", "b,host=c"))) != tags_str((("dc", "a,host=b"), ("host", "c")))
    True
    """
    return ",".join(f"{_esc(k)}={_esc(v)}" for k, v in sorted(tags))


@lru_cache(maxsize=1 << 17)
def legacy_tags_str(tags: Tags) -> str:
    """The unescaped rendering of anomalyd before 0.9 (ambiguous), kept to find state saved under it."""
    return ",".join(f"{k}={v}" for k, v in sorted(tags))


_PART = re.compile(r"((?:[^\\,=]|\\.)*)=((?:[^\\,=]|\\.)*)(?:,|$)")
_UNESC = re.compile(r"\\(.)")


def parse_tags(text: str) -> Tags:
    """The tags `tags_str` rendered as ``text``.

    Examples
    --------
    >>> t = (("dc", "a,host=b"), ("host", "c" + chr(92)))
    >>> parse_tags(tags_str(t)) == t
    True
    >>> parse_tags("")
    ()
    """
    out: list[tuple[str, str]] = []
    pos = 0
    while pos < len(text):
        m = _PART.match(text, pos)
        if m is None or m.end() == pos:
            raise ValueError(f"series key {text!r} is not k=v,k=v")
        out.append((_UNESC.sub(r"\1", m.group(1)), _UNESC.sub(r"\1", m.group(2))))
        pos = m.end()
    return tuple(out)


@dataclass(frozen=True, slots=True)
class SeriesKey:
    """One series of a signal: the signal's name and the values of its ``group_by`` tags."""

    signal: str
    tags: Tags

    def __str__(self) -> str:
        return f"{self.signal}[{tags_str(self.tags)}]"

    @property
    def id(self) -> str:
        """Stable text key, used in state files."""
        return f"{self.signal}|{tags_str(self.tags)}"

    @property
    def legacy_id(self) -> str:
        """The key this series had in state files before keys were escaped (equal to `id` unless a tag holds
        ``\\``, ``,`` or ``=``)."""
        return f"{self.signal}|{legacy_tags_str(self.tags)}"


@dataclass(frozen=True, slots=True)
class FieldShare:
    """How much one field explains a window: its share of the window's error (the fields' shares sum to 1), the
    direction of its deviation (+1: above its reconstruction, -1: below) and its newest value in the window (data
    units; None when that sample is missing)."""

    field: str
    share: float
    direction: int
    value: float | None = None

    @property
    def arrow(self) -> str:
        """``up`` or ``down``."""
        return "up" if self.direction >= 0 else "down"


def describe_shares(shares: tuple[FieldShare, ...] | list[FieldShare], top: int = 3) -> str:
    """The ``top`` fields by share as one line, e.g. ``cpu up 62%, mem down 21%`` (the ``top_fields`` field).

    Examples
    --------
    >>> describe_shares([FieldShare("cpu", 0.62, 1, 97.0), FieldShare("mem", 0.21, -1, 3.0)])
    'cpu up 62%, mem down 21%'
    """
    return ", ".join(share_text(s.field, s.direction, s.share) for s in list(shares)[:top])


def share_text(field: str, direction: float, share: float) -> str:
    """One field of `describe_shares`: ``cpu up 62%``."""
    return f"{field} {'up' if direction >= 0 else 'down'} {share:.0%}"


@dataclass(frozen=True, slots=True)
class WindowResult:
    """The outcome for one window of one series.

    ``end_ns`` is the timestamp of the window's last sample and of the output point, so scoring the same window
    twice writes the same point. A missing-data window has ``missing=True``, ``max_error=None`` and
    ``anomalous=False``. ``values``/``reconstruction`` (the aligned samples and the window's nearest tapered
    centroid, un-tapered where the taper is not ~0) are filled for anomalous windows, for plots in alerts, and so
    is ``attribution`` (which fields explain the window, up or down).
    """

    key: SeriesKey
    model_id: str
    start_ns: int
    end_ns: int
    threshold: float
    max_error: float | None = None
    anomalous: bool = False
    score: float | None = None
    missing: bool = False
    n_missing: int = 0
    values: NDArray[np.float64] | None = None
    reconstruction: NDArray[np.float64] | None = None
    #: The fields by share of the window's error, largest first (every field of the signal; one for a single-field
    #: signal). Empty for a missing-data window.
    attribution: tuple[FieldShare, ...] = ()
    #: With several fields: the names of ``values``/``reconstruction``'s columns (then shaped ``(window, fields)``).
    fields: tuple[str, ...] = ()

    @property
    def ratio(self) -> float | None:
        """``max_error / threshold``, or None for a missing-data window."""
        if self.max_error is None or self.threshold <= 0:
            return None
        return self.max_error / self.threshold
