"""X.509-SVID verification: path validation against the leaf's own trust domain, SPIFFE leaf rules,
validity times from an injectable clock, revocation by issuer and serial, and a result cache.

Path validation is done here rather than by a general-purpose verifier because SPIFFE needs what
those don't offer cheaply: the anchor set chosen per trust domain, URI-SAN identities, and a cost
close to one signature check. It covers what SPIFFE chains use (RFC 5280 §6 basics: issuer/subject
chaining, signatures, validity, cA, keyCertSign, pathLenConstraint, critical extensions); a name-
constrained CA is refused rather than half-supported.

The leaf is read from its own DER by a strict reader (svid._cert_der): TBS slice, names, times and
the profile extensions, without cryptography's per-extension objects or TBS re-encoding, which cost
about a quarter of a signature check. cryptography loads every certificate too, and reads the
extensions itself whenever the leaf has one the DER reader does not check completely.

The uncached path has to stay close to one signature check, and after one (its tables evict the
interpreter's working set from the CPU caches) every Python step costs several times its usual
price. So a verified leaf leaves a template behind (svid._cert_der.LeafTemplate): later leaves of
the same workload and CA match it with a few byte comparisons, which stand for the DER walk, the
profile and critical-extension checks (their bytes are the template's) and cryptography's load
(see _LazyChain). Signature, times and revocation are checked for every leaf, as ever.
"""

from __future__ import annotations

import hashlib
import ssl
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass
from typing import Any, NamedTuple

from cryptography import x509
from cryptography.exceptions import InvalidSignature, UnsupportedAlgorithm
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec, padding, rsa
from cryptography.hazmat.primitives.asymmetric.utils import Prehashed
from cryptography.x509.oid import ExtensionOID

from svid import _cert_der as der
from svid._bundle import X509Bundle
from svid._cache import LruCache
from svid._clock import Clock, SystemClock
from svid._der import tbs_names
from svid._errors import (
    ExpiredError,
    RevokedError,
    SvidError,
    SvidParseError,
    VerificationError,
    X509SvidError,
)
from svid._jose import ec_key_problem, rsa_key_problem
from svid._revocation import (
    CertKey,
    RevocationSet,
    check_max_staleness,
    crl_fresh_for,
    refuse_if_stale,
    refuse_if_stale_crl,
)
from svid._spiffe_id import SpiffeId, TrustDomain
from svid._ssl_peer import peer_chain_der
from svid._x509 import (
    check_leaf_facts,
    check_signing_profile,
    extensions_of,
    leaf_facts_verified,
    signature_hash_problem,
)

X509BundleGetter = Callable[[TrustDomain], X509Bundle | None]

DEFAULT_CACHE_SIZE = 10_000
DEFAULT_MAX_CHAIN_DEPTH = 8

_UNDERSTOOD_CRITICAL = frozenset(
    {
        ExtensionOID.BASIC_CONSTRAINTS,
        ExtensionOID.KEY_USAGE,
        ExtensionOID.EXTENDED_KEY_USAGE,
        ExtensionOID.SUBJECT_ALTERNATIVE_NAME,
        ExtensionOID.SUBJECT_KEY_IDENTIFIER,
        ExtensionOID.AUTHORITY_KEY_IDENTIFIER,
    }
)

