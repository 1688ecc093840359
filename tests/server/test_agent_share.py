"""AgentTurns without a bound on waiting: how many of a pool's threads one agent's calls hold
at once."""

from __future__ import annotations

import asyncio

from server.agent_turns import AgentTurns


def test_an_agent_past_its_share_waits_and_another_agent_does_not() -> None:
    async def run() -> None:
        share = AgentTurns("calls", 1)
        running: list[str] = []
        release = asyncio.Event()

        async def call(agent: str, name: str) -> None:
            async with share.hold(agent):
                running.append(name)
                await release.wait()

        calls = [
            asyncio.create_task(call("a", "a1")),
            asyncio.create_task(call("a", "a2")),
            asyncio.create_task(call("b", "b1")),
        ]
        await asyncio.sleep(0.05)
        assert running == ["a1", "b1"]
        release.set()
        await asyncio.gather(*calls)
        assert sorted(running) == ["a1", "a2", "b1"]
        # No agent is held once its calls are done: the map does not grow with every agent.
        assert len(share) == 0

    asyncio.run(run())


def test_a_cancelled_wait_leaves_no_agent_behind() -> None:
    async def run() -> None:
        share = AgentTurns("calls", 1)
        release = asyncio.Event()

        async def call() -> None:
            async with share.hold("a"):
                await release.wait()

        first, waiting = asyncio.create_task(call()), asyncio.create_task(call())
        await asyncio.sleep(0.05)
        waiting.cancel()
        release.set()
        await first
        await asyncio.gather(waiting, return_exceptions=True)
        assert len(share) == 0

    asyncio.run(run())


def test_no_share_lets_every_call_run() -> None:
    async def run() -> None:
        share = AgentTurns("calls", 0)
        entered = 0
        release = asyncio.Event()

        async def call() -> None:
            nonlocal entered
            async with share.hold("a"):
                entered += 1
                await release.wait()

        calls = [asyncio.create_task(call()) for _ in range(4)]
        await asyncio.sleep(0.05)
        assert entered == 4
        release.set()
        await asyncio.gather(*calls)

    asyncio.run(run())
