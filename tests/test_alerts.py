"""Alert policy and delivery against a local stand-in for Slack (tests/http_stubs.py)."""

from __future__ import annotations

import json
import logging
from collections.abc import Iterator, Sequence
from dataclasses import replace
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from anomalyd.alerts import policy
from anomalyd.alerts.manager import AlertManager, AlertStateError
from anomalyd.alerts.messages import format_message, iso_utc
from anomalyd.alerts.plots import render_plot
from anomalyd.alerts.policy import ANOMALOUS, Transition
from anomalyd.alerts.sinks import LogSink, Sink
from anomalyd.alerts.slack import SlackWebhookSink
from anomalyd.config import AlertsConfig, SlackConfig
from anomalyd.core.records import SeriesKey, WindowResult
from anomalyd.telemetry import REGISTRY
from http_stubs import Reply, SlackStub

S = 10**9
P1 = SeriesKey("heartbeat", (("patient", "p1"),))
P2 = SeriesKey("heartbeat", (("patient", "p2"),))
TOKEN = "xoxb-0000-s3cr3t-token"
DASH = "https://grafana.example/d/anomalyd?var-signal={signal}&var-series={series}&from={from_ms}&to={to_ms}"


def win(i: int, anomalous: bool = False, key: SeriesKey = P1, missing: bool = False,
        error: float | None = None) -> WindowResult:
    """Window i of a series: 32 samples at 1 s, a new window every 16 s; threshold 1.0."""
    start = 1_700_000_000 * S + i * 16 * S
    if missing:
        return WindowResult(key, "heartbeat-abc", start, start + 31 * S, 1.0, missing=True, n_missing=7)
    err = error if error is not None else (2.5 if anomalous else 0.4)
    values = np.sin(np.linspace(0, 2 * np.pi, 32))
    recon = values.copy()
    recon[10] += err
    return WindowResult(key, "heartbeat-abc", start, start + 31 * S, 1.0, max_error=err, anomalous=err > 1.0,
                        score=min(err / 3, 1.0), values=values, reconstruction=recon)


def pattern(p: str, key: SeriesKey = P1, first: int = 0) -> list[WindowResult]:
    """'.' normal, 'A' anomalous, '?' missing."""
    return [win(first + i, anomalous=c == "A", key=key, missing=c == "?") for i, c in enumerate(p)]


def config(stub: SlackStub | None = None, **changes: object) -> AlertsConfig:
    slack = SlackConfig(channel="#alerts", timeout_s=0.5, max_retries=2, attach_plot=False,
                        webhook_url=stub.webhook_url if stub else "")
    cfg = AlertsConfig(sinks=("slack",) if stub else ("log",), for_windows=1, recover_windows=2,
                       dashboard_url=DASH, slack=slack)
    return replace(cfg, **changes)  # type: ignore[arg-type]


def bot_config(stub: SlackStub, **changes: object) -> AlertsConfig:
    slack = SlackConfig(channel="#alerts", timeout_s=2.0, max_retries=1, attach_plot=True,
                        base_url=stub.api_url, token=TOKEN)
    cfg = AlertsConfig(sinks=("slack",), recover_windows=2, dashboard_url=DASH, slack=slack)
    return replace(cfg, **changes)  # type: ignore[arg-type]


@pytest.fixture
def slack() -> Iterator[SlackStub]:
    stub = SlackStub().start()
    yield stub
    stub.stop()


def summary(messages: Sequence[dict]) -> list[tuple[str, str]]:
    """(title word(s), window end) of each delivered message, from its fallback text."""
    out = []
    for m in messages:
        text = m["text"]
        title = text.split(" heartbeat ")[0]
        end = text.split(" .. ")[1].split(",")[0].split(";")[0]
        out.append((title, end))
    return out


def end(i: int) -> str:
    return iso_utc(win(i).end_ns)


class FakeClock:
    """The alert manager's clock in a test: it moves only when told (``advance``) or slept on (``sleep``, which
    records each wait), so that deadlines and pauses are checked as logic, whatever the machine's speed."""

    def __init__(self) -> None:
        self.now = 1000.0
        self.slept: list[float] = []

    def __call__(self) -> float:
        return self.now

    def sleep(self, seconds: float) -> None:
        self.slept.append(seconds)
        self.now += seconds

    def advance(self, seconds: float) -> None:
        self.now += seconds


