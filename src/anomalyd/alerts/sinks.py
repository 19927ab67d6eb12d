"""Where alerts go: the sink interface, its delivery errors, and the log sink (the Slack sinks are in
`anomalyd.alerts.slack`)."""

from __future__ import annotations

import logging

from .messages import format_message
from .policy import ANOMALOUS, MISSING, REMINDER, Transition

log = logging.getLogger(__name__)


class DeliveryError(RuntimeError):
    """A sink could not deliver an alert now; it stays queued.

    ``retry_after_s`` asks to wait that long before trying that sink again.
    """

    def __init__(self, message: str, retry_after_s: float | None = None) -> None:
        super().__init__(message)
        self.retry_after_s = retry_after_s


class AlertRejectedError(DeliveryError):
    """The receiver refused the message itself (e.g. malformed blocks): retrying it cannot succeed."""


class Sink:
    """Where alerts go. ``send`` delivers one transition before ``deadline`` (seconds of the alert manager's
    clock, ``time.monotonic()`` unless a test injects another) or raises :class:`DeliveryError` (stays queued) /
    :class:`AlertRejectedError` (dead-lettered)."""

    name = "sink"

    def send(self, t: Transition, deadline: float) -> None:
        """Deliver ``t``.

        Parameters
        ----------
        t
            The transition to announce.
        deadline
            The clock's value (``time.monotonic()`` by default) by which the send must be over, retries included.

        Raises
        ------
        DeliveryError
            Not delivered now; the alert stays queued (``retry_after_s`` asks for a pause).
        AlertRejectedError
            The receiver refuses this message for good; it is moved to ``outbox/rejected/``.
        """
        raise NotImplementedError


class LogSink(Sink):
    """Writes each alert's text to the ``anomalyd.alerts.sinks`` logger (WARNING when raised, INFO otherwise)."""

    name = "log"

    def __init__(self, dashboard_url: str = "") -> None:
        self.dashboard_url = dashboard_url

    def send(self, t: Transition, deadline: float) -> None:
        text, _ = format_message(t, self.dashboard_url)
        level = logging.WARNING if t.kind in (ANOMALOUS, REMINDER, MISSING) else logging.INFO
        log.log(level, "alert: %s", text)

