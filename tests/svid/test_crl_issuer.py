"""A CRL revokes only what its issuer issued: serials are unique per issuer (RFC 5280 4.1.2.2),
so a CRL's entries apply to certificates whose issuer is the CRL's issuer, in the trust domain
whose authority vouched for the CRL. Real certificates, real CRLs, the real source state."""

from __future__ import annotations

import pytest
from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.asymmetric import padding, rsa

from svid import (
    RevokedError,
    SvidError,
    X509Bundle,
    X509Svid,
    X509Verifier,
    certs_to_pem,
    der_concat,
)
from svid import _revocation as revocation_module
from svid._bundle import BundleSet
from svid._caller import Caller
from svid._clock import FakeClock
from svid._crl import revoked_from_crls
from svid._open_requests import OpenRequests, caller_keys
from svid._revocation import KIND_X509_SERIAL, MAX_INTERMEDIATES, RevocationSet, Revoked
from svid._source import MemoryBundleSource
from svid._source_state import RevocationEvent, SourceState
from svid._spiffe_id import TrustDomain
from svid._workload_calls import (
    REVOCATIONS,
    X509_BUNDLES,
    X509_SVIDS,
    RevocationsUpdate,
    X509BundlesUpdate,
)
from tests.svid.certs import T0, Issued, make_ca, make_leaf, rsa_key
from tests.svid.resigned import RSA_SHA1, edi_party_twin, pss_signer, resigned_crl, rsa_pss_sha256
from tests.svid.tls_pki import key_pem
from tests.svid.workload_fake import signed_crl

TD = TrustDomain("example.org")
FOREIGN = TrustDomain("foreign.org")


def _foreign_twin(ours: Issued) -> Issued:
    """A federated trust domain's CA that took our CA's subject name: names are the foreign
    operator's to choose, so they prove nothing across trust domains."""
    twin = make_ca("example.org", spiffe_id="spiffe://foreign.org")
    assert twin.cert.subject == ours.cert.subject
    return twin


def _verifier(bundles: dict[TrustDomain, X509Bundle], crls: list[bytes]) -> X509Verifier:
    result = revoked_from_crls(crls, bundles)
    assert result.rejected == ()
    revocations = RevocationSet(result.revoked)
    source = MemoryBundleSource()
    source.set_x509_bundles(BundleSet(dict(bundles)))
    return X509Verifier(source.x509_bundle_for, clock=FakeClock(T0), revocations=revocations)


def _same_serial_in_two_domains() -> tuple[
    Issued, Issued, Issued, Issued, dict[TrustDomain, X509Bundle]
]:
    """Our CA and a foreign one of the same name, a leaf of each with one serial, both bundles."""
    ours = make_ca()
    foreign = _foreign_twin(ours)
    leaf = make_leaf(ours)
    foreign_leaf = make_leaf(
        foreign, uris=["spiffe://foreign.org/w"], serial=leaf.cert.serial_number
    )
    bundles = {TD: X509Bundle(TD, (ours.cert,)), FOREIGN: X509Bundle(FOREIGN, (foreign.cert,))}
    return ours, foreign, leaf, foreign_leaf, bundles


def test_a_foreign_crl_does_not_revoke_our_certificate_of_the_same_serial() -> None:
    _ours, foreign, leaf, foreign_leaf, bundles = _same_serial_in_two_domains()
    verifier = _verifier(bundles, [signed_crl(foreign, [leaf.cert.serial_number])])
    assert verifier.verify_der(der_concat([leaf.cert])).spiffe_id.trust_domain == TD
    with pytest.raises(RevokedError):  # what the foreign CA issued, it may revoke
        verifier.verify_der(der_concat([foreign_leaf.cert]))


