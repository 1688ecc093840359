"""Trust bundles: X.509 authorities, JWT authorities, the SPIFFE bundle JSON, and sets of bundles.

Encodings follow the Workload API (concatenated DER, JWKS of JWT keys) and the SPIFFE Trust Domain
and Bundle standard (a JWK Set with ``spiffe_sequence`` and ``spiffe_refresh_hint``).
"""

from __future__ import annotations

import base64
import binascii
import json
from collections.abc import Collection, Iterator, Mapping
from dataclasses import dataclass, field
from types import MappingProxyType
from typing import Any, Generic, TypeVar

from cryptography import x509
from cryptography.exceptions import UnsupportedAlgorithm
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import rsa

from svid._der import certs_to_pem, der_concat, load_pem_certs, parse_der_certs
from svid._errors import BundleError, SvidParseError
from svid._jose import PublicKey, rsa_key_problem
from svid._jwk import KNOWN_KTY, public_key_from_jwk, public_key_members
from svid._spiffe_id import SpiffeId, TrustDomain

USE_X509 = "x509-svid"
USE_JWT = "jwt-svid"


def _frozen_keys(keys: Mapping[str, PublicKey]) -> Mapping[str, PublicKey]:
    return MappingProxyType(dict(keys))


def _spki(key: object) -> bytes:
    if not hasattr(key, "public_bytes"):
        return b""
    return key.public_bytes(  # type: ignore[no-any-return]
        serialization.Encoding.DER, serialization.PublicFormat.SubjectPublicKeyInfo
    )


def _checked_authorities(
    trust_domain: TrustDomain, certs: Collection[x509.Certificate]
) -> tuple[x509.Certificate, ...]:
    """``certs``, refused (BundleError) if one holds an RSA key out of bounds (rsa_key_problem)."""
    for cert in certs:
        _check_authority_key(cert, f"X.509 bundle for {trust_domain}")
    return tuple(certs)


def _check_authority_key(cert: x509.Certificate, where: str) -> None:
    try:
        key = cert.public_key()
    except (ValueError, UnsupportedAlgorithm):
        return  # a key that does not load signs nothing: the verifier skips such an authority
    if isinstance(key, rsa.RSAPublicKey):
        problem = rsa_key_problem(key)
        if problem is not None:
            subject = cert.subject.rfc4514_string()
            raise BundleError(f"{where}: X.509 authority {subject!r}: {problem}")


def _same_keys(a: Mapping[str, PublicKey], b: Mapping[str, PublicKey]) -> bool:
    return a.keys() == b.keys() and all(_spki(a[k]) == _spki(b[k]) for k in a)


@dataclass(frozen=True)
class X509Bundle:
    """The X.509 authorities (CA certificates) of one trust domain."""

    trust_domain: TrustDomain
    authorities: tuple[x509.Certificate, ...]

    @classmethod
    def parse_der(cls, trust_domain: TrustDomain, data: bytes) -> X509Bundle:
        """From concatenated DER; an empty input is a bundle with no authorities."""
        if not data:
            return cls(trust_domain, ())
        try:
            certs = parse_der_certs(data)
        except SvidParseError as exc:
            raise BundleError(f"X.509 bundle for {trust_domain}: {exc}") from None
        return cls(trust_domain, _checked_authorities(trust_domain, certs))

    @classmethod
    def parse_pem(cls, trust_domain: TrustDomain, data: bytes) -> X509Bundle:
        try:
            certs = load_pem_certs(data)
        except SvidParseError as exc:
            raise BundleError(f"X.509 bundle for {trust_domain}: {exc}") from None
        return cls(trust_domain, _checked_authorities(trust_domain, certs))

    def to_der(self) -> bytes:
        return der_concat(self.authorities)

    def to_pem(self) -> bytes:
        return certs_to_pem(self.authorities)


