"""JWT-SVIDs as values: structure checks only. Signature and time checks live in the verifier."""

from __future__ import annotations

import binascii
import json
import math
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from types import MappingProxyType
from typing import Any, NamedTuple, TypeGuard, TypeVar

from svid._errors import JwtSvidError, SpiffeIdError
from svid._frozen_json import freeze_nested
from svid._jose import ALLOWED_ALGS, b64url_decode
from svid._spiffe_id import SpiffeId
from svid._verified_memo import VerifiedMemo

# The same few subjects come back again and again; the parse is pure, so memoize it. Filled only
# with the subjects of tokens whose signature checked out (token_verified): subjects of forged
# tokens, each unique, evicted the honest ones otherwise.
_SUBJECTS: VerifiedMemo[str, SpiffeId] = VerifiedMemo(4096)


def _parse_id(sub: str) -> SpiffeId:
    known = _SUBJECTS.get(sub)
    return known if known is not None else SpiffeId.parse(sub)


ALLOWED_TYP = frozenset({"JWT", "JOSE"})
# A token is a bearer secret read from the network; bound its size before decoding anything.
MAX_TOKEN_BYTES = 64 * 1024
_UNPADDED = (
    "token has base64 padding ('='): a compact JWS is unpadded base64url (RFC 7515 section 2)"
)
_SPARE_BITS = (
    "token signature is not canonical base64url: its last character sets bits past the last "
    "byte (RFC 4648 section 3.5)"
)
# The bits the last character of a base64url text carries past its last byte, by the text's
# length mod 4 (a length of 1 mod 4 the decoder refuses).
_SPARE_MASK = (0, 0, 0x0F, 0x03)
_B64URL_VALUES = {
    c: i for i, c in enumerate("ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789-_")
}


def _spare_bits_set(token: str) -> bool:
    """Whether the signature segment (the token's last) ends in a character with bits set past
    its last byte. The decoder drops them, so each of their values (16 for an ES256 or RS256
    signature) made another token of one signature, verified and cached apart: the header and
    claims segments are signed as text, so only the signature's can vary so."""
    mask = _SPARE_MASK[(len(token) - token.rfind(".") - 1) & 3]
    return bool(mask) and bool(_B64URL_VALUES.get(token[-1], 0) & mask)


def _check_compact(token: str) -> None:
    """The size bound, no padding and no spare bits set: a signature segment read with any
    number of '=' after it (or any value of its last character's spare bits) made as many tokens
    of one signature, each a verifier cache entry of its own (up to 64 KB): whoever held any
    token a service accepts could fill its cache with copies of it."""
    if len(token) > MAX_TOKEN_BYTES:
        raise JwtSvidError(f"token is too long: {len(token)} bytes, at most {MAX_TOKEN_BYTES}")
    if "=" in token:
        raise JwtSvidError(_UNPADDED)
    if token and _spare_bits_set(token):
        raise JwtSvidError(_SPARE_BITS)


# base64url to standard base64 for a2b_base64; '+' and '/' (not base64url) become '.', which the
# strict decoder refuses like any character outside the alphabet.
_B64URL = bytes.maketrans(b"-_+/", b"+/..")
_B64_PAD = (b"", b"===", b"==", b"=")
_MAX_SAFE = 2**53
_a2b = binascii.a2b_base64
# The C scanner under json.loads, without its Python wrapper and whitespace regexes; whitespace
# around the object (which json.loads allows) takes json.loads itself.
_json_scan: Callable[[str, int], tuple[Any, int]] = json.JSONDecoder().scan_once  # type: ignore[attr-defined]


def _b64(segment: bytes) -> bytes:
    """An unpadded base64url segment of a token ``_check_compact`` passed."""
    try:
        return _a2b(segment.translate(_B64URL) + _B64_PAD[len(segment) & 3], strict_mode=True)
    except ValueError:
        pass
    b64url_decode(segment.decode("ascii"))  # raises, saying why
    raise JwtSvidError("base64url text has characters outside the alphabet")  # pragma: no cover


def _json_object(raw: bytes, what: str) -> dict[str, Any]:
    try:
        text = raw.decode("utf-8")
        try:
            obj, end = _json_scan(text, 0)
        except StopIteration:  # no value at 0: maybe whitespace first
            end = -1
        if end != len(text):
            obj = json.loads(text)  # whitespace around the object, or not JSON: it says which
    except (ValueError, RecursionError):  # deep nesting is the sender's too; UnicodeError too
        raise JwtSvidError(f"token {what} is not valid JSON") from None
    if not isinstance(obj, dict):
        raise JwtSvidError(f"token {what} is not a JSON object")
    return obj


_H = TypeVar("_H")


