"""Which refusals go on the audit record: each caller's first ones, then a trickle.

    budget = RefusalBudget("oauth", rate=1.0, burst=20, clock=clock, dropped=counter.inc)
    if budget.on_record(address_key(host)):
        ...  # write the refusal's audit event
    # else: it was counted (dropped()), and logged at most once per window

Why: a refusal is written for a caller nobody has authenticated yet (a bad assertion, a
guessed join token). Without a bound, whoever reaches the listener writes audit rows as fast
as it can send requests, and the log grows until retention catches up. With one, each caller's
first `burst` refusals (then `rate` per second) are on record, so an operator sees who is
attacking; the rest only move a metric, and a log line once per `window` says that refusals
are being left off the record, and for which source. Grants and other decisions that let
something out are never asked about: only refusals spend the budget.

The one exception is what an agent says its workloads accepted (ReportValidations, ok=True):
not a decision of this server, and a compromised agent can forge such reports as fast as
refusals. They spend a budget of their own (`kind` names them in the log line), generous,
since an honest agent reports each token, caller and audience only once while it is valid.
"""

from __future__ import annotations

import logging
import threading
from collections.abc import Callable

from server.log_throttle import LogThrottle
from server.ratelimit import KeyedLimiter
from svid._clock import Clock

_log = logging.getLogger("svid.server.audit")
LOG_WINDOW = 60.0


class RefusalBudget:
    """Per key, whether a refusal is written to the audit log (see the module)."""

    def __init__(
        self,
        source: str,
        *,
        rate: float,
        burst: int,
        clock: Clock,
        dropped: Callable[[], None] = lambda: None,
        window: float = LOG_WINDOW,
        kind: str = "refusals",
    ) -> None:
        """`source` names the refusals in the log line (`kind`: what they are); `dropped`
        counts one left off the record (a metric); a `rate` of 0 keeps every one on record."""
        self._source = source
        self._message = (
            f"{kind} past their caller's budget are counted, not written to the audit log"
        )
        self._limiter = KeyedLimiter(rate, burst, clock)
        self._dropped = dropped
        self._lock = threading.Lock()
        self._lines = LogThrottle(window, clock)

    def on_record(self, key: str) -> bool:
        """True if this refusal of `key` is to be written; False (counted, maybe logged) if
        `key` spent its budget."""
        if self._limiter.try_take(key):
            return True
        self._dropped()
        with self._lock:
            count = self._lines.due()
        if not count:
            return False
        _log.warning(
            self._message,
            extra={"source": self._source, "caller": key, "dropped": count},
        )
        return False
