"""Shared keys: two CA managers (two servers) on ONE SQLite file with one key-encryption key.

Each "server" has its own datastore connection, key store directory, KEK object and manager;
only the database file and the KEK file are shared, as between two processes.
"""

from __future__ import annotations

import base64
import math
import sqlite3
import threading
from collections.abc import Callable, Iterator
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

import jwt
import pytest
from cryptography import x509
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec

from server.ca.errors import CaConfigError, SealedKeyError
from server.ca.keys import KeyStore
from server.ca.manager import ROTATION_LEASE, CaConfig, CaManager
from server.ca.rotation import activate_at, prepare_at
from server.ca.rotator import Rotator
from server.ca.sealing import KeyEncryptionKey
from server.datastore.base import DataStore
from server.datastore.postgres import PostgresDataStore
from server.datastore.records import (
    ACTIVE,
    JWT_KIND,
    PREPARED,
    RETIRED,
    REVOKED_X509_SERIAL,
    X509_KIND,
    KeySlot,
    Revocation,
)
from server.datastore.sqlite import SqliteDataStore
from server.datastore.testing import FaultInjectingDataStore
from server.tasks.crl import build_crls, key_id
from svid._clock import FakeClock
from svid._spiffe_id import SpiffeId
from tests.server.conftest import TRUST_DOMAIN, openssl_verify

WORKLOAD = SpiffeId.parse("spiffe://example.org/web")
CA_TTL = 600
JWT_TTL = 900
LEASE_TTL = 30
MAX_KEYS = 3  # previous, active, next


@dataclass
class Node:
    """One server's CA side: its own connection (wrapped to see its writes), keys dir, manager."""

    store: FaultInjectingDataStore
    raw: DataStore
    keys: KeyStore
    manager: CaManager
    rotator: Rotator

    def writes(self) -> list[str]:
        journal = ("save_key_slot", "delete_key_slot", "next_bundle_sequence")
        return [c for c in self.store.calls if c in journal]


@pytest.fixture
def kek_file(tmp_path: Path) -> Path:
    path = tmp_path / "kek"
    KeyEncryptionKey.generate().write_new(path)
    return path


class Cluster:
    """Servers on one database file (or, `dsn` given, one PostgreSQL schema): `cluster["a"]`
    is server "a", made and initialised on first use; `cluster.new(name, kek=...)` makes one
    with options."""

    def __init__(
        self, tmp_path: Path, clock: FakeClock, kek_file: Path, dsn: str | None = None
    ) -> None:
        self._tmp = tmp_path
        self._clock = clock
        self._kek_file = kek_file
        self._dsn = dsn
        self._nodes: dict[str, Node] = {}

    def __getitem__(self, name: str) -> Node:
        return self._nodes[name] if name in self._nodes else self.new(name)

    def new(
        self, name: str, *, kek: Path | str | None = "default", clock: FakeClock | None = None
    ) -> Node:
        """`clock`: this server's own, when it is not the cluster's."""
        kek_path = self._kek_file if kek == "default" else kek
        clock = clock or self._clock
        raw: DataStore = (
            PostgresDataStore(self._dsn, self._clock)
            if self._dsn is not None
            else SqliteDataStore(self._tmp / "shared.sqlite3", self._clock)
        )
        store = FaultInjectingDataStore(raw)
        keys = KeyStore(self._tmp / f"keys-{name}")
        manager = CaManager(
            CaConfig(TRUST_DOMAIN, ca_ttl=CA_TTL, jwt_key_ttl=JWT_TTL, lease_ttl=LEASE_TTL),
            store,
            keys,
            clock,
            kek=KeyEncryptionKey.load(Path(kek_path)) if kek_path is not None else None,
            holder=name,
            sleep=clock.advance,
        )
        node = Node(store, raw, keys, manager, Rotator(manager, clock))
        self._nodes[name] = node
        manager.initialize()
        return node

    def close(self) -> None:
        for node in self._nodes.values():
            node.raw.close()


@pytest.fixture
def nodes(tmp_path: Path, clock: FakeClock, kek_file: Path) -> Iterator[Cluster]:
    cluster = Cluster(tmp_path, clock, kek_file)
    yield cluster
    cluster.close()


