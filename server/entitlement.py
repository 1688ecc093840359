"""Which registration entries an agent may serve: a pure function over an in-memory index.

An agent is entitled to the entries parented to its own ID, and to the entries parented to a
node-alias entry: an entry whose parent is the server's ID and whose selectors are all among the
agent's attestation selectors (SPIRE's node aliases).
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from types import MappingProxyType

from server.datastore.records import Entry, Selector
from svid._spiffe_id import SpiffeId


@dataclass(frozen=True)
class EntryIndex:
    """An immutable snapshot of all entries, indexed for the entitlement decision."""

    by_id: Mapping[str, Entry] = field(default_factory=lambda: MappingProxyType({}))
    by_parent: Mapping[str, tuple[Entry, ...]] = field(default_factory=lambda: MappingProxyType({}))

    @classmethod
    def build(cls, entries: Iterable[Entry]) -> EntryIndex:
        by_id: dict[str, Entry] = {}
        by_parent: dict[str, list[Entry]] = {}
        for entry in entries:
            by_id[entry.id] = entry
            by_parent.setdefault(entry.parent_id, []).append(entry)
        return cls(
            MappingProxyType(by_id),
            MappingProxyType({k: tuple(v) for k, v in by_parent.items()}),
        )

    def with_entry(self, entry: Entry) -> EntryIndex:
        entries = dict(self.by_id)
        entries[entry.id] = entry
        return EntryIndex.build(entries.values())

    def without(self, entry_id: str) -> EntryIndex:
        entries = dict(self.by_id)
        entries.pop(entry_id, None)
        return EntryIndex.build(entries.values())

    def spiffe_ids(self) -> frozenset[str]:
        return frozenset(e.spiffe_id for e in self.by_id.values())


def _live(entry: Entry, now: int) -> bool:
    return entry.expires_at == 0 or entry.expires_at > now


def node_aliases(
    index: EntryIndex, server_id: str, agent_selectors: Iterable[Selector], now: int
) -> tuple[Entry, ...]:
    """Node-alias entries whose selectors the agent's attestation selectors cover."""
    have = frozenset(agent_selectors)
    return tuple(
        alias
        for alias in index.by_parent.get(server_id, ())
        if _live(alias, now) and alias.selectors and frozenset(alias.selectors) <= have
    )


def entitled_entries(
    index: EntryIndex,
    agent_id: str,
    agent_selectors: Iterable[Selector],
    server_id: str,
    now: int,
) -> tuple[Entry, ...]:
    """Every live workload entry the agent may serve, deduplicated, in a stable order."""
    parents = [agent_id]
    parents.extend(a.spiffe_id for a in node_aliases(index, server_id, agent_selectors, now))
    chosen: dict[str, Entry] = {}
    for parent in parents:
        for entry in index.by_parent.get(parent, ()):
            if _live(entry, now):
                chosen.setdefault(entry.id, entry)
    return tuple(sorted(chosen.values(), key=lambda e: (e.spiffe_id, e.id)))


@dataclass(frozen=True)
class Entitlement:
    """What one agent may serve right now, indexed for per-request lookups."""

    entries: tuple[Entry, ...]
    by_id: Mapping[str, Entry]
    by_spiffe_id: Mapping[str, Entry]
    # Entries' IDs parsed once: parsing on every signature would cost a quarter of a JWT.
    parsed_ids: Mapping[str, SpiffeId]

    @classmethod
    def of(cls, entries: tuple[Entry, ...]) -> Entitlement:
        by_spiffe_id: dict[str, Entry] = {}
        for entry in entries:
            by_spiffe_id.setdefault(entry.spiffe_id, entry)
        return cls(
            entries,
            MappingProxyType({e.id: e for e in entries}),
            MappingProxyType(by_spiffe_id),
            MappingProxyType({e.id: SpiffeId.parse(e.spiffe_id) for e in entries}),
        )
