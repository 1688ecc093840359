"""The CA manager: owns the X.509 CA and JWT key slots, journals every change to the datastore,
and hands out signers and the bundle. It decides nothing about timing itself (`rotation` does)
and never runs a loop (the `Rotator` ticks it).

Crash safety: a new key is written to the KeyStore (fsynced) before its slot is journaled, and a
slot is deleted from the journal before its key file, so the journal never names a missing key
(a key file with no slot is an orphan, removed at start-up). A restart always publishes a fresh
bundle sequence, because a crash may have landed between a slot change and its sequence bump.
"""

from __future__ import annotations

import logging
import threading
import uuid
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from cryptography import x509
from cryptography.hazmat.primitives import serialization

from server.ca import rotation
from server.ca.authority import UpstreamCa, build_ca_certificate, load_upstream
from server.ca.errors import CaConfigError, CaUnavailableError, KeyStoreError
from server.ca.keys import (
    DEFAULT_KEY_TYPE,
    KEY_TYPES,
    KeyStore,
    PrivateKey,
    PublicKey,
    generate_key,
    spki_der,
)
from server.ca.signer import JwtSigner, X509Signer
from server.datastore.base import DataStore
from server.datastore.records import ACTIVE, JWT_KIND, PREPARED, RETIRED, X509_KIND, KeySlot
from svid._bundle import SpiffeBundle
from svid._clock import Clock
from svid._jose import public_key_thumbprint_kid
from svid._spiffe_id import TrustDomain

_log = logging.getLogger("svid.server.ca")

MIN_KEY_TTL = 60
DEFAULT_REFRESH_HINT = 300


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


def _times(slots: list[KeySlot]) -> list[rotation.SlotTimes]:
    return [rotation.SlotTimes(s.slot_id, s.status, s.not_before, s.not_after) for s in slots]


