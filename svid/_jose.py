"""The slice of JOSE (RFC 7515/7518) JWT-SVIDs need: base64url, compact JWS, the SPIFFE algs.

Only asymmetric algorithms exist here. There is deliberately no code path for ``none`` or HMAC, so
no header can talk a verifier into using a public key as a shared secret.
"""

from __future__ import annotations

import base64
import binascii
import hashlib
import json
from collections.abc import Callable, Mapping
from typing import Any

from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec, padding, rsa
from cryptography.hazmat.primitives.asymmetric.utils import (
    Prehashed,
    decode_dss_signature,
    encode_dss_signature,
)

from svid._errors import JwtSvidError

PrivateKey = ec.EllipticCurvePrivateKey | rsa.RSAPrivateKey
PublicKey = ec.EllipticCurvePublicKey | rsa.RSAPublicKey

ALLOWED_ALGS: frozenset[str] = frozenset(
    {"RS256", "RS384", "RS512", "ES256", "ES384", "ES512", "PS256", "PS384", "PS512"}
)

_HASHES: dict[str, type[hashes.HashAlgorithm]] = {
    "256": hashes.SHA256,
    "384": hashes.SHA384,
    "512": hashes.SHA512,
}
# RFC 7518 §3.4 ties each ES alg to one curve; the value is the byte size of r (and of s).
_EC_ALGS: dict[str, tuple[str, int]] = {
    "ES256": ("secp256r1", 32),
    "ES384": ("secp384r1", 48),
    "ES512": ("secp521r1", 66),
}
_CURVE_ALG: dict[str, str] = {curve: alg for alg, (curve, _) in _EC_ALGS.items()}
# Signature-algorithm objects are immutable; build them once instead of per verification.
_ECDSA: dict[str, ec.ECDSA] = {alg: ec.ECDSA(_HASHES[alg[2:]]()) for alg in _EC_ALGS}
# The same with the digest made by hashlib (Prehashed), for the verifiers' per-token checks:
# cryptography would build a hash object per call, which costs a few percent of the check.
_ECDSA_PREHASHED: dict[str, tuple[Callable[[bytes], Any], ec.ECDSA]] = {
    alg: (getattr(hashlib, f"sha{alg[2:]}"), ec.ECDSA(Prehashed(_HASHES[alg[2:]]())))
    for alg in _EC_ALGS
}
# RSA keys below 2048 bits are refused on both sides (RFC 7518 §3.3).
MIN_RSA_BITS = 2048
# Foreign RSA keys past these bounds are refused where they enter (JWKs, X.509 authorities and
# intermediates): a signature check costs with the exponent's and the modulus's size, and OpenSSL
# bounds the exponent only above 3072 bits, so a 3072-bit key with an exponent near its modulus
# makes each check (of any garbage signature naming it) ~130x dearer. Go's crypto/rsa, and so
# SPIRE, refuses an exponent over 2**31-1: no interoperable bundle carries one.
MAX_RSA_BITS = 8192
MAX_RSA_EXPONENT = 2**31 - 1


def rsa_key_problem(key: rsa.RSAPublicKey) -> str | None:
    """Why ``key`` is refused as a foreign RSA key (see MAX_RSA_BITS), or None if it is not."""
    numbers = key.public_numbers()
    bits, e = numbers.n.bit_length(), numbers.e
    if not MIN_RSA_BITS <= bits <= MAX_RSA_BITS:
        return f"RSA modulus has {bits} bits, {MIN_RSA_BITS} to {MAX_RSA_BITS} accepted"
    if e < 3 or e % 2 == 0 or e > MAX_RSA_EXPONENT:
        shown = e if e.bit_length() <= 64 else f"a {e.bit_length()}-bit number"
        return f"RSA public exponent is {shown}, an odd number from 3 to 2**31-1 accepted"
    return None


# The curves Go's crypto/x509 parses certificates on (and so go-spiffe and SPIRE verify chains
# with): the JWS ones and P-224, which CA tooling such as Vault's PKI issues on (key_bits 224).
_X509_EC_CURVES = frozenset({"secp224r1", *_CURVE_ALG})


