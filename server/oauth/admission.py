"""Which new connections an HTTP listener takes: at most so many from one client address (an
IPv6 one by its /64) and so many in all.

Why: each connection holds a file descriptor for up to the TLS handshake timeout or the request
deadline even if its client never sends a byte, and the process serving these listeners also
serves the agents' gRPC API. Without a cap, one client's idle connections could take every
descriptor and stop agents renewing. A refused connection is closed as soon as it is accepted,
before any TLS, so a refusal costs next to nothing (as nginx's limit_conn and Envoy's
connection limit filter do).
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from dataclasses import dataclass

from server.peer import address_key
from svid._clock import Clock
from svid._key_counts import KeyCounts
from svid._log_throttle import LogThrottle

_log = logging.getLogger("svid.server.oauth")

REFUSAL_LOG_INTERVAL = 60.0  # seconds between log lines about refusals, however many
PER_HOST = "per_host"  # the metric's reasons
TOTAL = "total"


def _unreported(*_: object) -> None:
    pass


@dataclass(frozen=True, slots=True)
class ConnectionMetrics:
    """What a listener reports, for the server's metrics (server/metrics.py); each left out is
    not reported."""

    refused: Callable[[str], None] = _unreported  # the reason of each connection refused
    open: Callable[[int], None] = _unreported  # the connections open, on each change
    accept_failed: Callable[[], None] = _unreported  # each accept() that failed (descriptors)


@dataclass(frozen=True, slots=True)
class ConnectionCaps:
    """server/config.py's http_max_connections and http_max_connections_per_host."""

    total: int
    per_host: int

    def __post_init__(self) -> None:
        if self.total < 1 or self.per_host < 1:
            raise ValueError(f"connection caps must be at least 1, got {self}")


class Admission:
    """Counts a listener's open connections by client and decides whether one more may come in.

    Used from the event loop only: no lock. The counts hold only clients with a connection
    open, so they stay within `caps.total` entries whoever connects."""

    def __init__(
        self,
        caps: ConnectionCaps,
        listener: str,
        clock: Clock,
        metrics: ConnectionMetrics | None = None,
    ) -> None:
        self.caps = caps
        self._listener = listener
        self._metrics = metrics or ConnectionMetrics()
        self._open: KeyCounts[str] = KeyCounts("admitted connection")
        self._log = LogThrottle(REFUSAL_LOG_INTERVAL, clock)

    @property
    def total(self) -> int:
        return self._open.total

    def held_by(self, host: str) -> int:
        return self._open.held_by(address_key(host))

    def admit(self, host: str) -> str | None:
        """The key to `release` once the connection from `host` ends, or None: refused (counted,
        and logged at most once per REFUSAL_LOG_INTERVAL)."""
        key = address_key(host)
        held = self._open.held_by(key)
        if self.total >= self.caps.total:
            self._refuse(key, TOTAL)
            return None
        if held >= self.caps.per_host:
            self._refuse(key, PER_HOST)
            return None
        self._open.add(key)
        self._metrics.open(self.total)
        return key

    def release(self, key: str) -> None:
        self._open.remove(key)
        self._metrics.open(self.total)

    def _refuse(self, key: str, reason: str) -> None:
        self._metrics.refused(reason)
        count = self._log.due()
        if not count:
            return
        # One line for a flood, not one per connection: the metric has the count.
        _log.warning(
            "refused new HTTP connections: a cap on open connections was reached",
            extra={
                "listener": self._listener,
                "reason": reason,
                "client": key,
                "refused": count,
                "max_connections": self.caps.total,
                "max_connections_per_host": self.caps.per_host,
            },
        )
