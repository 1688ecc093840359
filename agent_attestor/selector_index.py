"""Caller selectors -> the entries they entitle, without scanning every entry.

Each entry sits in exactly one bucket, under one of its own selectors: the one fewest entries
carried when it was indexed. An entry matches a caller only if *all* its selectors are among the
caller's, so in particular its bucket selector is; a lookup therefore only reads the buckets of the
caller's own selectors and checks the rest of each candidate. Choosing the rarest selector keeps
those buckets small even when every entry shares a common selector (a uid, a namespace).
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Iterable

from agent_attestor.model import Entry, Selector

# Distinct caller selector sets remembered between entry changes (one per kind of process).
MAX_MEMO = 4096


def _order(entry: Entry) -> tuple[int, str]:
    return (entry.created_at, entry.id)


class SelectorIndex:
    def __init__(self, entries: Iterable[Entry] = ()) -> None:
        self._buckets: dict[Selector, dict[str, Entry]] = {}
        self._key_of: dict[str, Selector] = {}
        self._counts: Counter[Selector] = Counter()
        self._memo: dict[frozenset[Selector], tuple[Entry, ...]] = {}
        self.rebuild(entries)

    def rebuild(self, entries: Iterable[Entry]) -> None:
        """Index `entries` from scratch: counts first, so the first entries indexed get the same
        rare keys the last ones do."""
        listed = [e for e in entries if e.selectors]
        self._buckets.clear()
        self._key_of.clear()
        self._memo.clear()
        self._counts = Counter(s for e in listed for s in e.selectors)
        for entry in listed:
            self._place(entry)

    def _place(self, entry: Entry) -> None:
        counts = self._counts
        key = min(entry.selectors, key=lambda s: (counts[s], s))
        self._buckets.setdefault(key, {})[entry.id] = entry
        self._key_of[entry.id] = key

    def add(self, entry: Entry) -> None:
        """Index `entry`, replacing what was indexed under its id."""
        self.remove(entry.id)
        if not entry.selectors:
            return  # an entry without selectors matches nobody (Entry.matches)
        self._counts.update(entry.selectors)
        self._place(entry)
        self._memo.clear()

    def remove(self, entry_id: str) -> None:
        key = self._key_of.pop(entry_id, None)
        if key is None:
            return
        bucket = self._buckets[key]
        entry = bucket.pop(entry_id)
        if not bucket:
            del self._buckets[key]
        self._counts.subtract(entry.selectors)
        for s in entry.selectors:
            if self._counts[s] <= 0:
                del self._counts[s]
        self._memo.clear()

    def match(self, selectors: frozenset[Selector]) -> tuple[Entry, ...]:
        """The entries a caller with `selectors` may have, oldest first (the default first)."""
        found = self._memo.get(selectors)
        if found is not None:
            return found
        buckets = self._buckets
        hits = [
            entry
            for s in selectors
            for entry in buckets.get(s, {}).values()
            if entry.selectors <= selectors
        ]
        hits.sort(key=_order)
        found = tuple(hits)
        if len(self._memo) >= MAX_MEMO:
            self._memo.clear()
        self._memo[selectors] = found
        return found

    def __len__(self) -> int:
        return len(self._key_of)
