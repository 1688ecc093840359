"""The CA manager on a SQLite datastore put back from a backup older than the keys in use: it
takes those keys back (their files and records), rather than make a CA no agent trusts."""

from __future__ import annotations

import json
import os
import shutil
import sqlite3
import uuid
from collections.abc import Iterator
from contextlib import closing
from dataclasses import dataclass, replace
from pathlib import Path

import pytest
from cryptography import x509
from cryptography.hazmat.primitives.asymmetric import ec

from server.ca.adoption import (
    LINEAGE_DEPTH,
    KeyRecord,
    decode_record,
    encode_record,
    endorsed_by_known,
    plan_adoption,
)
from server.ca.keys import EC_P256, EC_P384, RSA_2048, KeyStore, generate_key, spki_der
from server.ca.manager import CaConfig, CaManager
from server.datastore.records import ACTIVE, JWT_KIND, PREPARED, RETIRED, X509_KIND, KeySlot
from server.datastore.sqlite import SqliteDataStore
from svid._clock import FakeClock
from svid._jose import public_key_thumbprint_kid
from svid._spiffe_id import SpiffeId
from tests.log_lines import log_lines
from tests.server.conftest import TRUST_DOMAIN, openssl_verify
from tests.server.test_ca_manager import _ca_cert, _write

WORKLOAD = SpiffeId.parse("spiffe://example.org/web")


def _ANY(record: KeyRecord, known: object) -> bool:
    return True  # plan_adoption's schedule alone: every record taken as endorsed


@dataclass
class Site:
    """A lone server's datastore file and keys, and the means to back it up and restore it."""

    path: Path
    keys: KeyStore
    clock: FakeClock
    store: SqliteDataStore

    def manager(self, config: CaConfig | None = None) -> CaManager:
        config = config or CaConfig(TRUST_DOMAIN)
        manager = CaManager(config, self.store, self.keys, self.clock)
        manager.initialize()
        return manager

    def backup(self) -> Path:
        copy = self.path.with_name("backup.sqlite3")
        with closing(sqlite3.connect(self.path)) as src, closing(sqlite3.connect(copy)) as dst:
            src.backup(dst)
        return copy

    def restore(self, copy: Path) -> None:
        self.store.close()
        for suffix in ("", "-wal", "-shm"):
            Path(f"{self.path}{suffix}").unlink(missing_ok=True)
        shutil.copyfile(copy, self.path)
        self.store = SqliteDataStore(self.path, self.clock)


@pytest.fixture
def site(tmp_path: Path, clock: FakeClock) -> Iterator[Site]:
    path = tmp_path / "datastore.sqlite3"
    site = Site(path, KeyStore(tmp_path / "keys"), clock, SqliteDataStore(path, clock))
    yield site
    site.store.close()


def _rotate_until(manager: CaManager, clock: FakeClock, made_since: int, newest: str) -> None:
    """Tick the schedule until `made_since` X.509 keys were made after now, the newest of them
    `newest` (prepared, or active with its predecessors retired or dropped)."""
    before = {slot.slot_id for slot in manager.key_slots(X509_KIND)}
    made: set[str] = set()  # dropped ones too
    while True:
        new = [s for s in manager.key_slots(X509_KIND) if s.slot_id not in before]
        made.update(s.slot_id for s in new)
        if len(made) >= made_since and new[-1].status == newest:
            return
        clock.set(manager.next_rotation_check())
        manager.rotate()


def _leaf(manager: CaManager) -> x509.Certificate:
    key = ec.generate_private_key(ec.SECP256R1())
    return manager.x509_signer().sign_svid(key.public_key(), WORKLOAD, 300)[0]


def test_a_datastore_restored_from_before_the_ca_key_in_use_takes_that_key_back(
    site: Site, clock: FakeClock, tmp_path: Path
) -> None:
    """The backup journals only the first CA; the key in use was made (and activated) after
    it. Restored, the server signed with a new CA at once, and every agent holding the bundle
    of the key in use failed TLS with it. It must sign on with the key in use."""
    first = site.manager()
    copy = site.backup()
    _rotate_until(first, clock, made_since=1, newest=ACTIVE)
    in_use = first.x509_signer().ca_certificate
    jwt_kid = first.jwt_signer().kid
    agent_leaf = _leaf(first)  # an agent's SVID, checked against the bundle it holds
    key_files = site.keys.slot_ids()

    site.restore(copy)
    again = site.manager()
    assert again.x509_signer().ca_certificate == in_use
    assert again.jwt_signer().kid == jwt_kid
    assert site.keys.slot_ids() == key_files  # no key of its own made
    held = first.bundle().x509_authorities
    served = openssl_verify(tmp_path, _leaf(again), held, at=clock.now())
    assert served.returncode == 0, served.stderr  # the agents' bundle verifies what it signs
    kept = openssl_verify(tmp_path, agent_leaf, again.bundle().x509_authorities, at=clock.now())
    assert kept.returncode == 0, kept.stderr  # and its bundle what the agents hold
    statuses = {s.slot_id: s.status for s in site.store.list_key_slots(X509_KIND)}
    assert sorted(statuses.values()) == [ACTIVE, RETIRED]


