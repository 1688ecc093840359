"""A task's token fetch in flight holds nothing else of the task hostage: its other audiences,
its end, the news of its revocation (real server and agent processes; the fetch held at a
socket in front of the agent, tests/e2e/held_socket.py, while every other call goes on)."""

from __future__ import annotations

import asyncio
import os
import signal
import sys
import threading
from collections.abc import AsyncIterator, Callable, Iterator
from contextlib import asynccontextmanager, contextmanager
from typing import Generic, TypeVar

import grpc
import pytest

from svid._proto import revocation_pb2, revocation_pb2_grpc
from svid.tasks import AsyncTask, AsyncTaskClient, Task, TaskClient, TaskEndedError
from tests.e2e import test_tasks_sdk as sdk
from tests.e2e.agent_process import HEADER
from tests.e2e.conftest import wait_for
from tests.e2e.held_socket import HeldSocket

pytestmark = pytest.mark.e2e
stack = sdk.stack  # the same module stack: a server with the SDK tests' policy, an agent
T = TypeVar("T")
# A held call stays held until the test lets it go: the clients' deadline is far beyond any
# wait here, so no call in these tests ends by running out of time.
PATIENT = 300.0
# Generous, for a loaded 2-core machine: what is waited for takes milliseconds when it works.
WAIT = 60.0
UNCONFIRMED = "the agent's revocation list names its credentials"


class _Call(Generic[T]):
    """``fn(*args)`` on a thread of its own: a caller of the task's other than the test's."""

    def __init__(self, fn: Callable[..., T], *args: object) -> None:
        self._done = threading.Event()
        self._value: T | None = None
        self._error: BaseException | None = None
        self.thread = threading.Thread(target=self._run, args=(fn, args), daemon=True)
        self.thread.start()

    def _run(self, fn: Callable[..., T], args: tuple[object, ...]) -> None:
        try:
            self._value = fn(*args)
        except BaseException as exc:
            self._error = exc
        finally:
            self._done.set()

    def result(self, timeout: float = WAIT) -> T:
        if not self._done.wait(timeout):
            raise TimeoutError(f"the call on thread {self.thread.name} did not return")
        if self._error is not None:
            raise self._error
        return self._value  # type: ignore[return-value]

    def blocked(self) -> bool:
        """Whether the thread is waiting on a lock, condition or event of threading.py (for
        another caller's fetch, say), not still on its way there."""
        frame = sys._current_frames().get(self.thread.ident or 0)
        return frame is not None and frame.f_code.co_filename == threading.__file__


@contextmanager
def _released_first(link: HeldSocket) -> Iterator[None]:
    """On the way out, before the task and client (whose end or close could wait for a held
    call on a failed run), let everything ``link`` holds go on."""
    try:
        yield
    finally:
        link.release()


@contextmanager
def _docs_and_wiki(link: HeldSocket) -> Iterator[Task]:
    """A task that may read docs and wiki, through ``link`` (no revocation stream: its call
    would be held with the one under test)."""
    with (
        TaskClient(link.address, timeout=PATIENT, watch_revocations=False) as client,
        client.begin(actions=["read"], resources=["docs", "wiki"]) as task,
    ):
        yield task


@asynccontextmanager
async def _async_docs_and_wiki(link: HeldSocket) -> AsyncIterator[AsyncTask]:
    """``_docs_and_wiki`` on asyncio."""
    async with (
        AsyncTaskClient(link.address, timeout=PATIENT, watch_revocations=False) as client,
        client.begin(actions=["read"], resources=["docs", "wiki"]) as task,
    ):
        yield task


def _held(link: HeldSocket) -> None:
    wait_for(lambda: link.call_held, WAIT, "the FetchJWTSVID to be held at the socket")


