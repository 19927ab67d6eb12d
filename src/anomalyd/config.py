"""Configuration: a TOML file validated into frozen pydantic dataclasses, one class per section.

Each class below declares its section once: every key with its type, its default and its checks. A key whose TOML
name differs from the attribute (``interval = "16s"`` is ``interval_s``) says so with ``alias``; durations are
written with a unit (``"16s"``, ``"7d"``) and held in the unit the attribute's name ends with. Unknown keys are
refused (``extra="forbid"``) and every problem is reported at once, one line each, naming its key path
(``signals[0].window``), the value and what is accepted.

Any scalar setting of the sections ``influxdb``, ``output``, ``paths``, ``daemon``, ``alerts``, ``alerts.slack`` and
``kapacitor`` can be overridden by an environment variable ``ANOMALYD_<SECTION>_<KEY>`` (``alerts.slack`` is
``SLACK``), e.g. ``ANOMALYD_INFLUXDB_URL`` or ``ANOMALYD_DAEMON_HEALTH_LISTEN``. Secrets (the fields declared with
``repr=False``: InfluxDB user, password and API token, Slack webhook URL and token) are read only from those
variables or from a ``<key>_file`` setting, never from the TOML itself, and are kept out of every ``repr``.

The classes validate when built in Python too (``dataclasses.replace`` works); there a duration is already a
number in the attribute's unit, and paths are taken as given.
"""

from __future__ import annotations

import copy
import math
import os
import re
import tomllib
from collections.abc import Callable, Mapping
from dataclasses import replace
from datetime import UTC, datetime
from pathlib import Path
from typing import Annotated, Any, get_args
from urllib.parse import urlsplit

from pydantic import (
    AfterValidator,
    BeforeValidator,
    ConfigDict,
    Field,
    TypeAdapter,
    ValidationError,
    ValidationInfo,
    field_validator,
    model_validator,
)
from pydantic.dataclasses import dataclass, is_pydantic_dataclass
from pydantic.fields import FieldInfo
from pydantic_core import ErrorDetails, PydanticCustomError

from .core.detector import ATTRIBUTIONS, DECISIONS, DetectorSpec

ENV_PREFIX = "ANOMALYD_"
_DURATION_RE = re.compile(r"^\s*(\d+(?:\.\d+)?)\s*(ns|us|µs|ms|s|m|h|d|w)\s*$")
_UNIT_NS = {"ns": 1, "us": 1_000, "µs": 1_000, "ms": 1_000_000, "s": 10**9, "m": 60 * 10**9,
            "h": 3600 * 10**9, "d": 86400 * 10**9, "w": 7 * 86400 * 10**9}
_LAST_RE = re.compile(r"^\s*last\s+(\d+)\s*(minutes?|hours?|days?|weeks?|m|h|d|w)\s*$")
_LAST_UNIT = {"m": "m", "minute": "m", "minutes": "m", "h": "h", "hour": "h", "hours": "h", "d": "d",
              "day": "d", "days": "d", "w": "w", "week": "w", "weeks": "w"}
SCOPES = ("series", "shared")
POLICIES = ("max", "quantile", "sigma")
MAX_GAP = 8  # samples filled by interpolation: a quarter of the reference window
SINKS = ("log", "slack")
APIS = ("influxql", "flux")
#: Transforms of a field's raw samples before they are aligned (InfluxQL's names; rates are per second).
TRANSFORMS = ("", "derivative", "non_negative_derivative")
#: The shortest ``influxdb.timeout``: below it every request times out, and the failure reads like a network fault.
MIN_TIMEOUT_NS = 100_000_000
#: The detector's defaults, which a signal's are (one configuration for the daemon and the evaluation).
_SPEC = DetectorSpec()


class ConfigError(ValueError):
    """The configuration is invalid; ``problems`` lists every problem found, one line each."""

    def __init__(self, source: str, problems: list[str]) -> None:
        self.problems = problems
        super().__init__(f"{source}: {len(problems)} problem(s):\n  " + "\n  ".join(problems))


def parse_duration_ns(text: str) -> int:
    """Parse ``"16s"``, ``"500ms"``, ``"7d"`` and the like into nanoseconds.

    Examples
    --------
    >>> parse_duration_ns("16s")
    16000000000
    >>> parse_duration_ns("1.5m") // 10**9
    90
    """
    m = _DURATION_RE.match(str(text))
    if not m:
        raise ValueError(f"{text!r} is not a duration; write a number and a unit, e.g. '16s', '5m', '7d'")
    return round(float(m.group(1)) * _UNIT_NS[m.group(2)])


def parse_time_ns(text: str, now_ns: int) -> int:
    """Parse an RFC 3339 time, ``"now"`` or ``"now-<duration>"`` into epoch nanoseconds.

    Examples
    --------
    >>> parse_time_ns("1970-01-01T00:00:10Z", 0)
    10000000000
    >>> parse_time_ns("now-2s", 5 * 10**9)
    3000000000
    """
    s = str(text).strip()
    if s == "now":
        return now_ns
    if s.startswith("now-"):
        return now_ns - parse_duration_ns(s[4:])
    try:
        dt = datetime.fromisoformat(s.replace("Z", "+00:00"))
    except ValueError:
        raise ValueError(f"{text!r} is not a time; use RFC 3339 like '2024-01-31T00:00:00Z', 'now' or "
                         f"'now-7d'") from None
    if dt.tzinfo is None:
        dt = dt.replace(tzinfo=UTC)
    return int(dt.timestamp()) * 10**9 + dt.microsecond * 1000


