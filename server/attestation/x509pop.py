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
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.hazmat.primitives.asymmetric.types import CertificatePublicKeyTypes
from cryptography.hazmat.primitives.asymmetric.utils import (
    decode_dss_signature,
    encode_dss_signature,
)
from cryptography.hazmat.primitives.serialization import Encoding, PublicFormat
from cryptography.x509.oid import NameOID
from cryptography.x509.verification import (
    ExtensionPolicy,
    PolicyBuilder,
    Store,
    VerificationError,
)

from server.attestation.base import AttestationResult, Challenge
from server.ca.leaf_der import tlv
from server.datastore.records import Selector
from server.errors import InvalidRequestError, PermissionDeniedError
from server.ids import ServerIds
from svid._cert_der import read_tlv
from svid._clock import Clock
from svid._errors import SvidError
from svid._x509 import extensions_of, parse_der_certs
from svid._x509pop import NONCE_BYTES, check_answer, is_bare_nonce_answer

TYPE_NAME = "x509pop"

_SEQUENCE = 0x30
_BIT_STRING = 0x03
_NULL = b"\x05\x00"
# The orders n of the curves a CA's ECDSA signature can be on (the verifier takes no others):
# (r, s) and (r, n - s) both verify.
_CURVE_ORDERS = {
    "secp256r1": 0xFFFFFFFF00000000FFFFFFFFFFFFFFFFBCE6FAADA7179E84F3B9CAC2FC632551,
    "secp384r1": int(
        "FFFFFFFFFFFFFFFFFFFFFFFFFFFFFFFFFFFFFFFFFFFFFFFFC7634D81F4372DDF"
        "581A0DB248B0A77AECEC196ACCC52973",
        16,
    ),
    "secp521r1": int(
        "01FFFFFFFFFFFFFFFFFFFFFFFFFFFFFFFFFFFFFFFFFFFFFFFFFFFFFFFFFFFFFFFFFFFFFA51868783BF2F966B"
        "7FCC0148F709A5D03BB5C9B8899C47AEBB6FB71E91386409",
        16,
    ),
}


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


def _algorithm_encodings(algorithm: bytes) -> set[bytes]:
    """The outer AlgorithmIdentifier as sent and, when its parameters are NULL or absent (RSA
    PKCS#1 v1.5, ECDSA), with the other of the two: parsers take both (Go's ignores them)."""
    _, start, end = read_tlv(algorithm, 0, len(algorithm))
    _, _, oid_end = read_tlv(algorithm, start, end)
    if algorithm[oid_end:end] not in (b"", _NULL):
        return {algorithm}
    oid = algorithm[start:oid_end]
    return {algorithm, tlv(_SEQUENCE, oid), tlv(_SEQUENCE, oid + _NULL)}


def _signature_encodings(signature: bytes, issuer_key: CertificatePublicKeyTypes) -> set[bytes]:
    """The CA's signature as sent and, for ECDSA, as (r, n - s): minimal DER both (verifiers
    refuse any other encoding of the pair)."""
    if not isinstance(issuer_key, ec.EllipticCurvePublicKey):
        return {signature}
    order = _CURVE_ORDERS.get(issuer_key.curve.name)
    try:
        r, s = decode_dss_signature(signature)
    except ValueError:
        return {signature}
    if order is None or not 0 < s < order:
        return {signature}
    return {signature, encode_dss_signature(r, s), encode_dss_signature(r, order - s)}


def _former_fingerprints(leaf: x509.Certificate, issuer: x509.Certificate) -> set[str]:
    """Every SHA-1 fingerprint (the former agent ID) that ``leaf``, signed by ``issuer``, had
    or could have had: the TBS is fixed, but a node can re-encode the signature and the outer
    algorithm's parameters and still verify, so a ban under any of them must hold."""
    der = leaf.public_bytes(Encoding.DER)
    # Certificate ::= SEQUENCE { tbsCertificate, signatureAlgorithm, signatureValue BIT STRING }
    _, start, end = read_tlv(der, 0, len(der))
    _, _, tbs_end = read_tlv(der, start, end)
    _, _, algorithm_end = read_tlv(der, tbs_end, end)
    tbs = der[start:tbs_end]
    signatures = _signature_encodings(leaf.signature, issuer.public_key())
    fingerprints = {_fingerprint(leaf)}
    for algorithm in _algorithm_encodings(der[tbs_end:algorithm_end]):
        for signature in signatures:
            whole = tlv(_SEQUENCE, tbs + algorithm + tlv(_BIT_STRING, b"\x00" + signature))
            fingerprints.add(hashlib.sha1(whole, usedforsecurity=False).hexdigest())
    return fingerprints


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
            if is_bare_nonce_answer(leaf.public_key(), nonce, answer):
                # The key is the certificate's: saying it does not match would send the
                # operator after a key that is fine.
                raise PermissionDeniedError(
                    "x509pop: the challenge signature is over the bare nonce, as agents of an "
                    "earlier release sign it: the agent is older than this server and must be "
                    "upgraded"
                )
            raise PermissionDeniedError(
                "x509pop: challenge signature does not match the certificate key"
            )
        selectors = [Selector(TYPE_NAME, f"serialnumber:{leaf.serial_number:x}")]
        for attr in leaf.subject.get_attributes_for_oid(NameOID.COMMON_NAME):
            selectors.append(Selector(TYPE_NAME, f"subject:cn:{attr.value!s}"))
        # The CA that signed the leaf (the leaf itself if it is an anchor of the bundle).
        issuer = verified[1] if len(verified) > 1 else leaf
        for ca in verified[1:]:
            selectors.append(Selector(TYPE_NAME, f"ca:fingerprint:{_fingerprint(ca)}"))
        return AttestationResult(
            agent_id=self._ids.agent(TYPE_NAME, node_id(leaf)),
            attestation_type=TYPE_NAME,
            selectors=tuple(selectors),
            can_reattest=True,
            # Named by the whole certificate's SHA-1 before: a ban of that agent still holds,
            # whichever encoding of the certificate it was made under.
            former_agent_ids=tuple(
                self._ids.agent(TYPE_NAME, fingerprint)
                for fingerprint in sorted(_former_fingerprints(leaf, issuer))
            ),
        )
