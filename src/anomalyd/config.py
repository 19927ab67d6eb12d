"""Configuration: TOML (tomllib) into frozen dataclasses, validated once at load time.

Every problem found is reported at once, each naming its key path and what is accepted. Any scalar setting of
the sections ``influxdb``, ``output``, ``paths``, ``daemon``, ``alerts``, ``alerts.slack`` and ``kapacitor`` can
be overridden by an environment variable ``ANOMALYD_<SECTION>_<KEY>`` (``alerts.slack`` is ``SLACK``), e.g.
``ANOMALYD_INFLUXDB_URL`` or ``ANOMALYD_DAEMON_HEALTH_LISTEN``. Secrets (InfluxDB user, password and API
token, Slack webhook URL and token) are read only from those variables or from a ``*_file`` setting, never from
the TOML itself, and are kept out of every ``repr``.
"""

from __future__ import annotations

import math
import os
import re
import tomllib
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field, replace
from datetime import UTC, datetime
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

from .core.detector import DECISIONS, DetectorSpec

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
#: The shortest ``influxdb.timeout``: below it every request times out, and the failure reads like a network fault.
MIN_TIMEOUT_NS = 100_000_000


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


@dataclass(frozen=True)
class TrainRange:
    """A training range, absolute or relative to the moment training runs."""

    start: str
    end: str

    def resolve(self, now_ns: int) -> tuple[int, int]:
        """Return ``(start_ns, end_ns)``."""
        return parse_time_ns(self.start, now_ns), parse_time_ns(self.end, now_ns)


_SPEC = DetectorSpec()


@dataclass(frozen=True)
class ThresholdConfig:
    """How the hold-out's max errors become the ``threshold`` field (information beside the decision)."""

    policy: str = _SPEC.threshold_policy
    margin: float = _SPEC.margin
    quantile: float = _SPEC.quantile
    k: float = _SPEC.sigma_k


#: Transforms of a field's raw samples before they are aligned (InfluxQL's names; rates are per second).
TRANSFORMS = ("", "derivative", "non_negative_derivative")


@dataclass(frozen=True)
class FieldSpec:
    """One field of a signal: where it is read from, and what the window, the output and the alerts call it.

    ``where`` adds tag equalities to the signal's own (e.g. Telegraf's ``cpu = "cpu-total"``); ``transform``
    turns a counter into a per-second rate (``non_negative_derivative``: a counter reset gives no sample).
    """

    name: str
    measurement: str
    field: str
    where: tuple[tuple[str, str], ...] = ()
    transform: str = ""


@dataclass(frozen=True)
class SignalConfig:
    """One watched signal: one field of a measurement, or several (``fields``), split into series by ``group_by``
    tags. ``measurement``/``field`` are the first field's."""

    name: str
    measurement: str
    field: str
    where: tuple[tuple[str, str], ...]
    group_by: tuple[str, ...]
    period_ns: int
    window: int | None
    train_slide: int
    slide: int
    clusters: int
    random_state: int
    n_init: int
    max_gap: int
    scope: str
    train_where: tuple[tuple[str, str], ...]
    train_range: TrainRange
    holdout: float
    max_train_windows: int
    threshold: ThresholdConfig
    score_history: int = _SPEC.normaliser.long_window
    score_threshold: float = _SPEC.score_threshold
    decision: str = _SPEC.decision
    write_every: int = 1
    #: Every field of the signal, in window order (one for a single-field signal: ``measurement.field``).
    fields: tuple[FieldSpec, ...] = ()

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
                       score_threshold=self.score_threshold, decision=self.decision)

    @property
    def step_ns(self) -> int:
        """Time between two written points: ``write_every`` scored windows of ``slide`` samples each."""
        return self.slide * self.write_every * self.period_ns


@dataclass(frozen=True)
class InfluxConfig:
    url: str = "http://127.0.0.1:8086"
    database: str = "anomalyd"
    retention_policy: str = ""
    timeout_s: float = 10.0
    retries: int = 3
    verify_ssl: bool = True
    gzip: bool = False
    #: "influxql": InfluxQL on /query and line protocol on /write (1.x; 2.x with a DBRP mapping; 3.x).
    #: "flux": Flux on /api/v2/query and /api/v2/write (2.x), in ``org`` and ``bucket``.
    api: str = "influxql"
    org: str = ""
    bucket: str = ""
    username: str = field(default="", repr=False)
    password: str = field(default="", repr=False)
    #: An API token (2.x, 3.x, Cloud), sent as ``Authorization: Token ...``; never logged.
    token: str = field(default="", repr=False)


