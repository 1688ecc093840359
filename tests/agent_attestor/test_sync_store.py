"""Pure pieces of the server link: backoff, Sync message conversion, the on-disk agent identity."""

from __future__ import annotations

import asyncio
import logging
import random
import stat
import time
from collections.abc import Callable
from pathlib import Path

import grpc
import pytest
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.hazmat.primitives.serialization import Encoding

from agent_attestor import _crypto, agent_store, sync
from agent_attestor.agent_store import AgentStore, AgentSvid
from agent_attestor.cache import Cache
from agent_attestor.errors import StateNotWritableError
from agent_attestor.model import TrustBundle
from agent_attestor.node_client import NodeClient, sync_state
from agent_attestor.servers import Target
from agent_attestor.sync import Syncer, SyncSettings
from svid._backoff import backoff_delay
from svid._clock import FakeClock
from svid._der import certs_to_pem
from svid._proto import common_pb2, node_pb2
from tests.agent_attestor.pki import LocalCa


def test_backoff_grows_is_jittered_and_capped() -> None:
    rand = random.Random(7)
    delays = [backoff_delay(a, 0.2, 10.0, rand) for a in range(12)]
    assert all(0.0 <= d <= 10.0 for d in delays)
    assert max(delays[:2]) <= 0.4
    assert max(delays[-4:]) > 2.0  # the ceiling grew to the cap
    assert len(set(delays)) == len(delays)  # jittered: agents do not retry in lockstep


def test_sync_update_becomes_state() -> None:
    update = node_pb2.SyncUpdate(
        entries=[
            common_pb2.Entry(
                id="e1",
                spiffe_id="spiffe://example.org/w",
                selectors=[common_pb2.Selector(type="unix", value="uid:1")],
                hint="db",
            )
        ],
        bundle=common_pb2.Bundle(trust_domain="example.org", x509_authorities=[b"ca"]),
        revocations=[
            common_pb2.Revocation(kind=common_pb2.Revocation.X509_SERIAL, value="AB12"),
            common_pb2.Revocation(kind=common_pb2.Revocation.JWT_ID, value="jti-1"),
        ],
        crl=[b"crl"],
        federated_bundles={"spiffe://other.org": common_pb2.Bundle(trust_domain="other.org")},
        revision=9,
    )
    state = sync_state(update)
    assert [e.hint for e in state.entries] == ["db"]
    assert state.bundle.x509_authorities == (b"ca",)
    assert state.revoked_serials == frozenset({"ab12"})
    assert state.revoked_jtis == frozenset({"jti-1"})
    assert set(state.federated) == {"other.org"}
    assert state.crl == (b"crl",)


def _svid(tmp_path: Path) -> AgentSvid:
    ca = LocalCa(FakeClock(start=time.time()))
    key = ec.generate_private_key(ec.SECP256R1())
    cert = ca.sign_leaf(key.public_key(), "spiffe://example.org/svid/agent/join_token/t")
    return AgentSvid("spiffe://example.org/svid/agent/join_token/t", (cert,), key)


def test_agent_identity_round_trips_with_private_modes(tmp_path: Path) -> None:
    store = AgentStore(
        tmp_path / "d" / "svid.der", tmp_path / "d" / "key.der", tmp_path / "d" / "b"
    )
    assert store.load_svid() is None
    svid = _svid(tmp_path)
    store.save_svid(svid)
    loaded = store.load_svid()
    assert loaded is not None
    assert loaded.spiffe_id == svid.spiffe_id
    assert loaded.chain == svid.chain
    for path in (store.svid_path, store.key_path):
        assert stat.S_IMODE(path.stat().st_mode) == 0o600
    assert stat.S_IMODE(store.svid_path.parent.stat().st_mode) == 0o700


