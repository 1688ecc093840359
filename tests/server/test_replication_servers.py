"""Two real servers on one datastore file: what is written through one reaches the agents of
the other, over real gRPC, through the change feed (server/replication.py).

Each server runs in-process on its own event loop and thread, with its own SQLite connection
to the shared file (as two processes would have), its own admin socket and node ports.
"""

from __future__ import annotations

import asyncio
import shutil
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import grpc
import pytest

from server.ca.sealing import KeyEncryptionKey
from server.datastore.records import AttestedAgent, Revocation
from server.tasks.service import BeginRequest
from svid._proto import admin_pb2, common_pb2, node_pb2
from tests.server.fixtures import Agent, RunningServer, short_tmpdir, start_server
from tests.waits import wait_for

TD = "spiffe://example.org"


def report(what: str, seconds: float) -> None:
    """What a test measured (shown with -s): a write through A until B or its agent has it."""
    print(f"\nwrite through A -> seen on B: {what}: {seconds * 1000:.1f} ms")


def _start(root: Path, name: str, **overrides: Any) -> RunningServer:
    return start_server(root, admin_socket=str(root / name / "admin.sock"), **overrides)


@dataclass
class Pair:
    root: Path
    a: RunningServer
    b: RunningServer
    overrides: dict[str, Any]

    def restart_b(self) -> None:
        self.b.stop()
        self.b = _start(self.root, "b", **self.overrides)


@pytest.fixture(params=["sqlite", "postgresql"])
def pair(request: pytest.FixtureRequest) -> Iterator[Pair]:
    """Two servers on one datastore: a SQLite file, or a PostgreSQL schema (their CA shared
    under a key-encryption key, as PostgreSQL requires)."""
    root = short_tmpdir()
    overrides: dict[str, Any] = {}
    if request.param == "postgresql":
        KeyEncryptionKey.generate().write_new(root / "kek")
        overrides = {
            "datastore": request.getfixturevalue("postgres_dsn"),
            "key_encryption_key_file": str(root / "kek"),
        }
    a = _start(root, "a", **overrides)
    b = _start(root, "b", **overrides)
    pair = Pair(root, a, b, overrides)
    try:
        yield pair
    finally:
        for server in (pair.b, pair.a):
            server.stop()
        shutil.rmtree(root, ignore_errors=True)


# The least a wait gives before it fails. A test's own timeout says how soon the step should
# be done, but on a loaded 2-core machine it can take longer without being wrong: how fast
# changes propagate is reported (report()) and benchmarked, never asserted here.
PATIENCE = 15.0


def wait_until(predicate: Callable[[], Any], timeout: float, what: str) -> Any:
    return wait_for(predicate, max(timeout, PATIENCE), what, interval=0.005)


def next_matching(stream: Any, predicate: Callable[[Any], bool]) -> Any:
    """The next update on `stream` that `predicate` accepts (a few others may come first)."""
    for _ in range(20):
        update = next(stream)
        if predicate(update):
            return update
    raise AssertionError("no matching update")


def attested_on_both(pair: Pair) -> Agent:
    """An agent attested through A (A also writes every audit event of these tests: each
    server keeps the audit chain's head in memory, and sharing that is another change)."""
    agent = pair.a.attest()
    wait_until(lambda: agent.spiffe_id in pair.b.server.state.agents, 2, "B to learn the agent")
    return agent


def sync_on_b(pair: Pair, agent: Agent) -> Any:
    stream = pair.b.node_stub(agent).Sync(node_pb2.SyncRequest(), timeout=60)
    assert next(stream).kind == node_pb2.SyncUpdate.SNAPSHOT
    return stream


def test_an_entry_created_through_a_reaches_an_agent_on_b(pair: Pair) -> None:
    agent = attested_on_both(pair)
    stream = sync_on_b(pair, agent)
    took = []
    for i in range(5):
        started = time.monotonic()
        made = pair.a.create_entry(f"/web/{i}", agent.spiffe_id)
        update = next_matching(stream, lambda u: bool(u.entries))
        took.append(time.monotonic() - started)
        assert update.kind == node_pb2.SyncUpdate.DELTA
        assert [e.id for e in update.entries] == [made.id]
    report("entry on B's Sync stream (max of 5)", max(took))
    # Deleted through A: gone on B's stream too.
    pair.a.admin().DeleteEntry(admin_pb2.DeleteEntryRequest(id=made.id), timeout=10)
    update = next_matching(stream, lambda u: bool(u.removed_entry_ids))
    assert list(update.removed_entry_ids) == [made.id]
    # B's admin API reads the same in-memory view: what A wrote, A deleted.
    with pytest.raises(grpc.RpcError) as exc:
        pair.b.admin().GetEntry(admin_pb2.GetEntryRequest(id=made.id), timeout=10)
    assert exc.value.code() == grpc.StatusCode.NOT_FOUND  # type: ignore[attr-defined]
    listed = pair.b.admin().ListEntries(admin_pb2.ListEntriesRequest(), timeout=10)
    assert len(listed.entries) == 4
    stream.cancel()


