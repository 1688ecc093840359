"""x509pop's proof of possession, as the agent makes it and the server checks it.

The node key is the key of the node's certificate, which the node may use elsewhere too (its
TLS client identity in the same PKI). So the agent signs no bytes a server chooses: only a
nonce of NONCE_BYTES, and that behind a context of its own (CONTEXT), so the signature is
good for this protocol and nothing else (not a TLS 1.3 CertificateVerify, not another
protocol's 32-byte digest). Agents and servers must agree on the form: an agent that signed
the bare nonce (before v1) cannot attest against a server checking this one.
"""

from __future__ import annotations

from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.asymmetric import ec, ed25519, padding, rsa

NONCE_BYTES = 32
CONTEXT = b"svidd x509pop v1\0"
_PSS = padding.PSS(mgf=padding.MGF1(hashes.SHA256()), salt_length=32)


def _message(nonce: bytes) -> bytes:
    if len(nonce) != NONCE_BYTES:
        raise ValueError(
            f"an x509pop challenge is a {NONCE_BYTES}-byte nonce, this one has {len(nonce)} bytes"
        )
    return CONTEXT + nonce


def sign_challenge(key: object, nonce: bytes) -> bytes:
    """The agent's answer: CONTEXT + nonce signed with its node key (ECDSA/SHA-256 DER,
    RSA-PSS/SHA-256 with a 32-byte salt, or Ed25519). ValueError for a challenge that is not
    a nonce of NONCE_BYTES (nothing signed); TypeError for a key of another type."""
    message = _message(nonce)
    if isinstance(key, ec.EllipticCurvePrivateKey):
        return key.sign(message, ec.ECDSA(hashes.SHA256()))
    if isinstance(key, rsa.RSAPrivateKey):
        return key.sign(message, _PSS, hashes.SHA256())
    if isinstance(key, ed25519.Ed25519PrivateKey):
        return key.sign(message)
    raise TypeError(f"unsupported node key type {type(key).__name__}")


def check_answer(public_key: object, nonce: bytes, signature: bytes) -> bool:
    """Whether `signature` is sign_challenge's answer to `nonce` by the key's holder."""
    return _verifies(public_key, _message(nonce), signature)


def is_bare_nonce_answer(public_key: object, nonce: bytes, signature: bytes) -> bool:
    """Whether `signature` is the answer of an agent from before CONTEXT (it signed the bare
    nonce). Only for naming a refusal (that agent must be upgraded): such an answer is never
    accepted, and no agent is asked to sign anything for this check."""
    _message(nonce)  # the same length check as a real answer's
    return _verifies(public_key, nonce, signature)


def _verifies(public_key: object, message: bytes, signature: bytes) -> bool:
    try:
        if isinstance(public_key, ec.EllipticCurvePublicKey):
            public_key.verify(signature, message, ec.ECDSA(hashes.SHA256()))
        elif isinstance(public_key, rsa.RSAPublicKey):
            public_key.verify(signature, message, _PSS, hashes.SHA256())
        elif isinstance(public_key, ed25519.Ed25519PublicKey):
            public_key.verify(signature, message)
        else:
            return False
    except (InvalidSignature, ValueError):
        return False
    return True
