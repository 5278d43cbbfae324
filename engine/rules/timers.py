"""A shard's timer index: which customer needs `on_due` next.

One heap entry per customer, invalidated lazily. When a customer's deadline
moves later (the common case: activity pushes an inactivity timer back) the
heap is left alone and the early entry is re-queued when it surfaces; only a
deadline that moves earlier adds an entry. So the heap stays about one entry
per customer however often deadlines move.

Rebuilt after a restore from the profiles themselves:
`TimerIndex.rebuild((cid, ruleset.next_deadline(p)) for cid, p in profiles.items())`.
"""

from __future__ import annotations

import heapq
from collections.abc import Iterable


class TimerIndex:
    """Deadlines by customer, ordered for `pop_due`."""

    def __init__(self) -> None:
        self._heap: list[tuple[float, str]] = []
        self._want: dict[str, float] = {}  # the customer's true next deadline
        self._queued: dict[str, float] = {}  # the customer's one live heap entry

    def __len__(self) -> int:
        return len(self._want)

    def __contains__(self, customer_id: object) -> bool:
        return customer_id in self._want

    def deadline(self, customer_id: str) -> float | None:
        """The deadline on record for `customer_id`."""
        return self._want.get(customer_id)

    def schedule(self, customer_id: str, deadline: float | None) -> None:
        """Record the customer's next deadline (None removes it)."""
        if deadline is None:
            self._want.pop(customer_id, None)
            return
        self._want[customer_id] = deadline
        queued = self._queued.get(customer_id)
        if queued is None or deadline < queued:
            heapq.heappush(self._heap, (deadline, customer_id))
            self._queued[customer_id] = deadline

    def discard(self, customer_id: str) -> None:
        """Forget the customer (erasure, or a profile that moved away)."""
        self._want.pop(customer_id, None)

    def next_deadline(self) -> float | None:
        """The earliest deadline of any customer (None when there is none)."""
        heap = self._heap
        while heap:
            at, customer = heap[0]
            if self._queued.get(customer) != at:
                heapq.heappop(heap)  # superseded by an earlier entry
                continue
            want = self._want.get(customer)
            if want is None:
                heapq.heappop(heap)
                del self._queued[customer]
                continue
            if want > at:  # the deadline moved later: re-queue it where it belongs
                heapq.heapreplace(heap, (want, customer))
                self._queued[customer] = want
                continue
            return at
        return None

    def pop_due(self, now: float) -> list[str]:
        """Customers whose deadline is at or before `now`, earliest first; they leave the index.

        The caller runs `on_due` for each and schedules its new `next_deadline`.
        """
        heap = self._heap
        due = []
        while heap and heap[0][0] <= now:
            at, customer = heapq.heappop(heap)
            if self._queued.get(customer) != at:
                continue
            del self._queued[customer]
            want = self._want.get(customer)
            if want is None:
                continue
            if want != at:  # moved later: back in the heap at its true place (maybe still due)
                heapq.heappush(heap, (want, customer))
                self._queued[customer] = want
                continue
            del self._want[customer]
            due.append(customer)
        return due

    @classmethod
    def rebuild(cls, deadlines: Iterable[tuple[str, float | None]]) -> TimerIndex:
        """An index from (customer id, next deadline) pairs, e.g. after a restore."""
        index = cls()
        pairs = [(at, cid) for cid, at in deadlines if at is not None]
        index._want = {cid: at for at, cid in pairs}
        index._queued = dict(index._want)
        index._heap = [(at, cid) for cid, at in index._want.items()]
        heapq.heapify(index._heap)
        return index
