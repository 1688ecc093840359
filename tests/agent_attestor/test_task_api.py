"""The agent's Tasks and Revocations services over the real relay, with a fake server client."""

from __future__ import annotations

import asyncio
import hashlib
import os
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

import grpc
import pytest

from agent_attestor.cache import Cache
from agent_attestor.endpoint import WorkloadEndpoint
from agent_attestor.errors import NoIdentityError, NotReadyError
from agent_attestor.model import Entry, Selector
from agent_attestor.tasks.api import MAX_GOAL, TasksApi
from agent_attestor.tasks.client import GrpcTaskClient
from agent_attestor.tasks.reporter import MAX_QUEUED, ValidationReporter
from agent_attestor.tasks.revocations import RevocationsApi
from agent_attestor.workload_attestor import UnixAttestor
from svid._clock import FakeClock
from svid._jwt import JwtSvid
from svid._limits import MAX_INTENT_LABEL_BYTES, MAX_INTENT_NAMES_BYTES, MAX_ON_BEHALF_OF_BYTES
from svid._proto import (
    revocation_pb2,
    revocation_pb2_grpc,
    task_pb2,
    task_pb2_grpc,
    workload_pb2,
)
from svid._tasks_async import AsyncTaskClient
from svid._tasks_sync import TaskClient
from tests.agent_attestor.harness import HEADER, Harness, me
from tests.clocks import SleptClock
from tests.rpc_errors import rpc_error
from tests.waits import wait_for

TD = "spiffe://example.org"


def _denied(message: str) -> grpc.aio.AioRpcError:
    return rpc_error(grpc.StatusCode.PERMISSION_DENIED, message)


@dataclass
class FakeClient:
    begun: list[task_pb2.NodeBeginTaskRequest] = field(default_factory=list)
    ended: list[task_pb2.NodeEndTaskRequest] = field(default_factory=list)
    listed: list[task_pb2.NodeListTasksRequest] = field(default_factory=list)
    refuse: str = ""
    down: bool = False
    # As the agent's channel before it has checked the server it is to reach (node_client).
    unchecked: bool = False
    # As the server does: the task's entry reaches the agent's cache (after this many seconds).
    cache: Cache | None = None
    entry_delay: float | None = None

    def _check(self) -> None:
        if self.unchecked:
            raise NotReadyError("not connected to the server yet: its identity is unchecked")
        if self.down:
            raise rpc_error(grpc.StatusCode.UNAVAILABLE, "down")
        if self.refuse:
            raise _denied(self.refuse)

    async def begin(self, request: task_pb2.NodeBeginTaskRequest) -> task_pb2.Task:
        self._check()
        self.begun.append(request)
        task = task_pb2.Task(
            task_id="t1", spiffe_id=f"{request.runtime_id}/task/t1", runtime_id=request.runtime_id
        )
        if self.cache is not None and self.entry_delay is not None:
            entry = Entry(id="task-t1", spiffe_id=task.spiffe_id, selectors=me())
            cache = self.cache
            asyncio.get_running_loop().call_later(
                self.entry_delay, lambda: cache.update_entries([entry], ())
            )
        return task

    async def end(self, request: task_pb2.NodeEndTaskRequest) -> task_pb2.Task:
        self._check()
        self.ended.append(request)
        return task_pb2.Task(
            task_id=request.task_id,
            spiffe_id=f"{TD}/bot/task/{request.task_id}",
            runtime_id=f"{TD}/bot",
            state="ended",
        )

    async def list(self, request: task_pb2.NodeListTasksRequest) -> task_pb2.ListTasksResponse:
        self._check()
        self.listed.append(request)
        return task_pb2.ListTasksResponse(
            tasks=[task_pb2.Task(task_id="t1", runtime_id=request.runtime_ids[0])],
            next_page_token="next",
        )


@dataclass
class TaskAgent:
    h: Harness
    client: FakeClient
    endpoint: WorkloadEndpoint

    def channel(self) -> grpc.Channel:
        ch = grpc.insecure_channel(f"unix:{self.endpoint.socket_path}")
        self.h.channels.append(ch)
        return ch

    def tasks(self) -> task_pb2_grpc.TasksStub:
        return task_pb2_grpc.TasksStub(self.channel())


@pytest.fixture
def ta() -> Iterator[TaskAgent]:
    h = Harness()
    client = FakeClient(cache=h.cache, entry_delay=0.0)
    # The Workload API's minting budget, shared as app.py shares it.
    tasks = TasksApi(h.cache, h.registry, client, h.jwts, entry_wait=1.0, mints=h.api.mints)
    revs = RevocationsApi(h.cache, h.registry, h.api.streams)
    endpoint = WorkloadEndpoint(
        socket_path=h.root / "public" / "tasks.sock",
        private_dir=h.root / "private2",
        servicer=h.api,
        registry=h.registry,
        attestors=[UnixAttestor()],
        extra_servicers=[
            lambda server: task_pb2_grpc.add_TasksServicer_to_server(tasks, server),
            lambda server: revocation_pb2_grpc.add_RevocationsServicer_to_server(revs, server),
        ],
    )
    h.lt.run(endpoint.start())
    try:
        yield TaskAgent(h, client, endpoint)
    finally:
        h.lt.run(endpoint.stop(0))
        h.close()


