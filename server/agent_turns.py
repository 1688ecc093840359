"""How many of one agent's calls of a kind run at once, how many more may wait, and none past.

A pool of a few threads serves every agent: without turns, one agent's slow calls (task JWT
batches, task listings, task ends) take every thread, and another agent's call waits behind
all of them. Waiting here holds no thread. Event-loop only (asyncio semaphores), one loop.
"""

from __future__ import annotations

import asyncio
import logging
from collections import Counter
from collections.abc import AsyncIterator, Awaitable, Callable
from contextlib import asynccontextmanager
from typing import Any, TypeVar

from server.errors import RateLimitedError
from svid._held import to_its_end

_T = TypeVar("_T")

_log = logging.getLogger("svid.server")


class AgentTurns:
    """An agent's calls of one kind: `running` at once (0: no bound), `waiting` more queued for
    a turn (None: no bound), and RESOURCE_EXHAUSTED past those."""

    def __init__(self, what: str, running: int, waiting: int | None = None) -> None:
        self._what = what
        self._running = running
        self._limit = None if waiting is None else running + waiting
        # Per agent, dropped at 0: the agents held are those with a call under way or waiting,
        # not every agent ever seen.
        self._held: Counter[str] = Counter()
        self._turns: dict[str, asyncio.Semaphore] = {}
        # What `run` started and is not done, its caller gone or not: `drain` waits for them.
        self._works: set[asyncio.Future[Any]] = set()

    def __len__(self) -> int:
        return len(self._held)

    @asynccontextmanager
    async def hold(self, agent_id: str) -> AsyncIterator[None]:
        if self._running <= 0:
            yield
            return
        if self._limit is not None and self._held[agent_id] >= self._limit:
            raise RateLimitedError(
                f"this agent has {self._limit} {self._what} under way or waiting: "
                "retry once some have answered"
            )
        self._held[agent_id] += 1
        turn = self._turns.setdefault(agent_id, asyncio.Semaphore(self._running))
        try:
            async with turn:
                yield
        finally:
            self._held[agent_id] -= 1
            if not self._held[agent_id]:
                del self._held[agent_id]
                del self._turns[agent_id]

    async def run(self, agent_id: str, work: Callable[[], Awaitable[_T]]) -> _T:
        """`work()` within one of the agent's turns, the turn held until the work ends.

        A caller cancelled (its client hung up, its deadline passed) while the work runs does
        not leave at once: the work runs on (threads it started cannot be stopped, and an end
        cut short leaves its task ended but not yet revoked), and a turn given back now would
        let a caller that hangs up and calls again run any number of them at once. So the
        cancellation is kept until the work is done, then raised; a failure of the work is
        logged then, the caller being gone. A server stopping waits for it (`drain`)."""
        async with self.hold(agent_id):
            task = asyncio.ensure_future(work())
            self._works.add(task)
            task.add_done_callback(self._works.discard)

            def orphaned(failure: BaseException) -> None:
                _log.error(
                    "%s: the work of a call whose caller left failed",
                    self._what,
                    exc_info=failure,
                    extra={"agent_id": agent_id},
                )

            return await to_its_end(task, orphaned=orphaned)

    async def drain(self) -> None:
        """Wait until the work `run` started is done, that of callers gone included: a server
        stopping (its calls cancelled, none coming) closes what that work uses, the datastore,
        only then, not under an end half done."""
        while self._works:
            await asyncio.wait(set(self._works))

    def held(self, agent_id: str) -> int:
        """Calls of the agent under way or waiting."""
        return self._held[agent_id]
