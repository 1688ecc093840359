"""What a run of changes means for one agent's entries: a pure function over the entry index.

The same decision serves a live stream (the changes dispatched to it) and a reconnecting agent
(the changes in the log since its revision). It is state-based: every entry a change may have
moved into or out of the agent's reach is judged against the current index, so applying it
twice, or after a later change, gives the same entry set as a fresh snapshot.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from dataclasses import dataclass

from server.changelog import Change
from server.datastore.records import Entry, Selector
from server.entitlement import EntryIndex, agent_parents, live


@dataclass(frozen=True, slots=True)
class EntryDelta:
    upserts: tuple[Entry, ...] = ()
    removed_ids: tuple[str, ...] = ()


def entry_delta(
    window: Sequence[Change],
    index: EntryIndex,
    *,
    agent_id: str,
    selectors: Iterable[Selector],
    server_id: str,
    now: int,
) -> EntryDelta:
    """The entries to upsert and the ids to remove on the agent after `window`.

    Costs what the window touched, plus, when a node alias the agent matches changed, the
    entries under that alias (they may have come into or gone out of reach together).
    """
    have = frozenset(selectors)
    parents = agent_parents(index, agent_id, have, server_id, now)
    aliases: set[str] = set()
    for change in window:
        for touch in change.entries:
            for version in (touch.old, touch.new):
                if (
                    version is not None
                    and version.parent_id == server_id
                    and version.selectors
                    and frozenset(version.selectors) <= have
                ):
                    aliases.add(version.spiffe_id)
    watched = parents | aliases
    candidates: dict[str, None] = {}
    for change in window:
        for touch in change.entries:
            if any(p in watched for p in touch.parents()):
                candidates[touch.id] = None
    for alias in aliases:
        for entry in index.by_parent.get(alias, ()):
            candidates[entry.id] = None
    upserts: list[Entry] = []
    removed: list[str] = []
    for entry_id in candidates:
        found = index.by_id.get(entry_id)
        if found is not None and found.parent_id in parents and live(found, now):
            upserts.append(found)
        else:
            removed.append(entry_id)
    return EntryDelta(tuple(upserts), tuple(removed))