@pytest.fixture(params=["sqlite", "postgres"])
def dsn(request: pytest.FixtureRequest) -> str | None:
    """None (one SQLite file), or a fresh PostgreSQL schema's DSN."""
    return None if request.param == "sqlite" else str(request.getfixturevalue("postgres_dsn"))


@pytest.fixture
def any_nodes(
    tmp_path: Path, clock: FakeClock, kek_file: Path, dsn: str | None
) -> Iterator[Cluster]:
    """`nodes` on either backend."""
    cluster = Cluster(tmp_path, clock, kek_file, dsn)
    yield cluster
    cluster.close()


def _der(manager: CaManager) -> list[bytes]:
    return [c.public_bytes(serialization.Encoding.DER) for c in manager.bundle().x509_authorities]


def _same_bundle(a: CaManager, b: CaManager) -> None:
    assert _der(a) == _der(b)
    assert a.bundle().jwt_authorities.keys() == b.bundle().jwt_authorities.keys()
    assert a.bundle().to_json() == b.bundle().to_json()  # same keys, same sequence


def _cross_verify(signer: CaManager, verifier: CaManager, clock: FakeClock, tmp: Path) -> None:
    """An X.509-SVID and a JWT-SVID of `signer` check out against `verifier`'s bundle."""
    key = ec.generate_private_key(ec.SECP256R1())
    leaf = signer.x509_signer().sign_svid(key.public_key(), WORKLOAD, 60)[0]
    result = openssl_verify(tmp, leaf, verifier.bundle().x509_authorities, at=clock.now())
    assert result.returncode == 0, result.stderr
    token = signer.jwt_signer().sign(WORKLOAD, ["db"], 60).token
    kid = jwt.get_unverified_header(token)["kid"]
    jwt.decode(
        token,
        verifier.bundle().jwt_authorities[kid],
        algorithms=["ES256"],
        audience="db",
        options={"verify_exp": False},
    )


def _cap(manager: CaManager) -> None:
    bundle = manager.bundle()
    assert len(bundle.x509_authorities) <= MAX_KEYS
    assert len(bundle.jwt_authorities) <= MAX_KEYS


def _slot(manager: CaManager, kind: str, status: str) -> str:
    return next(s.slot_id for s in manager.key_slots(kind) if s.status == status)


# -- one bundle -----------------------------------------------------------------------------------


def test_two_servers_publish_one_bundle_and_jwks(
    nodes: Cluster, clock: FakeClock, tmp_path: Path
) -> None:
    a, b = nodes["a"], nodes["b"]
    _same_bundle(a.manager, b.manager)
    assert len(a.manager.bundle().x509_authorities) == 1
    assert len(a.manager.bundle().jwt_authorities) == 1
    assert a.manager.holds_rotation_lease
    assert not b.manager.holds_rotation_lease
    assert b.writes() == []  # b made no key: it adopted a's
    for node in (a, b):
        assert node.keys.slot_ids() == []  # no private key file on either server
    for slot in a.raw.list_key_slots(X509_KIND) + a.raw.list_key_slots(JWT_KIND):
        assert slot.sealed_key
    _cross_verify(a.manager, b.manager, clock, tmp_path)
    _cross_verify(b.manager, a.manager, clock, tmp_path)


def _tick_until(node: Node, clock: FakeClock, done: Callable[[], bool]) -> None:
    """Run `node`'s rotator on the fake clock, tick by due tick, until `done()`."""
    for _ in range(1000):
        if done():
            return
        clock.set(node.manager.next_rotation_check())
        node.rotator.tick()
    raise AssertionError("never happened")


