"""run_held: a cancelled caller waits for its thread to end before it is cancelled (the
server's signing and task calls, the agent's SVID, bundle and checkpoint saves)."""

from __future__ import annotations

import asyncio
import threading

import pytest

from svid._held import run_held


def test_a_cancelled_caller_returns_only_once_its_thread_has_ended() -> None:
    async def run() -> None:
        started, release, ended = threading.Event(), threading.Event(), threading.Event()

        def work() -> None:
            started.set()
            release.wait(10)
            ended.set()

        caller = asyncio.create_task(run_held(None, work))
        await asyncio.to_thread(started.wait, 10)
        caller.cancel()
        await asyncio.sleep(0.05)
        assert not caller.done()  # cancelled, but its thread still runs: it holds on
        caller.cancel()  # a second cancellation changes nothing
        await asyncio.sleep(0.05)
        assert not caller.done()
        release.set()
        with pytest.raises(asyncio.CancelledError):
            await caller
        assert ended.is_set()

    asyncio.run(run())


def test_an_uncancelled_caller_gets_the_result_or_the_error() -> None:
    def fail() -> None:
        raise ValueError("no")

    async def run() -> None:
        assert await run_held(None, int, "7") == 7
        with pytest.raises(ValueError, match="no"):
            await run_held(None, fail)

    asyncio.run(run())
