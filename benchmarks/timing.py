"""The timing helper the benchmark scripts share (a module beside them, not a script).

One definition of "median milliseconds of a call", so every script that reports one (e.g.
``device_select.py``, ``fresh_rows.py``) measures it the same way: one untimed warm-up
call, then ``repeats`` timed calls on the host clock.
"""
from __future__ import annotations

import statistics
import time
from typing import Callable

__all__ = ["median_ms"]


def median_ms(fn: Callable[[], object], repeats: int) -> float:
    """Median wall time of ``fn()`` over ``repeats`` calls after one warm-up call, in ms
    rounded to 0.01 (host clock: a device call must synchronise inside ``fn`` to count)."""
    fn()  # warm-up
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
    return round(1000 * statistics.median(times), 2)