def test_only_the_holder_rotates_and_the_other_adopts_the_new_keys(
    nodes: Cluster, clock: FakeClock, tmp_path: Path
) -> None:
    a, b = nodes["a"], nodes["b"]
    old_ca = a.manager.x509_signer().ca_certificate
    old_kid = a.manager.jwt_signer().kid
    sequence = b.manager.bundle().sequence
    # Half of the CA's life: a prepares the next CA, published at once.
    _tick_until(a, clock, lambda: len(a.manager.bundle().x509_authorities) == 2)
    assert b.manager.rotate()  # b's tick: not the holder, it adopts what a journaled
    assert b.manager.bundle().sequence > sequence
    assert b.writes() == []
    _same_bundle(a.manager, b.manager)

    # 5/6: a activates the prepared CA; b keeps signing with the old one until it reloads.
    _tick_until(a, clock, lambda: a.manager.x509_signer().ca_certificate != old_ca)
    assert b.manager.x509_signer().ca_certificate == old_ca
    assert b.manager.reload()  # what the change feed calls
    assert b.manager.x509_signer().ca_certificate == a.manager.x509_signer().ca_certificate
    _same_bundle(a.manager, b.manager)
    assert not b.manager.reload()  # nothing new: no new bundle
    _cross_verify(b.manager, a.manager, clock, tmp_path)
    _cross_verify(a.manager, b.manager, clock, tmp_path)
    _tick_until(a, clock, lambda: a.manager.jwt_signer().kid != old_kid)
    b.manager.reload()
    assert b.manager.jwt_signer().kid == a.manager.jwt_signer().kid
    assert b.writes() == []
    assert not b.manager.holds_rotation_lease


def test_the_other_server_takes_over_when_the_holder_stops(
    nodes: Cluster, clock: FakeClock, tmp_path: Path
) -> None:
    a, b = nodes["a"], nodes["b"]
    sequence = b.manager.bundle().sequence
    # a stops renewing (killed). Until its lease lapses b only watches.
    clock.advance(LEASE_TTL - 1)
    b.manager.rotate()
    assert not b.manager.holds_rotation_lease
    clock.advance(1)
    b.manager.rotate()
    assert b.manager.holds_rotation_lease
    assert b.manager.bundle().sequence == sequence + 1  # the new holder numbers a fresh bundle
    written = len(b.writes())
    _tick_until(b, clock, lambda: len(b.manager.bundle().x509_authorities) == 2)
    assert len(b.writes()) > written  # b journals the rotation now
    # a comes back: it is no longer the holder, and adopts b's journal.
    a.manager.rotate()
    assert not a.manager.holds_rotation_lease
    _same_bundle(a.manager, b.manager)
    _cross_verify(a.manager, b.manager, clock, tmp_path)


def test_a_clean_shutdown_hands_the_lease_over_at_once(nodes: Cluster) -> None:
    a, b = nodes["a"], nodes["b"]
    a.manager.close()
    b.manager.rotate()
    assert b.manager.holds_rotation_lease
    assert not a.raw.acquire_lease(ROTATION_LEASE, "a", 0, LEASE_TTL)


# -- several full rotations -----------------------------------------------------------------------


def test_a_takeover_by_a_server_whose_clock_is_minutes_behind_keeps_the_keys_svids_chain_to(
    nodes: Cluster, clock: FakeClock, tmp_path: Path
) -> None:
    # a's clock runs five minutes ahead of b's. a made the trust domain's first keys, and both
    # signed with them; a then restarts (a rolling deploy) and b takes the lease over at once.
    # To b the keys begin more than MAX_CLOCK_SKEW ahead. Dropped, they left the bundle, and
    # every SVID both servers had issued with them no longer verified, not even once the
    # keys' time had come; the fault itself (chains not valid yet) ends in five minutes.
    a = nodes.new("a", clock=FakeClock(clock.now() + 300))
    b = nodes["b"]
    ca = b.manager.x509_signer().ca_certificate
    kid = b.manager.jwt_signer().kid
    key = ec.generate_private_key(ec.SECP256R1())
    leaf = b.manager.x509_signer().sign_svid(key.public_key(), WORKLOAD, CA_TTL - 120)[0]
    a.manager.close()
    b.manager.rotate()
    assert b.manager.holds_rotation_lease
    assert ca in b.manager.bundle().x509_authorities
    assert kid in b.manager.bundle().jwt_authorities
    clock.advance(300)  # the keys' time has come: SVIDs chained to them verify
    b.manager.rotate()
    assert ca in b.manager.bundle().x509_authorities
    assert kid in b.manager.bundle().jwt_authorities
    result = openssl_verify(tmp_path, leaf, b.manager.bundle().x509_authorities, at=clock.now())
    assert result.returncode == 0, result.stderr


