"""The audit log: append events to the hash chain durably, verify the chain, export it.

Every write goes through one group commit that can carry credential records too
(`record(credentials, drafts)`): issued credentials and the events that audit them commit in one
transaction of the datastore, the events sealed into the chain in commit order. `record_later`
queues the same write for the log's writer thread and returns a future instead of waiting.

Several servers may share the chain (one database): see AuditLog for how a write that finds
the chain moved by another one is sealed again, and AuditStore.write_ledger for the check.
"""

from __future__ import annotations

import contextlib
import hashlib
import operator
import re
import secrets
import threading
from collections.abc import Sequence
from concurrent.futures import Future, ThreadPoolExecutor
from typing import Any, TextIO

from server.audit.errors import AuditError, LedgerError
from server.audit.event import (
    CANONICAL_FIELDS,
    DRAFT_FIELDS,
    GENESIS_HASH,
    NUMBER_FIELDS,
    AuditEvent,
    EventDraft,
    canonical_encoder,
    canonical_json,
    check_no_secret,
    check_policy_ids,
    checked_extra_text,
    column_number,
    event_from_row,
    keys_are_text,
    refuse_nul,
    storable_reason,
    text_keyed_extra,
    unstorable,
)
from server.audit.outage import LedgerOutage
from server.audit.verify import UNREADABLE, Anchor, VerifyResult, unreadable, verify_store
from server.datastore.base import AuditStore, JtiClaim, RemovalClaim
from server.datastore.errors import (
    BundleRefusedError,
    ChainMovedError,
    CommitUnknownError,
    HolderGoneError,
    JtiHeldError,
    RemovalClaimLostError,
    StorageError,
    UnreachableError,
)
from server.datastore.records import (
    AUDIT_COLUMNS,
    BundleWrite,
    Credential,
    EventFilter,
    Head,
    TaskRecord,
)
from svid._clock import Clock

_DRAFT_FIELDS = frozenset(DRAFT_FIELDS)
_draft_values = operator.attrgetter(*DRAFT_FIELDS)
_KIND = re.compile(r"^[a-z][a-z0-9_]{0,63}$")
# A draft as a plain tuple: the values of DRAFT_FIELDS in that order (see AuditLog.append_tuples).
DraftTuple = tuple[Any, ...]


class _Ticket:
    """One caller's share of a group commit: its drafts (kept until committed, so they can be
    sealed again on another writer's head), their timestamp, its rows as last sealed, and its
    credentials, jtis, foreign bundles, task rows and removal claims (kept to write again
    without a neighbour the store refused)."""

    __slots__ = (
        "bodies",
        "bundles",
        "claims",
        "credentials",
        "done",
        "drafts",
        "error",
        "future",
        "jtis",
        "rows",
        "tasks",
        "ts",
    )

    def __init__(
        self,
        drafts: Sequence[DraftTuple],
        future: Future[None] | None = None,
        bodies: Sequence[str | None] | None = None,
    ) -> None:
        self.done = False
        self.error: LedgerError | None = None
        self.drafts = drafts
        self.bodies = bodies
        self.ts = 0.0
        self.rows: list[tuple[Any, ...]] = []
        self.credentials: Sequence[Credential] = ()
        self.jtis: Sequence[JtiClaim] = ()
        self.bundles: Sequence[BundleWrite] = ()
        self.tasks: Sequence[TaskRecord] = ()
        self.claims: Sequence[RemovalClaim] = ()
        # A caller of record_later waits on this instead of on the commit itself.
        self.future = future

    def succeed(self) -> None:
        self.done = True
        if self.future is not None:
            self.future.set_result(None)

    def fail(self, error: LedgerError) -> None:
        self.done, self.error = True, error
        if self.future is not None:
            self.future.set_exception(error)