def test_a_batch_of_1000_entries_through_a_reaches_an_agent_on_b(pair: Pair) -> None:
    agent = attested_on_both(pair)
    stream = sync_on_b(pair, agent)
    uid = common_pb2.Selector(type="unix", value="uid:1000")
    batch = [
        common_pb2.Entry(spiffe_id=f"{TD}/batch/{i}", parent_id=agent.spiffe_id, selectors=[uid])
        for i in range(1000)
    ]
    started = time.monotonic()
    reply = pair.a.admin().BatchCreateEntry(
        admin_pb2.BatchCreateEntryRequest(entries=batch), timeout=30
    )
    written = time.monotonic()
    assert all(r.status.code == 0 for r in reply.results)
    seen: set[str] = set()
    while len(seen) < 1000:
        seen.update(e.id for e in next(stream).entries)
    done = time.monotonic()
    report("1,000-entry batch, all on B's Sync stream (from the request)", done - started)
    report("1,000-entry batch, all on B's Sync stream (from A's answer)", done - written)
    assert seen == {r.id for r in reply.results}
    stream.cancel()


def test_a_revocation_through_a_reaches_an_agent_on_b(pair: Pair) -> None:
    agent = attested_on_both(pair)
    stream = sync_on_b(pair, agent)
    now = int(pair.a.clock.now())
    revoked = Revocation("jwt_id", "jti-1", f"{TD}/web", now + 300, "test", now)
    started = time.monotonic()
    pair.a.call(pair.a.server.state.add_revocations((revoked,)))
    update = next_matching(stream, lambda u: bool(u.revocations))
    took = time.monotonic() - started
    report("revocation on B's Sync stream", took)
    assert [r.value for r in update.revocations] == ["jti-1"]
    # An eviction through A ends the agent's stream on B.
    pair.a.admin().EvictAgent(admin_pb2.EvictAgentRequest(spiffe_id=agent.spiffe_id), timeout=10)
    with pytest.raises(grpc.RpcError) as exc:
        next_matching(stream, lambda u: False)
    assert exc.value.code() == grpc.StatusCode.PERMISSION_DENIED  # type: ignore[attr-defined]


def test_a_task_begun_and_ended_through_a_is_known_on_b(pair: Pair) -> None:
    agent = attested_on_both(pair)
    runtime = pair.a.create_entry("/bot", agent.spiffe_id)
    wait_until(lambda: runtime.id in pair.b.server.state.entries.by_id, 1.0, "B's runtime entry")
    stream = sync_on_b(pair, agent)
    record: AttestedAgent = pair.a.server.state.agents[agent.spiffe_id]
    request = BeginRequest(
        runtime_id=runtime.spiffe_id,
        actions=("read",),
        resources=("docs",),
        on_behalf_of="user:alice",
        ttl=600,
    )
    started = time.monotonic()
    task = pair.a.call(pair.a.server.tasks.service.begin(record, request))
    service_b = pair.b.server.tasks.service
    wait_until(lambda: service_b.active_task(task.spiffe_id), 1.0, "B to hold the task")
    report("task begun, active on B", time.monotonic() - started)
    # Its entry reaches the agent on B, so the agent can ask B for the task's SVID.
    update = next_matching(stream, lambda u: bool(u.entries))
    assert [e.spiffe_id for e in update.entries] == [task.spiffe_id]
    started = time.monotonic()
    pair.a.call(pair.a.server.tasks.service.end(record, task.task_id, ()))
    wait_until(lambda: service_b.active_task(task.spiffe_id) is None, 1.0, "B to drop the task")
    report("task ended, inactive on B", time.monotonic() - started)
    update = next_matching(stream, lambda u: bool(u.removed_entry_ids))
    assert list(update.removed_entry_ids) == [task.entry_id]
    stream.cancel()


def test_b_catches_up_after_a_restart_and_follows_on(pair: Pair) -> None:
    agent = attested_on_both(pair)
    pair.b.stop()
    # Written while B is down.
    missed = pair.a.create_entry("/while-down", agent.spiffe_id)
    now = int(pair.a.clock.now())
    revoked = Revocation("jwt_id", "jti-down", f"{TD}/web", now + 300, "test", now)
    pair.a.call(pair.a.server.state.add_revocations((revoked,)))
    pair.b = _start(pair.root, "b", **pair.overrides)
    stream = pair.b.node_stub(agent).Sync(node_pb2.SyncRequest(), timeout=60)
    snapshot = next(stream)
    assert [e.id for e in snapshot.entries] == [missed.id]
    assert [r.value for r in snapshot.revocations] == ["jti-down"]
    # And it follows from where it started.
    later = pair.a.create_entry("/after-restart", agent.spiffe_id)
    update = next_matching(stream, lambda u: bool(u.entries))
    assert [e.id for e in update.entries] == [later.id]
    stream.cancel()


