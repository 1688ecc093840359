"""ATTACK REPRODUCTIONS (branch attack-tasks): each test states what should hold and FAILS on
main at the time of writing; they prove defects, they are not fixes.

1. The number of declared actions x resources is not bounded before Cedar: ~50 KB of intent
   costs 10+ s of server CPU (GIL held for seconds at a time) before it is refused.
2. A denied intent is written whole into its denial event (several MB each).
3. Across two servers on one datastore, a task JWT minted on B while B has not yet read A's
   end of the task leaves B and is never revoked.
4. intent.on_behalf_of has no length bound: 1 MB goes into the task-begin event, every mint
   event and every JWT (`obo`).
"""

from __future__ import annotations

import asyncio
import shutil
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import grpc
import pytest

from server.tasks.service import BeginRequest
from svid._proto import node_pb2, task_pb2, task_pb2_grpc
from tests.server.fixtures import (
    TLS_NAME,
    Agent,
    RunningServer,
    managed_server,
    short_tmpdir,
    start_server,
)

# Every action of the shipped schema: the pairs Cedar is asked are actions x resources.
ACTIONS = ["read", "write", "invoke_tool", "fetch_secret", "export_data", "change_infra"]


def _tasks(server: RunningServer, agent: Agent) -> tuple[grpc.Channel, Any]:
    channel = grpc.secure_channel(
        server.runtime.node_address, agent.credentials(), options=list(TLS_NAME)
    )
    return channel, task_pb2_grpc.NodeTasksStub(channel)


def test_a_begin_with_thousands_of_resources_is_refused_before_cedar_is_asked() -> None:
    with managed_server() as server:
        agent = server.attest()
        greedy = server.create_entry("/agents/greedy", agent.spiffe_id).spiffe_id
        quiet = server.create_entry("/agents/quiet", agent.spiffe_id).spiffe_id
        channel, stub = _tasks(server, agent)
        # About 50 KB on the wire: far below any message limit (the agent takes 4 MB).
        intent = task_pb2.Intent(actions=ACTIONS, resources=[f"r{i:06d}" for i in range(5000)])
        outcome: dict[str, Any] = {}

        def greedy_begin() -> None:
            started = time.monotonic()
            try:
                outcome["task"] = stub.BeginTask(
                    task_pb2.NodeBeginTaskRequest(runtime_id=greedy, intent=intent, ttl=60),
                    timeout=120,
                )
            except grpc.RpcError as exc:
                outcome["code"] = exc.code()  # type: ignore[attr-defined]
                outcome["details"] = exc.details()  # type: ignore[attr-defined]
            outcome["took"] = time.monotonic() - started

        thread = threading.Thread(target=greedy_begin)
        thread.start()
        time.sleep(0.3)
        # Another workload's small request, meanwhile: the slowest of several answers.
        slowest = 0.0
        while thread.is_alive():
            started = time.monotonic()
            stub.ListTasks(task_pb2.NodeListTasksRequest(runtime_ids=[quiet]), timeout=120)
            slowest = max(slowest, time.monotonic() - started)
            time.sleep(0.05)
        thread.join()
        channel.close()
        print(f"\nbegin refused after {outcome['took']:.1f}s: {outcome.get('details', '')[:90]}")
        print(f"another runtime's ListTasks meanwhile took up to {slowest:.1f}s")
        # Expected: an intent this size is refused up front, before Cedar is asked about its
        # 30,000 pairs. On main it is refused too (the task-begin event would be too large),
        # but only after the decision: ~10 s of server CPU per request, 200 per runtime burst.
        assert outcome.get("code") == grpc.StatusCode.INVALID_ARGUMENT, outcome
        assert outcome["took"] < 2.0, f"refused only after {outcome['took']:.1f}s"


def test_a_refused_begin_writes_a_bounded_denial_event() -> None:
    """A denied intent is recorded with its resources joined and a reason that names every
    refused pair, neither bounded: ~2.5 MB of declared resources (an action the schema does not
    know, so Cedar is not even asked) make one denial event of several MB, and a runtime has a
    denial budget of 1,000 events (then 10/s) on record."""
    from server.audit import EventKind
    from server.datastore.records import EventFilter

    with managed_server() as server:
        agent = server.attest()
        runtime = server.create_entry("/agents/noisy", agent.spiffe_id).spiffe_id
        channel, stub = _tasks(server, agent)
        intent = task_pb2.Intent(
            actions=["no_such_action"],
            resources=[f"r{i:06d}-" + "x" * 240 for i in range(10000)],
        )
        with pytest.raises(grpc.RpcError) as caught:
            stub.BeginTask(
                task_pb2.NodeBeginTaskRequest(runtime_id=runtime, intent=intent, ttl=60),
                timeout=60,
            )
        channel.close()
        # The refusal's own details (every refused pair) do not even fit a gRPC trailer: the
        # caller hears RESOURCE_EXHAUSTED "metadata size exceeds hard limit", not the denial.
        print(f"\nthe caller heard: {caught.value.code()}")  # type: ignore[attr-defined]
        store = server.server.tasks.service.audit.store
        (denial,) = list(store.audit_rows(EventFilter(kind=EventKind.DENIAL)))
        size = sum(len(str(v)) for v in denial.values())
        print(f"\none denial event holds {size} characters")
        # Expected: an event is a few KB at most (as `extra` already is: 4096 bytes).
        assert size < 64 * 1024, f"one denial event is {size} characters"


