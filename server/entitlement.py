"""Which registration entries an agent may serve: a pure function over an in-memory index.

An agent is entitled to the entries parented to its own ID, and to the entries parented to a
node-alias entry: an entry whose parent is the server's ID and whose selectors are all among the
agent's attestation selectors (SPIRE's node aliases).
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from typing import TypeVar

from server.datastore.records import Entry, Selector
from server.sharded import REMOVED, ShardedMap
from server.sorted_keys import SortedKeys
from svid._spiffe_id import SpiffeId

_K = TypeVar("_K", bound=str)
_V = TypeVar("_V")


@dataclass(frozen=True)
class EntryIndex:
    """An immutable snapshot of all entries, indexed for the entitlement decision."""

    by_id: Mapping[str, Entry] = field(default_factory=ShardedMap)
    by_parent: Mapping[str, tuple[Entry, ...]] = field(default_factory=ShardedMap)
    # The entries carrying each SPIFFE ID. Validation asks whether a parent is some entry's ID
    # on every write (building that set from all entries each time made provisioning
    # quadratic), and beginning a task looks its runtime's entry up by ID (a scan of the
    # agent's entries cost 34 ms at 100k of them).
    by_spiffe_id: Mapping[str, tuple[Entry, ...]] = field(default_factory=ShardedMap)
    # Every entry id in order: the key listing pages on. Kept up to date by each change (a
    # sort of all ids per snapshot held the event loop 0.4 s at 200k entries).
    sorted_ids: SortedKeys = field(default_factory=SortedKeys)

    @classmethod
    def build(cls, entries: Iterable[Entry]) -> EntryIndex:
        by_id: dict[str, Entry] = {}
        for entry in entries:
            by_id[entry.id] = entry
        by_parent: dict[str, list[Entry]] = {}
        by_spiffe_id: dict[str, list[Entry]] = {}
        for entry in by_id.values():
            by_parent.setdefault(entry.parent_id, []).append(entry)
            by_spiffe_id.setdefault(entry.spiffe_id, []).append(entry)
        return cls(
            ShardedMap.of(by_id.items()),
            ShardedMap.of((k, tuple(v)) for k, v in by_parent.items()),
            ShardedMap.of((k, tuple(v)) for k, v in by_spiffe_id.items()),
            SortedKeys.of(by_id),
        )

    def with_changes(self, put: Iterable[Entry] = (), removed: Iterable[str] = ()) -> EntryIndex:
        """A new snapshot with `put` added (or replacing the same id) and `removed` gone.

        The cost follows the change, not the index: the maps are sharded (server.sharded) and
        only the shards and parents the change touches are copied. One batch of a thousand
        writes into a hundred thousand entries is one such pass.
        """
        by_id = self.by_id
        ids: dict[str, object] = {}  # id -> new entry or REMOVED
        ops: list[tuple[str, object]] = []  # the same, in order (iteration order as a dict's)
        gone: dict[str, set[str]] = {}  # parent -> ids leaving its tuple
        added: dict[str, list[Entry]] = {}  # parent -> entries joining its tuple
        id_gone: dict[str, set[str]] = {}  # the same by SPIFFE ID
        id_added: dict[str, list[Entry]] = {}

        def current(entry_id: str) -> Entry | None:
            if entry_id in ids:
                value = ids[entry_id]
                return None if value is REMOVED else value  # type: ignore[return-value]
            return by_id.get(entry_id)

        def forget(old: Entry) -> None:
            gone.setdefault(old.parent_id, set()).add(old.id)
            id_gone.setdefault(old.spiffe_id, set()).add(old.id)

        for entry_id in removed:
            old = current(entry_id)
            if old is not None:
                forget(old)
                ids[entry_id] = REMOVED
                ops.append((entry_id, REMOVED))
        for entry in put:
            old = current(entry.id)
            if old is not None:
                forget(old)
            ids[entry.id] = entry
            ops.append((entry.id, entry))
            added.setdefault(entry.parent_id, []).append(entry)
            id_added.setdefault(entry.spiffe_id, []).append(entry)
        return EntryIndex(
            _evolve(by_id, ops),
            _evolve(self.by_parent, _regroup(self.by_parent, gone, added, ids)),
            _evolve(self.by_spiffe_id, _regroup(self.by_spiffe_id, id_gone, id_added, ids)),
            self.sorted_ids.evolve(
                added=(i for i, v in ids.items() if v is not REMOVED and i not in by_id),
                removed=(i for i, v in ids.items() if v is REMOVED),
            ),
        )

    def with_entry(self, entry: Entry) -> EntryIndex:
        return self.with_changes(put=(entry,))

    def without(self, entry_id: str) -> EntryIndex:
        return self.with_changes(removed=(entry_id,))

    def spiffe_ids(self) -> frozenset[str]:
        return frozenset(self.by_spiffe_id)

    def has_spiffe_id(self, spiffe_id: str, *, excluding: str = "") -> bool:
        """Whether some entry has this SPIFFE ID, leaving out the entry with id `excluding`
        (an update is checked against every entry but the one it replaces)."""
        count = len(self.by_spiffe_id.get(spiffe_id, ()))
        if excluding:
            old = self.by_id.get(excluding)
            if old is not None and old.spiffe_id == spiffe_id:
                count -= 1
        return count > 0


def _regroup(
    groups: Mapping[str, tuple[Entry, ...]],
    gone: Mapping[str, set[str]],
    added: Mapping[str, list[Entry]],
    ids: Mapping[str, object],
) -> list[tuple[str, object]]:
    """The new tuple (or REMOVED) of each group a change touches: the `gone` ids leave it and
    the `added` entries still current in `ids` (id -> new version or REMOVED) join it."""
    changes: list[tuple[str, object]] = []
    for key in gone.keys() | added.keys():
        leaving = gone.get(key)
        old_tuple = groups.get(key, ())
        # Only removals need a pass over the group's entries; additions append.
        kept = tuple(e for e in old_tuple if e.id not in leaving) if leaving else old_tuple
        # An entry replaced twice in one change appears once, as its last version.
        fresh = {e.id: e for e in added.get(key, ())}
        joined = kept + tuple(e for e in fresh.values() if ids.get(e.id) is e)
        changes.append((key, joined if joined else REMOVED))
    return changes


def _evolve(current: Mapping[_K, _V], changes: Iterable[tuple[_K, object]]) -> ShardedMap[_K, _V]:
    if not isinstance(current, ShardedMap):
        current = ShardedMap.of(current.items())
    return current.evolve(changes)


def live(entry: Entry, now: int) -> bool:
    """Whether the entry is served at `now` (not past its expiry)."""
    return entry.expires_at == 0 or entry.expires_at > now


def node_aliases(
    index: EntryIndex, server_id: str, agent_selectors: Iterable[Selector], now: int
) -> tuple[Entry, ...]:
    """Node-alias entries whose selectors the agent's attestation selectors cover."""
    have = frozenset(agent_selectors)
    return tuple(
        alias
        for alias in index.by_parent.get(server_id, ())
        if live(alias, now) and alias.selectors and frozenset(alias.selectors) <= have
    )


