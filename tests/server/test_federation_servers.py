"""Federation with two servers of one trust domain on one datastore (SQLite file, PostgreSQL
schema): relationships and foreign bundles written through A reach B through the change feed
(server/replication.py, server/federation/service.py), and B's agents get the bundles their
entries federate with, as they would from a change made on B.

other.org runs A and B; example.org is a third server serving its bundle endpoint.
"""

from __future__ import annotations

import shutil
import time
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

import grpc
import pytest

from server.ca.sealing import KeyEncryptionKey
from server.federation.service import LEASE_PREFIX
from svid._bundle import SpiffeBundle
from svid._proto import admin_pb2, common_pb2, node_pb2
from svid._spiffe_id import TrustDomain
from tests.ports import free_port
from tests.server.fixtures import Agent, RunningServer, managed_server, short_tmpdir, start_server
from tests.server.test_replication_servers import next_matching, report, wait_until

HOME = TrustDomain("example.org")
HOME_KEY = "spiffe://example.org"
HINT = 7


@dataclass
class World:
    home: RunningServer
    port: int
    a: RunningServer
    b: RunningServer

    def relationship(self) -> admin_pb2.FederationRelationship:
        return admin_pb2.FederationRelationship(
            trust_domain="example.org",
            bundle_endpoint_url=f"https://127.0.0.1:{self.port}/",
            profile="https_spiffe",
            endpoint_spiffe_id="spiffe://example.org/svid/server",
        )


@pytest.fixture(params=["sqlite", "postgresql"])
def world(request: pytest.FixtureRequest) -> Iterator[World]:
    root = short_tmpdir()
    overrides: dict[str, Any] = {"trust_domain": "other.org"}
    if request.param == "postgresql":
        KeyEncryptionKey.generate().write_new(root / "kek")
        overrides["datastore"] = request.getfixturevalue("postgres_dsn")
        overrides["key_encryption_key_file"] = str(root / "kek")
    port = free_port()
    with managed_server(
        bundle_endpoint_address=f"127.0.0.1:{port}", bundle_endpoint_refresh_hint=HINT
    ) as home:
        a = start_server(root, admin_socket=str(root / "a" / "admin.sock"), **overrides)
        b = start_server(root, admin_socket=str(root / "b" / "admin.sock"), **overrides)
        try:
            yield World(home, port, a, b)
        finally:
            b.stop()
            a.stop()
            shutil.rmtree(root, ignore_errors=True)


def federating_agent_on_b(world: World) -> tuple[Agent, Any]:
    """An agent attested through A, serving an entry that federates with example.org, and its
    Sync stream on B (past the snapshot, which holds no foreign bundle yet)."""
    agent = world.a.attest()
    entry = common_pb2.Entry(
        spiffe_id="spiffe://other.org/partner",
        parent_id=agent.spiffe_id,
        selectors=[common_pb2.Selector(type="unix", value="uid:1000")],
        federates_with=["spiffe://example.org"],
    )
    made = world.a.admin().CreateEntry(admin_pb2.CreateEntryRequest(entry=entry), timeout=10)
    state_b = world.b.server.state
    wait_until(lambda: agent.spiffe_id in state_b.agents, 2, "B to learn the agent")
    wait_until(lambda: made.entry.id in state_b.entries.by_id, 2, "B to learn the entry")
    stream = world.b.node_stub(agent).Sync(node_pb2.SyncRequest(), timeout=60)
    snapshot = next(stream)
    assert snapshot.kind == node_pb2.SyncUpdate.SNAPSHOT
    assert dict(snapshot.federated_bundles) == {}
    return agent, stream


def foreign_on(update: Any) -> common_pb2.Bundle | None:
    """example.org's bundle in a Sync update that carries the bundles (None: not in it)."""
    if not update.HasField("bundle") or HOME_KEY not in update.federated_bundles:
        return None
    found: common_pb2.Bundle = update.federated_bundles[HOME_KEY]
    return found


def test_a_bundle_set_through_a_reaches_an_agent_on_b(world: World) -> None:
    _, stream = federating_agent_on_b(world)
    exported = world.home.server.state.bundle
    started = time.monotonic()
    world.a.admin().SetFederatedBundle(
        admin_pb2.SetFederatedBundleRequest(
            bundle=admin_pb2.FederatedBundle(trust_domain="example.org", bundle=exported.to_json())
        ),
        timeout=10,
    )
    update = next_matching(stream, lambda u: foreign_on(u) is not None)
    took = time.monotonic() - started
    report("foreign bundle set, on B's agent's Sync stream", took)
    pushed = foreign_on(update)
    assert pushed is not None
    assert list(pushed.x509_authorities) == list(world.home.bundle().x509_authorities)
    # B's admin API serves it too.
    got = world.b.admin().GetFederatedBundle(
        admin_pb2.GetFederatedBundleRequest(trust_domain="example.org"), timeout=10
    )
    assert SpiffeBundle.parse(HOME, got.bundle).x509_authorities == exported.x509_authorities
    # Deleted through A: gone from B's agent's set.
    world.a.admin().DeleteFederatedBundle(
        admin_pb2.DeleteFederatedBundleRequest(trust_domain="example.org"), timeout=10
    )
    update = next_matching(stream, lambda u: u.HasField("bundle"))
    assert dict(update.federated_bundles) == {}
    stream.cancel()