@dataclass(frozen=True, eq=False)
class JwtBundle:
    """The JWT signing keys of one trust domain, by key id."""

    trust_domain: TrustDomain
    keys: Mapping[str, PublicKey] = field(default_factory=dict)

    def __post_init__(self) -> None:
        object.__setattr__(self, "keys", _frozen_keys(self.keys))

    def __eq__(self, other: object) -> bool:
        if not isinstance(other, JwtBundle):
            return NotImplemented
        return self.trust_domain == other.trust_domain and _same_keys(self.keys, other.keys)

    def __hash__(self) -> int:
        return hash((self.trust_domain, frozenset(self.keys)))

    def get(self, kid: str) -> PublicKey | None:
        return self.keys.get(kid)

    @classmethod
    def parse_jwks(
        cls, trust_domain: TrustDomain, data: bytes, *, uses: Collection[str] = (USE_JWT,)
    ) -> JwtBundle:
        """From a JWKS (the Workload API's JWT bundle form). X.509 and unknown keys are skipped,
        and keys whose ``use`` is not among ``uses`` (an OIDC issuer's JWKS says ``sig``). One
        kid for two different keys is refused; for one key twice, it is taken once."""
        doc = _load_jwks(trust_domain, data)
        keys: dict[str, PublicKey] = {}
        for i, jwk in enumerate(doc["keys"]):
            where = f"JWT bundle for {trust_domain}, key #{i}"
            use = jwk.get("use", USE_JWT)
            # A string first: "in" on a set hashes it, and a JSON list or object is unhashable.
            if not isinstance(use, str) or use not in uses or not _known_kty(jwk):
                continue
            kid, key = _jwt_key(jwk, where)
            if kid in keys and _spki(keys[kid]) != _spki(key):
                # Which one verifies would be the order's. The same key again is taken: an
                # OIDC issuer may list it once per alg under one kid (RFC 7517 §4.5 asks
                # distinct kids with a SHOULD), and which entry is kept cannot matter.
                raise BundleError(f"{where}: duplicate kid {kid!r} for another key")
            keys[kid] = key
        return cls(trust_domain, keys)

    def to_jwks(self) -> bytes:
        """A JWKS holding only JWT keys, each with kid and ``use: jwt-svid``."""
        return json.dumps({"keys": _jwt_jwks(self.keys)}, separators=(",", ":")).encode()


def _known_kty(jwk: Mapping[str, Any]) -> bool:
    kty = jwk.get("kty")
    return isinstance(kty, str) and kty in KNOWN_KTY


def _jwt_jwks(keys: Mapping[str, PublicKey]) -> list[dict[str, str]]:
    return [{**public_key_members(key), "use": USE_JWT, "kid": kid} for kid, key in keys.items()]


def _load_jwks(trust_domain: TrustDomain, data: bytes) -> dict[str, Any]:
    try:
        doc = json.loads(data)
    except (ValueError, UnicodeDecodeError, RecursionError) as exc:  # deep nesting: the sender's
        raise BundleError(f"bundle for {trust_domain} is not valid JSON: {exc}") from None
    if not isinstance(doc, dict):
        raise BundleError(f"bundle for {trust_domain} is not a JSON object")
    keys = doc.get("keys")
    if not isinstance(keys, list):
        raise BundleError(f"bundle for {trust_domain} has no 'keys' array")
    for i, jwk in enumerate(keys):
        if not isinstance(jwk, dict):
            raise BundleError(f"bundle for {trust_domain}, key #{i} is not a JSON object")
    return doc


def _jwt_key(jwk: Mapping[str, Any], where: str) -> tuple[str, PublicKey]:
    kid = jwk.get("kid")
    if not isinstance(kid, str) or not kid:
        raise BundleError(f"{where}: a jwt-svid key needs a non-empty 'kid'")
    return kid, public_key_from_jwk(jwk, f"{where} (kid {kid!r})")


def _x509_key(jwk: Mapping[str, Any], where: str) -> x509.Certificate:
    x5c = jwk.get("x5c")
    if not isinstance(x5c, list) or len(x5c) != 1 or not isinstance(x5c[0], str):
        raise BundleError(f"{where}: an x509-svid key needs 'x5c' with exactly one certificate")
    try:
        # x5c is standard base64, not base64url (RFC 7517 §4.7).
        der = base64.b64decode(x5c[0], validate=True)
        cert = x509.load_der_x509_certificate(der)
        cert_key = cert.public_key()
    except (binascii.Error, ValueError, x509.InvalidVersion, UnsupportedAlgorithm) as exc:
        raise BundleError(f"{where}: 'x5c' is not a base64 DER certificate: {exc}") from None
    _check_authority_key(cert, where)
    declared = public_key_from_jwk(jwk, where)
    if _spki(declared) != _spki(cert_key):
        raise BundleError(f"{where}: the JWK key members do not match the x5c certificate's key")
    return cert


def _non_negative_int(
    doc: Mapping[str, Any], name: str, trust_domain: TrustDomain, *, below: int | None = None
) -> int:
    value = doc.get(name, 0)
    if isinstance(value, bool) or not isinstance(value, int) or value < 0:
        raise BundleError(f"bundle for {trust_domain}: {name!r} must be a non-negative integer")
    if below is not None and value >= below:
        raise BundleError(f"bundle for {trust_domain}: {name!r} must be below {below}")
    return value


