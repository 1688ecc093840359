"""The ledger as the spine uses it: each issuance call it refuses counted, by reason. Whether
the ledger is down, said once per outage in the log, the metrics and the server's health, is
the audit log's own to tell (server/audit/outage.py): it sees every write, not issuance's
alone."""

from __future__ import annotations

from collections.abc import Sequence
from concurrent.futures import Future

from server.issuance.ledger import Credential, EventTuple, Ledger, LedgerUnavailableError
from server.metrics import Metrics


class MeteredLedger:
    """Wraps a Ledger: `svid_server_ledger_failures{reason}` counts every refused commit."""

    def __init__(self, ledger: Ledger, metrics: Metrics) -> None:
        self._ledger = ledger
        self._metrics = metrics

    async def commit(self, credentials: Sequence[Credential], events: Sequence[EventTuple]) -> None:
        try:
            await self._ledger.commit(credentials, events)
        except LedgerUnavailableError as exc:
            self._failed(exc)
            raise

    def record(self, credentials: Sequence[Credential], events: Sequence[EventTuple]) -> None:
        try:
            self._ledger.record(credentials, events)
        except LedgerUnavailableError as exc:
            self._failed(exc)
            raise

    def record_later(
        self,
        credentials: Sequence[Credential],
        events: Sequence[EventTuple],
        bodies: Sequence[str | None] | None = None,
    ) -> Future[None]:
        future = self._ledger.record_later(credentials, events, bodies)
        # Added before the caller can add its own: counted before anyone sees the outcome.
        future.add_done_callback(self._settled)
        return future

    def _settled(self, future: Future[None]) -> None:
        exc = future.exception()
        if isinstance(exc, LedgerUnavailableError):
            self._failed(exc)

    def _failed(self, exc: LedgerUnavailableError) -> None:
        self._metrics.ledger_failures.labels(reason=exc.reason).inc()
