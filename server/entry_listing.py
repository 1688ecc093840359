"""Which entry ids a filtered ListEntries walks: the smallest index group the filters name.

An exact SPIFFE ID or parent ID names a group of the entry index (by_spiffe_id, by_parent):
walking only that group, sorted, costs what it holds. Walking every entry id and testing each
cost 120-230 ms per call at 200k entries, on the event loop. A group that holds a good part of
all entries is not sorted (a sort holds the GIL, wherever it runs): the ids in order are walked
instead, the filter keeping the group's, and a page fills soon.
"""

from __future__ import annotations

from collections.abc import Sequence

from server.datastore.records import Entry
from server.entitlement import EntryIndex
from server.sorted_keys import SortedKeys

# A group at least this fraction of all entries is walked in the ids' order rather than sorted.
SORT_GROUPS_BELOW = 1 / 16
# Larger groups' sorted ids are kept for the snapshot; so at most one per this many entries.
CACHE_GROUPS_ABOVE = 256


class EntryKeys:
    """Sorted ids of index groups, kept for one snapshot (paging through it sorts each once).
    Used from listing threads: a race between two of them at most sorts a group twice."""

    def __init__(self) -> None:
        # One attribute, read and replaced whole: a thread never files one snapshot's group
        # under another's.
        self._cache: tuple[EntryIndex | None, dict[tuple[str, str], tuple[str, ...]]] = (None, {})

    def keys(self, index: EntryIndex, spiffe_id: str, parent_id: str) -> SortedKeys | Sequence[str]:
        """The ids, in order, that hold every entry with this SPIFFE ID and parent ("": any)."""
        cached, groups = self._cache
        if cached is not index:
            groups = {}
            self._cache = (index, groups)
        named: list[tuple[str, str, Sequence[Entry]]] = []
        if spiffe_id:
            named.append(("spiffe_id", spiffe_id, index.by_spiffe_id.get(spiffe_id, ())))
        if parent_id:
            named.append(("parent_id", parent_id, index.by_parent.get(parent_id, ())))
        if not named:
            return index.sorted_ids
        kind, value, group = min(named, key=lambda n: len(n[2]))
        if len(group) > 1 and len(group) >= len(index.by_id) * SORT_GROUPS_BELOW:
            return index.sorted_ids
        if len(group) <= CACHE_GROUPS_ABOVE:  # cheaper sorted again than kept
            return _sorted_ids(group)
        keys = groups.get((kind, value))
        if keys is None:
            keys = groups[(kind, value)] = _sorted_ids(group)
        return keys


def _sorted_ids(group: Sequence[Entry]) -> tuple[str, ...]:
    return tuple(sorted(e.id for e in group))
