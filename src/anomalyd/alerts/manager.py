"""The alert manager: runs the alert policy over window results, keeps the per-series states on disk, queues the
transitions in the outbox and delivers them through the sinks.

Delivery is at-least-once and deduplicated: every transition is written to the outbox (`anomalyd.alerts.outbox`,
one file per transition and sink, fsynced) and the per-series state to ``state_dir/alerts.json`` (atomic
replace) before anything is sent. Windows at or before the last one observed for a series are ignored
(`anomalyd.alerts.policy`). A failed send stays queued for the next :meth:`AlertManager.flush`; a message a sink
rejects as malformed is moved to ``outbox/rejected/`` so it cannot block the queue. The one remaining duplicate
is a send that reached Slack just before a crash, before its outbox file was retired.
"""

from __future__ import annotations

import contextlib
import fcntl
import json
import logging
import re
import threading
import time
from collections.abc import Callable, Iterator, Sequence
from pathlib import Path

from ..config import AlertsConfig
from ..core.records import SeriesKey, WindowResult
from ..files import atomic_write, fsync_dir
from ..telemetry import ALERTS, ALERTS_QUEUED
from . import policy
from .messages import format_message, iso_utc
from .outbox import Outbox, OutboxItemError
from .policy import SeriesState, Transition
from .sinks import AlertRejectedError, DeliveryError, LogSink, Sink
from .slack import SlackBotSink, SlackWebhookSink

log = logging.getLogger(__name__)

#: The ``version`` of ``alerts.json``.
STATE_VERSION = 1
_SINK_NAME_RE = re.compile(r"^[a-z0-9_]+$")


class AlertStateError(ValueError):
    """The alert state file exists but cannot be used."""


def sinks_from_config(cfg: AlertsConfig, *, clock: Callable[[], float] = time.monotonic,
                      sleep: Callable[[float], None] = time.sleep) -> list[Sink]:
    """The sinks named in ``alerts.sinks``; Slack uses the bot token when one is set, else the webhook.
    ``clock``/``sleep`` are the Slack sinks' (see :class:`AlertManager`)."""
    out: list[Sink] = []
    for name in cfg.sinks:
        if name == "log":
            out.append(LogSink(cfg.dashboard_url))
        elif name == "slack":
            if cfg.slack.token and cfg.slack.channel:
                out.append(SlackBotSink(cfg.slack, cfg.dashboard_url, clock=clock, sleep=sleep))
            else:
                out.append(SlackWebhookSink(cfg.slack, cfg.dashboard_url, clock=clock, sleep=sleep))
        else:
            raise ValueError(f"alerts.sinks: unknown sink {name!r}; accepted: log, slack")
    return out