_UNDERSTOOD_CRITICAL_DER = frozenset(
    {
        der.OID_BASIC_CONSTRAINTS,
        der.OID_KEY_USAGE,
        der.OID_EXT_KEY_USAGE,
        der.OID_SAN,
        der.OID_SUBJECT_KEY_ID,
        der.OID_AUTHORITY_KEY_ID,
    }
)
_ECDSA_OID = b"\x06\x08\x2a\x86\x48\xce\x3d\x04\x03"
_RSA_OID = b"\x06\x09\x2a\x86\x48\x86\xf7\x0d\x01\x01"
# Signature AlgorithmIdentifiers (full DER) read without cryptography's help; anything else
# (RSA-PSS, unusual encodings) takes the slower path through the Certificate object.
_EC_SIGS: dict[bytes, ec.ECDSA] = {
    b"\x30\x0a" + _ECDSA_OID + b"\x02": ec.ECDSA(hashes.SHA256()),
    b"\x30\x0a" + _ECDSA_OID + b"\x03": ec.ECDSA(hashes.SHA384()),
    b"\x30\x0a" + _ECDSA_OID + b"\x04": ec.ECDSA(hashes.SHA512()),
}
# The same ECDSA algorithms with the digest made by hashlib (Prehashed): cryptography would build
# a hash object per call, which costs a few percent of the verification.
_EC_SIGS_PREHASHED: dict[bytes, tuple[Callable[[bytes], Any], ec.ECDSA]] = {
    b"\x30\x0a" + _ECDSA_OID + b"\x02": (hashlib.sha256, ec.ECDSA(Prehashed(hashes.SHA256()))),
    b"\x30\x0a" + _ECDSA_OID + b"\x03": (hashlib.sha384, ec.ECDSA(Prehashed(hashes.SHA384()))),
    b"\x30\x0a" + _ECDSA_OID + b"\x04": (hashlib.sha512, ec.ECDSA(Prehashed(hashes.SHA512()))),
}
_RSA_SIGS: dict[bytes, hashes.HashAlgorithm] = {
    b"\x30\x0d" + _RSA_OID + b"\x0b\x05\x00": hashes.SHA256(),
    b"\x30\x0d" + _RSA_OID + b"\x0c\x05\x00": hashes.SHA384(),
    b"\x30\x0d" + _RSA_OID + b"\x0d\x05\x00": hashes.SHA512(),
}
_PKCS1 = padding.PKCS1v15()
# rsaEncryption as a full DER OID: in a leaf's TBS (almost always) only as its key's algorithm.
# id-ecPublicKey, as DER; it starts the SubjectPublicKeyInfo's algorithm, within its first
# bytes (two SEQUENCE headers of at most 4 bytes each before the OID's 9).
_EC_KEY_OID = b"\x06\x07\x2a\x86\x48\xce\x3d\x02\x01"
_SPKI_ALGORITHM_BYTES = 17
# What cryptography raises reading a certificate it cannot make sense of (DuplicateExtension
# and UnsupportedGeneralNameType are no ValueError): each is a malformed chain to a verifier.
_MALFORMED = (
    ValueError,
    UnsupportedAlgorithm,
    x509.DuplicateExtension,
    x509.UnsupportedGeneralNameType,
)
# Bounds on remembered leaf templates: keys (TBS length and serial length) and templates per key.
_MAX_TEMPLATE_KEYS = 256
_TEMPLATES_PER_KEY = 4
# The result cache is keyed by the chain as sent, and a peer may send certificates beyond its path
# (verification ignores them): a valid leaf followed by ~100 KB of its own junk certificates, new
# junk each handshake, made every entry hold that much, up to a gigabyte for a full cache. Past
# this size (a few times an SVID chain: leaf and intermediate are ~1.5 KB) the key is a digest:
# hashing costs less than a signature check, and a full cache (10,000) holds 80 MB of keys at most.
MAX_CACHE_KEY_BYTES = 8 * 1024


def _digest_key(chain_der: bytes) -> bytes:
    """The cache key of a chain longer than MAX_CACHE_KEY_BYTES: its SHA-256, behind a 0x00 that
    no DER chain (a SEQUENCE, 0x30) starts with, so it never equals a chain's own bytes."""
    return b"\0" + hashlib.sha256(chain_der).digest()


def _cache_key(chain_der: bytes) -> bytes:
    """The result cache's key for `chain_der`, looked up before anything is parsed: the bytes
    themselves, or their digest when long or when they start with 0x00. Bytes given as a chain
    need not be one: 0x00 and a long chain's SHA-256 (33 bytes anyone who saw that chain can
    compute) was that chain's cached answer, a VerifiedX509 for bytes that hold no certificate."""
    if len(chain_der) > MAX_CACHE_KEY_BYTES or chain_der[:1] == b"\0":
        return _digest_key(chain_der)
    return chain_der


@dataclass(frozen=True, slots=True)
class VerifiedX509:
    """The outcome of a successful X.509-SVID verification."""

    spiffe_id: SpiffeId
    chain: tuple[x509.Certificate, ...]
    serial: str
    expires_at: float


class _ChainDer(NamedTuple):
    """What a VerifiedX509's ``chain`` slot holds until first read: the certificates' DER."""

    ders: tuple[bytes, ...]


class _LazyChain:
    """``VerifiedX509.chain``: loads the certificates on first read when the slot holds their DER.

    A leaf verified through a template (svid._cert_der) is not loaded by cryptography on the hot
    path: it matches, outside the contents match_leaf checks itself, the bytes of a leaf that
    cryptography did load, so loading it cannot fail (tests/svid prove it over mutated leaves).
    Most callers never read ``chain``; those who do pay for the load then, once.
    """

    __slots__ = ("_slot",)

    def __init__(self, slot: Any) -> None:
        self._slot = slot  # the dataclass's own slot descriptor

    def __get__(self, obj: object, owner: type | None = None) -> Any:
        if obj is None:
            return self
        value = self._slot.__get__(obj, owner)
        if type(value) is _ChainDer:
            value = tuple(x509.load_der_x509_certificate(d) for d in value.ders)
            self._slot.__set__(obj, value)
        return value

    def __set__(self, obj: object, value: object) -> None:
        self._slot.__set__(obj, value)

    def __delete__(self, obj: object) -> None:
        self._slot.__delete__(obj)


