"""Alerts that name the fields explaining an anomaly (multi-field signals, docs/multivariate.md), against the local
stand-in for Slack (tests/http_stubs.py)."""

from __future__ import annotations

import io
import json
import logging
from collections.abc import Iterator
from dataclasses import replace
from pathlib import Path

import numpy as np
import pytest

from anomalyd.alerts.manager import AlertManager
from anomalyd.alerts.messages import MAX_NAMED_FIELDS, format_message
from anomalyd.alerts.plots import plot_error, plot_figure, render_plot
from anomalyd.alerts.policy import ANOMALOUS, MAX_ATTRIBUTION, MAX_PLOTTED_FIELDS, RECOVERED, REMINDER, Transition
from anomalyd.alerts.sinks import LogSink
from anomalyd.config import AlertsConfig, SlackConfig
from anomalyd.core.records import FieldShare, SeriesKey, WindowResult
from http_stubs import Reply, SlackStub

S = 10**9
W = 32
HOST = SeriesKey("host", (("host", "h1"),))
FIELDS = ("cpu.usage_user", "mem.used_percent", "diskio.read_bytes", "net_in", "load1", "swap", "temp")
TOKEN = "xoxb-0000-attribution-token"
PNG = b"\x89PNG\r\n\x1a\n"


def mwin(i: int, anomalous: bool = True, seed: int | None = None, key: SeriesKey = HOST,
         fields: tuple[str, ...] = FIELDS) -> WindowResult:
    """Window i of a multi-field series (32 samples at 1 s, a new window every 16 s; threshold 1.0): random
    samples, per-field errors and directions; attribution by share, largest first, as the detector gives it."""
    rng = np.random.default_rng(1000 + i if seed is None else seed)
    d = len(fields)
    values = rng.normal(50.0, 10.0, size=(W, d))
    errors = rng.uniform(0.05, 1.0, size=d) * (3.0 if anomalous else 0.5)
    signs = rng.choice([-1, 1], size=d)
    recon = values - signs * errors * 4.0
    shares = errors / errors.sum()
    order = np.argsort(-shares, kind="stable")
    attribution = tuple(FieldShare(fields[j], float(shares[j]), int(signs[j]), float(values[-1, j]))
                        for j in order)
    start = 1_700_000_000 * S + i * 16 * S
    err = float(errors.max())
    return WindowResult(key, "host-abc", start, start + (W - 1) * S, 1.0, max_error=err, anomalous=err > 1.0,
                        score=min(err / 3, 1.0), values=values if anomalous else None,
                        reconstruction=recon if anomalous else None, attribution=attribution,
                        fields=fields if anomalous else ())


def swin(i: int, anomalous: bool = True, direction: int = -1) -> WindowResult:
    """Window i of a single-field series, with the one-entry attribution the detector gives it."""
    start = 1_700_000_000 * S + i * 16 * S
    values = np.sin(np.linspace(0, 2 * np.pi, W))
    recon = values.copy()
    err = 2.5 if anomalous else 0.4
    recon[10] -= direction * err
    return WindowResult(SeriesKey("heartbeat", (("patient", "p1"),)), "heartbeat-abc", start, start + (W - 1) * S,
                        1.0, max_error=err, anomalous=anomalous, score=min(err / 3, 1.0), values=values,
                        reconstruction=recon, attribution=(FieldShare("ecg", 1.0, direction, float(values[-1])),))


def expected_attribution(r: WindowResult) -> tuple[tuple[str, float, int, float | None], ...]:
    top = sorted(r.attribution, key=lambda s: -s.share)[:MAX_ATTRIBUTION]
    return tuple((s.field, s.share, s.direction, s.value) for s in top)


def arrow(direction: int) -> str:
    return "up" if direction > 0 else "down"


def config(stub: SlackStub | None = None, **changes: object) -> AlertsConfig:
    slack = SlackConfig(channel="#alerts", timeout_s=0.5, max_retries=1, attach_plot=False,
                        webhook_url=stub.webhook_url if stub else "")
    cfg = AlertsConfig(sinks=("slack",) if stub else ("log",), for_windows=1, recover_windows=2, slack=slack)
    return replace(cfg, **changes)  # type: ignore[arg-type]


@pytest.fixture
def slack() -> Iterator[SlackStub]:
    stub = SlackStub().start()
    yield stub
    stub.stop()