class AlertManager:
    """Turns window results into alert transitions, persists them, and delivers them through the sinks.

    Parameters
    ----------
    cfg
        The ``[alerts]`` configuration.
    state_dir
        Directory of ``alerts.json`` (per-series state) and ``outbox/`` (queued alerts).
    dry_run
        Compute and log transitions only: nothing is persisted, queued or sent.
    sinks
        The sinks to deliver to; default: built from ``cfg.sinks``.
    clock
        The clock of flush deadlines and rate-limit pauses, in seconds (the sinks' ``deadline`` is on it).
    sleep
        How the default Slack sinks wait between retries. Tests inject a fake clock and sleep.
    """

    def __init__(self, cfg: AlertsConfig, state_dir: Path, *, dry_run: bool = False,
                 sinks: list[Sink] | None = None, clock: Callable[[], float] = time.monotonic,
                 sleep: Callable[[float], None] = time.sleep) -> None:
        self.cfg = cfg
        self.state_dir = Path(state_dir)
        self.dry_run = dry_run
        self.clock = clock
        self.sinks: list[Sink] = (sinks_from_config(cfg, clock=clock, sleep=sleep) if sinks is None
                                  else list(sinks))
        names = [s.name for s in self.sinks]
        for n in names:
            if not _SINK_NAME_RE.match(n):
                raise ValueError(f"sink name {n!r} must be lower-case letters, digits or '_' "
                                 "(it names files)")
        if len(set(names)) != len(names):
            raise ValueError(f"sink names must be unique, got {names}")
        self.state_path = self.state_dir / "alerts.json"
        self.outbox = Outbox(self.state_dir / "outbox")
        self._mutex = threading.RLock()
        self._not_before: dict[str, float] = {}
        self.series: dict[str, SeriesState] = self._load_state()
        if not self.dry_run:
            self.outbox.create()
            ALERTS_QUEUED.set(len(self.outbox.pending()))

    # -- the state file ----------------------------------------------------------------------------------

    def _load_state(self) -> dict[str, SeriesState]:
        try:
            raw = json.loads(self.state_path.read_text())
        except FileNotFoundError:
            return {}
        except (OSError, ValueError) as exc:
            raise AlertStateError(f"alert state {self.state_path} is unreadable ({exc}); move it away to "
                                  "start with every series OK") from exc
        if not isinstance(raw, dict) or raw.get("version") != STATE_VERSION:
            got = raw.get("version") if isinstance(raw, dict) else None
            raise AlertStateError(f"alert state {self.state_path} has version={got!r}, this anomalyd reads "
                                  f"{STATE_VERSION}; move it away to start with every series OK")
        try:
            return {sid: SeriesState.from_dict(s) for sid, s in raw["series"].items()}
        except (KeyError, TypeError, AttributeError) as exc:
            raise AlertStateError(f"alert state {self.state_path} is malformed ({exc!s}); move it away to "
                                  "start with every series OK") from exc

    def _save_state(self) -> None:
        doc = {"version": STATE_VERSION, "series": {sid: s.to_dict() for sid, s in sorted(self.series.items())}}
        atomic_write(self.state_path, json.dumps(doc, indent=1, sort_keys=True).encode(), sync_dir=False)
        fsync_dir(self.state_dir)

    def _covered(self, series_id: str, end_ns: int) -> bool:
        """Whether the state has observed the series up to the window ending at ``end_ns``."""
        st = self.series.get(series_id)
        return st is not None and st.last_end_ns >= end_ns

    @contextlib.contextmanager
    def _locked(self) -> Iterator[None]:
        """Serialise state and outbox changes with other threads and with other anomalyd processes."""
        with self._mutex:
            self.state_dir.mkdir(parents=True, exist_ok=True)
            with open(self.state_dir / "alerts.lock", "a+b") as lock:
                fcntl.flock(lock, fcntl.LOCK_EX)
                try:
                    yield
                finally:
                    fcntl.flock(lock, fcntl.LOCK_UN)

    # -- public API --------------------------------------------------------------------------------------

    def observe(self, results: Sequence[WindowResult], now_ns: int | None = None,
                deliver: bool = True) -> list[Transition]:
        """Update every series' state with ``results``, queue the transitions durably, then :meth:`flush`
        (unless ``deliver`` is False: the worker commits each signal's alerts, then delivers once per tick).

        When this returns, every transition is on disk (outbox item and state); an exception (state dir read-only
        or full) means nothing of ``results`` was recorded, and observing them again later is safe.

        Parameters
        ----------
        results
            Window results of any series, in any order; windows at or before the last one observed for their
            series are ignored.
        now_ns
            Wall time (epoch ns) used to space reminders; default: now.

        Returns
        -------
        list of Transition
            The transitions these results caused, in time order.
        """
        now = time.time_ns() if now_ns is None else now_ns
        if self.dry_run:
            with self._mutex:
                transitions = policy.apply(self.cfg, self.series, results, now)
            for t in transitions:
                log.info("dry-run, not sent: %s", format_message(t, self.cfg.dashboard_url)[0])
            return transitions
        transitions = self._commit(lambda: policy.apply(self.cfg, self.series, results, now))
        if deliver:
            self.flush()
        return transitions

    def _commit(self, make: Callable[[], list[Transition]]) -> list[Transition]:
        """Compute transitions against the state on disk, queue them and save the state; on any failure the
        in-memory state is reloaded from disk, so a retry computes the same transitions again."""
        with self._locked():
            try:
                self.series = self._load_state()  # another process may have moved it on
                transitions = make()
                if transitions:
                    self.outbox.enqueue(transitions, [s.name for s in self.sinks])
                self._save_state()
            except BaseException:
                with contextlib.suppress(AlertStateError, OSError):
                    self.series = self._load_state()
                raise
            try:
                self.outbox.prune_markers(self._covered)
                ALERTS_QUEUED.set(len(self.outbox.pending()))
            except OSError as exc:  # housekeeping only
                log.warning("could not prune delivered-alert markers in %s: %s", self.outbox.directory, exc)
        for t in transitions:
            log.info("alert transition %s for %s at %s (model %s)", t.kind, t.series_id, iso_utc(t.end_ns),
                     t.model_id)
        return transitions

    def silent(self, series: Sequence[tuple[SeriesKey, str, int, int]], now_ns: int) -> list[Transition]:
        """Raise one ``deadman`` alert for each series that stopped writing windows.

        ``series`` holds ``(key, model id, start of its last window, end of its last window)`` of the series whose
        last window ended more than ``deadman_s`` ago (the worker picks them); a series already flagged, or
        observed past that window, is skipped (:func:`anomalyd.alerts.policy.deadman`). Queued durably like
        :meth:`observe`; delivered by :meth:`flush`.
        """
        if self.dry_run:
            with self._mutex:
                return policy.deadman(self.series, series)
        return self._commit(lambda: policy.deadman(self.series, series))

    def default_flush_s(self) -> float:
        """The time a flush may take when none is given: two Slack timeouts, at least five seconds."""
        return max(5.0, 2.0 * self.cfg.slack.timeout_s)

    def flush(self, deadline_s: float | None = None) -> int:
        """Deliver queued alerts, oldest first, for at most ``deadline_s`` seconds (default
        :meth:`default_flush_s`).

        A sink that fails stops receiving for the rest of this flush (its alerts keep their order and stay
        queued); after a rate limit it is not tried again before Retry-After has passed. In dry-run mode
        nothing is sent.

        Returns
        -------
        int
            The number of deliveries made.
        """
        if self.dry_run:
            return 0
        budget = self.default_flush_s() if deadline_s is None else deadline_s
        deadline = self.clock() + budget
        delivered = 0
        by_name = {s.name: s for s in self.sinks}
        with self._locked():
            self.series = self._load_state()
            blocked: set[str] = set()
            unknown: set[str] = set()
            for path in self.outbox.pending():
                try:
                    item = self.outbox.load(path)
                except OutboxItemError as exc:
                    self.outbox.dead_letter(path, str(exc))
                    continue
                sink = by_name.get(item.sink)
                if sink is None:
                    unknown.add(item.sink)
                    continue
                if item.sink in blocked:
                    continue
                if self.clock() < self._not_before.get(item.sink, 0.0):
                    blocked.add(item.sink)
                    log.info("sink %s is rate-limited for another %.1fs; its alerts stay queued", item.sink,
                             self._not_before[item.sink] - self.clock())
                    continue
                if self.clock() >= deadline:
                    log.warning("alert flush reached its %.1fs deadline; the rest stays queued", budget)
                    break
                try:
                    sink.send(item.transition, deadline)
                except AlertRejectedError as exc:
                    ALERTS.labels(sink=item.sink, outcome="failed").inc()
                    self.outbox.dead_letter(path, f"sink {item.sink} rejected {item.transition.dedupe_key}: "
                                                  f"{exc}")
                    continue
                except DeliveryError as exc:
                    ALERTS.labels(sink=item.sink, outcome="failed").inc()
                    blocked.add(item.sink)
                    if exc.retry_after_s:
                        self._not_before[item.sink] = self.clock() + exc.retry_after_s
                    log.warning("sink %s could not deliver %s: %s", item.sink, item.transition.dedupe_key,
                                exc)
                    continue
                self.outbox.retire(item, self._covered)
                delivered += 1
                ALERTS.labels(sink=item.sink, outcome="sent").inc()
            if unknown:
                log.warning("queued alerts for sink(s) %s are kept but not sent: those sinks are not "
                            "configured in alerts.sinks", ", ".join(sorted(unknown)))
            ALERTS_QUEUED.set(len(self.outbox.pending()))
        return delivered

    def queued(self) -> int:
        """Number of alert deliveries waiting in the outbox."""
        return self.outbox.count()
