"""x509pop attestation: the agent proves possession of a key whose certificate chains to a CA.

Flow: the agent sends its DER chain (leaf first); the server verifies it against the configured
CA bundle and sends a 32-byte nonce; the agent signs it, behind a context of its own, with the
node key (svid._x509pop); the server checks the signature with the leaf's public key. The
agent is named by the SHA-256 of the leaf's TBS bytes (node_id), not SPIRE's SHA-1 of the whole
certificate, which the signature's encoding changes.
"""

from __future__ import annotations

import hashlib
import secrets
from collections.abc import Callable
from datetime import UTC, datetime

from cryptography import x509
from cryptography.hazmat.primitives.serialization import Encoding, PublicFormat
from cryptography.x509.oid import NameOID
from cryptography.x509.verification import (
    ExtensionPolicy,
    PolicyBuilder,
    Store,
    VerificationError,
)

from server.attestation.base import AttestationResult, Challenge
from server.datastore.records import Selector
from server.errors import InvalidRequestError, PermissionDeniedError
from server.ids import ServerIds
from svid._clock import Clock
from svid._errors import SvidError
from svid._x509 import extensions_of, parse_der_certs
from svid._x509pop import NONCE_BYTES, check_answer

TYPE_NAME = "x509pop"


def _public_key_der(cert: x509.Certificate) -> bytes:
    return cert.public_key().public_bytes(Encoding.DER, PublicFormat.SubjectPublicKeyInfo)


def _spiffe_uris(cert: x509.Certificate) -> list[str]:
    """The certificate's URI SANs naming a SPIFFE ID (an SVID's mark)."""
    try:
        san = extensions_of(cert).get_extension_for_class(x509.SubjectAlternativeName)
    except x509.ExtensionNotFound:
        return []
    except SvidError as exc:
        raise PermissionDeniedError(f"x509pop: {exc}") from None
    uris = san.value.get_values_for_type(x509.UniformResourceIdentifier)
    return [u for u in uris if u.lower().startswith("spiffe:")]


def _fingerprint(cert: x509.Certificate) -> str:
    """SPIRE's: the SHA-1 of the whole DER, which the CA's signature's encoding changes (an
    ECDSA s as n - s verifies all the same). Fine for a selector, never an identity."""
    return hashlib.sha1(cert.public_bytes(Encoding.DER), usedforsecurity=False).hexdigest()


def node_id(cert: x509.Certificate) -> str:
    """The node's name in its agent ID: the SHA-256 of what the CA signed (the TBS bytes),
    which no re-encoding of the signature can change, so one certificate is one agent."""
    return hashlib.sha256(cert.tbs_certificate_bytes).hexdigest()


class X509PopAttestor:
    type_name = TYPE_NAME
    # Chain validation and a challenge round trip: limited before any of it.
    checks_cheaply = False

    def __init__(
        self,
        ca_certs: tuple[x509.Certificate, ...],
        ids: ServerIds,
        clock: Clock,
        *,
        own_cas: Callable[[], tuple[x509.Certificate, ...]],
    ) -> None:
        """`own_cas`: the trust domain's own X.509 CAs as they stand (CaManager), so no
        certificate they issued passes as a node's, whatever the operator's bundle holds."""
        if not ca_certs:
            raise ValueError("x509pop needs at least one CA certificate")
        self._store = Store(list(ca_certs))
        self._ids = ids
        self._clock = clock
        self._own_cas = own_cas

    def _verify_chain(self, chain: list[x509.Certificate]) -> list[x509.Certificate]:
        when = datetime.fromtimestamp(self._clock.now(), tz=UTC)
        verifier = (
            PolicyBuilder()
            .store(self._store)
            .time(when)
            # Node certificates come from whatever PKI the operator runs: only the CA side
            # is held to the Web PKI profile.
            .extension_policies(
                ca_policy=ExtensionPolicy.webpki_defaults_ca(),
                ee_policy=ExtensionPolicy.permit_all(),
            )
            .build_client_verifier()
        )
        try:
            verified = verifier.verify(chain[0], chain[1:])
        except VerificationError as exc:
            raise PermissionDeniedError(
                f"x509pop: certificate does not chain to a trusted CA: {exc}"
            ) from None
        return list(verified.chain)

    def _refuse_our_own(self, verified: list[x509.Certificate]) -> None:
        """A node certificate is not an SVID. The bundle may hold a root that also signs this
        trust domain's CA (it is the upstream root): every SVID the server issued then chains
        to it, and one would attest its holder as a second agent a ban of the first misses."""
        if _spiffe_uris(verified[0]):
            raise PermissionDeniedError(
                "x509pop: the certificate is an SVID (it names a SPIFFE ID), not a node certificate"
            )
        ours = {_public_key_der(ca) for ca in self._own_cas()}
        if any(_public_key_der(ca) in ours for ca in verified[1:]):
            raise PermissionDeniedError(
                "x509pop: the certificate was issued by this trust domain's own CA, not a node CA"
            )

    async def attest(self, payload: bytes, challenge: Challenge) -> AttestationResult:
        try:
            chain = parse_der_certs(payload)
        except SvidError as exc:
            raise InvalidRequestError(
                f"x509pop: payload is not a DER certificate chain: {exc}"
            ) from None
        verified = self._verify_chain(chain)
        self._refuse_our_own(verified)
        leaf = chain[0]
        nonce = secrets.token_bytes(NONCE_BYTES)
        answer = await challenge(nonce)
        if not check_answer(leaf.public_key(), nonce, answer):
            raise PermissionDeniedError(
                "x509pop: challenge signature does not match the certificate key"
            )
        selectors = [Selector(TYPE_NAME, f"serialnumber:{leaf.serial_number:x}")]
        for attr in leaf.subject.get_attributes_for_oid(NameOID.COMMON_NAME):
            selectors.append(Selector(TYPE_NAME, f"subject:cn:{attr.value!s}"))
        for ca in verified[1:]:
            selectors.append(Selector(TYPE_NAME, f"ca:fingerprint:{_fingerprint(ca)}"))
        return AttestationResult(
            agent_id=self._ids.agent(TYPE_NAME, node_id(leaf)),
            attestation_type=TYPE_NAME,
            selectors=tuple(selectors),
            can_reattest=True,
            # Named by the whole certificate's SHA-1 before: a ban of that agent still holds.
            former_agent_ids=(self._ids.agent(TYPE_NAME, _fingerprint(leaf)),),
        )
