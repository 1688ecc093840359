"""A restart from saved state: held at once, served only once the server's first Sync message
has caught it up, and not minted again."""

from __future__ import annotations

import asyncio
import time
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any, cast

import pytest
from cryptography.hazmat.primitives.asymmetric import ec

from agent_attestor.agent_store import AgentStore, AgentSvid
from agent_attestor.app import AgentApp
from agent_attestor.cache import Cache, SyncDelta, SyncPosition, SyncState
from agent_attestor.model import Entry, IssuedSvid, Selector
from agent_attestor.node_client import NodeClient
from agent_attestor.rotation import Rotator, renewal_due
from agent_attestor.servers import Target
from agent_attestor.state_store import StateChange, StateStore
from agent_attestor.sync import Syncer, SyncSettings
from svid._clock import FakeClock
from tests.agent_attestor.data_dir import config_under
from tests.agent_attestor.pki import FakeSigner, LocalCa
from tests.agent_attestor.test_state_store import svid_for

ME = frozenset({Selector("unix", "uid:1")})


def _entries(n: int) -> list[Entry]:
    return [Entry(f"e{i}", f"spiffe://example.org/w/{i}", ME) for i in range(n)]


def _restored(n: int, held: int) -> tuple[LocalCa, Cache, list[Entry], list[IssuedSvid]]:
    ca = LocalCa(FakeClock(start=time.time()))
    entries = _entries(n)
    svids = [svid_for(ca, e) for e in entries[:held]]
    cache = Cache()
    cache.restore(SyncState(tuple(entries), ca.bundle(), revision=9, epoch="ep"), svids)
    return ca, cache, entries, svids


def _served(cache: Cache, now: float) -> list[str]:
    return [i.svid.serial_hex for i in cache.snapshot().identities_for(ME, now)]


def test_restored_state_is_held_but_not_served_until_the_server_confirms_it() -> None:
    ca, cache, _, svids = _restored(3, 3)
    snap = cache.snapshot()
    assert not snap.synced  # the Workload API answers UNAVAILABLE, health NOT_SERVING
    assert cache.counts() == (3, 3)
    cache.apply_delta(SyncDelta(revision=9, epoch="ep"))  # caught up: nothing changed
    assert cache.snapshot().synced
    assert _served(cache, ca.clock.now()) == [s.serial_hex for s in svids]


def test_the_catch_up_drops_deleted_entries_and_hides_revoked_svids() -> None:
    ca, cache, entries, svids = _restored(3, 3)
    changed = Entry(entries[2].id, "spiffe://example.org/moved", ME)
    cache.apply_delta(
        SyncDelta(
            upserts=(changed,),
            removed_ids=(entries[0].id,),
            revocations_added={("x509_serial", svids[1].serial_hex): 2_000_000_000},
            revision=12,
            epoch="ep",
        )
    )
    assert _served(cache, ca.clock.now()) == []
    # Deleted, and issued for another SPIFFE ID: gone. Revoked: held, never served.
    assert sorted(cache.svids()) == ["e1"]


def test_a_snapshot_instead_of_a_delta_keeps_the_svids_of_unchanged_entries() -> None:
    # The server restarted (another epoch): it sends everything, and SVIDs still fit.
    ca, cache, entries, svids = _restored(3, 3)
    cache.apply_sync(SyncState(tuple(entries[1:]), ca.bundle(), revision=1, epoch="new"))
    assert sorted(cache.svids()) == ["e1", "e2"]
    assert _served(cache, ca.clock.now()) == [s.serial_hex for s in svids[1:]]


def _rotator(
    cache: Cache, ca: LocalCa, entries: list[Entry], cap: int = 0
) -> tuple[Rotator, FakeSigner]:
    """A rotator built over the restored cache, after its first tick."""
    signer = FakeSigner(ca, {e.id: e.spiffe_id for e in entries})
    rotator = Rotator(cache, signer, ca.clock, max_prefetched=cap)
    asyncio.run(rotator.tick())
    return rotator, signer


def test_restored_svids_are_not_minted_again_but_renewed_on_their_schedule() -> None:
    ca, cache, entries, svids = _restored(3, 2)
    rotator, signer = _rotator(cache, ca, entries)
    assert signer.requested == [["e2"]]  # only the one not saved
    ca.clock.set(max(renewal_due(s) for s in svids) + 0.01)
    asyncio.run(rotator.tick())
    assert {"e0", "e1"} <= set(signer.requested[1])
    assert {s.serial_hex for s in cache.svids().values()}.isdisjoint(s.serial_hex for s in svids)


