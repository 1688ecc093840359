"""Public keys as JWK members (RFC 7517/7518): EC P-256/384/521 and RSA, nothing else."""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from cryptography.hazmat.primitives.asymmetric import ec, rsa

from svid._errors import BundleError, JwtSvidError
from svid._jose import PublicKey, b64url_decode, b64url_encode, rsa_key_problem

KNOWN_KTY = frozenset({"EC", "RSA"})

_CURVES: dict[str, ec.EllipticCurve] = {
    "P-256": ec.SECP256R1(),
    "P-384": ec.SECP384R1(),
    "P-521": ec.SECP521R1(),
}
_CRV_BY_CURVE = {curve.name: crv for crv, curve in _CURVES.items()}


def _uint(data: bytes) -> int:
    return int.from_bytes(data, "big")


def _uint_bytes(value: int, size: int | None = None) -> bytes:
    return value.to_bytes(size or max(1, (value.bit_length() + 7) // 8), "big")


def public_key_members(key: PublicKey) -> dict[str, str]:
    """``kty`` and the key members of a JWK for ``key`` (no kid, no use)."""
    if isinstance(key, ec.EllipticCurvePublicKey):
        crv = _CRV_BY_CURVE.get(key.curve.name)
        if crv is None:
            raise BundleError(f"EC curve {key.curve.name} cannot be written as a JWK")
        size = (key.curve.key_size + 7) // 8
        nums = key.public_numbers()
        return {
            "kty": "EC",
            "crv": crv,
            "x": b64url_encode(_uint_bytes(nums.x, size)),
            "y": b64url_encode(_uint_bytes(nums.y, size)),
        }
    if isinstance(key, rsa.RSAPublicKey):
        rnums = key.public_numbers()
        return {
            "kty": "RSA",
            "n": b64url_encode(_uint_bytes(rnums.n)),
            "e": b64url_encode(_uint_bytes(rnums.e)),
        }
    raise BundleError(f"key type {type(key).__name__} cannot be written as a JWK (EC or RSA only)")


def _member(jwk: Mapping[str, Any], name: str, where: str) -> bytes:
    value = jwk.get(name)
    if not isinstance(value, str) or not value:
        raise BundleError(f"{where}: member {name!r} is missing or not a string")
    try:
        return b64url_decode(value)
    except JwtSvidError:
        raise BundleError(f"{where}: member {name!r} is not base64url") from None


def public_key_from_jwk(jwk: Mapping[str, Any], where: str) -> PublicKey:
    """The public key of an EC or RSA JWK; ``where`` names the key in error messages."""
    kty = jwk.get("kty")
    if kty == "EC":
        crv = jwk.get("crv")
        curve = _CURVES.get(crv) if isinstance(crv, str) else None
        if curve is None:
            raise BundleError(f"{where}: unsupported EC curve {crv!r} (P-256, P-384, P-521)")
        size = (curve.key_size + 7) // 8
        x, y = _member(jwk, "x", where), _member(jwk, "y", where)
        if len(x) != size or len(y) != size:
            raise BundleError(f"{where}: EC coordinates must be {size} bytes for {crv}")
        try:
            return ec.EllipticCurvePublicNumbers(_uint(x), _uint(y), curve).public_key()
        except ValueError:
            raise BundleError(f"{where}: EC point is not on curve {crv}") from None
    if kty == "RSA":
        n, e = _member(jwk, "n", where), _member(jwk, "e", where)
        try:
            key = rsa.RSAPublicNumbers(_uint(e), _uint(n)).public_key()
        except ValueError as exc:
            raise BundleError(f"{where}: invalid RSA key: {exc}") from None
        problem = rsa_key_problem(key)
        if problem is not None:
            raise BundleError(f"{where}: {problem}")
        return key
    raise BundleError(f"{where}: unsupported key type {kty!r}")
