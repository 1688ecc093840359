"""How many tasks a runtime may begin, and hold, and how large an intent it may declare, on a
running server: one workload beginning tasks through its agent must neither flood the server (a
task row, an entry pushed to the agent and audit events each; policy decisions as many as its
intent's pairs) nor crowd out the node's other workloads."""

from __future__ import annotations

import time

import grpc
import pytest

from server.audit import EventKind
from server.datastore.records import EventFilter
from svid._limits import MAX_ON_BEHALF_OF_BYTES
from svid._proto import node_pb2, task_pb2, task_pb2_grpc
from svid._spiffe_id import MAX_ID_BYTES, SpiffeId
from tests.server.fixtures import TLS_NAME, Agent, RunningServer, managed_server
from tests.waits import wait_for

# Every action of the shipped schema: the pairs Cedar would be asked are actions x resources.
ACTIONS = ["read", "write", "invoke_tool", "fetch_secret", "export_data", "change_infra"]
_READ_DOCS = task_pb2.Intent(actions=["read"], resources=["docs"])


def _begin(
    server: RunningServer,
    agent: Agent,
    runtime_id: str,
    intent: task_pb2.Intent = _READ_DOCS,
    timeout: float = 10,
) -> task_pb2.Task:
    with grpc.secure_channel(
        server.runtime.node_address, agent.credentials(), options=list(TLS_NAME)
    ) as channel:
        reply = task_pb2_grpc.NodeTasksStub(channel).BeginTask(
            task_pb2.NodeBeginTaskRequest(runtime_id=runtime_id, intent=intent, ttl=300),
            timeout=timeout,
        )
    task: task_pb2.Task = reply.task
    return task


def _refused(
    server: RunningServer,
    agent: Agent,
    runtime_id: str,
    intent: task_pb2.Intent = _READ_DOCS,
    timeout: float = 10,
) -> grpc.RpcError:
    with pytest.raises(grpc.RpcError) as caught:
        _begin(server, agent, runtime_id, intent, timeout)
    return caught.value


def test_a_runtime_begins_tasks_up_to_its_rate_and_others_keep_theirs() -> None:
    with managed_server(task_begin_rate_per_runtime=1, task_begin_burst_per_runtime=3) as server:
        agent = server.attest()
        busy = server.create_entry("/agents/busy", agent.spiffe_id).spiffe_id
        quiet = server.create_entry("/agents/quiet", agent.spiffe_id).spiffe_id
        for _ in range(3):
            _begin(server, agent, busy)
        refused = _refused(server, agent, busy)
        assert refused.code() == grpc.StatusCode.RESOURCE_EXHAUSTED  # type: ignore[attr-defined]
        assert "task_begin_rate_per_runtime" in refused.details()  # type: ignore[attr-defined]
        assert busy in refused.details()  # type: ignore[attr-defined]
        # Refused before anything was written.
        assert len(server.server.tasks.store.list_tasks(runtime_ids=[busy])) == 3
        # Another workload of the same node is not held back by this one.
        _begin(server, agent, quiet)
        server.clock.advance(1)
        _begin(server, agent, busy)


def test_a_runtime_holds_at_most_its_cap_of_active_tasks() -> None:
    with managed_server(max_active_tasks_per_runtime=2) as server:
        agent = server.attest()
        runtime = server.create_entry("/agents/holder", agent.spiffe_id).spiffe_id
        other = server.create_entry("/agents/other", agent.spiffe_id).spiffe_id
        first = _begin(server, agent, runtime)
        _begin(server, agent, runtime)
        refused = _refused(server, agent, runtime)
        assert refused.code() == grpc.StatusCode.RESOURCE_EXHAUSTED  # type: ignore[attr-defined]
        assert "2 active tasks" in refused.details()  # type: ignore[attr-defined]
        assert "max_active_tasks_per_runtime" in refused.details()  # type: ignore[attr-defined]
        _begin(server, agent, other)  # its own count
        # Ending one makes room again.
        with grpc.secure_channel(
            server.runtime.node_address, agent.credentials(), options=list(TLS_NAME)
        ) as channel:
            task_pb2_grpc.NodeTasksStub(channel).EndTask(
                task_pb2.NodeEndTaskRequest(task_id=first.task_id, runtime_ids=[runtime]),
                timeout=10,
            )
        _begin(server, agent, runtime)
        # So does a task running out.
        server.clock.advance(301)
        server.call(server.server.tasks.service.expire_due())
        _begin(server, agent, runtime)


def _end(server: RunningServer, agent: Agent, runtime_id: str, task_id: str) -> None:
    with grpc.secure_channel(
        server.runtime.node_address, agent.credentials(), options=list(TLS_NAME)
    ) as channel:
        task_pb2_grpc.NodeTasksStub(channel).EndTask(
            task_pb2.NodeEndTaskRequest(task_id=task_id, runtime_ids=[runtime_id]), timeout=10
        )


