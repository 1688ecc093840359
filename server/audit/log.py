"""The audit log: append events to the hash chain durably, verify the chain, export it."""

from __future__ import annotations

import json
import threading
import uuid
from collections.abc import Sequence
from dataclasses import dataclass
from enum import StrEnum
from typing import Any, TextIO

from server.audit.errors import AuditError
from server.audit.event import (
    DRAFT_FIELDS,
    GENESIS_HASH,
    AuditEvent,
    EventDraft,
    canonical_json,
    chain_hash,
)
from server.audit.store import AuditStore, EventFilter, Head
from svid._clock import Clock

_DRAFT_FIELDS = frozenset(DRAFT_FIELDS)


class Break(StrEnum):
    """How a chain is broken, as far as the evidence tells."""

    EDITED = "edited"  # a row's content no longer matches its own hash
    DELETED = "deleted"  # a gap in seq: rows removed from the middle
    RELINKED = "relinked"  # prev_hash does not match: a row before was rewritten or reordered
    TRUNCATED = "truncated"  # the recorded head (or the anchor) is past the last row
    HEAD_MISMATCH = "head_mismatch"  # the head row or anchor disagrees with the row at its seq
    UNREADABLE = "unreadable"  # a row cannot even be decoded into an event


@dataclass(frozen=True)
class VerifyResult:
    ok: bool
    checked: int
    head: Head | None
    broken_seq: int | None = None
    broken_event_id: str | None = None
    problem: Break | None = None
    detail: str = ""

    def __str__(self) -> str:
        if self.ok:
            head = f"seq {self.head.seq} hash {self.head.hash}" if self.head else "empty"
            return f"audit chain OK: {self.checked} events, head {head}"
        return (
            f"audit chain BROKEN at seq {self.broken_seq} (event {self.broken_event_id}): "
            f"{self.problem}: {self.detail}"
        )


class _Ticket:
    __slots__ = ("done", "error", "event")

    def __init__(self, event: AuditEvent) -> None:
        self.event = event
        self.done = False
        self.error: AuditError | None = None


