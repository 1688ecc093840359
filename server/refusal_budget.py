"""Which refusals go on the audit record: each caller's first ones, then a trickle.

    budget = RefusalBudget("oauth", rate=1.0, burst=20, clock=clock, dropped=counter.inc)
    if budget.on_record(address_key(host)):
        ...  # write the refusal's audit event
    # else: it was counted (dropped()), and logged at most once per window

Why: a refusal is written for a caller nobody has authenticated yet (a bad assertion, a
guessed join token). Without a bound, whoever reaches the listener writes audit rows as fast
as it can send requests, and the log grows until retention catches up. With one, each caller's
first `burst` refusals (then `rate` per second) are on record, so an operator sees who is
attacking; the rest move a metric, a log line once per `window` says that refusals are being
left off the record, and for which source, and the server writes one audit event a minute per
source (`take_unrecorded`) counting those it left off and naming the callers that left the
most: the log still accounts for every refusal, in a bounded number of rows. Grants and other
decisions that let something out are never asked about: only refusals spend the budget.

The one exception is what an agent says its workloads accepted (ReportValidations, ok=True):
not a decision of this server, and a compromised agent can forge such reports as fast as
refusals. They spend a budget of their own (`kind` names them in the log line), generous,
since an honest agent reports each token, caller and audience only once while it is valid.
"""

from __future__ import annotations

import logging
import threading
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field

from server.audit.event import EventDraft
from svid._clock import Clock
from svid._log_throttle import LogThrottle
from svid._ratelimit import KeyedLimiter

_log = logging.getLogger("svid.server.audit")
LOG_WINDOW = 60.0
UNRECORDED_KIND = "refusals_unrecorded"
# Callers counted one by one in a tally: past this many, the rest are counted together (a
# caller cycling addresses must not grow the server's memory or the event).
MAX_TALLIED_CALLERS = 1024
TOP_CALLERS = 5  # named in the event, with their counts


@dataclass(frozen=True, slots=True)
class Unrecorded:
    """What a budget left off the record since the last tally."""

    source: str
    kind: str
    count: int
    callers: int  # distinct callers, counted up to MAX_TALLIED_CALLERS
    more_callers: bool  # more callers than that: the rest share `others`
    top: tuple[tuple[str, int], ...]  # the callers that left the most, most first
    since: float  # wall clock of the first one left off
    until: float  # of the tally
    # Every caller's count and the rest's, for `RefusalBudget.restore` (not in the event).
    tally: Mapping[str, int] = field(default_factory=dict, repr=False)
    others: int = 0

    def draft(self) -> EventDraft:
        return EventDraft(
            kind=UNRECORDED_KIND,
            decision="not_recorded",
            reason=f"{self.kind} past their caller's budget, counted, not written one by one",
            extra={
                "source": self.source,
                "count": self.count,
                "callers": self.callers,
                "more_callers": self.more_callers,
                "top": [{"caller": key, "count": n} for key, n in self.top],
                "since": round(self.since, 3),
                "until": round(self.until, 3),
            },
        )


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
        self._kind = kind
        self._clock = clock
        self._tally: dict[str, int] = {}
        self._others = 0  # left off by callers past MAX_TALLIED_CALLERS
        self._since: float | None = None
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
            if self._since is None:
                self._since = self._clock.now()
            self._count(key, 1)
            count = self._lines.due()
        if not count:
            return False
        _log.warning(
            self._message,
            extra={"source": self._source, "caller": key, "dropped": count},
        )
        return False

    def restore(self, lost: Unrecorded) -> None:
        """Put back a tally taken whose audit event was not written (the datastore failed):
        the next tally counts its refusals too, so the log still accounts for every one."""
        with self._lock:
            if self._since is None or lost.since < self._since:
                self._since = lost.since
            for key, count in lost.tally.items():
                self._count(key, count)
            self._others += lost.others

    def _count(self, key: str, count: int) -> None:
        if key in self._tally or len(self._tally) < MAX_TALLIED_CALLERS:
            self._tally[key] = self._tally.get(key, 0) + count
        else:
            self._others += count

    def take_unrecorded(self) -> Unrecorded | None:
        """What was left off the record since the last call (None: nothing), and start anew."""
        with self._lock:
            if self._since is None:
                return None
            tally, others, since = self._tally, self._others, self._since
            self._tally, self._others, self._since = {}, 0, None
        top = sorted(tally.items(), key=lambda item: (-item[1], item[0]))[:TOP_CALLERS]
        return Unrecorded(
            source=self._source,
            kind=self._kind,
            count=sum(tally.values()) + others,
            callers=len(tally),
            more_callers=others > 0,
            top=tuple(top),
            since=since,
            until=self._clock.now(),
            tally=tally,
            others=others,
        )