def test_a_runtime_ending_its_tasks_at_once_lists_a_bounded_number_of_them_as_revoked() -> None:
    """A runtime beginning and ending tasks at once held none active, so its cap never
    applied, while each end stayed on the revocation list sent to every agent until the
    task's expiry: begin and end at the begin rate, with long TTLs, and that list grew to the
    rate times the TTL (72k tasks at 20/s for an hour). Ten times the cap is listed at most."""
    with managed_server(max_active_tasks_per_runtime=1) as server:
        agent = server.attest()
        runtime = server.create_entry("/agents/flood", agent.spiffe_id).spiffe_id
        other = server.create_entry("/agents/other", agent.spiffe_id).spiffe_id
        for _ in range(10):
            _end(server, agent, runtime, _begin(server, agent, runtime).task_id)
        refused = _refused(server, agent, runtime)
        assert refused.code() == grpc.StatusCode.RESOURCE_EXHAUSTED  # type: ignore[attr-defined]
        assert "before their expiry" in refused.details()  # type: ignore[attr-defined]
        tasks = [r for r in server.server.state.revocations if r.kind == "task"]
        assert len(tasks) == 10
        _begin(server, agent, other)  # its own count
        # Once they run out (and their revocations with them), the runtime begins again.
        server.clock.advance(301)
        _begin(server, agent, runtime)


def test_a_runtime_id_leaving_no_room_for_a_task_id_is_refused_before_anything_is_written() -> None:
    """A runtime ID near a SPIFFE ID's 2048 bytes was granted a task whose ID, the runtime's
    with /task/<id> after it, passed them: a task every verifier refuses the SVIDs of, its
    begin allowed and on the audit log."""
    with managed_server() as server:
        agent = server.attest()
        prefix = server.create_entry("/agents/x", agent.spiffe_id).spiffe_id[: -len("/agents/x")]
        room = MAX_ID_BYTES - len("/task/") - 16
        fits = server.create_entry("/" + "a" * (room - len(prefix) - 1), agent.spiffe_id)
        over = server.create_entry("/" + "b" * (room - len(prefix)), agent.spiffe_id)
        assert len(fits.spiffe_id) == room
        assert len(over.spiffe_id) == room + 1
        refused = _refused(server, agent, over.spiffe_id)
        assert refused.code() == grpc.StatusCode.INVALID_ARGUMENT  # type: ignore[attr-defined]
        assert f"at most {room} bytes" in refused.details()  # type: ignore[attr-defined]
        assert not server.server.tasks.store.list_tasks(runtime_ids=[over.spiffe_id])
        task = _begin(server, agent, fits.spiffe_id)
        assert len(task.spiffe_id) == MAX_ID_BYTES
        assert str(SpiffeId.parse(task.spiffe_id)) == task.spiffe_id


def test_an_intent_of_thousands_of_resources_is_refused_at_once_naming_the_limit() -> None:
    """About 50 KB on the wire, far below any message limit, and 30,000 pairs for Cedar: the
    decision alone held the server's CPU (and the GIL) for 10 s before the begin was refused
    for its audit event's size. Refused now before anything is decided or written."""
    with managed_server() as server:
        agent = server.attest()
        runtime = server.create_entry("/agents/greedy", agent.spiffe_id).spiffe_id
        intent = task_pb2.Intent(actions=ACTIONS, resources=[f"r{i:06d}" for i in range(5000)])
        started = time.monotonic()
        refused = _refused(server, agent, runtime, intent, timeout=120)
        took = time.monotonic() - started
        assert refused.code() == grpc.StatusCode.INVALID_ARGUMENT  # type: ignore[attr-defined]
        details = refused.details()  # type: ignore[attr-defined]
        assert details == "intent.resources: 5000 values, at most 64 allowed"
        assert took < 2.0, f"refused only after {took:.1f}s"
        assert server.server.tasks.store.list_tasks(runtime_ids=[runtime]) == []
        store = server.server.tasks.service.audit.store
        assert list(store.audit_rows(EventFilter(kind=EventKind.DENIAL))) == []
        # At the limits, a task is begun.
        most = task_pb2.Intent(actions=ACTIONS, resources=[f"r{i:02d}" for i in range(64)])
        assert _begin(server, agent, runtime, most).resources


# Each limit past by one, and how the refusal names it.
PAST_A_LIMIT = [
    (
        task_pb2.Intent(actions=[f"a{i}" for i in range(33)], resources=["docs"]),
        "intent.actions: 33 values, at most 32 allowed",
    ),
    (
        task_pb2.Intent(tools=[f"mcp#t{i}" for i in range(65)]),
        "intent.tools: 65 values, at most 64 allowed",
    ),
    (
        task_pb2.Intent(
            actions=[f"a{i}" for i in range(9)], resources=[f"r{i}" for i in range(57)]
        ),
        "intent: 9 actions x 57 resources + 0 tools are 513 policy decisions, at most 512 allowed",
    ),
    (
        task_pb2.Intent(actions=["read"], resources=["docs", "d" * 257]),
        "intent.resources[1]: 257 bytes, at most 256 bytes (UTF-8) allowed per name",
    ),
    (
        task_pb2.Intent(actions=["read"], resources=[f"{i:02d}" + "r" * 198 for i in range(11)]),
        "intent: actions, resources and tools are 2204 bytes in all, at most 2048 bytes (UTF-8) "
        "allowed",
    ),
    (
        task_pb2.Intent(actions=["read"], resources=["docs"], environment="e" * 257),
        "intent.environment: 257 bytes, at most 256 bytes (UTF-8) allowed",
    ),
    (
        task_pb2.Intent(actions=["read"], resources=["docs"], classification="c" * 257),
        "intent.classification: 257 bytes, at most 256 bytes (UTF-8) allowed",
    ),
]