def multi_transition(i: int = 0, n_fields: int = 3, kind: str = ANOMALOUS) -> Transition:
    """The transition the anomalous window i of a signal of ``n_fields`` fields opens (through the manager)."""
    m = AlertManager(config(), Path("/nonexistent"), dry_run=True, sinks=[])
    (t,) = m.observe([mwin(i, fields=FIELDS[:n_fields])], now_ns=0)
    return replace(t, kind=kind)


# ---------------------------------------------------------------------------------------------------------
# The record


def test_the_manager_carries_the_top_attribution_and_the_top_fields_columns() -> None:
    r = mwin(0)
    m = AlertManager(config(), Path("/nonexistent"), dry_run=True, sinks=[])
    (t,) = m.observe([r], now_ns=0)
    assert t.kind == ANOMALOUS
    assert t.attribution == expected_attribution(r) and len(t.attribution) == MAX_ATTRIBUTION < len(FIELDS)
    assert [s for _, s, _, _ in t.attribution] == sorted((s for _, s, _, _ in t.attribution), reverse=True)
    top = tuple(f for f, *_ in t.attribution[:MAX_PLOTTED_FIELDS])
    assert t.fields == top
    # values/reconstruction: the top fields' columns, concatenated field by field, one window each
    assert r.values is not None and r.reconstruction is not None
    assert t.values is not None and t.reconstruction is not None
    assert len(t.values) == len(t.reconstruction) == W * len(top)
    cols = t.columns()
    assert [f for f, _, _ in cols] == list(top)
    for name, v, u in cols:
        j = FIELDS.index(name)
        np.testing.assert_array_equal(v, r.values[:, j])
        np.testing.assert_array_equal(u, r.reconstruction[:, j])  # type: ignore[arg-type]
    for k, (name, *_) in enumerate(cols):
        np.testing.assert_array_equal(t.values[k * W:(k + 1) * W], r.values[:, FIELDS.index(name)])
    assert t.peak_attribution == t.attribution  # the opening window is the episode's worst so far


def test_a_single_field_transition_keeps_its_samples_as_before() -> None:
    r = swin(0, direction=1)
    m = AlertManager(config(), Path("/nonexistent"), dry_run=True, sinks=[])
    (t,) = m.observe([r], now_ns=0)
    assert t.fields == () and t.columns() == []
    assert t.values == tuple(float(v) for v in r.values)  # type: ignore[union-attr]
    assert t.reconstruction == tuple(float(v) for v in r.reconstruction)  # type: ignore[union-attr]
    assert t.attribution == (("ecg", 1.0, 1, float(r.values[-1])),)  # type: ignore[index]
    # a single column that comes 2-D without names is still one field
    r2 = replace(r, values=r.values[:, None], reconstruction=r.reconstruction[:, None])  # type: ignore[index]
    (t2,) = AlertManager(config(), Path("/nonexistent"), dry_run=True, sinks=[]).observe([r2], now_ns=0)
    assert t2.values == t.values and t2.reconstruction == t.reconstruction and t2.fields == ()


def test_transition_with_attribution_roundtrips_through_json() -> None:
    t = multi_transition(2, n_fields=len(FIELDS))
    t = replace(t, attribution=((*t.attribution[0][:3], None), *t.attribution[1:]))  # a missing newest value
    d = json.loads(json.dumps(t.to_dict(), allow_nan=False))
    assert d["fields"] == list(t.fields) and len(d["attribution"]) == len(t.attribution)
    back = Transition.from_dict(d)
    assert back == t
    assert back.attribution[0][3] is None and all(isinstance(x[2], int) for x in back.attribution)
    # non-finite samples and values survive as NaN / None
    odd = replace(t, values=(float("nan"), *(t.values or ())[1:]),
                  attribution=(("a", 0.7, 1, float("inf")), ("b", 0.3, -1, 2.0)))
    again = Transition.from_dict(json.loads(json.dumps(odd.to_dict(), allow_nan=False)))
    assert again.values is not None and np.isnan(again.values[0])
    assert again.attribution == (("a", 0.7, 1, None), ("b", 0.3, -1, 2.0))


