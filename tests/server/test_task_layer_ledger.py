"""The task layer while the ledger cannot commit, on a real server over real gRPC and HTTP, the
fault real SQLite refusing writes (query_only, as test_issuance_fail_closed makes it): a
policy reload the ledger cannot take is refused and the old set keeps serving; a task end the
storage cannot write (or a flagged denial's count, or an agent's renewal) turns /healthz 503
as an issuance would; concurrent reloads each name the set they replaced."""

from __future__ import annotations

import json
import shutil
import threading
import urllib.error
import urllib.request
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import grpc
import pytest

from server.audit.event import EventKind
from server.datastore.records import EventFilter
from svid._proto import admin_pb2, node_pb2, task_pb2, task_pb2_grpc
from tests.e2e.test_tasks_server import POLICY, RUNTIME
from tests.server.fixtures import RunningServer, make_csr, start_server
from tests.server.test_issuance_fail_closed import read_only
from tests.tmpdirs import short_tmpdir
from tests.waits import wait_for


@pytest.fixture
def served() -> Iterator[tuple[RunningServer, Path]]:
    root = short_tmpdir()
    policy_dir = root / "policies"
    policy_dir.mkdir()
    (policy_dir / "work.cedar").write_text(POLICY)
    server = start_server(root, policy_dir=str(policy_dir), metrics_address="127.0.0.1:0")
    try:
        yield server, policy_dir
    finally:
        server.stop()
        shutil.rmtree(root, ignore_errors=True)


def reloads(srv: RunningServer) -> list[str]:
    """The policy set hashes of the allowed reloads on the log."""
    rows = srv.server.tasks.audit.store.audit_rows(EventFilter(kind=EventKind.POLICY_RELOAD))
    return [str(r["policy_set_hash"]) for r in rows if r["decision"] == "allow"]


def test_a_reload_the_ledger_cannot_record_leaves_the_old_set_serving(
    served: tuple[RunningServer, Path],
) -> None:
    """Fails on main: the reload was answered UNAVAILABLE, yet its set served from then on,
    deciding every task under a policy set hash no policy_reload event names."""
    srv, policy_dir = served
    channel = grpc.insecure_channel(f"unix:{srv.runtime.admin_socket}")
    admin = task_pb2_grpc.TaskAdminStub(channel)
    engine = srv.server.tasks.policy
    before = engine.policy_set_hash
    (policy_dir / "more.cedar").write_text(POLICY.replace('@id("work")', '@id("more")'))
    try:
        read_only(srv, True)
        with pytest.raises(grpc.RpcError) as err:
            admin.ReloadPolicy(task_pb2.ReloadPolicyRequest(), timeout=10)
        assert err.value.code() is grpc.StatusCode.UNAVAILABLE
        assert engine.policy_set_hash == before
        read_only(srv, False)
        reloaded = admin.ReloadPolicy(task_pb2.ReloadPolicyRequest(), timeout=10)
    finally:
        channel.close()
    assert reloaded.hash != before
    assert engine.policy_set_hash == reloaded.hash
    assert reloads(srv) == [reloaded.hash]


def healthz(srv: RunningServer) -> tuple[int, str]:
    try:
        with urllib.request.urlopen(
            f"http://{srv.runtime.metrics_address}/healthz", timeout=5
        ) as answer:
            return int(answer.status), answer.read().decode()
    except urllib.error.HTTPError as refused:
        return refused.code, refused.read().decode()


def begun(srv: RunningServer) -> tuple[task_pb2_grpc.NodeTasksStub, task_pb2.Task]:
    """A node's task stub and a task it began: read on docs, for user:alice."""
    agent = srv.attest()
    srv.create_entry(RUNTIME.removeprefix("spiffe://example.org"), agent.spiffe_id)
    tasks = task_pb2_grpc.NodeTasksStub(srv.node_channel(agent))
    begin = task_pb2.NodeBeginTaskRequest(runtime_id=RUNTIME, intent=READ_DOCS, ttl=300)
    return tasks, tasks.BeginTask(begin, timeout=10).task


READ_DOCS = task_pb2.Intent(actions=["read"], resources=["docs"], on_behalf_of="user:alice")


def test_an_end_the_storage_cannot_write_says_so_on_healthz(
    served: tuple[RunningServer, Path],
) -> None:
    """Fails without TaskStore telling the ledger's outage: the end failed on its task row,
    before its event reached the audit log, and /healthz said 200 ok for as long as only ends
    and revocations came."""
    srv, _ = served
    tasks, task = begun(srv)
    end = task_pb2.NodeEndTaskRequest(task_id=task.task_id, runtime_ids=[RUNTIME])
    assert healthz(srv) == (200, "ok\n")
    read_only(srv, True)
    with pytest.raises(grpc.RpcError) as err:
        tasks.EndTask(end, timeout=10)
    assert err.value.code() is grpc.StatusCode.UNAVAILABLE
    assert healthz(srv) == (503, "unhealthy: the audit ledger cannot commit (read-only)\n")
    read_only(srv, False)
    wait_for(lambda: healthz(srv)[0] == 200, 10, "/healthz to say 200 again")
    assert tasks.EndTask(end, timeout=10).task.state == "ended"