def test_restored_svids_count_against_the_cap_first() -> None:
    ca, cache, entries, _ = _restored(5, 2)
    _, signer = _rotator(cache, ca, entries, cap=3)
    assert signer.requested == [["e2"]]  # the cap's one free place
    assert sorted(cache.svids()) == ["e0", "e1", "e2"]


def test_restored_svids_beyond_the_cap_are_dropped_not_kept_unrenewed() -> None:
    ca, cache, entries, _ = _restored(4, 4)
    _, signer = _rotator(cache, ca, entries, cap=2)
    assert signer.requested == []
    assert len(cache.svids()) == 2


class _Client:
    def __init__(self) -> None:
        self.requests: list[tuple[int, str]] = []

    async def sync(self, since_revision: int = 0, epoch: str = "") -> AsyncIterator[Any]:
        self.requests.append((since_revision, epoch))
        return
        yield


def _syncer(tmp_path: Path, agent_id: str) -> Syncer:
    clock = FakeClock(start=time.time())
    syncer = Syncer(
        SyncSettings((Target("127.0.0.1:1", "127.0.0.1:1"),)),
        AgentStore(tmp_path / "svid.der", tmp_path / "key.der", tmp_path / "b"),
        Cache(),
        clock,
    )
    ca = LocalCa(clock)
    key = ec.generate_private_key(ec.SECP256R1())
    syncer._keeper.in_use = AgentSvid(agent_id, (ca.sign_leaf(key.public_key(), agent_id),), key)
    return syncer


@pytest.mark.parametrize(("saved_by", "asked"), [("me", (9, "ep")), ("other", (0, ""))])
def test_a_saved_position_is_resumed_only_by_the_agent_that_reached_it(
    tmp_path: Path, saved_by: str, asked: tuple[int, str]
) -> None:
    me = "spiffe://example.org/svid/agent/join_token/me"
    syncer = _syncer(tmp_path, me)
    syncer.resume(SyncPosition(me if saved_by == "me" else f"{me}-before", 9, "ep"))
    client = _Client()
    with pytest.raises(ConnectionError):
        asyncio.run(syncer._consume(cast(NodeClient, client)))
    assert client.requests == [asked]


def _app_with_saved_state(tmp_path: Path, *, own_svid: bool, trust_domain: str = "") -> AgentApp:
    """An agent's data dir as a previous run left it, and the app built on it (not started)."""
    config = config_under(tmp_path, trust_domain)
    clock = FakeClock(start=time.time())
    ca = LocalCa(clock)
    me = "spiffe://example.org/svid/agent/join_token/me"
    if own_svid:
        key = ec.generate_private_key(ec.SECP256R1())
        store = AgentStore(config.agent_svid_path, config.agent_key_path, config.bundle_path)
        store.save_svid(AgentSvid(me, (ca.sign_leaf(key.public_key(), me),), key))
    entries = _entries(2)
    StateStore(config.state_path).write(
        StateChange(
            SyncPosition(me, 9, "ep"),
            tuple(entries),
            svids=tuple(svid_for(ca, e) for e in entries),
            shared=SyncState((), ca.bundle()),
        )
    )
    return AgentApp(config, clock)


def test_the_app_starts_from_the_state_its_own_identity_saved(tmp_path: Path) -> None:
    app = _app_with_saved_state(tmp_path, own_svid=True)
    assert app.cache.counts() == (2, 2)
    assert not app.ready()
    assert app.syncer.position == SyncPosition(
        "spiffe://example.org/svid/agent/join_token/me", 9, "ep"
    )


@pytest.mark.parametrize(("own_svid", "trust_domain"), [(False, ""), (True, "other.org")])
def test_the_app_drops_state_it_cannot_tie_to_its_identity(
    tmp_path: Path, own_svid: bool, trust_domain: str
) -> None:
    # No agent SVID on disk: this start attests anew, under a new agent ID.
    app = _app_with_saved_state(tmp_path, own_svid=own_svid, trust_domain=trust_domain)
    assert app.cache.counts() == (0, 0)
    assert app.syncer.position == SyncPosition()
    assert not app.config.state_path.exists()
