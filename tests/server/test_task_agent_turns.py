"""AgentTurns: how many of one agent's task listings or ends run, wait, or are refused."""

from __future__ import annotations

import asyncio

import pytest

from server.agent_turns import AgentTurns
from server.errors import RateLimitedError

A = "spiffe://example.org/svid/agent/join_token/a"
B = "spiffe://example.org/svid/agent/join_token/b"


async def _calls() -> None:
    turns = AgentTurns("task listings", running=2, waiting=3)
    release = asyncio.Event()
    running = 0
    most = 0

    async def call(agent_id: str) -> None:
        nonlocal running, most
        async with turns.hold(agent_id):
            running += 1
            most = max(most, running)
            await release.wait()
            running -= 1

    held = [asyncio.create_task(call(A)) for _ in range(5)]
    await asyncio.sleep(0)
    assert turns.held(A) == 5
    assert running == 2  # two run, three wait their turn
    # The sixth is refused at once, and names what it ran into.
    with pytest.raises(RateLimitedError, match="5 task listings under way or waiting"):
        await call(A)
    # Another agent's calls have turns of their own.
    other = asyncio.create_task(call(B))
    await asyncio.sleep(0)
    assert running == 3
    release.set()
    await asyncio.gather(*held, other)
    assert most == 3
    assert turns.held(A) == 0
    assert not turns._turns  # nothing kept per agent once its calls are over


def test_an_agents_calls_run_wait_or_are_refused_and_leave_others_alone() -> None:
    asyncio.run(_calls())


async def _failed_after_its_caller_left(caplog: pytest.LogCaptureFixture) -> None:
    turns = AgentTurns("task ends", running=1)
    started, fail = asyncio.Event(), asyncio.Event()

    async def work() -> None:
        started.set()
        await fail.wait()
        raise RuntimeError("the datastore is closed")

    call = asyncio.create_task(turns.run(A, work))
    await started.wait()
    call.cancel()  # the caller hangs up while its work runs on
    await asyncio.sleep(0)
    fail.set()
    with pytest.raises(asyncio.CancelledError):
        await call
    # Nobody else is left to hear of it: run says it, not only drops it.
    (record,) = [r for r in caplog.records if r.exc_info]
    assert "task ends" in record.getMessage()
    assert "the datastore is closed" in str(record.exc_info[1])


def test_a_failure_of_work_whose_caller_left_is_logged(caplog: pytest.LogCaptureFixture) -> None:
    # The caller cancelled, `run` retrieved the work's exception and raised CancelledError:
    # an end that failed (left ended, not revoked, for settle_ends) was never told anywhere.
    asyncio.run(_failed_after_its_caller_left(caplog))