def begin(ta: TaskAgent, **kw: object) -> task_pb2.BeginTaskResponse:
    request = task_pb2.BeginTaskRequest(
        intent=task_pb2.Intent(actions=["read"], resources=["docs"], goal="summarise Q3"),
        ttl=60,
        **kw,  # type: ignore[arg-type]
    )
    return ta.tasks().BeginTask(request, metadata=HEADER, timeout=10)  # type: ignore[no-any-return]


def test_begin_forwards_the_default_identity_and_only_the_goal_hash(ta: TaskAgent) -> None:
    ta.h.add_entry("/bot")
    ta.h.add_entry("/bot-other")
    reply = begin(ta)
    assert reply.task.spiffe_id == f"{TD}/bot/task/t1"
    (sent,) = ta.client.begun
    assert sent.runtime_id == f"{TD}/bot"
    assert sent.intent.goal == ""
    assert sent.goal_sha256 == hashlib.sha256(b"summarise Q3").hexdigest()
    assert list(sent.intent.actions) == ["read"]
    begin(ta, spiffe_id=f"{TD}/bot-other")
    assert ta.client.begun[1].runtime_id == f"{TD}/bot-other"


def test_begin_names_the_callers_own_entry_for_the_task_to_take_its_selectors(
    ta: TaskAgent,
) -> None:
    # Two entries give /bot to two workloads. The server gave the task the selectors of the
    # entry with the lowest id, another workload's here: that one got the task's SVIDs.
    other = ta.h.add_entry("/bot", selectors=frozenset({Selector("unix", "uid:4294967294")}))
    mine = ta.h.add_entry("/bot")
    narrower = ta.h.add_entry("/bot", selectors=me() | {Selector("unix", f"gid:{os.getgid()}")})
    begin(ta)
    (sent,) = ta.client.begun
    assert sent.runtime_entry_id == narrower.id
    assert other.id < mine.id < narrower.id


def test_begin_answers_once_the_task_entry_is_served_here(ta: TaskAgent) -> None:
    ta.h.add_entry("/bot")
    ta.client.entry_delay = 0.3
    started = time.monotonic()
    task = begin(ta).task
    assert time.monotonic() - started >= 0.3
    # At once usable: a JWT for the task, with no retry.
    reply = ta.h.stub().FetchJWTSVID(
        workload_pb2.JWTSVIDRequest(audience=["docs"], spiffe_id=task.spiffe_id),
        metadata=HEADER,
        timeout=10,
    )
    assert [s.spiffe_id for s in reply.svids] == [task.spiffe_id]


def _mint_task_jwt(ta: TaskAgent, spiffe_id: str, audience: str = "svidd") -> str:
    request = task_pb2.MintTaskJWTRequest(spiffe_id=spiffe_id, audience=[audience])
    return str(ta.tasks().MintTaskJWT(request, metadata=HEADER, timeout=10).svid)


def _fetch_jwt(ta: TaskAgent, spiffe_id: str, audience: str = "svidd") -> str:
    request = workload_pb2.JWTSVIDRequest(audience=[audience], spiffe_id=spiffe_id)
    return str(ta.h.stub().FetchJWTSVID(request, metadata=HEADER, timeout=10).svids[0].svid)


def test_mint_task_jwt_mints_anew_each_time_and_leaves_the_cached_token(ta: TaskAgent) -> None:
    ta.h.add_entry("/bot")
    task = begin(ta).task
    cached = _fetch_jwt(ta, task.spiffe_id)
    assert _fetch_jwt(ta, task.spiffe_id) == cached
    first, second = _mint_task_jwt(ta, task.spiffe_id), _mint_task_jwt(ta, task.spiffe_id)
    jtis = {JwtSvid.parse_insecure(t).claims["jti"] for t in (cached, first, second)}
    assert len(jtis) == 3
    minted = JwtSvid.parse_insecure(first)
    assert str(minted.spiffe_id) == task.spiffe_id
    assert list(minted.audience) == ["svidd"]
    # What FetchJWTSVID hands out is as before: a fresh mint is the asker's alone.
    assert _fetch_jwt(ta, task.spiffe_id) == cached


def test_mint_task_jwt_only_for_a_task_identity_the_caller_holds(ta: TaskAgent) -> None:
    ta.h.add_entry("/bot")
    ta.h.add_entry("/other/task/t9", selectors=frozenset({Selector("unix", "uid:4294967294")}))
    begin(ta)
    for spiffe_id, code in [
        (f"{TD}/bot", grpc.StatusCode.PERMISSION_DENIED),  # its own, not a task's
        (f"{TD}/other/task/t9", grpc.StatusCode.PERMISSION_DENIED),  # another workload's
        ("", grpc.StatusCode.INVALID_ARGUMENT),
    ]:
        with pytest.raises(grpc.RpcError) as refused:
            _mint_task_jwt(ta, spiffe_id)
        assert refused.value.code() is code, spiffe_id
    with pytest.raises(grpc.RpcError) as no_audience:
        _mint_task_jwt(ta, f"{TD}/bot/task/t1", audience="")
    assert no_audience.value.code() is grpc.StatusCode.INVALID_ARGUMENT


