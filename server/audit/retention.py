"""Audit retention: the oldest events leave the database behind a signed prune record.

Policy (ServerConfig): an event goes once it is older than `audit_retention_days` (default 30;
0 = no age bound) or once more than `audit_max_events` newer events follow it (default 0 = no
count bound); with both bounds off the log is kept forever. Only a prefix of the chain ever
goes (the walk stops at the first event the policy keeps), so the remaining events stay one
unbroken chain, and an event younger than the retention is never removed even when a clock
step wrote it before older ones.

A prune, keeping the chain verifiable:

1. plan: read (seq, ts, hash) marks from the current base on, batch by batch, to find the last
   event P the policy removes, and the event at the end of every batch;
2. read the chain back from the newest (seq, hash) this key signed at or before P (else from
   the base) to P, and refuse (CheckpointError, nothing signed or deleted) unless it links: a
   prune record vouches for P's hash, and a history rewritten behind the last checkpoint, which
   the checkpointer refuses to sign over, would otherwise be signed here once retention passed
   that checkpoint, and verify from then on;
3. sign a prune record for P with the checkpoint key and append it to the checkpoint file,
   fsynced, before anything is deleted (server/audit/checkpoint.py describes the line);
4. delete batch by batch, each one transaction that removes events through the batch's last
   seq and moves the `audit_base` row to that event's (seq, hash), pausing between batches so
   issuance's group commits get the writer lock.

A crash (or a failed batch) anywhere leaves a verifiable state: before step 3 nothing changed;
after it the base sits at or before P, the events after it still link to it, and `audit
verify` accepts a base at P (the record signs its hash) or before P (the chain must reach P
with the signed hash). The next run carries on from the base, reusing the record when it
already covers the new target. Deleted rows' pages are reused by new events, so the file stops
growing once retention is in force (it does not shrink: no VACUUM, which would lock it).
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import threading
from dataclasses import dataclass

from server.audit.checkpoint import Checkpoint
from server.audit.checkpointer import REFUSED_BROKEN, Checkpointer, rows_after
from server.audit.event import GENESIS_HASH
from server.audit.log import AuditLog
from server.audit.verify import verify_segment
from server.datastore.base import AuditRetentionStore
from server.datastore.records import AuditMark, Head
from svid._clock import Clock
from svid._waits import set_within

_log = logging.getLogger("svid.server.audit")
DAY = 86400.0
# Rows per delete transaction, and the pause after each: measured on 2 shared cores
# (bench/test_bench_audit_retention.py), 10k-row batches held the writer ~100 ms and a
# concurrent Ledger.record waited up to 250 ms (p99 245 ms); 1k rows with 20 ms between them
# keep its p99 within a few ms of idle (8.5 vs 5.1 ms) and still prune ~30k events/s, some
# 5,000x what 1,000 workloads at a 5-minute TTL write.
BATCH = 1_000
PAUSE = 0.02
# A first prune of a large backlog is spread over runs: each plans and signs at most this many.
MAX_PER_RUN = 1_000_000


@dataclass(frozen=True)
class RetentionPolicy:
    """How much of the audit log the datastore keeps; 0 turns a bound off."""

    max_age: float = 30 * DAY
    max_events: int = 0

    @property
    def enabled(self) -> bool:
        return self.max_age > 0 or self.max_events > 0

    def cut(self, now: float, head_seq: int) -> Cut | None:
        """What goes at `now` with the log's head at `head_seq` (None: keep everything)."""
        if not self.enabled:
            return None
        return Cut(
            before=now - self.max_age if self.max_age > 0 else None,
            through=head_seq - self.max_events if self.max_events > 0 else None,
        )


@dataclass(frozen=True)
class Cut:
    """The prefix of the log a prune removes: events written before `before` (Unix seconds)
    or at or before seq `through`; a None bound removes nothing by itself."""

    before: float | None = None
    through: int | None = None

    def removes(self, mark: AuditMark) -> bool:
        if self.before is not None and mark.ts < self.before:
            return True
        return self.through is not None and mark.seq <= self.through


@dataclass(frozen=True)
class PruneReport:
    removed: int
    # The base after this run (None: nothing was ever pruned).
    base: Head | None
    record: Checkpoint | None = None


