"""Signers: they only sign. Built by the manager from the active key; immutable once built.

X.509-SVID leaves follow SPIFFE.md §2 the way SPIRE makes them: random serial, SKID/AKID,
NotBefore backdated 10 s (clock skew between machines), NotAfter capped at the CA's NotAfter.
"""

from __future__ import annotations

import hashlib
import re
import secrets
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from datetime import datetime, timedelta
from typing import Any

from cryptography import x509
from cryptography.hazmat.primitives.asymmetric import ec, rsa
from cryptography.hazmat.primitives.serialization import Encoding, PublicFormat
from cryptography.x509.oid import ExtendedKeyUsageOID, ExtensionOID, NameOID

from server.ca.errors import CaUnavailableError, CsrError, SigningRequestError
from server.ca.keys import PrivateKey, PublicKey, signature_hash
from svid._clock import Clock
from svid._jose import alg_for_key, b64url_encode, sign_jws
from svid._spiffe_id import SpiffeId, TrustDomain

BACKDATE_SECONDS = 10
MAX_CSR_BYTES = 16 * 1024
MIN_RSA_BITS = 2048
_EC_CURVES = ("secp256r1", "secp384r1", "secp521r1")
_DNS_NAME = re.compile(
    r"^(\*\.)?([A-Za-z0-9]([A-Za-z0-9-]{0,61}[A-Za-z0-9])?)(\.[A-Za-z0-9]([A-Za-z0-9-]{0,61}[A-Za-z0-9])?)*$"
)
_LEAF_SUBJECT = x509.Name([x509.NameAttribute(NameOID.ORGANIZATION_NAME, "SPIFFE")])
_LEAF_KEY_USAGE = x509.KeyUsage(
    digital_signature=True,
    content_commitment=False,
    key_encipherment=True,
    data_encipherment=False,
    key_agreement=True,
    key_cert_sign=False,
    crl_sign=False,
    encipher_only=False,
    decipher_only=False,
)
_LEAF_EKU = x509.ExtendedKeyUsage(
    [ExtendedKeyUsageOID.SERVER_AUTH, ExtendedKeyUsageOID.CLIENT_AUTH]
)
_LEAF_BASIC = x509.BasicConstraints(ca=False, path_length=None)
# cryptography's X.509 times are naive UTC datetimes; building them from the epoch skips the
# aware-to-naive conversion its setters would do for every certificate.
_EPOCH = datetime(1970, 1, 1)


def _pre_encoded(value: x509.ExtensionType, critical: bool) -> x509.Extension[x509.ExtensionType]:
    """`value` as an extension whose DER is encoded once, here, instead of per certificate.

    The bytes written are the same: an unrecognised extension is copied verbatim, and readers
    parse it back by its OID as the real type.
    """
    return x509.Extension(
        value.oid, critical, x509.UnrecognizedExtension(value.oid, value.public_bytes())
    )


def _subject_key_id(key: PublicKey) -> x509.Extension[x509.ExtensionType]:
    """RFC 5280 §4.2.1.2 method 1 (SHA-1 of the subjectPublicKey bits), as SPIRE and
    cryptography's SubjectKeyIdentifier.from_public_key compute it, without a DER round trip."""
    if isinstance(key, ec.EllipticCurvePublicKey):
        bits = key.public_bytes(Encoding.X962, PublicFormat.UncompressedPoint)
    else:
        bits = key.public_bytes(Encoding.DER, PublicFormat.PKCS1)
    digest = hashlib.sha1(bits).digest()  # noqa: S324 - an identifier, not a security hash
    # DER OCTET STRING of the 20-byte digest: tag 0x04, length 0x14.
    return x509.Extension(
        ExtensionOID.SUBJECT_KEY_IDENTIFIER,
        False,
        x509.UnrecognizedExtension(ExtensionOID.SUBJECT_KEY_IDENTIFIER, b"\x04\x14" + digest),
    )


