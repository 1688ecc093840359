"""The selector index and stream watchers agree with the naive matcher (model.entries_for), and
the cache wakes a stream only for what concerns it."""

from __future__ import annotations

import asyncio
import time
from collections.abc import Sequence

from hypothesis import given, settings
from hypothesis import strategies as st

from agent_attestor.cache import Cache, SyncState
from agent_attestor.model import Entry, Selector, entries_for
from agent_attestor.rotation import Rotator
from agent_attestor.selector_index import SelectorIndex
from agent_attestor.watchers import Watchers
from svid._clock import FakeClock
from tests.agent_attestor.pki import FakeSigner, LocalCa

# A small universe, so callers often hold every selector of some entry (and often not).
selectors = st.builds(Selector, st.sampled_from(["unix", "k8s"]), st.sampled_from("abcdef"))
selector_sets = st.frozensets(selectors, max_size=4)
entries = st.builds(
    Entry,
    id=st.sampled_from([f"e{i}" for i in range(12)]),
    spiffe_id=st.just("spiffe://example.org/w"),
    selectors=selector_sets,
    created_at=st.integers(0, 5),
)
# An operation: put an entry (add or replace) or remove one by id.
operations = st.lists(
    st.one_of(
        st.tuples(st.just("put"), entries),
        st.tuples(st.just("remove"), st.sampled_from([f"e{i}" for i in range(12)])),
    ),
    max_size=30,
)


def _apply(
    ops: list[tuple[str, object]], callers: Sequence[frozenset[Selector]] = ()
) -> tuple[dict[str, Entry], SelectorIndex]:
    """Apply `ops` to an index and a dict; after each, every caller's answer is the naive one
    (so memoised answers must follow every change)."""
    held: dict[str, Entry] = {}
    index = SelectorIndex()
    for op, arg in ops:
        if op == "put":
            assert isinstance(arg, Entry)
            held[arg.id] = arg
            index.add(arg)
        else:
            assert isinstance(arg, str)
            held.pop(arg, None)
            index.remove(arg)
        for caller in callers:
            assert list(index.match(caller)) == entries_for(held.values(), caller)
    return held, index


@settings(max_examples=300)
@given(ops=operations, callers=st.lists(selector_sets, min_size=1, max_size=6))
def test_index_matches_exactly_what_the_naive_matcher_does(
    ops: list[tuple[str, object]], callers: list[frozenset[Selector]]
) -> None:
    held, index = _apply(ops, callers)
    for caller in callers:
        # Twice: the second answer comes from the memo, which entry changes must have cleared.
        assert list(index.match(caller)) == entries_for(held.values(), caller)
        assert list(index.match(caller)) == entries_for(held.values(), caller)
    rebuilt = SelectorIndex(held.values())
    for caller in callers:
        assert list(rebuilt.match(caller)) == entries_for(held.values(), caller)


@settings(max_examples=200)
@given(
    before=operations,
    callers=st.lists(selector_sets, min_size=1, max_size=6),
    after=operations,
)
def test_watchers_serve_each_caller_exactly_its_matching_entries(
    before: list[tuple[str, object]],
    callers: list[frozenset[Selector]],
    after: list[tuple[str, object]],
) -> None:
    held, index = _apply(before)
    watchers = Watchers(index.match)
    watches = [watchers.open(c) for c in callers]
    for op, arg in after:
        old = held.get(arg.id if isinstance(arg, Entry) else str(arg))
        if op == "put":
            assert isinstance(arg, Entry)
            held[arg.id] = arg
            index.add(arg)
            changed = [arg]
        else:
            assert isinstance(arg, str)
            held.pop(arg, None)
            index.remove(arg)
            changed = []
        woken = {id(w): w.signal.version for w in watches}
        watchers.entries_changed([*changed, *([old] if old is not None else [])])
        for watch in watches:
            expected = frozenset(e.id for e in entries_for(held.values(), watch.selectors))
            assert watch.entry_ids == expected
            touched = arg.id if isinstance(arg, Entry) else arg
            was_or_is = touched in expected or (old is not None and old.matches(watch.selectors))
            if was_or_is:  # its state may have changed: it must hear of it
                assert watch.signal.version > woken[id(watch)]
    for watch in watches:
        watchers.close(watch)
    assert len(watchers) == 0


def test_a_new_svid_wakes_only_the_streams_served_its_entry() -> None:
    a, b = Selector("unix", "uid:1"), Selector("unix", "uid:2")
    index = SelectorIndex(
        [
            Entry("ea", "spiffe://example.org/a", frozenset({a})),
            Entry("eb", "spiffe://example.org/b", frozenset({b})),
        ]
    )
    watchers = Watchers(index.match)
    wa, wb = watchers.open(frozenset({a})), watchers.open(frozenset({b}))
    watchers.svids_changed(["ea"])
    assert (wa.signal.version, wb.signal.version) == (1, 0)
    watchers.everyone()  # a bundle change concerns every caller
    assert (wa.signal.version, wb.signal.version) == (2, 1)
    assert watchers.watched("ea")
    watchers.close(wa)
    assert not watchers.watched("ea")


def test_entries_sharing_a_common_selector_are_told_apart() -> None:
    common = Selector("unix", "uid:0")
    entries = [
        Entry(f"e{i}", f"spiffe://example.org/{i}", frozenset({common, Selector("k8s", str(i))}))
        for i in range(1000)
    ]
    index = SelectorIndex(entries)
    assert [e.id for e in index.match(frozenset({common, Selector("k8s", "7")}))] == ["e7"]
    assert index.match(frozenset({common})) == ()


def test_the_cache_wakes_a_stream_for_its_own_changes_and_shared_ones_only() -> None:
    clock = FakeClock(start=time.time())
    ca = LocalCa(clock)
    signer = FakeSigner(ca)
    a, b = Selector("unix", "uid:1"), Selector("unix", "uid:2")
    ea = Entry("ea", "spiffe://example.org/a", frozenset({a}))
    eb = Entry("eb", "spiffe://example.org/b", frozenset({b}))
    signer.spiffe_ids.update(
        {"ea": ea.spiffe_id, "eb": eb.spiffe_id, "ea2": "spiffe://example.org/a2"}
    )
    cache = Cache()
    rot = Rotator(cache, signer, clock)
    cache.apply_sync(SyncState(entries=(ea, eb), bundle=ca.bundle()))
    wa, wb = cache.watchers.open(frozenset({a})), cache.watchers.open(frozenset({b}))
    assert (wa.entry_ids, wb.entry_ids) == ({"ea"}, {"eb"})

    def versions() -> tuple[int, int]:
        return wa.signal.version, wb.signal.version

    asyncio.run(rot.tick())  # one SVID each: each stream woken once
    assert versions() == (1, 1)
    cache.drop_svids(["eb"])
    assert versions() == (1, 2)
    ea2 = Entry("ea2", "spiffe://example.org/a2", frozenset({a}))
    cache.update_entries([ea2], [])  # a new entry for caller a only
    assert versions() == (2, 2)
    assert wa.entry_ids == {"ea", "ea2"}
    rot.demand(["eb"])
    asyncio.run(rot.tick())  # ea2 and eb minted
    assert versions() == (3, 3)
    cache.apply_sync(
        SyncState(entries=(ea, eb, ea2), bundle=ca.bundle(), crl=(b"crl",))
    )  # shared by everyone
    assert versions() == (4, 4)