def ec_key_problem(key: ec.EllipticCurvePublicKey) -> str | None:
    """Why ``key`` is refused as a foreign certificate's EC key, or None: a curve other than
    P-224, P-256, P-384 and P-521, the ones Go's crypto/x509 parses certificates on. A check on
    brainpoolP512r1 costs ~15 times one on P-256 (one on P-224 costs no more than on P-256)."""
    if key.curve.name in _X509_EC_CURVES:
        return None
    return f"EC curve {key.curve.name} is not accepted (P-224, P-256, P-384 or P-521)"


def b64url_encode(data: bytes) -> str:
    """Unpadded base64url, as JOSE writes it."""
    return base64.urlsafe_b64encode(data).rstrip(b"=").decode("ascii")


_STD_TO_URL = bytes.maketrans(b"+/", b"-_")


def b64url_bytes(data: bytes) -> bytes:
    """Unpadded base64url as bytes (what b64url_encode returns, before its decode)."""
    return binascii.b2a_base64(data, newline=False).translate(_STD_TO_URL).rstrip(b"=")


_URL_TO_STD = bytes.maketrans(b"-_", b"+/")


def b64url_decode(text: str) -> bytes:
    """Decode base64url with or without padding; anything else is a JwtSvidError."""
    try:
        raw = text.encode("ascii")
    except UnicodeEncodeError:
        raise JwtSvidError("base64url text has non-ASCII characters") from None
    if b"+" in raw or b"/" in raw:
        raise JwtSvidError("base64url text uses '+' or '/' (standard base64, not base64url)")
    raw = raw.rstrip(b"=")
    if len(raw) % 4 == 1:
        raise JwtSvidError(f"base64url text has an impossible length {len(raw)}")
    try:
        return binascii.a2b_base64(
            raw.translate(_URL_TO_STD) + b"=" * (-len(raw) % 4), strict_mode=True
        )
    except (binascii.Error, ValueError):
        raise JwtSvidError("base64url text has characters outside the alphabet") from None


def alg_for_key(key: PrivateKey | PublicKey) -> str:
    """The JWS alg a key signs with: ES256/384/512 by curve, RS256 for RSA."""
    if isinstance(key, ec.EllipticCurvePrivateKey | ec.EllipticCurvePublicKey):
        alg = _CURVE_ALG.get(key.curve.name)
        if alg is None:
            raise JwtSvidError(f"EC curve {key.curve.name} has no JWS alg (P-256/384/521 only)")
        return alg
    if isinstance(key, rsa.RSAPrivateKey | rsa.RSAPublicKey):
        return "RS256"
    raise JwtSvidError(f"key type {type(key).__name__} cannot sign JWT-SVIDs (EC or RSA only)")


def _json_segment(obj: Mapping[str, Any]) -> str:
    return b64url_encode(json.dumps(obj, separators=(",", ":"), sort_keys=False).encode())


def sign_jws(header: Mapping[str, Any], claims: Mapping[str, Any], key: PrivateKey) -> str:
    """Compact JWS of ``claims``; ``header['alg']`` defaults to the key's alg and must fit it."""
    alg = str(header.get("alg") or alg_for_key(key))
    if alg not in ALLOWED_ALGS:
        raise JwtSvidError(f"alg {alg!r} is not allowed for JWT-SVIDs")
    full_header = {"alg": alg, **{k: v for k, v in header.items() if k != "alg"}}
    signing_input = f"{_json_segment(full_header)}.{_json_segment(claims)}".encode("ascii")
    return f"{signing_input.decode('ascii')}.{b64url_encode(sign_raw(alg, signing_input, key))}"


