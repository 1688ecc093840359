"""The values the datastore keeps. Frozen, so a record read once can be shared across threads."""

from __future__ import annotations

from dataclasses import dataclass

from svid import MAX_VERIFIER_LEEWAY

X509_KIND = "x509"
JWT_KIND = "jwt"
KEY_KINDS = (X509_KIND, JWT_KIND)

PREPARED = "prepared"
ACTIVE = "active"
RETIRED = "retired"
SLOT_STATUSES = (PREPARED, ACTIVE, RETIRED)

REVOKED_X509_SERIAL = "x509_serial"
REVOKED_JWT_ID = "jwt_id"
REVOCATION_KINDS = (REVOKED_X509_SERIAL, REVOKED_JWT_ID)


@dataclass(frozen=True, slots=True, order=True)
class Selector:
    """A workload or node property an entry matches on, such as ``unix:uid:1000``."""

    type: str
    value: str

    @classmethod
    def parse(cls, text: str) -> Selector:
        """``unix:uid:1000`` -> Selector("unix", "uid:1000"): the type ends at the first ':'."""
        kind, sep, value = text.partition(":")
        if not sep or not kind or not value:
            raise ValueError(f"selector must look like 'type:value', got {text!r}")
        return cls(kind, value)

    def __str__(self) -> str:
        return f"{self.type}:{self.value}"


@dataclass(frozen=True, slots=True)
class Entry:
    """A registration entry: who (selectors, under parent_id) gets which SPIFFE ID."""

    id: str
    spiffe_id: str
    parent_id: str
    selectors: tuple[Selector, ...]
    x509_svid_ttl: int = 0
    jwt_svid_ttl: int = 0
    dns_names: tuple[str, ...] = ()
    hint: str = ""
    admin: bool = False
    expires_at: int = 0
    revision: int = 0
    created_at: int = 0


@dataclass(frozen=True, slots=True)
class AttestedAgent:
    """A node agent that attested; `serial` is the serial of its current agent SVID."""

    spiffe_id: str
    attestation_type: str
    serial: str
    expires_at: int
    banned: bool = False
    attested_at: int = 0
    selectors: tuple[Selector, ...] = ()


@dataclass(frozen=True, slots=True)
class JoinToken:
    """A single-use join token. Only a hash of the secret is kept, never the secret."""

    token_id: str
    secret_hash: bytes
    expires_at: int

    def __repr__(self) -> str:
        # The hash is not the secret, but keep it out of logs all the same.
        return f"JoinToken(token_id={self.token_id!r}, expires_at={self.expires_at})"


@dataclass(frozen=True, slots=True)
class KeySlot:
    """The journal row of one CA or JWT signing key (the private key lives in the KeyStore).

    `public_der` is the CA certificate's DER for kind "x509", the SubjectPublicKeyInfo DER for
    kind "jwt".
    """

    slot_id: str
    kind: str
    status: str
    public_der: bytes
    kid: str
    not_before: int
    not_after: int
    created_at: int


@dataclass(frozen=True, slots=True)
class Revocation:
    """A revoked credential: an X.509-SVID serial (decimal text) or a JWT-SVID ``jti``."""

    kind: str
    value: str
    spiffe_id: str
    expires_at: int
    reason: str
    revoked_at: int


def revocation_needed_from(now: float) -> float:
    """The earliest credential expiry some verifier may still accept at `now`.

    A verifier takes a token through exp + its leeway (at most MAX_VERIFIER_LEEWAY), so a
    revocation, and the record of a credential that may need one, lives until then.
    """
    return now - MAX_VERIFIER_LEEWAY
