"""The agent's thin layer over the `svid` library: what only an agent does (new keys, CSRs), and
conversions between the agent's wire-shaped values and the library's types.

Certificate lists, SPIFFE IDs, JWKS and JOSE all come from `svid`; nothing here re-implements them.
"""

from __future__ import annotations

from collections.abc import Collection, Iterable

from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec, rsa
from cryptography.hazmat.primitives.asymmetric.types import PrivateKeyTypes, PublicKeyTypes
from cryptography.x509.oid import NameOID

from agent_attestor.model import IssuedSvid, TrustBundle
from svid import Clock, SvidError, X509Bundle, X509Verifier
from svid import _cert_der as cert_der
from svid._bundle import JwtBundle
from svid._der import parse_der_certs
from svid._errors import BundleError, SvidParseError
from svid._jose import PublicKey
from svid._jwk import public_key_members
from svid._spiffe_id import TrustDomain
from svid._x509 import spiffe_id_from_cert


def new_key() -> ec.EllipticCurvePrivateKey:
    return ec.generate_private_key(ec.SECP256R1())


def make_csr(key: ec.EllipticCurvePrivateKey, spiffe_id: str = "") -> bytes:
    """A PKCS#10 request proving possession of `key`; the server decides the SVID's contents."""
    builder = x509.CertificateSigningRequestBuilder().subject_name(
        x509.Name([x509.NameAttribute(NameOID.ORGANIZATION_NAME, "SPIFFE")])
    )
    if spiffe_id:
        builder = builder.add_extension(
            x509.SubjectAlternativeName([x509.UniformResourceIdentifier(spiffe_id)]),
            critical=False,
        )
    return builder.sign(key, hashes.SHA256()).public_bytes(serialization.Encoding.DER)


# The library encodes private keys only as methods of X509Svid; the agent also needs them for
# keys that are not (yet) part of a checked SVID: its own key on disk and the CLI's --write.
def key_der(key: PrivateKeyTypes) -> bytes:
    return key.private_bytes(
        serialization.Encoding.DER,
        serialization.PrivateFormat.PKCS8,
        serialization.NoEncryption(),
    )


def key_pem(key: PrivateKeyTypes) -> bytes:
    return key.private_bytes(
        serialization.Encoding.PEM,
        serialization.PrivateFormat.PKCS8,
        serialization.NoEncryption(),
    )


def _spki(key: PublicKeyTypes) -> bytes:
    return key.public_bytes(
        serialization.Encoding.DER, serialization.PublicFormat.SubjectPublicKeyInfo
    )


def issued_svid(
    entry_id: str,
    chain_der: bytes,
    key: PrivateKeyTypes,
    issuance_key: tuple[str, tuple[str, ...], int] = ("", (), 0),
) -> IssuedSvid:
    """Check that a chain from the server fits our key, and package it for the cache."""
    chain = tuple(parse_der_certs(chain_der))
    leaf = chain[0]
    if _spki(leaf.public_key()) != _spki(key.public_key()):
        raise SvidParseError(f"SVID for entry {entry_id!r} does not match the agent's key")
    return IssuedSvid(
        entry_id=entry_id,
        spiffe_id=str(spiffe_id_from_cert(leaf)),
        chain_der=chain_der,
        key_der=key_der(key),
        not_before=leaf.not_valid_before_utc.timestamp(),
        not_after=leaf.not_valid_after_utc.timestamp(),
        serial_hex=format(leaf.serial_number, "x"),
        issuance_key=issuance_key,
    )


def jwt_bundle(bundle: TrustBundle) -> JwtBundle:
    """The bundle's JWT keys as the library's JwtBundle.

    A key a JWK cannot express (Ed25519, an unusual curve, unreadable DER) is left out: in a JWKS
    it would break every client, and no JWT-SVID alg could be checked against it anyway. The first
    key wins when a kid repeats.
    """
    keys: dict[str, PublicKey] = {}
    for jwt_key in bundle.jwt_keys:
        if jwt_key.kid in keys:
            continue
        try:
            public = serialization.load_der_public_key(jwt_key.public_key_der)
        except ValueError:
            continue
        if not isinstance(public, ec.EllipticCurvePublicKey | rsa.RSAPublicKey):
            continue
        try:
            public_key_members(public)
        except BundleError:
            continue
        keys[jwt_key.kid] = public
    return JwtBundle(TrustDomain(bundle.trust_domain), keys)


def unverifiable(
    svids: Iterable[IssuedSvid], bundle: TrustBundle, removed: Collection[bytes], clock: Clock
) -> list[str]:
    """Entry ids of those of `svids` whose chain `bundle` no longer verifies, `removed` (DER)
    having left it: a workload handed both would refuse the SVID.

    Only chains whose top certificate names a removed authority as its issuer are checked (a
    signature each, ~0.1 ms, as a workload's own check costs): the rest never chained to one,
    and reading a name costs a tenth of that, which keeps the old root's pruning at the end of
    a rotation cheap at 20k SVIDs. A bundle the library cannot read verifies nothing, so it
    condemns nothing: minting again under it would not help.
    """
    try:
        trust_domain = TrustDomain(bundle.trust_domain)
        authorities = X509Bundle.parse_der(trust_domain, bundle.x509_der)
    except SvidError:
        return []
    names = _subjects(removed)
    verifier = X509Verifier(
        lambda td: authorities if td == trust_domain else None, clock=clock, cache_size=0
    )
    out: list[str] = []
    for svid in svids:
        if names is not None and _issuer_name(svid.chain_der) not in names:
            continue
        try:
            verifier.verify_der(svid.chain_der)
        except SvidError:
            out.append(svid.entry_id)
    return out


def _subjects(authorities: Iterable[bytes]) -> set[bytes] | None:
    """The DER subject Names of `authorities`; None (check every chain) if one is unreadable
    here, though the verifier may have anchored chains on it."""
    try:
        return {cert_der.parse_cert(der).subject for der in authorities}
    except SvidError:
        return None


def _issuer_name(chain_der: bytes) -> bytes | None:
    """The DER issuer Name of the chain's top certificate; None if the chain is unreadable."""
    try:
        return cert_der.parse_cert(cert_der.split_certs(chain_der)[-1]).issuer
    except (SvidError, IndexError):
        return None
