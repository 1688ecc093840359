"""After a restart the agent verifies its server with the newest roots it holds: the saved
state's bundle where bundle.der is older (a Sync message's bundle the disk refused to write to
bundle.der, the agent killed before its retry), bundle.der's where the state file is behind it.
Never older roots: a root the server dropped must not come back."""

from __future__ import annotations

import asyncio
import errno
import os
import threading
import time
from collections.abc import Callable
from dataclasses import replace
from pathlib import Path

import pytest
from cryptography.hazmat.primitives.asymmetric import ec

from agent_attestor import agent_store
from agent_attestor.agent_store import AgentStore, AgentSvid
from agent_attestor.app import AgentApp
from agent_attestor.cache import SyncPosition, SyncState
from agent_attestor.model import TrustBundle
from agent_attestor.state_store import StateChange, StateStore
from svid._clock import FakeClock
from svid._der import certs_to_pem, parse_der_certs
from svid._durable import replace_durably
from tests.agent_attestor.data_dir import config_under
from tests.agent_attestor.pki import LocalCa

ME = "spiffe://example.org/svid/agent/join_token/me"


def _bundle(sequence: int, *cas: LocalCa) -> TrustBundle:
    authorities = tuple(a for ca in cas for a in ca.bundle().x509_authorities)
    return replace(cas[0].bundle(), x509_authorities=authorities, sequence=sequence)


def _pem(*cas: LocalCa) -> bytes:
    return certs_to_pem([ca.cert for ca in cas])


def _files_only(tmp_path: Path) -> AgentStore:
    """The agent's files in `tmp_path`, without the rest of a data dir."""
    return AgentStore(tmp_path / "svid.der", tmp_path / "key.der", tmp_path / "bundle.der")


def _app(
    tmp_path: Path,
    on_disk: TrustBundle,
    in_state: TrustBundle,
    *,
    sequence_kept: bool = True,
    svid_expired: bool = False,
    then: Callable[[AgentStore], None] | None = None,
) -> AgentApp:
    """A data dir as a previous run left it: its identity, bundle.der and the state file."""
    config = config_under(tmp_path)
    clock = FakeClock(start=time.time())
    issuer = LocalCa(clock)
    key = ec.generate_private_key(ec.SECP256R1())
    store = AgentStore(config.agent_svid_path, config.agent_key_path, config.bundle_path)
    store.save_svid(AgentSvid(ME, (issuer.sign_leaf(key.public_key(), ME),), key))
    store.save_bundle(on_disk.x509_authorities, on_disk.sequence)
    if not sequence_kept:  # as an agent before sequences were kept left it
        store.sequence_path.unlink()
    if then is not None:  # the saves after it
        then(store)
    StateStore(config.state_path).write(
        StateChange(SyncPosition(ME, 9, "ep"), shared=SyncState((), in_state))
    )
    if svid_expired:  # the agent away past its SVID's life
        clock.advance(issuer.ttl + 60)
    return AgentApp(config, clock)


def test_a_bundle_file_older_than_the_state_gives_way_to_the_states_roots(
    tmp_path: Path,
) -> None:
    clock = FakeClock(start=time.time())
    old, new = LocalCa(clock), LocalCa(clock)
    # bundle.der kept the old CA's roots: the rotation's bundles (the new root beside the old,
    # then the new alone) were refused by the disk and reached the state file only.
    app = _app(tmp_path, on_disk=_bundle(1, old), in_state=_bundle(3, new))
    assert app.syncer._root_pem() == _pem(new)
    # ...and bundle.der is brought up to them by the save loop's first save.
    asyncio.run(app.syncer._keeper.save_unsaved())
    store = app.store
    assert store.load_bundle() == [new.cert]
    assert store.bundle_sequence() == 3


def test_a_bundle_file_newer_than_the_state_is_kept(tmp_path: Path) -> None:
    clock = FakeClock(start=time.time())
    old, new = LocalCa(clock), LocalCa(clock)
    # The state file saves a second behind: killed in it, it still holds the rotation's
    # bundle with the old root, which the server had dropped by bundle.der's save.
    app = _app(tmp_path, on_disk=_bundle(3, new), in_state=_bundle(2, old, new))
    assert app.syncer._root_pem() == _pem(new)
    assert parse_der_certs(app.config.bundle_path.read_bytes()) == [new.cert]


def test_a_bundle_file_of_unknown_age_is_kept(tmp_path: Path) -> None:
    clock = FakeClock(start=time.time())
    old, new = LocalCa(clock), LocalCa(clock)
    # Saved by an agent that kept no sequence: which is newer cannot be told, and the file
    # was what such an agent verified with (no root it trusted comes back).
    app = _app(tmp_path, on_disk=_bundle(3, new), in_state=_bundle(4, old), sequence_kept=False)
    assert app.syncer._root_pem() == _pem(new)


