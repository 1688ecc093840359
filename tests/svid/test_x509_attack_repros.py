"""Repros of defects found by reviewing the X.509 verification path. Each test FAILS ON PURPOSE
on the branch where it was written: it states the behaviour the contract asks for, which the
code does not have yet.

Certificates cryptography will not build (an ediPartyName GeneralName, a SHA-1 signature) are
assembled here from a built one's DER and signed again with the real key."""

from __future__ import annotations

import shutil
import tempfile
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest
from cryptography import x509
from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.asymmetric import ec, padding, rsa

from svid import (
    RevocationSet,
    RevokedError,
    TrustDomain,
    VerificationError,
    X509Bundle,
    X509Source,
    X509Verifier,
    der_concat,
)
from svid._cert_der import read_tlv
from svid._clock import FakeClock
from svid._crl import revoked_from_crls
from svid.workloadapi import Backoff
from tests.svid.certs import T0, Issued, make_ca, make_leaf
from tests.svid.tls_pki import make_pki
from tests.svid.workload_fake import Server, State, eventually, signed_crl

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


# --- 1. a bundle authority cryptography cannot read escapes verify_der as a foreign type ---


def test_verify_der_raises_only_verification_errors_for_an_unreadable_bundle_authority() -> None:
    """FAILS ON PURPOSE: svid/_verify_x509.py:297 (_make_anchor) catches ValueError,
    UnsupportedAlgorithm and DuplicateExtension, not x509.UnsupportedGeneralNameType, so a
    bundle authority whose SAN holds an ediPartyName makes verify_der raise that (no SvidError):
    svid.tls's PeerPolicy.admit and svid.asgi catch only SvidError/VerificationError."""
    ca = make_ca()
    bundle = X509Bundle(TD, (ca.cert, _edi_party_twin(ca, "example.org")))
    leaf = make_leaf(ca)
    # An unreadable authority anchors nothing (as _make_anchor means it to); the good one
    # signed the leaf.
    assert _verifier(bundle).verify_der(der_concat([leaf.cert])).serial == format(
        leaf.cert.serial_number, "x"
    )


def test_revoked_from_crls_survives_a_foreign_authority_it_cannot_read() -> None:
    """FAILS ON PURPOSE: svid/_crl.py:82 (_can_sign_crls) does not catch
    UnsupportedGeneralNameType. A federated trust domain whose authority takes our CA's subject
    name and carries an ediPartyName makes every CRL of our CA raise out of revoked_from_crls."""
    ours = make_ca()
    bundles = {
        TD: X509Bundle(TD, (ours.cert,)),
        FOREIGN: X509Bundle(FOREIGN, (_edi_party_twin(ours, "foreign.org"),)),
    }
    leaf = make_leaf(ours)
    result = revoked_from_crls([signed_crl(ours, [leaf.cert.serial_number])], bundles)
    assert [r.value for r in result.revoked] == [format(leaf.cert.serial_number, "x")]


@pytest.fixture
def agent_dir() -> Iterator[Path]:
    root = Path(tempfile.mkdtemp(prefix="x5a", dir="/tmp"))
    yield root
    shutil.rmtree(root, ignore_errors=True)


def test_source_keeps_applying_revocations_after_a_foreign_authority_it_cannot_read(
    agent_dir: Path,
) -> None:
    """FAILS ON PURPOSE: the escape above runs inside X509Source's stream threads
    (SourceState._publish_revocations, from _on_x509 and _on_revocations); _run catches only
    SvidError, so both threads die and never call state.failed: the feed still counts as live
    (staleness 0, so max_revocation_staleness never refuses) while no revocation arrives
    any more. A federated trust domain's bundle thereby un-revokes our own certificates."""
    pki = make_pki()
    me = pki.svid("spiffe://example.org/me")
    peer = pki.svid("spiffe://example.org/peer", under_root=True)
    state = State(
        x509={"spiffe://example.org": der_concat([pki.root.cert])},
        crls=[signed_crl(pki.root, [])],
        svids=[me],
    )
    server = Server(state, agent_dir / "agent.sock").start()
    source = X509Source(server.address, backoff=Backoff(0.02, 0.2))
    try:
        with source:
            source.require_ready(10)
            verifier = source.x509_verifier(federated=True, max_revocation_staleness=5)

            def accepted() -> bool:
                try:
                    return verifier.verify_der(peer.chain_der()).spiffe_id == peer.spiffe_id
                except VerificationError:  # until the revocation stream's first message
                    return False

            eventually(accepted, "the peer verified on fresh revocation data")
            twin = _edi_party_twin(pki.root, "foreign.org")
            state.change(
                x509={
                    "spiffe://example.org": der_concat([pki.root.cert]),
                    "spiffe://foreign.org": der_concat([twin]),
                }
            )
            eventually(lambda: source.x509_bundle_for(FOREIGN) is not None, "foreign bundle")
            time.sleep(0.2)
            state.change(crls=[signed_crl(pki.root, [peer.leaf.serial_number])])

            def refused() -> bool:
                try:
                    verifier.verify_der(peer.chain_der())
                except RevokedError:
                    return True
                return False

            eventually(refused, "the revocation of the peer's leaf", timeout=5)
    finally:
        server.stop()


# --- 2. weak signature algorithms and keys ---


def test_sha1_rsa_signed_leaf_is_refused() -> None:
    """FAILS ON PURPOSE: _facts_signature_ok falls back to _signature_ok
    (svid/_verify_x509.py:227-243), which verifies with whatever hash the certificate names;
    sha1WithRSAEncryption verifies (ecdsa-with-SHA1 only fails by accident: cryptography gives
    it no parameters). verify_der (unlike OpenSSL at SECLEVEL 2 in svid.tls) accepts SHA-1."""
    key = rsa.generate_private_key(65537, 2048)
    ca = make_ca(key=key)
    leaf = make_leaf(ca)
    der = _resigned(
        leaf.cert, _RSA_SHA1, lambda tbs: key.sign(tbs, padding.PKCS1v15(), hashes.SHA1())
    )
    with pytest.raises(VerificationError):
        _verifier(X509Bundle(TD, (ca.cert,))).verify_der(der)


def test_rsa_1024_authority_is_refused() -> None:
    """FAILS ON PURPOSE: no key size is checked anywhere on the path (anchors: _anchor_or_none,
    intermediates: nxt.public_key()); a 1024-bit RSA CA anchors SVIDs."""
    ca = make_ca(key=rsa.generate_private_key(65537, 1024))
    with pytest.raises(VerificationError):
        _verifier(X509Bundle(TD, (ca.cert,))).verify_der(der_concat([make_leaf(ca).cert]))


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
