"""Who to wake when something changes: open Workload API streams, grouped by caller selectors.

A stream is woken only when its own state may have changed: an SVID of an entry it serves, an
entry it serves (or might now be served) changing, or something every caller shares (bundles,
CRL, revocations, refusal). Streams of callers with the same selectors share one Watch.
"""

from __future__ import annotations

import asyncio
from collections.abc import Callable, Iterable

from agent_attestor.model import Entry, Selector


class Signal:
    """A counter that tasks can wait on: `wait(seen)` returns once it has moved past `seen`."""

    def __init__(self) -> None:
        self.version = 0
        self._waiters: set[asyncio.Future[int]] = set()

    def bump(self) -> None:
        self.version += 1
        waiters, self._waiters = self._waiters, set()
        for fut in waiters:
            if not fut.done():
                fut.set_result(self.version)

    async def wait(self, seen: int) -> int:
        if self.version != seen:
            return self.version
        fut: asyncio.Future[int] = asyncio.get_running_loop().create_future()
        self._waiters.add(fut)
        try:
            return await fut
        finally:
            self._waiters.discard(fut)


class Watch:
    """The streams of callers with one selector set: the entries they are served, one Signal."""

    __slots__ = ("entry_ids", "refs", "selectors", "signal")

    def __init__(self, selectors: frozenset[Selector], entry_ids: frozenset[str]) -> None:
        self.selectors = selectors
        self.entry_ids = entry_ids
        self.signal = Signal()
        self.refs = 0


Matcher = Callable[[frozenset[Selector]], tuple[Entry, ...]]


class Watchers:
    def __init__(self, match: Matcher) -> None:
        self._match = match
        self._by_selectors: dict[frozenset[Selector], Watch] = {}
        self._by_entry: dict[str, set[Watch]] = {}
        self._by_selector: dict[Selector, set[Watch]] = {}

    def open(self, selectors: frozenset[Selector]) -> Watch:
        watch = self._by_selectors.get(selectors)
        if watch is None:
            watch = Watch(selectors, frozenset())
            self._by_selectors[selectors] = watch
            for s in selectors:
                self._by_selector.setdefault(s, set()).add(watch)
            self._serve(watch, frozenset(e.id for e in self._match(selectors)))
        watch.refs += 1
        return watch

    def close(self, watch: Watch) -> None:
        watch.refs -= 1
        if watch.refs > 0 or self._by_selectors.get(watch.selectors) is not watch:
            return
        del self._by_selectors[watch.selectors]
        for s in watch.selectors:
            held = self._by_selector.get(s)
            if held is not None:
                held.discard(watch)
                if not held:
                    del self._by_selector[s]
        self._serve(watch, frozenset())

    def _serve(self, watch: Watch, entry_ids: frozenset[str]) -> None:
        for gone in watch.entry_ids - entry_ids:
            held = self._by_entry.get(gone)
            if held is not None:
                held.discard(watch)
                if not held:
                    del self._by_entry[gone]
        for new in entry_ids - watch.entry_ids:
            self._by_entry.setdefault(new, set()).add(watch)
        watch.entry_ids = entry_ids

    def watched(self, entry_id: str) -> bool:
        """Whether some open stream is served `entry_id`."""
        return entry_id in self._by_entry

    def svids_changed(self, entry_ids: Iterable[str]) -> None:
        woken: set[Watch] = set()
        for eid in entry_ids:
            woken.update(self._by_entry.get(eid, ()))
        for watch in woken:
            watch.signal.bump()

    def entries_changed(self, entries: Iterable[Entry]) -> None:
        """`entries` were added, changed or removed (old and new versions both given): wake the
        streams that served one, and those whose caller one now matches; each recomputes which
        entries it serves."""
        affected: set[Watch] = set()
        for entry in entries:
            affected.update(self._by_entry.get(entry.id, ()))
            if not entry.selectors:
                continue
            # Only watches holding every selector of the entry can match it: start from the
            # selector fewest watches hold.
            fewest = min((self._by_selector.get(s, set()) for s in entry.selectors), key=len)
            affected.update(w for w in fewest if entry.selectors <= w.selectors)
        for watch in affected:
            self._serve(watch, frozenset(e.id for e in self._match(watch.selectors)))
            watch.signal.bump()

    def everyone(self, rematch: bool = False) -> None:
        """Something every caller shares changed (or, with `rematch`, the whole entry set)."""
        for watch in list(self._by_selectors.values()):
            if rematch:
                self._serve(watch, frozenset(e.id for e in self._match(watch.selectors)))
            watch.signal.bump()

    def __len__(self) -> int:
        return len(self._by_selectors)