def test_the_bundle_sequence_survives_a_refused_bundle_write(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    clock = FakeClock(start=time.time())
    old, new = LocalCa(clock), LocalCa(clock)
    store = _files_only(tmp_path)
    store.save_bundle(_bundle(1, old).x509_authorities, 1)

    def full_disk(source: Path, target: Path) -> None:
        if target == store.bundle_path:  # bundle.der's rename refused (or the agent killed)
            raise OSError(errno.ENOSPC, "No space left on device")
        replace_durably(source, target)

    monkeypatch.setattr(agent_store, "replace_durably", full_disk)
    with pytest.raises(OSError, match="No space"):
        store.save_bundle(_bundle(2, new).x509_authorities, 2)
    # The sequence file, written first, names the old file too: still known as sequence 1,
    # never taken for the new one's.
    assert store.load_bundle() == [old.cert]
    assert store.bundle_sequence() == 1
    monkeypatch.setattr(agent_store, "replace_durably", replace_durably)
    store.save_bundle(_bundle(2, new).x509_authorities, 2)
    assert store.bundle_sequence() == 2


def test_a_state_whose_roots_do_not_parse_leaves_the_bundle_file(tmp_path: Path) -> None:
    clock = FakeClock(start=time.time())
    ca = LocalCa(clock)
    # A damaged row the state file's check lets through: used as the roots, every connect
    # would fail to parse them, and the Sync task end on an error it does not catch.
    damaged = replace(_bundle(5, ca), x509_authorities=(b"\x30\x03not a certificate",))
    app = _app(tmp_path, on_disk=_bundle(1, ca), in_state=damaged)
    assert app.syncer._root_pem() == _pem(ca)


def test_an_agent_back_past_its_svids_life_attests_with_the_states_newer_roots(
    tmp_path: Path,
) -> None:
    clock = FakeClock(start=time.time())
    old, new = LocalCa(clock), LocalCa(clock)
    app = _app(tmp_path, on_disk=_bundle(1, old), in_state=_bundle(3, new), svid_expired=True)
    # Its entries and SVIDs go (a new attestation), its roots verify the server it attests to.
    assert not app.config.state_path.exists()
    assert app.syncer._root_pem() == _pem(new)


@pytest.mark.parametrize(
    "damage", [b"\xff\xfe", b"[" * 100_000, b'{"a": true}', b"[1, 2]", b"", None]
)
def test_a_damaged_sequence_file_leaves_the_bundle_files_age_unknown(
    tmp_path: Path, damage: bytes | None
) -> None:
    clock = FakeClock(start=time.time())
    old, new = LocalCa(clock), LocalCa(clock)
    store = _files_only(tmp_path)
    store.save_bundle(_bundle(1, old).x509_authorities, 1)
    if damage is None:  # something else at its name
        store.sequence_path.unlink()
        store.sequence_path.mkdir()
    else:
        store.sequence_path.write_bytes(damage)
    assert store.bundle_sequence() is None  # unknown: bundle.der is kept at a start
    store.save_bundle(_bundle(2, new).x509_authorities, 2)  # and saves go on
    assert store.load_bundle() == [new.cert]


def test_a_sequence_file_the_disk_refused_never_dates_the_bundle_file_by_an_older_save(
    tmp_path: Path,
) -> None:
    clock = FakeClock(start=time.time())
    kept, dropped = LocalCa(clock), LocalCa(clock)

    def saves(store: AgentStore) -> None:
        # A root added (sequence 6), then removed again (7: the roots of 5 once more), the
        # sequence file refusing that last write (something at its temp file's name).
        store.save_bundle(_bundle(6, kept, dropped).x509_authorities, 6)
        Path(f"{store.sequence_path}.tmp").mkdir()
        store.save_bundle(_bundle(7, kept).x509_authorities, 7)

    # The state file, a second behind, holds sequence 6. The stale sequence file dated
    # bundle.der's roots (sequence 7) by their first save, 5: older than the state's, which
    # then verified the server, the removed root with them.
    app = _app(tmp_path, on_disk=_bundle(5, kept), in_state=_bundle(6, kept, dropped), then=saves)
    assert app.store.load_bundle() == [kept.cert]
    assert app.store.bundle_sequence() in (None, 7)
    assert app.syncer._root_pem() == _pem(kept)


def test_a_sequence_file_neither_written_nor_removed_leaves_the_bundle_file_as_it_was(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    clock = FakeClock(start=time.time())
    kept, dropped = LocalCa(clock), LocalCa(clock)
    store = _files_only(tmp_path)
    store.save_bundle(_bundle(5, kept).x509_authorities, 5)
    store.save_bundle(_bundle(6, kept, dropped).x509_authorities, 6)
    write = agent_store._write_private

    def refused(path: Path, data: bytes) -> None:
        if path == store.sequence_path:
            raise OSError(errno.EIO, "Input/output error")
        write(path, data)

    real_unlink = Path.unlink

    def unlink(self: Path, missing_ok: bool = False) -> None:
        if self == store.sequence_path:
            raise OSError(errno.EROFS, "Read-only file system")
        real_unlink(self, missing_ok=missing_ok)

    monkeypatch.setattr(agent_store, "_write_private", refused)
    monkeypatch.setattr(Path, "unlink", unlink)
    with pytest.raises(OSError, match="Read-only"):
        store.save_bundle(_bundle(7, kept).x509_authorities, 7)
    # Written, bundle.der would have been dated 5 by the file left: it keeps sequence 6's.
    assert store.load_bundle() == [kept.cert, dropped.cert]
    assert store.bundle_sequence() == 6


def test_a_state_of_the_replaced_servers_lineage_never_outranks_the_rebuilt_servers_bundle(
    tmp_path: Path,
) -> None:
    clock = FakeClock(start=time.time())
    replaced, rebuilt = LocalCa(clock), LocalCa(clock)
    # The server rebuilt (a new datastore: its sequences start again) with a new CA, as the
    # README says to when its CA is replaced outright; its x509pop agent, given the new
    # bundle, attests anew under the same agent ID and saves the new roots, sequence 1.
    app = _app(tmp_path, on_disk=_bundle(12, replaced), in_state=_bundle(12, replaced))
    own = app.store.load_svid()
    assert own is not None
    asyncio.run(app.syncer._keeper.persist(own, _bundle(1, rebuilt), "attested"))
    # Killed in the second before the state writer's save (or the state file refused): the
    # state still holds the replaced server's bundle, sequence 12 > 1. Taken for the newer,
    # its roots, the replaced CA's alone, verified the server at every start from then on.
    again = AgentApp(app.config, FakeClock(start=time.time()))
    assert again.syncer._root_pem() == _pem(rebuilt)


def test_the_sequence_floor_lasts_until_the_new_lineage_passes_it(tmp_path: Path) -> None:
    clock = FakeClock(start=time.time())
    old, new = LocalCa(clock), LocalCa(clock)
    store = _files_only(tmp_path)
    store.save_bundle(_bundle(12, old).x509_authorities, 12)
    store.save_bundle(_bundle(13, old, new).x509_authorities, 13)
    assert store.sequence_floor() is None  # sequences going up: no floor
    store.save_bundle(_bundle(1, new).x509_authorities, 1)  # a restored datastore's
    assert store.sequence_floor() == 13
    store.save_bundle(_bundle(2, old, new).x509_authorities, 2, seen=13)
    assert store.sequence_floor() == 13
    store.save_bundle(_bundle(14, old).x509_authorities, 14, seen=13)
    assert store.sequence_floor() is None
    assert store.bundle_sequence() == 14


def test_a_fifo_at_the_sequence_files_name_leaves_the_age_unknown_not_the_start_hung(
    tmp_path: Path,
) -> None:
    clock = FakeClock(start=time.time())
    old, new = LocalCa(clock), LocalCa(clock)
    store = _files_only(tmp_path)
    store.save_bundle(_bundle(1, old).x509_authorities, 1)
    store.sequence_path.unlink()
    os.mkfifo(store.sequence_path)
    ages: list[int | None] = []
    reader = threading.Thread(target=lambda: ages.append(store.bundle_sequence()), daemon=True)
    reader.start()
    reader.join(timeout=2)
    if reader.is_alive():  # opening it waited for a writer, as the start did, for good
        os.close(os.open(store.sequence_path, os.O_WRONLY | os.O_NONBLOCK))
        reader.join()
        pytest.fail("reading bundle.der.sequence hung on a FIFO")
    assert ages == [None]  # unknown: bundle.der is kept at a start
    store.save_bundle(_bundle(2, new).x509_authorities, 2)  # and saves go on
    assert store.load_bundle() == [new.cert]


def test_a_bundle_file_an_older_agent_rewrote_is_of_unknown_age(tmp_path: Path) -> None:
    clock = FakeClock(start=time.time())
    kept, dropped = LocalCa(clock), LocalCa(clock)

    def saves(store: AgentStore) -> None:
        store.save_bundle(_bundle(6, kept, dropped).x509_authorities, 6)
        time.sleep(0.02)  # later, past the clock's tick the file times are taken from
        # Downgraded, an agent before sequences were kept saves sequence 7 (the root removed
        # again: sequence 5's roots once more) as it always did, leaving the sequence file.
        agent_store.write_file(store.bundle_path, _bundle(7, kept).x509_authorities[0], 0o600)

    # Upgraded again, killed in the state writer's second: the state holds sequence 6. The
    # file left dated bundle.der's roots by their first save, 5, older than the state's, whose
    # roots then verified the server, the removed root with them.
    app = _app(tmp_path, on_disk=_bundle(5, kept), in_state=_bundle(6, kept, dropped), then=saves)
    assert app.store.bundle_sequence() is None
    assert app.syncer._root_pem() == _pem(kept)
