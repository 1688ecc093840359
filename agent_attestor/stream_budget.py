"""How many streams each uid holds open on the Workload API socket, across all its connections.

Each open stream (FetchX509SVID, the bundle streams, the revocation Watch) holds about 25 KiB
of the agent's memory while it lives. A connection holds at most 49 (endpoint.py) and a uid
128 connections (admission.py), so one unprivileged user could hold 6,272 streams (25,000 held
650 MB of the agent's memory, measured), and more for each uid it can run processes as. A
workload's SDK holds a handful of streams, so a uid running many workloads still fits under
MAX_STREAMS_PER_UID (the agent's max_streams_per_uid): eight per connection a uid may hold.

Used from the event loop only (the gRPC handlers): no lock.
"""

from __future__ import annotations

import logging

from svid._clock import Clock
from svid._key_counts import KeyCounts
from svid._log_throttle import LogThrottle

log = logging.getLogger(__name__)

MAX_STREAMS_PER_UID = 1024
REFUSAL_LOG_INTERVAL = 60.0  # seconds between log lines, whoever was refused


class StreamBudget:
    def __init__(self, clock: Clock, per_uid: int = MAX_STREAMS_PER_UID) -> None:
        if per_uid < 1:
            raise ValueError("per_uid must be positive")
        self.per_uid = per_uid
        self._open: KeyCounts[int] = KeyCounts("open stream")
        self._refusals = LogThrottle(REFUSAL_LOG_INTERVAL, clock)

    def held_by(self, uid: int) -> int:
        return self._open.held_by(uid)

    def take(self, uid: int) -> str | None:
        """Count one more stream of `uid` and return None, or say why it may not have one."""
        held = self.held_by(uid)
        if held >= self.per_uid:
            count = self._refusals.due()
            if count:
                log.warning(
                    "refused Workload API streams of a uid at its maximum",
                    extra={"uid": uid, "maximum": self.per_uid, "refused": count},
                )
            return f"uid {uid} holds its maximum of {self.per_uid} open streams"
        self._open.add(uid)
        return None

    def give_back(self, uid: int) -> None:
        self._open.remove(uid)
