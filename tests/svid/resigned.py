"""Certificates and CRLs cryptography will not build (an ediPartyName GeneralName, a SHA-1
signature, RSA-PSS with MGF1 over SHA-1), assembled from a built one's DER and signed again with
the real key."""

from __future__ import annotations

from collections.abc import Callable

from cryptography import x509
from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.asymmetric import ec, padding, rsa

from svid import der_concat
from svid._cert_der import read_tlv
from tests.svid.certs import Issued, make_ca

_OID_SAN = bytes.fromhex("0603551d11")
ECDSA_SHA256 = bytes.fromhex("300a06082a8648ce3d040302")
RSA_SHA1 = bytes.fromhex("300d06092a864886f70d0101050500")
_OID_RSA_PSS = bytes.fromhex("06092a864886f70d01010a")
_OID_MGF1 = bytes.fromhex("06092a864886f70d010108")
_SHA1_ALG = bytes.fromhex("300906052b0e03021a0500")
_SHA256_ALG = bytes.fromhex("300d06096086480165030402010500")


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


def rsa_pss_sha256(mgf1_sha1: bool) -> bytes:
    """The AlgorithmIdentifier of RSASSA-PSS with SHA-256 and a 32-byte salt, its mask made by
    MGF1 over SHA-1 or over SHA-256 (RFC 4055; MGF1-SHA1 is the default, so DER omits it)."""
    mgf = b"" if mgf1_sha1 else _tlv(0xA1, _tlv(0x30, _OID_MGF1 + _SHA256_ALG))
    params = _tlv(0xA0, _SHA256_ALG) + mgf + _tlv(0xA2, b"\x02\x01\x20")
    return _tlv(0x30, _OID_RSA_PSS + _tlv(0x30, params))


def pss_signer(key: rsa.RSAPrivateKey, mgf1_sha1: bool) -> Callable[[bytes], bytes]:
    """Signs as ``rsa_pss_sha256(mgf1_sha1)`` says, with ``key``."""
    mgf = padding.MGF1(hashes.SHA1() if mgf1_sha1 else hashes.SHA256())
    return lambda tbs: key.sign(tbs, padding.PSS(mgf, 32), hashes.SHA256())


def resigned(
    cert: x509.Certificate,
    algorithm: bytes,
    sign: Callable[[bytes], bytes],
    edit: Callable[[list[bytes]], list[bytes]] = lambda parts: parts,
) -> bytes:
    """``cert``'s DER with its TBS fields edited, ``algorithm`` as signature algorithm, signed
    again by ``sign``."""
    return _resigned(der_concat([cert]), 2, algorithm, sign, edit)


def resigned_crl(crl: bytes, algorithm: bytes, sign: Callable[[bytes], bytes]) -> bytes:
    """The DER CRL ``crl`` with ``algorithm`` as signature algorithm, signed again by ``sign``."""
    _, start, end = read_tlv(crl, 0, len(crl))
    _, t_start, _ = read_tlv(crl, start, end)
    at = 1 if crl[t_start] == 0x02 else 0  # after the version, when there is one
    return _resigned(crl, at, algorithm, sign, lambda parts: parts)


def _resigned(
    der: bytes,
    at: int,
    algorithm: bytes,
    sign: Callable[[bytes], bytes],
    edit: Callable[[list[bytes]], list[bytes]],
) -> bytes:
    """A signed structure's DER (certificate or CRL) with ``algorithm`` as its TBS field ``at``
    and as its outer signature algorithm, its TBS fields edited, signed again by ``sign``."""
    _, start, end = read_tlv(der, 0, len(der))
    tbs_full = _elements(der, start, end)[0]
    _, t_start, t_end = read_tlv(tbs_full, 0, len(tbs_full))
    parts = _elements(tbs_full, t_start, t_end)
    parts[at] = algorithm
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
