"""QuietHeap: frozen objects are out of the collector's way until the periodic full collection."""

from __future__ import annotations

import gc
import weakref
from collections.abc import Iterator

import pytest

from engine.heap import QuietHeap


class Node:
    def __init__(self) -> None:
        self.other: Node | None = None


@pytest.fixture(autouse=True)
def _unfreeze() -> Iterator[None]:
    yield
    gc.unfreeze()  # leave the test process as it was


def a_dead_cycle_frozen_alive(heap: QuietHeap) -> weakref.ref:
    a, b = Node(), Node()
    a.other, b.other = b, a
    ref = weakref.ref(a)
    heap.start(now=0.0)  # freezes the cycle while it is still referenced
    del a, b
    return ref


def test_frozen_objects_are_not_collected_between_full_collections() -> None:
    heap = QuietHeap(refreeze_s=1.0, full_s=100.0)
    ref = a_dead_cycle_frozen_alive(heap)
    assert heap.frozen() > 0
    heap.tick(now=1.0)  # a refreeze collects only the young generations
    gc.collect(1)
    assert ref() is not None
    assert heap.full_collections == 0


def test_the_periodic_full_collection_reclaims_a_cycle_that_died_frozen() -> None:
    heap = QuietHeap(refreeze_s=1.0, full_s=10.0)
    ref = a_dead_cycle_frozen_alive(heap)
    heap.tick(now=5.0)
    assert ref() is not None
    heap.tick(now=10.0)
    assert ref() is None
    assert heap.full_collections == 1
    assert heap.frozen() > 0  # and what lives is frozen again


def test_ticks_before_the_interval_do_nothing() -> None:
    heap = QuietHeap(refreeze_s=1.0, full_s=10.0)
    heap.start(now=0.0)
    gc.unfreeze()
    heap.tick(now=0.5)
    assert heap.frozen() == 0
    heap.tick(now=1.0)
    assert heap.frozen() > 0


def test_the_frozen_count_is_taken_at_full_collections_only() -> None:
    heap = QuietHeap(refreeze_s=1.0, full_s=10.0)
    heap.start(now=0.0)
    at_start = heap.frozen_at_full
    assert at_start > 0
    kept = [[n] for n in range(5000)]  # 5,000 new tracked lists, frozen at the next tick
    heap.tick(now=1.0)
    assert heap.refreezes == 1
    assert heap.frozen_at_full == at_start  # not recounted on a refreeze
    heap.tick(now=10.0)
    assert heap.frozen_at_full >= at_start + len(kept)
    assert heap.refreezes == 2
