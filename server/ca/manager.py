"""The CA manager: owns the X.509 CA and JWT key slots, journals every change to the datastore,
and hands out signers and the bundle. It decides nothing about timing itself (`rotation` does)
and never runs a loop (the `Rotator` ticks it).

Crash safety: a new key is written to the KeyStore (fsynced) before its slot is journaled, so
the journal never names a missing key of a live slot; a slot's key file goes just before its
row when the schedule drops the slot, so the only keyless slot a crash leaves is one the next
tick drops anyway. Any other journaled slot without its key file means the data_dir is not the
one the CA was made in (or its keys were lost): the server refuses to start rather than replace
the trust domain's CA, and it never deletes a key file the journal does not name (a key of
another datastore's CA looks just like the orphan of a cut-short save; only the temporary file
of a save a crash cut short is removed); one whose public record ties it to this journal, a
key made after the backup a restored datastore came from, is journaled again (`adoption`). A
restart always publishes a fresh bundle sequence, because a crash may have landed between a
slot change and its sequence bump.

Shared keys (a key-encryption key given): several servers of one trust domain share ONE CA and
ONE JWT key set, so the bundle and the JWKS hold at most three keys of each kind however many
servers run. Private keys are sealed into their slot rows (server/ca/custody.py). Only the
holder of the datastore lease `ca-rotation` changes the journal (and numbers the bundle); every
server adopts the journal as it stands (`reload`, on each tick and whenever the change feed
says a slot changed) and signs with the slot the journal marks active. A holder that dies
mid-rotation leaves a journal the next holder continues from: the schedule is a pure function
of the slots, and replaying a half-applied plan converges.
"""

from __future__ import annotations

import logging
import math
import os
import secrets
import socket
import threading
import time
import uuid
from collections.abc import Callable, Sequence
from dataclasses import dataclass, replace
from pathlib import Path

from cryptography import x509
from cryptography.hazmat.primitives import serialization

from server.audit import AuditLog, EventKind
from server.ca import rotation
from server.ca.adoption import (
    LINEAGE_DEPTH,
    KeyRecord,
    decode_record,
    encode_record,
    matches_key,
    plan_adoption,
)
from server.ca.authority import UpstreamCa, build_ca_certificate, load_upstream
from server.ca.custody import FileCustody, KeyCustody, SealedCustody
from server.ca.errors import CaConfigError, CaUnavailableError, KeyStoreError, SealedKeyError
from server.ca.keys import (
    DEFAULT_KEY_TYPE,
    KEY_TYPES,
    KeyStore,
    PrivateKey,
    PublicKey,
    generate_key,
    spki_der,
)
from server.ca.sealing import KEK_SETTING, KeyEncryptionKey, sealed_kek_id
from server.ca.signer import JwtSigner, X509Signer
from server.datastore.base import DataStore, LeaseFence
from server.datastore.errors import LeaseLostError
from server.datastore.records import ACTIVE, JWT_KIND, PREPARED, RETIRED, X509_KIND, KeySlot
from svid._bundle import SpiffeBundle
from svid._clock import Clock
from svid._jose import public_key_thumbprint_kid
from svid._spiffe_id import TrustDomain
from svid._x509 import spiffe_id_from_cert

_log = logging.getLogger("svid.server.ca")

MIN_KEY_TTL = 60
DEFAULT_REFRESH_HINT = 300
ROTATION_LEASE = "ca-rotation"
# A server ticks (renews the lease, adopts the journal) every lease_ttl / 3 seconds, so a holder
# misses two ticks before another server takes over; keep it well above clock skew.
DEFAULT_LEASE_TTL = 30
MIN_LEASE_TTL = 3
# Start-up on a journal with no keys yet, while another server holds the lease: how often to look.
STARTUP_POLL_SECONDS = 0.25
# The operator's way out of a refused start whose keys are lost for good (server/cli_ca.py).
FORGET_COMMAND = "svid-server ca forget-lost-keys --config FILE"
FORGET_KEK_COMMAND = "svid-server ca forget-lost-keys --lost-kek --config FILE"


@dataclass(frozen=True, slots=True)
class CaConfig:
    trust_domain: TrustDomain
    ca_ttl: int = 86400
    jwt_key_ttl: int = 86400
    key_type: str = DEFAULT_KEY_TYPE
    upstream_cert: Path | None = None
    upstream_key: Path | None = None
    refresh_hint: int = DEFAULT_REFRESH_HINT
    jwt_key_type: str | None = None  # None: same as key_type
    lease_ttl: int = DEFAULT_LEASE_TTL  # shared keys only: the ca-rotation lease
    jwt_issuer: str | None = None  # the OIDC issuer URL JWT-SVIDs carry as `iss` (server/oauth)

    def __post_init__(self) -> None:
        if isinstance(self.trust_domain, str):
            object.__setattr__(self, "trust_domain", TrustDomain.parse(self.trust_domain))
        for name in ("ca_ttl", "jwt_key_ttl"):
            if getattr(self, name) < MIN_KEY_TTL:
                raise CaConfigError(f"{name}: must be at least {MIN_KEY_TTL} seconds")
        for name in ("key_type", "jwt_key_type"):
            value = getattr(self, name)
            if value is not None and value not in KEY_TYPES:
                raise CaConfigError(f"{name}: must be one of {', '.join(KEY_TYPES)}, got {value!r}")
        if (self.upstream_cert is None) != (self.upstream_key is None):
            raise CaConfigError("upstream_cert and upstream_key must be set together")
        if self.refresh_hint < 0:
            raise CaConfigError("refresh_hint: must not be negative")
        if self.lease_ttl < MIN_LEASE_TTL:
            raise CaConfigError(f"lease_ttl: must be at least {MIN_LEASE_TTL} seconds")


