"""Kapacitor: the shipped TICKscript templates, rendered with the learned thresholds, and defined over HTTP.

Four templates (the same text is shipped in ``tickscripts/``):

- ``anomaly_stream.tick`` (a): a stream task over every series of the output measurement. Because each point
  carries the detector's own decision (``anomalous``), one task alerts on ``"anomalous" == TRUE`` for all of
  them (the ``crit`` var; ``"score" >= 0.5`` or ``"max_error" > "threshold"`` are documented alternatives),
  grouped by every tag, with ``.stateChangesOnly()``: one message when a series goes anomalous, one when it
  recovers. Missing-data windows neither raise nor clear.
- ``anomaly_batch.tick`` (b): queries the anomalous windows every period (``"missing" = false AND
  "anomalous" = true``) and sends, per series with anomalous windows in the period, one message about its
  worst window (``max("max_error")`` selects it, with its threshold, score, top field and direction).
- ``anomaly_fixed.tick`` (c): the blog's approach, a task per series with a fixed threshold on ``max_error``
  as a var (the operator's explicit threshold, not the detector's decision).
- ``anomaly_deadman.tick`` (d): Kapacitor's ``|deadman(0.0, interval)`` over the scored windows of each series
  (grouped by ``signal`` and ``series``): an alert when a series writes no scored window for ``interval``
  (``alerts.deadman``), and a recovery with its next one.

The messages of (a), (b) and (c) name the window's top field and its direction (``top_field``, ``direction``; for
a multi-field signal also ``top_fields``, see docs/multivariate.md), inside ``{{ if }}`` so that points written
without them render as before.

:func:`render` writes the templates, their vars files and a ``define.sh`` for the ``kapacitor`` CLI;
:func:`define` creates or updates the tasks through Kapacitor's HTTP API (``/kapacitor/v1/tasks``).
"""

from __future__ import annotations

import json
import logging
import math
import re
import shlex
import unicodedata
from collections.abc import Collection, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Protocol
from urllib.parse import quote, urlsplit, urlunsplit

import requests

from .config import Config, parse_duration_ns
from .records import Tags, tags_str

log = logging.getLogger(__name__)

#: The var types Kapacitor accepts in a task's or template's ``vars``.
VAR_TYPES = ("bool", "int", "float", "duration", "string", "regex", "lambda", "star", "list")
TASK_KINDS = ("stream", "batch", "fixed", "deadman")
#: The task kinds created enabled unless told otherwise.
DEFAULT_ENABLE = ("stream", "deadman")
#: Kapacitor's own rule for a task id (services/task_store/service.go, ``validTaskID``):
#: ``^[-\._\p{L}0-9]+$``, i.e. any Unicode letter, the ASCII digits 0-9, '-', '.' and '_'. Python's ``\w``
#: is wider (it also takes non-ASCII digits such as U+0661 and other numerics such as U+00B2), which Kapacitor
#: refuses.
_TASK_ID_PUNCT = frozenset("-._0123456789")

#: The name InfluxDB 1.x gives the default retention policy it creates with a database.
INFLUX_DEFAULT_RP = "autogen"


def valid_task_id(task_id: str) -> bool:
    """Whether Kapacitor accepts ``task_id``: letters (any script), ASCII digits, '-', '.' and '_'.

    Examples
    --------
    >>> valid_task_id("anomalyd_fixed_cpu-1.a"), valid_task_id("anomalyd_fixed_température")
    (True, True)
    >>> valid_task_id("anomalyd_fixed_cpu\u0661"), valid_task_id("x\u00b2"), valid_task_id("a b"), valid_task_id("")
    (False, False, False, False)
    """
    return bool(task_id) and all(c in _TASK_ID_PUNCT or unicodedata.category(c).startswith("L") for c in task_id)


class KapacitorError(RuntimeError):
    """Kapacitor is unreachable, or refused a task (e.g. ``invalid TICKscript: ...``)."""


class ModelSummary(Protocol):
    """What the templates need of a learned model (``catalog.StoredModel`` has these attributes)."""

    @property
    def model_id(self) -> str: ...

    @property
    def signal(self) -> str: ...

    @property
    def tags(self) -> tuple[tuple[str, str], ...]: ...

    @property
    def threshold(self) -> float: ...


@dataclass(frozen=True)
class ModelRef:
    """A plain :class:`ModelSummary`."""

    model_id: str
    signal: str
    tags: Tags
    threshold: float


