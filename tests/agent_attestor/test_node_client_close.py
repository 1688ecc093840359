"""A NodeClient replaced (the agent moved to another server, its SVID renewed) is closed a few
seconds later. A call made on it just before, still waiting for its check of the server (at a
new address the channel is unpinned until then), must not open a channel once the client is
closed: nothing would ever close that one, and its connection (a descriptor, and the agent
SVID's session) would stay open for the life of the agent."""

from __future__ import annotations

import asyncio
import contextlib

import grpc

from agent_attestor.agent_store import AgentSvid
from agent_attestor.errors import NotReadyError
from agent_attestor.node_client import NodeClient
from tests.agent_attestor.test_channel_pin import _port, _Relay
from tests.server.fixtures import TRUST_DOMAIN, bundle_pem, managed_server


class _SlowRelay(_Relay):
    """A relay whose connections reach the server only after `delay` s (a slow network)."""

    delay = 0.5

    async def _serve(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        await asyncio.sleep(self.delay)
        await super()._serve(reader, writer)


def test_a_call_on_a_client_closed_while_it_checked_the_server_leaves_no_connection() -> None:
    with managed_server() as srv:
        agent = srv.attest()
        svid = AgentSvid(agent.spiffe_id, tuple(agent.chain), agent.key)
        roots = bundle_pem(srv.bundle())

        async def scenario() -> int:
            relay = _SlowRelay(_port(srv.runtime.node_address))
            address = await relay.start()
            client = NodeClient(address, address, roots, svid, 5.0, trust_domain=TRUST_DOMAIN)
            try:
                call = asyncio.create_task(
                    client.new_jwt(f"spiffe://{TRUST_DOMAIN}/x", ["a"], "no-such-entry")
                )
                await asyncio.sleep(0.1)  # the check of the server under way
                await client.close()  # replaced meanwhile, as Syncer._install does
                with contextlib.suppress(grpc.RpcError, NotReadyError):
                    await call
                await asyncio.sleep(0.5)
                return len(relay._open)
            finally:
                await relay.close()

        assert asyncio.run(scenario()) == 0, "a channel opened on the closed client stays open"
