"""The agent's own identity saves (agent SVID, key, roots) cut short: by a reconnect, a stop, or
the server refusing the agent while a save's thread still writes. Real files; a gate holds a
save in its thread, as a slow disk does."""

from __future__ import annotations

import asyncio
import logging
import threading
import time
from pathlib import Path

import grpc
import pytest
from cryptography.hazmat.primitives.serialization import Encoding

from agent_attestor.agent_store import AgentStore, AgentSvid
from agent_attestor.cache import Cache
from agent_attestor.cancel import cancel_all
from agent_attestor.model import TrustBundle
from agent_attestor.node_client import NodeClient
from agent_attestor.servers import Target
from agent_attestor.sync import Syncer, SyncSettings
from svid._clock import FakeClock
from svid._der import certs_to_pem
from tests.agent_attestor.pki import LocalCa
from tests.agent_attestor.test_sync_store import _mend, _svid, _unsaved_attestation

SERVER = Target("127.0.0.1:1", "127.0.0.1:1")


class _GatedStore(AgentStore):
    """Saves wait in their thread until let through (a slow fsync), then write for real."""

    def __init__(self, inner: AgentStore) -> None:
        super().__init__(inner.svid_path, inner.key_path, inner.bundle_path)
        self.started = threading.Event()
        self.release = threading.Event()

    def _gate(self) -> None:
        self.started.set()
        assert self.release.wait(10)

    def save_svid(self, svid: AgentSvid) -> None:
        self._gate()
        super().save_svid(svid)

    def save_bundle(self, authorities: tuple[bytes, ...], sequence: int = 0, seen: int = 0) -> None:
        self._gate()
        super().save_bundle(authorities, sequence, seen)


def _gated(tmp_path: Path) -> _GatedStore:
    return _GatedStore(AgentStore(tmp_path / "svid.der", tmp_path / "key.der", tmp_path / "b"))


def _assert_on_disk(store: AgentStore, svid: AgentSvid) -> None:
    saved = store.load_svid()
    assert saved is not None
    assert saved.chain == svid.chain


async def _started(store: _GatedStore) -> None:
    await asyncio.wait_for(asyncio.to_thread(store.started.wait, 10), 10)


async def _stopped(task: asyncio.Task[None]) -> None:
    task.cancel()
    await asyncio.gather(task, return_exceptions=True)


def _refuse(syncer: Syncer) -> asyncio.Task[None]:
    """The server's refusal of the agent (evicted), handled in a task of its own."""
    return asyncio.create_task(
        syncer._refused(grpc.StatusCode.PERMISSION_DENIED, "agent is not attested (evicted)")
    )