# ---------------------------------------------------------------------------------------------------------
# The templates. Keep them in sync with tickscripts/ (a test compares them).

_COMMON_VARS = """\
// Measurement anomalyd writes one point per scored window to (output.measurement)
var measurement = 'anomaly_error'

// Dimensions of the alert state: every tag, i.e. one state per series
var groups = [*]

// Slack channel of the alerts ('' = the channel set in the [slack] section of kapacitor.conf)
var slack_channel = ''

// File the alerts are appended to, one JSON object per line (absolute path)
var log_path = '/var/log/kapacitor/anomalyd_alerts.log'
"""

STREAM_TICK = """\
// anomalyd (a): alert when the detector flags a window anomalous (the point's own "anomalous" field).
// One task serves every series of the output measurement. Points: tags signal, series (k=v,k=v), model and
// the signal's group_by tags; fields max_error, threshold, anomalous, score, missing, n_missing, and the
// attribution: top_field and direction (strings), and for a multi-field signal top_share and top_fields.

""" + _COMMON_VARS + """
// Optional extra filter on the points, e.g. lambda: "signal" == 'heartbeat'
var where_filter = lambda: TRUE

// When a window is critical: the detector's decision, written by anomalyd as the "anomalous" field.
// Alternatives: the likelihood score alone, lambda: "score" >= 0.5 (0.5 is the score's red zone, a tail
// probability of 1e-5); or the raw error against its learned threshold, lambda: "max_error" > "threshold"
// (no longer the detector's decision; max_error and threshold are in every scored point for information).
var crit = lambda: "anomalous" == TRUE

// Alert id: one per series
var id = 'anomalyd:{{ index .Tags "signal" }}[{{ index .Tags "series" }}]'

// Alert message: the series, its error, its threshold and its score, and the field that explains the window most
// (top_field) with its direction (up or down: above or below its reconstruction); for a multi-field signal also the
// largest shares (top_fields, e.g. "cpu.usage_user up 62%, mem.used_percent down 21%"). Points written before
// anomalyd wrote these fields have none: the {{ if }} leaves that part out instead of printing <no value>.
var message = '{{ .Level }} {{ index .Tags "signal" }} [{{ index .Tags "series" }}]: max_error \
{{ index .Fields "max_error" | printf "%.4g" }} vs threshold {{ index .Fields "threshold" | printf "%.4g" }} \
(ratio {{ index .Fields "ratio" | printf "%.3g" }}, score {{ index .Fields "score" | printf "%.2f" }})\
{{ if index .Fields "top_field" }}, top field {{ index .Fields "top_field" }} \
{{ index .Fields "direction" }}{{ if index .Fields "top_fields" }} ({{ index .Fields "top_fields" }})\
{{ end }}{{ end }}, model {{ index .Tags "model" }}, window ending {{ .Time }}'

stream
    |from()
        .measurement(measurement)
        .where(where_filter)
        .groupBy(groups)
    // Missing-data windows carry no max_error (and anomalous false): they neither raise nor clear the alert.
    |where(lambda: "missing" == FALSE AND isPresent("max_error"))
    |eval(lambda: "max_error" / "threshold")
        .as('ratio')
        .keep()
    |alert()
        .id(id)
        .message(message)
        .crit(crit)
        .stateChangesOnly()
        .log(log_path)
        .slack()
        .channel(slack_channel)
"""