def _split(
    token: str, read_header: Callable[[bytes], _H]
) -> tuple[_H, dict[str, Any], bytes, bytes]:
    """(header as ``read_header`` makes it, claims, signing input, signature) of a compact JWS:
    the one splitter under every reader of tokens here. JwtSvidError saying what is wrong.

    Written for the common case, inline (it is most of a new token's work besides the
    signature); anything unusual takes _check_compact, _b64 and _json_object, which say why."""
    if len(token) > MAX_TOKEN_BYTES or "=" in token or (token and _spare_bits_set(token)):
        _check_compact(token)  # raises
    if token.count(".") != 2:
        raise JwtSvidError(
            f"token must have 3 dot-separated parts (compact JWS), has {token.count('.') + 1}"
        )
    try:
        raw = token.encode("ascii")
    except UnicodeEncodeError:
        raise JwtSvidError("base64url text has non-ASCII characters") from None
    header_b64, claims_b64, sig_b64 = raw.split(b".")
    header = read_header(header_b64)
    try:
        text = _a2b(
            claims_b64.translate(_B64URL) + _B64_PAD[len(claims_b64) & 3], strict_mode=True
        ).decode("utf-8")
        claims, end = _json_scan(text, 0)
        if end != len(text) or type(claims) is not dict:
            raise ValueError
        signature = _a2b(sig_b64.translate(_B64URL) + _B64_PAD[len(sig_b64) & 3], strict_mode=True)
    except (ValueError, StopIteration, RecursionError):  # UnicodeError is a ValueError
        claims = _json_object(_b64(claims_b64), "claims")
        signature = _b64(sig_b64)
    return header, claims, raw[: len(header_b64) + 1 + len(claims_b64)], signature


class ParsedToken(NamedTuple):
    """The pieces of a compact JWS that a verifier needs; never printed."""

    header: dict[str, Any]
    claims: dict[str, Any]
    signing_input: bytes
    signature: bytes


def _header_object(segment: bytes) -> dict[str, Any]:
    return _json_object(_b64(segment), "header")


def split_token(token: str) -> ParsedToken:
    """Split and decode a compact JWS; checks only that it is one."""
    return ParsedToken(*_split(token, _header_object))


class SplitToken(NamedTuple):
    """A compact JWS with its header already checked: what a verifier needs; never printed."""

    alg: str
    kid: str
    claims: dict[str, Any]
    signing_input: bytes
    signature: bytes


# One issuer signs with a handful of keys, so the same few header segments come back on every
# token; decoding and checking one is pure, so memoize it. Filled only by the verifiers, with the
# header of a token whose signature they checked (``token_verified``, ``typed_header_verified``):
# a forged header's is not kept, so forgeries cannot evict the headers honest tokens use.
_HEADERS: VerifiedMemo[bytes, tuple[str, str]] = VerifiedMemo(256)
_TYPED_HEADERS: VerifiedMemo[bytes, tuple[str, str, str]] = VerifiedMemo(256)


def _svid_header(segment: bytes) -> tuple[str, str]:
    known = _HEADERS.get(segment)
    return known if known is not None else check_header(_header_object(segment))


def _typed_header(segment: bytes) -> tuple[str, str, str]:
    known = _TYPED_HEADERS.get(segment)
    return known if known is not None else check_typed_header(_header_object(segment))


def token_verified(signing_input: bytes, alg: str, kid: str, sub: str, sid: SpiffeId) -> None:
    """Memoize the header and subject (``sub``, parsed as ``sid``) of a JWT-SVID split by
    ``split_and_check_header`` or ``split_and_check_fast`` whose signature checked out."""
    _HEADERS.remember(signing_input[: signing_input.index(b".")], (alg, kid))
    _SUBJECTS.remember(sub, sid)


def typed_header_verified(signing_input: bytes, alg: str, kid: str, typ: str) -> None:
    """Memoize the header of a token split by ``split_typed_token`` whose signature checked out."""
    _TYPED_HEADERS.remember(signing_input[: signing_input.index(b".")], (alg, kid, typ))


def split_and_check_header(token: str) -> SplitToken:
    """``split_token`` plus ``check_header``, the header part memoized: the verifier's path."""
    (alg, kid), claims, signing_input, signature = _split(token, _svid_header)
    return SplitToken(alg, kid, claims, signing_input, signature)


def split_typed_token(token: str) -> tuple[str, SplitToken]:
    """(typ, the token split) of a JWT that must name its type (``check_typed_header``), such as
    an RFC 9068 access token or a Txn-Token; the header part memoized. The caller decides which
    ``typ`` it takes and what the claims must be."""
    (alg, kid, typ), claims, signing_input, signature = _split(token, _typed_header)
    return typ, SplitToken(alg, kid, claims, signing_input, signature)


FastToken = tuple[str, str, dict[str, Any], SpiffeId, tuple[str, ...], int, bytes, bytes]