def test_keys_made_two_rotations_after_the_backup_come_back_retired_and_active(
    site: Site, clock: FakeClock
) -> None:
    """The first CA of the backup expired meanwhile; of the two keys made since, the older,
    retired since, comes back retired (in the bundle for the SVIDs it signed, signing no
    more), the newer active."""
    first = site.manager()
    copy = site.backup()
    _rotate_until(first, clock, made_since=2, newest=ACTIVE)
    in_use = first.x509_signer().ca_certificate
    bundle = set(first.bundle().x509_authorities)
    journal = {k: {s.slot_id: s.status for s in first.key_slots(k)} for k in (X509_KIND, JWT_KIND)}

    site.restore(copy)
    again = site.manager()
    assert again.x509_signer().ca_certificate == in_use
    assert set(again.bundle().x509_authorities) == bundle
    restored = {k: {s.slot_id: s.status for s in again.key_slots(k)} for k in journal}
    assert restored == journal
    assert RETIRED in journal[X509_KIND].values()


def test_a_key_restored_before_its_activation_waits_for_its_time(
    site: Site, clock: FakeClock
) -> None:
    """A backup taken before the next key was prepared, restored while it still waits: the
    restored server must not prepare another (the agents already hold this one)."""
    first = site.manager()
    copy = site.backup()
    _rotate_until(first, clock, made_since=1, newest=PREPARED)
    prepared = {s.slot_id for s in first.key_slots(X509_KIND)}

    site.restore(copy)
    again = site.manager()
    assert {s.slot_id for s in again.key_slots(X509_KIND)} == prepared
    assert again.bundle().x509_authorities == first.bundle().x509_authorities


def test_key_files_of_another_journal_are_not_taken(
    site: Site, clock: FakeClock, tmp_path: Path
) -> None:
    """A data_dir that also served another datastore holds that CA's keys, made later than
    this journal's newest but from none of its slots: they stay files, unused."""
    site.manager()
    other_path = tmp_path / "other.sqlite3"
    clock.advance(60)
    with closing(SqliteDataStore(other_path, clock)) as other:
        CaManager(CaConfig(TRUST_DOMAIN), other, site.keys, clock).initialize()
    files = site.keys.slot_ids()
    journal = site.store.list_key_slots(X509_KIND)
    site.manager()
    assert site.store.list_key_slots(X509_KIND) == journal
    assert site.keys.slot_ids() == files


@pytest.mark.parametrize("tamper", ["other key", "group-writable record", "no record"])
def test_a_key_file_not_matching_its_record_as_made_is_not_taken(
    site: Site, clock: FakeClock, tamper: str
) -> None:
    """A key file put in keys/ becomes no CA: its record must be this server's own file, and
    name the certificate of that very key."""
    first = site.manager()
    copy = site.backup()
    _rotate_until(first, clock, made_since=1, newest=ACTIVE)
    new = first.x509_signer()
    slot_id = next(s.slot_id for s in first.key_slots(X509_KIND) if s.status == ACTIVE)
    if tamper == "other key":
        site.keys.save(slot_id, ec.generate_private_key(ec.SECP256R1()))
    elif tamper == "group-writable record":
        os.chmod(site.keys.record_path(slot_id), 0o664)
    else:
        site.keys.record_path(slot_id).unlink()

    site.restore(copy)
    again = site.manager()
    assert again.x509_signer().ca_certificate != new.ca_certificate
    assert slot_id not in {s.slot_id for s in site.store.list_key_slots(X509_KIND)}
    assert site.keys.exists(slot_id)  # kept, as any key file no slot names