BATCH_TICK = """\
// anomalyd (b): every period, query the windows the detector flagged anomalous and send one alert per series
// that had any, about its worst window. The query skips missing-data windows (they have no max_error).

// Database and retention policy anomalyd writes to
var db string
var rp = 'autogen'

""" + _COMMON_VARS + """
// Time covered by each query and how often it runs; equal, so that every window is reported once
var period = 1m
var every = 1m

// How far behind now each queried period ends, so that anomalyd has scored and written its windows
var offset = 1m

// Alert id: one per series
var id = 'anomalyd-batch:{{ index .Tags "signal" }}[{{ index .Tags "series" }}]'

// Alert message: the series, the worst window's error, its threshold, its score, its top field and direction
// (and, for a multi-field signal, its largest shares); left out for points written without them
var message = '{{ .Level }} {{ index .Tags "signal" }} [{{ index .Tags "series" }}]: max_error \
{{ index .Fields "max_error" | printf "%.4g" }} vs threshold {{ index .Fields "threshold" | printf "%.4g" }} \
(ratio {{ index .Fields "ratio" | printf "%.3g" }}, score {{ index .Fields "score" | printf "%.2f" }})\
{{ if index .Fields "top_field" }}, top field {{ index .Fields "top_field" }} \
{{ index .Fields "direction" }}{{ if index .Fields "top_fields" }} ({{ index .Fields "top_fields" }})\
{{ end }}{{ end }}, model {{ index .Tags "model" }}, window ending {{ .Time }}'

// The worst anomalous window of each series in the period; Kapacitor adds the time range and the GROUP BY.
// max() is a selector: "threshold", "score", "anomalous", "top_field", "direction" and "top_fields" (and the time)
// are those of the window with the largest max_error. Without it the alert would report the period's first
// anomalous window, not its worst. The string fields cannot be aggregated, and need not be: they come with the
// selected point. A window without them (written before anomalyd wrote them; top_fields: a single-field signal)
// answers null, which Kapacitor leaves out of the point; the message then omits them.
// To alert on something other than the detector's decision, put the same test in the WHERE condition and in
// the crit lambda below, e.g. "score" >= 0.5, or "max_error" > "threshold" (no longer the detector's decision).
var query = 'SELECT max("max_error") AS "max_error", "threshold", "score", "anomalous", "top_field", "direction", \
"top_fields" FROM "' + db + '"."' + rp + '"."' + measurement + '" WHERE "missing" = false AND "anomalous" = true'

batch
    |query(query)
        .period(period)
        .every(every)
        .offset(offset)
        .align()
        .groupBy(groups)
    |eval(lambda: "max_error" / "threshold")
        .as('ratio')
        .keep()
    |alert()
        .id(id)
        .message(message)
        .crit(lambda: "anomalous" == TRUE)
        .log(log_path)
        .slack()
        .channel(slack_channel)
"""

FIXED_TICK = """\
// anomalyd (c): the blog's approach, one task per series with a fixed threshold on max_error as a var.
// `anomalyd kapacitor render` writes one vars file per model, filled from the catalog's learned threshold;
// the operator may set another. This alerts on max_error alone, not on the detector's decision (anomalous).

""" + _COMMON_VARS + """
// The series this task watches, e.g. lambda: "signal" == 'heartbeat' AND "series" == 'patient=p1'
var where_filter lambda

// The fixed threshold on max_error, learned by `anomalyd train`
var threshold float

// Alert id: one per series
var id = 'anomalyd-fixed:{{ index .Tags "signal" }}[{{ index .Tags "series" }}]'

// Alert message: the series, its error and the fixed threshold, and the top field with its direction (and, for
// a multi-field signal, the largest shares); left out for points written without them
var message = '{{ .Level }} {{ index .Tags "signal" }} [{{ index .Tags "series" }}]: max_error \
{{ index .Fields "max_error" | printf "%.4g" }} vs fixed threshold \
{{ index .Fields "fixed_threshold" | printf "%.4g" }} (ratio {{ index .Fields "ratio" | printf "%.3g" }}, \
score {{ index .Fields "score" | printf "%.2f" }})\
{{ if index .Fields "top_field" }}, top field {{ index .Fields "top_field" }} \
{{ index .Fields "direction" }}{{ if index .Fields "top_fields" }} ({{ index .Fields "top_fields" }})\
{{ end }}{{ end }}, model {{ index .Tags "model" }}, window ending {{ .Time }}'

stream
    |from()
        .measurement(measurement)
        .where(where_filter)
        .groupBy(groups)
    // Missing-data windows carry no max_error: they neither raise nor clear the alert.
    |where(lambda: "missing" == FALSE AND isPresent("max_error"))
    |eval(lambda: threshold, lambda: "max_error" / threshold)
        .as('fixed_threshold', 'ratio')
        .keep()
    |alert()
        .id(id)
        .message(message)
        .crit(lambda: "max_error" > threshold)
        .stateChangesOnly()
        .log(log_path)
        .slack()
        .channel(slack_channel)
"""

