"""The agent's saved state file: what a restart starts from, and when it refuses to."""

from __future__ import annotations

import dataclasses
import logging
import sqlite3
import stat
import time
from pathlib import Path

import pytest
from cryptography.hazmat.primitives import serialization

from agent_attestor import _crypto
from agent_attestor.cache import SyncPosition, SyncState
from agent_attestor.errors import DataFileUnreadableError
from agent_attestor.model import Entry, IssuedSvid, Selector, TrustBundle
from agent_attestor.state_store import StateChange, StateStore
from svid._clock import FakeClock
from tests.agent_attestor.pki import LocalCa

AGENT = "spiffe://example.org/svid/agent/join_token/t1"
POSITION = SyncPosition(AGENT, 42, "epoch-a")


@pytest.fixture
def ca() -> LocalCa:
    return LocalCa(FakeClock(start=time.time()))


def entry(n: int, **kw: object) -> Entry:
    fields: dict[str, object] = {
        "id": f"e{n}",
        "spiffe_id": f"spiffe://example.org/w/{n}",
        "selectors": frozenset({Selector("unix", f"uid:{n}"), Selector("k8s", "ns:a\tb\nc")}),
        **kw,
    }
    return Entry(**fields)  # type: ignore[arg-type]


def svid_for(ca: LocalCa, e: Entry, ttl: int = 300) -> IssuedSvid:
    key = _crypto.new_key()
    leaf = ca.sign_leaf(key.public_key(), e.spiffe_id, ttl)
    chain = leaf.public_bytes(serialization.Encoding.DER)
    svid = _crypto.issued_svid(e.id, chain, key, e.issuance_key)
    return dataclasses.replace(svid, received_at=ca.clock.now())


def shared(ca: LocalCa) -> SyncState:
    return SyncState(
        entries=(),
        bundle=ca.bundle(),
        federated={"other.org": TrustBundle("other.org", (b"other-ca",), sequence=3)},
        crl=(b"crl-1",),
        revocation_expiry={("x509_serial", "ab12"): 99, ("jwt_id", "j-1"): 77},
    )


def save_some(store: StateStore, ca: LocalCa) -> tuple[list[Entry], list[IssuedSvid]]:
    entries = [
        entry(1, hint="db", dns_names=("a.example", "b.example"), x509_svid_ttl=300),
        entry(2, created_at=1_700_000_000, revision=7, expires_at=1_900_000_000),
        entry(3),
    ]
    svids = [svid_for(ca, e) for e in entries[:2]]
    store.write(StateChange(POSITION, tuple(entries), svids=tuple(svids), shared=shared(ca)))
    return entries, svids


def test_a_saved_state_comes_back_whole(tmp_path: Path, ca: LocalCa) -> None:
    store = StateStore(tmp_path / "agent_state.sqlite3")
    entries, svids = save_some(store, ca)
    store.close()
    saved = StateStore(store.path).load(AGENT, "example.org", ca.clock.now())
    assert saved is not None
    assert saved.position == POSITION
    assert sorted(saved.state.entries, key=lambda e: e.id) == entries
    assert sorted(saved.svids, key=lambda s: s.entry_id) == svids
    want = shared(ca)
    assert saved.state.bundle == want.bundle
    assert dict(saved.state.federated) == dict(want.federated)
    assert saved.state.crl == want.crl
    assert dict(saved.state.revocation_expiry) == dict(want.revocation_expiry)
    assert saved.state.revoked_serials == frozenset({"ab12"})
    assert saved.state.revoked_jtis == frozenset({"j-1"})
    assert (saved.state.revision, saved.state.epoch) == (42, "epoch-a")


def test_a_file_of_schema_1_is_restored_but_caught_up_by_a_snapshot(
    tmp_path: Path, ca: LocalCa
) -> None:
    """Schema 1 saved revocations without their owner: its entries and SVIDs are restored
    (nothing minted again), its revision is not, so the first Sync is a snapshot that brings
    the owners a delta never repeats. The next write stamps the current schema."""
    store = StateStore(tmp_path / "s.sqlite3")
    entries, svids = save_some(store, ca)
    store.close()
    with sqlite3.connect(store.path) as db:
        db.execute("UPDATE meta SET value = 1 WHERE key = 'schema'")
    reopened = StateStore(store.path)
    saved = reopened.load(AGENT, "", ca.clock.now())
    assert saved is not None
    assert saved.position == SyncPosition(AGENT, 0, "")
    assert (saved.state.revision, saved.state.epoch) == (0, "")
    assert sorted(saved.state.entries, key=lambda e: e.id) == entries
    assert sorted(saved.svids, key=lambda s: s.entry_id) == svids
    reopened.write(StateChange(SyncPosition(AGENT, 43, "epoch-a"), shared=shared(ca)))
    again = reopened.load(AGENT, "", ca.clock.now())
    assert again is not None
    assert again.position.revision == 43


