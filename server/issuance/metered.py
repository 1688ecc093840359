"""The ledger as the spine uses it: each refusal counted, one log line per outage."""

from __future__ import annotations

import logging
import threading
from collections.abc import Sequence
from concurrent.futures import Future

from server.issuance.ledger import Credential, EventTuple, Ledger, LedgerUnavailableError
from server.metrics import Metrics

_log = logging.getLogger("svid.server.issuance")


class MeteredLedger:
    """Wraps a Ledger: `svid_server_ledger_failures{reason}` counts every refused commit,
    `svid_server_ledger_available` says whether the last one worked, and the log gets one
    line when commits start failing and one when they work again (not one per call)."""

    def __init__(self, ledger: Ledger, metrics: Metrics) -> None:
        self._ledger = ledger
        self._metrics = metrics
        self._down = False
        # `record` runs on signing threads and `commit` on the loop: one outage, one line.
        self._lock = threading.Lock()

    async def commit(self, credentials: Sequence[Credential], events: Sequence[EventTuple]) -> None:
        try:
            await self._ledger.commit(credentials, events)
        except LedgerUnavailableError as exc:
            self._failed(exc)
            raise
        self._worked()

    def record(self, credentials: Sequence[Credential], events: Sequence[EventTuple]) -> None:
        try:
            self._ledger.record(credentials, events)
        except LedgerUnavailableError as exc:
            self._failed(exc)
            raise
        self._worked()

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
        if exc is None:
            self._worked()
        elif isinstance(exc, LedgerUnavailableError):
            self._failed(exc)

    def _failed(self, exc: LedgerUnavailableError) -> None:
        self._metrics.ledger_failures.labels(reason=exc.reason).inc()
        with self._lock:
            self._metrics.ledger_available.set(0)
            if self._down:
                return
            self._down = True
        _log.error(
            "the ledger cannot commit; issuance refused until storage recovers",
            extra={"reason": exc.reason, "error": str(exc.__cause__ or exc)},
        )

    def _worked(self) -> None:
        if not self._down:  # the common case, read without the lock; a race only delays a line
            return
        with self._lock:
            if not self._down:
                return
            self._down = False
            self._metrics.ledger_available.set(1)
        _log.warning("the ledger commits again; issuance resumed")
