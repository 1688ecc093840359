"""Whether the audit ledger commits, as its commits say: every write the log makes (issuance,
task begin and end, revocations, removals, policy reloads) tells this its outcome.

Storage that refuses writes (a full disk, a read-only file, a lock held past the busy timeout,
a database gone) is one outage: one log line when commits start failing, one when they work
again (with how long and how many failed), and `on_turn` at each turn for the server's report
(`svid_server_ledger_available`, a reason on its health: /healthz 503, the node service
NOT_SERVING). A write refused for what it holds (a replay, an agent removed meanwhile) is no
outage: the log never reports those here.

Each outage is recorded on the chain by one `ledger_outage` event once the ledger commits
again: the auditor's word that identity decisions stopped from `began_at` on (every one
refused, none unrecorded), and why. A server whose health says 503 gets no traffic from a
balancer, so nothing of its callers' would ever find the ledger back: while an outage is
unrecorded, `run` tries to commit its event every PROBE_INTERVAL. That commit, or any other,
ends the outage.
"""

from __future__ import annotations

import asyncio
import contextlib
import errno
import logging
import sqlite3
import threading
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import TYPE_CHECKING

from server.audit.errors import LedgerError
from server.audit.event import EventKind
from server.datastore.errors import DatastoreMovedError, StorageError, UnreachableError
from svid._clock import Clock
from svid._waits import set_within

if TYPE_CHECKING:
    from server.audit.log import AuditLog  # which tells this its commits

_log = logging.getLogger("svid.server.audit")

# Seconds between tries to commit while the ledger is down: a balancer's next probe sees it
# back about this soon after the storage is.
PROBE_INTERVAL = 1.0

# What a failed write means, from the words SQLite and the OS use for it.
_REASONS = (
    ("disk full", ("database or disk is full", "no space left")),
    ("read-only", ("readonly database", "read-only file system")),
    ("I/O error", ("disk i/o error", "input/output error")),
    ("locked", ("database is locked",)),
)
_ERRNO_REASONS = {errno.ENOSPC: "disk full", errno.EROFS: "read-only", errno.EIO: "I/O error"}
# PostgreSQL's codes for the same faults (its messages are in its server's language, and a
# read-only transaction's is no word above): disk_full, read_only_sql_transaction (a standby
# reached after a failover), io_error, lock_not_available.
_SQLSTATE_REASONS = {
    "53100": "disk full",
    "25006": "read-only",
    "58030": "I/O error",
    "55P03": "locked",
}
# SQLSTATE classes that are the database's own trouble, not a refusal of what a write held
# (as a constraint, 23, or a value, 22, is): a connection (08), resources (53), an operator's
# intervention (57), the system (58), an internal error (XX).
_FAULT_CLASSES = frozenset(("08", "53", "57", "58", "XX"))


def _sqlstate(exc: BaseException) -> str | None:
    """A PostgreSQL driver error's SQLSTATE (psycopg is not imported: it is optional)."""
    state = getattr(exc, "sqlstate", None)
    return state if isinstance(state, str) else None


def failure_reason(exc: BaseException) -> str:
    """A short, path-free name for why a write failed (for logs, metric labels, health)."""
    seen: BaseException | None = exc
    while seen is not None:
        if isinstance(seen, DatastoreMovedError):
            return "datastore file gone"
        if isinstance(seen, OSError) and seen.errno in _ERRNO_REASONS:
            return _ERRNO_REASONS[seen.errno]
        state = _sqlstate(seen)
        if state in _SQLSTATE_REASONS:
            return _SQLSTATE_REASONS[state]
        text = str(seen).lower()
        for reason, words in _REASONS:
            if any(w in text for w in words):
                return reason
        seen = seen.__cause__ or seen.__context__
    return "storage error"


def storage_fault(exc: BaseException) -> bool:
    """Whether a failed write was the storage's own fault (a named reason, or a backend that
    did not answer), not a refusal of what it held: what a write outside the audit log (a task
    row's) tells LedgerOutage, the ledger's transactions going to the same storage."""
    seen: BaseException | None = exc
    while seen is not None:
        if isinstance(seen, UnreachableError):
            return True
        state = _sqlstate(seen)
        if state is not None and (state in _SQLSTATE_REASONS or state[:2] in _FAULT_CLASSES):
            return True
        seen = seen.__cause__ or seen.__context__
    return failure_reason(exc) != "storage error"


