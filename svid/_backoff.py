"""The one reconnect backoff of svid and its agent: capped exponential, with full jitter, so that
the many clients that lost one server (or agent) at once do not come back at once."""

from __future__ import annotations

import random
from dataclasses import dataclass


def backoff_ceiling(attempt: int, low: float, high: float) -> float:
    """The longest wait of retry ``attempt`` (0 for the first): min(high, low * 2**attempt)."""
    return min(high, low * 2.0 ** min(attempt, 62))


def backoff_delay(attempt: int, low: float, high: float, rand: random.Random) -> float:
    """Retry ``attempt`` (0 for the first) waits uniformly in [0, backoff_ceiling]."""
    return rand.uniform(0.0, backoff_ceiling(attempt, low, high))


class Retry:
    """The wait before the next try of one job that keeps failing (a rotation, a renewal):
    ``first`` after a failure, doubled after each further one, at most ``cap``; none once it
    succeeds. Without it a job whose deadline stays due is retried as fast as its loop turns."""

    def __init__(self, first: float, cap: float) -> None:
        self._first = first
        self._cap = cap
        self.wait: float | None = None

    def failed(self) -> float:
        self.wait = self._first if self.wait is None else min(self._cap, self.wait * 2)
        return self.wait

    def succeeded(self) -> None:
        self.wait = None


@dataclass(frozen=True, slots=True)
class Backoff:
    """Reconnect delays: retry n (0 for the first) waits a random time up to
    min(``cap``, ``initial`` * 2**n). The jitter keeps the workloads of an agent that restarted
    from coming back all at once."""

    initial: float = 0.2
    cap: float = 30.0

    def delay(self, attempt: int, rand: random.Random) -> float:
        return backoff_delay(attempt, self.initial, self.cap, rand)