# The slots' own setters, for _verified_x509.
_SET_SPIFFE_ID, _SET_CHAIN, _SET_SERIAL, _SET_EXPIRES_AT = (
    VerifiedX509.__dict__[name].__set__ for name in ("spiffe_id", "chain", "serial", "expires_at")
)
VerifiedX509.chain = _LazyChain(VerifiedX509.__dict__["chain"])  # type: ignore[assignment,misc]
_new_object = object.__new__


def _verified_x509(
    sid: SpiffeId, chain: tuple[x509.Certificate, ...] | _ChainDer, serial: str, expires_at: float
) -> VerifiedX509:
    """``VerifiedX509(...)`` without the generated __init__, which costs more than this on the
    uncached path; ``chain`` may be a _ChainDer. Tests compare the two."""
    result: VerifiedX509 = _new_object(VerifiedX509)
    _SET_SPIFFE_ID(result, sid)
    _SET_CHAIN(result, chain)
    _SET_SERIAL(result, serial)
    _SET_EXPIRES_AT(result, expires_at)
    return result


@dataclass(frozen=True, slots=True)
class _Anchor:
    cert: x509.Certificate
    public_key: ec.EllipticCurvePublicKey | rsa.RSAPublicKey
    not_before: float
    not_after: float
    path_length: int | None
    ec_key: ec.EllipticCurvePublicKey | None  # public_key if EC: isinstance on the ABCs costs


class _Entry(NamedTuple):
    result: VerifiedX509
    trust_domain: TrustDomain
    bundle: X509Bundle
    not_before: float
    not_after: float
    keys: tuple[CertKey, ...]  # what revokes the path: each certificate's issuer and serial


# _Entry's fields as a plain tuple: verifications build the _Entry only when they are cached.
_EntryFields = tuple[VerifiedX509, TrustDomain, X509Bundle, float, float, tuple[CertKey, ...]]


def _serial(cert: x509.Certificate) -> str:
    return format(cert.serial_number, "x")


def _times(cert: x509.Certificate) -> tuple[float, float]:
    return cert.not_valid_before_utc.timestamp(), cert.not_valid_after_utc.timestamp()


def _check_critical(cert: x509.Certificate, what: str, is_ca: bool) -> None:
    for ext in cert.extensions:
        if is_ca and type(ext.value) is x509.NameConstraints:
            raise VerificationError(
                f"{what} serial {_serial(cert)} has name constraints, which are not supported"
            )
        if ext.critical and ext.oid not in _UNDERSTOOD_CRITICAL:
            raise VerificationError(
                f"{what} serial {_serial(cert)} has an unsupported critical extension "
                f"{ext.oid.dotted_string}"
            )


def _signature_ok(cert: x509.Certificate, tbs: bytes, key: object) -> bool:
    # The algorithms read from the DER alone (_EC_SIGS, _RSA_SIGS) hash with SHA-2; this path
    # takes the rest (RSA-PSS, unusual encodings), which name any hash (and RSA-PSS a second
    # one, its MGF1's): signature_hash_problem holds them to SHA-2 here too.
    hash_alg = cert.signature_hash_algorithm
    if hash_alg is None:
        return False  # EdDSA: neither an EC nor an RSA key (the only ones anchored) signs it
    params = cert.signature_algorithm_parameters
    problem = signature_hash_problem(hash_alg, params)
    if problem is not None:
        raise VerificationError(f"certificate serial {_serial(cert)} is {problem}")
    try:
        if isinstance(key, ec.EllipticCurvePublicKey):
            if not isinstance(params, ec.ECDSA):
                return False
            key.verify(cert.signature, tbs, params)
            return True
        if isinstance(key, rsa.RSAPublicKey):
            if not isinstance(params, padding.PKCS1v15 | padding.PSS):
                return False
            key.verify(cert.signature, tbs, params, hash_alg)
            return True
    except InvalidSignature:
        return False
    return False


def _facts_signature_ok(cert: x509.Certificate | None, facts: der.CertFacts, key: object) -> bool:
    """Is ``facts`` (the DER of ``cert``) signed by ``key``? ``cert`` is read only for algorithms
    outside _EC_SIGS and _RSA_SIGS (so it may be None for those)."""
    algorithm = facts.signature_algorithm
    ecdsa = _EC_SIGS.get(algorithm)
    try:
        if ecdsa is not None:
            if not isinstance(key, ec.EllipticCurvePublicKey):
                return False
            key.verify(facts.signature, facts.tbs, ecdsa)
            return True
        hash_alg = _RSA_SIGS.get(algorithm)
        if hash_alg is not None:
            if not isinstance(key, rsa.RSAPublicKey):
                return False
            key.verify(facts.signature, facts.tbs, _PKCS1, hash_alg)
            return True
    except InvalidSignature:
        return False
    if cert is None:
        raise ValueError("an unusual signature algorithm needs the certificate")  # not reached
    return _signature_ok(cert, facts.tbs, key)


