"""JWT-SVIDs minted by the server, cached per (SPIFFE ID, sorted audiences) until half life."""

from __future__ import annotations

import asyncio
from collections import OrderedDict
from collections.abc import Sequence

from agent_attestor.signer import MintedJwt, SvidSigner
from svid._clock import Clock

Key = tuple[str, tuple[str, ...]]


def audience_key(audience: Sequence[str]) -> tuple[str, ...]:
    """The audiences as a set, in a canonical order: ["b", "a"] and ["a", "b", "a"] are one."""
    if len(audience) == 1:  # nearly every request: nothing to sort or deduplicate
        return (audience[0],)
    return tuple(sorted(set(audience)))


class JwtCache:
    """Tokens are served from here until half their lifetime has passed, then minted anew."""

    def __init__(self, signer: SvidSigner, clock: Clock, max_entries: int = 4096) -> None:
        self._signer = signer
        self._clock = clock
        self._max = max_entries
        # key -> (token, the moment it stops being handed out): the refresh point is computed
        # once at insertion, so a hit costs one clock read and one comparison.
        self._tokens: OrderedDict[Key, tuple[MintedJwt, float]] = OrderedDict()
        self._pending: dict[Key, asyncio.Future[MintedJwt]] = {}
        self.mints = 0

    @staticmethod
    def key(spiffe_id: str, audience: Sequence[str]) -> Key:
        return (spiffe_id, audience_key(audience))

    def cached(self, spiffe_id: str, audience: Sequence[str]) -> MintedJwt | None:
        """A fresh token for (ID, audiences) if one is held; never mints."""
        return self._hit((spiffe_id, audience_key(audience)))

    def _hit(self, key: Key) -> MintedJwt | None:
        held = self._tokens.get(key)
        if held is not None and self._clock.now() < held[1]:
            self._tokens.move_to_end(key)
            return held[0]
        return None

    async def get(self, spiffe_id: str, audience: Sequence[str], entry_id: str) -> MintedJwt:
        """A token for (ID, audiences): from the cache, or minted once even under concurrency."""
        key = (spiffe_id, audience_key(audience))
        hit = self._hit(key)
        if hit is not None:
            return hit
        pending = self._pending.get(key)
        if pending is not None:
            return await asyncio.shield(pending)
        fut: asyncio.Future[MintedJwt] = asyncio.get_running_loop().create_future()
        self._pending[key] = fut
        try:
            jwt = await self._signer.new_jwt(spiffe_id, list(key[1]), entry_id)
        except asyncio.CancelledError:
            fut.cancel()
            raise
        except Exception as exc:
            fut.set_exception(exc)
            fut.exception()  # mark retrieved: waiters (if any) re-raise it themselves
            raise
        finally:
            self._pending.pop(key, None)
        fut.set_result(jwt)
        self.mints += 1
        self._tokens[key] = (jwt, jwt.issued_at + (jwt.expires_at - jwt.issued_at) / 2)
        self._tokens.move_to_end(key)
        while len(self._tokens) > self._max:
            self._tokens.popitem(last=False)
        return jwt

    def forget(self, spiffe_ids: set[str] | None = None) -> None:
        """Drop cached tokens (all, or of these IDs): after an entry is removed or revoked."""
        if spiffe_ids is None:
            self._tokens.clear()
            return
        for key in [k for k in self._tokens if k[0] in spiffe_ids]:
            del self._tokens[key]
