"""Which replica scores which series: rendezvous (highest random weight) hashing, without a coordinator (pure).

With ``[daemon] shard = "I/N"``, replica ``I`` of ``N`` owns the series whose key gives replica ``I`` the highest
weight among ``0 .. N-1``. Every replica computes the same answer from the series key alone, and when ``N``
changes only the series whose highest weight moves change owner: going from ``N`` to ``N + 1`` replicas, a series
either stays or moves to the new replica ``N`` (about ``1 / (N + 1)`` of them); going down, only the series of the
replicas that went away move.
"""

from __future__ import annotations

import hashlib


def weight(series_id: str, replica: int) -> int:
    """The series' weight for one replica: 64 bits of BLAKE2b of both (stable across processes and versions)."""
    h = hashlib.blake2b(f"{replica}\0{series_id}".encode(), digest_size=8)
    return int.from_bytes(h.digest(), "big")


def owner(series_id: str, replicas: int) -> int:
    """The replica (``0 .. replicas-1``) that owns a series.

    Examples
    --------
    >>> owner("cpu|host=a", 1)
    0
    >>> ids = [f"cpu|host=h{i}" for i in range(1000)]
    >>> moved = sum(owner(s, 3) != owner(s, 4) for s in ids)
    >>> all(owner(s, 4) == 3 for s in ids if owner(s, 3) != owner(s, 4)), 180 < moved < 320
    (True, True)
    """
    return max(range(replicas), key=lambda r: weight(series_id, r))


class Shard:
    """This replica's share of the series: ``owns(series_id)``, memoised (a tick asks for every series)."""

    def __init__(self, index: int, count: int) -> None:
        if not 0 <= index < count:
            raise ValueError(f"shard {index}/{count}: the index must be in 0..{count - 1}")
        self.index, self.count = index, count
        self._owns: dict[str, bool] = {}

    def __str__(self) -> str:
        return f"{self.index}/{self.count}"

    def owns(self, series_id: str) -> bool:
        got = self._owns.get(series_id)
        if got is None:
            got = self._owns[series_id] = owner(series_id, self.count) == self.index
        return got