def test_a_fetch_in_flight_does_not_stop_another_audiences_cached_token(stack: sdk.Stack) -> None:
    with (
        stack.held() as link,
        _docs_and_wiki(link) as task,
        _released_first(link),
    ):
        wiki = task.jwt("wiki")
        link.hold_next_call()
        docs = _Call(task.jwt, "docs")
        _held(link)
        assert _Call(task.jwt, "wiki").result() == wiki
        link.release()
        stack.verify(docs.result(), "docs")


def test_an_async_fetch_in_flight_does_not_stop_another_audiences_cached_token(
    stack: sdk.Stack,
) -> None:
    async def run(link: HeldSocket) -> None:
        async with (
            _async_docs_and_wiki(link) as task,
        ):
            wiki = await task.jwt("wiki")
            link.hold_next_call()
            docs = asyncio.ensure_future(task.jwt("docs"))
            await asyncio.to_thread(_held, link)
            async with asyncio.timeout(WAIT):
                assert await task.jwt("wiki") == wiki
            link.release()
            stack.verify(await docs, "docs")

    with stack.held() as link:
        asyncio.run(run(link))


def test_an_end_during_a_fetch_returns_and_the_fetch_gets_task_ended(stack: sdk.Stack) -> None:
    with (
        stack.held() as link,
        TaskClient(link.address, timeout=PATIENT, watch_revocations=False) as client,
        _released_first(link),
    ):
        task = client.begin(actions=["read"], resources=["docs"])
        link.hold_next_call()
        docs = _Call(task.jwt, "docs")
        _held(link)
        ended = _Call(task.end, "done with it").result()
        assert ended.state == "ended"
        assert task.ended
        link.release()
        # The fetch sent before the end does not hand out a token of the ended task, nor keep
        # one for the next caller.
        with pytest.raises(TaskEndedError, match=f"task {task.task_id} has ended"):
            docs.result()
        assert task._cached_jtis() == frozenset()
        with pytest.raises(TaskEndedError):
            task.jwt("docs")


def test_a_revocation_learnt_during_a_fetch_ends_the_task_at_once(stack: sdk.Stack) -> None:
    with (
        stack.held() as link,
        TaskClient(link.address, timeout=PATIENT) as client,
        _released_first(link),
    ):
        task = client.begin(actions=["read"], resources=["docs"])
        wait_for(lambda: link.calls == 2, WAIT, "the revocation stream to open")
        link.hold_next_call()
        docs = _Call(task.jwt, "docs")
        _held(link)
        stack.server.cli("task", "revoke", task.task_id, "--reason", "mid-fetch")
        wait_for(lambda: task.ended, WAIT, "the runtime to learn of the revocation")
        link.release()
        with pytest.raises(TaskEndedError, match=r"mid-fetch|revocation list"):
            docs.result()
        assert task._cached_jtis() == frozenset()


def test_callers_of_one_audience_share_one_fetch_while_others_are_served(
    stack: sdk.Stack,
) -> None:
    with (
        stack.held() as link,
        _docs_and_wiki(link) as task,
        _released_first(link),
    ):
        before = link.calls
        link.hold_next_call()
        first = _Call(task.jwt, "docs")
        _held(link)
        second = _Call(task.jwt, "docs")
        wait_for(second.blocked, WAIT, "the second caller to wait")
        stack.verify(_Call(task.jwt, "wiki").result(), "wiki")  # its own fetch, not held
        link.release()
        assert first.result() == second.result()
        # One FetchJWTSVID for docs, one for wiki: the second docs caller made none.
        assert link.calls - before == 2


def test_async_callers_of_one_audience_share_one_fetch_while_others_are_served(
    stack: sdk.Stack,
) -> None:
    async def run(link: HeldSocket) -> None:
        async with (
            _async_docs_and_wiki(link) as task,
        ):
            before = link.calls
            link.hold_next_call()
            first = asyncio.ensure_future(task.jwt("docs"))
            await asyncio.to_thread(_held, link)
            second = asyncio.ensure_future(task.jwt("docs"))
            await asyncio.sleep(0)  # the second caller runs up to its wait
            async with asyncio.timeout(WAIT):
                stack.verify(await task.jwt("wiki"), "wiki")
            link.release()
            assert await first == await second
            assert link.calls - before == 2

    with stack.held() as link:
        asyncio.run(run(link))


