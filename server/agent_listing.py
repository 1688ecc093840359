"""Which agent ids a ListAgents page walks, in order: the selector index groups its filter names,
and only the range of ids a SPIFFE ID prefix covers.

Walking every agent id and testing each was the only way before: 100k of them per filtered
call. Each group is kept sorted per change (server/agent_index.py), so nothing here sorts.
"""

from __future__ import annotations

import heapq
import itertools
from collections.abc import Iterator

from server.agent_index import AgentIndex, Group
from server.listing import SelectorFilter, keys_after
from svid._proto import admin_pb2


def agent_ids(
    agents: AgentIndex, selectors: SelectorFilter, prefix: str, after: str
) -> Iterator[str]:
    """The ids after `after` ("": all), in order, that hold every agent the filters keep (and
    maybe others: the caller still tests each)."""
    if not selectors.selectors:
        return _in_range(agents.sorted_ids, prefix, after)
    groups = [agents.by_selector.get(s, ()) for s in selectors.selectors]
    if selectors.match == admin_pb2.SELECTOR_MATCH_ANY:
        # Each group in order, merged: an agent holding two of the selectors comes twice.
        merged = heapq.merge(*(_in_range(g, prefix, after) for g in groups))
        return (key for key, _ in itertools.groupby(merged))
    # Every selector must be held: the smallest group holds every match.
    return _in_range(min(groups, key=len), prefix, after)


def _in_range(keys: Group, prefix: str, after: str) -> Iterator[str]:
    """The keys after `after` that lie under `prefix` (path-segment aware, as
    listing.under_prefix): `prefix` itself, then the keys from `prefix + "/"` up to
    `prefix + "0"` ("0" follows "/"), a contiguous run in order. The keys between `prefix` and
    `prefix + "/"` are never under it (".../a-x", ".../a.x": "-" and "." sort before "/"), and
    a sibling such as .../cluster-eu may hold many: the walk skips them."""
    if not prefix:
        return keys_after(keys, after)
    child = prefix + "/"
    head = tuple(k for k in (prefix, child) if after < k and k in keys)
    end = prefix + "0"
    rest = keys_after(keys, max(after, child))
    return itertools.takewhile(lambda k: k < end, itertools.chain(head, rest))