@dataclass(frozen=True)
class OutputConfig:
    measurement: str = "anomaly_error"
    retention_policy: str = ""
    write_reconstruction: bool = False
    reconstruction_measurement: str = "anomaly_reconstruction"
    stats_measurement: str = "anomalyd_stats"
    #: Multi-field signals: one point per field per written window (share, error, direction, value); "" = off.
    attribution_measurement: str = "anomaly_attribution"


@dataclass(frozen=True)
class PathsConfig:
    models: Path = Path("var/models")
    state: Path = Path("var/state")


@dataclass(frozen=True)
class DaemonConfig:
    interval_s: float = 16.0
    lateness_ns: int = 30 * 10**9
    max_backlog_windows: int = 10_000
    write_batch: int = 10_000
    health_listen: str = "127.0.0.1:9108"
    max_backoff_s: float = 300.0
    refit_every_s: float = 0.0
    #: How far back windows written as missing are re-scored when their samples arrive late (0: never).
    rescore_horizon_s: float = 3600.0
    #: This replica's share of the series, ``(index, count)`` from ``shard = "I/N"``; None: every series.
    shard: tuple[int, int] | None = None


@dataclass(frozen=True)
class SlackConfig:
    channel: str = ""
    timeout_s: float = 5.0
    max_retries: int = 3
    attach_plot: bool = True
    base_url: str = "https://slack.com/api/"
    webhook_url: str = field(default="", repr=False)
    token: str = field(default="", repr=False)


@dataclass(frozen=True)
class AlertsConfig:
    sinks: tuple[str, ...] = ("log",)
    for_windows: int = 1
    recover_windows: int = 32
    repeat_every_s: float = 0.0
    missing_data: bool = False
    dashboard_url: str = ""
    #: A series whose newest scored window is older than this raises a ``deadman`` alert (0: off).
    deadman_s: float = 600.0
    slack: SlackConfig = field(default_factory=SlackConfig)


@dataclass(frozen=True)
class KapacitorConfig:
    url: str = "http://127.0.0.1:9092"
    task_prefix: str = "anomalyd"
    slack_channel: str = ""
    batch_every: str = "1m"


@dataclass(frozen=True)
class Config:
    """The whole validated configuration; pass it (or the part a module needs) down."""

    influxdb: InfluxConfig
    output: OutputConfig
    paths: PathsConfig
    daemon: DaemonConfig
    alerts: AlertsConfig
    kapacitor: KapacitorConfig
    signals: tuple[SignalConfig, ...]
    source: str = "<config>"

    def signal(self, name: str) -> SignalConfig:
        for s in self.signals:
            if s.name == name:
                return s
        raise KeyError(f"no signal named {name!r}; configured: {', '.join(s.name for s in self.signals)}")


# ---------------------------------------------------------------------------------------------------------
# Validation helpers. Each ``_get`` records a problem instead of raising, so that every problem is reported.


class _Checker:
    def __init__(self) -> None:
        self.problems: list[str] = []
        #: key path (``influxdb.url``) -> the environment variable its value came from
        self.from_env: dict[str, str] = {}

    def bad(self, path: str, msg: str) -> None:
        var = self.from_env.get(path)
        self.problems.append(f"{path}: {msg}" + (f" (set by the environment variable {var})" if var else ""))

    def get(self, table: Mapping[str, Any], key: str, path: str, kind: str, default: Any,
            check: Callable[[Any], str | None] | None = None) -> Any:
        full = f"{path}.{key}" if path else key
        if key not in table:
            return default
        raw = table[key]
        try:
            value = _coerce(raw, kind)
        except ValueError as exc:
            self.bad(full, f"{raw!r} is not valid: {exc}")
            return default
        if check is not None:
            msg = check(value)
            if msg:
                self.bad(full, f"{raw!r} {msg}")
                return default
        return value

    def unknown(self, table: Mapping[str, Any], path: str, known: set[str]) -> None:
        for key in table:
            if key not in known:
                full = f"{path}.{key}" if path else key
                var = self.from_env.get(full)
                if var:  # a misspelled variable: name it, and the variables that would have been read
                    prefix = var[: len(var) - len(key)]
                    names = {prefix + k.upper() for k in known} | {v for v in _SECRET_VARS if v.startswith(prefix)}
                    self.problems.append(f"{var} (environment variable): no setting {full}; accepted: "
                                         f"{', '.join(sorted(names))}")
                else:
                    self.bad(full, f"unknown setting; accepted: {', '.join(sorted(known))}")


