"""Follows the cache and saves what changed in it to the StateStore, in batches, off the loop.

Changes gather for `window` seconds (a renewal batch, a Sync delta) and go to disk as one
transaction on a worker thread. What to write is read from the cache on the event loop, in one
step with the Sync position: the saved state is never older than the saved revision (at worst
newer, which a delta from that revision applies over harmlessly: deltas are state-based).
"""

from __future__ import annotations

import asyncio
import logging
import sqlite3
from collections.abc import Callable, Sequence

from agent_attestor.cache import Cache, SyncPosition, SyncState
from agent_attestor.model import Entry, IssuedSvid
from agent_attestor.state_store import StateChange, StateStore

log = logging.getLogger(__name__)

WINDOW = 1.0
# A failing disk is retried at most this often (seconds), not in a loop.
MAX_RETRY = 60.0


class StateWriter:
    def __init__(
        self,
        store: StateStore,
        cache: Cache,
        position: Callable[[], SyncPosition],
        *,
        window: float = WINDOW,
    ) -> None:
        self._store = store
        self._cache = cache
        self._position = position
        self._window = window
        # Entry ids whose entry, or SVID only, changed since the last batch (insertion-ordered).
        self._entries: dict[str, None] = {}
        self._svids: dict[str, None] = {}
        # What is on disk already (a restored state counts).
        self._saved_shared = cache.shared_version
        self._saved_position = position()
        self._wake = asyncio.Event()
        self._current: asyncio.Future[bool] | None = None
        self._failures = 0
        self.batches = 0
        cache.on_entries(self._entries_changed)
        cache.on_svids(self._svids_changed)

    def _entries_changed(self, changed: Sequence[Entry], removed: Sequence[str]) -> None:
        for entry in changed:
            self._entries[entry.id] = None
        self._entries.update(dict.fromkeys(removed))
        self._wake.set()

    def _svids_changed(self, entry_ids: Sequence[str]) -> None:
        self._svids.update(dict.fromkeys(entry_ids))
        self._wake.set()

    def position_moved(self) -> None:
        """The Sync stream reached a new revision (bundles or revocations may have changed)."""
        self._wake.set()

    def _collect(self) -> tuple[StateChange, int] | None:
        """The batch to write now, and the shared version it carries; None: nothing to write.
        Synchronous, on the event loop: the cache and the position are read together."""
        position = self._position()
        shared_version = self._cache.shared_version
        shared_moved = shared_version != self._saved_shared
        if not (self._entries or self._svids or shared_moved or position != self._saved_position):
            return None
        if not position.agent_id:
            return None  # nothing to tie it to yet (not attested): kept dirty until then
        dirty_entries, dirty_svids = self._entries, self._svids
        self._entries, self._svids = {}, {}
        entries: list[Entry] = []
        removed: list[str] = []
        for eid in dirty_entries:
            entry = self._cache.entry(eid)
            if entry is None:
                removed.append(eid)
            else:
                entries.append(entry)
        gone = set(removed)
        svids: list[IssuedSvid] = []
        svids_removed: list[str] = []
        for eid in {**dirty_entries, **dirty_svids}:
            if eid in gone:
                continue
            svid = self._cache.svid(eid)
            if svid is None:
                svids_removed.append(eid)  # dropped, or its entry changed what it needs
            elif eid in dirty_svids:
                svids.append(svid)
        shared: SyncState | None = None
        cleared = False
        if shared_moved:
            snap = self._cache.snapshot()
            if snap.bundle is None:
                cleared = True
            else:
                shared = SyncState(
                    entries=(),
                    bundle=snap.bundle,
                    federated=dict(snap.federated),
                    crl=snap.crl,
                    revocation_expiry=dict(snap.revocation_expiry),
                    revocation_spiffe_ids=dict(snap.revocation_spiffe_ids),
                )
        change = StateChange(
            position=position,
            entries=tuple(entries),
            removed=tuple(removed),
            svids=tuple(svids),
            svids_removed=tuple(svids_removed),
            shared=shared,
            shared_cleared=cleared,
        )
        return change, shared_version

    async def flush(self) -> bool:
        """Write what changed since the last batch; False if the write failed (kept to retry).

        The batch runs as its own task: a cancelled caller (the agent stopping) leaves it to
        finish, and the next flush waits for it rather than writing beside it.
        """
        while self._current is not None and not self._current.done():
            await asyncio.shield(self._current)
        self._current = asyncio.ensure_future(self._write_batch())
        return await asyncio.shield(self._current)

    async def _write_batch(self) -> bool:
        collected = self._collect()
        if collected is None:
            return True
        change, shared_version = collected
        try:
            await asyncio.to_thread(self._store.write, change)
        except (sqlite3.Error, OSError) as exc:
            # Kept dirty: the next batch writes these entries' values as they are by then.
            ids = (*change.removed, *(e.id for e in change.entries))
            self._entries = {**dict.fromkeys(ids), **self._entries}
            svid_ids = (*change.svids_removed, *(s.entry_id for s in change.svids))
            self._svids = {**dict.fromkeys(svid_ids), **self._svids}
            self._failures += 1
            log.warning(
                "cannot save the agent state; a restart would mint SVIDs again",
                extra={"state_file": str(self._store.path), "error": str(exc)[:200]},
            )
            return False
        self._failures = 0
        self._saved_shared = shared_version
        self._saved_position = change.position
        self.batches += 1
        return True

    async def run(self) -> None:
        """Write a batch `window` seconds after the first change of it, for ever."""
        while True:
            await self._wake.wait()
            await asyncio.sleep(self._window)
            self._wake.clear()
            if not await self.flush():
                await asyncio.sleep(min(MAX_RETRY, self._window * 2.0**self._failures))
                self._wake.set()