def sent_count(sink: str, outcome: str) -> float:
    return REGISTRY.get_sample_value("anomalyd_alerts_total", {"sink": sink, "outcome": outcome}) or 0.0


# ---------------------------------------------------------------------------------------------------------
# Policy


def test_window_sequence_produces_exactly_the_expected_messages(slack: SlackStub, tmp_path: Path) -> None:
    cfg = config(slack, for_windows=2, recover_windows=2)
    m = AlertManager(cfg, tmp_path)
    #          0123456789012345
    seq = "..A.AA.AAA.A..A.."
    transitions = m.observe(pattern(seq), now_ns=0)
    # a single A (2) is not enough; AA (4,5) opens; '.' at 6 then A resets the recovery count; '..' (12,13)
    # closes; the A at 14 alone does not reopen.
    assert [(t.kind, t.end_ns) for t in transitions] == [("anomalous", win(5).end_ns),
                                                          ("recovered", win(13).end_ns)]
    assert summary(slack.delivered()) == [("ANOMALY", end(5)), ("RECOVERED", end(13))]
    assert m.queued() == 0
    # The same policy fed window by window, in two calls, with another series interleaved, gives the same.
    slack.requests.clear()
    m2 = AlertManager(cfg, tmp_path / "incremental")
    results = pattern(seq) + pattern("AA..", key=P2)
    for r in sorted(results, key=lambda r: (r.key.id, r.end_ns)):  # per series, out of global time order
        m2.observe([r], now_ns=0)
    got = sorted((t["text"].split(":")[0], t["text"].split(" .. ")[1][:20]) for t in slack.delivered())
    want = sorted([("ANOMALY heartbeat [patient=p1]", end(5)), ("RECOVERED heartbeat [patient=p1]", end(13)),
                   ("ANOMALY heartbeat [patient=p2]", end(1)), ("RECOVERED heartbeat [patient=p2]", end(3))])
    assert got == want


def test_for_windows_one_and_recover_windows_one(slack: SlackStub, tmp_path: Path) -> None:
    m = AlertManager(config(slack, for_windows=1, recover_windows=1), tmp_path)
    m.observe(pattern("A.A.AA."), now_ns=0)
    assert summary(slack.delivered()) == [("ANOMALY", end(0)), ("RECOVERED", end(1)), ("ANOMALY", end(2)),
                                          ("RECOVERED", end(3)), ("ANOMALY", end(4)), ("RECOVERED", end(6))]


def test_the_default_recovery_waits_one_window_span_of_normal_windows(slack: SlackStub, tmp_path: Path) -> None:
    """Every window is scored (slide 1): by default a series recovers after ``recover_windows`` (32) normal
    windows in a row, so one anomaly does not flap while the windows still overlapping it come in."""
    n = AlertsConfig().recover_windows
    assert n == 32
    m = AlertManager(config(slack, recover_windows=n), tmp_path)
    assert [t.kind for t in m.observe(pattern("A" + "." * (n - 1)), now_ns=0)] == ["anomalous"]
    assert [t.kind for t in m.observe(pattern(".", first=n), now_ns=0)] == ["recovered"]
    assert summary(slack.delivered()) == [("ANOMALY", end(0)), ("RECOVERED", end(n))]


def test_reminders_are_spaced_by_repeat_every_in_wall_time(slack: SlackStub, tmp_path: Path) -> None:
    m = AlertManager(config(slack, repeat_every_s=60.0), tmp_path)
    m.observe(pattern("AA"), now_ns=0)                 # opens at window 0; window 1 is too soon
    m.observe(pattern("A", first=2), now_ns=30 * S)    # 30 s later: still too soon
    m.observe(pattern("AA", first=3), now_ns=61 * S)   # 61 s: one reminder (not one per window)
    m.observe(pattern("A", first=5), now_ns=100 * S)   # 39 s after the reminder: none
    m.observe(pattern("A", first=6), now_ns=122 * S)   # 61 s after: another
    m.observe(pattern("..", first=7), now_ns=130 * S)
    assert summary(slack.delivered()) == [("ANOMALY", end(0)), ("STILL ANOMALOUS", end(3)),
                                          ("STILL ANOMALOUS", end(6)), ("RECOVERED", end(8))]
    assert "(7 anomalous windows" in slack.delivered()[-1]["text"]