def test_a_foreign_authority_of_our_cas_name_that_cannot_be_read_leaves_our_crl_in_force() -> None:
    # cryptography raises UnsupportedGeneralNameType (no ValueError) reading its extensions
    # (an ediPartyName in its SAN): it signs no CRL, and every CRL of our CA (the same name)
    # no longer raised out of revoked_from_crls (in a source's stream loop, killing it).
    ours = make_ca()
    bundles = {
        TD: X509Bundle(TD, (ours.cert,)),
        FOREIGN: X509Bundle(FOREIGN, (edi_party_twin(ours, "foreign.org"),)),
    }
    leaf = make_leaf(ours)
    result = revoked_from_crls([signed_crl(ours, [leaf.cert.serial_number])], bundles)
    assert [r.value for r in result.revoked] == [format(leaf.cert.serial_number, "x")]


def test_our_crl_revokes_our_certificate_and_not_a_foreign_one_of_the_same_serial() -> None:
    ours, _foreign, leaf, foreign_leaf, bundles = _same_serial_in_two_domains()
    verifier = _verifier(bundles, [signed_crl(ours, [leaf.cert.serial_number])])
    with pytest.raises(RevokedError):
        verifier.verify_der(der_concat([leaf.cert]))
    verifier.verify_der(der_concat([foreign_leaf.cert]))


def test_a_crl_does_not_revoke_a_certificate_of_another_ca_of_its_trust_domain() -> None:
    ca = make_ca()
    other = make_ca("example.org-2", spiffe_id="spiffe://example.org")  # another name
    leaf = make_leaf(ca)
    bundles = {TD: X509Bundle(TD, (ca.cert, other.cert))}
    verifier = _verifier(bundles, [signed_crl(other, [leaf.cert.serial_number])])
    verifier.verify_der(der_concat([leaf.cert]))


def test_a_revoked_intermediate_revokes_the_leaves_under_it() -> None:
    # RFC 5280 6.3: a path through a revoked CA certificate is no path.
    root = make_ca()
    inter = make_ca(parent=root)
    leaf = make_leaf(inter)
    verifier = _verifier(
        {TD: X509Bundle(TD, (root.cert,))}, [signed_crl(root, [inter.cert.serial_number])]
    )
    with pytest.raises(RevokedError, match=format(inter.cert.serial_number, "x")):
        verifier.verify_der(der_concat([leaf.cert, inter.cert]))
    with pytest.raises(RevokedError):
        verifier.verify([leaf.cert, inter.cert])


def test_a_foreign_crl_revoking_our_serial_announces_nothing_of_ours() -> None:
    # on_revoked subscribers (TLS gate, ASGI, MCP) end connections and requests by what the
    # event names: a foreign CA's serial must not be told as our own SVID's.
    ours = make_ca()
    foreign = _foreign_twin(ours)
    leaf = make_leaf(ours, not_before=T0 - 10)
    own = X509Svid.load_pem(certs_to_pem([leaf.cert]), key_pem(leaf))
    state = SourceState((X509_SVIDS.name, X509_BUNDLES.name), RevocationSet(), FakeClock(T0))
    events: list[RevocationEvent] = []
    state.subscribe(events.append)
    state.delivered(X509_SVIDS.name, [own])
    bundles = BundleSet.of(X509Bundle(TD, (ours.cert,)), X509Bundle(FOREIGN, (foreign.cert,)))
    state.delivered(
        X509_BUNDLES.name,
        X509BundlesUpdate(bundles, (signed_crl(foreign, [leaf.cert.serial_number]),)),
    )
    assert len(events) == 1
    assert events[0].spiffe_id is None
    assert events[0].issuer is not None
    assert events[0].issuer.trust_domain == FOREIGN.name
    state.delivered(
        X509_BUNDLES.name,
        X509BundlesUpdate(bundles, (signed_crl(ours, [leaf.cert.serial_number]),)),
    )
    assert str(events[-1].spiffe_id) == "spiffe://example.org/workload"


