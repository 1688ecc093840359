"""A restart's catch-up delta comes in parts when much changed while the agent was down; the
restored state must not be served as the server's word before the last part is in."""

from __future__ import annotations

import asyncio
import contextlib
import time
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any, cast

from cryptography.hazmat.primitives.asymmetric import ec

from agent_attestor.agent_store import AgentStore, AgentSvid
from agent_attestor.cache import Cache, SyncPosition, SyncState
from agent_attestor.caller_check import not_serving
from agent_attestor.model import Entry, Selector
from agent_attestor.node_client import NodeClient, sync_delta
from agent_attestor.servers import Target
from agent_attestor.sync import Syncer, SyncSettings
from server.datastore import records
from server.sync_messages import Shared, delta_messages
from svid._clock import FakeClock
from tests.agent_attestor.pki import LocalCa
from tests.agent_attestor.test_state_store import svid_for

ME = frozenset({Selector("unix", "uid:1")})
AGENT = "spiffe://example.org/svid/agent/join_token/me"


class _BrokenAfterFirstPart:
    """A server whose catch-up delta is cut after its first part (a restart, a failover)."""

    def __init__(self, parts: list[Any]) -> None:
        self._parts = parts

    async def sync(self, since_revision: int = 0, epoch: str = "") -> AsyncIterator[Any]:
        yield self._parts[0]
        raise ConnectionError("stream reset")


def test_a_catch_up_delta_cut_after_its_first_part_serves_no_deleted_or_revoked_svid(
    tmp_path: Path,
) -> None:
    clock = FakeClock(start=time.time())
    ca = LocalCa(clock)
    kept = Entry("kept", "spiffe://example.org/w/kept", ME)
    deleted = Entry("deleted", "spiffe://example.org/w/deleted", ME)
    revoked = Entry("revoked", "spiffe://example.org/w/revoked", ME)
    svids = [svid_for(ca, e) for e in (kept, deleted, revoked)]
    cache = Cache()
    cache.restore(SyncState((kept, deleted, revoked), ca.bundle(), revision=9, epoch="ep"), svids)
    syncer = Syncer(
        SyncSettings((Target("127.0.0.1:1", "127.0.0.1:1"),)),
        AgentStore(tmp_path / "svid.der", tmp_path / "key.der", tmp_path / "b"),
        cache,
        clock,
    )
    key = ec.generate_private_key(ec.SECP256R1())
    syncer._keeper.in_use = AgentSvid(AGENT, (ca.sign_leaf(key.public_key(), AGENT),), key)
    syncer.resume(SyncPosition(AGENT, 9, "ep"))

    # While the agent was down: an entry added, one deleted, one's SVID revoked. The server's
    # own packing, one item a message (MAX_ITEMS is 2000: 2000 entries added do the same).
    added = records.Entry(
        "added", "spiffe://example.org/w/added", AGENT, (records.Selector("unix", "uid:2"),)
    )
    revocation = records.Revocation(
        "x509_serial", svids[2].serial_hex, revoked.spiffe_id, 2_000_000_000, "stolen", 1
    )
    messages = list(
        delta_messages(
            [added], ["deleted"], [revocation], [], Shared(), revision=12, epoch="ep", max_items=1
        )
    )
    parts = [sync_delta(m) for m in messages]
    assert [p.more for p in parts] == [True, True, False]

    async def consume() -> None:
        with contextlib.suppress(ConnectionError):
            await syncer._consume(cast(NodeClient, _BrokenAfterFirstPart(parts)))

    asyncio.run(consume())
    # Until the agent reconnects (backoff up to reconnect_max), what does it serve?
    snap = cache.snapshot()
    served = (
        []
        if not_serving(snap) is not None
        else [i.entry.id for i in snap.identities_for(ME, clock.now())]
    )
    assert "deleted" not in served, "a restored SVID of an entry deleted meanwhile is served"
    assert "revoked" not in served, "a restored SVID revoked meanwhile is served"


def test_a_restored_cache_serves_once_the_last_part_of_the_catch_up_is_in() -> None:
    clock = FakeClock(start=time.time())
    ca = LocalCa(clock)
    kept = Entry("kept", "spiffe://example.org/w/kept", ME)
    deleted = Entry("deleted", "spiffe://example.org/w/deleted", ME)
    cache = Cache()
    cache.restore(
        SyncState((kept, deleted), ca.bundle(), revision=9, epoch="ep"),
        [svid_for(ca, e) for e in (kept, deleted)],
    )
    added = records.Entry(
        "added", "spiffe://example.org/w/added", AGENT, (records.Selector("unix", "uid:2"),)
    )
    messages = delta_messages(
        [added], ["deleted"], [], [], Shared(), revision=12, epoch="ep", max_items=1
    )
    synced = []
    for part in map(sync_delta, messages):
        cache.apply_delta(part)
        synced.append(cache.snapshot().synced)
    assert synced == [False, True]
    served = [i.entry.id for i in cache.snapshot().identities_for(ME, clock.now())]
    assert served == ["kept"]
