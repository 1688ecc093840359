"""Writes signed checkpoints of the audit head: on an interval, at shutdown, and on demand; and
hands each new checkpoint and prune record it signs (and, at start, the last of each it finds
signed by its own key) to a listener: the server pushes them to its agents.

Several servers may share the chain (one datastore). Then most events may be written through
other servers, and the head to sign is the stored one, not this process's last commit. A
stored head is only signed once the events since the last signed (seq, hash) are read back
and found to chain from it (server.audit.verify.verify_segment): a history rewritten at or
before what was signed no longer chains, and is refused (logged, `on_refused`), never signed.
While every event since the last checkpoint was committed by this process (AuditLog.adopted
did not move and the stored head is its own), nothing is read back: one server pays one read
of the head per checkpoint, and under load only the commits that landed while it read it.

With a datastore (`records`), each checkpoint and prune record signed is also stored there,
with a feed row, so every server sharing it appends it to its own checkpoint file and pushes
it to its agents (`adopt`, called by the change feed's follower).
"""

from __future__ import annotations

import asyncio
import logging
import threading
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Protocol

from server.audit.checkpoint import (
    CHECKPOINT,
    CHECKPOINT_FILE,
    PRUNE,
    Checkpoint,
    CheckpointError,
    CheckpointFile,
    CheckpointSigner,
)
from server.audit.event import GENESIS_HASH
from server.audit.log import AuditLog
from server.audit.verify import verify_segment
from server.datastore.base import AuditCheckpointStore, AuditRetentionStore
from server.datastore.errors import StorageError
from server.datastore.records import AuditRecord, Head
from svid import AuditCheckpointError
from svid._clock import Clock
from svid._waits import set_within

_log = logging.getLogger("svid.server.audit")
# Rows read back per datastore call when verifying forward.
SEGMENT_PAGE = 1000
# Why a checkpoint was not signed (the `on_refused` argument, a metric label).
REFUSED_BROKEN = "broken"
REFUSED_PRUNED = "pruned_unsigned"


class SharedAuditStore(AuditCheckpointStore, AuditRetentionStore, Protocol):
    """What the checkpointer reads and writes in a datastore shared by several servers."""

    def audit_head(self) -> Head | None: ...


@dataclass(frozen=True)
class _OwnSince:
    """The head of the last checkpoint, when it was this process's committed head, and the
    log's `adopted` count then: while both hold, the log holds only this process's events
    after it."""

    head: Head | None  # None: the log was empty
    adopted: int