def _coerce(raw: Any, kind: str) -> Any:
    if kind == "str":
        if not isinstance(raw, str):
            raise ValueError("expected a string")
        return raw
    if kind == "int":
        if isinstance(raw, bool) or not isinstance(raw, int | str):
            raise ValueError("expected an integer")
        try:
            return int(raw)
        except ValueError:
            raise ValueError("expected an integer") from None
    if kind == "float":
        if isinstance(raw, bool) or not isinstance(raw, int | float | str):
            raise ValueError("expected a number")
        try:
            value = float(raw)
        except ValueError:
            raise ValueError("expected a number") from None
        if not math.isfinite(value):
            raise ValueError("expected a finite number")
        return value
    if kind == "bool":
        if isinstance(raw, bool):
            return raw
        if isinstance(raw, str) and raw.lower() in ("true", "1", "yes", "false", "0", "no"):
            return raw.lower() in ("true", "1", "yes")
        raise ValueError("expected true or false")
    if kind == "duration":
        if isinstance(raw, int | float) and not isinstance(raw, bool):
            raise ValueError(f"a bare number has no unit; write it as a string with one, e.g. \"{raw:g}s\" "
                             f"(or \"{raw:g}m\", \"{raw:g}h\")")
        return parse_duration_ns(str(raw))
    raise AssertionError(kind)  # pragma: no cover


def _positive(v: Any) -> str | None:
    return None if v > 0 else "must be greater than 0"


def _non_negative(v: Any) -> str | None:
    return None if v >= 0 else "must be 0 or more"


def _non_negative_or_off(v: Any) -> str | None:
    return None if v >= 0 else 'must be 0 or more ("0s" turns it off)'


def _between(lo: int, hi: int, name: str) -> Callable[[Any], str | None]:
    return lambda v: None if lo <= v <= hi else f"must be between {lo} and {name}={hi}"


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
    """``"I/N"`` as ``(I, N)``; "" (and any invalid text, reported by the checker) as None.

    Examples
    --------
    >>> parse_shard("2/3"), parse_shard("")
    ((2, 3), None)
    """
    m = _SHARD_RE.match(v or "")
    if not m or _shard_problem(v):
        return None
    return int(m.group(1)), int(m.group(2))


def _port_problem(port: str, example: str) -> str | None:
    if not port.isdigit() or not 1 <= int(port) <= 65535:
        return f"has port {port or '(empty)'}; use a port between 1 and 65535, e.g. {example}"
    return None


def _url(c: _Checker, table: Mapping[str, Any], key: str, path: str, default: str, example: str,
         credentials_hint: str = "") -> str:
    """A validated http(s) URL. With ``credentials_hint``, a URL carrying ``user:password@`` is refused with that
    hint; messages never show the password."""
    full = f"{path}.{key}"
    if key not in table:
        return default
    raw = table[key]
    if not isinstance(raw, str):
        c.bad(full, f"{raw!r} is not valid: expected a string such as {example!r}")
        return default
    shown = redact_url(raw)
    try:
        parts = urlsplit(raw.strip())
    except ValueError as exc:
        c.bad(full, f"{shown!r} is not a URL ({exc}); write it like {example!r}")
        return default
    if parts.scheme not in ("http", "https") or not parts.hostname:
        c.bad(full, f"{shown!r} must be an http:// or https:// URL, e.g. {example!r}")
        return default
    if credentials_hint and "@" in parts.netloc:
        c.bad(full, f"{shown!r} carries credentials, which are not read from the URL; remove them and "
                    f"{credentials_hint}")
        return default
    port = parts.netloc.rpartition("@")[2].rpartition("]")[2]
    if ":" in port:
        msg = _port_problem(port.rpartition(":")[2], example)
        if msg:
            c.bad(full, f"{shown!r} {msg}")
            return default
    return raw.strip()


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


def _one_of(options: tuple[str, ...]) -> Callable[[Any], str | None]:
    return lambda v: None if v in options else f"is not one of: {', '.join(options)}"


