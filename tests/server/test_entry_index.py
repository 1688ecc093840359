"""EntryIndex.with_changes: an incremental snapshot, checked against a full rebuild (the oracle)."""

from __future__ import annotations

import random

import pytest

from server.datastore.records import Entry, Selector
from server.entitlement import EntryIndex
from server.sharded import SHARDS, ShardedMap

TD = "spiffe://example.org"
PARENTS = [f"{TD}/svid/agent/join_token/a{n}" for n in range(3)] + [f"{TD}/nodes/n0"]


def _entry(n: int, rng: random.Random) -> Entry:
    return Entry(
        id=f"e{n:04d}",
        spiffe_id=f"{TD}/w/{rng.randrange(20)}",
        parent_id=rng.choice(PARENTS),
        selectors=(Selector("unix", f"uid:{rng.randrange(5)}"),),
        revision=rng.randrange(1, 5),
    )


def _same(a: EntryIndex, b: EntryIndex) -> None:
    assert dict(a.by_id) == dict(b.by_id)
    assert list(a.by_id) == list(b.by_id)  # the same order, not just the same members
    assert {k: sorted(e.id for e in v) for k, v in a.by_parent.items()} == {
        k: sorted(e.id for e in v) for k, v in b.by_parent.items()
    }
    for parent, entries in a.by_parent.items():
        assert all(a.by_id[e.id] is e for e in entries), f"stale entry under {parent}"
    assert {k: sorted(e.id for e in v) for k, v in a.by_spiffe_id.items()} == {
        k: sorted(e.id for e in v) for k, v in b.by_spiffe_id.items()
    }
    for spiffe_id, entries in a.by_spiffe_id.items():
        assert all(a.by_id[e.id] is e for e in entries), f"stale entry with {spiffe_id}"
        assert all(e.spiffe_id == spiffe_id for e in entries)
    assert list(a.sorted_ids) == list(b.sorted_ids)


@pytest.mark.parametrize("seed", range(20))
def test_with_changes_equals_a_rebuild(seed: int) -> None:
    rng = random.Random(seed)
    entries = {e.id: e for e in (_entry(n, rng) for n in range(60))}
    index = EntryIndex.build(entries.values())
    for _ in range(10):
        put = [_entry(rng.randrange(90), rng) for _ in range(rng.randrange(8))]
        removed = rng.sample(sorted(entries), rng.randrange(6))
        index = index.with_changes(put, removed)
        for entry_id in removed:
            entries.pop(entry_id, None)
        for entry in put:
            entries[entry.id] = entry
        _same(index, EntryIndex.build(entries.values()))


def test_an_entry_put_twice_in_one_change_counts_once_as_its_last_version() -> None:
    rng = random.Random(1)
    first = _entry(1, rng)
    moved = Entry(first.id, f"{TD}/moved", PARENTS[3], first.selectors)
    index = EntryIndex().with_changes([first, moved])
    assert index.by_id[first.id] is moved
    assert [e.id for e in index.by_parent[PARENTS[3]]] == [first.id]
    assert first.parent_id not in index.by_parent or first.parent_id == PARENTS[3]
    assert dict(index.by_spiffe_id) == {f"{TD}/moved": (moved,)}


def test_has_spiffe_id_can_leave_out_the_entry_an_update_replaces() -> None:
    node = Entry("n1", f"{TD}/nodes/a", PARENTS[0], (Selector("x", "1"),))
    twin = Entry("n2", f"{TD}/nodes/a", PARENTS[1], (Selector("x", "1"),))
    index = EntryIndex.build([node])
    assert index.has_spiffe_id(node.spiffe_id)
    assert not index.has_spiffe_id(node.spiffe_id, excluding="n1")
    assert index.with_entry(twin).has_spiffe_id(node.spiffe_id, excluding="n1")
    assert not index.without("n1").has_spiffe_id(node.spiffe_id)


def test_a_change_copies_only_the_shards_it_touches() -> None:
    rng = random.Random(3)
    index = EntryIndex.build(_entry(n, rng) for n in range(5000))
    changed = index.with_changes([_entry(9999, rng)], ["e0001"])
    assert isinstance(changed.by_id, ShardedMap)
    assert isinstance(index.by_id, ShardedMap)
    shared = sum(a is b for a, b in zip(index.by_id._shards, changed.by_id._shards, strict=True))
    # One put and one removal: at most two shards copied, every other one shared.
    assert shared >= SHARDS - 2
    assert "e0001" in index.by_id
    assert "e0001" not in changed.by_id
    assert (len(index.by_id), len(changed.by_id)) == (5000, 5000)


def test_a_change_keeps_the_listing_order_without_sorting_every_id_again() -> None:
    # Each write makes a snapshot; sorting all ids again for the next listing of each held
    # the event loop 0.4 s at 200k entries (a sort holds the GIL, in a thread too).
    rng = random.Random(7)
    index = EntryIndex.build(_entry(n, rng) for n in range(5000))
    changed = index.with_changes(put=[_entry(9999, rng)], removed=["e0042"])
    old_chunks, new_chunks = index.sorted_ids._chunks, changed.sorted_ids._chunks
    assert len({id(c) for c in old_chunks} & {id(c) for c in new_chunks}) >= len(old_chunks) - 2
    assert list(changed.sorted_ids) == sorted(changed.by_id)
