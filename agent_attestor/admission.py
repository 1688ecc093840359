"""Which new Workload API connections the relay takes: a share per uid and a reserve for
callers that hold few connections, so one user's flood of idle connections cannot use up the
agent's file descriptors and lock everyone else out.

Each relayed connection costs three descriptors (the workload's, the relay's client to the
internal server, and that server's side of it), and a fourth while it is identified. The
capacity is what the descriptor limit leaves after a headroom for everything else the agent
opens.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass

from svid._clock import Clock
from svid._key_counts import KeyCounts

log = logging.getLogger(__name__)

FDS_PER_CONNECTION = 4  # and a duplicate while it is identified
FD_HEADROOM = 128  # the agent's own files, its server channel, grpc's internals
RESERVE_FRACTION = 8  # 1/8 of the capacity is kept for callers holding few connections
FEW_CONNECTIONS = 2  # a uid with fewer than this many may use the reserve
REFUSAL_LOG_INTERVAL = 10.0  # seconds between refusal log lines for one uid


def capacity_for(descriptor_limit: int) -> int:
    """How many relayed connections `descriptor_limit` descriptors carry, after the headroom."""
    return max((descriptor_limit - FD_HEADROOM) // FDS_PER_CONNECTION, 1)


@dataclass(frozen=True, slots=True)
class Refusal:
    reason: str


class Admission:
    """Counts open connections per uid and decides whether one more may come in.

    Used from the event loop only (connection_made / connection_lost): no lock."""

    def __init__(self, per_uid: int, capacity: int, clock: Clock) -> None:
        if per_uid < 1 or capacity < 1:
            raise ValueError("per_uid and capacity must be positive")
        self.per_uid = per_uid
        self.capacity = capacity
        self.reserve = capacity // RESERVE_FRACTION
        self._clock = clock
        self._open: KeyCounts[int] = KeyCounts("admitted connection")
        self._last_refusal_log: dict[int, float] = {}

    @property
    def total(self) -> int:
        return self._open.total

    def held_by(self, uid: int) -> int:
        return self._open.held_by(uid)

    def decide(self, uid: int) -> Refusal | None:
        """None to admit `uid`'s new connection, else why not. Pure: counts nothing."""
        held = self.held_by(uid)
        if self.total >= self.capacity:
            return Refusal(f"the agent holds its maximum of {self.capacity} connections")
        if held >= self.per_uid:
            return Refusal(f"uid {uid} holds its maximum of {self.per_uid} connections")
        if self.total >= self.capacity - self.reserve and held >= FEW_CONNECTIONS:
            return Refusal("the last connections are kept for callers that hold few")
        return None

    def admit(self, uid: int) -> bool:
        """Count the connection and return True, or log (at most every few seconds per uid)
        and return False."""
        refusal = self.decide(uid)
        if refusal is None:
            self._open.add(uid)
            return True
        self.log_refusal(uid, refusal.reason)
        return False

    def log_refusal(self, uid: int, reason: str) -> None:
        """One warning per uid every REFUSAL_LOG_INTERVAL seconds, however many refusals."""
        now = self._clock.monotonic()
        last = self._last_refusal_log.get(uid)
        if last is None or now - last >= REFUSAL_LOG_INTERVAL:
            if len(self._last_refusal_log) > 4096:  # bounded, whatever the number of uids
                self._last_refusal_log.clear()
            self._last_refusal_log[uid] = now
            log.warning("refused a workload connection", extra={"uid": uid, "reason": reason})

    def release(self, uid: int) -> None:
        self._open.remove(uid)
