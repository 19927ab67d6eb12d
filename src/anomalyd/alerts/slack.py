"""The Slack sinks: an incoming webhook, or a bot token (``chat.postMessage``, with the plot in the thread), through
slack-sdk, whose retries (connection errors, 5xx, 429 with Retry-After) are bounded by the send's deadline.

Secrets (the webhook URL and the bot token) never reach a log record: slack-sdk's own logging goes through a
logger kept at WARNING with a filter that masks them, and errors are reported without URLs.
"""

from __future__ import annotations

import logging
import random
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, cast

from slack_sdk import WebClient
from slack_sdk.errors import SlackApiError
from slack_sdk.http_retry.builtin_handlers import (
    ConnectionErrorRetryHandler,
    RateLimitErrorRetryHandler,
    ServerErrorRetryHandler,
)
from slack_sdk.http_retry.builtin_interval_calculators import BackoffRetryIntervalCalculator
from slack_sdk.http_retry.handler import RetryHandler
from slack_sdk.http_retry.jitter import Jitter
from slack_sdk.http_retry.request import HttpRequest
from slack_sdk.http_retry.response import HttpResponse
from slack_sdk.http_retry.state import RetryState
from slack_sdk.webhook import WebhookClient

from ..config import SlackConfig
from .messages import format_message
from .plots import plots_not_installed, render_plot
from .policy import ANOMALOUS, REMINDER, Transition
from .sinks import AlertRejectedError, DeliveryError, Sink

log = logging.getLogger(__name__)

# Slack errors caused by the message itself: retrying the same payload cannot succeed.
_REJECTED_ERRORS = {"invalid_blocks", "invalid_blocks_format", "invalid_arguments", "msg_too_long",
                    "invalid_payload", "no_text", "too_many_attachments"}


class _RedactSecrets(logging.Filter):
    """Masks registered secrets in records of slack-sdk's logger (which can print URLs)."""

    def __init__(self) -> None:
        super().__init__()
        self.secrets: set[str] = set()

    def add(self, secret: str) -> None:
        if secret:
            self.secrets.add(secret)

    def redact(self, text: str) -> str:
        for s in sorted(self.secrets, key=len, reverse=True):
            text = text.replace(s, "***")
        return text

    def filter(self, record: logging.LogRecord) -> bool:
        if self.secrets:
            record.msg = self.redact(record.getMessage())
            record.args = None
        return True


# slack-sdk logs request URLs (an incoming-webhook URL is a secret) at DEBUG/INFO whenever its logger's own
# level is NOTSET; hand it a logger of ours that stays at WARNING and masks secrets in what remains.
_SDK_LOG = logging.getLogger(f"{__name__}.slack_sdk")
_SDK_LOG.setLevel(logging.WARNING)
_REDACT = _RedactSecrets()
_SDK_LOG.addFilter(_REDACT)


@dataclass
class _Budget:
    """Time left for one send: the HTTP timeout per attempt and the deadline for all attempts, on ``clock``;
    the retries wait with ``sleep``."""

    deadline: float
    attempt_timeout: float
    clock: Callable[[], float] = time.monotonic
    sleep: Callable[[float], None] = time.sleep
    retry_after_s: float | None = None

    def fits(self, sleep_s: float) -> bool:
        return self.clock() + sleep_s + self.attempt_timeout <= self.deadline


class _BoundedRetry(RetryHandler):
    """Retry only when the backoff sleep plus another attempt still fit in the send's deadline."""

    budget: _Budget
    _sleep_s: float = 0.0

    def _bounded(self, state: RetryState) -> bool:
        self._sleep_s = self.interval_calculator.calculate_sleep_duration(state.current_attempt)
        return self.budget.fits(self._sleep_s)

    def prepare_for_next_attempt(self, *, state: RetryState, request: HttpRequest,
                                 response: HttpResponse | None = None,
                                 error: Exception | None = None) -> None:
        state.next_attempt_requested = True
        self.budget.sleep(self._sleep_s)
        state.increment_current_attempt()


class _ConnectionRetry(_BoundedRetry, ConnectionErrorRetryHandler):
    def __init__(self, budget: _Budget, max_retry_count: int) -> None:
        ConnectionErrorRetryHandler.__init__(self, max_retry_count, _backoff())
        self.budget = budget

    def _can_retry(self, *, state: RetryState, request: HttpRequest, response: HttpResponse | None = None,
                   error: Exception | None = None) -> bool:
        return (ConnectionErrorRetryHandler._can_retry(self, state=state, request=request, response=response,
                                                       error=error) and self._bounded(state))