class CaManager:
    def __init__(
        self, config: CaConfig, datastore: DataStore, keystore: KeyStore, clock: Clock
    ) -> None:
        self._config = config
        self._ds = datastore
        self._keys = keystore
        self._clock = clock
        self._upstream: UpstreamCa | None = None
        if config.upstream_cert is not None and config.upstream_key is not None:
            self._upstream = load_upstream(config.upstream_cert, config.upstream_key)
        self._lock = threading.RLock()
        self._slots: dict[str, list[KeySlot]] = {X509_KIND: [], JWT_KIND: []}
        self._x509_signer: X509Signer | None = None
        self._jwt_signer: JwtSigner | None = None
        self._bundle: SpiffeBundle | None = None
        self._published: tuple[tuple[bytes, ...], tuple[tuple[str, bytes], ...]] = ((), ())
        self._subscribers: list[Callable[[], None]] = []

    @property
    def trust_domain(self) -> TrustDomain:
        return self._config.trust_domain

    # -- public API -----------------------------------------------------------------------------

    def initialize(self) -> None:
        """Load the journal (dropping slots whose key file is gone), catch up with the schedule,
        create the first keys on a fresh datastore, and publish the bundle."""
        with self._lock:
            for kind in (X509_KIND, JWT_KIND):
                self._forget_keyless_slots(kind)
            self._remove_orphan_key_files()
            self._apply_schedule()
            self._publish(self._ds.next_bundle_sequence())

    def rotate(self) -> bool:
        """Bring both key kinds in line with the schedule; True when the bundle changed."""
        with self._lock:
            if self._bundle is None:
                raise CaUnavailableError("the CA manager is not initialised")
            self._apply_schedule()
            # Compared with what was last *published*, so a tick that failed half-way (slots
            # journaled, sequence not bumped) is published by the next one.
            changed = self._fingerprint() != self._published
            if changed:
                self._publish(self._ds.next_bundle_sequence())
            else:
                self._refresh_signers()
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

    def key_slots(self, kind: str) -> tuple[KeySlot, ...]:
        """The journaled slots of one kind as of the last tick (for status output and tests)."""
        with self._lock:
            return tuple(self._slots[kind])

    def subscribe(self, callback: Callable[[], None]) -> Callable[[], None]:
        """Call `callback` (from the rotating thread) after each bundle change; returns an
        unsubscribe function."""
        with self._lock:
            self._subscribers.append(callback)

        def unsubscribe() -> None:
            with self._lock:
                if callback in self._subscribers:
                    self._subscribers.remove(callback)

        return unsubscribe

    def next_rotation_check(self) -> float:
        """Unix time at which `rotate()` has something to do next."""
        now = self._clock.now()
        with self._lock:
            return min(rotation.next_event(now, _times(s)) for s in self._slots.values())

    # -- schedule -------------------------------------------------------------------------------

    def _apply_schedule(self) -> None:
        now = self._clock.now()
        for kind in (X509_KIND, JWT_KIND):
            slots = self._ds.list_key_slots(kind)
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
            self._ds.delete_key_slot(slot_id)
            self._keys.delete(slot_id)
            _log.info("key dropped", extra={"kind": kind, "slot_id": slot_id})
        for slot_id in plan.retire:
            self._set_status(by_id[slot_id], RETIRED)
        if plan.activate is not None:
            self._set_status(by_id[plan.activate], ACTIVE)
        if plan.create_active:
            self._create_slot(kind, ACTIVE, now)
        if plan.prepare:
            self._create_slot(kind, PREPARED, now)

    def _set_status(self, slot: KeySlot, status: str) -> None:
        self._ds.save_key_slot(
            KeySlot(
                slot.slot_id,
                slot.kind,
                status,
                slot.public_der,
                slot.kid,
                slot.not_before,
                slot.not_after,
                slot.created_at,
            )
        )
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
        self._keys.save(slot_id, key)
        try:
            self._ds.save_key_slot(slot)
        except BaseException:
            self._keys.delete(slot_id)  # never journaled: the file would be an orphan
            raise
        _log.info(
            "key created",
            extra={"kind": kind, "slot_id": slot_id, "status": status, "not_after": slot.not_after},
        )
        return slot

    # -- start-up hygiene -----------------------------------------------------------------------

    def _forget_keyless_slots(self, kind: str) -> None:
        for slot in self._ds.list_key_slots(kind):
            if not self._keys.exists(slot.slot_id):
                _log.warning(
                    "key file missing: dropping its slot",
                    extra={"kind": kind, "slot_id": slot.slot_id},
                )
                self._ds.delete_key_slot(slot.slot_id)

    def _remove_orphan_key_files(self) -> None:
        known = {s.slot_id for k in (X509_KIND, JWT_KIND) for s in self._ds.list_key_slots(k)}
        for slot_id in self._keys.slot_ids():
            if slot_id not in known:
                self._keys.delete(slot_id)

    # -- signers and bundle ---------------------------------------------------------------------

    def _active(self, kind: str) -> KeySlot:
        for slot in self._slots[kind]:
            if slot.status == ACTIVE:
                return slot
        raise CaUnavailableError(f"no active {kind} key slot")

    def _load_key(self, slot: KeySlot) -> PrivateKey:
        try:
            return self._keys.load(slot.slot_id)
        except KeyStoreError as exc:
            raise CaUnavailableError(str(exc)) from None

    def _refresh_signers(self) -> None:
        x509_slot = self._active(X509_KIND)
        current = self._x509_signer
        if (
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
        jwt_slot = self._active(JWT_KIND)
        if self._jwt_signer is None or self._jwt_signer.kid != jwt_slot.kid:
            self._jwt_signer = JwtSigner(
                self._load_key(jwt_slot),
                jwt_slot.kid,
                self._clock,
                jwt_slot.not_after,
                self._config.jwt_issuer,
            )
            _log.info("JWT key active", extra={"slot_id": jwt_slot.slot_id, "kid": jwt_slot.kid})

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

    def _publish(self, sequence: int) -> None:
        self._refresh_signers()
        self._published = self._fingerprint()
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