@pytest.mark.parametrize("damage", ["garbage-chain", "other-key"])
def test_unusable_identity_on_disk_means_attest_again(tmp_path: Path, damage: str) -> None:
    store = AgentStore(tmp_path / "svid.der", tmp_path / "key.der", tmp_path / "b")
    store.save_svid(_svid(tmp_path))
    if damage == "garbage-chain":
        store.svid_path.write_bytes(b"\x30\x03abc")
    else:
        store.save_svid(
            AgentSvid("x", _svid(tmp_path).chain, ec.generate_private_key(ec.SECP256R1()))
        )
    assert store.load_svid() is None


@pytest.mark.parametrize("damage", ["garbage-chain", "truncated", "other-key", "no-key"])
def test_unusable_identity_on_disk_is_logged_with_the_file_and_the_way_out(
    tmp_path: Path, damage: str, caplog: pytest.LogCaptureFixture
) -> None:
    store = AgentStore(tmp_path / "agent_svid.der", tmp_path / "agent_key.der", tmp_path / "b")
    store.save_svid(_svid(tmp_path))
    if damage == "garbage-chain":
        store.svid_path.write_bytes(b"not DER at all")
    elif damage == "truncated":
        store.svid_path.write_bytes(store.svid_path.read_bytes()[:100])
    elif damage == "other-key":
        store.key_path.write_bytes(_crypto.key_der(ec.generate_private_key(ec.SECP256R1())))
    else:
        store.key_path.unlink()
    with caplog.at_level(logging.WARNING, logger="agent_attestor.agent_store"):
        assert store.load_svid() is None
    (record,) = caplog.records
    assert record.levelno == logging.ERROR
    text = record.getMessage() + " " + " ".join(str(v) for v in record.__dict__.values())
    assert str(store.svid_path) in text
    assert "--join-token" in text  # how to recover
    assert "BEGIN" not in text  # never key material