def test_later_batches_change_only_their_rows(tmp_path: Path, ca: LocalCa) -> None:
    store = StateStore(tmp_path / "s.sqlite3")
    entries, _ = save_some(store, ca)
    renewed = svid_for(ca, entries[1])
    moved = SyncPosition(AGENT, 50, "epoch-a")
    store.write(StateChange(moved, removed=("e1",), svids=(renewed,)))
    store.write(StateChange(moved, entries=(entry(4),), svids_removed=("e3",)))
    saved = store.load(AGENT, "", ca.clock.now())
    assert saved is not None
    assert saved.position.revision == 50
    assert sorted(e.id for e in saved.state.entries) == ["e2", "e3", "e4"]
    # e1 went with its entry; e2's SVID is the renewed one; the bundle is still there.
    assert [s.serial_hex for s in saved.svids] == [renewed.serial_hex]
    assert saved.state.bundle == ca.bundle()


def test_the_file_and_its_side_files_are_owner_only(tmp_path: Path, ca: LocalCa) -> None:
    store = StateStore(tmp_path / "data" / "s.sqlite3")
    save_some(store, ca)
    files = [p for p in store.path.parent.iterdir() if p.name.startswith("s.sqlite3")]
    assert {p.name for p in files} >= {"s.sqlite3", "s.sqlite3-wal"}  # open: WAL in use
    for path in files:
        assert stat.S_IMODE(path.stat().st_mode) == 0o600, path.name
    assert stat.S_IMODE(store.path.parent.stat().st_mode) == 0o700


def test_expired_and_nearly_expired_svids_are_not_restored(tmp_path: Path, ca: LocalCa) -> None:
    store = StateStore(tmp_path / "s.sqlite3")
    entries = [entry(1), entry(2), entry(3)]
    svids = [svid_for(ca, e, ttl=100) for e in entries]
    store.write(StateChange(POSITION, tuple(entries), svids=tuple(svids), shared=shared(ca)))
    life = svids[0].not_after - svids[0].not_before
    # Past the latest rotation point but a tenth of its life left: still worth serving.
    just_enough = svids[0].not_after - 0.1 * life
    saved = store.load(AGENT, "", just_enough)
    assert saved is not None
    assert len(saved.svids) == 3
    saved = store.load(AGENT, "", just_enough + 1)
    assert saved is not None
    assert saved.svids == ()
    assert len(saved.state.entries) == 3  # the entries stay: minted again
    saved = store.load(AGENT, "", svids[0].not_after + 1)
    assert saved is not None
    assert saved.svids == ()


def test_an_svid_issued_for_an_older_version_of_its_entry_is_not_restored(
    tmp_path: Path, ca: LocalCa
) -> None:
    store = StateStore(tmp_path / "s.sqlite3")
    old = entry(1)
    store.write(StateChange(POSITION, (old,), svids=(svid_for(ca, old),), shared=shared(ca)))
    store.write(StateChange(POSITION, (dataclasses.replace(old, x509_svid_ttl=60),)))
    saved = store.load(AGENT, "", ca.clock.now())
    assert saved is not None
    assert saved.svids == ()


@pytest.mark.parametrize(
    ("agent_id", "trust_domain"),
    [
        ("spiffe://example.org/svid/agent/join_token/other", ""),
        ("", ""),
        (AGENT, "other.org"),
    ],
)
def test_state_of_another_agent_or_trust_domain_is_dropped(
    tmp_path: Path,
    ca: LocalCa,
    agent_id: str,
    trust_domain: str,
    caplog: pytest.LogCaptureFixture,
) -> None:
    store = StateStore(tmp_path / "s.sqlite3")
    save_some(store, ca)
    with caplog.at_level(logging.WARNING, logger="agent_attestor.state_store"):
        assert store.load(agent_id, trust_domain, ca.clock.now()) is None
    assert "starting afresh" in caplog.text
    assert not store.path.exists()  # its keys are of no use to this agent


