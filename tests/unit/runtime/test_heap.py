"""The start-up heap is frozen: full collections no longer walk it; the young generation is
sized for requests."""

from __future__ import annotations

import gc

from mpcapi.runtime.heap import REQUEST_GC_THRESHOLDS, freeze_startup_heap


def test_what_lives_at_start_up_is_frozen_and_garbage_is_not() -> None:
    class Cycle:
        other: object = None

    def make_garbage() -> None:
        a, b = Cycle(), Cycle()
        a.other, b.other = b, a  # only the collector frees a cycle

    make_garbage()
    kept = Cycle()
    thresholds = gc.get_threshold()
    try:
        freeze_startup_heap()
        assert gc.get_threshold() == REQUEST_GC_THRESHOLDS
        frozen = gc.get_freeze_count()
        assert frozen > 0
        assert not any(type(o) is Cycle and o is not kept for o in gc.get_objects())
        assert gc.is_tracked(kept)
        make_garbage()
        # Later objects are the collector's again: none is frozen (a frozen one may die, as a
        # thread of an earlier test lets go of it, so the count may only fall) and the new
        # cycle is collected.
        assert gc.get_freeze_count() <= frozen
        gc.collect()
        assert not any(type(o) is Cycle and o is not kept for o in gc.get_objects())
    finally:
        gc.unfreeze()
        gc.set_threshold(*thresholds)
