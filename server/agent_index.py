"""The attested agents in memory: a read-only map by SPIFFE ID whose updates cost what they touch,
with the ids kept in order and grouped by selector for the admin listing.

Each agent write (attestation, renewal, eviction) replaces the snapshot. A dict copied whole
per write, and all ids sorted again by the next ListAgents, cost the event loop in proportion
to every agent held (100k of them), whatever the write touched.
"""

from __future__ import annotations

from collections.abc import Iterable, Iterator, Mapping

from server.datastore.records import AttestedAgent, Selector
from server.sharded import REMOVED, ShardedMap
from server.sorted_keys import CHUNK, SortedKeys

# The ids of the agents holding one selector, in order. Most groups hold one agent (a serial
# number, a node's name): a plain tuple, a fifth of a SortedKeys' memory (54 MB for 100k
# x509pop agents as SortedKeys); a group past CHUNK ids is a SortedKeys, updated per chunk.
Group = SortedKeys | tuple[str, ...]


class AgentIndex(Mapping[str, AttestedAgent]):
    """An immutable snapshot: spiffe_id -> record, the ids in order (`sorted_ids`), and the
    ids of the agents holding each selector, in order (`by_selector`)."""

    __slots__ = ("by_id", "by_selector", "sorted_ids")

    def __init__(
        self,
        by_id: ShardedMap[str, AttestedAgent] | None = None,
        sorted_ids: SortedKeys | None = None,
        by_selector: ShardedMap[Selector, Group] | None = None,
    ) -> None:
        self.by_id: ShardedMap[str, AttestedAgent] = by_id if by_id is not None else ShardedMap()
        self.sorted_ids = sorted_ids if sorted_ids is not None else SortedKeys()
        self.by_selector: ShardedMap[Selector, Group] = (
            by_selector if by_selector is not None else ShardedMap()
        )

    @classmethod
    def build(cls, agents: Iterable[AttestedAgent]) -> AgentIndex:
        by_id = {a.spiffe_id: a for a in agents}
        groups: dict[Selector, list[str]] = {}
        for agent in by_id.values():
            for selector in set(agent.selectors):
                groups.setdefault(selector, []).append(agent.spiffe_id)
        return cls(
            ShardedMap.of(by_id.items()),
            SortedKeys.of(by_id),
            ShardedMap.of((s, _group(sorted(ids))) for s, ids in groups.items()),
        )

    def __getitem__(self, spiffe_id: str) -> AttestedAgent:
        return self.by_id[spiffe_id]

    def __contains__(self, spiffe_id: object) -> bool:
        return spiffe_id in self.by_id

    def __iter__(self) -> Iterator[str]:
        return iter(self.by_id)

    def __len__(self) -> int:
        return len(self.by_id)

    def with_changes(
        self, put: Iterable[AttestedAgent] = (), removed: Iterable[str] = ()
    ) -> AgentIndex:
        """A new snapshot with `put` stored and `removed` gone (applied in that order, as the
        callers' dict updates were: an id in both ends up gone)."""
        final: dict[str, AttestedAgent | None] = {a.spiffe_id: a for a in put}
        for spiffe_id in removed:
            final[spiffe_id] = None
        joins: dict[Selector, set[str]] = {}
        leaves: dict[Selector, set[str]] = {}
        for spiffe_id, agent in final.items():
            held = self.by_id.get(spiffe_id)
            before = set(held.selectors) if held is not None else set()
            after = set(agent.selectors) if agent is not None else set()
            for selector in after - before:
                joins.setdefault(selector, set()).add(spiffe_id)
            for selector in before - after:
                leaves.setdefault(selector, set()).add(spiffe_id)
        groups: list[tuple[Selector, Group | object]] = []
        for selector in joins.keys() | leaves.keys():
            group = _evolve(
                self.by_selector.get(selector, ()),
                joins.get(selector, set()),
                leaves.get(selector, set()),
            )
            groups.append((selector, group if group else REMOVED))
        return AgentIndex(
            self.by_id.evolve((k, REMOVED if a is None else a) for k, a in final.items()),
            self.sorted_ids.evolve(
                added=(k for k, a in final.items() if a is not None and k not in self.by_id),
                removed=(k for k, a in final.items() if a is None),
            ),
            self.by_selector.evolve(groups),
        )


def _group(ids: list[str]) -> Group:
    """`ids` (sorted, distinct) as a group."""
    return SortedKeys.of(ids) if len(ids) > CHUNK else tuple(ids)


def _evolve(group: Group, joins: set[str], leaves: set[str]) -> Group:
    if isinstance(group, SortedKeys):
        grown = group.evolve(joins, leaves)
        return grown if len(grown) > CHUNK else tuple(grown)
    return _group(sorted((set(group) - leaves) | joins))
