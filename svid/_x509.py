"""X.509-SVIDs: the SPIFFE profile rules for leaves and signing certs, and the SVID value type."""

from __future__ import annotations

import functools
from dataclasses import dataclass

from cryptography import x509
from cryptography.exceptions import UnsupportedAlgorithm
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec, padding, rsa
from cryptography.x509.oid import ExtendedKeyUsageOID

from svid import _cert_der as der
from svid._der import certs_to_pem, der_concat, load_pem_certs, parse_der_certs
from svid._errors import SpiffeIdError, SvidParseError, X509SvidError
from svid._spiffe_id import SpiffeId
from svid._verified_memo import VerifiedMemo

__all__ = [
    "X509Svid",
    "certs_to_pem",
    "check_leaf_facts",
    "check_leaf_profile",
    "check_signing_profile",
    "der_concat",
    "leaf_facts_verified",
    "load_pem_certs",
    "parse_der_certs",
    "spiffe_id_from_cert",
]

SvidPrivateKey = ec.EllipticCurvePrivateKey | rsa.RSAPrivateKey
_SHA2 = (hashes.SHA256, hashes.SHA384, hashes.SHA512)


def signature_hash_problem(hash_alg: hashes.HashAlgorithm, parameters: object) -> str | None:
    """Why a signature hashed with ``hash_alg`` and padded as ``parameters`` (a certificate's
    or CRL's ``signature_hash_algorithm`` and ``signature_algorithm_parameters``) is refused,
    or None: phrased to follow "is", e.g. "signed with sha1: ...".

    SHA-1 or MD5 would let a collision forge what is signed, so only SHA-2 is accepted. An
    RSA-PSS signature names a second hash, its MGF1's: it must be the signature's own hash, as
    RFC 4055 recommends and Go's and BoringSSL's verifiers require, not any one it chose.
    """
    if not isinstance(hash_alg, _SHA2):
        return f"signed with {hash_alg.name}: only SHA-256, SHA-384 and SHA-512 are accepted"
    if isinstance(parameters, padding.PSS) and parameters.mgf != padding.MGF1(hash_alg):
        # MGF1 has no public accessor for its hash, only equality: the name is for the message.
        mgf_hash = getattr(getattr(parameters.mgf, "_algorithm", None), "name", "another hash")
        return (
            f"signed with RSA-PSS whose MGF1 uses {mgf_hash}: only MGF1 with the signature's "
            f"own hash ({hash_alg.name}) is accepted"
        )
    return None


def _serial(cert: x509.Certificate) -> str:
    return format(cert.serial_number, "x")


def extensions_of(cert: x509.Certificate) -> x509.Extensions:
    """The certificate's extensions; a malformed or duplicated one is an X509SvidError."""
    try:
        return cert.extensions
    except (ValueError, x509.DuplicateExtension, x509.UnsupportedGeneralNameType) as exc:
        raise X509SvidError(
            f"certificate serial {_serial(cert)} has malformed extensions: {exc}"
        ) from None


def _uri_sans(
    cert: x509.Certificate,
) -> tuple[list[str], x509.Extension[x509.SubjectAlternativeName] | None]:
    try:
        ext = extensions_of(cert).get_extension_for_class(x509.SubjectAlternativeName)
    except x509.ExtensionNotFound:
        return [], None
    return ext.value.get_values_for_type(x509.UniformResourceIdentifier), ext


# Parsing the same few IDs over and over is the common case for a verifier; the parse is pure.
_parse_id = functools.lru_cache(maxsize=4096)(SpiffeId.parse)


def _id_from_uris(uris: list[str], cert: x509.Certificate) -> SpiffeId:
    if len(uris) != 1:
        raise X509SvidError(
            f"certificate serial {_serial(cert)} must have exactly one URI SAN, has {len(uris)}"
        )
    try:
        return _parse_id(uris[0])
    except SpiffeIdError as exc:
        raise X509SvidError(
            f"certificate serial {_serial(cert)} URI SAN is not a SPIFFE ID: {exc}"
        ) from None


def spiffe_id_from_cert(cert: x509.Certificate) -> SpiffeId:
    """The SPIFFE ID in the certificate's only URI SAN."""
    return _id_from_uris(_uri_sans(cert)[0], cert)