def test_an_open_request_is_ended_by_its_issuers_crl_only() -> None:
    # The ASGI and MCP adapters end open requests by the keys their caller was admitted with.
    ours = make_ca()
    foreign = _foreign_twin(ours)
    leaf = make_leaf(ours)
    bundles = BundleSet.of(X509Bundle(TD, (ours.cert,)), X509Bundle(FOREIGN, (foreign.cert,)))
    peer = _verifier(dict(bundles), []).verify_der(der_concat([leaf.cert]))
    requests = OpenRequests()
    ended: list[str] = []
    requests.open(caller_keys(Caller(peer.spiffe_id, x509=peer)), lambda: ended.append("ours"))
    state = SourceState((X509_BUNDLES.name,), RevocationSet(), FakeClock(T0))
    state.subscribe(requests.on_revoked)
    serial = leaf.cert.serial_number
    state.delivered(X509_BUNDLES.name, X509BundlesUpdate(bundles, (signed_crl(foreign, [serial]),)))
    assert ended == []
    state.delivered(X509_BUNDLES.name, X509BundlesUpdate(bundles, (signed_crl(ours, [serial]),)))
    assert ended == ["ours"]


def test_a_crl_entry_for_a_serial_the_agent_revokes_anyway_is_announced_once() -> None:
    # Ending a task puts its serial on the agent's list and in the CRL: one revocation.
    ca = make_ca()
    serial = make_leaf(ca).cert.serial_number
    state = SourceState((X509_BUNDLES.name, REVOCATIONS.name), RevocationSet(), FakeClock(T0))
    events: list[RevocationEvent] = []
    state.subscribe(events.append)
    state.delivered(
        X509_BUNDLES.name, X509BundlesUpdate(BundleSet.of(X509Bundle(TD, (ca.cert,))), ())
    )
    bare = Revoked(KIND_X509_SERIAL, format(serial, "x"), T0 + 60)
    state.delivered(REVOCATIONS.name, RevocationsUpdate((bare,), (signed_crl(ca, [serial]),), 1))
    assert [(e.value, e.issuer) for e in events] == [(format(serial, "x"), None)]


def _intermediate_setup() -> tuple[Issued, Issued, Issued]:
    """A root in the bundle, an intermediate CA under it (a server under an upstream CA), and
    a leaf of the intermediate: the intermediate signs the leaf's CRL, and is in no bundle."""
    root = make_ca()
    inter = make_ca("server.example.org", parent=root, spiffe_id="spiffe://example.org")
    return root, inter, make_leaf(inter)


def _pending_verifier(
    bundles: dict[TrustDomain, X509Bundle], crls: list[bytes]
) -> tuple[X509Verifier, RevocationSet]:
    """A verifier whose set takes the CRLs as a source does: a CRL of no bundle authority is
    pending until an intermediate of a verified chain vouches for it."""
    revocations = RevocationSet()
    source = MemoryBundleSource()
    source.set_x509_bundles(BundleSet(dict(bundles)))
    verifier = X509Verifier(source.x509_bundle_for, clock=FakeClock(T0), revocations=revocations)
    _give_crls(revocations, bundles, crls)
    return verifier, revocations


def _give_crls(
    revocations: RevocationSet, bundles: dict[TrustDomain, X509Bundle], crls: list[bytes]
) -> None:
    result = revoked_from_crls(crls, bundles)
    revocations.replace(result.revoked, result.next_update, result.pending)


def test_an_intermediate_cas_crl_revokes_its_leaf_once_a_chain_through_it_verifies() -> None:
    # RFC 5280 6.3.3 (f), as OpenSSL applies it: the CRL issuer's certificate (here in the
    # chain) validates to the trust anchor the leaf validates to.
    root, inter, leaf = _intermediate_setup()
    other = make_leaf(inter)
    bundles = {TD: X509Bundle(TD, (root.cert,))}
    verifier, _ = _pending_verifier(bundles, [signed_crl(inter, [leaf.cert.serial_number])])
    with pytest.raises(RevokedError, match=format(leaf.cert.serial_number, "x")):
        verifier.verify_der(der_concat([leaf.cert, inter.cert]))
    with pytest.raises(RevokedError):
        verifier.verify([leaf.cert, inter.cert])
    verifier.verify_der(der_concat([other.cert, inter.cert]))  # what it does not list


