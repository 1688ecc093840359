"""Registration entry writes, one at a time and in batches, for every datastore backend.

What a write checks, what a refused item of a batch leaves (nothing), and what a committed
write tells the store's revision and change feed are the same on SQLite and PostgreSQL, so
they are written once here. A backend supplies its transaction and, inside it, the statements
of one insert, update and delete (each checking before its one write), a counter bump and
the feed's append.
"""

from __future__ import annotations

import secrets
import threading
from collections.abc import Callable, Iterable, Sequence
from dataclasses import replace
from typing import Any, Generic, TypeVar

from server.datastore.errors import (
    AlreadyExistsError,
    ConflictError,
    DataStoreError,
    NotFoundError,
)
from server.datastore.records import FEED_ENTRY, Entry
from svid._clock import Clock

H = TypeVar("H")  # what a backend's statements run on inside its transaction
T = TypeVar("T")
Item = TypeVar("Item")  # an item of a batch
R = TypeVar("R")  # what a batch answers for an item it wrote

REVISION = "revision"  # the counter every committed entry write moves (Sync streams follow it)

# The newest created_at stored (0 for none): where a process's floor on created_at starts
# (once: the floors below were kept by none before them).
NEWEST_CREATED_AT = "SELECT COALESCE(MAX(created_at), 0) AS newest FROM entries"

# The floors every server on the datastore stamps new entries above, in two counters (rows
# made on first use): read and raised inside each entry write's turn (one write at a time
# across servers), so an entry made through a server whose clock is behind still sorts after
# those made before it elsewhere. Two small reads, where MAX over an unindexed column was not.
# Only entry writes touch these rows, and they hold the entries' turn (LOCK_ENTRIES on
# PostgreSQL) first: taken before the insert, not last, they make no deadlock.
CREATED_FLOOR = "entry_created_at"
ID_MILLIS_FLOOR = "entry_id_millis"
READ_FLOORS = "SELECT name, value FROM counters WHERE name IN (:created, :id_millis)"
RAISE_FLOOR = (
    "INSERT INTO counters (name, value) VALUES (:name, :value) "
    "ON CONFLICT (name) DO UPDATE SET value = CASE "
    "WHEN counters.value > excluded.value THEN counters.value ELSE excluded.value END"
)