def test_a_stop_during_attestation_keeps_the_identity_the_token_bought(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The server spends a join token when it answers: an agent stopped before it saved the
    answer would restart with neither an identity nor a token. (NodeClient.attest stands in for
    the server here; the e2e restart tests use a real one.)"""
    store = AgentStore(tmp_path / "svid.der", tmp_path / "key.der", tmp_path / "bundle")
    svid = _svid(tmp_path)
    root = LocalCa(FakeClock(start=time.time())).cert
    bundle = TrustBundle("example.org", x509_authorities=(root.public_bytes(Encoding.DER),))

    async def scenario() -> None:
        asked, answer = asyncio.Event(), asyncio.Event()

        async def attest(self: NodeClient, **_: object) -> tuple[AgentSvid, TrustBundle]:
            asked.set()
            await answer.wait()
            return svid, bundle

        monkeypatch.setattr(NodeClient, "attest", attest)
        settings = SyncSettings((Target("127.0.0.1:1", "127.0.0.1:1"),), join_token="t.secret")
        syncer = Syncer(settings, store, Cache(), FakeClock(start=time.time()))
        syncer.set_bootstrap_roots(certs_to_pem([root]))
        identity = asyncio.create_task(syncer.ensure_identity())
        await asyncio.wait_for(asyncio.shield(asked.wait()), 5)
        identity.cancel()  # the agent is told to stop while the server is answering
        with pytest.raises(asyncio.CancelledError):
            await identity
        assert store.load_svid() is None
        answer.set()
        await syncer.settle(5)

    asyncio.run(scenario())
    saved = store.load_svid()
    assert saved is not None
    assert saved.spiffe_id == svid.spiffe_id
    assert store.load_bundle() == [root]


def test_a_renewal_the_disk_cannot_save_is_used_from_memory(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    """The server has replaced the agent's SVID once it answers a renewal (the old one works
    only until it expires): a disk that is full or gone at that moment must not lose the new
    one too. Its OSError ended the renewal loop, and nothing renewed the agent SVID again."""
    store = AgentStore(tmp_path / "svid.der", tmp_path / "key.der", tmp_path / "bundle")
    store.key_path.mkdir()  # where the key goes, the write fails as on a full disk
    old, new = _svid(tmp_path), _svid(tmp_path)
    root = LocalCa(FakeClock(start=time.time())).cert

    async def renew(self: NodeClient, timeout: float = 30.0) -> tuple[AgentSvid, TrustBundle]:
        return new, TrustBundle("example.org", (root.public_bytes(Encoding.DER),))

    monkeypatch.setattr(NodeClient, "renew", renew)

    async def scenario() -> AgentSvid | None:
        settings = SyncSettings((Target("127.0.0.1:1", "127.0.0.1:1"),))
        syncer = Syncer(settings, store, Cache(), FakeClock(start=time.time()))
        syncer.set_bootstrap_roots(certs_to_pem([root]))
        await syncer._servers.first()
        syncer._install(old, None)
        await syncer.renew_once()
        await syncer.close()
        return syncer.agent_svid

    with caplog.at_level(logging.ERROR, logger="agent_attestor.sync"):
        assert asyncio.run(scenario()) is new
    assert "cannot save the renewed agent SVID" in caplog.text


def _unsaved_attestation(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> tuple[AgentStore, Syncer, AgentSvid]:
    """A join-token agent whose new SVID the disk refuses: a directory stands where the new key
    is written first (the tests run as root, whom a read-only chmod does not stop)."""
    store = AgentStore(tmp_path / "svid.der", tmp_path / "key.der", tmp_path / "bundle")
    (tmp_path / "key.der.next").mkdir()
    (tmp_path / "key.der.next" / "in-the-way").write_text("")
    svid = _svid(tmp_path)
    root = LocalCa(FakeClock(start=time.time())).cert

    async def attest(self: NodeClient, **_: object) -> tuple[AgentSvid, TrustBundle]:
        return svid, TrustBundle("example.org", (root.public_bytes(Encoding.DER),))

    monkeypatch.setattr(NodeClient, "attest", attest)
    settings = SyncSettings((Target("127.0.0.1:1", "127.0.0.1:1"),), join_token="t.secret")
    syncer = Syncer(settings, store, Cache(), FakeClock(start=time.time()))
    syncer.set_bootstrap_roots(certs_to_pem([root]))
    return store, syncer, svid


def _mend(tmp_path: Path) -> None:
    (tmp_path / "key.der.next" / "in-the-way").unlink()
    (tmp_path / "key.der.next").rmdir()


def test_a_stop_with_the_agent_svid_unsaved_says_the_next_start_cannot_use_it(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    store, syncer, svid = _unsaved_attestation(tmp_path, monkeypatch)

    async def scenario() -> None:
        assert await syncer.ensure_identity() is svid  # served from memory meanwhile
        await syncer.settle(1)  # the agent stops
        await syncer.close()

    with caplog.at_level(logging.ERROR, logger="agent_attestor.sync"):
        asyncio.run(scenario())
    assert store.load_svid() is None
    (stopping,) = [r for r in caplog.records if "stopping with" in r.getMessage()]
    assert "the next start cannot use it" in stopping.getMessage()
    assert "a new one" in stopping.getMessage()  # what a join-token agent will need
    assert str(store.svid_path) in str(getattr(stopping, "svid_file", ""))
    assert "secret" not in caplog.text


def test_an_unsaved_agent_svid_the_server_refuses_is_not_saved_once_the_disk_mends(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Evicted meanwhile, it is no identity for the next start to find."""
    store, syncer, _ = _unsaved_attestation(tmp_path, monkeypatch)

    async def scenario() -> None:
        await syncer.ensure_identity()
        await syncer._refused(grpc.StatusCode.PERMISSION_DENIED, "agent is not attested (evicted)")
        _mend(tmp_path)
        await syncer.settle(1)
        await syncer.close()

    asyncio.run(scenario())
    assert store.load_svid() is None