@pytest.mark.parametrize("endorsement", ["none", "a key posing as the journal's"])
def test_a_planted_key_whose_record_names_the_journal_is_not_taken(
    site: Site, clock: FakeClock, endorsement: str
) -> None:
    """Slot ids are public (each CA certificate names its own): a key file and a record naming
    the journal's slots in its lineage, newer than all of them, put in keys/ by whoever can
    write there without reading the keys. Taken back on lineage alone, it became the JWT
    signing key (or, with no upstream CA, a self-signed CA) at the next start. Its record must
    carry signatures back to a key the journal holds."""
    site.manager()
    journal = site.store.list_key_slots(JWT_KIND)
    clock.advance(60)
    now = int(clock.now())
    key = generate_key()
    public = key.public_key()
    slot_id = uuid.uuid4().hex
    slot = KeySlot(
        slot_id,
        JWT_KIND,
        "",
        spki_der(public),
        public_key_thumbprint_kid(public),
        now,
        now + 3600,
        now,
    )
    lineage = [s.slot_id for s in journal]
    if endorsement == "none":
        record = encode_record(slot, lineage)
    else:  # signed by a key of the attacker's, under the id of the journal's active one
        impostor = generate_key()
        posing = KeySlot(
            journal[0].slot_id, JWT_KIND, ACTIVE, spki_der(impostor.public_key()), "k", 0, 0, 0
        )
        record = encode_record(slot, lineage, (posing, impostor, None))
    site.keys.save(slot_id, key)
    site.keys.save_record(slot_id, record)
    site.manager()
    assert {s.slot_id for s in site.store.list_key_slots(JWT_KIND)} == {s.slot_id for s in journal}


def test_an_emptied_datastore_takes_no_key_back(site: Site, clock: FakeClock) -> None:
    """No slot at all is a new start (`--new-datastore`), not a restore: a new CA."""
    first = site.manager()
    old = first.x509_signer().ca_certificate
    site.store.delete_key_slots(
        [s.slot_id for k in (X509_KIND, JWT_KIND) for s in first.key_slots(k)]
    )
    again = site.manager()
    assert again.x509_signer().ca_certificate != old


def test_a_dropped_key_takes_its_record_with_it(site: Site, clock: FakeClock) -> None:
    first = site.manager()
    old = [s.slot_id for s in first.key_slots(X509_KIND)]
    _rotate_until(first, clock, made_since=2, newest=ACTIVE)
    assert not any(site.keys.record_path(slot_id).exists() for slot_id in old)
    live = [s.slot_id for k in (X509_KIND, JWT_KIND) for s in first.key_slots(k)]
    assert all(site.keys.record_path(slot_id).exists() for slot_id in live)


def test_a_record_whose_key_save_was_cut_short_is_removed(site: Site) -> None:
    site.manager()
    site.keys.save_record("cut", b"{}")  # a crash came before the key file
    site.manager()
    assert not site.keys.record_path("cut").exists()


def test_keys_made_after_every_slot_of_the_backup_was_dropped_still_come_back(
    site: Site, clock: FakeClock
) -> None:
    """Four keys made since the backup, and the first two expired and went with their files:
    the two left were made when no slot of the backup's journal was left. Their records still
    name it (through their predecessors'), and the key in use comes back."""
    first = site.manager()
    copy = site.backup()
    backed_up = {s.slot_id for s in first.key_slots(X509_KIND)}
    _rotate_until(first, clock, made_since=4, newest=ACTIVE)
    assert not backed_up & set(site.keys.slot_ids())
    in_use = first.x509_signer().ca_certificate

    site.restore(copy)
    assert site.manager().x509_signer().ca_certificate == in_use


@pytest.mark.parametrize("same_upstream", [True, False])
def test_under_an_upstream_ca_only_a_key_it_certified_comes_back(
    site: Site, clock: FakeClock, tmp_path: Path, same_upstream: bool
) -> None:
    """Under an upstream CA the agents trust its root alone: a key comes back when the
    upstream now configured signed its certificate, never one another CA did."""

    def upstream(name: str) -> CaConfig:
        key = ec.generate_private_key(ec.SECP256R1())
        root = _ca_cert(name, key, None, start=clock.now(), days=365)
        files = tmp_path / name
        files.mkdir()
        cert_path, key_path = _write(files, [root], key)
        return CaConfig(TRUST_DOMAIN, upstream_cert=cert_path, upstream_key=key_path)

    config = upstream("root-a")
    first = site.manager(config)
    copy = site.backup()
    _rotate_until(first, clock, made_since=1, newest=ACTIVE)
    in_use = first.x509_signer().ca_certificate

    site.restore(copy)
    again = site.manager(config if same_upstream else upstream("root-b"))
    assert (again.x509_signer().ca_certificate == in_use) is same_upstream


