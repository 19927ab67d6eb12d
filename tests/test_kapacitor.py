"""Kapacitor: the TICKscripts against the output schema, the HTTP exchange against a recording stand-in, and
the batch script's InfluxQL query against a real InfluxDB."""

from __future__ import annotations

import json
import re
import shutil
from collections.abc import Callable, Iterator, Mapping
from dataclasses import replace
from pathlib import Path
from typing import Any

import pytest
import requests

from anomalyd.alerts import kapacitor
from anomalyd.alerts.kapacitor import (
    TEMPLATE_TYPES,
    TEMPLATES,
    VAR_TYPES,
    KapacitorError,
    ModelRef,
    ModelSummary,
    check_vars,
    define,
    render,
    tasks,
    template_vars,
)
from anomalyd.config import Config, from_dict
from anomalyd.core.records import tags_str
from anomalyd.service.catalog import StoredModel, model_id_for
from anomalyd.store.local import LocalInfluxd, free_port
from http_stubs import KapacitorStub, Reply

ROOT = Path(__file__).resolve().parents[1]
SHIPPED = ROOT / "src" / "anomalyd" / "alerts" / "tickscripts"
S = 10**9

# The output schema the worker writes (see the README's output section, and docs/multivariate.md for the
# attribution: top_field and direction on every point, top_share and top_fields for a multi-field signal).
TAGS = {"signal", "series", "model"}
FIELDS = {"max_error": float, "threshold": float, "anomalous": bool, "score": float, "missing": bool,
          "n_missing": int, "top_field": str, "direction": str, "top_share": float, "top_fields": str}
#: The attribution fields, absent from the points written before anomalyd wrote them.
ATTRIBUTION = ("top_field", "direction", "top_fields")
#: The part of every anomaly alert message (not the deadman's) that names the top field and its direction.
TOP_FIELD_PART = ('{{ if index .Fields "top_field" }}, top field {{ index .Fields "top_field" }} '
                  '{{ index .Fields "direction" }}{{ if index .Fields "top_fields" }} '
                  '({{ index .Fields "top_fields" }}){{ end }}{{ end }}')
COMPUTED = {"stream": {"ratio", "normal_streak"}, "batch": {"ratio"}, "fixed": {"ratio", "fixed_threshold"}}


def example_config(database: str = "anomalyd", **influxdb: Any) -> Config:
    return from_dict({
        "influxdb": {"database": database, **influxdb},
        "kapacitor": {"task_prefix": "anomalyd", "slack_channel": "#alerts", "batch_every": "1m"},
        "signals": [{"name": "heartbeat", "measurement": "ecg", "field": "value", "group_by": ["patient"],
                     "period": "1s"}],
    }, env={})


def example_models() -> list[ModelRef]:
    p1, p2 = (("patient", "p1"),), (("patient", "p2"),)
    return [ModelRef(model_id_for("heartbeat", p1, "series"), "heartbeat", p1, 0.42),
            ModelRef(model_id_for("heartbeat", p2, "series"), "heartbeat", p2, 0.5625)]


def _stored_model_is_a_model_summary(m: StoredModel) -> ModelSummary:
    return m  # checked by mypy: the catalog's models can be passed to render/define as they are


@pytest.fixture
def kap() -> Iterator[KapacitorStub]:
    stub = KapacitorStub().start()
    yield stub
    stub.stop()


# ---------------------------------------------------------------------------------------------------------
# The scripts


def test_the_scripts_rendered_are_the_package_files_and_vars_examples_are_current(tmp_path: Path) -> None:
    """The .tick files in the package are the templates' one copy: render writes them byte for byte, and
    nothing else in the package holds a TICKscript."""
    from importlib.resources import files

    packaged = files("anomalyd").joinpath("alerts", "tickscripts")
    assert sorted(p.name for p in packaged.iterdir() if p.name.endswith(".tick")) == sorted(
        f"{n}.tick" for n in TEMPLATE_TYPES)
    assert not (ROOT / "tickscripts").exists()  # no second copy at the top of the repository
    models = example_models()[:1]
    render(example_config(), tmp_path, models)
    for name in TEMPLATE_TYPES:
        assert (tmp_path / f"{name}.tick").read_bytes() == packaged.joinpath(f"{name}.tick").read_bytes()
        assert TEMPLATES[name] == (TEMPLATE_TYPES[name], packaged.joinpath(f"{name}.tick").read_text())
    source = (ROOT / "src" / "anomalyd" / "alerts" / "kapacitor.py").read_text()
    assert "|alert()" not in source and "var measurement" not in source  # the scripts are not also strings here
    (tmp_path / f"anomaly_fixed.{models[0].model_id}.vars.json").rename(tmp_path / "anomaly_fixed.vars.json")
    for name in ("anomaly_stream", "anomaly_batch", "anomaly_fixed", "anomaly_deadman"):
        shipped = json.loads((SHIPPED / f"{name}.vars.json").read_text())
        assert shipped == json.loads((tmp_path / f"{name}.vars.json").read_text()), (
            f"tickscripts/{name}.vars.json differs from what `anomalyd kapacitor render` writes")


def _lambdas(script: str) -> list[str]:
    """Every lambda expression in a script (up to the closing parenthesis of its call, or end of line)."""
    out = []
    for m in re.finditer(r"lambda:", script):
        depth, i = 0, m.end()
        while i < len(script) and script[i] != "\n":
            if script[i] == "(":
                depth += 1
            elif script[i] == ")":
                if depth == 0:
                    break
                depth -= 1
            elif script[i] == "," and depth == 0:
                break
            i += 1
        out.append(script[m.end():i].strip())
    return out


@pytest.mark.parametrize("name", [n for n in TEMPLATES if n != "anomaly_deadman"])  # deadman: its own test
def test_every_identifier_in_the_scripts_is_in_the_output_schema(name: str) -> None:
    script = TEMPLATES[name][1]
    kind = name.removeprefix("anomaly_")
    known = TAGS | set(FIELDS) | COMPUTED[kind]
    # references in lambdas ("field" or "tag"), in the InfluxQL query and in the message templates
    refs = {r for lam in _lambdas(script) for r in re.findall(r'"([^"]+)"', lam)}
    query = re.search(r"^var query = (.*)$", script, re.M)
    if query:
        refs |= set(re.findall(r'"(\w+)"', query.group(1).split("WHERE", 1)[1]))
        refs |= set(re.findall(r'"(\w+)"', query.group(1).split("FROM", 1)[0]))
    tags = set(re.findall(r'index \.Tags "(\w+)"', script))
    fields = set(re.findall(r'index \.Fields "(\w+)"', script))
    assert refs and tags and fields
    assert refs <= known, f"unknown field/tag references {refs - known}"
    assert tags <= TAGS, f"message templates read tags {tags - TAGS} that the points do not carry"
    assert fields <= set(FIELDS) | COMPUTED[kind]
    # the computed fields are produced by the script's eval node
    as_names = set(re.findall(r"'(\w+)'", " ".join(re.findall(r"\.as\(([^)]*)\)", script))))
    assert as_names == COMPUTED[kind]
    # the alert condition is the detector's decision, the point's "anomalous" field (the stream template takes
    # it as a lambda var, so that operators can alert on the score instead); only the fixed-threshold task
    # compares max_error with the operator's threshold var
    crit = re.search(r"\.crit\(lambda: (.*)\)$", script, re.M) or re.search(r"^var crit = lambda: (.*)$", script, re.M)
    assert crit is not None
    assert crit.group(1) == {"stream": '"anomalous" == TRUE', "batch": '"anomalous" == TRUE',
                             "fixed": '"max_error" > threshold'}[kind]
    # missing-data windows (no max_error) are kept out before comparing
    if kind == "batch":
        assert 'WHERE "missing" = false AND "anomalous" = true' in script
        assert 'SELECT max("max_error") AS "max_error", ' in script      # the worst window, not the first
        # the string fields come with the selected point (a selector's other fields), never aggregated
        assert query is not None and all(f'"{f}"' in query.group(1).split("FROM", 1)[0] for f in ATTRIBUTION)
        assert not re.search(r'\w+\("(top_field|direction|top_fields)"\)', query.group(1))
    else:
        assert '|where(lambda: "missing" == FALSE AND isPresent("max_error"))' in script
    if kind != "batch":
        assert ".stateChangesOnly()" in script and ".groupBy(groups)" in script
    for handler in (".slack()", ".channel(slack_channel)", ".log(log_path)", ".message(message)", ".id(id)"):
        assert handler in script


