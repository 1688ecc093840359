"""Many workload streams at once stay served, and a change reaches all of them.

Clients are synchronous grpc channels on threads: grpc.aio clients misbehave in a process that
has forked before (other tests spawn subprocesses), which says nothing about the agent.
"""

from __future__ import annotations

import threading
from collections.abc import Iterator

import grpc
import pytest

from agent_attestor.relay import RelaySettings
from svid._proto import workload_pb2, workload_pb2_grpc
from tests.agent_attestor.harness import HEADER, Harness

STREAMS = 200


@pytest.fixture
def agent() -> Iterator[Harness]:
    # 200 workloads of one uid, each on its own connection: past the default per-uid cap
    # (max_connections_per_uid, 128), as an operator running that many would set it.
    h = Harness(relay_settings=RelaySettings(max_connections_per_uid=STREAMS + 8))
    try:
        yield h
    finally:
        h.close()


def test_200_concurrent_streams_get_first_message_and_updates(agent: Harness) -> None:
    agent.add_entry("/w", created_at=1)
    first_seen = threading.Barrier(STREAMS + 1, timeout=60)
    results: list[list[int] | str] = []
    lock = threading.Lock()

    def client() -> None:
        # Separate connections, as separate workloads would open.
        ch = grpc.insecure_channel(
            f"unix:{agent.socket_path}", options=[("grpc.use_local_subchannel_pool", 1)]
        )
        stub = workload_pb2_grpc.SpiffeWorkloadAPIStub(ch)
        stream = stub.FetchX509SVID(workload_pb2.X509SVIDRequest(), metadata=HEADER, timeout=60)
        try:
            sizes = [len(next(stream).svids)]
            first_seen.wait()
            sizes.append(len(next(stream).svids))
            out: list[int] | str = sizes
        except (grpc.RpcError, threading.BrokenBarrierError) as exc:
            out = repr(exc)
            first_seen.abort()
        finally:
            stream.cancel()
            ch.close()
        with lock:
            results.append(out)

    threads = [threading.Thread(target=client) for _ in range(STREAMS)]
    for t in threads:
        t.start()
    first_seen.wait()
    assert len(agent.registry) >= STREAMS
    agent.add_entry("/second", created_at=2)
    for t in threads:
        t.join(60)
    assert results == [[1, 2]] * STREAMS
