"""The ledger port: where every issued credential and its audit event are committed.

THE CONTRACT (fail closed). A credential leaves the server only after its record and its audit
event are committed:

- `Ledger.commit(credentials, events)` returns only once every credential row and every audit
  event it was given is durable (synchronous=FULL: it survives `kill -9` and power loss).
  Implementations may group commit: concurrent callers share one transaction and one fsync,
  and each caller still waits for the commit that holds its own rows.
- If the ledger cannot commit (disk full, I/O error, read-only file, a database that went
  away), `commit` raises `LedgerUnavailableError`. The issuer then sends nothing: the RPC
  fails with UNAVAILABLE and a message saying the server cannot record (server.status), the
  `svid_server_ledger_failures{reason}` metric counts it, `svid_server_ledger_available`
  drops to 0, and one log line per outage says why (MeteredLedger).
- Nothing has to be reset by hand: every call tries the storage again, so issuance resumes by
  itself as soon as the storage accepts writes.

A credential may be on record and never sent (the call failed after its rows were written,
or only one of two files could be written, or the client hung up); it then expires unused on
its minute-scale TTL. The reverse, a credential sent without its record and its event, never
happens.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any, NamedTuple, Protocol

from server.errors import ServerError

# An audit event draft as a plain tuple: the values of server.audit.event.DRAFT_FIELDS in that
# order (see AuditLog.append_tuples). One is built per issued SVID; a tuple costs far less
# than an EventDraft.
EventTuple = tuple[Any, ...]


class Credential(NamedTuple):
    """An issued credential, recorded so it can be revoked: an X.509 serial (hex) or a jti.

    A named tuple, not a frozen dataclass: one is built per SVID on the issuing thread (a
    frozen dataclass costs 3x as much to make) and it is already the row the store writes."""

    kind: str  # server.datastore.records.REVOKED_X509_SERIAL | REVOKED_JWT_ID
    value: str
    agent_id: str
    spiffe_id: str
    task_id: str  # "" for a workload (non-task) credential
    expires_at: int


class LedgerUnavailableError(ServerError):
    """The ledger could not commit; nothing of the call may be issued.

    `reason` is short and safe for logs and metric labels ("disk full", "read-only", "I/O
    error", "audit log"); the chained cause has the details (paths included) for the operator.
    """

    def __init__(self, reason: str) -> None:
        super().__init__(f"the ledger cannot commit: {reason}")
        self.reason = reason


class Ledger(Protocol):
    async def commit(self, credentials: Sequence[Credential], events: Sequence[EventTuple]) -> None:
        """Durably record `credentials` and `events`; raise LedgerUnavailableError otherwise.
        See the module docstring for the whole contract."""
        ...