def _tags(c: _Checker, table: Mapping[str, Any], key: str, path: str) -> tuple[tuple[str, str], ...]:
    raw = table.get(key, {})
    if not isinstance(raw, dict) or not all(isinstance(v, str) for v in raw.values()):
        c.bad(f"{path}.{key}", f"{raw!r} must be a table of tag = \"value\" strings, e.g. {{ host = \"h1\" }}")
        return ()
    return tuple(sorted(raw.items()))


_SECRET_VARS = frozenset({"ANOMALYD_INFLUXDB_USERNAME", "ANOMALYD_INFLUXDB_PASSWORD", "ANOMALYD_INFLUXDB_TOKEN",
                          "ANOMALYD_SLACK_WEBHOOK_URL", "ANOMALYD_SLACK_TOKEN"})


def _env_overrides(raw: dict[str, Any], env: Mapping[str, str]) -> dict[str, str]:
    """Apply the ``ANOMALYD_<SECTION>_<KEY>`` variables to ``raw``; return which key path came from which."""
    origin: dict[str, str] = {}
    sections = {"INFLUXDB": ("influxdb",), "OUTPUT": ("output",), "PATHS": ("paths",), "DAEMON": ("daemon",),
                "ALERTS": ("alerts",), "SLACK": ("alerts", "slack"), "KAPACITOR": ("kapacitor",)}
    for name, value in env.items():
        if not name.startswith(ENV_PREFIX) or name in _SECRET_VARS:  # secrets are read by _secret
            continue
        rest = name[len(ENV_PREFIX):]
        for sec, path in sections.items():
            if rest.startswith(sec + "_"):
                table = raw
                for part in path:
                    table = table.setdefault(part, {})
                    if not isinstance(table, dict):
                        break
                else:
                    key = rest[len(sec) + 1:].lower()
                    table[key] = value
                    origin[".".join((*path, key))] = name
                break
    return origin


def _secret(c: _Checker, table: dict[str, Any], key: str, path: str, env_name: str,
            env: Mapping[str, str]) -> str:
    if key in table:
        c.bad(f"{path}.{key}", f"secrets are not read from the config file; set {env_name} or {key}_file")
        table.pop(key)
    value = env.get(env_name, "")
    file_key = f"{key}_file"
    if file_key in table:
        fname = table.pop(file_key)
        try:
            value = Path(str(fname)).read_text().strip()
        except OSError as exc:
            c.bad(f"{path}.{file_key}", f"{fname!r} cannot be read ({exc.strerror}); point it at a readable file")
    return value


