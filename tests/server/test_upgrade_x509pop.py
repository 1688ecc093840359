"""Upgrading x509pop nodes: what an agent of the previous release meets at a server of this one.

An agent before x509pop's signing context (svid._x509pop CONTEXT) answers the challenge with a
signature over the bare nonce. The server rightly refuses it, but the refusal must say what is
wrong and what to do (the agent is older than the server: upgrade it), not that the node's key
does not match its certificate, which sends the operator after a key that is fine.
"""

from __future__ import annotations

import hashlib
from typing import Any

import grpc
import pytest
from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.asymmetric import ec

from server.datastore.records import AttestedAgent
from svid._proto import admin_pb2, common_pb2, node_pb2
from svid._spiffe_id import SpiffeId
from svid._x509pop import sign_challenge
from tests.server.fixtures import (
    DER,
    TRUST_DOMAIN,
    Agent,
    RunningServer,
    der_chain,
    make_csr,
)
from tests.server.test_x509pop import _attest, _node, _pop_exchange, pki, srv

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


@pytest.mark.parametrize("banned", ["new", "former"])
def test_a_ban_of_an_upgraded_node_under_either_of_its_ids_stops_both_its_agents(
    srv: RunningServer, pki: tuple[Any, Any], banned: str
) -> None:
    """The previous release named an x509pop node's agent by the SHA-1 of its whole
    certificate. After the upgrade the node keeps that agent (it renews with its saved SVID,
    never attesting again: seen with real processes of both releases), and an attestation with
    the same certificate and key (the node's agent restarted without its data dir, or whoever
    took the node's key) admits a second agent under the SHA-256 ID. A ban of the node under
    either ID must stop both agents, the same node. It stops neither other: the one not named
    keeps syncing, renewing and getting its workloads' SVIDs under a ban of its node (the ban
    of the former ID only refuses attestations still to come)."""
    cert, key = _node(*pki, f"node-of-the-previous-release-{banned}")
    former = (
        f"spiffe://{TRUST_DOMAIN}/svid/agent/x509pop/"
        + hashlib.sha1(cert.public_bytes(DER), usedforsecurity=False).hexdigest()
    )
    # The previous release's admission of the node: its record, and the SVID it holds.
    svid_key = ec.generate_private_key(ec.SECP256R1())
    chain = srv.server.ca.x509_signer().sign_svid(
        svid_key.public_key(), SpiffeId.parse(former), 3600
    )
    serial = format(chain[0].serial_number, "x")
    expires = int(chain[0].not_valid_after_utc.timestamp())
    srv.call(srv.server.state.save_agent(AttestedAgent(former, "x509pop", serial, expires), None))
    old_agent = Agent(former, svid_key, list(chain), common_pb2.Bundle())

    # The same node attests under this release: a second agent, named the new way.
    new_key, csr = make_csr()
    payload = cert.public_bytes(DER)
    result = _pop_exchange(srv, payload, csr, lambda nonce: sign_challenge(key, nonce))
    assert result.spiffe_id != former
    new_agent = Agent(result.spiffe_id, new_key, der_chain(result.cert_chain), result.bundle)
    old_agent.bundle = result.bundle
    assert _sync_code(srv, old_agent) is None  # both serve meanwhile
    assert _sync_code(srv, new_agent) is None

    named, other = (new_agent, old_agent) if banned == "new" else (old_agent, new_agent)
    srv.admin().BanAgent(admin_pb2.BanAgentRequest(spiffe_id=named.spiffe_id), timeout=10)

    assert _sync_code(srv, named) == grpc.StatusCode.PERMISSION_DENIED
    assert _sync_code(srv, other) == grpc.StatusCode.PERMISSION_DENIED, (
        f"node banned as {named.spiffe_id}, yet its agent {other.spiffe_id} still syncs"
    )


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
