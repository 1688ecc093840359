"""A policy reload is on the audit log before its set decides anything, on a real server over
real gRPC, the fault real SQLite refusing writes (query_only, as test_issuance_fail_closed
makes it): a reload the ledger cannot take is refused and the old set keeps serving."""

from __future__ import annotations

import shutil
from collections.abc import Iterator
from pathlib import Path

import grpc
import pytest

from server.audit.event import EventKind
from server.datastore.records import EventFilter
from svid._proto import task_pb2, task_pb2_grpc
from tests.e2e.test_tasks_server import POLICY
from tests.server.fixtures import RunningServer, start_server
from tests.server.test_issuance_fail_closed import read_only
from tests.tmpdirs import short_tmpdir


@pytest.fixture
def served() -> Iterator[tuple[RunningServer, Path]]:
    root = short_tmpdir()
    policy_dir = root / "policies"
    policy_dir.mkdir()
    (policy_dir / "work.cedar").write_text(POLICY)
    server = start_server(root, policy_dir=str(policy_dir))
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