def _basic_constraints(cert: x509.Certificate) -> x509.BasicConstraints | None:
    try:
        return extensions_of(cert).get_extension_for_class(x509.BasicConstraints).value
    except x509.ExtensionNotFound:
        return None


def _key_usage(cert: x509.Certificate, what: str) -> x509.KeyUsage:
    try:
        ext = extensions_of(cert).get_extension_for_class(x509.KeyUsage)
    except x509.ExtensionNotFound:
        raise X509SvidError(f"{what} serial {_serial(cert)} has no key usage extension") from None
    if not ext.critical:
        raise X509SvidError(f"{what} serial {_serial(cert)} key usage extension is not critical")
    return ext.value


def check_leaf_profile(cert: x509.Certificate) -> SpiffeId:
    """Apply every leaf rule of the X.509-SVID standard; returns the SPIFFE ID."""
    # One pass over the extensions: this runs on every uncached verification.
    san = bc = ku = eku = None
    for ext in extensions_of(cert):
        value = ext.value
        # Exact type checks: isinstance against cryptography's ABCs costs more than the rest.
        kind = type(value)
        if kind is x509.SubjectAlternativeName:
            san = ext
        elif kind is x509.BasicConstraints:
            bc = value
        elif kind is x509.KeyUsage:
            ku = ext
        elif kind is x509.ExtendedKeyUsage:
            eku = value
    uris = [] if san is None else san.value.get_values_for_type(x509.UniformResourceIdentifier)
    sid = _id_from_uris(uris, cert)
    if not sid.path:
        raise X509SvidError(f"leaf serial {_serial(cert)} SPIFFE ID {sid} has no path (root ID)")
    if bc is None:
        raise X509SvidError(f"leaf serial {_serial(cert)} has no basic constraints extension")
    if bc.ca:
        raise X509SvidError(f"leaf serial {_serial(cert)} has cA=true")
    if ku is None:
        raise X509SvidError(f"leaf serial {_serial(cert)} has no key usage extension")
    if not ku.critical:
        raise X509SvidError(f"leaf serial {_serial(cert)} key usage extension is not critical")
    usage: x509.KeyUsage = ku.value
    if not usage.digital_signature:
        raise X509SvidError(f"leaf serial {_serial(cert)} key usage lacks digitalSignature")
    if usage.key_cert_sign:
        raise X509SvidError(f"leaf serial {_serial(cert)} key usage has keyCertSign")
    if usage.crl_sign:
        raise X509SvidError(f"leaf serial {_serial(cert)} key usage has cRLSign")
    if eku is not None and not (
        ExtendedKeyUsageOID.SERVER_AUTH in eku and ExtendedKeyUsageOID.CLIENT_AUTH in eku
    ):
        raise X509SvidError(
            f"leaf serial {_serial(cert)} extended key usage lacks serverAuth and/or clientAuth"
        )
    if san is not None and not san.critical and len(cert.subject) == 0:
        raise X509SvidError(
            f"leaf serial {_serial(cert)} has an empty subject but a non-critical SAN extension"
        )
    return sid


def check_leaf_facts(facts: der.CertFacts, cert: x509.Certificate | None = None) -> SpiffeId:
    """``check_leaf_profile`` on a certificate's raw DER facts: the same rules, read directly.

    The verifier's uncached path uses this; cryptography's extension objects cost more than the
    rest of the check. Malformed extension values are X509SvidErrors, as there. With ``cert``
    (the same certificate), anything this reader does not check completely (other extensions,
    non-URI SANs) is checked by cryptography as well, so the result is never more lenient.
    """
    exts = facts.extensions
    if cert is not None and (not exts.keys() <= der.FULLY_READ or not der.key_identifiers_ok(exts)):
        extensions_of(cert)  # raises X509SvidError for anything malformed
    key = _leaf_key(facts)
    known = _LEAF_RULES.get(key)
    if known is not None:
        return known
    try:
        return _leaf_rules(*key)
    except X509SvidError as exc:
        raise X509SvidError(f"leaf serial {facts.serial:x} {exc}") from None
    except der.NonUriSanError:
        if cert is None:
            raise X509SvidError(
                f"leaf serial {facts.serial:x} has non-URI SANs; pass the certificate"
            ) from None
        return check_leaf_profile(cert)


