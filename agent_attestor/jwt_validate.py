"""ValidateJWTSVID's checks (SPIFFE.md §3), against the bundles the agent holds.

A small internal validator: the `svid` library's verifier can replace it once it exists.
"""

from __future__ import annotations

import json
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec, padding, rsa
from cryptography.hazmat.primitives.asymmetric.utils import encode_dss_signature

from agent_attestor._crypto import b64url_decode
from agent_attestor.errors import JwtValidationError
from agent_attestor.model import TrustBundle
from svid._errors import SpiffeIdError, SvidParseError
from svid._spiffe_id import SpiffeId

_HASHES: dict[str, type[hashes.HashAlgorithm]] = {
    "256": hashes.SHA256,
    "384": hashes.SHA384,
    "512": hashes.SHA512,
}
ALLOWED_ALGS = frozenset(f"{f}{n}" for f in ("RS", "ES", "PS") for n in _HASHES)


@dataclass(frozen=True)
class ValidatedJwt:
    spiffe_id: str
    claims: Mapping[str, Any]


def _segment_json(text: str, what: str) -> dict[str, Any]:
    try:
        value = json.loads(b64url_decode(text))
    except (SvidParseError, ValueError) as exc:
        raise JwtValidationError(f"token {what} is not base64url JSON") from exc
    if not isinstance(value, dict):
        raise JwtValidationError(f"token {what} is not a JSON object")
    return value


def _verify_signature(alg: str, public_der: bytes, signing_input: bytes, sig: bytes) -> bool:
    public = serialization.load_der_public_key(public_der)
    digest = _HASHES[alg[2:]]()
    try:
        if alg.startswith("ES"):
            if not isinstance(public, ec.EllipticCurvePublicKey):
                return False
            size = (public.curve.key_size + 7) // 8
            if len(sig) != 2 * size:
                return False
            der_sig = encode_dss_signature(
                int.from_bytes(sig[:size], "big"), int.from_bytes(sig[size:], "big")
            )
            public.verify(der_sig, signing_input, ec.ECDSA(digest))
        elif isinstance(public, rsa.RSAPublicKey):
            pad: padding.AsymmetricPadding = (
                padding.PKCS1v15()
                if alg.startswith("RS")
                else padding.PSS(mgf=padding.MGF1(digest), salt_length=digest.digest_size)
            )
            public.verify(sig, signing_input, pad, digest)
        else:
            return False
    except InvalidSignature:
        return False
    return True


def unverified_claims(token: str) -> dict[str, Any]:
    """The claims of a token without any check: for audit records only, never for decisions."""
    parts = token.split(".")
    if len(parts) != 3:
        return {}
    try:
        return _segment_json(parts[1], "claims")
    except JwtValidationError:
        return {}


def validate_jwt(
    token: str, audience: str, bundles: Mapping[str, TrustBundle], now: float
) -> ValidatedJwt:
    """Check a JWT-SVID for `audience`; raise JwtValidationError naming the failed check."""
    parts = token.split(".")
    if len(parts) != 3:
        raise JwtValidationError("token is not a JWS compact serialization (three parts)")
    header = _segment_json(parts[0], "header")
    claims = _segment_json(parts[1], "claims")
    alg = header.get("alg")
    if alg not in ALLOWED_ALGS:
        raise JwtValidationError(f"token algorithm {alg!r} is not allowed")
    kid = header.get("kid")
    if not isinstance(kid, str) or not kid:
        raise JwtValidationError("token header has no kid")
    if "typ" in header and header["typ"] not in ("JWT", "JOSE"):
        raise JwtValidationError(f"token typ {header['typ']!r} is not JWT or JOSE")
    sub = claims.get("sub")
    if not isinstance(sub, str):
        raise JwtValidationError("token has no sub claim")
    try:
        sid = SpiffeId.parse(sub)
    except SpiffeIdError as exc:
        raise JwtValidationError(f"token sub is not a SPIFFE ID: {exc}") from exc
    aud = claims.get("aud")
    auds = [aud] if isinstance(aud, str) else aud
    if not isinstance(auds, list) or not auds or not all(isinstance(a, str) for a in auds):
        raise JwtValidationError("token has no aud claim")
    if audience not in auds:
        raise JwtValidationError(f"audience {audience!r} is not in the token's aud")
    exp = claims.get("exp")
    if not isinstance(exp, int | float) or isinstance(exp, bool):
        raise JwtValidationError("token has no numeric exp claim")
    if exp <= now:
        raise JwtValidationError("token has expired")
    bundle = bundles.get(sid.trust_domain.name)
    if bundle is None:
        raise JwtValidationError(f"no bundle for trust domain {sid.trust_domain.name!r}")
    key = next((k for k in bundle.jwt_keys if k.kid == kid), None)
    if key is None:
        raise JwtValidationError(f"no JWT key {kid!r} in the bundle of {sid.trust_domain.name!r}")
    try:
        signature = b64url_decode(parts[2])
    except SvidParseError as exc:
        raise JwtValidationError("token signature is not base64url") from exc
    if not _verify_signature(alg, key.public_key_der, f"{parts[0]}.{parts[1]}".encode(), signature):
        raise JwtValidationError("token signature does not verify")
    return ValidatedJwt(spiffe_id=str(sid), claims=claims)
