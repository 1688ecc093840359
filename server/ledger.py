"""The ledger: where issuance commits what it issued before anything leaves the server.

    ledger = Ledger(audit_log)
    await ledger.commit(credentials, events)   # or ledger.record(...) from a worker thread
    future = ledger.record_later(credentials, events)   # a worker thread that goes on working

One call commits the credential records and their audit events in one transaction of the
datastore, the events sealed into the audit chain; concurrent calls share a commit (and its
fsync). It returns once the caller's rows are on disk, and raises LedgerError when they are not:
then none of them were kept, and the credentials they cover must not be handed out (fail closed).
"""

from __future__ import annotations

import asyncio
from collections.abc import Sequence
from concurrent.futures import Future

from server.audit.errors import LedgerError
from server.audit.event import EventDraft
from server.audit.log import AuditLog, DraftTuple
from server.datastore.base import JtiClaim
from server.datastore.records import Credential

__all__ = ["Credential", "Ledger", "LedgerError"]


class Ledger:
    """Credential records and their audit events, committed together (see the module)."""

    def __init__(self, audit: AuditLog) -> None:
        self._audit = audit

    def record(
        self,
        credentials: Sequence[Credential],
        events: Sequence[DraftTuple | EventDraft],
        jtis: Sequence[JtiClaim] = (),
    ) -> None:
        """Durable when this returns; LedgerError (nothing kept) when it raises. Blocks: call it
        from a worker thread, or use `commit`. `jtis`: see AuditLog.record."""
        self._audit.record(credentials, events, jtis)

    def record_later(
        self,
        credentials: Sequence[Credential],
        events: Sequence[DraftTuple | EventDraft],
        bodies: Sequence[str | None] | None = None,
    ) -> Future[None]:
        """`record` without blocking: the future is done once durable, or fails with
        LedgerError (nothing kept). `bodies`: see AuditLog.record_later."""
        return self._audit.record_later(credentials, events, bodies)

    async def commit(
        self, credentials: Sequence[Credential], events: Sequence[DraftTuple | EventDraft]
    ) -> None:
        """`record` off the event loop."""
        await asyncio.to_thread(self._audit.record, credentials, events)