def test_an_old_transition_without_the_new_keys_still_loads() -> None:
    old = {"kind": "anomalous", "series_id": "ekg|patient=p1", "signal": "ekg", "tags": [["patient", "p1"]],
           "model_id": "ekg-1", "start_ns": 0, "end_ns": 31 * S, "threshold": 1.5, "max_error": 3.0, "ratio": 2.0,
           "n_missing": 0, "since_ns": 31 * S, "windows": 1, "peak_error": 3.0, "peak_ratio": 2.0,
           "values": [1.0, None, 2.0], "reconstruction": [1.0, 1.0, 1.0], "score": 0.5}
    t = Transition.from_dict(old)
    assert t.attribution == () and t.peak_attribution == () and t.fields == ()
    assert t.values is not None and len(t.values) == 3 and plot_error(t) is not None
    text, _ = format_message(t)
    assert "direction" not in text and "top fields" not in text
    # and a transition without attribution writes the new keys empty, which read back the same
    assert Transition.from_dict(json.loads(json.dumps(t.to_dict()))) .attribution == ()


def test_the_peak_attribution_is_the_worst_windows_and_survives_a_restart(tmp_path: Path) -> None:
    cfg = config(repeat_every_s=1.0)
    wins = [mwin(i) for i in range(4)]
    ratios = [w.ratio for w in wins]
    assert all(w.anomalous for w in wins) and len(set(ratios)) == 4
    m = AlertManager(cfg, tmp_path, sinks=[LogSink()])
    first = m.observe(wins[:2], now_ns=0)
    assert [t.kind for t in first] == [ANOMALOUS]
    # the state on disk carries the peak's attribution; a restarted manager goes on from it
    again = AlertManager(cfg, tmp_path, sinks=[LogSink()])
    rest = again.observe([*wins[2:], mwin(4, anomalous=False), mwin(5, anomalous=False)], now_ns=10 * S)
    assert [t.kind for t in rest] == [REMINDER, RECOVERED]
    worst = max(range(4), key=lambda k: ratios[k])  # type: ignore[arg-type,return-value]
    reminder, recovered = rest
    assert reminder.attribution == expected_attribution(wins[2])   # its own window's
    assert recovered.peak_error == wins[worst].max_error
    assert recovered.peak_attribution == expected_attribution(wins[worst])
    assert recovered.attribution == expected_attribution(mwin(5, anomalous=False))
    assert recovered.values is None and recovered.fields == ()
    # back to OK: nothing of the episode stays in the state
    state = json.loads((tmp_path / "alerts.json").read_text())["series"][HOST.id]
    assert state["status"] == "OK" and "peak_attribution" not in state


def test_state_files_without_or_with_unknown_keys_load(tmp_path: Path) -> None:
    cfg = config()
    AlertManager(cfg, tmp_path, sinks=[LogSink()]).observe([mwin(0)], now_ns=0)
    doc = json.loads((tmp_path / "alerts.json").read_text())
    series = doc["series"][HOST.id]
    assert series["peak_attribution"][0][0] == mwin(0).attribution[0].field
    del series["peak_attribution"]             # as an anomalyd before multi-field signals saved it
    series["from_the_future"] = 1               # and a key this version does not know
    (tmp_path / "alerts.json").write_text(json.dumps(doc))
    m = AlertManager(cfg, tmp_path, sinks=[LogSink()])
    assert m.series[HOST.id].status == "ANOMALOUS" and m.series[HOST.id].peak_attribution == []
    out = m.observe([mwin(1, anomalous=False), mwin(2, anomalous=False)], now_ns=0)
    assert [t.kind for t in out] == [RECOVERED] and out[0].peak_attribution == ()


# ---------------------------------------------------------------------------------------------------------
# Messages


