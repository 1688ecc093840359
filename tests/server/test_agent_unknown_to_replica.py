"""Servers sharing one PostgreSQL learn of each other's agents through the change feed. An agent
that attested (or renewed) through A and calls B before B's feed brought in its record must not
hear what an evicted agent hears (PERMISSION_DENIED): its agent takes that as eviction and drops
its SVID. B asks the datastore first, and only refuses when the datastore agrees."""

from __future__ import annotations

from collections.abc import Callable, Iterator
from typing import Any

import grpc
import pytest

from server.agent_authority import VIEW_TRUSTED_FOR
from svid._proto import admin_pb2, node_pb2
from tests.server.fixtures import (
    Agent,
    RunningServer,
    der_chain,
    make_csr,
)
from tests.server.held_feed import Behind, held_feed
from tests.server.test_replication_servers import wait_until


@pytest.fixture
def behind(postgres_dsn: str) -> Iterator[Behind]:
    with held_feed(postgres_dsn) as servers:
        get_agent = servers.b.server.datastore.get_agent

        def counted_get_agent(spiffe_id: str) -> Any:
            servers.reads.append(spiffe_id)
            return get_agent(spiffe_id)

        servers.b.server.datastore.get_agent = counted_get_agent  # type: ignore[method-assign]
        yield servers


def _sync_code(server: RunningServer, agent: Agent) -> grpc.StatusCode:
    """OK when a Sync on `server` starts with the agent's snapshot, or the code it ended with."""
    stream = server.node_stub(agent).Sync(node_pb2.SyncRequest(), timeout=10)
    try:
        assert next(stream).kind == node_pb2.SyncUpdate.SNAPSHOT
        return grpc.StatusCode.OK
    except grpc.RpcError as exc:
        return exc.code()  # type: ignore[attr-defined,no-any-return]
    finally:
        stream.cancel()


def _renewed(server: RunningServer, agent: Agent) -> Agent:
    key, csr = make_csr()
    reply = server.node_stub(agent).RenewAgent(node_pb2.RenewAgentRequest(csr=csr), timeout=10)
    return Agent(agent.spiffe_id, key, der_chain(reply.svid.cert_chain), agent.bundle)


def test_an_agent_attested_through_a_is_not_refused_by_b_before_b_knows_it(
    behind: Behind,
) -> None:
    behind.hold()
    agent = behind.a.attest()
    assert agent.spiffe_id not in behind.b.server.state.agents
    # Not known here yet: the agent tries again (or another server), keeping its SVID.
    assert _sync_code(behind.b, agent) == grpc.StatusCode.UNAVAILABLE
    behind.release()
    wait_until(lambda: agent.spiffe_id in behind.b.server.state.agents, 2, "B to learn the agent")
    assert _sync_code(behind.b, agent) == grpc.StatusCode.OK


def test_an_agent_renewed_through_a_is_not_refused_by_b_before_b_knows_its_new_serial(
    behind: Behind,
) -> None:
    agent = behind.a.attest()
    wait_until(lambda: agent.spiffe_id in behind.b.server.state.agents, 2, "B to learn the agent")
    behind.hold()
    renewed = _renewed(behind.a, agent)
    assert _sync_code(behind.b, renewed) == grpc.StatusCode.UNAVAILABLE
    behind.release()
    wait_until(
        lambda: behind.b.server.state.agents[agent.spiffe_id].serial == renewed.serial,
        2,
        "B to learn the renewal",
    )
    assert _sync_code(behind.b, renewed) == grpc.StatusCode.OK


def test_an_agent_evicted_through_a_is_refused_by_b_once_the_datastore_agrees(
    behind: Behind,
) -> None:
    behind.hold()
    agent = behind.a.attest()
    behind.a.admin().EvictAgent(admin_pb2.EvictAgentRequest(spiffe_id=agent.spiffe_id), timeout=10)
    assert _sync_code(behind.a, agent) == grpc.StatusCode.PERMISSION_DENIED
    # B never knew it and the datastore holds no record: an eviction, said as one.
    assert _sync_code(behind.b, agent) == grpc.StatusCode.PERMISSION_DENIED


def test_calls_of_an_agent_b_does_not_know_read_the_datastore_once_a_while(
    behind: Behind,
) -> None:
    behind.hold()
    agent = behind.a.attest()
    behind.a.admin().EvictAgent(admin_pb2.EvictAgentRequest(spiffe_id=agent.spiffe_id), timeout=10)
    behind.reads.clear()
    for _ in range(20):
        assert _sync_code(behind.b, agent) == grpc.StatusCode.PERMISSION_DENIED
    assert behind.reads == [agent.spiffe_id]


def _code(call: Callable[[], object]) -> grpc.StatusCode:
    try:
        call()
        return grpc.StatusCode.OK
    except grpc.RpcError as exc:
        return exc.code()  # type: ignore[attr-defined,no-any-return]


def test_an_agent_evicted_through_a_is_refused_by_b_whose_feed_is_behind(
    behind: Behind,
) -> None:
    """B knows the agent and its feed has not brought the eviction (held): once B's view is
    older than VIEW_TRUSTED_FOR, an agent call asks the datastore, which no longer holds the
    agent. A Sync resuming from B's revision (a delta, no catch-up of the view first) is
    refused as a renewal and a minting are (those by their ledger write)."""
    agent = behind.a.attest()
    entry = behind.a.create_entry("/web", agent.spiffe_id)
    wait_until(lambda: entry.id in behind.b.server.state.entries.by_id, 2, "B to learn the entry")
    first = behind.b.node_stub(agent).Sync(node_pb2.SyncRequest(), timeout=10)
    snapshot = next(first)
    first.cancel()
    resume = node_pb2.SyncRequest(since_revision=snapshot.revision, epoch=snapshot.epoch)
    view = behind.b.server.follower.view  # type: ignore[union-attr]
    behind.hold()
    behind.a.admin().EvictAgent(admin_pb2.EvictAgentRequest(spiffe_id=agent.spiffe_id), timeout=10)
    wait_until(lambda: view.age() > VIEW_TRUSTED_FOR, 2 * VIEW_TRUSTED_FOR, "B's view to age")
    assert agent.spiffe_id in behind.b.server.state.agents  # B has not heard
    stub = behind.b.node_stub(agent)
    jwt = node_pb2.NewJWTSVIDRequest(spiffe_id=entry.spiffe_id, audience=["x"], entry_id=entry.id)
    denied = grpc.StatusCode.PERMISSION_DENIED
    assert _code(lambda: stub.NewJWTSVID(jwt, timeout=10)) == denied
    assert _code(lambda: _renewed(behind.b, agent)) == denied
    assert _code(lambda: next(stub.Sync(resume, timeout=10))) == denied
    assert _sync_code(behind.b, agent) == denied
    behind.release()
    wait_until(lambda: agent.spiffe_id not in behind.b.server.state.agents, 2, "B to hear of it")
    assert _sync_code(behind.b, agent) == denied


def test_an_agent_b_knows_is_accepted_without_a_read_while_b_s_view_is_fresh(
    behind: Behind,
) -> None:
    agent = behind.a.attest()
    wait_until(lambda: agent.spiffe_id in behind.b.server.state.agents, 2, "B to learn the agent")
    behind.reads.clear()
    for _ in range(5):
        assert _sync_code(behind.b, agent) == grpc.StatusCode.OK
    assert behind.reads == []
