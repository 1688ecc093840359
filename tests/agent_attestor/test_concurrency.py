"""Many workload streams at once stay served, and a change reaches all of them."""

from __future__ import annotations

import asyncio

import grpc

from svid._proto import workload_pb2, workload_pb2_grpc
from tests.agent_attestor.harness import HEADER, Harness

STREAMS = 200


def test_200_concurrent_streams_get_first_message_and_updates(agent: Harness) -> None:
    agent.add_entry("/w", created_at=1)

    async def client(ready: asyncio.Queue[int], go: asyncio.Event) -> list[int]:
        # Separate connections, as separate workloads would open.
        async with grpc.aio.insecure_channel(
            f"unix:{agent.socket_path}", options=[("grpc.use_local_subchannel_pool", 1)]
        ) as ch:
            stub = workload_pb2_grpc.SpiffeWorkloadAPIStub(ch)
            stream = stub.FetchX509SVID(workload_pb2.X509SVIDRequest(), metadata=HEADER)
            sizes = [len((await stream.read()).svids)]
            await ready.put(1)
            await go.wait()
            sizes.append(len((await stream.read()).svids))
            stream.cancel()
            return sizes

    async def scenario() -> list[list[int]]:
        ready: asyncio.Queue[int] = asyncio.Queue()
        go = asyncio.Event()
        tasks = [asyncio.create_task(client(ready, go)) for _ in range(STREAMS)]
        for _ in range(STREAMS):
            await asyncio.wait_for(ready.get(), 60)
        await asyncio.to_thread(agent.add_entry, "/second", None, "", 2)
        go.set()
        return await asyncio.wait_for(asyncio.gather(*tasks), 60)

    results = asyncio.run(scenario())
    assert results == [[1, 2]] * STREAMS
    assert len(agent.endpoint.relay.links) <= STREAMS
