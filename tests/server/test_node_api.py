"""Node API handler tests on a real server over real TLS sockets."""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import shutil
import socket
import subprocess
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import grpc
import pytest
from cryptography import x509
from cryptography.hazmat.primitives import serialization

from server.ca.signer import IssuedSvid, X509Request, X509Signer
from server.datastore.records import REMOVAL_EVICTED, EventFilter, Removal
from server.issuance import AgentAdmission, Issuer
from server.state import agent_refusal
from server.tasks.model import TaskState
from server.tasks.service import TaskService
from server.tasks.store import TaskStore
from svid._jose import b64url_decode, verify_jws_signature
from svid._proto import admin_pb2, common_pb2, node_pb2, node_pb2_grpc, task_pb2, task_pb2_grpc
from svid._x509 import check_leaf_profile
from tests.server.fixtures import (
    PEM,
    TLS_NAME,
    TRUST_DOMAIN,
    Agent,
    RunningServer,
    bundle_pem,
    der_chain,
    make_csr,
    managed_server,
    running_server,
    short_tmpdir,
    start_server,
)
from tests.waits import wait_for

REFUSED = "join token is invalid, expired or already used"


@pytest.fixture(scope="module")
def srv() -> Iterator[RunningServer]:
    yield from running_server()


def _attest_rpc(
    srv: RunningServer, *requests: node_pb2.AttestRequest
) -> list[node_pb2.AttestResponse]:
    return list(srv.attest_stub().Attest(iter(requests), timeout=10))


def _params(kind: str, payload: bytes, csr: bytes | None = None) -> node_pb2.AttestRequest:
    if csr is None:
        _, csr = make_csr()
    return node_pb2.AttestRequest(
        params=node_pb2.AttestParams(
            data=node_pb2.AttestationData(type=kind, payload=payload), csr=csr
        )
    )


def _code(exc: pytest.ExceptionInfo[grpc.RpcError]) -> grpc.StatusCode:
    return exc.value.code()  # type: ignore[attr-defined,no-any-return]


# -- attestation -------------------------------------------------------------------------------


def test_join_token_attestation_issues_agent_svid(srv: RunningServer) -> None:
    token = srv.join_token()
    agent = srv.attest(token)
    token_id = token.split(".")[0]
    assert agent.spiffe_id == f"spiffe://{TRUST_DOMAIN}/svid/agent/join_token/{token_id}"
    leaf = agent.chain[0]
    san = leaf.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
    assert san.get_values_for_type(x509.UniformResourceIdentifier) == [agent.spiffe_id]
    assert leaf.public_key() == agent.key.public_key()
    listed = srv.admin().GetAgent(admin_pb2.GetAgentRequest(spiffe_id=agent.spiffe_id))
    assert listed.serial == agent.serial
    assert listed.attestation_type == "join_token"
    assert agent.bundle.trust_domain == TRUST_DOMAIN


@pytest.mark.parametrize(
    ("payload", "code", "message"),
    [
        (b"garbage", grpc.StatusCode.PERMISSION_DENIED, REFUSED),
        (b"\xff\xfe.x", grpc.StatusCode.PERMISSION_DENIED, REFUSED),
        (b"nosuchid.secret", grpc.StatusCode.PERMISSION_DENIED, REFUSED),
        (b"", grpc.StatusCode.PERMISSION_DENIED, REFUSED),
    ],
)
def test_bad_join_tokens(
    srv: RunningServer, payload: bytes, code: grpc.StatusCode, message: str
) -> None:
    with pytest.raises(grpc.RpcError) as exc:
        _attest_rpc(srv, _params("join_token", payload))
    assert _code(exc) == code
    assert exc.value.details() == message  # type: ignore[attr-defined]


def test_join_token_is_single_use(srv: RunningServer) -> None:
    token = srv.join_token()
    srv.attest(token)
    with pytest.raises(grpc.RpcError) as exc:
        srv.attest(token)
    assert _code(exc) == grpc.StatusCode.PERMISSION_DENIED
    assert exc.value.details() == REFUSED  # type: ignore[attr-defined]