def test_several_rotations_keep_one_bundle_of_at_most_three_keys_per_kind(
    nodes: Cluster, clock: FakeClock, tmp_path: Path
) -> None:
    a, b = nodes["a"], nodes["b"]
    start = clock.now()
    seen: dict[str, set[str]] = {X509_KIND: set(), JWT_KIND: set()}
    alive = {"a": a, "b": b}
    steps = 0
    while clock.now() < start + 4 * JWT_TTL:
        if "a" in alive and clock.now() > start + 2 * JWT_TTL:
            del alive["a"]  # the holder dies half-way: b must carry on
        due = min(n.manager.next_rotation_check() for n in alive.values())
        clock.set(max(clock.now(), min(due, clock.now() + 7)))
        for node in alive.values():
            node.rotator.tick()
        for node in alive.values():
            node.manager.reload()  # every server has seen every write of this step
        steps += 1
        managers = [n.manager for n in alive.values()]
        holders = [m for m in managers if m.holds_rotation_lease]
        assert len(holders) <= 1
        for manager in managers:
            _cap(manager)
            for kind in (X509_KIND, JWT_KIND):
                statuses = [s.status for s in manager.key_slots(kind)]
                assert statuses.count(ACTIVE) == 1, (kind, statuses)
                assert statuses.count(PREPARED) <= 1
                assert statuses.count(RETIRED) <= 1
                seen[kind].update(s.slot_id for s in manager.key_slots(kind))
        if len(managers) == 2:
            _same_bundle(*managers)
            assert a.manager.x509_signer().ca_certificate == b.manager.x509_signer().ca_certificate
            assert a.manager.jwt_signer().kid == b.manager.jwt_signer().kid
        if steps % 25 == 0:
            _cross_verify(managers[0], managers[-1], clock, tmp_path)
            _cross_verify(managers[-1], managers[0], clock, tmp_path)
    assert steps > 100
    assert b.manager.holds_rotation_lease
    for kind in (X509_KIND, JWT_KIND):
        assert len(seen[kind]) >= 5, kind  # several full rotations, before and after takeover
    _cross_verify(b.manager, b.manager, clock, tmp_path)


def test_a_holder_that_dies_mid_rotation_leaves_a_journal_the_next_one_finishes(
    nodes: Cluster, clock: FakeClock
) -> None:
    a, b = nodes["a"], nodes["b"]
    active = a.manager.key_slots(X509_KIND)[0]
    clock.set(math.ceil(prepare_at(active.not_before, active.not_after)))
    sequence = a.manager.bundle().sequence
    # a journals the prepared key, then dies before numbering the new bundle.
    a.store.inject(sqlite3.OperationalError("killed"), method="next_bundle_sequence")
    with pytest.raises(sqlite3.OperationalError):
        a.manager.rotate()
    assert len(a.raw.list_key_slots(X509_KIND)) == 2
    assert a.raw.bundle_sequence() == sequence
    clock.advance(LEASE_TTL)
    assert b.manager.rotate()
    assert b.manager.holds_rotation_lease
    assert b.manager.bundle().sequence > sequence
    assert len(b.manager.bundle().x509_authorities) == 2
    for _ in range(6):
        clock.set(b.manager.next_rotation_check())
        b.manager.rotate()
        _cap(b.manager)
    statuses = [s.status for s in b.manager.key_slots(X509_KIND)]
    assert statuses.count(ACTIVE) == 1


def test_a_holder_paused_past_its_lease_does_not_journal_beside_the_new_holder(
    nodes: Cluster, clock: FakeClock, monkeypatch: pytest.MonkeyPatch
) -> None:
    """a takes the lease, plans the next CA, then pauses (a stalled VM) past the lease's life
    before journaling it; meanwhile b takes the lease over and journals its own next CA. a's
    key then landed beside b's: two prepared CAs, two servers each publishing its own bundle
    until a later tick repaired it. Its write is refused; it leaves the rotation to b."""
    a, b = nodes["a"], nodes["b"]
    active = a.manager.key_slots(X509_KIND)[0]
    clock.set(math.ceil(prepare_at(active.not_before, active.not_after)))
    journal = a.store.save_key_slot
    paused: list[str] = []

    def pause_then_save(slot: KeySlot, **kw: Any) -> None:
        if not paused:
            paused.append(slot.slot_id)
            clock.advance(LEASE_TTL + 1)
            assert b.manager.rotate()  # b takes the lease over and journals its next CA
            assert b.manager.holds_rotation_lease
        journal(slot, **kw)

    monkeypatch.setattr(a.store, "save_key_slot", pause_then_save)
    a.manager.rotate()
    assert paused
    assert not a.manager.holds_rotation_lease
    prepared = [s for s in a.raw.list_key_slots(X509_KIND) if s.status == PREPARED]
    assert [s.slot_id for s in prepared] == [_slot(b.manager, X509_KIND, PREPARED)]
    assert paused[0] not in {s.slot_id for s in a.raw.list_key_slots(X509_KIND)}
    _same_bundle(a.manager, b.manager)


