"""Certificate lists in the encodings the Workload API and operators use: DER and PEM."""

from __future__ import annotations

from collections.abc import Iterable

from cryptography import x509
from cryptography.hazmat.primitives import serialization

from svid._errors import SvidParseError

_SEQUENCE = 0x30
# A certificate is one SEQUENCE; four length bytes already allow 4 GiB, far more than any cert.
_MAX_LENGTH_BYTES = 4


def _element_end(data: bytes, offset: int) -> int:
    """End offset of the DER SEQUENCE starting at ``offset``; SvidParseError on anything else."""
    if data[offset] != _SEQUENCE:
        raise SvidParseError(
            f"certificate at byte offset {offset} does not start with a DER SEQUENCE "
            f"(tag 0x{data[offset]:02x})"
        )
    return _tlv_end(data, offset)


def _tlv_end(data: bytes, offset: int) -> int:
    """End offset of the DER element (any tag) starting at ``offset``."""
    if offset + 1 >= len(data):
        raise SvidParseError(f"certificate at byte offset {offset} is truncated in its length")
    first = data[offset + 1]
    if first < 0x80:
        header, length = 2, first
    else:
        count = first & 0x7F
        if count == 0 or count > _MAX_LENGTH_BYTES:
            raise SvidParseError(
                f"certificate at byte offset {offset} has an invalid DER length form "
                f"(0x{first:02x})"
            )
        if offset + 2 + count > len(data):
            raise SvidParseError(f"certificate at byte offset {offset} is truncated in its length")
        length = int.from_bytes(data[offset + 2 : offset + 2 + count], "big")
        header = 2 + count
    end = offset + header + length
    if end > len(data):
        raise SvidParseError(
            f"certificate at byte offset {offset} is truncated: needs {header + length} bytes, "
            f"{len(data) - offset} left"
        )
    return end


_VERSION_TAG = 0xA0


def tbs_names(tbs: bytes) -> tuple[bytes, bytes]:
    """The raw DER (issuer, subject) Names of a TBSCertificate.

    Comparing encoded names byte for byte is stricter than RFC 5280's name matching and much
    cheaper than building Name objects; SPIFFE CAs copy the issuer's subject bytes verbatim.
    """
    _tlv_end(tbs, 0)  # the outer SEQUENCE must fit
    first = tbs[1]
    pos = 2 + (first & 0x7F if first >= 0x80 else 0)
    if tbs[pos] == _VERSION_TAG:
        pos = _tlv_end(tbs, pos)
    pos = _tlv_end(tbs, pos)  # serialNumber
    pos = _tlv_end(tbs, pos)  # signature AlgorithmIdentifier
    issuer_end = _tlv_end(tbs, pos)
    issuer = tbs[pos:issuer_end]
    pos = _tlv_end(tbs, issuer_end)  # validity
    subject = tbs[pos : _tlv_end(tbs, pos)]
    return issuer, subject


def parse_der_certs(data: bytes) -> list[x509.Certificate]:
    """Split concatenated DER certificates (the Workload API form) and parse each one."""
    if not data:
        raise SvidParseError("no certificates: the DER data is empty")
    certs: list[x509.Certificate] = []
    offset = 0
    while offset < len(data):
        end = _element_end(data, offset)
        try:
            certs.append(x509.load_der_x509_certificate(data[offset:end]))
        except (ValueError, x509.InvalidVersion) as exc:
            raise SvidParseError(
                f"certificate at byte offset {offset} is not a valid X.509 certificate: {exc}"
            ) from None
        offset = end
    return certs


def der_concat(certs: Iterable[x509.Certificate]) -> bytes:
    """Concatenated DER of ``certs``, in order."""
    return b"".join(c.public_bytes(serialization.Encoding.DER) for c in certs)


def certs_to_pem(certs: Iterable[x509.Certificate]) -> bytes:
    """PEM blocks of ``certs``, in order."""
    return b"".join(c.public_bytes(serialization.Encoding.PEM) for c in certs)


def load_pem_certs(data: bytes) -> list[x509.Certificate]:
    """Every CERTIFICATE block of a PEM file; none at all is an error."""
    try:
        certs = x509.load_pem_x509_certificates(data)
    except (ValueError, x509.InvalidVersion) as exc:  # InvalidVersion is no ValueError
        raise SvidParseError(f"PEM data holds no readable certificate: {exc}") from None
    if not certs:
        raise SvidParseError("PEM data holds no certificate")
    return certs