#: A TICKscript string literal as Kapacitor's lexer delimits it: triple-quoted (to the first three quotes), or
#: single-quoted, where only backslash-quote escapes (tick/ast/lex.go, lexSingleOrTripleString).
_STRING = r"(?:'''.*?'''|'(?:\\'|[^'])*')"
_LAMBDA_TOKEN = re.compile(r'\s*(?:"(\w+)"|\b(TRUE|FALSE|AND|OR)\b|isPresent\("(\w+)"\)|(==|!=|>=|<=|>|<|/|\(|\))'
                           rf"|(-?\d+(?:\.\d+)?)|({_STRING})|([a-z_]\w*))")


def kapacitor_string(src: str) -> tuple[str, str]:
    """The value of the TICKscript string literal at the start of ``src`` and the text after it, read as Kapacitor
    reads it: a port of ``lexSingleOrTripleString`` (tick/ast/lex.go) and ``newString`` (tick/ast/node.go).
    Raises ValueError where Kapacitor says "unterminated string"."""
    pos, count, total = 0, 0, 0

    def nxt() -> str:
        nonlocal pos
        pos += 1
        return src[pos - 1] if pos <= len(src) else ""

    def peek() -> str:
        return src[pos] if pos < len(src) else ""

    def emit() -> tuple[str, str]:
        txt, rest = src[:pos], src[pos:]
        if len(txt) >= 6 and txt.startswith("'''"):
            return txt[3:-3], rest
        lit, out, last, i = txt[1:-1], [], 0, 0
        while i < len(lit) - 1:  # Go: for i := 0; i < len(literal)-1; i++ { if `\'` { write; i++; last = i } }
            if lit[i] == "\\" and lit[i + 1] == "'":
                out.append(lit[last:i])
                i += 1
                last = i
            i += 1
        return "".join(out) + lit[last:], rest

    while True:
        if nxt() != "'":
            raise ValueError(f"unterminated string: {src!r}")
        count += 1
        if count == 1 and peek() == "'":
            count += 1
            nxt()
            if peek() != "'":
                return emit()
            count += 1
            nxt()
        if (count == 1 and peek() != "'") or count == 3:
            total = count
            while True:
                r = nxt()
                if r == "\\" and count == 1:
                    if peek() == "'":
                        nxt()
                elif r == "'":
                    count -= 1
                    if count == 0:
                        return emit()
                elif r == "":
                    raise ValueError(f"unterminated string: {src!r}")
                else:
                    count = total


def tick_lambda(expr: str, env: Mapping[str, Any]) -> Callable[[Mapping[str, Any]], Any]:
    """A Python function for a TICKscript lambda of fields/tags, vars, literals, comparisons, AND/OR, isPresent.

    A field the point lacks raises KeyError, as Kapacitor fails the evaluation ("no field or tag exists")."""
    out, i = [], 0
    for tok in _LAMBDA_TOKEN.finditer(expr):
        assert tok.start() == i, f"cannot translate {expr[i:]!r} in {expr!r}"
        i = tok.end()
        field, word, present, op, number, string, var = tok.groups()
        if field:
            out.append(f"p[{field!r}]")
        elif word:
            out.append({"TRUE": "True", "FALSE": "False", "AND": "and", "OR": "or"}[word])
        elif present:
            out.append(f"({present!r} in p)")
        elif op or number:
            out.append(op or number)
        elif string is not None:
            out.append(repr(kapacitor_string(string)[0]))
        else:
            out.append(repr(env[var]))
    assert expr[i:].strip() == "", f"cannot translate {expr[i:]!r}"
    code = compile(" ".join(out), "<lambda>", "eval")
    return lambda p: eval(code, {}, {"p": p})  # our own translation of the shipped scripts


def stream_alerts(script: str, points: list[dict[str, Any]], env: Mapping[str, Any] | None = None
                  ) -> list[tuple[int, str]]:
    """The (time, level) messages a stream template sends for one series with ``.stateChangesOnly()``: the
    points pass ``from().where(where_filter)`` and the ``|where`` node, and the crit lambda (the ``crit`` var's
    default, or the one in ``.crit(...)``) sets the level; an OK point after a critical one is the recovery.
    With a ``|stateCount(...)`` node and ``.critReset(...)`` (Kapacitor's AlertNode: a critical alert stays
    critical until the reset lambda holds, then the levels are evaluated as usual), as the stream template has.

    ``env`` holds the vars' values; the lambda vars (``where_filter``, ``crit``, ``normal``) as expressions."""
    env = dict(env or {})
    count = re.search(r"^\s*\|stateCount\((\w+)\)\n\s*\.as\('(\w+)'\)$", script, re.M)
    reset = re.search(r"\.critReset\(lambda: (.*)\)$", script, re.M)
    for name, value in re.findall(r"^var (\w+) = (\d+)$", script, re.M):  # int vars at their defaults
        env.setdefault(name, int(value))
    counted = None
    if count is not None:
        lam = re.search(rf"^var {count.group(1)} = lambda: (.*)$", script, re.M)
        assert lam is not None
        counted = tick_lambda(str(env.pop(count.group(1), lam.group(1))), env)
    where_filter = re.search(r"^var where_filter = lambda: (.*)$", script, re.M)
    where = re.search(r"^\s*\|where\(lambda: (.*)\)$", script, re.M)
    crit = re.search(r"^var crit = lambda: (.*)$", script, re.M) or re.search(r"\.crit\(lambda: (.*)\)$",
                                                                               script, re.M)
    assert where is not None and crit is not None
    assert ".where(where_filter)" in script
    wf = env.pop("where_filter", where_filter.group(1) if where_filter else None)
    assert wf is not None, "where_filter has no default: give it"
    crit_expr = str(env.pop("crit", crit.group(1)))
    filters = [tick_lambda(str(wf), env), tick_lambda(where.group(1), env)]
    is_crit = tick_lambda(crit_expr, env)
    is_reset = tick_lambda(reset.group(1), env) if reset is not None else None
    level, sent, streak = "OK", [], 0
    for p in points:
        if not all(f(p) for f in filters):
            continue                                    # dropped: neither raises nor clears
        if counted is not None and count is not None:
            streak = max(streak, 0) + 1 if counted(p) else -1  # stateCount: -1 where the lambda is false
            p = {**p, count.group(2): streak}
        if level == "CRITICAL" and is_reset is not None and not is_reset(p):
            continue                                    # stays critical until the reset holds
        new = "CRITICAL" if is_crit(p) else "OK"
        if new != level:
            sent.append((p["time"], new))
            level = new
    return sent


def _point(i: int, max_error: float | None, anomalous: bool, threshold: float = 0.42,
           score: float = 0.1) -> dict[str, Any]:
    if max_error is None:                               # a missing-data window, as the worker writes it
        return {"time": i, "threshold": threshold, "anomalous": False, "missing": True, "n_missing": 7}
    return {"time": i, "max_error": max_error, "threshold": threshold, "anomalous": anomalous, "score": score,
            "missing": False, "n_missing": 0}


# One series: its error passes its threshold at 1 and 5 while the detector calls those windows normal; the
# detector flags 2 and 4, whose error is below the threshold; 3 is a missing-data window.
DECISIONS = [_point(0, 0.2, False), _point(1, 0.9, False, score=0.3), _point(2, 0.3, True, score=0.8),
             _point(3, None, False), _point(4, 0.35, True, score=0.7), _point(5, 0.5, False, score=0.2),
             _point(6, 0.1, False), _point(7, None, False), _point(8, 0.6, True, score=0.9)]


def test_the_stream_task_alerts_on_the_detectors_decision() -> None:
    script = TEMPLATES["anomaly_stream"][1]
    one = {"recover_windows": 1}
    # raised at the first anomalous window and cleared at the first normal one, whatever max_error says;
    # the missing-data windows (3, 7: anomalous false) neither clear the alert nor raise it
    assert stream_alerts(script, DECISIONS, one) == [(2, "CRITICAL"), (5, "OK"), (8, "CRITICAL")]
    # the alternatives documented in the script work as the crit var (with normal, its opposite)
    assert 'lambda: "score" >= 0.5' in script and 'lambda: "max_error" > "threshold"' in script
    assert stream_alerts(script, DECISIONS, {**one, "crit": '"score" >= 0.5', "normal": '"score" < 0.5'}) == [
        (2, "CRITICAL"), (5, "OK"), (8, "CRITICAL")]
    assert stream_alerts(script, DECISIONS, {**one, "crit": '"max_error" > "threshold"',
                                             "normal": '"max_error" <= "threshold"'}) == [
        (1, "CRITICAL"), (2, "OK"), (5, "CRITICAL"), (6, "OK"), (8, "CRITICAL")]


