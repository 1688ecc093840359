"""AgentIndex and the ids a ListAgents page walks: kept in order per change (checked against a
brute-force sort under random changes), and walking only what the filters can keep."""

from __future__ import annotations

import random

import pytest

from server.agent_index import AgentIndex
from server.agent_listing import agent_ids
from server.datastore.records import AttestedAgent, Selector
from server.listing import SelectorFilter, under_prefix
from server.sorted_keys import CHUNK
from svid._proto import admin_pb2

TD = "spiffe://example.org"
# Names around the path-segment edge: "a-x" and "a.x" sort between "a" and "a/...".
NAMES = ["a", "a-x", "a.x", "a/b", "a/b/c", "a/c", "ab", "b", "b/a", "c0", "c0/x", "c00"]
SELECTORS = [Selector("t", f"v{n}") for n in range(5)]
MATCHES = list(admin_pb2.SelectorMatch.values())


def _agent(name: str, rng: random.Random) -> AttestedAgent:
    selectors = tuple(rng.sample(SELECTORS, rng.randrange(3)))
    return AttestedAgent(
        f"{TD}/{name}", "join_token", f"{rng.randrange(10**6)}", 0, selectors=selectors
    )


def _name(rng: random.Random) -> str:
    return rng.choice(NAMES) if rng.random() < 0.5 else f"n/{rng.randrange(1000):03d}"


def _same(index: AgentIndex, held: dict[str, AttestedAgent]) -> None:
    assert dict(index.by_id) == held
    assert len(index) == len(held)
    assert list(index.sorted_ids) == sorted(held)
    groups: dict[Selector, list[str]] = {}
    for spiffe_id in sorted(held):
        for selector in set(held[spiffe_id].selectors):
            groups.setdefault(selector, []).append(spiffe_id)
    assert {s: list(g) for s, g in index.by_selector.items()} == groups


@pytest.mark.parametrize("seed", range(15))
def test_changes_equal_a_brute_force_sort_and_the_walk_misses_nothing(seed: int) -> None:
    rng = random.Random(seed)
    held = {a.spiffe_id: a for a in (_agent(_name(rng), rng) for _ in range(rng.randrange(600)))}
    index = AgentIndex.build(held.values())
    _same(index, held)
    for _ in range(15):
        put = [_agent(_name(rng), rng) for _ in range(rng.randrange(80))]
        removed = [f"{TD}/{_name(rng)}" for _ in range(rng.randrange(80))]
        index = index.with_changes(put, removed)
        held.update((a.spiffe_id, a) for a in put)
        for spiffe_id in removed:
            held.pop(spiffe_id, None)
        _same(index, held)
        for _ in range(5):
            prefix = rng.choice(["", f"{TD}/{rng.choice(NAMES)}", f"{TD}/n", f"{TD}/zz"])
            wanted = SelectorFilter.of(rng.sample(SELECTORS, rng.randrange(3)), rng.choice(MATCHES))
            after = rng.choice(["", *held, f"{TD}/{rng.choice(NAMES)}"])
            walked = list(agent_ids(index, wanted, prefix, after))
            assert walked == sorted(set(walked))  # in order, each once
            kept = [
                k for k in walked if under_prefix(k, prefix) and wanted.matches(index[k].selectors)
            ]
            assert kept == [
                k
                for k in sorted(held)
                if k > after and under_prefix(k, prefix) and wanted.matches(held[k].selectors)
            ]


def test_a_change_re_sorts_only_the_chunks_it_touches() -> None:
    # All ids were sorted again for the first listing after every attestation or renewal:
    # 100k of them, on the event loop.
    rng = random.Random(3)
    shared = Selector("k8s", "cluster:prod")
    index = AgentIndex.build(
        AttestedAgent(f"{TD}/n/{n:06d}", "x", "1", 0, selectors=(shared,))
        for n in range(50 * CHUNK)
    )
    renewed = index.with_changes(put=[_agent("n/000100", rng)], removed=[f"{TD}/n/002000"])
    renewed = renewed.with_changes(put=[AttestedAgent(f"{TD}/n/000100x", "x", "2", 0)])
    for before, after in (
        (index.sorted_ids, renewed.sorted_ids),
        (index.by_selector[shared], renewed.by_selector[shared]),
    ):
        common = {id(c) for c in before._chunks} & {id(c) for c in after._chunks}
        assert len(common) >= len(before._chunks) - 2
    assert f"{TD}/n/002000" in index  # the old snapshot is unchanged
    assert f"{TD}/n/002000" not in renewed
    # A renewal keeps the selectors: no group is touched.
    same = renewed.with_changes(put=[renewed[f"{TD}/n/000007"]])
    assert same.by_selector[shared] is renewed.by_selector[shared]


