"""svid._waits: the bounded wait every daemon loop sleeps in."""

from __future__ import annotations

import asyncio

import pytest

from svid._waits import set_within


def test_says_whether_the_event_was_set_in_time() -> None:
    async def main() -> tuple[bool, bool, bool]:
        ev = asyncio.Event()
        missed = await set_within(ev, 0.01)
        asyncio.get_running_loop().call_later(0.01, ev.set)
        caught = await set_within(ev, 30)
        already = await set_within(ev, 0)
        return missed, caught, already

    assert asyncio.run(main()) == (False, True, True)


def test_a_cancellation_that_comes_as_the_event_is_set_is_not_swallowed() -> None:
    # asyncio.wait_for on Python 3.11 returns normally here (CPython gh-86296): a loop
    # `while not done: wait_for(event.wait(), t)` then ran on after its task was cancelled.
    async def main() -> str:
        ev = asyncio.Event()

        async def loop_step() -> str:
            await set_within(ev, 30)
            return "ran on"

        task = asyncio.create_task(loop_step())
        await asyncio.sleep(0)  # waiting
        ev.set()
        task.cancel()  # in the same turn of the loop
        try:
            return await task
        except asyncio.CancelledError:
            return "cancelled"

    assert asyncio.run(main()) == "cancelled"


def test_an_outside_cancellation_propagates_as_such_not_as_a_timeout() -> None:
    async def main() -> None:
        task = asyncio.create_task(set_within(asyncio.Event(), 30))
        await asyncio.sleep(0)
        task.cancel()
        await task

    with pytest.raises(asyncio.CancelledError):
        asyncio.run(main())