def test_the_stream_task_recovers_after_recover_windows_normal_windows_in_a_row() -> None:
    """A lasting anomaly whose windows alternate red and demoted (the detector's red-zone filter) raises one alert
    and one recovery, after ``recover_windows`` normal windows in a row (missing-data windows do not count),
    as the daemon's own alerts do; the task's var follows ``alerts.recover_windows``."""
    script = TEMPLATES["anomaly_stream"][1]
    assert re.search(r"^var recover_windows = 32$", script, re.M)
    flips = [_point(i, 0.5, i % 2 == 0, score=0.8 if i % 2 == 0 else 0.3) for i in range(20)]
    after = [_point(20 + i, 0.1, False) if i != 2 else _point(22, None, False) for i in range(5)]
    # normal windows 19, 20, 21, then 22 is missing-data (not counted), 23 the fourth normal one
    assert stream_alerts(script, flips + after, {"recover_windows": 4}) == [(0, "CRITICAL"), (23, "OK")]
    assert stream_alerts(script, flips + after) == [(0, "CRITICAL")]  # 32: still critical
    # recovering at the first normal window (1) sends an alert and a recovery per red window
    assert len(stream_alerts(script, flips + after, {"recover_windows": 1})) == 20
    cfg = example_config()
    cfg = replace(cfg, alerts=replace(cfg.alerts, recover_windows=5))
    spec = next(t for t in tasks(cfg) if t.template == "anomaly_stream")
    assert spec.vars["recover_windows"] == {"type": "int", "value": 5}
    # the where_filter var still selects the series
    assert stream_alerts(script, [p | {"signal": "resp"} for p in DECISIONS],
                         {"where_filter": "\"signal\" == 'heartbeat'"}) == []


def test_the_fixed_task_keeps_the_operators_threshold_on_max_error() -> None:
    script = TEMPLATES["anomaly_fixed"][1]
    model = example_models()[0]
    tags = {"signal": model.signal, "series": tags_str(model.tags)}
    points = [p | tags for p in DECISIONS]
    where_filter = kapacitor.series_filter(model)
    assert stream_alerts(script, points, {"where_filter": where_filter, "threshold": 0.42}) == [
        (1, "CRITICAL"), (2, "OK"), (5, "CRITICAL"), (6, "OK"), (8, "CRITICAL")]
    assert stream_alerts(script, points, {"where_filter": where_filter, "threshold": 0.55}) == [
        (1, "CRITICAL"), (2, "OK"), (8, "CRITICAL")]
    other = [p | {"series": "patient=p2"} for p in points]
    assert stream_alerts(script, other, {"where_filter": where_filter, "threshold": 0.42}) == []


# ---------------------------------------------------------------------------------------------------------
# The alert messages: the top field and its direction (issue 10)


_GO_ACTION = re.compile(r"\{\{(.*?)\}\}", re.S)
_GO_TOKEN = re.compile(r'\s*(?:"((?:\\.|[^"\\])*)"|(\|)|(\.[A-Za-z]\w*)|([A-Za-z]\w*)|(-?\d+(?:\.\d+)?))')


def _go_format(value: Any) -> str:
    """How Go's text/template prints a value: nil (a missing map key) as "<no value>"."""
    if value is None:
        return "<no value>"
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, float):
        return repr(value) if "e" not in repr(value) else f"{value:g}"
    return str(value)


def _go_printf(fmt: str, *args: Any) -> str:
    """Go's fmt.Sprintf for the verbs the templates use; a nil argument prints %!verb(<nil>) as Go does."""
    out, i = [], 0
    for m in re.finditer(r"%(?:%|[-+# 0]*\d*(?:\.\d+)?[a-zA-Z])", fmt):
        out.append(fmt[i:m.start()])
        i = m.end()
        spec = m.group(0)
        if spec == "%%":
            out.append("%")
            continue
        arg = args[0] if args else None
        args = args[1:]
        if arg is None:
            out.append(f"%!{spec[-1]}(<nil>)")
        elif spec[-1] in "efg" and not isinstance(arg, int | float):
            out.append(f"%!{spec[-1]}({type(arg).__name__}={arg})")
        elif spec[-1] == "v":
            out.append(_go_format(arg))
        else:
            out.append(spec % arg)
    return "".join(out) + fmt[i:]


def _go_pipeline(text: str, data: Mapping[str, Any]) -> Any:
    """Evaluate a pipeline of ``index``, ``printf``, ``eq`` and ``.Field`` commands joined by ``|``."""
    commands: list[list[Any]] = [[]]
    i = 0
    for tok in _GO_TOKEN.finditer(text):
        assert tok.start() == i, f"cannot read {text[i:]!r} in {{{{{text}}}}}"
        i = tok.end()
        string, bar, dot, word, number = tok.groups()
        if bar:
            commands.append([])
        elif string is not None:
            commands[-1].append(("str", json.loads(f'"{string}"')))
        elif dot:
            commands[-1].append(("val", data[dot[1:]]))               # an unknown .Name fails, as in Go
        elif word:
            commands[-1].append(("fn", word))
        else:
            commands[-1].append(("val", float(number) if "." in number else int(number)))
    assert text[i:].strip() == "", f"cannot read {text[i:]!r}"
    piped: list[Any] = []
    result: Any = None
    for cmd in commands:
        assert cmd, f"empty command in {{{{{text}}}}}"
        kind, head = cmd[0]
        args = [v for _, v in cmd[1:]] + piped
        if kind != "fn":
            assert not args, f"{head!r} is not a function: {{{{{text}}}}}"
            result = head
        elif head == "index":
            assert len(args) == 2 and isinstance(args[0], Mapping), f"index needs a map and a key: {{{{{text}}}}}"
            result = args[0].get(args[1])                             # a missing key: the zero value, nil
        elif head == "printf":
            result = _go_printf(args[0], *args[1:])
        elif head == "eq":
            result = args[0] == args[1]
        else:
            raise AssertionError(f"function {head!r} is not defined")
        piped = [result]
    return result


def go_template(template: str, data: Mapping[str, Any]) -> str:
    """Render a Go text/template as Kapacitor renders an alert's id and message (``.Level``, ``.Time``,
    ``.Tags``, ``.Fields``...), for what the shipped templates use: pipelines of ``index``, ``printf`` and
    ``eq``, and ``if`` / ``else if`` / ``else`` / ``end``. A map key the point lacks is Go's zero value, nil:
    printed ``<no value>``, false in an ``if``. Unbalanced actions raise, as Go's parser does."""
    parts = _GO_ACTION.split(template)  # text, action, text, action, ...
    pos = 0

    def block(data: Mapping[str, Any], emit: bool) -> tuple[str, str]:
        """Render up to an {{ else... }} or {{ end }} (returned) or the end of the template ('')."""
        nonlocal pos
        out = []
        while pos < len(parts):
            chunk, is_action = parts[pos], pos % 2 == 1
            pos += 1
            if not is_action:
                out.append(chunk if emit else "")
                continue
            action = chunk.strip()
            if action == "end" or action == "else" or action.startswith("else if "):
                return "".join(out), action
            if action.startswith("if "):
                taken = False
                cond: str | None = action[3:]
                while True:
                    hit = emit and not taken and (cond is None or bool(_go_pipeline(cond, data)))
                    text, closer = block(data, hit)
                    if hit:
                        out.append(text)
                        taken = True
                    if closer == "end":
                        break
                    assert closer, "{{ if }} without {{ end }}"
                    cond = closer[len("else if "):] if closer.startswith("else if ") else None
                continue
            if emit:
                out.append(_go_format(_go_pipeline(action, data)))
        return "".join(out), ""

    text, closer = block(data, True)
    assert closer == "", f"unexpected {{{{ {closer} }}}}"
    return text


def test_the_go_template_oracle() -> None:
    """The stand-in for Go's text/template behaves as Go does where the messages depend on it."""
    fields = {"x": 0.123456, "s": "cpu up", "empty": ""}
    data = {"Level": "CRITICAL", "Fields": fields, "Tags": {"signal": "a"}, "Time": "T"}
    assert go_template('{{ index .Fields "missing" }}', data) == "<no value>"
    assert go_template('{{ index .Fields "missing" | printf "%.4g" }}', data) == "%!g(<nil>)"
    assert go_template('{{ index .Fields "x" | printf "%.4g" }} {{ index .Tags "signal" }}', data) == "0.1235 a"
    assert go_template('{{ if index .Fields "missing" }}yes{{ end }}|{{ if index .Fields "empty" }}yes{{ end }}'
                       '|{{ if index .Fields "s" }}{{ index .Fields "s" }}{{ end }}', data) == "||cpu up"
    assert go_template('{{ if eq .Level "OK" }}a{{ else if index .Fields "s" }}b{{ else }}c{{ end }}', data) == "b"
    assert go_template('{{ if eq .Level "OK" }}a{{ else }}c{{ if .Time }}d{{ end }}{{ end }}e', data) == "cde"
    with pytest.raises(AssertionError):
        go_template('{{ if index .Fields "s" }}unclosed', data)
    with pytest.raises(AssertionError):
        go_template("{{ end }}", data)


