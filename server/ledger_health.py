"""The audit ledger's outages as the server reports them: `svid_server_ledger_available`, a
reason on the server's health (/healthz 503, the node service NOT_SERVING), and one
`ledger_outage` event on the chain once it commits again.

A server whose health says 503 gets no traffic from a balancer, so nothing of its callers'
would ever find the ledger back: while an outage is unrecorded, `run` tries to commit its
event every PROBE_INTERVAL. That commit, or any other, ends the outage. The event is also the
auditor's word that identity decisions stopped from `began_at` on (every one refused, none
unrecorded), and why.
"""

from __future__ import annotations

import asyncio
import threading
from dataclasses import dataclass

from prometheus_client import Gauge

from server.audit.errors import LedgerError
from server.audit.event import EventKind
from server.audit.log import AuditLog
from server.audit.outage import LedgerOutage
from server.health_reasons import LEDGER, HealthReasons
from svid._clock import Clock
from svid._waits import set_within

# Seconds between tries to commit while the ledger is down: a balancer's next probe sees it
# back about this soon after the storage is.
PROBE_INTERVAL = 1.0


@dataclass(frozen=True)
class _Outage:
    reason: str
    began_at: float


class LedgerHealth:
    def __init__(
        self, clock: Clock, available: Gauge, health: HealthReasons, server_id: str
    ) -> None:
        self.outage = LedgerOutage(clock, self._turned)
        self._available = available
        self._health = health
        self._server_id = server_id
        self._lock = threading.Lock()
        self._unrecorded: _Outage | None = None
        # The newest outage, and how many have begun: an outage that begins while the probe's
        # event is being written is told apart from the one that event records.
        self._latest: _Outage | None = None
        self._begun = 0

    def _turned(self, reason: str | None) -> None:
        """LedgerOutage's on_turn, on the committing thread."""
        if reason is None:
            self._available.set(1)
            self._health.clear(LEDGER)
            return
        self._available.set(0)
        self._health.set(LEDGER, f"the audit ledger cannot commit ({reason})")
        with self._lock:
            self._latest = _Outage(reason, self.outage.since)
            self._begun += 1
            # An outage begun before the last one's event was written goes on from it.
            if self._unrecorded is None:
                self._unrecorded = self._latest

    async def run(self, stop: asyncio.Event, audit: AuditLog) -> None:
        while not await set_within(stop, PROBE_INTERVAL):
            with self._lock:
                outage, begun = self._unrecorded, self._begun
            if outage is None:
                continue
            try:
                await asyncio.to_thread(
                    audit.append,
                    EventKind.LEDGER_OUTAGE,
                    node_id=self._server_id,
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