def test_no_reminders_when_repeat_every_is_zero(slack: SlackStub, tmp_path: Path) -> None:
    m = AlertManager(config(slack, repeat_every_s=0.0), tmp_path)
    for i in range(5):
        m.observe(pattern("A", first=i), now_ns=i * 3600 * S)
    assert summary(slack.delivered()) == [("ANOMALY", end(0))]


def test_missing_data_alerts_are_opt_in(slack: SlackStub, tmp_path: Path) -> None:
    seq = "..??..A??A.."
    off = AlertManager(config(slack), tmp_path / "off")
    off.observe(pattern(seq), now_ns=0)
    # missing windows neither count as normal nor break the anomaly: A ?? A . . recovers at 11
    assert summary(slack.delivered()) == [("ANOMALY", end(6)), ("RECOVERED", end(11))]
    slack.requests.clear()
    on = AlertManager(config(slack, missing_data=True), tmp_path / "on")
    on.observe(pattern(seq), now_ns=0)
    assert summary(slack.delivered()) == [("MISSING DATA", end(2)), ("DATA RESUMED", end(4)),
                                          ("ANOMALY", end(6)), ("MISSING DATA", end(7)),
                                          ("DATA RESUMED", end(9)), ("RECOVERED", end(11))]
    assert "7 missing samples" in slack.delivered()[0]["text"]


def test_state_survives_a_restart_and_old_windows_are_ignored(slack: SlackStub, tmp_path: Path) -> None:
    cfg = config(slack, recover_windows=2)
    AlertManager(cfg, tmp_path).observe(pattern("..AA"), now_ns=0)
    again = AlertManager(cfg, tmp_path)
    assert again.series[P1.id].status == "ANOMALOUS"
    # the worker re-scores windows after a crash: already observed windows change nothing
    assert again.observe(pattern("..AA"), now_ns=0) == []
    assert again.observe(pattern("A.", first=4), now_ns=0) == []       # still anomalous, one normal
    last = AlertManager(cfg, tmp_path).observe(pattern(".", first=6), now_ns=0)
    assert [t.kind for t in last] == ["recovered"]
    assert summary(slack.delivered()) == [("ANOMALY", end(2)), ("RECOVERED", end(6))]


# ---------------------------------------------------------------------------------------------------------
# Message


def test_message_content_blocks_and_dashboard_link(slack: SlackStub, tmp_path: Path) -> None:
    AlertManager(config(slack), tmp_path).observe([win(0, error=2.5)], now_ns=0)
    (msg,) = slack.delivered()
    w = win(0)
    start, stop = iso_utc(w.start_ns), iso_utc(w.end_ns)
    assert start == "2023-11-14T22:13:20Z" and stop == "2023-11-14T22:13:51Z"
    link = ("https://grafana.example/d/anomalyd?var-signal=heartbeat&var-series=patient%3Dp1"
            f"&from={(w.start_ns - 31 * S) // 10**6}&to={(w.end_ns + 31 * S) // 10**6}")
    assert msg["text"] == ("ANOMALY heartbeat [patient=p1]: score 0.83; max error 2.5 vs threshold 1 (ratio 2.5) in "
                           f"window {start} .. {stop}, model heartbeat-abc; dashboard: {link}")
    blocks = msg["blocks"]
    assert [b["type"] for b in blocks] == ["header", "section", "actions", "context"]
    assert blocks[0]["text"]["text"] == ":rotating_light: ANOMALY: heartbeat [patient=p1]"
    fields = [f["text"] for f in blocks[1]["fields"]]
    assert fields == ["*Signal*\nheartbeat", "*Series*\n`patient=p1`", "*Score*\n0.83",
                      "*Max error / threshold*\n2.5 / 1", "*Ratio*\n2.5", f"*Window (UTC)*\n{start}\n{stop}",
                      "*Model*\n`heartbeat-abc`"]
    assert blocks[2]["elements"][0]["url"] == link
    assert msg["unfurl_links"] is False


def test_message_escapes_mrkdwn_and_survives_a_bad_dashboard_template(
        caplog: pytest.LogCaptureFixture) -> None:
    t = Transition(ANOMALOUS, "x|k=<a&b>", "x", (("k", "<a&b>"),), "m", 0, 31 * S, 1.0, max_error=2.0,
                   ratio=2.0)
    with caplog.at_level(logging.WARNING):
        text, blocks = format_message(t, "http://g/{nope}")
    assert "dashboard" not in text and [b["type"] for b in blocks] == ["header", "section", "context"]
    assert "`k=&lt;a&amp;b&gt;`" in blocks[1]["fields"][1]["text"]
    assert "cannot be filled" in caplog.text


