"""The durable outbox: the alert deliveries waiting to be made, one file per transition and sink under
``state_dir/outbox/``.

An item is written (fsynced) before anything is sent, so that a transition survives a Slack outage or a
restart. Its name holds the window end, a digest of the transition's dedupe key (series id, kind, window end)
and the sink, so the same transition is never queued twice for a sink. A delivered item is removed, or kept as
a ``.sent`` marker until the alert state covers its window (see :meth:`Outbox.retire`), so that re-observing
windows after a crash cannot enqueue it again. An item a sink rejects for good, or that cannot be read, moves
to ``outbox/rejected/`` so it cannot block the queue. The order of delivery is the order of the file names:
oldest window first.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path

from ..files import atomic_write, fsync_dir
from .policy import Transition

log = logging.getLogger(__name__)

#: The ``version`` of an outbox item.
ITEM_VERSION = 1
#: A ``.sent`` marker is dropped after this long even when the alert state never covered its window.
SENT_RETENTION_S = 7 * 86400
#: ``covered(series_id, end_ns)``: whether the alert state has observed the series up to that window end.
Covered = Callable[[str, int], bool]


class OutboxItemError(ValueError):
    """An outbox item exists but cannot be read."""


@dataclass(frozen=True)
class OutboxItem:
    """One queued delivery: the transition ``transition`` for the sink named ``sink``, stored at ``path``."""

    path: Path
    sink: str
    transition: Transition


class Outbox:
    """The queued deliveries in ``directory`` (created by :meth:`create`)."""

    def __init__(self, directory: Path) -> None:
        self.directory = Path(directory)

    def create(self) -> None:
        self.directory.mkdir(parents=True, exist_ok=True)

    @staticmethod
    def _stem(t: Transition, sink: str) -> str:
        digest = hashlib.sha1(t.dedupe_key.encode()).hexdigest()[:16]
        return f"{t.end_ns:020d}-{digest}-{sink}"

    def pending(self) -> list[Path]:
        """The queued items, oldest window first."""
        return sorted(self.directory.glob("*.json"))

    def count(self) -> int:
        """Number of queued items (0 when the outbox was never created)."""
        return len(self.pending()) if self.directory.exists() else 0

    def enqueue(self, transitions: Sequence[Transition], sinks: Sequence[str]) -> int:
        """Queue each transition for each sink, unless it is already queued or sent; fsynced when this returns.

        Returns
        -------
        int
            The number of items written.
        """
        written = 0
        for t in transitions:
            for sink in sinks:
                stem = self._stem(t, sink)
                path = self.directory / f"{stem}.json"
                if path.exists() or (self.directory / f"{stem}.sent").exists():
                    log.debug("alert %s for %s already queued or sent; not queued again", t.dedupe_key, sink)
                    continue
                doc = {"version": ITEM_VERSION, "sink": sink, "key": t.dedupe_key,
                       "queued_ns": time.time_ns(), "transition": t.to_dict()}
                atomic_write(path, json.dumps(doc).encode(), sync_dir=False)
                written += 1
        if written:
            fsync_dir(self.directory)
        return written

    def load(self, path: Path) -> OutboxItem:
        """The item stored at ``path``; :class:`OutboxItemError` when it cannot be read."""
        try:
            doc = json.loads(path.read_text())
            return OutboxItem(path, str(doc["sink"]), Transition.from_dict(doc["transition"]))
        except (OSError, ValueError, KeyError, TypeError) as exc:
            raise OutboxItemError(f"outbox item {path} is unreadable ({exc!s})") from exc

    def retire(self, item: OutboxItem, covered: Covered) -> None:
        """Forget a delivered item, keeping a marker while a re-observation could still recreate it."""
        if covered(item.transition.series_id, item.transition.end_ns):
            item.path.unlink(missing_ok=True)
        else:
            os.replace(item.path, item.path.with_suffix(".sent"))

    def prune_markers(self, covered: Covered) -> None:
        """Drop the ``.sent`` markers the alert state now covers, and those older than `SENT_RETENTION_S`."""
        now = time.time()
        for marker in self.directory.glob("*.sent"):
            try:
                doc = json.loads(marker.read_text())
                t = doc["transition"]
                done = covered(str(t["series_id"]), int(t["end_ns"]))
            except (OSError, ValueError, KeyError, TypeError):
                done = True
            if done or now - marker.stat().st_mtime > SENT_RETENTION_S:
                marker.unlink(missing_ok=True)

    def dead_letter(self, path: Path, reason: str) -> None:
        """Move the item at ``path`` to ``rejected/``, logging ``reason``."""
        rejected = self.directory / "rejected"
        rejected.mkdir(exist_ok=True)
        os.replace(path, rejected / path.name)
        log.error("%s; moved %s to %s for inspection", reason, path.name, rejected)