def _message(script: str) -> str:
    m = re.search(r"^var message = (.*)$", script, re.M)
    assert m is not None
    value, rest = kapacitor_string(m.group(1))
    assert rest.strip() == ""
    return value


def _eval_node(script: str, point: Mapping[str, Any], env: Mapping[str, Any]) -> dict[str, Any]:
    """The point after the script's ``|eval(...).as(...).keep()``: every field kept, the computed ones added."""
    m = re.search(r"^\s*\|eval\((.*)\)\n\s*\.as\(([^)]*)\)\n\s*\.keep\(\)$", script, re.M)
    assert m is not None
    names = [kapacitor_string(n.strip())[0] for n in m.group(2).split(",")]
    exprs = _lambdas(m.group(1))
    assert len(names) == len(exprs)
    return dict(point) | {n: tick_lambda(e, env)(point) for n, e in zip(names, exprs, strict=True)}


def alert_message(name: str, point: Mapping[str, Any], tags: Mapping[str, str], level: str = "CRITICAL",
                  env: Mapping[str, Any] | None = None) -> str:
    """The message a template sends for one point (after its eval node), as Kapacitor renders it."""
    script = TEMPLATES[name][1]
    fields = _eval_node(script, {k: v for k, v in point.items() if k not in tags and k != "time"}, env or {})
    return go_template(_message(script), {"Level": level, "Tags": tags, "Fields": fields,
                                          "Time": "2024-01-01 00:00:00 +0000 UTC", "ID": "x", "Name": "anomaly_error"})


#: A window of a multi-field signal, one of a single-field signal, and one written before the attribution fields.
MULTI: dict[str, Any] = {"top_field": "cpu.usage_user", "direction": "up", "top_share": 0.62,
         "top_fields": "cpu.usage_user up 62%, mem.used_percent down 21%, net.bytes_recv up 17%"}
SINGLE: dict[str, Any] = {"top_field": "value", "direction": "down"}
OLD: dict[str, Any] = {}


@pytest.mark.parametrize("name", ["anomaly_stream", "anomaly_batch", "anomaly_fixed"])
def test_the_alert_messages_name_the_top_field_and_its_direction(name: str) -> None:
    script = TEMPLATES[name][1]
    assert TOP_FIELD_PART in _message(script)
    # the message still ends with the model and the window's time, after the attribution
    assert _message(script).endswith(TOP_FIELD_PART + ', model {{ index .Tags "model" }}, window ending {{ .Time }}')
    tags = {"signal": "host", "series": "host=h1", "model": "host-1", "host": "h1"}
    env = {"threshold": 0.5} if name == "anomaly_fixed" else {}
    base = _point(4, 0.8, True, threshold=0.42, score=0.9)
    multi, single, old = (alert_message(name, base | extra, tags, env=env) for extra in (MULTI, SINGLE, OLD))
    head = "CRITICAL host [host=h1]: max_error 0.8 vs "
    assert multi.startswith(head) and single.startswith(head) and old.startswith(head)
    tail = ", model host-1, window ending 2024-01-01 00:00:00 +0000 UTC"
    assert multi.endswith(", score 0.90), top field cpu.usage_user up (cpu.usage_user up 62%, mem.used_percent "
                          "down 21%, net.bytes_recv up 17%)" + tail), multi
    assert single.endswith(", score 0.90), top field value down" + tail), single
    # a point written before anomalyd wrote the attribution: the message as it was, no "<no value>"
    assert old.endswith(", score 0.90)" + tail), old
    for message in (multi, single, old):
        assert "<no value>" not in message and "%!" not in message, message
    # the guard is what keeps "<no value>" out: without it, Go prints it for the old point
    naive = _message(script).replace(TOP_FIELD_PART, ', top field {{ index .Fields "top_field" }}')
    assert "<no value>" in go_template(naive, {"Level": "CRITICAL", "Tags": tags, "Time": "t",
                                               "Fields": _eval_node(script, base, env)})


def test_the_stream_tasks_messages_carry_the_windows_own_top_field() -> None:
    """Raised and recovered with the top field of the window that changed the state."""
    tags = {"signal": "host", "series": "host=h1", "model": "host-1"}
    attribution = {0: SINGLE, 2: MULTI, 4: MULTI | {"top_field": "mem.used_percent", "direction": "down"},
                   5: SINGLE | {"direction": "up"}, 8: OLD}
    points = [p | attribution.get(p["time"], SINGLE) | tags for p in DECISIONS]
    sent = stream_alerts(TEMPLATES["anomaly_stream"][1], points, {"recover_windows": 1})
    assert sent == [(2, "CRITICAL"), (5, "OK"), (8, "CRITICAL")]
    messages = [alert_message("anomaly_stream", points[t], tags, level) for t, level in sent]
    assert "top field cpu.usage_user up (cpu.usage_user up 62%" in messages[0]
    assert messages[1].startswith("OK host [host=h1]") and "top field value up, model" in messages[1]
    assert "top field" not in messages[2] and "<no value>" not in messages[2]


def test_rendered_and_defined_scripts_name_the_top_field(kap: KapacitorStub, tmp_path: Path) -> None:
    """What render writes and what define sends carry the attribution: the files Kapacitor gets, not only the
    Python constants."""
    render(example_config(), tmp_path, example_models())
    define(example_config(), kap.url, models=example_models(), enable=("stream", "batch", "fixed", "deadman"))
    for name in ("anomaly_stream", "anomaly_batch", "anomaly_fixed"):
        script = (tmp_path / f"{name}.tick").read_text()
        assert TOP_FIELD_PART in _message(script)
        assert {"top_field", "direction", "top_fields"} <= set(re.findall(r'index \.Fields "(\w+)"', script))
    assert '"anomalous", "top_field", "direction", "top_fields" FROM' in batch_query(tmp_path)
    sent = {t: kap.tasks[t]["script"] for t in kap.tasks}
    assert len(sent) == 5
    for task_id, script in sent.items():
        has = TOP_FIELD_PART in script
        assert has == (task_id != "anomalyd_deadman"), task_id  # the deadman's message is about silence


@pytest.mark.parametrize("name", list(TEMPLATES))
def test_every_var_the_scripts_use_is_declared_with_an_accepted_type(name: str) -> None:
    script = TEMPLATES[name][1]
    declared = template_vars(script)
    assert all(t in VAR_TYPES for t, _ in declared.values())
    body = "\n".join(line for line in script.splitlines()
                     if not line.lstrip().startswith(("//", "var ")))
    used = set(re.findall(r"\.\w+\(([a-z_]+)\)", body)) | set(re.findall(r"\|query\((\w+)\)", body))
    used |= {w for lam in _lambdas(body) for w in re.findall(r"(?<![\"\w])([a-z_]+)(?![\"\w(])", lam)}
    used -= {"lambda"}
    assert used <= set(declared), f"{name}: undeclared vars {used - set(declared)}"
    # template vars without a default are exactly the ones render must fill
    required = {n for n, (_, has_default) in declared.items() if not has_default}
    assert required == {"anomaly_stream": set(), "anomaly_batch": {"db"},
                        "anomaly_fixed": {"where_filter", "threshold"}, "anomaly_deadman": set()}[name]


def test_vars_files_have_the_types_kapacitor_accepts(tmp_path: Path) -> None:
    paths = render(example_config(), tmp_path, example_models())
    vars_files = [p for p in paths if p.name.endswith(".vars.json")]
    assert len(vars_files) == 5
    for p in vars_files + sorted(SHIPPED.glob("*.vars.json")):
        doc = json.loads(p.read_text())
        template = p.name.split(".")[0]
        check_vars(TEMPLATES[template][1], doc, where=p.name)        # raises on any mismatch
        for name, var in doc.items():
            assert set(var) == {"type", "value"}, (p.name, name)
            assert var["type"] in VAR_TYPES
    fixed = json.loads((tmp_path / f"anomaly_fixed.{example_models()[1].model_id}.vars.json").read_text())
    assert fixed["threshold"] == {"type": "float", "value": 0.5625}
    assert fixed["where_filter"] == {"type": "lambda", "value": "\"signal\" == 'heartbeat' AND \"series\" == "
                                                                "'patient=p2'"}
    batch = json.loads((tmp_path / "anomaly_batch.vars.json").read_text())
    assert {k: batch[k]["value"] for k in ("db", "rp", "period", "every", "offset")} == {
        "db": "anomalyd", "rp": "autogen", "period": "1m", "every": "1m", "offset": "62s"}  # 30s + 2 x 16s
    assert batch["groups"] == {"type": "list", "value": [{"type": "star", "value": ""}]}


