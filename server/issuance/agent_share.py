"""How many of a pool's threads one agent's calls may hold at once."""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import AsyncIterator


class AgentShare:
    """At most `per_agent` calls of one agent run at once; its others wait on the event loop.

    A pool of a few threads serves every agent: without a share, one agent's slow calls (task
    JWT batches, each a policy decision per item) take every thread and another agent's call
    waits behind all of them. Waiting here holds no thread. `per_agent` 0: no share.
    Event-loop only (asyncio semaphores), one loop: the node API's.
    """

    def __init__(self, per_agent: int) -> None:
        self._per_agent = per_agent
        # Per agent: its semaphore and how many of its calls hold or wait on it; dropped at 0,
        # so the agents held are those with a call under way, not every agent ever seen.
        self._agents: dict[str, tuple[asyncio.Semaphore, list[int]]] = {}

    def __len__(self) -> int:
        return len(self._agents)

    @contextlib.asynccontextmanager
    async def hold(self, agent_id: str) -> AsyncIterator[None]:
        if self._per_agent <= 0:
            yield
            return
        held = self._agents.get(agent_id)
        if held is None:
            held = (asyncio.Semaphore(self._per_agent), [0])
            self._agents[agent_id] = held
        semaphore, users = held
        users[0] += 1
        try:
            async with semaphore:
                yield
        finally:
            users[0] -= 1
            if not users[0]:
                del self._agents[agent_id]