def test_a_relationship_created_through_a_is_refreshed_by_b_and_deleted_through_a_stops(
    world: World,
) -> None:
    _, stream = federating_agent_on_b(world)
    admin_a, admin_b = world.a.admin(), world.b.admin()
    exported = world.home.server.state.bundle.to_json()
    admin_a.SetFederatedBundle(
        admin_pb2.SetFederatedBundleRequest(
            bundle=admin_pb2.FederatedBundle(trust_domain="example.org", bundle=exported)
        ),
        timeout=10,
    )
    started = time.monotonic()
    admin_a.CreateFederationRelationship(
        admin_pb2.CreateFederationRelationshipRequest(relationship=world.relationship()),
        timeout=10,
    )
    service_b = world.b.server.federation.service  # type: ignore[union-attr]
    wait_until(service_b.relationships, 1.0, "B to know the relationship")
    report("relationship created, known on B", time.monotonic() - started)
    shown = admin_b.GetFederationRelationship(
        admin_pb2.GetFederationRelationshipRequest(trust_domain="example.org"), timeout=10
    )
    assert shown.bundle_endpoint_url == world.relationship().bundle_endpoint_url
    assert not shown.static
    # A fetched at once (the endpoint's copy carries its refresh hint): B's agent gets it.
    next_matching(stream, lambda u: getattr(foreign_on(u), "refresh_hint", 0) == HINT)
    report("relationship created, fetched bundle on B's agent", time.monotonic() - started)
    # B refreshes it itself when asked (its refresher has the relationship).
    assert service_b.next_fetch("example.org") is not None
    done = admin_b.RefreshFederatedBundle(
        admin_pb2.RefreshFederatedBundleRequest(trust_domain="example.org"), timeout=30
    )
    assert SpiffeBundle.parse(HOME, done.bundle.bundle).refresh_hint == HINT
    # Deleted through A: B stops refreshing it.
    admin_a.DeleteFederationRelationship(
        admin_pb2.DeleteFederationRelationshipRequest(trust_domain="example.org"), timeout=10
    )
    wait_until(lambda: not service_b.relationships(), 1.0, "B to drop the relationship")
    assert service_b.next_fetch("example.org") is None
    with pytest.raises(grpc.RpcError) as exc:
        admin_b.RefreshFederatedBundle(
            admin_pb2.RefreshFederatedBundleRequest(trust_domain="example.org"), timeout=10
        )
    assert exc.value.code() == grpc.StatusCode.NOT_FOUND  # type: ignore[attr-defined]
    stream.cancel()


def test_a_relationship_deleted_through_b_releases_its_fetch_lease_at_once(world: World) -> None:
    """A holds the relationship's fetch lease (it fetched at the create); deleted through B, A
    dropped the relationship from the feed but held the lease until it lapsed (two refresh
    intervals) or A stopped."""
    admin_a = world.a.admin()
    exported = world.home.server.state.bundle.to_json()
    admin_a.SetFederatedBundle(
        admin_pb2.SetFederatedBundleRequest(
            bundle=admin_pb2.FederatedBundle(trust_domain="example.org", bundle=exported)
        ),
        timeout=10,
    )
    admin_a.CreateFederationRelationship(
        admin_pb2.CreateFederationRelationshipRequest(relationship=world.relationship()),
        timeout=10,
    )
    service_a = world.a.server.federation.service  # type: ignore[union-attr]
    # A's fetch ended too: one that ends after the delete lets go of the lease on its own.
    wait_until(
        lambda: "example.org" in service_a._claimed and not service_a._running,
        1.0,
        "A to hold the fetch lease, its fetch done",
    )
    store = world.b.server.datastore
    lease = LEASE_PREFIX + "example.org"
    assert not store.acquire_lease(lease, "probe", int(time.time()), 60)
    world.b.admin().DeleteFederationRelationship(
        admin_pb2.DeleteFederationRelationshipRequest(trust_domain="example.org"), timeout=10
    )
    wait_until(
        lambda: store.acquire_lease(lease, "probe", int(time.time()), 60),
        1.0,
        "A to release the fetch lease of the relationship deleted through B",
    )
    assert "example.org" not in service_a._claimed
    store.release_lease(lease, "probe")
