from __future__ import annotations

import hashlib
import socket
import ssl
import threading
from pathlib import Path

import pytest
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec, padding, rsa

from svid import (
    BundleSet,
    ExpiredError,
    FakeClock,
    MemoryBundleSource,
    RevocationSet,
    RevokedError,
    SpiffeBundle,
    TrustDomain,
    VerificationError,
    X509Bundle,
    X509Verifier,
    der_concat,
)
from svid._cert_der import read_tlv
from svid._verify_x509 import MAX_CACHE_KEY_BYTES
from tests.svid.certs import (
    T0,
    Issued,
    junk_cert,
    make_ca,
    make_leaf,
    reissue,
    rsa_key,
    slow_rsa_key,
)
from tests.svid.resigned import (
    ECDSA_SHA256,
    RSA_SHA1,
    _tlv,
    edi_party_twin,
    pss_signer,
    resigned,
    rsa_pss_sha256,
)

TD = TrustDomain("example.org")
OTHER = TrustDomain("other.org")


@pytest.fixture
def ca() -> Issued:
    return make_ca()


@pytest.fixture
def other_ca() -> Issued:
    return make_ca("other.org")


@pytest.fixture
def source(ca: Issued, other_ca: Issued) -> MemoryBundleSource:
    return MemoryBundleSource.of(
        SpiffeBundle(TD, (ca.cert,)), SpiffeBundle(OTHER, (other_ca.cert,))
    )


@pytest.fixture
def clock() -> FakeClock:
    return FakeClock(T0)


@pytest.fixture
def revocations() -> RevocationSet:
    return RevocationSet()


@pytest.fixture
def verifier(
    source: MemoryBundleSource, clock: FakeClock, revocations: RevocationSet
) -> X509Verifier:
    return X509Verifier(source.x509_bundle_for, clock=clock, revocations=revocations)


def test_valid_leaf_verifies(verifier: X509Verifier, ca: Issued) -> None:
    leaf = make_leaf(ca)
    got = verifier.verify_der(der_concat([leaf.cert]))
    assert str(got.spiffe_id) == "spiffe://example.org/workload"
    assert got.serial == format(leaf.cert.serial_number, "x")
    assert got.expires_at == T0 + 3600
    assert got.chain == (leaf.cert,)
    assert verifier.verify([leaf.cert]) == got


def test_chain_with_root_appended_verifies(verifier: X509Verifier, ca: Issued) -> None:
    leaf = make_leaf(ca)
    assert verifier.verify_der(der_concat([leaf.cert, ca.cert])).chain == (leaf.cert,)


def test_intermediate_chain(verifier: X509Verifier, ca: Issued) -> None:
    inter = make_ca(parent=ca)
    leaf = make_leaf(inter)
    got = verifier.verify_der(der_concat([leaf.cert, inter.cert]))
    assert got.chain == (leaf.cert, inter.cert)
    with pytest.raises(VerificationError, match="does not lead to an authority"):
        verifier.verify_der(der_concat([leaf.cert]))


def test_rsa_authority(clock: FakeClock) -> None:
    ca = make_ca(key=rsa_key())
    v = X509Verifier(
        MemoryBundleSource.of(SpiffeBundle(TD, (ca.cert,))).x509_bundle_for, clock=clock
    )
    assert v.verify([make_leaf(ca).cert]).spiffe_id.trust_domain == TD


def test_wrong_trust_domain_is_refused(verifier: X509Verifier, other_ca: Issued) -> None:
    # Signed by other.org's CA but claiming example.org: bundles are never merged.
    leaf = make_leaf(other_ca, uris=["spiffe://example.org/evil"])
    with pytest.raises(
        VerificationError,
        match=r"does\ not\ lead\ to\ an\ authority\ of\ trust\ domain\ example\.org",
    ):
        verifier.verify([leaf.cert])
    ok = make_leaf(other_ca, uris=["spiffe://other.org/w"])
    assert str(verifier.verify([ok.cert]).spiffe_id) == "spiffe://other.org/w"


