"""Node attestation: how an agent proves which node it runs on before it gets an agent SVID."""

from server.attestation.base import AttestationResult, Challenge, NodeAttestor
from server.attestation.join_token import JoinTokenAttestor, new_join_token
from server.attestation.x509pop import X509PopAttestor
from svid._x509pop import sign_challenge

__all__ = [
    "AttestationResult",
    "Challenge",
    "JoinTokenAttestor",
    "NodeAttestor",
    "X509PopAttestor",
    "new_join_token",
    "sign_challenge",
]