class EntryWrites(Generic[H]):
    """A datastore mixin: the entry writes of the DataStore protocol."""

    # -- the backend's ----------------------------------------------------------------------

    def _entry_transaction(self, what: str, work: Callable[[H], T]) -> T:
        """``work`` in one transaction, taking its turn among entry writes; committed when it
        returns, rolled back when it raises (a DataStoreError reaches the caller as it is)."""
        raise NotImplementedError

    def _insert_in(self, h: H, stored: Entry) -> None:
        """AlreadyExistsError, with nothing written, for a clash of id or identity."""
        raise NotImplementedError

    def _update_in(self, h: H, entry: Entry) -> Entry:
        """The entry as stored; NotFoundError, ConflictError (an older revision) or
        AlreadyExistsError (another entry's identity), with nothing written."""
        raise NotImplementedError

    def _delete_in(self, h: H, entry_id: str) -> None:
        """NotFoundError, with nothing written, for an entry that is not there."""
        raise NotImplementedError

    def _bump(self, h: H, counter: str) -> int:
        raise NotImplementedError

    def _append_feed(self, h: H, kind: str, keys: Iterable[str]) -> None:
        raise NotImplementedError

    def _now(self) -> int:
        raise NotImplementedError

    def _execute_in(self, h: H, sql: str, params: dict[str, object]) -> list[tuple[Any, ...]]:
        """One statement of this module's (`:name` parameters) inside the transaction; the
        rows it returns ([] for none)."""
        raise NotImplementedError

    _clock: Clock
    _id_lock: threading.Lock  # the backend makes it, with _last_id_millis = _last_created = 0
    _last_id_millis: int
    _last_created: int
    _floors_read: bool = False  # whether _last_created and _last_id_millis start from the store

    # -- the writes ---------------------------------------------------------------------------

    def _new_entry_id(self) -> str:
        """32 hex digits: milliseconds of creation, then 80 random bits. Workloads get their
        default identity by (created_at, id), and created_at counts seconds: an id that sorts
        in creation order keeps two entries made within one second in the order they were made
        (across servers too: see the shared floors, `_stamped`)."""
        with self._id_lock:
            millis = max(int(self._clock.now() * 1000), self._last_id_millis + 1)
            self._last_id_millis = millis
        return f"{millis & (1 << 48) - 1:012x}{secrets.token_hex(10)}"

    def _new_created_at(self) -> int:
        """Now, but never before an entry this process made: a workload's default identity is
        its oldest entry, and stamped with a wall clock stepped back, a new entry sorted before
        the older ones and became the default of every workload it matched. (Its id, after
        the others' within the second, keeps it last.)"""
        with self._id_lock:
            self._last_created = max(self._now(), self._last_created)
            return self._last_created

    def _read_floors(self, h: H) -> None:
        """Start both floors from the newest entry stored, once, before this process makes its
        first: held in memory only, they began at 0 on each start, and a server restarted on a
        clock stepped back stamped its first entries before the older ones. The ids of entries
        made at that second have their milliseconds within it (or, made at a floor, a few
        past it): the next id's are after them."""
        if self._floors_read:
            return
        ((stored,),) = self._execute_in(h, NEWEST_CREATED_AT, {})
        newest = int(stored)
        with self._id_lock:
            self._last_created = max(self._last_created, newest)
            self._last_id_millis = max(self._last_id_millis, newest * 1000 + 999)
            self._floors_read = True

    def _stored_new(self, entry: Entry) -> Entry:
        created_at = self._new_created_at()
        return replace(
            entry, id=entry.id or self._new_entry_id(), revision=1, created_at=created_at
        )

    def _stamped(self, h: H, entries: Sequence[Entry]) -> list[Entry]:
        """`entries` with their ids and created_at, stamped inside the write's turn above every
        entry any server made before (the shared floors), and the floors raised past them."""
        self._read_floors(h)
        names = {"created": CREATED_FLOOR, "id_millis": ID_MILLIS_FLOOR}
        rows = self._execute_in(h, READ_FLOORS, dict(names))
        shared = {str(name): int(value) for name, value in rows}
        with self._id_lock:
            self._last_created = max(self._last_created, shared.get(CREATED_FLOOR, 0))
            self._last_id_millis = max(self._last_id_millis, shared.get(ID_MILLIS_FLOOR, 0))
        stored = [self._stored_new(e) for e in entries]
        with self._id_lock:
            raised = {CREATED_FLOOR: self._last_created, ID_MILLIS_FLOOR: self._last_id_millis}
        for name, value in raised.items():
            if value > shared.get(name, -1):
                self._execute_in(h, RAISE_FLOOR, {"name": name, "value": value})
        return stored

    def _changed(self, h: H, entry_ids: Iterable[str]) -> None:
        self._bump(h, REVISION)
        self._append_feed(h, FEED_ENTRY, entry_ids)

    def create_entry(self, entry: Entry) -> Entry:
        def work(h: H) -> Entry:
            (stored,) = self._stamped(h, (entry,))
            self._insert_in(h, stored)
            self._changed(h, (stored.id,))
            return stored

        return self._entry_transaction("create the entry", work)

    def update_entry(self, entry: Entry) -> Entry:
        def work(h: H) -> Entry:
            stored = self._update_in(h, entry)
            self._changed(h, (stored.id,))
            return stored

        return self._entry_transaction("update the entry", work)

    def delete_entry(self, entry_id: str) -> None:
        def work(h: H) -> None:
            self._delete_in(h, entry_id)
            self._changed(h, (entry_id,))

        self._entry_transaction("delete the entry", work)

    # A batch is one transaction (one commit, one revision) whose items succeed or fail each on
    # its own: every check of an item precedes its one write, so a refused item leaves nothing.

    def create_entries(self, entries: Sequence[Entry]) -> list[Entry | DataStoreError]:
        def insert(h: H, stored: Entry) -> tuple[Entry, str]:
            self._insert_in(h, stored)
            return stored, stored.id

        return self._batch(
            "create entries", entries, insert, (AlreadyExistsError,), stamp=self._stamped
        )

    def update_entries(self, entries: Sequence[Entry]) -> list[Entry | DataStoreError]:
        def update(h: H, entry: Entry) -> tuple[Entry, str]:
            stored = self._update_in(h, entry)
            return stored, stored.id

        refused = (NotFoundError, ConflictError, AlreadyExistsError)
        return self._batch("update entries", entries, update, refused)

    def delete_entries(self, entry_ids: Sequence[str]) -> list[DataStoreError | None]:
        def delete(h: H, entry_id: str) -> tuple[None, str]:
            self._delete_in(h, entry_id)
            return None, entry_id

        return self._batch("delete entries", entry_ids, delete, (NotFoundError,))

    def _batch(
        self,
        what: str,
        items: Sequence[Item],
        write: Callable[[H, Item], tuple[R, str]],
        refused: tuple[type[DataStoreError], ...],
        *,
        stamp: Callable[[H, Sequence[Item]], Sequence[Item]] | None = None,
    ) -> list[R | DataStoreError]:
        """Each item's ``write`` (its result and the id it changed) or its refusal, in order;
        `stamp` readies the items inside the transaction first."""

        def work(h: H) -> list[R | DataStoreError]:
            results: list[R | DataStoreError] = []
            changed: list[str] = []
            for item in items if stamp is None else stamp(h, items):
                try:
                    result, entry_id = write(h, item)
                except refused as exc:
                    results.append(exc)
                    continue
                results.append(result)
                changed.append(entry_id)
            if changed:  # a batch refused whole changes nothing, not even the revision
                self._changed(h, changed)
            return results

        return self._entry_transaction(what, work)