def test_a_multi_field_message_names_the_top_fields_with_direction_and_value() -> None:
    t = multi_transition(3, n_fields=len(FIELDS))
    text, blocks = format_message(t)
    named, unnamed = t.attribution[:MAX_NAMED_FIELDS], t.attribution[MAX_NAMED_FIELDS:]
    parts = [f"{f} {arrow(d)} ({sh:.0%}, value {v:.4g})" for f, sh, d, v in named]
    assert text.endswith("; top fields: " + ", ".join(parts))
    assert unnamed and not any(f in text for f, *_ in unnamed)
    assert len(text) < 400
    (section,) = [b for b in blocks if b["type"] == "section" and "text" in b]
    body = section["text"]["text"]
    assert body.startswith("*Top fields*")
    for f, sh, d, v in named:
        assert f"`{f}` *{arrow(d)}* {sh:.0%}, value {v:.4g}" in body
    assert [b["type"] for b in blocks] == ["header", "section", "section", "context"]
    # a reminder names its window's fields as well; a recovery the peak's, without values
    assert "; top fields: " + ", ".join(parts) in format_message(replace(t, kind=REMINDER, since_ns=0))[0]
    rec_text, rec_blocks = format_message(replace(t, kind=RECOVERED, since_ns=0, windows=3))
    peak = ", ".join(f"{f} {arrow(d)} {sh:.0%}" for f, sh, d, _ in t.peak_attribution[:MAX_NAMED_FIELDS])
    assert rec_text.endswith("; peak top fields: " + peak) and "value" not in rec_text
    assert any(b.get("text", {}).get("text", "").startswith("*Peak top fields*") for b in rec_blocks)


def test_field_names_are_escaped_for_mrkdwn_and_missing_values_left_out() -> None:
    t = replace(multi_transition(1), attribution=(("a<b>&c", 0.6, 1, None), ("x`y", 0.4, -1, 2.0)))
    text, blocks = format_message(t)
    assert "top fields: a<b>&c up (60%), x`y down (40%, value 2)" in text    # plain text: as is
    body = next(b for b in blocks if b["type"] == "section" and "text" in b)["text"]["text"]
    assert "`a&lt;b&gt;&amp;c` *up* 60%" in body and "<b>" not in body and "`x'y`" in body


def test_a_single_field_message_only_gains_its_direction() -> None:
    for direction in (1, -1):
        (t,) = AlertManager(config(), Path("/nonexistent"), dry_run=True, sinks=[]).observe(
            [swin(0, direction=direction)], now_ns=0)
        dash = "http://g/d?s={series}"
        before_text, before_blocks = format_message(replace(t, attribution=()), dash)
        text, blocks = format_message(t, dash)
        head, link = before_text.split("; dashboard: ")
        assert text == f"{head}; direction {arrow(direction)}; dashboard: {link}"
        assert "top fields" not in text and "ecg" not in text
        assert blocks[0] == before_blocks[0] and blocks[2:] == before_blocks[2:]
        fields = [f["text"] for f in blocks[1]["fields"]]
        direction_field = f"*Direction*\n{arrow(direction)}"
        assert direction_field in fields    # next to the ratio; the other fields as before
        assert [f for f in fields if f != direction_field] == [f["text"] for f in before_blocks[1]["fields"]]
    # a recovery of a single field is unchanged
    rec = replace(t, kind=RECOVERED, since_ns=0, windows=2, peak_attribution=t.attribution)
    assert format_message(rec) == format_message(replace(rec, attribution=(), peak_attribution=()))


def test_the_log_sink_line_names_the_top_fields(caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.INFO, logger="anomalyd.alerts.sinks")
    t = multi_transition(4, n_fields=5)
    LogSink().send(t, deadline=0.0)
    (line,) = [r.getMessage() for r in caplog.records if r.getMessage().startswith("alert: ")]
    assert "top fields: " in line
    for f, _, d, _ in t.attribution[:MAX_NAMED_FIELDS]:
        assert f"{f} {arrow(d)} (" in line


# ---------------------------------------------------------------------------------------------------------
# Plot


def test_a_three_field_plot_has_a_panel_per_field_and_the_error_panel() -> None:
    t = multi_transition(5, n_fields=len(FIELDS))
    assert len(t.fields) == 3
    fig = plot_figure(t)
    *panels, err = fig.axes
    assert len(panels) == len(t.fields)
    shares = {f: (sh, d) for f, sh, d, _ in t.attribution}
    for ax, (name, v, u) in zip(panels, t.columns(), strict=True):
        sh, d = shares[name]
        title = ax.get_title(loc="left")
        assert name in title and arrow(d) in title and f"{sh:.0%}" in title
        np.testing.assert_array_equal(ax.lines[0].get_ydata(), v)
        np.testing.assert_array_equal(ax.lines[1].get_ydata(), u)  # type: ignore[arg-type]
    # the error panel: each field's error, the largest being max_error, against the threshold
    widths = sorted((p.get_width() for p in err.patches), reverse=True)
    assert len(widths) == len(t.attribution)
    assert widths[0] == pytest.approx(t.max_error)
    want = sorted((t.max_error * sh / t.attribution[0][1] for _, sh, _, _ in t.attribution), reverse=True)  # type: ignore[operator]
    np.testing.assert_allclose(widths, want)
    assert err.lines[0].get_xdata()[0] == pytest.approx(t.threshold)
    png = render_plot(t)
    assert png is not None and png[:8] == PNG and 5_000 < len(png) < 300_000
    from PIL import Image  # matplotlib depends on pillow

    img = Image.open(io.BytesIO(png))
    img.verify()
    assert img.size[1] > img.size[0] * 0.8    # taller than the single-field plot: one panel per field
    assert plot_error(t) is None              # per-sample data-unit errors do not apply to several fields


