"""Kapacitor: the TICKscripts against the output schema, the HTTP exchange against a recording stand-in, and
the batch script's InfluxQL query against a real InfluxDB."""

from __future__ import annotations

import json
import re
import shutil
from collections.abc import Callable, Iterator, Mapping
from pathlib import Path
from typing import Any

import pytest
import requests

from anomalyd import kapacitor
from anomalyd.catalog import StoredModel, model_id_for
from anomalyd.config import Config, from_dict
from anomalyd.kapacitor import (
    BATCH_TICK,
    TEMPLATES,
    VAR_TYPES,
    KapacitorError,
    ModelRef,
    ModelSummary,
    check_vars,
    define,
    render,
    template_vars,
)
from anomalyd.localinflux import LocalInfluxd, free_port
from anomalyd.records import tags_str
from http_stubs import KapacitorStub, Reply

ROOT = Path(__file__).resolve().parents[1]
SHIPPED = ROOT / "tickscripts"
S = 10**9

# The output schema the worker writes (see the README's output section).
TAGS = {"signal", "series", "model"}
FIELDS = {"max_error": float, "threshold": float, "anomalous": bool, "score": float, "missing": bool,
          "n_missing": int}
COMPUTED = {"stream": {"ratio"}, "batch": {"ratio"}, "fixed": {"ratio", "fixed_threshold"}}


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


def test_shipped_tickscripts_are_the_templates_and_vars_examples_are_current(tmp_path: Path) -> None:
    for name, (_, script) in TEMPLATES.items():
        assert (SHIPPED / f"{name}.tick").read_text() == script, f"tickscripts/{name}.tick is out of date"
    models = example_models()[:1]
    render(example_config(), tmp_path, models)
    (tmp_path / f"anomaly_fixed.{models[0].model_id}.vars.json").rename(tmp_path / "anomaly_fixed.vars.json")
    for name in ("anomaly_stream", "anomaly_batch", "anomaly_fixed"):
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


@pytest.mark.parametrize("name", list(TEMPLATES))
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
    else:
        assert '|where(lambda: "missing" == FALSE AND isPresent("max_error"))' in script
    if kind != "batch":
        assert ".stateChangesOnly()" in script and ".groupBy(groups)" in script
    for handler in (".slack()", ".channel(slack_channel)", ".log(log_path)", ".message(message)", ".id(id)"):
        assert handler in script


_LAMBDA_TOKEN = re.compile(r'\s*(?:"(\w+)"|\b(TRUE|FALSE|AND|OR)\b|isPresent\("(\w+)"\)|(==|!=|>=|<=|>|<|/|\(|\))'
                           r"|(-?\d+(?:\.\d+)?)|'((?:\\.|[^'\\])*)'|([a-z_]\w*))")


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
            out.append(repr(re.sub(r"\\(.)", r"\1", string)))
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

    ``env`` holds the vars' values; the lambda vars (``where_filter``, ``crit``) as expressions."""
    env = dict(env or {})
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
    level, sent = "OK", []
    for p in points:
        if not all(f(p) for f in filters):
            continue                                    # dropped: neither raises nor clears
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
    # raised at the first anomalous window and cleared at the first normal one, whatever max_error says;
    # the missing-data windows (3, 7: anomalous false) neither clear the alert nor raise it
    assert stream_alerts(script, DECISIONS) == [(2, "CRITICAL"), (5, "OK"), (8, "CRITICAL")]
    # the alternatives documented in the script work as the crit var
    assert 'lambda: "score" >= 0.5' in script and 'lambda: "max_error" > "threshold"' in script
    assert stream_alerts(script, DECISIONS, {"crit": '"score" >= 0.5'}) == [
        (2, "CRITICAL"), (5, "OK"), (8, "CRITICAL")]
    assert stream_alerts(script, DECISIONS, {"crit": '"max_error" > "threshold"'}) == [
        (1, "CRITICAL"), (2, "OK"), (5, "CRITICAL"), (6, "OK"), (8, "CRITICAL")]
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
                        "anomaly_fixed": {"where_filter", "threshold"}}[name]


def test_vars_files_have_the_types_kapacitor_accepts(tmp_path: Path) -> None:
    paths = render(example_config(), tmp_path, example_models())
    vars_files = [p for p in paths if p.name.endswith(".vars.json")]
    assert len(vars_files) == 4
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
        check_vars(BATCH_TICK, {"db": {"type": "string", "value": "x"},
                                "period": {"type": "duration", "value": "1.5m"}})


