"""JWT-SVIDs as values: structure checks only. Signature and time checks live in the verifier."""

from __future__ import annotations

import functools
import json
import math
from collections.abc import Mapping
from dataclasses import dataclass, field
from types import MappingProxyType
from typing import Any, NamedTuple, TypeGuard

from svid._errors import JwtSvidError, SpiffeIdError
from svid._jose import ALLOWED_ALGS, b64url_decode
from svid._spiffe_id import SpiffeId

# The same few subjects come back again and again; the parse is pure, so memoize it.
_parse_id = functools.lru_cache(maxsize=4096)(SpiffeId.parse)
ALLOWED_TYP = frozenset({"JWT", "JOSE"})
# A token is a bearer secret read from the network; bound its size before decoding anything.
MAX_TOKEN_BYTES = 64 * 1024


def _json_object(segment: str, what: str) -> dict[str, Any]:
    raw = b64url_decode(segment)
    try:
        obj = json.loads(raw.decode("utf-8"))
    except (ValueError, UnicodeDecodeError):
        raise JwtSvidError(f"token {what} is not valid JSON") from None
    if not isinstance(obj, dict):
        raise JwtSvidError(f"token {what} is not a JSON object")
    return obj


class ParsedToken(NamedTuple):
    """The pieces of a compact JWS that a verifier needs; never printed."""

    header: dict[str, Any]
    claims: dict[str, Any]
    signing_input: bytes
    signature: bytes


def split_token(token: str) -> ParsedToken:
    """Split and decode a compact JWS; checks only that it is one."""
    if len(token) > MAX_TOKEN_BYTES:
        raise JwtSvidError(f"token is too long: {len(token)} bytes, at most {MAX_TOKEN_BYTES}")
    parts = token.split(".")
    if len(parts) != 3:
        raise JwtSvidError(f"token must have 3 dot-separated parts (compact JWS), has {len(parts)}")
    header_b64, claims_b64, sig_b64 = parts
    header = _json_object(header_b64, "header")
    claims = _json_object(claims_b64, "claims")
    signature = b64url_decode(sig_b64)
    return ParsedToken(header, claims, f"{header_b64}.{claims_b64}".encode("ascii"), signature)


class SplitToken(NamedTuple):
    """A compact JWS with its header already checked: what a verifier needs; never printed."""

    alg: str
    kid: str
    claims: dict[str, Any]
    signing_input: bytes
    signature: bytes


def _checked_header(header_b64: str) -> tuple[str, str]:
    return check_header(_json_object(header_b64, "header"))


# One issuer signs with a handful of keys, so the same few header segments come back on every
# token; decoding and checking one is pure, so memoize it (failures are never stored).
_header_memo = functools.lru_cache(maxsize=256)(_checked_header)


def split_and_check_header(token: str) -> SplitToken:
    """``split_token`` plus ``check_header``, the header part memoized: the verifier's fast path."""
    if len(token) > MAX_TOKEN_BYTES:
        raise JwtSvidError(f"token is too long: {len(token)} bytes, at most {MAX_TOKEN_BYTES}")
    parts = token.split(".")
    if len(parts) != 3:
        raise JwtSvidError(f"token must have 3 dot-separated parts (compact JWS), has {len(parts)}")
    header_b64, claims_b64, sig_b64 = parts
    alg, kid = _header_memo(header_b64)
    claims = _json_object(claims_b64, "claims")
    signature = b64url_decode(sig_b64)
    signing_input = token[: len(header_b64) + 1 + len(claims_b64)].encode("ascii")
    return SplitToken(alg, kid, claims, signing_input, signature)


def check_header(header: Mapping[str, Any]) -> tuple[str, str]:
    """The (alg, kid) of a JWT-SVID header, after the SPIFFE header rules."""
    alg = header.get("alg")
    if not isinstance(alg, str) or alg not in ALLOWED_ALGS:
        raise JwtSvidError(f"token alg {alg!r} is not allowed (one of {sorted(ALLOWED_ALGS)})")
    kid = header.get("kid")
    if not isinstance(kid, str) or not kid:
        raise JwtSvidError("token header has no 'kid'")
    typ = header.get("typ", "JWT")
    if not isinstance(typ, str) or typ not in ALLOWED_TYP:
        raise JwtSvidError(f"token typ {header['typ']!r} is not allowed (JWT or JOSE)")
    if "crit" in header:
        # No extension is understood here, so a critical one must fail (RFC 7515 §4.1.11).
        raise JwtSvidError("token header has 'crit' extensions this verifier does not support")
    return alg, kid


def _is_time(value: object) -> TypeGuard[int | float]:
    # JSON allows NaN and Infinity; a NaN exp would compare as never expired.
    if isinstance(value, bool) or not isinstance(value, int | float):
        return False
    return math.isfinite(value) and abs(value) < 2**53


def check_claims(claims: Mapping[str, Any]) -> tuple[SpiffeId, tuple[str, ...], int]:
    """The (sub, aud, exp) of JWT-SVID claims, after the SPIFFE claim rules."""
    sub = claims.get("sub")
    if not isinstance(sub, str):
        raise JwtSvidError("token has no 'sub' claim")
    try:
        sid = _parse_id(sub)
    except SpiffeIdError as exc:
        raise JwtSvidError(f"token 'sub' is not a SPIFFE ID: {exc}") from None
    if not sid.path:
        raise JwtSvidError(f"token 'sub' {sub!r} is a trust domain ID without a path")
    aud = claims.get("aud")
    if isinstance(aud, str):
        audience: tuple[str, ...] = (aud,)
    elif isinstance(aud, list) and aud and all(isinstance(a, str) for a in aud):
        audience = tuple(aud)
    else:
        raise JwtSvidError("token 'aud' claim is missing, empty or not string(s)")
    if not all(audience):
        raise JwtSvidError("token 'aud' claim has an empty audience")
    exp = claims.get("exp")
    if not _is_time(exp):
        raise JwtSvidError("token 'exp' claim is missing or not a finite number")
    for name in ("nbf", "iat"):
        value = claims.get(name)
        if value is not None and not _is_time(value):
            raise JwtSvidError(f"token {name!r} claim is not a finite number")
    return sid, audience, int(exp)


@dataclass(frozen=True)
class JwtSvid:
    """A JWT-SVID. ``token`` is a bearer secret: repr and str never show it."""

    token: str = field(repr=False)
    header: Mapping[str, Any]
    claims: Mapping[str, Any]
    spiffe_id: SpiffeId
    audience: tuple[str, ...]
    expires_at: int

    @classmethod
    def parse_insecure(cls, token: str) -> JwtSvid:
        """Parse and check structure WITHOUT checking the signature: only for trusted input."""
        parsed = split_token(token)
        check_header(parsed.header)
        sid, audience, exp = check_claims(parsed.claims)
        return cls(
            token,
            MappingProxyType(dict(parsed.header)),
            MappingProxyType(dict(parsed.claims)),
            sid,
            audience,
            exp,
        )

    def __repr__(self) -> str:
        return (
            f"JwtSvid(spiffe_id={self.spiffe_id}, audience={list(self.audience)}, "
            f"expires_at={self.expires_at}, kid={self.header.get('kid')!r})"
        )

    __str__ = __repr__
