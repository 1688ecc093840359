"""Two real servers on one real PostgreSQL schema, each with its own policy_dir: a `policy
reload` sent to A reaches B through the change feed (server/policy/fleet.py), which reloads
its own directory and decides under the new set; a directory that differs, or fails to load,
is reported on B (log, the svid_server_policy_diverged metric) while B keeps serving."""

from __future__ import annotations

import shutil
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

import grpc
import pytest

from server.ca.sealing import KeyEncryptionKey
from server.errors import PermissionDeniedError
from server.tasks.service import BeginRequest
from svid._proto import task_pb2, task_pb2_grpc
from tests.e2e.test_tasks_server import POLICY
from tests.server.fixtures import RunningServer, short_tmpdir, start_server
from tests.server.test_replication_servers import report, wait_until

# Only "read" now: a task asking to write is denied under it.
READ_ONLY = POLICY.replace('[Action::"read", Action::"write"]', '[Action::"read"]')


@dataclass
class Fleet:
    root: Path
    dsn: str
    servers: dict[str, RunningServer] = field(default_factory=dict)

    @property
    def a(self) -> RunningServer:
        return self.servers["a"]

    @property
    def b(self) -> RunningServer:
        return self.servers["b"]

    @property
    def dir_a(self) -> Path:
        return self.root / "a" / "policies"

    @property
    def dir_b(self) -> Path:
        return self.root / "b" / "policies"

    def start(self, name: str) -> RunningServer:
        self.servers[name] = start_server(
            self.root,
            admin_socket=str(self.root / name / "admin.sock"),
            datastore=self.dsn,
            key_encryption_key_file=str(self.root / "kek"),
            policy_dir=str(self.root / name / "policies"),
        )
        return self.servers[name]

    def stop(self, name: str) -> None:
        self.servers.pop(name).stop()

    def write(self, text: str) -> None:
        """The same policy on both hosts, as a platform team deploys it."""
        (self.dir_a / "work.cedar").write_text(text)
        (self.dir_b / "work.cedar").write_text(text)

    def reload_on_a(self) -> task_pb2.PolicySet:
        with grpc.insecure_channel(f"unix:{self.a.runtime.admin_socket}") as channel:
            stub = task_pb2_grpc.TaskAdminStub(channel)
            info: task_pb2.PolicySet = stub.ReloadPolicy(task_pb2.ReloadPolicyRequest(), timeout=10)
        return info


@pytest.fixture
def fleet(postgres_dsn: str) -> Iterator[Fleet]:
    root = short_tmpdir()
    KeyEncryptionKey.generate().write_new(root / "kek")
    for name in ("a", "b"):
        (root / name / "policies").mkdir(parents=True)
        (root / name / "policies" / "work.cedar").write_text(POLICY)
    fleet = Fleet(root, postgres_dsn)
    try:
        fleet.start("a")
        fleet.start("b")
        yield fleet
    finally:
        for name in sorted(fleet.servers, reverse=True):
            fleet.stop(name)
        shutil.rmtree(root, ignore_errors=True)


def begin_write_on_b(fleet: Fleet) -> None:
    """A real task asking to write, begun through B's task service by an agent of A's."""
    agent = fleet.a.attest()
    runtime = fleet.a.create_entry(f"/bot-{time.monotonic_ns()}", agent.spiffe_id)
    state_b = fleet.b.server.state
    wait_until(lambda: runtime.id in state_b.entries.by_id, 1.0, "B to learn the runtime")
    request = BeginRequest(
        runtime_id=runtime.spiffe_id, actions=("write",), resources=("docs",), ttl=600
    )
    fleet.b.call(fleet.b.server.tasks.service.begin(state_b.agents[agent.spiffe_id], request))


def diverged_metric(server: RunningServer) -> float:
    value = server.server.metrics.registry.get_sample_value("svid_server_policy_diverged")
    assert value is not None
    return value


def test_a_reload_on_a_makes_b_decide_under_the_new_set(fleet: Fleet) -> None:
    """Fails on main: B kept deciding under the old set until reloaded by hand."""
    begin_write_on_b(fleet)  # granted under the set both started with
    fleet.write(READ_ONLY)
    started = time.monotonic()
    info = fleet.reload_on_a()
    engine_b = fleet.b.server.tasks.policy
    wait_until(lambda: engine_b.policy_set_hash == info.hash, 5.0, "B to load the new set")
    report("policy reload, serving on B", time.monotonic() - started)
    with pytest.raises(PermissionDeniedError):
        begin_write_on_b(fleet)
    assert fleet.b.server.tasks.fleet.diverged is None
    assert diverged_metric(fleet.b) == 0


def test_a_directory_that_differs_on_b_is_reported_not_served_silently(fleet: Fleet) -> None:
    (fleet.dir_a / "work.cedar").write_text(READ_ONLY)  # B's host was not deployed to
    serving_b = fleet.b.server.tasks.policy.policy_set_hash
    info = fleet.reload_on_a()
    assert info.hash != serving_b
    fleet_b = fleet.b.server.tasks.fleet
    wait_until(lambda: fleet_b.diverged is not None, 5.0, "B to report its set differs")
    assert info.hash in (fleet_b.diverged or "")
    assert diverged_metric(fleet.b) == 1
    assert diverged_metric(fleet.a) == 0
    # Deployed at last: the next reload converges B, and the report clears.
    (fleet.dir_b / "work.cedar").write_text(READ_ONLY + "\n")
    (fleet.dir_a / "work.cedar").write_text(READ_ONLY + "\n")
    again = fleet.reload_on_a()
    wait_until(lambda: fleet_b.diverged is None, 5.0, "B to converge")
    assert fleet.b.server.tasks.policy.policy_set_hash == again.hash
    assert diverged_metric(fleet.b) == 0


def test_a_broken_directory_on_b_keeps_its_old_set_serving_and_is_reported(fleet: Fleet) -> None:
    serving_b = fleet.b.server.tasks.policy.policy_set_hash
    (fleet.dir_a / "work.cedar").write_text(READ_ONLY)
    (fleet.dir_b / "work.cedar").write_text("permit (principal, action, resource")  # unparsable
    fleet.reload_on_a()
    fleet_b = fleet.b.server.tasks.fleet
    wait_until(lambda: fleet_b.diverged is not None, 5.0, "B to report its broken set")
    assert "failed to load" in (fleet_b.diverged or "")
    assert fleet.b.server.tasks.policy.policy_set_hash == serving_b
    begin_write_on_b(fleet)  # B still decides, under its old set


def test_a_server_started_with_a_differing_directory_is_reported(fleet: Fleet) -> None:
    """B down during the fleet's reload, started again with its host's old files: it said
    nothing, as the announcement came before the feed cursor it follows from."""
    fleet.stop("b")
    (fleet.dir_a / "work.cedar").write_text(READ_ONLY)
    info = fleet.reload_on_a()
    fleet.start("b")
    assert fleet.b.server.tasks.policy.policy_set_hash != info.hash
    assert info.hash in (fleet.b.server.tasks.fleet.diverged or "")
    assert diverged_metric(fleet.b) == 1
