"""Two real `svid-server` processes on one datastore file and a real `svid-agent` on one of
them: an entry created through the other server reaches the agent's workload as an SVID."""

from __future__ import annotations

import os
import shutil
import time
from collections.abc import Iterator
from pathlib import Path

import grpc
import pytest

from svid._proto import admin_pb2, admin_pb2_grpc, common_pb2, workload_pb2
from tests.e2e.agent_process import HEADER, AgentProcess, agent_ids, create_entry, new_token
from tests.e2e.conftest import ServerProcess, make_server, short_tmpdir, wait_for

pytestmark = pytest.mark.e2e
UID_SELECTOR = f"unix:uid:{os.getuid()}"


@pytest.fixture
def servers() -> Iterator[tuple[ServerProcess, ServerProcess, AgentProcess]]:
    root = short_tmpdir()
    shared = root / "data"
    started: list[ServerProcess] = []
    agent: AgentProcess | None = None
    try:
        for name in ("a", "b"):
            (root / name).mkdir()
            server = make_server(root / name, data_dir=str(shared), feed_poll_interval=1.0)
            server.data_dir = shared  # where it writes its runtime file
            started.append(server)
            server.start()
        a, b = started
        agent = AgentProcess(root / "b", b, new_token(b)).start()
        yield a, b, agent
    finally:
        if agent is not None:
            agent.stop()
            print("---- agent log ----\n" + agent.logs()[-4000:])
        for server in reversed(started):
            if server.proc is not None:
                server.stop()
            print(f"---- {server.root.name} log ----\n" + server.logs()[-4000:])
        shutil.rmtree(root, ignore_errors=True)


def test_an_entry_created_through_a_reaches_a_workload_of_bs_agent(
    servers: tuple[ServerProcess, ServerProcess, AgentProcess],
) -> None:
    a, _, agent = servers
    agent_id = agent.agent_id()
    # Through A, whose admin socket is its own: B learns of it from the change feed.
    create_entry(a, "spiffe://example.org/first", agent_id, UID_SELECTOR)
    agent.wait_svid("spiffe://example.org/first", timeout=10)
    stream = agent.stub().FetchX509SVID(workload_pb2.X509SVIDRequest(), metadata=HEADER)
    assert [s.spiffe_id for s in next(stream).svids] == ["spiffe://example.org/first"]
    # Straight to A's admin socket, so the time measured is not a CLI process starting.
    admin = admin_pb2_grpc.AdminStub(grpc.insecure_channel(f"unix:{a.admin_socket}"))
    uid = common_pb2.Selector(type="unix", value=f"uid:{os.getuid()}")
    took = []
    for i in range(5):
        spiffe_id = f"spiffe://example.org/next-{i}"
        created = time.monotonic()
        entry = common_pb2.Entry(spiffe_id=spiffe_id, parent_id=agent_id, selectors=[uid])
        admin.CreateEntry(admin_pb2.CreateEntryRequest(entry=entry), timeout=10)
        ids: list[str] = []
        while spiffe_id not in ids:  # other changes may come first
            ids = [s.spiffe_id for s in next(stream).svids]
        took.append(time.monotonic() - created)
    stream.cancel()
    print(f"entry through A -> SVID in a workload of B's agent: {[round(t, 3) for t in took]} s")
    assert max(took) <= 1.0


def test_the_servers_share_one_datastore(
    servers: tuple[ServerProcess, ServerProcess, AgentProcess],
) -> None:
    a, b, agent = servers
    assert Path(a.data_dir) == Path(b.data_dir)
    assert a.runtime["pid"] != b.runtime["pid"]
    # The agent attested through B; A knows it too (the agent list is A's in-memory view).
    agent_id = agent.agent_id()

    def listed_on_a() -> bool:
        return agent_id in agent_ids(a)

    wait_for(listed_on_a, 5, "A to list the agent B attested")
