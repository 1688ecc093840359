"""Key rotation on the fake clock: the pure schedule, several CA lifetimes, restarts, the ticker."""

from __future__ import annotations

import asyncio
import itertools
import math
import sqlite3
from dataclasses import dataclass, field
from pathlib import Path

import jwt
import pytest
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec

from server.ca.keys import KeyStore
from server.ca.manager import CaConfig, CaManager
from server.ca.rotation import (
    SlotTimes,
    activate_at,
    next_event,
    plan_rotation,
    prepare_at,
)
from server.ca.rotator import Rotator
from server.datastore.base import DataStore
from server.datastore.records import ACTIVE, JWT_KIND, PREPARED, RETIRED, X509_KIND, KeySlot
from server.datastore.sqlite import SqliteDataStore
from server.datastore.testing import FaultInjectingDataStore
from svid._clock import Clock, FakeClock
from svid._spiffe_id import SpiffeId
from tests.server.conftest import TRUST_DOMAIN, openssl_verify

WORKLOAD = SpiffeId.parse("spiffe://example.org/web")

# -- the pure schedule ---------------------------------------------------------------------------


def test_schedule_fractions() -> None:
    assert prepare_at(0, 600) == 300
    assert activate_at(0, 600) == 500
    assert prepare_at(1000, 1600) == 1300


def test_empty_journal_creates_an_active_key() -> None:
    plan = plan_rotation(0, [])
    assert plan.create_active
    assert not plan.prepare
    assert not plan.drop


def test_nothing_to_do_before_half_life() -> None:
    slots = [SlotTimes("a", ACTIVE, 0, 600)]
    assert plan_rotation(299, slots).empty
    assert next_event(299, slots) == 300


def test_prepare_at_half_life() -> None:
    plan = plan_rotation(300, [SlotTimes("a", ACTIVE, 0, 600)])
    assert plan.prepare
    assert not plan.activate
    assert not plan.create_active


def test_activate_at_five_sixths_and_retire_the_old() -> None:
    slots = [SlotTimes("a", ACTIVE, 0, 600), SlotTimes("b", PREPARED, 300, 900)]
    assert plan_rotation(499, slots).empty
    assert next_event(499, slots) == 500
    plan = plan_rotation(500, slots)
    assert plan.activate == "b"
    assert plan.retire == ("a",)
    assert not plan.prepare


def test_retired_key_is_dropped_when_it_expires() -> None:
    slots = [SlotTimes("a", RETIRED, 0, 600), SlotTimes("b", ACTIVE, 300, 900)]
    assert plan_rotation(599, slots).empty
    assert next_event(599, slots) == 600
    assert plan_rotation(600, slots).drop == ("a",)


def test_after_a_long_outage_the_waiting_key_takes_over() -> None:
    slots = [SlotTimes("a", ACTIVE, 0, 600), SlotTimes("b", PREPARED, 300, 900)]
    plan = plan_rotation(700, slots)  # a expired while the server was down
    assert plan.drop == ("a",)
    assert plan.activate == "b"
    assert plan.prepare  # 700 is past b's half life (600)


def test_after_a_longer_outage_everything_is_new() -> None:
    slots = [SlotTimes("a", ACTIVE, 0, 600), SlotTimes("b", PREPARED, 300, 900)]
    plan = plan_rotation(5000, slots)
    assert set(plan.drop) == {"a", "b"}
    assert plan.create_active
    assert not plan.activate


def test_keys_made_ahead_of_a_clock_put_back_are_no_longer_signed_with() -> None:
    # Made while the clock ran ahead (past MAX_CLOCK_SKEW): nothing they sign is valid yet.
    # The active one is retired, not dropped: what it signed verifies once its time comes.
    slots = [SlotTimes("a", ACTIVE, 1000, 1600), SlotTimes("b", PREPARED, 1300, 1900)]
    assert next_event(100, slots) <= 100
    plan = plan_rotation(100, slots)
    assert plan.drop == ("b",)
    assert plan.retire == ("a",)
    assert plan.create_active
    # Once retired and replaced, nothing is pending until the new key's own schedule.
    after = [SlotTimes("a", RETIRED, 1000, 1600), SlotTimes("c", ACTIVE, 90, 690)]
    assert plan_rotation(100, after).empty
    assert next_event(100, after) == 390
    # Within the skew servers may have between them, a key is kept.
    assert plan_rotation(100, [SlotTimes("a", ACTIVE, 130, 700)]).empty