def test_each_limit_of_an_intent_is_named_when_it_is_passed() -> None:
    with managed_server() as server:
        agent = server.attest()
        runtime = server.create_entry("/agents/sized", agent.spiffe_id).spiffe_id
        for intent, named in PAST_A_LIMIT:
            refused = _refused(server, agent, runtime, intent)
            assert refused.code() == grpc.StatusCode.INVALID_ARGUMENT  # type: ignore[attr-defined]
            assert refused.details() == named  # type: ignore[attr-defined]


# A name holding a comma, and how the refusal names it: the audit log joins each list with
# commas, so "docs,secrets" would read as the two resources "docs" and "secrets".
COMMA_NAMES = [
    (
        task_pb2.Intent(actions=["read"], resources=["docs", "docs,secrets"]),
        "intent.resources[1]: 'docs,secrets' holds a comma; one name per value (several are "
        "several values)",
    ),
    (
        task_pb2.Intent(actions=["read,write"], resources=["docs"]),
        "intent.actions[0]: 'read,write' holds a comma; one name per value (several are "
        "several values)",
    ),
    (
        task_pb2.Intent(tools=["mcp#search", "mcp,admin#search"]),
        "intent.tools[1]: 'mcp,admin#search' holds a comma; one name per value (several are "
        "several values)",
    ),
]


def test_a_name_holding_a_comma_is_refused_naming_it() -> None:
    with managed_server() as server:
        agent = server.attest()
        runtime = server.create_entry("/agents/commas", agent.spiffe_id).spiffe_id
        for intent, named in COMMA_NAMES:
            refused = _refused(server, agent, runtime, intent)
            assert refused.code() == grpc.StatusCode.INVALID_ARGUMENT  # type: ignore[attr-defined]
            assert refused.details() == named  # type: ignore[attr-defined]
        assert server.server.tasks.store.list_tasks(runtime_ids=[runtime]) == []
        store = server.server.tasks.service.audit.store
        assert list(store.audit_rows(EventFilter(kind=EventKind.TASK_BEGIN))) == []
        # The same names as separate values are begun.
        task = _begin(
            server,
            agent,
            runtime,
            task_pb2.Intent(actions=["read"], resources=["docs", "secrets"]),
        )
        assert sorted(task.resources) == ["docs", "secrets"]


def test_on_behalf_of_is_at_most_512_bytes() -> None:
    """It was checked for printable text only: a 1 MB principal was granted, and went as is
    into the task-begin event, every JWT of the task (`obo`, 1.3 MB tokens) and each mint's
    event."""
    with managed_server() as server:
        agent = server.attest()
        runtime = server.create_entry("/agents/obo", agent.spiffe_id).spiffe_id
        for size in (MAX_ON_BEHALF_OF_BYTES + 1, 1_000_000):
            principal = "user:" + "a" * (size - 5)
            intent = task_pb2.Intent(actions=["read"], resources=["docs"], on_behalf_of=principal)
            refused = _refused(server, agent, runtime, intent, timeout=30)
            assert refused.code() == grpc.StatusCode.INVALID_ARGUMENT  # type: ignore[attr-defined]
            assert refused.details() == (  # type: ignore[attr-defined]
                f"intent.on_behalf_of: {size} bytes, at most 512 bytes (UTF-8) allowed"
            )
        assert server.server.tasks.store.list_tasks(runtime_ids=[runtime]) == []
        # 512 bytes are granted, and go into the task's JWTs.
        principal = "user:" + "a" * (MAX_ON_BEHALF_OF_BYTES - 5)
        task = _begin(
            server,
            agent,
            runtime,
            task_pb2.Intent(actions=["read"], resources=["docs"], on_behalf_of=principal),
        )
        assert task.on_behalf_of == principal
        entry_id = f"task-{task.task_id}"
        wait_for(
            lambda: entry_id in server.server.state.entries.by_id,
            10,
            "the task's entry",
            interval=0.01,
        )
        minted = server.node_stub(agent).NewJWTSVID(
            node_pb2.NewJWTSVIDRequest(
                spiffe_id=task.spiffe_id, audience=["docs"], entry_id=entry_id
            ),
            timeout=10,
        )
        assert len(minted.token) < 4096
