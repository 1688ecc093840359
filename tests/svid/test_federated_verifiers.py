"""svid's verifiers accept a federated trust domain only where the caller names it, even when the
agent gives the workload that domain's bundle (a real agent Workload API endpoint)."""

from __future__ import annotations

from collections.abc import Iterator

import pytest
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec

from svid import TrustDomain, VerificationError, X509Source
from svid._clock import FakeClock
from svid._jose import sign_jws
from svid.workloadapi import Backoff
from tests.agent_attestor.harness import Harness
from tests.agent_attestor.pki import LocalCa

FAST = Backoff(0.02, 0.2)


@pytest.fixture
def world() -> Iterator[tuple[Harness, LocalCa, X509Source]]:
    agent = Harness()
    other = LocalCa(FakeClock(agent.clock.now()), trust_domain="other.org")
    agent.federated["other.org"] = other.bundle()
    agent.add_entry("/me", federates_with=("other.org",))
    source = X509Source(f"unix://{agent.socket_path}", backoff=FAST, jwt_bundles=True)
    try:
        with source:
            yield agent, other, source
    finally:
        agent.close()


def _leaf(ca: LocalCa, spiffe_id: str) -> bytes:
    key = ec.generate_private_key(ec.SECP256R1())
    return ca.sign_leaf(key.public_key(), spiffe_id).public_bytes(serialization.Encoding.DER)


def test_x509_peers_of_a_federated_domain_need_the_caller_to_name_it(
    world: tuple[Harness, LocalCa, X509Source],
) -> None:
    agent, other, source = world
    assert {td.name for td in source.x509_bundles} == {"example.org", "other.org"}
    assert source.own_trust_domains() == frozenset({"example.org"})
    foreign = _leaf(other, "spiffe://other.org/peer")
    own = _leaf(agent.ca, "spiffe://example.org/peer")
    default = source.x509_verifier()
    assert str(default.verify_der(own).spiffe_id) == "spiffe://example.org/peer"
    with pytest.raises(VerificationError, match="other"):
        default.verify_der(foreign)
    for verifier in (
        source.x509_verifier(trust_domains=[TrustDomain("other.org")]),
        source.x509_verifier(trust_domains=["spiffe://other.org"]),
        source.x509_verifier(federated=True),
    ):
        assert str(verifier.verify_der(foreign).spiffe_id) == "spiffe://other.org/peer"
    with pytest.raises(VerificationError):
        source.x509_verifier(trust_domains=["third.org"]).verify_der(foreign)


def test_jwt_svids_of_a_federated_domain_need_the_caller_to_name_it(
    world: tuple[Harness, LocalCa, X509Source],
) -> None:
    agent, other, source = world
    claims = {"sub": "spiffe://other.org/caller", "aud": "svc", "exp": int(agent.clock.now()) + 60}
    token = sign_jws({"kid": other.jwt_kid, "alg": "ES256"}, claims, other.jwt_key)
    with pytest.raises(VerificationError, match="other"):
        source.jwt_verifier().verify(token, "svc")
    verified = source.jwt_verifier(trust_domains=["other.org"]).verify(token, "svc")
    assert str(verified.spiffe_id) == "spiffe://other.org/caller"
