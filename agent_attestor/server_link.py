"""Whether the agent holds a live Sync stream to a server, and since when it has not: how old
its copy of the server's revocations may be. The Revocations service tells verifiers (a quiet
stream to them says nothing of a partition behind the agent), so that their
max_revocation_staleness fails closed while revocations made at the server cannot arrive.
"""

from __future__ import annotations

from agent_attestor.watchers import Signal
from svid._clock import Clock, ElapsedClock


class ServerLink:
    def __init__(self, clock: Clock) -> None:
        # An interval, so on the elapsed clock: no wall-clock step shortens it.
        self._elapsed = ElapsedClock(clock)
        # Out of sync since the start: what the state file gave is older than that, and the
        # revocations made since it was written arrive only with the first Sync.
        self._lost_at: float | None = self._elapsed.monotonic()
        self.changed = Signal()  # bumped when the link is lost or back, not in between

    @property
    def in_sync(self) -> bool:
        return self._lost_at is None

    def up(self) -> None:
        """A Sync stream is live and caught up: revocations arrive as the server makes them."""
        if self._lost_at is not None:
            self._lost_at = None
            self.changed.bump()

    def down(self) -> None:
        """The Sync stream ended: what the agent holds grows old from now."""
        if self._lost_at is None:
            self._lost_at = self._elapsed.monotonic()
            self.changed.bump()

    def out_of_sync_ms(self) -> int:
        """0 while in sync; else milliseconds since the link was lost, at least 1 (0 would say
        in sync)."""
        lost_at = self._lost_at
        if lost_at is None:
            return 0
        return max(1, int((self._elapsed.monotonic() - lost_at) * 1000))
