"""A node banned through one server, attesting again (x509pop: the same agent ID) through
another whose change feed has not brought the ban in: that server's memory still holds the
agent unbanned, so only the datastore can refuse. Its save is a compare-and-swap on a row not
banned (q.REPLACE_AGENT), so the ban holds and the node is refused."""

from __future__ import annotations

import shutil

import grpc
import pytest

from server.ca.sealing import KeyEncryptionKey
from svid._proto import admin_pb2
from svid._x509pop import sign_challenge
from tests.server.fixtures import PEM, short_tmpdir, start_server
from tests.server.test_agent_unknown_to_replica import FeedGate, _new_gate
from tests.server.test_replication_servers import wait_until
from tests.server.test_x509pop import _attest, _ca, _node


def test_a_node_banned_through_a_is_refused_by_b_whose_feed_is_behind(postgres_dsn: str) -> None:
    root = short_tmpdir()
    node_ca = _ca("node-ca")
    (root / "node-ca.pem").write_bytes(node_ca[0].public_bytes(PEM))
    KeyEncryptionKey.generate().write_new(root / "kek")
    shared = {
        "datastore": postgres_dsn,
        "key_encryption_key_file": str(root / "kek"),
        "x509pop_ca_bundle": str(root / "node-ca.pem"),
    }
    a = start_server(root, admin_socket=str(root / "a" / "admin.sock"), **shared)
    b = start_server(
        root, admin_socket=str(root / "b" / "admin.sock"), feed_poll_interval=60.0, **shared
    )
    follower = b.server.follower
    assert follower is not None
    gate: FeedGate = b.call(_new_gate())
    follower.catch_up = gate.wrap(follower.catch_up)  # type: ignore[method-assign]
    try:
        cert, key = _node(*node_ca, "node-banned-elsewhere")
        signer = lambda nonce: sign_challenge(key, nonce)  # noqa: E731
        agent_id = _attest(a, [cert], signer).spiffe_id
        wait_until(lambda: agent_id in b.server.state.agents, 5, "B to learn the agent")
        b.call(gate.close())
        a.admin().BanAgent(admin_pb2.BanAgentRequest(spiffe_id=agent_id), timeout=10)
        assert not b.server.state.agents[agent_id].banned  # B has not heard
        with pytest.raises(grpc.RpcError) as refused:
            _attest(b, [cert], signer)
        assert refused.value.code() == grpc.StatusCode.PERMISSION_DENIED  # type: ignore[attr-defined]
        assert b.server.datastore.get_agent(agent_id).banned
        b.call(gate.release())
        wait_until(lambda: b.server.state.agents[agent_id].banned, 5, "B to hear of the ban")
    finally:
        b.call(gate.release())
        b.stop()
        a.stop()
        shutil.rmtree(root, ignore_errors=True)
