"""Repros of defects found by reviewing the X.509 verification path. Each test FAILS ON PURPOSE
on the branch where it was written: it states the behaviour the contract asks for, which the
code does not have yet.

Certificates cryptography will not build (an ediPartyName GeneralName, a SHA-1 signature) are
assembled here from a built one's DER and signed again with the real key."""

from __future__ import annotations

from collections.abc import Callable

import pytest
from cryptography import x509
from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.asymmetric import ec

from svid import (
    RevocationSet,
    RevokedError,
    TrustDomain,
    X509Bundle,
    X509Verifier,
    der_concat,
)
from svid._cert_der import read_tlv
from svid._clock import FakeClock
from svid._crl import revoked_from_crls
from tests.svid.certs import T0, Issued, make_ca, make_leaf
from tests.svid.workload_fake import signed_crl

TD = TrustDomain("example.org")
FOREIGN = TrustDomain("foreign.org")

_OID_SAN = bytes.fromhex("0603551d11")
_ECDSA_SHA256 = bytes.fromhex("300a06082a8648ce3d040302")
_RSA_SHA1 = bytes.fromhex("300d06092a864886f70d0101050500")


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


def _resigned(
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


def _edi_party_twin(ours: Issued, trust_domain: str) -> x509.Certificate:
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
    der = _resigned(
        twin.cert,
        _ECDSA_SHA256,
        lambda tbs: key.sign(tbs, ec.ECDSA(hashes.SHA256())),
        lambda parts: _with_san(parts, san),
    )
    return x509.load_der_x509_certificate(der)


def _verifier(bundle: X509Bundle) -> X509Verifier:
    return X509Verifier(
        lambda td: bundle if td == bundle.trust_domain else None, clock=FakeClock(T0)
    )


# --- 3. another trust domain's intermediates push ours out of the set's memory ---


def test_a_foreign_trust_domains_intermediates_do_not_keep_our_intermediates_crl_pending() -> None:
    """FAILS ON PURPOSE: RevocationSet remembers the intermediates of verified chains in one
    FIFO of MAX_INTERMEDIATES (64) shared by every trust domain (svid/_revocation.py:231-238);
    replace() vouches for a pending CRL only with the intermediates still remembered
    (svid/_revocation.py:199-200). A federated trust domain mints 64 intermediates and has a
    chain through each verified: our intermediate is forgotten, its next CRL stays pending,
    and our chain verified before (cached, or an open svid.tls connection) is accepted although
    that CRL revokes its leaf."""
    root = make_ca()
    inter = make_ca("server.example.org", parent=root, spiffe_id=None)
    leaf = make_leaf(inter)
    foreign_root = make_ca("foreign.org")
    bundles = {
        TD: X509Bundle(TD, (root.cert,)),
        FOREIGN: X509Bundle(FOREIGN, (foreign_root.cert,)),
    }
    revocations = RevocationSet()
    verifier = X509Verifier(bundles.get, clock=FakeClock(T0), revocations=revocations)
    chain = der_concat([leaf.cert, inter.cert])
    verifier.verify_der(chain)
    for n in range(64):
        foreign_inter = make_ca(f"i{n}.foreign.org", parent=foreign_root, spiffe_id=None)
        foreign_leaf = make_leaf(foreign_inter, uris=["spiffe://foreign.org/w"])
        verifier.verify_der(der_concat([foreign_leaf.cert, foreign_inter.cert]))
    crls = revoked_from_crls([signed_crl(inter, [leaf.cert.serial_number])], bundles)
    revocations.replace(crls.revoked, crls.next_update, crls.pending)
    with pytest.raises(RevokedError):
        verifier.verify_der(chain)
