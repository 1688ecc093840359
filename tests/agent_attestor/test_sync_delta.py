"""The agent's side of delta Sync: a snapshot or a delta in parts is applied whole, and a
reconnect asks for what came after the last revision it reached."""

from __future__ import annotations

import asyncio
import logging
import threading
import time
from collections.abc import AsyncIterator, Callable
from pathlib import Path
from typing import Any, cast

import grpc
import pytest
from cryptography.hazmat.primitives.asymmetric import ec

from agent_attestor.agent_store import AgentStore, AgentSvid
from agent_attestor.cache import Cache, SyncDelta, SyncState, join_deltas
from agent_attestor.checkpoint_store import PushedCheckpoint
from agent_attestor.model import Entry, Selector, TrustBundle
from agent_attestor.node_client import NodeClient, sync_delta
from agent_attestor.servers import Target
from agent_attestor.sync import OPERATOR_LOG_INTERVAL, Syncer, SyncSettings
from svid import AuditCheckpointError
from svid._clock import FakeClock
from svid._proto import common_pb2, node_pb2
from tests.agent_attestor.pki import LocalCa

BUNDLE = TrustBundle.from_proto(common_pb2.Bundle(trust_domain="example.org"))


def _entry(n: int) -> Entry:
    return Entry(f"e{n}", f"spiffe://example.org/w/{n}", frozenset({Selector("unix", f"uid:{n}")}))


class FakeClient:
    """Yields scripted Sync messages; checks the cache between them; records each request."""

    def __init__(self, cache: Cache, script: list[tuple[SyncState | SyncDelta, set[str]]]):
        self.cache = cache
        self.script = script
        self.requests: list[tuple[int, str]] = []

    async def sync(self, since_revision: int = 0, epoch: str = "") -> AsyncIterator[Any]:
        self.requests.append((since_revision, epoch))
        for message, held_after in self.script:
            yield message
            # The syncer has handled the message before the stream is read again.
            assert set(self.cache.entries()) == held_after


def _syncer(tmp_path: Path, cache: Cache) -> Syncer:
    settings = SyncSettings((Target("127.0.0.1:1", "127.0.0.1:1"),))
    return Syncer(
        settings,
        AgentStore(tmp_path / "svid.der", tmp_path / "key.der", tmp_path / "b"),
        cache,
        FakeClock(start=time.time()),
    )


def test_a_snapshot_or_delta_in_parts_is_applied_whole(tmp_path: Path) -> None:
    cache = Cache()
    syncer = _syncer(tmp_path, cache)
    script: list[tuple[SyncState | SyncDelta, set[str]]] = [
        (SyncState((_entry(1), _entry(2)), BUNDLE, revision=7, epoch="ep", more=True), set()),
        (SyncState((_entry(3),), BUNDLE, revision=7, epoch="ep"), {"e1", "e2", "e3"}),
        (
            SyncDelta(upserts=(_entry(4),), removed_ids=("e1",), revision=9, epoch="ep"),
            {"e2", "e3", "e4"},
        ),
        # A delta in parts is held until its last part: a cut one leaves no trace.
        (SyncDelta(removed_ids=("e2",), revision=12, epoch="ep", more=True), {"e2", "e3", "e4"}),
    ]
    client = FakeClient(cache, script)
    with pytest.raises(ConnectionError):
        asyncio.run(syncer._consume(cast(NodeClient, client)))
    assert client.requests == [(0, "")]
    assert (syncer.revision, syncer.epoch) == (9, "ep")
    client = FakeClient(cache, [])
    with pytest.raises(ConnectionError):
        asyncio.run(syncer._consume(cast(NodeClient, client)))
    assert client.requests == [(9, "ep")]


def test_a_refusal_forgets_the_revision(tmp_path: Path) -> None:
    cache = Cache()
    syncer = _syncer(tmp_path, cache)
    syncer.revision, syncer.epoch = 5, "ep"
    asyncio.run(syncer._refused(grpc.StatusCode.PERMISSION_DENIED, "evicted"))
    assert (syncer.revision, syncer.epoch) == (0, "")


