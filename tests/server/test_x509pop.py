"""x509pop attestation end to end: chain check, nonce challenge, selectors, re-attestation."""

from __future__ import annotations

import asyncio
import hashlib
import queue
import shutil
import threading
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import grpc
import pytest
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec, rsa
from cryptography.hazmat.primitives.asymmetric.utils import (
    decode_dss_signature,
    encode_dss_signature,
)
from cryptography.x509.oid import NameOID

from server.attestation.base import AttestationResult
from server.attestation.x509pop import X509PopAttestor
from server.datastore.errors import StorageError
from server.datastore.records import AttestedAgent, EventFilter
from server.errors import PermissionDeniedError
from server.ids import ServerIds
from server.issuance import AgentAdmission
from server.state import ServerState
from svid._clock import SystemClock
from svid._proto import admin_pb2, common_pb2, node_pb2
from svid._spiffe_id import SpiffeId, TrustDomain
from svid._x509pop import sign_challenge
from tests.server.fixtures import (
    DER,
    PEM,
    TRUST_DOMAIN,
    Agent,
    RunningServer,
    der_chain,
    make_csr,
    managed_server,
    running_server,
    short_tmpdir,
)


def _name(cn: str) -> x509.Name:
    return x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, cn)])


def _ca(cn: str, key: Any = None) -> tuple[x509.Certificate, Any]:
    key = key or ec.generate_private_key(ec.SECP256R1())
    now = datetime.now(UTC)
    cert = (
        x509.CertificateBuilder()
        .subject_name(_name(cn))
        .issuer_name(_name(cn))
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - timedelta(hours=1))
        .not_valid_after(now + timedelta(days=1))
        .add_extension(x509.BasicConstraints(ca=True, path_length=None), critical=True)
        .add_extension(
            x509.KeyUsage(False, False, False, False, False, True, True, False, False),
            critical=True,
        )
        .add_extension(x509.SubjectKeyIdentifier.from_public_key(key.public_key()), critical=False)
        .sign(key, hashes.SHA256())
    )
    return cert, key


def _node(
    ca: x509.Certificate, ca_key: Any, cn: str, key: Any = None
) -> tuple[x509.Certificate, Any]:
    key = key or ec.generate_private_key(ec.SECP256R1())
    now = datetime.now(UTC)
    cert = (
        x509.CertificateBuilder()
        .subject_name(_name(cn))
        .issuer_name(ca.subject)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - timedelta(hours=1))
        .not_valid_after(now + timedelta(hours=2))
        .add_extension(
            x509.AuthorityKeyIdentifier.from_issuer_public_key(ca_key.public_key()),
            critical=False,
        )
        .sign(ca_key, hashes.SHA256())
    )
    return cert, key


def _former_id(cert: x509.Certificate) -> str:
    """The agent ID the previous release gave an x509pop node: the SHA-1 of its whole
    certificate."""
    return (
        f"spiffe://{TRUST_DOMAIN}/svid/agent/x509pop/"
        + hashlib.sha1(cert.public_bytes(DER), usedforsecurity=False).hexdigest()
    )


def _admitted_before_upgrade(
    srv: RunningServer, former: str
) -> tuple[ec.EllipticCurvePrivateKey, tuple[x509.Certificate, ...]]:
    """The previous release's admission of a node as `former` through `srv`: its agent's
    record, and the SVID key and chain that agent holds."""
    svid_key = ec.generate_private_key(ec.SECP256R1())
    chain = srv.server.ca.x509_signer().sign_svid(
        svid_key.public_key(), SpiffeId.parse(former), 3600
    )
    serial = format(chain[0].serial_number, "x")
    expires = int(chain[0].not_valid_after_utc.timestamp())
    srv.call(srv.server.state.save_agent(AttestedAgent(former, "x509pop", serial, expires), None))
    return svid_key, chain


@pytest.fixture(scope="module")
def pki() -> tuple[x509.Certificate, Any]:
    return _ca("node-ca")


@pytest.fixture(scope="module")
def srv(pki: tuple[x509.Certificate, Any]) -> Iterator[RunningServer]:
    root = short_tmpdir()
    ca_file = root / "node-ca.pem"
    ca_file.write_bytes(pki[0].public_bytes(PEM))
    try:
        yield from running_server(x509pop_ca_bundle=str(ca_file))
    finally:
        shutil.rmtree(root, ignore_errors=True)


def _pop_exchange(
    srv: RunningServer, payload: bytes, csr: bytes, signer: Any
) -> node_pb2.AgentSVID:
    """Drive the bidi Attest call: params, then the signed nonce once the challenge arrives."""
    nonces: queue.Queue[bytes | None] = queue.Queue()

    def requests() -> Iterator[node_pb2.AttestRequest]:
        yield node_pb2.AttestRequest(
            params=node_pb2.AttestParams(
                data=node_pb2.AttestationData(type="x509pop", payload=payload), csr=csr
            )
        )
        nonce = nonces.get(timeout=10)
        if nonce is not None:
            yield node_pb2.AttestRequest(challenge_response=signer(nonce))

    responses = srv.attest_stub().Attest(requests(), timeout=10)
    try:
        reply = next(responses)
        assert reply.WhichOneof("step") == "challenge"
        assert len(reply.challenge) == 32
        nonces.put(reply.challenge)
        return next(responses).result  # type: ignore[no-any-return]
    finally:
        nonces.put(None)