DEADMAN_TICK = """\
// anomalyd (d): deadman, one alert for each series that stops being scored. Kapacitor's |deadman counts the
// scored windows (missing = false) each series (signal, series) writes, every interval, and raises when a series
// writes none for a whole interval; the next scored window recovers it. Missing-data windows do not count:
// anomalyd writes them for a while after a series stops reporting. Kapacitor watches a series from its first
// point after the task starts (it does not know series that stopped before); anomalyd's own deadman alert
// (alerts.deadman) knows every series it has scored.

// Measurement anomalyd writes one point per scored window to (output.measurement)
var measurement = 'anomaly_error'

// Dimensions of the deadman: one per series (the tags anomalyd writes to name it)
var groups = ['signal', 'series']

// How long a series may go without a scored window before the alert (alerts.deadman)
var interval = 10m

// Slack channel of the alerts ('' = the channel set in the [slack] section of kapacitor.conf)
var slack_channel = ''

// File the alerts are appended to, one JSON object per line (absolute path)
var log_path = '/var/log/kapacitor/anomalyd_alerts.log'

// Alert id: one per series
var id = 'anomalyd-deadman:{{ index .Tags "signal" }}[{{ index .Tags "series" }}]'

// Alert message: the series, and whether it stopped or came back
var message = '{{ .Level }} {{ index .Tags "signal" }} [{{ index .Tags "series" }}]: \
{{ if eq .Level "OK" }}scored again{{ else }}deadman: no scored window in the last interval \
({{ index .Fields "emitted" | printf "%.0f" }} written); is the series still reporting and anomalyd running?{{ end }}'

stream
    |from()
        .measurement(measurement)
        .groupBy(groups)
    |where(lambda: "missing" == FALSE)
    |deadman(0.0, interval)
        .id(id)
        .message(message)
        .stateChangesOnly()
        .log(log_path)
        .slack()
        .channel(slack_channel)
"""

#: Template file name -> (task type, script).
TEMPLATES: dict[str, tuple[str, str]] = {
    "anomaly_stream": ("stream", STREAM_TICK),
    "anomaly_batch": ("batch", BATCH_TICK),
    "anomaly_fixed": ("stream", FIXED_TICK),
    "anomaly_deadman": ("stream", DEADMAN_TICK),
}


# ---------------------------------------------------------------------------------------------------------
# Small TICKscript helpers


def tick_string(value: str) -> str:
    r"""A TICKscript string literal that Kapacitor reads back as ``value``.

    Kapacitor's lexer (``tick/ast/lex.go``) ends a single-quoted string at the first quote that no backslash
    precedes, and its parser (``newString`` in ``tick/ast/node.go``) turns backslash-quote into a quote and keeps
    every other backslash as it is (two backslashes stay two). So a quote is written ``\'`` and a backslash as it
    is, but for one at the very end, which would escape the closing quote: such a value is written between triple
    quotes, which Kapacitor reads verbatim (they end at the first three quotes in a row).

    Examples
    --------
    >>> print(tick_string("it's"), tick_string("a\\b"), tick_string("a\\'b"), tick_string("a\\"))
    'it\'s' 'a\b' 'a\\'b' '''a\'''
    """
    if not value.endswith("\\"):
        return "'" + value.replace("'", "\\'") + "'"
    if "''" not in value:
        return "'''" + value + "'''"
    raise KapacitorError(f"{value!r} ends with a backslash and holds two quotes in a row, which no TICKscript "
                         "string can carry; rename the tag value, or use the stream task (a), which needs no "
                         "per-series filter")


def tick_duration(ns: int) -> str:
    """A duration literal for TICKscript vars, in the largest whole unit.

    Examples
    --------
    >>> tick_duration(90 * 10**9), tick_duration(3600 * 10**9), tick_duration(1_500_000)
    ('90s', '1h', '1500u')
    """
    for unit, size in (("w", 7 * 86400 * 10**9), ("d", 86400 * 10**9), ("h", 3600 * 10**9), ("m", 60 * 10**9),
                       ("s", 10**9), ("ms", 10**6), ("u", 10**3)):
        if ns % size == 0 and ns >= size:
            return f"{ns // size}{unit}"
    return f"{ns}ns"


_DECL_RE = re.compile(r"^\s*var\s+([A-Za-z_]\w*)\s+([a-z]+)\s*$")
_ASSIGN_RE = re.compile(r"^\s*var\s+([A-Za-z_]\w*)\s*=\s*(.*)$")