class AuditLog:
    """Appends are chained in memory under a short lock and made durable by group commit.

    Concurrent appenders queue their events; whichever thread gets the commit lock first writes
    every queued event in one transaction, so N threads pay for about one fsync. append() returns
    only once its own event is committed.
    """

    def __init__(self, store: AuditStore, clock: Clock) -> None:
        self._store = store
        self._clock = clock
        self._chain_lock = threading.Lock()
        self._commit_lock = threading.Lock()
        self._pending: list[_Ticket] = []
        head = store.head()
        self._next_seq = 1 if head is None else head.seq + 1
        self._head_hash = GENESIS_HASH if head is None else head.hash

    @property
    def store(self) -> AuditStore:
        return self._store

    def head(self) -> Head | None:
        """The newest committed-or-queued event; publish it elsewhere as a truncation anchor."""
        with self._chain_lock:
            if self._next_seq == 1:
                return None
            return Head(self._next_seq - 1, self._head_hash)

    def append(self, kind: str, **fields_: Any) -> AuditEvent:
        """Record one event (fields of EventDraft); durable when this returns."""
        return self.append_many([self._draft(kind, fields_)])[0]

    def append_many(self, drafts: Sequence[EventDraft]) -> list[AuditEvent]:
        """Record several events in one transaction (e.g. every credential a revocation covers)."""
        if not drafts:
            return []
        with self._chain_lock:
            saved = self._next_seq, self._head_hash
            try:
                tickets = [_Ticket(self._seal(d)) for d in drafts]
            except BaseException:
                # Never leave a hole in the chain: seqs taken by a half-sealed batch go back.
                self._next_seq, self._head_hash = saved
                raise
            self._pending.extend(tickets)
        self._commit_until(tickets[-1])
        return [t.event for t in tickets]

    def _draft(self, kind: str, values: dict[str, Any]) -> EventDraft:
        unknown = sorted(set(values) - _DRAFT_FIELDS)
        if unknown:
            raise AuditError(f"unknown audit field(s): {', '.join(unknown)}")
        return EventDraft(kind=kind, **values)

    def _seal(self, draft: EventDraft) -> AuditEvent:
        # Called under the chain lock: seq and prev_hash must be taken in one step.
        values = {name: getattr(draft, name) for name in DRAFT_FIELDS}
        values["event_id"] = str(uuid.uuid4())
        values["seq"] = self._next_seq
        values["ts"] = self._clock.now()
        values["prev_hash"] = self._head_hash
        body = {**values, "policy_ids": list(draft.policy_ids), "extra": dict(draft.extra)}
        event = AuditEvent(**values, hash=chain_hash(self._head_hash, canonical_json(body)))
        self._next_seq += 1
        self._head_hash = event.hash
        return event

    def _commit_until(self, mine: _Ticket) -> None:
        with self._commit_lock:
            if not mine.done:
                with self._chain_lock:
                    batch, self._pending = self._pending, []
                try:
                    self._store.append([t.event for t in batch])
                except AuditError as e:
                    self._fail(batch, e)
                else:
                    for t in batch:
                        t.done = True
        if mine.error is not None:
            raise mine.error

    def _fail(self, batch: list[_Ticket], error: AuditError) -> None:
        """A failed commit voids its batch and all chained after it; resume from the store."""
        with self._chain_lock:
            voided = batch + self._pending
            self._pending = []
            head = self._store.head()
            self._next_seq = 1 if head is None else head.seq + 1
            self._head_hash = GENESIS_HASH if head is None else head.hash
        for t in voided:
            t.done, t.error = True, error

    def verify(self, anchor: Head | None = None) -> VerifyResult:
        """Walk the whole chain; the first break found is reported with its seq and event id.

        `anchor` is a head recorded elsewhere earlier (e.g. printed by a previous verify): the event
        at its seq must still exist with its hash. Without one, deleting the newest rows is caught
        only while the audit_head row is intact.
        """
        prev_hash = GENESIS_HASH
        expected = 1
        checked = 0
        last: AuditEvent | None = None
        anchor_seen = anchor is None
        for row in self._store.rows():
            seq, event_id = row.get("seq"), row.get("event_id")
            try:
                event = event_from_row(row)
            except (AuditError, ValueError, TypeError) as e:
                return _broken(checked, seq, event_id, Break.UNREADABLE, str(e))
            if event.compute_hash() != event.hash:
                return _broken(
                    checked, seq, event_id, Break.EDITED, "content does not match the stored hash"
                )
            if event.seq != expected:
                if event.seq < expected:
                    return _broken(
                        checked, seq, event_id, Break.RELINKED, f"seq {event.seq} out of order"
                    )
                return _broken(
                    checked,
                    seq,
                    event_id,
                    Break.DELETED,
                    f"events {expected}..{event.seq - 1} are missing",
                )
            if event.prev_hash != prev_hash:
                return _broken(
                    checked,
                    seq,
                    event_id,
                    Break.RELINKED,
                    f"prev_hash does not match event {expected - 1}: it was rewritten or reordered",
                )
            if anchor is not None and event.seq == anchor.seq:
                if event.hash != anchor.hash:
                    return _broken(
                        checked, seq, event_id, Break.HEAD_MISMATCH, "differs from the anchor"
                    )
                anchor_seen = True
            prev_hash = event.hash
            expected += 1
            checked += 1
            last = event
        last_seq = 0 if last is None else last.seq
        if not anchor_seen and anchor is not None:
            return _broken(
                checked,
                last_seq + 1,
                None,
                Break.TRUNCATED,
                f"the anchor names seq {anchor.seq} but the log ends at seq {last_seq}",
            )
        head = self._store.head()
        if head is not None and head.seq > last_seq:
            return _broken(
                checked,
                last_seq + 1,
                None,
                Break.TRUNCATED,
                f"the head records seq {head.seq} but the log ends at seq {last_seq}",
            )
        if last is not None and (head is None or head.seq != last.seq or head.hash != last.hash):
            return _broken(
                checked,
                last.seq,
                last.event_id,
                Break.HEAD_MISMATCH,
                "the head row does not name the last event",
            )
        return VerifyResult(ok=True, checked=checked, head=head)

    def export(
        self,
        out: TextIO,
        *,
        agent: str | None = None,
        task: str | None = None,
        since: float | None = None,
        until: float | None = None,
        decision: str | None = None,
        kind: str | None = None,
    ) -> int:
        """Write matching events as JSON lines (every field, hash included); returns the count.

        `since` is inclusive and `until` exclusive, both Unix seconds.
        """
        where = EventFilter(agent, task, since, until, decision, kind)
        n = 0
        for row in self._store.rows(where):
            event = event_from_row(row)
            out.write(canonical_json(event.to_dict()).decode("utf-8") + "\n")
            n += 1
        return n


def event_from_row(row: dict[str, Any]) -> AuditEvent:
    values = dict(row)
    values["policy_ids"] = tuple(json.loads(values["policy_ids"]))
    values["extra"] = json.loads(values["extra"])
    return AuditEvent(**values)


def _broken(checked: int, seq: Any, event_id: Any, problem: Break, detail: str) -> VerifyResult:
    return VerifyResult(
        ok=False,
        checked=checked,
        head=None,
        broken_seq=seq if isinstance(seq, int) else None,
        broken_event_id=event_id if isinstance(event_id, str) else None,
        problem=problem,
        detail=detail,
    )
