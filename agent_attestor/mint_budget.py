"""How fast each uid may have JWT-SVIDs minted for it (tokens not in the agent's cache).

The server signs at most `jwt_rate_per_agent` (500) JWT-SVIDs a second for a whole agent and
refuses the rest. Without a share per caller, one local workload asking for ever-new audiences
(each a cache miss, each a mint) spends its node's whole budget, and every other workload's
first token is refused or slow. Each uid gets a token bucket well under the server's limit; a
token already cached costs nothing and is never refused.

Used from the event loop only (the gRPC handlers).
"""

from __future__ import annotations

import logging

from svid._clock import Clock
from svid._log_throttle import LogThrottle
from svid._ratelimit import KeyedLimiter

log = logging.getLogger(__name__)

MINTS_PER_UID_RATE = 100.0  # a fifth of the server's default per-agent rate (500/s)
MINTS_PER_UID_BURST = 200  # a fifth of the server's default per-agent burst (1,000)
REFUSAL_LOG_INTERVAL = 60.0  # seconds between log lines, whoever was refused


class MintBudget:
    def __init__(
        self, clock: Clock, rate: float = MINTS_PER_UID_RATE, burst: int = MINTS_PER_UID_BURST
    ) -> None:
        if rate < 0:
            raise ValueError("rate must not be negative")
        if burst < 1:
            raise ValueError("burst must be positive")
        self.rate = rate
        self.burst = burst
        self._limiter = KeyedLimiter(rate, burst, clock)
        self._refusals = LogThrottle(REFUSAL_LOG_INTERVAL, clock)

    def take(self, uid: int) -> str | None:
        """Count one mint for `uid` and return None, or say why it may not have one now."""
        if self._limiter.try_take(str(uid)):
            return None
        count = self._refusals.due()
        if count:
            log.warning(
                "refused JWT-SVID mints of a uid past its rate",
                extra={"uid": uid, "rate": self.rate, "burst": self.burst, "refused": count},
            )
        return (
            f"uid {uid} is past its JWT-SVID minting rate ({self.rate:g} new tokens a second, "
            f"{self.burst} at once: jwt_mints_per_uid_rate, jwt_mints_per_uid_burst); tokens "
            "already issued are still served, retry later for a new one"
        )