def agent_parents(
    index: EntryIndex, agent_id: str, selectors: Iterable[Selector], server_id: str, now: int
) -> frozenset[str]:
    """The parent IDs whose entries the agent serves: itself and its live node aliases."""
    aliases = node_aliases(index, server_id, selectors, now)
    return frozenset((agent_id, *(a.spiffe_id for a in aliases)))


def entitled_entry(
    index: EntryIndex,
    agent_id: str,
    agent_selectors: Iterable[Selector],
    server_id: str,
    now: int,
    *,
    spiffe_id: str,
    entry_id: str = "",
) -> Entry | None:
    """The live entry with this SPIFFE ID the agent may serve (the lowest id of several), the
    one `entitled_entries` lists first; with `entry_id`, that entry if it is such a one.

    Walks the smaller of two sets: the entries carrying the ID, or the entries of the agent and
    its node aliases. Either may be large (an agent holding 100k entries; one ID given on every
    node, an entry per agent), rarely both.
    """
    parents = agent_parents(index, agent_id, agent_selectors, server_id, now)
    if entry_id:
        named = index.by_id.get(entry_id)
        if named is None or named.spiffe_id != spiffe_id:
            return None
        return named if named.parent_id in parents and live(named, now) else None
    same_id = index.by_spiffe_id.get(spiffe_id, ())
    held = sum(len(index.by_parent.get(p, ())) for p in parents)
    if len(same_id) <= held:
        found = (e for e in same_id if e.parent_id in parents and live(e, now))
    else:
        found = (
            e
            for p in parents
            for e in index.by_parent.get(p, ())
            if e.spiffe_id == spiffe_id and live(e, now)
        )
    return min(found, key=lambda e: e.id, default=None)


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
            if live(entry, now):
                chosen.setdefault(entry.id, entry)
    return tuple(sorted(chosen.values(), key=lambda e: (e.spiffe_id, e.id)))


class SpiffeIdCache:
    """Entries' IDs parsed once, across entry snapshots: parsing on every signature would cost
    a quarter of a JWT, and re-parsing every entry of an agent per write cost more than the
    write. Bounded; a miss only costs a parse."""

    def __init__(self, limit: int = 200_000) -> None:
        self._parsed: dict[str, SpiffeId] = {}
        self._limit = limit

    def get(self, spiffe_id: str) -> SpiffeId:
        found = self._parsed.get(spiffe_id)
        if found is None:
            if len(self._parsed) >= self._limit:
                self._parsed.clear()
            found = self._parsed[spiffe_id] = SpiffeId.parse(spiffe_id)
        return found


class Entitlement:
    """What one agent may serve at `now`, answered entry by entry from the index.

    Making one costs the agent's node aliases, not its entries: every write replaces the
    index, and rebuilding each agent's full entry set then cost 12 us per entry held.
    """

    def __init__(
        self, index: EntryIndex, parents: frozenset[str], now: int, ids: SpiffeIdCache
    ) -> None:
        self._index = index
        self._parents = parents
        self._now = now
        self._ids = ids
        self._by_spiffe_id: dict[str, Entry] | None = None

    def get(self, entry_id: str) -> Entry | None:
        """The entry if the agent may serve it now."""
        entry = self._index.by_id.get(entry_id)
        if entry is not None and entry.parent_id in self._parents and live(entry, self._now):
            return entry
        return None

    def __contains__(self, entry_id: str) -> bool:
        return self.get(entry_id) is not None

    def by_spiffe_id(self, spiffe_id: str) -> Entry | None:
        """The agent's entry with this SPIFFE ID (the lowest id of several). A request naming
        no entry is rare (agents name the entry): the map is built on the first one."""
        found = self._by_spiffe_id
        if found is None:
            found = {}
            for parent in self._parents:
                for entry in self._index.by_parent.get(parent, ()):
                    if live(entry, self._now):
                        kept = found.get(entry.spiffe_id)
                        if kept is None or entry.id < kept.id:
                            found[entry.spiffe_id] = entry
            self._by_spiffe_id = found
        return found.get(spiffe_id)

    def parsed_id(self, entry: Entry) -> SpiffeId:
        return self._ids.get(entry.spiffe_id)