# ---------------------------------------------------------------------------------------------------------


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
    """Validate an already parsed configuration (a TOML document as a dict)."""
    import copy

    raw = copy.deepcopy(raw)
    c = _Checker()
    env = os.environ if env is None else env
    c.from_env = _env_overrides(raw, env)
    base = base_dir or Path.cwd()
    top_known = {"influxdb", "output", "paths", "daemon", "alerts", "kapacitor", "signals"}
    c.unknown(raw, "", top_known)
    sec: dict[str, dict[str, Any]] = {}
    for name in top_known - {"signals"}:
        t = raw.get(name, {})
        if not isinstance(t, dict):
            c.bad(name, f"must be a table [{name}]")
            t = {}
        sec[name] = t

    t = sec["influxdb"]
    user = _secret(c, t, "username", "influxdb", "ANOMALYD_INFLUXDB_USERNAME", env)
    password = _secret(c, t, "password", "influxdb", "ANOMALYD_INFLUXDB_PASSWORD", env)
    influx_token = _secret(c, t, "token", "influxdb", "ANOMALYD_INFLUXDB_TOKEN", env)
    c.unknown(t, "influxdb", {"url", "database", "retention_policy", "timeout", "retries", "verify_ssl",
                              "gzip", "api", "org", "bucket"})
    api = c.get(t, "api", "influxdb", "str", InfluxConfig.api, _one_of(APIS))
    if api == "flux":
        for key in ("org", "bucket"):
            if not str(t.get(key, "")).strip():
                c.bad(f"influxdb.{key}", f'is required when influxdb.api = "flux" (the InfluxDB 2.x {key} to '
                                         "read from and write to)")
    url = _url(c, t, "url", "influxdb", InfluxConfig.url, "http://127.0.0.1:8086",
               "set ANOMALYD_INFLUXDB_USERNAME and ANOMALYD_INFLUXDB_PASSWORD (or ANOMALYD_INFLUXDB_TOKEN for an "
               "API token), or influxdb.password_file / influxdb.token_file")
    influx = InfluxConfig(
        url=url.rstrip("/"),
        database=c.get(t, "database", "influxdb", "str", InfluxConfig.database,
                       lambda v: None if v else "must not be empty"),
        retention_policy=c.get(t, "retention_policy", "influxdb", "str", ""),
        timeout_s=c.get(t, "timeout", "influxdb", "duration", 10 * 10**9,
                        lambda v: None if v >= MIN_TIMEOUT_NS else
                        "is too short: no request to InfluxDB can finish in under 0.1s; use e.g. \"10s\"") / 1e9,
        retries=c.get(t, "retries", "influxdb", "int", 3, _non_negative),
        verify_ssl=c.get(t, "verify_ssl", "influxdb", "bool", True),
        gzip=c.get(t, "gzip", "influxdb", "bool", False),
        api=api,
        org=c.get(t, "org", "influxdb", "str", ""),
        bucket=c.get(t, "bucket", "influxdb", "str", ""),
        username=user, password=password, token=influx_token)

    t = sec["output"]
    c.unknown(t, "output", {"measurement", "retention_policy", "write_reconstruction",
                            "reconstruction_measurement", "stats_measurement", "attribution_measurement"})
    nonempty = lambda v: None if v else "must not be empty"  # noqa: E731
    output = OutputConfig(
        measurement=c.get(t, "measurement", "output", "str", OutputConfig.measurement, _measurement_name),
        retention_policy=c.get(t, "retention_policy", "output", "str", ""),
        write_reconstruction=c.get(t, "write_reconstruction", "output", "bool", False),
        reconstruction_measurement=c.get(t, "reconstruction_measurement", "output", "str",
                                         OutputConfig.reconstruction_measurement, _measurement_name),
        stats_measurement=c.get(t, "stats_measurement", "output", "str", OutputConfig.stats_measurement,
                                _measurement_name),
        attribution_measurement=c.get(t, "attribution_measurement", "output", "str",
                                      OutputConfig.attribution_measurement,
                                      lambda v: None if v == "" else _measurement_name(v)))

    t = sec["paths"]
    c.unknown(t, "paths", {"models", "state"})
    paths = PathsConfig(models=base / c.get(t, "models", "paths", "str", "var/models", nonempty),
                        state=base / c.get(t, "state", "paths", "str", "var/state", nonempty))

    t = sec["daemon"]
    c.unknown(t, "daemon", {"interval", "lateness", "max_backlog_windows", "write_batch", "health_listen",
                            "max_backoff", "refit_every", "rescore_horizon", "shard"})

    def listen_problem(v: str) -> str | None:
        if v == "":
            return None
        if not re.match(r"^[\w.\-\[\]:]*:\d+$", v):
            return "must be host:port (e.g. 127.0.0.1:9108) or \"\" to turn the endpoint off"
        msg = _port_problem(v.rpartition(":")[2], "127.0.0.1:9108")
        return msg and msg + ', or "" to turn the endpoint off'

    listen = c.get(t, "health_listen", "daemon", "str", DaemonConfig.health_listen, listen_problem)
    daemon = DaemonConfig(
        interval_s=c.get(t, "interval", "daemon", "duration", 16 * 10**9, _positive) / 1e9,
        lateness_ns=c.get(t, "lateness", "daemon", "duration", 30 * 10**9, _non_negative),
        max_backlog_windows=c.get(t, "max_backlog_windows", "daemon", "int", DaemonConfig.max_backlog_windows,
                                  _positive),
        write_batch=c.get(t, "write_batch", "daemon", "int", 10_000, _positive),
        health_listen=listen,
        max_backoff_s=c.get(t, "max_backoff", "daemon", "duration", 300 * 10**9, _positive) / 1e9,
        refit_every_s=c.get(t, "refit_every", "daemon", "duration", 0, _non_negative) / 1e9,
        rescore_horizon_s=c.get(t, "rescore_horizon", "daemon", "duration", 3600 * 10**9,
                                _non_negative_or_off) / 1e9,
        shard=parse_shard(c.get(t, "shard", "daemon", "str", "", _shard_problem)))

    t = sec["alerts"]
    st = t.pop("slack", {}) if isinstance(t.get("slack", {}), dict) else {}
    c.unknown(t, "alerts", {"sinks", "for_windows", "recover_windows", "repeat_every", "missing_data",
                            "dashboard_url", "deadman"})
    sinks_raw = t.get("sinks", ["log"])
    sinks: tuple[str, ...] = ("log",)
    if isinstance(sinks_raw, str):
        sinks_raw = [s.strip() for s in sinks_raw.split(",") if s.strip()]
    if not isinstance(sinks_raw, list) or any(s not in SINKS for s in sinks_raw):
        c.bad("alerts.sinks", f"{sinks_raw!r} must be a list drawn from: {', '.join(SINKS)}")
    else:
        sinks = tuple(sinks_raw)
    webhook = _secret(c, st, "webhook_url", "alerts.slack", "ANOMALYD_SLACK_WEBHOOK_URL", env)
    token = _secret(c, st, "token", "alerts.slack", "ANOMALYD_SLACK_TOKEN", env)
    c.unknown(st, "alerts.slack", {"channel", "timeout", "max_retries", "attach_plot", "base_url"})
    slack = SlackConfig(
        channel=c.get(st, "channel", "alerts.slack", "str", ""),
        timeout_s=c.get(st, "timeout", "alerts.slack", "duration", 5 * 10**9, _positive) / 1e9,
        max_retries=c.get(st, "max_retries", "alerts.slack", "int", 3, _non_negative),
        attach_plot=c.get(st, "attach_plot", "alerts.slack", "bool", True),
        base_url=c.get(st, "base_url", "alerts.slack", "str", SlackConfig.base_url),
        webhook_url=webhook, token=token)
    if "slack" in sinks and not (webhook or (token and slack.channel)):
        c.bad("alerts.sinks", "'slack' needs ANOMALYD_SLACK_WEBHOOK_URL (or alerts.slack.webhook_url_file), "
                              "or ANOMALYD_SLACK_TOKEN with alerts.slack.channel")
    alerts = AlertsConfig(
        sinks=sinks,
        for_windows=c.get(t, "for_windows", "alerts", "int", 1, _positive),
        recover_windows=c.get(t, "recover_windows", "alerts", "int", AlertsConfig.recover_windows, _positive),
        repeat_every_s=c.get(t, "repeat_every", "alerts", "duration", 0, _non_negative) / 1e9,
        missing_data=c.get(t, "missing_data", "alerts", "bool", False),
        dashboard_url=c.get(t, "dashboard_url", "alerts", "str", ""),
        deadman_s=c.get(t, "deadman", "alerts", "duration", 600 * 10**9, _non_negative_or_off) / 1e9,
        slack=slack)

    t = sec["kapacitor"]
    c.unknown(t, "kapacitor", {"url", "task_prefix", "slack_channel", "batch_every"})
    kapacitor = KapacitorConfig(
        url=_url(c, t, "url", "kapacitor", KapacitorConfig.url, "http://127.0.0.1:9092").rstrip("/"),
        task_prefix=c.get(t, "task_prefix", "kapacitor", "str", KapacitorConfig.task_prefix,
                          lambda v: None if re.match(r"^[A-Za-z0-9_\-]+$", v) else
                          "must be letters, digits, '-' or '_'"),
        slack_channel=c.get(t, "slack_channel", "kapacitor", "str", ""),
        batch_every=c.get(t, "batch_every", "kapacitor", "str", "1m",
                          lambda v: None if _DURATION_RE.match(v) else "must be a duration like '1m'"))

    signals = _signals(c, raw.get("signals"))
    if c.problems:
        raise ConfigError(source, c.problems)
    return Config(influxdb=influx, output=output, paths=paths, daemon=daemon, alerts=alerts,
                  kapacitor=kapacitor, signals=signals, source=source)


