"""JWT-SVIDs minted by the server, cached per (SPIFFE ID, sorted audiences, entry) until half life.

The entry is in the key because the token is minted with its entry's jwt_svid_ttl: two entries
of one ID may give it different lifetimes, and a workload is never handed the token minted for
another's entry (one with a 60 s TTL was handed the 3600 s token of another).

Bounded twice, least recently used out first: by count, and by bytes, because one token can be
thousands of times the size of another (issue 11: big audiences took the agent from 77 to 804 MB).

Each uid has a share of both bounds (agent_attestor/uid_shares.py). Without one, a uid asking
for ever-new audiences at its minting rate (100/s) pushed every other workload's tokens out of a
full cache within about 40 s, and each had to be minted again, on its own budget. An entry
belongs to the uid whose mint inserted it.
"""

from __future__ import annotations

import asyncio
import sys
from collections import OrderedDict
from collections.abc import Callable, Sequence

from agent_attestor.errors import MintRefusedError
from agent_attestor.signer import MintedJwt, SvidSigner
from agent_attestor.uid_shares import UidShares, uid_share
from svid._clock import Clock, ElapsedClock
from svid._errors import JwtSvidError
from svid._jwt import split_token
from svid._limits import utf8_size

# (SPIFFE ID, audience_key, entry id)
Key = tuple[str, tuple[str, ...], str]
DEFAULT_MAX_BYTES = 16 * 1024 * 1024
# The objects around one cached token's strings (key and value tuples, the dict slot, the
# MintedJwt, str headers); measured with tracemalloc on CPython 3.11: 1,105 bytes held per entry
# of a 606-byte token, a 30-byte ID and a 10-byte audience, and 38 more since the entry is on its
# uid's books too (a second dict slot, the owner in the value tuple).
ENTRY_OVERHEAD = 500


def entry_size(key: Key, jwt: MintedJwt, jti: str = "") -> int:
    """What one cached token costs, counted against the cache's byte budget."""
    spiffe_id, audience, entry_id = key
    return (
        ENTRY_OVERHEAD
        + len(jwt.token)  # compact JWS: ASCII
        + utf8_size(spiffe_id)
        + utf8_size(entry_id)  # the entry's own string, but kept alive by the key once it goes
        + sum(utf8_size(a) for a in audience)
        + (sys.getsizeof(jti) if jti else 0)  # a str of its own, kept beside the token
    )


def refresh_point(jwt: MintedJwt, asked_at: float) -> float:
    """When a token stops being handed out and a new one is minted, on the agent's monotonic
    clock: half its life (SPIFFE.md) after the agent asked for it. Its iat and exp are the
    server's clock, and reading them on the agent's served it past exp (agent behind) or never
    from the cache (agent ahead): only exp - iat, a difference on one clock, is taken from it.
    The server's iat is no earlier than the ask, so the exp it maps to on this clock, asked_at +
    lifetime, is no later than the true one, and the refresh point is before it; a lifetime that
    is not positive is never handed out again (as svid's task cache, `fresh`). Monotonic, not
    wall: an NTP step back of the agent's wall clock stretched the interval by the step, and
    the token was served that long past its exp."""
    return asked_at + max(0.0, jwt.expires_at - jwt.issued_at) / 2


