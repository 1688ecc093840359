"""A renewal batch the server's reply has no room for is answered in part: the agent asks for
the rest again at once. 500 SVIDs with 100 long DNS names each came to some 10 MB, past gRPC's
4 MiB limit: the whole reply failed, and the agent, asking for the same batch, failed forever."""

from __future__ import annotations

import asyncio

from agent_attestor.agent_store import AgentSvid
from agent_attestor.node_client import NodeClient
from tests.agent_attestor.test_rotation import _setup
from tests.server.fixtures import TRUST_DOMAIN, bundle_pem, make_csr, managed_server

NAMES = [f"{'a' * 63}.{'b' * 63}.{'c' * 60}.n{n:03d}.example.org" for n in range(100)]


def test_the_node_client_tells_the_items_the_server_left_for_another_call() -> None:
    with managed_server() as srv:
        agent = srv.attest()
        entry = srv.create_entry("/deferred/many-names", agent.spiffe_id, dns_names=NAMES)
        svid = AgentSvid(agent.spiffe_id, tuple(agent.chain), agent.key)
        address = srv.runtime.node_address
        csr = make_csr()[1]

        async def scenario() -> list[tuple[bool, bool, str]]:
            client = NodeClient(
                address, address, bundle_pem(srv.bundle()), svid, 5.0, trust_domain=TRUST_DOMAIN
            )
            try:
                results = await client.batch_new_x509([(entry.id, csr)] * 500)
            finally:
                await client.close()
            return [(r.deferred, bool(r.chain_der), r.error) for r in results]

        results = asyncio.run(scenario())
    assert len(results) == 500
    answered = results.index((True, False, ""))
    assert 0 < answered < 500
    assert results[:answered] == [(False, True, "")] * answered
    assert results[answered:] == [(True, False, "")] * (500 - answered)


def test_the_rotator_asks_again_at_once_for_what_the_server_deferred() -> None:
    _, cache, signer, rot = _setup(30)
    signer.answer_at_most = 12
    asyncio.run(rot.tick())
    assert len(cache.svids()) == 12
    assert rot.next_due_in() == 0.0  # not refused: no wait of retry_max
    asyncio.run(rot.tick())
    asyncio.run(rot.tick())
    assert signer.batches == [30, 18, 6]
    assert len(cache.svids()) == 30
