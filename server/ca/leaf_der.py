"""X.509-SVID leaves encoded by hand: the TBSCertificate the signer's CertificateBuilder would
make, filled from a per-CA template, then signed with the CA key directly.

Why: `CertificateBuilder.sign` builds every field anew per leaf (~72 µs per P-256 leaf against
~25 µs for the bare signature, bench), while the fields that vary per leaf (serial, validity,
key, SKID, SAN) are a few byte strings to splice into constant DER. (cryptography 50 holds the
GIL in `private_key.sign` too, so cores come from signing worker processes: server.ca.workers.)

The output must be byte for byte what the builder makes; X509Signer checks that once per CA
against the builder (and falls back to the builder if it ever differs), and the tests compare
the two over many inputs. Only what X509Signer produces is covered: the extension order, the
subject and the encodings below are the ones its builder call uses.
"""

from __future__ import annotations

import hashlib
import time
from collections.abc import Callable, Sequence

from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.asymmetric import ec, padding, rsa
from cryptography.hazmat.primitives.serialization import Encoding, PublicFormat

from server.ca.keys import PrivateKey, PublicKey
from svid._cert_der import read_tlv

# Tags (X.690): universal INTEGER, BIT STRING, OCTET STRING, SEQUENCE, UTCTime, GeneralizedTime;
# context-specific [0] and [3] constructed (version, extensions) and the GeneralName choices
# [2] dNSName and [6] uniformResourceIdentifier (IA5String, implicit).
_INTEGER = 0x02
_BIT_STRING = 0x03
_OCTET_STRING = 0x04
_SEQUENCE = 0x30
_UTC_TIME = 0x17
_GENERALIZED_TIME = 0x18
_EXPLICIT_0 = 0xA0
_EXPLICIT_3 = 0xA3
_DNS_NAME = 0x82
_URI = 0x86
_VERSION_3 = b"\xa0\x03\x02\x01\x02"
_CRITICAL = b"\x01\x01\xff"
_OBJECT_IDENTIFIER = 0x06
# RFC 5280 §4.1.2.5: UTCTime through 2049, GeneralizedTime from 2050 (as cryptography does).
# Years before 1950 cannot be encoded the way the builder does: LeafTemplate refuses them.
_FIRST_GENERALIZED_YEAR = 2050
_FIRST_YEAR = 1950
_LAST_YEAR = 9999