def test_extra_actives_and_waiting_keys_are_cleaned_up() -> None:
    slots = [
        SlotTimes("a1", ACTIVE, 0, 600),
        SlotTimes("a2", ACTIVE, 10, 610),
        SlotTimes("p1", PREPARED, 300, 900),
        SlotTimes("p2", PREPARED, 310, 910),
    ]
    plan = plan_rotation(400, slots)
    assert plan.retire == ("a1",)
    assert plan.drop == ("p1",)
    assert plan.activate is None


# -- the manager across several lifetimes --------------------------------------------------------

CA_TTL = 600
JWT_TTL = 900


def _started_ca(datastore: DataStore, keystore: KeyStore, clock: Clock) -> CaManager:
    manager = CaManager(
        CaConfig(TRUST_DOMAIN, ca_ttl=CA_TTL, jwt_key_ttl=JWT_TTL), datastore, keystore, clock
    )
    manager.initialize()
    return manager


@dataclass
class History:
    created: dict[str, tuple[str, float]] = field(default_factory=dict)  # id -> (status, at)
    activated: dict[str, float] = field(default_factory=dict)
    dropped: dict[str, float] = field(default_factory=dict)
    times: dict[str, KeySlot] = field(default_factory=dict)

    def observe(self, now: float, slots: tuple[KeySlot, ...]) -> None:
        ids = {s.slot_id for s in slots}
        for slot in slots:
            self.times[slot.slot_id] = slot
            if slot.slot_id not in self.created:
                self.created[slot.slot_id] = (slot.status, now)
            if slot.status == ACTIVE and slot.slot_id not in self.activated:
                self.activated[slot.slot_id] = now
        for slot_id in self.created:
            if slot_id not in ids and slot_id not in self.dropped:
                self.dropped[slot_id] = now


def _check_invariants(manager: CaManager, kind: str, now: float) -> None:
    slots = manager.key_slots(kind)
    actives = [s for s in slots if s.status == ACTIVE]
    waiting = [s for s in slots if s.status == PREPARED]
    assert len(actives) == 1, f"{kind}: {len(actives)} active keys at {now}"
    assert len(waiting) <= 1
    active = actives[0]
    assert active.not_before <= now < active.not_after
    assert all(now < s.not_after for s in slots), "an expired key is still published"
    if waiting:
        assert now < activate_at(active.not_before, active.not_after)
    else:
        assert now < prepare_at(active.not_before, active.not_after)


def _check_bundle(manager: CaManager) -> None:
    bundle = manager.bundle()
    x509_slots = manager.key_slots(X509_KIND)
    assert [c.public_bytes(serialization.Encoding.DER) for c in bundle.x509_authorities] == [
        s.public_der for s in x509_slots
    ]
    assert set(bundle.jwt_authorities) == {s.kid for s in manager.key_slots(JWT_KIND)}
    assert manager.x509_signer().ca_certificate in bundle.x509_authorities
    assert manager.jwt_signer().kid in bundle.jwt_authorities


def _can_sign(manager: CaManager, clock: FakeClock, tmp_path: Path | None) -> None:
    key = ec.generate_private_key(ec.SECP256R1())
    leaf = manager.x509_signer().sign_svid(key.public_key(), WORKLOAD, 60)[0]
    issuers = [c for c in manager.bundle().x509_authorities if c.subject == leaf.issuer]
    assert len(issuers) == 1
    leaf.verify_directly_issued_by(issuers[0])
    if tmp_path is not None:
        result = openssl_verify(tmp_path, leaf, manager.bundle().x509_authorities, at=clock.now())
        assert result.returncode == 0, result.stderr
    token = manager.jwt_signer().sign(WORKLOAD, ["db"], 60).token
    kid = jwt.get_unverified_header(token)["kid"]
    claims = jwt.decode(
        token,
        manager.bundle().jwt_authorities[kid],
        algorithms=["ES256"],
        audience="db",
        options={"verify_exp": False},
    )
    assert claims["exp"] > clock.now()


@pytest.fixture
def short_ca(datastore: SqliteDataStore, keystore: KeyStore, clock: FakeClock) -> CaManager:
    return _started_ca(datastore, keystore, clock)


