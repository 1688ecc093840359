"""The issuance spine fails closed (server/issuance/ledger.py), on a real server over real gRPC:
when the ledger cannot commit, every issuing call fails UNAVAILABLE with a 'cannot record'
message, nothing is sent, a metric and one log line say why, and the next call after the
storage recovers is issued. The fault is real SQLite refusing writes (query_only: "attempt to
write a readonly database") on the real datastore."""

from __future__ import annotations

import json
import logging
import threading
from base64 import urlsafe_b64decode
from collections.abc import Callable, Iterator
from typing import Any

import grpc
import pytest

from server.ca.workers import MIN_BATCH
from server.datastore.errors import StorageError
from server.status import LEDGER_MESSAGE
from svid._proto import node_pb2
from tests.server.fixtures import Agent, RunningServer, make_csr, running_server


@pytest.fixture
def srv() -> Iterator[RunningServer]:
    yield from running_server()


def read_only(srv: RunningServer, on: bool) -> None:
    """Make the datastore refuse writes, as a read-only file does: the real connection, not a
    stand-in."""
    datastore: Any = srv.server.datastore
    with datastore._lock:
        datastore._db.execute(f"PRAGMA query_only={int(on)}")


def calls(srv: RunningServer, agent: Agent, entry_id: str) -> dict[str, Callable[[], Any]]:
    stub = srv.node_stub(agent)
    jwt = node_pb2.NewJWTSVIDRequest(entry_id=entry_id, audience=["svc"])
    return {
        "x509": lambda: stub.BatchNewX509SVID(
            node_pb2.BatchNewX509SVIDRequest(
                params=[node_pb2.X509SVIDParams(entry_id=entry_id, csr=make_csr()[1])] * 3
            ),
            timeout=10,
        ),
        "jwt": lambda: stub.NewJWTSVID(jwt, timeout=10),
        "jwt_batch": lambda: stub.BatchNewJWTSVID(
            node_pb2.BatchNewJWTSVIDRequest(requests=[jwt] * 3), timeout=10
        ),
    }


def metric(srv: RunningServer, name: str, **labels: str) -> float:
    value = srv.server.metrics.registry.get_sample_value(name, labels or None)
    return 0.0 if value is None else value


def test_issuance_fails_unavailable_while_nothing_can_be_recorded_then_resumes(
    srv: RunningServer, caplog: pytest.LogCaptureFixture
) -> None:
    agent = srv.attest()
    entry = srv.create_entry("/ledger/w", agent.spiffe_id)
    rpcs = calls(srv, agent, entry.id)
    for call in rpcs.values():
        call()
    records = len(srv.server.tasks.store.agent_credentials(agent.spiffe_id, 0))
    assert records == 7
    assert metric(srv, "svid_server_ledger_available") == 1

    read_only(srv, True)
    caplog.set_level(logging.WARNING, logger="svid.server.audit")
    for _ in range(2):
        for name, call in rpcs.items():
            with pytest.raises(grpc.RpcError) as err:
                call()
            assert err.value.code() is grpc.StatusCode.UNAVAILABLE, name
            assert err.value.details() == LEDGER_MESSAGE
    assert "cannot record" in LEDGER_MESSAGE
    assert metric(srv, "svid_server_ledger_failures_total", reason="read-only") == 6
    assert metric(srv, "svid_server_ledger_available") == 0
    outage = [r for r in caplog.records if "the ledger cannot commit" in r.getMessage()]
    assert len(outage) == 1  # one line per outage; the metric counts the calls
    assert outage[0].__dict__["reason"] == "read-only"

    read_only(srv, False)
    for call in rpcs.values():
        call()
    assert metric(srv, "svid_server_ledger_available") == 1
    back = [r for r in caplog.records if "the ledger commits again" in r.getMessage()]
    assert len(back) == 1  # and one when it ends, saying how many commits failed
    assert back[0].__dict__["failed_commits"] >= 6  # the calls, and any try of its own
    # The calls refused during the outage left no credential behind in the records.
    assert len(srv.server.tasks.store.agent_credentials(agent.spiffe_id, 0)) == records + 7
    assert srv.server.tasks.audit.verify().ok


