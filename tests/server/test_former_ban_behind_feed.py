"""An upgraded x509pop node's former (SHA-1) agent banned through one server, the node attesting
under its new ID through another whose change feed has not brought the ban in. That server's
memory holds the former agent unbanned: admitting the node evicts it, and the eviction's
delete must not take the ban with it (a ban is only ever lifted by the operator)."""

from __future__ import annotations

import grpc

from server.datastore.errors import NotFoundError
from svid._proto import admin_pb2
from svid._x509pop import sign_challenge
from tests.server.fixtures import PEM
from tests.server.held_feed import held_feed
from tests.server.test_replication_servers import wait_until
from tests.server.test_x509pop import _admitted_before_upgrade, _attest, _ca, _former_id, _node


def test_a_former_id_banned_through_a_stays_banned_when_b_admits_the_node(
    postgres_dsn: str,
) -> None:
    """Fails on main: B admits the node under its new ID and its eviction of the former
    agent deletes the banned row, so the ban is gone from the datastore."""
    node_ca = _ca("node-ca")
    with held_feed(postgres_dsn, node_ca[0].public_bytes(PEM)) as servers:
        a, b, gate = servers.a, servers.b, servers.gate
        cert, key = _node(*node_ca, "former-banned-elsewhere")
        former = _former_id(cert)
        # The previous release's admission of the node, through A.
        _admitted_before_upgrade(a, former)
        wait_until(lambda: former in b.server.state.agents, 5, "B to learn the former agent")
        b.call(gate.close())
        a.admin().BanAgent(admin_pb2.BanAgentRequest(spiffe_id=former), timeout=10)
        assert not b.server.state.agents[former].banned  # B has not heard
        admitted = None
        refused = None
        try:
            admitted = _attest(b, [cert], lambda nonce: sign_challenge(key, nonce)).spiffe_id
        except grpc.RpcError as exc:
            refused = exc.code()  # type: ignore[attr-defined]
        try:
            banned = b.server.datastore.get_agent(former).banned
        except NotFoundError:
            banned = False  # deleted, ban and all
        assert banned, f"the ban of {former} is gone from the datastore; B admitted {admitted}"
        assert admitted is None, f"B admitted {admitted} for a node banned as {former}"
        assert refused == grpc.StatusCode.PERMISSION_DENIED
        # The admission's allow went on the log before the eviction found the ban: a deny of the
        # same agent must follow it, so the log does not say the node was admitted.
        said = [
            r["decision"]
            for r in b.server.datastore.audit_rows()
            if r["kind"] == "node_attestation" and r["agent_id"] not in (None, former)
        ]
        assert said, "no node_attestation event of the node's new ID"
        assert said[-1] == "deny", (
            f"the log says {said} of the node's admission under its new ID, refused"
        )