_LEAF_HEAD = (
    _pre_encoded(_LEAF_BASIC, critical=True),
    _pre_encoded(_LEAF_KEY_USAGE, critical=True),
    _pre_encoded(_LEAF_EKU, critical=False),
)


def check_public_key(key: object, what: str = "public key") -> PublicKey:
    """EC on a NIST curve or RSA >= 2048 bits: what every SPIFFE verifier accepts."""
    if isinstance(key, ec.EllipticCurvePublicKey):
        if key.curve.name not in _EC_CURVES:
            raise CsrError(f"{what}: EC curve {key.curve.name} refused (P-256, P-384, P-521)")
        return key
    if isinstance(key, rsa.RSAPublicKey):
        if key.key_size < MIN_RSA_BITS:
            raise CsrError(f"{what}: RSA key of {key.key_size} bits refused (>= {MIN_RSA_BITS})")
        return key
    raise CsrError(f"{what}: {type(key).__name__} refused (EC or RSA only)")


def verify_csr(csr_der: bytes) -> x509.CertificateSigningRequest:
    """Parse a DER PKCS#10 request and check its self-signature and key type."""
    return _checked_csr(csr_der)[0]


def csr_public_key(csr_der: bytes) -> PublicKey:
    """verify_csr, returning the checked public key: what signing needs from a CSR."""
    return _checked_csr(csr_der)[1]


def _checked_csr(csr_der: bytes) -> tuple[x509.CertificateSigningRequest, PublicKey]:
    if not csr_der:
        raise CsrError("csr is empty")
    if len(csr_der) > MAX_CSR_BYTES:
        raise CsrError(f"csr is {len(csr_der)} bytes, at most {MAX_CSR_BYTES} allowed")
    try:
        csr = x509.load_der_x509_csr(csr_der)
    except ValueError:
        raise CsrError("csr is not a DER-encoded PKCS#10 request") from None
    try:
        valid = csr.is_signature_valid
    except Exception:
        raise CsrError("csr signature algorithm is not supported") from None
    if not valid:
        raise CsrError("csr signature does not verify against its own public key")
    try:
        key = csr.public_key()
    except ValueError:
        raise CsrError("csr public key cannot be read") from None
    return csr, check_public_key(key, "csr public key")


def _check_leaf_request(
    spiffe_id: SpiffeId, trust_domain: TrustDomain, ttl: int, dns_names: Sequence[str]
) -> None:
    if not isinstance(spiffe_id, SpiffeId):
        raise SigningRequestError(f"spiffe_id must be a SpiffeId, got {type(spiffe_id).__name__}")
    if not spiffe_id.is_member_of(trust_domain):
        raise SigningRequestError(f"{spiffe_id} is not in trust domain {trust_domain}")
    if not spiffe_id.path:
        raise SigningRequestError(f"{spiffe_id} has no path: leaf SVIDs need one")
    if ttl <= 0:
        raise SigningRequestError(f"ttl must be positive, got {ttl}")
    for name in dns_names:
        if len(name) > 253 or not _DNS_NAME.match(name):
            raise SigningRequestError(f"DNS name {name!r} is not a valid host name")


def _is_self_signed(cert: x509.Certificate) -> bool:
    return cert.issuer == cert.subject


@dataclass(frozen=True, slots=True)
class IssuedSvid:
    """One X.509-SVID as the node API sends it: the leaf and its chain as concatenated DER."""

    certificate: x509.Certificate
    chain_der: bytes
    serial: int
    expires_at: int

    @property
    def serial_hex(self) -> str:
        return format(self.serial, "x")