@dataclass(frozen=True, eq=False)
class SpiffeBundle:
    """A trust domain's full bundle in the SPIFFE bundle format."""

    trust_domain: TrustDomain
    x509_authorities: tuple[x509.Certificate, ...] = ()
    jwt_authorities: Mapping[str, PublicKey] = field(default_factory=dict)
    sequence: int = 0
    refresh_hint: int = 0

    def __post_init__(self) -> None:
        object.__setattr__(self, "x509_authorities", tuple(self.x509_authorities))
        object.__setattr__(self, "jwt_authorities", _frozen_keys(self.jwt_authorities))

    def __eq__(self, other: object) -> bool:
        if not isinstance(other, SpiffeBundle):
            return NotImplemented
        return (
            self.trust_domain == other.trust_domain
            and self.x509_authorities == other.x509_authorities
            and _same_keys(self.jwt_authorities, other.jwt_authorities)
            and self.sequence == other.sequence
            and self.refresh_hint == other.refresh_hint
        )

    def __hash__(self) -> int:
        return hash((self.trust_domain, self.x509_authorities, self.sequence))

    @classmethod
    def parse(cls, trust_domain: TrustDomain, data: bytes) -> SpiffeBundle:
        doc = _load_jwks(trust_domain, data)
        cas: list[x509.Certificate] = []
        jwt_keys: dict[str, PublicKey] = {}
        for i, jwk in enumerate(doc["keys"]):
            where = f"bundle for {trust_domain}, key #{i}"
            use = jwk.get("use")
            if not _known_kty(jwk):
                continue
            if use == USE_X509:
                cas.append(_x509_key(jwk, where))
            elif use == USE_JWT:
                kid, key = _jwt_key(jwk, where)
                if kid in jwt_keys:
                    raise BundleError(f"{where}: duplicate kid {kid!r}")
                jwt_keys[kid] = key
        return cls(
            trust_domain,
            tuple(cas),
            jwt_keys,
            # The spec's spiffe_sequence is a uint64: a bundle past it is no bundle.
            sequence=_non_negative_int(doc, "spiffe_sequence", trust_domain, below=2**64),
            refresh_hint=_non_negative_int(doc, "spiffe_refresh_hint", trust_domain),
        )

    def to_json(self) -> bytes:
        keys: list[dict[str, Any]] = []
        for cert in self.x509_authorities:
            der = cert.public_bytes(serialization.Encoding.DER)
            keys.append(
                {
                    **public_key_members(cert.public_key()),  # type: ignore[arg-type]
                    "use": USE_X509,
                    "x5c": [base64.b64encode(der).decode("ascii")],
                }
            )
        keys.extend(_jwt_jwks(self.jwt_authorities))
        doc: dict[str, Any] = {"keys": keys, "spiffe_sequence": self.sequence}
        if self.refresh_hint:
            doc["spiffe_refresh_hint"] = self.refresh_hint
        return json.dumps(doc, separators=(",", ":")).encode()

    def x509_bundle(self) -> X509Bundle:
        return X509Bundle(self.trust_domain, self.x509_authorities)

    def jwt_bundle(self) -> JwtBundle:
        return JwtBundle(self.trust_domain, self.jwt_authorities)


B = TypeVar("B", X509Bundle, JwtBundle, SpiffeBundle)


class BundleSet(Mapping[TrustDomain, B], Generic[B]):
    """An immutable map from trust domain to that trust domain's bundle."""

    __slots__ = ("_items",)

    def __init__(self, bundles: Mapping[TrustDomain, B] | None = None) -> None:
        items = dict(bundles or {})
        for td, bundle in items.items():
            if bundle.trust_domain != td:
                raise BundleError(
                    f"bundle for {bundle.trust_domain} was filed under trust domain {td}"
                )
        self._items: Mapping[TrustDomain, B] = MappingProxyType(items)

    @classmethod
    def of(cls, *bundles: B) -> BundleSet[B]:
        return cls({b.trust_domain: b for b in bundles})

    def __getitem__(self, td: TrustDomain) -> B:
        return self._items[td]

    def __iter__(self) -> Iterator[TrustDomain]:
        return iter(self._items)

    def __len__(self) -> int:
        return len(self._items)

    def __repr__(self) -> str:
        return f"BundleSet({sorted(td.name for td in self._items)})"

    def for_trust_domain(self, td: TrustDomain) -> B:
        bundle = self._items.get(td)
        if bundle is None:
            raise BundleError(f"no bundle for trust domain {td}")
        return bundle

    def for_id(self, spiffe_id: SpiffeId) -> B:
        return self.for_trust_domain(spiffe_id.trust_domain)

    def with_bundle(self, bundle: B) -> BundleSet[B]:
        """A copy with ``bundle`` added or replacing its trust domain's bundle."""
        return BundleSet({**self._items, bundle.trust_domain: bundle})
