"""Rotation decisions (pure) and the Rotator against a fake signer over a real CA."""

from __future__ import annotations

import asyncio
import time

import pytest
from hypothesis import given
from hypothesis import strategies as st

from agent_attestor.cache import Cache, SyncState
from agent_attestor.model import Entry, Selector
from agent_attestor.rotation import (
    JITTER,
    MAX_BATCH,
    Rotator,
    jitter_for,
    renewal_due,
    rotation_point,
    should_rotate,
)
from agent_attestor.signer import X509Result
from svid._clock import FakeClock
from tests.agent_attestor.pki import FakeSigner, LocalCa
from tests.clocks import SteppedClock

SEL = frozenset({Selector("unix", "uid:1")})


@pytest.mark.parametrize(
    ("now", "jitter", "expected"),
    [
        (149.9, 0.0, False),
        (150.0, 0.0, True),
        (119.9, -0.1, False),
        (120.0, -0.1, True),
        (179.9, 0.1, False),
        (180.0, 0.1, True),
        (120.0, -0.5, True),  # jitter is clamped to ±10 %
        (119.0, -0.5, False),
    ],
)
def test_should_rotate_at_half_life_with_jitter(now: float, jitter: float, expected: bool) -> None:
    assert should_rotate(now, 0.0, 300.0, jitter) is expected


@given(
    ttl=st.integers(min_value=30, max_value=86400),
    backdate=st.floats(min_value=0, max_value=10),
    lag=st.floats(min_value=0, max_value=1),
    jitter=st.floats(min_value=-1, max_value=1),
)
def test_rotation_point_is_within_40_to_60_percent_of_the_certificate_span(
    ttl: int, backdate: float, lag: float, jitter: float
) -> None:
    # Measured as SPIRE and clients measure it: on the certificate's own NotBefore -> NotAfter,
    # back-dated part included; and never at or before the SVID arrived (that would loop).
    issued = 1_700_000_000.0
    not_before, not_after = issued - backdate, issued + ttl
    arrived = issued + lag
    point = rotation_point(not_before, not_after, jitter, arrived=arrived)
    fraction = (point - not_before) / (not_after - not_before)
    assert 0.4 - 1e-6 <= fraction <= 0.6 + 1e-6  # float rounding at Unix-time magnitudes
    assert point > arrived


@pytest.mark.parametrize("ttl", [1, 4, 10])
def test_rotation_point_of_a_ttl_shorter_than_the_backdate_still_lies_ahead(ttl: int) -> None:
    # 10 s back-dating is most of such a span: renewing at 0.4 of it would be due on arrival.
    point = rotation_point(0.0, 10.0 + ttl, -JITTER, arrived=10.0)
    assert 10.0 < point < 10.0 + ttl


def _setup(n: int = 1, ttl: int = 300) -> tuple[FakeClock, Cache, FakeSigner, Rotator]:
    clock = FakeClock(start=time.time())
    ca = LocalCa(clock, ttl=ttl)
    signer = FakeSigner(ca)
    cache = Cache()
    entries = []
    for i in range(n):
        entries.append(Entry(id=f"e{i}", spiffe_id=f"spiffe://example.org/w{i}", selectors=SEL))
        signer.spiffe_ids[f"e{i}"] = f"spiffe://example.org/w{i}"
    cache.apply_sync(SyncState(entries=tuple(entries), bundle=ca.bundle()))
    return clock, cache, signer, Rotator(cache, signer, clock, retry_min=1, retry_max=8)


def test_new_entries_get_svids_in_batches_of_at_most_500() -> None:
    _, cache, signer, rot = _setup(MAX_BATCH + 3)
    asyncio.run(rot.tick())
    assert signer.batches == [MAX_BATCH, 3]
    assert len(cache.svids()) == MAX_BATCH + 3