def test_a_delta_adds_and_removes_revocations_and_replaces_the_crl_only_when_told() -> None:
    cache = Cache()
    cache.apply_sync(SyncState((_entry(1),), BUNDLE, crl=(b"old",)))
    update = node_pb2.SyncUpdate(
        kind=node_pb2.SyncUpdate.DELTA,
        revocations=[
            common_pb2.Revocation(kind=common_pb2.Revocation.X509_SERIAL, value="AB", expires_at=9),
            common_pb2.Revocation(kind=common_pb2.Revocation.JWT_ID, value="j1", expires_at=9),
        ],
        revision=3,
    )
    cache.apply_delta(sync_delta(update))
    snap = cache.snapshot()
    assert (snap.revoked_serials, snap.revoked_jtis) == (frozenset({"ab"}), frozenset({"j1"}))
    assert snap.crl == (b"old",)  # not part of this delta
    assert snap.bundle == BUNDLE
    gone = node_pb2.SyncUpdate(
        kind=node_pb2.SyncUpdate.DELTA,
        removed_revocations=[
            common_pb2.Revocation(kind=common_pb2.Revocation.X509_SERIAL, value="AB")
        ],
        crl_changed=True,
    )
    cache.apply_delta(sync_delta(gone))
    snap = cache.snapshot()
    assert (snap.revoked_serials, snap.revoked_jtis) == (frozenset(), frozenset({"j1"}))
    assert snap.crl == ()
    assert set(cache.entries()) == {"e1"}


class CrlClient:
    """Yields scripted Sync messages; checks the cache's CRLs after each one is handled."""

    def __init__(self, cache: Cache, script: list[tuple[SyncState | SyncDelta, tuple[bytes, ...]]]):
        self.cache = cache
        self.script = script

    async def sync(self, since_revision: int = 0, epoch: str = "") -> AsyncIterator[Any]:
        for message, crl_after in self.script:
            yield message
            assert self.cache.snapshot().crl == crl_after


def test_crls_spread_over_a_run_replace_the_agents_together_at_its_end(tmp_path: Path) -> None:
    cache = Cache()
    syncer = _syncer(tmp_path, cache)
    script: list[tuple[SyncState | SyncDelta, tuple[bytes, ...]]] = [
        # A snapshot's CRLs come in several parts: it holds them all.
        (SyncState((_entry(1),), BUNDLE, crl=(b"a1",), revision=2, more=True), ()),
        (SyncState((), BUNDLE, crl=(b"a2",), revision=2, more=True), ()),
        (SyncState((), BUNDLE, crl=(b"a3",), revision=2), (b"a1", b"a2", b"a3")),
        # A delta run with a new CRL set: the old one stays whole until the run's last part,
        # and no part's share alone ever replaces it.
        (SyncDelta(crl=(b"b1",), revision=5, more=True), (b"a1", b"a2", b"a3")),
        (SyncDelta(upserts=(_entry(2),), revision=5, more=True), (b"a1", b"a2", b"a3")),
        (SyncDelta(crl=(b"b2",), revision=5, more=True), (b"a1", b"a2", b"a3")),
        (SyncDelta(crl=(b"b3",), revision=5), (b"b1", b"b2", b"b3")),
        # A later delta saying nothing of CRLs keeps them; an emptied set is installed.
        (SyncDelta(upserts=(_entry(3),), revision=6), (b"b1", b"b2", b"b3")),
        (SyncDelta(crl=(), revision=7), ()),
    ]
    with pytest.raises(ConnectionError):
        asyncio.run(syncer._consume(cast(NodeClient, CrlClient(cache, script))))
    assert syncer.revision == 7
    assert set(cache.entries()) == {"e1", "e2", "e3"}