class _ServerErrorRetry(_BoundedRetry, ServerErrorRetryHandler):
    """Retries every 5xx (slack-sdk's own handler only 500 and 503)."""

    def __init__(self, budget: _Budget, max_retry_count: int) -> None:
        ServerErrorRetryHandler.__init__(self, max_retry_count, _backoff())
        self.budget = budget

    def _can_retry(self, *, state: RetryState, request: HttpRequest, response: HttpResponse | None = None,
                   error: Exception | None = None) -> bool:
        return response is not None and response.status_code >= 500 and self._bounded(state)


class _RateLimitRetry(RateLimitErrorRetryHandler):
    """Honours Retry-After when the wait fits in the deadline; otherwise gives up and reports the wait."""

    def __init__(self, budget: _Budget, max_retry_count: int) -> None:
        super().__init__(max_retry_count)
        self.budget = budget
        self._sleep_s = 1.0

    def _can_retry(self, *, state: RetryState, request: HttpRequest, response: HttpResponse | None = None,
                   error: Exception | None = None) -> bool:
        if response is None or response.status_code != 429:
            return False
        self._sleep_s = _retry_after(response.headers) or 1.0
        if self.budget.fits(self._sleep_s):
            return True
        self.budget.retry_after_s = self._sleep_s
        return False

    def prepare_for_next_attempt(self, *, state: RetryState, request: HttpRequest,
                                 response: HttpResponse | None = None,
                                 error: Exception | None = None) -> None:
        state.next_attempt_requested = True
        self.budget.sleep(self._sleep_s)
        state.increment_current_attempt()


def _retry_after(headers: Any) -> float | None:
    """Seconds from a Retry-After header in any of the header shapes slack-sdk passes around."""
    if headers is None:
        return None
    items = headers.items() if hasattr(headers, "items") else []
    for k, v in items:
        if str(k).lower() == "retry-after":
            if isinstance(v, list | tuple):
                v = v[0] if v else None
            try:
                return max(float(v), 0.0)
            except (TypeError, ValueError):
                return None
    return None


class _ProportionalJitter(Jitter):
    """Adds up to 100 % of the backoff (slack-sdk's default adds up to a whole second, even to 0.25 s)."""

    def recalculate(self, duration: float) -> float:
        return duration * (1.0 + random.random())


def _backoff() -> BackoffRetryIntervalCalculator:
    return BackoffRetryIntervalCalculator(backoff_factor=0.25, jitter=_ProportionalJitter())


def _handlers(budget: _Budget, max_retries: int) -> list[RetryHandler]:
    return [_ConnectionRetry(budget, max_retries), _RateLimitRetry(budget, max_retries),
            _ServerErrorRetry(budget, max_retries)]


class _SlackSink(Sink):
    """What both Slack sinks share: the send's time budget on ``clock`` (the deadlines' clock, the alert
    manager's) and the retries' waits with ``sleep``."""

    name = "slack"

    def __init__(self, cfg: SlackConfig, dashboard_url: str, clock: Callable[[], float],
                 sleep: Callable[[float], None]) -> None:
        self.cfg = cfg
        self.dashboard_url = dashboard_url
        self.clock = clock
        self.sleep = sleep

    def _budget(self, deadline: float) -> _Budget:
        remaining = deadline - self.clock()
        if remaining <= 0.05:
            raise DeliveryError("no time left in this flush; the alert stays queued")
        return _Budget(deadline, min(self.cfg.timeout_s, remaining), self.clock, self.sleep)

    @staticmethod
    def _failed(what: str, exc: BaseException) -> DeliveryError:
        return DeliveryError(f"{what} failed ({type(exc).__name__}: {_REDACT.redact(str(exc))[:300]}); "
                             "the alert stays queued")