def test_render_plot_is_a_png() -> None:
    w = win(0, anomalous=True)
    t = Transition(ANOMALOUS, P1.id, "heartbeat", P1.tags, "m", w.start_ns, w.end_ns, 1.0, 2.5, 2.5,
                   values=tuple(w.values), reconstruction=tuple(w.reconstruction))  # type: ignore[arg-type]
    png = render_plot(t)
    assert png is not None and png[:8] == b"\x89PNG\r\n\x1a\n" and 5_000 < len(png) < 200_000
    assert render_plot(replace(t, values=None)) is None


# ---------------------------------------------------------------------------------------------------------
# Delivery


def test_outage_loses_nothing_and_duplicates_nothing_across_restarts(slack: SlackStub,
                                                                     tmp_path: Path) -> None:
    cfg = config(slack, recover_windows=1)
    sent_before = sent_count("slack", "sent")
    m = AlertManager(cfg, tmp_path)
    m.observe(pattern("A."), now_ns=0)                          # ANOMALY 0, RECOVERED 1: delivered
    slack.outage = Reply.error(500)
    m.observe(pattern("A.", first=2), now_ns=0)                 # queued: 5xx is retried, then left queued
    assert m.queued() == 2 and len(slack.delivered()) == 2
    n_500 = len([r for r in slack.requests if r.status == 500])
    assert n_500 == 1 + cfg.slack.max_retries                   # retried max_retries times, then gave up
    slack.outage = Reply.hang(5.0)                              # Slack now hangs
    clock, asked = FakeClock(), len(slack.requests)
    m2 = AlertManager(cfg, tmp_path, clock=clock, sleep=clock.sleep)  # restart in the middle of the outage
    m2.observe(pattern("A", first=4), now_ns=0)
    # one attempt (bounded by its timeout, not retried), then the sink rests: 3 queued alerts do not each wait
    assert len(slack.requests) == asked + 1 and clock.slept == [] and m2.queued() == 3
    # after a crash the worker re-scores and re-observes windows: nothing is queued twice
    m3 = AlertManager(cfg, tmp_path)
    assert m3.observe(pattern("A.A", first=2), now_ns=0) == []
    assert m3.queued() == 3
    slack.outage = None                                         # Slack is back
    assert AlertManager(cfg, tmp_path).flush() == 3
    assert summary(slack.delivered()) == [("ANOMALY", end(0)), ("RECOVERED", end(1)), ("ANOMALY", end(2)),
                                          ("RECOVERED", end(3)), ("ANOMALY", end(4))]
    keys = [m["blocks"][-1]["elements"][0]["text"] for m in slack.delivered()]
    assert len(set(keys)) == len(keys) == 5
    assert AlertManager(cfg, tmp_path).flush() == 0 and not list((tmp_path / "outbox").iterdir())
    assert sent_count("slack", "sent") - sent_before == 5


def test_crash_between_queueing_and_saving_state_sends_once(slack: SlackStub, tmp_path: Path,
                                                           monkeypatch: pytest.MonkeyPatch) -> None:
    cfg = config(slack)
    m = AlertManager(cfg, tmp_path)
    with monkeypatch.context() as mp:
        def crash() -> None:
            raise KeyboardInterrupt("power cut")

        mp.setattr(m, "_save_state", crash)
        with pytest.raises(KeyboardInterrupt):
            m.observe(pattern("A"), now_ns=0)
    assert not (tmp_path / "alerts.json").exists() and len(list((tmp_path / "outbox").glob("*.json"))) == 1
    restarted = AlertManager(cfg, tmp_path)
    assert restarted.flush() == 1                              # the queued alert goes out first ...
    assert [p.suffix for p in (tmp_path / "outbox").iterdir()] == [".sent"]
    assert restarted.observe(pattern("A"), now_ns=0) == [first_anomaly(0)]  # ... the window is re-observed
    assert summary(slack.delivered()) == [("ANOMALY", end(0))]             # ... and not sent again
    assert not list((tmp_path / "outbox").iterdir())                       # the marker is gone


