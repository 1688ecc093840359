"""Drop cached JWT-SVIDs of identities the agent no longer serves (a task ended or expired), and
of entries gone or changed in place.

FetchJWTSVID already refuses an identity whose entry is gone; this also frees the tokens, so a
revoked task's JWT cannot be served from the cache by any later path. The cache keys tokens by
entry too, so an entry's removal frees its tokens even while another entry holds its ID, and an
entry whose jwt_svid_ttl (or ID) changed in place has its tokens minted again: one minted under
a 3600 s TTL was otherwise served for 1800 s after the admin cut the entry to 60 s.
"""

from __future__ import annotations

from agent_attestor.cache import Cache
from agent_attestor.jwt_cache import JwtCache
from agent_attestor.model import Entry


def _minted_as(entries: tuple[Entry, ...]) -> dict[str, tuple[str, int]]:
    """Per entry ID, what a token minted under it depends on."""
    return {e.id: (e.spiffe_id, e.jwt_svid_ttl) for e in entries}


async def forget_removed_identities(cache: Cache, jwts: JwtCache) -> None:
    seen = cache.entries_version
    entries = cache.snapshot().entries
    held = {e.spiffe_id for e in entries}
    minted_as = _minted_as(entries)
    while True:
        # Entry changes only: waking on every SVID renewal made this O(entries) per renewal.
        seen = await cache.wait_entries_change(seen)
        entries = cache.snapshot().entries
        now_held = {e.spiffe_id for e in entries}
        gone = held - now_held
        if gone:
            jwts.forget(gone)
        now_minted_as = _minted_as(entries)
        stale = {eid for eid, was in minted_as.items() if now_minted_as.get(eid) != was}
        if stale:
            jwts.forget_entries(stale)
        held, minted_as = now_held, now_minted_as
