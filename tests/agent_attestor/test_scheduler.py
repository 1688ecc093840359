"""The rotation schedule: a due-time heap, renewal points computed once, capped (lazy) SVIDs."""

from __future__ import annotations

import asyncio
import time

import pytest
from hypothesis import given
from hypothesis import strategies as st

from agent_attestor import rotation
from agent_attestor.cache import Cache, SyncState
from agent_attestor.model import Entry, IssuedSvid, Selector
from agent_attestor.rotation import Rotator
from agent_attestor.schedule import DueHeap
from agent_attestor.signer import X509Result
from svid._clock import FakeClock
from tests.agent_attestor.pki import FakeSigner, LocalCa

keys = st.sampled_from("abcdefgh")
heap_ops = st.lists(
    st.one_of(
        st.tuples(st.just("set"), keys, st.integers(0, 20)),
        st.tuples(st.just("discard"), keys, st.just(0)),
        st.tuples(st.just("pop"), st.just(""), st.integers(0, 20)),
    ),
    max_size=60,
)


@given(ops=heap_ops)
def test_due_heap_behaves_like_a_dict_of_due_times(ops: list[tuple[str, str, int]]) -> None:
    heap, model = DueHeap(), {}
    for op, key, when in ops:
        if op == "set":
            heap.set(key, when)
            model[key] = when
        elif op == "discard":
            heap.discard(key)
            model.pop(key, None)
        else:
            due = sorted((d, k) for k, d in model.items() if d <= when)
            assert heap.pop_due(when) == [k for _, k in due]  # earliest first
            for _, k in due:
                del model[k]
        assert len(heap) == len(model)
        assert heap.next_due() == (min(model.values()) if model else None)


def _selectors(i: int) -> frozenset[Selector]:
    return frozenset({Selector("unix", f"uid:{i}")})


def _setup(n: int, cap: int = 0) -> tuple[FakeClock, Cache, FakeSigner, Rotator]:
    clock = FakeClock(start=time.time())
    ca = LocalCa(clock)
    signer = FakeSigner(ca)
    cache = Cache()
    rot = Rotator(cache, signer, clock, retry_min=1, retry_max=8, max_prefetched=cap)
    entries = []
    for i in range(n):
        entries.append(Entry(f"e{i}", f"spiffe://example.org/w{i}", _selectors(i), created_at=i))
        signer.spiffe_ids[f"e{i}"] = f"spiffe://example.org/w{i}"
    cache.apply_sync(SyncState(entries=tuple(entries), bundle=ca.bundle()))
    return clock, cache, signer, rot