def test_a_single_field_plot_is_unchanged() -> None:
    (t,) = AlertManager(config(), Path("/nonexistent"), dry_run=True, sinks=[]).observe([swin(0)], now_ns=0)
    fig = plot_figure(t)
    top, bottom = fig.axes
    np.testing.assert_allclose(bottom.lines[0].get_ydata(), plot_error(t), equal_nan=True)
    assert "heartbeat [patient=p1]" in top.get_title()
    png = render_plot(t)
    assert png is not None and png[:8] == PNG


def test_no_plot_without_samples_that_fit_the_fields() -> None:
    t = multi_transition(6)
    assert render_plot(replace(t, values=None)) is None
    assert render_plot(replace(t, reconstruction=None)) is None
    assert render_plot(replace(t, values=(t.values or ())[:-1])) is None     # not a whole window per field


# ---------------------------------------------------------------------------------------------------------
# Delivery


def test_slack_messages_carry_the_top_field_names(slack: SlackStub, tmp_path: Path) -> None:
    cfg = config(slack)
    m = AlertManager(cfg, tmp_path)
    episode = [mwin(10), mwin(11, anomalous=False), mwin(12, anomalous=False)]
    m.observe(episode, now_ns=0)
    anomaly, recovery = slack.delivered()
    (raw,) = [r for r in slack.recorded(slack.WEBHOOK_PATH) if r.json == anomaly]
    body = raw.body.decode()
    top = expected_attribution(episode[0])[:MAX_NAMED_FIELDS]
    for f, sh, d, _ in top:
        assert f in body and f"{f} {arrow(d)} ({sh:.0%}" in anomaly["text"]
        assert f"`{f}` *{arrow(d)}*" in json.dumps(anomaly["blocks"])
    others = [s.field for s in episode[0].attribution[MAX_NAMED_FIELDS:]]
    assert not any(f in anomaly["text"] for f in others)
    assert recovery["text"].startswith("RECOVERED host [host=h1]") and top[0][0] in recovery["text"]


def test_an_outbox_item_keeps_its_attribution_through_an_outage_and_a_restart(slack: SlackStub,
                                                                             tmp_path: Path) -> None:
    cfg = config(slack)
    slack.outage = Reply.error(500)
    AlertManager(cfg, tmp_path).observe([mwin(20)], now_ns=0)
    (item,) = (tmp_path / "outbox").glob("*.json")
    stored = json.loads(item.read_text())["transition"]
    assert stored["fields"] and len(stored["values"]) == W * len(stored["fields"]) <= W * MAX_PLOTTED_FIELDS
    assert len(stored["attribution"]) == MAX_ATTRIBUTION
    slack.outage = None
    assert AlertManager(cfg, tmp_path).flush() == 1
    (msg,) = slack.delivered()
    top = expected_attribution(mwin(20))[0]
    assert f"top fields: {top[0]} {arrow(top[2])}" in msg["text"]


def test_the_bot_attaches_the_multi_field_plot(slack: SlackStub, tmp_path: Path) -> None:
    slack_cfg = SlackConfig(channel="#alerts", timeout_s=2.0, max_retries=1, attach_plot=True,
                            base_url=slack.api_url, token=TOKEN)
    cfg = AlertsConfig(sinks=("slack",), for_windows=1, recover_windows=2, slack=slack_cfg)
    AlertManager(cfg, tmp_path).observe([mwin(30)], now_ns=0)
    (post,) = slack.recorded("/api/chat.postMessage")
    assert expected_attribution(mwin(30))[0][0] in post.json["text"]
    (upload,) = slack.recorded("/upload/")
    assert upload.body[:8] == PNG
