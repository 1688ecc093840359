"""JWT-SVIDs minted by the server, cached per (SPIFFE ID, sorted audiences) until half life."""

from __future__ import annotations

import asyncio
from collections import OrderedDict

from agent_attestor.signer import MintedJwt, SvidSigner
from svid._clock import Clock

Key = tuple[str, tuple[str, ...]]


class JwtCache:
    def __init__(self, signer: SvidSigner, clock: Clock, max_entries: int = 4096) -> None:
        self._signer = signer
        self._clock = clock
        self._max = max_entries
        self._tokens: OrderedDict[Key, MintedJwt] = OrderedDict()
        self._pending: dict[Key, asyncio.Future[MintedJwt]] = {}
        self.mints = 0

    @staticmethod
    def key(spiffe_id: str, audience: list[str] | tuple[str, ...]) -> Key:
        return (spiffe_id, tuple(sorted(set(audience))))

    def _fresh(self, jwt: MintedJwt) -> bool:
        return self._clock.now() < jwt.issued_at + (jwt.expires_at - jwt.issued_at) / 2

    def cached(self, spiffe_id: str, audience: list[str] | tuple[str, ...]) -> MintedJwt | None:
        key = self.key(spiffe_id, audience)
        jwt = self._tokens.get(key)
        if jwt is not None and self._fresh(jwt):
            self._tokens.move_to_end(key)
            return jwt
        return None

    async def get(self, spiffe_id: str, audience: list[str], entry_id: str) -> MintedJwt:
        """A token for (ID, audiences): from the cache, or minted once even under concurrency."""
        hit = self.cached(spiffe_id, audience)
        if hit is not None:
            return hit
        key = self.key(spiffe_id, audience)
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
        self._tokens[key] = jwt
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