def test_check_vars_catches_what_kapacitor_would_reject() -> None:
    fixed = TEMPLATES["anomaly_fixed"][1]
    with pytest.raises(KapacitorError, match=r"missing value for var 'threshold'"):
        check_vars(fixed, {"where_filter": {"type": "lambda", "value": "TRUE"}})
    with pytest.raises(KapacitorError, match="given as string but declared float"):
        check_vars(fixed, {"where_filter": {"type": "lambda", "value": "TRUE"},
                           "threshold": {"type": "string", "value": "0.4"}})
    with pytest.raises(KapacitorError, match="not declared"):
        check_vars(fixed, {"where_filter": {"type": "lambda", "value": "TRUE"},
                           "threshold": {"type": "float", "value": 0.4},
                           "treshold": {"type": "float", "value": 1}})
    with pytest.raises(KapacitorError, match="not a valid duration"):
        check_vars(TEMPLATES["anomaly_batch"][1], {"db": {"type": "string", "value": "x"},
                                "period": {"type": "duration", "value": "1.5m"}})


def test_series_filters_quote_tag_values_and_shared_models_cover_the_signal(tmp_path: Path) -> None:
    odd = ModelRef("cpu-1", "cpu", (("host", "o'brien"),), 1.0)
    shared = ModelRef("cpu", "cpu", (), 2.0)
    assert kapacitor.series_filter(odd) == "\"signal\" == 'cpu' AND \"series\" == 'host=o\\'brien'"
    assert kapacitor.series_filter(shared) == "\"signal\" == 'cpu'"
    # a backslash is kept as it is (Kapacitor unescapes only \'), one at the end is put in triple quotes
    assert kapacitor.series_filter(ModelRef("x", "x", (("k", "a\\b"),), 1.0)) == (
        "\"signal\" == 'x' AND \"series\" == " + kapacitor.tick_string(tags_str((("k", "a\\b"),))))
    with pytest.raises(KapacitorError, match="retrain"):
        kapacitor.tasks(example_config(), [ModelRef("x", "x", (), float("nan"))])


def test_render_writes_a_define_script_for_the_kapacitor_cli(tmp_path: Path) -> None:
    models = example_models()
    paths = render(example_config(), tmp_path, models)
    assert sorted(p.name for p in paths) == sorted([
        "anomaly_stream.tick", "anomaly_batch.tick", "anomaly_fixed.tick", "anomaly_deadman.tick",
        "anomaly_stream.vars.json", "anomaly_batch.vars.json", "anomaly_deadman.vars.json",
        *(f"anomaly_fixed.{m.model_id}.vars.json" for m in models), "define.sh"])
    sh = (tmp_path / "define.sh").read_text().splitlines()
    assert "kapacitor define-template anomaly_batch -type batch -tick anomaly_batch.tick" in sh
    assert ("kapacitor define anomalyd_stream -template anomaly_stream -vars anomaly_stream.vars.json "
            "-dbrp '\"anomalyd\".\"autogen\"'") in sh
    assert "kapacitor enable anomalyd_stream" in sh and "kapacitor enable anomalyd_batch" not in sh
    assert "kapacitor define-template anomaly_deadman -type stream -tick anomaly_deadman.tick" in sh
    assert "kapacitor enable anomalyd_deadman" in sh
    m = models[0]
    assert (f"kapacitor define anomalyd_fixed_{m.model_id} -template anomaly_fixed -vars "
            f"anomaly_fixed.{m.model_id}.vars.json -dbrp '\"anomalyd\".\"autogen\"'") in sh
    assert (tmp_path / "define.sh").stat().st_mode & 0o111


# ---------------------------------------------------------------------------------------------------------
# The HTTP API


def test_define_creates_the_tasks(kap: KapacitorStub) -> None:
    cfg = example_config()
    ids = define(cfg, kap.url, models=example_models())
    m1, m2 = (m.model_id for m in example_models())
    assert ids == ["anomalyd_stream", "anomalyd_batch", "anomalyd_deadman", f"anomalyd_fixed_{m1}",
                   f"anomalyd_fixed_{m2}"]
    calls = list(kap.calls())
    assert calls == [c for tid in ids for c in (("GET", f"/kapacitor/v1/tasks/{tid}"),
                                                ("POST", "/kapacitor/v1/tasks"))]
    post = kap.recorded("/kapacitor/v1/tasks")[1].json
    assert set(post) == {"id", "type", "dbrps", "script", "vars", "status"}
    assert post["id"] == "anomalyd_stream" and post["type"] == "stream" and post["status"] == "enabled"
    assert post["dbrps"] == [{"db": "anomalyd", "rp": "autogen"}]
    assert post["script"] == TEMPLATES["anomaly_stream"][1]
    assert post["vars"]["measurement"] == {"type": "string", "value": "anomaly_error"}
    assert {t: kap.tasks[t]["status"] for t in ids} == {
        "anomalyd_stream": "enabled", "anomalyd_batch": "disabled", "anomalyd_deadman": "enabled",
        f"anomalyd_fixed_{m1}": "disabled", f"anomalyd_fixed_{m2}": "disabled"}
    assert kap.tasks["anomalyd_deadman"]["vars"]["interval"] == {"type": "duration", "value": "10m"}
    assert kap.tasks["anomalyd_batch"]["type"] == "batch"
    assert kap.tasks[f"anomalyd_fixed_{m2}"]["vars"]["threshold"] == {"type": "float", "value": 0.5625}


def test_define_updates_with_patch_then_disable_and_enable(kap: KapacitorStub, tmp_path: Path) -> None:
    cfg = example_config()
    define(cfg, kap.url, models=example_models()[:1])
    kap.tasks["anomalyd_batch"]["status"] = "enabled"               # an operator switched batch on
    kap.requests.clear()
    kap.status_changes.clear()
    retrained = [ModelRef(example_models()[0].model_id, "heartbeat", (("patient", "p1"),), 0.7)]
    ids = define(cfg, kap.url, out_dir=tmp_path / "out", models=retrained)
    fixed = f"anomalyd_fixed_{retrained[0].model_id}"
    base = "/kapacitor/v1/tasks/"
    reload = [("GET", "anomalyd_stream"), ("PATCH", "anomalyd_stream"), ("PATCH", "anomalyd_stream"),
              ("PATCH", "anomalyd_stream"), ("GET", "anomalyd_batch"), ("PATCH", "anomalyd_batch"),
              ("PATCH", "anomalyd_batch"), ("PATCH", "anomalyd_batch"), ("GET", "anomalyd_deadman"),
              ("PATCH", "anomalyd_deadman"), ("PATCH", "anomalyd_deadman"), ("PATCH", "anomalyd_deadman"),
              ("GET", fixed), ("PATCH", fixed)]                    # disabled and staying so: no reload
    assert list(kap.calls()) == [(m, base + t) for m, t in reload]
    patches = [r.json for r in kap.recorded(base + "anomalyd_stream") if r.method == "PATCH"]
    assert set(patches[0]) == {"type", "dbrps", "script", "vars"}
    assert patches[1:] == [{"status": "disabled"}, {"status": "enabled"}]
    assert kap.status_changes == [("anomalyd_stream", "disabled"), ("anomalyd_stream", "enabled"),
                                  ("anomalyd_batch", "disabled"), ("anomalyd_batch", "enabled"),
                                  ("anomalyd_deadman", "disabled"), ("anomalyd_deadman", "enabled")]
    assert kap.tasks["anomalyd_batch"]["status"] == "enabled"        # never switched off behind the operator
    assert kap.tasks[fixed]["vars"]["threshold"]["value"] == 0.7
    assert fixed in ids and (tmp_path / "out" / "anomaly_stream.tick").exists()


def test_a_compile_error_is_reported_clearly(kap: KapacitorStub) -> None:
    kap.compile_errors["anomalyd_batch"] = ('line 41 char 5: no method or property "aling" on '
                                            "*pipeline.QueryNode")
    with pytest.raises(KapacitorError) as err:
        define(example_config(), kap.url)
    msg = str(err.value)
    assert msg.startswith("Kapacitor rejected task anomalyd_batch: invalid TICKscript: line 41 char 5: "
                          "no method")
    assert "tickscripts/" in msg
    assert "anomalyd_stream" in kap.tasks and "anomalyd_batch" not in kap.tasks