def test_unknown_trust_domain(verifier: X509Verifier) -> None:
    ca3 = make_ca("third.org")
    with pytest.raises(
        VerificationError, match=r"no\ X\.509\ bundle\ for\ trust\ domain\ third\.org"
    ):
        verifier.verify([make_leaf(ca3, uris=["spiffe://third.org/w"]).cert])


@pytest.mark.parametrize(
    ("overrides", "message"),
    [
        ({"ca": True}, "cA=true"),
        ({"key_cert_sign": True}, "keyCertSign"),
        ({"crl_sign": True}, "cRLSign"),
        ({"uris": ["spiffe://example.org/a", "spiffe://example.org/b"]}, "exactly one URI SAN"),
        ({"uris": []}, "exactly one URI SAN"),
        ({"digital_signature": False}, "digitalSignature"),
    ],
)
def test_profile_violations_are_refused(
    verifier: X509Verifier, ca: Issued, overrides: dict[str, object], message: str
) -> None:
    leaf = make_leaf(ca, **overrides)  # type: ignore[arg-type]
    with pytest.raises(VerificationError, match=message):
        verifier.verify([leaf.cert])


def test_validity_times_one_second_either_side(
    verifier: X509Verifier, ca: Issued, clock: FakeClock
) -> None:
    leaf = make_leaf(ca, not_before=T0 + 10, not_after=T0 + 20)
    with pytest.raises(ExpiredError, match="not valid before"):
        verifier.verify([leaf.cert])
    clock.set(T0 + 10)
    assert verifier.verify([leaf.cert])
    clock.set(T0 + 20)
    assert verifier.verify([leaf.cert])  # cached, still inside
    clock.set(T0 + 21)
    with pytest.raises(ExpiredError, match="expired at"):
        verifier.verify([leaf.cert])


def test_expired_authority_is_refused(clock: FakeClock) -> None:
    ca = make_ca(not_after=T0 - 1)
    v = X509Verifier(
        MemoryBundleSource.of(SpiffeBundle(TD, (ca.cert,))).x509_bundle_for, clock=clock
    )
    with pytest.raises(ExpiredError, match="authority"):
        v.verify([make_leaf(ca).cert])


@pytest.mark.parametrize("expired_first", [True, False])
def test_a_renewed_authority_beside_its_expired_predecessor_anchors(
    clock: FakeClock, expired_first: bool
) -> None:
    # A root renewed with the same key and name (the usual way to extend a root) sits in the
    # bundle beside the expired certificate it replaces; both verify the leaf's signature, and
    # path validation (OpenSSL's, go-spiffe's) takes the one valid now, whatever the order.
    old = make_ca(not_before=T0 - 2 * 86400, not_after=T0 - 1)
    renewed = reissue(old, old, 12345, not_before=T0 - 3600, not_after=T0 + 86400)
    authorities = (old.cert, renewed) if expired_first else (renewed, old.cert)
    v = X509Verifier(
        MemoryBundleSource.of(SpiffeBundle(TD, authorities)).x509_bundle_for, clock=clock
    )
    leaf = der_concat([make_leaf(old).cert])
    assert str(v.verify_der(leaf).spiffe_id) == "spiffe://example.org/workload"
    assert str(v.verify_der(leaf).spiffe_id) == "spiffe://example.org/workload"  # a template now
    v.cache.clear()
    assert str(v.verify_der(leaf).spiffe_id) == "spiffe://example.org/workload"
    inter = make_ca("intermediate", parent=old, spiffe_id=None)
    chain = der_concat([make_leaf(inter).cert, inter.cert])
    assert str(v.verify_der(chain).spiffe_id) == "spiffe://example.org/workload"


def _duplicate_key_usage(cert: x509.Certificate) -> x509.Certificate:
    """``cert`` with its SubjectKeyIdentifier renamed KeyUsage: two KeyUsage extensions."""
    der = cert.public_bytes(serialization.Encoding.DER)
    return x509.load_der_x509_certificate(
        der.replace(b"\x06\x03\x55\x1d\x0e", b"\x06\x03\x55\x1d\x0f", 1)
    )


