"""A bounded memo of pure results that only verified input may fill."""

from __future__ import annotations

import threading
from collections.abc import Hashable
from typing import Generic, TypeVar

K = TypeVar("K", bound=Hashable)
V = TypeVar("V")


class VerifiedMemo(Generic[K, V]):
    """Reads are free for anyone; ``remember`` is for what passed a signature check.

    The memoized parses (a JWT header, a leaf's extensions) run before the signature can be
    checked, so a memo filled there took an attacker's forgeries: a stream of them, each unique,
    evicted what honest traffic used and made every honest request parse again. Filled only after
    verification, only a holder of a signing key can add entries. Oldest out first: honest
    traffic of more distinct entries than the bound only parses some of them again.
    """

    def __init__(self, max_entries: int) -> None:
        self.max_entries = max_entries
        self._data: dict[K, V] = {}
        self._lock = threading.Lock()
        self.get = self._data.get  # the hot path: one dict lookup, no lock (reads are atomic)

    def remember(self, key: K, value: V) -> None:
        data = self._data
        if key in data:
            return
        with self._lock:
            if len(data) >= self.max_entries:
                del data[next(iter(data))]
            data[key] = value

    def clear(self) -> None:
        with self._lock:
            self._data.clear()

    def __len__(self) -> int:
        return len(self._data)

    def __contains__(self, key: object) -> bool:
        return key in self._data