@dataclass(frozen=True, slots=True)
class LostKey:
    """A journaled slot whose private key is neither sealed in the datastore nor at `path`, or
    (`sealed_under` set) is sealed under a key-encryption key other than this server's: the
    hex id of that KEK, lost when the operator says so (`lost_kek_keys`)."""

    slot: KeySlot
    path: Path
    sealed_under: str | None = None


def _times(slots: list[KeySlot]) -> list[rotation.SlotTimes]:
    return [rotation.SlotTimes(s.slot_id, s.status, s.not_before, s.not_after) for s in slots]


def _ca_trust_domain(public_der: bytes) -> TrustDomain | None:
    """The trust domain an X.509 slot's CA certificate names; None for one that names none
    (checked elsewhere, where it is used)."""
    try:
        return spiffe_id_from_cert(x509.load_der_x509_certificate(public_der)).trust_domain
    except (ValueError, IndexError):  # X509SvidError is a ValueError
        return None


def default_holder() -> str:
    """Who this process is in a lease row: readable for an operator, unique per start."""
    return f"{socket.gethostname()}:{os.getpid()}:{secrets.token_hex(4)}"


class CaManager:
    def __init__(
        self,
        config: CaConfig,
        datastore: DataStore,
        keystore: KeyStore,
        clock: Clock,
        *,
        kek: KeyEncryptionKey | None = None,
        holder: str | None = None,
        sleep: Callable[[float], None] = time.sleep,
    ) -> None:
        """`kek` switches to shared keys (sealed in the datastore, rotated by the lease
        holder); `keystore` then only serves to seal the keys of an earlier single server.
        `sleep` waits at start-up for another server's first keys (tests pass a fake)."""
        self._config = config
        self._ds = datastore
        self._keys = keystore
        self._clock = clock
        self._kek = kek
        self._custody: KeyCustody = SealedCustody(kek) if kek else FileCustody(keystore)
        self._holder = holder or default_holder()
        self._sleep = sleep
        self._holds_lease = False
        self._last_sync = -math.inf
        self._upstream: UpstreamCa | None = None
        if config.upstream_cert is not None and config.upstream_key is not None:
            self._upstream = load_upstream(config.upstream_cert, config.upstream_key)
        self._lock = threading.RLock()
        self._slots: dict[str, list[KeySlot]] = {X509_KIND: [], JWT_KIND: []}
        self._x509_signer: X509Signer | None = None
        # Every X.509 CA this server can sign CRLs for, by slot id (x509_crl_signers).
        self._crl_signers: dict[str, X509Signer] = {}
        self._jwt_signer: JwtSigner | None = None
        self._bundle: SpiffeBundle | None = None
        self._published: tuple[tuple[bytes, ...], tuple[tuple[str, bytes], ...]] = ((), ())
        # The slots the published bundle was made of: kept when the journal is read half way
        # through a holder's plan (see _complete).
        self._published_slots: dict[str, list[KeySlot]] = {X509_KIND: [], JWT_KIND: []}
        self._subscribers: list[Callable[[], None]] = []

    @property
    def trust_domain(self) -> TrustDomain:
        return self._config.trust_domain

    @property
    def shared(self) -> bool:
        """True when the keys are sealed in the datastore and shared with other servers."""
        return self._kek is not None

    @property
    def holder(self) -> str:
        return self._holder

    @property
    def holds_rotation_lease(self) -> bool:
        """Whether this server rotated at its last tick (always True for a lone server)."""
        return self._holds_lease or not self.shared

    # -- public API -----------------------------------------------------------------------------

    def initialize(self) -> None:
        """Check every journaled slot's key is at hand (CaConfigError if not), catch up with
        the schedule, create the first keys on a fresh datastore, and publish the bundle.

        Shared keys: seal any key files of an earlier single server into the datastore, check
        every sealed slot was sealed under our KEK, then catch up with the schedule if we get
        the lease, or else adopt the journal (waiting for the holder's first keys, or for its
        lease to lapse, on a fresh datastore)."""
        with self._lock:
            self._check_trust_domain()
            if self._kek is None:
                self._adopt_unjournaled_keys()
                self._check_key_files()
                self._apply_schedule()
                self._publish(self._ds.next_bundle_sequence())
                return
            self._seal_key_files(self._kek)
            self._check_key_files()
            self._check_kek(self._kek)
            owner = self._wait_for_keys()
            while True:
                if owner:
                    try:
                        self._apply_schedule()
                        sequence = self._ds.next_bundle_sequence(fence=self._fence())
                        break
                    except LeaseLostError:
                        self._lost_lease()
                self._read_slots()
                if self._signable():
                    sequence = self._ds.bundle_sequence()
                    break
                # Lost the lease half way through the first keys, or between a drop of an
                # expired key and the activation of the prepared one: the journal holds no key
                # of some kind, or none active, yet. Published, that bundle failed every
                # verification until the next holder's tick; with no active key this server,
                # signing with none yet, failed its start. Wait for (or take over) the
                # holder's keys.
                owner = self._wait_for_keys()
            self._publish(sequence)

    def rotate(self) -> bool:
        """Bring both key kinds in line with the schedule; True when the bundle changed.

        Shared keys: renew (or take) the lease; the holder rotates, every other server only
        adopts the journal as `reload` does."""
        with self._lock:
            if self._bundle is None:
                raise CaUnavailableError("the CA manager is not initialised")
            changed = self._shared_tick() if self.shared else self._rotate_journal(takeover=False)
        return self._notify(changed)

    def _rotate_journal(self, *, takeover: bool) -> bool:
        self._apply_schedule()
        return self._sync_published(owner=True, force=takeover)

    def _shared_tick(self) -> bool:
        self._last_sync = self._clock.now()
        was_holder = self._holds_lease
        if self._take_lease():
            # A new holder numbers a fresh bundle: the last one may have died between its
            # journal writes and its sequence bump.
            try:
                return self._rotate_journal(takeover=not was_holder)
            except LeaseLostError:
                self._lost_lease()
        self._read_slots()
        return self._sync_published(owner=False)

    def reload(self) -> bool:
        """Adopt the key slots as the datastore has them now: new slots join the bundle, gone
        ones leave it, the signers follow the slots marked active. Safe from any thread at any
        time (the change feed calls it when a slot row changes); a no-op before `initialize`.
        True when the bundle changed."""
        with self._lock:
            if self._bundle is None:
                return False
            self._read_slots()
            # A lone server only ever reads back its own writes; shared, the sequence is the
            # one the lease holder stored for these slots.
            changed = self._sync_published(owner=not self.shared)
        return self._notify(changed)

    def close(self) -> None:
        """Hand the rotation lease over at once (a clean shutdown); the keys stay."""
        with self._lock:
            if self.shared and self._holds_lease:
                self._holds_lease = False
                self._ds.release_lease(ROTATION_LEASE, self._holder)
                _log.info("ca-rotation lease released", extra={"holder": self._holder})

    def _notify(self, changed: bool) -> bool:
        with self._lock:
            subscribers = list(self._subscribers) if changed else []
        for callback in subscribers:
            try:
                callback()
            except Exception:
                _log.exception("bundle subscriber failed")
        return changed

    def x509_signer(self) -> X509Signer:
        signer = self._x509_signer
        if signer is None:
            raise CaUnavailableError("no active X.509 CA: the CA manager is not initialised")
        return signer

    def x509_crl_signers(self) -> tuple[X509Signer, ...]:
        """A signer for each X.509 CA whose leaves may still be live and whose key this server
        holds: the active CA, a retired one until it expires (a leaf's NotAfter is capped at
        its CA's) and, shared, the prepared one (see _refresh_crl_signers). A CRL revokes
        only its issuer's certificates, so each CA signs its own."""
        with self._lock:
            signers = tuple(self._crl_signers.values())
        if not signers:
            raise CaUnavailableError("no active X.509 CA: the CA manager is not initialised")
        return signers

    def jwt_signer(self) -> JwtSigner:
        signer = self._jwt_signer
        if signer is None:
            raise CaUnavailableError("no active JWT key: the CA manager is not initialised")
        return signer

    def bundle(self) -> SpiffeBundle:
        bundle = self._bundle
        if bundle is None:
            raise CaUnavailableError("no bundle yet: the CA manager is not initialised")
        return bundle

    def issuing_cas(self) -> tuple[x509.Certificate, ...]:
        """The X.509 CAs whose leaves are this trust domain's own (its agents' SVIDs among
        them): every journaled X.509 slot (a prepared one too, which another server sharing
        the keys may have activated already) and the CA this server signs with. Under an
        upstream root the bundle holds that root alone, which other CAs chain to as well."""
        with self._lock:
            slots = tuple(self._slots[X509_KIND])
        cas = [x509.load_der_x509_certificate(slot.public_der) for slot in slots]
        signer = self._x509_signer
        if signer is not None and signer.ca_certificate not in cas:
            cas.append(signer.ca_certificate)
        return tuple(cas)

    def lost_keys(self) -> tuple[LostKey, ...]:
        """The journaled slots not due to be dropped whose key is neither sealed in the
        datastore nor a file in this data_dir: a live one (active or prepared) this server
        refuses to start on, and a retired one, which stays in the bundle until it expires
        unless the operator forgets it (it verifies the SVIDs it signed, but if its key is
        gone, the operator may rather have them stop verifying, as those of a lost active CA
        do). Reads the datastore as it stands; needs no `initialize`."""
        return tuple(LostKey(slot, self._keys.path(slot.slot_id)) for slot in self._keyless_slots())

    def lost_kek_keys(self) -> tuple[LostKey, ...]:
        """Every journaled slot (retired and due-to-drop ones too: the start checks them all)
        sealed under another key-encryption key than this server's. They are lost only if that
        KEK is: the operator says so; this reads only which KEK sealed each. Empty without a
        KEK of our own."""
        kek = self._kek
        if kek is None:
            return ()
        lost: list[LostKey] = []
        for kind in (X509_KIND, JWT_KIND):
            for slot in self._ds.list_key_slots(kind):
                kek_id = sealed_kek_id(slot.sealed_key) if slot.sealed_key else None
                if kek_id is not None and kek_id != kek.kek_id:
                    lost.append(LostKey(slot, self._keys.path(slot.slot_id), kek_id.hex()))
        return tuple(lost)

    def forget_lost_keys(self, lost: Sequence[LostKey]) -> None:
        """Drop these lost slots from the journal, in one transaction, so the next start makes
        a new CA (or JWT key) as a first start would: the operator's way out when the keys are
        gone for good. Every server on the datastore must be stopped: a running one would
        rotate to a new key of its own. CaConfigError, and nothing dropped, when one of them
        is not lost (any more)."""
        with self._lock:
            still = {item.slot.slot_id for item in (*self.lost_keys(), *self.lost_kek_keys())}
            not_lost = [item.slot.slot_id for item in lost if item.slot.slot_id not in still]
            if not_lost:
                raise CaConfigError(
                    f"key slots {', '.join(not_lost)}: not lost (their key is at hand, or they "
                    "are gone from the datastore); nothing forgotten"
                )
            # Their records first: a key file found again before the next start would
            # otherwise be taken back into the journal (adoption), where the operator was told
            # new keys would be made.
            for item in lost:
                record = self._keys.record_path(item.slot.slot_id)
                try:
                    record.unlink(missing_ok=True)
                except OSError as e:
                    raise CaConfigError(
                        f"cannot delete {record} ({e.strerror}): run this as the server's "
                        "user; nothing forgotten"
                    ) from None
            self._ds.delete_key_slots([item.slot.slot_id for item in lost])
        _log.info(
            "lost key slots forgotten: the next start makes new keys",
            extra={"slot_ids": [item.slot.slot_id for item in lost]},
        )

    def key_slots(self, kind: str) -> tuple[KeySlot, ...]:
        """The journaled slots of one kind as of the last tick (for status output and tests)."""
        with self._lock:
            return tuple(self._slots[kind])

    def subscribe(self, callback: Callable[[], None]) -> Callable[[], None]:
        """Call `callback` (from the thread that rotated or reloaded) after each bundle change;
        returns an unsubscribe function."""
        with self._lock:
            self._subscribers.append(callback)

        def unsubscribe() -> None:
            with self._lock:
                if callback in self._subscribers:
                    self._subscribers.remove(callback)

        return unsubscribe

    def next_rotation_check(self) -> float:
        """Unix time at which `rotate()` has something to do next. Shared keys: at least every
        lease_ttl / 3 (renew the lease, adopt the journal); the schedule's own events only
        for the holder, since no other server acts on them."""
        now = self._clock.now()
        with self._lock:
            due = min(rotation.next_event(now, _times(s)) for s in self._slots.values())
            if not self.shared:
                return due
            sync = self._last_sync + self._config.lease_ttl / 3
            return min(due, sync) if self._holds_lease else sync

    # -- shared keys: the lease and the journal as it stands ------------------------------------

    def _take_lease(self) -> bool:
        now = int(self._clock.now())
        held = self._ds.acquire_lease(ROTATION_LEASE, self._holder, now, self._config.lease_ttl)
        if held != self._holds_lease:
            _log.info(
                "ca-rotation lease taken" if held else "ca-rotation lease lost to another server",
                extra={"holder": self._holder},
            )
        self._holds_lease = held
        return held

    def _fence(self) -> LeaseFence | None:
        """The lease a journal write of the holder's requires, held now by the database's
        reckoning: a holder paused past the lease's life since it took it (a stalled VM, a
        long GC) would otherwise write beside the server that took it over."""
        if not (self.shared and self._holds_lease):
            return None
        return LeaseFence(ROTATION_LEASE, self._holder, int(self._clock.now()))

    def _lost_lease(self) -> None:
        """A journal write refused: the lease went to another server while this one paused.
        What it wrote before stays (the new holder's plan goes on from the journal)."""
        self._holds_lease = False
        _log.warning(
            "ca-rotation lease lost to another server mid-rotation: the rest left to it",
            extra={"holder": self._holder},
        )

    def _read_slots(self) -> None:
        for kind in (X509_KIND, JWT_KIND):
            self._slots[kind] = self._ds.list_key_slots(kind)

    def _wait_for_keys(self) -> bool:
        """Start-up: True as the lease holder; False once the journal has an active key of each
        kind from another server. Waits (bounded) while neither is true: on a fresh datastore
        the holder is still making the first keys, or died doing so and its lease must lapse."""
        self._last_sync = self._clock.now()
        attempts = math.ceil((self._config.lease_ttl * 4 / 3) / STARTUP_POLL_SECONDS) + 1
        for attempt in range(attempts):
            if self._take_lease():
                return True
            self._read_slots()
            if self._signable():
                return False
            if attempt == 0:
                _log.info("waiting for the ca-rotation lease holder's first keys")
            self._sleep(STARTUP_POLL_SECONDS)
            self._last_sync = self._clock.now()
        raise CaUnavailableError(
            "no active CA and JWT key in the datastore, and another server holds the "
            f"{ROTATION_LEASE} lease without making them; retry later"
        )

    def _sync_published(self, *, owner: bool, force: bool = False) -> bool:
        """Publish the slots in `_slots` when they differ from the published bundle. The
        owner (a lone server, or the lease holder) changed the journal and numbers the new
        bundle; any other server takes the number the owner stored, so every server
        publishes the same bundle under the same sequence."""
        assert self._bundle is not None
        if not self._complete():
            # Read between a holder's drop of the last keys and its making of the next (or
            # the holder lost its lease between the two): published, a bundle with no X.509
            # authority or no JWT key failed every workload's verification until the next
            # tick. Keep the bundle and the signers as they are.
            _log.warning(
                "key journal without a key of each kind (a rotation under way): the bundle "
                "stays as published",
                extra={"x509": len(self._slots[X509_KIND]), "jwt": len(self._slots[JWT_KIND])},
            )
            self._slots = {kind: list(slots) for kind, slots in self._published_slots.items()}
            return False
        if owner:
            # Compared with what was last *published*, so a tick that failed half-way (slots
            # journaled, sequence not bumped) is published by the next one.
            if force or self._fingerprint() != self._published:
                # Fenced as the journal's writes are: a holder paused past its lease between
                # its plan and this numbered its old slots above the new holder's bundle, and
                # agents took the stale bundle as the newest.
                self._publish(self._ds.next_bundle_sequence(fence=self._fence()))
                return True
        else:
            sequence = self._ds.bundle_sequence()
            if self._fingerprint() != self._published or sequence != self._bundle.sequence:
                self._publish(sequence)
                return True
        self._refresh_signers()
        return False

    def _seal_key_files(self, kek: KeyEncryptionKey) -> None:
        """Switching a single server to shared keys keeps its trust bundle: each journaled key
        it holds as a file is sealed into its slot row, then the file goes (one copy, in the
        datastore, under the KEK)."""
        for kind in (X509_KIND, JWT_KIND):
            for slot in self._ds.list_key_slots(kind):
                if not self._keys.exists(slot.slot_id):
                    continue
                if not slot.sealed_key:
                    key = self._keys.load(slot.slot_id)
                    sealed = kek.seal(key, slot.slot_id, slot.kind, slot.kid)
                    self._ds.save_key_slot(replace(slot, sealed_key=sealed), fence=self._fence())
                    _log.info("key sealed into the datastore", extra={"slot_id": slot.slot_id})
                self._keys.delete(slot.slot_id)

    def _check_kek(self, kek: KeyEncryptionKey) -> None:
        """Every sealed slot must be sealed under our KEK; refused, all named at once, when not:
        either this is the wrong file, or the KEK they were sealed under is lost."""
        elsewhere = self.lost_kek_keys()
        if elsewhere:
            slots = ", ".join(f"{i.slot.slot_id} (key id {i.sealed_under})" for i in elsewhere)
            raise CaConfigError(
                f"{KEK_SETTING}: {kek.source} is not the key-encryption key the datastore's "
                f"keys are sealed with (this file is key id {kek.kek_id.hex()}; key slots "
                f"{slots}). Give this server the trust domain's key-encryption key (the file "
                "the other servers on this datastore read). If that key is lost for good, so "
                f"are the keys sealed under it: `{FORGET_KEK_COMMAND}` (every server stopped, "
                "this new key in the config) forgets them, and the next start makes a new CA "
                "and JWT key, whose bundle every agent must then be given"
            )
        for kind in (X509_KIND, JWT_KIND):
            for slot in self._ds.list_key_slots(kind):
                if slot.sealed_key:
                    kek.check_sealed_here(slot.sealed_key, slot.slot_id)

    # -- schedule -------------------------------------------------------------------------------

    def _apply_schedule(self) -> None:
        now = self._clock.now()
        for kind in (X509_KIND, JWT_KIND):
            slots = self._ds.list_key_slots(kind)
            if self.shared:
                slots = self._drop_unsealed(kind, slots)
            plan = rotation.plan_rotation(now, _times(slots))
            if not plan.empty:
                self._apply_plan(kind, slots, plan, int(now))
                slots = self._ds.list_key_slots(kind)
            self._slots[kind] = slots

    def _apply_plan(
        self, kind: str, slots: list[KeySlot], plan: rotation.RotationPlan, now: int
    ) -> None:
        by_id = {s.slot_id: s for s in slots}
        for slot_id in plan.drop:
            # The key first: a crash between the two leaves a slot this plan drops again at
            # the next start, never a key file the journal no longer names.
            self._custody.forget(slot_id)
            self._ds.delete_key_slot(slot_id, fence=self._fence())
            _log.info("key dropped", extra={"kind": kind, "slot_id": slot_id})
        # Activate before retiring: a reader between the two writes sees two active slots and
        # signs with the newer, never none (and a replay retires the older one).
        if plan.activate is not None:
            self._set_status(by_id[plan.activate], ACTIVE)
        for slot_id in plan.retire:
            self._set_status(by_id[slot_id], RETIRED)
        if plan.create_active:
            self._create_slot(kind, ACTIVE, now)
        if plan.prepare:
            self._create_slot(kind, PREPARED, now)

    def _drop_unsealed(self, kind: str, slots: list[KeySlot]) -> list[KeySlot]:
        """Shared keys: a slot with no sealed key is one no server can sign with (its key file,
        if any, sat on a server that never sealed it): the holder drops it. Start-up already
        refused a live one missing here (`_check_key_files`), so this drops a retired one, or
        one a server without the key-encryption key wrote since."""
        kept = []
        for slot in slots:
            if slot.sealed_key:
                kept.append(slot)
                continue
            _log.warning(
                "key slot has no sealed key: dropping it",
                extra={"kind": kind, "slot_id": slot.slot_id},
            )
            self._ds.delete_key_slot(slot.slot_id, fence=self._fence())
        return kept

    def _set_status(self, slot: KeySlot, status: str) -> None:
        self._ds.save_key_slot(replace(slot, status=status), fence=self._fence())
        _log.info("key %s", status, extra={"kind": slot.kind, "slot_id": slot.slot_id})

    def _create_slot(self, kind: str, status: str, now: int) -> KeySlot:
        slot_id = uuid.uuid4().hex
        cfg = self._config
        if kind == X509_KIND:
            key = generate_key(cfg.key_type)
            cert = build_ca_certificate(
                cfg.trust_domain, slot_id, key, now=now, ttl=cfg.ca_ttl, upstream=self._upstream
            )
            ski = cert.extensions.get_extension_for_class(x509.SubjectKeyIdentifier).value
            slot = KeySlot(
                slot_id=slot_id,
                kind=kind,
                status=status,
                public_der=cert.public_bytes(serialization.Encoding.DER),
                kid=ski.digest.hex(),
                not_before=int(cert.not_valid_before_utc.timestamp()),
                not_after=int(cert.not_valid_after_utc.timestamp()),
                created_at=now,
            )
        else:
            key = generate_key(cfg.jwt_key_type or cfg.key_type)
            public: PublicKey = key.public_key()
            slot = KeySlot(
                slot_id=slot_id,
                kind=kind,
                status=status,
                public_der=spki_der(public),
                kid=public_key_thumbprint_kid(public),
                not_before=now,
                not_after=now + cfg.jwt_key_ttl,
                created_at=now,
            )
        if self._kek is None:
            record = encode_record(slot, self._lineage(kind), self._endorser(kind))
            self._keys.save_record(slot_id, record)
        try:
            slot = self._custody.keep(slot, key)
            self._ds.save_key_slot(slot, fence=self._fence())
        except BaseException:
            self._custody.forget(slot_id)  # never journaled: the file would be an orphan
            raise
        _log.info(
            "key created",
            extra={"kind": kind, "slot_id": slot_id, "status": status, "not_after": slot.not_after},
        )
        return slot

    # -- start-up hygiene -----------------------------------------------------------------------

    def _check_trust_domain(self) -> None:
        """The datastore's CAs are the configured trust domain's. A server started on another
        trust domain's datastore (trust_domain mistyped, or changed on a data_dir in use) ran on
        that CA: its agents refused it as another trust domain's server, and the entries and
        agents in the datastore were out of its sight, listed as none."""
        for slot in self._ds.list_key_slots(X509_KIND):
            named = _ca_trust_domain(slot.public_der)
            if named is not None and named != self.trust_domain:
                raise CaConfigError(
                    f"trust_domain: {self.trust_domain}, but the datastore is trust domain "
                    f"{named}'s (its CA, key slot {slot.slot_id}, names {named}): set "
                    f'trust_domain = "{named}", or give {self.trust_domain} a datastore of its '
                    "own (another data_dir or datastore)"
                )

    def _check_key_files(self) -> None:
        """Every journaled slot's private key must be at hand: sealed in its row, or (unsealed)
        a file in this server's KeyStore. A live slot without either is refused, never dropped:
        dropping it made a new CA for the trust domain, and the next start with the right
        data_dir found the real keys unnamed (an operator whose keys are truly lost drops it
        with `forget_lost_keys`). A retired one is kept with a warning (it signs only its own
        CRLs until it expires); one the schedule drops now is no loss."""
        for kind in (X509_KIND, JWT_KIND):
            for slot in self._ds.list_key_slots(kind):
                if slot.sealed_key:
                    self._check_sealed_usable(slot)
        for slot in self._keyless_slots():
            self._refuse_or_warn_keyless(slot)
        self._report_unknown_key_files()

    def _endorser(self, kind: str) -> tuple[KeySlot, PrivateKey, KeyRecord | None] | None:
        """The slot of `kind` active now, its key and its record: they sign the record of a
        key made now (None when none is at hand: that record is never taken back)."""
        for slot in sorted(self._ds.list_key_slots(kind), key=lambda s: -s.created_at):
            if slot.status == ACTIVE and not slot.sealed_key:
                try:
                    key = self._keys.load(slot.slot_id)
                    data = self._keys.load_record(slot.slot_id)
                except (KeyStoreError, OSError) as exc:
                    # Found only at a restore otherwise: the new key is never taken back.
                    _log.warning(
                        "active key file unreadable: the record of the key made now is signed "
                        "by none, and a datastore restored from before it will not take it back",
                        extra={"kind": kind, "slot_id": slot.slot_id, "error": str(exc)},
                    )
                    return None
                record = decode_record(slot.slot_id, data) if data is not None else None
                return slot, key, record
        return None

    def _lineage(self, kind: str) -> list[str]:
        """The slots a key made now descends from, newest first: those journaled now and,
        from their records, theirs, so a restored journal whose slots were all dropped since
        its backup still links to the keys made after it (bounded: a backup older than
        LINEAGE_DEPTH rotations takes no key back)."""
        slots = sorted(self._ds.list_key_slots(kind), key=lambda s: -s.created_at)
        lineage = [slot.slot_id for slot in slots]
        for slot in slots:
            data = self._keys.load_record(slot.slot_id)
            record = decode_record(slot.slot_id, data) if data is not None else None
            if record is not None:
                lineage.extend(s for s in record.lineage if s not in lineage)
        return lineage[:LINEAGE_DEPTH]

    def _adopt_unjournaled_keys(self) -> None:
        """Journal again the key files a datastore restored from before their making lacks
        (server/ca/adoption.py says which, and why no others)."""
        journal = {kind: self._ds.list_key_slots(kind) for kind in (X509_KIND, JWT_KIND)}
        named = {slot.slot_id for slots in journal.values() for slot in slots}
        records: dict[str, list[KeyRecord]] = {X509_KIND: [], JWT_KIND: []}
        for slot_id in self._keys.slot_ids():
            if slot_id in named:
                continue
            record = self._checked_record(slot_id)
            if record is not None and record.slot.kind in records:
                records[record.slot.kind].append(record)
        now = self._clock.now()
        plans = {kind: plan_adoption(now, slots, records[kind]) for kind, slots in journal.items()}
        taken = [slot for slots in plans.values() for slot in slots]
        if taken:
            self._audit_taken_back(taken, named)
        for kind, slots in plans.items():
            for slot in slots:
                self._ds.save_key_slot(slot, fence=self._fence())
                _log.warning(
                    "key the datastore journals as prepared was activated since, as the keys "
                    "taken back after it show"
                    if slot.slot_id in named
                    else "key the datastore did not journal taken back from its files (a "
                    "datastore restored from before its making)",
                    extra={"kind": kind, "slot_id": slot.slot_id, "status": slot.status},
                )

    def _audit_taken_back(self, slots: Sequence[KeySlot], named: set[str]) -> None:
        """The audit event first: which CA signs changes with no operator's command, so the
        audit log says it (if it cannot be written, nothing is taken back and the start
        fails)."""
        AuditLog(self._ds, self._clock).append(
            EventKind.CA_KEYS_TAKEN_BACK,
            action="take_back_keys",
            decision="taken_back",
            reason="a datastore restored from before the making of these keys: journaled "
            "again from their key files and records",
            extra={
                "slots": [
                    {
                        "slot_id": slot.slot_id,
                        "kind": slot.kind,
                        "status": slot.status,
                        "journaled": slot.slot_id in named,
                        "key_file": str(self._keys.path(slot.slot_id)),
                    }
                    for slot in slots
                ]
            },
        )

    def _checked_record(self, slot_id: str) -> KeyRecord | None:
        try:
            data = self._keys.load_record(slot_id)
            record = decode_record(slot_id, data) if data is not None else None
            if record is None:
                return None
            key = self._keys.load(slot_id)
        except (KeyStoreError, OSError):
            return None
        if not matches_key(record.slot, key, self.trust_domain, self._upstream):
            _log.warning(
                "key file whose record does not match it, or not one this CA made: not used",
                extra={"slot_id": slot_id, "path": str(self._keys.record_path(slot_id))},
            )
            return None
        return record

    def _keyless_slots(self) -> list[KeySlot]:
        """Journaled slots with no sealed key and no key file here, but for those the schedule
        drops now anyway."""
        now = self._clock.now()
        keyless: list[KeySlot] = []
        for kind in (X509_KIND, JWT_KIND):
            slots = self._ds.list_key_slots(kind)
            dropping = set(rotation.plan_rotation(now, _times(slots)).drop)
            keyless.extend(
                slot
                for slot in slots
                if not slot.sealed_key
                and slot.slot_id not in dropping
                and not self._keys.exists(slot.slot_id)
            )
        return keyless

    def _check_sealed_usable(self, slot: KeySlot) -> None:
        if self._kek is None and not self._keys.exists(slot.slot_id):
            # Never drop a shared key: the other servers sign with it.
            raise CaConfigError(
                f"{KEK_SETTING}: required: key slot {slot.slot_id} is sealed in the "
                "datastore (its keys are shared by several servers); give this server the "
                "trust domain's key-encryption key (lost for good: give it a new one from "
                f"`svid-server keys new-kek`, then `{FORGET_KEK_COMMAND}`)"
            )

    def _refuse_or_warn_keyless(self, slot: KeySlot) -> None:
        path = self._keys.path(slot.slot_id)
        if slot.status == RETIRED:
            _log.warning(
                "key file of a retired slot missing: it signs no CRL, and stays in the bundle "
                "until it expires (or until `%s` forgets it)",
                FORGET_COMMAND,
                extra={"kind": slot.kind, "slot_id": slot.slot_id, "path": str(path)},
            )
            return
        raise CaConfigError(
            f"key file {path} of the {slot.status} {slot.kind} key slot {slot.slot_id} in the "
            f"datastore is missing: data_dir {self._keys.directory.parent} does not hold this "
            "datastore's CA keys. Start the server with the data_dir they were made in (or "
            "restore its keys there); the server does not replace the trust domain's CA. If "
            f"the keys are lost for good: `{FORGET_COMMAND}` (with every server stopped) makes "
            "the next start create a new CA, whose bundle every agent must then be given"
        )

    def _report_unknown_key_files(self) -> None:
        """Only the temporary file of a cut-short save is deleted: it holds a key no slot ever
        named. A key file the journal does not name stays, whatever it is: the orphan of a save
        whose slot never made it into the journal, or the CA of another datastore that this
        data_dir also serves (a wrong `datastore` must not cost that CA its keys)."""
        self._keys.remove_unfinished()
        known = {s.slot_id for k in (X509_KIND, JWT_KIND) for s in self._ds.list_key_slots(k)}
        unknown = [slot_id for slot_id in self._keys.slot_ids() if slot_id not in known]
        if unknown:
            _log.warning(
                "key files no slot in the datastore names: kept (delete them by hand if they "
                "belong to no datastore's CA)",
                extra={"directory": str(self._keys.directory), "slot_ids": unknown},
            )

    # -- signers and bundle ---------------------------------------------------------------------

    def _active(self, kind: str) -> KeySlot | None:
        """The newest slot marked active (two only between a holder's activate and retire)."""
        actives = [slot for slot in self._slots[kind] if slot.status == ACTIVE]
        return actives[-1] if actives else None

    def _load_key(self, slot: KeySlot) -> PrivateKey:
        try:
            return self._custody.load(slot)
        except SealedKeyError:
            raise  # names the slot whose row is bad: not a "try again"
        except KeyStoreError as exc:
            raise CaUnavailableError(str(exc)) from None

    def _refresh_signers(self) -> None:
        """Sign with the slots marked active. With none marked (never for a lone server after
        its schedule ran), keep the current signer: its key stays published until it expires."""
        x509_slot = self._active(X509_KIND)
        jwt_slot = self._active(JWT_KIND)
        if (x509_slot is None and self._x509_signer is None) or (
            jwt_slot is None and self._jwt_signer is None
        ):
            raise CaUnavailableError("no active key slot in the datastore")
        current = self._x509_signer
        if x509_slot is not None and (
            current is None
            or current.ca_certificate.public_bytes(serialization.Encoding.DER)
            != x509_slot.public_der
        ):
            chain_above = self._upstream.intermediates if self._upstream else ()
            self._x509_signer = X509Signer(
                x509.load_der_x509_certificate(x509_slot.public_der),
                self._load_key(x509_slot),
                chain_above,
                self._clock,
            )
            _log.info("X.509 CA active", extra={"slot_id": x509_slot.slot_id})
        self._refresh_crl_signers()
        if jwt_slot is not None and (
            self._jwt_signer is None or self._jwt_signer.kid != jwt_slot.kid
        ):
            self._jwt_signer = JwtSigner(
                self._load_key(jwt_slot),
                jwt_slot.kid,
                self._clock,
                jwt_slot.not_after,
                self._config.jwt_issuer,
            )
            _log.info("JWT key active", extra={"slot_id": jwt_slot.slot_id, "kid": jwt_slot.kid})

    def _refresh_crl_signers(self) -> None:
        """One signer per X.509 slot that may have issued a live leaf, reusing those already
        built. A lone server's prepared slot has issued nothing; a shared one may be issuing
        already, activated by the holder before this server adopted it: its revoked leaves
        were then in none of this server's CRLs, and adopting the activation changed no
        bundle, so no new CRL reached this server's agents until the refresh half a CRL's
        life on. A key that cannot be loaded costs only its own CA's CRL, never the active
        CA's."""
        active = self._x509_signer
        signers: dict[str, X509Signer] = {}
        for slot in self._slots[X509_KIND]:
            if slot.status == PREPARED and not self.shared:
                continue
            known = self._crl_signers.get(slot.slot_id)
            if known is not None:
                signers[slot.slot_id] = known
                continue
            cert = x509.load_der_x509_certificate(slot.public_der)
            if active is not None and active.ca_certificate == cert:
                signers[slot.slot_id] = active
                continue
            try:
                key = self._load_key(slot)
            except (CaUnavailableError, SealedKeyError) as exc:
                _log.warning(
                    "cannot sign CRLs for this CA: its key does not load",
                    extra={"slot_id": slot.slot_id, "error": str(exc)},
                )
                continue
            chain_above = self._upstream.intermediates if self._upstream else ()
            signers[slot.slot_id] = X509Signer(cert, key, chain_above, self._clock)
        if active is not None and all(s is not active for s in signers.values()):
            # Signing on with no slot marked active (see above): it still issues.
            signers[""] = active
        with self._lock:
            self._crl_signers = signers

    def _authorities(self) -> tuple[x509.Certificate, ...]:
        if self._upstream is not None:
            return (self._upstream.root,)
        return tuple(x509.load_der_x509_certificate(s.public_der) for s in self._slots[X509_KIND])

    def _jwt_keys(self) -> dict[str, PublicKey]:
        keys: dict[str, PublicKey] = {}
        for slot in self._slots[JWT_KIND]:
            key = serialization.load_der_public_key(slot.public_der)
            keys[slot.kid] = key  # type: ignore[assignment]
        return keys

    def _fingerprint(self) -> tuple[tuple[bytes, ...], tuple[tuple[str, bytes], ...]]:
        x509_part = (
            ()
            if self._upstream is not None
            else tuple(s.public_der for s in self._slots[X509_KIND])
        )
        jwt_part = tuple(sorted((s.kid, s.public_der) for s in self._slots[JWT_KIND]))
        return x509_part, jwt_part

    def _signable(self) -> bool:
        """Whether `_slots` mark a key of each kind active: one a server starting on them
        signs with."""
        return all(self._active(kind) is not None for kind in (X509_KIND, JWT_KIND))

    def _complete(self) -> bool:
        """Whether `_slots` make a bundle agents can verify with: at least one X.509
        authority (the upstream root, under one) and one JWT key."""
        x509_ok = self._upstream is not None or bool(self._slots[X509_KIND])
        return x509_ok and bool(self._slots[JWT_KIND])

    def _publish(self, sequence: int) -> None:
        if not self._complete():
            raise CaUnavailableError("no X.509 authority or no JWT key in the key journal")
        self._refresh_signers()
        self._published = self._fingerprint()
        self._published_slots = {kind: list(slots) for kind, slots in self._slots.items()}
        self._bundle = SpiffeBundle(
            trust_domain=self._config.trust_domain,
            x509_authorities=self._authorities(),
            jwt_authorities=self._jwt_keys(),
            sequence=sequence,
            refresh_hint=self._config.refresh_hint,
        )
        _log.info(
            "bundle published",
            extra={
                "sequence": sequence,
                "x509_authorities": len(self._bundle.x509_authorities),
                "jwt_authorities": len(self._bundle.jwt_authorities),
            },
        )
