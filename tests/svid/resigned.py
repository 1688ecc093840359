"""Certificates cryptography will not build (an ediPartyName GeneralName, a SHA-1 signature),
assembled from a built one's DER and signed again with the real key."""

from __future__ import annotations

from collections.abc import Callable

from cryptography import x509
from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.asymmetric import ec

from svid import der_concat
from svid._cert_der import read_tlv
from tests.svid.certs import Issued, make_ca

_OID_SAN = bytes.fromhex("0603551d11")
ECDSA_SHA256 = bytes.fromhex("300a06082a8648ce3d040302")
RSA_SHA1 = bytes.fromhex("300d06092a864886f70d0101050500")


def _tlv(tag: int, content: bytes) -> bytes:
    n = len(content)
    if n < 0x80:
        length = bytes([n])
    elif n < 0x100:
        length = b"\x81" + bytes([n])
    else:
        length = b"\x82" + n.to_bytes(2, "big")
    return bytes([tag]) + length + content


def _elements(data: bytes, start: int, end: int) -> list[bytes]:
    out = []
    while start < end:
        _, _, stop = read_tlv(data, start, end)
        out.append(data[start:stop])
        start = stop
    return out


def resigned(
    cert: x509.Certificate,
    algorithm: bytes,
    sign: Callable[[bytes], bytes],
    edit: Callable[[list[bytes]], list[bytes]] = lambda parts: parts,
) -> bytes:
    """``cert``'s DER with its TBS fields edited, ``algorithm`` as signature algorithm, signed
    again by ``sign``."""
    der = der_concat([cert])
    _, start, end = read_tlv(der, 0, len(der))
    tbs_full = _elements(der, start, end)[0]
    _, t_start, t_end = read_tlv(tbs_full, 0, len(tbs_full))
    parts = _elements(tbs_full, t_start, t_end)
    parts[2] = algorithm
    tbs = _tlv(0x30, b"".join(edit(parts)))
    return _tlv(0x30, tbs + algorithm + _tlv(0x03, b"\x00" + sign(tbs)))


def _with_san(parts: list[bytes], san_value: bytes) -> list[bytes]:
    """TBS fields with the SubjectAltName extension's value replaced (or added)."""
    wrapper = parts[-1]
    _, start, end = read_tlv(wrapper, 0, len(wrapper))
    _, seq_start, seq_end = read_tlv(wrapper, start, end)
    extensions = [
        e for e in _elements(wrapper, seq_start, seq_end) if not e[2:].startswith(_OID_SAN)
    ]
    extensions.append(_tlv(0x30, _OID_SAN + _tlv(0x04, san_value)))
    parts[-1] = _tlv(0xA3, _tlv(0x30, b"".join(extensions)))
    return parts


def edi_party_twin(ours: Issued, trust_domain: str) -> x509.Certificate:
    """A CA of ``trust_domain`` with ``ours``' subject name whose SAN also holds an
    ediPartyName: well-formed DER (RFC 5280 GeneralName [5]) that cryptography refuses to read
    with UnsupportedGeneralNameType, an exception that is no ValueError. Go's parser and
    OpenSSL accept it (SPIRE serves such a federated bundle unchanged)."""
    twin = make_ca("example.org", spiffe_id=None)
    assert twin.cert.subject == ours.cert.subject
    edi = _tlv(0xA5, _tlv(0xA1, _tlv(0x0C, b"x")))
    san = _tlv(0x30, _tlv(0x86, f"spiffe://{trust_domain}".encode()) + edi)
    key = twin.key
    assert isinstance(key, ec.EllipticCurvePrivateKey)
    der = resigned(
        twin.cert,
        ECDSA_SHA256,
        lambda tbs: key.sign(tbs, ec.ECDSA(hashes.SHA256())),
        lambda parts: _with_san(parts, san),
    )
    return x509.load_der_x509_certificate(der)
