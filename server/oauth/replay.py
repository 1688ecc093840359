"""Replay refusal for assertions: each (issuer, jti) accepted once, by every server sharing the
datastore. Concurrent requests share one transaction (and one fsync): the first to arrive while
no commit runs commits every claim waiting by then, as the audit log batches its appends."""

from __future__ import annotations

import threading
from collections.abc import Callable, Sequence

from server.datastore.base import JtiClaim

ClaimBatch = Callable[[Sequence[JtiClaim], int], list[bool]]


class _Waiter:
    __slots__ = ("claim", "done", "error", "fresh")

    def __init__(self, claim: JtiClaim) -> None:
        self.claim = claim
        self.done = False
        self.fresh = False
        self.error: BaseException | None = None


class JtiClaims:
    def __init__(self, claim_batch: ClaimBatch) -> None:
        self._claim_batch = claim_batch
        self._pending: list[_Waiter] = []
        self._queue_lock = threading.Lock()
        self._commit_lock = threading.Lock()

    def claim(self, issuer: str, jti: str, expires_at: int, now: int) -> bool:
        """True when (issuer, jti) was not accepted before (and now is, durably)."""
        mine = _Waiter(JtiClaim(issuer, jti, expires_at))
        with self._queue_lock:
            self._pending.append(mine)
        with self._commit_lock:
            if not mine.done:
                with self._queue_lock:
                    batch, self._pending = self._pending, []
                try:
                    results = self._claim_batch([w.claim for w in batch], now)
                except BaseException as exc:
                    for waiter in batch:
                        waiter.done, waiter.error = True, exc
                else:
                    for waiter, fresh in zip(batch, results, strict=True):
                        waiter.done, waiter.fresh = True, fresh
        if mine.error is not None:
            raise mine.error
        return mine.fresh
