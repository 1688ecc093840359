"""A task whose agent never minted its X.509-SVID (past max_prefetched_svids) and whose runtime
holds no token has nothing revoked at its end: only the server's word that the task ended
(a "task" revocation) tells the runtime (its task client) and a resource server (the streams
and MCP sessions it holds open for the task, OpenRequests). Real server and agent processes."""

from __future__ import annotations

import shutil
import threading
from collections.abc import Iterator
from dataclasses import dataclass

import pytest

import svid
from svid._open_requests import TXN, OpenRequests
from svid.tasks import TaskClient
from tests.e2e.agent_process import AgentProcess, create_entry, new_token
from tests.e2e.conftest import ServerProcess, make_server, short_tmpdir, wait_for
from tests.e2e.test_tasks_sdk import RUNTIME, policy_dir

pytestmark = pytest.mark.e2e
# Server -> agent (Sync) -> stream, on a loaded 2-core machine: a bound for a hang, not a pace.
LEARN = 30.0


@dataclass
class Stack:
    server: ServerProcess
    agent: AgentProcess

    @property
    def address(self) -> str:
        return f"unix://{self.agent.socket_path}"

    def revocation_events(self, task_id: str) -> list[dict[str, object]]:
        return self.server.audit_events("--task", task_id, "--kind", "revocation")


@pytest.fixture(scope="module")
def stack() -> Iterator[Stack]:
    root = short_tmpdir("svn")
    policy = policy_dir(root)
    # One SVID prefetched: the runtime's own; a task's entry, past the cap, is minted only
    # when a workload asks for X.509-SVIDs, which nothing here does.
    config = root / "agent.toml"
    config.write_text("max_prefetched_svids = 1\n")
    server = make_server(root, policy_dir=str(policy))
    server.start()
    agent = AgentProcess(
        root, server, join_token=new_token(server), flags=("--config", str(config))
    )
    try:
        agent.start()
        create_entry(server, RUNTIME, agent.agent_id())
        agent.wait_svid(RUNTIME)
        yield Stack(server, agent)
    except BaseException:
        print(agent.logs()[-4000:])
        print(server.logs()[-4000:])
        raise
    finally:
        agent.stop()
        server.stop()
        shutil.rmtree(root, ignore_errors=True)


def test_a_task_with_nothing_to_revoke_ends_in_its_runtime_and_at_resource_servers(
    stack: Stack,
) -> None:
    requests = OpenRequests()
    closed: dict[str, threading.Event] = {"ended": threading.Event(), "other": threading.Event()}
    with (
        svid.WorkloadApiSource(stack.address) as source,
        TaskClient(stack.address) as client,
    ):
        assert source.wait_ready(20)
        source.on_revoked(requests.on_revoked)
        task = client.begin(actions=["read"], resources=["docs"])
        other = client.begin(actions=["read"], resources=["docs"])
        # Streams opened with tokens of each task since expired: their jtis are revoked by no
        # end (the server revokes only what a verifier may still accept).
        requests.open((("jwt_id", "expired-1"), (TXN, task.task_id)), closed["ended"].set)
        requests.open((("jwt_id", "expired-2"), (TXN, other.task_id)), closed["other"].set)
        stack.server.cli("task", "revoke", task.task_id, "--reason", "suspected misuse")
        assert closed["ended"].wait(LEARN), "the task's open stream outlived its end"
        wait_for(lambda: task.ended, LEARN, "the runtime to learn its task was revoked")
        assert not other.ended
        assert not closed["other"].is_set()
        other.end()
    # Nothing of the task was revoked at its end: no X.509-SVID was minted, no token fetched.
    assert stack.revocation_events(task.task_id) == []