def test_the_stand_in_checks_vars_like_kapacitor(kap: KapacitorStub) -> None:
    """The stand-in's own var checks (independent of anomalyd's) accept what define sends, refuse the rest."""
    spec = next(t for t in kapacitor.tasks(example_config(), example_models()[:1]) if t.template == "anomaly_fixed")
    payload = spec.payload()
    del payload["vars"]["threshold"]
    r = requests.post(kap.url + "/kapacitor/v1/tasks", json=payload, timeout=5)
    assert r.status_code == 400
    assert r.json() == {"error": 'invalid TICKscript: missing value for var "threshold".'}
    payload["vars"]["threshold"] = {"type": "string", "value": "0.4"}
    r = requests.post(kap.url + "/kapacitor/v1/tasks", json=payload, timeout=5)
    assert r.json()["error"] == ("invalid TICKscript: invalid type supplied for threshold, got string "
                                 "exp float")
    assert requests.get(kap.url + "/kapacitor/v1/tasks/nope", timeout=5).status_code == 404


def test_other_errors_and_an_unreachable_kapacitor(kap: KapacitorStub) -> None:
    kap.script(Reply(500, {"error": "failed to replace task definition: boltdb: disk full"},
                     path="/kapacitor/v1/tasks/anomalyd_stream"))
    with pytest.raises(KapacitorError, match=r"HTTP 500 to GET .*anomalyd_stream: failed to replace"):
        define(example_config(), kap.url)
    port = free_port()
    with pytest.raises(KapacitorError, match=rf"cannot reach Kapacitor at http://127.0.0.1:{port} .*--url"):
        define(example_config(), f"http://admin:hunter2@127.0.0.1:{port}", timeout_s=1)
    try:
        define(example_config(), f"http://admin:hunter2@127.0.0.1:{port}", timeout_s=1)
    except KapacitorError as exc:
        assert "hunter2" not in str(exc)


# ---------------------------------------------------------------------------------------------------------
# The batch query against a real InfluxDB


def _tick_string_expr(expr: str, env: Mapping[str, str]) -> str:
    """Evaluate a TICKscript string expression of literals and vars joined by '+'."""
    out, i = [], 0
    for tok in re.finditer(rf"\s*(?:({_STRING})|([A-Za-z_]\w*)|(\+))", expr):
        assert tok.start() == i, f"cannot parse {expr[i:]!r}"
        i = tok.end()
        if tok.group(1) is not None:
            out.append(kapacitor_string(tok.group(1))[0])
        elif tok.group(2):
            out.append(env[tok.group(2)])
    assert expr[i:].strip() == ""
    return "".join(out)


def batch_query(rendered: Path) -> str:
    """The batch task's query as Kapacitor evaluates it: the script's expression with the vars file's values
    (and the script's defaults for the others)."""
    script = (rendered / "anomaly_batch.tick").read_text()
    env = {}
    for line in script.splitlines():
        m = re.match(r"var (\w+) = '((?:\\.|[^'\\])*)'$", line)
        if m:
            env[m.group(1)] = m.group(2)
    env |= {k: v["value"] for k, v in json.loads((rendered / "anomaly_batch.vars.json").read_text()).items()
            if v["type"] == "string"}
    m = re.search(r"^var query = (.*)$", script, re.M)
    assert m is not None
    return _tick_string_expr(m.group(1), env)


def kapacitor_range(query: str, start_ns: int, stop_ns: int) -> str:
    """What Kapacitor's QueryNode runs: the query with its time range ANDed to the condition, and GROUP BY *
    from ``.groupBy(groups)`` with groups = [*]."""
    head, cond = query.split(" WHERE ", 1)
    return f"{head} WHERE ({cond}) AND time >= {start_ns} AND time < {stop_ns} GROUP BY *"


def _line_value(v: Any) -> str:
    if isinstance(v, bool):
        return str(v).lower()
    if isinstance(v, str):
        return '"' + v.replace("\\", "\\\\").replace('"', '\\"') + '"'
    return repr(v)


def _line(signal: str, patient: str, model: str, t_ns: int, max_error: float | None, threshold: float,
          anomalous: bool = False, score: float = 0.1, n_missing: int = 0,
          attribution: Mapping[str, Any] | None = None, group_tag: str = "patient") -> str:
    """One output point; ``anomalous`` is the detector's decision, independent of max_error vs threshold.
    ``attribution``: the top_field, direction (and top_share, top_fields) fields; None for a point written before
    anomalyd wrote them."""
    tags = f"signal={signal},series={group_tag}\\={patient},model={model},{group_tag}={patient}"
    if max_error is None:
        fields = f"threshold={threshold},anomalous=false,missing=true,n_missing={n_missing}i"
    else:
        fields = (f"max_error={max_error},threshold={threshold},anomalous={str(anomalous).lower()},"
                  f"score={score},missing=false,n_missing=0i")
        fields += "".join(f",{k}={_line_value(v)}" for k, v in (attribution or {}).items())
    return f"anomaly_error,{tags} {fields} {t_ns}"


def kapacitor_batch_points(series: Mapping[str, Any]) -> list[dict[str, Any]]:
    """The points Kapacitor's QueryNode makes of one series of the answer (``edge.ResultToBufferedBatches``,
    edge/messages.go): a null column is left out of the point, the others kept (Kapacitor >= 1.3; before,
    influxdata/kapacitor#1320, a null column dropped every column after it: the attribution fields, which may be
    null, come last in the query for that reason)."""
    points = []
    for values in series["values"]:
        fields = {c: v for c, v in zip(series["columns"], values, strict=True) if c != "time" and v is not None}
        if fields:
            points.append(fields | {"time": values[0]})
    return points