_SIGNAL_KEYS = {"name", "measurement", "field", "fields", "where", "group_by", "period", "window", "train_slide",
                "slide", "write_every", "clusters", "random_state", "n_init", "max_gap", "scope", "train_where",
                "train_range", "holdout", "max_train_windows", "threshold", "score_history", "score_threshold",
                "decision"}


def _signals(c: _Checker, raw: Any) -> tuple[SignalConfig, ...]:
    if not isinstance(raw, list) or not raw:
        c.bad("signals", "at least one [[signals]] table is required (name, measurement, field, period)")
        return ()
    out: list[SignalConfig] = []
    names: set[str] = set()
    for i, t in enumerate(raw):
        p = f"signals[{i}]"
        if not isinstance(t, dict):
            c.bad(p, "must be a table")
            continue
        c.unknown(t, p, _SIGNAL_KEYS)
        has_fields = "fields" in t
        if has_fields and "field" in t:
            c.bad(f"{p}.field", "and fields are both set; list every field in fields (a single-field signal "
                                "needs only field)")
        for key in ("name", "period") + (() if has_fields else ("measurement", "field")):
            if key not in t:
                c.bad(f"{p}.{key}", "is required")
        name = c.get(t, "name", p, "str", f"signal{i}",
                     lambda v: None if re.match(r"^[A-Za-z0-9_\-.]+$", v) else
                     "must be letters, digits, '.', '-' or '_' (it names model files)")
        if name in names:
            c.bad(f"{p}.name", f"{name!r} is used by two signals; names must be unique")
        names.add(name)
        window: int | None = None
        raw_window = t.get("window", "auto")
        if raw_window != "auto":
            if isinstance(raw_window, bool) or not isinstance(raw_window, int | str) or not str(raw_window).isdigit():
                c.bad(f"{p}.window", f"{raw_window!r} must be a whole number of samples (at least 4), or \"auto\" "
                                     "(chosen at training)")
            else:
                window = c.get(t, "window", p, "int", None,
                               lambda v: None if v >= 4 else "must be at least 4, or \"auto\" (chosen at training)")
        most = window or _SPEC.min_window
        slide = c.get(t, "slide", p, "int", 1, _between(1, most, "window" if window else "the smallest automatic "
                                                                                    "window"))
        group_by = t.get("group_by", [])
        if not isinstance(group_by, list) or not all(isinstance(g, str) and g for g in group_by):
            c.bad(f"{p}.group_by", f"{group_by!r} must be a list of tag names, e.g. [\"host\"]")
            group_by = []
        fields = _fields(c, t, p) if has_fields else ()
        own = {"signal", "series", "model"} | ({"field"} if len(fields) > 1 else set())
        reserved = sorted(own & set(group_by))
        if reserved:
            c.bad(f"{p}.group_by", f"{reserved} clash with the output's own tags ({', '.join(sorted(own))}); "
                                   "rename the source tag or drop it from group_by")
        scope = c.get(t, "scope", p, "str", "series", _one_of(SCOPES))
        tr = t.get("train_range", "last 7d")
        train_range = TrainRange("now-7d", "now")
        if isinstance(tr, str):
            m = _LAST_RE.match(tr)
            if m:
                train_range = TrainRange(f"now-{m.group(1)}{_LAST_UNIT[m.group(2)]}", "now")
            else:
                c.bad(f"{p}.train_range", f"{tr!r} is not a range; write \"last 7 days\" or "
                                          "[\"2024-01-01T00:00:00Z\", \"2024-01-08T00:00:00Z\"]")
        elif isinstance(tr, list) and len(tr) == 2:
            try:
                a, b = (parse_time_ns(str(x), 10**18) for x in tr)
                if a >= b:
                    c.bad(f"{p}.train_range", f"{tr!r}: the start must be before the end")
                train_range = TrainRange(str(tr[0]), str(tr[1]))
            except ValueError as exc:
                c.bad(f"{p}.train_range", str(exc))
        else:
            c.bad(f"{p}.train_range", f"{tr!r} must be \"last N days\" or a [start, end] pair")
        th = t.get("threshold", {})
        if not isinstance(th, dict):
            c.bad(f"{p}.threshold", "must be a table, e.g. { policy = \"max\", margin = 1.2 }")
            th = {}
        c.unknown(th, f"{p}.threshold", {"policy", "margin", "quantile", "k"})
        pt = f"{p}.threshold"
        threshold = ThresholdConfig(
            policy=c.get(th, "policy", pt, "str", ThresholdConfig.policy, _one_of(POLICIES)),
            margin=c.get(th, "margin", pt, "float", ThresholdConfig.margin, _positive),
            quantile=c.get(th, "quantile", pt, "float", ThresholdConfig.quantile,
                           lambda v: None if 0 < v <= 1 else "must be in (0, 1]"),
            k=c.get(th, "k", pt, "float", ThresholdConfig.k, _positive))
        out.append(SignalConfig(
            name=name,
            measurement=fields[0].measurement if fields else
            c.get(t, "measurement", p, "str", "", lambda v: None if v else "must not be empty"),
            field=fields[0].field if fields else
            c.get(t, "field", p, "str", "", lambda v: None if v else "must not be empty"),
            fields=fields,
            where=_tags(c, t, "where", p),
            group_by=tuple(group_by),
            period_ns=c.get(t, "period", p, "duration", 10**9, _positive),
            window=window,
            train_slide=c.get(t, "train_slide", p, "int", _SPEC.train_slide,
                              _between(1, window, "window") if window else _positive),
            slide=slide,
            clusters=c.get(t, "clusters", p, "int", _SPEC.n_clusters,
                           lambda v: None if v >= 2 else "must be at least 2 (the most shapes in the catalog)"),
            random_state=c.get(t, "random_state", p, "int", _SPEC.random_state),
            n_init=c.get(t, "n_init", p, "int", _SPEC.n_init, _positive),
            max_gap=c.get(t, "max_gap", p, "int", MAX_GAP, _non_negative),
            scope=scope,
            train_where=_tags(c, t, "train_where", p),
            train_range=train_range,
            holdout=c.get(t, "holdout", p, "float", _SPEC.holdout,
                          lambda v: None if 0 < v < 1 else "must be in (0, 1)"),
            max_train_windows=c.get(t, "max_train_windows", p, "int", _SPEC.max_train_windows, _positive),
            threshold=threshold,
            score_history=c.get(t, "score_history", p, "int", _SPEC.normaliser.long_window,
                                lambda v: None if v >= 8 else "must be at least 8 windows"),
            score_threshold=c.get(t, "score_threshold", p, "float", _SPEC.score_threshold,
                                  lambda v: None if 0 < v <= 1 else "must be in (0, 1] (0.5 is the red zone)"),
            decision=c.get(t, "decision", p, "str", _SPEC.decision, _one_of(DECISIONS)),
            write_every=c.get(t, "write_every", p, "int", 1, _positive)))
    return tuple(out)


