"""A node banned through one server, attesting again (x509pop: the same agent ID) through
another whose change feed has not brought the ban in: that server's memory still holds the
agent unbanned, so only the datastore can refuse. Its save is a compare-and-swap on a row not
banned (q.REPLACE_AGENT), so the ban holds and the node is refused."""

from __future__ import annotations

import grpc
import pytest

from svid._proto import admin_pb2
from svid._x509pop import sign_challenge
from tests.server.fixtures import PEM
from tests.server.held_feed import held_feed
from tests.server.test_replication_servers import wait_until
from tests.server.test_x509pop import _attest, _ca, _node


def test_a_node_banned_through_a_is_refused_by_b_whose_feed_is_behind(postgres_dsn: str) -> None:
    node_ca = _ca("node-ca")
    with held_feed(postgres_dsn, node_ca[0].public_bytes(PEM)) as servers:
        a, b, gate = servers.a, servers.b, servers.gate
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
