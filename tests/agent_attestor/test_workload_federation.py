"""Foreign bundles reach a workload only through an entry of its that federates with them."""

from __future__ import annotations

import json
import os

import grpc
import pytest

from agent_attestor.cache import SyncDelta
from agent_attestor.model import Selector
from svid._clock import FakeClock
from svid._jose import sign_jws
from svid._proto import workload_pb2
from tests.agent_attestor.harness import HEADER, Harness
from tests.agent_attestor.pki import LocalCa

OWN = "spiffe://example.org"


def _foreign(agent: Harness, *names: str) -> dict[str, LocalCa]:
    made = {}
    for name in names:
        made[name] = LocalCa(FakeClock(agent.clock.now()), trust_domain=name)
        agent.federated[name] = made[name].bundle()
    return made


def _views(agent: Harness) -> tuple[set[str], set[str], set[str]]:
    """What the caller is given: X.509 stream federated_bundles, X.509 bundles, JWT bundles."""
    stub = agent.stub()
    x509 = next(stub.FetchX509SVID(workload_pb2.X509SVIDRequest(), metadata=HEADER))
    bundles = next(stub.FetchX509Bundles(workload_pb2.X509BundlesRequest(), metadata=HEADER))
    jwt = next(stub.FetchJWTBundles(workload_pb2.JWTBundlesRequest(), metadata=HEADER))
    return set(x509.federated_bundles), set(bundles.bundles), set(jwt.bundles)


def test_a_workload_without_federation_sees_only_its_own_trust_domain(agent: Harness) -> None:
    _foreign(agent, "other.org", "third.org")
    agent.add_entry("/plain")
    assert _views(agent) == (set(), {OWN}, {OWN})


def test_a_workload_sees_exactly_the_foreign_bundles_its_entries_federate_with(
    agent: Harness,
) -> None:
    _foreign(agent, "other.org", "third.org")
    agent.add_entry("/partner", federates_with=("other.org",))
    # An entry of another workload federating with third.org changes nothing for this one.
    agent.add_entry(
        "/elsewhere",
        frozenset({Selector("unix", f"uid:{os.getuid() + 1}")}),
        federates_with=("third.org",),
    )
    other = {"spiffe://other.org"}
    assert _views(agent) == (other, {OWN, *other}, {OWN, *other})
    jwt = next(agent.stub().FetchJWTBundles(workload_pb2.JWTBundlesRequest(), metadata=HEADER))
    keys = json.loads(jwt.bundles["spiffe://other.org"])["keys"]
    assert [k["kid"] for k in keys] == [agent.federated["other.org"].jwt_keys[0].kid]


def test_a_foreign_bundle_the_server_no_longer_sends_is_dropped(agent: Harness) -> None:
    _foreign(agent, "other.org")
    agent.add_entry("/partner", federates_with=("other.org",))
    stream = agent.stub().FetchX509Bundles(
        workload_pb2.X509BundlesRequest(), metadata=HEADER, timeout=10
    )
    assert set(next(stream).bundles) == {OWN, "spiffe://other.org"}
    # A delta with a bundle carries the whole foreign set: here, none.
    delta = SyncDelta(bundle=agent.ca.bundle(), federated={}, revision=2)
    agent.lt.call(lambda: agent.cache.apply_delta(delta))
    assert set(next(stream).bundles) == {OWN}
    stream.cancel()


def test_a_foreign_jwt_svid_is_valid_only_for_a_workload_federating_with_its_domain(
    agent: Harness,
) -> None:
    cas = _foreign(agent, "other.org")
    exp = int(agent.clock.now()) + 60
    claims = {"sub": "spiffe://other.org/caller", "aud": "svc", "exp": exp}
    token = sign_jws({"kid": cas["other.org"].jwt_kid}, claims, cas["other.org"].jwt_key)
    request = workload_pb2.ValidateJWTSVIDRequest(audience="svc", svid=token)
    plain = agent.add_entry("/plain")
    with pytest.raises(grpc.RpcError) as refused:
        agent.stub().ValidateJWTSVID(request, metadata=HEADER)
    assert refused.value.code() is grpc.StatusCode.INVALID_ARGUMENT
    assert "not one this workload federates with" in str(refused.value.details())
    agent.remove_entry(plain.id)
    agent.add_entry("/partner", federates_with=("other.org",))
    answer = agent.stub().ValidateJWTSVID(request, metadata=HEADER)
    assert answer.spiffe_id == "spiffe://other.org/caller"