def test_a_backup_holding_a_prepared_key_keeps_it_once_it_was_activated_since(
    site: Site, clock: FakeClock, tmp_path: Path
) -> None:
    """The backup journals the next key still prepared; since, it was activated (the CA in
    use) and its own successor prepared. Both prepared once restored, the schedule kept the
    newer and dropped the one in use, its key file deleted: the SVIDs it signed, the agents'
    among them, verified no more and its key was gone for good. It must sign on with it."""
    first = site.manager()
    _rotate_until(first, clock, made_since=1, newest=PREPARED)
    copy = site.backup()
    _rotate_until(first, clock, made_since=1, newest=PREPARED)
    in_use = first.x509_signer().ca_certificate
    agent_leaf = _leaf(first)
    journal = {k: {s.slot_id: s.status for s in first.key_slots(k)} for k in (X509_KIND, JWT_KIND)}
    key_files = site.keys.slot_ids()

    site.restore(copy)
    again = site.manager()
    assert again.x509_signer().ca_certificate == in_use
    assert site.keys.slot_ids() == key_files
    restored = {k: {s.slot_id: s.status for s in again.key_slots(k)} for k in journal}
    assert restored == journal
    kept = openssl_verify(tmp_path, agent_leaf, again.bundle().x509_authorities, at=clock.now())
    assert kept.returncode == 0, kept.stderr


def test_keys_taken_back_are_audited(site: Site, clock: FakeClock) -> None:
    """A start that journals keys again changes which CA signs: the audit log, not only the
    server's log, must say so, naming each key and the status it came back with."""
    first = site.manager()
    copy = site.backup()
    backed_up = {s.slot_id for k in (X509_KIND, JWT_KIND) for s in first.key_slots(k)}
    _rotate_until(first, clock, made_since=1, newest=ACTIVE)
    site.manager()  # a start that takes nothing back audits nothing
    assert not [r for r in site.store.audit_rows() if r["kind"] == "ca_keys_taken_back"]
    journal = {s.slot_id: s.status for k in (X509_KIND, JWT_KIND) for s in first.key_slots(k)}

    site.restore(copy)
    site.manager()
    (event,) = [r for r in site.store.audit_rows() if r["kind"] == "ca_keys_taken_back"]
    extra = event["extra"] if isinstance(event["extra"], dict) else json.loads(event["extra"])
    named = {s["slot_id"]: s["status"] for s in extra["slots"]}
    assert set(named) == set(journal) - backed_up
    assert set(named.values()) <= {ACTIVE, PREPARED, RETIRED}


def test_a_key_forgotten_as_lost_does_not_come_back_with_its_file(
    site: Site, clock: FakeClock, tmp_path: Path
) -> None:
    """`ca forget-lost-keys` dropped the prepared key whose file was gone, its audit event
    saying the next start makes new keys; the file found again (a keys/ mount back, a copy
    put back) before that start, its record took it back into the journal and the bundle."""
    first = site.manager()
    _rotate_until(first, clock, made_since=1, newest=PREPARED)
    prepared = next(s.slot_id for s in first.key_slots(X509_KIND) if s.status == PREPARED)
    aside = tmp_path / "aside.pem"
    site.keys.path(prepared).rename(aside)
    first.forget_lost_keys(first.lost_keys())
    aside.rename(site.keys.path(prepared))

    again = site.manager()
    assert prepared not in {s.slot_id for s in site.store.list_key_slots(X509_KIND)}
    assert site.keys.exists(prepared)  # kept, as any key file no slot names
    assert again.key_slots(X509_KIND)


def test_a_prepared_key_no_key_taken_back_descends_from_stays_prepared() -> None:
    """The journal's prepared key is made active (or retired) only when a key taken back was
    made after it, as its successor: one dropped before that key was made (its lineage does
    not name it) was never activated, and is not made to sign."""

    def slot(slot_id: str, status: str, made: int) -> KeySlot:
        return KeySlot(slot_id, JWT_KIND, status, b"", slot_id, made, made + 1000, made)

    journal = [slot("a", ACTIVE, 0), slot("p", PREPARED, 100)]
    later = KeyRecord(slot("q", "", 200), frozenset({"a"}))
    assert plan_adoption(250, journal, [later], _ANY) == [slot("q", PREPARED, 200)]
    after_p = KeyRecord(slot("q", "", 200), frozenset({"p", "a"}))
    assert plan_adoption(250, journal, [after_p], _ANY) == [
        slot("p", ACTIVE, 100),
        slot("q", PREPARED, 200),
    ]