def split_and_check_fast(token: str) -> FastToken | None:
    """``split_and_check_header`` and ``check_claims`` in one pass for a plain JWT-SVID, or None.

    (alg, kid, claims, sub, aud, exp, signing_input, signature), equal to what the two functions
    give, whenever the token is unremarkable: integer times, ``aud`` a string or a list of
    strings. For anything else, valid or not, None: the caller then runs those two functions,
    which accept or say why not. Tests compare the two paths on valid and broken tokens.
    """
    try:
        (alg, kid), claims, signing_input, signature = _split(token, _svid_header)
        get = claims.get
        sub, aud, exp, nbf, iat = get("sub"), get("aud"), get("exp"), get("nbf"), get("iat")
        if type(sub) is not str or type(exp) is not int or not -_MAX_SAFE < exp < _MAX_SAFE:
            return None
        if type(aud) is list:
            audience = tuple(aud)
            if not audience:
                return None
            for a in audience:
                if type(a) is not str or not a:
                    return None
        elif type(aud) is str and aud:
            audience = (aud,)
        else:
            return None
        if nbf is not None and (type(nbf) is not int or not -_MAX_SAFE < nbf < _MAX_SAFE):
            return None
        if iat is not None and (type(iat) is not int or not -_MAX_SAFE < iat < _MAX_SAFE):
            return None
        # A null nbf/iat, or a jti that is not a string: check_claims refuses it and says why.
        if (nbf is None and "nbf" in claims) or (iat is None and "iat" in claims):
            return None
        jti = get("jti")
        if type(jti) is not str and "jti" in claims:
            return None
        sid = _parse_id(sub)
    except (ValueError, JwtSvidError, SpiffeIdError):
        # A token _split refuses, or a sub that is no SPIFFE ID (UnicodeError, a ValueError,
        # for a lone surrogate): the general path says which.
        return None
    if not sid.path:
        return None
    return alg, kid, claims, sid, audience, exp, signing_input, signature


def check_header(header: Mapping[str, Any]) -> tuple[str, str]:
    """The (alg, kid) of a JWT-SVID header, after the SPIFFE header rules."""
    alg, kid = _alg_and_kid(header)
    typ = header.get("typ", "JWT")
    if not isinstance(typ, str) or typ not in ALLOWED_TYP:
        raise JwtSvidError(f"token typ {header['typ']!r} is not allowed (JWT or JOSE)")
    return alg, kid


def check_typed_header(header: Mapping[str, Any]) -> tuple[str, str, str]:
    """The (alg, kid, typ) of a header that must name its type, as RFC 9068 access tokens and
    Txn-Tokens do: the alg and kid rules of a JWT-SVID, and ``typ`` as a media type compares
    (RFC 7515 §4.1.9: lowercase, the ``application/`` prefix optional)."""
    alg, kid = _alg_and_kid(header)
    typ = header.get("typ")
    if not isinstance(typ, str) or not typ:
        raise JwtSvidError("token header has no 'typ'")
    typ = typ.lower()
    return alg, kid, typ.removeprefix("application/")


def _alg_and_kid(header: Mapping[str, Any]) -> tuple[str, str]:
    alg = header.get("alg")
    if not isinstance(alg, str) or alg not in ALLOWED_ALGS:
        raise JwtSvidError(f"token alg {alg!r} is not allowed (one of {sorted(ALLOWED_ALGS)})")
    kid = header.get("kid")
    if not isinstance(kid, str) or not kid:
        raise JwtSvidError("token header has no 'kid'")
    if "crit" in header:
        # No extension is understood here, so a critical one must fail (RFC 7515 §4.1.11).
        raise JwtSvidError("token header has 'crit' extensions this verifier does not support")
    return alg, kid


def is_time(value: object) -> TypeGuard[int | float]:
    # JSON allows NaN and Infinity; a NaN exp would compare as never expired.
    if isinstance(value, bool) or not isinstance(value, int | float):
        return False
    if isinstance(value, int):  # isfinite() would raise OverflowError beyond a double's range
        return abs(value) < 2**53
    return math.isfinite(value) and abs(value) < 2**53


def check_claims(claims: Mapping[str, Any]) -> tuple[SpiffeId, tuple[str, ...], int]:
    """The (sub, aud, exp) of JWT-SVID claims, after the SPIFFE claim rules."""
    sub = claims.get("sub")
    if not isinstance(sub, str):
        raise JwtSvidError("token has no 'sub' claim")
    try:
        sid = _parse_id(sub)
    except (SpiffeIdError, UnicodeError) as exc:  # JSON strings may hold lone surrogates
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
    if not is_time(exp):
        raise JwtSvidError("token 'exp' claim is missing or not a finite number")
    for name in ("nbf", "iat"):
        if name in claims and not is_time(claims[name]):  # null is not a NumericDate either
            raise JwtSvidError(f"token {name!r} claim is not a finite number")
    if "jti" in claims and not isinstance(claims["jti"], str):  # RFC 7519 4.1.7; as PyJWT
        raise JwtSvidError("token 'jti' claim is not a string")
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
        # Read-only at every depth: a JwtSvid is cached and handed out again (tasks, clients).
        return cls(
            token,
            MappingProxyType(freeze_nested(parsed.header)),
            MappingProxyType(freeze_nested(parsed.claims)),
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
