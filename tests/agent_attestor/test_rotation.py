"""Rotation decisions (pure) and the Rotator against a fake signer over a real CA."""

from __future__ import annotations

import asyncio
import time

import pytest

from agent_attestor.cache import Cache, SyncState
from agent_attestor.model import Entry, Selector
from agent_attestor.rotation import JITTER, MAX_BATCH, Rotator, jitter_for, should_rotate
from svid._clock import FakeClock
from tests.agent_attestor.pki import FakeSigner, LocalCa

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


def _setup(n: int = 1) -> tuple[FakeClock, Cache, FakeSigner, Rotator]:
    clock = FakeClock(start=time.time())
    ca = LocalCa(clock)
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


def test_renewal_happens_within_jitter_of_half_life_and_never_leaves_a_gap() -> None:
    clock, cache, _, rot = _setup()
    asyncio.run(rot.tick())
    svid = cache.svids()["e0"]
    # Life counts from arrival: NotBefore is back-dated, and that part was never usable here.
    assert svid.life_start > svid.not_before
    life = svid.not_after - svid.life_start
    assert -JITTER <= jitter_for(svid) <= JITTER
    fraction = 0.0
    while cache.svids()["e0"] is svid:
        clock.advance(1)
        asyncio.run(rot.tick())
        fraction = (clock.now() - svid.life_start) / life
    assert 0.4 <= fraction <= 0.6 + 1 / life
    assert cache.svids()["e0"].not_before <= clock.now() < svid.not_after


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