def test_a_join_token_is_not_sent_while_the_data_directory_refuses_writes(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """What it buys could not be saved: a restart would have neither the SVID nor the token."""
    store = AgentStore(tmp_path / "svid.der", tmp_path / "key.der", tmp_path / "bundle")
    (tmp_path / "svid.der.spending").mkdir()  # what a join token's attestation writes first
    (tmp_path / "svid.der.spending" / "in-the-way").write_text("")
    root = LocalCa(FakeClock(start=time.time())).cert
    sent: list[object] = []

    async def attest(self: NodeClient, **kwargs: object) -> tuple[AgentSvid, TrustBundle]:
        sent.append(kwargs)
        raise AssertionError("the token was sent")

    monkeypatch.setattr(NodeClient, "attest", attest)
    settings = SyncSettings((Target("127.0.0.1:1", "127.0.0.1:1"),), join_token="t.secret")
    syncer = Syncer(settings, store, Cache(), FakeClock(start=time.time()))
    syncer.set_bootstrap_roots(certs_to_pem([root]))
    with pytest.raises(StateNotWritableError) as caught:
        asyncio.run(syncer.ensure_identity())
    assert sent == []
    assert str(tmp_path / "svid.der.spending") in str(caught.value)
    assert "Is a directory" in str(caught.value)
    assert "secret" not in str(caught.value)


class _UndeletablePath(type(Path())):  # type: ignore[misc]
    """The agent SVID's file made immutable (chattr +i): it cannot be removed, though the files
    beside it can be written (the tests run as root, whom a chmod does not stop)."""

    def unlink(self, missing_ok: bool = False) -> None:
        if self.name != "svid.der":
            return super().unlink(missing_ok)
        raise PermissionError(1, "Operation not permitted", str(self))


def test_a_refused_agent_svid_the_disk_cannot_remove_is_not_used_again(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    """Its PermissionError ended the Sync loop, with no word said; left on disk and loaded
    again, the server would refuse it at every retry."""
    store = AgentStore(tmp_path / "svid.der", tmp_path / "key.der", tmp_path / "bundle")
    refused, new = _svid(tmp_path), _svid(tmp_path)
    store.save_svid(refused)
    store.svid_path = _UndeletablePath(store.svid_path)
    root = LocalCa(FakeClock(start=time.time())).cert

    async def attest(self: NodeClient, **_: object) -> tuple[AgentSvid, TrustBundle]:
        return new, TrustBundle("example.org", (root.public_bytes(Encoding.DER),))

    monkeypatch.setattr(NodeClient, "attest", attest)
    settings = SyncSettings((Target("127.0.0.1:1", "127.0.0.1:1"),), join_token="t.secret")
    syncer = Syncer(settings, store, Cache(), FakeClock(start=time.time()))
    syncer.set_bootstrap_roots(certs_to_pem([root]))

    async def scenario() -> AgentSvid:
        assert (await syncer.ensure_identity()).chain == refused.chain
        await syncer._refused(grpc.StatusCode.PERMISSION_DENIED, "agent is not attested (evicted)")
        again = await syncer.ensure_identity()
        await syncer.close()
        return again

    with caplog.at_level(logging.ERROR, logger="agent_attestor.sync"):
        assert asyncio.run(scenario()) is new
    (said,) = [
        r for r in caplog.records if "cannot remove the refused agent SVID" in r.getMessage()
    ]
    assert "Operation not permitted" in str(getattr(said, "error", ""))
    assert str(store.svid_path) in str(getattr(said, "svid_file", ""))


def test_the_agent_svid_is_renewed_when_the_wall_clock_steps_past_its_rotation_point(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The renewal waited out the seconds to its rotation point as read at the start: a wall
    clock stepped forward meanwhile (NTP after a boot with a wrong RTC, a VM resumed) let the
    agent SVID expire unrenewed, and with a join token spent the agent could not attest again."""
    monkeypatch.setattr(sync, "RECHECK", 0.05)
    clock = FakeClock(start=time.time())
    store = AgentStore(tmp_path / "svid.der", tmp_path / "key.der", tmp_path / "bundle")
    syncer = Syncer(SyncSettings((Target("127.0.0.1:1", "127.0.0.1:1"),)), store, Cache(), clock)
    svid = _svid(tmp_path)  # its rotation point is half an hour away
    renewed = asyncio.Event()

    async def renew_once() -> None:
        renewed.set()

    monkeypatch.setattr(syncer, "renew_once", renew_once)

    async def scenario() -> None:
        loop = asyncio.create_task(syncer._renew_loop(svid))
        await asyncio.sleep(0.1)
        assert not renewed.is_set()
        clock.advance(svid.not_after - svid.not_before - 60)  # a minute before it expires
        await asyncio.wait_for(renewed.wait(), 5)
        await asyncio.wait_for(loop, 5)

    asyncio.run(scenario())


class _KilledError(Exception):
    """The process killed (kill -9, power lost) right after a file reached the disk."""


def _killed_after(writes: int) -> Callable[[Path, bytes], None]:
    """agent_store's file write, the process killed (_KilledError) once `writes` are done."""
    real = agent_store._write_private
    done = 0

    def write_then_die(path: Path, data: bytes) -> None:
        nonlocal done
        real(path, data)
        done += 1
        if done == writes:
            raise _KilledError

    return write_then_die


@pytest.mark.parametrize("writes_done", [1, 2])
def test_a_crash_while_a_renewed_identity_is_saved_leaves_a_usable_one(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, writes_done: int
) -> None:
    """Key and chain are two files: the new key beside the old chain was an identity whose key
    does not fit, so the agent had to attest again, and a join token works once."""
    store = AgentStore(tmp_path / "svid.der", tmp_path / "key.der", tmp_path / "bundle")
    old, new = _svid(tmp_path), _svid(tmp_path)
    store.save_svid(old)
    monkeypatch.setattr(agent_store, "_write_private", _killed_after(writes_done))
    with pytest.raises(_KilledError):
        store.save_svid(new)
    monkeypatch.undo()
    loaded = AgentStore(store.svid_path, store.key_path, store.bundle_path).load_svid()
    assert loaded is not None
    assert loaded.chain in (old.chain, new.chain)
    saved = new if loaded.chain == new.chain else old
    assert _crypto.key_der(loaded.key) == _crypto.key_der(saved.key)


def test_a_renewal_whose_chain_the_disk_refuses_after_a_crash_mid_save_leaves_a_usable_one(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A kill between the renewed chain and its key's rename left that SVID's key under the
    `.next` name, and the next start loaded it so. Its renewal's save writes the new key there
    first: with the disk then refusing the new chain (full, an I/O error), the key of the SVID
    on disk was gone, the one in use held on as the one a restart would load (Syncer._adopt),
    and the restart found an identity whose key fits neither file: attested again, a join
    token spent, out for good."""
    store = AgentStore(tmp_path / "svid.der", tmp_path / "key.der", tmp_path / "bundle")
    old, crashed, renewed = _svid(tmp_path), _svid(tmp_path), _svid(tmp_path)
    store.save_svid(old)
    with monkeypatch.context() as patched:
        # The key and the chain written, the key not yet renamed.
        patched.setattr(agent_store, "_write_private", _killed_after(2))
        with pytest.raises(_KilledError):
            store.save_svid(crashed)
    started = AgentStore(store.svid_path, store.key_path, store.bundle_path)
    loaded = started.load_svid()
    assert loaded is not None
    assert loaded.chain == crashed.chain
    (tmp_path / "svid.der.tmp").mkdir()  # the chain's write refused, the key's taken
    (tmp_path / "svid.der.tmp" / "in-the-way").write_text("")
    with pytest.raises(IsADirectoryError):
        started.save_svid(renewed)
    again = AgentStore(store.svid_path, store.key_path, store.bundle_path).load_svid()
    assert again is not None
    assert again.chain == crashed.chain
    assert _crypto.key_der(again.key) == _crypto.key_der(crashed.key)
