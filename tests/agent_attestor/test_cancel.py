"""Stopping background tasks: one that swallows its cancellation is cancelled again."""

from __future__ import annotations

import asyncio
import contextlib

from agent_attestor.cancel import cancel_all


def test_a_task_that_swallows_a_cancellation_is_cancelled_again() -> None:
    # As asyncio.wait_for does on 3.11 when the awaited thing completes as it is cancelled.
    async def swallows_once() -> None:
        with contextlib.suppress(asyncio.CancelledError):
            await asyncio.sleep(3600)
        while True:
            await asyncio.sleep(0.01)

    async def plain() -> None:
        await asyncio.sleep(3600)

    async def scenario() -> list[asyncio.Task[object]]:
        tasks: list[asyncio.Task[object]] = [
            asyncio.create_task(swallows_once()),
            asyncio.create_task(plain()),
        ]
        await asyncio.sleep(0)
        left = await asyncio.wait_for(cancel_all(tasks, patience=0.2), 5)
        assert all(t.done() for t in tasks)
        return left

    assert asyncio.run(scenario()) == []


def test_a_task_that_never_stops_is_given_up_on_not_awaited_for_ever() -> None:
    deaf_now = True

    async def deaf() -> None:
        while deaf_now:
            with contextlib.suppress(asyncio.CancelledError):
                await asyncio.sleep(3600)

    async def scenario() -> list[str]:
        nonlocal deaf_now
        task: asyncio.Task[object] = asyncio.create_task(deaf(), name="deaf")
        await asyncio.sleep(0)
        left = await asyncio.wait_for(cancel_all([task], tries=3, patience=0.1), 5)
        deaf_now = False  # ours to clean up before the loop closes
        task.cancel()
        await task
        return [t.get_name() for t in left]

    assert asyncio.run(scenario()) == ["deaf"]