def first_anomaly(i: int) -> Transition:
    """The transition the first anomalous window i of P1 produces (for equality checks)."""
    w = win(i, anomalous=True)
    return Transition(ANOMALOUS, P1.id, "heartbeat", P1.tags, "heartbeat-abc", w.start_ns, w.end_ns, 1.0,
                      2.5, 2.5, since_ns=w.end_ns, windows=1, peak_error=2.5, peak_ratio=2.5,
                      values=tuple(float(v) for v in w.values),  # type: ignore[union-attr]
                      reconstruction=tuple(float(v) for v in w.reconstruction),  # type: ignore[union-attr]
                      score=w.score)


def test_retry_after_is_honoured(slack: SlackStub, tmp_path: Path) -> None:
    slack.script(Reply.rate_limited(1, path=slack.WEBHOOK_PATH))
    m = AlertManager(config(slack, slack=replace(config(slack).slack, timeout_s=1.0)), tmp_path)
    m.observe(pattern("A"), now_ns=0)
    first, second = slack.recorded(slack.WEBHOOK_PATH)
    assert (first.status, second.status) == (429, 200)
    assert second.at - first.at >= 1.0                          # waited as long as Slack asked
    assert summary(slack.delivered()) == [("ANOMALY", end(0))] and m.queued() == 0


def test_retry_after_beyond_the_deadline_keeps_the_alert_queued(slack: SlackStub, tmp_path: Path) -> None:
    slack.script(Reply.rate_limited(30, path=slack.WEBHOOK_PATH))
    clock = FakeClock()
    m = AlertManager(config(slack), tmp_path, clock=clock, sleep=clock.sleep)
    m.observe(pattern("A"), now_ns=0)
    assert clock.slept == []                                    # did not sleep 30 s inside a tick
    assert m.queued() == 1 and len(slack.requests) == 1
    assert m.flush() == 0 and len(slack.requests) == 1          # and does not knock again before 30 s
    clock.advance(29.0)
    assert m.flush() == 0 and len(slack.requests) == 1          # ... not even 29 s later
    clock.advance(1.0)                                          # ... but 30 s later
    assert m.flush() == 1 and summary(slack.delivered()) == [("ANOMALY", end(0))]
    assert clock.slept == []


def test_the_deadline_bounds_a_hanging_slack(slack: SlackStub, tmp_path: Path,
                                            monkeypatch: pytest.MonkeyPatch) -> None:
    """An attempt's HTTP timeout is alerts.slack.timeout, or what is left of the flush when that is less; with
    (nearly) nothing left no attempt is made; and a hanging sink gets one attempt per flush."""
    import anomalyd.alerts.slack as slack_mod

    timeouts: list[float] = []

    class RecordingWebhookClient(slack_mod.WebhookClient):
        def __init__(self, *args: Any, **kwargs: Any) -> None:
            timeouts.append(kwargs["timeout"])
            super().__init__(*args, **kwargs)

    monkeypatch.setattr(slack_mod, "WebhookClient", RecordingWebhookClient)
    slack.outage = Reply.hang(10.0)
    clock = FakeClock()
    m = AlertManager(config(slack, recover_windows=1), tmp_path, clock=clock, sleep=clock.sleep)
    m.observe(pattern("A.A.A."), now_ns=0)                      # 6 alerts queued, Slack hangs
    assert timeouts == [0.5]                                    # alerts.slack.timeout, within the 5 s flush
    m.flush(deadline_s=1.2)
    assert timeouts == [0.5, 0.5] and m.queued() == 6
    # one attempt per flush: a hanging sink stops the flush instead of timing out on every alert
    assert len(slack.requests) == 2 and clock.slept == []
    assert m.flush(deadline_s=0.3) == 0
    assert timeouts == pytest.approx([0.5, 0.5, 0.3]) and len(slack.requests) == 3  # no more than what is left
    assert m.flush(deadline_s=0.04) == 0
    assert len(timeouts) == 3 and len(slack.requests) == 3     # no time left: no attempt
    assert m.queued() == 6


class SlowSink(Sink):
    """Delivers, taking ``took`` seconds of the fake clock per alert; records the deadline of each send."""

    name = "slow"

    def __init__(self, clock: FakeClock, took: float) -> None:
        self.clock, self.took = clock, took
        self.deadlines: list[float] = []

    def send(self, t: Transition, deadline: float) -> None:
        self.deadlines.append(deadline)
        self.clock.advance(self.took)


