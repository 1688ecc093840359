"""A CRL past its nextUpdate: its issuer promised a newer one by then, so what it does not list
may have been revoked since. Its entries keep revoking (dropping them would un-revoke), and a
verifier with max_revocation_staleness refuses that issuer's certificates once the CRL is older
than the bound, as it refuses everything when its agent is gone that long; a fresh CRL restores
service. Real certificates, real CRLs, the real source state, a fake clock."""

from __future__ import annotations

import datetime as dt

import pytest
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization

from svid import RevokedError, StaleRevocationsError, X509Bundle, X509Verifier, der_concat
from svid._bundle import BundleSet
from svid._clock import FakeClock
from svid._revocation import RevocationSet, cert_key
from svid._source_state import SourceState
from svid._spiffe_id import TrustDomain
from svid._workload_calls import X509_BUNDLES, X509BundlesUpdate
from tests.svid.certs import T0, Issued, make_ca, make_leaf

TD = TrustDomain("example.org")
FOREIGN = TrustDomain("foreign.org")
MAX_STALENESS = 60.0


def _crl(issuer: Issued, serials: list[int], next_update: float) -> bytes:
    stamp = dt.datetime.fromtimestamp(next_update - 3600, tz=dt.UTC)
    builder = (
        x509.CertificateRevocationListBuilder()
        .issuer_name(issuer.cert.subject)
        .last_update(stamp)
        .next_update(dt.datetime.fromtimestamp(next_update, tz=dt.UTC))
    )
    for serial in serials:
        builder = builder.add_revoked_certificate(
            x509.RevokedCertificateBuilder().serial_number(serial).revocation_date(stamp).build()
        )
    crl = builder.sign(issuer.key, hashes.SHA256())  # type: ignore[arg-type]
    return crl.public_bytes(serialization.Encoding.DER)


class _World:
    def __init__(self) -> None:
        self.clock = FakeClock(T0)
        self.ca = make_ca()
        self.foreign = make_ca("foreign.org")
        self.bundles = BundleSet.of(
            X509Bundle(TD, (self.ca.cert,)), X509Bundle(FOREIGN, (self.foreign.cert,))
        )
        self.state = SourceState((X509_BUNDLES.name,), RevocationSet(), self.clock)
        self.deliver()

    def deliver(self, *crls: bytes) -> None:
        self.state.delivered(X509_BUNDLES.name, X509BundlesUpdate(self.bundles, crls))

    def verifier(self, max_staleness: float | None = MAX_STALENESS) -> X509Verifier:
        return X509Verifier(
            self.state.bundles.x509_bundle_for,
            clock=self.clock,
            revocations=self.state.revocations,
            max_revocation_staleness=max_staleness,
        )


def test_a_crl_past_its_next_update_by_more_than_the_bound_refuses_its_issuers_certificates() -> (
    None
):
    world = _World()
    leaf = der_concat([make_leaf(world.ca).cert])
    world.deliver(_crl(world.ca, [1], next_update=T0 + 30))
    verifier = world.verifier()
    verifier.verify_der(leaf)  # current
    world.clock.advance(30 + MAX_STALENESS)  # past nextUpdate, within the bound
    verifier.verify_der(leaf)
    world.clock.advance(1)
    with pytest.raises(StaleRevocationsError, match="nextUpdate"):
        verifier.verify_der(leaf)  # the cached answer too
    with pytest.raises(StaleRevocationsError):
        world.verifier().verify_der(leaf)
    # A fresh CRL: served again (the stale one denied service only until it was replaced).
    world.deliver(_crl(world.ca, [1], next_update=world.clock.now() + 3600))
    verifier.verify_der(leaf)


def test_a_stale_crl_of_another_issuer_refuses_nothing_of_ours() -> None:
    # One trust domain's CRL going stale says nothing of another's (nor lets a federated
    # trust domain deny service to ours by letting its CRL lapse).
    world = _World()
    leaf = der_concat([make_leaf(world.ca).cert])
    world.deliver(
        _crl(world.ca, [1], next_update=T0 + 3600),
        _crl(world.foreign, [1], next_update=T0 - 3600),
    )
    world.verifier().verify_der(leaf)
    foreign_leaf = der_concat([make_leaf(world.foreign, uris=["spiffe://foreign.org/w"]).cert])
    with pytest.raises(StaleRevocationsError):
        world.verifier().verify_der(foreign_leaf)


def test_a_stale_crls_entries_keep_revoking() -> None:
    # Dropping them would un-revoke what the issuer revoked: staleness never admits more.
    world = _World()
    revoked = make_leaf(world.ca)
    world.deliver(_crl(world.ca, [revoked.cert.serial_number], next_update=T0 - 86400))
    with pytest.raises(RevokedError):
        world.verifier(max_staleness=None).verify_der(der_concat([revoked.cert]))
    world.verifier(max_staleness=None).verify_der(der_concat([make_leaf(world.ca).cert]))


def test_the_time_a_chain_has_left_runs_to_its_issuers_crl_refusing_it() -> None:
    # What a watch over an open connection or response sleeps for: to the moment check_fresh
    # on that chain raises, and not past it.
    world = _World()
    leaf = make_leaf(world.ca).cert
    keys = (cert_key(TD.name, leaf),)
    verifier = world.verifier()
    world.deliver(_crl(world.ca, [1], next_update=T0 + 30))
    world.clock.advance(40)
    assert verifier.revocations_fresh_for(keys) == pytest.approx(30 + MAX_STALENESS - 40)
    assert verifier.revocations_fresh_for() == MAX_STALENESS  # everything else: the feed's
    foreign_leaf = make_leaf(world.foreign, uris=["spiffe://foreign.org/w"]).cert
    assert verifier.revocations_fresh_for([cert_key(FOREIGN.name, foreign_leaf)]) == MAX_STALENESS
    world.clock.advance(30 + MAX_STALENESS - 40)
    assert verifier.revocations_fresh_for(keys) == 0
    verifier.check_fresh(keys)  # at the bound itself, not yet
    world.clock.advance(0.5)
    with pytest.raises(StaleRevocationsError):
        verifier.check_fresh(keys)
    assert verifier.revocations_fresh_for(keys) == 0


@pytest.mark.parametrize("crl_first", [True, False])
def test_an_intermediates_stale_crl_refuses_its_certificates_even_when_it_lists_none(
    crl_first: bool,
) -> None:
    # An intermediate CA (no bundle authority) whose CRL revokes nothing still promised a
    # newer one by its nextUpdate: past that by more than the bound, its leaves are refused
    # as a bundle authority's would be, whether its chain or its CRL came first.
    world = _World()
    inter = make_ca("server.example.org", parent=world.ca, spiffe_id=None)
    chain = der_concat([make_leaf(inter).cert, inter.cert])
    verifier = world.verifier()
    if crl_first:
        world.deliver(_crl(inter, [], next_update=T0 + 30))
        verifier.verify_der(chain)  # vouches for the CRL
    else:
        verifier.verify_der(chain)
        world.deliver(_crl(inter, [], next_update=T0 + 30))
    world.clock.advance(30 + MAX_STALENESS + 1)
    with pytest.raises(StaleRevocationsError, match="nextUpdate"):
        verifier.verify_der(chain)