def _attest(srv: RunningServer, chain: list[x509.Certificate], signer: Any) -> node_pb2.AgentSVID:
    payload = b"".join(c.public_bytes(DER) for c in chain)
    return _pop_exchange(srv, payload, make_csr()[1], signer)


def test_x509pop_attests_and_sets_selectors(srv: RunningServer, pki: Any) -> None:
    cert, key = _node(*pki, "node1")
    result = _attest(srv, [cert], lambda nonce: sign_challenge(key, nonce))
    # Named by what its CA signed (SHA-256 of the TBS bytes), which no re-encoding changes.
    name = hashlib.sha256(cert.tbs_certificate_bytes).hexdigest()
    assert result.spiffe_id == f"spiffe://{TRUST_DOMAIN}/svid/agent/x509pop/{name}"
    from svid._proto import admin_pb2

    agent = srv.admin().GetAgent(admin_pb2.GetAgentRequest(spiffe_id=result.spiffe_id))
    selectors = {f"{s.type}:{s.value}" for s in agent.selectors}
    ca_fp = hashlib.sha1(pki[0].public_bytes(DER), usedforsecurity=False).hexdigest()
    assert "x509pop:subject:cn:node1" in selectors
    assert f"x509pop:ca:fingerprint:{ca_fp}" in selectors
    # Re-attestation of a non-banned x509pop node is allowed, and replaces its record (the
    # save compares the record read, which nothing changed meanwhile).
    before = srv.server.state.agents[result.spiffe_id]
    again = _attest(srv, [cert], lambda nonce: sign_challenge(key, nonce))
    assert again.spiffe_id == result.spiffe_id
    after = srv.server.state.agents[result.spiffe_id]
    assert after.serial != before.serial
    assert after.previous_serial == before.serial


