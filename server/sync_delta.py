"""What a run of changes means for one agent's entries: a pure function over the entry index.

The same decision serves a live stream (the changes dispatched to it) and a reconnecting agent
(the changes in the log since its revision). It is state-based: every entry a change may have
moved into or out of the agent's reach is judged against the current index, so applying it
twice, or after a later change, gives the same entry set as a fresh snapshot.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass

from server.changelog import Change
from server.datastore.records import Entry, Selector
from server.entitlement import EntryIndex, agent_parents, live

# What a snapshot costs beyond its entries and revocations (the bundle, the CRLs, the audit
# checkpoints), in window items: a window lighter than the snapshot plus this is a delta.
SNAPSHOT_BASE = 1000


def outweighs(window: Sequence[Change], snapshot_size: int) -> bool:
    """Whether building a delta from `window` costs more than a snapshot of `snapshot_size`
    entries and revocations: each change weighs one, plus its entry touches and revocations.
    Stops counting once it does, so the answer costs no more than the snapshot would."""
    bound = snapshot_size + SNAPSHOT_BASE
    weight = 0
    for change in window:
        weight += (
            1
            + len(change.entries)
            + len(change.revocations_added)
            + len(change.revocations_removed)
        )
        if weight > bound:
            return True
    return False


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

    Costs what the window touched, plus, when the agent gained or lost a node alias, the entries
    under that alias (they came into or went out of reach together). An alias edit that leaves
    the agent's reach as it was (a TTL or DNS-name edit, a selector edit it still matches) costs
    no more than the edit.
    """
    have = frozenset(selectors)
    parents = agent_parents(index, agent_id, have, server_id, now)

    def matched(version: Entry | None) -> bool:
        return (
            version is not None
            and version.parent_id == server_id
            and bool(version.selectors)
            and frozenset(version.selectors) <= have
        )

    aliases: set[str] = set()
    # Each touched entry as it was before the window: the `old` of its first touch in it.
    before: dict[str, Entry | None] = {}
    for change in window:
        for touch in change.entries:
            before.setdefault(touch.id, touch.old)
            for version in (touch.old, touch.new):
                if version is not None and matched(version):
                    aliases.add(version.spiffe_id)
    watched = parents | aliases
    candidates: dict[str, None] = {}
    for change in window:
        for touch in change.entries:
            if any(p in watched for p in touch.parents()):
                candidates[touch.id] = None
    if aliases:
        reached = _reached_before(
            aliases, before, index=index, server_id=server_id, matched=matched, now=now
        )
        for alias in aliases:
            if reached.get(alias, False) is (alias in parents):
                continue  # reached before and after, or neither: what is under it stays put
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


def _reached_before(
    aliases: set[str],
    before: Mapping[str, Entry | None],
    *,
    index: EntryIndex,
    server_id: str,
    matched: Callable[[Entry | None], bool],
    now: int,
) -> dict[str, bool | None]:
    """Whether the agent reached each of `aliases` before the window: True, False, or None when
    it cannot be told.

    The alias entries before the window are today's, with the touched ones as they were. One the
    agent matches and that is live now was live then too (liveness only runs out), so the agent
    reached it. One it matches that is no longer live may or may not have been live when the
    agent was last told: that is None, and the entries under it are sent again.
    """
    versions = [e for e in index.by_parent.get(server_id, ()) if e.id not in before]
    versions.extend(v for v in before.values() if v is not None)
    reached: dict[str, bool | None] = dict.fromkeys(aliases, False)
    for version in versions:
        if version.spiffe_id not in reached or not matched(version):
            continue
        if live(version, now):
            reached[version.spiffe_id] = True
        elif reached[version.spiffe_id] is False:
            reached[version.spiffe_id] = None
    return reached
