"""`svid_server_svids_issued` counts the SVIDs handed out, on a real server over real gRPC: a task
SVID committed to the ledger whose task ended before the answer went out is refused to the agent
(PERMISSION_DENIED, 'ended while it was issued'), and counted in `svid_server_svids_withheld`
instead. The task ends for real, through the task service, right after the real commit."""

from __future__ import annotations

import asyncio
from collections.abc import Iterator, Sequence
from concurrent.futures import Future
from typing import Any

import grpc
import pytest

from server.datastore.records import AttestedAgent
from server.tasks.service import BeginRequest
from svid._proto import node_pb2
from tests.server.fixtures import RunningServer, make_csr, running_server


@pytest.fixture
def srv() -> Iterator[RunningServer]:
    yield from running_server()


class EndsTaskAfterCommit:
    """The server's own ledger; once a commit holding a credential of `task_id` is done, the
    task is ended through the server's task service before the issuer looks again."""

    def __init__(self, srv: RunningServer, ledger: Any, agent: AttestedAgent, task_id: str):
        self._srv = srv
        self._ledger = ledger
        self._agent = agent
        self._task_id = task_id

    def _holds_task(self, credentials: Sequence[Any]) -> bool:
        return any(c.task_id == self._task_id for c in credentials)

    async def commit(self, credentials: Sequence[Any], events: Sequence[Any]) -> None:
        await self._ledger.commit(credentials, events)
        if self._holds_task(credentials):
            await self._srv.server.tasks.service.end(self._agent, self._task_id, ())

    def record_later(self, credentials: Sequence[Any], *args: Any) -> Future[None]:
        committed = self._ledger.record_later(credentials, *args)
        if not self._holds_task(credentials):
            return committed
        committed.result(timeout=10)  # on the issuer's signing thread, not the loop
        end = self._srv.server.tasks.service.end(self._agent, self._task_id, ())
        asyncio.run_coroutine_threadsafe(end, self._srv._loop).result(timeout=10)
        return committed

    def __getattr__(self, name: str) -> Any:
        return getattr(self._ledger, name)


def metric(srv: RunningServer, name: str, kind: str) -> float:
    value = srv.server.metrics.registry.get_sample_value(name, {"kind": kind})
    return 0.0 if value is None else value


@pytest.mark.parametrize("call", ["x509", "jwt", "jwt_batch"])
def test_a_task_svid_withheld_after_its_commit_is_not_counted_as_issued(
    srv: RunningServer, call: str
) -> None:
    agent = srv.attest()
    runtime = srv.create_entry("/bot", agent.spiffe_id)
    workload = srv.create_entry("/web", agent.spiffe_id)
    record: AttestedAgent = srv.server.state.agents[agent.spiffe_id]
    request = BeginRequest(runtime_id=runtime.spiffe_id, actions=("read",), resources=("docs",))
    task = srv.call(srv.server.tasks.service.begin(record, request))
    issuer: Any = srv.server.issuer
    issuer._ledger = EndsTaskAfterCommit(srv, issuer._ledger, record, task.task_id)
    kind = "x509" if call == "x509" else "jwt"
    stub = srv.node_stub(agent)
    store = srv.server.tasks.service.store

    def ask(entry_id: str) -> Any:
        if call == "x509":
            params = node_pb2.X509SVIDParams(entry_id=entry_id, csr=make_csr()[1])
            reply = stub.BatchNewX509SVID(
                node_pb2.BatchNewX509SVIDRequest(params=[params]), timeout=10
            )
            return reply.results[0]
        jwt = node_pb2.NewJWTSVIDRequest(entry_id=entry_id, audience=["docs"])
        if call == "jwt":
            return stub.NewJWTSVID(jwt, timeout=10)
        reply = stub.BatchNewJWTSVID(node_pb2.BatchNewJWTSVIDRequest(requests=[jwt]), timeout=10)
        return reply.results[0]

    ask(workload.id)  # not a task's: handed out and counted as before
    assert metric(srv, "svid_server_svids_issued_total", kind) == 1
    if call == "jwt":  # a single call is refused whole; a batch's item carries its error
        with pytest.raises(grpc.RpcError) as refused:
            ask(task.entry_id)
        assert refused.value.code() is grpc.StatusCode.PERMISSION_DENIED  # type: ignore[attr-defined]
        details = refused.value.details() or ""  # type: ignore[attr-defined]
    else:
        answer = ask(task.entry_id)
        assert answer.error.code == grpc.StatusCode.PERMISSION_DENIED.value[0]
        details = answer.error.message
    assert "ended while it was issued" in details
    assert store.count_credentials(task.task_id) == 1  # committed, never sent
    assert metric(srv, "svid_server_svids_issued_total", kind) == 1
    assert metric(srv, "svid_server_svids_withheld_total", kind) == 1