def test_reload_is_safe_from_any_thread(nodes: Cluster, clock: FakeClock) -> None:
    a, b = nodes["a"], nodes["b"]
    errors: list[BaseException] = []
    stop = threading.Event()

    def reload_loop() -> None:
        while not stop.is_set():
            try:
                b.manager.reload()
            except BaseException as exc:
                errors.append(exc)

    threads = [threading.Thread(target=reload_loop) for _ in range(3)]
    for t in threads:
        t.start()
    try:
        for _ in range(6):
            clock.set(a.manager.next_rotation_check())
            a.manager.rotate()
    finally:
        stop.set()
        for t in threads:
            t.join()
    assert errors == []
    b.manager.reload()
    _same_bundle(a.manager, b.manager)


# -- start-up ------------------------------------------------------------------------------------


def test_a_second_server_waits_for_the_holders_first_keys(
    nodes: Cluster, clock: FakeClock, tmp_path: Path
) -> None:
    ghost = SqliteDataStore(tmp_path / "shared.sqlite3", clock)
    # Another server took the lease on the fresh datastore and died before making any key.
    assert ghost.acquire_lease(ROTATION_LEASE, "ghost", int(clock.now()), LEASE_TTL)
    ghost.close()
    started = clock.now()
    b = nodes.new("b")
    assert b.manager.holds_rotation_lease
    assert started + LEASE_TTL <= clock.now() <= started + LEASE_TTL + 1
    assert len(b.manager.bundle().x509_authorities) == 1


def test_a_wrong_kek_stops_the_server_at_start_naming_the_file(
    nodes: Cluster, tmp_path: Path
) -> None:
    assert nodes["a"].manager.holds_rotation_lease
    other = tmp_path / "other-kek"
    KeyEncryptionKey.generate().write_new(other)
    with pytest.raises(CaConfigError, match=f"key_encryption_key_file: {other} is not the"):
        nodes.new("c", kek=other)


def test_a_server_without_the_kek_refuses_shared_keys(nodes: Cluster) -> None:
    a = nodes["a"]
    before = a.raw.list_key_slots(X509_KIND)
    with pytest.raises(CaConfigError, match="key_encryption_key_file: required: key slot"):
        nodes.new("c", kek=None)
    assert a.raw.list_key_slots(X509_KIND) == before  # and dropped nothing


@pytest.mark.parametrize("damage", ["bit flip", "swapped"])
def test_a_tampered_active_slot_is_refused_and_named(nodes: Cluster, damage: str) -> None:
    a = nodes["a"]
    jwt_slot = a.raw.list_key_slots(JWT_KIND)[0]
    x509_slot = a.raw.list_key_slots(X509_KIND)[0]
    if damage == "bit flip":
        sealed = bytearray(jwt_slot.sealed_key)
        sealed[-5] ^= 0x10
        a.raw.save_key_slot(replace(jwt_slot, sealed_key=bytes(sealed)))
    else:
        a.raw.save_key_slot(replace(jwt_slot, sealed_key=x509_slot.sealed_key))
    with pytest.raises(SealedKeyError, match=f"key slot {jwt_slot.slot_id}: .*integrity"):
        nodes.new("c")


# -- switching a single server to shared keys ----------------------------------------------------


