"""Keys by due time: the next due in O(1), set and pop in O(log n).

Rescheduling or dropping a key leaves its old heap item in place, marked stale by the key's
current due time; stale items are skipped when they surface and compacted away when they pile up.
"""

from __future__ import annotations

import heapq


class DueHeap:
    def __init__(self) -> None:
        self._heap: list[tuple[float, str]] = []
        self._due: dict[str, float] = {}

    def set(self, key: str, due: float) -> None:
        self._due[key] = due
        heapq.heappush(self._heap, (due, key))
        if len(self._heap) > 2 * len(self._due) + 64:
            self._heap = [(d, k) for k, d in self._due.items()]
            heapq.heapify(self._heap)

    def discard(self, key: str) -> None:
        self._due.pop(key, None)

    def _live(self, item: tuple[float, str]) -> bool:
        return self._due.get(item[1]) == item[0]

    def pop_due(self, now: float) -> list[str]:
        """Every key due at `now` or before, earliest first; they leave the heap."""
        out: list[str] = []
        heap = self._heap
        while heap and heap[0][0] <= now:
            item = heapq.heappop(heap)
            if self._live(item):
                del self._due[item[1]]
                out.append(item[1])
        return out

    def next_due(self) -> float | None:
        heap = self._heap
        while heap and not self._live(heap[0]):
            heapq.heappop(heap)
        return heap[0][0] if heap else None

    def due_of(self, key: str) -> float | None:
        return self._due.get(key)

    def __contains__(self, key: object) -> bool:
        return key in self._due

    def __len__(self) -> int:
        return len(self._due)