def test_renewal_points_are_computed_once_per_svid_not_on_every_tick(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    # Issue 13: the old scheduler hashed every serial twice per tick (84 % of agent CPU at 3k).
    calls = []
    real = rotation.jitter_for

    def counting(svid: IssuedSvid) -> float:
        calls.append(svid.entry_id)
        return real(svid)

    monkeypatch.setattr(rotation, "jitter_for", counting)
    clock, cache, signer, rot = _setup(50)
    asyncio.run(rot.tick())
    assert len(calls) == 50
    for _ in range(20):  # nothing due: nothing minted, nothing recomputed
        clock.advance(1)
        asyncio.run(rot.tick())
    assert len(calls) == 50
    assert signer.batches == [50]
    first = min(
        rotation.rotation_point(s.not_before, s.not_after, real(s), arrived=s.received_at)
        for s in cache.svids().values()
    )
    assert rot.next_due_in() == pytest.approx(first - clock.now())


def test_a_new_entry_among_many_held_is_minted_alone() -> None:
    _, cache, signer, rot = _setup(100)
    asyncio.run(rot.tick())
    signer.spiffe_ids["new"] = "spiffe://example.org/new"
    cache.update_entries([Entry("new", "spiffe://example.org/new", _selectors(1))], [])
    asyncio.run(rot.tick())
    assert signer.batches == [100, 1]
    cache.update_entries([], ["e3"])
    assert "e3" not in cache.svids()


def test_a_renewal_due_renews_that_svid_only_and_keeps_the_rest() -> None:
    clock, cache, signer, rot = _setup(30)
    asyncio.run(rot.tick())
    before = cache.svids()
    due = rot.next_due_in()
    assert due is not None
    clock.advance(due)
    asyncio.run(rot.tick())
    after = cache.svids()
    renewed = [eid for eid in before if after[eid] is not before[eid]]
    assert len(renewed) >= 1
    assert len(renewed) < 30
    assert signer.batches[1] == len(renewed)


def test_a_cap_pre_mints_that_many_and_mints_the_rest_on_demand_least_recently_used_out() -> None:
    _, cache, signer, rot = _setup(10, cap=3)
    asyncio.run(rot.tick())
    assert sorted(cache.svids()) == ["e0", "e1", "e2"]
    watch = cache.watchers.open(_selectors(0))  # a stream is served e0: never evicted
    rot.demand(["e1"])  # e1 used: e2 is now the least recently used
    rot.demand(["e7"])
    asyncio.run(rot.tick())
    assert sorted(cache.svids()) == ["e0", "e1", "e7"]
    rot.demand(["e8"])
    asyncio.run(rot.tick())
    assert sorted(cache.svids()) == ["e0", "e7", "e8"]  # e1 went, e0 is watched
    cache.watchers.close(watch)
    rot.demand(["e9"])
    asyncio.run(rot.tick())
    # e0 was in use when passed over for eviction, after e7 was asked for: e7 is older.
    assert sorted(cache.svids()) == ["e0", "e8", "e9"]
    rot.demand(["e3"])
    asyncio.run(rot.tick())
    assert sorted(cache.svids()) == ["e3", "e8", "e9"]  # unwatched now, e0 goes in turn
    assert signer.batches == [3, 1, 1, 1, 1]


def test_evicted_svids_are_not_renewed_and_held_ones_are() -> None:
    clock, cache, signer, rot = _setup(4, cap=2)
    asyncio.run(rot.tick())
    rot.demand(["e3"])
    asyncio.run(rot.tick())
    held = sorted(cache.svids())
    assert held == ["e1", "e3"]
    clock.advance(cache.svids()["e1"].not_after - clock.now() - 1)
    asyncio.run(rot.tick())
    assert sorted(cache.svids()) == held
    assert signer.batches[-1] == 2  # both held SVIDs renewed, nothing for evicted ones


def test_demanded_svids_go_first_and_are_retried_when_the_server_is_down() -> None:
    _, cache, signer, rot = _setup(5)
    rot.demand(["e4"])
    signer.fail = True
    assert [asyncio.run(rot.tick()) for _ in range(2)] == [1, 2]
    signer.fail = False
    asyncio.run(rot.tick())
    assert signer.requested == [["e4", "e0", "e1", "e2", "e3"]]  # still first after failures
    assert set(cache.svids()) == {"e0", "e1", "e2", "e3", "e4"}


def test_a_workload_waiting_during_a_long_backlog_is_served_after_the_current_batch() -> None:
    _, cache, signer, rot = _setup(rotation.MAX_BATCH * 3)
    last = f"e{rotation.MAX_BATCH * 3 - 1}"
    first_batch = signer.batch_new_x509

    async def asks_midway(params: list[tuple[str, bytes]]) -> list[X509Result]:
        if len(signer.batches) == 0:
            rot.demand([last])  # arrives while the first batch is at the server
        return await first_batch(params)

    signer.batch_new_x509 = asks_midway  # type: ignore[method-assign]
    assert asyncio.run(rot.tick()) == 0.0
    asyncio.run(rot.tick())
    assert signer.requested[1][0] == last
    while len(cache.svids()) < rotation.MAX_BATCH * 3:
        asyncio.run(rot.tick())
    assert sum(signer.batches) == rotation.MAX_BATCH * 3  # nothing was asked for twice


def test_asking_for_an_svid_already_at_the_server_does_not_mint_it_twice() -> None:
    _, cache, signer, rot = _setup(3)
    minting = signer.batch_new_x509

    async def asks_meanwhile(params: list[tuple[str, bytes]]) -> list[X509Result]:
        rot.demand(["e1"])  # a workload connects while its SVID is being minted
        return await minting(params)

    signer.batch_new_x509 = asks_meanwhile  # type: ignore[method-assign]
    asyncio.run(rot.tick())
    asyncio.run(rot.tick())
    assert signer.requested == [["e0", "e1", "e2"]]
    assert set(cache.svids()) == {"e0", "e1", "e2"}