def test_authority_with_duplicate_extensions_anchors_nothing(clock: FakeClock) -> None:
    # Found by tests/fuzz: DuplicateExtension (no ValueError) escaped the verifier.
    ca = make_ca()
    bad = _duplicate_key_usage(ca.cert)
    v = X509Verifier(MemoryBundleSource.of(SpiffeBundle(TD, (bad,))).x509_bundle_for, clock=clock)
    with pytest.raises(VerificationError, match="does not lead to an authority"):
        v.verify_der(der_concat([make_leaf(ca).cert]))


def test_an_authority_cryptography_cannot_read_anchors_nothing_beside_a_good_one() -> None:
    # Its SAN holds an ediPartyName: cryptography raises UnsupportedGeneralNameType (no
    # ValueError) reading it, which escaped verify_der as no SvidError (svid.tls and svid.asgi
    # catch those only: an HTTP 500). The authority anchors nothing; the good one still does.
    ca = make_ca()
    bundle = X509Bundle(TD, (edi_party_twin(ca, "example.org"), ca.cert))
    v = X509Verifier(lambda td: bundle if td == TD else None, clock=FakeClock(T0))
    leaf = make_leaf(ca)
    assert v.verify_der(der_concat([leaf.cert])).serial == format(leaf.cert.serial_number, "x")
    alone = X509Bundle(TD, (edi_party_twin(ca, "example.org"),))
    v = X509Verifier(lambda td: alone if td == TD else None, clock=FakeClock(T0))
    with pytest.raises(VerificationError, match="does not lead to an authority"):
        v.verify_der(der_concat([make_leaf(ca).cert]))


def test_tampered_signature_is_refused(verifier: X509Verifier, ca: Issued) -> None:
    der = bytearray(der_concat([make_leaf(ca).cert]))
    der[-5] ^= 0x01
    with pytest.raises(VerificationError):
        verifier.verify_der(bytes(der))


def test_garbage_is_a_verification_error(verifier: X509Verifier) -> None:
    with pytest.raises(VerificationError, match="unreadable"):
        verifier.verify_der(b"nonsense")
    with pytest.raises(VerificationError, match="empty"):
        verifier.verify([])


def test_path_length_constraint(verifier: X509Verifier, ca: Issued, clock: FakeClock) -> None:
    root = make_ca(path_length=0)
    v = X509Verifier(
        MemoryBundleSource.of(SpiffeBundle(TD, (root.cert,))).x509_bundle_for, clock=clock
    )
    inter = make_ca(parent=root)
    leaf = make_leaf(inter)
    with pytest.raises(VerificationError, match="allows 0 CAs below it"):
        v.verify([leaf.cert, inter.cert])
    assert v.verify([make_leaf(root).cert])


def test_intermediate_must_be_a_ca(verifier: X509Verifier, ca: Issued) -> None:
    fake = make_ca(parent=ca, ca=False)
    leaf = make_leaf(fake)
    with pytest.raises(VerificationError, match="cA=true"):
        verifier.verify([leaf.cert, fake.cert])


def test_unknown_critical_extension_is_refused(verifier: X509Verifier, ca: Issued) -> None:
    leaf = make_leaf(ca)
    unknown = x509.UnrecognizedExtension(x509.ObjectIdentifier("1.2.3.4"), b"\x05\x00")
    cert = reissue(leaf, ca, 7, not_before=T0 - 10, not_after=T0 + 10, critical=[unknown])
    with pytest.raises(VerificationError, match=r"unsupported\ critical\ extension\ 1\.2\.3\.4"):
        verifier.verify([cert])


def test_revoked_serial(verifier: X509Verifier, ca: Issued, revocations: RevocationSet) -> None:
    leaf = make_leaf(ca)
    revocations.revoke_serial(leaf.cert.serial_number, T0 + 3600)
    with pytest.raises(RevokedError, match="revoked"):
        verifier.verify([leaf.cert])


def test_revoked_intermediate(
    verifier: X509Verifier, ca: Issued, revocations: RevocationSet
) -> None:
    inter = make_ca(parent=ca)
    leaf = make_leaf(inter)
    revocations.revoke_serial(format(inter.cert.serial_number, "X"), T0 + 3600)
    with pytest.raises(RevokedError):
        verifier.verify([leaf.cert, inter.cert])


# --- the cache is never more permissive than a fresh check -------------------------------------


