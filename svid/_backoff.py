"""The one reconnect backoff of svid and its agent: capped exponential, with full jitter, so that
the many clients that lost one server (or agent) at once do not come back at once."""

from __future__ import annotations

import random


def backoff_delay(attempt: int, low: float, high: float, rand: random.Random) -> float:
    """Retry ``attempt`` (0 for the first) waits uniformly in [0, min(high, low * 2**attempt)]."""
    ceiling = min(high, low * 2.0 ** min(attempt, 62))
    return rand.uniform(0.0, ceiling)
