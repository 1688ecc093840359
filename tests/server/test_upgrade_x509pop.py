"""Upgrading x509pop nodes: what an agent of the previous release meets at a server of this one.

An agent before x509pop's signing context (svid._x509pop CONTEXT) answers the challenge with a
signature over the bare nonce. The server rightly refuses it, but the refusal must say what is
wrong and what to do (the agent is older than the server: upgrade it), not that the node's key
does not match its certificate, which sends the operator after a key that is fine.
"""

from __future__ import annotations

import grpc
import pytest
from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.asymmetric import ec

from tests.server.fixtures import RunningServer
from tests.server.test_x509pop import _attest, _node, pki, srv

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