def test_mint_task_jwt_counts_against_the_callers_uid_minting_rate(ta: TaskAgent) -> None:
    """A runtime asking for fresh tokens in a loop is held to its uid's budget, the one its
    FetchJWTSVID cache misses spend: it cannot mint past it by asking fresh."""
    ta.h.add_entry("/bot")
    task = begin(ta).task
    mints = ta.h.api.mints
    while ta.h.lt.call(lambda: mints.take(os.getuid())) is None:  # spent (the clock stands)
        pass
    calls = ta.h.signer.jwt_calls
    with pytest.raises(grpc.RpcError) as refused:
        _mint_task_jwt(ta, task.spiffe_id)
    assert refused.value.code() is grpc.StatusCode.RESOURCE_EXHAUSTED
    assert "jwt_mints_per_uid_rate" in str(refused.value.details())
    assert ta.h.signer.jwt_calls == calls  # refused before the server was asked
    ta.h.clock.advance(1)  # the bucket refills at its rate
    assert _mint_task_jwt(ta, task.spiffe_id)


def test_begin_answers_anyway_when_the_entry_is_late(ta: TaskAgent) -> None:
    ta.h.add_entry("/bot")
    ta.client.entry_delay = None  # never comes
    started = time.monotonic()
    assert begin(ta).task.task_id == "t1"
    assert 1.0 <= time.monotonic() - started < 5


def test_a_begin_the_workload_hangs_up_on_after_the_grant_ends_the_task(ta: TaskAgent) -> None:
    # The server granted the task; the workload is gone (cancelled, or out of its deadline)
    # before the agent answered: it never learns the task's ID, so only the agent can end it
    # before its TTL.
    ta.h.add_entry("/bot")
    ta.client.entry_delay = None  # the agent waits for the task's entry, and the caller leaves
    request = task_pb2.BeginTaskRequest(
        intent=task_pb2.Intent(actions=["read"], resources=["docs"]), ttl=60
    )
    call = ta.tasks().BeginTask.future(request, metadata=HEADER, timeout=10)
    wait_for(lambda: ta.client.begun, 5, "the task begun on the server", interval=0.01)
    call.cancel()
    wait_for(lambda: ta.client.ended, 5, "the task ended on the server", interval=0.01)
    (ended,) = ta.client.ended
    assert ended.task_id == "t1"
    assert list(ended.runtime_ids) == [f"{TD}/bot"]
    assert list(ended.runtime_entry_ids) == [ta.client.begun[0].runtime_entry_id]
    assert ended.reason == "its workload hung up before the answer"


def test_a_begin_the_server_refuses_ends_nothing(ta: TaskAgent) -> None:
    ta.h.add_entry("/bot")
    ta.client.refuse = "denied: no"
    with pytest.raises(grpc.RpcError):
        begin(ta)
    time.sleep(0.2)
    assert ta.client.ended == []


def test_begin_under_an_identity_not_held_is_refused_locally(ta: TaskAgent) -> None:
    ta.h.add_entry("/bot")
    ta.h.add_entry("/bot/task/abc")
    for sid in (f"{TD}/someone-else", f"{TD}/bot/task/abc"):
        with pytest.raises(grpc.RpcError) as err:
            begin(ta, spiffe_id=sid)
        assert err.value.code() is grpc.StatusCode.PERMISSION_DENIED
    assert ta.client.begun == []


def test_a_task_declaring_another_workload_as_its_principal_is_refused_here(
    ta: TaskAgent,
) -> None:
    """The server's own rule (svid._limits.principal_problem): a task with no parent acts for
    no SPIFFE ID but its runtime's; a sub-task's chain is the server's to check."""
    ta.h.add_entry("/bot")

    def acting_for(principal: str, parent: str = "") -> task_pb2.BeginTaskResponse:
        intent = task_pb2.Intent(actions=["read"], resources=["docs"], on_behalf_of=principal)
        request = task_pb2.BeginTaskRequest(intent=intent, ttl=60, parent_task_id=parent)
        return ta.tasks().BeginTask(request, metadata=HEADER, timeout=10)  # type: ignore[no-any-return]

    for posing in (f"{TD}/billing-service", "SPIFFE://example.org/billing-service"):
        with pytest.raises(grpc.RpcError) as err:
            acting_for(posing)
        assert err.value.code() is grpc.StatusCode.PERMISSION_DENIED
        assert "intent.on_behalf_of" in (err.value.details() or "")
    assert ta.client.begun == []
    acting_for(f"{TD}/bot")
    acting_for("user:alice")
    acting_for(f"{TD}/billing-service", parent="t0")
    assert [r.intent.on_behalf_of for r in ta.client.begun] == [
        f"{TD}/bot",
        "user:alice",
        f"{TD}/billing-service",
    ]