def _payload(token: str) -> dict[str, Any]:
    import base64
    import json

    body = token.split(".")[1]
    return dict(json.loads(base64.urlsafe_b64decode(body + "=" * (-len(body) % 4))))


def _wait(predicate: Any, what: str, timeout: float = 15.0) -> Any:
    deadline = time.monotonic() + timeout
    while not (found := predicate()):
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out waiting for {what}")
        time.sleep(0.01)
    return found


@pytest.fixture
def pair() -> Iterator[tuple[RunningServer, RunningServer, Path]]:
    """Two real servers on one SQLite file (as tests/server/test_replication_servers.py)."""
    root = short_tmpdir()
    a = start_server(root, admin_socket=str(root / "a" / "admin.sock"))
    b = start_server(root, admin_socket=str(root / "b" / "admin.sock"))
    try:
        yield a, b, root
    finally:
        for server in (b, a):
            server.stop()
        shutil.rmtree(root, ignore_errors=True)


def test_a_task_jwt_minted_on_another_server_around_the_end_is_revoked(
    pair: tuple[RunningServer, RunningServer, Path],
) -> None:
    """A ends the task and revokes what is on record when it reads them; B, whose change feed
    has not brought that end yet (feed lag: milliseconds to seconds under load), still holds
    the task active, mints, records the JWT after A's read, checks `ended()` (memory: still
    active) and hands it out. No one revokes it afterwards: B taking in the end only forgets
    the task (apply_tasks), and A's end is settled."""
    a, b, _ = pair
    agent = a.attest()
    _wait(lambda: agent.spiffe_id in b.server.state.agents, "B to learn the agent")
    runtime = a.create_entry("/bot", agent.spiffe_id)
    record = a.server.state.agents[agent.spiffe_id]
    task = a.call(
        a.server.tasks.service.begin(
            record,
            BeginRequest(runtime_id=runtime.spiffe_id, actions=("read",), resources=("docs",)),
        )
    )
    _wait(lambda: b.server.tasks.service.active_task(task.spiffe_id), "B to hold the task")
    _wait(lambda: task.entry_id in b.server.state.entries.by_id, "B to hold the task entry")

    # B's feed lags behind A from here (held at its next apply, as a slow poll would).
    follower = b.server.follower
    assert follower is not None
    held = threading.Event()
    held.set()
    original = follower._apply

    async def lagging(work: Any) -> None:
        while held.is_set():
            await asyncio.sleep(0.01)
        await original(work)

    follower._apply = lagging  # type: ignore[method-assign]
    ended = a.call(a.server.tasks.service.end(record, task.task_id, ()))
    assert ended.state.value == "ended"

    minted = None
    try:
        minted = b.node_stub(agent).NewJWTSVID(
            node_pb2.NewJWTSVIDRequest(
                spiffe_id=task.spiffe_id, audience=["docs"], entry_id=task.entry_id
            ),
            timeout=10,
        )
    except grpc.RpcError as exc:
        print(f"\nB refused the mint: {exc.details()}")  # type: ignore[attr-defined]
    finally:
        held.clear()
    _wait(lambda: b.server.tasks.service.active_task(task.spiffe_id) is None, "B to drop it")
    if minted is None:
        return  # refused: what should happen
    jti = _payload(minted.token)["jti"]
    print(f"\nB minted {jti} for task {task.task_id} after A ended it")
    time.sleep(1.0)  # anything that would revoke it late has had its chance
    revoked_a = {r.value for r in a.server.state.revocations}
    revoked_b = {r.value for r in b.server.state.revocations}
    assert jti in revoked_a, "a JWT of an ended task left B unrevoked"
    assert jti in revoked_b


def test_on_behalf_of_is_bounded() -> None:
    """intent.on_behalf_of is checked for printable text only: a 1 MB principal is granted,
    written as is into the task-begin event, and into every JWT of the task (`obo`) and each
    mint's event."""
    from server.audit import EventKind
    from server.datastore.records import EventFilter

    with managed_server() as server:
        agent = server.attest()
        runtime = server.create_entry("/agents/obo", agent.spiffe_id).spiffe_id
        channel, stub = _tasks(server, agent)
        principal = "user:" + "a" * 1_000_000
        try:
            reply = stub.BeginTask(
                task_pb2.NodeBeginTaskRequest(
                    runtime_id=runtime,
                    intent=task_pb2.Intent(
                        actions=["read"], resources=["docs"], on_behalf_of=principal
                    ),
                    ttl=60,
                ),
                timeout=30,
            )
        except grpc.RpcError as exc:
            code = exc.code()  # type: ignore[attr-defined]
            if code == grpc.StatusCode.INVALID_ARGUMENT:
                return  # bounded: what should happen
            raise
        finally:
            channel.close()
        task = reply.task
        entry_id = f"task-{task.task_id}"
        _wait(lambda: entry_id in server.server.state.entries.by_id, "the task entry")
        minted = server.node_stub(agent).NewJWTSVID(
            node_pb2.NewJWTSVIDRequest(
                spiffe_id=task.spiffe_id, audience=["docs"], entry_id=entry_id
            ),
            timeout=10,
        )
        store = server.server.tasks.service.audit.store
        begun = list(store.audit_rows(EventFilter(kind=EventKind.TASK_BEGIN)))
        biggest = max(sum(len(str(v)) for v in row.values()) for row in begun)
        print(
            f"\ngranted; task-begin event {biggest} chars; one task JWT {len(minted.token)} bytes"
        )
        raise AssertionError("a 1 MB on_behalf_of was granted")