def test_upgrade_seals_the_existing_key_files(
    tmp_path: Path, clock: FakeClock, kek_file: Path
) -> None:
    store = SqliteDataStore(tmp_path / "db", clock)
    keys = KeyStore(tmp_path / "keys")
    lone = CaManager(CaConfig(TRUST_DOMAIN, ca_ttl=CA_TTL), store, keys, clock)
    lone.initialize()
    clock.set(lone.next_rotation_check())
    lone.rotate()
    before = lone.bundle()
    assert len(keys.slot_ids()) == 3

    shared = CaManager(
        CaConfig(TRUST_DOMAIN, ca_ttl=CA_TTL),
        store,
        keys,
        clock,
        kek=KeyEncryptionKey.load(kek_file),
        holder="a",
    )
    shared.initialize()
    assert shared.bundle().x509_authorities == before.x509_authorities
    assert shared.bundle().jwt_authorities.keys() == before.jwt_authorities.keys()
    assert shared.x509_signer().ca_certificate == lone.x509_signer().ca_certificate
    assert keys.slot_ids() == []  # the plaintext files are gone: the datastore holds the keys
    assert all(s.sealed_key for k in (X509_KIND, JWT_KIND) for s in store.list_key_slots(k))
    # A second server with the KEK now shares the very same bundle.
    other = CaManager(
        CaConfig(TRUST_DOMAIN, ca_ttl=CA_TTL),
        SqliteDataStore(tmp_path / "db", clock),
        KeyStore(tmp_path / "keys-b"),
        clock,
        kek=KeyEncryptionKey.load(kek_file),
        holder="b",
    )
    other.initialize()
    _same_bundle(shared, other)
    _cross_verify(other, lone, clock, tmp_path)
    store.close()


def test_upgrade_from_another_data_dir_refuses_rather_than_drop_the_unsealed_ca(
    tmp_path: Path, clock: FakeClock, kek_file: Path
) -> None:
    """Adding the key-encryption key seals the key files the data_dir holds. Given a data_dir
    without them, the holder dropped the unsealed slots and made a new CA, and the keys the
    agents trust were never sealed: it refuses to start instead, keeping the journal."""
    store = SqliteDataStore(tmp_path / "db", clock)
    keys = KeyStore(tmp_path / "keys")
    CaManager(CaConfig(TRUST_DOMAIN), store, keys, clock).initialize()
    journal = {kind: store.list_key_slots(kind) for kind in (X509_KIND, JWT_KIND)}
    elsewhere = KeyStore(tmp_path / "other" / "keys")
    shared = CaManager(
        CaConfig(TRUST_DOMAIN), store, elsewhere, clock, kek=KeyEncryptionKey.load(kek_file)
    )
    with pytest.raises(CaConfigError, match=r"key file .* is missing: data_dir .*other"):
        shared.initialize()
    assert {kind: store.list_key_slots(kind) for kind in (X509_KIND, JWT_KIND)} == journal
    assert len(keys.slot_ids()) == 2
    store.close()