_LeafKey = tuple[
    der.Extension | None, der.Extension | None, der.Extension | None, der.Extension | None, bool
]
# _leaf_rules is a pure function of the extension bytes, which every SVID of one workload shares
# (keys and serials differ, these don't): memoized. It runs before any signature is checked (the
# SPIFFE ID names the bundle), so the memo takes only leaves of chains a verifier accepted
# (leaf_facts_verified): self-made leaves, each unique, evicted the honest ones otherwise.
_LEAF_RULES: VerifiedMemo[_LeafKey, SpiffeId] = VerifiedMemo(1024)


def _leaf_key(facts: der.CertFacts) -> _LeafKey:
    exts = facts.extensions
    return (
        exts.get(der.OID_SAN),
        exts.get(der.OID_BASIC_CONSTRAINTS),
        exts.get(der.OID_KEY_USAGE),
        exts.get(der.OID_EXT_KEY_USAGE),
        facts.subject == der.EMPTY_NAME,
    )


def leaf_facts_verified(facts: der.CertFacts) -> None:
    """Memoize ``check_leaf_facts`` for the leaf of a chain a verifier accepted."""
    key = _leaf_key(facts)
    if key in _LEAF_RULES:
        return
    try:
        sid = _leaf_rules(*key)
    except (X509SvidError, der.NonUriSanError):  # judged with the certificate: not memoized
        return
    _LEAF_RULES.remember(key, sid)


def _leaf_rules(
    san: der.Extension | None,
    bc: der.Extension | None,
    ku: der.Extension | None,
    eku: der.Extension | None,
    empty_subject: bool,
) -> SpiffeId:
    try:
        uris = der.san_uris(san.value) if san is not None else []
        if len(uris) != 1:
            raise X509SvidError(f"must have exactly one URI SAN, has {len(uris)}")
        try:
            sid = _parse_id(uris[0])
        except SpiffeIdError as exc:
            raise X509SvidError(f"URI SAN is not a SPIFFE ID: {exc}") from None
        if not sid.path:
            raise X509SvidError(f"SPIFFE ID {sid} has no path (root ID)")
        if bc is None:
            raise X509SvidError("has no basic constraints extension")
        if der.basic_constraints(bc.value)[0]:
            raise X509SvidError("has cA=true")
        if ku is None:
            raise X509SvidError("has no key usage extension")
        if not ku.critical:
            raise X509SvidError("key usage extension is not critical")
        bits = der.key_usage_bits(ku.value)
        if not bits & der.DIGITAL_SIGNATURE:
            raise X509SvidError("key usage lacks digitalSignature")
        if bits & der.KEY_CERT_SIGN:
            raise X509SvidError("key usage has keyCertSign")
        if bits & der.CRL_SIGN:
            raise X509SvidError("key usage has cRLSign")
        if eku is not None:
            purposes = der.ext_key_usages(eku.value)
            if der.OID_SERVER_AUTH not in purposes or der.OID_CLIENT_AUTH not in purposes:
                raise X509SvidError("extended key usage lacks serverAuth and/or clientAuth")
    except der.NonUriSanError:
        raise
    except SvidParseError as exc:
        raise X509SvidError(f"has malformed extensions: {exc}") from None
    if san is not None and not san.critical and empty_subject:
        raise X509SvidError("has an empty subject but a non-critical SAN extension")
    return sid


def check_signing_profile(cert: x509.Certificate) -> None:
    """Apply the signing-certificate rules: cA, critical keyCertSign, a path-less SPIFFE ID."""
    serial = _serial(cert)
    bc = _basic_constraints(cert)
    if bc is None or not bc.ca:
        raise X509SvidError(f"signing certificate serial {serial} does not have cA=true")
    ku = _key_usage(cert, "signing certificate")
    if not ku.key_cert_sign:
        raise X509SvidError(f"signing certificate serial {serial} key usage lacks keyCertSign")
    uris, _ = _uri_sans(cert)
    for uri in uris:
        if not uri.startswith("spiffe://"):
            continue
        try:
            sid = _parse_id(uri)
        except SpiffeIdError as exc:
            raise X509SvidError(
                f"signing certificate serial {serial} URI SAN is not a SPIFFE ID: {exc}"
            ) from None
        if sid.path:
            raise X509SvidError(
                f"signing certificate serial {serial} SPIFFE ID {sid} has a path; "
                "signing certificates carry only a trust domain ID"
            )