def _agent_lists(stack: sdk.Stack, tasks: list[str]) -> None:
    """Wait until the agent's revocation list names every one of ``tasks`` (SPIFFE IDs)."""
    with grpc.insecure_channel(f"unix:{stack.agent.socket_path}") as channel:
        stream = revocation_pb2_grpc.RevocationsStub(channel).Watch(
            revocation_pb2.WatchRequest(), metadata=HEADER, timeout=WAIT
        )
        for update in stream:
            if set(tasks) <= {item.spiffe_id for item in update.items}:
                stream.cancel()
                return
    raise AssertionError("the agent's revocation stream ended before naming the tasks")


@contextmanager
def _server_stopped(stack: sdk.Stack) -> Iterator[None]:
    """The server process stopped (SIGSTOP): its connections stay open, nothing answers."""
    proc = stack.server.proc
    assert proc is not None
    os.kill(proc.pid, signal.SIGSTOP)
    try:
        yield
    finally:
        os.kill(proc.pid, signal.SIGCONT)


def _revoked_while_unanswered(
    stack: sdk.Stack, link: HeldSocket, tasks: list[Task] | list[AsyncTask]
) -> None:
    """Revoke ``tasks`` at the server while the runtime behind ``link`` hears nothing; once the
    agent lists them all, cut the runtime's connection: its revocation stream, opened again,
    is sent the whole list in one message."""
    link.hold_answers()
    for task in tasks:
        stack.server.cli("task", "revoke", task.task_id, "--reason", "one of many")
    _agent_lists(stack, [str(task.spiffe_id) for task in tasks])
    link.cut()  # what was held for the old connection goes with it


# Asked one after another, the server stopped, each task's end would wait for the agent to
# give up on the server (10 s): this many take far longer than ENDED, when all end at once.
MANY = 8
ENDED = 30.0


def test_tasks_revoked_together_are_all_ended_at_once_with_the_server_unreachable(
    stack: sdk.Stack,
) -> None:
    with stack.held() as link, TaskClient(link.address, timeout=PATIENT) as client:
        tasks = [client.begin(actions=["read"], resources=["docs"]) for _ in range(MANY)]
        wait_for(lambda: link.calls == MANY + 1, WAIT, "the revocation stream to open")
        _revoked_while_unanswered(stack, link, tasks)
        with _server_stopped(stack):
            link.release()
            wait_for(lambda: all(t.ended for t in tasks), ENDED, "every task to be ended")
            # How they ended cannot be learnt: ended all the same, saying why.
            assert {t.info.end_reason for t in tasks} == {UNCONFIRMED}
            with pytest.raises(TaskEndedError, match=UNCONFIRMED):
                tasks[-1].jwt("docs")


def test_async_tasks_revoked_together_are_all_ended_at_once_with_the_server_unreachable(
    stack: sdk.Stack,
) -> None:
    async def run(link: HeldSocket) -> None:
        async with AsyncTaskClient(link.address, timeout=PATIENT) as client:
            tasks = [await client.begin(actions=["read"], resources=["docs"]) for _ in range(MANY)]
            await asyncio.to_thread(
                wait_for, lambda: link.calls == MANY + 1, WAIT, "the revocation stream to open"
            )
            await asyncio.to_thread(_revoked_while_unanswered, stack, link, tasks)
            with _server_stopped(stack):
                link.release()
                async with asyncio.timeout(ENDED):
                    while not all(t.ended for t in tasks):
                        await asyncio.sleep(0.05)
                assert {t.info.end_reason for t in tasks} == {UNCONFIRMED}

    with stack.held() as link:
        asyncio.run(run(link))