def test_a_key_prepared_by_a_reaches_bs_bundle_and_agents() -> None:
    """Shared keys (a key-encryption key): A, the rotation lease holder, prepares the next CA
    and JWT keys; B adopts them from the change feed at once (CaManager.reload), not at its
    next rotation tick, and pushes the new bundle to its agents."""
    root = short_tmpdir()
    kek = root / "kek"
    KeyEncryptionKey.generate().write_new(kek)
    options: dict[str, object] = {"key_encryption_key_file": str(kek), "ca_ttl": 600}
    options.update(jwt_key_ttl=600, agent_svid_ttl=300, server_svid_ttl=300)
    a = start_server(root, admin_socket=str(root / "a" / "admin.sock"), **options)
    b = start_server(root, admin_socket=str(root / "b" / "admin.sock"), **options)
    try:
        assert a.server.ca.holds_rotation_lease
        agent = a.attest()
        wait_until(lambda: agent.spiffe_id in b.server.state.agents, 2, "B to learn the agent")
        stream = b.node_stub(agent).Sync(node_pb2.SyncRequest(), timeout=60)
        before = next(stream).bundle
        assert len(before.x509_authorities) == 1
        a.clock.advance(301)  # past half the keys' life: the next ones are prepared
        started = time.monotonic()
        assert a.call(asyncio.to_thread(a.server.ca.rotate))
        # The CA and the JWT key are two writes: B may push a bundle after each.
        update = next_matching(
            stream,
            lambda u: (
                u.HasField("bundle")
                and len(u.bundle.x509_authorities) == 2
                and len(u.bundle.jwt_keys) == 2
            ),
        )
        report("next CA and JWT keys in B's agents' bundle", time.monotonic() - started)
        assert set(update.bundle.x509_authorities) >= set(before.x509_authorities)
        wait_until(
            lambda: b.server.state.bundle == a.server.state.bundle, 2, "B's bundle to be A's"
        )
        stream.cancel()
    finally:
        b.stop()
        a.stop()
        shutil.rmtree(root, ignore_errors=True)


def test_a_task_jwt_b_mints_after_a_ended_the_task_is_refused_before_b_hears_of_the_end(
    pair: Pair,
) -> None:
    """A ends the task and revokes what is on record when it reads it; B, whose change feed
    has not brought that end yet (held here, as a slow poll would), still holds the task
    active and decides a JWT for it. Its ledger write comes after A's end committed: the
    datastore refuses it (the task's row is no longer active), so B answers as for a task it
    knows ended, and no token of the ended task exists that A's revocations missed."""
    agent = attested_on_both(pair)
    runtime = pair.a.create_entry("/bot", agent.spiffe_id)
    record: AttestedAgent = pair.a.server.state.agents[agent.spiffe_id]
    request = BeginRequest(runtime_id=runtime.spiffe_id, actions=("read",), resources=("docs",))
    task = pair.a.call(pair.a.server.tasks.service.begin(record, request))
    service_b = pair.b.server.tasks.service
    wait_until(lambda: service_b.active_task(task.spiffe_id), 1.0, "B to hold the task")
    state_b = pair.b.server.state
    wait_until(lambda: task.entry_id in state_b.entries.by_id, 1.0, "B to hold the task's entry")

    # B's feed lags behind A from here: held at its next apply.
    follower = pair.b.server.follower
    assert follower is not None
    original = follower._apply

    async def lagging(work: Any) -> None:
        while held:
            await asyncio.sleep(0.01)
        await original(work)

    held = True
    follower._apply = lagging  # type: ignore[method-assign]
    try:
        ended = pair.a.call(pair.a.server.tasks.service.end(record, task.task_id, ()))
        assert ended.state.value == "ended"
        assert service_b.active_task(task.spiffe_id) is not None  # B has not heard
        with pytest.raises(grpc.RpcError) as refused:
            pair.b.node_stub(agent).NewJWTSVID(
                node_pb2.NewJWTSVIDRequest(
                    spiffe_id=task.spiffe_id, audience=["docs"], entry_id=task.entry_id
                ),
                timeout=10,
            )
    finally:
        held = False
    # What B answers for a task it knows ended while the token was issued.
    assert refused.value.code() == grpc.StatusCode.PERMISSION_DENIED  # type: ignore[attr-defined]
    assert "ended while it was issued" in refused.value.details()  # type: ignore[attr-defined]
    wait_until(lambda: service_b.active_task(task.spiffe_id) is None, 1.0, "B to drop the task")
    # Nothing of the task was recorded after its end: nothing left to revoke.
    assert pair.a.server.tasks.service.store.count_credentials(task.task_id) == 0