def sign_raw(alg: str, signing_input: bytes, key: PrivateKey) -> bytes:
    """The JWS signature bytes of ``signing_input`` (ES* as raw r||s)."""
    hash_alg = _HASHES[alg[2:]]()
    family = alg[:2]
    if family == "ES":
        if not isinstance(key, ec.EllipticCurvePrivateKey):
            raise JwtSvidError(f"alg {alg} needs an EC key, got {type(key).__name__}")
        curve, size = _EC_ALGS[alg]
        if key.curve.name != curve:
            raise JwtSvidError(f"alg {alg} needs curve {curve}, key is on {key.curve.name}")
        return ecdsa_der_to_raw(key.sign(signing_input, ec.ECDSA(hash_alg)), size)
    if not isinstance(key, rsa.RSAPrivateKey):
        raise JwtSvidError(f"alg {alg} needs an RSA key, got {type(key).__name__}")
    if key.key_size < MIN_RSA_BITS:
        raise JwtSvidError(f"RSA key has {key.key_size} bits, at least {MIN_RSA_BITS} needed")
    if family == "RS":
        return key.sign(signing_input, padding.PKCS1v15(), hash_alg)
    return key.sign(
        signing_input,
        padding.PSS(mgf=padding.MGF1(hash_alg), salt_length=hash_alg.digest_size),
        hash_alg,
    )


def verify_jws_signature(
    alg: str, signing_input: bytes, signature: bytes, public_key: object
) -> bool:
    """True only if ``signature`` is valid for ``alg`` under ``public_key``.

    A wrong alg for the key's type or curve is a False, never a cross-family attempt.
    """
    if alg not in ALLOWED_ALGS:
        return False
    family = alg[:2]
    try:
        if family == "ES":
            if not isinstance(public_key, ec.EllipticCurvePublicKey):
                return False
            curve, size = _EC_ALGS[alg]
            if len(signature) != 2 * size or public_key.curve.name != curve:
                return False
            der = encode_dss_signature(
                int.from_bytes(signature[:size], "big"), int.from_bytes(signature[size:], "big")
            )
            public_key.verify(der, signing_input, _ECDSA[alg])
            return True
        hash_alg = _HASHES[alg[2:]]()
        if not isinstance(public_key, rsa.RSAPublicKey) or public_key.key_size < MIN_RSA_BITS:
            return False
        if family == "RS":
            public_key.verify(signature, signing_input, padding.PKCS1v15(), hash_alg)
        else:
            public_key.verify(
                signature,
                signing_input,
                padding.PSS(mgf=padding.MGF1(hash_alg), salt_length=hash_alg.digest_size),
                hash_alg,
            )
        return True
    except (InvalidSignature, ValueError):
        return False


def _der_frames(size: int) -> tuple[tuple[bytes, bytes], ...]:
    """The DER around r and s for each pair of high bits, when neither has a leading zero byte."""
    frames = []
    for high in range(4):
        r_len, s_len = size + (high & 1), size + (high >> 1)
        body = 4 + r_len + s_len
        length = bytes((body,)) if body < 0x80 else bytes((0x81, body))
        head = b"\x30" + length + bytes((2, r_len)) + b"\0" * (high & 1)
        frames.append((head, bytes((2, s_len)) + b"\0" * (high >> 1)))
    return tuple(frames)


_DER_FRAMES = {size: _der_frames(size) for _, size in _EC_ALGS.values()}


def ecdsa_der(signature: bytes, size: int) -> bytes:
    """The DER ECDSA-Sig-Value of a JWS r||s signature of ``2 * size`` bytes.

    ``encode_dss_signature`` does the same from two Python ints; this skips the int round trip,
    a noticeable part of the per-token work. Minimal INTEGERs (no leading zero bytes, one 0x00
    before a set high bit), as OpenSSL insists on canonical DER; tests compare the two.
    """
    r0, s0 = signature[0], signature[size]
    if r0 and s0:  # nearly always: the lengths follow from the high bits alone
        head, mid = _DER_FRAMES[size][r0 >> 7 | s0 >> 7 << 1]
        return head + signature[:size] + mid + signature[size:]
    r = signature[:size].lstrip(b"\0") or b"\0"
    s = signature[size:].lstrip(b"\0") or b"\0"
    if r[0] & 0x80:
        r = b"\0" + r
    if s[0] & 0x80:
        s = b"\0" + s
    body = len(r) + len(s) + 4
    # At most 2 * 67 + 4 = 138 (P-521): one long-form length byte covers every curve.
    head = bytes((0x30, body)) if body < 0x80 else bytes((0x30, 0x81, body))
    return b"".join((head, b"\2", bytes((len(r),)), r, b"\2", bytes((len(s),)), s))


