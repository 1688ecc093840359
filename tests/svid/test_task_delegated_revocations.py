"""A task's tokens delegated to another workload are revoked when that workload's agent is
removed, the task going on: the task clients asked the server before ending a task the
revocation list named by such tokens alone (a real gRPC fake agent on a Unix socket, its
Tasks service answering for the server)."""

from __future__ import annotations

import asyncio
import shutil
from collections.abc import Iterator
from typing import Any

import pytest

from svid._proto import task_pb2
from svid._revocation import KIND_JWT_ID, KIND_TASK, KIND_X509_SERIAL, Revoked
from svid._tasks_async import AsyncTask, AsyncTaskClient
from svid._tasks_sync import Task, TaskClient
from tests.svid.test_task_revocations import RUNTIME, info, update
from tests.svid.workload_fake import Server, State
from tests.tmpdirs import short_tmpdir

SID = f"{RUNTIME}/task/t1"
# A token exchanged from the task's, acting for a workload on a node since evicted.
DELEGATED = Revoked(KIND_JWT_ID, "jti-delegated", 0.0, SID)
# The task's own X.509-SVID: revoked only by its end.
ITS_SVID = Revoked(KIND_X509_SERIAL, "0a", 0.0, SID)


@pytest.fixture
def agent() -> Iterator[Server]:
    root = short_tmpdir("tdr")
    server = Server(State(), root / "agent.sock").start()
    yield server
    server.stop()
    shutil.rmtree(root, ignore_errors=True)


def _listed_active(agent: Server, *task_ids: str) -> None:
    agent.state.change(
        tasks=[task_pb2.Task(task_id=t, runtime_id=RUNTIME, state="active") for t in task_ids]
    )


def _ended_when_asked(
    monkeypatch: pytest.MonkeyPatch, client: TaskClient, task: Task
) -> list[bool]:
    """Whether `task` had ended, each time `client` asks the server which tasks are active."""
    ended: list[bool] = []
    ask = client._active_ids

    def asked(*args: Any) -> set[str]:
        ended.append(task.ended)
        return ask(*args)

    monkeypatch.setattr(client, "_active_ids", asked)
    return ended


def _ended_when_asked_async(
    monkeypatch: pytest.MonkeyPatch, client: AsyncTaskClient, task: AsyncTask
) -> list[bool]:
    """The same, for the asyncio client."""
    ended: list[bool] = []
    ask = client._active_ids

    async def asked(*args: Any) -> set[str]:
        ended.append(task.ended)
        return await ask(*args)

    monkeypatch.setattr(client, "_active_ids", asked)
    return ended


def test_a_task_named_by_a_delegated_token_alone_goes_on_while_the_server_holds_it(
    agent: Server,
) -> None:
    with TaskClient(agent.address, watch_revocations=False) as client:
        task = Task(client, info("t1"))
        _listed_active(agent, "t1")
        client._revocations_seen(update(DELEGATED))
        assert not task.ended
        # The same list again (every revocation anywhere sends it whole): not asked again.
        _listed_active(agent)
        client._revocations_seen(update(DELEGATED))
        assert not task.ended
        # Its end revokes its own SVID: over at once, nothing asked.
        client._revocations_seen(update(DELEGATED, ITS_SVID))
        assert task.ended


def test_a_task_named_by_a_token_of_its_id_is_ended_unless_the_server_lists_it_active(
    agent: Server,
) -> None:
    with TaskClient(agent.address, watch_revocations=False) as client:
        task = Task(client, info("t1"))
        _listed_active(agent)
        client._revocations_seen(update(DELEGATED))
        assert task.ended


def test_an_async_task_named_by_a_delegated_token_alone_goes_on_while_the_server_holds_it(
    agent: Server,
) -> None:
    async def run() -> tuple[bool, bool]:
        async with AsyncTaskClient(agent.address, watch_revocations=False) as client:
            task = AsyncTask(client, info("t1"))
            _listed_active(agent, "t1")
            await client._revocations_seen(update(DELEGATED))
            going_on = not task.ended
            await client._revocations_seen(update(DELEGATED, ITS_SVID))
            return going_on, task.ended

    assert asyncio.run(run()) == (True, True)


