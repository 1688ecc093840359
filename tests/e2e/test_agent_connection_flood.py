"""Issue 11 item 7: a flood of idle connections from one unprivileged user must not lock other
users out of the real agent. The agent runs with a small descriptor limit so the flood can
exhaust it in a test; the flood comes from a real `nobody` process over real sockets."""

from __future__ import annotations

import os
from collections.abc import Iterator

import grpc
import pytest

from svid._proto import workload_pb2, workload_pb2_grpc
from tests.e2e.agent_process import HEADER, AgentProcess, agent_stack, create_entry
from tests.e2e.conftest import ServerProcess, make_server, short_tmpdir
from tests.users import hold_connections_as_nobody

pytestmark = [
    pytest.mark.e2e,
    pytest.mark.skipif(os.geteuid() != 0, reason="needs root to switch to another uid"),
]
AGENT_FDS = 400


@pytest.fixture
def stack() -> Iterator[tuple[ServerProcess, AgentProcess]]:
    root = short_tmpdir()
    os.chmod(root, 0o755)
    server = make_server(root).start()
    with agent_stack(root, server, descriptor_limit=AGENT_FDS) as agent:
        os.chmod(agent.socket_path.parent, 0o755)
        yield server, agent


def test_a_flood_of_idle_connections_from_one_uid_leaves_room_for_others(
    stack: tuple[ServerProcess, AgentProcess],
) -> None:
    server, agent = stack
    sid = "spiffe://example.org/legit"
    create_entry(server, sid, agent.agent_id(), f"unix:uid:{os.getuid()}")
    agent.wait_svid(sid)
    flood = hold_connections_as_nobody(agent.socket_path, 3 * AGENT_FDS)
    try:
        assert flood.stdout is not None
        assert int(flood.stdout.readline()) > AGENT_FDS // 2  # the flood did get in
        channel = grpc.insecure_channel(f"unix:{agent.socket_path}")
        try:
            stub = workload_pb2_grpc.SpiffeWorkloadAPIStub(channel)
            # Waits for the connection as SPIFFE clients do (they retry with backoff): the
            # listen backlog may still hold the flood's pending connects for a moment, and a
            # connect into a full backlog fails at once. A lockout still fails after 15 s.
            msg = next(
                stub.FetchX509SVID(
                    workload_pb2.X509SVIDRequest(),
                    metadata=HEADER,
                    timeout=15,
                    wait_for_ready=True,
                )
            )
        finally:
            channel.close()
        assert [s.spiffe_id for s in msg.svids] == [sid]
    finally:
        flood.kill()
        flood.wait(10)