def test_a_run_joined_leaves_the_state_its_parts_applied_in_turn_leave() -> None:
    """A later part may undo what an earlier one did (an entry removed then added back, a
    revocation added then gone): the joined run must end where applying each part would."""
    changed = Entry("e2", "spiffe://example.org/w/2b", frozenset({Selector("unix", "uid:2")}))
    other = TrustBundle("other.org", x509_authorities=(b"other",))
    run = [
        SyncDelta(
            upserts=(_entry(3),),
            removed_ids=("e2",),
            revocations_added={("x509_serial", "aa"): 9, ("jwt_id", "j1"): 9},
            revocation_spiffe_ids={("x509_serial", "aa"): "spiffe://example.org/w/3"},
            crl=(b"c1",),
            revision=4,
            more=True,
        ),
        SyncDelta(
            upserts=(changed,),
            removed_ids=("e3", "e1"),
            revocations_removed=frozenset({("x509_serial", "aa"), ("jwt_id", "old")}),
            revision=4,
            more=True,
        ),
        SyncDelta(
            upserts=(_entry(1),),
            revocations_added={("x509_serial", "aa"): 10},
            bundle=TrustBundle("example.org", x509_authorities=(b"ca-2",)),
            federated={"other.org": other},
            crl=(b"c2",),
            revision=4,
        ),
    ]
    start = SyncState(
        (_entry(1), _entry(2)), BUNDLE, revocation_expiry={("jwt_id", "old"): 9}, crl=(b"c0",)
    )
    in_turn, joined = Cache(), Cache()
    for cache in (in_turn, joined):
        cache.apply_sync(start)
    for part in run:
        in_turn.apply_delta(part)
    joined.apply_delta(join_deltas(run))
    assert joined.entries() == in_turn.entries() == {"e1": _entry(1), "e2": changed}
    a, b = joined.snapshot(), in_turn.snapshot()
    assert (a.bundle, dict(a.federated)) == (b.bundle, dict(b.federated))
    assert a.crl == (b"c1", b"c2")  # the run's CRLs together (each part's alone replaced them)
    assert dict(a.revocation_expiry) == dict(b.revocation_expiry)
    assert dict(a.revocation_expiry) == {("x509_serial", "aa"): 10, ("jwt_id", "j1"): 9}
    assert dict(a.revocation_spiffe_ids) == dict(b.revocation_spiffe_ids) == {}
    assert (a.revoked_serials, a.revoked_jtis) == (b.revoked_serials, b.revoked_jtis)