def test_no_key_material_reaches_the_logs(
    nodes: Cluster, clock: FakeClock, kek_file: Path, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level("DEBUG")
    a, b = nodes["a"], nodes["b"]
    for _ in range(8):
        clock.set(a.manager.next_rotation_check())
        a.manager.rotate()
        b.manager.rotate()
    a.manager.close()
    clock.advance(LEASE_TTL)
    b.manager.rotate()
    text = "\n".join(
        f"{r.getMessage()} {sorted(vars(r).items(), key=lambda kv: kv[0])}" for r in caplog.records
    )
    assert "ca-rotation lease taken" in text  # the log was captured at all
    kek = base64.b64decode(kek_file.read_bytes().strip())
    secrets_seen = [kek.hex(), kek_file.read_text().strip()]
    for slot in b.raw.list_key_slots(X509_KIND) + b.raw.list_key_slots(JWT_KIND):
        secrets_seen += [slot.sealed_key.hex(), repr(slot.sealed_key)]
    assert "PRIVATE KEY" not in text
    for secret in secrets_seen:
        assert secret not in text


def test_a_tampered_key_is_never_signed_with_and_its_slot_is_named(
    nodes: Cluster, clock: FakeClock
) -> None:
    a, b = nodes["a"], nodes["b"]
    old_ca = a.manager.x509_signer().ca_certificate
    _tick_until(a, clock, lambda: len(a.manager.bundle().x509_authorities) == 2)
    prepared = next(s for s in a.raw.list_key_slots(X509_KIND) if s.status == PREPARED)
    damaged = bytearray(prepared.sealed_key)
    damaged[-1] ^= 0x01
    a.raw.save_key_slot(replace(prepared, sealed_key=bytes(damaged)))
    b.manager.reload()
    # When the journal makes it active, neither server loads it; both keep the old CA (still
    # published until it expires) and say which slot is bad.
    with pytest.raises(SealedKeyError, match=f"key slot {prepared.slot_id}"):
        _tick_until(a, clock, lambda: False)
    with pytest.raises(SealedKeyError, match=f"key slot {prepared.slot_id}"):
        b.manager.reload()
    for node in (a, b):
        assert node.manager.x509_signer().ca_certificate == old_ca


# -- never a bundle without keys -----------------------------------------------------------------


def test_a_server_reading_the_journal_mid_plan_never_publishes_a_bundle_without_keys(
    any_nodes: Cluster, clock: FakeClock, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The cluster was down past every key's life: the holder drops the expired keys, then
    makes new ones. b, told of the drop by the change feed, read a journal with no key of a
    kind and published that bundle: every workload's verification failed until the next
    tick. b keeps its bundle until the journal holds a key of each kind again."""
    a, b = any_nodes["a"], any_nodes["b"]
    clock.advance(max(CA_TTL, JWT_TTL) + 1)
    delete = a.store.delete_key_slot
    seen: list[tuple[int, int]] = []

    def delete_then_reload(slot_id: str, **kw: Any) -> None:
        delete(slot_id, **kw)
        b.manager.reload()  # the change feed's call, between the holder's writes
        bundle = b.manager.bundle()
        seen.append((len(bundle.x509_authorities), len(bundle.jwt_authorities)))

    monkeypatch.setattr(a.store, "delete_key_slot", delete_then_reload)
    a.manager.rotate()
    assert seen
    assert all(x509 >= 1 and jwt >= 1 for x509, jwt in seen), seen
    b.manager.reload()
    _same_bundle(a.manager, b.manager)
    _cross_verify(a.manager, b.manager, clock, any_nodes._tmp)


def test_a_server_losing_the_lease_amid_its_first_keys_never_publishes_half_a_bundle(
    tmp_path: Path,
    clock: FakeClock,
    kek_file: Path,
    dsn: str | None,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """A fresh datastore: a journals the first CA, then pauses past its lease before its JWT
    key. Its JWT write is refused (the lease lapsed), and its start failed on the journal it
    read back, a CA and no JWT key. It waits for the holder's keys, here taking the lease back
    and making them, and starts with a whole bundle."""
    cluster = Cluster(tmp_path, clock, kek_file, dsn)
    save = FaultInjectingDataStore.save_key_slot
    saved: list[str] = []

    def pause_after_the_ca(store: FaultInjectingDataStore, slot: KeySlot, **kw: Any) -> None:
        save(store, slot, **kw)
        saved.append(slot.kind)
        if saved == [X509_KIND]:
            clock.advance(LEASE_TTL + 1)  # a stalled VM: the lease lapses

    monkeypatch.setattr(FaultInjectingDataStore, "save_key_slot", pause_after_the_ca)
    try:
        a = cluster.new("a")
        bundle = a.manager.bundle()
        assert len(bundle.x509_authorities) == 1
        assert len(bundle.jwt_authorities) == 1
        assert a.manager.holds_rotation_lease
        assert [s.kind for s in a.raw.list_key_slots(JWT_KIND)] == [JWT_KIND]
        b = cluster.new("b")
        _same_bundle(a.manager, b.manager)
        _cross_verify(a.manager, b.manager, clock, tmp_path)
    finally:
        cluster.close()


def test_a_server_losing_the_lease_between_a_drop_and_an_activation_waits_for_the_keys(
    tmp_path: Path,
    clock: FakeClock,
    kek_file: Path,
    dsn: str | None,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """The cluster was down past its CA's life, not past the prepared one's: b, starting
    first, drops the expired CA, then pauses past its lease before activating the prepared
    one. The journal it read back had a CA of each kind but none active, so its start failed
    ("no active key slot"), where a journal with no key of a kind had it wait. It waits for
    an active key of each kind, here taking the lease back and activating the prepared CA."""
    cluster = Cluster(tmp_path, clock, kek_file, dsn)
    delete = FaultInjectingDataStore.delete_key_slot
    dropped: list[str] = []

    def pause_after_the_drop(store: FaultInjectingDataStore, slot_id: str, **kw: Any) -> None:
        delete(store, slot_id, **kw)
        dropped.append(slot_id)
        if len(dropped) == 1:
            clock.advance(LEASE_TTL + 1)  # a stalled VM: the lease lapses

    try:
        a = cluster.new("a")
        first = a.manager.key_slots(X509_KIND)[0]
        clock.set(math.ceil(prepare_at(first.not_before, first.not_after)))
        a.manager.rotate()
        prepared = [s for s in a.raw.list_key_slots(X509_KIND) if s.status == PREPARED]
        assert len(prepared) == 1
        a.manager.close()
        clock.set(first.not_after + 1)  # every server down meanwhile
        monkeypatch.setattr(FaultInjectingDataStore, "delete_key_slot", pause_after_the_drop)
        b = cluster.new("b")
        assert dropped[0] == first.slot_id
        assert b.manager.holds_rotation_lease
        issuing = b.manager.x509_signer().ca_certificate
        assert issuing.public_bytes(serialization.Encoding.DER) == prepared[0].public_der
        assert prepared[0].public_der in _der(b.manager)
        assert first.public_der not in _der(b.manager)
    finally:
        cluster.close()


def test_a_server_yet_to_adopt_the_holders_new_ca_lists_its_revoked_leaves_in_its_crls(
    any_nodes: Cluster, clock: FakeClock
) -> None:
    """a activates the prepared CA and signs with it; b, which has not ticked since (a change
    feed behind, a reload that failed), still sees it prepared. A leaf of the new CA revoked
    then reached b's agents in no CRL: b signed CRLs only for the CAs it saw issue, and its
    later adoption of the activation changed no bundle, so its agents took the revoked SVID
    until the CRL refresh half an hour on. The CA another server may be issuing with is one
    b signs CRLs for already."""
    a, b = any_nodes["a"], any_nodes["b"]
    first = a.manager.key_slots(X509_KIND)[0]
    clock.set(math.ceil(prepare_at(first.not_before, first.not_after)))
    a.manager.rotate()
    b.manager.rotate()
    clock.set(math.ceil(activate_at(first.not_before, first.not_after)))
    a.manager.rotate()
    issuing = a.manager.x509_signer()
    assert issuing.ca_certificate != b.manager.x509_signer().ca_certificate
    leaf = issuing.sign_svid(ec.generate_private_key(ec.SECP256R1()).public_key(), WORKLOAD, 60)[0]
    revoked = Revocation(
        REVOKED_X509_SERIAL,
        format(leaf.serial_number, "x"),
        str(WORKLOAD),
        int(leaf.not_valid_after_utc.timestamp()),
        "revoked by an operator",
        int(clock.now()),
        key_id(issuing.ca_certificate),
    )
    listed = [
        x509.load_der_x509_crl(der)
        for signer in b.manager.x509_crl_signers()
        for der in build_crls(signer.ca_certificate, signer.sign_crl, [revoked], clock.now(), 1)
    ]
    assert any(
        crl.issuer == issuing.ca_certificate.subject
        and crl.is_signature_valid(issuing.ca_certificate.public_key())  # type: ignore[arg-type]
        and crl.get_revoked_certificate_by_serial_number(leaf.serial_number) is not None
        for crl in listed
    )


def test_a_holder_paused_before_numbering_its_bundle_does_not_number_stale_slots(
    any_nodes: Cluster, clock: FakeClock, monkeypatch: pytest.MonkeyPatch
) -> None:
    """a journals the next CA, then pauses (SIGSTOP) for longer than its first CA lives
    before numbering the bundle; b takes over meanwhile, drops the expired CA and prepares
    another. a resumed and numbered its old slots above b's bundle: two bundles under one
    sequence, the stale one from a. Its numbering is refused; it adopts b's."""
    a, b = any_nodes["a"], any_nodes["b"]
    first = a.manager.key_slots(X509_KIND)[0]
    clock.set(math.ceil(prepare_at(first.not_before, first.not_after)))
    number = a.store.next_bundle_sequence
    paused: list[int] = []

    def pause_then_number(**kw: Any) -> int:
        if not paused:
            paused.append(1)
            clock.set(first.not_after + 1)
            assert b.manager.rotate()
            assert b.manager.holds_rotation_lease
        return number(**kw)

    monkeypatch.setattr(a.store, "next_bundle_sequence", pause_then_number)
    a.manager.rotate()
    assert paused
    assert not a.manager.holds_rotation_lease
    assert first.slot_id not in {s.slot_id for s in a.manager.key_slots(X509_KIND)}
    _same_bundle(a.manager, b.manager)
