"""Whose credential each revocation is (the server says it once, with the revocation) is what a
verifier's on_revoked callback relies on; a restart must not forget it."""

from __future__ import annotations

import asyncio
import time
from pathlib import Path

from agent_attestor.cache import Cache, SyncDelta, SyncPosition, SyncState
from agent_attestor.model import Entry, Selector
from agent_attestor.state_store import SavedState, StateStore
from agent_attestor.state_writer import StateWriter
from agent_attestor.tasks.revocations import revocation_list
from svid._clock import FakeClock
from svid._proto import revocation_pb2
from tests.agent_attestor.pki import LocalCa

AGENT = "spiffe://example.org/svid/agent/join_token/me"
TASK = "spiffe://example.org/w/runtime/task/t-1"
KEY = ("jwt_id", "jti-1")


def write_one_revocation(path: Path, ca: LocalCa, owner: str | None) -> Cache:
    """A state file at revision 5 holding one entry and the revocation of jti-1, saved with
    `owner` as whose credential it is (None: saved without one); the cache that wrote it."""
    entry = Entry("e1", "spiffe://example.org/w/1", frozenset({Selector("unix", "uid:1")}))
    cache = Cache()
    store = StateStore(path)
    writer = StateWriter(store, cache, lambda: SyncPosition(AGENT, 5, "ep"), window=0.01)
    cache.apply_sync(
        SyncState(
            (entry,),
            ca.bundle(),
            revoked_jtis=frozenset({"jti-1"}),
            revocation_expiry={KEY: 2_000_000_000},
            revocation_spiffe_ids={} if owner is None else {KEY: owner},
            revision=5,
            epoch="ep",
        )
    )
    assert asyncio.run(writer.flush())
    store.close()
    return cache


def listed_after_an_empty_delta(saved: SavedState) -> list[revocation_pb2.Revoked]:
    """The revocations a cache restored from `saved` lists once caught up by a delta from
    revision 5 that brings nothing (nothing changed meanwhile)."""
    after = Cache()
    after.restore(saved.state, saved.svids)
    after.apply_delta(SyncDelta(revision=5, epoch="ep"))
    snap = after.snapshot()
    return list(revocation_list(snap, snap.revocation_expiry).items)


def test_a_restart_keeps_whose_credential_each_revocation_is(tmp_path: Path) -> None:
    ca = LocalCa(FakeClock(start=time.time()))
    cache = write_one_revocation(tmp_path / "state.db", ca, TASK)
    before = revocation_list(cache.snapshot(), cache.snapshot().revocation_expiry)
    assert [i.spiffe_id for i in before.items] == [TASK]

    # The next start: restored, then caught up by an empty delta (nothing changed meanwhile).
    saved = StateStore(tmp_path / "state.db").load(AGENT, "example.org", ca.clock.now())
    assert saved is not None
    listed = listed_after_an_empty_delta(saved)
    assert [i.value for i in listed] == ["jti-1"]
    assert [i.spiffe_id for i in listed] == [TASK], "the revoked token's owner is lost"