def test_rotation_across_several_lifetimes(
    short_ca: CaManager, clock: FakeClock, keystore: KeyStore, tmp_path: Path
) -> None:
    manager = short_ca
    rotator = Rotator(manager, clock)
    start = clock.now()
    histories = {X509_KIND: History(), JWT_KIND: History()}
    sequences = [manager.bundle().sequence]
    fingerprints = [manager.bundle().to_json()]
    for kind, history in histories.items():
        history.observe(clock.now(), manager.key_slots(kind))
    steps = 0
    # Walk in steps of at most 37 s, landing exactly on every scheduled event as well.
    while clock.now() < start + 4 * JWT_TTL:
        clock.set(min(manager.next_rotation_check(), clock.now() + 37))
        at_event = clock.now() >= manager.next_rotation_check()
        changed = rotator.tick()
        steps += 1
        for kind, history in histories.items():
            history.observe(clock.now(), manager.key_slots(kind))
            _check_invariants(manager, kind, clock.now())
        _check_bundle(manager)
        sequence = manager.bundle().sequence
        if changed:
            assert sequence > sequences[-1], "bundle changed without a new sequence"
            assert manager.bundle().to_json() != fingerprints[-1]
        else:
            assert sequence == sequences[-1]
        sequences.append(sequence)
        fingerprints.append(manager.bundle().to_json())
        _can_sign(manager, clock, tmp_path if at_event and changed else None)
    assert steps > 100

    for kind, ttl in ((X509_KIND, CA_TTL), (JWT_KIND, JWT_TTL)):
        history = histories[kind]
        # >= 3 full lifetimes: at least three keys were born, served, retired and dropped.
        assert len(history.dropped) >= 3, kind
        successors = sorted(history.created, key=lambda i: history.created[i][1])
        for previous, nxt in itertools.pairwise(successors):
            prev = history.times[previous]
            status, born = history.created[nxt]
            assert status == PREPARED, f"{kind}: {nxt} was not prepared first"
            assert born == pytest.approx(prepare_at(prev.not_before, prev.not_after), abs=1)
            if nxt in history.activated:
                assert history.activated[nxt] == pytest.approx(
                    activate_at(prev.not_before, prev.not_after), abs=1
                )
            if previous in history.dropped:
                # Retired keys stay published until they expire, not a moment longer.
                assert history.dropped[previous] == pytest.approx(prev.not_after, abs=1)
        for slot_id in history.times:
            slot = history.times[slot_id]
            assert slot.not_after - slot.not_before == ttl + (10 if kind == X509_KIND else 0)
    # Dropped keys leave the key store too; only live slots keep files.
    live = {s.slot_id for k in (X509_KIND, JWT_KIND) for s in manager.key_slots(k)}
    assert set(keystore.slot_ids()) == live
    assert sequences == sorted(sequences)
    # Each kind publishes on prepare and on drop: at least 4 bundle changes per lifetime.
    assert len(set(sequences)) >= 2 * 4 * 3


def test_prepared_key_is_published_at_once(short_ca: CaManager, clock: FakeClock) -> None:
    active = short_ca.key_slots(X509_KIND)[0]
    clock.set(math.ceil(prepare_at(active.not_before, active.not_after)))
    assert short_ca.rotate()
    prepared = [s for s in short_ca.key_slots(X509_KIND) if s.status == PREPARED]
    assert len(prepared) == 1
    assert len(short_ca.bundle().x509_authorities) == 2
    # ...but the old key still signs until 5/6 of its life.
    assert (
        short_ca.x509_signer().ca_certificate.public_bytes(serialization.Encoding.DER)
        == active.public_der
    )


def test_restart_resumes_the_same_schedule_and_keys(
    short_ca: CaManager,
    datastore: SqliteDataStore,
    keystore: KeyStore,
    clock: FakeClock,
    tmp_path: Path,
) -> None:
    for _ in range(5):
        clock.set(short_ca.next_rotation_check())
        short_ca.rotate()
    before_slots = {k: short_ca.key_slots(k) for k in (X509_KIND, JWT_KIND)}
    before_ca = short_ca.x509_signer().ca_certificate
    before_kid = short_ca.jwt_signer().kid
    before_next = short_ca.next_rotation_check()
    before_seq = short_ca.bundle().sequence
    datastore.close()

    store = SqliteDataStore(tmp_path / "datastore.sqlite3", clock)
    again = _started_ca(store, keystore, clock)
    assert {k: again.key_slots(k) for k in (X509_KIND, JWT_KIND)} == before_slots
    assert again.x509_signer().ca_certificate == before_ca
    assert again.jwt_signer().kid == before_kid
    assert again.next_rotation_check() == before_next
    assert again.bundle().sequence > before_seq
    for _ in range(12):
        clock.set(again.next_rotation_check())
        again.rotate()
        _check_invariants(again, X509_KIND, clock.now())
        _check_invariants(again, JWT_KIND, clock.now())
        _can_sign(again, clock, None)
    store.close()


