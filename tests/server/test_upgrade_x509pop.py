"""Upgrading x509pop nodes: what an agent of the previous release meets at a server of this one.

An agent before x509pop's signing context (svid._x509pop CONTEXT) answers the challenge with a
signature over the bare nonce. The server rightly refuses it, but the refusal must say what is
wrong and what to do (the agent is older than the server: upgrade it), not that the node's key
does not match its certificate, which sends the operator after a key that is fine.
"""

from __future__ import annotations

import shutil
from collections.abc import Iterator
from typing import Any

import grpc
import pytest
from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.asymmetric import ec

from server.ca.sealing import KeyEncryptionKey
from svid._proto import admin_pb2, node_pb2
from svid._x509pop import sign_challenge
from tests.server.fixtures import (
    DER,
    PEM,
    Agent,
    RunningServer,
    der_chain,
    make_csr,
    short_tmpdir,
    start_server,
)
from tests.server.test_x509pop import (
    _admitted_before_upgrade,
    _attest,
    _former_id,
    _node,
    _pop_exchange,
    pki,
    srv,
)

__all__ = ["pki", "srv"]  # the module's fixtures, used here


def _bare_nonce_signer(key: ec.EllipticCurvePrivateKey) -> object:
    """What a b395c82 agent sends: ECDSA/SHA-256 over the 32-byte nonce itself."""
    return lambda nonce: key.sign(nonce, ec.ECDSA(hashes.SHA256()))


def test_an_agent_of_the_previous_release_is_told_to_upgrade_not_that_its_key_is_wrong(
    srv: RunningServer, pki: tuple[object, object]
) -> None:
    cert, key = _node(*pki, "node-before-the-upgrade")  # type: ignore[arg-type]
    with pytest.raises(grpc.RpcError) as exc:
        _attest(srv, [cert], _bare_nonce_signer(key))
    assert exc.value.code() == grpc.StatusCode.PERMISSION_DENIED  # type: ignore[attr-defined]
    details = exc.value.details()  # type: ignore[attr-defined]
    # Today: "x509pop: challenge signature does not match the certificate key", false (the key
    # is the certificate's) and silent on the way out.
    assert "does not match the certificate key" not in details, details
    assert "upgrade" in details.lower(), details


@pytest.fixture(params=["sqlite", "postgres"])
def backend_srv(
    request: pytest.FixtureRequest, srv: RunningServer, pki: tuple[Any, Any]
) -> Iterator[RunningServer]:
    """An x509pop server on each datastore: the module's (SQLite), or one on PostgreSQL."""
    if request.param == "sqlite":
        yield srv
        return
    dsn = request.getfixturevalue("postgres_dsn")
    root = short_tmpdir()
    KeyEncryptionKey.generate().write_new(root / "kek")
    ca_file = root / "node-ca.pem"
    ca_file.write_bytes(pki[0].public_bytes(PEM))
    server = start_server(
        root,
        datastore=dsn,
        key_encryption_key_file=str(root / "kek"),
        x509pop_ca_bundle=str(ca_file),
    )
    try:
        yield server
    finally:
        server.stop()
        shutil.rmtree(root, ignore_errors=True)


@pytest.mark.parametrize("banned", ["new", "former"])
def test_a_ban_of_an_upgraded_node_under_either_of_its_ids_stops_both_its_agents(
    backend_srv: RunningServer, pki: tuple[Any, Any], banned: str
) -> None:
    """The previous release named an x509pop node's agent by the SHA-1 of its whole
    certificate. After the upgrade the node keeps that agent (it renews with its saved SVID,
    never attesting again: seen with real processes of both releases), and an attestation with
    the same certificate and key (the node's agent restarted without its data dir, or whoever
    took the node's key) admits an agent under the SHA-256 ID. One node must be one agent, so
    a ban of the node under either ID stops it whole. Before the fix the second admission left
    both serving, and a ban under one ID left the other syncing, renewing and getting its
    workloads' SVIDs (the ban of the former ID only refused attestations still to come)."""
    srv = backend_srv
    cert, key = _node(*pki, f"node-of-the-previous-release-{banned}")
    former = _former_id(cert)
    # The previous release's admission of the node: its record, and the SVID it holds.
    svid_key, chain = _admitted_before_upgrade(srv, former)
    old_agent = Agent(former, svid_key, list(chain), srv.bundle())
    assert _sync_code(srv, old_agent) is None  # it serves, as before the upgrade
    payload = cert.public_bytes(DER)

    if banned == "former":
        # Banned under the name the operator knows it by: that agent stops, and the node's
        # certificate and key admit no agent under the new name either.
        srv.admin().BanAgent(admin_pb2.BanAgentRequest(spiffe_id=former), timeout=10)
        assert _sync_code(srv, old_agent) == grpc.StatusCode.PERMISSION_DENIED
        with pytest.raises(grpc.RpcError) as exc:
            _pop_exchange(srv, payload, make_csr()[1], lambda nonce: sign_challenge(key, nonce))
        assert exc.value.code() == grpc.StatusCode.PERMISSION_DENIED  # type: ignore[attr-defined]
        return

    # The same node attests under this release: its agent, named the new way, replaces the
    # former one, which is evicted (not left serving beside it).
    new_key, csr = make_csr()
    result = _pop_exchange(srv, payload, csr, lambda nonce: sign_challenge(key, nonce))
    assert result.spiffe_id != former
    new_agent = Agent(result.spiffe_id, new_key, der_chain(result.cert_chain), result.bundle)
    assert former not in srv.server.state.agents
    assert _sync_code(srv, old_agent) == grpc.StatusCode.PERMISSION_DENIED, (
        f"node attested as {new_agent.spiffe_id}, yet its former agent {former} still syncs"
    )
    assert _sync_code(srv, new_agent) is None

    srv.admin().BanAgent(admin_pb2.BanAgentRequest(spiffe_id=new_agent.spiffe_id), timeout=10)
    assert _sync_code(srv, new_agent) == grpc.StatusCode.PERMISSION_DENIED
    assert _sync_code(srv, old_agent) == grpc.StatusCode.PERMISSION_DENIED


def _sync_code(srv: RunningServer, agent: Agent) -> grpc.StatusCode | None:
    """The code a Sync of `agent` is refused with, None when its first message arrives."""
    stream = srv.node_stub(agent).Sync(node_pb2.SyncRequest(), timeout=10)
    try:
        next(stream)
    except grpc.RpcError as exc:
        return exc.code()  # type: ignore[attr-defined,no-any-return]
    finally:
        stream.cancel()
    return None