def test_batch_query_returns_the_worst_anomalous_window_of_each_series(influxd: LocalInfluxd,
                                                                       tmp_path: Path) -> None:
    db = "kapacitor_batch_test"
    influxd.query(f'DROP DATABASE "{db}"')
    influxd.query(f'CREATE DATABASE "{db}"')
    cfg = example_config(database=db)
    render(cfg, tmp_path, example_models())
    t0 = 1_700_000_000 * S
    up: dict[str, Any] = SINGLE | {"direction": "up"}
    down: dict[str, Any] = SINGLE | {"direction": "down"}
    old = None
    # (patient, window index, max_error or None for missing data, threshold, anomalous, score, attribution): a
    # window every 16 s. "anomalous" is the detector's decision: max_error passing the threshold no longer implies
    # it. The attribution fields differ between the windows of a series, so that only the selected (worst) window's
    # can be in the message; p2's windows were written before anomalyd wrote them (old).
    rows: list[tuple[str, int, float | None, float, bool, float, dict[str, Any] | None]] = [
            ("p1", 0, 0.2, 0.42, False, 0.1, up),
            ("p1", 1, 0.9, 0.42, False, 0.4, down),   # the largest error of p1, above its threshold, but normal
            ("p1", 2, None, 0.42, False, 0.0, None),
            ("p1", 3, 0.3, 0.42, True, 0.6, down),    # the first anomalous window of p1: not the worst
            ("p1", 4, 0.8, 0.42, True, 0.9, up),      # the worst anomalous window of p1
            ("p1", 5, 0.1, 0.42, False, 0.1, down),
            ("p1", 6, 0.43, 0.42, True, 0.7, down),   # the last anomalous window of p1: not the worst either
            ("p2", 0, 0.6, 0.5625, False, 0.3, old),  # above its threshold, but normal
            ("p2", 1, 0.5, 0.5625, True, 0.8, old),   # anomalous below its threshold: the only one of p2
            ("p2", 2, None, 0.5625, False, 0.0, None),
            ("p2", 3, 0.7, 0.5625, False, 0.4, old),
            ("p2", 9, 3.0, 0.5625, True, 1.0, up),    # outside the queried period
            ("p3", 0, 2.0, 0.5, False, 0.4, up),      # above its threshold in every window, never anomalous
            ("p3", 1, 1.5, 0.5, False, 0.3, up)]
    lines = [_line("heartbeat", p, model_id_for("heartbeat", (("patient", p),), "series"), t0 + i * 16 * S,
                   e, th, anom, sc, attribution=attr) for p, i, e, th, anom, sc, attr in rows]
    # a multi-field signal (docs/multivariate.md): its windows carry top_share and top_fields too
    host_rows = [(0, 1.4, True, 0.95, MULTI),
                 (1, 2.5, True, 1.0, MULTI | {"top_field": "net.bytes_recv", "top_share": 0.7,
                                               "top_fields": "net.bytes_recv up 70%, cpu.usage_user up 20%, "
                                                             "mem.used_percent down 10%"}),
                 (2, 0.3, False, 0.2, MULTI)]
    lines += [_line("host", "h1", model_id_for("host", (("host", "h1"),), "series"), t0 + i * 16 * S, e, 1.0, anom,
                    sc, attribution=attr, group_tag="host") for i, e, anom, sc, attr in host_rows]
    # another measurement with the same field names (the daemon's own stats carry "missing") is not read
    lines.append(f"anomalyd_stats,signal=heartbeat max_error=9.0,threshold=1.0,missing=false,anomalous=true "
                 f"{t0 + 16 * S}")
    influxd.write_lines(db, "\n".join(lines))

    query = batch_query(tmp_path)
    assert query == (f'SELECT max("max_error") AS "max_error", "threshold", "score", "anomalous", "top_field", '
                     f'"direction", "top_fields" FROM "{db}"."autogen"."anomaly_error" WHERE "missing" = false AND '
                     f'"anomalous" = true')
    res = influxd.query(kapacitor_range(query, t0, t0 + 7 * 16 * S))["results"][0]
    assert "error" not in res, res
    columns = ["time", "max_error", "threshold", "score", "anomalous", "top_field", "direction", "top_fields"]
    got = {s["tags"]["series"]: v for s in res["series"] for v in s["values"]}
    # expected from the raw rows: per series, the anomalous scored window of the period with the largest error,
    # with that window's attribution
    expected: dict[str, list[Any]] = {}
    for p, i, e, th, anom, sc, attr in rows:
        if e is not None and anom and i < 7 and e > expected.get(f"patient={p}", [0, -1.0])[1]:
            expected[f"patient={p}"] = [t0 + i * 16 * S, e, th, sc, True, *((attr or {}).get(f) for f in ATTRIBUTION)]
    for i, e, anom, sc, attr in host_rows:
        if anom and e > expected.get("host=h1", [0, -1.0])[1]:
            expected["host=h1"] = [t0 + i * 16 * S, e, 1.0, sc, True, *(attr.get(f) for f in ATTRIBUTION)]
    assert got == expected == {
        "patient=p1": [t0 + 4 * 16 * S, 0.8, 0.42, 0.9, True, "value", "up", None],
        "patient=p2": [t0 + 16 * S, 0.5, 0.5625, 0.8, True, None, None, None],
        "host=h1": [t0 + 16 * S, 2.5, 1.0, 1.0, True, "net.bytes_recv", "up",
                    "net.bytes_recv up 70%, cpu.usage_user up 20%, mem.used_percent down 10%"]}
    # every group carries the tags the alert's id and message read, and one row: the alert reports it, and its
    # message, as Kapacitor renders it from the point it makes of the row, names the window's top field
    script = (tmp_path / "anomaly_batch.tick").read_text()
    crit = re.search(r"\.crit\(lambda: (.*)\)$", script, re.M)
    assert crit is not None
    message_fields = set(re.findall(r'index \.Fields "(\w+)"', script))
    messages = {}
    for s in res["series"]:
        group_tag = "host" if s["tags"]["signal"] == "host" else "patient"
        # GROUP BY * gives every group every tag key of the measurement: the other signal's group_by tag is empty
        assert {k for k, v in s["tags"].items() if v} == {"signal", "series", "model", group_tag}
        assert s["columns"] == columns
        assert s["tags"]["series"] == tags_str(((group_tag, s["tags"][group_tag]),))
        (point,) = kapacitor_batch_points(s)
        point = _eval_node(script, point, {})
        assert tick_lambda(crit.group(1), {})(point) is True, f"the alert would not raise for {point}"
        assert message_fields - set(ATTRIBUTION) <= set(point), message_fields - set(point)
        messages[s["tags"]["series"]] = go_template(_message(script), {
            "Level": "CRITICAL", "Tags": s["tags"], "Fields": point, "Time": "T"})
    assert messages["patient=p1"].endswith("(ratio 1.9, score 0.90), top field value up, model "
                                           f"{model_id_for('heartbeat', (('patient', 'p1'),), 'series')}, "
                                           "window ending T"), messages
    assert "top field" not in messages["patient=p2"] and "(ratio 0.889, score 0.80), model" in messages["patient=p2"]
    assert ("(ratio 2.5, score 1.00), top field net.bytes_recv up (net.bytes_recv up 70%, cpu.usage_user up 20%, "
            "mem.used_percent down 10%), model") in messages["host=h1"]
    assert all("<no value>" not in m and "%!" not in m for m in messages.values()), messages
    influxd.query(f'DROP DATABASE "{db}"')


def test_influxd_is_required_not_skipped() -> None:
    """The real-InfluxDB test above must run: influxd has to be installed (the session fixture fails, never
    skips, without it)."""
    assert shutil.which("influxd") or Path("/usr/bin/influxd").exists(), (
        "influxd is not installed; install it with `apt-get install -y influxdb` to run the Kapacitor tests")


# -- issue 13, items 13 and 14 -------------------------------------------------------------------------------


@pytest.mark.parametrize(("influx_rp", "output_rp_", "expected"), [
    ("one_week", "", "one_week"),      # ANOMALYD_INFLUXDB_RETENTION_POLICY=one_week: the writer writes there
    ("one_week", "errors", "errors"),  # output.retention_policy wins, as for the writer
    ("", "", "autogen"),               # neither: the database's default, InfluxDB's autogen
])
def test_tasks_use_the_writers_retention_policy(tmp_path: Path, influx_rp: str, output_rp_: str,
                                                expected: str) -> None:
    from anomalyd.store.influx1 import InfluxDB1Store

    env = {"ANOMALYD_INFLUXDB_RETENTION_POLICY": influx_rp} if influx_rp else {}
    cfg = from_dict({
        "influxdb": {"database": "anomalyd"},
        "output": {"retention_policy": output_rp_} if output_rp_ else {},
        "kapacitor": {"task_prefix": "anomalyd", "batch_every": "1m"},
        "signals": [{"name": "heartbeat", "measurement": "ecg", "field": "value", "period": "1s"}],
    }, env=env)
    # where the worker's points go: the writer's own resolution (no rp parameter: the database's default)
    written = InfluxDB1Store(cfg.influxdb)._write_params(cfg.output.retention_policy).get("rp", "autogen")
    assert written == expected
    specs = kapacitor.tasks(cfg, example_models(), enable=("stream", "batch", "fixed"))
    assert {t.dbrps for t in specs} == {(("anomalyd", expected),)}
    (batch,) = [t for t in specs if t.template == "anomaly_batch"]
    assert batch.vars["rp"] == {"type": "string", "value": expected}
    paths = kapacitor.render(cfg, tmp_path, example_models())
    assert json.loads((tmp_path / "anomaly_batch.vars.json").read_text())["rp"]["value"] == expected
    sh = next(p for p in paths if p.name == "define.sh").read_text()
    assert f'-dbrp \'"anomalyd"."{expected}"\'' in sh
    # a database whose default retention policy is not autogen
    if not influx_rp and not output_rp_:
        assert {t.dbrps for t in kapacitor.tasks(cfg, default_rp="two_days")} == {(("anomalyd", "two_days"),)}


def test_task_ids_follow_kapacitors_rule() -> None:
    """Kapacitor's validTaskID is ``^[-\\._\\p{L}0-9]+$``: any letter, but only the ASCII digits."""
    ok = ["anomalyd_fixed_cpu-1.a", "anomalyd_Température", "anomalyd_心拍", "a.b-c_9"]
    bad = ["anomalyd_cpu\u0661", "anomalyd_\u0966", "anomalyd_x\u00b2", "anomalyd_\u2167", "a b", "a/b", "a:b", ""]
    assert all(kapacitor.valid_task_id(t) for t in ok)
    assert not any(kapacitor.valid_task_id(t) for t in bad)
    # through tasks(): a model id with an Arabic-Indic digit (a signal named so) is refused before Kapacitor sees
    # it, one with a non-ASCII letter is not
    cfg = example_config()
    with pytest.raises(KapacitorError, match="not accepted by Kapacitor"):
        kapacitor.tasks(cfg, [ModelRef("cpu\u0661", "cpu\u0661", (), 0.5)])
    assert [t.id for t in kapacitor.tasks(cfg, [ModelRef("température", "température", (), 0.5)])][-1] == (
        "anomalyd_fixed_température")


# -- issue 14: TICKscript strings as Kapacitor reads them; the deadman template --------------------------------


NASTY = ["plain", "it's", "a\\b", "a\\", "\\", "a\\'b", "'", "x'\\", "\\\\", "a\\\\", "'start\\", "é\\n",
         "dc=a\\,host\\=b,host=c\\\\", "k=o'brien\\\\", "a''b", "''"]