class Pruner:
    """Plans, signs and deletes (see the module doc); `run` is only the ticker around it."""

    def __init__(
        self,
        store: AuditRetentionStore,
        audit: AuditLog,
        checkpointer: Checkpointer,
        clock: Clock,
        policy: RetentionPolicy,
        *,
        interval: float = 3600.0,
        batch: int = BATCH,
        pause: float = PAUSE,
        max_per_run: int = MAX_PER_RUN,
    ) -> None:
        if batch < 1:
            raise ValueError(f"batch must be at least 1, got {batch}")
        self._store = store
        self._audit = audit
        self._checkpointer = checkpointer
        self._clock = clock
        self.policy = policy
        self._interval = interval
        self._batch = batch
        self._pause = pause
        self._max_per_run = max(batch, max_per_run)
        self._lock = threading.Lock()
        self._halt = threading.Event()
        # Read once: the file only grows, and a run signs a new record whenever its target is
        # past the newest one this process knows of.
        self._last_record = checkpointer.last_prune()

    def prune(self, cut: Cut | None = None) -> PruneReport:
        """Remove what `cut` (default: the policy, now) names, up to the committed head."""
        with self._lock:
            # Never past what is pinned: this process's own last commit or the last head this
            # key signed (with several servers on one chain most events come through the
            # others), whichever is further. The stored events after both are vouched for by
            # nothing: rewritten there with old times, they would read back as a whole chain
            # and be signed away (_check_chain). With neither (nothing signed, nothing written
            # yet), the committed head is taken as it is, as the checkpointer's first is.
            pinned = [self._audit.own_head()]
            signed = self._checkpointer.last
            if signed is not None and signed.key_id == self._checkpointer.key_id:
                pinned.append(Head(signed.seq, signed.hash))
            found = [h for h in pinned if h is not None]
            head = max(found, key=lambda h: h.seq) if found else self._audit.committed_head()
            base = self._store.audit_base()
            if head is None:
                return PruneReport(0, base)
            cut = cut if cut is not None else self.policy.cut(self._clock.now(), head.seq)
            if cut is None:
                return PruneReport(0, base)
            bounds = self._plan(cut, 0 if base is None else base.seq, head.seq)
            if not bounds:
                return PruneReport(0, base)
            target = bounds[-1]
            record = self._record_for(target, 0 if base is None else base.seq)
            removed = 0
            for i, bound in enumerate(bounds):
                if self._halt.is_set():
                    break
                removed += self._store.prune_audit(Head(bound.seq, bound.hash), self._clock.now())
                base = Head(bound.seq, bound.hash)
                if self._pause and i + 1 < len(bounds):
                    # Hand the writer lock to the group commits queued behind this batch (a
                    # shutdown cuts the pause short).
                    self._halt.wait(self._pause)
            _log.info(
                "audit events pruned",
                extra={"removed": removed, "pruned_through": None if base is None else base.seq},
            )
            return PruneReport(removed, base, record)

    def _plan(self, cut: Cut, after: int, head_seq: int) -> list[AuditMark]:
        """The last mark of each delete batch, in order; the last one is the target."""
        bounds: list[AuditMark] = []
        planned = 0
        while after < head_seq and planned < self._max_per_run:
            marks = self._store.audit_marks(after, self._batch)
            take = 0
            for mark in marks:
                if mark.seq > head_seq or not cut.removes(mark):
                    break
                take += 1
            if take:
                bounds.append(marks[take - 1])
                planned += take
            if take < self._batch:
                break
            after = marks[-1].seq
        return bounds

    def _record_for(self, target: AuditMark, base_seq: int) -> Checkpoint:
        if not self._covers(self._last_record, target):
            # Another process (`audit prune` beside the server) may have signed further since.
            self._last_record = self._checkpointer.last_prune()
        last = self._last_record
        if last is not None and self._covers(last, target):
            # A prune cut short earlier already signed this far (verify accepts any base up to
            # a signed record, the chain from it reaching the record's hash); signing a lower
            # seq after it would read as the log going back.
            return last
        self._check_chain(target, base_seq)
        record = self._checkpointer.sign_prune(
            target.seq, target.hash, target.seq - base_seq, target.ts
        )
        self._last_record = record
        return record

    def _check_chain(self, target: AuditMark, base_seq: int) -> None:
        """Step 2 of the module doc: CheckpointError unless the stored chain runs to `target`
        from the newest head this key signed at or before it (else from the base, or genesis,
        as the checkpointer takes them before anything is signed)."""
        signed = self._checkpointer.signed_through(target.seq)
        if signed is not None and signed.seq >= base_seq:
            start = signed
        else:
            start = self._store.audit_base() or Head(0, GENESIS_HASH)
        end = Head(target.seq, target.hash)
        result = verify_segment(start, rows_after(self._store, start.seq, end.seq), end)
        if not result.ok:
            raise self._checkpointer.refuse(
                REFUSED_BROKEN,
                f"the stored audit chain does not run from the signed seq {start.seq} to seq "
                f"{end.seq}, which a prune record would sign: {result}",
            )
        # And on to where the chain is pinned next: the oldest head this key signed at or
        # after the target, or this process's own last commit if that comes first. Else
        # events after the last signed head, edited (their times made old) and re-hashed
        # with the head row, read back as a whole chain: signed away behind a valid prune
        # record and deleted, their loss found by no verify.
        pinned = self._checkpointer.signed_from(end.seq)
        mine = self._audit.own_head()
        if mine is not None and mine.seq >= end.seq and (pinned is None or mine.seq < pinned.seq):
            pinned = mine
        if pinned is None or pinned == end:
            return
        result = verify_segment(end, rows_after(self._store, end.seq, pinned.seq), pinned)
        if not result.ok:
            raise self._checkpointer.refuse(
                REFUSED_BROKEN,
                f"the stored audit chain through seq {end.seq}, which a prune record would "
                f"sign, does not run on to seq {pinned.seq}, signed or committed by this "
                f"server with hash {pinned.hash[:16]}…: {result}",
            )

    def _covers(self, record: Checkpoint | None, target: AuditMark) -> bool:
        return (
            record is not None
            and record.key_id == self._checkpointer.key_id
            and record.seq >= target.seq
        )

    async def run(self, stop: asyncio.Event) -> None:
        """Prune every interval until `stop`; a failed run is logged and retried next tick."""
        while not stop.is_set():
            await set_within(stop, self._interval)
            if stop.is_set():
                return
            job = asyncio.ensure_future(asyncio.to_thread(self.prune))
            try:
                await asyncio.shield(job)
            except asyncio.CancelledError:
                # Shutting down: stop after the batch in flight, so the datastore is not
                # closed under it.
                self._halt.set()
                with contextlib.suppress(Exception):
                    await job
                raise
            except Exception:
                _log.exception("audit pruning failed; retrying next interval")