@pytest.mark.parametrize(
    "damage", ["garbage", "truncated", "zeroed-page", "index-page", "empty-db", "schema"]
)
def test_a_damaged_file_is_dropped_and_the_agent_starts_afresh(
    tmp_path: Path, ca: LocalCa, damage: str, caplog: pytest.LogCaptureFixture
) -> None:
    store = StateStore(tmp_path / "s.sqlite3")
    save_some(store, ca)
    store.close()  # checkpointed: everything is in the main file
    data = store.path.read_bytes()
    if damage == "garbage":
        store.path.write_bytes(b"this is not SQLite" * 100)
    elif damage == "truncated":
        store.path.write_bytes(data[: len(data) // 2 + 100])
    elif damage == "zeroed-page":
        store.path.write_bytes(data[:4096] + bytes(4096) + data[8192:])
    elif damage == "index-page":
        # Reading the tables would not notice (scans skip indexes); the next write would fail.
        with sqlite3.connect(store.path) as db:
            (root,) = db.execute(
                "SELECT rootpage FROM sqlite_master WHERE tbl_name = 'svids' AND type = 'index'"
            ).fetchone()
            size = db.execute("PRAGMA page_size").fetchone()[0]
        start = (root - 1) * size
        store.path.write_bytes(data[:start] + b"\xff" * size + data[start + size :])
    elif damage == "empty-db":
        store.path.unlink()
        sqlite3.connect(store.path).close()
    else:
        with sqlite3.connect(store.path) as db:
            db.execute("UPDATE meta SET value = 99 WHERE key = 'schema'")
    with caplog.at_level(logging.WARNING, logger="agent_attestor.state_store"):
        assert StateStore(store.path).load(AGENT, "", ca.clock.now()) is None
    assert "starting afresh" in caplog.text
    assert not store.path.exists()
    # And the next run saves afresh in its place.
    fresh = StateStore(store.path)
    save_some(fresh, ca)
    assert fresh.load(AGENT, "", ca.clock.now()) is not None


def test_a_refused_agent_keeps_no_state_to_restore(tmp_path: Path, ca: LocalCa) -> None:
    store = StateStore(tmp_path / "s.sqlite3")
    entries, _ = save_some(store, ca)
    store.write(
        StateChange(
            SyncPosition(AGENT, 0, ""),
            removed=tuple(e.id for e in entries),
            shared_cleared=True,
        )
    )
    assert store.load(AGENT, "", ca.clock.now()) is None


def test_no_file_is_no_state_and_no_warning(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    store = StateStore(tmp_path / "s.sqlite3")
    with caplog.at_level(logging.INFO, logger="agent_attestor.state_store"):
        assert store.load(AGENT, "", time.time()) is None
    assert caplog.records == []
    assert not store.path.exists()


def _assert_a_link_refused(store: StateStore, ca: LocalCa, link: Path, match: str) -> None:
    """A link planted at `link` to a file of someone else's: a save is refused with `match`,
    and that file is neither written nor chmodded."""
    victim = link.parent / "victim"
    victim.write_bytes(b"")
    victim.chmod(0o644)
    link.symlink_to(victim)
    with pytest.raises(DataFileUnreadableError, match=match):
        save_some(store, ca)
    assert victim.read_bytes() == b""
    assert stat.S_IMODE(victim.stat().st_mode) == 0o644


def test_a_link_planted_at_the_state_files_name_is_refused_not_written_through(
    tmp_path: Path, ca: LocalCa
) -> None:
    # The write opened the name as found: the file a link named was chmodded 0600 and SQLite
    # wrote the agent's state (its keys) into it.
    store = StateStore(tmp_path / "s.sqlite3")
    _assert_a_link_refused(store, ca, store.path, "it is a symbolic link, not a regular file")


def test_a_wal_left_wider_by_an_earlier_run_is_made_owner_only(tmp_path: Path, ca: LocalCa) -> None:
    # SQLite gives its log the database's mode only when it creates it: a 0644 log left by an
    # earlier release kept 0644 while the agent wrote its private keys into it.
    # (SQLite itself narrows an empty one: the log left is a real one, with frames.)
    store = StateStore(tmp_path / "s.sqlite3")
    wal = tmp_path / "s.sqlite3-wal"
    earlier = sqlite3.connect(store.path)
    earlier.execute("PRAGMA journal_mode = WAL")
    earlier.execute("CREATE TABLE t (x)")
    earlier.execute("INSERT INTO t VALUES (1)")
    earlier.commit()
    frames = wal.read_bytes()
    earlier.close()  # checkpoints and removes the log: put it back as the crash left it
    wal.write_bytes(frames)
    wal.chmod(0o644)
    assert frames
    save_some(store, ca)
    assert stat.S_IMODE(wal.stat().st_mode) == 0o600


def test_a_link_planted_at_the_wals_name_is_refused_not_written_through(
    tmp_path: Path, ca: LocalCa
) -> None:
    store = StateStore(tmp_path / "s.sqlite3")
    _assert_a_link_refused(store, ca, tmp_path / "s.sqlite3-wal", "symbolic link")