def test_a_bundle_the_disk_cannot_save_does_not_stop_the_sync(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    """The bundle on disk is for the next start; its write failing (a full disk) ended the
    stream before the message was applied, and every reconnect asked for the same message
    again: no entry, and no revocation, reached the agent until the disk had room."""
    cache = Cache()
    syncer = _syncer(tmp_path, cache)
    syncer._store.bundle_path.mkdir()  # where the bundle goes, the write fails
    bundle = TrustBundle("example.org", x509_authorities=(b"ca-1",))
    revoked = {("x509_serial", "ab12"): 99}
    script: list[tuple[SyncState | SyncDelta, set[str]]] = [
        (SyncState((_entry(1),), bundle, revision=3, epoch="ep"), {"e1"}),
        (
            SyncDelta(
                upserts=(_entry(2),),
                bundle=TrustBundle("example.org", x509_authorities=(b"ca-2",)),
                revocations_added=revoked,
                revision=4,
                epoch="ep",
            ),
            {"e1", "e2"},
        ),
    ]
    with (
        caplog.at_level(logging.WARNING, logger="agent_attestor.sync"),
        pytest.raises(ConnectionError, match="server ended the Sync stream"),
    ):
        asyncio.run(syncer._consume(cast(NodeClient, FakeClient(cache, script))))
    assert (syncer.revision, syncer.epoch) == (4, "ep")
    assert cache.snapshot().revoked_serials == frozenset({"ab12"})
    assert "cannot save the trust bundle" in caplog.text


class _Steps:
    """Yields each scripted message after doing its step (the disk failing or mended, time
    passing), and records the bundle-save lines the syncer wrote for it."""

    def __init__(
        self,
        script: list[tuple[Callable[[], object], SyncState | SyncDelta]],
        caplog: pytest.LogCaptureFixture,
    ) -> None:
        self.script = script
        self.caplog = caplog
        self.lines: list[list[tuple[str, int]]] = []

    async def sync(self, since_revision: int = 0, epoch: str = "") -> AsyncIterator[Any]:
        for step, message in self.script:
            step()
            self.caplog.clear()
            yield message
            self.lines.append(
                [
                    (r.getMessage().split(";")[0], cast(int, getattr(r, "failures", 0)))
                    for r in self.caplog.records
                    if "trust bundle" in r.getMessage()
                ]
            )


def test_bundle_saves_failing_at_every_message_are_said_once_per_interval_then_mended_once(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    """Every snapshot, and every delta changing the bundle, saves it: a full disk logged an
    error at each, flooding the log. Said at the first, then once an interval with how many
    failed, and once when a save works again (a later failure is said at once again)."""
    cache = Cache()
    clock = FakeClock(start=time.time())
    syncer = Syncer(
        SyncSettings((Target("127.0.0.1:1", "127.0.0.1:1"),)),
        AgentStore(tmp_path / "svid.der", tmp_path / "key.der", tmp_path / "b"),
        cache,
        clock,
    )
    path = syncer._store.bundle_path

    def nothing() -> None:
        pass

    def later() -> None:
        clock.advance(OPERATOR_LOG_INTERVAL + 1)

    def soon() -> None:
        clock.advance(1)

    def fill() -> None:
        path.unlink(missing_ok=True)
        path.mkdir()  # where the bundle goes, the write fails as on a full disk

    def mend() -> None:
        path.rmdir()

    def bundled(n: int) -> SyncDelta:
        authorities = (f"ca-{n}".encode(),)
        return SyncDelta(bundle=TrustBundle("example.org", authorities), revision=n, epoch="ep")

    steps = [fill, nothing, soon, later, soon, nothing, mend, nothing, fill, soon]
    messages: list[SyncState | SyncDelta] = [
        SyncState((_entry(1),), TrustBundle("example.org", (b"ca-0",)), revision=1, epoch="ep")
    ]
    messages += [bundled(n) for n in range(2, len(steps) + 1)]
    client = _Steps(list(zip(steps, messages, strict=True)), caplog)
    with (
        caplog.at_level(logging.INFO, logger="agent_attestor.sync"),
        pytest.raises(ConnectionError, match="server ended the Sync stream"),
    ):
        asyncio.run(syncer._consume(cast(NodeClient, client)))
    failed = ("cannot save the trust bundle", 1)
    assert client.lines == [
        [failed],  # the first failure, at once
        [],
        [],
        [("cannot save the trust bundle", 3)],  # an interval on: it and the two unsaid
        [],
        [],
        [("saved the trust bundle again after failed saves", 6)],  # said once, with all six
        [],
        [failed],  # failing anew: said at once
        [],
    ]
    assert syncer.revision == len(steps)  # every message was applied all along


def test_a_checkpoint_the_agent_cannot_keep_does_not_stop_the_sync(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    """A checkpoint offer raising ended the stream before the messages after it, and the server
    pushes the same checkpoint on each reconnect: no entry reached the agent until a restart."""
    cache = Cache()

    def offer(_pushed: PushedCheckpoint) -> bool:
        raise AuditCheckpointError("a damaged copy")

    syncer = Syncer(
        SyncSettings((Target("127.0.0.1:1", "127.0.0.1:1"),)),
        AgentStore(tmp_path / "svid.der", tmp_path / "key.der", tmp_path / "b"),
        cache,
        FakeClock(start=time.time()),
        on_checkpoint=offer,
    )
    script: list[tuple[Any, set[str]]] = [
        (PushedCheckpoint("{}", b""), set()),
        (SyncState((_entry(1),), BUNDLE, revision=3, epoch="ep"), {"e1"}),
    ]
    with (
        caplog.at_level(logging.ERROR, logger="agent_attestor.sync"),
        pytest.raises(ConnectionError, match="server ended the Sync stream"),
    ):
        asyncio.run(syncer._consume(cast(NodeClient, FakeClient(cache, script))))
    assert set(cache.entries()) == {"e1"}
    assert "cannot keep the audit checkpoint" in caplog.text


def test_a_bundle_the_disk_refused_is_saved_once_it_has_room_without_another_message(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    """A delta brings the bundle only when it changes: a save the disk refused waited for the
    next change (or a reconnect's snapshot), and a restart meanwhile verified the server with
    the roots saved before. It is saved again with backoff, as a refused agent SVID is."""
    cache = Cache()
    settings = SyncSettings(
        (Target("127.0.0.1:1", "127.0.0.1:1"),), save_retry_first=0.01, save_retry_cap=0.02
    )
    syncer = Syncer(
        settings,
        AgentStore(tmp_path / "svid.der", tmp_path / "key.der", tmp_path / "b"),
        cache,
        FakeClock(start=time.time()),
    )
    path = syncer._store.bundle_path
    path.mkdir()  # where the bundle goes, the write fails as on a full disk
    script: list[tuple[SyncState | SyncDelta, set[str]]] = [
        (
            SyncDelta(
                upserts=(_entry(1),),
                bundle=TrustBundle("example.org", x509_authorities=(b"ca-1",)),
                revision=2,
                epoch="ep",
            ),
            {"e1"},
        ),
    ]

    async def scenario() -> None:
        saver = asyncio.create_task(syncer._save_loop())
        try:
            with pytest.raises(ConnectionError, match="server ended the Sync stream"):
                await syncer._consume(cast(NodeClient, FakeClient(cache, script)))
            await asyncio.sleep(0.1)
            assert path.is_dir()  # still refused: nothing saved, nothing lost
            path.rmdir()  # the disk has room again; no message follows
            for _ in range(200):
                if path.is_file():
                    break
                await asyncio.sleep(0.01)
        finally:
            saver.cancel()  # its save, seen written, may still be marking it saved
            await asyncio.gather(saver, return_exceptions=True)

    with caplog.at_level(logging.INFO, logger="agent_attestor.sync"):
        asyncio.run(scenario())
    assert path.read_bytes() == b"ca-1"
    assert syncer._keeper._unsaved_roots == ()
    assert "saved the trust bundle again after failed saves" in caplog.text
    assert "saved the agent SVID" not in caplog.text  # no agent SVID was waiting


def test_delta_parts_held_when_a_snapshot_comes_are_dropped_with_the_state_it_replaces(
    tmp_path: Path,
) -> None:
    cache = Cache()
    syncer = _syncer(tmp_path, cache)
    script: list[tuple[SyncState | SyncDelta, set[str]]] = [
        (SyncState((_entry(1),), BUNDLE, revision=3, epoch="ep"), {"e1"}),
        (SyncDelta(upserts=(_entry(2),), revision=4, epoch="ep", more=True), {"e1"}),
        (SyncState((_entry(3),), BUNDLE, revision=5, epoch="ep"), {"e3"}),
        (SyncDelta(upserts=(_entry(4),), revision=6, epoch="ep"), {"e3", "e4"}),
    ]
    with pytest.raises(ConnectionError, match="server ended the Sync stream"):
        asyncio.run(syncer._consume(cast(NodeClient, FakeClient(cache, script))))
    assert (syncer.revision, set(cache.entries())) == (6, {"e3", "e4"})


def test_a_delta_inside_a_snapshots_parts_ends_the_stream_with_nothing_applied(
    tmp_path: Path,
) -> None:
    cache = Cache()
    syncer = _syncer(tmp_path, cache)
    script: list[tuple[SyncState | SyncDelta, set[str]]] = [
        (SyncState((_entry(1),), BUNDLE, revision=3, epoch="ep"), {"e1"}),
        (SyncState((_entry(2),), BUNDLE, revision=5, epoch="ep", more=True), {"e1"}),
        (SyncDelta(upserts=(_entry(4),), revision=6, epoch="ep"), {"e1"}),
        (SyncState((_entry(3),), BUNDLE, revision=5, epoch="ep"), {"e2", "e3"}),
    ]
    with pytest.raises(ConnectionError, match="a delta inside a snapshot's parts"):
        asyncio.run(syncer._consume(cast(NodeClient, FakeClient(cache, script))))
    assert (syncer.revision, set(cache.entries())) == (3, {"e1"})


def test_a_bundle_refused_before_and_saved_with_a_new_agent_svid_is_said_mended(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    """A renewal's save writes the roots too: once it does, the failed bundle saves are over,
    and a later failure is said at once, not counted with them."""
    syncer = _syncer(tmp_path, Cache())
    path = syncer._store.bundle_path
    path.mkdir()  # where the bundle goes, the write fails as on a full disk
    with caplog.at_level(logging.INFO, logger="agent_attestor.sync"):
        asyncio.run(syncer._save_bundle(TrustBundle("example.org", x509_authorities=(b"ca-1",))))
        assert syncer._keeper._bundle_save_failures == 1
        path.rmdir()
        ca = LocalCa(FakeClock(start=time.time()))
        key = ec.generate_private_key(ec.SECP256R1())
        agent = "spiffe://example.org/svid/agent/join_token/t"
        svid = AgentSvid(agent, (ca.sign_leaf(key.public_key(), agent),), key)
        roots = TrustBundle("example.org", x509_authorities=(b"ca-2",))
        asyncio.run(syncer._keeper.persist(svid, roots, "renewed"))
    assert path.read_bytes() == b"ca-2"
    assert syncer._keeper._bundle_save_failures == 0
    assert "saved the trust bundle again after failed saves" in caplog.text


def test_a_renewed_agent_svid_saved_beside_a_bundle_the_disk_refused_is_not_said_unsaved(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    """A renewal's save writes the agent SVID, then the roots. When only the roots were
    refused, the operator was told the agent SVID could not be saved and that a restart
    before it is saved cannot use it (it was saved), nothing about the trust bundle, and no
    line when the bundle was saved at last: the failure was not counted as a bundle's."""
    syncer = _syncer(tmp_path, Cache())
    path = syncer._store.bundle_path
    path.mkdir()  # where the bundle goes, the write fails as on a full disk
    ca = LocalCa(FakeClock(start=time.time()))
    key = ec.generate_private_key(ec.SECP256R1())
    agent = "spiffe://example.org/svid/agent/join_token/t"
    svid = AgentSvid(agent, (ca.sign_leaf(key.public_key(), agent),), key)

    async def scenario() -> None:
        saver = asyncio.create_task(syncer._save_loop())
        try:
            await syncer._keeper.persist(
                svid, TrustBundle("example.org", x509_authorities=(b"ca-1",)), "renewed"
            )
            assert syncer._store.svid_path.is_file()  # the agent SVID is saved
            path.rmdir()  # the disk has room again
            for _ in range(300):
                if path.is_file():
                    break
                await asyncio.sleep(0.01)
        finally:
            saver.cancel()  # its save, seen written, may still be marking it saved
            await asyncio.gather(saver, return_exceptions=True)

    with caplog.at_level(logging.INFO, logger="agent_attestor.sync"):
        asyncio.run(scenario())
    assert path.read_bytes() == b"ca-1"
    assert "cannot save the renewed agent SVID" not in caplog.text
    assert "cannot save the trust bundle" in caplog.text
    assert "saved the trust bundle again after failed saves" in caplog.text


def test_an_agent_svid_saved_again_while_its_bundle_is_still_refused_is_said_saved(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    """The save loop writes the agent SVID, then its roots: when the roots were refused again,
    the SVID's save was not said, and the operator, told a restart cannot use it, never heard
    that it can."""
    syncer = _syncer(tmp_path, Cache())
    syncer._s.save_retry_first, syncer._s.save_retry_cap = 0.01, 0.02
    bundle_path, svid_path = syncer._store.bundle_path, syncer._store.svid_path
    bundle_path.mkdir()  # both writes fail, as on a full disk
    svid_path.mkdir()
    ca = LocalCa(FakeClock(start=time.time()))
    key = ec.generate_private_key(ec.SECP256R1())
    agent = "spiffe://example.org/svid/agent/join_token/t"
    svid = AgentSvid(agent, (ca.sign_leaf(key.public_key(), agent),), key)

    async def scenario() -> None:
        saver = asyncio.create_task(syncer._save_loop())
        try:
            roots = TrustBundle("example.org", x509_authorities=(b"ca-1",))
            await syncer._keeper.persist(svid, roots, "new")
            svid_path.rmdir()  # room for the SVID, not yet for the bundle
            for _ in range(300):
                if svid_path.is_file() and syncer._keeper._unsaved is None:
                    break
                await asyncio.sleep(0.01)
            await asyncio.sleep(0.05)
        finally:
            saver.cancel()

    with caplog.at_level(logging.INFO, logger="agent_attestor.sync"):
        asyncio.run(scenario())
    assert svid_path.is_file()
    assert bundle_path.is_dir()
    assert "cannot save the new agent SVID" in caplog.text
    assert "saved the agent SVID the disk refused before" in caplog.text


def test_a_stop_with_only_the_trust_bundle_unsaved_does_not_say_the_agent_svid_is_unsaved(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    """At stop, the last try saves what is waiting: with only roots refused (the agent SVID on
    disk), the agent said the next start could not use its SVID and may have to attest again."""
    syncer = _syncer(tmp_path, Cache())
    syncer._store.bundle_path.mkdir()  # the bundle's write fails, as on a full disk
    with caplog.at_level(logging.INFO, logger="agent_attestor.sync"):
        asyncio.run(syncer._save_bundle(TrustBundle("example.org", x509_authorities=(b"ca-1",))))
        asyncio.run(syncer.settle(0))
    assert "cannot save the trust bundle" in caplog.text
    assert "agent SVID in use unsaved" not in caplog.text


def test_a_checkpoint_offer_cut_short_by_a_reconnect_never_runs_beside_the_next(
    tmp_path: Path,
) -> None:
    """CheckpointStore is used from one thread, and its offers append (and fsync) in a thread.
    A stream cut while one waits for a slow disk (a renewal reconnects it) left that thread
    writing, and the next stream's offer of the checkpoint the server pushes again on connect
    ran beside it: the same store checked and appended from two threads at once."""
    release = threading.Event()
    guard = threading.Lock()
    running = [0]
    most = [0]
    offered: list[str] = []

    def offer(pushed: PushedCheckpoint) -> bool:
        with guard:
            running[0] += 1
            most[0] = max(most[0], running[0])
        try:
            if not offered:
                release.wait(10)  # the first: a slow fsync
            offered.append(pushed.line)
            return True
        finally:
            with guard:
                running[0] -= 1

    syncer = Syncer(
        SyncSettings((Target("127.0.0.1:1", "127.0.0.1:1"),)),
        AgentStore(tmp_path / "svid.der", tmp_path / "key.der", tmp_path / "b"),
        Cache(),
        FakeClock(start=time.time()),
        on_checkpoint=offer,
    )

    async def scenario() -> None:
        first = asyncio.create_task(syncer._offer_checkpoint(PushedCheckpoint("a", b"")))
        while not running[0]:
            await asyncio.sleep(0.01)
        first.cancel()  # the stream it came on ended
        second = asyncio.create_task(syncer._offer_checkpoint(PushedCheckpoint("b", b"")))
        await asyncio.sleep(0.3)
        release.set()
        await asyncio.gather(first, second, return_exceptions=True)

    asyncio.run(scenario())
    assert offered == ["a", "b"]
    assert most[0] == 1


def test_roots_the_disk_refused_still_wait_after_an_agent_svid_that_came_without_roots(
    tmp_path: Path,
) -> None:
    """Roots a Sync message brought wait while the disk refuses them (and verify a reconnect's
    server meanwhile). An agent SVID answered without roots (a bundle with no X.509
    authorities, which the cache and the channel already pass over) emptied what waited: the
    newer roots never reached the disk, the next start verifying the server with the older
    ones, and a reconnect meanwhile with those too."""
    syncer = _syncer(tmp_path, Cache())
    path = syncer._store.bundle_path
    path.mkdir()  # where the bundle goes, the write fails as on a full disk
    asyncio.run(syncer._save_bundle(TrustBundle("example.org", x509_authorities=(b"ca-2",))))
    path.rmdir()  # room again
    ca = LocalCa(FakeClock(start=time.time()))
    key = ec.generate_private_key(ec.SECP256R1())
    agent = "spiffe://example.org/svid/agent/join_token/t"
    svid = AgentSvid(agent, (ca.sign_leaf(key.public_key(), agent),), key)
    asyncio.run(syncer._keeper.persist(svid, TrustBundle("example.org"), "renewed"))
    assert syncer._store.svid_path.is_file()
    assert path.read_bytes() == b"ca-2"
