"""Token buckets on a fake clock."""

from __future__ import annotations

from svid._clock import FakeClock
from svid._ratelimit import KeyedLimiter, TokenBucket


def test_bucket_refills_at_rate() -> None:
    clock = FakeClock()
    bucket = TokenBucket(rate=2, burst=4, clock=clock)
    assert all(bucket.try_take() for _ in range(4))
    assert not bucket.try_take()
    clock.advance(0.5)
    assert bucket.try_take()
    assert not bucket.try_take()
    clock.advance(10)
    assert sum(bucket.try_take() for _ in range(10)) == 4


def test_cost_larger_than_burst_passes_on_a_full_bucket_and_is_charged_in_full() -> None:
    clock = FakeClock()
    bucket = TokenBucket(rate=10, burst=5, clock=clock)
    assert bucket.try_take(50)
    assert not bucket.try_take(50)
    clock.advance(0.5)  # a burst's worth of time: the bucket at -40
    assert not bucket.try_take(50)
    assert not bucket.try_take()
    clock.advance(3.9)  # 1 still owed
    assert not bucket.try_take()
    clock.advance(0.2)  # paid back, and one more
    assert bucket.try_take()
    clock.advance(5)
    assert bucket.try_take(50)


def test_zero_rate_is_unlimited() -> None:
    limiter = KeyedLimiter(0, 1, FakeClock())
    assert all(limiter.try_take("a", 1000) for _ in range(100))


def test_keys_are_independent_and_bounded() -> None:
    clock = FakeClock()
    limiter = KeyedLimiter(1, 1, clock, max_keys=2)
    assert limiter.try_take("a")
    assert not limiter.try_take("a")
    assert limiter.try_take("b")
    assert limiter.try_take("c")  # evicts "a", the least recently used
    assert limiter.try_take("a")


def test_buckets_refilled_since_their_last_use_are_forgotten() -> None:
    # The agent keys buckets by uid: what it holds follows the uids active, not all ever seen.
    clock = FakeClock()
    limiter = KeyedLimiter(10, 20, clock)
    for key in range(1000):
        assert limiter.try_take(str(key), 5)
    assert len(limiter) == 1000
    clock.advance(0.4)  # 4 of the 5 tokens taken are back: none is full yet
    assert limiter.try_take("new", 5)
    assert len(limiter) == 1001
    clock.advance(0.1)
    assert limiter.try_take("newer")
    assert len(limiter) == 2  # "new" took 5 tokens 0.1 s ago: 1 is back
    assert sum(limiter.try_take("new") for _ in range(30)) == 16  # its bucket was kept


def test_a_bucket_in_debt_is_not_forgotten_before_it_is_paid_back() -> None:
    # A new bucket starts full: forgetting one still owing a batch's cost would forgive it.
    clock = FakeClock()
    limiter = KeyedLimiter(1, 3, clock)
    assert limiter.try_take("agent", 50)
    clock.advance(10)
    assert limiter.try_take("other")  # forgets only buckets refilled since their last use
    assert len(limiter) == 2
    assert not limiter.try_take("agent")
    clock.advance(40)  # 50 s in all: the 50 paid back, and the burst refilled
    assert limiter.try_take("newer")
    assert len(limiter) == 1
    assert limiter.try_take("agent", 50)