def test_an_intent_past_the_servers_limits_is_refused_here_naming_the_limit(
    ta: TaskAgent,
) -> None:
    """The server's own limits (svid._limits): such an intent never leaves the node."""
    ta.h.add_entry("/bot")
    cases = [
        (
            task_pb2.Intent(actions=["read"], resources=[f"r{i}" for i in range(5000)]),
            "intent.resources: 5000 values, at most 64 allowed",
        ),
        (
            task_pb2.Intent(actions=["read"], resources=["docs"], on_behalf_of="u" * 513),
            "intent.on_behalf_of: 513 bytes, at most 512 bytes (UTF-8) allowed",
        ),
        (
            task_pb2.Intent(actions=["read"], resources=["docs"], environment="é" * 129),
            "intent.environment: 258 bytes, at most 256 bytes (UTF-8) allowed",
        ),
    ]
    for intent, named in cases:
        with pytest.raises(grpc.RpcError) as err:
            ta.tasks().BeginTask(
                task_pb2.BeginTaskRequest(intent=intent, ttl=60), metadata=HEADER, timeout=10
            )
        assert err.value.code() is grpc.StatusCode.INVALID_ARGUMENT
        assert err.value.details() == named
    assert ta.client.begun == []
    # At the limits, forwarded.
    most = task_pb2.Intent(actions=["read"], resources=[f"r{i}" for i in range(64)])
    ta.tasks().BeginTask(
        task_pb2.BeginTaskRequest(intent=most, ttl=60), metadata=HEADER, timeout=10
    )
    assert len(ta.client.begun) == 1