@pytest.mark.parametrize("ttl", [30, 300, 3600])
def test_renewal_happens_within_jitter_of_half_life_and_never_leaves_a_gap(ttl: int) -> None:
    # Twenty entries: twenty jitters, so the whole ±10 % band is exercised in every run.
    clock, cache, _, rot = _setup(20, ttl=ttl)
    asyncio.run(rot.tick())
    first = cache.svids()
    step = ttl / 200
    renewed: dict[str, float] = {}
    while len(renewed) < len(first):
        clock.advance(step)
        asyncio.run(rot.tick())
        now = clock.now()
        for eid, svid in cache.svids().items():
            old = first[eid]
            if svid is not old and eid not in renewed:
                assert svid.not_before <= now < old.not_after  # no gap
                # The certificate's own span, back-dated NotBefore included (the test CA
                # back-dates 10 s), as SPIRE and clients measure it.
                renewed[eid] = (now - old.not_before) / (old.not_after - old.not_before)
    assert all(-JITTER <= jitter_for(s) <= JITTER for s in first.values())
    assert min(renewed.values()) >= 0.4
    assert max(renewed.values()) <= 0.6 + step / (ttl + 10)


def test_server_down_keeps_svids_until_expiry_then_backs_off_and_recovers() -> None:
    clock, cache, signer, rot = _setup()
    asyncio.run(rot.tick())
    old = cache.svids()["e0"]
    signer.fail = True
    clock.set(old.not_before + (old.not_after - old.not_before) * 0.7)
    delays = [asyncio.run(rot.tick()) for _ in range(5)]
    assert delays == [1, 2, 4, 8, 8]
    assert cache.svids()["e0"] is old  # still served
    clock.set(old.not_after)
    asyncio.run(rot.tick())
    assert "e0" not in cache.svids()  # expired SVIDs are never served
    signer.fail = False
    asyncio.run(rot.tick())
    assert cache.svids()["e0"].not_after > clock.now()


def test_changed_entry_gets_a_new_svid_and_refused_entries_are_skipped() -> None:
    _, cache, signer, rot = _setup(2)
    del signer.spiffe_ids["e1"]
    asyncio.run(rot.tick())
    assert set(cache.svids()) == {"e0"}
    entries = cache.entries()
    changed = Entry(id="e0", spiffe_id="spiffe://example.org/moved", selectors=SEL)
    signer.spiffe_ids["e0"] = changed.spiffe_id
    cache.apply_sync(
        SyncState(entries=(changed, entries["e1"]), bundle=cache.snapshot().bundle)  # type: ignore[arg-type]
    )
    assert "e0" not in cache.svids()
    asyncio.run(rot.tick())
    assert cache.svids()["e0"].spiffe_id == "spiffe://example.org/moved"


def test_run_loop_issues_when_an_entry_appears() -> None:
    _clock, cache, signer, rot = _setup(0)

    async def scenario() -> None:
        task = asyncio.create_task(rot.run())
        await asyncio.sleep(0.05)
        signer.spiffe_ids["n"] = "spiffe://example.org/n"
        cache.apply_sync(
            SyncState(
                entries=(Entry(id="n", spiffe_id="spiffe://example.org/n", selectors=SEL),),
                bundle=signer.ca.bundle(),
            )
        )
        for _ in range(200):
            if "n" in cache.svids():
                break
            await asyncio.sleep(0.01)
        task.cancel()

    asyncio.run(scenario())
    assert "n" in cache.svids()


