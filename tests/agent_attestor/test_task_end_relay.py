"""A task's end (a TASK revocation: no credential, the task's id) goes from the server's Sync
message to verifiers and task clients on the Revocations stream, and survives a restart: it
alone tells them of the end of a task with no X.509-SVID whose token expired before the end."""

from __future__ import annotations

import asyncio
import time
from pathlib import Path

from agent_attestor.cache import Cache, SyncPosition
from agent_attestor.node_client import sync_delta, sync_state
from agent_attestor.state_store import StateStore
from agent_attestor.state_writer import StateWriter
from agent_attestor.tasks.revocations import revocation_list
from svid._clock import FakeClock
from svid._proto import common_pb2, node_pb2
from tests.agent_attestor.pki import LocalCa

AGENT = "spiffe://example.org/svid/agent/join_token/me"
TASK = "spiffe://example.org/w/runtime/task/0123456789abcdef"
ENDED = common_pb2.Revocation(
    kind=common_pb2.Revocation.TASK,
    value="0123456789abcdef",
    expires_at=2_000_000_000,
    spiffe_id=TASK,
)


def listed(cache: Cache) -> list[tuple[str, str, int, str]]:
    snap = cache.snapshot()
    items = revocation_list(snap, snap.revocation_expiry).items
    return [(i.kind, i.value, i.expires_at, i.spiffe_id) for i in items]


def snapshot(ca: LocalCa, *revocations: common_pb2.Revocation) -> node_pb2.SyncUpdate:
    entry = common_pb2.Entry(
        id="e1",
        spiffe_id="spiffe://example.org/w/1",
        selectors=[common_pb2.Selector(type="unix", value="uid:1")],
    )
    return node_pb2.SyncUpdate(
        kind=node_pb2.SyncUpdate.SNAPSHOT,
        entries=[entry],
        bundle=ca.bundle().to_proto(),
        revocations=list(revocations),
        revision=5,
        epoch="ep",
    )


def test_a_tasks_end_in_a_sync_delta_is_listed_to_verifiers_with_the_tasks_id() -> None:
    ca = LocalCa(FakeClock(start=time.time()))
    cache = Cache()
    cache.apply_sync(sync_state(snapshot(ca)))
    jti = common_pb2.Revocation(
        kind=common_pb2.Revocation.JWT_ID, value="j1", expires_at=1_900_000_000, spiffe_id=TASK
    )
    delta = node_pb2.SyncUpdate(
        kind=node_pb2.SyncUpdate.DELTA, revocations=[ENDED, jti], revision=6, epoch="ep"
    )
    cache.apply_delta(sync_delta(delta))
    assert listed(cache) == [
        ("jwt_id", "j1", 1_900_000_000, TASK),
        ("task", "0123456789abcdef", 2_000_000_000, TASK),
    ]
    assert cache.snapshot().revoked_jtis == {"j1"}  # no credential of that value
    # Gone once the server prunes it, as any revocation.
    gone = node_pb2.SyncUpdate(
        kind=node_pb2.SyncUpdate.DELTA, removed_revocations=[ENDED], revision=7, epoch="ep"
    )
    cache.apply_delta(sync_delta(gone))
    assert [i[0] for i in listed(cache)] == ["jwt_id"]


def test_a_tasks_end_in_a_snapshot_is_listed_and_kept_across_a_restart(tmp_path: Path) -> None:
    ca = LocalCa(FakeClock(start=time.time()))
    cache = Cache()
    store = StateStore(tmp_path / "state.db")
    writer = StateWriter(store, cache, lambda: SyncPosition(AGENT, 5, "ep"), window=0.01)
    cache.apply_sync(sync_state(snapshot(ca, ENDED)))
    assert listed(cache) == [("task", "0123456789abcdef", 2_000_000_000, TASK)]
    assert asyncio.run(writer.flush())
    store.close()

    saved = StateStore(tmp_path / "state.db").load(AGENT, "example.org", ca.clock.now())
    assert saved is not None
    after = Cache()
    after.restore(saved.state, saved.svids)
    after.apply_delta(sync_delta(node_pb2.SyncUpdate(revision=5, epoch="ep")))
    assert listed(after) == [("task", "0123456789abcdef", 2_000_000_000, TASK)]