_USERINFO = re.compile(r"(?i)\b([a-z][a-z0-9+.-]*://)[^/\s@]+@")


def redact_url(text: str) -> str:
    """``text`` (a URL, or a message holding URLs) with every ``user:password@`` replaced by ``***@``.

    Examples
    --------
    >>> redact_url("http://admin:s3cret@db:8086/x"), redact_url("http://db:8086")
    ('http://***@db:8086/x', 'http://db:8086')
    >>> redact_url("InfluxDB at http://u:pw@db:8086 is unreachable")
    'InfluxDB at http://***@db:8086 is unreachable'
    """
    return _USERINFO.sub(r"\1***@", text)


_SHARD_RE = re.compile(r"^\s*(\d+)\s*/\s*(\d+)\s*$")


def _shard_problem(v: str) -> str | None:
    if v.strip() == "":
        return None
    m = _SHARD_RE.match(v)
    if not m:
        return ('must be "I/N": this replica\'s index I (0 .. N-1) out of N replicas, e.g. "0/3", or "" for one '
                "replica scoring every series")
    i, n = int(m.group(1)), int(m.group(2))
    if n < 1:
        return f"has N={n} replicas; N must be at least 1, e.g. \"0/1\""
    if i >= n:
        return (f"has index {i} out of {n} replicas; indices run from 0 to {n - 1} (a StatefulSet's pod ordinal), "
                f"e.g. \"{n - 1}/{n}\"")
    return None


def parse_shard(v: str) -> tuple[int, int] | None:
    """``"I/N"`` as ``(I, N)``; "" (and any invalid text, which the configuration refuses) as None.

    Examples
    --------
    >>> parse_shard("2/3"), parse_shard("")
    ((2, 3), None)
    """
    m = _SHARD_RE.match(v or "")
    if not m or _shard_problem(v):
        return None
    return int(m.group(1)), int(m.group(2))


# ---------------------------------------------------------------------------------------------------------
# Types and checks the sections are declared with. A check raises one of three kinds of error, which
# `_describe` turns into a line: "rule" (``<key>: <value> <message>``), "coerce" (``<key>: <value> is not valid:
# <message>``) and "plain" (``<key>: <message>``, for messages that show the value their own way).


def _error(kind: str, message: str, at: str | int | None = None) -> PydanticCustomError:
    """An error of ``kind``; ``at`` places it on a key below the one being validated."""
    return PydanticCustomError(kind, message, None if at is None else {"at": at})


def _from_file(info: ValidationInfo) -> bool:
    """Whether the value comes from a configuration file (`from_dict` validates with a context; Python does not)."""
    return info.context is not None


def _check(problem: Callable[[Any], str | None]) -> AfterValidator:
    """A check of a field's (converted) value: ``problem(value)`` says what is wrong with it, or None."""
    def run(v: Any) -> Any:
        msg = problem(v)
        if msg:
            raise _error("rule", msg)
        return v
    return AfterValidator(run)


def _rule(ok: Callable[[Any], bool], msg: str) -> AfterValidator:
    return _check(lambda v: None if ok(v) else msg)


def _one_of(options: tuple[str, ...]) -> AfterValidator:
    return _rule(lambda v: v in options, f"is not one of: {', '.join(options)}")


def _as_int(v: Any) -> Any:
    if isinstance(v, bool) or not isinstance(v, int | str):
        raise _error("coerce", "expected an integer")
    try:
        return int(v)
    except ValueError:
        raise _error("coerce", "expected an integer") from None


def _as_float(v: Any) -> Any:
    if isinstance(v, bool) or not isinstance(v, int | float | str):
        raise _error("coerce", "expected a number")
    try:
        out = float(v)
    except ValueError:
        raise _error("coerce", "expected a number") from None
    if not math.isfinite(out):
        raise _error("coerce", "expected a finite number")
    return out


def _as_bool(v: Any) -> Any:
    if isinstance(v, bool):
        return v
    if isinstance(v, str) and v.lower() in ("true", "1", "yes", "false", "0", "no"):
        return v.lower() in ("true", "1", "yes")
    raise _error("coerce", "expected true or false")


def _duration(unit_ns: int) -> BeforeValidator:
    """A duration written with its unit (``"16s"``), held in ``unit_ns`` units (a number as given from Python)."""
    def parse(v: Any, info: ValidationInfo) -> Any:
        if not _from_file(info):
            return v
        if isinstance(v, int | float) and not isinstance(v, bool):
            raise _error("coerce", f"a bare number has no unit; write it as a string with one, e.g. \"{v:g}s\" "
                                   f"(or \"{v:g}m\", \"{v:g}h\")")
        try:
            ns = parse_duration_ns(str(v))
        except ValueError as exc:
            raise _error("coerce", str(exc)) from None
        return ns if unit_ns == 1 else ns / unit_ns
    return BeforeValidator(parse)


def _non_empty_list(kind: str, msg: str) -> BeforeValidator:
    def check(v: Any) -> Any:
        if not isinstance(v, list | tuple) or not v:
            raise _error(kind, msg)
        return v
    return BeforeValidator(check)


def _tags(v: Any) -> Any:
    if isinstance(v, tuple):
        return v
    if not isinstance(v, dict) or not all(isinstance(x, str) for x in v.values()):
        raise _error("rule", 'must be a table of tag = "value" strings, e.g. { host = "h1" }')
    return tuple(sorted(v.items()))