def test_a_credential_is_on_record_when_its_reply_arrives(srv: RunningServer) -> None:
    agent = srv.attest()
    entry = srv.create_entry("/ledger/now", agent.spiffe_id)
    reply = calls(srv, agent, entry.id)["jwt"]()
    payload = reply.token.split(".")[1]
    jti = json.loads(urlsafe_b64decode(payload + "=" * (-len(payload) % 4)))["jti"]
    # No flush, no wait: the reply itself means the record and the event are committed.
    assert jti in {c.value for c in srv.server.tasks.store.agent_credentials(agent.spiffe_id, 0)}
    events = list(srv.server.tasks.audit.store.audit_rows())
    assert jti in {e["credential_id"] for e in events}


def test_no_agent_svid_leaves_while_its_agent_cannot_be_recorded(
    srv: RunningServer,
) -> None:
    agent = srv.attest()
    entry = srv.create_entry("/ledger/audit", agent.spiffe_id)
    token = srv.join_token()
    issued = metric(srv, "svid_server_svids_issued_total", kind="agent")
    read_only(srv, True)
    try:
        with pytest.raises(grpc.RpcError) as err:
            srv.attest(token)
        assert err.value.code() is grpc.StatusCode.UNAVAILABLE
        assert "cannot record" in (err.value.details() or "")
        with pytest.raises(grpc.RpcError) as err:
            calls(srv, agent, entry.id)["jwt_batch"]()
        assert err.value.code() is grpc.StatusCode.UNAVAILABLE
        with pytest.raises(grpc.RpcError) as err:
            srv.node_stub(agent).RenewAgent(
                node_pb2.RenewAgentRequest(csr=make_csr()[1]), timeout=10
            )
        assert err.value.code() is grpc.StatusCode.UNAVAILABLE
    finally:
        read_only(srv, False)
    # Signed, then refused: none of those agent SVIDs was issued, so none is counted.
    assert metric(srv, "svid_server_svids_issued_total", kind="agent") == issued
    # The refused attestation's own event could not be recorded either, and the JWT batch.
    assert metric(srv, "svid_server_ledger_failures_total", reason="read-only") == 2
    calls(srv, agent, entry.id)["jwt_batch"]()
    assert srv.attest().spiffe_id
    assert srv.server.tasks.audit.verify().ok


def test_big_batches_signed_in_worker_processes_leave_only_once_recorded(
    srv: RunningServer,
) -> None:
    agent = srv.attest()
    entry = srv.create_entry("/ledger/workers", agent.spiffe_id)
    assert srv.server._workers is not None
    assert srv.server._workers.warm_up(30)  # so these batches are signed in the workers
    stub = srv.node_stub(agent)
    x509 = node_pb2.BatchNewX509SVIDRequest(
        params=[node_pb2.X509SVIDParams(entry_id=entry.id, csr=make_csr()[1])] * 2 * MIN_BATCH
    )
    jwts = node_pb2.BatchNewJWTSVIDRequest(
        requests=[node_pb2.NewJWTSVIDRequest(entry_id=entry.id, audience=["svc"])] * 2 * MIN_BATCH
    )
    read_only(srv, True)
    try:
        for call in (
            lambda: stub.BatchNewX509SVID(x509, timeout=10),
            lambda: stub.BatchNewJWTSVID(jwts, timeout=10),
        ):
            with pytest.raises(grpc.RpcError) as err:
                call()
            assert err.value.code() is grpc.StatusCode.UNAVAILABLE
    finally:
        read_only(srv, False)
    assert srv.server.tasks.store.agent_credentials(agent.spiffe_id, 0) == []
    assert len(stub.BatchNewX509SVID(x509, timeout=10).results) == 2 * MIN_BATCH
    records = srv.server.tasks.store.agent_credentials(agent.spiffe_id, 0)
    assert len(records) == 2 * MIN_BATCH
    assert srv.server.tasks.audit.verify().ok


