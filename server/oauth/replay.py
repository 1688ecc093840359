"""Replay refusal for assertions: each (issuer, jti) accepted once, by every server sharing the
datastore.

Two lines, so that refusing a replay costs no commit of its own:
- the authority is the datastore: the claim of an assertion's jti is written in the same
  ledger transaction as the token issued for it (AuditStore.write_ledger's `jtis`), so a token
  never leaves with its assertion unclaimed, and no claim is kept without the token's record;
  a write that meets a held jti keeps nothing (JtiHeldError);
- in front of it, `ReplayGuard` remembers in memory what this server accepted (or is
  accepting) until it expires: a replay to the same server, or two copies of one assertion
  racing through it, is refused before any work. Only a replay through another server sharing
  the database gets as far as the ledger write, which refuses it there.
"""

from __future__ import annotations

import threading

from server.datastore.base import JtiClaim

# Bounds the memory of the first line (about 200 bytes each). Past it the oldest are
# forgotten: the datastore still refuses their replays, the first line only saves work.
MAX_REMEMBERED = 500_000


class ReplayGuard:
    def __init__(self, limit: int = MAX_REMEMBERED) -> None:
        self._limit = limit
        self._held: dict[tuple[str, str], int] = {}
        self._lock = threading.Lock()

    def reserve(self, claim: JtiClaim, now: int) -> bool:
        """True when (issuer, jti) is not held by this server at `now` (and now is, until
        the claim's expires_at); False for a replay."""
        key = (claim.issuer, claim.jti)
        with self._lock:
            expires_at = self._held.get(key)
            if expires_at is not None and expires_at > now:
                return False
            if len(self._held) >= self._limit:
                self._forget(now)
            self._held[key] = claim.expires_at
            return True

    def release(self, claim: JtiClaim) -> None:
        """The claim was not recorded (the ledger failed): the assertion may be presented
        again."""
        with self._lock:
            if self._held.get((claim.issuer, claim.jti)) == claim.expires_at:
                del self._held[(claim.issuer, claim.jti)]

    def prune(self, now: int) -> int:
        """Forget claims past their expiry; returns how many went."""
        with self._lock:
            return self._prune(now)

    def __len__(self) -> int:
        return len(self._held)

    def _prune(self, now: int) -> int:
        expired = [key for key, expires_at in self._held.items() if expires_at <= now]
        for key in expired:
            del self._held[key]
        return len(expired)

    def _forget(self, now: int) -> None:
        if self._prune(now) == 0:
            # Still full of live claims: drop the oldest tenth (dicts keep insertion order).
            for key in list(self._held)[: max(1, self._limit // 10)]:
                del self._held[key]
