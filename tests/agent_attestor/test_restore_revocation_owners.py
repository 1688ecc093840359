"""Whose credential each revocation is (the server says it once, with the revocation) is what a
verifier's on_revoked callback relies on; a restart must not forget it."""

from __future__ import annotations

import asyncio
import time
from pathlib import Path

from agent_attestor.cache import Cache, SyncDelta, SyncPosition, SyncState
from agent_attestor.model import Entry, Selector
from agent_attestor.state_store import StateStore
from agent_attestor.state_writer import StateWriter
from agent_attestor.tasks.revocations import revocation_list
from svid._clock import FakeClock
from tests.agent_attestor.pki import LocalCa

AGENT = "spiffe://example.org/svid/agent/join_token/me"
TASK = "spiffe://example.org/w/runtime/task/t-1"


def test_a_restart_keeps_whose_credential_each_revocation_is(tmp_path: Path) -> None:
    ca = LocalCa(FakeClock(start=time.time()))
    entry = Entry("e1", "spiffe://example.org/w/1", frozenset({Selector("unix", "uid:1")}))
    key = ("jwt_id", "jti-1")
    cache = Cache()
    store = StateStore(tmp_path / "state.db")
    writer = StateWriter(store, cache, lambda: SyncPosition(AGENT, 5, "ep"), window=0.01)
    cache.apply_sync(
        SyncState(
            (entry,),
            ca.bundle(),
            revoked_jtis=frozenset({"jti-1"}),
            revocation_expiry={key: 2_000_000_000},
            revocation_spiffe_ids={key: TASK},
            revision=5,
            epoch="ep",
        )
    )
    before = revocation_list(cache.snapshot(), cache.snapshot().revocation_expiry)
    assert [i.spiffe_id for i in before.items] == [TASK]

    assert asyncio.run(writer.flush())
    store.close()

    # The next start: restored, then caught up by an empty delta (nothing changed meanwhile).
    saved = StateStore(tmp_path / "state.db").load(AGENT, "example.org", ca.clock.now())
    assert saved is not None
    after = Cache()
    after.restore(saved.state, saved.svids)
    after.apply_delta(SyncDelta(revision=5, epoch="ep"))
    snap = after.snapshot()
    listed = revocation_list(snap, snap.revocation_expiry)
    assert [i.value for i in listed.items] == ["jti-1"]
    assert [i.spiffe_id for i in listed.items] == [TASK], "the revoked token's owner is lost"
