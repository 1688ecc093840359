"""A CA rotation step reaches agents on their open Sync streams (push, not poll).

Full rotation schedules are H2's tests (H2's rotation tests); this checks the wiring:
manager -> bundle callback -> state -> notifier -> Sync, and TLS roots follow the bundle.
"""

from __future__ import annotations

import asyncio

from svid._proto import node_pb2
from tests.server.fixtures import make_csr, managed_server


def test_prepared_ca_is_pushed_on_sync_and_issuance_continues() -> None:
    short = {
        "ca_ttl": 60,
        "jwt_key_ttl": 60,
        "default_x509_svid_ttl": 30,
        "default_jwt_svid_ttl": 30,
        "agent_svid_ttl": 60,
        "server_svid_ttl": 60,
    }
    with managed_server(**short) as server:
        agent = server.attest()
        entry = server.create_entry("/rot/web", agent.spiffe_id)
        stream = server.node_stub(agent).Sync(node_pb2.SyncRequest(), timeout=30)
        first = next(stream)
        assert len(first.bundle.x509_authorities) == 1
        # Half the CA's life: the next key is prepared and published at once.
        server.clock.advance(31)
        rotated = server.call(asyncio.to_thread(server.server.rotator.tick))
        assert rotated
        second = next(stream)
        assert second.bundle.sequence > first.bundle.sequence
        assert len(second.bundle.x509_authorities) == 2
        assert len(second.bundle.jwt_keys) == 2
        assert server.bundle() == second.bundle
        results = (
            server.node_stub(agent)
            .BatchNewX509SVID(
                node_pb2.BatchNewX509SVIDRequest(
                    params=[node_pb2.X509SVIDParams(entry_id=entry.id, csr=make_csr()[1])]
                ),
                timeout=10,
            )
            .results
        )
        assert results[0].cert_chain
        metrics = server.server.metrics.render().decode()
        assert 'svid_server_rotation_events_total{kind="bundle"} 1.0' in metrics
        stream.cancel()