def check_draft_tuple(values: DraftTuple) -> DraftTuple:
    """The checks and conversions EventDraft makes, for a draft given as a tuple (see
    AuditLog.append_tuples): the draft to record, `values` itself unless a number had to be
    made its column's kind (column_number)."""
    if len(values) != len(DRAFT_FIELDS):
        raise AuditError(f"a draft tuple has {len(DRAFT_FIELDS)} values, not {len(values)}")
    kind = values[0]
    # Kinds are a handful of constants: remember the plain-str ones that passed.
    if not (type(kind) is str and kind in _GOOD_KINDS):
        if not isinstance(kind, str) or not _KIND.match(kind):
            raise AuditError(f"kind {kind!r} is not a lowercase identifier")
        if type(kind) is str and len(_GOOD_KINDS) < _MAX_GOOD_KINDS:
            _GOOD_KINDS.add(kind)
    # _plainly_safe inlined for the values issuance drafts hold (a call per value cost half of
    # this check); the first other one sends the draft through the full loop below. An int is
    # plainly safe but for latency_us, which is stored as a float, and text but for the
    # numbers and policy_ids (a tuple of text): these are checked apart.
    risk, ttl, latency = values[_RISK_AT], values[_TTL_AT], values[_LATENCY_AT]
    if type(values[_DRAFT_POLICY_AT]) is not tuple or not (
        (risk is None or type(risk) is int)
        and (ttl is None or type(ttl) is int)
        and (latency is None or type(latency) is float)
    ):
        return _checked_slowly(values)
    for value in values:
        type_of = type(value)
        if type_of is str:
            if "eyJ" in value or "-----BEGIN" in value or "\x00" in value:
                break
        elif not (
            value is None
            or type_of is int
            or (type_of is tuple and not value)
            or (type_of is dict and _plain_text_dict(value))
        ):
            break
    else:
        reason = values[_REASON_AT]
        if type(reason) is not str or reason.isascii():
            return values
    return _checked_slowly(values)


def _checked_slowly(values: DraftTuple) -> DraftTuple:
    """check_draft_tuple for a draft holding a value not plainly safe: every such value through
    check_no_secret, every number made its column's kind and an `extra` keyed by other than
    text made as it reads back (text_keyed_extra), and a NUL or lone surrogate in the reason
    escaped (storable_reason)."""
    reason = values[_REASON_AT]
    if isinstance(reason, str):
        escaped = storable_reason(reason)
        if escaped is not reason:
            values = (*values[:_REASON_AT], escaped, *values[_REASON_AT + 1 :])
    for index, value in enumerate(values):
        if not _plainly_safe(value):
            check_no_secret(DRAFT_FIELDS[index], value)
        if isinstance(value, str) and "\x00" in value:
            refuse_nul(DRAFT_FIELDS[index])
    check_policy_ids(values[_DRAFT_POLICY_AT])
    numbers = [column_number(name, values[index]) for index, name in _NUMBERS_AT]
    extra = values[-1]
    # Not encoded here when it has no key other than text: the seal encodes it anyway.
    keyed = extra if not extra or keys_are_text(extra) else text_keyed_extra(extra)
    if keyed is extra and all(
        n is values[index] for n, (index, _) in zip(numbers, _NUMBERS_AT, strict=True)
    ):
        return values
    converted = list(values)
    for number, (index, _) in zip(numbers, _NUMBERS_AT, strict=True):
        converted[index] = number
    converted[-1] = keyed
    return tuple(converted)


def _plainly_safe(value: Any) -> bool:
    """True for what issuance drafts hold and check_no_secret passes without a closer look:
    text without a JWT or PEM marker, None, an int, an empty tuple, a dict of such text."""
    kind_of = type(value)
    if kind_of is str:
        return "eyJ" not in value and "-----BEGIN" not in value
    if value is None or kind_of is int or (kind_of is tuple and not value):
        return True
    return kind_of is dict and _plain_text_dict(value)


_GOOD_KINDS: set[str] = set()
_MAX_GOOD_KINDS = 256


def _plain_text_dict(value: dict[Any, Any]) -> bool:
    """Every key and value plain text without a JWT or PEM marker (check_no_secret passes)."""
    for k, v in value.items():
        if type(k) is not str or type(v) is not str:
            return False
        if "eyJ" in k or "eyJ" in v or "-----BEGIN" in k or "-----BEGIN" in v:
            return False
    return True