def test_a_flush_stops_at_its_deadline(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    clock = FakeClock()
    sink = SlowSink(clock, took=0.5)
    m = AlertManager(config(recover_windows=1), tmp_path, sinks=[sink], clock=clock)
    m.observe(pattern("A.A.A."), now_ns=0, deliver=False)      # 6 alerts queued
    start = clock()
    assert m.flush(deadline_s=1.2) == 3                         # sent at +0, +0.5, +1.0; at +1.5 it is over
    assert sink.deadlines == [start + 1.2] * 3 and m.queued() == 3
    assert "alert flush reached its 1.2s deadline; the rest stays queued" in caplog.text
    assert m.flush() == 3 and m.queued() == 0                   # the default flush: 5 s
    assert sink.deadlines[3:] == [start + 1.5 + m.default_flush_s()] * 3


def test_an_unreachable_slack_is_retried_within_the_deadline_then_queued(
        tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    from anomalyd.store.local import free_port

    url = f"http://127.0.0.1:{free_port()}/services/T0/B0/s3cr3t"   # nothing listens there
    cfg = config(slack=SlackConfig(timeout_s=0.5, max_retries=2, webhook_url=url), sinks=("slack",))
    clock = FakeClock()
    m = AlertManager(cfg, tmp_path, clock=clock, sleep=clock.sleep)
    m.observe(pattern("A"), now_ns=0)
    # max_retries retries, after a backoff of 0.25 s then 0.5 s, each plus up to 100 % of jitter
    assert len(clock.slept) == 2 and 0.25 <= clock.slept[0] <= 0.5 and 0.5 <= clock.slept[1] <= 1.0
    assert m.queued() == 1
    # a retry only when its backoff and another attempt fit in what is left of the flush (0.25 s + 0.5 s > 0.7 s)
    clock.slept.clear()
    assert m.flush(deadline_s=0.7) == 0 and clock.slept == [] and m.queued() == 1
    assert "Slack webhook request failed (URLError" in caplog.text and "s3cr3t" not in caplog.text


def test_a_malformed_message_is_dead_lettered_not_blocking(slack: SlackStub, tmp_path: Path) -> None:
    slack.script(Reply(400, "invalid_blocks", path=slack.WEBHOOK_PATH))
    m = AlertManager(config(slack, recover_windows=1), tmp_path)
    m.observe(pattern("A."), now_ns=0)
    assert summary(slack.delivered()) == [("RECOVERED", end(1))]
    assert m.queued() == 0 and len(list((tmp_path / "outbox" / "rejected").glob("*.json"))) == 1


def test_log_sink_and_dry_run(slack: SlackStub, tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.INFO, logger="anomalyd.alerts.manager")
    cfg = config(slack, sinks=("log", "slack"))
    dry = AlertManager(cfg, tmp_path, dry_run=True)
    assert [t.kind for t in dry.observe(pattern("A.."), now_ns=0)] == ["anomalous", "recovered"]
    assert dry.flush() == 0
    assert slack.requests == []
    assert not (tmp_path / "alerts.json").exists() and not (tmp_path / "outbox").exists()
    assert "dry-run, not sent: ANOMALY heartbeat [patient=p1]" in caplog.text
    caplog.clear()
    live = AlertManager(cfg, tmp_path, sinks=[LogSink(DASH), SlackWebhookSink(cfg.slack)])
    live.observe(pattern("A.."), now_ns=0)
    warnings = [r.getMessage() for r in caplog.records if r.levelno == logging.WARNING]
    assert warnings and warnings[0].startswith("alert: ANOMALY heartbeat [patient=p1]")
    assert len(slack.delivered()) == 2


def test_bot_token_posts_blocks_and_attaches_the_plot_in_the_thread(slack: SlackStub, tmp_path: Path) -> None:
    AlertManager(bot_config(slack), tmp_path).observe(pattern("A.."), now_ns=0)
    posts = slack.recorded("/api/chat.postMessage")
    assert len(posts) == 2
    assert posts[0].headers["Authorization"] == f"Bearer {TOKEN}"
    assert posts[0].json["channel"] == "#alerts" and posts[0].json["text"].startswith("ANOMALY heartbeat")
    assert [b["type"] for b in posts[0].json["blocks"]][:2] == ["header", "section"]
    upload = slack.recorded("/upload/")
    assert len(upload) == 1 and upload[0].body[:8] == b"\x89PNG\r\n\x1a\n"    # only for the anomaly
    (complete,) = slack.recorded("/api/files.completeUploadExternal")
    params = {k: v[0] for k, v in {**complete.query, **(complete.form or {})}.items()}
    assert params["channel_id"] == "C0ALERTS" and params["thread_ts"] == "1700000000.000000"


def test_a_failed_plot_upload_still_sends_the_message(slack: SlackStub, tmp_path: Path,
                                                     caplog: pytest.LogCaptureFixture) -> None:
    slack.script(Reply.error(500, path="/upload/"), Reply.error(500, path="/upload/"))
    m = AlertManager(bot_config(slack), tmp_path)
    m.observe(pattern("A"), now_ns=0)
    assert len(slack.delivered()) == 1 and m.queued() == 0
    assert "plot upload" in caplog.text and "sent without it" in caplog.text


def test_without_matplotlib_messages_go_without_the_plot_and_one_line_names_the_extra(
        slack: SlackStub, tmp_path: Path, caplog: pytest.LogCaptureFixture, monkeypatch: pytest.MonkeyPatch) -> None:
    import sys

    import anomalyd.alerts.plots

    for name in [m for m in sys.modules if m == "matplotlib" or m.startswith("matplotlib.")]:
        monkeypatch.delitem(sys.modules, name)
    monkeypatch.setitem(sys.modules, "matplotlib", None)  # as if not installed: importing it raises
    monkeypatch.setattr(anomalyd.alerts.plots, "_told_no_plots", False)
    m = AlertManager(bot_config(slack), tmp_path)
    m.observe(pattern("A..A"), now_ns=0)
    assert len(slack.recorded("/api/chat.postMessage")) == 3 and m.queued() == 0  # anomalous, recovered, anomalous
    assert slack.recorded("/upload/") == []
    told = [r.getMessage() for r in caplog.records if "matplotlib" in r.getMessage()]
    assert len(told) == 1 and "pip install 'anomalyd[plots]'" in told[0]   # one line, not one per message
    assert "plot upload" not in caplog.text


def test_bot_rate_limit_and_errors_keep_alerts_queued(slack: SlackStub, tmp_path: Path) -> None:
    slack.script(Reply.rate_limited(60, path="/api/chat.postMessage"))
    m = AlertManager(bot_config(slack), tmp_path)
    m.observe(pattern("A"), now_ns=0)
    assert m.queued() == 1
    m._not_before.clear()
    slack.script(Reply(200, {"ok": False, "error": "channel_not_found"}, path="/api/chat.postMessage"))
    assert m.flush() == 0 and m.queued() == 1
    assert m.flush() == 1 and len(slack.delivered()) == 1


def test_secrets_never_reach_the_logs(slack: SlackStub, tmp_path: Path,
                                      caplog: pytest.LogCaptureFixture) -> None:
    for name in (None, "slack_sdk", "urllib3", "anomalyd"):          # everything, every logger
        caplog.set_level(logging.DEBUG, logger=name)
    hook = config(slack, recover_windows=1)
    m = AlertManager(hook, tmp_path / "hook")
    slack.script(Reply.error(503), Reply.rate_limited(0.2), Reply(404, "no_service"))
    m.observe(pattern("A.A."), now_ns=0)
    slack.outage = Reply.hang(3)
    m.observe(pattern("A", first=4), now_ns=0)
    slack.outage = None
    m.flush()
    bot = AlertManager(bot_config(slack, recover_windows=1), tmp_path / "bot")
    slack.script(Reply(200, {"ok": False, "error": "invalid_auth"}, path="/api/chat.postMessage"))
    bot.observe(pattern("A."), now_ns=0)
    bot.flush()
    assert len(slack.delivered()) >= 5
    text = caplog.text + "".join(repr(r.args) + str(r.msg) for r in caplog.records)
    assert "Slack webhook answered HTTP 404" in text                 # errors are reported ...
    for secret in (slack.webhook_url, "s3cr3tWebhookPath", TOKEN, "s3cr3t-token"):
        assert secret not in text                                    # ... without the secrets
    assert "s3cr3t" not in repr(hook) and "s3cr3t" not in repr(bot_config(slack))


def test_a_corrupt_state_file_is_reported_with_the_fix(tmp_path: Path) -> None:
    (tmp_path / "alerts.json").write_text("{not json")
    with pytest.raises(AlertStateError, match=r"alerts.json is unreadable .* move it away"):
        AlertManager(config(), tmp_path)
    (tmp_path / "alerts.json").write_text(json.dumps({"version": 99, "series": {}}))
    with pytest.raises(AlertStateError, match="version=99"):
        AlertManager(config(), tmp_path)


def test_sink_names_are_checked(tmp_path: Path) -> None:
    class Bad(LogSink):
        name = "../x"

    with pytest.raises(ValueError, match="sink name"):
        AlertManager(config(), tmp_path, sinks=[Bad()])
    with pytest.raises(ValueError, match="unique"):
        AlertManager(config(), tmp_path, sinks=[LogSink(), LogSink()])


def test_transition_roundtrips_through_json() -> None:
    t = replace(first_anomaly(3), values=(1.0, float("nan")), reconstruction=(0.5, 0.5))
    back = Transition.from_dict(json.loads(json.dumps(t.to_dict())))
    assert back.values is not None and np.isnan(back.values[1])
    assert replace(back, values=None) == replace(t, values=None)
    with pytest.raises(ValueError, match="unknown transition kind"):
        Transition.from_dict({**t.to_dict(), "kind": "weird"})
    assert policy.KINDS == ("anomalous", "recovered", "reminder", "missing", "resumed", "deadman")


def test_plot_draws_the_quantity_the_threshold_applies_to() -> None:
    """Issue 13, item 10: on a fitted ECG model, the PNG's error curve is the tapered difference whose maximum
    is the window's max_error (what the threshold is compared with), built from what the worker hands the alert
    (the raw window and `Detector.shape` of its nearest shape); normal windows stay under the threshold."""
    from anomalyd.alerts.plots import plot_error, plot_figure
    from anomalyd.alerts.policy import RECOVERED
    from anomalyd.core.detector import Detector, DetectorSpec
    from anomalyd.demo.synthetic import ecg

    x, _ = ecg(3000, seed=3)
    det = Detector(DetectorSpec(window=32, n_clusters=40, n_init=1)).fit([x[:2000]])
    w = det.window_
    batch = det.update(det.start(2000, x[:2000]), x[2000:])
    cols = np.flatnonzero(batch.scored & batch.complete)
    assert cols.size > 500
    shown, maxima = [], []
    for g in cols.tolist():
        k = 2000 + g
        t = Transition(ANOMALOUS, "ekg|", "ekg", (), "m", 0, (w - 1) * S, float(det.threshold_),
                       max_error=float(batch.max_error[g]), values=tuple(x[k - w + 1 : k + 1].tolist()),
                       reconstruction=tuple(det.shape(int(batch.nearest[g]))[:, 0].tolist()))
        err = np.array(plot_error(t))
        shown.append(float(np.nanmax(err)))
        maxima.append(float(batch.max_error[g]))
    shown_a, maxima_a = np.array(shown), np.array(maxima)
    # never above max_error (only the ends, where the taper is ~0, are not drawn) and almost always equal to it
    assert np.all(shown_a <= maxima_a * (1 + 1e-9) + 1e-12)
    assert np.mean(np.isclose(shown_a, maxima_a, rtol=1e-9)) > 0.95
    # the windows under the threshold are drawn under it
    under = maxima_a <= det.threshold_
    assert under.sum() > 100 and np.all(shown_a[under] <= det.threshold_)
    # the figure draws that curve against the threshold, and its title says the score and the decision
    fig = plot_figure(replace(t, score=0.12, kind=RECOVERED))
    top, bottom = fig.axes
    np.testing.assert_allclose(bottom.lines[0].get_ydata(), plot_error(t), equal_nan=True)
    assert bottom.lines[1].get_ydata()[0] == pytest.approx(det.threshold_)
    assert "score 0.12" in top.get_title() and "normal" in top.get_title()
    assert "anomalous" in plot_figure(replace(t, score=0.9)).axes[0].get_title()


def test_a_window_flagged_by_its_score_below_the_error_threshold_says_so() -> None:
    """The out-of-range rule (or the likelihood) can flag a window whose max error is under the error threshold:
    the message must not read "ANOMALY ... max error vs threshold (ratio 0.43)" as if the ratio had decided."""
    by_score = Transition(ANOMALOUS, "host|host=a", "host", (("host", "a"),), "m", 0, 10**9, 1.287, score=1.0,
                          max_error=0.5521, ratio=0.4289, windows=1)
    text = format_message(by_score)[0]
    assert "score 1.00 flags it (the max error 0.5521 is under its threshold 1.287, ratio 0.4289)" in text
    by_error = replace(by_score, score=0.7, max_error=3.0, ratio=2.33)
    assert "score 0.70; max error 3 vs threshold 1.287 (ratio 2.33)" in format_message(by_error)[0]