def test_an_intermediates_crl_arriving_after_its_chain_verified_revokes_it() -> None:
    # The verified chain is cached: the CRL must revoke it on the cached path as well.
    root, inter, leaf = _intermediate_setup()
    bundles = {TD: X509Bundle(TD, (root.cert,))}
    verifier, revocations = _pending_verifier(bundles, [])
    chain = der_concat([leaf.cert, inter.cert])
    verifier.verify_der(chain)
    _give_crls(revocations, bundles, [signed_crl(inter, [leaf.cert.serial_number])])
    with pytest.raises(RevokedError):
        verifier.verify_der(chain)


def test_a_crl_in_an_intermediates_name_no_verified_chain_vouches_for_revokes_nothing() -> None:
    root, inter, leaf = _intermediate_setup()
    # The intermediate's name with another key, under no authority of the bundle: anyone
    # could make one, and revoke (deny service to) anything.
    impostor = make_ca("server.example.org", spiffe_id="spiffe://example.org")
    assert impostor.cert.subject == inter.cert.subject
    bundles = {TD: X509Bundle(TD, (root.cert,))}
    verifier, _ = _pending_verifier(bundles, [signed_crl(impostor, [leaf.cert.serial_number])])
    verifier.verify_der(der_concat([leaf.cert, inter.cert]))
    # Nor once the impostor's own chain is offered: it chains to no authority.
    with pytest.raises(SvidError):
        verifier.verify_der(der_concat([make_leaf(impostor).cert, impostor.cert]))
    verifier.verify_der(der_concat([leaf.cert, inter.cert]))


def test_an_intermediates_crl_speaks_only_for_the_trust_domain_its_chain_verified_in() -> None:
    root, inter, leaf = _intermediate_setup()
    foreign_root = make_ca("foreign.org", spiffe_id="spiffe://foreign.org")
    bundles = {TD: X509Bundle(TD, (root.cert,)), FOREIGN: X509Bundle(FOREIGN, (foreign_root.cert,))}
    verifier, revocations = _pending_verifier(
        bundles, [signed_crl(inter, [leaf.cert.serial_number])]
    )
    with pytest.raises(RevokedError):
        verifier.verify_der(der_concat([leaf.cert, inter.cert]))
    assert {r.issuer.trust_domain for r in revocations.items() if r.issuer} == {"example.org"}


def _foreign_chain(name: str) -> tuple[X509Bundle, bytes]:
    """A bundle of trust domain ``name`` and a chain through a fresh intermediate of it."""
    root = make_ca(name, spiffe_id=f"spiffe://{name}")
    inter = make_ca(f"i.{name}", parent=root, spiffe_id=None)
    leaf = make_leaf(inter, uris=[f"spiffe://{name}/w"])
    return X509Bundle(TrustDomain(name), (root.cert,)), der_concat([leaf.cert, inter.cert])


def test_a_foreign_trust_domains_intermediates_do_not_displace_ours() -> None:
    # The set remembers intermediates per trust domain: a federated one that has chains
    # through MAX_INTERMEDIATES fresh intermediates verified only displaces its own. Ours
    # stays, so its next CRL is vouched for at once and revokes our chain verified before
    # (cached here; on svid.tls, an open connection).
    root, inter, leaf = _intermediate_setup()
    foreign_root = make_ca("foreign.org", spiffe_id="spiffe://foreign.org")
    bundles = {TD: X509Bundle(TD, (root.cert,)), FOREIGN: X509Bundle(FOREIGN, (foreign_root.cert,))}
    verifier, revocations = _pending_verifier(bundles, [])
    chain = der_concat([leaf.cert, inter.cert])
    verifier.verify_der(chain)
    for n in range(MAX_INTERMEDIATES):
        foreign_inter = make_ca(f"i{n}.foreign.org", parent=foreign_root, spiffe_id=None)
        foreign_leaf = make_leaf(foreign_inter, uris=["spiffe://foreign.org/w"])
        verifier.verify_der(der_concat([foreign_leaf.cert, foreign_inter.cert]))
    _give_crls(revocations, bundles, [signed_crl(inter, [leaf.cert.serial_number])])
    with pytest.raises(RevokedError):
        verifier.verify_der(chain)