def test_restart_after_an_outage_catches_up(
    short_ca: CaManager,
    datastore: SqliteDataStore,
    keystore: KeyStore,
    clock: FakeClock,
    tmp_path: Path,
) -> None:
    clock.advance(10 * JWT_TTL)
    again = _started_ca(datastore, keystore, clock)
    for kind in (X509_KIND, JWT_KIND):
        _check_invariants(again, kind, clock.now())
        assert len(again.key_slots(kind)) == 1
    _check_bundle(again)
    _can_sign(again, clock, tmp_path)


def test_keys_made_while_the_clock_ran_ahead_are_replaced_once_it_is_put_right(
    short_ca: CaManager,
    datastore: SqliteDataStore,
    keystore: KeyStore,
    clock: FakeClock,
    tmp_path: Path,
) -> None:
    # A server started with its clock far ahead (an RTC in local time, before NTP synced)
    # drops the keys it finds expired and makes new ones, valid from then on. Started again
    # once the clock was put right, it kept signing with those: every SVID chained to a CA not
    # valid yet, for as long as the clock had been ahead.
    _started_ca(datastore, keystore, FakeClock(clock.now() + 10 * JWT_TTL))  # the start ahead
    clock.advance(60)
    again = _started_ca(datastore, keystore, clock)
    for kind in (X509_KIND, JWT_KIND):
        _check_invariants(again, kind, clock.now())
    _check_bundle(again)
    _can_sign(again, clock, tmp_path)


def test_rotation_survives_a_failing_datastore_write(
    short_ca: CaManager, datastore: SqliteDataStore, keystore: KeyStore, clock: FakeClock
) -> None:
    faulty = FaultInjectingDataStore(datastore)
    manager = _started_ca(faulty, keystore, clock)
    clock.set(manager.next_rotation_check())
    faulty.inject(sqlite3.OperationalError("disk I/O error"), method="save_key_slot")
    with pytest.raises(sqlite3.OperationalError):
        manager.rotate()
    _can_sign(manager, clock, None)  # the current keys keep working
    assert manager.rotate()  # the next tick finishes the job
    _check_invariants(manager, X509_KIND, clock.now())
    _check_invariants(manager, JWT_KIND, clock.now())
    # The key written for the slot that failed to journal was removed again.
    live = {s.slot_id for k in (X509_KIND, JWT_KIND) for s in manager.key_slots(k)}
    assert set(keystore.slot_ids()) == live


def _advance_to_a_drop(manager: CaManager, clock: FakeClock) -> None:
    """Tick until the next tick drops an expired slot, and set the clock to it."""
    while True:
        clock.set(manager.next_rotation_check())
        slots = [s for kind in (X509_KIND, JWT_KIND) for s in manager.key_slots(kind)]
        if any(clock.now() >= s.not_after for s in slots):
            return
        manager.rotate()


def test_a_drop_cut_short_after_the_key_file_is_finished_at_the_next_start(
    short_ca: CaManager, datastore: SqliteDataStore, keystore: KeyStore, clock: FakeClock
) -> None:
    """A dropped slot's key file goes before its row: a tick cut short between the two
    leaves a keyless slot the schedule drops at the next start, which starts (a keyless slot
    that is not due to go refuses the start: a wrong data_dir)."""
    faulty = FaultInjectingDataStore(datastore)
    manager = _started_ca(faulty, keystore, clock)
    _advance_to_a_drop(manager, clock)
    faulty.inject(sqlite3.OperationalError("disk I/O error"), method="delete_key_slot")
    with pytest.raises(sqlite3.OperationalError):
        manager.rotate()
    again = _started_ca(datastore, keystore, clock)
    live = {s.slot_id for k in (X509_KIND, JWT_KIND) for s in again.key_slots(k)}
    assert set(keystore.slot_ids()) == live
    _can_sign(again, clock, None)


