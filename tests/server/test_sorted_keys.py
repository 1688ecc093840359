"""SortedKeys: a sorted set of ids updated by re-sorting only the chunks a change touches."""

from __future__ import annotations

import random

import pytest

from server.sorted_keys import CHUNK, SortedKeys


@pytest.mark.parametrize("seed", range(20))
def test_evolve_equals_a_rebuild_and_after_resumes_past_any_key(seed: int) -> None:
    rng = random.Random(seed)
    held = {f"{rng.randrange(10**6):06d}" for _ in range(rng.randrange(3 * CHUNK))}
    keys = SortedKeys.of(held)
    for _ in range(12):
        added = {f"{rng.randrange(10**6):06d}" for _ in range(rng.randrange(2 * CHUNK))}
        removed = set(rng.sample(sorted(held), min(len(held), rng.randrange(CHUNK))))
        removed.add("zzzzzz")  # past every key: nothing to remove
        keys = keys.evolve(added, removed)
        held = (held - removed) | added
        assert list(keys) == sorted(held)
        assert len(keys) == len(held)
        cursor = f"{rng.randrange(10**6):06d}"
        assert list(keys.after(cursor)) == [k for k in sorted(held) if k > cursor]
        assert list(keys.after("")) == sorted(held)
        if held:
            some = rng.choice(sorted(held))
            assert some in keys
            assert list(keys.after(some)) == [k for k in sorted(held) if k > some]


def test_a_change_leaves_every_chunk_it_does_not_touch_shared() -> None:
    # The cost follows the change: re-sorting all ids per snapshot held the event loop for
    # 0.4 s at 200k entries.
    keys = SortedKeys.of(f"id{n:07d}" for n in range(50 * CHUNK))
    put, gone = f"id{10 * CHUNK:07d}x", f"id{30 * CHUNK:07d}"
    changed = keys.evolve(added=[put], removed=[gone])
    shared = {id(c) for c in keys._chunks} & {id(c) for c in changed._chunks}
    assert len(shared) == len(keys._chunks) - 2
    assert put in changed
    assert gone not in changed
    assert gone in keys  # the old version is unchanged
    assert put not in keys


def test_a_chunk_grown_past_twice_its_size_is_split() -> None:
    keys = SortedKeys.of(["a"]).evolve(added=[f"b{n:05d}" for n in range(5 * CHUNK)])
    assert max(len(c) for c in keys._chunks) <= 2 * CHUNK
    assert list(keys) == ["a", *(f"b{n:05d}" for n in range(5 * CHUNK))]
    assert list(SortedKeys().evolve(added=["b", "a"])) == ["a", "b"]
    assert list(keys.evolve(removed=list(keys))) == []
