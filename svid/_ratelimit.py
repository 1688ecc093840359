"""Token buckets on an injectable clock, one per caller."""

from __future__ import annotations

import threading
from collections import OrderedDict

from svid._clock import Clock


class TokenBucket:
    """`rate` tokens per second up to `burst`; a rate of 0 means unlimited."""

    def __init__(self, rate: float, burst: int, clock: Clock) -> None:
        self._rate = rate
        self._burst = float(max(burst, 1))
        self._clock = clock
        self._tokens = self._burst
        self._stamp = clock.monotonic()

    def try_take(self, cost: float = 1.0) -> bool:
        if self._rate <= 0:
            return True
        now = self._clock.monotonic()
        self._tokens = min(self._burst, self._tokens + (now - self._stamp) * self._rate)
        self._stamp = now
        # A single request bigger than the burst could never pass; let it through on a full
        # bucket, but charge all of it: the bucket goes below zero and the next call waits until
        # the rate has paid the whole cost back (charging only the burst let one batch of
        # MAX_BATCH through every burst / rate seconds).
        if self._tokens < min(cost, self._burst):
            return False
        self._tokens -= cost
        return True

    def full(self) -> bool:
        """Refilled to its burst by now: no different from a new bucket (one in debt from a
        cost above its burst is not, until the debt is paid)."""
        elapsed = self._clock.monotonic() - self._stamp
        return self._tokens + elapsed * self._rate >= self._burst


class KeyedLimiter:
    """One bucket per key (agent ID, peer host); the least recently used keys are forgotten."""

    def __init__(self, rate: float, burst: int, clock: Clock, max_keys: int = 10_000) -> None:
        self._rate = rate
        self._burst = burst
        self._clock = clock
        self._max_keys = max_keys
        self._buckets: OrderedDict[str, TokenBucket] = OrderedDict()
        self._lock = threading.Lock()

    def __len__(self) -> int:
        """How many keys' buckets are held."""
        return len(self._buckets)

    def try_take(self, key: str, cost: float = 1.0) -> bool:
        if self._rate <= 0:
            return True
        with self._lock:
            bucket = self._buckets.get(key)
            if bucket is None:
                # Buckets refilled since their last use are forgotten (a new one starts full:
                # nothing changes), so those held are the keys of the last few seconds (their
                # burst over their rate), not every key ever seen up to max_keys.
                buckets = self._buckets
                while buckets and next(iter(buckets.values())).full():
                    buckets.popitem(last=False)
                bucket = TokenBucket(self._rate, self._burst, self._clock)
                buckets[key] = bucket
                if len(self._buckets) > self._max_keys:
                    self._buckets.popitem(last=False)
            else:
                self._buckets.move_to_end(key)
            return bucket.try_take(cost)