def _spki(key: ec.EllipticCurvePublicKey | rsa.RSAPublicKey | object) -> bytes:
    if not isinstance(key, ec.EllipticCurvePublicKey | rsa.RSAPublicKey):
        raise X509SvidError(f"unsupported public key type {type(key).__name__} (EC or RSA only)")
    return key.public_bytes(
        serialization.Encoding.DER, serialization.PublicFormat.SubjectPublicKeyInfo
    )


@dataclass(frozen=True)
class X509Svid:
    """An X.509-SVID with its private key: chain is leaf first, then intermediates."""

    spiffe_id: SpiffeId
    cert_chain: tuple[x509.Certificate, ...]
    private_key: SvidPrivateKey
    hint: str = ""

    def __post_init__(self) -> None:
        if not self.cert_chain:
            raise X509SvidError("an X.509-SVID needs at least one certificate")

    def __repr__(self) -> str:
        # The private key never reaches a log line.
        return (
            f"X509Svid(spiffe_id={self.spiffe_id}, serial={_serial(self.leaf)}, hint={self.hint!r})"
        )

    @classmethod
    def _build(cls, certs: list[x509.Certificate], key: object, hint: str) -> X509Svid:
        if not isinstance(key, ec.EllipticCurvePrivateKey | rsa.RSAPrivateKey):
            raise X509SvidError(
                f"unsupported private key type {type(key).__name__} (EC or RSA only)"
            )
        leaf = certs[0]
        sid = check_leaf_profile(leaf)
        for signer in certs[1:]:
            check_signing_profile(signer)
        try:
            leaf_key = leaf.public_key()
        except (ValueError, UnsupportedAlgorithm) as exc:
            raise X509SvidError(
                f"leaf serial {_serial(leaf)} has an unreadable public key: {exc}"
            ) from None
        if _spki(key.public_key()) != _spki(leaf_key):
            raise X509SvidError(
                f"private key does not match the public key of leaf serial {_serial(leaf)}"
            )
        return cls(sid, tuple(certs), key, hint)

    @classmethod
    def parse(cls, chain_der: bytes, key_der: bytes, hint: str = "") -> X509Svid:
        """From concatenated DER certs and an unencrypted PKCS#8 DER key (the Workload API form)."""
        certs = parse_der_certs(chain_der)
        try:
            key = serialization.load_der_private_key(key_der, password=None)
        except (ValueError, TypeError, UnsupportedAlgorithm) as exc:
            raise SvidParseError(f"private key is not unencrypted PKCS#8 DER: {exc}") from None
        return cls._build(certs, key, hint)

    @classmethod
    def load_pem(cls, chain_pem: bytes, key_pem: bytes, hint: str = "") -> X509Svid:
        certs = load_pem_certs(chain_pem)
        try:
            key = serialization.load_pem_private_key(key_pem, password=None)
        except (ValueError, TypeError, UnsupportedAlgorithm) as exc:
            raise SvidParseError(f"private key is not an unencrypted PEM key: {exc}") from None
        return cls._build(certs, key, hint)

    @property
    def leaf(self) -> x509.Certificate:
        return self.cert_chain[0]

    @property
    def expires_at(self) -> float:
        return self.leaf.not_valid_after_utc.timestamp()

    @property
    def issued_at(self) -> float:
        return self.leaf.not_valid_before_utc.timestamp()

    def chain_der(self) -> bytes:
        return der_concat(self.cert_chain)

    def chain_pem(self) -> bytes:
        return certs_to_pem(self.cert_chain)

    def key_der(self) -> bytes:
        return self.private_key.private_bytes(
            serialization.Encoding.DER,
            serialization.PrivateFormat.PKCS8,
            serialization.NoEncryption(),
        )

    def key_pem(self) -> bytes:
        return self.private_key.private_bytes(
            serialization.Encoding.PEM,
            serialization.PrivateFormat.PKCS8,
            serialization.NoEncryption(),
        )
