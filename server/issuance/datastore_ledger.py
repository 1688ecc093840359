"""The Ledger port over the datastore's ledger (server.ledger): credential rows and their audit
events in one transaction, group-committed with concurrent callers. This module only turns
that ledger's LedgerError into the port's LedgerUnavailableError, with a short reason, or,
when the ledger refused the credentials because their agent was removed, or their task ended,
meanwhile, into the AgentRemovedError or TaskEndedMeanwhileError the port lets through."""

from __future__ import annotations

from collections.abc import Sequence
from concurrent.futures import Future

from server.audit.errors import LedgerError
from server.audit.outage import failure_reason
from server.datastore.errors import HolderGoneError
from server.issuance.ledger import Credential, EventTuple, LedgerUnavailableError
from server.ledger import Ledger as DatastoreLedgerWriter


def _refusal(exc: LedgerError, credentials: Sequence[Credential]) -> Exception:
    """What the port raises for a failed commit of `credentials` (see the module)."""
    gone = exc.__cause__
    error: Exception | None = None
    if isinstance(gone, HolderGoneError):
        error = gone.among(credentials)
    if error is None:
        error = LedgerUnavailableError(failure_reason(exc))
    error.__cause__ = exc
    return error


class DatastoreLedger:
    """Implements server.issuance.ledger.Ledger; see that module for the contract."""

    def __init__(self, ledger: DatastoreLedgerWriter) -> None:
        self._ledger = ledger

    async def commit(self, credentials: Sequence[Credential], events: Sequence[EventTuple]) -> None:
        if not credentials and not events:
            return
        try:
            await self._ledger.commit(credentials, events)
        except LedgerError as exc:
            raise _refusal(exc, credentials) from exc

    def record(self, credentials: Sequence[Credential], events: Sequence[EventTuple]) -> None:
        if not credentials and not events:
            return
        try:
            self._ledger.record(credentials, events)
        except LedgerError as exc:
            raise _refusal(exc, credentials) from exc

    def record_later(
        self,
        credentials: Sequence[Credential],
        events: Sequence[EventTuple],
        bodies: Sequence[str | None] | None = None,
    ) -> Future[None]:
        settled: Future[None] = Future()
        settled.set_running_or_notify_cancel()  # see AuditLog.record_later
        if not credentials and not events:
            settled.set_result(None)
            return settled

        def settle(committed: Future[None]) -> None:
            exc = committed.exception()
            if exc is None:
                settled.set_result(None)
            elif isinstance(exc, LedgerError):
                settled.set_exception(_refusal(exc, credentials))
            else:
                settled.set_exception(exc)

        self._ledger.record_later(credentials, events, bodies).add_done_callback(settle)
        return settled