def test_the_largest_intent_fits_the_sockets_message_bound_and_a_goal_counts_bytes(
    ta: TaskAgent,
) -> None:
    """endpoint.MAX_MESSAGE is sized for the largest BeginTask: a goal of MAX_GOAL bytes and an
    intent at the server's limits. A goal over MAX_GOAL in UTF-8 is refused naming it, even one
    of fewer characters (it was counted in characters, four times what the bound carries)."""
    ta.h.add_entry("/bot")
    names = [f"{i}" + "n" * 255 for i in range(MAX_INTENT_NAMES_BYTES // 256)]
    largest = task_pb2.Intent(
        actions=names[:4],
        resources=names[4:],
        goal="g" * MAX_GOAL,
        on_behalf_of="u" * MAX_ON_BEHALF_OF_BYTES,
        environment="e" * MAX_INTENT_LABEL_BYTES,
        classification="c" * MAX_INTENT_LABEL_BYTES,
    )
    ta.tasks().BeginTask(
        task_pb2.BeginTaskRequest(intent=largest, ttl=60), metadata=HEADER, timeout=10
    )
    assert len(ta.client.begun) == 1
    for goal in ("g" * (MAX_GOAL + 1), "é" * (MAX_GOAL // 2 + 1)):
        intent = task_pb2.Intent(actions=["read"], resources=["docs"], goal=goal)
        with pytest.raises(grpc.RpcError) as err:
            ta.tasks().BeginTask(
                task_pb2.BeginTaskRequest(intent=intent, ttl=60), metadata=HEADER, timeout=10
            )
        assert (err.value.code(), err.value.details()) == (
            grpc.StatusCode.INVALID_ARGUMENT,
            "intent.goal: too long",
        )
    assert len(ta.client.begun) == 1


def test_caller_without_identity_or_header_is_refused(ta: TaskAgent) -> None:
    ta.h.sync()  # ready, with no entry for this caller
    with pytest.raises(grpc.RpcError) as err:
        begin(ta)
    assert err.value.code() is grpc.StatusCode.PERMISSION_DENIED
    ta.h.add_entry("/bot")
    with pytest.raises(grpc.RpcError) as err:
        ta.tasks().ListTasks(task_pb2.ListTasksRequest(), timeout=10)
    assert err.value.code() is grpc.StatusCode.INVALID_ARGUMENT


def test_an_agent_not_ready_or_refused_says_so_rather_than_no_identity(ta: TaskAgent) -> None:
    # Before the first Sync the cache holds no entry for anyone: "no identity issued" would
    # tell the workload it is not entitled (svid raises TaskDeniedError) when it should retry.
    stub = ta.tasks()
    calls = [
        lambda: begin(ta),
        lambda: stub.EndTask(task_pb2.EndTaskRequest(task_id="t1"), metadata=HEADER, timeout=10),
        lambda: stub.ListTasks(task_pb2.ListTasksRequest(), metadata=HEADER, timeout=10),
    ]
    for call in calls:
        with pytest.raises(grpc.RpcError) as err:
            call()
        assert err.value.code() is grpc.StatusCode.UNAVAILABLE
    ta.h.add_entry("/bot")
    ta.h.lt.call(lambda: ta.h.cache.refuse("evicted or banned: re-attest"))
    for call in calls:
        with pytest.raises(grpc.RpcError) as err:
            call()
        assert err.value.code() is grpc.StatusCode.PERMISSION_DENIED
        assert err.value.details() == "evicted or banned: re-attest"
    assert ta.client.begun == ta.client.ended == ta.client.listed == []


def test_server_denial_reaches_the_workload_with_its_reason(ta: TaskAgent) -> None:
    ta.h.add_entry("/bot")
    ta.client.refuse = "denied: export_data on s3: forbidden by no_restricted_export"
    with pytest.raises(grpc.RpcError) as err:
        begin(ta)
    assert err.value.code() is grpc.StatusCode.PERMISSION_DENIED
    assert "no_restricted_export" in (err.value.details() or "")
    ta.client.refuse, ta.client.down = "", True
    with pytest.raises(grpc.RpcError) as err:
        begin(ta)
    assert err.value.code() is grpc.StatusCode.UNAVAILABLE


def test_a_call_before_the_agent_checked_its_server_is_answered_unavailable(
    ta: TaskAgent,
) -> None:
    # Between a new connection to the server and the check of its identity, no call goes out:
    # the workload is told to retry, as when the server is away, not answered UNKNOWN.
    ta.h.add_entry("/bot")
    ta.client.unchecked = True
    with pytest.raises(grpc.RpcError) as err:
        begin(ta)
    assert err.value.code() is grpc.StatusCode.UNAVAILABLE
    assert "not connected to svid-server yet" in (err.value.details() or "")
    assert ta.client.begun == []


def test_end_sends_the_callers_identities_and_forgets_cached_task_jwts(ta: TaskAgent) -> None:
    ta.h.add_entry("/bot")
    task_entry = ta.h.add_entry("/bot/task/t1")

    async def mint() -> None:
        await ta.h.jwts.get(task_entry.spiffe_id, ["docs"], task_entry.id, 0)

    ta.h.lt.run(mint())
    assert ta.h.jwts.cached(task_entry.spiffe_id, ["docs"], task_entry.id) is not None
    ta.tasks().EndTask(task_pb2.EndTaskRequest(task_id="t1"), metadata=HEADER, timeout=10)
    (sent,) = ta.client.ended
    assert list(sent.runtime_ids) == [f"{TD}/bot"]
    assert ta.h.jwts.cached(task_entry.spiffe_id, ["docs"], task_entry.id) is None
    listed = ta.tasks().ListTasks(task_pb2.ListTasksRequest(), metadata=HEADER, timeout=10)
    assert [t.task_id for t in listed.tasks] == ["t1"]


def test_end_and_list_name_the_callers_own_entries_not_another_workloads_of_its_identity(
    ta: TaskAgent,
) -> None:
    # Two entries give /bot to two workloads: the server keeps each one's tasks from the other
    # by the entries the agent names, so the other workload's entry must never be among them.
    other = ta.h.add_entry("/bot", selectors=frozenset({Selector("unix", "uid:4294967294")}))
    mine = ta.h.add_entry("/bot")
    helper = ta.h.add_entry("/helper")
    ta.tasks().EndTask(task_pb2.EndTaskRequest(task_id="t1"), metadata=HEADER, timeout=10)
    (ended,) = ta.client.ended
    assert sorted(ended.runtime_entry_ids) == sorted([mine.id, helper.id])
    ta.tasks().ListTasks(task_pb2.ListTasksRequest(), metadata=HEADER, timeout=10)
    assert sorted(ta.client.listed[-1].runtime_entry_ids) == sorted([mine.id, helper.id])
    request = task_pb2.ListTasksRequest(spiffe_id=f"{TD}/bot")
    ta.tasks().ListTasks(request, metadata=HEADER, timeout=10)
    assert list(ta.client.listed[-1].runtime_entry_ids) == [mine.id]
    assert list(ta.client.listed[-1].runtime_ids) == [f"{TD}/bot"]
    assert other.id not in {*ended.runtime_entry_ids, *ta.client.listed[0].runtime_entry_ids}


def test_end_forgets_the_cached_jwts_of_the_tasks_sub_tasks_too(ta: TaskAgent) -> None:
    # The server ends a task's sub-tasks with it. Their entries leave this agent only with a
    # later Sync message: until then a sub-task's cached token was served after EndTask.
    ta.h.add_entry("/bot")
    ta.h.add_entry("/bot/task/t1")
    sub = ta.h.add_entry("/bot/task/t2")
    request = workload_pb2.JWTSVIDRequest(audience=["docs"], spiffe_id=sub.spiffe_id)
    ta.h.stub().FetchJWTSVID(request, metadata=HEADER, timeout=10)
    ta.tasks().EndTask(task_pb2.EndTaskRequest(task_id="t1"), metadata=HEADER, timeout=10)
    # As the server answers a mint for an ended task.
    ta.h.signer.refuse_jwt = NoIdentityError(f"task identity {sub.spiffe_id} is not active")
    with pytest.raises(grpc.RpcError) as err:
        ta.h.stub().FetchJWTSVID(request, metadata=HEADER, timeout=10)
    assert err.value.code() is grpc.StatusCode.PERMISSION_DENIED


def test_list_forwards_paging_and_filters_for_the_callers_identities(ta: TaskAgent) -> None:
    ta.h.add_entry("/bot")
    ta.h.add_entry("/helper")
    request = task_pb2.ListTasksRequest(page_size=7, page_token="tok", state="active")
    listed = ta.tasks().ListTasks(request, metadata=HEADER, timeout=10)
    assert [t.task_id for t in listed.tasks] == ["t1"]
    assert listed.next_page_token == "next"
    (sent,) = ta.client.listed
    assert sorted(sent.runtime_ids) == [f"{TD}/bot", f"{TD}/helper"]
    assert (sent.page_size, sent.page_token, sent.state) == (7, "tok", "active")
    request = task_pb2.ListTasksRequest(spiffe_id=f"{TD}/helper")
    ta.tasks().ListTasks(request, metadata=HEADER, timeout=10)
    assert list(ta.client.listed[-1].runtime_ids) == [f"{TD}/helper"]
    request = task_pb2.ListTasksRequest(spiffe_id=f"{TD}/someone-else")
    with pytest.raises(grpc.RpcError) as err:
        ta.tasks().ListTasks(request, metadata=HEADER, timeout=10)
    assert err.value.code() is grpc.StatusCode.PERMISSION_DENIED
    assert len(ta.client.listed) == 2


def test_revocation_watch_pushes_full_state_on_change(ta: TaskAgent) -> None:
    ta.h.add_entry("/bot")
    stub = revocation_pb2_grpc.RevocationsStub(ta.channel())
    with pytest.raises(grpc.RpcError) as err:
        next(stub.Watch(revocation_pb2.WatchRequest(), timeout=10))
    assert err.value.code() is grpc.StatusCode.INVALID_ARGUMENT
    stream = stub.Watch(revocation_pb2.WatchRequest(), metadata=HEADER, timeout=10)
    first = next(stream)
    assert list(first.items) == []
    ta.h.revoked = frozenset({"abc123"})
    ta.h.crl = (b"crl-der",)
    ta.h.sync(issue=False)
    second = next(stream)
    assert [(i.kind, i.value) for i in second.items] == [("x509_serial", "abc123")]
    assert list(second.crl) == [b"crl-der"]
    assert second.version > first.version
    stream.cancel()


def test_revocation_watch_never_sends_a_list_the_agent_does_not_hold(ta: TaskAgent) -> None:
    # Each message replaces a verifier's whole revocation set. Before the first Sync (a fresh
    # or restarted agent, perhaps with the server down) and after the server refused the agent,
    # the cache holds no revocations: an empty list then told verifiers nothing is revoked.
    stub = revocation_pb2_grpc.RevocationsStub(ta.channel())
    with pytest.raises(grpc.RpcError) as err:
        next(stub.Watch(revocation_pb2.WatchRequest(), metadata=HEADER, timeout=10))
    assert err.value.code() is grpc.StatusCode.UNAVAILABLE
    ta.h.revoked = frozenset({"abc123"})
    ta.h.add_entry("/bot")
    stream = stub.Watch(revocation_pb2.WatchRequest(), metadata=HEADER, timeout=10)
    assert [i.value for i in next(stream).items] == ["abc123"]
    ta.h.lt.call(lambda: ta.h.cache.refuse("evicted or banned: re-attest"))
    with pytest.raises(grpc.RpcError) as err:
        next(stream)
    assert err.value.code() is grpc.StatusCode.PERMISSION_DENIED
    assert err.value.details() == "evicted or banned: re-attest"
    with pytest.raises(grpc.RpcError) as err:
        next(stub.Watch(revocation_pb2.WatchRequest(), metadata=HEADER, timeout=10))
    assert err.value.code() is grpc.StatusCode.PERMISSION_DENIED


def test_revocation_watch_is_for_callers_that_hold_an_identity(ta: TaskAgent) -> None:
    # The list names whose credentials are revoked (tasks' SPIFFE IDs): like the bundles, it is
    # served to workloads the agent holds an identity for, not to any process on the machine.
    ta.h.revoked = frozenset({"abc123"})
    ta.h.sync(issue=False)
    stub = revocation_pb2_grpc.RevocationsStub(ta.channel())
    with pytest.raises(grpc.RpcError) as err:
        next(stub.Watch(revocation_pb2.WatchRequest(), metadata=HEADER, timeout=10))
    assert err.value.code() is grpc.StatusCode.PERMISSION_DENIED
    assert err.value.details() == "no identity issued"
    entry = ta.h.add_entry("/bot")
    stream = stub.Watch(revocation_pb2.WatchRequest(), metadata=HEADER, timeout=10)
    assert [i.value for i in next(stream).items] == ["abc123"]
    ta.h.remove_entry(entry.id)  # its last identity gone: the stream ends
    with pytest.raises(grpc.RpcError) as err:
        next(stream)
    assert err.value.code() is grpc.StatusCode.PERMISSION_DENIED


def test_validation_reporter_batches_and_retries_after_a_failure() -> None:
    sent: list[task_pb2.ReportValidationsRequest] = []
    fail = [True]

    async def send(request: task_pb2.ReportValidationsRequest) -> None:
        if fail[0]:
            fail[0] = False
            raise ConnectionError("server away")
        sent.append(request)

    reporter = ValidationReporter(send, FakeClock(1000))
    reporter.report(subject=f"{TD}/bot/task/t1", audience=["docs"], ok=True, jti="j1", txn="t1")
    reporter.report(subject="", audience=["docs"], ok=False, reason="signature")
    asyncio.run(reporter.flush())
    assert sent == []
    asyncio.run(reporter.flush())
    (batch,) = sent
    got = [(v.jti, v.ok, v.at) for v in batch.validations]
    assert got == [("j1", True, 1000), ("", False, 1000)]
    assert reporter.sent == 2


def test_validation_reports_put_back_into_a_full_queue_are_counted_as_dropped() -> None:
    # While a batch is out, new reports fill the queue; the batch then fails and goes back in
    # front, pushing out as many of the newest. Every report is sent, queued or counted.
    reporter: ValidationReporter

    async def send(request: task_pb2.ReportValidationsRequest) -> None:
        for i in range(MAX_QUEUED):
            reporter.report(subject="", audience=["docs"], ok=False, reason=f"r{i}")
        raise ConnectionError("server away")

    reporter = ValidationReporter(send, FakeClock(1000))
    for i in range(10):
        reporter.report(subject="", audience=["docs"], ok=True, jti=f"j{i}")
    asyncio.run(reporter.flush())
    queued = reporter.queued()
    assert len(queued) == MAX_QUEUED
    assert [v.jti for v in queued[:10]] == [f"j{i}" for i in range(10)]  # the oldest kept
    assert reporter.sent + len(queued) + reporter.dropped == 10 + MAX_QUEUED


def test_a_flood_of_refused_tokens_does_not_push_accepted_ones_out_of_the_queue() -> None:
    """Any local process may have made-up tokens refused as fast as it can send them, where an
    acceptance needs a token the server signed. While the server is away, a flood of refusals
    must not push queued acceptances out: the audit log would lose who validated a task's
    tokens, with nothing to show for it."""
    sent: list[task_pb2.ReportValidationsRequest] = []
    up = [False]

    async def send(request: task_pb2.ReportValidationsRequest) -> None:
        if not up[0]:
            raise ConnectionError("server away")
        sent.append(request)

    reporter = ValidationReporter(send, FakeClock(1000))
    reporter.report(
        subject=f"{TD}/bot/task/t1", audience=["docs"], ok=True, jti="j1", txn="t1", until=2000
    )
    asyncio.run(reporter.flush())
    for i in range(MAX_QUEUED):
        reporter.report(subject="", audience=["docs"], ok=False, reason=f"r{i}")
    # Into a queue full of refusals, an acceptance still comes in: the oldest refusal goes.
    reporter.report(
        subject=f"{TD}/bot/task/t1", audience=["api"], ok=True, jti="j2", txn="t1", until=2000
    )
    up[0] = True
    asyncio.run(reporter.flush())
    reported = [v for request in sent for v in request.validations]
    assert [v.jti for v in reported if v.ok] == ["j1", "j2"]
    assert [v.reason for v in reported if not v.ok][:1] == ["r1"]
    assert len(reported) + reporter.dropped == 2 + MAX_QUEUED


class _Recorder(task_pb2_grpc.NodeTasksServicer):  # type: ignore[misc]
    def __init__(self) -> None:
        self.validations: list[task_pb2.Validation] = []

    async def ReportValidations(
        self, request: task_pb2.ReportValidationsRequest, context: grpc.aio.ServicerContext
    ) -> task_pb2.ReportValidationsResponse:
        self.validations.extend(request.validations)
        return task_pb2.ReportValidationsResponse()


def test_validation_reports_of_long_refused_tokens_reach_a_server_with_the_default_size_limit(
    tmp_path: Path,
) -> None:
    # ValidateJWTSVID reports up to 2,048 characters of a refused token's sub, jti, txn and
    # reason: 1,000 such reports are 9 MB, over the server's 4 MiB message limit. Sent as one
    # batch, it was refused with RESOURCE_EXHAUSTED, put back and sent again at every flush:
    # any local process could stop the agent's validation audit for good.
    long = "x" * 2048

    async def run() -> list[task_pb2.Validation]:
        recorder = _Recorder()
        server = grpc.aio.server(options=[("grpc.max_receive_message_length", 4 * 1024 * 1024)])
        task_pb2_grpc.add_NodeTasksServicer_to_server(recorder, server)
        address = f"unix:{tmp_path / 'node.sock'}"
        server.add_insecure_port(address)
        await server.start()
        channel = grpc.aio.insecure_channel(address)
        try:
            reporter = ValidationReporter(GrpcTaskClient(lambda: channel).report, FakeClock(1000))
            for _ in range(1000):
                reporter.report(
                    subject=long, audience=["a" * 1024], ok=False, reason=long, jti=long, txn=long
                )
            for _ in range(20):
                await reporter.flush()
            assert reporter.dropped == 0
            return recorder.validations
        finally:
            await channel.close()
            await server.stop(0)

    assert len(asyncio.run(run())) == 1000


def test_revocation_watch_names_whose_credential_each_revocation_is(ta: TaskAgent) -> None:
    """The SPIFFE ID the server sends with a revocation reaches verifiers, through a full Sync
    snapshot and through deltas, so their on_revoked callbacks know the task of any token."""
    from agent_attestor.node_client import sync_delta, sync_state
    from svid._proto import common_pb2, node_pb2

    task_id = f"{TD}/bot/task/t1"
    ta.h.add_entry("/bot")
    ta.h.sync(issue=False)
    bundle = ta.h.cache.snapshot().bundle
    assert bundle is not None
    x509, jwt = common_pb2.Revocation.X509_SERIAL, common_pb2.Revocation.JWT_ID
    snapshot = node_pb2.SyncUpdate(
        entries=[e.to_proto() for e in ta.h.cache.snapshot().entries],
        bundle=bundle.to_proto(),
        revocations=[
            common_pb2.Revocation(kind=x509, value="ABC1", expires_at=99, spiffe_id=task_id),
            common_pb2.Revocation(kind=jwt, value="j-anon", expires_at=99),
        ],
    )
    ta.h.lt.call(lambda: ta.h.cache.apply_sync(sync_state(snapshot)))
    stub = revocation_pb2_grpc.RevocationsStub(ta.channel())
    stream = stub.Watch(revocation_pb2.WatchRequest(), metadata=HEADER, timeout=10)
    first = next(stream)
    assert [(i.kind, i.value, i.spiffe_id) for i in first.items] == [
        ("x509_serial", "abc1", task_id),
        ("jwt_id", "j-anon", ""),
    ]
    delta = node_pb2.SyncUpdate(
        revocations=[common_pb2.Revocation(kind=jwt, value="j1", expires_at=99, spiffe_id=task_id)],
        removed_revocations=[common_pb2.Revocation(kind=x509, value="abc1")],
    )
    ta.h.lt.call(lambda: ta.h.cache.apply_delta(sync_delta(delta)))
    second = next(stream)
    assert [(i.kind, i.value, i.spiffe_id) for i in second.items] == [
        ("jwt_id", "j-anon", ""),
        ("jwt_id", "j1", task_id),
    ]
    stream.cancel()


def test_a_task_jwt_is_sent_with_a_quarter_of_its_life_left_when_the_agent_served_it_cached(
    ta: TaskAgent,
) -> None:
    # svid's task cache kept a token half its lifetime from its fetch, on top of the half the
    # agent may have kept it already: a 300 s token went out with seconds left. Another user of
    # the task's identity has the agent mint it; the task fetches it 149 s later, then uses it
    # every 5 s for two lifetimes.
    ta.h.add_entry("/bot")
    client = TaskClient(
        f"unix://{ta.endpoint.socket_path}", clock=ta.h.clock, watch_revocations=False
    )
    try:
        task = client.begin(actions=["read"], resources=["docs"])
        ta.h.stub().FetchJWTSVID(
            workload_pb2.JWTSVIDRequest(audience=["docs"], spiffe_id=str(task.spiffe_id)),
            metadata=HEADER,
            timeout=10,
        )
        ta.h.clock.advance(149)
        lefts = []
        for _ in range(120):
            sent = task.jwt_svid("docs")
            lefts.append(sent.expires_at - ta.h.clock.now())
            ta.h.clock.advance(5)
    finally:
        client.close()
    assert min(lefts) >= ta.h.ca.jwt_ttl / 4, f"a task token went out with {min(lefts):.0f} s left"


def test_a_task_jwt_is_fetched_again_after_the_host_slept_past_its_quarter_life(
    ta: TaskAgent,
) -> None:
    # The task's cache counted a token's quarter life on CLOCK_MONOTONIC, which stands still
    # while the host is suspended: after a sleep of 90% of its life the token went out with
    # a tenth of it left (and past its exp, by a longer sleep and an issuer clock ahead).
    ta.h.add_entry("/bot")
    clock = SleptClock(ta.h.clock)  # the agent's clock is the base: it counted the sleep
    client = TaskClient(f"unix://{ta.endpoint.socket_path}", clock=clock, watch_revocations=False)
    try:
        task = client.begin(actions=["read"], resources=["docs"])
        first = task.jwt_svid("docs")
        clock.sleep(ta.h.ca.jwt_ttl * 0.9)
        sent = task.jwt_svid("docs")
    finally:
        client.close()
    assert sent.token != first.token
    assert sent.expires_at - clock.now() >= ta.h.ca.jwt_ttl / 4


def test_an_async_task_jwt_is_fetched_again_after_the_host_slept_past_its_quarter_life(
    ta: TaskAgent,
) -> None:
    ta.h.add_entry("/bot")
    clock = SleptClock(ta.h.clock)

    async def scenario() -> tuple[JwtSvid, JwtSvid]:
        async with AsyncTaskClient(
            f"unix://{ta.endpoint.socket_path}", clock=clock, watch_revocations=False
        ) as client:
            task = await client.begin(actions=["read"], resources=["docs"])
            first = await task.jwt_svid("docs")
            clock.sleep(ta.h.ca.jwt_ttl * 0.9)
            return first, await task.jwt_svid("docs")

    first, sent = asyncio.run(scenario())
    assert sent.token != first.token
    assert sent.expires_at - clock.now() >= ta.h.ca.jwt_ttl / 4
