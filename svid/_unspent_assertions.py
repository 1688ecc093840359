"""The task JWT-SVIDs ``svid.mcp.oauth_auth`` presents to svidd's token endpoint: never one it
presented there already.

svidd takes a task JWT-SVID for one token per resource (a stolen spent one buys nothing), and
the task hands out the same one for a while (its cache, and the agent's, until half its life).
The MCP SDK's client asks the token endpoint again for the one resource it serves: after a 403
``insufficient_scope`` (a step-up to the tool named) and once its token expires. With the same
JWT-SVID each of those was refused as a replay; here it is then one the agent mints anew
(``task.jwt(audience, fresh=True)``, within the runtime's minting rate).
"""

from __future__ import annotations

import asyncio
import inspect
import math
from typing import Any

from svid._clock import Clock, SystemClock
from svid._errors import SvidError
from svid._jwt import JwtSvid

# Presented tokens are remembered until they expire: the oldest can come back. A fresh one is
# kept by the task only until a quarter of its life, and the task then asks the agent, whose
# cache still holds the first one it minted (until half that one's life) however many fresh
# ones were presented since: a count of the last few forgot it after as many step-ups, and it
# was presented again, a replay. This bound only caps memory (the uid's minting rate bounds
# how many a runtime presents in a token's life).
SPENT_KEPT = 1024
# Kept this long past their exp: exp is the issuer's clock, and this host's may run ahead of it
# while the agent (on its own clock) still hands the token out.
EXPIRED_KEPT = 300.0


class UnspentAssertions:
    """The SDK's ``assertion_provider`` for one resource: ``task``'s JWT-SVID for the issuer,
    minted anew when the one it hands out was presented here before. ``task``: an
    ``AsyncTask``, or a ``Task`` (asked on a thread: its call blocks)."""

    def __init__(self, task: Any, clock: Clock | None = None) -> None:
        self._jwt = task.jwt
        self._sync = not inspect.iscoroutinefunction(self._jwt)
        self._clock = clock or SystemClock()
        self._presented: dict[str, float] = {}  # token -> its exp (inf: not read), in order

    async def __call__(self, audience: str, resource: str) -> str:
        del resource  # the token request names it (RFC 8707); the JWT-SVID is for svidd
        self._forget_expired()
        token = await self._ask(audience)
        if token in self._presented:
            # Presented, so maybe spent (or left unspent by an invalid_scope refusal: this side
            # cannot tell which); a fresh one costs only a mint.
            token = await self._ask(audience, fresh=True)
        self._presented[token] = _expiry(token)
        while len(self._presented) > SPENT_KEPT:
            del self._presented[next(iter(self._presented))]
        return token

    def _forget_expired(self) -> None:
        # An expired token is never handed out again (nor taken by svidd).
        now = self._clock.now() - EXPIRED_KEPT
        for token in [t for t, exp in self._presented.items() if exp <= now]:
            del self._presented[token]

    async def _ask(self, audience: str, *, fresh: bool = False) -> str:
        # Plain asks as before (a task-like object without `fresh` keeps working).
        args: dict[str, Any] = {"fresh": True} if fresh else {}
        if self._sync:
            return str(await asyncio.to_thread(self._jwt, audience, **args))
        return str(await self._jwt(audience, **args))


def _expiry(token: str) -> float:
    try:
        return float(JwtSvid.parse_insecure(token).expires_at)
    except SvidError:
        return math.inf  # not a JWT we can read: kept until the cap drops it