class SlackWebhookSink(_SlackSink):
    """Posts Block Kit messages to a Slack incoming webhook (``ANOMALYD_SLACK_WEBHOOK_URL``)."""

    def __init__(self, cfg: SlackConfig, dashboard_url: str = "", *, clock: Callable[[], float] = time.monotonic,
                 sleep: Callable[[float], None] = time.sleep) -> None:
        if not cfg.webhook_url:
            raise ValueError("the Slack webhook sink needs a webhook URL; set ANOMALYD_SLACK_WEBHOOK_URL or "
                             "alerts.slack.webhook_url_file")
        super().__init__(cfg, dashboard_url, clock, sleep)
        _REDACT.add(cfg.webhook_url)

    def send(self, t: Transition, deadline: float) -> None:
        text, blocks = format_message(t, self.dashboard_url)
        budget = self._budget(deadline)
        # urllib takes float seconds; slack-sdk merely annotates the timeout as int.
        client = WebhookClient(self.cfg.webhook_url, timeout=cast(int, budget.attempt_timeout),
                               logger=_SDK_LOG, retry_handlers=_handlers(budget, self.cfg.max_retries))
        try:
            resp = client.send(text=text, blocks=blocks, unfurl_links=False)
        except Exception as exc:
            raise self._failed("Slack webhook request", exc) from None
        if resp.status_code == 200:
            return
        body = _REDACT.redact(str(resp.body))[:200]
        if resp.status_code == 429:
            wait = _retry_after(resp.headers) or budget.retry_after_s
            raise DeliveryError(f"Slack webhook rate-limited (HTTP 429, Retry-After {wait}s); the alert "
                                "stays queued", retry_after_s=wait)
        if resp.status_code == 400:
            raise AlertRejectedError(f"Slack webhook rejected the message (HTTP 400 {body})")
        hint = "; check ANOMALYD_SLACK_WEBHOOK_URL" if resp.status_code in (403, 404, 410) else ""
        raise DeliveryError(f"Slack webhook answered HTTP {resp.status_code} {body}{hint}; the alert stays "
                            "queued")


class SlackBotSink(_SlackSink):
    """Posts with a bot token (``chat.postMessage`` to ``alerts.slack.channel``).

    With ``attach_plot``, a PNG of the window goes into the message's thread (``files_upload_v2``); a failed
    upload never loses the message, which is sent first.
    """

    def __init__(self, cfg: SlackConfig, dashboard_url: str = "", *, clock: Callable[[], float] = time.monotonic,
                 sleep: Callable[[float], None] = time.sleep) -> None:
        if not (cfg.token and cfg.channel):
            raise ValueError("the Slack bot sink needs ANOMALYD_SLACK_TOKEN (or alerts.slack.token_file) and "
                             "alerts.slack.channel")
        super().__init__(cfg, dashboard_url, clock, sleep)
        _REDACT.add(cfg.token)

    def send(self, t: Transition, deadline: float) -> None:
        text, blocks = format_message(t, self.dashboard_url)
        budget = self._budget(deadline)
        client = WebClient(token=self.cfg.token, base_url=self.cfg.base_url, logger=_SDK_LOG,
                           timeout=cast(int, budget.attempt_timeout),
                           retry_handlers=_handlers(budget, self.cfg.max_retries))
        try:
            resp = client.chat_postMessage(channel=self.cfg.channel, text=text, blocks=blocks,
                                           unfurl_links=False)
        except SlackApiError as exc:
            status = exc.response.status_code
            error = str(exc.response.get("error", "")) if isinstance(exc.response.data, dict) else ""
            if status == 429:
                wait = _retry_after(exc.response.headers) or budget.retry_after_s
                raise DeliveryError(f"Slack rate-limited chat.postMessage (Retry-After {wait}s); the alert "
                                    "stays queued", retry_after_s=wait) from None
            if error in _REJECTED_ERRORS:
                raise AlertRejectedError(f"Slack rejected the message ({error})") from None
            hint = {"channel_not_found": "; check alerts.slack.channel and invite the bot to it",
                    "not_in_channel": "; invite the bot to alerts.slack.channel",
                    "invalid_auth": "; check ANOMALYD_SLACK_TOKEN",
                    "not_authed": "; check ANOMALYD_SLACK_TOKEN",
                    "token_revoked": "; check ANOMALYD_SLACK_TOKEN"}.get(error, "")
            raise DeliveryError(f"Slack chat.postMessage failed (HTTP {status}, {error or 'no error code'})"
                                f"{hint}; the alert stays queued") from None
        except Exception as exc:
            raise self._failed("Slack chat.postMessage", exc) from None
        if self.cfg.attach_plot and t.kind in (ANOMALOUS, REMINDER):
            self._attach(client, t, str(resp.get("channel", "")), str(resp.get("ts", "")), budget)

    def _attach(self, client: WebClient, t: Transition, channel_id: str, ts: str, budget: _Budget) -> None:
        if not budget.fits(0.0):
            log.warning("no time left to upload the plot for %s %s; the message was sent without it", t.kind,
                        t.series_id)
            return
        try:
            png = render_plot(t)
            if png is None:
                return
            client.files_upload_v2(channel=channel_id or self.cfg.channel, thread_ts=ts or None, file=png,
                                   filename=f"{t.signal}-{t.end_ns}.png",
                                   title=f"{t.signal} [{t.series}] window vs reconstruction")
        except Exception as exc:
            if plots_not_installed(exc):
                return
            log.warning("plot upload for %s %s failed (%s: %s); the message was sent without it", t.kind,
                        t.series_id, type(exc).__name__, _REDACT.redact(str(exc))[:300])

