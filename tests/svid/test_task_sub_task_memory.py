"""A long task's sub-tasks, begun and ended one after another (an agent loop's step each),
are not held by their parent once ended: each stayed in the parent's list of sub-tasks to end
with it, so a task running its TTL out kept every sub-task it ever began (a real gRPC fake
agent on a Unix socket, its Tasks service granting every begin)."""

from __future__ import annotations

import asyncio
import gc
import shutil
import weakref
from collections.abc import Iterator

import pytest

from svid._tasks_async import AsyncTaskClient
from svid._tasks_sync import TaskClient
from tests.svid.workload_fake import Server, State
from tests.tmpdirs import short_tmpdir

STEPS = 5


@pytest.fixture
def agent() -> Iterator[Server]:
    root = short_tmpdir("tsm")
    server = Server(State(), root / "agent.sock").start()
    yield server
    server.stop()
    shutil.rmtree(root, ignore_errors=True)


def test_an_ended_sub_task_is_not_held_by_its_parent(agent: Server) -> None:
    with (
        TaskClient(agent.address, watch_revocations=False) as client,
        client.begin(actions=["read"], resources=["docs"]) as task,
    ):
        steps = []
        for _ in range(STEPS):
            with task.subtask() as step:
                steps.append(weakref.ref(step))
        live = task.subtask()
        del step
        gc.collect()
        assert [s() for s in steps] == [None] * STEPS
        assert not live.ended
    # ...while one still running ends with it.
    assert live.ended


def test_an_ended_async_sub_task_is_not_held_by_its_parent(agent: Server) -> None:
    async def run() -> tuple[list[object], bool, bool]:
        async with (
            AsyncTaskClient(agent.address, watch_revocations=False) as client,
            client.begin(actions=["read"], resources=["docs"]) as task,
        ):
            steps = []
            for _ in range(STEPS):
                async with task.subtask() as step:
                    steps.append(weakref.ref(step))
            live = await task.subtask()
            del step
            gc.collect()
            freed = [s() for s in steps]
            running = not live.ended
        return freed, running, live.ended

    assert asyncio.run(run()) == ([None] * STEPS, True, True)
