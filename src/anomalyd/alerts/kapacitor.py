"""Kapacitor: the shipped TICKscript templates, rendered with the learned thresholds, and defined over HTTP.

Four templates, shipped once as package data in ``anomalyd/tickscripts/`` (``src/anomalyd/tickscripts/`` in the
repository, each with a vars example):

- ``anomaly_stream.tick`` (a): a stream task over every series of the output measurement. Because each point
  carries the detector's own decision (``anomalous``), one task alerts on ``"anomalous" == TRUE`` for all of
  them (the ``crit`` var; ``"score" >= 0.5`` or ``"max_error" > "threshold"`` are documented alternatives),
  grouped by every tag, with ``.stateChangesOnly()``: one message when a series goes anomalous, one when it
  recovers, which it does after ``recover_windows`` normal windows in a row (``alerts.recover_windows``, as the
  daemon's own alerts: ``|stateCount`` of the normal windows and ``.critReset``). Missing-data windows neither
  raise nor clear.
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
from importlib.resources import files
from pathlib import Path
from typing import Any, Protocol
from urllib.parse import quote, urlsplit, urlunsplit

import requests

from ..config import Config, parse_duration_ns
from ..core.records import Tags, tags_str

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
# The templates: the package's tickscripts/*.tick files (package data), their one copy.

#: Template name -> task type; the script is ``tickscripts/<name>.tick`` in the package.
TEMPLATE_TYPES: dict[str, str] = {
    "anomaly_stream": "stream",
    "anomaly_batch": "batch",
    "anomaly_fixed": "stream",
    "anomaly_deadman": "stream",
}


def template_text(name: str) -> str:
    """The TICKscript of template ``name``, as shipped in the package's ``tickscripts/`` folder."""
    return files(__package__).joinpath("tickscripts", f"{name}.tick").read_text(encoding="utf-8")


#: Template name -> (task type, script).
TEMPLATES: dict[str, tuple[str, str]] = {name: (ttype, template_text(name)) for name, ttype in TEMPLATE_TYPES.items()}


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
        TaskSpec(f"{prefix}_stream", "anomaly_stream", "stream", dbrps,
                 {**_common(cfg), "recover_windows": _var("int", cfg.alerts.recover_windows)}, status("stream")),
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
                raise KapacitorError(f"Kapacitor rejected task {task_id}: {error}. Fix the template "
                                     "(anomalyd/tickscripts/ in the package) or its vars (see `anomalyd kapacitor "
                                     "render`)")
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