def test_a_drop_cut_short_before_the_key_file_leaves_no_key_behind(
    short_ca: CaManager,
    datastore: SqliteDataStore,
    keystore: KeyStore,
    clock: FakeClock,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """Start-up deletes no key file the journal does not name, so a drop must never leave
    one: the row stays until its key file is gone, and the next start finishes the drop."""
    _advance_to_a_drop(short_ca, clock)

    def unlink_fails(slot_id: str) -> None:
        raise OSError(f"cannot remove the key file of {slot_id}")

    with monkeypatch.context() as patch:
        patch.setattr(keystore, "delete", unlink_fails)
        with pytest.raises(OSError, match="cannot remove"):
            short_ca.rotate()
    again = _started_ca(datastore, keystore, clock)
    live = {s.slot_id for k in (X509_KIND, JWT_KIND) for s in again.key_slots(k)}
    assert set(keystore.slot_ids()) == live


def test_a_half_done_tick_is_published_by_the_next(
    short_ca: CaManager, datastore: SqliteDataStore, keystore: KeyStore, clock: FakeClock
) -> None:
    faulty = FaultInjectingDataStore(datastore)
    manager = _started_ca(faulty, keystore, clock)
    sequence = manager.bundle().sequence
    clock.set(manager.next_rotation_check())
    faulty.inject(sqlite3.OperationalError("disk full"), method="next_bundle_sequence")
    with pytest.raises(sqlite3.OperationalError):
        manager.rotate()  # the prepared key is journaled, the bundle not yet republished
    assert manager.bundle().sequence == sequence
    assert manager.rotate()
    assert manager.bundle().sequence == sequence + 1
    assert len(manager.bundle().x509_authorities) == 2


# -- the rotator ---------------------------------------------------------------------------------


def test_tick_does_nothing_before_the_next_check(short_ca: CaManager, clock: FakeClock) -> None:
    rotator = Rotator(short_ca, clock)
    sequence = short_ca.bundle().sequence
    clock.set(short_ca.next_rotation_check() - 1)
    assert not rotator.tick()
    assert short_ca.bundle().sequence == sequence
    clock.advance(1)
    assert rotator.tick()
    assert short_ca.bundle().sequence == sequence + 1


def test_rotator_delay_is_capped(short_ca: CaManager, clock: FakeClock) -> None:
    rotator = Rotator(short_ca, clock, max_sleep=10)
    assert rotator.delay() == 10
    clock.set(short_ca.next_rotation_check() - 3)
    assert rotator.delay() == 3
    clock.advance(100)
    assert rotator.delay() == pytest.approx(0.05)


def test_rotator_run_rotates_and_stops(short_ca: CaManager, clock: FakeClock) -> None:
    async def scenario() -> int:
        stop = asyncio.Event()
        rotator = Rotator(short_ca, clock)
        clock.set(short_ca.next_rotation_check())
        task = asyncio.create_task(rotator.run(stop))
        sequence = short_ca.bundle().sequence
        for _ in range(200):  # bounded wait: the due tick runs after the 0.05 s floor
            if short_ca.bundle().sequence > sequence:
                break
            await asyncio.sleep(0.01)
        stop.set()
        await asyncio.wait_for(task, timeout=5)
        return short_ca.bundle().sequence - sequence

    assert asyncio.run(scenario()) == 1


def _run_rotator_for(rotator: Rotator, seconds: float) -> None:
    async def scenario() -> None:
        stop = asyncio.Event()
        task = asyncio.create_task(rotator.run(stop))
        await asyncio.sleep(seconds)
        stop.set()
        await asyncio.wait_for(task, timeout=5)

    asyncio.run(scenario())


def _due_on_a_faulty_store(
    datastore: SqliteDataStore, keystore: KeyStore, clock: FakeClock
) -> tuple[CaManager, FaultInjectingDataStore]:
    """A CA whose rotation is due, on a store whose faults the test injects."""
    faulty = FaultInjectingDataStore(datastore)
    manager = _started_ca(faulty, keystore, clock)
    clock.set(manager.next_rotation_check())
    return manager, faulty


def test_rotator_backs_off_while_rotation_keeps_failing(
    datastore: SqliteDataStore, keystore: KeyStore, clock: FakeClock
) -> None:
    # A tick that fails leaves its event due: without a back-off the next came 0.05 s later,
    # each making a key and logging a traceback, 20 times a second for the whole outage.
    manager, faulty = _due_on_a_faulty_store(datastore, keystore, clock)
    faulty.inject(sqlite3.OperationalError("disk I/O error"), method="save_key_slot", count=100)
    rotator = Rotator(manager, clock)
    _run_rotator_for(rotator, 0.6)
    assert 100 - faulty.pending() == 1
    assert rotator.delay() >= 1


def test_rotator_retries_a_failed_tick_and_then_rotates(
    datastore: SqliteDataStore, keystore: KeyStore, clock: FakeClock
) -> None:
    manager, faulty = _due_on_a_faulty_store(datastore, keystore, clock)
    sequence = manager.bundle().sequence
    faulty.inject(sqlite3.OperationalError("disk I/O error"), method="save_key_slot")
    rotator = Rotator(manager, clock)
    _run_rotator_for(rotator, 1.5)
    assert faulty.pending() == 0
    assert manager.bundle().sequence == sequence + 1