_FIELD_KEYS = {"measurement", "field", "name", "where", "transform"}


def _fields(c: _Checker, t: Mapping[str, Any], p: str) -> tuple[FieldSpec, ...]:
    """A signal's ``fields``: names of the signal's ``measurement``, or tables naming their own measurement.

    A field's name is its ``name``, else ``field`` when every field comes from one measurement, else
    ``measurement.field``."""
    raw = t.get("fields")
    example = ('e.g. fields = [{ measurement = "cpu", field = "usage_user", where = { cpu = "cpu-total" } }, '
               '{ measurement = "net", field = "bytes_recv", transform = "non_negative_derivative" }]')
    if not isinstance(raw, list) or not raw:
        c.bad(f"{p}.fields", f"{raw!r} must be a non-empty list of field names or tables; {example}")
        return ()
    default_meas = t.get("measurement", "")
    if not isinstance(default_meas, str):
        default_meas = ""
    parsed: list[tuple[str | None, str, str, tuple[tuple[str, str], ...], str]] = []
    for j, item in enumerate(raw):
        q = f"{p}.fields[{j}]"
        if isinstance(item, str):
            item = {"field": item}
        if not isinstance(item, dict):
            c.bad(q, f"{item!r} must be a field name or a table; {example}")
            continue
        c.unknown(item, q, _FIELD_KEYS)
        meas = item.get("measurement", default_meas)
        if not isinstance(meas, str) or not meas:
            c.bad(f"{q}.measurement", f"is required (here or as {p}.measurement)")
            continue
        fname = item.get("field")
        if not isinstance(fname, str) or not fname:
            c.bad(f"{q}.field", f"{fname!r} must be the field's name in {meas!r}")
            continue
        name = item.get("name")
        if name is not None and (not isinstance(name, str) or not name.strip()):
            c.bad(f"{q}.name", f"{name!r} must be a non-empty string")
            name = None
        transform = c.get(item, "transform", q, "str", "", lambda v: None if v in TRANSFORMS else
                          'is not a transform; use "non_negative_derivative" (a counter\'s rate per second), '
                          '"derivative", or leave it out')
        parsed.append((name, meas, fname, _tags(c, item, "where", q), transform))
    one = len({m for _, m, _, _, _ in parsed}) <= 1
    out = tuple(FieldSpec(name or (f if one else f"{m}.{f}"), m, f, w, tr) for name, m, f, w, tr in parsed)
    seen: set[str] = set()
    for j, f in enumerate(out):
        if f.name in seen:
            c.bad(f"{p}.fields[{j}]", f"name {f.name!r} is used twice; give one of them a name = \"...\"")
        seen.add(f.name)
    return out
