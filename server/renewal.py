"""When a server SVID is next renewed: at half its life, or, after a failed renewal, after a
back-off. One schedule for both of the server's own identities (the node API's TLS SVID,
server/tls.py, and the bundle endpoint's, server/federation/endpoint.py): the endpoint's had
none, and its loop retried a failed renewal every 0.05 s with a traceback each time.
"""

from __future__ import annotations

from svid._backoff import Retry
from svid._clock import Clock, ElapsedClock

# A failed renewal is retried after this long, doubling per failure up to the cap: the
# loop sleeps until the renewal is due, which a failure would leave in the past.
FIRST_RETRY_SECONDS = 1.0
MAX_RETRY_SECONDS = 10.0


class RenewalSchedule:
    """`renew_at` (a wall-clock time, from the SVID's own validity) until a renewal fails; then
    the back-off, counted on the elapsed clock: a back-off is an interval, and on the wall
    clock a step back after the failure put it off by the step."""

    def __init__(
        self,
        clock: Clock,
        first_retry: float = FIRST_RETRY_SECONDS,
        max_retry: float = MAX_RETRY_SECONDS,
    ) -> None:
        self._clock = clock
        self._elapsed = ElapsedClock(clock)
        self._retry = Retry(first_retry, max_retry)
        self._retry_at: float | None = None
        self.renew_at = 0.0

    @property
    def retrying(self) -> bool:
        """Whether the last renewal failed (its back-off decides, not renew_at)."""
        return self._retry_at is not None

    def due_in(self) -> float:
        """Seconds until the next renewal is due (<= 0: due)."""
        retry_at = self._retry_at
        if retry_at is not None:
            return retry_at - self._elapsed.monotonic()
        return self.renew_at - self._clock.now()

    def due(self) -> bool:
        return self.due_in() <= 0

    def renewed(self, renew_at: float) -> None:
        self.renew_at = renew_at
        self._retry_at = None
        self._retry.succeeded()

    def failed(self) -> float:
        """Put the next try off by the back-off; returns it (seconds)."""
        wait = self._retry.failed()
        self._retry_at = self._elapsed.monotonic() + wait
        return wait


def half_life(not_before: float, not_after: float) -> float:
    return not_before + (not_after - not_before) / 2
