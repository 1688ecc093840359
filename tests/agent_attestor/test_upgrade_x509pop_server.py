"""An agent of this release meets an x509pop server of the previous one (b395c82) during a
rolling upgrade, agents first.

That server checks a signature over the bare nonce; this agent signs it behind x509pop's
context (svid._x509pop CONTEXT), so the server refuses it: "x509pop: challenge signature does
not match the certificate key". The agent then tells the operator to replace the node's
certificate and key or to change the server's x509pop_ca_bundle, none of which helps (seen
with real processes of both releases); what helps is upgrading the server, which the agent
never says.
"""

from __future__ import annotations

from collections.abc import AsyncIterator
from typing import Any

import grpc
from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.asymmetric import ec

from agent_attestor.errors import X509PopRefusedError
from svid._clock import SystemClock
from svid._proto import node_pb2, node_pb2_grpc
from tests.agent_attestor.pki import LocalCa
from tests.agent_attestor.test_server_identity import x509pop_refusals

# b395c82's server/attestation/x509pop.py, word for word.
_PREVIOUS_REFUSAL = "x509pop: challenge signature does not match the certificate key"


class _PreviousReleaseNode(node_pb2_grpc.NodeServicer):
    """x509pop as b395c82 checks it: a 32-byte nonce, answered by an ECDSA/SHA-256 signature
    over the nonce itself with the node certificate's key."""

    def __init__(self, node_key: ec.EllipticCurvePublicKey) -> None:
        self.node_key = node_key
        self.nonce = bytes(range(32))

    async def Attest(  # type: ignore[override]
        self, request_iterator: AsyncIterator[node_pb2.AttestRequest], context: Any
    ) -> None:
        await request_iterator.__anext__()
        await context.write(node_pb2.AttestResponse(challenge=self.nonce))
        answer = await request_iterator.__anext__()
        try:
            self.node_key.verify(answer.challenge_response, self.nonce, ec.ECDSA(hashes.SHA256()))
        except InvalidSignature:
            await context.abort(grpc.StatusCode.PERMISSION_DENIED, _PREVIOUS_REFUSAL)
        await context.abort(grpc.StatusCode.INTERNAL, "the test expects a refusal")


def test_an_agent_refused_by_a_previous_release_x509pop_server_says_to_upgrade_the_server() -> None:
    ca = LocalCa(SystemClock())
    node_key = ec.generate_private_key(ec.SECP256R1())
    node = _PreviousReleaseNode(node_key.public_key())
    refused = x509pop_refusals(node, ca, node_key)
    assert len(refused) == 1
    error = refused[0]
    assert isinstance(error, X509PopRefusedError), error
    told = f"{error} {error.problem} {error.remedy}".lower()
    # What the operator reads: replace the certificate and key, or the server's CA bundle.
    assert "upgrade" in told or "older" in told, (
        f"the agent does not say the server may be of an earlier release: {error.problem}; "
        f"{error.remedy}"
    )