def _tag_names(v: Any) -> Any:
    if isinstance(v, tuple):
        return v
    if not isinstance(v, list) or not all(isinstance(g, str) and g for g in v):
        raise _error("rule", 'must be a list of tag names, e.g. ["host"]')
    return tuple(v)


def _port_problem(port: str, example: str) -> str | None:
    if not port.isdigit() or not 1 <= int(port) <= 65535:
        return f"has port {port or '(empty)'}; use a port between 1 and 65535, e.g. {example}"
    return None


def _url(example: str, credentials_hint: str = "") -> BeforeValidator:
    """An http(s) URL, without a trailing ``/``. With ``credentials_hint``, a URL carrying ``user:password@`` is
    refused with that hint. Messages never show the password."""
    def check(raw: Any) -> str:
        if not isinstance(raw, str):
            raise _error("coerce", f"expected a string such as {example!r}")
        shown = redact_url(raw)
        try:
            parts = urlsplit(raw.strip())
        except ValueError as exc:
            raise _error("plain", f"{shown!r} is not a URL ({exc}); write it like {example!r}") from None
        if parts.scheme not in ("http", "https") or not parts.hostname:
            raise _error("plain", f"{shown!r} must be an http:// or https:// URL, e.g. {example!r}")
        if credentials_hint and "@" in parts.netloc:
            raise _error("plain", f"{shown!r} carries credentials, which are not read from the URL; remove them "
                                  f"and {credentials_hint}")
        port = parts.netloc.rpartition("@")[2].rpartition("]")[2]
        msg = _port_problem(port.rpartition(":")[2], example) if ":" in port else None
        if msg:
            raise _error("plain", f"{shown!r} {msg}")
        return raw.strip().rstrip("/")
    return BeforeValidator(check)


def _listen_problem(v: str) -> str | None:
    if v == "":
        return None
    if not re.match(r"^[\w.\-\[\]:]*:\d+$", v):
        return "must be host:port (e.g. 127.0.0.1:9108) or \"\" to turn the endpoint off"
    msg = _port_problem(v.rpartition(":")[2], "127.0.0.1:9108")
    return msg and msg + ', or "" to turn the endpoint off'


def _measurement_name(v: str) -> str | None:
    """Why ``v`` cannot be a measurement anomalyd writes in line protocol (None if it can)."""
    if not v:
        return "must not be empty"
    if "\n" in v or "\r" in v:
        return "contains a line break, which ends a line of line protocol; remove it"
    if v.endswith("\\"):
        return "ends with a backslash, which would escape the space after it in line protocol; remove it"
    if v.startswith("#"):
        return "starts with '#': InfluxDB would read every line as a comment and drop it; rename it"
    return None


def _shard(v: Any) -> Any:
    if not isinstance(v, str):
        return v
    msg = _shard_problem(v)
    if msg:
        raise _error("rule", msg)
    return parse_shard(v)


def _sinks(v: Any) -> Any:
    if isinstance(v, str):  # from the environment: "log,slack"
        v = [s.strip() for s in v.split(",") if s.strip()]
    if not isinstance(v, list | tuple) or any(s not in SINKS for s in v):
        raise _error("plain", f"{v!r} must be a list drawn from: {', '.join(SINKS)}")
    return tuple(v)


def _path(v: Any, info: ValidationInfo) -> Any:
    """A path from the file, relative to the file's directory."""
    if not _from_file(info):
        return v
    if not isinstance(v, str | Path):
        raise _error("coerce", "expected a string")
    if v == "":
        raise _error("rule", "must not be empty")
    return info.context["base"] / v  # type: ignore[index]


def _window(v: Any) -> Any:
    if v is None or v == "auto":
        return None
    if isinstance(v, bool) or not isinstance(v, int | str) or not str(v).isdigit():
        raise _error("rule", 'must be a whole number of samples (at least 4), or "auto" (chosen at training)')
    return int(v)


def _train_range(v: Any) -> Any:
    if isinstance(v, TrainRange):
        return v
    if isinstance(v, str):
        m = _LAST_RE.match(v)
        if not m:
            raise _error("plain", f"{v!r} is not a range; write \"last 7 days\" or "
                                  "[\"2024-01-01T00:00:00Z\", \"2024-01-08T00:00:00Z\"]")
        return TrainRange(f"now-{m.group(1)}{_LAST_UNIT[m.group(2)]}", "now")
    if not isinstance(v, list) or len(v) != 2:
        raise _error("plain", f"{v!r} must be \"last N days\" or a [start, end] pair")
    try:
        start, end = (parse_time_ns(str(x), 10**18) for x in v)
    except ValueError as exc:
        raise _error("plain", str(exc)) from None
    if start >= end:
        raise _error("plain", f"{v!r}: the start must be before the end")
    return TrainRange(str(v[0]), str(v[1]))


Int = Annotated[int, BeforeValidator(_as_int)]
Float = Annotated[float, BeforeValidator(_as_float)]
Bool = Annotated[bool, BeforeValidator(_as_bool)]
Seconds = Annotated[float, _duration(10**9)]
Nanoseconds = Annotated[int, _duration(1)]
Tags = Annotated[tuple[tuple[str, str], ...], BeforeValidator(_tags)]
Positive = _rule(lambda v: v > 0, "must be greater than 0")
NonNegative = _rule(lambda v: v >= 0, "must be 0 or more")
NonEmpty = _rule(bool, "must not be empty")
Measurement = Annotated[str, _check(_measurement_name)]
FilePath = Annotated[Path, BeforeValidator(_path)]
#: Every section: unknown keys refused; built by attribute name from Python, by TOML key (alias) from a file.
_STRICT = ConfigDict(extra="forbid", validate_by_name=True, validate_by_alias=True)