def test_keys_of_another_type_than_the_key_that_endorsed_them_come_back(
    site: Site, clock: FakeClock
) -> None:
    """key_type changed twice since the backup (P-256, then P-384, then RSA), the JWT keys of
    another type than the CA's: each record is signed by a key of another type (and hash) than
    its own, and the keys in use still come back."""
    first = site.manager(CaConfig(TRUST_DOMAIN, key_type=EC_P256, jwt_key_type=RSA_2048))
    backed_up = {s.kid for k in (X509_KIND, JWT_KIND) for s in first.key_slots(k)}
    copy = site.backup()
    for key_type, jwt_key_type in ((EC_P384, EC_P384), (RSA_2048, EC_P256)):
        manager = site.manager(CaConfig(TRUST_DOMAIN, key_type=key_type, jwt_key_type=jwt_key_type))
        _rotate_until(manager, clock, made_since=1, newest=ACTIVE)
    kinds = (X509_KIND, JWT_KIND)
    journal = {k: {s.slot_id: s.status for s in manager.key_slots(k)} for k in kinds}
    in_use = manager.x509_signer().ca_certificate
    jwt_kid = manager.jwt_signer().kid
    assert jwt_kid not in backed_up  # the JWT key in use too was made since

    site.restore(copy)
    again = site.manager(CaConfig(TRUST_DOMAIN, key_type=RSA_2048, jwt_key_type=EC_P256))
    assert again.x509_signer().ca_certificate == in_use
    assert again.jwt_signer().kid == jwt_kid
    restored = {k: {s.slot_id: s.status for s in again.key_slots(k)} for k in journal}
    assert restored == journal


def test_a_key_made_while_the_active_key_file_is_unreadable_says_it_cannot_come_back(
    site: Site, clock: FakeClock
) -> None:
    """The record of a key made while the active key's file cannot be read is signed by no
    key: a restore from before it never takes it back. That must be said when it is made,
    not found at the restore."""
    manager = site.manager()
    active = next(s for s in manager.key_slots(X509_KIND) if s.status == ACTIVE)
    site.keys.path(active.slot_id).unlink()
    with log_lines("svid.server.ca") as lines:
        _rotate_until(manager, clock, made_since=1, newest=PREPARED)
    unendorsed = [r for r in lines.records if getattr(r, "slot_id", None) == active.slot_id]
    assert unendorsed, [r.getMessage() for r in lines.records]
    assert unendorsed[0].levelname == "WARNING"


def _jwt_slot(key: ec.EllipticCurvePrivateKey, created_at: int) -> KeySlot:
    public = key.public_key()
    kid = public_key_thumbprint_kid(public)
    slot_id = uuid.uuid4().hex
    return KeySlot(
        slot_id, JWT_KIND, "", spki_der(public), kid, created_at, created_at + 3600, created_at
    )


def test_a_chain_longer_than_any_record_carries_is_not_walked() -> None:
    """A record carries at most LINEAGE_DEPTH links (encode_record cuts the chain there). One
    with more, each link a key of the planter's own signing the next one's body, had each
    verified at the start, so a record of thousands of links held the start for as long as
    they took. Past LINEAGE_DEPTH links it is refused unwalked, even
    one that would lead to a key the journal holds."""
    keys = [ec.generate_private_key(ec.SECP256R1()) for _ in range(LINEAGE_DEPTH + 2)]
    slots = [_jwt_slot(key, 1000 + i) for i, key in enumerate(keys)]
    anchor = replace(slots[0], status=ACTIVE)
    record = None
    for i in range(1, len(slots)):
        data = encode_record(slots[i], [anchor.slot_id], (slots[i - 1], keys[i - 1], record))
        record = decode_record(slots[i].slot_id, data)
        assert record is not None
        if i <= LINEAGE_DEPTH:  # as this release writes it: anchored within its depth
            assert endorsed_by_known(record, {anchor.slot_id: anchor})
    assert record is not None
    doc = json.loads(data)
    # The one link the encoder cut, put back: the anchor's signature of the first key's body.
    doc["chain"].append(
        json.loads(encode_record(slots[1], [], (anchor, keys[0], None)))["chain"][0]
    )
    long = decode_record(slots[-1].slot_id, json.dumps(doc).encode())
    assert long is not None
    assert len(long.chain) == LINEAGE_DEPTH + 1
    assert not endorsed_by_known(long, {anchor.slot_id: anchor})
