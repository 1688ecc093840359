"""Small crypto helpers the agent needs: keys, CSRs, DER chains, JWKS.

The shared `svid` library will grow richer versions of these; the agent keeps only what it uses.
"""

from __future__ import annotations

import base64
import json
from collections.abc import Iterable

from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec, rsa
from cryptography.hazmat.primitives.asymmetric.types import PrivateKeyTypes, PublicKeyTypes
from cryptography.x509.oid import NameOID

from agent_attestor.model import IssuedSvid, JwtKey
from svid._errors import SvidParseError

_CURVE_NAMES = {"secp256r1": "P-256", "secp384r1": "P-384", "secp521r1": "P-521"}


def b64url(data: bytes) -> str:
    return base64.urlsafe_b64encode(data).rstrip(b"=").decode("ascii")


def b64url_decode(text: str) -> bytes:
    try:
        return base64.urlsafe_b64decode(text + "=" * (-len(text) % 4))
    except (ValueError, TypeError) as exc:
        raise SvidParseError("base64url segment is malformed") from exc


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


def key_der(key: PrivateKeyTypes) -> bytes:
    return key.private_bytes(
        serialization.Encoding.DER,
        serialization.PrivateFormat.PKCS8,
        serialization.NoEncryption(),
    )


def parse_der_certs(data: bytes) -> list[x509.Certificate]:
    """Concatenated DER certificates, walked by their ASN.1 SEQUENCE lengths."""
    certs: list[x509.Certificate] = []
    offset = 0
    while offset < len(data):
        if data[offset] != 0x30 or offset + 2 > len(data):
            raise SvidParseError(f"DER certificate chain is malformed at offset {offset}")
        first = data[offset + 1]
        if first < 0x80:
            length, header = first, 2
        else:
            count = first & 0x7F
            if count == 0 or count > 4 or offset + 2 + count > len(data):
                raise SvidParseError(f"DER certificate chain has a bad length at offset {offset}")
            length = int.from_bytes(data[offset + 2 : offset + 2 + count], "big")
            header = 2 + count
        end = offset + header + length
        if end > len(data):
            raise SvidParseError(f"DER certificate chain is truncated at offset {offset}")
        try:
            certs.append(x509.load_der_x509_certificate(data[offset:end]))
        except ValueError as exc:
            raise SvidParseError(f"DER certificate at offset {offset} is malformed") from exc
        offset = end
    if not certs:
        raise SvidParseError("DER certificate chain is empty")
    return certs


def der(certs: Iterable[x509.Certificate]) -> bytes:
    return b"".join(c.public_bytes(serialization.Encoding.DER) for c in certs)


def pem(certs: Iterable[x509.Certificate]) -> bytes:
    return b"".join(c.public_bytes(serialization.Encoding.PEM) for c in certs)


def key_pem(key: PrivateKeyTypes) -> bytes:
    return key.private_bytes(
        serialization.Encoding.PEM,
        serialization.PrivateFormat.PKCS8,
        serialization.NoEncryption(),
    )


def uri_san(cert: x509.Certificate) -> str:
    try:
        san = cert.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
    except x509.ExtensionNotFound as exc:
        raise SvidParseError("certificate has no URI SAN") from exc
    uris = san.get_values_for_type(x509.UniformResourceIdentifier)
    if len(uris) != 1:
        raise SvidParseError(f"certificate has {len(uris)} URI SANs, expected exactly one")
    return str(uris[0])


def issued_svid(
    entry_id: str,
    chain_der: bytes,
    key: PrivateKeyTypes,
    issuance_key: tuple[str, tuple[str, ...], int] = ("", (), 0),
) -> IssuedSvid:
    """Check that a chain from the server fits our key, and package it for the cache."""
    chain = tuple(parse_der_certs(chain_der))
    leaf = chain[0]
    if leaf.public_key().public_bytes(
        serialization.Encoding.DER, serialization.PublicFormat.SubjectPublicKeyInfo
    ) != key.public_key().public_bytes(
        serialization.Encoding.DER, serialization.PublicFormat.SubjectPublicKeyInfo
    ):
        raise SvidParseError(f"SVID for entry {entry_id!r} does not match the agent's key")
    return IssuedSvid(
        entry_id=entry_id,
        spiffe_id=uri_san(leaf),
        chain=chain,
        private_key=key,
        chain_der=chain_der,
        key_der=key_der(key),
        not_before=leaf.not_valid_before_utc.timestamp(),
        not_after=leaf.not_valid_after_utc.timestamp(),
        issuance_key=issuance_key,
    )


def public_jwk(public_key: PublicKeyTypes) -> dict[str, str]:
    if isinstance(public_key, ec.EllipticCurvePublicKey):
        nums = public_key.public_numbers()
        size = (public_key.curve.key_size + 7) // 8
        crv = _CURVE_NAMES.get(public_key.curve.name)
        if crv is None:
            raise SvidParseError(f"unsupported curve {public_key.curve.name!r}")
        return {
            "kty": "EC",
            "crv": crv,
            "x": b64url(nums.x.to_bytes(size, "big")),
            "y": b64url(nums.y.to_bytes(size, "big")),
        }
    if isinstance(public_key, rsa.RSAPublicKey):
        rn = public_key.public_numbers()
        return {
            "kty": "RSA",
            "n": b64url(rn.n.to_bytes((rn.n.bit_length() + 7) // 8, "big")),
            "e": b64url(rn.e.to_bytes((rn.e.bit_length() + 7) // 8, "big")),
        }
    raise SvidParseError(f"unsupported JWT key type {type(public_key).__name__}")


def jwt_jwks(keys: Iterable[JwtKey]) -> bytes:
    """A JWKS with only JWT keys, each with its kid: what FetchJWTBundles must send."""
    out = []
    for key in keys:
        try:
            public = serialization.load_der_public_key(key.public_key_der)
            jwk = public_jwk(public)
        except (ValueError, SvidParseError):
            continue  # a key we cannot express would break clients; leave it out
        jwk.update({"use": "jwt-svid", "kid": key.kid})
        out.append(jwk)
    return json.dumps({"keys": out}, separators=(",", ":")).encode()
