"""Fuzz targets: protobuf request fields at the agent's Workload API and its task service.

Real requests with hypothesis-chosen fields go over the agent's real Unix socket (relay and all,
tests/agent_attestor/harness.py) to a Workload API fed by a test CA. ValidateJWTSVID gets real
tokens with characters mutated, and tokens signed by the trusted key with odd claims. Property:
OK or a deliberate status, never INTERNAL / UNKNOWN (an unhandled exception) or
DEADLINE_EXCEEDED (a hang), and the agent keeps serving.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Iterator
from typing import Any

import grpc
import pytest
from hypothesis import given
from hypothesis import strategies as st

from agent_attestor.endpoint import WorkloadEndpoint
from agent_attestor.tasks.api import TasksApi
from agent_attestor.workload_attestor import UnixAttestor
from svid import sign_jws
from svid._proto import task_pb2, task_pb2_grpc, workload_pb2
from tests.agent_attestor.harness import HEADER, Harness
from tests.agent_attestor.test_task_api import FakeClient
from tests.fuzz._mutate import mutated_text
from tests.fuzz._profile import fuzz_settings

BAD = {grpc.StatusCode.INTERNAL, grpc.StatusCode.UNKNOWN, grpc.StatusCode.DEADLINE_EXCEEDED}
TIMEOUT = 20
_CHARS = st.characters(exclude_categories=["Cs"])  # protobuf strings are UTF-8
texts = st.one_of(st.text(_CHARS, max_size=20), st.sampled_from(["", "svc", "x" * 3000]))


class Agent:
    def __init__(self) -> None:
        self.h = Harness()
        self.td = f"spiffe://{self.h.ca.trust_domain}"
        self.h.add_entry("/w")
        self.h.add_entry("/bot", hint="bot")
        self.tasks_endpoint = WorkloadEndpoint(
            socket_path=self.h.root / "public" / "tasks.sock",
            private_dir=self.h.root / "private2",
            servicer=self.h.api,
            registry=self.h.registry,
            attestors=[UnixAttestor()],
            extra_servicers=[
                # No wait for a task's entry: the fake server's tasks never reach this cache,
                # and the fuzz checks answers, not Sync.
                lambda server: task_pb2_grpc.add_TasksServicer_to_server(
                    TasksApi(
                        self.h.cache, self.h.registry, FakeClient(), self.h.jwts, entry_wait=0.0
                    ),
                    server,
                )
            ],
        )
        self.h.lt.run(self.tasks_endpoint.start())
        self.workload = self.h.stub()
        channel = grpc.insecure_channel(f"unix:{self.tasks_endpoint.socket_path}")
        self.h.channels.append(channel)
        self.tasks = task_pb2_grpc.TasksStub(channel)
        reply = self.workload.FetchJWTSVID(
            workload_pb2.JWTSVIDRequest(audience=["svc"]), metadata=HEADER, timeout=TIMEOUT
        )
        self.tokens = [s.svid for s in reply.svids]

    def ids(self) -> st.SearchStrategy[str]:
        seeds = [f"{self.td}/w", f"{self.td}/bot", self.td, "spiffe://other.org/w", ""]
        return st.sampled_from(seeds) | texts

    def alive(self) -> None:
        stream = self.workload.FetchX509SVID(
            workload_pb2.X509SVIDRequest(), metadata=HEADER, timeout=TIMEOUT
        )
        try:
            assert next(stream).svids
        finally:
            stream.cancel()

    def close(self) -> None:
        self.h.lt.run(self.tasks_endpoint.stop(0))
        self.h.close()


@pytest.fixture(scope="module")
def agent() -> Iterator[Agent]:
    a = Agent()
    try:
        yield a
    finally:
        a.close()


def _check(agent: Agent, call: Callable[[], Any]) -> Any:
    try:
        reply, code = call(), grpc.StatusCode.OK
    except grpc.RpcError as exc:
        reply, code = exc.details(), exc.code()
    assert code not in BAD, (code, reply)
    agent.alive()
    return reply


# Mostly with the security header, which every call must carry.
_METADATA = st.sampled_from([HEADER] * 6 + [(), (("workload.spiffe.io", "false"),)])


@fuzz_settings(scale=0.5)
@given(st.data())
def test_fetch_jwt_svid(agent: Agent, data: st.DataObject) -> None:
    request = workload_pb2.JWTSVIDRequest(
        audience=data.draw(st.lists(st.sampled_from(["svc", "a", ""]) | texts, max_size=4)),
        spiffe_id=data.draw(agent.ids()),
    )
    metadata = data.draw(_METADATA)
    _check(agent, lambda: agent.workload.FetchJWTSVID(request, metadata=metadata, timeout=TIMEOUT))


_B64 = "AZaz09-_+/=. \x00é"
_MISSING = object()
_ODD_CLAIMS = st.one_of(
    st.sampled_from([None, True, 1.5, -(2**63), 2**64, 10**400, [], {}, "", [1, [2, {"a": None}]]]),
    st.text(_CHARS, max_size=10),
)


@st.composite
def _signed_tokens(draw: st.DrawFn, agent: Agent) -> str:
    """A token the agent trusts (the test CA's JWT key), with claims hypothesis picks."""
    now = int(time.time())
    claims: dict[str, Any] = {
        "sub": draw(st.sampled_from([f"{agent.td}/w"] * 4 + [f"{agent.td}/x"]) | agent.ids()),
        "aud": draw(st.sampled_from(["svc", ["svc", "b"], ["svc"], ["b"], []])),
        "exp": now + draw(st.sampled_from([60, 3600, -3600])),
    }
    for name in draw(st.lists(st.sampled_from(["iat", "nbf", "jti", "txn", "x", "y"]), max_size=3)):
        claims[name] = draw(_ODD_CLAIMS)
    header = {"alg": "ES256", "kid": agent.h.ca.jwt_kid, "typ": "JWT"}
    return sign_jws(header, claims, agent.h.ca.jwt_key)


@fuzz_settings(scale=0.5)
@given(st.data())
def test_validate_jwt_svid(agent: Agent, data: st.DataObject) -> None:
    token = data.draw(
        st.one_of(
            st.sampled_from(agent.tokens),
            mutated_text(agent.tokens, _B64),
            _signed_tokens(agent),
            texts,
        )
    )
    request = workload_pb2.ValidateJWTSVIDRequest(
        audience=data.draw(st.sampled_from(["svc"] * 4 + ["b", ""]) | texts), svid=token
    )
    metadata = data.draw(_METADATA)
    _check(
        agent, lambda: agent.workload.ValidateJWTSVID(request, metadata=metadata, timeout=TIMEOUT)
    )


@fuzz_settings(scale=0.5)
@given(st.data())
def test_task_service(agent: Agent, data: st.DataObject) -> None:
    which = data.draw(st.sampled_from(["begin", "end", "list"]))
    metadata = data.draw(_METADATA)
    if which == "begin":
        intent = data.draw(
            st.builds(
                task_pb2.Intent,
                actions=st.lists(st.sampled_from(["read", "write"]) | texts, max_size=3),
                resources=st.lists(st.sampled_from(["docs", "svc"]) | texts, max_size=3),
                classification=st.sampled_from(["", "public", "restricted"]) | texts,
                environment=texts,
                on_behalf_of=texts,
                goal=texts,
            )
        )
        request = task_pb2.BeginTaskRequest(
            spiffe_id=data.draw(agent.ids()),
            intent=intent,
            ttl=data.draw(
                st.sampled_from([0, 60, -1, 2**31 - 1]) | st.integers(-(2**31), 2**31 - 1)
            ),
            parent_task_id=data.draw(texts),
        )
        _check(agent, lambda: agent.tasks.BeginTask(request, metadata=metadata, timeout=TIMEOUT))
    elif which == "end":
        request = task_pb2.EndTaskRequest(task_id=data.draw(texts))
        _check(agent, lambda: agent.tasks.EndTask(request, metadata=metadata, timeout=TIMEOUT))
    else:
        request = task_pb2.ListTasksRequest()
        _check(agent, lambda: agent.tasks.ListTasks(request, metadata=metadata, timeout=TIMEOUT))
