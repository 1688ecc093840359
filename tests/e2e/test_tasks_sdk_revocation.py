"""A runtime learns at once that the server ended its task: the task clients watch the agent's
revocation stream (real server and agent processes, the runtime being this test). No token is
asked for after the end, so the only way to learn it is the stream."""

from __future__ import annotations

import asyncio
import logging
import threading
from collections.abc import Callable

import pytest

from svid.tasks import AsyncTask, AsyncTaskClient, Task, TaskClient, TaskEndedError
from tests.e2e import test_tasks_sdk as sdk
from tests.e2e.conftest import wait_for
from tests.e2e.held_socket import HeldSocket

pytestmark = pytest.mark.e2e
stack = sdk.stack  # the same module stack: a server with the SDK tests' policy, an agent
FEED_THREAD = "svid-task-revocations"
# Generous: the revocation travels server -> agent (Sync) -> stream on a loaded 2-core machine.
LEARN = 30.0


def _learnt(task: Task | AsyncTask) -> Callable[[], bool]:
    """The task is ended, and how is known: the stream ends it at once, the server's answer
    to how follows."""
    return lambda: task.ended and task.info.state != "active"


def _feed_threads() -> set[threading.Thread]:
    return {t for t in threading.enumerate() if t.name == FEED_THREAD}


def test_a_task_revoked_at_the_server_is_ended_in_the_runtime_with_its_sub_tasks(
    stack: sdk.Stack,
) -> None:
    with TaskClient(stack.address) as client:
        task = client.begin(actions=["read"], resources=["docs", "wiki"])
        sub = task.subtask(actions=["read"], resources=["docs"])
        task.jwt("docs")
        sub.jwt("docs")  # both hold a cached token, fresh for half its life
        stack.server.cli("task", "revoke", task.task_id, "--reason", "suspected misuse")
        wait_for(_learnt(task), LEARN, "the runtime to learn its task was revoked")
        assert task.info.state == "revoked"
        assert task.info.end_reason == "suspected misuse"
        with pytest.raises(TaskEndedError, match="revoked: suspected misuse"):
            task.jwt("docs")  # the cached token is not handed out
        assert sub.ended
        with pytest.raises(TaskEndedError, match=f"parent task {task.task_id} ended"):
            sub.jwt("docs")
        assert task.end() == task.info  # nothing left to end


def test_an_async_task_revoked_at_the_server_is_ended_in_the_runtime_with_its_sub_tasks(
    stack: sdk.Stack,
) -> None:
    async def run() -> None:
        async with AsyncTaskClient(stack.address) as client:
            task = await client.begin(actions=["read"], resources=["docs", "wiki"])
            sub = await task.subtask(actions=["read"], resources=["docs"])
            await task.jwt("docs")
            await sub.jwt("docs")
            await asyncio.to_thread(
                stack.server.cli, "task", "revoke", task.task_id, "--reason", "suspected misuse"
            )
            await asyncio.to_thread(wait_for, _learnt(task), LEARN, "the runtime to learn it")
            assert task.info.state == "revoked"
            with pytest.raises(TaskEndedError, match="revoked: suspected misuse"):
                await task.jwt("docs")
            assert sub.ended
            with pytest.raises(TaskEndedError, match=f"parent task {task.task_id} ended"):
                await sub.jwt("docs")

    asyncio.run(run())


def test_the_runtime_learns_of_an_end_after_its_stream_was_cut(stack: sdk.Stack) -> None:
    with stack.held() as link, TaskClient(link.address) as client:
        first = client.begin(actions=["read"], resources=["docs"])
        second = client.begin(actions=["read"], resources=["docs"])
        second.jwt("docs")
        # The first end is learnt on the stream as it was opened: it is up.
        stack.server.cli("task", "revoke", first.task_id)
        wait_for(_learnt(first), LEARN, "the first task's end")
        before = link.connections
        link.cut()
        wait_for(lambda: link.connections > before, LEARN, "the client to connect again")
        stack.server.cli("task", "revoke", second.task_id, "--reason", "after the cut")
        wait_for(_learnt(second), LEARN, "the second task's end, on the new stream")
        with pytest.raises(TaskEndedError, match="revoked: after the cut"):
            second.jwt("docs")


def test_an_async_runtime_learns_of_an_end_after_its_stream_was_cut(stack: sdk.Stack) -> None:
    async def run(link: HeldSocket) -> None:
        async with AsyncTaskClient(link.address) as client:
            first = await client.begin(actions=["read"], resources=["docs"])
            second = await client.begin(actions=["read"], resources=["docs"])
            await asyncio.to_thread(stack.server.cli, "task", "revoke", first.task_id)
            await asyncio.to_thread(wait_for, _learnt(first), LEARN, "the first task's end")
            before = link.connections
            link.cut()
            await asyncio.to_thread(
                wait_for, lambda: link.connections > before, LEARN, "a new connection"
            )
            await asyncio.to_thread(stack.server.cli, "task", "revoke", second.task_id)
            await asyncio.to_thread(wait_for, _learnt(second), LEARN, "the second task's end")
            with pytest.raises(TaskEndedError, match="revoked: revoked by an operator"):
                await second.jwt("docs")

    with stack.held() as link:
        asyncio.run(run(link))


@pytest.mark.filterwarnings("error")  # a thread's unhandled exception, an unclosed resource
def test_a_client_closed_while_its_stream_reconnects_leaves_nothing_running(
    stack: sdk.Stack, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.DEBUG, logger="svid.tasks")
    already = _feed_threads()
    with stack.held() as link:
        client = TaskClient(link.address)
        task = client.begin(actions=["read"], resources=["docs"])
        (feed,) = _feed_threads() - already
        stack.server.cli("task", "revoke", task.task_id)
        wait_for(_learnt(task), LEARN, "the task's end")
    # The link is gone (its socket closed, nothing listening): the stream fails and the feed
    # reconnects, with backoff, to nothing.
    wait_for(
        lambda: any("reconnecting" in r.getMessage() for r in caplog.records),
        LEARN,
        "the feed to try again",
    )
    client.close()
    assert not feed.is_alive()
    assert [r.getMessage() for r in caplog.records if r.levelno >= logging.WARNING] == []

    with stack.held() as link:

        async def closed_while_reconnecting() -> None:
            client = AsyncTaskClient(link.address)
            task = await client.begin(actions=["read"], resources=["docs"])
            await asyncio.to_thread(stack.server.cli, "task", "revoke", task.task_id)
            await asyncio.to_thread(wait_for, _learnt(task), LEARN, "the task's end")
            link.cut()
            await client.close()
            assert [t for t in asyncio.all_tasks() if t.get_name() == FEED_THREAD] == []

        asyncio.run(closed_while_reconnecting())
    assert [r.getMessage() for r in caplog.records if r.levelno >= logging.WARNING] == []


def test_an_end_made_while_the_agent_was_down_is_learnt_once_it_is_back(
    stack: sdk.Stack,
) -> None:
    with TaskClient(stack.address) as client:
        task = client.begin(actions=["read"], resources=["docs"])
        task.jwt("docs")
        assert stack.agent.stop() == 0
        stack.server.cli("task", "revoke", task.task_id, "--reason", "while the agent was down")
        stack.agent.start()
        wait_for(_learnt(task), LEARN, "the end, from the restarted agent's list")
        with pytest.raises(TaskEndedError, match="revoked: while the agent was down"):
            task.jwt("docs")
    stack.agent.wait_svid(sdk.RUNTIME)  # the module's agent serves the runtime again
