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
from collections import deque
from typing import Any

# Presented tokens remembered: the task hands out its newest or, once that is past a quarter
# of its life, the agent's, so only the last few can come back.
SPENT_KEPT = 8


class UnspentAssertions:
    """The SDK's ``assertion_provider`` for one resource: ``task``'s JWT-SVID for the issuer,
    minted anew when the one it hands out was presented here before. ``task``: an
    ``AsyncTask``, or a ``Task`` (asked on a thread: its call blocks)."""

    def __init__(self, task: Any) -> None:
        self._jwt = task.jwt
        self._sync = not inspect.iscoroutinefunction(self._jwt)
        self._presented: deque[str] = deque(maxlen=SPENT_KEPT)

    async def __call__(self, audience: str, resource: str) -> str:
        del resource  # the token request names it (RFC 8707); the JWT-SVID is for svidd
        token = await self._ask(audience)
        if token in self._presented:
            # Presented, so maybe spent (or left unspent by an invalid_scope refusal: this side
            # cannot tell which); a fresh one costs only a mint.
            token = await self._ask(audience, fresh=True)
        self._presented.append(token)
        return token

    async def _ask(self, audience: str, *, fresh: bool = False) -> str:
        # Plain asks as before (a task-like object without `fresh` keeps working).
        args: dict[str, Any] = {"fresh": True} if fresh else {}
        if self._sync:
            return str(await asyncio.to_thread(self._jwt, audience, **args))
        return str(await self._jwt(audience, **args))
