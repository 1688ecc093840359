"""JWT-SVIDs minted by the server, cached per (SPIFFE ID, sorted audiences) until half life.

Bounded twice, least recently used out first: by count, and by bytes, because one token can be
thousands of times the size of another (issue 11: big audiences took the agent from 77 to 804 MB).
"""

from __future__ import annotations

import asyncio
import sys
from collections import OrderedDict
from collections.abc import Iterable, Sequence

from agent_attestor.signer import MintedJwt, SvidSigner
from svid._clock import Clock
from svid._errors import JwtSvidError
from svid._jwt import split_token
from svid._limits import utf8_size

Key = tuple[str, tuple[str, ...]]
DEFAULT_MAX_BYTES = 16 * 1024 * 1024
# The objects around one cached token's strings (key and value tuples, the dict slot, the
# MintedJwt, str headers); measured with tracemalloc on CPython 3.11: 1,105 bytes held per entry
# of a 606-byte token, a 30-byte ID and a 10-byte audience.
ENTRY_OVERHEAD = 460


def entry_size(key: Key, jwt: MintedJwt, jti: str = "") -> int:
    """What one cached token costs, counted against the cache's byte budget."""
    spiffe_id, audience = key
    return (
        ENTRY_OVERHEAD
        + len(jwt.token)  # compact JWS: ASCII
        + utf8_size(spiffe_id)
        + sum(utf8_size(a) for a in audience)
        + (sys.getsizeof(jti) if jti else 0)  # a str of its own, kept beside the token
    )


def refresh_point(jwt: MintedJwt) -> float:
    """When a token stops being handed out and a new one is minted: half its life (SPIFFE.md),
    and never past its exp, whatever its issued_at says (as svid's task cache)."""
    return min(jwt.expires_at, jwt.issued_at + (jwt.expires_at - jwt.issued_at) / 2)


def token_id(jwt: MintedJwt) -> str:
    """The token's `jti` ("" if it has none): what a revocation of it names."""
    try:
        jti = split_token(jwt.token).claims.get("jti")
    except JwtSvidError:
        return ""
    return jti if isinstance(jti, str) else ""


def audience_key(audience: Sequence[str]) -> tuple[str, ...]:
    """The audiences as a set, in a canonical order: ["b", "a"] and ["a", "b", "a"] are one."""
    if len(audience) == 1:  # nearly every request: nothing to sort or deduplicate
        return (audience[0],)
    return tuple(sorted(set(audience)))


class JwtCache:
    """Tokens are served from here until half their lifetime has passed, then minted anew."""

    def __init__(
        self,
        signer: SvidSigner,
        clock: Clock,
        max_entries: int = 4096,
        max_bytes: int = DEFAULT_MAX_BYTES,
    ) -> None:
        self._signer = signer
        self._clock = clock
        self._max = max_entries
        self._max_bytes = max_bytes
        # key -> (token, the moment it stops being handed out, its entry_size, its jti): the
        # refresh point is computed once at insertion, so a hit costs one clock read and one
        # comparison.
        self._tokens: OrderedDict[Key, tuple[MintedJwt, float, int, str]] = OrderedDict()
        self._bytes = 0
        self._pending: dict[Key, asyncio.Future[MintedJwt]] = {}
        # Mints whose identity was forgotten while they were out: their token is not kept.
        self._void: set[asyncio.Future[MintedJwt]] = set()
        self.mints = 0
        # Bumped whenever a held token is dropped (evicted, replaced, forgotten): whoever keeps
        # something built from held tokens knows by it that they may be gone.
        self.generation = 0

    @staticmethod
    def key(spiffe_id: str, audience: Sequence[str]) -> Key:
        return (spiffe_id, audience_key(audience))

    def cached(
        self, spiffe_id: str, audience: Sequence[str], revoked: frozenset[str] = frozenset()
    ) -> MintedJwt | None:
        """A fresh token for (ID, audiences) if one is held; never mints. One whose jti is in
        `revoked` is dropped: the server revokes a task's tokens before its entry leaves the
        agent (a later Sync message), and the agent must not hand out what it knows revoked."""
        key = (spiffe_id, audience_key(audience))
        if revoked:
            held = self._tokens.get(key)
            if held is not None and held[3] in revoked:
                self._drop(key)
                return None
        return self._hit(key)

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
        while (pending := self._pending.get(key)) is not None:
            # asyncio.wait leaves `pending` alone when this caller is cancelled, as shield did.
            await asyncio.wait((pending,))
            if not pending.cancelled():
                return pending.result()
            # Its minting caller went away, not this one: mint here (or wait for who does now).
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
            if self._pending.get(key) is fut:
                del self._pending[key]
            forgotten = fut in self._void
            self._void.discard(fut)
        fut.set_result(jwt)
        self.mints += 1
        if forgotten:
            # Asked for before the forget, so handed to those callers; never to a later one.
            return jwt
        self._drop(key)
        jti = token_id(jwt)
        size = entry_size(key, jwt, jti)
        self._tokens[key] = (jwt, refresh_point(jwt), size, jti)
        self._bytes += size
        # A token bigger than the whole budget is handed out but not kept (it evicts itself).
        while self._tokens and (len(self._tokens) > self._max or self._bytes > self._max_bytes):
            _, (_, _, gone, _) = self._tokens.popitem(last=False)
            self._bytes -= gone
            self.generation += 1
        return jwt

    def touch(self, keys: Iterable[Key]) -> None:
        """Mark these tokens used, as a hit does (something built from them was served)."""
        tokens = self._tokens
        for key in keys:
            if key in tokens:
                tokens.move_to_end(key)

    @property
    def bytes(self) -> int:
        """What the cached tokens cost, as counted against the byte budget (entry_size)."""
        return self._bytes

    def __len__(self) -> int:
        return len(self._tokens)

    def _drop(self, key: Key) -> None:
        held = self._tokens.pop(key, None)
        if held is not None:
            self._bytes -= held[2]
            self.generation += 1

    def forget_under(self, prefix: str) -> None:
        """Drop cached tokens of every ID that begins with `prefix` (a runtime's tasks)."""
        self.forget({k[0] for k in (*self._tokens, *self._pending) if k[0].startswith(prefix)})

    def forget(self, spiffe_ids: set[str] | None = None) -> None:
        """Drop cached tokens (all, or of these IDs): after an entry is removed or revoked.
        A mint of theirs still out is not kept when it comes back, and later callers do not
        wait for it: the task may have ended after the server signed it."""
        for key, fut in list(self._pending.items()):
            if spiffe_ids is None or key[0] in spiffe_ids:
                del self._pending[key]
                self._void.add(fut)
                self.generation += 1
        if spiffe_ids is None:
            self._tokens.clear()
            self._bytes = 0
            self.generation += 1
            return
        for key in [k for k in self._tokens if k[0] in spiffe_ids]:
            self._drop(key)