@contextlib.contextmanager
def telling(outage: LedgerOutage | None) -> Iterator[None]:
    """Around a write to the ledger's storage made outside the audit log (a task row, an
    agent's record), failing before any event reaches the log: a fault of the storage's
    (storage_fault) that fails it tells `outage`, or the log would never hear of it."""
    try:
        yield
    except (StorageError, sqlite3.Error) as exc:  # some SQLite writes raise its own errors
        if outage is not None and storage_fault(exc):
            outage.failed(exc)
        raise


@dataclass(frozen=True)
class _Outage:
    reason: str
    began_at: float


class LedgerOutage:
    """`on_turn(reason)`: the short reason when commits start failing, None when one works
    again; called on the committing thread under this object's lock, so that turns reach it
    in the order they happened (it must not call back here)."""

    def __init__(self, clock: Clock, on_turn: Callable[[str | None], None] | None = None) -> None:
        self._clock = clock
        self._on_turn = on_turn
        self._lock = threading.Lock()
        self._reason: str | None = None
        self._since = 0.0
        self._failures = 0
        # The oldest outage no event records yet (None: all are), the newest outage, and how
        # many have begun: an outage that begins while the probe's event is being written is
        # told apart from the one that event records.
        self._unrecorded: _Outage | None = None
        self._latest: _Outage | None = None
        self._begun = 0

    @property
    def reason(self) -> str | None:
        """Why commits fail now; None while they work."""
        return self._reason

    def failed(self, exc: BaseException) -> None:
        reason = failure_reason(exc)
        with self._lock:
            self._failures += 1
            if self._reason is not None:
                return
            self._reason, self._since = reason, self._clock.now()
            self._latest = _Outage(reason, self._since)
            self._begun += 1
            # An outage begun before the last one's event was written goes on from it.
            if self._unrecorded is None:
                self._unrecorded = self._latest
            _log.error(
                "the ledger cannot commit; every identity decision is refused until storage "
                "recovers",
                # The store's words, not those of the error it was raised from: a driver's
                # message is scrubbed of paths and secrets only in the text the store made.
                extra={"reason": reason, "error": str(exc)},
            )
            if self._on_turn is not None:
                self._on_turn(reason)

    def worked(self) -> None:
        if self._reason is None:  # the common case, read without the lock
            return
        with self._lock:
            if self._reason is None:
                return
            reason, failures, lasted = self._reason, self._failures, self._clock.now() - self._since
            self._reason, self._failures = None, 0
            _log.warning(
                "the ledger commits again; identity decisions resumed",
                extra={"reason": reason, "seconds": round(lasted, 1), "failed_commits": failures},
            )
            if self._on_turn is not None:
                self._on_turn(None)

    async def run(self, stop: asyncio.Event, audit: AuditLog, node_id: str) -> None:
        """Until `stop`: every PROBE_INTERVAL while an outage is unrecorded, try to commit its
        `ledger_outage` event through `audit` (which tells this its outcome), `node_id` the
        server's."""
        while not await set_within(stop, PROBE_INTERVAL):
            with self._lock:
                outage, begun = self._unrecorded, self._begun
            if outage is None:
                continue
            try:
                await asyncio.to_thread(
                    audit.append,
                    EventKind.LEDGER_OUTAGE,
                    node_id=node_id,
                    decision="deny",
                    reason=outage.reason,
                    extra={"began_at": int(outage.began_at)},
                )
            except LedgerError:
                continue  # still down: its log line and health say so
            with self._lock:
                # One begun meanwhile may have begun after this event committed: which side
                # of the commit it fell on cannot be told, so it gets an event of its own.
                # Dropped, nothing would probe for its end (a balancer sends no call to a
                # server answering 503), and /healthz would say 503 for good.
                self._unrecorded = None if self._begun == begun else self._latest