def token_ids(jwt: MintedJwt) -> tuple[str, str]:
    """The token's `jti` and the `kid` of the key that signed it ("" for one it lacks): what
    a revocation, and a bundle losing that key, name. The kid is interned: a handful of keys
    sign every token held."""
    try:
        parsed = split_token(jwt.token)
    except JwtSvidError:
        return "", ""
    jti, kid = parsed.claims.get("jti"), parsed.header.get("kid")
    return (
        jti if isinstance(jti, str) else "",
        sys.intern(kid) if isinstance(kid, str) else "",
    )


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
        share: tuple[int, int] | None = None,
    ) -> None:
        """`share`: (entries, bytes) of each uid, uid_share's unless given (tests)."""
        self._signer = signer
        # Half a token's life is an interval: counted on the monotonic clock, which no NTP step
        # moves, and which here also counts a sleep of the host (ElapsedClock).
        self._clock = ElapsedClock(clock)
        self._max = max_entries
        self._max_bytes = max_bytes
        self._shares: UidShares[Key] = UidShares(share or uid_share(max_entries, max_bytes))
        # key -> (token, the moment it stops being handed out, its entry_size, its jti, the uid
        # that owns it, the kid that signed it): the refresh point is computed once at
        # insertion, so a hit costs one clock read and one comparison.
        self._tokens: OrderedDict[Key, tuple[MintedJwt, float, int, str, int, str]] = OrderedDict()
        self._bytes = 0
        self._pending: dict[Key, asyncio.Future[MintedJwt]] = {}
        # Mints whose identity was forgotten while they were out: their token is not kept.
        self._void: set[asyncio.Future[MintedJwt]] = set()
        self.mints = 0
        # Bumped whenever a held token is dropped (evicted, replaced, forgotten): whoever keeps
        # something built from held tokens knows by it that they may be gone.
        self.generation = 0

    @property
    def clock(self) -> Clock:
        """The clock the refresh points (`refresh_at`) are on."""
        return self._clock

    @staticmethod
    def key(spiffe_id: str, audience: Sequence[str], entry_id: str) -> Key:
        return (spiffe_id, audience_key(audience), entry_id)

    def cached(
        self,
        spiffe_id: str,
        audience: Sequence[str],
        entry_id: str,
        revoked: frozenset[str] = frozenset(),
    ) -> MintedJwt | None:
        """A fresh token for (ID, audiences, entry) if one is held; never mints. One whose jti is in
        `revoked` is dropped: the server revokes a task's tokens before its entry leaves the
        agent (a later Sync message), and the agent must not hand out what it knows revoked."""
        key = (spiffe_id, audience_key(audience), entry_id)
        if revoked:
            held = self._tokens.get(key)
            if held is not None and held[3] in revoked:
                self._drop(key)
                return None
        return self._hit(key)

    def _hit(self, key: Key) -> MintedJwt | None:
        held = self._tokens.get(key)
        if held is not None and self._clock.monotonic() < held[1]:
            self._tokens.move_to_end(key)
            return held[0]
        return None

    async def get(
        self,
        spiffe_id: str,
        audience: Sequence[str],
        entry_id: str,
        uid: int,
        admit: Callable[[], str | None] | None = None,
    ) -> MintedJwt:
        """A token for (ID, audiences) through `entry_id`: from the cache, or minted once even
        under concurrency. `uid` is the caller's: a token minted for it is counted in its share.
        `admit`, asked only when this caller is the one to start a mint (not when it waits for
        another's), says why it may not (MintRefusedError), or None."""
        key = (spiffe_id, audience_key(audience), entry_id)
        hit = self._hit(key)
        if hit is not None:
            return hit
        while (pending := self._pending.get(key)) is not None:
            # asyncio.wait leaves `pending` alone when this caller is cancelled, as shield did.
            await asyncio.wait((pending,))
            if not pending.cancelled():
                return pending.result()
            # Its minting caller went away, not this one: mint here (or wait for who does now).
        refusal = admit() if admit is not None else None
        if refusal is not None:
            raise MintRefusedError(refusal)
        fut: asyncio.Future[MintedJwt] = asyncio.get_running_loop().create_future()
        self._pending[key] = fut
        asked_at = self._clock.monotonic()
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
        self._insert(key, jwt, uid, asked_at)
        return jwt

    async def fresh(
        self,
        spiffe_id: str,
        audience: Sequence[str],
        entry_id: str,
        admit: Callable[[], str | None],
    ) -> MintedJwt:
        """A token for (ID, audiences) through `entry_id` minted anew, neither read from the
        cache nor kept in it (what is held stays what FetchJWTSVID hands out). `admit` is asked
        first, as for a mint `get` starts: each is a mint the server counts against this agent."""
        refusal = admit()
        if refusal is not None:
            raise MintRefusedError(refusal)
        jwt = await self._signer.new_jwt(spiffe_id, list(audience_key(audience)), entry_id)
        self.mints += 1
        return jwt

    def refresh_at(self, key: Key, jwt: MintedJwt) -> float:
        """The refresh point of `jwt` if it is the token held for `key`; else now (an answer
        built on a token not held is not served again)."""
        held = self._tokens.get(key)
        if held is not None and held[0] is jwt:
            return held[1]
        return self._clock.monotonic()

    def _insert(self, key: Key, jwt: MintedJwt, uid: int, asked_at: float) -> None:
        jti, kid = token_ids(jwt)
        size = entry_size(key, jwt, jti)
        self._tokens[key] = (jwt, refresh_point(jwt, asked_at), size, jti, uid, kid)
        self._bytes += size
        self._shares.add(uid, key, size)
        # A token bigger than the whole budget is handed out but not kept (it evicts itself,
        # its uid being past its share, after that uid's older ones).
        while self._tokens and (len(self._tokens) > self._max or self._bytes > self._max_bytes):
            lru = next(iter(self._tokens))
            self._drop(self._shares.victim(uid, lru, self._tokens[lru][4]))

    def still_held(self, tokens: Sequence[tuple[Key, MintedJwt]]) -> bool:
        """Whether each key still holds that very token (none dropped, refreshed or replaced
        since); if so they are marked used, as a hit does."""
        held = self._tokens
        for key, jwt in tokens:
            entry = held.get(key)
            if entry is None or entry[0] is not jwt:
                return False
        for key, _ in tokens:
            held.move_to_end(key)
        return True

    @property
    def bytes(self) -> int:
        """What the cached tokens cost, as counted against the byte budget (entry_size)."""
        return self._bytes

    def __len__(self) -> int:
        return len(self._tokens)

    def _drop(self, key: Key) -> None:
        held = self._tokens.pop(key, None)
        if held is None:
            return
        _, _, size, _, uid, _ = held
        self._bytes -= size
        self.generation += 1
        self._shares.remove(uid, key, size)

    def forget_under(self, prefix: str) -> None:
        """Drop cached tokens of every ID that begins with `prefix` (a runtime's tasks)."""
        self.forget({k[0] for k in (*self._tokens, *self._pending) if k[0].startswith(prefix)})

    def _void_pending(self, which: Callable[[Key], bool]) -> None:
        """Mints still out for the keys `which` picks: their callers get the token, but it is
        not kept, and later callers do not wait for it."""
        for key, fut in list(self._pending.items()):
            if which(key):
                del self._pending[key]
                self._void.add(fut)
                self.generation += 1

    def forget_entries(self, entry_ids: set[str]) -> None:
        """Drop cached tokens minted under these entries, and keep none of theirs still being
        minted: the entry is gone, or changed in place (its jwt_svid_ttl cut, its ID changed),
        so a token minted under it may outlive what the entry now allows."""
        self._void_pending(lambda key: key[2] in entry_ids)
        for key in [k for k in self._tokens if k[2] in entry_ids]:
            self._drop(key)

    def forget_kids(self, kids: frozenset[str]) -> None:
        """Drop cached tokens signed by these keys, which left the trust bundle (the server
        forgot or removed them): served until half their life, they verified nowhere. A mint
        still out is not kept either (its key is known only once it is back, and the server
        may have signed it with one of these just before), though its callers get it."""
        self._void_pending(lambda _key: True)
        for key in [k for k, held in self._tokens.items() if held[5] in kids]:
            self._drop(key)

    def forget(self, spiffe_ids: set[str] | None = None) -> None:
        """Drop cached tokens (all, or of these IDs): after an entry is removed or revoked.
        A mint of theirs still out is not kept when it comes back, and later callers do not
        wait for it: the task may have ended after the server signed it."""
        self._void_pending(lambda key: spiffe_ids is None or key[0] in spiffe_ids)
        if spiffe_ids is None:
            self._tokens.clear()
            self._bytes = 0
            self._shares.clear()
            self.generation += 1
            return
        for key in [k for k in self._tokens if k[0] in spiffe_ids]:
            self._drop(key)
