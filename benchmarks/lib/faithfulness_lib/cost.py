"""Wall-clock seconds and peak extra resident memory of one call, for the cost columns of the tables.

Memory is the peak of the process's resident set size (sampled every 2 ms from /proc/self/statm) minus its
value when the call started: what the call needed on top of what was already loaded. Allocator caching makes
it a lower bound for small allocations; tensors of a few MB and up are returned to the OS and counted.
"""

from __future__ import annotations

import os
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

_PAGE = os.sysconf("SC_PAGE_SIZE") if hasattr(os, "sysconf") else 4096


def _rss_bytes() -> int:
    try:
        with open("/proc/self/statm") as handle:
            return int(handle.read().split()[1]) * _PAGE
    except OSError:  # not Linux: no memory column
        return 0


@dataclass
class Cost:
    seconds: float
    peak_mb: float

    def __add__(self, other: Cost) -> Cost:
        return Cost(self.seconds + other.seconds, max(self.peak_mb, other.peak_mb))


def measure(fn: Callable[[], Any]) -> tuple[Any, Cost]:
    """Run ``fn()`` and return its result with its :class:`Cost`."""
    start_rss = _rss_bytes()
    peak = [start_rss]
    done = threading.Event()

    def sample() -> None:
        while not done.is_set():
            peak[0] = max(peak[0], _rss_bytes())
            done.wait(0.002)

    thread = threading.Thread(target=sample, daemon=True)
    thread.start()
    start = time.perf_counter()
    try:
        result = fn()
    finally:
        seconds = time.perf_counter() - start
        done.set()
        thread.join()
    peak[0] = max(peak[0], _rss_bytes())
    return result, Cost(seconds, (peak[0] - start_rss) / 2**20)