def test_past_the_trust_domain_bound_one_whose_intermediate_vouches_for_a_crl_stays(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    # Past MAX_INTERMEDIATE_TRUST_DOMAINS the least recently noted trust domain is forgotten,
    # but one whose intermediates vouch for a CRL in force only after all others: the set
    # cannot tell which is its own, but ours has its CAs' CRLs applied.
    monkeypatch.setattr(revocation_module, "MAX_INTERMEDIATE_TRUST_DOMAINS", 2)
    root, inter, leaf = _intermediate_setup()
    bundles = {TD: X509Bundle(TD, (root.cert,))}
    chains = []
    for name in ("a.org", "b.org"):
        bundle, foreign = _foreign_chain(name)
        bundles[bundle.trust_domain] = bundle
        chains.append(foreign)
    verifier, revocations = _pending_verifier(bundles, [signed_crl(inter, [])])
    chain = der_concat([leaf.cert, inter.cert])
    verifier.verify_der(chain)  # the least recent from now on, and vouching for its CRL
    for foreign in chains:
        verifier.verify_der(foreign)
    _give_crls(revocations, bundles, [signed_crl(inter, [leaf.cert.serial_number])])
    with pytest.raises(RevokedError):
        verifier.verify_der(chain)


def _rsa_ca_and_leaf() -> tuple[Issued, rsa.RSAPrivateKey, Issued]:
    key = rsa_key()
    ca = make_ca(key=key)
    return ca, key, make_leaf(ca)


def test_a_sha1_signed_crl_is_ignored_naming_its_hash() -> None:
    # As a SHA-1 certificate is refused. cryptography 51 fails its signature check too, but
    # it was then said to be signed by no authority, and kept for an intermediate CA to vouch
    # for; an older cryptography (pyproject takes 46 on) may have verified it.
    ca, key, leaf = _rsa_ca_and_leaf()
    crl = resigned_crl(
        signed_crl(ca, [leaf.cert.serial_number]),
        RSA_SHA1,
        lambda tbs: key.sign(tbs, padding.PKCS1v15(), hashes.SHA1()),
    )
    result = revoked_from_crls([crl], {TD: X509Bundle(TD, (ca.cert,))})
    assert result.revoked == ()
    assert result.pending == ()
    assert result.rejected == (
        "CRL 0 (issuer CN=CA example.org) is signed with sha1: only SHA-256, SHA-384 and "
        "SHA-512 are accepted",
    )


def test_an_rsa_pss_crl_whose_mgf1_hash_is_sha1_revokes_nothing() -> None:
    ca, key, leaf = _rsa_ca_and_leaf()
    bundles = {TD: X509Bundle(TD, (ca.cert,))}
    crl = resigned_crl(
        signed_crl(ca, [leaf.cert.serial_number]), rsa_pss_sha256(True), pss_signer(key, True)
    )
    result = revoked_from_crls([crl], bundles)
    assert result.pending == ()
    assert result.rejected == (
        "CRL 0 (issuer CN=CA example.org) is signed with RSA-PSS whose MGF1 uses sha1: only "
        "MGF1 with the signature's own hash (sha256) is accepted",
    )
    source = MemoryBundleSource()
    source.set_x509_bundles(BundleSet(dict(bundles)))
    verifier = X509Verifier(
        source.x509_bundle_for, clock=FakeClock(T0), revocations=RevocationSet(result.revoked)
    )
    verifier.verify_der(der_concat([leaf.cert]))


def test_an_rsa_pss_crl_with_sha256_in_mgf1_revokes() -> None:
    ca, key, leaf = _rsa_ca_and_leaf()
    crl = resigned_crl(
        signed_crl(ca, [leaf.cert.serial_number]), rsa_pss_sha256(False), pss_signer(key, False)
    )
    with pytest.raises(RevokedError):
        _verifier({TD: X509Bundle(TD, (ca.cert,))}, [crl]).verify_der(der_concat([leaf.cert]))