def template_vars(script: str) -> dict[str, tuple[str | None, bool]]:
    """The vars a TICKscript declares: name -> (type, has a default).

    The type of a var with a default is read from its literal (None for a pipeline node).

    Examples
    --------
    >>> template_vars("var a float\\nvar b = 5m\\nvar c = lambda: TRUE\\nvar d = [*]\\nvar e = 'x' + a")
    {'a': ('float', False), 'b': ('duration', True), 'c': ('lambda', True), 'd': ('list', True), \
'e': ('string', True)}
    """
    out: dict[str, tuple[str | None, bool]] = {}
    for line in script.splitlines():
        m = _DECL_RE.match(line)
        if m:
            if m.group(2) not in VAR_TYPES:
                raise KapacitorError(f"var {m.group(1)} has type {m.group(2)!r}; Kapacitor accepts "
                                     f"{', '.join(VAR_TYPES)}")
            out[m.group(1)] = (m.group(2), False)
            continue
        m = _ASSIGN_RE.match(line)
        if m:
            out[m.group(1)] = (_literal_type(m.group(2).strip()), True)
    return out


def _literal_type(v: str) -> str | None:
    if v.startswith("'"):
        return "string"
    if v.startswith("lambda:"):
        return "lambda"
    if v.startswith("["):
        return "list"
    if v.startswith("/"):
        return "regex"
    if v in ("TRUE", "FALSE"):
        return "bool"
    if re.fullmatch(r"\d+(ns|u|µ|ms|s|m|h|d|w)", v):
        return "duration"
    if re.fullmatch(r"-?\d+\.\d*", v):
        return "float"
    if re.fullmatch(r"-?\d+", v):
        return "int"
    return None


def check_vars(script: str, variables: Mapping[str, Mapping[str, Any]], where: str = "") -> None:
    """Raise :class:`KapacitorError` unless ``variables`` fit the script as Kapacitor would require.

    Every var without a default must be given, every given var must be declared with the same type, and
    the values must suit their types.
    """
    declared = template_vars(script)
    problems = []
    for name, (typ, has_default) in declared.items():
        if not has_default and name not in variables:
            problems.append(f"missing value for var {name!r} ({typ})")
    for name, var in variables.items():
        vtype, value = var.get("type"), var.get("value")
        if name not in declared:
            problems.append(f"var {name!r} is not declared in the script")
            continue
        if vtype not in VAR_TYPES:
            problems.append(f"var {name!r} has type {vtype!r}; accepted: {', '.join(VAR_TYPES)}")
            continue
        want = declared[name][0]
        if want is not None and want != vtype:
            problems.append(f"var {name!r} is given as {vtype} but declared {want}")
        if not _value_fits(str(vtype), value):
            problems.append(f"var {name!r}: {value!r} is not a valid {vtype}")
    if problems:
        raise KapacitorError(f"vars{' for ' + where if where else ''} do not fit the script: "
                             + "; ".join(problems))


def _value_fits(vtype: str, value: Any) -> bool:
    if vtype == "bool":
        return isinstance(value, bool)
    if vtype == "int":
        return isinstance(value, int) and not isinstance(value, bool)
    if vtype == "float":
        return isinstance(value, int | float) and not isinstance(value, bool) and math.isfinite(value)
    if vtype == "duration":
        return (isinstance(value, int) and not isinstance(value, bool)) or (
            isinstance(value, str) and re.fullmatch(r"\d+(ns|u|µ|ms|s|m|h|d|w)", value) is not None)
    if vtype in ("string", "regex", "lambda"):
        return isinstance(value, str) and (vtype == "string" or bool(value))
    if vtype == "star":
        return True
    if vtype == "list":
        return isinstance(value, list) and all(
            isinstance(v, dict) and v.get("type") in ("string", "star")
            and _value_fits(v["type"], v.get("value")) for v in value)
    return False


# ---------------------------------------------------------------------------------------------------------
# Tasks filled from the config and the catalog


@dataclass(frozen=True)
class TaskSpec:
    """One Kapacitor task: what ``POST /kapacitor/v1/tasks`` receives (plus the template it comes from)."""

    id: str
    template: str
    type: str
    dbrps: tuple[tuple[str, str], ...]
    vars: dict[str, dict[str, Any]]
    status: str

    @property
    def script(self) -> str:
        return TEMPLATES[self.template][1]

    def payload(self) -> dict[str, Any]:
        """The JSON body of the create request."""
        return {"id": self.id, "type": self.type, "dbrps": [{"db": d, "rp": r} for d, r in self.dbrps],
                "script": self.script, "vars": self.vars, "status": self.status}


