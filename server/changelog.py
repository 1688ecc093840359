"""The change log: every committed change that agents care about, with a revision, in a ring.

Sync streams send deltas from it (server.sync_delta) and a reconnecting agent catches up from
its last revision as long as the ring still holds the changes after it; older than that, it
gets a snapshot. Records are compact: the entries touched (old and new versions, so a delta can
tell which parents a change left and joined), a bundle flag, revocations added and removed,
the agents whose record changed, and an audit checkpoint flag. No record holds what an agent is
entitled to: that is decided when a delta is built, against the current entry index.
"""

from __future__ import annotations

import secrets
import threading
from collections import deque
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass

from server.datastore.records import Entry, Revocation


@dataclass(frozen=True, slots=True)
class EntryTouch:
    """One entry a change touched: `old` before it (None: created), `new` after (None: gone).
    An expiry is a touch with both set to the expired entry: it stays stored but is no
    longer served."""

    id: str
    old: Entry | None
    new: Entry | None

    def parents(self) -> tuple[str, ...]:
        out = []
        if self.old is not None:
            out.append(self.old.parent_id)
        if self.new is not None and (self.old is None or self.new.parent_id != self.old.parent_id):
            out.append(self.new.parent_id)
        return tuple(out)


def touches(
    before: Mapping[str, Entry], put: Sequence[Entry], removed: Iterable[str]
) -> list[EntryTouch]:
    """What writing `put` and deleting `removed` over the entries `before` touched."""
    out = [EntryTouch(e.id, before.get(e.id), e) for e in put]
    out.extend(EntryTouch(i, before[i], None) for i in removed if i in before)
    return out


@dataclass(frozen=True, slots=True)
class Change:
    revision: int
    entries: tuple[EntryTouch, ...] = ()
    bundle: bool = False
    revocations_added: tuple[Revocation, ...] = ()
    revocations_removed: tuple[Revocation, ...] = ()
    agents: tuple[str, ...] = ()  # agents whose record changed (attested, renewed, banned, evicted)
    # Of `agents`, those whose selectors changed (attested anew with others, or first seen): the
    # node aliases they match may all differ, which only a snapshot tells them.
    selectors_changed: tuple[str, ...] = ()
    audit_checkpoint: bool = False  # the server signed a new audit checkpoint
    crl: bool = False  # the CRLs were signed again, nothing else changed (their nextUpdate neared)


class ChangeLog:
    """Revisions and the ring of recent changes. `append` is safe from any thread.

    The epoch names this log: revisions of another server process (a restart, another HA
    server) mean nothing here, so an agent naming another epoch gets a snapshot.
    """

    def __init__(self, start_revision: int = 0, capacity: int = 100_000) -> None:
        self.epoch = secrets.token_hex(8)
        self._lock = threading.Lock()
        self._head = start_revision
        # The oldest revision a catch-up may start from: changes after it are all in the ring.
        self._floor = start_revision
        self._ring: deque[Change] = deque()
        # What the ring may hold, in items (_size): counted in changes, a batch write of a
        # thousand entries (old and new versions) was one, and a ring of 100,000 such held
        # ~100 GB; an operator refreshing a batch every few seconds grew the server ~1 MB each.
        self._capacity = capacity
        self._held = 0  # the items of the changes in the ring

    @property
    def head(self) -> int:
        return self._head

    @property
    def floor(self) -> int:
        return self._floor

    def append(
        self,
        *,
        entries: Iterable[EntryTouch] = (),
        bundle: bool = False,
        revocations_added: Iterable[Revocation] = (),
        revocations_removed: Iterable[Revocation] = (),
        agents: Iterable[str] = (),
        selectors_changed: Iterable[str] = (),
        audit_checkpoint: bool = False,
        crl: bool = False,
    ) -> Change:
        with self._lock:
            self._head += 1
            change = Change(
                self._head,
                tuple(entries),
                bundle,
                tuple(revocations_added),
                tuple(revocations_removed),
                tuple(agents),
                tuple(selectors_changed),
                audit_checkpoint,
                crl,
            )
            self._ring.append(change)
            self._held += _size(change)
            # A change bigger than the whole ring goes too: the floor is then the head, and an
            # agent behind it gets a snapshot, as it would have once the ring moved on.
            while self._held > self._capacity and self._ring:
                gone = self._ring.popleft()
                self._held -= _size(gone)
                self._floor = gone.revision
            return change

    def since(self, revision: int, epoch: str) -> list[Change] | None:
        """The changes after `revision`, or None when this log cannot tell them (another epoch,
        fallen out of the ring, or a revision from the future)."""
        with self._lock:
            if epoch != self.epoch or not self._floor <= revision <= self._head:
                return None
            # Revisions in the ring are consecutive: index straight to the first one wanted.
            first = revision - self._floor
            return [self._ring[i] for i in range(first, len(self._ring))]


def _size(change: Change) -> int:
    """What a change weighs in the ring: the entries, revocations and agents it names (what
    its memory follows), and one for a change that names none (a bundle, a CRL)."""
    return max(
        1,
        len(change.entries)
        + len(change.revocations_added)
        + len(change.revocations_removed)
        + len(change.agents),
    )