def test_cache_hit_returns_same_result(verifier: X509Verifier, ca: Issued) -> None:
    der = der_concat([make_leaf(ca).cert])
    first = verifier.verify_der(der)
    assert verifier.verify_der(der) is first
    assert verifier.cache.hits == 1


def test_cache_respects_revocation(
    verifier: X509Verifier, ca: Issued, revocations: RevocationSet
) -> None:
    leaf = make_leaf(ca)
    der = der_concat([leaf.cert])
    verifier.verify_der(der)
    revocations.revoke_serial(leaf.cert.serial_number, T0 + 3600)
    with pytest.raises(RevokedError):
        verifier.verify_der(der)
    assert len(verifier.cache) == 0


def test_cache_respects_ca_removal_and_rotation(
    verifier: X509Verifier, ca: Issued, source: MemoryBundleSource
) -> None:
    leaf = make_leaf(ca)
    der = der_concat([leaf.cert])
    verifier.verify_der(der)
    new_ca = make_ca()
    # Rotation: the new CA is added, the old one kept -> still valid (re-verified once).
    source.update(SpiffeBundle(TD, (ca.cert, new_ca.cert)))
    assert verifier.verify_der(der)
    # The old CA is dropped -> the cached result must not survive.
    source.update(SpiffeBundle(TD, (new_ca.cert,)))
    with pytest.raises(VerificationError, match="does not lead to an authority"):
        verifier.verify_der(der)
    assert verifier.verify_der(der_concat([make_leaf(new_ca).cert]))


def test_cache_respects_trust_domain_removal(
    verifier: X509Verifier, ca: Issued, source: MemoryBundleSource
) -> None:
    der = der_concat([make_leaf(ca).cert])
    verifier.verify_der(der)
    source.remove(TD)
    with pytest.raises(VerificationError, match=r"no\ X\.509\ bundle"):
        verifier.verify_der(der)


def test_cache_respects_expiry(verifier: X509Verifier, ca: Issued, clock: FakeClock) -> None:
    der = der_concat([make_leaf(ca, not_after=T0 + 5).cert])
    verifier.verify_der(der)
    clock.advance(6)
    with pytest.raises(ExpiredError):
        verifier.verify_der(der)


def test_cache_survives_unchanged_bundle_update(
    verifier: X509Verifier, ca: Issued, source: MemoryBundleSource, other_ca: Issued
) -> None:
    der = der_concat([make_leaf(ca).cert])
    verifier.verify_der(der)
    source.set_x509_bundles(
        BundleSet.of(X509Bundle(TD, (ca.cert,)), X509Bundle(OTHER, (make_ca("other.org").cert,)))
    )
    verifier.verify_der(der)
    assert verifier.cache.hits == 1


def test_cache_is_bounded(source: MemoryBundleSource, ca: Issued, clock: FakeClock) -> None:
    v = X509Verifier(source.x509_bundle_for, clock=clock, cache_size=3)
    leaves = [der_concat([make_leaf(ca).cert]) for _ in range(5)]
    for der in leaves:
        v.verify_der(der)
    assert len(v.cache) == 3


def test_cache_keeps_no_peer_chosen_bytes_beyond_a_bound(
    verifier: X509Verifier, ca: Issued
) -> None:
    """A valid leaf with new junk certificates after it on each handshake: every entry held the
    whole chain as its key, ~1 GB for a full cache of 100 KB chains (TLS's default cap). Keys
    past MAX_CACHE_KEY_BYTES are digests; such chains still verify, and hit the cache."""
    for serial in range(1, 4):
        chain = der_concat([make_leaf(ca).cert, junk_cert(serial, 50_000)])
        assert str(verifier.verify_der(chain).spiffe_id) == "spiffe://example.org/workload"
        verifier.verify_der(chain)
    # The parsed-certificate entry point keys its entries alike.
    certs = [make_leaf(ca).cert, junk_cert(4, 50_000)]
    verifier.verify(certs)
    verifier.verify(certs)
    assert (len(verifier.cache), verifier.cache.hits) == (4, 4)  # each second one a hit
    assert sum(len(key) for key in verifier.cache._data) <= 4 * MAX_CACHE_KEY_BYTES


