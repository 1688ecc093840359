"""Garbage-collection pauses of this process, by generation, as a Prometheus histogram.

A full (generation 2) collection stops the event loop for as long as it walks every tracked
object: every request in flight waits that long. The histogram shows how often and how long.
"""

from __future__ import annotations

import bisect
import gc
import time
from collections.abc import Callable, Iterator
from typing import Any

from prometheus_client.core import HistogramMetricFamily
from prometheus_client.registry import Collector

GC_PAUSE_BUCKETS = (0.0001, 0.0005, 0.001, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0)
_GENERATIONS = 3


class GcPauses(Collector):
    """Times each collection through gc.callbacks; collected as a histogram at scrape time.

    Why not a prometheus_client Histogram observed in the callback: a collection starts on
    any allocation, also one made while the same thread holds a metric value's lock (a
    non-reentrant Lock), and observing from the callback would then deadlock. The callback
    only updates plain lists, which the GIL keeps whole.
    """

    def __init__(self, clock: Callable[[], float] = time.perf_counter) -> None:
        self._clock = clock
        self._started: float | None = None
        self._buckets = [[0] * (len(GC_PAUSE_BUCKETS) + 1) for _ in range(_GENERATIONS)]
        self._sums = [0.0] * _GENERATIONS

    def __call__(self, phase: str, info: dict[str, Any]) -> None:
        if phase == "start":
            self._started = self._clock()
            return
        started, self._started = self._started, None
        generation = info.get("generation")
        if started is None or not isinstance(generation, int):
            return
        if not 0 <= generation < _GENERATIONS:
            return
        pause = self._clock() - started
        self._sums[generation] += pause
        self._buckets[generation][bisect.bisect_left(GC_PAUSE_BUCKETS, pause)] += 1

    def install(self) -> None:
        if self not in gc.callbacks:
            gc.callbacks.append(self)

    def remove(self) -> None:
        if self in gc.callbacks:
            gc.callbacks.remove(self)

    def collect(self) -> Iterator[HistogramMetricFamily]:
        family = HistogramMetricFamily(
            "svid_server_gc_pause_seconds",
            "Time the process stood still in a garbage collection, by generation (2: full)",
            labels=["generation"],
        )
        bounds = [*(str(b) for b in GC_PAUSE_BUCKETS), "+Inf"]
        for generation in range(_GENERATIONS):
            counts = list(self._buckets[generation])  # a copy: collections go on meanwhile
            cumulative, running = [], 0
            for bound, count in zip(bounds, counts, strict=True):
                running += count
                cumulative.append((bound, float(running)))
            family.add_metric([str(generation)], cumulative, self._sums[generation])
        yield family