def test_a_node_whose_eviction_was_cut_short_attests_again_once_it_is_finished(
    srv: RunningServer, pki: Any, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Admitted again before its removal is finished, the node's new SVIDs would be revoked
    with the old ones: it is refused (UNAVAILABLE, nothing on record, its attempt allowed on
    no log) until the removal is finished, here by the operator's retry."""
    cert, key = _node(*pki, "node-cut-short")
    agent_id = _attest(srv, [cert], lambda nonce: sign_challenge(key, nonce)).spiffe_id
    admin = srv.admin()
    evict = admin_pb2.EvictAgentRequest(spiffe_id=agent_id)

    async def dies(*_args: object, **_kwargs: object) -> int:
        raise StorageError("the server died here")

    with monkeypatch.context() as fault:
        fault.setattr(srv.server.tasks.service, "revoke_agent", dies)
        with pytest.raises(grpc.RpcError):
            admin.EvictAgent(evict, timeout=10)
    audit = srv.server.tasks.audit.store
    where = EventFilter(kind="node_attestation", agent_id=agent_id)
    allowed = [r["seq"] for r in audit.audit_rows(where) if r["decision"] == "allow"]

    with pytest.raises(grpc.RpcError) as refused:
        _attest(srv, [cert], lambda nonce: sign_challenge(key, nonce))
    assert refused.value.code() == grpc.StatusCode.UNAVAILABLE  # type: ignore[attr-defined]
    assert "still being removed" in refused.value.details()  # type: ignore[attr-defined]
    assert agent_id not in srv.server.state.agents
    assert [r["seq"] for r in audit.audit_rows(where) if r["decision"] == "allow"] == allowed

    admin.EvictAgent(evict, timeout=10)  # finishes the removal
    assert len(list(audit.audit_rows(EventFilter(kind="agent_evicted", agent_id=agent_id)))) == 1
    again = _attest(srv, [cert], lambda nonce: sign_challenge(key, nonce))
    assert again.spiffe_id == agent_id


def _held_signing(monkeypatch: pytest.MonkeyPatch) -> tuple[threading.Event, threading.Event]:
    """Hold the agent SVID's signing until `release`; `entered` once it is held."""
    entered, release = threading.Event(), threading.Event()
    original = AgentAdmission._sign_sync

    def held(self: AgentAdmission, *args: Any) -> Any:
        entered.set()
        release.wait(10)
        return original(self, *args)

    monkeypatch.setattr(AgentAdmission, "_sign_sync", held)
    return entered, release


@pytest.mark.parametrize("removal", ["ban", "evict", "evict-cut-short"])
def test_a_node_removed_while_it_attests_again_is_refused_with_no_allow_on_the_log(
    srv: RunningServer, pki: Any, monkeypatch: pytest.MonkeyPatch, removal: str
) -> None:
    """The node attests again and an operator removes it while its SVID is signed: it is
    refused, and the audit log says so (a deny naming it), with no allowed attestation of an
    admission that did not take. An eviction whose revocations are still being finished is
    answered UNAVAILABLE, as for an attestation that begins then."""
    cert, key = _node(*pki, f"node-{removal}")
    signer = lambda nonce: sign_challenge(key, nonce)  # noqa: E731
    agent_id = _attest(srv, [cert], signer).spiffe_id
    audit = srv.server.tasks.audit.store
    where = EventFilter(kind="node_attestation", agent_id=agent_id)
    before = {r["seq"] for r in audit.audit_rows(where)}
    admin = srv.admin()
    evict = admin_pb2.EvictAgentRequest(spiffe_id=agent_id)
    signing, release = _held_signing(monkeypatch)

    async def dies(*_args: object, **_kwargs: object) -> int:
        raise StorageError("the server died here")

    with ThreadPoolExecutor(1) as pool:
        again = pool.submit(_attest, srv, [cert], signer)
        assert signing.wait(10)
        if removal == "ban":
            admin.BanAgent(admin_pb2.BanAgentRequest(spiffe_id=agent_id), timeout=10)
        elif removal == "evict":
            admin.EvictAgent(evict, timeout=10)
        else:
            with monkeypatch.context() as fault:
                fault.setattr(srv.server.tasks.service, "revoke_agent", dies)
                with pytest.raises(grpc.RpcError):
                    admin.EvictAgent(evict, timeout=10)
        release.set()
        with pytest.raises(grpc.RpcError) as refused:
            again.result(20)
    code = refused.value.code()  # type: ignore[attr-defined]
    if removal == "evict-cut-short":
        assert code == grpc.StatusCode.UNAVAILABLE
        assert "still being removed" in refused.value.details()  # type: ignore[attr-defined]
    else:
        assert code == grpc.StatusCode.PERMISSION_DENIED
    after = [r for r in audit.audit_rows(where) if r["seq"] not in before]
    assert [r["decision"] for r in after] == ["deny"]
    assert after[0]["reason"] == refused.value.details()  # type: ignore[attr-defined]
    if removal == "evict-cut-short":
        admin.EvictAgent(evict, timeout=10)  # finishes the removal
    assert (agent_id in srv.server.state.agents) == (removal == "ban")


def test_a_node_removed_between_its_check_and_its_save_is_denied_after_its_allow(
    srv: RunningServer, pki: Any, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The removal lands after the admission asked (ServerState.refuse_save, stood in for
    here by a check that passes), as its allow is committed: the save refuses it, and a deny
    of the same serial follows the allow, so the log says that admission did not take."""
    cert, key = _node(*pki, "node-between")
    signer = lambda nonce: sign_challenge(key, nonce)  # noqa: E731
    agent_id = _attest(srv, [cert], signer).spiffe_id
    audit = srv.server.tasks.audit.store
    where = EventFilter(kind="node_attestation", agent_id=agent_id)
    before = {r["seq"] for r in audit.audit_rows(where)}
    signing, release = _held_signing(monkeypatch)

    async def passes(*_args: object) -> None:
        return None

    monkeypatch.setattr(ServerState, "refuse_save", passes)
    with ThreadPoolExecutor(1) as pool:
        again = pool.submit(_attest, srv, [cert], signer)
        assert signing.wait(10)
        srv.admin().EvictAgent(admin_pb2.EvictAgentRequest(spiffe_id=agent_id), timeout=10)
        release.set()
        with pytest.raises(grpc.RpcError) as refused:
            again.result(20)
    assert refused.value.code() == grpc.StatusCode.PERMISSION_DENIED  # type: ignore[attr-defined]
    allow, deny = [r for r in audit.audit_rows(where) if r["seq"] not in before]
    assert (allow["decision"], deny["decision"]) == ("allow", "deny")
    assert deny["credential_id"] == allow["credential_id"]
    assert deny["reason"] == refused.value.details()  # type: ignore[attr-defined]
    assert agent_id not in srv.server.state.agents


def test_node_alias_entitles_x509pop_agents(srv: RunningServer, pki: Any) -> None:
    cert, key = _node(*pki, "rack7")
    agent = _agent_from(srv, cert, key)
    alias = srv.create_entry(
        "/nodes/rack7",
        f"spiffe://{TRUST_DOMAIN}/svid/server",
        selectors=[common_pb2.Selector(type="x509pop", value="subject:cn:rack7")],
    )
    workload = srv.create_entry("/rack7/web", alias.spiffe_id)
    first = next(iter(srv.node_stub(agent).Sync(node_pb2.SyncRequest(), timeout=10)))
    assert [e.id for e in first.entries] == [workload.id]


def test_an_alias_edit_sends_its_entries_only_to_agents_it_moves(
    srv: RunningServer, pki: Any
) -> None:
    kept_agent = _agent_from(srv, *_node(*pki, "rack9"))
    server_id = f"spiffe://{TRUST_DOMAIN}/svid/server"
    cn = common_pb2.Selector(type="x509pop", value="subject:cn:rack9")
    alias = srv.create_entry("/nodes/rack9", server_id, selectors=[cn])
    under = [
        common_pb2.Entry(
            spiffe_id=f"spiffe://{TRUST_DOMAIN}/rack9/{n}",
            parent_id=alias.spiffe_id,
            selectors=[common_pb2.Selector(type="unix", value=f"uid:{n}")],
        )
        for n in range(300)
    ]
    srv.admin().BatchCreateEntry(admin_pb2.BatchCreateEntryRequest(entries=under), timeout=30)
    stream = srv.node_stub(kept_agent).Sync(node_pb2.SyncRequest(), timeout=30)
    try:
        assert len(next(stream).entries) == 300
        # A DNS-name edit, then a selector edit the agent still matches: its reach is the same,
        # so nothing under the alias comes; the next message is the marker written after them.
        edited = common_pb2.Entry()
        edited.CopyFrom(alias)
        edited.dns_names.append("rack9.example.org")
        edited.CopyFrom(_update(srv, edited))
        fingerprint = next(s for s in _selectors(srv, kept_agent) if s.value.startswith("ca:"))
        edited.selectors.append(fingerprint)
        edited.CopyFrom(_update(srv, edited))
        marker = srv.create_entry("/rack9/marker", kept_agent.spiffe_id)
        update = next(stream)
        assert ([e.id for e in update.entries], list(update.removed_entry_ids)) == ([marker.id], [])
        # An edit the agent no longer matches: everything under the alias goes.
        del edited.selectors[:]
        edited.selectors.append(common_pb2.Selector(type="x509pop", value="subject:cn:other"))
        _update(srv, edited)
        update = next(stream)
        assert (len(update.entries), len(update.removed_entry_ids)) == (0, 300)
    finally:
        stream.cancel()


def _update(srv: RunningServer, entry: common_pb2.Entry) -> common_pb2.Entry:
    """The entry as stored after the update (its new revision: the next edit is based on it)."""
    reply = srv.admin().UpdateEntry(admin_pb2.UpdateEntryRequest(entry=entry), timeout=10)
    return reply.entry


def _selectors(srv: RunningServer, agent: Agent) -> list[common_pb2.Selector]:
    found = srv.admin().GetAgent(admin_pb2.GetAgentRequest(spiffe_id=agent.spiffe_id), timeout=10)
    return list(found.selectors)


def _agent_from(srv: RunningServer, cert: x509.Certificate, key: Any) -> Agent:
    agent_key, csr = make_csr()
    result = _pop_exchange(
        srv, cert.public_bytes(DER), csr, lambda nonce: sign_challenge(key, nonce)
    )
    return Agent(result.spiffe_id, agent_key, der_chain(result.cert_chain), result.bundle)


def test_wrong_key_fails_the_challenge(srv: RunningServer, pki: Any) -> None:
    cert, _ = _node(*pki, "node2")
    impostor = ec.generate_private_key(ec.SECP256R1())
    with pytest.raises(grpc.RpcError) as exc:
        _attest(srv, [cert], lambda nonce: sign_challenge(impostor, nonce))
    assert exc.value.code() == grpc.StatusCode.PERMISSION_DENIED  # type: ignore[attr-defined]
    assert "challenge signature" in exc.value.details()  # type: ignore[attr-defined]


def test_signature_over_other_bytes_fails(srv: RunningServer, pki: Any) -> None:
    cert, key = _node(*pki, "node3")
    with pytest.raises(grpc.RpcError) as exc:
        _attest(srv, [cert], lambda nonce: sign_challenge(key, nonce[::-1]))
    assert exc.value.code() == grpc.StatusCode.PERMISSION_DENIED  # type: ignore[attr-defined]


def test_a_signature_over_the_bare_nonce_is_refused(srv: RunningServer, pki: Any) -> None:
    """The answer signs the nonce behind x509pop's own context: a signature over the bare
    nonce could be one the node key made for another protocol's 32 bytes. It is what agents
    before that context sent: they no longer attest x509pop against this server."""
    cert, key = _node(*pki, "node-bare-nonce")
    with pytest.raises(grpc.RpcError) as exc:
        _attest(srv, [cert], lambda nonce: key.sign(nonce, ec.ECDSA(hashes.SHA256())))
    assert exc.value.code() == grpc.StatusCode.PERMISSION_DENIED  # type: ignore[attr-defined]
    assert "challenge signature" in exc.value.details()  # type: ignore[attr-defined]


def test_untrusted_chain_is_refused_before_the_challenge(srv: RunningServer) -> None:
    other_ca = _ca("evil-ca")
    cert, key = _node(*other_ca, "node4")
    _, csr = make_csr()
    params = node_pb2.AttestRequest(
        params=node_pb2.AttestParams(
            data=node_pb2.AttestationData(type="x509pop", payload=cert.public_bytes(DER)),
            csr=csr,
        )
    )
    with pytest.raises(grpc.RpcError) as exc:
        list(srv.attest_stub().Attest(iter([params]), timeout=10))
    assert exc.value.code() == grpc.StatusCode.PERMISSION_DENIED  # type: ignore[attr-defined]
    assert "does not chain" in exc.value.details()  # type: ignore[attr-defined]
    del key


def test_garbage_chain_is_invalid_argument(srv: RunningServer) -> None:
    _, csr = make_csr()
    params = node_pb2.AttestRequest(
        params=node_pb2.AttestParams(
            data=node_pb2.AttestationData(type="x509pop", payload=b"\x30\x82garbage"), csr=csr
        )
    )
    with pytest.raises(grpc.RpcError) as exc:
        list(srv.attest_stub().Attest(iter([params]), timeout=10))
    assert exc.value.code() == grpc.StatusCode.INVALID_ARGUMENT  # type: ignore[attr-defined]


def test_rsa_node_keys_work(srv: RunningServer, pki: Any) -> None:
    key = rsa.generate_private_key(public_exponent=65537, key_size=2048)
    cert, _ = _node(*pki, "rsa-node", key=key)
    result = _attest(srv, [cert], lambda nonce: sign_challenge(key, nonce))
    assert "/svid/agent/x509pop/" in result.spiffe_id


def test_silent_agent_times_out(tmp_path: Path) -> None:
    ca_file = tmp_path / "ca.pem"
    ca_file.write_bytes(_ca("t-ca")[0].public_bytes(PEM))
    with managed_server(x509pop_ca_bundle=str(ca_file), attest_timeout=0.3) as server:
        nonces: queue.Queue[None] = queue.Queue()

        def silent() -> Iterator[node_pb2.AttestRequest]:
            nonces.get(timeout=10)  # never sends params
            yield node_pb2.AttestRequest()

        with pytest.raises(grpc.RpcError) as exc:
            list(server.attest_stub().Attest(silent(), timeout=10))
        nonces.put(None)
        assert exc.value.code() == grpc.StatusCode.INVALID_ARGUMENT  # type: ignore[attr-defined]
        assert "no message from the agent within 0.3 s" in exc.value.details()  # type: ignore[attr-defined]


def test_a_host_over_its_budget_is_refused_before_the_chain_is_checked(tmp_path: Path) -> None:
    # x509pop checks cost a chain validation and a round trip: unlike join_token attempts,
    # they are refused up front once the host's budget is spent.
    ca_file = tmp_path / "ca.pem"
    ca_file.write_bytes(_ca("rl-ca")[0].public_bytes(PEM))
    limits = {"attest_rate_per_host": 1, "attest_burst_per_host": 1}
    with managed_server(x509pop_ca_bundle=str(ca_file), **limits) as server:
        params = node_pb2.AttestRequest(
            params=node_pb2.AttestParams(
                data=node_pb2.AttestationData(type="x509pop", payload=b"\x30\x82garbage"),
                csr=make_csr()[1],
            )
        )
        codes = []
        for _ in range(2):
            with pytest.raises(grpc.RpcError) as exc:
                list(server.attest_stub().Attest(iter([params]), timeout=10))
            codes.append(exc.value.code())  # type: ignore[attr-defined]
        assert codes == [grpc.StatusCode.INVALID_ARGUMENT, grpc.StatusCode.RESOURCE_EXHAUSTED]


@pytest.mark.parametrize("evicted", [True, False], ids=["evicted", "attested-again-only"])
def test_a_renewal_signed_while_the_node_attests_again_is_refused_and_saves_nothing(
    srv: RunningServer, pki: Any, monkeypatch: pytest.MonkeyPatch, evicted: bool
) -> None:
    """The agent save is a compare-and-swap on the record the renewal read: a holder of the
    node's SVID whose RenewAgent is being signed while the node attests again (after an
    eviction or not) is refused, gets no SVID, and neither overwrites the node's new record
    nor brings its own certificate back (attack-node repro)."""
    cert, key = _node(*pki, "node-renewal-race")
    stolen = _agent_from(srv, cert, key)
    entered, release = threading.Event(), threading.Event()
    original = AgentAdmission._sign_sync
    calls = {"n": 0}

    def held_once(self: AgentAdmission, *args: Any) -> Any:
        calls["n"] += 1
        if calls["n"] == 1:
            entered.set()
            release.wait(10)
        return original(self, *args)

    monkeypatch.setattr(AgentAdmission, "_sign_sync", held_once)
    renewal = srv.node_stub(stolen).RenewAgent.future(
        node_pb2.RenewAgentRequest(csr=make_csr()[1]), timeout=20
    )
    assert entered.wait(10)
    if evicted:
        srv.admin().EvictAgent(admin_pb2.EvictAgentRequest(spiffe_id=stolen.spiffe_id), timeout=10)
    node = _agent_from(srv, cert, key)  # the node attests again
    release.set()
    with pytest.raises(grpc.RpcError) as refused:
        renewal.result()
    assert refused.value.code() == grpc.StatusCode.PERMISSION_DENIED  # type: ignore[attr-defined]
    assert "attest again" in refused.value.details()  # type: ignore[attr-defined]
    # The re-attested node keeps its own record, in memory and stored...
    record = srv.server.state.agents[stolen.spiffe_id]
    assert record.serial == node.serial, "the stale renewal replaced the node's record"
    stored = srv.server.state._datastore.get_agent(stolen.spiffe_id)
    assert (stored.serial, stored.previous_serial) == (record.serial, record.previous_serial)
    # ...its certificate works, and the evicted one stays dead on the node API.
    next(iter(srv.node_stub(node).Sync(node_pb2.SyncRequest(), timeout=10)))
    if evicted:
        with pytest.raises(grpc.RpcError) as denied:
            next(iter(srv.node_stub(stolen).Sync(node_pb2.SyncRequest(), timeout=10)))
        assert denied.value.code() == grpc.StatusCode.PERMISSION_DENIED  # type: ignore[attr-defined]


# The order of P-256: an ECDSA signature (r, s) verifies as (r, n - s) too.
_P256_ORDER = 0xFFFFFFFF00000000FFFFFFFFFFFFFFFFBCE6FAADA7179E84F3B9CAC2FC632551


def _der_tlv(tag: int, body: bytes) -> bytes:
    size = len(body)
    if size < 0x80:
        return bytes([tag, size]) + body
    octets = size.to_bytes((size.bit_length() + 7) // 8, "big")
    return bytes([tag, 0x80 | len(octets)]) + octets + body


def _twin(cert: x509.Certificate) -> x509.Certificate:
    """The same certificate with its CA signature's s flipped to n - s: still signed by the
    CA, other DER bytes, so another SHA-1 fingerprint."""
    r, s = decode_dss_signature(cert.signature)
    flipped = encode_dss_signature(r, _P256_ORDER - s)
    # Certificate ::= SEQUENCE { tbsCertificate, signatureAlgorithm, signatureValue BIT STRING }
    signature = _der_tlv(0x03, b"\x00" + cert.signature)
    outer = cert.public_bytes(DER)
    assert outer.endswith(signature)
    tbs_and_algorithm = outer[outer.index(cert.tbs_certificate_bytes) : -len(signature)]
    twin = _der_tlv(0x30, tbs_and_algorithm + _der_tlv(0x03, b"\x00" + flipped))
    return x509.load_der_x509_certificate(twin)


def test_a_banned_node_cannot_attest_again_with_its_certificate_re_signed(
    srv: RunningServer, pki: Any
) -> None:
    """Anyone holding a node certificate from an ECDSA CA can make another valid encoding of
    it (the CA's signature's s as n - s). The ban of the node's agent must still hold: the
    node is the same certificate, subject, serial and key."""
    cert, key = _node(*pki, "node-banned-twin")
    twin = _twin(cert)
    assert twin.public_bytes(DER) != cert.public_bytes(DER)
    assert twin.tbs_certificate_bytes == cert.tbs_certificate_bytes
    signer = lambda nonce: sign_challenge(key, nonce)  # noqa: E731
    agent_id = _attest(srv, [cert], signer).spiffe_id
    srv.admin().BanAgent(admin_pb2.BanAgentRequest(spiffe_id=agent_id), timeout=10)
    with pytest.raises(grpc.RpcError) as refused:
        _attest(srv, [cert], signer)
    assert refused.value.code() == grpc.StatusCode.PERMISSION_DENIED  # type: ignore[attr-defined]
    # Before the refusal is asserted, the ID it would attest as, for the failure's message.
    twin_id = (
        f"spiffe://{TRUST_DOMAIN}/svid/agent/x509pop/"
        + hashlib.sha1(twin.public_bytes(DER), usedforsecurity=False).hexdigest()
    )
    assert twin_id != agent_id
    with pytest.raises(grpc.RpcError) as twin_refused:
        _attest(srv, [twin], signer)
    assert twin_refused.value.code() == grpc.StatusCode.PERMISSION_DENIED  # type: ignore[attr-defined]


def test_an_svid_of_the_trust_domain_is_not_an_x509pop_node_certificate() -> None:
    """One corporate root both signs the nodes' certificates (x509pop_ca_bundle) and is the
    trust domain's upstream CA. Every SVID the server issues then chains to that root too: an
    agent SVID (or a workload's) is no node certificate, and must not attest a node, which
    would give its holder a second agent identity, one a ban of the first does not reach."""
    root = short_tmpdir()
    corporate, corporate_key = _ca("corporate-root")
    root_file, key_file = root / "root.pem", root / "root.key"
    root_file.write_bytes(corporate.public_bytes(PEM))
    key_file.write_bytes(
        corporate_key.private_bytes(
            PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()
        )
    )
    key_file.chmod(0o600)
    try:
        with managed_server(
            x509pop_ca_bundle=str(root_file),
            upstream_ca_cert=str(root_file),
            upstream_ca_key=str(key_file),
            ca_ttl=3600,
        ) as srv:
            agent = srv.attest()
            srv.admin().BanAgent(admin_pb2.BanAgentRequest(spiffe_id=agent.spiffe_id), timeout=10)
            with pytest.raises(grpc.RpcError) as refused:
                _attest(srv, agent.chain, lambda nonce: sign_challenge(agent.key, nonce))
            assert refused.value.code() == grpc.StatusCode.PERMISSION_DENIED  # type: ignore[attr-defined]
    finally:
        shutil.rmtree(root, ignore_errors=True)


def _sync_refused(srv: RunningServer, svid: node_pb2.AgentSVID, key: Any) -> bool:
    agent = Agent(svid.spiffe_id, key, der_chain(svid.cert_chain), svid.bundle)
    try:
        next(iter(srv.node_stub(agent).Sync(node_pb2.SyncRequest(), timeout=10)))
    except grpc.RpcError as exc:
        return exc.code() == grpc.StatusCode.PERMISSION_DENIED  # type: ignore[attr-defined,no-any-return]
    return False


def test_a_first_attestation_signed_across_a_ban_of_the_node_does_not_unban_it(
    pki: Any, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A node's first attestation is held in its signing while a second one of the same node
    is admitted and the operator bans the agent. The first, saved after the ban, must be
    refused, and the agent stay banned: not an admitted agent that only the datastore still
    calls banned."""
    root = short_tmpdir()
    ca_file = root / "node-ca.pem"
    ca_file.write_bytes(pki[0].public_bytes(PEM))
    cert, key = _node(*pki, "node-ban-race")
    signer = lambda nonce: sign_challenge(key, nonce)  # noqa: E731
    payload = cert.public_bytes(DER)
    entered, release = threading.Event(), threading.Event()
    original = AgentAdmission._sign_sync
    calls: list[int] = []

    def first_held(self: AgentAdmission, *args: Any) -> Any:
        calls.append(1)
        if len(calls) == 1:
            entered.set()
            release.wait(10)
        return original(self, *args)

    monkeypatch.setattr(AgentAdmission, "_sign_sync", first_held)
    csr_key, csr = make_csr()
    try:
        with (
            managed_server(x509pop_ca_bundle=str(ca_file), signing_threads=4) as srv,
            ThreadPoolExecutor(1) as pool,
        ):
            first = pool.submit(_pop_exchange, srv, payload, csr, signer)
            assert entered.wait(10)
            agent_id = _attest(srv, [cert], signer).spiffe_id
            srv.admin().BanAgent(admin_pb2.BanAgentRequest(spiffe_id=agent_id), timeout=10)
            release.set()
            try:
                result = first.result(20)
            except grpc.RpcError:
                result = None
            seen = {
                "banned in the server's state": srv.server.state.agents[agent_id].banned,
                "banned in the datastore": srv.server.datastore.get_agent(agent_id).banned,
                "the first attestation refused": result is None,
                "its SVID refused a Sync": result is None or _sync_refused(srv, result, csr_key),
            }
            assert seen == dict.fromkeys(seen, True)
    finally:
        shutil.rmtree(root, ignore_errors=True)


def _intermediate(root: x509.Certificate, root_key: Any, cn: str) -> tuple[x509.Certificate, Any]:
    key = ec.generate_private_key(ec.SECP256R1())
    now = datetime.now(UTC)
    cert = (
        x509.CertificateBuilder()
        .subject_name(_name(cn))
        .issuer_name(root.subject)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - timedelta(hours=1))
        .not_valid_after(now + timedelta(days=1))
        .add_extension(x509.BasicConstraints(ca=True, path_length=0), critical=True)
        .add_extension(
            x509.KeyUsage(False, False, False, False, False, True, True, False, False),
            critical=True,
        )
        .add_extension(x509.SubjectKeyIdentifier.from_public_key(key.public_key()), critical=False)
        .add_extension(
            x509.AuthorityKeyIdentifier.from_issuer_public_key(root_key.public_key()),
            critical=False,
        )
        .sign(root_key, hashes.SHA256())
    )
    return cert, key


def test_a_certificate_our_own_ca_issued_is_not_a_node_certificate_even_without_a_spiffe_id() -> (
    None
):
    """The trust domain's CA sits under the x509pop root (the upstream root): a certificate it
    issued is ours, whatever its SANs say, never a node's. The same chain under a CA that is
    not ours attests."""
    root, root_key = _ca("corporate-root")
    ours, ours_key = _intermediate(root, root_key, "svidd-ca")
    leaf, leaf_key = _node(ours, ours_key, "no-spiffe-id")
    payload = leaf.public_bytes(DER) + ours.public_bytes(DER)

    async def answer(nonce: bytes) -> bytes:
        return sign_challenge(leaf_key, nonce)

    def attest(own: tuple[x509.Certificate, ...]) -> AttestationResult:
        ids = ServerIds(TrustDomain(TRUST_DOMAIN))
        attestor = X509PopAttestor((root,), ids, SystemClock(), own_cas=lambda: own)
        return asyncio.run(attestor.attest(payload, answer))

    assert attest(()).attestation_type == "x509pop"
    with pytest.raises(PermissionDeniedError, match="own CA"):
        attest((ours,))


def test_a_node_banned_under_its_former_agent_id_stays_banned(srv: RunningServer, pki: Any) -> None:
    """Agent IDs of x509pop nodes were the SHA-1 of the whole certificate before they were
    the SHA-256 of what the CA signed: a node banned under its former ID is refused, not
    admitted under its new one."""
    cert, key = _node(*pki, "node-banned-before")
    former = _former_id(cert)
    srv.call(srv.server.state.save_agent(AttestedAgent(former, "x509pop", "1", 2**40), None))
    srv.admin().BanAgent(admin_pb2.BanAgentRequest(spiffe_id=former), timeout=10)
    with pytest.raises(grpc.RpcError) as refused:
        _attest(srv, [cert], lambda nonce: sign_challenge(key, nonce))
    assert refused.value.code() == grpc.StatusCode.PERMISSION_DENIED  # type: ignore[attr-defined]
    assert "is banned" in refused.value.details()  # type: ignore[attr-defined]


def test_a_node_banned_under_its_former_agent_id_stays_banned_when_re_encoded(
    srv: RunningServer, pki: Any
) -> None:
    """A node banned before the upgrade, under its former ID (the SHA-1 of the whole
    certificate), presents its certificate with the CA's signature re-encoded (s as n - s):
    the former ID checked for a ban is then the SHA-1 of those other bytes, no ban is found,
    and the node attests as a new, unbanned agent. The ban must follow the certificate."""
    cert, key = _node(*pki, "node-banned-before-twin")
    former = _former_id(cert)
    srv.call(srv.server.state.save_agent(AttestedAgent(former, "x509pop", "1", 2**40), None))
    srv.admin().BanAgent(admin_pb2.BanAgentRequest(spiffe_id=former), timeout=10)
    twin = _twin(cert)
    with pytest.raises(grpc.RpcError) as refused:
        _attest(srv, [twin], lambda nonce: sign_challenge(key, nonce))
    assert refused.value.code() == grpc.StatusCode.PERMISSION_DENIED  # type: ignore[attr-defined]


def _without_null_parameters(cert: x509.Certificate) -> bytes:
    """The RSA-signed certificate's DER with its outer signatureAlgorithm's NULL parameters left
    out: the same signed certificate, which Go (SPIRE) parses all the same, other bytes."""
    outer = cert.public_bytes(DER)
    with_null = bytes.fromhex("300d06092a864886f70d01010b0500")  # sha256WithRSAEncryption
    signature = _der_tlv(0x03, b"\x00" + cert.signature)
    assert outer.endswith(with_null + signature)
    tbs = outer[outer.index(cert.tbs_certificate_bytes) : -len(with_null + signature)]
    return _der_tlv(0x30, tbs + _der_tlv(0x30, with_null[2:-2]) + signature)


def test_a_node_banned_under_its_former_agent_id_stays_banned_whatever_its_rsa_parameters(
    tmp_path: Path,
) -> None:
    """A node certificate signed by an RSA CA was banned before the upgrade under the SHA-1 of
    the encoding it presented then, its signatureAlgorithm's NULL parameters left out. With
    them (as the CA wrote them) it is the same certificate: the ban holds."""
    ca, ca_key = _ca("rsa-node-ca", rsa.generate_private_key(public_exponent=65537, key_size=2048))
    cert, key = _node(ca, ca_key, "rsa-signed-node-banned-before")
    former = (
        f"spiffe://{TRUST_DOMAIN}/svid/agent/x509pop/"
        + hashlib.sha1(_without_null_parameters(cert), usedforsecurity=False).hexdigest()
    )
    ca_file = tmp_path / "ca.pem"
    ca_file.write_bytes(ca.public_bytes(PEM))
    with managed_server(x509pop_ca_bundle=str(ca_file)) as server:
        server.call(
            server.server.state.save_agent(AttestedAgent(former, "x509pop", "1", 2**40), None)
        )
        server.admin().BanAgent(admin_pb2.BanAgentRequest(spiffe_id=former), timeout=10)
        with pytest.raises(grpc.RpcError) as refused:
            _attest(server, [cert], lambda nonce: sign_challenge(key, nonce))
    assert refused.value.code() == grpc.StatusCode.PERMISSION_DENIED  # type: ignore[attr-defined]
    assert "is banned" in refused.value.details()  # type: ignore[attr-defined]
