"""Signers: they only sign. Built by the manager from the active key; immutable once built.

X.509-SVID leaves follow SPIFFE.md §2 the way SPIRE makes them: random serial, SKID/AKID,
NotBefore backdated 10 s (clock skew between machines), NotAfter capped at the CA's NotAfter.
"""

from __future__ import annotations

import hashlib
import json
import logging
import re
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from datetime import datetime, timedelta
from json.encoder import encode_basestring_ascii
from typing import Any, NamedTuple

from cryptography import x509
from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.asymmetric import ec, padding, rsa
from cryptography.hazmat.primitives.serialization import (
    Encoding,
    NoEncryption,
    PrivateFormat,
    PublicFormat,
)
from cryptography.x509.oid import ExtendedKeyUsageOID, ExtensionOID, NameOID

from server.ca.errors import CaUnavailableError, CsrError, SigningRequestError
from server.ca.keys import PrivateKey, PublicKey, signature_hash
from server.ca.leaf_der import (
    LeafTemplate,
    oid_der,
    public_key_der,
    san_value,
    signature_algorithm_of,
    tlv,
)
from server.ca.leaf_der import extension as leaf_extension
from server.ca.randomness import random_bytes, random_serial_number
from svid._cert_der import read_tlv
from svid._clock import Clock
from svid._jose import alg_for_key, b64url_bytes, ecdsa_der_to_raw, sign_jws
from svid._spiffe_id import SpiffeId, TrustDomain