SignatureCheck = Callable[[bytes, bytes], bool]


def signature_check(alg: str, public_key: object) -> SignatureCheck | None:
    """``verify_jws_signature`` with ``alg`` and ``public_key`` fixed and their fit checked once.

    None when ``alg`` does not fit the key (family, curve, RSA size): such a token never verifies.
    Verifiers keep one per (kid, alg) of a bundle, so the per-token work is the signature alone.
    """
    if alg not in ALLOWED_ALGS:
        return None
    family = alg[:2]
    if family == "ES":
        curve, size = _EC_ALGS[alg]
        if not isinstance(public_key, ec.EllipticCurvePublicKey) or public_key.curve.name != curve:
            return None
        ec_key, (digest, ecdsa) = public_key, _ECDSA_PREHASHED[alg]

        def check_ec(signing_input: bytes, signature: bytes) -> bool:
            if len(signature) != 2 * size:
                return False
            try:
                ec_key.verify(ecdsa_der(signature, size), digest(signing_input).digest(), ecdsa)
            except (InvalidSignature, ValueError):
                return False
            return True

        return check_ec
    if not isinstance(public_key, rsa.RSAPublicKey) or public_key.key_size < MIN_RSA_BITS:
        return None
    rsa_key, hash_alg = public_key, _HASHES[alg[2:]]()
    pad: padding.AsymmetricPadding = (
        padding.PKCS1v15()
        if family == "RS"
        else padding.PSS(mgf=padding.MGF1(hash_alg), salt_length=hash_alg.digest_size)
    )

    def check_rsa(signing_input: bytes, signature: bytes) -> bool:
        try:
            rsa_key.verify(signature, signing_input, pad, hash_alg)
        except (InvalidSignature, ValueError):
            return False
        return True

    return check_rsa


def public_key_thumbprint_kid(public_key: PublicKey) -> str:
    """A stable key id: base64url SHA-256 of the SPKI DER, first 32 characters."""
    spki = public_key.public_bytes(
        serialization.Encoding.DER, serialization.PublicFormat.SubjectPublicKeyInfo
    )
    return b64url_encode(hashlib.sha256(spki).digest())[:32]


def ecdsa_der_to_raw(der: bytes, size: int) -> bytes:
    """r || s, each `size` bytes, of a DER ECDSA-Sig-Value, as JOSE wants it.

    Equal to decode_dss_signature plus to_bytes (tests compare them on many signatures), which
    cost as much as the rest of minting a token. Read here: the short DER form OpenSSL writes
    for P-256 and P-384, with minimal positive INTEGERs that fit; anything else goes through
    decode_dss_signature.
    """
    end = len(der)
    if end < 8 or der[0] != 0x30 or der[1] != end - 2 or der[2] != 0x02:
        return _ecdsa_der_to_raw_slow(der, size)
    s_at = 4 + der[3]
    if s_at + 3 > end or der[s_at] != 0x02 or s_at + 2 + der[s_at + 1] != end:
        return _ecdsa_der_to_raw_slow(der, size)
    r = der[4:s_at]
    s = der[s_at + 2 :]
    if not (_fits(r, size) and _fits(s, size)):
        return _ecdsa_der_to_raw_slow(der, size)
    return r[-size:].rjust(size, b"\x00") + s[-size:].rjust(size, b"\x00")


def _fits(integer: bytes, size: int) -> bool:
    """A minimal DER positive INTEGER body whose value fits in `size` bytes."""
    if not integer or integer[0] & 0x80:
        return False
    if integer[0] == 0:
        # One leading zero only when the next byte would read as negative.
        return len(integer) == 1 or (integer[1] & 0x80 != 0 and len(integer) <= size + 1)
    return len(integer) <= size


def _ecdsa_der_to_raw_slow(der: bytes, size: int) -> bytes:
    r, s = decode_dss_signature(der)
    return r.to_bytes(size, "big") + s.to_bytes(size, "big")