def test_series_filters_quote_tag_values_and_shared_models_cover_the_signal(tmp_path: Path) -> None:
    odd = ModelRef("cpu-1", "cpu", (("host", "o'brien"),), 1.0)
    shared = ModelRef("cpu", "cpu", (), 2.0)
    assert kapacitor.series_filter(odd) == "\"signal\" == 'cpu' AND \"series\" == 'host=o\\'brien'"
    assert kapacitor.series_filter(shared) == "\"signal\" == 'cpu'"
    with pytest.raises(KapacitorError, match="backslash"):
        kapacitor.series_filter(ModelRef("x", "x", (("k", "a\\b"),), 1.0))
    with pytest.raises(KapacitorError, match="retrain"):
        kapacitor.tasks(example_config(), [ModelRef("x", "x", (), float("nan"))])


def test_render_writes_a_define_script_for_the_kapacitor_cli(tmp_path: Path) -> None:
    models = example_models()
    paths = render(example_config(), tmp_path, models)
    assert sorted(p.name for p in paths) == sorted([
        "anomaly_stream.tick", "anomaly_batch.tick", "anomaly_fixed.tick", "anomaly_stream.vars.json",
        "anomaly_batch.vars.json", *(f"anomaly_fixed.{m.model_id}.vars.json" for m in models), "define.sh"])
    sh = (tmp_path / "define.sh").read_text().splitlines()
    assert "kapacitor define-template anomaly_batch -type batch -tick anomaly_batch.tick" in sh
    assert ("kapacitor define anomalyd_stream -template anomaly_stream -vars anomaly_stream.vars.json "
            "-dbrp '\"anomalyd\".\"autogen\"'") in sh
    assert "kapacitor enable anomalyd_stream" in sh and "kapacitor enable anomalyd_batch" not in sh
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
    assert ids == ["anomalyd_stream", "anomalyd_batch", f"anomalyd_fixed_{m1}", f"anomalyd_fixed_{m2}"]
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
        "anomalyd_stream": "enabled", "anomalyd_batch": "disabled", f"anomalyd_fixed_{m1}": "disabled",
        f"anomalyd_fixed_{m2}": "disabled"}
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
              ("PATCH", "anomalyd_batch"), ("PATCH", "anomalyd_batch"),
              ("GET", fixed), ("PATCH", fixed)]                    # disabled and staying so: no reload
    assert list(kap.calls()) == [(m, base + t) for m, t in reload]
    patches = [r.json for r in kap.recorded(base + "anomalyd_stream") if r.method == "PATCH"]
    assert set(patches[0]) == {"type", "dbrps", "script", "vars"}
    assert patches[1:] == [{"status": "disabled"}, {"status": "enabled"}]
    assert kap.status_changes == [("anomalyd_stream", "disabled"), ("anomalyd_stream", "enabled"),
                                  ("anomalyd_batch", "disabled"), ("anomalyd_batch", "enabled")]
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
    spec = kapacitor.tasks(example_config(), example_models()[:1])[2]
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
    for tok in re.finditer(r"\s*(?:'((?:\\.|[^'\\])*)'|([A-Za-z_]\w*)|(\+))", expr):
        assert tok.start() == i, f"cannot parse {expr[i:]!r}"
        i = tok.end()
        if tok.group(1) is not None:
            out.append(re.sub(r"\\(.)", r"\1", tok.group(1)))
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


def _line(signal: str, patient: str, model: str, t_ns: int, max_error: float | None, threshold: float,
          anomalous: bool = False, score: float = 0.1, n_missing: int = 0) -> str:
    """One output point; ``anomalous`` is the detector's decision, independent of max_error vs threshold."""
    tags = f"signal={signal},series=patient\\={patient},model={model},patient={patient}"
    if max_error is None:
        fields = f"threshold={threshold},anomalous=false,missing=true,n_missing={n_missing}i"
    else:
        fields = (f"max_error={max_error},threshold={threshold},anomalous={str(anomalous).lower()},"
                  f"score={score},missing=false,n_missing=0i")
    return f"anomaly_error,{tags} {fields} {t_ns}"