# ---------------------------------------------------------------------------------------------------------
# The sections. A field's default is the one default of that setting.


@dataclass(frozen=True, config=_STRICT)
class TrainRange:
    """A training range, absolute or relative to the moment training runs (``train_range`` in a signal: "last 7
    days" or ``[start, end]``)."""

    start: str
    end: str

    def resolve(self, now_ns: int) -> tuple[int, int]:
        """Return ``(start_ns, end_ns)``."""
        return parse_time_ns(self.start, now_ns), parse_time_ns(self.end, now_ns)


@dataclass(frozen=True, config=_STRICT)
class ThresholdConfig:
    """How the hold-out's max errors become the ``threshold`` field (information beside the decision)."""

    policy: Annotated[str, _one_of(POLICIES)] = _SPEC.threshold_policy
    margin: Annotated[Float, Positive] = _SPEC.margin
    quantile: Annotated[Float, _rule(lambda v: 0 < v <= 1, "must be in (0, 1]")] = _SPEC.quantile
    k: Annotated[Float, Positive] = _SPEC.sigma_k


_FIELDS_EXAMPLE = ('e.g. fields = [{ measurement = "cpu", field = "usage_user", where = { cpu = "cpu-total" } }, '
                   '{ measurement = "net", field = "bytes_recv", transform = "non_negative_derivative" }]')


@dataclass(frozen=True, config=_STRICT)
class FieldSpec:
    """One field of a signal: where it is read from, and what the window, the output and the alerts call it.

    ``where`` adds tag equalities to the signal's own (e.g. Telegraf's ``cpu = "cpu-total"``); ``transform``
    turns a counter into a per-second rate (``non_negative_derivative``: a counter reset gives no sample).
    """

    name: Annotated[str, _rule(lambda v: bool(v.strip()), "must be a non-empty string")]
    measurement: Annotated[str, NonEmpty] = Field(description="here or as the signal's measurement")
    field: Annotated[str, NonEmpty] = Field()
    where: Tags = ()
    transform: Annotated[str, _rule(lambda v: v in TRANSFORMS, 'is not a transform; use "non_negative_derivative" '
                                    '(a counter\'s rate per second), "derivative", or leave it out')] = ""

    @model_validator(mode="before")
    @classmethod
    def _a_table(cls, data: Any) -> Any:
        if isinstance(data, str | int | float | bool | list):
            raise _error("plain", f"{data!r} must be a field name or a table; {_FIELDS_EXAMPLE}")
        return data


class _Both(str):
    """A signal's ``field`` written beside ``fields`` (refused by `SignalConfig`)."""


def _not_both(v: Any) -> Any:
    if isinstance(v, _Both):
        raise _error("plain", "and fields are both set; list every field in fields (a single-field signal needs "
                              "only field)")
    return v