OTHER = f"{RUNTIME}/task/t2"
# Another task's own X.509-SVID, in the same update: that task is over, for sure.
OTHER_SVID = Revoked(KIND_X509_SERIAL, "0b", 0.0, OTHER)


def test_a_task_its_svid_ends_is_over_before_the_server_is_asked_about_another(
    agent: Server, monkeypatch: pytest.MonkeyPatch
) -> None:
    """One update named a task by a delegated token and another by its own X.509-SVID: the
    second stayed live (minting tokens) until the server had answered about the first, a
    timeout (10 s by default) when the server was away."""
    with TaskClient(agent.address, watch_revocations=False) as client:
        doubted = Task(client, info("t1"))
        over = Task(client, info("t2"))
        _listed_active(agent, "t1", "t2")
        seen_when_asked = _ended_when_asked(monkeypatch, client, over)
        client._revocations_seen(update(DELEGATED, OTHER_SVID))
        assert seen_when_asked[:1] == [True]
        assert over.ended
        assert not doubted.ended


def test_an_async_task_its_svid_ends_is_over_before_the_server_is_asked_about_another(
    agent: Server, monkeypatch: pytest.MonkeyPatch
) -> None:
    async def run() -> tuple[list[bool], bool, bool]:
        async with AsyncTaskClient(agent.address, watch_revocations=False) as client:
            doubted = AsyncTask(client, info("t1"))
            over = AsyncTask(client, info("t2"))
            _listed_active(agent, "t1", "t2")
            seen_when_asked = _ended_when_asked_async(monkeypatch, client, over)
            await client._revocations_seen(update(DELEGATED, OTHER_SVID))
            return seen_when_asked, over.ended, doubted.ended

    seen_when_asked, over_ended, doubted_ended = asyncio.run(run())
    assert seen_when_asked[:1] == [True]
    assert over_ended
    assert not doubted_ended


@pytest.mark.parametrize("named", [SID, ""], ids=["with-its-id", "by-task-id-alone"])
def test_a_task_whose_end_the_list_says_is_over_at_once_without_asking_the_server(
    agent: Server, monkeypatch: pytest.MonkeyPatch, named: str
) -> None:
    """A task with no X.509-SVID (its agent never minted one) holding no token: its end
    revoked nothing of it, and only the server could tell of it; with a token delegated from
    it in the same update, the server was asked. The end itself (KIND_TASK) proves it over."""
    with TaskClient(agent.address, watch_revocations=False) as client:
        task = Task(client, info("t1"))
        _listed_active(agent, "t1")  # the server's answer, were it asked, would keep it going
        ended_when_asked = _ended_when_asked(monkeypatch, client, task)
        client._revocations_seen(update(DELEGATED, Revoked(KIND_TASK, "t1", 0.0, named)))
        assert task.ended
        # Asked at most how it ended, once it had: never whether it had.
        assert all(ended_when_asked)


def test_an_async_task_whose_end_the_list_says_is_over_at_once_without_asking_the_server(
    agent: Server, monkeypatch: pytest.MonkeyPatch
) -> None:
    async def run() -> tuple[bool, list[bool]]:
        async with AsyncTaskClient(agent.address, watch_revocations=False) as client:
            task = AsyncTask(client, info("t1"))
            _listed_active(agent, "t1")
            ended_when_asked = _ended_when_asked_async(monkeypatch, client, task)
            await client._revocations_seen(update(DELEGATED, Revoked(KIND_TASK, "t1", 0.0, "")))
            return task.ended, ended_when_asked

    ended, ended_when_asked = asyncio.run(run())
    assert ended
    assert all(ended_when_asked)