def test_an_agent_clock_ahead_by_more_than_the_ttl_does_not_mint_in_a_busy_loop() -> None:
    # Every SVID arrives expired on an agent clock stepped (or skewed) ahead by more than the
    # TTL: minted again at once, it came back expired again, and the rotator asked the server
    # for a new one on every tick with no pause (a key, a CSR, a signature and a ledger row
    # each) until its rate limit refused.
    server_clock, cache, signer, _ = _setup(ttl=300)
    clock = SteppedClock(server_clock, 310.0)
    rot = Rotator(cache, signer, clock, retry_min=1, retry_max=8)
    delays = []
    for _ in range(5):
        delays.append(asyncio.run(rot.tick()))
        assert asyncio.run(rot.tick()) == delays[-1]  # not asked again before the back-off
        server_clock.advance(delays[-1])
    assert delays == [1, 2, 4, 8, 8]  # backing off, as while the server is away
    assert len(signer.batches) == 5  # one ask per back-off
    assert "e0" not in cache.svids()  # never served expired
    clock.offset = 0.0  # NTP puts the clock right (a step back): the next ask, due, recovers
    asyncio.run(rot.tick())
    assert cache.svids()["e0"].not_after > clock.now()


def test_a_refused_entry_is_asked_for_again_after_its_wait_whatever_the_wall_clock_does() -> None:
    # The next ask was due at a wall-clock time: a step back of the agent's clock after the
    # refusal put it off by the step, an entitlement granted meanwhile unused for an hour.
    server_clock, cache, signer, _ = _setup(2)
    clock = SteppedClock(server_clock)
    rot = Rotator(cache, signer, clock, retry_min=1, retry_max=8)
    del signer.spiffe_ids["e1"]
    asyncio.run(rot.tick())
    assert set(cache.svids()) == {"e0"}
    signer.spiffe_ids["e1"] = "spiffe://example.org/w1"  # the server grants it now
    clock.offset = -3600.0  # NTP steps the agent's clock back an hour
    server_clock.advance(7)
    assert asyncio.run(rot.tick()) == pytest.approx(1)
    assert "e1" not in cache.svids()  # not asked on every tick: the server decided
    server_clock.advance(1)
    asyncio.run(rot.tick())
    assert "e1" in cache.svids()


def test_an_svid_expired_on_arrival_backs_off_its_entry_alone_the_others_renew_on_time() -> None:
    # An agent clock 20 s ahead of the server's and one entry with a 5 s TTL: each of that
    # entry's SVIDs arrives expired. The back-off it calls for held the whole rotator up to
    # 8 s (retry_max), and another entry's renewal falling due meanwhile waited it out.
    server_clock, cache, signer, _ = _setup(2)
    clock = SteppedClock(server_clock, 20.0)
    signer.ttls["e1"] = 5
    rot = Rotator(cache, signer, clock, retry_min=1, retry_max=8)
    delay = asyncio.run(rot.tick())
    first = cache.svids()["e0"]
    assert "e1" not in cache.svids()  # never served expired
    due = renewal_due(first)
    while cache.svids()["e0"] is first:
        assert delay is not None
        server_clock.advance(delay)
        delay = asyncio.run(rot.tick())
    assert clock.now() - due < 0.01  # renewed when due, not after e1's back-off
    # e1 backed off meanwhile (1, 2, 4, then 8 s apart), not asked for on every tick
    e1_asks = sum("e1" in batch for batch in signer.requested)
    assert e1_asks <= 4 + (clock.now() - first.received_at) / 8 + 1


def test_an_entry_removed_while_its_svid_is_minted_leaves_no_retry_behind(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    # Task entries come and go on an agent whose clock is ahead of the server's by more than
    # the TTL: an entry removed while its mint was out had its back-off noted after _forget
    # dropped it, kept for ever, one per task, and its retry woke the rotator for nothing.
    server_clock, cache, signer, _ = _setup(1, ttl=300)
    clock = SteppedClock(server_clock, 310.0)
    rot = Rotator(cache, signer, clock, retry_min=1, retry_max=8)
    minted = signer.batch_new_x509

    async def removed_meanwhile(params: list[tuple[str, bytes]]) -> list[X509Result]:
        out = await minted(params)
        cache.update_entries((), [eid for eid, _ in params])  # the task ended
        return out

    monkeypatch.setattr(signer, "batch_new_x509", removed_meanwhile)
    asyncio.run(rot.tick())
    assert rot.next_due_in() is None  # nothing held, nothing to ask for
    assert not rot._late