def test_one_leaf_with_ever_new_bytes_after_it_evicts_no_other_peer(
    source: MemoryBundleSource, clock: FakeClock, ca: Issued
) -> None:
    """What follows a chain's path is ignored, so a peer holding one valid SVID sent it with new
    junk after it on each handshake: each chain verified alike and was cached apart, pushing the
    other peers' chains out. One such chain per path is cached; the same extras each time (a
    peer sending its root) still hit."""
    verifier = X509Verifier(source.x509_bundle_for, clock=clock, cache_size=8)
    honest = [
        der_concat([make_leaf(ca, uris=[f"spiffe://example.org/h{i}"]).cert]) for i in range(4)
    ]
    for chain in honest:
        verifier.verify_der(chain)
    theirs = make_leaf(ca, uris=["spiffe://example.org/noisy"]).cert
    for serial in range(1, 21):
        chain = der_concat([theirs, junk_cert(serial, 100)])
        assert str(verifier.verify_der(chain).spiffe_id) == "spiffe://example.org/noisy"
    certs = [theirs, junk_cert(21, 100)]  # the parsed-certificate entry point alike
    verifier.verify(certs)
    hits = verifier.cache.hits
    for chain in honest:
        verifier.verify_der(chain)
    assert verifier.cache.hits == hits + len(honest)
    assert len(verifier.cache) == len(honest) + 1
    verifier.verify(certs)  # its last chain is still cached
    assert verifier.cache.hits == hits + len(honest) + 1