class _Turns:
    """A reload lock, telling when a second reload waits for its turn."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self.waiting = threading.Event()

    def __enter__(self) -> None:
        if not self._lock.acquire(blocking=False):
            self.waiting.set()
            self._lock.acquire()

    def __exit__(self, *exc: object) -> None:
        self._lock.release()


def test_concurrent_reloads_each_name_the_set_they_replaced(
    served: tuple[RunningServer, Path], monkeypatch: pytest.MonkeyPatch
) -> None:
    """Fails while the previous hash is read before the reload's turn: the second of two
    concurrent reloads named the set both found serving as the one it replaced, where the
    first's had served in between, so the log's chain of policy sets skipped one. An admin
    reload takes its turn at the fleet's lock (held from load to announcement), before the
    engine's."""
    srv, policy_dir = served
    engine, audit = srv.server.tasks.policy, srv.server.tasks.audit
    turns = _Turns()
    monkeypatch.setattr(srv.server.tasks.fleet, "_lock", turns)
    recording, go = threading.Event(), threading.Event()
    append = audit.append

    def first_held(kind: str, **fields_: Any) -> Any:
        if kind == "policy_reload" and not recording.is_set():
            recording.set()
            go.wait(10)  # until the second reload waits its turn
        return append(kind, **fields_)

    monkeypatch.setattr(audit, "append", first_held)
    channel = grpc.insecure_channel(f"unix:{srv.runtime.admin_socket}")
    admin = task_pb2_grpc.TaskAdminStub(channel)
    reload = task_pb2.ReloadPolicyRequest()
    before = engine.policy_set_hash
    (policy_dir / "more.cedar").write_text(POLICY.replace('@id("work")', '@id("more")'))
    try:
        with ThreadPoolExecutor(2) as pool:
            first = pool.submit(admin.ReloadPolicy, reload, timeout=20)
            wait_for(recording.is_set, 10, "the first reload to be recorded")
            (policy_dir / "most.cedar").write_text(POLICY.replace('@id("work")', '@id("most")'))
            second = pool.submit(admin.ReloadPolicy, reload, timeout=20)
            wait_for(turns.waiting.is_set, 10, "the second reload to wait its turn")
            go.set()
            hashes = [first.result().hash, second.result().hash]
    finally:
        go.set()
        channel.close()
    rows = audit.store.audit_rows(EventFilter(kind=EventKind.POLICY_RELOAD))
    # The operators' reloads (a reload the first's announcement may run here once the second
    # serves, read back by this server's feed follower, names the hash it was asked for).
    extras = [(r, json.loads(r["extra"])) for r in rows if r["decision"] == "allow"]
    recorded = [
        (str(r["policy_set_hash"]), extra["previous_hash"])
        for r, extra in extras
        if "announced_hash" not in extra
    ]
    assert recorded == [(hashes[0], before), (hashes[1], hashes[0])]
    assert engine.policy_set_hash == hashes[1]


def test_a_violation_the_storage_cannot_count_says_so_on_healthz(
    served: tuple[RunningServer, Path],
) -> None:
    """Fails without the violation's row telling the ledger's outage: a flagged denial (a
    sub-task widening its parent's scope) failed on its count before its event reached the
    audit log, and /healthz said 200 ok for as long as only those came."""
    srv, _ = served
    tasks, parent = begun(srv)
    wider = task_pb2.Intent(actions=["read", "write"], resources=["docs"], on_behalf_of="user:a")
    child = task_pb2.NodeBeginTaskRequest(
        runtime_id=RUNTIME, intent=wider, ttl=60, parent_task_id=parent.task_id
    )
    read_only(srv, True)
    with pytest.raises(grpc.RpcError) as err:
        tasks.BeginTask(child, timeout=10)
    assert err.value.code() is grpc.StatusCode.UNAVAILABLE
    assert healthz(srv) == (503, "unhealthy: the audit ledger cannot commit (read-only)\n")
    read_only(srv, False)
    wait_for(lambda: healthz(srv)[0] == 200, 10, "/healthz to say 200 again")
    with pytest.raises(grpc.RpcError) as err:
        tasks.BeginTask(child, timeout=10)
    assert err.value.code() is grpc.StatusCode.PERMISSION_DENIED


def test_an_agent_renewal_the_storage_cannot_save_says_so_on_healthz(
    served: tuple[RunningServer, Path],
) -> None:
    """Fails without the agent's save telling the ledger's outage: a renewal writes the
    agent's record and no event, so /healthz said 200 ok for as long as only renewals came
    (a fleet's agents renewing at their half lives), each refused UNAVAILABLE."""
    srv, _ = served
    agent = srv.attest()
    renew = node_pb2.RenewAgentRequest(csr=make_csr()[1])
    read_only(srv, True)
    with pytest.raises(grpc.RpcError) as err:
        srv.node_stub(agent).RenewAgent(renew, timeout=10)
    assert err.value.code() is grpc.StatusCode.UNAVAILABLE
    assert healthz(srv) == (503, "unhealthy: the audit ledger cannot commit (read-only)\n")
    read_only(srv, False)
    wait_for(lambda: healthz(srv)[0] == 200, 10, "/healthz to say 200 again")
    assert srv.node_stub(agent).RenewAgent(renew, timeout=10).svid.spiffe_id == agent.spiffe_id


def test_a_running_servers_task_ends_once_its_runtimes_entry_is_deleted(
    served: tuple[RunningServer, Path],
) -> None:
    """The operator takes the identity from the workload: its tasks end with it (the task
    loop), where each task entry, a copy of its selectors, served it SVIDs to the task's TTL."""
    srv, _ = served
    _, task = begun(srv)
    (runtime,) = [e for e in srv.server.state.entries.by_id.values() if e.spiffe_id == RUNTIME]
    srv.admin().DeleteEntry(admin_pb2.DeleteEntryRequest(id=runtime.id), timeout=10)

    def revoked() -> bool:
        return srv.server.tasks.service.get(task.task_id).state.value == "revoked"

    wait_for(revoked, 10, "the task to end with its runtime's entry")
    assert srv.server.tasks.service.active_task(task.spiffe_id) is None
