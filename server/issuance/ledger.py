"""The ledger port: where every issued credential and its audit event are committed.

THE CONTRACT (fail closed). A credential leaves the server only after its record and its audit
event are committed:

- `Ledger.commit(credentials, events)` returns only once every credential row and every audit
  event it was given is durable (synchronous=FULL: it survives `kill -9` and power loss).
  `Ledger.record` is the same call for a thread that already left the event loop (a signing
  thread): it blocks until then, and keeps every other term of this contract.
  Implementations may group commit: concurrent callers share one transaction and one fsync,
  and each caller still waits for the commit that holds its own rows. (The one in use,
  server.issuance.datastore_ledger, commits both in one datastore transaction.)
- `Ledger.record_later` is `record` for a thread with more to do meanwhile: it returns a
  future at once, done when `record` would have returned, or failed with the error it would
  have raised. The caller must not let out anything the records cover before then.
- If the ledger cannot commit (disk full, I/O error, read-only file, a database that went
  away), `commit` raises `LedgerUnavailableError`. The issuer then sends nothing: the RPC
  fails with UNAVAILABLE and a message saying the server cannot record (server.status), the
  `svid_server_ledger_failures{reason}` metric counts it, `svid_server_ledger_available`
  drops to 0, and one log line per outage says why (MeteredLedger).
- If the credentials' agent was evicted or banned after the call checked it, and its removal
  may already have read what to revoke, `commit` raises the datastore's `AgentRemovedError`
  (PERMISSION_DENIED, server.status) and nothing of the call is kept or sent. Likewise
  `TaskEndedMeanwhileError` when a credential's task ended (on any server) after the call
  decided it: the end reads what to revoke once its row left 'active'. Calls of other agents
  or tasks sharing the commit are written again without them; the ledger stays available.
- Nothing has to be reset by hand: every call tries the storage again, so issuance resumes by
  itself as soon as the storage accepts writes.

A credential may be on record and never sent (the call failed after its rows were written, or
the client hung up); it then expires unused on its minute-scale TTL. The reverse, a credential
sent without its record and its event, never happens.
"""

from __future__ import annotations

from collections.abc import Sequence
from concurrent.futures import Future
from typing import Any, Protocol

from server.datastore.records import Credential
from server.errors import ServerError

__all__ = ["Credential", "EventTuple", "Ledger", "LedgerUnavailableError"]

# An audit event draft as a plain tuple: the values of server.audit.event.DRAFT_FIELDS in that
# order (see AuditLog.append_tuples). One is built per issued SVID; a tuple costs far less
# than an EventDraft.
EventTuple = tuple[Any, ...]


class LedgerUnavailableError(ServerError):
    """The ledger could not commit; nothing of the call may be issued.

    `reason` is short and safe for logs and metric labels ("disk full", "read-only", "I/O
    error", "storage error"); the chained cause has the details (paths included) for the operator.
    """

    def __init__(self, reason: str) -> None:
        super().__init__(f"the ledger cannot commit: {reason}")
        self.reason = reason


class Ledger(Protocol):
    async def commit(self, credentials: Sequence[Credential], events: Sequence[EventTuple]) -> None:
        """Durably record `credentials` and `events`; raise LedgerUnavailableError otherwise.
        See the module docstring for the whole contract."""
        ...

    def record(self, credentials: Sequence[Credential], events: Sequence[EventTuple]) -> None:
        """`commit`, blocking: for a worker thread, never the event loop."""
        ...

    def record_later(
        self,
        credentials: Sequence[Credential],
        events: Sequence[EventTuple],
        bodies: Sequence[str | None] | None = None,
    ) -> Future[None]:
        """`record` without waiting: done once durable, or failed with LedgerUnavailableError.
        For a worker thread; the loop awaits it with asyncio.wrap_future. `bodies`: per event,
        its audit body checked and encoded already (AuditLog.record_later), or None."""
        ...