@dataclass(frozen=True, config=_STRICT)
class SignalConfig:
    """One watched signal (a ``[[signals]]`` table): one field of a measurement, or several (``fields``), split
    into series by ``group_by`` tags. ``measurement``/``field`` are the first field's. The detector's settings
    default to `DetectorSpec`'s."""

    name: Annotated[str, _rule(lambda v: re.match(r"^[A-Za-z0-9_\-.]+$", v) is not None,
                               "must be letters, digits, '.', '-' or '_' (it names model files)")]
    measurement: Annotated[str, NonEmpty] = Field()
    field: Annotated[str, BeforeValidator(_not_both), NonEmpty] = Field()
    period_ns: Annotated[Nanoseconds, Positive] = Field(alias="period")
    #: Every field of the signal, in window order (one for a single-field signal: ``measurement.field``).
    fields: Annotated[tuple[FieldSpec, ...], _non_empty_list(
        "rule", f"must be a non-empty list of field names or tables; {_FIELDS_EXAMPLE}")] = ()
    where: Tags = ()
    group_by: Annotated[tuple[str, ...], BeforeValidator(_tag_names)] = ()
    #: Samples per window; None ("auto") chooses it at training.
    window: Annotated[int | None, BeforeValidator(_window), _rule(
        lambda v: v is None or v >= 4, 'must be at least 4, or "auto" (chosen at training)')] = None
    train_slide: Int = _SPEC.train_slide
    slide: Int = _SPEC.stride
    write_every: Annotated[Int, Positive] = 1
    clusters: Annotated[Int, _rule(lambda v: v >= 2, "must be at least 2 (the most shapes in the catalog)")] = (
        _SPEC.n_clusters)
    random_state: Int = _SPEC.random_state
    n_init: Annotated[Int, Positive] = _SPEC.n_init
    max_gap: Annotated[Int, NonNegative] = MAX_GAP
    scope: Annotated[str, _one_of(SCOPES)] = "series"
    train_where: Tags = ()
    train_range: Annotated[TrainRange, BeforeValidator(_train_range)] = TrainRange("now-7d", "now")
    holdout: Annotated[Float, _rule(lambda v: 0 < v < 1, "must be in (0, 1)")] = _SPEC.holdout
    max_train_windows: Annotated[Int, Positive] = _SPEC.max_train_windows
    threshold: ThresholdConfig = Field(default_factory=ThresholdConfig,
                                       examples=['{ policy = "max", margin = 1.2 }'])
    score_history: Annotated[Int, _rule(lambda v: v >= 8, "must be at least 8 windows")] = (
        _SPEC.normaliser.long_window)
    score_threshold: Annotated[Float, _rule(lambda v: 0 < v <= 1, "must be in (0, 1] (0.5 is the red zone)")] = (
        _SPEC.score_threshold)
    decision: Annotated[str, _one_of(DECISIONS)] = _SPEC.decision
    attribution: Annotated[str, _one_of(ATTRIBUTIONS)] = _SPEC.attribution
    #: Several fields: windows behind each field's own error history (its surprise); 0 turns it off.
    field_history: Annotated[Int, NonNegative] = _SPEC.field_surprise
    #: Several fields: the surprise above which a field's window counts as shifted (used with rebaseline_after).
    rebaseline_gate: Annotated[Float, Positive] = 6.0
    #: Several fields: after this many shifted windows of a field in a row, its new level becomes its normal
    #: (logged and counted); 0: never.
    rebaseline_after: Annotated[Int, NonNegative] = 0

    @model_validator(mode="before")
    @classmethod
    def _fields_shorthand(cls, data: Any) -> Any:
        """In the file, ``fields`` may name fields of the signal's ``measurement``; a field's name is its ``name``,
        else ``field`` when every field comes from one measurement, else ``measurement.field``."""
        if not isinstance(data, dict) or not isinstance(data.get("fields"), list):
            return data
        own = data.get("measurement")
        items = [{"field": i} if isinstance(i, str) else i for i in data["fields"]]
        items = [{"measurement": own, **i} if isinstance(i, dict) and isinstance(own, str) else i for i in items]
        tables = [i for i in items if isinstance(i, dict)]
        one = len({str(i.get("measurement")) for i in tables}) <= 1
        items = [{"name": str(i.get("field")) if one else f"{i.get('measurement')}.{i.get('field')}", **i}
                 if isinstance(i, dict) else i for i in items]
        first = tables[0] if tables else {}
        # the signal's measurement and field are its first field's (which reports its own problems)
        return {**data, "fields": items, "measurement": str(first.get("measurement") or "?"),
                "field": _Both(data["field"]) if "field" in data else str(first.get("field") or "?")}

    @field_validator("name")
    @classmethod
    def _unique(cls, v: str, info: ValidationInfo) -> str:
        if _from_file(info):
            seen = info.context.setdefault("signal names", set())  # type: ignore[union-attr]
            if v in seen:
                raise _error("plain", f"{v!r} is used by two signals; names must be unique")
            seen.add(v)
        return v

    @field_validator("fields")
    @classmethod
    def _distinct_names(cls, v: tuple[FieldSpec, ...]) -> tuple[FieldSpec, ...]:
        names = [f.name for f in v]
        for j, name in enumerate(names):
            if name in names[:j]:
                raise _error("plain", f"name {name!r} is used twice; give one of them a name = \"...\"", at=j)
        return v

    @field_validator("group_by")
    @classmethod
    def _not_an_output_tag(cls, v: tuple[str, ...], info: ValidationInfo) -> tuple[str, ...]:
        own = {"signal", "series", "model"} | ({"field"} if len(info.data.get("fields", ())) > 1 else set())
        reserved = sorted(own & set(v))
        if reserved:
            raise _error("plain", f"{reserved} clash with the output's own tags ({', '.join(sorted(own))}); "
                                  "rename the source tag or drop it from group_by")
        return v

    @field_validator("rebaseline_after")
    @classmethod
    def _several_fields(cls, v: int, info: ValidationInfo) -> int:
        if v and len(info.data.get("fields", ())) < 2:
            raise _error("plain", f"{v} needs a signal with several fields (each field is re-baselined against "
                                  "its own history); list them in fields = [...] or remove it")
        if v and info.data.get("field_history") == 0:
            raise _error("plain", f"{v} needs field_history > 0 (the per-field history it re-baselines); "
                                  "remove field_history = 0 or rebaseline_after")
        return v

    @field_validator("train_slide", "slide")
    @classmethod
    def _within_the_window(cls, v: int, info: ValidationInfo) -> int:
        window = info.data.get("window")  # absent if invalid
        if window or info.field_name == "slide":
            name = "window" if window else "the smallest automatic window"
            if not 1 <= v <= (window or _SPEC.min_window):
                raise _error("rule", f"must be between 1 and {name}={window or _SPEC.min_window}")
        elif v <= 0:
            raise _error("rule", "must be greater than 0")
        return v

    def __post_init__(self) -> None:
        if not self.fields:
            object.__setattr__(self, "fields", (FieldSpec(self.field, self.measurement, self.field),))
        elif len(self.fields) == 1 and (self.fields[0].measurement, self.fields[0].field) != (self.measurement,
                                                                                             self.field):
            # `dataclasses.replace(sig, field=...)` of a single-field signal: its one field follows
            f = self.fields[0]
            object.__setattr__(self, "fields", (replace(f, name=self.field if f.name == f.field else f.name,
                                                        measurement=self.measurement, field=self.field),))

    @property
    def field_names(self) -> tuple[str, ...]:
        """The fields' names, in window order (what the model, the output and the alerts call them)."""
        return tuple(f.name for f in self.fields)

    @property
    def multi(self) -> bool:
        """The signal has several fields (windows span all of them; points carry an attribution)."""
        return len(self.fields) > 1

    def spec(self) -> DetectorSpec:
        """The detector's parameters for this signal (the rest are `DetectorSpec`'s defaults)."""
        th = self.threshold
        return replace(_SPEC, window=self.window, train_slide=self.train_slide, stride=self.slide,
                       n_clusters=self.clusters, random_state=self.random_state, n_init=self.n_init,
                       holdout=self.holdout, max_train_windows=self.max_train_windows, threshold_policy=th.policy,
                       margin=th.margin, quantile=th.quantile, sigma_k=th.k,
                       normaliser=replace(_SPEC.normaliser, long_window=self.score_history),
                       score_threshold=self.score_threshold, decision=self.decision,
                       attribution=self.attribution, field_surprise=self.field_history,
                       surprise_gate=self.rebaseline_gate if self.rebaseline_after else None,
                       surprise_rebaseline=self.rebaseline_after)

    @property
    def step_ns(self) -> int:
        """Time between two written points: ``write_every`` scored windows of ``slide`` samples each."""
        return self.slide * self.write_every * self.period_ns