@pytest.mark.parametrize("value", NASTY)
def test_tick_strings_are_read_back_by_kapacitors_lexer_as_the_value(value: str) -> None:
    literal = kapacitor.tick_string(value)
    assert kapacitor_string(literal + " AND x") == (value, " AND x")


def test_the_oracle_reads_kapacitors_own_examples() -> None:
    # the cases of Kapacitor's lexer and parser tests (tick/ast/lex_test.go, parser_test.go)
    assert kapacitor_string(r"'\'str'") == ("'str", "")
    assert kapacitor_string("'''a'b'''") == ("a'b", "")
    assert kapacitor_string(r"'a\b'") == (r"a\b", "")
    assert kapacitor_string("''") == ("", "")
    with pytest.raises(ValueError, match="unterminated"):
        kapacitor_string("'a\\'")  # why a trailing backslash cannot be single-quoted


def test_a_tag_value_kapacitor_cannot_carry_is_refused_with_the_value_named() -> None:
    with pytest.raises(KapacitorError) as err:
        kapacitor.tick_string("a''b\\")
    assert str(err.value).startswith(repr("a''b\\") + " ends with a backslash") and "rename the tag value" in str(
        err.value)


def test_render_and_filters_with_backslashes_in_tag_values(tmp_path: Path) -> None:
    """The issue 14 case: `kapacitor render` aborted on the first tag value with a backslash."""
    tags = (("dc", "a,host=b"), ("host", "c\\"))                       # escaped series key ends with \\
    odd = [ModelRef("heartbeat-1", "heartbeat", tags, 0.5), ModelRef("heartbeat-2", "heartbeat",
                                                                       (("patient", "p\\1'x"),), 0.6)]
    render(example_config(), tmp_path, odd, enable=("fixed",))
    for m in odd:
        doc = json.loads((tmp_path / f"anomaly_fixed.{m.model_id}.vars.json").read_text())
        where = doc["where_filter"]["value"]
        match = tick_lambda(where, {})
        assert match({"signal": "heartbeat", "series": tags_str(m.tags)}) is True
        assert match({"signal": "heartbeat", "series": tags_str(m.tags) + "x"}) is False


def test_the_deadman_template() -> None:
    script = TEMPLATES["anomaly_deadman"][1]
    assert TEMPLATES["anomaly_deadman"][0] == "stream"
    declared = template_vars(script)
    assert {n for n, (_, default) in declared.items() if not default} == set()
    assert declared["interval"] == ("duration", True) and declared["groups"] == ("list", True)
    assert re.search(r"^var groups = \['signal', 'series'\]$", script, re.M)
    assert "|deadman(0.0, interval)" in script and ".stateChangesOnly()" in script
    assert '|where(lambda: "missing" == FALSE)' in script  # only scored windows keep a series alive
    refs = {r for lam in _lambdas(script) for r in re.findall(r'"([^"]+)"', lam)}
    assert refs <= TAGS | set(FIELDS)
    assert set(re.findall(r'index \.Tags "(\w+)"', script)) == {"signal", "series"}
    assert set(re.findall(r'index \.Fields "(\w+)"', script)) == {"emitted"}  # the deadman's own field
    for handler in (".slack()", ".channel(slack_channel)", ".log(log_path)", ".message(message)", ".id(id)",
                    ".groupBy(groups)", ".measurement(measurement)"):
        assert handler in script


def deadman_alerts(script: str, points: list[dict[str, Any]], interval_s: int, until_s: int
                   ) -> list[tuple[int, str, tuple[str, ...]]]:
    """What the deadman template sends, by Kapacitor's definition of |deadman(threshold, interval): every interval
    (aligned), per group of the template's ``groups``, the count of points passing its ``|where`` is compared
    with the threshold (crit when ``emitted <= threshold``); with ``.stateChangesOnly()``, only changes are sent.
    A group is known from its first point."""
    groups_m = re.search(r"^var groups = \[(.*)\]$", script, re.M)
    where = re.search(r"^\s*\|where\(lambda: (.*)\)$", script, re.M)
    dead = re.search(r"\|deadman\(([\d.]+), interval\)", script)
    assert groups_m and where and dead
    group_tags = [kapacitor_string(g.strip())[0] for g in groups_m.group(1).split(",")]
    keep, threshold = tick_lambda(where.group(1), {}), float(dead.group(1))
    level: dict[tuple[str, ...], str] = {}
    sent = []
    for start in range(0, until_s, interval_s):
        counts: dict[tuple[str, ...], int] = {g: 0 for g in level}
        for p in points:
            g = tuple(p[t] for t in group_tags)
            if start <= p["time"] < start + interval_s:
                counts.setdefault(g, 0)
                counts[g] += bool(keep(p))
        for g, n in sorted(counts.items()):
            new = "CRITICAL" if n <= threshold else "OK"
            if level.get(g, "OK") != new:
                sent.append((start + interval_s, new, g))
            level[g] = new
    return sent


def test_the_deadman_raises_for_a_series_that_stops_being_scored() -> None:
    script = TEMPLATES["anomaly_deadman"][1]
    pts = []
    for t in range(0, 3600, 16):  # p1 is scored throughout; p2 stops at 20 min, writes missing windows, comes back
        pts.append(_point(t, 0.2, False) | {"signal": "heartbeat", "series": "patient=p1", "model": "m1"})
        if t < 1200 or t >= 3000:
            pts.append(_point(t, 0.2, False) | {"signal": "heartbeat", "series": "patient=p2", "model": "m2"})
        elif t < 1500:
            pts.append(_point(t, None, False) | {"signal": "heartbeat", "series": "patient=p2", "model": "m2"})
    assert deadman_alerts(script, pts, 600, 3600) == [
        (1800, "CRITICAL", ("heartbeat", "patient=p2")),  # the first interval without a scored window
        (3600, "OK", ("heartbeat", "patient=p2"))]


def test_the_deadman_task_follows_alerts_deadman(kap: KapacitorStub, tmp_path: Path) -> None:
    def cfg(deadman: str) -> Config:
        return from_dict({"influxdb": {"database": "anomalyd"}, "alerts": {"deadman": deadman},
                          "output": {"measurement": "errs"},
                          "signals": [{"name": "s", "measurement": "m", "field": "f", "period": "1s"}]}, env={})

    (task,) = [t for t in kapacitor.tasks(cfg("90s")) if t.template == "anomaly_deadman"]
    assert task.id == "anomalyd_deadman" and task.type == "stream" and task.status == "enabled"
    assert task.vars == {"measurement": {"type": "string", "value": "errs"},
                         "slack_channel": {"type": "string", "value": ""},
                         "interval": {"type": "duration", "value": "90s"}}
    (off,) = [t for t in kapacitor.tasks(cfg("0s")) if t.template == "anomaly_deadman"]
    assert off.status == "disabled" and "interval" not in off.vars  # the template's 10m; the operator may enable
    (kept,) = [t for t in kapacitor.tasks(cfg("1h"), enable=("stream",)) if t.template == "anomaly_deadman"]
    assert kept.status == "disabled" and kept.vars["interval"]["value"] == "1h"
    define(cfg("90s"), kap.url)
    assert kap.tasks["anomalyd_deadman"]["script"] == TEMPLATES["anomaly_deadman"][1]
    assert kap.tasks["anomalyd_deadman"]["status"] == "enabled"


def test_the_deadman_groups_and_filter_exist_in_real_output(demo_db: Any) -> None:
    """The deadman groups by tags and filters on a field of the points the daemon really wrote (the demo run in a
    real InfluxDB): "signal" and "series" are tags, "missing" is a boolean field."""
    script = TEMPLATES["anomaly_deadman"][1]
    m = demo_db.cfg.output.measurement
    params = {"q": f'SHOW TAG KEYS FROM "{m}"; SHOW FIELD KEYS FROM "{m}"', "db": demo_db.database}
    res = requests.post(f"{demo_db.url}/query", params=params, timeout=30).json()["results"]
    tags = {v[0] for s in res[0]["series"] for v in s["values"]}
    fields = {v[0]: v[1] for s in res[1]["series"] for v in s["values"]}
    groups = re.search(r"^var groups = \[(.*)\]$", script, re.M)
    assert groups is not None
    assert {kapacitor_string(g.strip())[0] for g in groups.group(1).split(",")} <= tags
    assert fields["missing"] == "boolean"
    # the same grouping in InfluxQL: one group per series the daemon scored, each with scored windows
    q = f'SELECT count("max_error") FROM "{m}" WHERE "missing" = false GROUP BY "signal", "series"'
    res = requests.post(f"{demo_db.url}/query", params={"q": q, "db": demo_db.database}, timeout=30).json()
    series = res["results"][0]["series"]
    assert len(series) >= 2 and all(s["values"][0][1] > 0 for s in series)
