"""How many of something each key holds (connections per uid or per address, streams per
uid), and in all: keys holding none take no room. Not thread-safe: used from one event loop,
or under its owner's lock."""

from __future__ import annotations

from collections.abc import Hashable
from typing import Generic, TypeVar

K = TypeVar("K", bound=Hashable)


class KeyCounts(Generic[K]):
    def __init__(self, what: str) -> None:
        self._what = what  # what is counted, for the error of a release with none held
        self._held: dict[K, int] = {}
        self.total = 0

    def held_by(self, key: K) -> int:
        return self._held.get(key, 0)

    def add(self, key: K) -> None:
        self._held[key] = self._held.get(key, 0) + 1
        self.total += 1

    def remove(self, key: K) -> None:
        held = self._held.get(key, 0)
        if held <= 0:
            raise ValueError(f"{key} holds no {self._what}")
        if held == 1:
            del self._held[key]
        else:
            self._held[key] = held - 1
        self.total -= 1
