"""Waiting for an asyncio event, bounded in time, in a loop that must stop when cancelled."""

from __future__ import annotations

import asyncio


async def set_within(event: asyncio.Event, seconds: float) -> bool:
    """Whether ``event`` is set within ``seconds``.

    asyncio.timeout, not wait_for: on Python 3.11, wait_for can swallow a cancellation that
    comes as the event is set (CPython gh-86296), and a loop waiting so runs on after its task
    was cancelled, holding up the daemon's stop.
    """
    try:
        async with asyncio.timeout(seconds):
            await event.wait()
    except TimeoutError:
        return False
    return True