def output_rp(cfg: Config, default_rp: str = INFLUX_DEFAULT_RP) -> str:
    """The retention policy the error points go to, resolved as the writer resolves it.

    ``output.retention_policy``, else ``influxdb.retention_policy``, else the database's default retention
    policy. anomalyd then writes without ``rp`` and InfluxDB stores the points in its default RP, and forwards
    them to Kapacitor's subscription under that RP's name. A Kapacitor task needs that name (its ``dbrps`` and
    the batch query's ``"db"."rp"``): ``default_rp``, ``autogen`` unless the database's default was changed
    (``SHOW RETENTION POLICIES ON <db>``; set ``influxdb.retention_policy`` or pass ``default_rp`` then).
    """
    return cfg.output.retention_policy or cfg.influxdb.retention_policy or default_rp


def batch_offset_ns(cfg: Config) -> int:
    """How far behind now the batch query's period ends: the lateness allowance plus two tick intervals,
    rounded up to a second, so that anomalyd has written the windows of a period before Kapacitor reads it."""
    return math.ceil(cfg.daemon.lateness_ns / 1e9 + 2 * cfg.daemon.interval_s) * 10**9


def _var(vtype: str, value: Any) -> dict[str, Any]:
    return {"type": vtype, "value": value}


def _common(cfg: Config) -> dict[str, dict[str, Any]]:
    return {"measurement": _var("string", cfg.output.measurement),
            "groups": _var("list", [_var("star", "")]),
            "slack_channel": _var("string", cfg.kapacitor.slack_channel)}


def series_filter(model: ModelSummary) -> str:
    """The lambda (without ``lambda:``) that selects a model's series in the output measurement.

    A model without tags (``scope = "shared"``) covers every series of its signal.

    Examples
    --------
    >>> series_filter(ModelRef("cpu-1", "cpu", (("host", "h1"),), 0.5))
    '"signal" == \\'cpu\\' AND "series" == \\'host=h1\\''
    """
    expr = f'"signal" == {tick_string(model.signal)}'
    if model.tags:
        expr += f' AND "series" == {tick_string(tags_str(model.tags))}'
    return expr


def tasks(cfg: Config, models: Sequence[ModelSummary] = (), enable: Collection[str] = DEFAULT_ENABLE, *,
          default_rp: str = INFLUX_DEFAULT_RP) -> list[TaskSpec]:
    """The tasks for this configuration: (a) stream, (b) batch, (d) deadman, and (c) one fixed-threshold task
    per model.

    ``enable`` names the kinds created enabled (``stream``, ``batch``, ``fixed``, ``deadman``); the others are
    created disabled, ready to be switched on. Stream and batch alert on the same windows, so enable one of them.
    The deadman task's interval is ``alerts.deadman``; with ``alerts.deadman = "0s"`` (off) it is created
    disabled, with the template's default interval.
    The retention policy is the writer's (see :func:`output_rp`; ``default_rp`` names the database's default).
    """
    rp = output_rp(cfg, default_rp)
    bad = set(enable) - set(TASK_KINDS)
    if bad:
        raise KapacitorError(f"unknown task kind(s) {sorted(bad)}; choose from {', '.join(TASK_KINDS)}")
    for name in (cfg.influxdb.database, rp, cfg.output.measurement):
        if '"' in name or "\\" in name:
            raise KapacitorError(f"{name!r} contains a double quote or backslash, which the batch query "
                                 "cannot quote; rename the database, retention policy or output.measurement")
    prefix = cfg.kapacitor.task_prefix
    dbrps = ((cfg.influxdb.database, rp),)

    def status(kind: str) -> str:
        return "enabled" if kind in enable else "disabled"

    every = tick_duration(parse_duration_ns(cfg.kapacitor.batch_every))
    out = [
        TaskSpec(f"{prefix}_stream", "anomaly_stream", "stream", dbrps, _common(cfg), status("stream")),
        TaskSpec(f"{prefix}_batch", "anomaly_batch", "batch", dbrps,
                 {"db": _var("string", cfg.influxdb.database), "rp": _var("string", rp),
                  **_common(cfg), "period": _var("duration", every), "every": _var("duration", every),
                  "offset": _var("duration", tick_duration(batch_offset_ns(cfg)))}, status("batch")),
    ]
    deadman_ns = round(cfg.alerts.deadman_s * 1e9)
    out.append(TaskSpec(f"{prefix}_deadman", "anomaly_deadman", "stream", dbrps,
                        {"measurement": _var("string", cfg.output.measurement),
                         "slack_channel": _var("string", cfg.kapacitor.slack_channel),
                         **({"interval": _var("duration", tick_duration(deadman_ns))} if deadman_ns > 0 else {})},
                        status("deadman") if deadman_ns > 0 else "disabled"))
    seen: set[str] = set()
    for m in sorted(models, key=lambda m: m.model_id):
        if m.model_id in seen:
            continue
        seen.add(m.model_id)
        threshold = float(m.threshold)
        if not math.isfinite(threshold):
            raise KapacitorError(f"model {m.model_id} has threshold {threshold}; retrain it with "
                                 "`anomalyd train`")
        out.append(TaskSpec(f"{prefix}_fixed_{m.model_id}", "anomaly_fixed", "stream", dbrps,
                            {**_common(cfg), "where_filter": _var("lambda", series_filter(m)),
                             "threshold": _var("float", threshold)}, status("fixed")))
    for t in out:
        if not valid_task_id(t.id):
            raise KapacitorError(f"task id {t.id!r} is not accepted by Kapacitor (letters, the digits 0-9, '-', "
                                 "'.', '_'); change kapacitor.task_prefix or the signal name")
        check_vars(t.script, t.vars, where=t.id)
    return out