def _flux_needs(v: str, info: ValidationInfo) -> str:
    if info.data.get("api") == "flux" and not v.strip():
        raise _error("plain", f'is required when influxdb.api = "flux" (the InfluxDB 2.x {info.field_name} to read '
                              "from and write to)")
    return v


@dataclass(frozen=True, config=_STRICT)
class InfluxConfig:
    url: Annotated[str, _url("http://127.0.0.1:8086", credentials_hint=(
        "set ANOMALYD_INFLUXDB_USERNAME and ANOMALYD_INFLUXDB_PASSWORD (or ANOMALYD_INFLUXDB_TOKEN for an API "
        "token), or influxdb.password_file / influxdb.token_file"))] = "http://127.0.0.1:8086"
    database: Annotated[str, NonEmpty] = "anomalyd"
    retention_policy: str = ""
    timeout_s: Annotated[Seconds, _rule(lambda v: v >= MIN_TIMEOUT_NS / 1e9, "is too short: no request to "
                                        "InfluxDB can finish in under 0.1s; use e.g. \"10s\"")] = Field(
        default=10.0, alias="timeout")
    retries: Annotated[Int, NonNegative] = 3
    verify_ssl: Bool = True
    gzip: Bool = False
    #: "influxql": InfluxQL on /query and line protocol on /write (1.x; 2.x with a DBRP mapping; 3.x).
    #: "flux": Flux on /api/v2/query and /api/v2/write (2.x), in ``org`` and ``bucket``.
    api: Annotated[str, _one_of(APIS)] = "influxql"
    org: Annotated[str, AfterValidator(_flux_needs)] = Field(default="", validate_default=True)
    bucket: Annotated[str, AfterValidator(_flux_needs)] = Field(default="", validate_default=True)
    username: str = Field(default="", repr=False)
    password: str = Field(default="", repr=False)
    #: An API token (2.x, 3.x, Cloud), sent as ``Authorization: Token ...``; never logged.
    token: str = Field(default="", repr=False)


@dataclass(frozen=True, config=_STRICT)
class OutputConfig:
    measurement: Measurement = "anomaly_error"
    retention_policy: str = ""
    write_reconstruction: Bool = False
    reconstruction_measurement: Measurement = "anomaly_reconstruction"
    stats_measurement: Measurement = "anomalyd_stats"
    #: Multi-field signals: one point per field per written window (share, error, direction, value); "" = off.
    attribution_measurement: Annotated[str, _check(lambda v: v and _measurement_name(v))] = "anomaly_attribution"


@dataclass(frozen=True, config=_STRICT)
class PathsConfig:
    """Where trained models and the daemon's state live (relative to the config file's directory)."""

    models: FilePath = Field(default=Path("var/models"), validate_default=True)
    state: FilePath = Field(default=Path("var/state"), validate_default=True)


@dataclass(frozen=True, config=_STRICT)
class DaemonConfig:
    interval_s: Annotated[Seconds, Positive] = Field(default=16.0, alias="interval")
    lateness_ns: Nanoseconds = Field(default=30 * 10**9, alias="lateness")
    max_backlog_windows: Annotated[Int, Positive] = 10_000
    write_batch: Annotated[Int, Positive] = 10_000
    health_listen: Annotated[str, _check(_listen_problem)] = "127.0.0.1:9108"
    max_backoff_s: Annotated[Seconds, Positive] = Field(default=300.0, alias="max_backoff")
    refit_every_s: Seconds = Field(default=0.0, alias="refit_every")
    #: How far back windows written as missing are re-scored when their samples arrive late (0: never).
    rescore_horizon_s: Seconds = Field(default=3600.0, alias="rescore_horizon")
    #: This replica's share of the series, ``(index, count)`` from ``shard = "I/N"``; None: every series.
    shard: Annotated[tuple[int, int] | None, BeforeValidator(_shard)] = None


@dataclass(frozen=True, config=_STRICT)
class SlackConfig:
    channel: str = ""
    timeout_s: Annotated[Seconds, Positive] = Field(default=5.0, alias="timeout")
    max_retries: Annotated[Int, NonNegative] = 3
    attach_plot: Bool = True
    base_url: str = "https://slack.com/api/"
    webhook_url: str = Field(default="", repr=False)
    token: str = Field(default="", repr=False)