def test_join_token_used_concurrently_attests_once(srv: RunningServer) -> None:
    token = srv.join_token()
    outcomes: list[str] = []

    def attempt() -> None:
        try:
            srv.attest(token)
            outcomes.append("ok")
        except grpc.RpcError as exc:
            outcomes.append(exc.code().name)  # type: ignore[attr-defined]

    threads = [threading.Thread(target=attempt) for _ in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert sorted(outcomes) == ["PERMISSION_DENIED"] * 3 + ["ok"]


def test_wrong_secret_does_not_burn_the_token(srv: RunningServer) -> None:
    token = srv.join_token()
    token_id = token.split(".")[0]
    with pytest.raises(grpc.RpcError) as exc:
        _attest_rpc(srv, _params("join_token", f"{token_id}.wrong-secret".encode()))
    assert _code(exc) == grpc.StatusCode.PERMISSION_DENIED
    assert exc.value.details() == REFUSED  # type: ignore[attr-defined]
    srv.attest(token)


def test_expired_join_token_is_refused(srv: RunningServer) -> None:
    token = srv.join_token(ttl=1)
    srv.clock.advance(1)
    with pytest.raises(grpc.RpcError) as exc:
        srv.attest(token)
    assert _code(exc) == grpc.StatusCode.PERMISSION_DENIED
    assert exc.value.details() == REFUSED  # type: ignore[attr-defined]


@pytest.mark.parametrize(
    ("requests", "message"),
    [
        ([node_pb2.AttestRequest(challenge_response=b"x")], "first message must carry params"),
        ([], "first message must carry params"),
        ([_params("tpm", b"x")], "attestation type 'tpm' is not enabled"),
        ([_params("join_token", b"a.b", csr=b"\x30\x03\x02\x01\x00")], "csr is not a DER"),
        ([_params("join_token", b"a.b", csr=b"")], "csr is empty"),
    ],
)
def test_malformed_attestation(
    srv: RunningServer, requests: list[node_pb2.AttestRequest], message: str
) -> None:
    with pytest.raises(grpc.RpcError) as exc:
        _attest_rpc(srv, *requests)
    assert _code(exc) == grpc.StatusCode.INVALID_ARGUMENT
    assert message in exc.value.details()  # type: ignore[attr-defined]


def _tampered_csr() -> bytes:
    _, der = make_csr()
    # Flip a bit in the signature (the last bytes of the DER): structure stays valid.
    return der[:-3] + bytes([der[-3] ^ 0x01]) + der[-2:]


def test_mis_signed_csr_is_refused_and_token_survives(srv: RunningServer) -> None:
    token = srv.join_token()
    with pytest.raises(grpc.RpcError) as exc:
        _attest_rpc(srv, _params("join_token", token.encode(), csr=_tampered_csr()))
    assert _code(exc) == grpc.StatusCode.INVALID_ARGUMENT
    assert "signature" in exc.value.details()  # type: ignore[attr-defined]
    srv.attest(token)


def test_banned_agent_cannot_reattest(srv: RunningServer) -> None:
    agent = srv.attest(srv.join_token(agent_id="banme"))
    srv.admin().BanAgent(admin_pb2.BanAgentRequest(spiffe_id=agent.spiffe_id))
    with pytest.raises(grpc.RpcError) as exc:
        srv.attest(srv.join_token(agent_id="banme"))
    assert _code(exc) == grpc.StatusCode.PERMISSION_DENIED
    assert "banned" in exc.value.details()  # type: ignore[attr-defined]
    with pytest.raises(grpc.RpcError) as exc:
        srv.node_stub(agent).RenewAgent(node_pb2.RenewAgentRequest(csr=make_csr()[1]), timeout=10)
    assert _code(exc) == grpc.StatusCode.PERMISSION_DENIED


def _last_attestation_event(srv: RunningServer) -> dict[str, Any]:
    rows = list(srv.server.datastore.audit_rows(EventFilter(kind="node_attestation")))
    return dict(rows[-1])


@pytest.mark.parametrize("why", ["removal under way", "banned", "already attested"])
def test_an_agent_refused_before_its_admission_is_named_on_its_deny_event(
    srv: RunningServer, why: str
) -> None:
    """The attestor proved the agent's ID before the checks that refuse it (a removal still
    being finished, a ban, a join token agent already attested): the deny event names it, as
    the refusals of a later step of the admission do, so an operator finds it by agent."""
    name = f"named-{why.replace(' ', '-')}"
    agent = srv.attest(srv.join_token(agent_id=name))
    if why == "removal under way":
        # An eviction whose revocations its server died before finishing: the agent is gone,
        # its removal still stored.
        started = int(srv.clock.now())
        srv.server.datastore.delete_agent(
            agent.spiffe_id, Removal(agent.spiffe_id, REMOVAL_EVICTED, started)
        )
        wait_for(
            lambda: agent.spiffe_id not in srv.server.state.agents,
            10,
            "the server to see the eviction",
        )
    elif why == "banned":
        srv.admin().BanAgent(admin_pb2.BanAgentRequest(spiffe_id=agent.spiffe_id), timeout=10)
    with pytest.raises(grpc.RpcError) as exc:
        srv.attest(srv.join_token(agent_id=name))
    # A removal being finished passes: the agent may attest again in a few minutes.
    retry = why == "removal under way"
    assert _code(exc) == (
        grpc.StatusCode.UNAVAILABLE if retry else grpc.StatusCode.PERMISSION_DENIED
    )
    event = _last_attestation_event(srv)
    assert event["decision"] == "deny"
    assert event["reason"] == exc.value.details()  # type: ignore[attr-defined]
    assert event["agent_id"] == agent.spiffe_id
    assert event["node_id"] == agent.spiffe_id
    assert event["credential_id"] is None  # no SVID was signed for it


def test_a_refusal_before_the_attestor_proved_an_agent_names_none(srv: RunningServer) -> None:
    token = srv.join_token(agent_id="never-proved")
    with pytest.raises(grpc.RpcError):
        _attest_rpc(srv, _params("join_token", f"{token.partition('.')[0]}.wrong".encode()))
    event = _last_attestation_event(srv)
    assert (event["decision"], event["agent_id"]) == ("deny", None)


def test_node_calls_on_the_attest_port_are_unauthenticated(srv: RunningServer) -> None:
    stub = srv.attest_stub()
    with pytest.raises(grpc.RpcError) as exc:
        stub.RenewAgent(node_pb2.RenewAgentRequest(csr=make_csr()[1]), timeout=10)
    assert _code(exc) == grpc.StatusCode.UNAUTHENTICATED
    with pytest.raises(grpc.RpcError) as exc:
        next(iter(stub.Sync(node_pb2.SyncRequest(), timeout=10)))
    assert _code(exc) == grpc.StatusCode.UNAUTHENTICATED


def test_mtls_port_refuses_clients_without_a_certificate(srv: RunningServer) -> None:
    creds = grpc.ssl_channel_credentials(bundle_pem(srv.bundle()))
    channel = grpc.secure_channel(srv.runtime.node_address, creds, options=TLS_NAME)
    stub = node_pb2_grpc.NodeStub(channel)
    with pytest.raises(grpc.RpcError) as exc:
        stub.RenewAgent(node_pb2.RenewAgentRequest(csr=make_csr()[1]), timeout=5)
    channel.close()
    assert _code(exc) == grpc.StatusCode.UNAVAILABLE


# -- renewal ---------------------------------------------------------------------------------


def test_renew_agent_rotates_serial_and_keeps_previous_usable(srv: RunningServer) -> None:
    agent = srv.attest()
    key, csr = make_csr()
    renewed = srv.node_stub(agent).RenewAgent(node_pb2.RenewAgentRequest(csr=csr), timeout=10).svid
    chain = der_chain(renewed.cert_chain)
    assert renewed.spiffe_id == agent.spiffe_id
    assert chain[0].public_key() == key.public_key()
    new_agent = Agent(agent.spiffe_id, key, chain, renewed.bundle)
    assert new_agent.serial != agent.serial
    stored = srv.admin().GetAgent(admin_pb2.GetAgentRequest(spiffe_id=agent.spiffe_id))
    assert stored.serial == new_agent.serial
    # The previous certificate still works (open connections)...
    stream = srv.node_stub(agent).Sync(node_pb2.SyncRequest(), timeout=10)
    assert next(stream).revision
    stream.cancel()
    # ...until the agent renews with the new one: two generations back does not.
    _renew(srv, new_agent)
    with pytest.raises(grpc.RpcError) as exc:
        _renew(srv, agent)
    assert _code(exc) == grpc.StatusCode.PERMISSION_DENIED
    assert "superseded" in exc.value.details()  # type: ignore[attr-defined]


def _renew(srv: RunningServer, agent: Agent) -> Agent:
    key, csr = make_csr()
    svid = srv.node_stub(agent).RenewAgent(node_pb2.RenewAgentRequest(csr=csr), timeout=10).svid
    return Agent(agent.spiffe_id, key, der_chain(svid.cert_chain), svid.bundle)


def test_renewals_whose_answers_were_lost_leave_the_held_certificate_usable(
    srv: RunningServer,
) -> None:
    # The agent never received the SVIDs of two renewals in a row (answers lost on the way):
    # the certificate it holds must still be good for a third try, or it is locked out and must
    # attest again (a join token is spent by then).
    agent = srv.attest()
    _renew(srv, agent)
    _renew(srv, agent)
    renewed = _renew(srv, agent)
    assert renewed.serial != agent.serial
    _renew(srv, renewed)


def test_the_previous_certificate_stays_usable_across_a_server_restart() -> None:
    root = short_tmpdir()
    server = start_server(root)
    try:
        agent = server.attest()
        _renew(server, agent)  # the answer is lost: the agent still holds `agent`
    finally:
        server.stop()
    server = start_server(root)
    try:
        _renew(server, agent)
    finally:
        server.stop()
        shutil.rmtree(root, ignore_errors=True)


def test_renew_with_bad_csr(srv: RunningServer) -> None:
    agent = srv.attest()
    with pytest.raises(grpc.RpcError) as exc:
        srv.node_stub(agent).RenewAgent(node_pb2.RenewAgentRequest(csr=b"junk"), timeout=10)
    assert _code(exc) == grpc.StatusCode.INVALID_ARGUMENT


def _held(
    monkeypatch: pytest.MonkeyPatch, owner: type, name: str
) -> tuple[threading.Event, threading.Event]:
    """Hold each call of `owner.name` (a method) until `release` is set; `entered` is set once
    one is held: the window an admin call is slipped into."""
    entered, release = threading.Event(), threading.Event()
    original = getattr(owner, name)

    def held(self: Any, *args: Any) -> Any:
        entered.set()
        release.wait(10)
        return original(self, *args)

    monkeypatch.setattr(owner, name, held)
    return entered, release


def _agent_svids_issued(srv: RunningServer) -> float:
    value = srv.server.metrics.registry.get_sample_value(
        "svid_server_svids_issued_total", {"kind": "agent"}
    )
    return value or 0.0


@pytest.mark.parametrize("removal", ["ban", "evict"])
def test_an_agent_removed_while_its_renewal_is_signed_stays_removed(
    srv: RunningServer, monkeypatch: pytest.MonkeyPatch, removal: str
) -> None:
    agent = srv.attest()
    signed = _agent_svids_issued(srv)
    signing, release = _held(monkeypatch, AgentAdmission, "_sign_sync")
    renewal = srv.node_stub(agent).RenewAgent.future(
        node_pb2.RenewAgentRequest(csr=make_csr()[1]), timeout=20
    )
    assert signing.wait(10)
    admin = srv.admin()
    if removal == "ban":
        admin.BanAgent(admin_pb2.BanAgentRequest(spiffe_id=agent.spiffe_id), timeout=10)
    else:
        admin.EvictAgent(admin_pb2.EvictAgentRequest(spiffe_id=agent.spiffe_id), timeout=10)
    release.set()
    with pytest.raises(grpc.RpcError) as exc:
        renewal.result()
    assert exc.value.code() == grpc.StatusCode.PERMISSION_DENIED  # type: ignore[attr-defined]
    # Signed, but refused: no agent SVID left the server, and the metric says none was issued.
    assert _agent_svids_issued(srv) == signed
    # Neither memory nor the datastore got the renewed record back.
    if removal == "ban":
        assert srv.server.state.agents[agent.spiffe_id].banned
        assert srv.server.datastore.get_agent(agent.spiffe_id).banned
    else:
        assert agent.spiffe_id not in srv.server.state.agents
        assert agent.spiffe_id not in {a.spiffe_id for a in srv.server.datastore.list_agents()}
    with pytest.raises(grpc.RpcError) as exc:
        srv.node_stub(agent).RenewAgent(node_pb2.RenewAgentRequest(csr=make_csr()[1]), timeout=10)
    assert exc.value.code() == grpc.StatusCode.PERMISSION_DENIED  # type: ignore[attr-defined]


def _begin_in_flight(
    srv: RunningServer, agent: Agent, runtime_id: str
) -> tuple[grpc.Channel, grpc.Future]:
    """A BeginTask the agent sends and the test holds the answer of (close the channel)."""
    channel = grpc.secure_channel(
        srv.runtime.node_address, agent.credentials(), options=list(TLS_NAME)
    )
    begin = task_pb2_grpc.NodeTasksStub(channel).BeginTask.future(
        task_pb2.NodeBeginTaskRequest(
            runtime_id=runtime_id,
            intent=task_pb2.Intent(actions=["read"], resources=["docs"]),
            ttl=600,
        ),
        timeout=20,
    )
    return channel, begin


@pytest.mark.parametrize("removal", ["ban", "evict"])
def test_a_task_begun_while_its_agent_is_removed_is_revoked(
    srv: RunningServer, monkeypatch: pytest.MonkeyPatch, removal: str
) -> None:
    """The removal revoked the agent's tasks as stored then, before this one was: it must not
    outlive the agent (an x509pop agent attesting again would hold it)."""
    agent = srv.attest()
    runtime = srv.create_entry("/tasks/removed-midway", agent.spiffe_id)
    deciding, release = _held(monkeypatch, TaskService, "_decide_begin")
    channel, begin = _begin_in_flight(srv, agent, runtime.spiffe_id)
    assert deciding.wait(10)
    admin = srv.admin()
    if removal == "ban":
        admin.BanAgent(admin_pb2.BanAgentRequest(spiffe_id=agent.spiffe_id), timeout=10)
    else:
        admin.EvictAgent(admin_pb2.EvictAgentRequest(spiffe_id=agent.spiffe_id), timeout=10)
    release.set()
    with pytest.raises(grpc.RpcError) as exc:
        begin.result()
    channel.close()
    assert exc.value.code() == grpc.StatusCode.PERMISSION_DENIED  # type: ignore[attr-defined]
    tasks = srv.server.tasks.store.list_tasks(agent_id=agent.spiffe_id)
    assert [t.state for t in tasks] == [TaskState.REVOKED]
    assert not [
        e
        for e in srv.server.state.entries.by_id.values()
        if "/task/" in e.spiffe_id and e.parent_id == agent.spiffe_id
    ]


def test_a_task_whose_begin_the_agent_hung_up_on_midway_is_ended(
    srv: RunningServer, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The write of a granted begin goes on when its caller hangs up (it must not be left half
    done), but nobody will ever hear the task's ID: it is ended, not left to run its TTL."""
    agent = srv.attest()
    runtime = srv.create_entry("/tasks/hung-up", agent.spiffe_id)
    writing, release = _held(monkeypatch, TaskStore, "begin")
    channel, begin = _begin_in_flight(srv, agent, runtime.spiffe_id)
    assert writing.wait(10)
    begin.cancel()
    time.sleep(0.2)  # the server hears of the cancel while the row is being written
    release.set()
    deadline = time.monotonic() + 10
    while time.monotonic() < deadline:
        tasks = srv.server.tasks.store.list_tasks(agent_id=agent.spiffe_id)
        if tasks and not tasks[0].active:
            break
        time.sleep(0.05)
    channel.close()
    (task,) = srv.server.tasks.store.list_tasks(agent_id=agent.spiffe_id)
    assert task.state is TaskState.REVOKED
    assert "hung up" in task.end_reason
    assert srv.server.tasks.service.active_task(task.spiffe_id) is None


# -- Sync ------------------------------------------------------------------------------------


def test_sync_sends_a_snapshot_then_pushes_deltas(srv: RunningServer) -> None:
    agent = srv.attest()
    mine = srv.create_entry("/sync/first", agent.spiffe_id)
    other = srv.attest()
    srv.create_entry("/sync/not-mine", other.spiffe_id)
    stream = srv.node_stub(agent).Sync(node_pb2.SyncRequest(), timeout=30)
    first = next(stream)
    assert [e.id for e in first.entries] == [mine.id]
    assert first.bundle.x509_authorities
    assert first.revision > 0
    assert first.kind == node_pb2.SyncUpdate.SNAPSHOT
    assert not first.more
    started = time.monotonic()
    added = srv.create_entry("/sync/second", agent.spiffe_id)
    second = next(stream)
    assert time.monotonic() - started < 1.0
    # Only what changed: the new entry, not the one the agent already has, nor the bundle.
    assert second.kind == node_pb2.SyncUpdate.DELTA
    assert [e.id for e in second.entries] == [added.id]
    assert not second.HasField("bundle")
    assert second.revision > first.revision
    assert second.epoch == first.epoch
    srv.admin().DeleteEntry(admin_pb2.DeleteEntryRequest(id=mine.id))
    third = next(stream)
    assert list(third.entries) == []
    assert list(third.removed_entry_ids) == [mine.id]
    stream.cancel()


def test_sync_ends_with_permission_denied_on_eviction(srv: RunningServer) -> None:
    agent = srv.attest()
    stream = srv.node_stub(agent).Sync(node_pb2.SyncRequest(), timeout=30)
    next(stream)
    srv.admin().EvictAgent(admin_pb2.EvictAgentRequest(spiffe_id=agent.spiffe_id))
    with pytest.raises(grpc.RpcError) as exc:
        next(stream)
    assert _code(exc) == grpc.StatusCode.PERMISSION_DENIED
    assert "not attested" in exc.value.details()  # type: ignore[attr-defined]
    with pytest.raises(grpc.RpcError) as exc:
        srv.node_stub(agent).NewJWTSVID(
            node_pb2.NewJWTSVIDRequest(spiffe_id="spiffe://example.org/x", audience=["a"]),
            timeout=10,
        )
    assert _code(exc) == grpc.StatusCode.PERMISSION_DENIED


def test_sync_drops_an_entry_when_it_expires(srv: RunningServer) -> None:
    agent = srv.attest()
    expiring = srv.create_entry(
        "/sync/expiring", agent.spiffe_id, expires_at=int(srv.clock.now()) + 1
    )
    stream = srv.node_stub(agent).Sync(node_pb2.SyncRequest(), timeout=30)
    assert [e.id for e in next(stream).entries] == [expiring.id]
    srv.clock.advance(1)
    assert list(next(stream).removed_entry_ids) == [expiring.id]
    stream.cancel()


def test_agent_with_an_expired_svid_must_reattest() -> None:
    with managed_server(agent_svid_ttl=60) as server:
        agent = server.attest()
        server.clock.advance(61)
        with pytest.raises(grpc.RpcError) as exc:
            server.node_stub(agent).RenewAgent(
                node_pb2.RenewAgentRequest(csr=make_csr()[1]), timeout=10
            )
        assert _code(exc) == grpc.StatusCode.PERMISSION_DENIED
        assert "expired" in exc.value.details()  # type: ignore[attr-defined]


def test_shutdown_ends_sync_streams_promptly() -> None:
    root = short_tmpdir()
    server = start_server(root, shutdown_grace=30)
    try:
        agent = server.attest()
        stream = server.node_stub(agent).Sync(node_pb2.SyncRequest(), timeout=30)
        next(stream)
        started = time.monotonic()
        stopper = threading.Thread(target=lambda: server.call(server.server.stop()))
        stopper.start()
        with pytest.raises(grpc.RpcError) as exc:
            next(stream)
        assert _code(exc) == grpc.StatusCode.UNAVAILABLE
        stopper.join(30)
        # Far below the 30 s grace: streams are ended, not waited out.
        assert time.monotonic() - started < 10
        assert not Path(server.runtime.admin_socket).exists()
        assert not (root / "data" / "server.json").exists()
    finally:
        server.stop()
        shutil.rmtree(root, ignore_errors=True)


# -- BatchNewX509SVID ------------------------------------------------------------------------


def _openssl_verify(tmp: Path, bundle: common_pb2.Bundle, chain: list[x509.Certificate]) -> str:
    ca = tmp / "bundle.pem"
    ca.write_bytes(bundle_pem(bundle))
    leaf = tmp / "leaf.pem"
    leaf.write_bytes(chain[0].public_bytes(PEM))
    args = ["openssl", "verify", "-CAfile", str(ca)]
    if len(chain) > 1:
        inter = tmp / "inter.pem"
        inter.write_bytes(b"".join(c.public_bytes(PEM) for c in chain[1:]))
        args += ["-untrusted", str(inter)]
    done = subprocess.run([*args, str(leaf)], capture_output=True, text=True, check=False)
    return done.stdout + done.stderr


def test_batch_signs_entitled_and_refuses_the_rest_per_item(
    srv: RunningServer, tmp_path: Path
) -> None:
    agent = srv.attest()
    other = srv.attest()
    mine = srv.create_entry("/batch/web", agent.spiffe_id, dns_names=["web.example.org"])
    theirs = srv.create_entry("/batch/db", other.spiffe_id)
    key, csr = make_csr()
    request = node_pb2.BatchNewX509SVIDRequest(
        params=[
            node_pb2.X509SVIDParams(entry_id=mine.id, csr=csr),
            node_pb2.X509SVIDParams(entry_id=theirs.id, csr=make_csr()[1]),
            node_pb2.X509SVIDParams(entry_id="nosuchentry", csr=make_csr()[1]),
            node_pb2.X509SVIDParams(entry_id=mine.id, csr=_tampered_csr()),
            node_pb2.X509SVIDParams(entry_id=mine.id, csr=b"garbage"),
        ]
    )
    results = srv.node_stub(agent).BatchNewX509SVID(request, timeout=10).results
    assert [r.error.code for r in results] == [
        0,
        grpc.StatusCode.PERMISSION_DENIED.value[0],
        grpc.StatusCode.NOT_FOUND.value[0],
        grpc.StatusCode.INVALID_ARGUMENT.value[0],
        grpc.StatusCode.INVALID_ARGUMENT.value[0],
    ]
    assert "not entitled" in results[1].error.message
    assert "signature" in results[3].error.message
    chain = der_chain(results[0].cert_chain)
    leaf = chain[0]
    assert leaf.public_key() == key.public_key()
    san = leaf.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
    assert san.get_values_for_type(x509.UniformResourceIdentifier) == [mine.spiffe_id]
    assert san.get_values_for_type(x509.DNSName) == ["web.example.org"]
    assert results[0].expires_at == int(leaf.not_valid_after_utc.timestamp())
    assert str(check_leaf_profile(leaf)) == mine.spiffe_id
    assert "OK" in _openssl_verify(tmp_path, srv.bundle(), chain)


def test_a_jwt_asked_by_entry_for_an_id_the_entry_no_longer_names_is_refused(
    srv: RunningServer,
) -> None:
    # The agent names the entry and the ID its workload asked for; an operator changed the
    # entry's ID meanwhile. A token for the new ID would be handed out as the old one's.
    agent = srv.attest()
    entry = srv.create_entry("/renamed/before", agent.spiffe_id)
    changed = common_pb2.Entry()
    changed.CopyFrom(entry)
    changed.spiffe_id = f"spiffe://{TRUST_DOMAIN}/renamed/after"
    srv.admin().UpdateEntry(admin_pb2.UpdateEntryRequest(entry=changed), timeout=10)
    stub = srv.node_stub(agent)
    asked = node_pb2.NewJWTSVIDRequest(entry_id=entry.id, spiffe_id=entry.spiffe_id, audience=["a"])
    with pytest.raises(grpc.RpcError) as err:
        stub.NewJWTSVID(asked, timeout=10)
    assert err.value.code() is grpc.StatusCode.PERMISSION_DENIED
    assert "/renamed/after" in err.value.details()
    batch = stub.BatchNewJWTSVID(node_pb2.BatchNewJWTSVIDRequest(requests=[asked]), timeout=10)
    (result,) = batch.results
    assert result.error.code == grpc.StatusCode.PERMISSION_DENIED.value[0]
    assert not result.svid.token
    asked.spiffe_id = changed.spiffe_id
    assert stub.NewJWTSVID(asked, timeout=10).token


def test_an_agent_banned_while_its_svids_are_signed_gets_none_of_them(
    srv: RunningServer, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The ban's revocation of the agent's credentials read the ledger before this batch was
    recorded: the batch must not reach the agent."""
    agent = srv.attest()
    entry = srv.create_entry("/x509/banned-midway", agent.spiffe_id)
    signing, release = _held(monkeypatch, Issuer, "_sign_x509_batch")
    batch = srv.node_stub(agent).BatchNewX509SVID.future(
        node_pb2.BatchNewX509SVIDRequest(
            params=[node_pb2.X509SVIDParams(entry_id=entry.id, csr=make_csr()[1])]
        ),
        timeout=20,
    )
    assert signing.wait(10)
    srv.admin().BanAgent(admin_pb2.BanAgentRequest(spiffe_id=agent.spiffe_id), timeout=10)
    release.set()
    with pytest.raises(grpc.RpcError) as exc:
        batch.result()
    assert exc.value.code() == grpc.StatusCode.PERMISSION_DENIED  # type: ignore[attr-defined]
    assert "banned" in exc.value.details()  # type: ignore[attr-defined]


def test_batch_uses_entry_ttl_or_default(srv: RunningServer) -> None:
    agent = srv.attest()
    short = srv.create_entry("/batch/short", agent.spiffe_id, x509_svid_ttl=120)
    default = srv.create_entry("/batch/default", agent.spiffe_id)
    results = (
        srv.node_stub(agent)
        .BatchNewX509SVID(
            node_pb2.BatchNewX509SVIDRequest(
                params=[
                    node_pb2.X509SVIDParams(entry_id=short.id, csr=make_csr()[1]),
                    node_pb2.X509SVIDParams(entry_id=default.id, csr=make_csr()[1]),
                ]
            ),
            timeout=10,
        )
        .results
    )
    lives = []
    for r in results:
        leaf = der_chain(r.cert_chain)[0]
        lives.append(round((leaf.not_valid_after_utc - leaf.not_valid_before_utc).total_seconds()))
    # NotBefore is backdated a few seconds.
    assert 120 <= lives[0] <= 150
    assert 300 <= lives[1] <= 330


def test_svids_of_an_expiring_entry_end_with_it(srv: RunningServer) -> None:
    agent = srv.attest()
    until = int(srv.clock.now()) + 60
    entry = srv.create_entry("/expiring/both", agent.spiffe_id, expires_at=until)
    stub = srv.node_stub(agent)
    x509_reply = stub.BatchNewX509SVID(
        node_pb2.BatchNewX509SVIDRequest(
            params=[node_pb2.X509SVIDParams(entry_id=entry.id, csr=make_csr()[1])]
        ),
        timeout=10,
    )
    (result,) = x509_reply.results
    leaf = der_chain(result.cert_chain)[0]
    assert result.expires_at == int(leaf.not_valid_after_utc.timestamp()) == until
    jwt = stub.NewJWTSVID(node_pb2.NewJWTSVIDRequest(entry_id=entry.id, audience=["a"]), timeout=10)
    assert jwt.expires_at == until
    batch = stub.BatchNewJWTSVID(
        node_pb2.BatchNewJWTSVIDRequest(
            requests=[node_pb2.NewJWTSVIDRequest(entry_id=entry.id, audience=["a"])] * 2
        ),
        timeout=10,
    )
    assert [r.svid.expires_at for r in batch.results] == [until, until]


def test_a_batch_too_big_for_one_reply_is_answered_in_part_and_the_rest_asked_again(
    srv: RunningServer,
) -> None:
    # 500 SVIDs of an entry with 100 DNS names of ~200 bytes: some 10 MB, past gRPC's 4 MiB
    # limit. The whole reply failed, and the agent, asking for the same batch, failed forever.
    agent = srv.attest()
    names = [f"{'a' * 63}.{'b' * 63}.{'c' * 60}.n{n:03d}.example.org" for n in range(100)]
    entry = srv.create_entry("/x509/many-names", agent.spiffe_id, dns_names=names)
    key, csr = make_csr()
    asked = [node_pb2.X509SVIDParams(entry_id=entry.id, csr=csr)] * 500
    stub = srv.node_stub(agent)
    answered = 0
    calls = 0
    while asked:
        reply = stub.BatchNewX509SVID(node_pb2.BatchNewX509SVIDRequest(params=asked), timeout=60)
        calls += 1
        assert reply.ByteSize() < 4 * 1024 * 1024
        assert reply.results, "every call answers at least one item"
        assert len(reply.results) + reply.deferred == len(asked)
        assert [r.error.code for r in reply.results] == [0] * len(reply.results)
        leaf = der_chain(reply.results[-1].cert_chain)[0]
        assert leaf.public_key() == key.public_key()
        san = leaf.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
        assert san.get_values_for_type(x509.DNSName) == names
        answered += len(reply.results)
        asked = asked[len(reply.results) :]
    assert (answered, calls > 1) == (500, True)


@pytest.mark.parametrize(("count", "message"), [(0, "at least one"), (1001, "at most 1000")])
def test_batch_size_limits(srv: RunningServer, count: int, message: str) -> None:
    agent = srv.attest()
    request = node_pb2.BatchNewX509SVIDRequest(
        params=[node_pb2.X509SVIDParams(entry_id="x", csr=b"x")] * count
    )
    with pytest.raises(grpc.RpcError) as exc:
        srv.node_stub(agent).BatchNewX509SVID(request, timeout=10)
    assert _code(exc) == grpc.StatusCode.INVALID_ARGUMENT
    assert message in exc.value.details()  # type: ignore[attr-defined]


def test_oversized_message_is_resource_exhausted_and_server_keeps_serving(
    srv: RunningServer,
) -> None:
    agent = srv.attest()
    huge = node_pb2.BatchNewX509SVIDRequest(
        params=[node_pb2.X509SVIDParams(entry_id="x", csr=b"\0" * (5 * 1024 * 1024))]
    )
    stub = srv.node_stub(agent, **{"grpc.max_send_message_length": 64 * 1024 * 1024})
    with pytest.raises(grpc.RpcError) as exc:
        stub.BatchNewX509SVID(huge, timeout=10)
    assert _code(exc) == grpc.StatusCode.RESOURCE_EXHAUSTED
    srv.attest()


# -- NewJWTSVID ------------------------------------------------------------------------------


def test_jwt_svid_for_entitled_id(srv: RunningServer) -> None:
    import jwt as pyjwt

    agent = srv.attest()
    entry = srv.create_entry("/jwt/api", agent.spiffe_id, jwt_svid_ttl=120)
    reply = srv.node_stub(agent).NewJWTSVID(
        node_pb2.NewJWTSVIDRequest(spiffe_id=entry.spiffe_id, audience=["svc-a"]), timeout=10
    )
    header = pyjwt.get_unverified_header(reply.token)
    keys = {k.kid: k.public_key for k in srv.bundle().jwt_keys}
    from cryptography.hazmat.primitives.serialization import load_der_public_key

    claims = pyjwt.decode(
        reply.token,
        load_der_public_key(keys[header["kid"]]),
        algorithms=["ES256"],
        audience="svc-a",
    )
    assert claims["sub"] == entry.spiffe_id
    assert reply.expires_at - reply.issued_at == 120
    by_entry = srv.node_stub(agent).NewJWTSVID(
        node_pb2.NewJWTSVIDRequest(entry_id=entry.id, audience=["a", "b"]), timeout=10
    )
    assert by_entry.token


@pytest.mark.parametrize(
    ("request_kwargs", "code", "message"),
    [
        (
            {"spiffe_id": "spiffe://example.org/jwt/bad", "audience": []},
            grpc.StatusCode.INVALID_ARGUMENT,
            "audience",
        ),
        (
            {"spiffe_id": "spiffe://example.org/jwt/bad", "audience": [""]},
            grpc.StatusCode.INVALID_ARGUMENT,
            "audience",
        ),
        (
            {"spiffe_id": "spiffe://Example.org/x", "audience": ["a"]},
            grpc.StatusCode.INVALID_ARGUMENT,
            "trust domain character",
        ),
        ({"audience": ["a"]}, grpc.StatusCode.INVALID_ARGUMENT, "spiffe_id: required"),
        (
            {"spiffe_id": "spiffe://example.org/not/mine", "audience": ["a"]},
            grpc.StatusCode.PERMISSION_DENIED,
            "not an identity",
        ),
        ({"entry_id": "nosuch", "audience": ["a"]}, grpc.StatusCode.NOT_FOUND, "not found"),
    ],
)
def test_jwt_bad_requests(
    srv: RunningServer, request_kwargs: dict[str, object], code: grpc.StatusCode, message: str
) -> None:
    agent = srv.attest()
    with pytest.raises(grpc.RpcError) as exc:
        srv.node_stub(agent).NewJWTSVID(node_pb2.NewJWTSVIDRequest(**request_kwargs), timeout=10)
    assert _code(exc) == code
    assert message in exc.value.details()  # type: ignore[attr-defined]


@pytest.mark.parametrize(
    ("audience", "message"),
    [
        (["a" * 1025], "at most 1024 bytes"),
        (["é" * 513], "at most 1024 bytes"),  # 1,026 bytes of UTF-8 in 513 characters
        ([f"a{i}" for i in range(33)], "at most 32"),
        (["a" * 1000] * 5, "at most 4096 bytes"),
        # The audit log joins audiences with commas: "a,b" would read as "a" and "b".
        (["a", "b,c"], "audience[1]: holds a comma"),
        (["x" * 1000 + ","], "audience[0]: holds a comma"),
    ],
)
def test_jwt_audience_size_is_capped_per_call_and_per_batch_item(
    srv: RunningServer, audience: list[str], message: str
) -> None:
    agent = srv.attest()
    entry = srv.create_entry("/jwt/aud-cap", agent.spiffe_id)
    stub = srv.node_stub(agent)
    with pytest.raises(grpc.RpcError) as exc:
        stub.NewJWTSVID(node_pb2.NewJWTSVIDRequest(entry_id=entry.id, audience=audience))
    assert _code(exc) == grpc.StatusCode.INVALID_ARGUMENT
    details = exc.value.details()  # type: ignore[attr-defined]
    assert message in details
    assert len(details) < 200  # names the limit; never echoes the value
    reply = stub.BatchNewJWTSVID(
        node_pb2.BatchNewJWTSVIDRequest(
            requests=[
                node_pb2.NewJWTSVIDRequest(entry_id=entry.id, audience=audience),
                node_pb2.NewJWTSVIDRequest(entry_id=entry.id, audience=["é" * 512]),
            ]
        ),
        timeout=10,
    )
    assert reply.results[0].error.code == grpc.StatusCode.INVALID_ARGUMENT.value[0]
    assert message in reply.results[0].error.message
    assert reply.results[1].svid.token  # 1,024 bytes exactly is within the cap


@pytest.mark.parametrize("audience", ["eyJhbGciOi.eyJzdWIiOi.c2ln", "-----BEGIN PRIVATE KEY-----"])
def test_a_jwt_audience_that_looks_like_a_credential_is_refused_per_item(
    srv: RunningServer, audience: str
) -> None:
    # The audit log refuses to record such a value: refused up front, it fails only its own
    # item, never the batch it came in, and is not echoed back.
    agent = srv.attest()
    entry = srv.create_entry("/jwt/aud-secret", agent.spiffe_id)
    stub = srv.node_stub(agent)
    with pytest.raises(grpc.RpcError) as exc:
        stub.NewJWTSVID(
            node_pb2.NewJWTSVIDRequest(entry_id=entry.id, audience=["ok", audience]), timeout=10
        )
    assert _code(exc) == grpc.StatusCode.INVALID_ARGUMENT
    details = exc.value.details()  # type: ignore[attr-defined]
    assert "audience[1]" in details
    assert audience not in details
    reply = stub.BatchNewJWTSVID(
        node_pb2.BatchNewJWTSVIDRequest(
            requests=[
                node_pb2.NewJWTSVIDRequest(entry_id=entry.id, audience=["a"]),
                node_pb2.NewJWTSVIDRequest(entry_id=entry.id, audience=[audience]),
                node_pb2.NewJWTSVIDRequest(entry_id=entry.id, audience=["b"]),
            ]
        ),
        timeout=10,
    )
    assert [r.error.code for r in reply.results] == [
        0,
        grpc.StatusCode.INVALID_ARGUMENT.value[0],
        0,
    ]
    assert "audience[0]" in reply.results[1].error.message
    assert reply.results[0].svid.token
    assert reply.results[2].svid.token


def test_a_jwt_audience_with_a_nul_is_refused_as_input(srv: RunningServer) -> None:
    # PostgreSQL text holds no NUL: recorded, it failed the ledger's commit, shared with every
    # concurrent caller's, and was answered UNAVAILABLE as if the storage were down.
    agent = srv.attest()
    entry = srv.create_entry("/jwt/aud-nul", agent.spiffe_id)
    stub = srv.node_stub(agent)
    with pytest.raises(grpc.RpcError) as exc:
        stub.NewJWTSVID(
            node_pb2.NewJWTSVIDRequest(entry_id=entry.id, audience=["ok", "a\x00b"]), timeout=10
        )
    assert _code(exc) == grpc.StatusCode.INVALID_ARGUMENT
    assert "audience[1]: may not contain NUL" in exc.value.details()  # type: ignore[attr-defined]


def test_batch_jwt_svids_with_per_item_errors(srv: RunningServer) -> None:
    agent = srv.attest()
    entry = srv.create_entry("/jwt/batch", agent.spiffe_id)
    other = srv.create_entry("/jwt/other", srv.attest().spiffe_id)
    reply = srv.node_stub(agent).BatchNewJWTSVID(
        node_pb2.BatchNewJWTSVIDRequest(
            requests=[
                node_pb2.NewJWTSVIDRequest(entry_id=entry.id, audience=["a"]),
                node_pb2.NewJWTSVIDRequest(spiffe_id=entry.spiffe_id, audience=["b", "c"]),
                node_pb2.NewJWTSVIDRequest(entry_id=other.id, audience=["a"]),
                node_pb2.NewJWTSVIDRequest(entry_id=entry.id, audience=[]),
                node_pb2.NewJWTSVIDRequest(spiffe_id="spiffe://x/../y", audience=["a"]),
            ]
        ),
        timeout=10,
    )
    codes = [r.error.code for r in reply.results]
    assert codes == [
        0,
        0,
        grpc.StatusCode.PERMISSION_DENIED.value[0],
        grpc.StatusCode.INVALID_ARGUMENT.value[0],
        grpc.StatusCode.INVALID_ARGUMENT.value[0],
    ]
    assert reply.results[0].svid.token.count(".") == 2
    assert "not entitled" in reply.results[2].error.message
    with pytest.raises(grpc.RpcError) as exc:
        srv.node_stub(agent).BatchNewJWTSVID(node_pb2.BatchNewJWTSVIDRequest(), timeout=10)
    assert _code(exc) == grpc.StatusCode.INVALID_ARGUMENT


def test_each_item_of_a_jwt_batch_is_answered_as_its_own_call_would_be(
    srv: RunningServer,
) -> None:
    # Items naming an entry met earlier in the batch are checked for their own audience only
    # (the entry is looked up once per batch): each must still get its own call's answer.
    agent = srv.attest()
    entry = srv.create_entry("/jwt/repeat", agent.spiffe_id)
    other = srv.create_entry("/jwt/repeat-other", srv.attest().spiffe_id)
    items = [
        node_pb2.NewJWTSVIDRequest(entry_id=entry.id, audience=["a"]),
        node_pb2.NewJWTSVIDRequest(entry_id=entry.id, audience=[]),
        node_pb2.NewJWTSVIDRequest(entry_id=entry.id, audience=["a" * 1025]),
        node_pb2.NewJWTSVIDRequest(entry_id=entry.id, audience=["ok", ""]),
        node_pb2.NewJWTSVIDRequest(entry_id=entry.id, audience=[f"a{i}" for i in range(33)]),
        node_pb2.NewJWTSVIDRequest(spiffe_id=entry.spiffe_id, audience=["b"]),
        node_pb2.NewJWTSVIDRequest(spiffe_id=entry.spiffe_id, audience=[""]),
        node_pb2.NewJWTSVIDRequest(entry_id=other.id, audience=["a"]),
        node_pb2.NewJWTSVIDRequest(entry_id=other.id, audience=["a"]),
        node_pb2.NewJWTSVIDRequest(entry_id=entry.id, audience=["c", "d"]),
    ]
    stub = srv.node_stub(agent)
    reply = stub.BatchNewJWTSVID(node_pb2.BatchNewJWTSVIDRequest(requests=items), timeout=10)
    for item, result in zip(items, reply.results, strict=True):
        try:
            alone = stub.NewJWTSVID(item, timeout=10)
        except grpc.RpcError as exc:
            expected = (exc.code().value[0], exc.details())  # type: ignore[attr-defined]
            assert (result.error.code, result.error.message) == expected, item
            continue
        assert not result.error.code, item
        claims = json.loads(b64url_decode(result.svid.token.split(".")[1]))
        wanted = list(item.audience)
        assert claims["sub"] == entry.spiffe_id
        assert claims["aud"] == (wanted[0] if len(wanted) == 1 else wanted)
        assert alone.token
    assert [bool(r.svid.token) for r in reply.results] == [
        True, False, False, False, False, True, False, False, False, True
    ]  # fmt: skip


def _worker_children() -> list[int]:
    """Child processes of this test process that are signing workers (the server runs here)."""
    found = []
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            fields = stat.read_text().rsplit(") ", 1)[1].split()
            cmdline = (stat.parent / "cmdline").read_bytes()
        except (OSError, IndexError):
            continue
        if int(fields[1]) == os.getpid() and b"server.ca.workers" in cmdline:
            found.append(int(stat.parent.name))
    return found


def test_a_big_jwt_batch_is_minted_in_worker_processes_in_order(srv: RunningServer) -> None:
    agent = srv.attest()
    entry = srv.create_entry("/jwt/big", agent.spiffe_id)
    items = [node_pb2.NewJWTSVIDRequest(entry_id=entry.id, audience=[f"a{i}"]) for i in range(40)]
    items.insert(7, node_pb2.NewJWTSVIDRequest(entry_id="nope", audience=["a"]))
    keys = {k.kid: serialization.load_der_public_key(k.public_key) for k in srv.bundle().jwt_keys}
    stub = srv.node_stub(agent)
    for _attempt in range(200):  # the first big batch starts the workers; answered meanwhile
        reply = stub.BatchNewJWTSVID(node_pb2.BatchNewJWTSVIDRequest(requests=items), timeout=30)
        if _worker_children():
            break
        time.sleep(0.05)
    else:
        raise AssertionError("no signing worker process was started")
    # One more batch now that a worker is up: same answers, in request order.
    reply = stub.BatchNewJWTSVID(node_pb2.BatchNewJWTSVIDRequest(requests=items), timeout=30)
    assert reply.results[7].error.code == grpc.StatusCode.NOT_FOUND.value[0]
    tokens = [r.svid.token for i, r in enumerate(reply.results) if i != 7]
    assert len(tokens) == 40
    assert len(set(tokens)) == 40
    for i, token in enumerate(tokens):
        head, body, sig = token.split(".")
        header = json.loads(b64url_decode(head))
        assert verify_jws_signature(
            "ES256", f"{head}.{body}".encode(), b64url_decode(sig), keys[header["kid"]]
        )
        claims = json.loads(b64url_decode(body))
        assert (claims["sub"], claims["aud"]) == (entry.spiffe_id, f"a{i}")


def test_a_big_x509_batch_is_signed_in_worker_processes_in_order(
    srv: RunningServer, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    agent = srv.attest()
    entry = srv.create_entry("/x509/big", agent.spiffe_id, dns_names=["big.example.org"])
    keys_csrs = [make_csr() for _ in range(40)]
    params = [node_pb2.X509SVIDParams(entry_id=entry.id, csr=csr) for _, csr in keys_csrs]
    params.insert(7, node_pb2.X509SVIDParams(entry_id="nope", csr=make_csr()[1]))
    params.insert(20, node_pb2.X509SVIDParams(entry_id=entry.id, csr=b"garbage"))
    request = node_pb2.BatchNewX509SVIDRequest(params=params)
    # The server runs in this process: count the items it signs itself rather than in a worker.
    here: list[int] = []
    in_server = X509Signer.issue_csr

    def counted(self: X509Signer, request: X509Request, now: int) -> IssuedSvid:
        here.append(1)
        return in_server(self, request, now)

    monkeypatch.setattr(X509Signer, "issue_csr", counted)
    stub = srv.node_stub(agent)
    for _attempt in range(200):  # the first big batch starts the workers; answered meanwhile
        here.clear()
        reply = stub.BatchNewX509SVID(request, timeout=30)
        if not here and _worker_children():
            break
        time.sleep(0.05)
    else:
        raise AssertionError("no X.509 batch was signed in a worker process")
    codes = [r.error.code for r in reply.results]
    assert codes[7] == grpc.StatusCode.NOT_FOUND.value[0]
    assert codes[20] == grpc.StatusCode.INVALID_ARGUMENT.value[0]
    assert "csr" in reply.results[20].error.message
    good = [r for i, r in enumerate(reply.results) if i not in {7, 20}]
    assert [r.error.code for r in good] == [0] * 40
    serials = set()
    for (key, _), result in zip(keys_csrs, good, strict=True):
        chain = der_chain(result.cert_chain)
        leaf = chain[0]
        assert leaf.public_key() == key.public_key()
        assert str(check_leaf_profile(leaf)) == entry.spiffe_id
        san = leaf.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
        assert san.get_values_for_type(x509.DNSName) == ["big.example.org"]
        assert result.expires_at == int(leaf.not_valid_after_utc.timestamp())
        serials.add(leaf.serial_number)
    assert len(serials) == 40
    assert "OK" in _openssl_verify(tmp_path, srv.bundle(), der_chain(good[-1].cert_chain))


# -- garbage on the wire ---------------------------------------------------------------------


def _garbage(address: str | None = None, unix: str | None = None) -> None:
    if unix:
        sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        sock.connect(unix)
    else:
        assert address is not None
        host, _, port = address.rpartition(":")
        sock = socket.create_connection((host, int(port)), timeout=5)
    try:
        sock.sendall(os.urandom(4096) + b"GET / HTTP/1.1\r\n\r\n" + b"\x16\x03\x01\xff\xff" * 100)
        sock.settimeout(2)
        with contextlib.suppress(OSError):
            sock.recv(1024)
    finally:
        sock.close()


def test_garbage_bytes_on_every_socket_leave_the_server_serving(srv: RunningServer) -> None:
    for _ in range(3):
        _garbage(srv.runtime.node_address)
        _garbage(srv.runtime.attest_address)
        _garbage(unix=srv.runtime.admin_socket)
    agent = srv.attest()
    entry = srv.create_entry("/garbage/after", agent.spiffe_id)
    results = (
        srv.node_stub(agent)
        .BatchNewX509SVID(
            node_pb2.BatchNewX509SVIDRequest(
                params=[node_pb2.X509SVIDParams(entry_id=entry.id, csr=make_csr()[1])]
            ),
            timeout=10,
        )
        .results
    )
    assert results[0].cert_chain


# -- rate limits -----------------------------------------------------------------------------


@pytest.fixture
def limited() -> Iterator[RunningServer]:
    yield from running_server(
        x509_rate_per_agent=1,
        x509_burst_per_agent=3,
        jwt_rate_per_agent=1,
        jwt_burst_per_agent=1,
        attest_rate_per_host=1,
        attest_burst_per_host=3,
    )


def test_per_agent_signing_rate_limit(limited: RunningServer) -> None:
    agent = limited.attest()
    entry = limited.create_entry("/rl/x", agent.spiffe_id)
    stub = limited.node_stub(agent)

    def batch(n: int) -> node_pb2.BatchNewX509SVIDRequest:
        return node_pb2.BatchNewX509SVIDRequest(
            params=[node_pb2.X509SVIDParams(entry_id=entry.id, csr=make_csr()[1])] * n
        )

    stub.BatchNewX509SVID(batch(3), timeout=10)
    with pytest.raises(grpc.RpcError) as exc:
        stub.BatchNewX509SVID(batch(1), timeout=10)
    assert _code(exc) == grpc.StatusCode.RESOURCE_EXHAUSTED
    assert agent.spiffe_id in exc.value.details()  # type: ignore[attr-defined]
    limited.clock.advance(2)
    stub.BatchNewX509SVID(batch(1), timeout=10)
    # Another agent has its own bucket.
    other = limited.attest()
    limited.node_stub(other).RenewAgent(node_pb2.RenewAgentRequest(csr=make_csr()[1]), timeout=10)


def test_a_batch_bigger_than_the_burst_is_charged_in_full(limited: RunningServer) -> None:
    # Charged only the burst, a 50-SVID batch passed every 3 s at x509_rate_per_agent=1 and
    # x509_burst_per_agent=3 (~17/s, and 333/s at MAX_BATCH).
    agent = limited.attest()
    entry = limited.create_entry("/rl/big", agent.spiffe_id)
    stub = limited.node_stub(agent)
    batch = node_pb2.BatchNewX509SVIDRequest(
        params=[node_pb2.X509SVIDParams(entry_id=entry.id, csr=make_csr()[1])] * 50
    )
    stub.BatchNewX509SVID(batch, timeout=30)  # let through on a full bucket, as designed
    limited.clock.advance(3)  # three tokens' worth of time: 47 SVIDs short of paying back
    with pytest.raises(grpc.RpcError) as exc:
        stub.BatchNewX509SVID(batch, timeout=30)
    assert _code(exc) == grpc.StatusCode.RESOURCE_EXHAUSTED
    limited.clock.advance(47)  # all 50 paid back, and the burst refilled
    stub.BatchNewX509SVID(batch, timeout=30)


def test_per_host_attestation_rate_limit(limited: RunningServer) -> None:
    limited.clock.advance(10)
    token_id = limited.join_token().partition(".")[0]
    guess = _params("join_token", f"{token_id}.wrong".encode())
    for _ in range(3):
        with pytest.raises(grpc.RpcError) as exc:
            _attest_rpc(limited, guess)
        assert _code(exc) == grpc.StatusCode.PERMISSION_DENIED
    with pytest.raises(grpc.RpcError) as exc:
        _attest_rpc(limited, guess)
    assert _code(exc) == grpc.StatusCode.RESOURCE_EXHAUSTED
    assert "attestation rate limit" in exc.value.details()  # type: ignore[attr-defined]
    limited.clock.advance(1)
    with pytest.raises(grpc.RpcError) as exc:
        _attest_rpc(limited, guess)
    assert _code(exc) == grpc.StatusCode.PERMISSION_DENIED


def test_guesses_from_the_same_host_never_lock_the_owner_out(limited: RunningServer) -> None:
    """The owner's agent shares the address of whoever floods its token id with guesses (same
    node, NAT): the budget the guesses spend must not cost the owner its attestation."""
    limited.clock.advance(10)
    token = limited.join_token()
    guess = _params("join_token", f"{token.partition('.')[0]}.wrong".encode())
    for _ in range(10):
        with pytest.raises(grpc.RpcError):
            _attest_rpc(limited, guess)
    agent = limited.attest(token)
    assert agent.spiffe_id.endswith(token.partition(".")[0])
    with pytest.raises(grpc.RpcError) as exc:  # single use still holds over budget
        limited.attest(token)
    assert _code(exc) == grpc.StatusCode.RESOURCE_EXHAUSTED


def test_guesses_over_the_hosts_budget_are_counted_not_each_written(
    limited: RunningServer,
) -> None:
    """A host over its budget is still checked (join_token checks cheaply), but its refusals
    past the budget cost no write each: they are counted, and the budget's worth is on record."""
    limited.clock.advance(10)
    token_id = limited.join_token().partition(".")[0]
    guess = _params("join_token", f"{token_id}.wrong".encode())

    def refused() -> tuple[int, float]:
        rows = limited.server.datastore.audit_rows(EventFilter(kind="node_attestation"))
        count = limited.server.metrics.registry.get_sample_value(
            "svid_server_attestations_total", {"type": "join_token", "result": "refused"}
        )
        return sum(r["decision"] == "deny" for r in rows), count or 0.0

    events, counted = refused()
    for _ in range(20):
        with pytest.raises(grpc.RpcError):
            _attest_rpc(limited, guess)
    assert refused() == (events + 3, counted + 20)


def test_jwt_rate_limit(limited: RunningServer) -> None:
    agent = limited.attest()
    entry = limited.create_entry("/rl/jwt", agent.spiffe_id)
    request = node_pb2.NewJWTSVIDRequest(entry_id=entry.id, audience=["a"])
    limited.node_stub(agent).NewJWTSVID(request, timeout=10)
    with pytest.raises(grpc.RpcError) as exc:
        limited.node_stub(agent).NewJWTSVID(request, timeout=10)
    assert _code(exc) == grpc.StatusCode.RESOURCE_EXHAUSTED


def test_the_entitlement_memo_keeps_no_second_but_the_current_one() -> None:
    """Entitlements are memoised per second (entries expire): one of a past second is never
    asked for again. Kept until the next entry write or 10,000 of them, each with its map of
    the agent's IDs once a request named no entry: an agent with 2,000 entries asking by ID
    once a second held ~50 kB more every second, ~500 MB at the bound."""
    with managed_server() as own:
        agent = own.attest()
        entry = own.create_entry("/memo/by-id", agent.spiffe_id)
        stub = own.node_stub(agent)
        asked = node_pb2.NewJWTSVIDRequest(spiffe_id=entry.spiffe_id, audience=["a"])
        for _ in range(20):
            own.clock.advance(1)
            assert stub.NewJWTSVID(asked, timeout=10).token
        assert len(own.server.issuer._entitled_cache) == 1


def test_a_renewal_given_up_on_and_saved_late_leaves_the_agents_new_certificate_usable(
    srv: RunningServer, monkeypatch: pytest.MonkeyPatch
) -> None:
    # The agent gives up on a renewal whose save is held up at its server (a stalled disk or
    # database, a process stopped), renews again with the same certificate (there or at
    # another server) and goes on with the SVID that brought. The first save, landing later
    # for no one, must not supersede that SVID: the agent was refused with it by any server
    # reading the record, and dropped its identity (with a join token, for good).
    agent = srv.attest()
    store = type(srv.server.datastore)
    saving, release, saved = threading.Event(), threading.Event(), threading.Event()
    original = store.upsert_agent

    def first_held(self: Any, *args: Any) -> None:
        if saving.is_set():
            return original(self, *args)
        saving.set()
        release.wait(10)
        try:
            original(self, *args)
        finally:
            saved.set()

    monkeypatch.setattr(store, "upsert_agent", first_held)
    given_up = srv.node_stub(agent).RenewAgent.future(
        node_pb2.RenewAgentRequest(csr=make_csr()[1]), timeout=10
    )
    assert saving.wait(10)
    given_up.cancel()  # as its deadline passing does: the server's handler is cancelled
    renewed = _renew(srv, agent)
    stream = srv.node_stub(renewed).Sync(node_pb2.SyncRequest(), timeout=10)
    assert next(stream).revision  # the agent's connection on its new SVID
    stream.cancel()
    # The drop, not awaited by the call, lands before the held save does.
    wait_for(
        lambda: srv.server.state.agents[agent.spiffe_id].previous_serial == "",
        10,
        "the previous certificate dropped",
    )
    release.set()
    assert saved.wait(10)
    stored = srv.server.datastore.get_agent(agent.spiffe_id)
    assert agent_refusal(stored, agent.spiffe_id, renewed.serial, time.time()) is None


def test_a_renewed_agents_first_calls_wait_for_no_datastore_write(
    srv: RunningServer, monkeypatch: pytest.MonkeyPatch
) -> None:
    # The first call with a renewed certificate drops the one it renewed with from the record:
    # a datastore write, behind every agent write of the server (one at a time). Awaited by
    # the call, a stalled or slow datastore held every renewed agent's mints and its Sync
    # stream's opening for as long, where memory answered them before; the drop is the
    # record's housekeeping, not the call's answer.
    agent = srv.attest()
    entry = srv.create_entry("/renewed/mint", agent.spiffe_id)
    renewed = _renew(srv, agent)
    store = type(srv.server.datastore)
    dropping, release = threading.Event(), threading.Event()
    original = store.adopt_agent_certificate

    def held(self: Any, *args: Any) -> bool:
        dropping.set()
        release.wait(10)
        return bool(original(self, *args))

    monkeypatch.setattr(store, "adopt_agent_certificate", held)
    stub = srv.node_stub(renewed)
    try:
        asked = node_pb2.NewJWTSVIDRequest(entry_id=entry.id, audience=["a"])
        assert stub.NewJWTSVID(asked, timeout=3).token
        assert dropping.wait(10)  # the drop is under way meanwhile
        stream = stub.Sync(node_pb2.SyncRequest(), timeout=3)
        assert next(stream).kind == node_pb2.SyncUpdate.SNAPSHOT
        stream.cancel()
    finally:
        release.set()
    # The drop lands once the datastore answers: the certificate renewed with is refused.
    wait_for(
        lambda: srv.server.datastore.get_agent(agent.spiffe_id).previous_serial == "",
        10,
        "the previous certificate dropped",
    )


@pytest.mark.parametrize("moved", ["", "banned", "renewed again"])
def test_a_mint_in_flight_on_the_certificate_renewed_with_is_answered_once_it_is_dropped(
    srv: RunningServer, moved: str
) -> None:
    # A workload's JWT mint goes out on the agent's channel of the certificate it renews with
    # (A); the renewal answers meanwhile, and the agent's Sync on the new certificate drops A
    # from the record while the mint is signed. The check after signing (a ban, an eviction
    # meanwhile) refused the mint as superseded: the agent told its workload "no identity",
    # a decision, for its own renewal, and the SVID signed for it stayed on record unsent.
    # A ban meanwhile still refuses it, and so does another renewal (the record moved on past
    # what the drop made of it: whoever holds A now is not the agent).
    agent = srv.attest()
    entry = srv.create_entry("/renewing/mint", agent.spiffe_id)
    renewed = _renew(srv, agent)
    node = srv.server.node
    assert node is not None
    signing, release = threading.Event(), threading.Event()
    original = node._issuer.issue_jwt

    async def held(*args: Any, **kwargs: Any) -> Any:
        signing.set()
        while not release.is_set():
            await asyncio.sleep(0.01)
        return await original(*args, **kwargs)

    node._issuer.issue_jwt = held  # type: ignore[method-assign]
    try:
        asked = node_pb2.NewJWTSVIDRequest(entry_id=entry.id, audience=["a"])
        mint = srv.node_stub(agent).NewJWTSVID.future(asked, timeout=10)
        assert signing.wait(10)
        stream = srv.node_stub(renewed).Sync(node_pb2.SyncRequest(), timeout=10)
        assert next(stream).kind == node_pb2.SyncUpdate.SNAPSHOT
        stream.cancel()
        wait_for(
            lambda: srv.server.state.agents[agent.spiffe_id].previous_serial == "",
            10,
            "the previous certificate dropped",
        )
        if moved == "banned":
            srv.admin().BanAgent(admin_pb2.BanAgentRequest(spiffe_id=agent.spiffe_id), timeout=10)
        elif moved == "renewed again":
            _renew(srv, renewed)
    finally:
        release.set()
    if moved:
        with pytest.raises(grpc.RpcError) as refused:
            mint.result(timeout=10)
        assert refused.value.code() == grpc.StatusCode.PERMISSION_DENIED
        assert ("banned" if moved == "banned" else "superseded") in (refused.value.details() or "")
        return
    assert mint.result(timeout=10).token
    # A new call with it is refused: the drop holds.
    with pytest.raises(grpc.RpcError) as refused:
        srv.node_stub(agent).NewJWTSVID(asked, timeout=10)
    assert refused.value.code() == grpc.StatusCode.PERMISSION_DENIED


def test_a_stopping_server_closes_its_datastore_only_after_the_drop_under_way(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    # The drop of the certificate an agent renewed with runs on its own, not awaited by the
    # call that started it: a server stopping with one under way (a slow datastore) closed the
    # datastore beneath it, and its write ran on a closed datastore, the record left as it was.
    with managed_server() as srv:  # stopped here: not the module's
        agent = srv.attest()
        renewed = _renew(srv, agent)
        datastore = srv.server.datastore
        store = type(datastore)
        dropping, release = threading.Event(), threading.Event()
        order: list[str] = []
        adopt, close = store.adopt_agent_certificate, datastore.close

        def held(self: Any, *args: Any) -> bool:
            dropping.set()
            release.wait(10)
            try:
                return bool(adopt(self, *args))
            finally:
                order.append("dropped")

        def closing() -> None:
            order.append("closed")
            close()

        monkeypatch.setattr(store, "adopt_agent_certificate", held)
        monkeypatch.setattr(datastore, "close", closing)
        try:
            stream = srv.node_stub(renewed).Sync(node_pb2.SyncRequest(), timeout=10)
            assert next(stream).kind == node_pb2.SyncUpdate.SNAPSHOT
            stream.cancel()
            assert dropping.wait(10)
            stopping = asyncio.run_coroutine_threadsafe(srv.server.stop(), srv._loop)
            deadline = time.monotonic() + 1.5  # a stop with nothing to wait for is done by then
            while "closed" not in order and time.monotonic() < deadline:
                time.sleep(0.02)
        finally:
            release.set()
        stopping.result(30)
        assert order == ["dropped", "closed"]


def test_a_stolen_certificate_the_agent_renewed_with_gets_nothing_once_it_is_dropped(
    srv: RunningServer,
) -> None:
    # An attacker holds a copy of the certificate the agent renewed with (A). A mint in flight
    # on it when the drop lands is answered (the agent's own, begun before its renewal moved
    # it on); nothing begun after: no mint, no renewal to a certificate of its own, no Sync,
    # and a stream it held open ends at its next wake.
    agent = srv.attest()
    entry = srv.create_entry("/stolen/mint", agent.spiffe_id)
    stolen = srv.node_stub(agent)
    held = stolen.Sync(node_pb2.SyncRequest(), timeout=10)
    assert next(held).kind == node_pb2.SyncUpdate.SNAPSHOT
    renewed = _renew(srv, agent)
    asked = node_pb2.NewJWTSVIDRequest(entry_id=entry.id, audience=["a"])
    assert srv.node_stub(renewed).NewJWTSVID(asked, timeout=10).token  # drops A
    wait_for(
        lambda: srv.server.datastore.get_agent(agent.spiffe_id).previous_serial == "",
        10,
        "the previous certificate dropped",
    )
    x509_asked = node_pb2.BatchNewX509SVIDRequest(
        params=[node_pb2.X509SVIDParams(entry_id=entry.id, csr=make_csr()[1])]
    )
    calls = {
        "jwt": lambda: stolen.NewJWTSVID(asked, timeout=10),
        "x509": lambda: stolen.BatchNewX509SVID(x509_asked, timeout=10),
        "renew": lambda: stolen.RenewAgent(
            node_pb2.RenewAgentRequest(csr=make_csr()[1]), timeout=10
        ),
        "sync": lambda: next(stolen.Sync(node_pb2.SyncRequest(), timeout=10)),
    }
    for name, call in calls.items():
        with pytest.raises(grpc.RpcError) as refused:
            call()
        assert refused.value.code() == grpc.StatusCode.PERMISSION_DENIED, name
    srv.create_entry("/stolen/wake", agent.spiffe_id)
    with pytest.raises(grpc.RpcError) as ended:
        for _ in held:
            pass
    assert ended.value.code() == grpc.StatusCode.PERMISSION_DENIED
    # The agent goes on with its newest.
    assert srv.node_stub(renewed).NewJWTSVID(asked, timeout=10).token