def _define_sh(cfg: Config, specs: Sequence[TaskSpec], vars_files: Mapping[str, str]) -> str:
    lines = ["#!/bin/sh",
             "# Loads anomalyd's Kapacitor tasks with the kapacitor CLI.",
             "# Written by `anomalyd kapacitor render`; see docs/alerts.md.",
             "# Set KAPACITOR_URL to reach a Kapacitor other than http://localhost:9092.",
             "set -e", 'cd "$(dirname "$0")"', ""]
    for name, (ttype, _) in TEMPLATES.items():
        lines.append(f"kapacitor define-template {name} -type {ttype} -tick {name}.tick")
    lines.append("")
    for t in specs:
        dbrp = ",".join(f'"{d}"."{r}"' for d, r in t.dbrps)
        lines.append(f"kapacitor define {shlex.quote(t.id)} -template {t.template} "
                     f"-vars {shlex.quote(vars_files[t.id])} -dbrp {shlex.quote(dbrp)}")
        if t.status == "enabled":
            lines.append(f"kapacitor enable {shlex.quote(t.id)}")
    return "\n".join(lines) + "\n"


def render(cfg: Config, out_dir: Path, models: Sequence[ModelSummary] = (),
           enable: Collection[str] = DEFAULT_ENABLE, *, default_rp: str = INFLUX_DEFAULT_RP) -> list[Path]:
    """Write the TICKscripts, their vars files (filled from the config and the learned thresholds) and a
    ``define.sh`` that loads them with the ``kapacitor`` CLI.

    Returns
    -------
    list of Path
        Every file written: ``anomaly_{stream,batch,fixed,deadman}.tick``, ``anomaly_stream.vars.json``,
        ``anomaly_batch.vars.json``, ``anomaly_deadman.vars.json``, one ``anomaly_fixed.<model_id>.vars.json``
        per model, ``define.sh``.
    """
    specs = tasks(cfg, models, enable, default_rp=default_rp)
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    written: list[Path] = []
    for name, (_, script) in TEMPLATES.items():
        path = out_dir / f"{name}.tick"
        path.write_text(script)
        written.append(path)
    vars_files: dict[str, str] = {}
    for t in specs:
        fname = f"{t.template}.vars.json"
        if t.template == "anomaly_fixed":
            fname = f"anomaly_fixed.{t.id.removeprefix(cfg.kapacitor.task_prefix + '_fixed_')}.vars.json"
        path = out_dir / fname
        path.write_text(json.dumps(t.vars, indent=2, sort_keys=True, ensure_ascii=False) + "\n")
        vars_files[t.id] = fname
        written.append(path)
    sh = out_dir / "define.sh"
    sh.write_text(_define_sh(cfg, specs, vars_files))
    sh.chmod(0o755)
    written.append(sh)
    log.info("rendered %d Kapacitor tasks into %s", len(specs), out_dir)
    return written


# ---------------------------------------------------------------------------------------------------------
# HTTP API