class AuditLog:
    """Appends are chained in memory under a short lock and made durable by group commit.

    Concurrent appenders queue their events (and the credential records that go with them);
    whichever thread gets the commit lock first writes everything queued in one transaction
    (`AuditStore.write_ledger`), so N threads pay for about one fsync. A call returns only once
    its own rows are committed; when a commit fails, every caller whose rows it held, or that
    were chained after them, gets the same LedgerError and none of their rows are kept.

    Several servers may append to one chain in a shared database. The in-memory head then goes
    stale whenever another one commits. The store then calls back (`_reseal_under_lock`),
    inside its transaction and under its write lock, and the batch is sealed again on the
    stored head and written at once; the drafts queued after it are chained again after it.
    A store that refuses the batch instead (ChainMovedError, nothing written) has every
    pending draft sealed again and the write retried, at most _RESEALS times. Callers only
    return a little later, with their final seqs and ids. A single writer pays nothing but
    the store's head check.

    A group holding credentials of an agent removed, or of a task ended, meanwhile is refused
    whole by the store (HolderGoneError), and so is one holding a foreign bundle the store
    refuses (BundleRefusedError, see `append_storing`): only the callers holding such
    credentials or bundles fail, and the rest are sealed again on the stored head and written
    in the next try (`_drop_refused`).
    """

    def __init__(self, store: AuditStore, clock: Clock, outage: LedgerOutage | None = None) -> None:
        self._store = store
        self._clock = clock
        # Told the outcome of every commit the store failed or made (not of a group it
        # refused for what it held): whether the ledger is down is the server's health.
        self._outage = outage
        self._chain_lock = threading.Lock()
        self._commit_lock = threading.Lock()
        self._pending: list[tuple[Any, ...]] = []
        self._pending_credentials: list[Credential] = []
        self._pending_jtis: list[JtiClaim] = []
        self._tickets: list[_Ticket] = []
        # Commits for record_later: one thread, started on first use, grouping like any caller.
        self._writer = ThreadPoolExecutor(1, thread_name_prefix="audit-writer")
        # event_id = this prefix + seq: unique without a uuid4 per event (64 random bits per open
        # log, and seq never repeats within one).
        self._id_prefix = secrets.token_hex(8) + "-"
        # Used under the chain lock only (its circular-reference markers are shared).
        self._encode = canonical_encoder()
        head = store.audit_head()
        self._next_seq = 1 if head is None else head.seq + 1
        self._head_hash = GENESIS_HASH if head is None else head.hash
        self._committed = head
        # Bumped whenever _committed is taken from the store rather than from a commit of
        # this process (see `adopted`).
        self._adopted = 0
        # The last event this process itself committed (see `own_head`), and the one it had
        # committed when it found the stored chain cut back or rewritten behind it.
        self._own: Head | None = None
        self._lost: Head | None = None

    @property
    def store(self) -> AuditStore:
        return self._store

    def head(self) -> Head | None:
        """The newest committed-or-queued event; publish it elsewhere as a truncation anchor."""
        with self._chain_lock:
            if self._next_seq == 1:
                return None
            return Head(self._next_seq - 1, self._head_hash)

    def committed_head(self) -> Head | None:
        """The newest event known to be on disk: this process's last commit, or the stored
        head its own write found another writer had moved the chain to, whichever is newer.

        Never re-read from the database for the asking, so a checkpoint of it is not fooled by
        a rewrite behind its back: a head seen during a write is taken only when it is ahead
        of this process's last commit (a head gone back fails the write, see _reseal). What a
        checkpoint of it promises is the chain through that event, which includes every
        event this process committed before it.
        """
        return self._committed

    def own_head(self) -> Head | None:
        """The last event this process committed itself (None: none yet), never one read
        from the store: whatever the stored chain holds later, it must still run through
        this (seq, hash), or it was cut back or rewritten behind the server. What a
        checkpoint or prune record checks before it signs a stored head or hash.

        Once a write found the stored head behind or beside this process's last commit, the
        event lost stays the answer for as long as the process runs: the chain it goes on
        with does not hold it, so every checkpoint and prune is refused (and says why) until
        an operator has looked and restarted the server."""
        return self._own if self._lost is None else self._lost

    @property
    def adopted(self) -> int:
        """How many times the committed head was taken from the store (another writer's head
        found on a write, or the store's after a failed one). While it stays put, every event
        from one committed head to the next was sealed and committed by this process: a
        checkpointer may sign those without reading them back."""
        return self._adopted

    def append(self, kind: str, **fields_: Any) -> AuditEvent:
        """Record one event (fields of EventDraft); durable when this returns."""
        return self.append_many([self._draft(kind, fields_)])[0]

    def append_storing(self, bundle: BundleWrite, kind: str, **fields_: Any) -> AuditEvent:
        """Record one event and store the foreign bundle whose change it records in one
        transaction: both are durable when this returns, and neither is stored when it raises.
        A bundle the store refuses (a higher sequence stored) raises LedgerError caused by
        BundleRefusedError, and its event is not on the chain."""
        rows = self._append([_draft_values(self._draft(kind, fields_))], bundles=(bundle,))
        return event_from_row(dict(zip(_COLUMNS, rows[0], strict=True)))

    def append_many(
        self,
        drafts: Sequence[EventDraft],
        *,
        tasks: Sequence[TaskRecord] = (),
        claim: RemovalClaim | None = None,
    ) -> list[AuditEvent]:
        """Record several events in one transaction (e.g. every credential a revocation covers).

        `tasks`: task rows stored in that transaction (a task's begin with its event, see
        AuditStore.write_ledger). `claim`: the removal claim the writer (a removal's finisher)
        must still hold at the commit; when it does not, LedgerError caused by
        RemovalClaimLostError, and nothing of this call's is kept (the callers sharing the
        commit are written again without it)."""
        rows = self._append(
            [_draft_values(d) for d in drafts],
            tasks=tasks,
            claims=() if claim is None else (claim,),
        )
        return [event_from_row(dict(zip(_COLUMNS, r, strict=True))) for r in rows]

    def append_tuples(self, drafts: Sequence[DraftTuple]) -> None:
        """append_many for drafts given as plain tuples (DRAFT_FIELDS values, in that order).

        For hot paths (every issued SVID): a tuple costs far less to build than an EventDraft.
        Each is checked as an EventDraft would be; durable when this returns.
        """
        self._append([check_draft_tuple(values) for values in drafts])

    def record(
        self,
        credentials: Sequence[Credential],
        drafts: Sequence[DraftTuple | EventDraft],
        jtis: Sequence[JtiClaim] = (),
    ) -> None:
        """Commit issued credentials and the events that audit them in one transaction (shared
        with concurrent callers); both are durable when this returns, and neither is stored
        when it raises (LedgerError).

        `jtis` (the assertions the credentials were issued for, server/oauth) are claimed in
        that transaction (AuditStore.write_ledger): when one is held already (a replay), the
        store refuses the whole shared commit; the callers claiming a held one get a
        LedgerError caused by JtiHeldError naming their own, and the others are written again
        without them, before this returns.

        A credential of an agent evicted or banned, or of a task ended, since its issuance
        was decided is refused by the store (HolderGoneError: AgentRemovedError,
        TaskEndedMeanwhileError): the callers holding such credentials get a LedgerError
        caused by one naming their own agents or tasks, and the others sharing the commit
        are written again without them, before this returns."""
        tuples = [
            check_draft_tuple(d if isinstance(d, tuple) else _draft_values(d)) for d in drafts
        ]
        self._append(tuples, credentials, jtis)

    def record_later(
        self,
        credentials: Sequence[Credential],
        drafts: Sequence[DraftTuple | EventDraft],
        bodies: Sequence[str | None] | None = None,
    ) -> Future[None]:
        """`record` without waiting for the commit: the future is done once the credentials
        and events are durable, or fails with LedgerError when neither is stored.

        For a thread that has more to do meanwhile (a signing thread can sign the next batch
        while this one commits); the commit runs on the log's writer thread, grouped with
        every other caller's. Whatever the records cover must not leave before the future
        is done. Draft errors (AuditError) raise here, before anything is queued.

        `bodies`: per draft, its body made elsewhere, or None. A body is the draft's values
        but `extra`, as the canonical encoder writes them, made only for a draft
        check_draft_tuple passes; a draft with one is neither checked nor encoded again here
        (what the event loop saves per JWT when the signing worker drafted it).
        """
        tuples = [d if isinstance(d, tuple) else _draft_values(d) for d in drafts]
        if bodies is None:
            tuples = [check_draft_tuple(values) for values in tuples]
        else:
            tuples = [
                values if body is not None else check_draft_tuple(values)
                for values, body in zip(tuples, bodies, strict=True)
            ]
        future: Future[None] = Future()
        # Running: a waiter that gives up cannot cancel it, so the writer can always settle it.
        future.set_running_or_notify_cancel()
        if not tuples and not credentials:
            future.set_result(None)
            return future
        ticket = self._enqueue(_Ticket(tuples, future, bodies), tuples, credentials)
        self._writer.submit(self._commit_for, ticket)
        return future

    def _commit_for(self, ticket: _Ticket) -> None:
        """The writer thread's job: the commit holding `ticket` (its future gets the outcome)."""
        with contextlib.suppress(LedgerError):  # on the ticket's future already
            self._commit_until(ticket)

    def _append(
        self,
        drafts: Sequence[DraftTuple],
        credentials: Sequence[Credential] = (),
        jtis: Sequence[JtiClaim] = (),
        bundles: Sequence[BundleWrite] = (),
        *,
        tasks: Sequence[TaskRecord] = (),
        claims: Sequence[RemovalClaim] = (),
    ) -> list[tuple[Any, ...]]:
        if not drafts and not credentials and not jtis and not tasks:
            return []
        ticket = _Ticket(drafts)
        # Not queued apart as credentials are: a group's bundles, tasks and claims are read
        # from its tickets.
        ticket.bundles, ticket.tasks, ticket.claims = bundles, tasks, claims
        ticket = self._enqueue(ticket, drafts, credentials, jtis)
        self._commit_until(ticket)
        # The rows as committed: sealed again if another writer moved the chain meanwhile.
        return ticket.rows

    def _enqueue(
        self,
        ticket: _Ticket,
        drafts: Sequence[DraftTuple],
        credentials: Sequence[Credential],
        jtis: Sequence[JtiClaim] = (),
    ) -> _Ticket:
        """Seal `drafts` onto the chain and queue them, with `credentials`, for the next commit."""
        with self._chain_lock:
            if drafts:
                ticket.ts = self._clock.now()
                # A draft that cannot be encoded raises here, before anything moved.
                try:
                    ticket.rows = self._seal(drafts, ticket.ts, ticket.bodies)
                except UnicodeEncodeError as e:
                    raise unstorable(e) from None
            ticket.credentials, ticket.jtis = credentials, jtis
            self._pending.extend(ticket.rows)
            self._pending_credentials.extend(credentials)
            self._pending_jtis.extend(jtis)
            self._tickets.append(ticket)
        return ticket

    def _draft(self, kind: str, values: dict[str, Any]) -> EventDraft:
        unknown = sorted(set(values) - _DRAFT_FIELDS)
        if unknown:
            raise AuditError(f"unknown audit field(s): {', '.join(unknown)}")
        return EventDraft(kind=kind, **values)

    def _seal(
        self,
        drafts: Sequence[DraftTuple],
        ts: float,
        bodies: Sequence[str | None] | None = None,
    ) -> list[tuple[Any, ...]]:
        """Chain `drafts` into stored rows (columns in CANONICAL_FIELDS order, then hash) after
        the in-memory head, and move the head past them; nothing moves when one fails.

        Called under the chain lock: seq and prev_hash must be taken in one step. One timestamp
        for the whole batch: its events are appended at the same moment.
        """
        seq = self._next_seq
        prev = self._head_hash
        prev_digest = bytes.fromhex(prev)
        prefix = self._id_prefix
        sha256 = hashlib.sha256
        encode = self._encode
        # The canonical array is written in pieces, joined as the encoder would join them:
        # seq and event_id (digits and hex: nothing to escape), ts (encoded once per batch),
        # the draft's values but extra (one encoder call), extra (encoded once, hashed and
        # stored) and prev_hash (hex). test_recording_fast_paths compares it with json.
        ts_json = encode(ts)
        rows = []
        for index, draft in enumerate(drafts):
            extra = draft[-1]
            if extra and type(extra) is not dict:
                extra = dict(extra)
            body = draft[:-1]
            body_json = bodies[index] if bodies is not None else None
            if body_json is None:
                body_json = encode(body)
            extra_json = "{}" if type(extra) is dict and not extra else encode(extra)
            canonical = f'[{seq},"{prefix}{seq}",{ts_json},{body_json[1:-1]},{extra_json},"{prev}"]'
            digest = sha256(prev_digest + canonical.encode("utf-8")).digest()
            hash_hex = digest.hex()
            policy_ids = body[_DRAFT_POLICY_AT]
            rows.append(
                (
                    seq,
                    prefix + str(seq),
                    ts,
                    *body[:_DRAFT_POLICY_AT],
                    encode(list(policy_ids)) if policy_ids else "[]",
                    *body[_DRAFT_POLICY_AT + 1 :],
                    checked_extra_text(extra_json) if extra else "{}",
                    prev,
                    hash_hex,
                )
            )
            prev, prev_digest = hash_hex, digest
            seq += 1
        self._next_seq, self._head_hash = seq, prev
        return rows

    def _commit_until(self, mine: _Ticket) -> None:
        with self._commit_lock:
            if not mine.done:
                with self._chain_lock:
                    batch, self._pending = self._pending, []
                    credentials, self._pending_credentials = self._pending_credentials, []
                    jtis, self._pending_jtis = self._pending_jtis, []
                    tickets, self._tickets = self._tickets, []
                self._write(batch, credentials, jtis, tickets)
        if mine.error is not None:
            raise mine.error

    def _write(
        self,
        batch: list[tuple[Any, ...]],
        credentials: list[Credential],
        jtis: list[JtiClaim],
        tickets: list[_Ticket],
    ) -> None:
        """Commit one group (under the commit lock), sealing it again on the stored head each
        time another writer moved the chain; mark its tickets done or failed."""
        reseals = 0
        while True:
            resealed: list[list[tuple[Any, ...]]] = []

            def reseal(
                stored: Head | None,
                group: list[_Ticket] = tickets,
                out: list[list[tuple[Any, ...]]] = resealed,
            ) -> list[Any]:
                out.append(self._reseal_under_lock(stored, group))
                return out[-1]

            bundles = [b for t in tickets for b in t.bundles]
            # Passed only when there are any: most writes hold none.
            extra: dict[str, Any] = {}
            if bundles:
                extra["bundles"] = bundles
            tasks = [r for t in tickets for r in t.tasks]
            if tasks:
                extra["tasks"] = tasks
            claims = [c for t in tickets for c in t.claims]
            if claims:
                extra["claims"] = claims
            try:
                if bundles or jtis:
                    now = int(self._clock.now())
                    self._store.write_ledger(credentials, batch, jtis, now, reseal=reseal, **extra)
                else:
                    self._store.write_ledger(credentials, batch, reseal=reseal, **extra)
            except ChainMovedError as e:
                reseals += 1
                try:
                    if reseals > _RESEALS:
                        raise LedgerError(
                            f"the audit chain kept moving under other writers: gave up after "
                            f"{_RESEALS} reseals"
                        ) from e
                    batch, credentials, jtis, tickets = self._reseal(
                        e.head, credentials, jtis, tickets
                    )
                except LedgerError as gave_up:
                    self._fail(tickets, gave_up)
                    return
                except Exception as unexpected:  # every waiter must hear of it
                    error = LedgerError(f"cannot seal the audit batch again: {unexpected}")
                    error.__cause__ = unexpected
                    self._fail(tickets, error)
                    return
            except (
                HolderGoneError,
                BundleRefusedError,
                RemovalClaimLostError,
                JtiHeldError,
            ) as e:
                # Only the callers issuing through the removed agents, or for the ended tasks,
                # or storing the refused bundles, or holding the lost removal claims, or
                # claiming assertions used already, are refused; the rest are written again
                # without them (nothing of the batch was kept). Anyone's replay must not fail
                # its neighbours: an agent's SVID, a task's begin, a removal's events.
                try:
                    batch, credentials, jtis, tickets = self._drop_refused(e, tickets)
                except LedgerError as gave_up:
                    self._fail([t for t in tickets if not t.done], gave_up)
                    return
                except Exception as unexpected:  # every waiter must hear of it
                    error = LedgerError(f"cannot commit the audit batch: {unexpected}")
                    error.__cause__ = unexpected
                    self._fail([t for t in tickets if not t.done], error)
                    return
                if not tickets:
                    return
            except (StorageError, AuditError) as e:
                if self._outage is not None:
                    self._outage.failed(e)
                if isinstance(e, LedgerError):
                    self._fail(tickets, e)
                else:
                    error = LedgerError(str(e))
                    error.__cause__ = e
                    self._fail(tickets, error)
                return
            except Exception as unexpected:
                # Every waiter must hear of it (an int SQLite cannot store raises
                # OverflowError): else the callers queued with this one were told their rows
                # were committed, and record_later's futures were never settled.
                error = LedgerError(f"cannot commit the audit batch: {unexpected}")
                error.__cause__ = unexpected
                self._fail(tickets, error)
                return
            else:
                if resealed:  # what the store wrote in the batch's place
                    batch = resealed[-1]
                if batch:
                    # Batches commit in order under this lock: the last row is the new head.
                    self._committed = self._own = Head(batch[-1][0], batch[-1][-1])
                if self._outage is not None:
                    self._outage.worked()
                for t in tickets:
                    t.succeed()
                return

    def _check_not_behind(self, stored: Head | None) -> None:
        committed = self._committed
        if committed is not None and (
            stored is None
            or stored.seq < committed.seq
            or (stored.seq == committed.seq and stored.hash != committed.hash)
        ):
            at = "empty" if stored is None else f"at seq {stored.seq}"
            # The log goes on from the stored head (as a restart would), but what this process
            # committed there is lost: own_head keeps naming it, so nothing is signed over the
            # loss, however many events this process commits on the chain as it now is.
            if self._lost is None:
                self._lost = self._own
            raise LedgerError(
                f"the stored audit head is {at}, behind this server's last commit at seq "
                f"{committed.seq}: the log was cut back or rewritten behind the server"
            )

    def _reseal_under_lock(self, stored: Head | None, group: list[_Ticket]) -> list[Any]:
        """The store's callback (chain.Resealer), inside its transaction and under its write
        lock: seal `group` again on the stored head and return its rows. The drafts queued
        since stay queued (their credentials are not in this transaction) but are chained
        again after the group's new rows, so they follow the head this commit leaves."""
        self._check_not_behind(stored)
        with self._chain_lock:
            self._next_seq = 1 if stored is None else stored.seq + 1
            self._head_hash = GENESIS_HASH if stored is None else stored.hash
            self._committed = stored  # committed by another writer, seen under the lock
            self._adopted += 1  # the checkpointer must read other writers' events back
            batch: list[tuple[Any, ...]] = []
            for t in group:
                if t.drafts:  # same drafts and timestamp: cannot fail where the first did not
                    t.rows = self._seal(t.drafts, t.ts, t.bodies)
                    batch.extend(t.rows)
            pending: list[tuple[Any, ...]] = []
            for t in self._tickets:
                if t.drafts:
                    t.rows = self._seal(t.drafts, t.ts, t.bodies)
                    pending.extend(t.rows)
            self._pending = pending
        return batch

    def _reseal(
        self,
        stored: Head | None,
        credentials: list[Credential],
        jtis: list[JtiClaim],
        tickets: list[_Ticket],
    ) -> tuple[list[tuple[Any, ...]], list[Credential], list[JtiClaim], list[_Ticket]]:
        """Seal the refused group, and everything queued after it (chained on the same stale
        head), again on the stored head; returns the group to write in their place.

        LedgerError when the stored head is behind this process's last commit: the chain was
        cut back or rewritten, which no other writer does. The group is refused (the ledger's
        outage log line says so) and the log resumes from the stored head, as a restart would;
        the checkpoints signed before name what was cut (`audit verify --anchor`).
        """
        self._check_not_behind(stored)
        with self._chain_lock:
            tickets = tickets + self._tickets
            credentials = credentials + self._pending_credentials
            jtis = jtis + self._pending_jtis
            self._pending, self._pending_credentials, self._tickets = [], [], []
            self._pending_jtis = []
            self._next_seq = 1 if stored is None else stored.seq + 1
            self._head_hash = GENESIS_HASH if stored is None else stored.hash
            # Committed, by another writer, and seen inside this process's own transaction.
            self._committed = stored
            self._adopted += 1
            batch: list[tuple[Any, ...]] = []
            for t in tickets:
                if t.drafts:
                    # Same drafts and timestamp, so the same encoding: this cannot fail where
                    # the first seal did not.
                    t.rows = self._seal(t.drafts, t.ts, t.bodies)
                    batch.extend(t.rows)
        return batch, credentials, jtis, tickets

    def _drop_refused(
        self,
        gone: HolderGoneError | BundleRefusedError | RemovalClaimLostError | JtiHeldError,
        tickets: list[_Ticket],
    ) -> tuple[list[tuple[Any, ...]], list[Credential], list[JtiClaim], list[_Ticket]]:
        """The store refused the group for credentials of agents no longer admitted or tasks
        no longer active, for foreign bundles older than those stored, for removal claims
        lost, or for assertion jtis held already: fail the tickets
        holding any (each told of its own only), and seal the others, with everything queued
        after them, again on the stored head; returns the group to write in their place. One
        agent evicted, or one task ended, mid-issuance must not cost the others theirs."""
        kept: list[_Ticket] = []
        at = 0  # where each ticket's bundles begin in the write's (`gone.positions`)
        for t in tickets:
            own: HolderGoneError | BundleRefusedError | RemovalClaimLostError | JtiHeldError | None
            if isinstance(gone, BundleRefusedError):
                own = gone.among(t.bundles, at)
                at += len(t.bundles)
            elif isinstance(gone, RemovalClaimLostError):
                own = gone.among(t.claims)
            elif isinstance(gone, JtiHeldError):
                own = gone.among(t.jtis)
            else:
                own = gone.among(t.credentials)
            if own is None:
                kept.append(t)
                continue
            error = LedgerError(str(own))
            error.__cause__ = own
            t.fail(error)
        if len(kept) == len(tickets):  # none of the group's: writing it again would loop
            raise LedgerError(f"the ledger refused what the batch does not hold: {gone}")
        credentials = [c for t in kept for c in t.credentials]
        jtis = [j for t in kept for j in t.jtis]
        # Nothing was written: the stored head is the one to seal on again (the refused
        # tickets' rows, sealed in memory, are dropped from the chain).
        return self._reseal(self._store.audit_head(), credentials, jtis, kept)

    def _fail(self, tickets: list[_Ticket], error: LedgerError) -> None:
        """A failed commit voids its batch and all chained after it; resume from the store."""
        with self._chain_lock:
            voided = tickets + self._tickets
            self._pending = []
            self._pending_credentials = []
            self._pending_jtis = []
            self._tickets = []
            # A store that did not answer is not asked again: that would hold the callers
            # (this thread is one) as long again before they hear their commit failed. Nor one
            # whose commit's outcome is unknown: its answer did not come either (a database
            # gone silent at COMMIT), and should the batch have landed, the next write seals
            # again on the head it finds there.
            unreachable = isinstance(error.__cause__, UnreachableError | CommitUnknownError)
            try:
                head = self._committed if unreachable else self._store.audit_head()
            except (StorageError, AuditError):
                # The store is down too (a database outage): go on after the last batch this
                # process saw committed, never after the voided ones. Should the failed batch
                # have committed after all, the next write clashes on its seq and comes back
                # here with the store readable.
                head = self._committed
            self._next_seq = 1 if head is None else head.seq + 1
            self._head_hash = GENESIS_HASH if head is None else head.hash
            self._committed = head
            self._adopted += 1
        for t in voided:
            t.fail(error)

    def verify(self, anchor: Head | None = None, anchors: Sequence[Anchor] = ()) -> VerifyResult:
        """Verify one consistent snapshot of the store (see server.audit.verify).

        `anchor` is a head recorded elsewhere earlier (e.g. printed by a previous verify), and
        `anchors` more of them (e.g. signed checkpoints): each event at an anchor's seq must
        still exist with its hash. Without one, deleting the newest rows is caught only while
        the audit_head row is intact.
        """
        found = list(anchors)
        if anchor is not None:
            found.append(Anchor(anchor.seq, anchor.hash))
        return verify_store(self._store, found)

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
        AuditError naming the first row that cannot be decoded or encoded again (what someone
        wrote behind the log: JSON that is not, text that is not UTF-8, a blob), after the
        lines before it: verify names the same row, as UNREADABLE.
        """
        where = EventFilter(agent, task, since, until, decision, kind)
        n = 0
        for row in self._store.audit_rows(where):
            try:
                line = canonical_json(event_from_row(row).to_dict()).decode("utf-8")
            except UNREADABLE as e:
                raise AuditError(
                    f"cannot export the event at seq {row.get('seq')!r} (event "
                    f"{row.get('event_id')!r}): {unreadable(e)}; {n} events exported before "
                    "it. The row was written behind the log: run `svid-server audit verify`"
                ) from None
            out.write(line + "\n")
            n += 1
        return n


_COLUMNS = AUDIT_COLUMNS
if (*CANONICAL_FIELDS, "hash") != _COLUMNS:  # pragma: no cover - a guard for editors
    raise ImportError("server.datastore.records.AUDIT_COLUMNS must follow CANONICAL_FIELDS")
_DRAFT_POLICY_AT = DRAFT_FIELDS.index("policy_ids")
_REASON_AT = DRAFT_FIELDS.index("reason")
_RISK_AT = DRAFT_FIELDS.index("risk")
_TTL_AT = DRAFT_FIELDS.index("ttl")
_LATENCY_AT = DRAFT_FIELDS.index("latency_us")
_NUMBERS_AT = tuple((DRAFT_FIELDS.index(name), name) for name in NUMBER_FIELDS)
# How many times one group is sealed again on another writer's head before its callers get
# LedgerError. Each retry follows a commit by another server, so running out means the others
# kept committing in the few microseconds between this one's reseal and its write.
_RESEALS = 16