def _leaf_key_problem(facts: der.CertFacts) -> str | None:
    """Why the leaf's key is refused, or None: an RSA key outside rsa_key_problem's bounds (a
    1024-bit one proves little of the identity). Its key is decoded only when its
    SubjectPublicKeyInfo's algorithm is not id-ecPublicKey, so EC leaves cost one short
    search (an RSA key may be labelled rsaEncryption or id-RSASSA-PSS); and from that alone,
    which costs a fraction of loading the certificate (the template path loads none)."""
    if _EC_KEY_OID in facts.spki[:_SPKI_ALGORITHM_BYTES]:
        return None
    key = serialization.load_der_public_key(facts.spki)
    return rsa_key_problem(key) if isinstance(key, rsa.RSAPublicKey) else None


def _check_critical_facts(facts: der.CertFacts) -> None:
    for oid, ext in facts.extensions.items():
        if ext.critical and oid not in _UNDERSTOOD_CRITICAL_DER:
            raise VerificationError(
                f"leaf serial {facts.serial:x} has an unsupported critical extension {_dotted(oid)}"
            )


def _dotted(oid: bytes) -> str:
    """Dotted form of a DER OID body, for messages."""
    arcs: list[int] = []
    value = 0
    for byte in oid:
        value = (value << 7) | (byte & 0x7F)
        if not byte & 0x80:
            arcs.append(value)
            value = 0
    if not arcs:
        return oid.hex()
    first = min(arcs[0] // 40, 2)
    return ".".join(str(a) for a in [first, arcs[0] - 40 * first, *arcs[1:]])


def _make_anchor(cert: x509.Certificate) -> _Anchor | None:
    """An authority usable as a trust anchor, or None if it cannot sign (then it's skipped)."""
    try:
        return _anchor_or_none(cert)
    except (ValueError, UnsupportedAlgorithm, X509SvidError):
        return None  # a malformed authority (X509SvidError: its extensions) anchors nothing


def _anchor_or_none(cert: x509.Certificate) -> _Anchor | None:
    key = cert.public_key()
    if not isinstance(key, ec.EllipticCurvePublicKey | rsa.RSAPublicKey):
        return None
    if isinstance(key, rsa.RSAPublicKey) and rsa_key_problem(key) is not None:
        return None  # every check against it would cost too much (see MAX_RSA_BITS); the
        # bundle parsers refuse such an authority, a bundle built by hand just anchors nothing
    path_length = None
    # Through extensions_of: cryptography raises more than ValueError for extensions it cannot
    # read (an ediPartyName in a SAN: UnsupportedGeneralNameType), and a bundle authority is
    # chosen by whoever serves the bundle.
    extensions = extensions_of(cert)
    try:
        bc = extensions.get_extension_for_class(x509.BasicConstraints).value
        if not bc.ca:
            return None
        path_length = bc.path_length
    except x509.ExtensionNotFound:
        pass
    try:
        ku = extensions.get_extension_for_class(x509.KeyUsage).value
        if not ku.key_cert_sign:
            return None
    except x509.ExtensionNotFound:
        pass
    try:
        extensions.get_extension_for_class(x509.NameConstraints)
        return None  # name constraints are not supported: such a CA anchors nothing
    except x509.ExtensionNotFound:
        pass
    nb, na = _times(cert)
    ec_key = key if isinstance(key, ec.EllipticCurvePublicKey) else None
    return _Anchor(cert, key, nb, na, path_length, ec_key)


class _AnchorIndex:
    """A bundle's authorities by subject name, with their keys decoded once."""

    __slots__ = ("by_subject",)

    def __init__(self, bundle: X509Bundle) -> None:
        # Keyed by the subject's DER bytes (see tbs_names).
        self.by_subject: dict[bytes, list[_Anchor]] = {}
        for cert in bundle.authorities:
            anchor = _make_anchor(cert)
            if anchor is not None:
                subject = tbs_names(cert.tbs_certificate_bytes)[1]
                self.by_subject.setdefault(subject, []).append(anchor)

    def issuer_of(
        self, cert: x509.Certificate | None, facts: der.CertFacts, now: float
    ) -> _Anchor | None:
        """The anchor that signed ``facts``, one valid at ``now`` if any is; ``cert`` (the same
        certificate) may be None only if its signature algorithm is one of _EC_SIGS and
        _RSA_SIGS.

        Several anchors can sign alike: a root renewed with the same key and name sits in the
        bundle beside the expired certificate it replaces, in either order. Path validation
        (OpenSSL's, go-spiffe's) builds on the one valid now, so the first match is not enough.
        """
        outside = None
        for anchor in self.by_subject.get(facts.issuer, ()):
            # _facts_signature_ok, with the anchor's key family known: the common case inline.
            prehashed = _EC_SIGS_PREHASHED.get(facts.signature_algorithm)
            ec_key = anchor.ec_key
            if prehashed is not None and ec_key is not None:
                digest, ecdsa = prehashed
                try:
                    ec_key.verify(facts.signature, digest(facts.tbs).digest(), ecdsa)
                except InvalidSignature:
                    continue
            elif not _facts_signature_ok(cert, facts, anchor.public_key):
                continue
            if anchor.not_before <= now <= anchor.not_after:
                return anchor
            if outside is None:
                outside = anchor  # refused later for its validity, unless a valid one signed too
        return outside


class X509Verifier:
    """Verifies X.509-SVID chains (leaf first) against the bundle of the leaf's trust domain."""

    # The source whose revocations feed this verifier, when one made it (its x509_verifier()
    # / jwt_verifier()): svid.asgi given only the verifier follows its revocations from there.
    _revocation_feed: Any = None

    def __init__(
        self,
        bundles: X509BundleGetter,
        *,
        clock: Clock | None = None,
        revocations: RevocationSet | None = None,
        cache_size: int = DEFAULT_CACHE_SIZE,
        max_chain_depth: int = DEFAULT_MAX_CHAIN_DEPTH,
        max_revocation_staleness: float | None = None,
    ) -> None:
        self._bundles = bundles
        self._clock: Clock = clock or SystemClock()
        self._revocations = revocations if revocations is not None else RevocationSet()
        # Opt-in: refuse everything while the revocation feed has been gone longer than this.
        self._max_staleness = check_max_staleness(max_revocation_staleness)
        self._cache: LruCache[bytes, _Entry] = LruCache(cache_size)
        # Per verified path (its cache key): the cache key of the one chain holding it with
        # certificates after it that is cached (see _keep_one_variant).
        self._variants: dict[bytes, bytes] = {}
        self._max_depth = max_chain_depth
        # One decoded anchor index per trust domain (by name: TrustDomain hashes in Python), rebuilt
        # when its bundle object changes.
        self._indexes: dict[str, tuple[X509Bundle, _AnchorIndex]] = {}
        # Leaf templates (svid._cert_der) of verified leaves, with the leaf's SPIFFE ID: leaves
        # that match one have its extensions, so its profile verdict. Replaced, never mutated.
        self._templates: dict[bytes, tuple[tuple[der.LeafTemplate, SpiffeId], ...]] = {}

    @property
    def cache(self) -> LruCache[bytes, _Entry]:
        return self._cache

    def revocations_fresh_for(self, keys: Iterable[CertKey] = ()) -> float | None:
        """Seconds until this verifier refuses everything for stale revocation data
        (``max_revocation_staleness``; 0: it does now); None without that setting. With
        ``keys`` (a chain it verified before, as for ``check_fresh``): until it refuses that
        chain, which the CRL of one of its issuers lapsing brings sooner."""
        max_staleness = self._max_staleness
        if max_staleness is None:
            return None
        now = self._clock.now()
        left = max(0.0, max_staleness - self._revocations.staleness(self._clock.monotonic(), now))
        return min(left, crl_fresh_for(self._revocations, keys, now, max_staleness))

    def check_fresh(self, keys: Iterable[CertKey] = ()) -> None:
        """Raise StaleRevocationsError if this verifier would now refuse, for stale revocation
        data, a chain of certificates ``keys`` (``VerifiedX509.chain`` as ``cert_key``s) it
        verified before; nothing without ``max_revocation_staleness``. For connections that
        outlive their handshake."""
        max_staleness = self._max_staleness
        if max_staleness is None:
            return
        now = self._clock.now()
        refuse_if_stale(self._revocations, self._clock.monotonic(), max_staleness, now)
        refuse_if_stale_crl(self._revocations, keys, now, max_staleness)

    def verify_der(self, chain_der: bytes) -> VerifiedX509:
        """Verify concatenated DER certificates, leaf first (the Workload API / TLS form)."""
        if type(chain_der) is not bytes:
            chain_der = bytes(chain_der)  # a hashable, immutable cache key
        now = self._clock.now()
        max_staleness = self._max_staleness
        if max_staleness is not None:
            refuse_if_stale(self._revocations, self._clock.monotonic(), max_staleness, now)
        cache = self._cache
        key = chain_der
        if cache.max_entries:  # a zero-size cache never holds anything: skip its lock
            key = _cache_key(chain_der)
            entry = cache.get(key)
            if entry is not None:
                if self._still_valid(entry, now):
                    if max_staleness is not None:
                        refuse_if_stale_crl(self._revocations, entry.keys, now, max_staleness)
                    return entry.result
                cache.discard(key)
        if not chain_der:
            raise VerificationError("X.509-SVID chain is unreadable: the DER data is empty")
        fields = self._verify_templated(chain_der, now)
        if fields is None:
            try:
                ders = der.split_certs(chain_der)
            except SvidParseError as exc:
                raise VerificationError(f"X.509-SVID chain is unreadable: {exc}") from exc
            fields = self._verify_guarded(ders, None, now)
            self._keep_one_variant(ders, len(fields[5]), key)
        if max_staleness is not None:
            refuse_if_stale_crl(self._revocations, fields[5], now, max_staleness)
        if cache.max_entries:
            cache.put(key, tuple.__new__(_Entry, fields))
        return fields[0]

    def verify(self, chain: Sequence[x509.Certificate]) -> VerifiedX509:
        """Verify parsed certificates, leaf first; cached by their DER like ``verify_der``."""
        if not chain:
            raise VerificationError("X.509-SVID chain is empty")
        ders = [c.public_bytes(serialization.Encoding.DER) for c in chain]
        key = _cache_key(b"".join(ders))
        now = self._clock.now()
        max_staleness = self._max_staleness
        if max_staleness is not None:
            refuse_if_stale(self._revocations, self._clock.monotonic(), max_staleness, now)
        entry = self._cache.get(key)
        if entry is not None and not self._still_valid(entry, now):
            self._cache.discard(key)
            entry = None
        if entry is None:
            entry = tuple.__new__(_Entry, self._verify_guarded(ders, list(chain), now))
            self._keep_one_variant(ders, len(entry.keys), key)
            self._cache.put(key, entry)
        if max_staleness is not None:
            refuse_if_stale_crl(self._revocations, entry.keys, now, max_staleness)
        return entry.result

    def verify_ssl_peer(self, conn: ssl.SSLSocket | ssl.SSLObject | Any) -> VerifiedX509:
        """Verify the peer of an established TLS connection; call it right after the handshake.

        ``conn`` is an ``ssl.SSLSocket``, an ``ssl.SSLObject`` (asyncio's
        ``transport.get_extra_info("ssl_object")``) or the C-level object under them that
        httpcore's sync transport hands out. The ``ssl`` context should require a peer
        certificate (CERT_REQUIRED) and trust the CAs of the accepted trust domains; this check
        then pins the chain to the peer's own trust domain and applies the SPIFFE rules, times
        and revocations that OpenSSL does not know. ``svid.tls`` does all of it in the handshake.
        """
        return self.verify_der(b"".join(peer_chain_der(conn)))

    def _keep_one_variant(self, ders: list[bytes], path_len: int, key: bytes) -> None:
        """Before caching the chain ``ders`` (cache key ``key``), whose verified path is its
        first ``path_len`` certificates: when certificates follow the path, drop the entry of
        the last such chain of this path.

        What follows a path is ignored (a peer may send its root, or anything), so each chain
        of one leaf with other bytes after it verified alike, and was cached apart: the holder
        of any SVID a service accepts filled its cache with copies of it, pushing out everyone
        else's. One such chain per path is cached: a peer that sends the same extras each time
        hits the cache as before."""
        if not self._cache.max_entries or path_len >= len(ders):
            return
        path_key = _cache_key(b"".join(ders[:path_len]))
        variants = self._variants
        old = variants.get(path_key)
        if old is not None and old != key:
            self._cache.discard(old)
        elif old is None and len(variants) >= self._cache.max_entries:
            variants.clear()  # entries of paths evicted since: a path per entry at most
        variants[path_key] = key

    def _still_valid(self, entry: _Entry, now: float) -> bool:
        if not entry.not_before <= now <= entry.not_after:
            return False
        if self._bundles(entry.trust_domain) is not entry.bundle:
            return False
        is_revoked = self._revocations.is_revoked
        for key in entry.keys:  # noqa: SIM110 - no generator frame on every cache hit
            if is_revoked(key):
                return False
        return True

    def _index(self, bundle: X509Bundle) -> _AnchorIndex:
        memo = self._indexes.get(bundle.trust_domain.name)
        if memo is not None and memo[0] is bundle:
            return memo[1]
        index = _AnchorIndex(bundle)
        self._indexes[bundle.trust_domain.name] = (bundle, index)
        return index

    def _leaf_facts(self, leaf_der: bytes) -> tuple[der.CertFacts, SpiffeId | None]:
        """The leaf's facts, and its SPIFFE ID when a template of a verified leaf vouches for
        its profile (then the profile and critical-extension checks have nothing left to find)."""
        for template, sid in self._templates.get(der.template_key(leaf_der), ()):
            matched = der.match_leaf(leaf_der, template)
            if matched is not None:
                return matched[0], sid
        return der.parse_cert_fast(leaf_der) or der.parse_cert(leaf_der), None

    def _remember_template(self, leaf_der: bytes, facts: der.CertFacts, sid: SpiffeId) -> None:
        exts = facts.extensions
        # Only leaves whose profile the DER reader checks alone: then the verdict is a function
        # of the bytes a template pins (check_leaf_facts without the certificate agrees). And
        # only signature algorithms the anchors check without the certificate (issuer_of).
        if not exts.keys() <= der.FULLY_READ or not der.key_identifiers_ok(exts):
            return
        if facts.signature_algorithm not in _EC_SIGS and facts.signature_algorithm not in _RSA_SIGS:
            return
        try:
            if check_leaf_facts(facts) != sid:
                return
        except X509SvidError:
            return
        template = der.leaf_template(leaf_der, facts)
        if template is None:
            return
        templates = self._templates
        if len(templates) >= _MAX_TEMPLATE_KEYS:
            templates.clear()
        key = template.key
        templates[key] = ((template, sid), *templates.get(key, ())[: _TEMPLATES_PER_KEY - 1])

    def _verify_templated(self, d: bytes, now: float) -> _EntryFields | None:
        """``_verify_guarded`` for the usual case: one leaf that matches a template. None when it
        doesn't apply, or when the general path should say what is wrong (nothing is decided
        here that the general path would decide differently: the same checks in the same order,
        and its errors once the signature has been checked)."""
        for candidate in self._templates.get(d[4:15], ()):  # der.template_key(d)
            matched = der.match_leaf(d, candidate[0])
            if matched is not None:
                sid = candidate[1]
                break
        else:
            return None
        facts, end = matched
        if end != len(d):
            return None  # a chain: the general path (which uses the template for its leaf too)
        td = sid.trust_domain
        bundle = self._bundles(td)
        if bundle is None:
            return None
        try:
            if _leaf_key_problem(facts) is not None:
                return None  # the general path says why
            memo = self._indexes.get(td.name)
            index = memo[1] if memo is not None and memo[0] is bundle else self._index(bundle)
            # No certificate: templates have an algorithm of _EC_SIGS or _RSA_SIGS.
            anchor = index.issuer_of(None, facts, now)
            if anchor is None:
                raise _no_authority(facts, td)
            # _finish for a lone leaf, which it still judges whenever something is wrong (it
            # raises the error the general path would). No path length: no CA below the anchor.
            not_before, not_after = facts.not_before, facts.not_after
            serial = format(facts.serial, "x")
            key = (td.name, facts.issuer, serial)
            if (
                now < not_before
                or now > not_after
                or now < anchor.not_before
                or now > anchor.not_after
                or self._revocations.is_revoked(key)
            ):
                return self._finish(sid, bundle, anchor, _ChainDer((d,)), [facts], now=now)
            result = _verified_x509(sid, _ChainDer((d,)), serial, not_after)
            return (
                result,
                td,
                bundle,
                max(anchor.not_before, not_before),
                min(anchor.not_after, not_after),
                (key,),
            )
        except SvidError:
            raise
        except _MALFORMED as exc:
            raise VerificationError(f"a certificate in the chain is malformed: {exc}") from exc

    def _verify_guarded(
        self, ders: list[bytes], certs: list[x509.Certificate] | None, now: float
    ) -> _EntryFields:
        # Both readers must accept every certificate: our strict DER one for the facts, and
        # cryptography for keys and intermediates. cryptography parses lazily, so a malformed
        # extension or key surfaces only when read: that is guarded too.
        try:
            leaf_facts, leaf_sid = self._leaf_facts(ders[0])
            facts = [leaf_facts]
            for d in ders[1:]:
                facts.append(der.parse_cert_fast(d) or der.parse_cert(d))
        except SvidParseError as exc:
            raise VerificationError(f"X.509-SVID chain is unreadable: {exc}") from exc
        try:
            if certs is None:
                certs = []
                for offset, d in enumerate(ders):
                    try:
                        certs.append(x509.load_der_x509_certificate(d))
                    except (ValueError, x509.InvalidVersion) as exc:
                        raise VerificationError(
                            f"X.509-SVID chain is unreadable: certificate {offset} is not a "
                            f"valid X.509 certificate: {exc}"
                        ) from exc
            fields = self._verify(certs, facts, now, leaf_sid)
        except SvidError:
            raise
        except _MALFORMED as exc:
            raise VerificationError(f"a certificate in the chain is malformed: {exc}") from exc
        if leaf_sid is None:
            leaf_facts_verified(leaf_facts)
            self._remember_template(ders[0], leaf_facts, fields[0].spiffe_id)
        return fields

    def _verify(
        self,
        certs: list[x509.Certificate],
        facts: list[der.CertFacts],
        now: float,
        sid: SpiffeId | None = None,
    ) -> _EntryFields:
        leaf, leaf_facts = certs[0], facts[0]
        if sid is None:
            try:
                sid = check_leaf_facts(leaf_facts, leaf)
            except X509SvidError as exc:
                raise VerificationError(f"leaf breaks the X.509-SVID profile: {exc}") from exc
            checked_critical = False
        else:
            checked_critical = True  # vouched for by the template, like the profile
        td = sid.trust_domain
        bundle = self._bundles(td)
        if bundle is None:
            raise VerificationError(f"no X.509 bundle for trust domain {td}")
        memo = self._indexes.get(td.name)
        index = memo[1] if memo is not None and memo[0] is bundle else self._index(bundle)

        if not checked_critical:
            _check_critical_facts(leaf_facts)
        problem = _leaf_key_problem(leaf_facts)
        if problem is not None:
            raise VerificationError(f"leaf serial {leaf_facts.serial:x} is refused: {problem}")
        path, path_facts = [leaf], [leaf_facts]
        current = leaf_facts
        anchor = index.issuer_of(leaf, current, now)
        i = 1
        while anchor is None:
            if i >= len(certs):
                raise _no_authority(leaf_facts, td)
            if len(path) >= self._max_depth:
                raise VerificationError(f"chain is longer than {self._max_depth} certificates")
            nxt, nxt_facts = certs[i], facts[i]
            i += 1
            nxt_key = nxt.public_key()
            # Checked before it checks a signature: the peer chose this certificate, unsigned
            # by anything yet, and a huge exponent would make that one check cost ~6 ms (a
            # slow curve ~1.3 ms, for each of up to max_depth intermediates).
            if isinstance(nxt_key, rsa.RSAPublicKey):
                problem = rsa_key_problem(nxt_key)
            elif isinstance(nxt_key, ec.EllipticCurvePublicKey):
                problem = ec_key_problem(nxt_key)
            else:
                problem = None
            if problem is not None:
                raise VerificationError(
                    f"intermediate serial {nxt_facts.serial:x} is refused: {problem}"
                )
            if nxt_facts.subject != current.issuer or not _facts_signature_ok(
                path[-1], current, nxt_key
            ):
                raise VerificationError(
                    f"certificate serial {current.serial:x} is not signed by the next "
                    f"certificate in the chain (serial {nxt_facts.serial:x})"
                )
            try:
                check_signing_profile(nxt)
            except X509SvidError as exc:
                raise VerificationError(f"intermediate breaks the profile: {exc}") from exc
            bc = nxt.extensions.get_extension_for_class(x509.BasicConstraints).value
            below = len(path) - 1
            if bc.path_length is not None and below > bc.path_length:
                raise VerificationError(
                    f"intermediate serial {_serial(nxt)} allows {bc.path_length} CAs below it"
                )
            _check_critical(nxt, "intermediate", is_ca=True)
            path.append(nxt)
            path_facts.append(nxt_facts)
            current = nxt_facts
            anchor = index.issuer_of(nxt, current, now)

        return self._finish(sid, bundle, anchor, tuple(path), path_facts, now=now)

    def _finish(
        self,
        sid: SpiffeId,
        bundle: X509Bundle,
        anchor: _Anchor,
        chain: tuple[x509.Certificate, ...] | _ChainDer,
        path_facts: list[der.CertFacts],
        *,
        now: float,
    ) -> _EntryFields:
        """The checks after the signatures: path length, validity times, revocations."""
        td = sid.trust_domain
        if anchor.path_length is not None and len(path_facts) - 1 > anchor.path_length:
            raise VerificationError(
                f"authority serial {_serial(anchor.cert)} allows {anchor.path_length} CAs below it"
            )
        not_before, not_after = anchor.not_before, anchor.not_after
        what = "leaf"
        for f in path_facts:
            if now < f.not_before:
                raise ExpiredError(
                    f"{what} serial {f.serial:x} is not valid before {f.not_before:.0f}"
                )
            if now > f.not_after:
                raise ExpiredError(f"{what} serial {f.serial:x} expired at {f.not_after:.0f}")
            not_before, not_after = max(not_before, f.not_before), min(not_after, f.not_after)
            what = "intermediate"
        if now < anchor.not_before or now > anchor.not_after:
            raise ExpiredError(
                f"authority serial {_serial(anchor.cert)} of trust domain {td} is outside its "
                "validity period"
            )
        # Each certificate by its issuer and serial: a CRL revokes only its issuer's serials, and
        # an intermediate's revocation ends every path through it (RFC 5280 6.3).
        name = td.name
        if len(path_facts) == 1:
            f = path_facts[0]
            keys: tuple[CertKey, ...] = ((name, f.issuer, format(f.serial, "x")),)
        else:
            keys = tuple([(name, f.issuer, format(f.serial, "x")) for f in path_facts])
        if len(path_facts) > 1:
            # Its CAs may have signed CRLs no bundle authority did (svid._crl): before the
            # check below, so such a CRL revokes this chain too.
            ders = (
                chain.ders[1:]
                if type(chain) is _ChainDer
                else tuple(c.public_bytes(serialization.Encoding.DER) for c in chain[1:])
            )
            self._revocations.note_intermediates(name, ders)
        is_revoked = self._revocations.is_revoked
        for key in keys:
            if is_revoked(key):
                raise RevokedError(f"certificate serial {key[2]} of {sid} is revoked")
        result = _verified_x509(sid, chain, keys[0][2], path_facts[0].not_after)
        return result, td, bundle, not_before, not_after, keys


def _no_authority(leaf: der.CertFacts, td: TrustDomain) -> VerificationError:
    return VerificationError(
        f"chain of leaf serial {leaf.serial:x} does not lead to an authority of trust domain {td}"
    )