def tlv(tag: int, content: bytes) -> bytes:
    """One DER element: tag, definite length (short or long form), content."""
    size = len(content)
    if size < 0x80:
        return bytes((tag, size)) + content
    length = size.to_bytes((size.bit_length() + 7) // 8, "big")
    return bytes((tag, 0x80 | len(length))) + length + content


def der_integer(value: int) -> bytes:
    """A non-negative INTEGER in its minimal two's-complement form (a leading 0 if the top bit
    is set)."""
    if value < 0:
        raise ValueError("only non-negative integers are encoded here")
    return tlv(_INTEGER, value.to_bytes(value.bit_length() // 8 + 1, "big"))


def der_time(seconds: int) -> bytes:
    """UTCTime (1950-2049) or GeneralizedTime (2050-9999) of a Unix time, whole seconds, Z."""
    t = time.gmtime(seconds)
    year = t.tm_year
    if not _FIRST_YEAR <= year <= _LAST_YEAR:
        raise ValueError(f"year {year} is outside {_FIRST_YEAR}-{_LAST_YEAR}")
    rest = f"{t.tm_mon:02d}{t.tm_mday:02d}{t.tm_hour:02d}{t.tm_min:02d}{t.tm_sec:02d}Z"
    if year < _FIRST_GENERALIZED_YEAR:
        return tlv(_UTC_TIME, f"{year % 100:02d}{rest}".encode("ascii"))
    return tlv(_GENERALIZED_TIME, f"{year:04d}{rest}".encode("ascii"))


def oid_der(dotted: str) -> bytes:
    """An OBJECT IDENTIFIER: first two arcs as 40*a+b, then base-128 with continuation bits."""
    arcs = [int(a) for a in dotted.split(".")]
    if len(arcs) < 2 or arcs[0] > 2 or (arcs[0] < 2 and arcs[1] >= 40) or min(arcs) < 0:
        raise ValueError(f"{dotted!r} is not an OID")
    body = bytearray()
    for arc in [40 * arcs[0] + arcs[1], *arcs[2:]]:
        chunk = [arc & 0x7F]
        rest = arc >> 7
        while rest:
            chunk.append(0x80 | (rest & 0x7F))
            rest >>= 7
        body.extend(reversed(chunk))
    return tlv(_OBJECT_IDENTIFIER, bytes(body))


def extension(oid: bytes, critical: bool, value_der: bytes) -> bytes:
    """Extension ::= SEQUENCE { extnID, critical BOOLEAN DEFAULT FALSE, extnValue OCTET STRING };
    DER leaves out a FALSE default."""
    return tlv(_SEQUENCE, oid + (_CRITICAL if critical else b"") + tlv(_OCTET_STRING, value_der))


def san_value(uri: str, dns_names: Sequence[str]) -> bytes:
    """GeneralNames with the URI first, then the DNS names; IA5String, so ASCII only
    (UnicodeEncodeError otherwise: the caller lets the builder handle such a name)."""
    names = [tlv(_URI, uri.encode("ascii"))]
    names.extend(tlv(_DNS_NAME, name.encode("ascii")) for name in dns_names)
    return tlv(_SEQUENCE, b"".join(names))


# id-ce-subjectKeyIdentifier and id-ce-subjectAltName.
_OID_SKID = oid_der("2.5.29.14")
_OID_SAN = oid_der("2.5.29.17")


def public_key_der(key: PublicKey) -> tuple[bytes, bytes]:
    """(SubjectPublicKeyInfo DER, SKID extension DER) of a leaf key.

    The SKID is RFC 5280 §4.2.1.2 method 1, the SHA-1 of the subjectPublicKey BIT STRING's
    bits, as cryptography's SubjectKeyIdentifier.from_public_key computes it (the X9.62 point
    of an EC key, the PKCS#1 RSAPublicKey of an RSA key): read here out of the SPKI just
    encoded instead of asking the key for a second encoding.
    """
    spki = key.public_bytes(Encoding.DER, PublicFormat.SubjectPublicKeyInfo)
    _, start, _ = read_tlv(spki, 0, len(spki))
    _, _, algorithm_end = read_tlv(spki, start, len(spki))
    _, bits_start, bits_end = read_tlv(spki, algorithm_end, len(spki))
    # The first content byte of the BIT STRING counts unused bits (0 for a key).
    digest = hashlib.sha1(spki[bits_start + 1 : bits_end]).digest()  # noqa: S324 - an identifier
    return spki, extension(_OID_SKID, False, tlv(_OCTET_STRING, digest))


class LeafTemplate:
    """The constant parts of one CA's leaves, and the per-leaf encoding and signature.

    `signature_algorithm` is the AlgorithmIdentifier DER the builder writes for this CA key
    (X509Signer takes it from a certificate the builder made); `head_extensions` are the DER
    extensions before the SKID, `akid_extension` the one after it.
    """

    def __init__(
        self,
        ca_key: PrivateKey,
        hash_algorithm: hashes.HashAlgorithm,
        *,
        signature_algorithm: bytes,
        issuer_der: bytes,
        subject_der: bytes,
        head_extensions: bytes,
        akid_extension: bytes,
    ) -> None:
        sign: Callable[[bytes], bytes]
        if isinstance(ca_key, ec.EllipticCurvePrivateKey):
            ecdsa = ec.ECDSA(hash_algorithm)
            sign = lambda tbs: ca_key.sign(tbs, ecdsa)  # noqa: E731
        elif isinstance(ca_key, rsa.RSAPrivateKey):
            pkcs1 = padding.PKCS1v15()
            sign = lambda tbs: ca_key.sign(tbs, pkcs1, hash_algorithm)  # noqa: E731
        else:
            raise TypeError(f"no leaf template for a {type(ca_key).__name__} CA key")
        self._sign = sign
        self._sig_alg = signature_algorithm
        # version, then (after the serial) signature algorithm and issuer: fixed per CA.
        self._after_serial = signature_algorithm + issuer_der
        self._subject = subject_der
        self._head = head_extensions
        self._akid = akid_extension
        # Leaves signed in the same second share their validity: encode it once. One tuple,
        # replaced whole, so threads never see a key with another key's bytes.
        self._validity: tuple[int, int, bytes] = (0, 0, b"")

    def tbs(
        self,
        *,
        serial: int,
        not_before: int,
        not_after: int,
        spki: bytes,
        skid_extension: bytes,
        san: bytes,
    ) -> bytes:
        """The TBSCertificate; ValueError for what it cannot encode as the builder would."""
        if serial <= 0:
            raise ValueError("serial must be positive")
        last_before, last_after, validity = self._validity
        if (last_before, last_after) != (not_before, not_after) or not validity:
            validity = tlv(_SEQUENCE, der_time(not_before) + der_time(not_after))
            self._validity = (not_before, not_after, validity)
        extensions = self._head + skid_extension + self._akid + extension(_OID_SAN, False, san)
        return tlv(
            _SEQUENCE,
            b"".join(
                (
                    _VERSION_3,
                    der_integer(serial),
                    self._after_serial,
                    validity,
                    self._subject,
                    spki,
                    tlv(_EXPLICIT_3, tlv(_SEQUENCE, extensions)),
                )
            ),
        )

    def sign(self, tbs: bytes) -> bytes:
        """The Certificate DER: tbs, the signature algorithm, the CA's signature over tbs."""
        signature = self._sign(tbs)
        # BIT STRING: a leading 0 (no unused bits) before the signature bytes.
        return tlv(_SEQUENCE, tbs + self._sig_alg + tlv(_BIT_STRING, b"\x00" + signature))


def signature_algorithm_of(certificate_der: bytes) -> bytes:
    """The outer signatureAlgorithm DER of a certificate (the element after the TBS)."""
    size = len(certificate_der)
    _, start, end = read_tlv(certificate_der, 0, size)
    _, _, tbs_end = read_tlv(certificate_der, start, size)
    _, _, alg_end = read_tlv(certificate_der, tbs_end, size)
    if alg_end > end:
        raise ValueError("signature algorithm runs past the certificate")
    return certificate_der[tbs_end:alg_end]