class X509Signer:
    """Signs X.509-SVIDs with one CA key. `chain_above` are the upstream intermediates between
    this CA and the root (not the root itself); they follow the CA certificate in every chain."""

    def __init__(
        self,
        ca_cert: x509.Certificate,
        ca_key: PrivateKey,
        chain_above: tuple[x509.Certificate, ...],
        clock: Clock,
    ) -> None:
        uri = ca_cert.extensions.get_extension_for_class(x509.SubjectAlternativeName)
        ids = uri.value.get_values_for_type(x509.UniformResourceIdentifier)
        if len(ids) != 1:
            raise CaUnavailableError("CA certificate must carry exactly one SPIFFE ID URI SAN")
        self._trust_domain = SpiffeId.parse(ids[0]).trust_domain
        self._ca_cert = ca_cert
        self._key = ca_key
        self._clock = clock
        self._hash = signature_hash(ca_key)
        self._issuer = ca_cert.subject
        self._ca_not_before = int(ca_cert.not_valid_before_utc.timestamp())
        self._ca_not_after = int(ca_cert.not_valid_after_utc.timestamp())
        ski = ca_cert.extensions.get_extension_for_class(x509.SubjectKeyIdentifier).value
        akid = x509.AuthorityKeyIdentifier.from_issuer_subject_key_identifier(ski)
        # Everything but key, serial, validity, SKID and SAN is the same in every leaf.
        self._akid = _pre_encoded(akid, critical=False)
        # A self-signed CA is the root: peers have it from the bundle, so it is not sent.
        own = () if _is_self_signed(ca_cert) else (ca_cert,)
        self._chain: tuple[x509.Certificate, ...] = own + tuple(chain_above)
        self._chain_der = b"".join(c.public_bytes(Encoding.DER) for c in self._chain)

    @property
    def ca_certificate(self) -> x509.Certificate:
        return self._ca_cert

    @property
    def chain(self) -> tuple[x509.Certificate, ...]:
        """What follows the leaf in an SVID: this CA (if not a root) and upstream intermediates."""
        return self._chain

    @property
    def trust_domain(self) -> TrustDomain:
        return self._trust_domain

    @property
    def not_after(self) -> int:
        return self._ca_not_after

    def sign_crl(
        self, builder: x509.CertificateRevocationListBuilder
    ) -> x509.CertificateRevocationList:
        """Sign a CRL with this CA's key; the builder's issuer must be this CA's subject."""
        return builder.sign(self._key, self._hash)

    def sign_svid(
        self,
        csr_or_public_key: x509.CertificateSigningRequest | PublicKey,
        spiffe_id: SpiffeId,
        ttl: int,
        dns_names: Sequence[str] = (),
    ) -> tuple[x509.Certificate, ...]:
        """The leaf followed by `chain`. A CSR's signature must already be checked (verify_csr)."""
        if isinstance(csr_or_public_key, x509.CertificateSigningRequest):
            key, what = csr_or_public_key.public_key(), "csr public key"
        else:
            key, what = csr_or_public_key, "public key"
        leaf, _serial, _not_after = self._sign_leaf(key, spiffe_id, ttl, dns_names, what)
        return (leaf, *self._chain)

    def issue(
        self, public_key: PublicKey, spiffe_id: SpiffeId, ttl: int, dns_names: Sequence[str] = ()
    ) -> IssuedSvid:
        """sign_svid for the wire: the chain as DER, plus what issuance records need."""
        leaf, serial, not_after = self._sign_leaf(
            public_key, spiffe_id, ttl, dns_names, "public key"
        )
        return IssuedSvid(
            certificate=leaf,
            chain_der=leaf.public_bytes(Encoding.DER) + self._chain_der,
            serial=serial,
            expires_at=not_after,
        )

    def _sign_leaf(
        self, key: object, spiffe_id: SpiffeId, ttl: int, dns_names: Sequence[str], what: str
    ) -> tuple[x509.Certificate, int, int]:
        _check_leaf_request(spiffe_id, self._trust_domain, ttl, dns_names)
        public_key = check_public_key(key, what)
        now = int(self._clock.now())
        if now >= self._ca_not_after:
            raise CaUnavailableError("the active CA certificate has expired")
        not_before = max(now - BACKDATE_SECONDS, self._ca_not_before)
        not_after = min(now + ttl, self._ca_not_after)
        san: list[x509.GeneralName] = [x509.UniformResourceIdentifier(str(spiffe_id))]
        san.extend(x509.DNSName(name) for name in dns_names)
        san_value = x509.SubjectAlternativeName(san)
        serial = x509.random_serial_number()
        # The builder's constructor takes every field at once: the per-field setters would
        # copy the builder a dozen times per certificate. Every value here is checked above
        # or built by this class, and sign() refuses a builder with a field missing.
        builder = x509.CertificateBuilder(
            issuer_name=self._issuer,
            subject_name=_LEAF_SUBJECT,
            public_key=public_key,
            serial_number=serial,
            not_valid_before=_EPOCH + timedelta(seconds=not_before),
            not_valid_after=_EPOCH + timedelta(seconds=not_after),
            extensions=[
                *_LEAF_HEAD,
                _subject_key_id(public_key),
                self._akid,
                x509.Extension(san_value.oid, False, san_value),
            ],
        )
        return builder.sign(self._key, self._hash), serial, not_after