@dataclass(frozen=True, config=_STRICT)
class AlertsConfig:
    sinks: Annotated[tuple[str, ...], BeforeValidator(_sinks)] = ("log",)
    for_windows: Annotated[Int, Positive] = 1
    recover_windows: Annotated[Int, Positive] = 32
    repeat_every_s: Seconds = Field(default=0.0, alias="repeat_every")
    missing_data: Bool = False
    dashboard_url: str = ""
    #: A series whose newest scored window is older than this raises a ``deadman`` alert (0: off).
    deadman_s: Seconds = Field(default=600.0, alias="deadman")
    slack: SlackConfig = Field(default_factory=SlackConfig)

    @model_validator(mode="after")
    def _slack_needs_a_secret(self, info: ValidationInfo) -> AlertsConfig:
        slack = self.slack
        if _from_file(info) and "slack" in self.sinks and not (slack.webhook_url or (slack.token and slack.channel)):
            raise _error("plain", "'slack' needs ANOMALYD_SLACK_WEBHOOK_URL (or alerts.slack.webhook_url_file), "
                                  "or ANOMALYD_SLACK_TOKEN with alerts.slack.channel", at="sinks")
        return self


@dataclass(frozen=True, config=_STRICT)
class KapacitorConfig:
    url: Annotated[str, _url("http://127.0.0.1:9092")] = "http://127.0.0.1:9092"
    task_prefix: Annotated[str, _rule(lambda v: re.match(r"^[A-Za-z0-9_\-]+$", v) is not None,
                                      "must be letters, digits, '-' or '_'")] = "anomalyd"
    slack_channel: str = ""
    batch_every: Annotated[str, _rule(lambda v: _DURATION_RE.match(v) is not None,
                                      "must be a duration like '1m'")] = "1m"


@dataclass(frozen=True, config=_STRICT)
class Config:
    """The whole validated configuration; pass it (or the part a module needs) down."""

    influxdb: InfluxConfig = Field(default_factory=InfluxConfig)
    output: OutputConfig = Field(default_factory=OutputConfig)
    paths: PathsConfig = Field(default_factory=PathsConfig)
    daemon: DaemonConfig = Field(default_factory=DaemonConfig)
    alerts: AlertsConfig = Field(default_factory=AlertsConfig)
    kapacitor: KapacitorConfig = Field(default_factory=KapacitorConfig)
    signals: Annotated[tuple[SignalConfig, ...], _non_empty_list(
        "plain", "at least one [[signals]] table is required (name, measurement, field, period)")] = Field(
        default=(), validate_default=True)
    #: The file the configuration was read from (set by `load`; not a key of the file).
    source: str = Field(default="<config>", alias="<source>")

    def signal(self, name: str) -> SignalConfig:
        for s in self.signals:
            if s.name == name:
                return s
        raise KeyError(f"no signal named {name!r}; configured: {', '.join(s.name for s in self.signals)}")


# ---------------------------------------------------------------------------------------------------------
# Where values come from (the file, ANOMALYD_* variables, secret files), and problems as lines. The variables are
# read here, not by pydantic-settings: its BaseSettings is a model, not a dataclass; `from_dict` takes an explicit
# env mapping; a misspelled ANOMALYD_ variable is reported; a bad value names the variable that set it.

#: ``ANOMALYD_<SECTION>_<KEY>``: the section each variable prefix sets.
_ENV_SECTIONS = {"INFLUXDB": ("influxdb",), "OUTPUT": ("output",), "PATHS": ("paths",), "DAEMON": ("daemon",),
                 "ALERTS": ("alerts",), "SLACK": ("alerts", "slack"), "KAPACITOR": ("kapacitor",)}
_CONFIG = TypeAdapter(Config)


def _keys(cls: Any) -> dict[str, FieldInfo]:
    """A table's TOML keys (a field's alias, else its name) and their fields."""
    return {f.alias or name: f for name, f in cls.__pydantic_fields__.items() if name != "source"}


def _secrets(cls: Any) -> list[str]:
    return [k for k, f in _keys(cls).items() if not f.repr]


def _table_of(field: FieldInfo) -> Any:
    """The class of the table (or tables) a field holds; None for a value."""
    return next((t for t in (field.annotation, *get_args(field.annotation)) if is_pydantic_dataclass(t)), None)


def _accepted(cls: Any, values_only: bool = False) -> list[str]:
    """The keys a file may set in a table of ``cls`` (secrets only as ``<key>_file``)."""
    return sorted([k for k, f in _keys(cls).items() if f.repr and not (values_only and _table_of(f))]
                  + [f"{k}_file" for k in _secrets(cls)])


def _field_at(loc: tuple[str | int, ...]) -> tuple[Any, FieldInfo | None]:
    """The class of the table ``loc`` (``("signals", 0, "threshold")``) is, and the field naming it."""
    cls: Any = Config
    field = None
    for part in loc:
        if isinstance(part, int):
            continue
        field = _keys(cls).get(part) if cls else None
        if field is None:
            return None, None
        cls = _table_of(field)
    return cls, field


_SECRET_VARS = frozenset(f"{ENV_PREFIX}{sec}_{key.upper()}" for sec, path in _ENV_SECTIONS.items()
                         for key in _secrets(_field_at(path)[0]))


def _table(raw: dict[str, Any], path: tuple[str, ...]) -> dict[str, Any] | None:
    """The table at ``path`` in ``raw``, created if missing (None if something else is in the way)."""
    table: Any = raw
    for part in path:
        table = table.setdefault(part, {})
        if not isinstance(table, dict):
            return None
    return table


