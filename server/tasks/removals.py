"""An agent's removal (eviction or ban) carried through to its end, on record, even when the
server doing it dies midway.

A removal is several commits: the agent's row goes (or is banned) with a Removal row stored in
the same transaction (ServerState.evict_agent / ban_agent), then the agent's tasks end, its
credentials are revoked, each revocation is logged, and only then is the Removal row deleted.
A server that died in between left the row: the housekeeping lease holder finishes it once it
is `REMOVAL_GRACE` old (younger, it may be a removal another server is still doing), as it
finishes a task end left half done (TaskService.settle_ends). Finishing is revoke_agent run
again: it does what is left and logs nothing twice. While the row stands the agent is not
admitted again (the datastore refuses it), so what a finisher lists is the removed agent's
only, never what a later admission was issued. A finish still running on this server is joined
rather than begun again; one running on another server is not seen (see the README).
"""

from __future__ import annotations

import asyncio
import logging

from server.datastore.records import Removal
from server.state import ServerState
from server.tasks.service import TaskService
from svid._clock import Clock

_log = logging.getLogger("svid.server.tasks")
# A removal begun this long ago and still stored was cut short (its server died midway).
REMOVAL_GRACE = 60


class AgentRemovals:
    def __init__(self, state: ServerState, service: TaskService, clock: Clock) -> None:
        self._state = state
        self._service = service
        self._clock = clock
        # Finishes running here, by agent: an operator's removal still running at the grace
        # is joined, not run twice (which could log its revocations twice).
        self._running: dict[str, asyncio.Future[None]] = {}

    async def carry_out(self, removal: Removal) -> None:
        """The rest of a removal just stored: revoke what the agent holds, then forget it."""
        await self._finish(removal)

    async def retried(self, agent_id: str, reason: str) -> bool:
        """An operator removing again an agent that is gone already: finish the removal under
        way, if one is stored; else whatever an older removal left (finish_removal). False,
        doing nothing, when nothing is left to do."""
        pending = await self._state.removal_of(agent_id)
        if pending is None:
            return await self._service.finish_removal(agent_id, reason)
        await self._finish(pending)
        return True

    async def finish_cut_short(self, grace: int = REMOVAL_GRACE) -> int:
        """Finish the removals begun more than `grace` seconds ago and still stored. One
        server at a time runs this (the housekeeping lease holder); returns how many it
        finished. One that fails stays stored, for the next run, and holds up no other."""
        before = int(self._clock.now()) - grace
        finished = 0
        for removal in await self._state.removals_before(before):
            _log.warning(
                "finishing an agent removal cut short",
                extra={"agent_id": removal.agent_id, "reason": removal.reason},
            )
            try:
                await self._finish(removal)
            except Exception:
                _log.exception(
                    "finishing an agent removal failed; retrying next run",
                    extra={"agent_id": removal.agent_id},
                )
            else:
                finished += 1
        return finished

    async def _finish(self, removal: Removal) -> None:
        key = removal.agent_id
        running = self._running.get(key)
        if running is None:
            running = self._running[key] = asyncio.ensure_future(self._carry(removal))
            running.add_done_callback(lambda _: self._running.pop(key, None))
        # Shielded: a caller that gives up (a hung-up operator) leaves the finish running.
        await asyncio.shield(running)

    async def _carry(self, removal: Removal) -> None:
        await self._service.revoke_agent(removal.agent_id, removal.reason, banned=removal.banned)
        await self._state.end_removal(removal)
