"""Drop cached JWT-SVIDs of identities the agent no longer serves (a task ended or expired).

FetchJWTSVID already refuses an identity whose entry is gone; this also frees the tokens, so a
revoked task's JWT cannot be served from the cache by any later path.
"""

from __future__ import annotations

from agent_attestor.cache import Cache
from agent_attestor.jwt_cache import JwtCache


async def forget_removed_identities(cache: Cache, jwts: JwtCache) -> None:
    seen = cache.entries_version
    held = {e.spiffe_id for e in cache.snapshot().entries}
    while True:
        # Entry changes only: waking on every SVID renewal made this O(entries) per renewal.
        seen = await cache.wait_entries_change(seen)
        now_held = {e.spiffe_id for e in cache.snapshot().entries}
        gone = held - now_held
        if gone:
            jwts.forget(gone)
        held = now_held
