"""Which successful validations were reported already: each remembered until its token expires.

A workload that validates the same token again and again (a server checking a client's token
on every request) would otherwise have every call reported, and written to the server's audit
log: one row a call, without bound. A repeat says nothing the first report did not (the same
token, caller and audience; only the time differs), so it is counted instead of reported,
until the token can no longer be validated. Refusals never come here: the server budgets them.

The memory is bounded: what it holds are digests of the reported fields (a claim may be 2 KiB,
a digest is 16 bytes). Full, it forgets what has expired, and then its oldest entries: a
forgotten validation is reported again, never lost.
"""

from __future__ import annotations

import hashlib
from collections.abc import Sequence
from itertools import islice

from svid._clock import Clock

MAX_REMEMBERED = 100_000
# Once full with nothing expired, this share of the oldest entries goes at once, so that a full
# memory is swept once per this many new validations rather than on every one.
_EVICT_SHARE = 8


def report_key(subject: str, audience: Sequence[str], jti: str, txn: str, caller_id: str) -> bytes:
    """The digest of what a report says but its time (repr keeps the fields apart)."""
    fields = (subject, tuple(audience), jti, txn, caller_id)
    return hashlib.blake2b(repr(fields).encode(), digest_size=16).digest()


class ReportedValidations:
    def __init__(self, clock: Clock, max_size: int = MAX_REMEMBERED) -> None:
        self._clock = clock
        self._max_size = max_size
        self._until: dict[bytes, float] = {}

    def __len__(self) -> int:
        return len(self._until)

    def first(self, key: bytes, until: float) -> bool:
        """True the first time `key` is seen (remembered until `until`, when its token can no
        longer be validated); False for a repeat before then."""
        now = self._clock.now()
        known = self._until.get(key)
        if known is not None and now <= known:
            return False
        if until < now:
            return True  # nothing to remember: any later validation of it is refused
        if known is not None:
            del self._until[key]  # expired: remembered again as the newest
        elif len(self._until) >= self._max_size:
            self._make_room(now)
        self._until[key] = until
        return True

    def _make_room(self, now: float) -> None:
        self._until = {k: t for k, t in self._until.items() if t >= now}
        keep = self._max_size - max(1, self._max_size // _EVICT_SHARE)
        for key in list(islice(self._until, max(0, len(self._until) - keep))):
            del self._until[key]