def test_concurrent_verification(verifier: X509Verifier, ca: Issued) -> None:
    ders = [der_concat([make_leaf(ca, uris=[f"spiffe://example.org/w{i}"]).cert]) for i in range(8)]
    errors: list[BaseException] = []

    def work() -> None:
        try:
            for _ in range(20):
                for i, der in enumerate(ders):
                    assert str(verifier.verify_der(der).spiffe_id).endswith(f"/w{i}")
        except BaseException as exc:
            errors.append(exc)

    threads = [threading.Thread(target=work) for _ in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert errors == []


# --- as the peer check of a real mutual-TLS connection -----------------------------------------


def _write(tmp: Path, name: str, issued: Issued, ca: Issued) -> tuple[str, str]:
    cert = tmp / f"{name}.pem"
    key = tmp / f"{name}.key"
    cert.write_bytes(issued.cert.public_bytes(serialization.Encoding.PEM))
    key.write_bytes(
        issued.key.private_bytes(
            serialization.Encoding.PEM,
            serialization.PrivateFormat.PKCS8,
            serialization.NoEncryption(),
        )
    )
    return str(cert), str(key)


def test_ssl_peer_check(tmp_path: Path, ca: Issued, verifier: X509Verifier) -> None:
    import time

    now = time.time()
    real_ca = make_ca(not_before=now - 60, not_after=now + 3600)
    server = make_leaf(
        real_ca, uris=["spiffe://example.org/server"], not_before=now - 60, not_after=now + 600
    )
    client = make_leaf(
        real_ca, uris=["spiffe://example.org/client"], not_before=now - 60, not_after=now + 600
    )
    ca_pem = real_ca.cert.public_bytes(serialization.Encoding.PEM).decode()
    sctx = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    sctx.load_cert_chain(*_write(tmp_path, "server", server, real_ca))
    sctx.load_verify_locations(cadata=ca_pem)
    sctx.verify_mode = ssl.CERT_REQUIRED
    cctx = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
    cctx.check_hostname = False  # SPIFFE identities live in the URI SAN, checked below
    cctx.load_cert_chain(*_write(tmp_path, "client", client, real_ca))
    cctx.load_verify_locations(cadata=ca_pem)

    fake_now = FakeClock(now)
    src = MemoryBundleSource.of(SpiffeBundle(TD, (real_ca.cert,)))
    v = X509Verifier(src.x509_bundle_for, clock=fake_now)
    a, b = socket.socketpair()
    seen: dict[str, str] = {}

    def serve() -> None:
        with sctx.wrap_socket(a, server_side=True) as s:
            seen["client"] = str(v.verify_ssl_peer(s).spiffe_id)
            s.sendall(b"ok")

    t = threading.Thread(target=serve)
    t.start()
    with cctx.wrap_socket(b, server_hostname="x") as c:
        assert str(v.verify_ssl_peer(c).spiffe_id) == "spiffe://example.org/server"
        assert c.recv(2) == b"ok"
    t.join(timeout=10)
    assert seen["client"] == "spiffe://example.org/client"
    # The same peer from a trust domain we don't accept: refused by our check.
    src.remove(TD)
    with pytest.raises(VerificationError, match=r"no\ X\.509\ bundle"):
        v.verify_der(der_concat([server.cert]))


def test_name_constrained_intermediate_is_refused(verifier: X509Verifier, ca: Issued) -> None:
    inter = make_ca(parent=ca)
    constraints = x509.NameConstraints(
        permitted_subtrees=[x509.UniformResourceIdentifier("example.org")],
        excluded_subtrees=None,
    )
    constrained = reissue(
        inter, ca, 99, not_before=T0 - 10, not_after=T0 + 1000, critical=[constraints]
    )
    leaf = make_leaf(inter)
    with pytest.raises(VerificationError, match="name constraints"):
        verifier.verify([leaf.cert, constrained])


def test_issuer_name_must_match_even_with_the_right_key(verifier: X509Verifier, ca: Issued) -> None:
    # Signed by the CA's key but naming another issuer: OpenSSL would not chain it either.
    leaf = make_leaf(ca)
    someone_else = x509.Name([x509.NameAttribute(x509.oid.NameOID.COMMON_NAME, "someone else")])
    cert = reissue(leaf, ca, 5, not_before=T0 - 10, not_after=T0 + 10, issuer=someone_else)
    with pytest.raises(VerificationError, match="does not lead to an authority"):
        verifier.verify([cert])


def test_malformed_extension_is_a_verification_error(verifier: X509Verifier, ca: Issued) -> None:
    leaf = make_leaf(ca, basic_constraints=False)
    garbled = x509.UnrecognizedExtension(x509.oid.ExtensionOID.BASIC_CONSTRAINTS, b"\x01\x02\x03")
    cert = reissue(leaf, ca, 11, not_before=T0 - 10, not_after=T0 + 10, critical=[garbled])
    with pytest.raises(VerificationError, match="malformed extensions"):
        verifier.verify([cert])


def test_an_authority_with_a_huge_rsa_exponent_anchors_nothing(clock: FakeClock) -> None:
    # A bundle built by hand skips the parsers' refusal; its anchor would cost ~6 ms a check.
    slow = make_ca(key=slow_rsa_key())
    v = X509Verifier(
        MemoryBundleSource.of(SpiffeBundle(TD, (slow.cert,))).x509_bundle_for, clock=clock
    )
    with pytest.raises(VerificationError, match="does not lead to an authority"):
        v.verify([make_leaf(slow).cert])


def test_an_intermediate_with_a_huge_rsa_exponent_is_refused_before_its_signature_check(
    verifier: X509Verifier, ca: Issued
) -> None:
    # The peer picks the intermediate, unsigned by anything yet: its key is checked first.
    inter = make_ca(parent=ca, key=slow_rsa_key())
    leaf = make_leaf(inter)
    with pytest.raises(VerificationError, match=r"intermediate serial .* 2\*\*31-1"):
        verifier.verify_der(der_concat([leaf.cert, inter.cert]))


@pytest.mark.parametrize("curve", [ec.BrainpoolP512R1(), ec.SECP256K1()])
def test_an_intermediate_on_a_curve_go_refuses_is_refused_before_its_signature_check(
    verifier: X509Verifier, ca: Issued, curve: ec.EllipticCurve
) -> None:
    # The peer picks the intermediate: a check on brainpoolP512r1 costs ~15 P-256 ones, for each
    # of up to max_depth of them; Go's crypto/x509 (go-spiffe, SPIRE) parses none of these.
    inter = make_ca(parent=ca, key=ec.generate_private_key(curve))
    with pytest.raises(VerificationError, match=rf"intermediate serial .* curve {curve.name}"):
        verifier.verify_der(der_concat([make_leaf(inter).cert, inter.cert]))


# P-224 too: Go's crypto/x509 (go-spiffe, SPIRE) verifies it, CA tooling such as Vault's PKI
# issues on it (key_bits 224), and a check on it costs no more than one on P-256.
@pytest.mark.parametrize("curve", [ec.SECP224R1(), ec.SECP384R1(), ec.SECP521R1()])
def test_intermediates_on_the_other_nist_curves_verify(
    verifier: X509Verifier, ca: Issued, curve: ec.EllipticCurve
) -> None:
    inter = make_ca(parent=ca, key=ec.generate_private_key(curve))
    got = verifier.verify_der(der_concat([make_leaf(inter).cert, inter.cert]))
    assert str(got.spiffe_id) == "spiffe://example.org/workload"


def _rsa_1024() -> rsa.RSAPrivateKey:
    return rsa.generate_private_key(65537, 1024)


def test_an_rsa_1024_authority_anchors_nothing(clock: FakeClock) -> None:
    weak = make_ca(key=_rsa_1024())
    v = X509Verifier(
        MemoryBundleSource.of(SpiffeBundle(TD, (weak.cert,))).x509_bundle_for, clock=clock
    )
    with pytest.raises(VerificationError, match="does not lead to an authority"):
        v.verify_der(der_concat([make_leaf(weak).cert]))


def test_an_rsa_1024_intermediate_is_refused(verifier: X509Verifier, ca: Issued) -> None:
    inter = make_ca(parent=ca, key=_rsa_1024())
    with pytest.raises(VerificationError, match=r"intermediate serial .* 1024 bits"):
        verifier.verify_der(der_concat([make_leaf(inter).cert, inter.cert]))


def test_an_rsa_1024_leaf_is_refused_also_where_a_template_matches(
    verifier: X509Verifier, ca: Issued
) -> None:
    # Its key is what the peer proves possession of: as weak as it is, so is the identity.
    # Checked on both paths: a 2048-bit leaf first makes the template a 1024-bit one of the
    # same shape could match (their keys' lengths differ, so it should not, but the rule
    # must not hang on that).
    strong = make_leaf(ca, key=rsa_key())
    verifier.verify_der(der_concat([strong.cert]))
    weak = make_leaf(ca, key=_rsa_1024())
    with pytest.raises(VerificationError, match=r"leaf serial .* 1024 bits"):
        verifier.verify_der(der_concat([weak.cert]))
    with pytest.raises(VerificationError, match=r"leaf serial .* 1024 bits"):
        verifier.verify([weak.cert])


def test_a_sha1_signed_leaf_is_refused(clock: FakeClock) -> None:
    # sha1WithRSAEncryption is outside the algorithms read from the DER alone; the fallback
    # through cryptography verified with whatever hash the certificate named.
    key = rsa_key()
    ca = make_ca(key=key)
    sha1 = resigned(
        make_leaf(ca).cert, RSA_SHA1, lambda tbs: key.sign(tbs, padding.PKCS1v15(), hashes.SHA1())
    )
    v = X509Verifier(
        MemoryBundleSource.of(SpiffeBundle(TD, (ca.cert,))).x509_bundle_for, clock=clock
    )
    with pytest.raises(
        VerificationError, match="signed with sha1: only SHA-256, SHA-384 and SHA-512"
    ):
        v.verify_der(sha1)


def test_a_sha1_signed_intermediate_is_refused(clock: FakeClock) -> None:
    root_key = rsa_key()
    root = make_ca(key=root_key)
    inter = make_ca(parent=root, spiffe_id=None)
    sha1 = resigned(
        inter.cert, RSA_SHA1, lambda tbs: root_key.sign(tbs, padding.PKCS1v15(), hashes.SHA1())
    )
    v = X509Verifier(
        MemoryBundleSource.of(SpiffeBundle(TD, (root.cert,))).x509_bundle_for, clock=clock
    )
    with pytest.raises(VerificationError, match="signed with sha1"):
        v.verify_der(der_concat([make_leaf(inter).cert]) + sha1)


def test_an_rsa_pss_leaf_with_sha256_in_mgf1_verifies(clock: FakeClock) -> None:
    key = rsa_key()
    ca = make_ca(key=key)
    pss = resigned(make_leaf(ca).cert, rsa_pss_sha256(False), pss_signer(key, False))
    v = X509Verifier(
        MemoryBundleSource.of(SpiffeBundle(TD, (ca.cert,))).x509_bundle_for, clock=clock
    )
    assert str(v.verify_der(pss).spiffe_id) == "spiffe://example.org/workload"


def test_an_rsa_pss_leaf_whose_mgf1_hash_is_sha1_is_refused(clock: FakeClock) -> None:
    # Its signature hash is SHA-256, which is all that was checked: the mask's hash, its
    # MGF1's, is a second one the signer chose.
    key = rsa_key()
    ca = make_ca(key=key)
    pss = resigned(make_leaf(ca).cert, rsa_pss_sha256(True), pss_signer(key, True))
    v = X509Verifier(
        MemoryBundleSource.of(SpiffeBundle(TD, (ca.cert,))).x509_bundle_for, clock=clock
    )
    with pytest.raises(
        VerificationError, match=r"signed with RSA-PSS whose MGF1 uses sha1: only MGF1 with"
    ):
        v.verify_der(pss)


def test_an_rsa_pss_intermediate_whose_mgf1_hash_is_sha1_is_refused(clock: FakeClock) -> None:
    root_key = rsa_key()
    root = make_ca(key=root_key)
    inter = make_ca(parent=root, spiffe_id=None)
    pss = resigned(inter.cert, rsa_pss_sha256(True), pss_signer(root_key, True))
    v = X509Verifier(
        MemoryBundleSource.of(SpiffeBundle(TD, (root.cert,))).x509_bundle_for, clock=clock
    )
    with pytest.raises(VerificationError, match="MGF1 uses sha1"):
        v.verify_der(der_concat([make_leaf(inter).cert]) + pss)


def test_an_rsa_1024_leaf_key_named_id_rsassa_pss_is_refused_too(
    verifier: X509Verifier, ca: Issued
) -> None:
    # A leaf's RSA key may be published under id-RSASSA-PSS (RFC 4055) rather than
    # rsaEncryption: cryptography loads it as the same RSA key, and a TLS peer proves
    # possession of it all the same. Its weakness is the key's, not its algorithm name's.
    weak = make_leaf(ca, key=_rsa_1024())
    rsa_encryption = bytes.fromhex("300d06092a864886f70d0101010500")
    id_rsassa_pss = bytes.fromhex("300b06092a864886f70d01010a")  # no parameters: any hash

    def pss_named(parts: list[bytes]) -> list[bytes]:
        spki = parts[6]
        assert rsa_encryption in spki
        _, start, end = read_tlv(spki, 0, len(spki))
        parts[6] = _tlv(0x30, spki[start:end].replace(rsa_encryption, id_rsassa_pss))
        return parts

    key = ca.key
    assert isinstance(key, ec.EllipticCurvePrivateKey)
    der = resigned(
        weak.cert, ECDSA_SHA256, lambda tbs: key.sign(tbs, ec.ECDSA(hashes.SHA256())), pss_named
    )
    leaf = x509.load_der_x509_certificate(der)
    assert isinstance(leaf.public_key(), rsa.RSAPublicKey)
    assert leaf.public_key().key_size == 1024
    with pytest.raises(VerificationError, match=r"leaf serial .* 1024 bits"):
        verifier.verify_der(der)


def test_a_digest_of_a_cached_chain_is_not_taken_for_a_chain(
    verifier: X509Verifier, ca: Issued
) -> None:
    """Chains past MAX_CACHE_KEY_BYTES are cached under 0x00 and their SHA-256, looked up before
    anything is parsed: those 33 bytes, given as a chain by whoever saw the long one, were
    answered with its cached VerifiedX509 though they hold no certificate at all."""
    long_chain = der_concat([make_leaf(ca).cert, junk_cert(1, 20_000)])
    assert str(verifier.verify_der(long_chain).spiffe_id) == "spiffe://example.org/workload"
    forged = b"\0" + hashlib.sha256(long_chain).digest()
    with pytest.raises(VerificationError, match="unreadable"):
        verifier.verify_der(forged)
    assert str(verifier.verify_der(long_chain).spiffe_id) == "spiffe://example.org/workload"
    assert verifier.cache.hits == 1