def test_batch_query_returns_the_worst_anomalous_window_of_each_series(influxd: LocalInfluxd,
                                                                       tmp_path: Path) -> None:
    db = "kapacitor_batch_test"
    influxd.query(f'DROP DATABASE "{db}"')
    influxd.query(f'CREATE DATABASE "{db}"')
    cfg = example_config(database=db)
    render(cfg, tmp_path, example_models())
    t0 = 1_700_000_000 * S
    # (patient, window index, max_error or None for missing data, threshold, anomalous, score): a window every
    # 16 s. "anomalous" is the detector's decision: max_error passing the threshold no longer implies it.
    rows = [("p1", 0, 0.2, 0.42, False, 0.1),
            ("p1", 1, 0.9, 0.42, False, 0.4),   # the largest error of p1, above its threshold, but normal
            ("p1", 2, None, 0.42, False, 0.0),
            ("p1", 3, 0.3, 0.42, True, 0.6),    # the first anomalous window of p1: not the worst
            ("p1", 4, 0.8, 0.42, True, 0.9),    # the worst anomalous window of p1
            ("p1", 5, 0.1, 0.42, False, 0.1),
            ("p1", 6, 0.43, 0.42, True, 0.7),   # the last anomalous window of p1: not the worst either
            ("p2", 0, 0.6, 0.5625, False, 0.3),  # above its threshold, but normal
            ("p2", 1, 0.5, 0.5625, True, 0.8),  # anomalous below its threshold: the only one of p2
            ("p2", 2, None, 0.5625, False, 0.0),
            ("p2", 3, 0.7, 0.5625, False, 0.4),
            ("p2", 9, 3.0, 0.5625, True, 1.0),  # outside the queried period
            ("p3", 0, 2.0, 0.5, False, 0.4),    # above its threshold in every window, never anomalous
            ("p3", 1, 1.5, 0.5, False, 0.3)]
    lines = [_line("heartbeat", p, model_id_for("heartbeat", (("patient", p),), "series"), t0 + i * 16 * S,
                   e, th, anom, sc) for p, i, e, th, anom, sc in rows]
    # another measurement with the same field names (the daemon's own stats carry "missing") is not read
    lines.append(f"anomalyd_stats,signal=heartbeat max_error=9.0,threshold=1.0,missing=false,anomalous=true "
                 f"{t0 + 16 * S}")
    influxd.write_lines(db, "\n".join(lines))

    query = batch_query(tmp_path)
    assert query == (f'SELECT max("max_error") AS "max_error", "threshold", "score", "anomalous" '
                     f'FROM "{db}"."autogen"."anomaly_error" WHERE "missing" = false AND "anomalous" = true')
    res = influxd.query(kapacitor_range(query, t0, t0 + 7 * 16 * S))["results"][0]
    assert "error" not in res, res
    got = {s["tags"]["series"]: v for s in res["series"] for v in s["values"]}
    # expected from the raw rows: per series, the anomalous scored window of the period with the largest error
    expected: dict[str, list[Any]] = {}
    for p, i, e, th, anom, sc in rows:
        if e is not None and anom and i < 7 and e > expected.get(f"patient={p}", [0, -1.0])[1]:
            expected[f"patient={p}"] = [t0 + i * 16 * S, e, th, sc, True]
    assert got == expected == {"patient=p1": [t0 + 4 * 16 * S, 0.8, 0.42, 0.9, True],
                               "patient=p2": [t0 + 16 * S, 0.5, 0.5625, 0.8, True]}
    # every group carries the tags the alert's id and message read, and one row: the alert reports it
    script = (tmp_path / "anomaly_batch.tick").read_text()
    crit = re.search(r"\.crit\(lambda: (.*)\)$", script, re.M)
    ratio = re.search(r"\|eval\(lambda: (.*)\)$", script, re.M)
    assert crit is not None and ratio is not None
    message_fields = set(re.findall(r'index \.Fields "(\w+)"', script))
    for s in res["series"]:
        assert set(s["tags"]) == {"signal", "series", "model", "patient"}
        assert s["columns"] == ["time", "max_error", "threshold", "score", "anomalous"]
        assert s["tags"]["series"] == tags_str((("patient", s["tags"]["patient"]),))
        assert len(s["values"]) == 1
        point = dict(zip(s["columns"], s["values"][0], strict=True))
        point["ratio"] = tick_lambda(ratio.group(1), {})(point)
        assert tick_lambda(crit.group(1), {})(point) is True, f"the alert would not raise for {point}"
        assert message_fields <= set(point), message_fields - set(point)
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
    from anomalyd.influx import InfluxDB1Store

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