def _safe_url(url: str) -> str:
    """``url`` without user:password, for messages."""
    parts = urlsplit(url)
    if parts.username or parts.password:
        host = parts.hostname or ""
        netloc = f"{host}:{parts.port}" if parts.port else host
        return urlunsplit((parts.scheme, netloc, parts.path, parts.query, parts.fragment))
    return url


class _Api:
    def __init__(self, url: str, session: requests.Session, timeout_s: float) -> None:
        self.base = url.rstrip("/") + "/kapacitor/v1"
        self.shown = _safe_url(url.rstrip("/"))
        self.session = session
        self.timeout_s = timeout_s

    def call(self, method: str, path: str, task_id: str, body: dict[str, Any] | None = None
             ) -> tuple[int, dict[str, Any]]:
        try:
            r = self.session.request(method, self.base + path, json=body, timeout=self.timeout_s)
        except requests.RequestException as exc:
            raise KapacitorError(f"cannot reach Kapacitor at {self.shown} ({type(exc).__name__}); check "
                                 "kapacitor.url or pass --url, and that kapacitord is running") from exc
        try:
            data = r.json() if r.content else {}
        except ValueError:
            data = {"error": r.text[:300]}
        if not isinstance(data, dict):
            data = {"error": str(data)[:300]}
        if r.status_code >= 400 and r.status_code != 404:
            error = str(data.get("error") or r.reason)
            if "invalid TICKscript" in error:
                raise KapacitorError(f"Kapacitor rejected task {task_id}: {error}. Fix the template in "
                                     "tickscripts/ or its vars (see `anomalyd kapacitor render`)")
            raise KapacitorError(f"Kapacitor at {self.shown} answered HTTP {r.status_code} to {method} "
                                 f"/kapacitor/v1{path} for task {task_id}: {error}")
        return r.status_code, data


def define(cfg: Config, url: str, out_dir: Path | None = None, models: Sequence[ModelSummary] = (), *,
           enable: Collection[str] = DEFAULT_ENABLE, timeout_s: float = 10.0,
           session: requests.Session | None = None, default_rp: str = INFLUX_DEFAULT_RP) -> list[str]:
    """Create or update the tasks in the Kapacitor at ``url`` through its HTTP API.

    A new task is created with ``POST /kapacitor/v1/tasks`` (id, type, dbrps, script, vars, status). An
    existing one is updated with ``PATCH`` and then, unless it is and stays disabled, disabled and enabled
    again, which is what makes Kapacitor reload it. A task an operator enabled is never disabled.

    Parameters
    ----------
    cfg
        The configuration (database, output measurement, ``[kapacitor]``).
    url
        Kapacitor's base URL, e.g. ``http://127.0.0.1:9092``.
    out_dir
        When given, the rendered files are written there too (see :func:`render`).
    models
        The learned models, for the fixed-threshold tasks.
    enable
        Task kinds created enabled: ``stream`` and ``deadman`` (default), ``batch``, ``fixed``.
    default_rp
        The name of the database's default retention policy, used when neither ``output.retention_policy``
        nor ``influxdb.retention_policy`` is set (see :func:`output_rp`).

    Returns
    -------
    list of str
        The ids of the tasks defined.

    Raises
    ------
    KapacitorError
        Kapacitor is unreachable or refused a task; a compile error quotes Kapacitor's
        ``invalid TICKscript: ...``.
    """
    specs = tasks(cfg, models, enable, default_rp=default_rp)
    if out_dir is not None:
        render(cfg, out_dir, models, enable, default_rp=default_rp)
    own = session is None
    api = _Api(url, session or requests.Session(), timeout_s)
    try:
        return _define_all(api, specs)
    finally:
        if own:
            api.session.close()


def _define_all(api: _Api, specs: Sequence[TaskSpec]) -> list[str]:
    done = []
    for t in specs:
        path = f"/tasks/{quote(t.id, safe='')}"
        code, current = api.call("GET", path, t.id)
        if code == 404:
            api.call("POST", "/tasks", t.id, t.payload())
            log.info("created Kapacitor task %s (%s)", t.id, t.status)
        else:
            update = t.payload()
            del update["id"], update["status"]
            api.call("PATCH", path, t.id, update)
            if current.get("status") == "enabled" or t.status == "enabled":
                api.call("PATCH", path, t.id, {"status": "disabled"})
                api.call("PATCH", path, t.id, {"status": "enabled"})
            log.info("updated Kapacitor task %s", t.id)
        done.append(t.id)
    return done