@dataclass(frozen=True, slots=True)
class IssuedJwt:
    token: str
    jti: str
    issued_at: int
    expires_at: int

    def __repr__(self) -> str:
        # The token is a bearer credential: never in a log line.
        return (
            f"IssuedJwt(jti={self.jti!r}, issued_at={self.issued_at}, expires_at={self.expires_at})"
        )


_RESERVED_CLAIMS = frozenset({"sub", "aud", "exp", "iat", "jti"})


class JwtSigner:
    """Mints JWT-SVIDs with one signing key; `exp` never outlives the key (`not_after`)."""

    def __init__(self, key: PrivateKey, kid: str, clock: Clock, not_after: int) -> None:
        self._key = key
        self._kid = kid
        self._clock = clock
        self._not_after = int(not_after)
        self._header = {"alg": alg_for_key(key), "kid": kid, "typ": "JWT"}

    @property
    def kid(self) -> str:
        return self._kid

    @property
    def not_after(self) -> int:
        return self._not_after

    def sign(
        self,
        spiffe_id: SpiffeId,
        audience: Sequence[str],
        ttl: int,
        extra_claims: Mapping[str, Any] | None = None,
    ) -> IssuedJwt:
        if not isinstance(spiffe_id, SpiffeId):
            raise SigningRequestError(
                f"spiffe_id must be a SpiffeId, got {type(spiffe_id).__name__}"
            )
        if not spiffe_id.path:
            raise SigningRequestError(f"{spiffe_id} has no path: JWT-SVIDs need one")
        if isinstance(audience, str):
            raise SigningRequestError("audience must be a sequence of strings, not one string")
        audiences = list(audience)
        if not audiences or any(not isinstance(a, str) or not a for a in audiences):
            raise SigningRequestError("audience must hold at least one non-empty string")
        if ttl <= 0:
            raise SigningRequestError(f"ttl must be positive, got {ttl}")
        extra = dict(extra_claims or {})
        clash = sorted(_RESERVED_CLAIMS & extra.keys())
        if clash:
            raise SigningRequestError(f"extra claims may not set {', '.join(clash)}")
        now = int(self._clock.now())
        if now >= self._not_after:
            raise CaUnavailableError("the active JWT signing key has expired")
        expires_at = min(now + ttl, self._not_after)
        jti = b64url_encode(secrets.token_bytes(16))
        # Like SPIRE (go-jose): one audience is a plain string, several are a list.
        claims: dict[str, Any] = {
            **extra,
            "sub": str(spiffe_id),
            "aud": audiences[0] if len(audiences) == 1 else audiences,
            "exp": expires_at,
            "iat": now,
            "jti": jti,
        }
        token = sign_jws(self._header, claims, self._key)
        return IssuedJwt(token=token, jti=jti, issued_at=now, expires_at=expires_at)