def _env_overrides(raw: dict[str, Any], env: Mapping[str, str]) -> dict[str, str]:
    """Apply the ``ANOMALYD_<SECTION>_<KEY>`` variables to ``raw``; return which key path came from which."""
    origin: dict[str, str] = {}
    for name, value in env.items():
        if not name.startswith(ENV_PREFIX) or name in _SECRET_VARS:  # secrets are read by _read_secrets
            continue
        rest = name[len(ENV_PREFIX):]
        sec = next((s for s in _ENV_SECTIONS if rest.startswith(s + "_")), None)
        table = _table(raw, _ENV_SECTIONS[sec]) if sec else None
        if sec and table is not None:
            key = rest[len(sec) + 1:].lower()
            table[key] = value
            origin[".".join((*_ENV_SECTIONS[sec], key))] = name
    return origin


def _line(path: str, text: str, origin: Mapping[str, str]) -> str:
    var = origin.get(path)
    return f"{path}: {text}" + (f" (set by the environment variable {var})" if var else "")


def _read_secrets(raw: dict[str, Any], env: Mapping[str, str], origin: Mapping[str, str]) -> list[str]:
    """Put each secret in its table: from its variable, or from the file ``<key>_file`` names; refuse one written
    in the file."""
    problems = []
    for sec, path in _ENV_SECTIONS.items():
        table = _table(raw, path)
        if table is None:
            continue
        where = ".".join(path)
        for key in _secrets(_field_at(path)[0]):
            var = f"{ENV_PREFIX}{sec}_{key.upper()}"
            if key in table:
                problems.append(f"{where}.{key}: secrets are not read from the config file; set {var} or "
                                f"{key}_file")
            table[key] = env.get(var, "")
            if f"{key}_file" in table:
                fname = table.pop(f"{key}_file")
                try:
                    table[key] = Path(str(fname)).read_text().strip()
                except OSError as exc:
                    problems.append(_line(f"{where}.{key}_file", f"{fname!r} cannot be read ({exc.strerror}); "
                                                                 "point it at a readable file", origin))
    return problems


def _describe(err: ErrorDetails, origin: Mapping[str, str]) -> str:
    """One line for one of pydantic's errors: the key path, the value and what is accepted."""
    ctx = err.get("ctx") or {}
    loc = (*err["loc"], ctx["at"]) if "at" in ctx else tuple(err["loc"])
    path = "".join(f"[{p}]" if isinstance(p, int) else f".{p}" for p in loc).lstrip(".")
    kind, value, msg = err["type"], err["input"], err["msg"]
    if kind in ("unexpected_keyword_argument", "extra_forbidden"):
        table = _field_at(loc[:-1])[0]
        var = origin.get(path)
        if var:  # a misspelled variable: name it, and the variables that would have been read
            prefix = var[: len(var) - len(str(loc[-1]))]
            names = {prefix + k.upper() for k in [*_accepted(table, values_only=True), *_secrets(table)]}
            return f"{var} (environment variable): no setting {path}; accepted: {', '.join(sorted(names))}"
        text = f"unknown setting; accepted: {', '.join(_accepted(table))}"
    elif kind in ("missing", "missing_argument"):
        hint = (_field_at(loc)[1] or FieldInfo()).description
        text = "is required" + (f" ({hint})" if hint else "")
    elif kind in ("dataclass_type", "dataclass_exact_type", "dict_type"):
        examples = (_field_at(loc)[1] or FieldInfo()).examples
        text = f"must be a table [{path}]" if len(loc) == 1 else "must be a table" + (
            f", e.g. {examples[0]}" if examples else "")
    elif kind == "rule":
        text = f"{value!r} {msg}"
    elif kind == "plain":
        text = msg
    elif kind == "string_type":
        text = f"{value!r} is not valid: expected a string"
    else:  # "coerce", and pydantic's own
        text = f"{value!r} is not valid: {msg}"
    return _line(path, text, origin)


def load(path: str | Path, env: Mapping[str, str] | None = None) -> Config:
    """Read and validate a TOML configuration file; raise :class:`ConfigError` listing every problem."""
    p = Path(path)
    try:
        raw = tomllib.loads(p.read_text())
    except FileNotFoundError:
        raise ConfigError(str(p), [f"file not found; pass an existing file with -c (cwd is {Path.cwd()})"]) from None
    except tomllib.TOMLDecodeError as exc:
        raise ConfigError(str(p), [f"not valid TOML: {exc}; fix the syntax at that line"]) from None
    return from_dict(raw, source=str(p), env=env, base_dir=p.resolve().parent)


def from_dict(raw: dict[str, Any], source: str = "<config>", env: Mapping[str, str] | None = None,
              base_dir: Path | None = None) -> Config:
    """Validate an already parsed configuration (a TOML document as a dict). ``env`` replaces ``os.environ``."""
    data = copy.deepcopy(raw)
    env = os.environ if env is None else env
    for section in ("influxdb", "output", "paths", "daemon", "alerts", "kapacitor"):
        data.setdefault(section, {})  # so that its defaults are read as the file's (paths: relative to it)
    origin = _env_overrides(data, env)
    problems = _read_secrets(data, env, origin)
    data["<source>"] = source
    try:
        cfg = _CONFIG.validate_python(data, context={"base": base_dir or Path.cwd()}, by_alias=True, by_name=False)
    except ValidationError as exc:
        problems += [_describe(e, origin) for e in exc.errors(include_url=False)]
    if problems:
        raise ConfigError(source, problems)
    return cfg