def test_the_walk_covers_only_the_selector_group_and_the_prefix_range() -> None:
    rare = Selector("x509pop", "subject:cn:rare")
    common = Selector("k8s", "cluster:prod")
    agents = [
        AttestedAgent(f"{TD}/n/{n:05d}", "x", "1", 0, selectors=(common,)) for n in range(5000)
    ]
    agents += [
        AttestedAgent(f"{TD}/r/{n}", "x", "1", 0, selectors=(rare, common)) for n in range(3)
    ]
    index = AgentIndex.build(agents)
    every = SelectorFilter.of([], admin_pb2.SELECTOR_MATCH_ALL)
    for match in MATCHES:
        one = SelectorFilter.of([rare], match)
        assert list(agent_ids(index, one, "", "")) == [f"{TD}/r/{n}" for n in range(3)]
    # Both held: the smaller group holds every match.
    both = SelectorFilter.of([common, rare], admin_pb2.SELECTOR_MATCH_ALL)
    assert list(agent_ids(index, both, "", "")) == [f"{TD}/r/{n}" for n in range(3)]
    assert list(agent_ids(index, every, f"{TD}/n/00042", "")) == [f"{TD}/n/00042"]
    assert list(agent_ids(index, every, f"{TD}/r", "")) == [f"{TD}/r/{n}" for n in range(3)]
    assert list(agent_ids(index, every, f"{TD}/r", f"{TD}/r/0")) == [f"{TD}/r/1", f"{TD}/r/2"]
    assert list(agent_ids(index, every, f"{TD}/m", "")) == []


def test_a_group_is_a_plain_tuple_until_it_outgrows_a_chunk() -> None:
    # One group per serial number or node name: as a SortedKeys each, 100k x509pop agents
    # took 54 MB.
    rng = random.Random(5)
    grow = Selector("k8s", "cluster:grow")
    index = AgentIndex.build([_agent("n/x", rng)])
    ids = [f"{TD}/n/{n:04d}" for n in range(3 * CHUNK)]
    for n, spiffe_id in enumerate(ids):
        index = index.with_changes(put=[AttestedAgent(spiffe_id, "x", "1", 0, selectors=(grow,))])
        assert isinstance(index.by_selector[grow], tuple) == (n < CHUNK)
        assert list(index.by_selector[grow]) == ids[: n + 1]
    index = index.with_changes(removed=ids[CHUNK:])
    assert index.by_selector[grow] == tuple(ids[:CHUNK])
    assert grow not in index.with_changes(removed=ids).by_selector


def test_the_prefix_range_skips_siblings_whose_names_extend_the_prefix() -> None:
    # "-" and "." sort between "a" and "a/": with the range starting at the prefix itself, a
    # listing of .../cluster walked every agent of .../cluster-eu (and .../cluster.old) to
    # keep none of them.
    agents = [AttestedAgent(f"{TD}/cluster-eu/{n:05d}", "x", "1", 0) for n in range(3000)]
    agents += [AttestedAgent(f"{TD}/cluster.old/{n:05d}", "x", "1", 0) for n in range(3000)]
    children = [f"{TD}/cluster", f"{TD}/cluster/", f"{TD}/cluster/a", f"{TD}/cluster/b/c"]
    index = AgentIndex.build([*agents, *(AttestedAgent(k, "x", "1", 0) for k in children)])
    every = SelectorFilter.of([], admin_pb2.SELECTOR_MATCH_ALL)
    prefix = f"{TD}/cluster"
    assert list(agent_ids(index, every, prefix, "")) == children
    assert list(agent_ids(index, every, prefix, prefix)) == children[1:]
    assert list(agent_ids(index, every, prefix, f"{TD}/cluster-eu/00001")) == children[1:]
    assert list(agent_ids(index, every, prefix, children[1])) == children[2:]
    assert list(agent_ids(index, every, prefix, children[2])) == children[3:]
    # A selector group walks the same range.
    shared = Selector("k8s", "cluster:any")
    grouped = AgentIndex.build(
        AttestedAgent(a.spiffe_id, "x", "1", 0, selectors=(shared,)) for a in index.values()
    )
    for match in MATCHES:
        one = SelectorFilter.of([shared], match)
        assert list(agent_ids(grouped, one, prefix, "")) == children