def _unsaved_and_gated(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> tuple[_GatedStore, Syncer, AgentSvid]:
    """_unsaved_attestation's agent, its store gated once the disk is mended (_retry_held)."""
    plain, syncer, svid = _unsaved_attestation(tmp_path, monkeypatch)
    syncer._s.save_retry_first = 0.01
    return _GatedStore(plain), syncer, svid


async def _retry_held(tmp_path: Path, syncer: Syncer, store: _GatedStore) -> asyncio.Task[None]:
    """Attests (the disk refuses the SVID), mends the disk and starts _save_loop: back once
    the loop's retry is held in its save's thread."""
    await syncer.ensure_identity()
    _mend(tmp_path)
    syncer._store = syncer._keeper._store = store
    saver = asyncio.create_task(syncer._save_loop())
    await _started(store)
    return saver


async def _renewal_held(
    store: _GatedStore, new: AgentSvid, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> tuple[Syncer, asyncio.Task[None]]:
    """A syncer on an old agent SVID and its renewal to `new`, running in a task: back once
    the renewal is held in its save's thread."""
    old = _svid(tmp_path)
    root = LocalCa(FakeClock(start=time.time())).cert

    async def renew(self: NodeClient, timeout: float = 30.0) -> tuple[AgentSvid, TrustBundle]:
        return new, TrustBundle("example.org", (root.public_bytes(Encoding.DER),))

    monkeypatch.setattr(NodeClient, "renew", renew)
    syncer = Syncer(SyncSettings((SERVER,)), store, Cache(), FakeClock(start=time.time()))
    syncer.set_bootstrap_roots(certs_to_pem([root]))
    await syncer._servers.first()
    syncer._install(old, None)
    renewing = asyncio.create_task(syncer.renew_once())
    await _started(store)
    return syncer, renewing


def test_a_bundle_save_cut_short_by_a_reconnect_that_then_fails_is_said_and_retried(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    """The stream's task cancelled while the save's thread still wrote: the thread's OSError
    was swallowed with the cancellation, nothing was said, and _save_loop was never woken, so
    the file stayed stale until another message brought a bundle."""
    store = _gated(tmp_path)
    store.bundle_path.mkdir()  # where the bundle goes, the write fails as on a full disk
    settings = SyncSettings((SERVER,), save_retry_first=0.01, save_retry_cap=0.02)
    syncer = Syncer(settings, store, Cache(), FakeClock(start=time.time()))

    async def scenario() -> None:
        saver = asyncio.create_task(syncer._save_loop())
        saving = asyncio.create_task(
            syncer._save_bundle(TrustBundle("example.org", x509_authorities=(b"ca-1",)))
        )
        await _started(store)
        saving.cancel()  # a renewal reconnects the stream
        store.release.set()
        with pytest.raises(asyncio.CancelledError):
            await saving
        assert "cannot save the trust bundle" in caplog.text
        store.bundle_path.rmdir()  # the disk has room again; no message follows
        for _ in range(500):
            if store.bundle_path.is_file():
                break
            await asyncio.sleep(0.01)
        await _stopped(saver)

    with caplog.at_level(logging.INFO, logger="agent_attestor.sync"):
        asyncio.run(scenario())
    assert store.bundle_path.read_bytes() == b"ca-1"
    assert "saved the trust bundle again after failed saves" in caplog.text


def test_a_refusal_waits_for_a_save_in_flight_and_nothing_writes_the_svid_back(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The server refused the agent while _save_loop's thread saved the SVID the disk had
    refused: the removal did not wait, the thread wrote the refused SVID after it, and the next
    start loaded it, was refused, and removed it again."""
    store, syncer, _ = _unsaved_and_gated(tmp_path, monkeypatch)

    async def scenario() -> None:
        saver = await _retry_held(tmp_path, syncer, store)
        refusing = _refuse(syncer)
        await asyncio.sleep(0.05)
        assert not refusing.done()  # waiting for the save in its thread
        store.release.set()
        await asyncio.wait_for(refusing, 10)
        await _stopped(saver)
        await syncer.close()

    asyncio.run(scenario())
    assert syncer.agent_svid is None
    assert not store.svid_path.exists()
    assert store.load_svid() is None


def test_a_renewal_cancelled_mid_save_leaves_memory_and_disk_with_the_same_svid(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The renewal's save went on in its thread when a stop or reconnect cancelled it: the disk
    got the new SVID and memory kept the old one. Once its save began, the new one is used."""
    store, new = _gated(tmp_path), _svid(tmp_path)

    async def scenario() -> None:
        syncer, renewing = await _renewal_held(store, new, tmp_path, monkeypatch)
        renewing.cancel()  # the agent stops
        store.release.set()
        with pytest.raises(asyncio.CancelledError):
            await renewing
        assert syncer.agent_svid is new
        await syncer.close()

    asyncio.run(scenario())
    _assert_on_disk(store, new)


def test_a_bundle_save_writes_the_agent_svid_waiting_first_as_every_save_does(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    """_save_bundle had a save of its own, beside _save_unsaved's: it wrote the roots alone, and
    an agent SVID the disk refused waited for _save_loop's backoff though the disk took writes
    again. One save now serves both, and says the SVID saved whichever save it was."""
    store, syncer, svid = _unsaved_attestation(tmp_path, monkeypatch)
    syncer._s.save_retry_first = 3600.0  # _save_loop would not get to it in this test

    async def scenario() -> None:
        await syncer.ensure_identity()  # refused by the disk
        _mend(tmp_path)
        await syncer._save_bundle(TrustBundle("example.org", x509_authorities=(b"ca-1",)))
        await syncer.close()

    with caplog.at_level(logging.INFO, logger="agent_attestor.sync"):
        asyncio.run(scenario())
    _assert_on_disk(store, svid)
    assert store.bundle_path.read_bytes() == b"ca-1"
    assert "saved the agent SVID the disk refused before" in caplog.text


def test_a_refusal_during_a_renewals_save_leaves_neither_disk_nor_memory_its_svid(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The renewal's save, then its install, ran on after the removal: the renewed SVID of an
    agent the server refused was back on disk and in use."""
    store = _gated(tmp_path)

    async def scenario() -> None:
        syncer, renewing = await _renewal_held(store, _svid(tmp_path), tmp_path, monkeypatch)
        refusing = _refuse(syncer)
        await asyncio.sleep(0.05)
        assert not refusing.done()  # waiting for the renewal's save and install
        store.release.set()
        await asyncio.wait_for(asyncio.gather(renewing, refusing), 10)
        assert syncer.agent_svid is None
        await syncer.close()

    asyncio.run(scenario())
    assert not store.svid_path.exists()


def test_a_stop_cancelling_the_save_loop_again_holds_the_save_lock_until_its_thread_wrote(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """run()'s stop (cancel_all) cancels _save_loop again each second it runs on, as a slow
    disk has it do: the second cancellation ended it while its thread still wrote the agent
    SVID, the save lock was let go, and settle's save (or a renewal's) wrote the same files
    beside it, a new chain beside an old key."""
    store, syncer, svid = _unsaved_and_gated(tmp_path, monkeypatch)

    async def scenario() -> None:
        saver = await _retry_held(tmp_path, syncer, store)
        await cancel_all([saver], tries=3, patience=0.01)
        assert syncer._keeper._saving.locked()  # its thread still writes: no other save starts
        store.release.set()
        await asyncio.gather(saver, return_exceptions=True)
        await syncer.settle(1)
        await syncer.close()

    asyncio.run(scenario())
    _assert_on_disk(store, svid)


def test_a_stop_during_a_refusal_still_removes_the_refused_svid_and_says_so(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    """A refusal waits for a save in flight before removing the SVID; a stop that came then
    cut it short: the save wrote the refused SVID, nothing removed it, and the operator was
    never told the server refused the agent."""
    store, syncer, _ = _unsaved_and_gated(tmp_path, monkeypatch)

    async def scenario() -> None:
        saver = await _retry_held(tmp_path, syncer, store)
        refusing = _refuse(syncer)
        for _ in range(3):
            await asyncio.sleep(0)  # waiting for the save in its thread
        refusing.cancel()  # the agent stops
        store.release.set()
        await asyncio.gather(refusing, return_exceptions=True)
        await _stopped(saver)
        await syncer.close()

    with caplog.at_level(logging.ERROR, logger="agent_attestor.sync"):
        asyncio.run(scenario())
    assert not store.svid_path.exists()
    assert syncer.agent_svid is None
    assert "the server refused this agent" in caplog.text


def test_a_save_cancelled_while_its_thread_writes_marks_what_it_wrote_saved(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    """_save_loop's save waited for its thread when a stop cancelled it, then raised before
    marking the roots saved: settle wrote them again, and the line saying the refused bundle
    was saved never came."""
    store = _gated(tmp_path)
    syncer = Syncer(SyncSettings((SERVER,)), store, Cache(), FakeClock(start=time.time()))
    store.bundle_path.mkdir()  # where the bundle goes, the write fails as on a full disk
    store.release.set()

    async def scenario() -> None:
        await syncer._save_bundle(TrustBundle("example.org", x509_authorities=(b"ca-1",)))
        store.bundle_path.rmdir()  # the disk has room again
        store.started.clear()
        store.release.clear()
        saving = asyncio.create_task(syncer._keeper.save_unsaved())  # _save_loop's retry
        await _started(store)
        saving.cancel()  # the agent stops
        store.release.set()
        with pytest.raises(asyncio.CancelledError):
            await saving

    with caplog.at_level(logging.INFO, logger="agent_attestor.sync"):
        asyncio.run(scenario())
    assert store.bundle_path.read_bytes() == b"ca-1"
    assert syncer._keeper._unsaved_roots == ()  # nothing left for settle to write again
    assert "saved the trust bundle again after failed saves" in caplog.text