def test_an_attestation_that_cannot_be_recorded_spends_no_join_token(
    srv: RunningServer, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Only the audit write fails (the agent table and the token table still accept writes):
    the agent is refused, left unrecorded, and its token still works once storage recovers."""
    token = srv.join_token(agent_id="audit-down")
    datastore: Any = srv.server.datastore
    assert srv.server.tasks.audit.store is datastore

    def audit_refuses(*_args: Any, **_kw: Any) -> None:
        raise StorageError("cannot commit: disk I/O error")

    monkeypatch.setattr(datastore, "write_ledger", audit_refuses)
    with pytest.raises(grpc.RpcError) as err:
        srv.attest(token)
    assert err.value.code() is grpc.StatusCode.UNAVAILABLE
    assert err.value.details() == LEDGER_MESSAGE
    assert [a.spiffe_id for a in datastore.list_agents()] == []
    assert srv.server.state.agents == {}
    monkeypatch.undo()

    agent = srv.attest(token)
    assert agent.spiffe_id.endswith("/join_token/audit-down")
    events = [e for e in datastore.audit_rows() if e["kind"] == "node_attestation"]
    assert [(e["agent_id"], e["decision"]) for e in events] == [(agent.spiffe_id, "allow")]
    with pytest.raises(grpc.RpcError) as err:
        srv.attest(token)  # still single use
    assert err.value.code() is grpc.StatusCode.PERMISSION_DENIED


def test_a_join_token_raced_by_two_agents_admits_exactly_one(srv: RunningServer) -> None:
    """Both may pass the check and have their attestation on record; the token is spent with
    the agent's record, so exactly one is admitted and the other is refused (on record too)."""
    token = srv.join_token(agent_id="raced")
    outcomes: list[str] = []

    def attempt() -> None:
        try:
            srv.attest(token)
            outcomes.append("ok")
        except grpc.RpcError as exc:
            outcomes.append(exc.code().name)

    threads = [threading.Thread(target=attempt) for _ in range(6)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert sorted(outcomes) == ["PERMISSION_DENIED"] * 5 + ["ok"]
    assert len(srv.server.datastore.list_agents()) == 1
    assert srv.server.tasks.audit.verify().ok


def test_a_jwt_batch_reply_waits_for_its_commit(
    srv: RunningServer, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The signing thread hands a big batch's records to the ledger and is free for the next
    batch (Issuer.issue_jwts); the reply still waits until the commit holding them is done."""
    agent = srv.attest()
    entry = srv.create_entry("/ledger/pipelined", agent.spiffe_id)
    stub = srv.node_stub(agent)
    batch = node_pb2.BatchNewJWTSVIDRequest(
        requests=[node_pb2.NewJWTSVIDRequest(entry_id=entry.id, audience=["svc"])] * 2 * MIN_BATCH
    )
    datastore: Any = srv.server.datastore
    real = datastore.write_ledger
    entered, gate = threading.Event(), threading.Event()

    def held(credentials: Any, audit_rows: Any, *args: Any, **kw: Any) -> None:
        entered.set()
        gate.wait(20)
        real(credentials, audit_rows, *args, **kw)

    monkeypatch.setattr(datastore, "write_ledger", held)
    reply = stub.BatchNewJWTSVID.future(batch, timeout=30)
    assert entered.wait(10)
    # Held: the reply has not come, and a second batch is signed meanwhile (its commit queues
    # behind the first).
    second = stub.BatchNewJWTSVID.future(batch, timeout=30)
    assert not reply.done()
    threading.Event().wait(0.5)
    assert not reply.done()
    assert not second.done()
    assert srv.server.tasks.store.agent_credentials(agent.spiffe_id, 0) == []
    gate.set()
    results = [*reply.result().results, *second.result().results]
    assert len(results) == 4 * MIN_BATCH
    assert all(r.svid.token for r in results)
    records = srv.server.tasks.store.agent_credentials(agent.spiffe_id, 0)
    assert len(records) == 4 * MIN_BATCH
    assert srv.server.tasks.audit.verify().ok