class Checkpointer:
    """Signs the audit head and appends it to the checkpoint file. An interval tick writes only
    when the head moved since the last one."""

    def __init__(
        self,
        audit: AuditLog,
        signer: CheckpointSigner,
        file: CheckpointFile,
        clock: Clock,
        interval: float,
        *,
        on_checkpoint: Callable[[Checkpoint], None] = lambda _checkpoint: None,
        records: SharedAuditStore | None = None,
        on_refused: Callable[[str], None] = lambda _reason: None,
    ) -> None:
        self._audit = audit
        self._signer = signer
        self._file = file
        self._clock = clock
        self._interval = interval
        self._on_checkpoint = on_checkpoint
        self._records = records
        self._on_refused = on_refused
        self._lock = threading.Lock()
        self._last = file.last()
        self._prune = self._mine(file.last(PRUNE))
        self._own: _OwnSince | None = None
        self._warn_if_behind()
        for last in (self._last, self._prune):
            if last is not None and self._signed_by_me(last):
                on_checkpoint(last)
        if records is not None:
            # What the servers sharing the datastore signed while this one was down.
            self.adopt(records.audit_records())

    @classmethod
    def in_data_dir(
        cls, audit: AuditLog, data_dir: Path, clock: Clock, interval: float, **options: Any
    ) -> Checkpointer:
        """A Checkpointer with the data directory's own checkpoint key (made on first use) and
        checkpoint file; ``options`` as for the constructor."""
        return cls(
            audit,
            CheckpointSigner.load_or_create(data_dir),
            CheckpointFile(data_dir / CHECKPOINT_FILE),
            clock,
            interval,
            **options,
        )

    @property
    def last(self) -> Checkpoint | None:
        return self._last

    def last_prune(self) -> Checkpoint | None:
        """The newest prune record in the file (not verified), whoever signed it."""
        with self._lock:
            return self._file.last(PRUNE)

    def signed_through(self, seq: int) -> Head | None:
        """The newest (seq, hash) this key signed, in a checkpoint or a prune record of the file
        or the datastore, at or before `seq`: what a prune through `seq` must chain from."""
        with self._lock:
            found = self._file.newest_signed_through(self._signer.key_id, seq)
            for stored in self._stored_records():
                if stored.seq <= seq and (found is None or stored.seq > found.seq):
                    found = stored
            return None if found is None else Head(found.seq, found.hash)

    def signed_from(self, seq: int) -> Head | None:
        """The oldest (seq, hash) this key signed, in a checkpoint or a prune record of the file
        or the datastore, at or after `seq`: where the chain through `seq` is pinned next."""
        with self._lock:
            found = self._file.oldest_signed_from(self._signer.key_id, seq)
            for stored in self._stored_records():
                if stored.seq >= seq and (found is None or stored.seq < found.seq):
                    found = stored
            return None if found is None else Head(found.seq, found.hash)

    def sign_prune(self, seq: int, digest: str, count: int, last_ts: float) -> Checkpoint:
        """Sign and append a prune record: events through `seq` (whose hash is `digest`, written
        at `last_ts`) may go, `count` of them in this prune. Durable in the file, and stored in
        the datastore for the other servers (a new housekeeping holder verifies from it), when
        this returns, which is before retention deletes anything."""
        with self._lock:
            record = self._signer.sign(
                seq, digest, count, self._clock.now(), PRUNE, last_ts=last_ts
            )
            self._file.append(record)
            self._prune = record
            self._share(record, required=True)
            self._on_checkpoint(record)
            return record

    @property
    def key_id(self) -> str:
        return self._signer.key_id

    def checkpoint(self, *, force: bool = False) -> Checkpoint:
        """Sign and append the head; without `force`, an unchanged head is not written again
        and the previous checkpoint is returned. CheckpointError, signing nothing, when the
        stored chain does not run from the last signed head to the stored one."""
        with self._lock:
            head, own = self._head()
            seq, digest = (0, GENESIS_HASH) if head is None else (head.seq, head.hash)
            last = self._held()
            if not force and last is not None and (last.seq, last.hash) == (seq, digest):
                self._own = own
                return last
            # Seqs run 1, 2, ... without gaps, so the head's seq is the event count.
            checkpoint = self._signer.sign(seq, digest, seq, self._clock.now())
            # Another server on the same database and data dir may have signed a newer head:
            # then that one stands (see append_unless_behind).
            written = self._file.append_unless_behind(checkpoint)
            self._last = written
            self._own = own if written is checkpoint else None
            if written is checkpoint:
                self._share(checkpoint, required=False)
            # Under the lock: listeners see checkpoints in the order they were signed.
            self._on_checkpoint(written)
            return written

    def adopt(self, records: Sequence[AuditRecord]) -> None:
        """Checkpoints and prune records other servers stored in the shared datastore: each
        one signed by this server's key (the trust domain's) and newer than the one of its
        kind held here is appended to the checkpoint file and passed to the listener; others
        are skipped (a line by another key is logged: the datastore is no proof of a key)."""
        with self._lock:
            for stored in sorted(records, key=lambda r: r.signed_at):
                try:
                    record = Checkpoint.parse(stored.line)
                except AuditCheckpointError as e:
                    _log.warning("skipped an unreadable audit record in the datastore: %s", e)
                    continue
                if not self._signed_by_me(record):
                    _log.warning(
                        "skipped an audit %s in the datastore not signed by this server's "
                        "checkpoint key",
                        record.kind,
                        extra={"key_id": record.key_id[:16], "seq": record.seq},
                    )
                    continue
                if record.kind == CHECKPOINT:
                    if not _newer(record, self._held()):
                        continue
                    written = self._file.append_unless_behind(record)
                    self._last = written
                    self._own = None
                    self._on_checkpoint(written)
                elif _newer(record, self._prune):
                    self._file.append(record)
                    self._prune = record
                    self._on_checkpoint(record)

    async def run(self, stop: asyncio.Event) -> None:
        """Tick every interval until `stop`; a failed write is logged and tried next tick."""
        while not stop.is_set():
            await set_within(stop, self._interval)
            if stop.is_set():
                return
            try:
                await asyncio.to_thread(self.checkpoint)
            except Exception:
                _log.exception("audit checkpoint failed; retrying next interval")

    # -- which head -----------------------------------------------------------------------

    def _head(self) -> tuple[Head | None, _OwnSince | None]:
        """The head to sign, and, when it is this process's committed head, what lets the next
        call skip reading the chain back; CheckpointError when the stored chain no longer runs
        through this process's own last commit (_check_holds_own)."""
        head, own = self._chosen_head()
        self._check_holds_own(head)
        return head, own

    def _check_holds_own(self, head: Head | None) -> None:
        """REFUSED_BROKEN unless the chain ending at `head` runs through the last event this
        process committed itself (AuditLog.own_head). The stored chain is read back only from
        the last signed head on: an edit of this server's events after it, re-hashed onward
        with the head row, or a cut back to a seq after it, read back as a whole chain and was
        signed, and the events were gone under a valid checkpoint. No other writer gives an
        event this process committed another hash, nor takes the head back behind it (a prune
        never removes the head)."""
        mine = self._audit.own_head()
        if mine is None or head == mine:
            return
        last = self._held()
        if last is not None and last.seq >= mine.seq and head is not None and head.seq >= last.seq:
            return  # signed through `mine` already, and read back from there on
        why = ""
        if head is None or head.seq < mine.seq:
            why = f"it ends at seq {0 if head is None else head.seq}: it was cut back"
        elif head.seq == mine.seq:
            why = f"it gives seq {mine.seq} another hash: it was rewritten"
        elif self._records is not None:
            base = self._records.audit_base()
            if base is not None and base.seq >= mine.seq:
                return  # pruned past it, behind a prune record the base is checked against
            result = verify_segment(mine, rows_after(self._records, mine.seq, head.seq), head)
            if not result.ok:
                why = f"it does not run from there to the stored head: {result}"
        if why:
            raise self.refuse(
                REFUSED_BROKEN,
                f"the stored audit chain does not hold this server's own last event, seq "
                f"{mine.seq} ({mine.hash[:16]}…): {why}",
            )

    def _chosen_head(self) -> tuple[Head | None, _OwnSince | None]:
        """The head to sign (see _head)."""
        audit = self._audit
        adopted = audit.adopted
        committed = audit.committed_head()
        # An empty log (None) counts too: a fresh server's first checkpoint then reads back
        # none of the events it wrote itself since the one it signed at start.
        own = _OwnSince(committed, adopted) if audit.adopted == adopted else None
        if self._records is None:
            # One writer, no shared datastore: this process's last commit is the head.
            return committed, own
        stored = self._records.audit_head()
        since = self._own
        if (
            stored is not None
            and own is not None
            and since is not None
            and since.adopted == own.adopted
        ):
            # Only this process's commits since the last checkpoint, each chained on the one
            # before from that checkpoint's head: nothing to read back.
            if stored == committed:
                return stored, own
            # A busy server commits every few ms, so a commit often lands between reading its
            # committed head and the stored one: only what follows its own head is read back.
            # Reading from the last checkpoint instead read back every event since, at every
            # checkpoint after (seconds of CPU a minute under the JWT bench). From the last
            # checkpoint's head still when that is newer (it signed other writers' events past
            # this process's last commit): what it signed must not be rewritten since.
            start = Head(0, GENESIS_HASH) if committed is None else committed
            last = self._held()
            if last is not None and last.seq >= start.seq:
                start = Head(last.seq, last.hash)
            if stored.seq > start.seq:
                gap = rows_after(self._records, start.seq, stored.seq)
                if verify_segment(start, gap, stored).ok:
                    return stored, own
        for attempt in (1, 2):
            try:
                head = self._verified(stored)
            except _PrunedMeanwhileError:
                # A prune elsewhere may have signed its record and removed events meanwhile:
                # read what is signed again, and the head.
                if attempt == 2:
                    break
                stored = self._records.audit_head()
            else:
                return head, own if own is not None and head == own.head else None
        raise self.refuse(
            REFUSED_PRUNED,
            "events after the last signed checkpoint were removed without a signed prune "
            "record: the log was cut behind the server",
        )

    def _verified(self, stored: Head | None) -> Head | None:
        """`stored` once the chain is read back from the last signed head to it."""
        assert self._records is not None
        start = self._start()
        if stored is None:
            if start.seq == 0:
                return None
            raise self.refuse(
                REFUSED_BROKEN,
                f"the audit log is empty but seq {start.seq} was signed: it was wiped",
            )
        result = verify_segment(start, rows_after(self._records, start.seq, stored.seq), stored)
        if not result.ok:
            base = self._records.audit_base()
            if base is not None and base.seq > start.seq:
                raise _PrunedMeanwhileError
            raise self.refuse(
                REFUSED_BROKEN,
                f"the stored audit chain does not run from the last signed seq {start.seq} to "
                f"the stored head seq {stored.seq}: {result}",
            )
        return stored

    def _start(self) -> Head:
        """The newest (seq, hash) this key signed whose following events are still stored:
        the last checkpoint, else (retention removed past it) the prune record that covers the
        base; with nothing signed yet, the base (or genesis), taken on trust once."""
        assert self._records is not None
        checkpoint, prune = self._mine(self._last), self._prune
        # The file too: `svid-server audit prune` beside the server signs into it alone.
        filed = [r for r in (self._file.last(), self._file.last(PRUNE)) if r is not None]
        for stored in [*filed, *self._stored_records()]:
            if not self._signed_by_me(stored):
                continue
            if stored.kind == CHECKPOINT and _newer(stored, checkpoint):
                checkpoint = stored
            elif stored.kind == PRUNE and _newer(stored, prune):
                prune = stored
        base = self._records.audit_base()
        base_seq = 0 if base is None else base.seq
        if checkpoint is not None and checkpoint.seq >= base_seq:
            return Head(checkpoint.seq, checkpoint.hash)
        if prune is not None and prune.seq >= base_seq:
            return Head(prune.seq, prune.hash)
        if checkpoint is None and prune is None:
            return base if base is not None else Head(0, GENESIS_HASH)
        raise _PrunedMeanwhileError

    def _stored_records(self) -> list[Checkpoint]:
        """The datastore's newest records signed by this key (others' are no evidence)."""
        if self._records is None:
            return []
        mine = []
        for stored in self._records.audit_records():
            try:
                record = Checkpoint.parse(stored.line)
            except AuditCheckpointError:
                continue
            if self._signed_by_me(record):
                mine.append(record)
        return mine

    def refuse(self, reason: str, why: str) -> CheckpointError:
        """Count and log a refusal to sign (`reason` is the metric's label); the error to raise."""
        self._on_refused(reason)
        _log.error(
            "refused to sign an audit checkpoint: %s; run `svid-server audit verify --anchor`",
            why,
            extra={"reason": reason},
        )
        return CheckpointError(f"refused to sign an audit checkpoint: {why}")

    # -- sharing --------------------------------------------------------------------------

    def _share(self, record: Checkpoint, *, required: bool) -> None:
        """Store `record` for the other servers. A prune record must be there before any
        event goes (a new housekeeping holder verifies from it): `required` raises."""
        if self._records is None:
            return
        try:
            self._records.save_audit_record(
                AuditRecord(record.kind, record.seq, record.time, record.to_line())
            )
        except StorageError as e:
            if required:
                raise CheckpointError(f"cannot share the audit {record.kind}: {e}") from e
            _log.warning(
                "cannot share the audit checkpoint with the other servers; the next one will",
                extra={"error": str(e)},
            )

    def _held(self) -> Checkpoint | None:
        """The last checkpoint when this key signed it (by its id: a line of the file passes
        the signature check in `_start` before it is trusted as a start)."""
        last = self._last
        return last if last is not None and last.key_id == self._signer.key_id else None

    def _mine(self, record: Checkpoint | None) -> Checkpoint | None:
        return record if record is not None and self._signed_by_me(record) else None

    def _signed_by_me(self, checkpoint: Checkpoint) -> bool:
        """The file's last line is not verified when read: only one this key signed is passed
        on as this server's checkpoint."""
        if checkpoint.key_id != self._signer.key_id:
            return False
        try:
            checkpoint.verify_signature(self._signer.public_key())
        except AuditCheckpointError:
            return False
        return True

    def _warn_if_behind(self) -> None:
        """A log that starts behind its own last checkpoint was cut back while the server was
        down: say so now (verify --anchor names it too; no checkpoint is written behind the
        last one until the head passes it)."""
        head = self._audit.committed_head()
        last = self._last
        if last is None or last.key_id != self._signer.key_id:
            return
        seq = 0 if head is None else head.seq
        if seq < last.seq:
            _log.error(
                "audit log is behind its last checkpoint: events were removed while the server "
                "was down; run `svid-server audit verify --anchor`",
                extra={"head_seq": seq, "checkpoint_seq": last.seq},
            )


class _PrunedMeanwhileError(Exception):
    """Events after the start are gone: a prune may have moved past it meanwhile."""


def _newer(record: Checkpoint, than: Checkpoint | None) -> bool:
    """A later event, or the same one signed later."""
    return than is None or (record.seq, record.time) > (than.seq, than.time)


def rows_after(store: AuditRetentionStore, after: int, through: int) -> Iterator[dict[str, object]]:
    """The stored events after seq `after` through seq `through`, page by page."""
    while after < through:
        page = store.audit_rows_after(after, min(SEGMENT_PAGE, through - after))
        yield from page
        if not page:
            return
        after = int(page[-1]["seq"])  # type: ignore[call-overload]