_log = logging.getLogger("svid.server.ca")
BACKDATE_SECONDS = 10
MAX_CSR_BYTES = 16 * 1024
MIN_RSA_BITS = 2048
_EC_CURVES = ("secp256r1", "secp384r1", "secp521r1")
# Matched whole (fullmatch): with match, "$" let a name ending in a newline into a leaf's SAN.
_DNS_NAME = re.compile(
    r"(\*\.)?([A-Za-z0-9]([A-Za-z0-9-]{0,61}[A-Za-z0-9])?)(\.[A-Za-z0-9]([A-Za-z0-9-]{0,61}[A-Za-z0-9])?)*"
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


def _extension_der(ext: x509.Extension[x509.ExtensionType]) -> bytes:
    """An extension as the builder writes it into the TBS (see leaf_der.extension)."""
    value = ext.value
    if not isinstance(value, x509.UnrecognizedExtension):
        raise TypeError("only pre-encoded extensions are templated")
    return leaf_extension(oid_der(ext.oid.dotted_string), ext.critical, value.value)


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
    except (ValueError, x509.InvalidVersion):  # InvalidVersion (version != 1) is no ValueError
        raise CsrError("csr is not a DER-encoded PKCS#10 request") from None
    valid, key = _fast_signature_verdict(csr, csr_der)
    if valid is None:
        valid, key = _reference_signature_valid(csr), None
    if not valid:
        raise CsrError("csr signature does not verify against its own public key")
    if key is None:
        try:
            key = csr.public_key()
        except ValueError:
            raise CsrError("csr public key cannot be read") from None
    return csr, check_public_key(key, "csr public key")


# The signature algorithms agents use, as the exact DER of their AlgorithmIdentifier: ECDSA
# with no parameters (RFC 5758), RSA PKCS#1 v1.5 with NULL parameters (RFC 4055). Anything
# else, and any key these do not fit, goes to cryptography's own check.
_ECDSA_ALGORITHMS: dict[bytes, ec.ECDSA] = {
    tlv(0x30, oid_der(oid)): ec.ECDSA(hash_type())
    for oid, hash_type in (
        ("1.2.840.10045.4.3.2", hashes.SHA256),
        ("1.2.840.10045.4.3.3", hashes.SHA384),
        ("1.2.840.10045.4.3.4", hashes.SHA512),
    )
}
_RSA_PKCS1_ALGORITHMS: dict[bytes, hashes.HashAlgorithm] = {
    tlv(0x30, oid_der(oid) + b"\x05\x00"): hash_type()
    for oid, hash_type in (
        ("1.2.840.113549.1.1.11", hashes.SHA256),
        ("1.2.840.113549.1.1.12", hashes.SHA384),
        ("1.2.840.113549.1.1.13", hashes.SHA512),
    )
}
_PKCS1V15 = padding.PKCS1v15()


def csr_signature_valid(csr: x509.CertificateSigningRequest, csr_der: bytes) -> bool:
    """`csr.is_signature_valid`, with the signature checked through the public key's `verify`
    for ECDSA and RSA PKCS#1 v1.5 requests (csr_public_key then reuses the key it checked).
    Both hold the GIL in cryptography 50: cores come from signing worker processes
    (server.ca.workers). Same verdict in every case (tests compare the two); CsrError where
    is_signature_valid would raise.
    """
    valid, _ = _fast_signature_verdict(csr, csr_der)
    return _reference_signature_valid(csr) if valid is None else valid


def _reference_signature_valid(csr: x509.CertificateSigningRequest) -> bool:
    try:
        return csr.is_signature_valid
    except Exception:
        raise CsrError("csr signature algorithm is not supported") from None


def _fast_signature_verdict(
    csr: x509.CertificateSigningRequest, csr_der: bytes
) -> tuple[bool | None, object]:
    """(True or False, the public key) for the common algorithms; (None, None) to leave the
    verdict to is_signature_valid."""
    try:
        size = len(csr_der)
        _, start, _ = read_tlv(csr_der, 0, size)
        _, _, info_end = read_tlv(csr_der, start, size)
        _, _, algorithm_end = read_tlv(csr_der, info_end, size)
        algorithm = csr_der[info_end:algorithm_end]
        key = csr.public_key()
        if isinstance(key, ec.EllipticCurvePublicKey):
            ecdsa = _ECDSA_ALGORITHMS.get(algorithm)
            if ecdsa is None:
                return None, None
            key.verify(csr.signature, csr.tbs_certrequest_bytes, ecdsa)
        elif isinstance(key, rsa.RSAPublicKey):
            hash_algorithm = _RSA_PKCS1_ALGORITHMS.get(algorithm)
            if hash_algorithm is None:
                return None, None
            key.verify(csr.signature, csr.tbs_certrequest_bytes, _PKCS1V15, hash_algorithm)
        else:
            return None, None
    except InvalidSignature:
        return False, None
    except Exception:  # an unreadable key, say: is_signature_valid knows what to make of it
        return None, None
    return True, key


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
        if len(name) > 253 or not _DNS_NAME.fullmatch(name):
            raise SigningRequestError(f"DNS name {name!r} is not a valid host name")


def _is_self_signed(cert: x509.Certificate) -> bool:
    return cert.issuer == cert.subject


# One X.509-SVID to issue from a CSR: (CSR DER, SPIFFE ID, TTL in seconds, DNS names).
X509Request = tuple[bytes, SpiffeId, int, tuple[str, ...]]


class LeafFields(NamedTuple):
    """What varies from one X.509-SVID leaf to the next (all checked before they get here)."""

    public_key: PublicKey
    spiffe_id: SpiffeId
    dns_names: Sequence[str]
    serial: int
    not_before: int
    not_after: int


@dataclass(frozen=True, slots=True)
class IssuedSvid:
    """One X.509-SVID as the node API sends it: the leaf and its chain as concatenated DER."""

    leaf_der: bytes
    chain_der: bytes
    serial: int
    expires_at: int

    @property
    def certificate(self) -> x509.Certificate:
        """The leaf, parsed (the node API only sends DER, so it is parsed on demand)."""
        return x509.load_der_x509_certificate(self.leaf_der)

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
        self._key_id = ski.digest.hex()
        akid = x509.AuthorityKeyIdentifier.from_issuer_subject_key_identifier(ski)
        # Everything but key, serial, validity, SKID and SAN is the same in every leaf.
        self._akid = _pre_encoded(akid, critical=False)
        # A self-signed CA is the root: peers have it from the bundle, so it is not sent.
        own = () if _is_self_signed(ca_cert) else (ca_cert,)
        self._chain: tuple[x509.Certificate, ...] = own + tuple(chain_above)
        self._chain_der = b"".join(c.public_bytes(Encoding.DER) for c in self._chain)
        self._chain_above = tuple(chain_above)
        self._template = self._checked_template()
        # Names this CA key to signing worker processes (server.ca.workers), which keep a few.
        digest = hashlib.sha256(ca_cert.public_bytes(Encoding.DER)).hexdigest()
        self._worker_name = f"x509:{digest[:32]}"

    @property
    def ca_certificate(self) -> x509.Certificate:
        return self._ca_cert

    @property
    def key_id(self) -> str:
        """This CA's subject key id (hex; its slot's kid): what each issued serial is recorded
        with, so a CRL lists it only under the CA that issued it (server.tasks.crl)."""
        return self._key_id

    @property
    def chain(self) -> tuple[x509.Certificate, ...]:
        """What follows the leaf in an SVID: this CA (if not a root) and upstream intermediates."""
        return self._chain

    @property
    def chain_bytes(self) -> int:
        """The DER size of `chain`: what every SVID of this CA carries after its leaf."""
        return len(self._chain_der)

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

    @property
    def template(self) -> LeafTemplate | None:
        """The hand-encoded leaf path, or None if it did not reproduce the builder at start."""
        return self._template

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
        leaf_der, _serial, _not_after = self._sign_leaf(key, spiffe_id, ttl, dns_names, what)
        return (x509.load_der_x509_certificate(leaf_der), *self._chain)

    def issue(
        self,
        public_key: PublicKey,
        spiffe_id: SpiffeId,
        ttl: int,
        dns_names: Sequence[str] = (),
        now: int | None = None,
    ) -> IssuedSvid:
        """sign_svid for the wire: the chain as DER, plus what issuance records need.
        `now` defaults to the clock's (a signing worker has none: the server sends it)."""
        leaf_der, serial, not_after = self._sign_leaf(
            public_key, spiffe_id, ttl, dns_names, "public key", now=now
        )
        return self.issued(leaf_der, serial, not_after)

    def issue_csr(self, request: X509Request, now: int) -> IssuedSvid:
        """issue() for a CSR that has not been checked yet: the whole per-item work of an
        X.509-SVID batch, in the server or in a signing worker (server.ca.workers)."""
        csr_der, spiffe_id, ttl, dns_names = request
        return self.issue(csr_public_key(csr_der), spiffe_id, ttl, dns_names, now)

    def issued(self, leaf_der: bytes, serial: int, expires_at: int) -> IssuedSvid:
        """The IssuedSvid of a leaf this CA signed (here or in a signing worker)."""
        return IssuedSvid(
            leaf_der=leaf_der,
            chain_der=leaf_der + self._chain_der,
            serial=serial,
            expires_at=expires_at,
        )

    @property
    def worker_name(self) -> str:
        """What signing workers (server.ca.workers) know this CA key by."""
        return self._worker_name

    def worker_copy(self) -> tuple[bytes, bytes, tuple[bytes, ...]]:
        """(CA certificate DER, PKCS#8 DER key, upstream intermediates DER): what a signing
        worker process needs to sign as this signer does. Goes down the worker's private
        socket only; never logged or stored."""
        key = self._key.private_bytes(Encoding.DER, PrivateFormat.PKCS8, NoEncryption())
        above = tuple(c.public_bytes(Encoding.DER) for c in self._chain_above)
        return self._ca_cert.public_bytes(Encoding.DER), key, above

    def _sign_leaf(
        self,
        key: object,
        spiffe_id: SpiffeId,
        ttl: int,
        dns_names: Sequence[str],
        what: str,
        *,
        now: int | None = None,
    ) -> tuple[bytes, int, int]:
        _check_leaf_request(spiffe_id, self._trust_domain, ttl, dns_names)
        public_key = check_public_key(key, what)
        if now is None:
            now = int(self._clock.now())
        if now >= self._ca_not_after:
            raise CaUnavailableError("the active CA certificate has expired")
        not_before = max(now - BACKDATE_SECONDS, self._ca_not_before)
        not_after = min(now + ttl, self._ca_not_after)
        serial = random_serial_number()
        leaf = LeafFields(public_key, spiffe_id, dns_names, serial, not_before, not_after)
        der = self.template_leaf(leaf)
        if der is None:
            der = self.builder_leaf(leaf).public_bytes(Encoding.DER)
        return der, serial, not_after

    def template_leaf(self, leaf: LeafFields) -> bytes | None:
        """The leaf DER through the template (the CA key signs the TBS directly), or None
        where only the builder knows the encoding (a non-ASCII name, a year out of range)."""
        template = self._template
        if template is None:
            return None
        tbs = _template_tbs(template, leaf)
        return None if tbs is None else template.sign(tbs)

    def template_tbs(self, leaf: LeafFields) -> bytes | None:
        """The TBSCertificate template_leaf signs (None as there); equal to builder_leaf's."""
        if self._template is None:
            return None
        return _template_tbs(self._template, leaf)

    def builder_leaf(self, leaf: LeafFields) -> x509.Certificate:
        """The leaf as cryptography's CertificateBuilder makes it: the reference the template
        must reproduce byte for byte, and the fallback where it cannot."""
        public_key = leaf.public_key
        san: list[x509.GeneralName] = [x509.UniformResourceIdentifier(str(leaf.spiffe_id))]
        san.extend(x509.DNSName(name) for name in leaf.dns_names)
        san_ext = x509.SubjectAlternativeName(san)
        # The builder's constructor takes every field at once: the per-field setters would
        # copy the builder a dozen times per certificate. Every value here is checked by the
        # caller or built by this class, and sign() refuses a builder with a field missing.
        builder = x509.CertificateBuilder(
            issuer_name=self._issuer,
            subject_name=_LEAF_SUBJECT,
            public_key=public_key,
            serial_number=leaf.serial,
            not_valid_before=_EPOCH + timedelta(seconds=leaf.not_before),
            not_valid_after=_EPOCH + timedelta(seconds=leaf.not_after),
            extensions=[
                *_LEAF_HEAD,
                _subject_key_id(public_key),
                self._akid,
                x509.Extension(san_ext.oid, False, san_ext),
            ],
        )
        return builder.sign(self._key, self._hash)

    def _checked_template(self) -> LeafTemplate | None:
        """The leaf template for this CA if it reproduces the builder's TBS exactly on a sample
        leaf; otherwise None: log a warning and sign with the builder (slower, never different)."""
        sample_id = SpiffeId.parse(f"spiffe://{self._trust_domain}/leaf-template-check")
        leaf = LeafFields(
            self._key.public_key(),
            sample_id,
            ("a.example", "*.b.example"),
            (1 << 158) + 0x1234,
            self._ca_not_before,
            self._ca_not_after,
        )
        try:
            sample = self.builder_leaf(leaf)
            template = LeafTemplate(
                self._key,
                self._hash,
                signature_algorithm=signature_algorithm_of(sample.public_bytes(Encoding.DER)),
                issuer_der=self._issuer.public_bytes(),
                subject_der=_LEAF_SUBJECT.public_bytes(),
                head_extensions=b"".join(_extension_der(e) for e in _LEAF_HEAD),
                akid_extension=_extension_der(self._akid),
            )
        except (TypeError, ValueError) as exc:
            _log.warning("no hand-encoded X.509-SVID leaves (%s); using the builder", exc)
            return None
        if _template_tbs(template, leaf) != sample.tbs_certificate_bytes:
            _log.warning("hand-encoded X.509-SVID leaves differ from the builder's; using it")
            return None
        return template


def _template_tbs(template: LeafTemplate, leaf: LeafFields) -> bytes | None:
    try:
        san = san_value(str(leaf.spiffe_id), leaf.dns_names)
        spki, skid = public_key_der(leaf.public_key)
        return template.tbs(
            serial=leaf.serial,
            not_before=leaf.not_before,
            not_after=leaf.not_after,
            spki=spki,
            skid_extension=skid,
            san=san,
        )
    except ValueError:  # UnicodeEncodeError included: only the builder knows those names
        return None


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


_RESERVED_CLAIMS = frozenset({"iss", "sub", "aud", "exp", "iat", "jti"})
# RFC 9068 §2.1: access tokens say what they are, so no JWT-SVID verifier takes one for an SVID.
ACCESS_TOKEN_TYP = "at+jwt"  # noqa: S105 - a media type, not a secret


class JwtSigner:
    """Mints JWT-SVIDs with one signing key; `exp` never outlives the key (`not_after`).
    `issuer` (the OIDC issuer URL, when one is configured) goes in every token as `iss`."""

    def __init__(
        self, key: PrivateKey, kid: str, clock: Clock, not_after: int, issuer: str | None = None
    ) -> None:
        self._key = key
        self._kid = kid
        self._clock = clock
        self._not_after = int(not_after)
        self._issuer = issuer or None
        self._header = {"alg": alg_for_key(key), "kid": kid, "typ": "JWT"}
        self._es = _EsSigner.checked(key, self._header, self._issuer)
        self._at_header = {**self._header, "typ": ACCESS_TOKEN_TYP}
        self._at_es = _EsSigner.checked(key, self._at_header, self._issuer)
        # Names this key to signing workers, which keep a few by name: everything a worker's
        # copy holds goes in, so two signers that sign differently never share a name.
        spki = key.public_key().public_bytes(Encoding.DER, PublicFormat.SubjectPublicKeyInfo)
        named = json.dumps([kid, spki.hex(), self._not_after, self._issuer]).encode()
        self._worker_name = f"jwt:{hashlib.sha256(named).hexdigest()[:32]}"

    @property
    def issuer(self) -> str | None:
        return self._issuer

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
        sub, audiences = check_jwt_request(spiffe_id, audience, ttl)
        extra = dict(extra_claims) if extra_claims else {}
        if extra:
            clash = sorted(_RESERVED_CLAIMS & extra.keys())
            if clash:
                raise SigningRequestError(f"extra claims may not set {', '.join(clash)}")
        return self.mint(sub, audiences, ttl, int(self._clock.now()), extra)

    def mint(
        self,
        sub: str,
        audiences: list[str],
        ttl: int,
        now: int,
        extra: Mapping[str, Any] | None = None,
    ) -> IssuedJwt:
        """sign() at `now` of a request check_jwt_request has passed (`sub` is its str ID)."""
        return IssuedJwt(*self.mint_values(sub, audiences, ttl, now, extra))

    def mint_values(
        self,
        sub: str,
        audiences: list[str],
        ttl: int,
        now: int,
        extra: Mapping[str, Any] | None = None,
    ) -> tuple[str, str, int, int]:
        """mint() as the IssuedJwt's (token, jti, issued_at, expires_at): what a signing worker
        sends back, without building the frozen dataclass (four object.__setattr__ calls) only
        to take it apart again."""
        if now >= self._not_after:
            raise CaUnavailableError("the active JWT signing key has expired")
        expires_at = min(now + ttl, self._not_after)
        jti = b64url_bytes(random_bytes(16)).decode("ascii")  # b64url_encode, minus two calls
        # Like SPIRE (go-jose): one audience is a plain string, several are a list.
        aud: str | list[str] = audiences[0] if len(audiences) == 1 else audiences
        if self._es is not None and not extra:
            token = self._es.sign_plain(sub, aud, expires_at, now, jti)
        else:
            claims: dict[str, Any] = {
                **({"iss": self._issuer} if self._issuer else {}),
                **(extra or {}),
                "sub": sub,
                "aud": aud,
                "exp": expires_at,
                "iat": now,
                "jti": jti,
            }
            if self._es is not None:
                token = self._es.sign(claims)
            else:
                token = sign_jws(self._header, claims, self._key)
        return token, jti, now, expires_at

    def mint_access_token(
        self,
        sub: str,
        audience: str,
        ttl: int,
        now: int,
        extra: Mapping[str, Any],
        *,
        typ: str = ACCESS_TOKEN_TYP,
    ) -> IssuedJwt:
        """An RFC 9068 access token (`typ: at+jwt`, or another `typ` such as a Txn-Token's)
        with this key: `iss` (required there), `sub`, one `aud`, `exp` (capped by the key),
        `iat`, a fresh `jti`, then `extra`."""
        if self._issuer is None:
            raise SigningRequestError("access tokens need an issuer URL (oidc_issuer)")
        if now >= self._not_after:
            raise CaUnavailableError("the active JWT signing key has expired")
        clash = sorted(_RESERVED_CLAIMS & extra.keys())
        if clash:
            raise SigningRequestError(f"extra claims may not set {', '.join(clash)}")
        expires_at = min(now + ttl, self._not_after)
        jti = b64url_bytes(random_bytes(16)).decode("ascii")
        claims: dict[str, Any] = {
            "iss": self._issuer,
            "sub": sub,
            "aud": audience,
            "exp": expires_at,
            "iat": now,
            "jti": jti,
            **extra,
        }
        if typ == ACCESS_TOKEN_TYP and self._at_es is not None:
            token = self._at_es.sign(claims)
        else:
            token = sign_jws({**self._header, "typ": typ}, claims, self._key)
        return IssuedJwt(token, jti, now, expires_at)

    @property
    def worker_name(self) -> str:
        """What signing workers (server.ca.workers) know this key by."""
        return self._worker_name

    def worker_copy(self) -> tuple[str, bytes, int, str | None]:
        """(kid, PKCS#8 DER key, not_after, issuer): what a signing worker process needs to
        sign as this signer does. Goes down the worker's private socket only; never logged or
        stored."""
        der = self._key.private_bytes(Encoding.DER, PrivateFormat.PKCS8, NoEncryption())
        return self._kid, der, self._not_after, self._issuer


def check_jwt_request(
    spiffe_id: SpiffeId, audience: Sequence[str], ttl: int
) -> tuple[str, list[str]]:
    """The checks JwtSigner.sign makes on a request: (the ID as text, the audiences as a list)."""
    if not isinstance(spiffe_id, SpiffeId):
        raise SigningRequestError(f"spiffe_id must be a SpiffeId, got {type(spiffe_id).__name__}")
    if not spiffe_id.path:
        raise SigningRequestError(f"{spiffe_id} has no path: JWT-SVIDs need one")
    if isinstance(audience, str):
        raise SigningRequestError("audience must be a sequence of strings, not one string")
    audiences = list(audience)
    if not audiences or any(not isinstance(a, str) or not a for a in audiences):
        raise SigningRequestError("audience must hold at least one non-empty string")
    if ttl <= 0:
        raise SigningRequestError(f"ttl must be positive, got {ttl}")
    return str(spiffe_id), audiences


# What sign_jws encodes JSON with: json.dumps(obj, separators=(",", ":")), one encoder for all.
_JWS_JSON = json.JSONEncoder(separators=(",", ":"))
# The string encoder that one uses (ensure_ascii is on by default).
_json_str = encode_basestring_ascii
_ES_SIZES = {"ES256": 32, "ES384": 48, "ES512": 66}
_ES_HASHES: dict[str, hashes.HashAlgorithm] = {
    "ES256": hashes.SHA256(),
    "ES384": hashes.SHA384(),
    "ES512": hashes.SHA512(),
}


def _claims_json(
    sub: str, aud: str | list[str], exp: int, iat: int, jti: str, *, iss: str | None = None
) -> str:
    """_JWS_JSON.encode({"iss": iss, "sub": sub, "aud": aud, "exp": exp, "iat": iat,
    "jti": jti}) (no "iss" when it is None) for str and int values (a list of str for aud),
    written out: the generic encoder costs 3x more."""
    aud_json = _json_str(aud) if isinstance(aud, str) else "[" + ",".join(map(_json_str, aud)) + "]"
    head = "{" if iss is None else f'{{"iss":{_json_str(iss)},'
    return (
        f'{head}"sub":{_json_str(sub)},"aud":{aud_json},"exp":{int(exp)!r},"iat":{int(iat)!r},'
        f'"jti":{_json_str(jti)}}}'
    )


class _EsSigner:
    """sign_jws for one EC key and header, with the per-token work cut to what varies.

    sign_jws re-checks the alg against the key, re-encodes the header and builds its hash and
    ECDSA objects for every token; here the header segment is encoded and the checks made
    once. `checked` builds one only if its signing input equals sign_jws's for a sample, so
    tokens are byte for byte what sign_jws would make (up to ECDSA's random signature).
    """

    def __init__(
        self, key: ec.EllipticCurvePrivateKey, header: Mapping[str, Any], iss: str | None = None
    ) -> None:
        alg = str(header["alg"])
        self._key = key
        self._iss = iss
        self._size = _ES_SIZES[alg]
        self._ecdsa = ec.ECDSA(_ES_HASHES[alg])
        self._header_segment = b64url_bytes(_JWS_JSON.encode(dict(header)).encode()) + b"."

    @classmethod
    def checked(
        cls, key: PrivateKey, header: Mapping[str, Any], iss: str | None = None
    ) -> _EsSigner | None:
        alg = header.get("alg")
        if not isinstance(key, ec.EllipticCurvePrivateKey) or alg not in _ES_SIZES:
            return None
        if alg_for_key(key) != alg:  # sign_raw refuses a key on another curve: so do we
            return None
        signer = cls(key, header, iss)
        sample: dict[str, Any] = {
            **({"iss": iss} if iss is not None else {}),
            "sub": "spiffe://example.org/x",
            "aud": ["a", 'é\\"\n'],
            "exp": 2,
            "iat": 1,
            "jti": "j",
        }
        reference = sign_jws(header, sample, key).rsplit(".", 1)[0].encode("ascii")
        plain = signer._header_segment + b64url_bytes(_claims_json(**sample).encode("ascii"))
        if signer.signing_input(sample) != reference or plain != reference:
            _log.warning("fast JWT signing differs from sign_jws; using sign_jws")
            return None
        return signer

    def signing_input(self, claims: Mapping[str, Any]) -> bytes:
        return self._header_segment + b64url_bytes(_JWS_JSON.encode(claims).encode())

    def sign(self, claims: Mapping[str, Any]) -> str:
        return self._finish(self.signing_input(claims))

    def sign_plain(self, sub: str, aud: str | list[str], exp: int, iat: int, jti: str) -> str:
        """sign() of the claims a workload JWT-SVID has, with no extra claims."""
        # ensure_ascii: the JSON is ASCII, so encode() copies rather than transcodes.
        payload = _claims_json(sub, aud, exp, iat, jti, iss=self._iss).encode("ascii")
        return self._finish(self._header_segment + b64url_bytes(payload))

    def _finish(self, signing_input: bytes) -> str:
        signature = ecdsa_der_to_raw(self._key.sign(signing_input, self._ecdsa), self._size)
        return (signing_input + b"." + b64url_bytes(signature)).decode("ascii")
