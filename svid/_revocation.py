"""The revocation set verifiers consult: X.509 serials and JWT ids, each kept until no verifier
can accept the credential any more (its expiry plus `MAX_VERIFIER_LEEWAY`).

Reads happen on every verification, so they take no lock: writers build a new dict and swap the
reference (copy-on-write), and a reader always sees one whole version.

An X.509 serial names a certificate only together with its issuer (RFC 5280 4.1.2.2). A CRL's
entries therefore revoke only certificates of the CRL's issuer (a `CertIssuer`); a serial the
agent's revocation list sends bare (its own server's) revokes that serial under any issuer.
"""

from __future__ import annotations

import math
import threading
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from types import MappingProxyType
from typing import Protocol, TypeVar

from cryptography import x509

from svid._clock import ElapsedCount
from svid._der import tbs_names
from svid._errors import StaleRevocationsError, SvidError

KIND_X509_SERIAL = "x509_serial"
KIND_JWT_ID = "jwt_id"
# No credential: a task ENDED (value: its id, its tokens' txn; spiffe_id: its SPIFFE ID). Each
# credential of it is revoked on its own; this says everything of the task is over, though
# one of its tokens expired before the end (not revoked) or it never had an X.509-SVID, where
# a token of its SPIFFE ID revoked alone may be one delegated from it, the task going on. It
# revokes no credential here: it is for on_revoked subscribers (svid._open_requests) and task
# clients (svid._task_revocations).
KIND_TASK = "task"

# The widest clock-skew leeway a verifier may apply past a credential's expiry, in seconds. A
# verifier accepts a token until exp + its leeway, so a revocation must outlive exp by at least
# that much or the revoked token is good again for the tail; the server and this set keep every
# revocation until exp + this, and JwtVerifier refuses a wider leeway. 300 s covers go-jose's
# 60 s default five times over and any sane skew between NTP-synced hosts; wider would let an
# expired token live on for minutes, which the minute-scale TTLs are meant to prevent.
MAX_VERIFIER_LEEWAY = 300.0

# How far apart the clocks of two servers sharing a datastore, or of a server and a verifier, may
# be (NTP keeps hosts well within a second; this covers a host whose sync lapsed for a while).
# What a server prunes by its own clock another server, or a verifier, may still need by theirs:
# every prune of a record that stays needed until some time ("expired" by a clock) waits this
# much longer, so a server whose clock runs ahead never drops it early.
MAX_CLOCK_SKEW = 60.0


def revocation_needed(expires_at: float, now: float) -> bool:
    """Whether some verifier may still accept a credential expiring at ``expires_at``.

    A verifier accepts up to and including exp + leeway, so the revocation is needed through
    that very second.
    """
    return now <= expires_at + MAX_VERIFIER_LEEWAY


def normalize_serial(serial: str | int) -> str:
    """Lowercase hex without leading zeros or separators, the form ``format(n, 'x')`` gives."""
    if isinstance(serial, int):
        if serial < 0:
            raise SvidError(f"certificate serial {serial} is negative")
        return format(serial, "x")
    text = serial.strip().replace(":", "").lower()
    text = text.removeprefix("0x")
    try:
        return format(int(text, 16), "x")
    except ValueError:
        raise SvidError(f"certificate serial {serial!r} is not hexadecimal") from None


# What names one certificate for revocation: its trust domain's name, its issuer's DER Name (as
# the certificate carries it) and its serial (normalized hex). A plain tuple: the verifier builds
# one per certificate it checks.
CertKey = tuple[str, bytes, str]


@dataclass(frozen=True, slots=True)
class CertIssuer:
    """The issuer whose certificates a CRL speaks for: the CA named ``name`` (DER) among the
    authorities of ``trust_domain`` (its name). Names are chosen by each trust domain's operator,
    so a name means nothing outside the trust domain whose authority signed the CRL."""

    trust_domain: str
    name: bytes

    def key(self, serial: str) -> CertKey:
        return self.trust_domain, self.name, serial


@dataclass(frozen=True, slots=True)
class Revoked:
    """One revoked credential: its kind, its serial (hex) or jti, when it lapses anyway, and
    whose it is when the sender says ("" otherwise; informational, never used to match).

    ``issuer`` (X.509 only) limits a serial to that issuer's certificates, as a CRL's entries
    are; None revokes the serial whoever issued it."""

    kind: str
    value: str
    expires_at: float
    spiffe_id: str = ""
    issuer: CertIssuer | None = None

    def revokes(self, key: CertKey) -> bool:
        """Whether this revokes the certificate ``key`` names."""
        if self.kind != KIND_X509_SERIAL or normalize_serial(self.value) != key[2]:
            return False
        return self.issuer is None or self.issuer.key(key[2]) == key


class Vouchable(Protocol):
    """A CRL no bundle authority signed, waiting for an intermediate CA to vouch for it
    (svid._crl.PendingCrl)."""

    def vouched_by(
        self, trust_domain: str, ca: x509.Certificate
    ) -> tuple[CertIssuer, tuple[Revoked, ...], float | None] | None: ...


# How many intermediate CAs of verified chains a set remembers per trust domain, for pending
# CRLs to be checked against: a trust domain has a few (its server CAs, a rotation's two); a
# bound keeps a peer sending ever new intermediates from growing the set. Per trust domain, so
# a federated one minting intermediates only ever displaces its own, never ours (their CRLs
# would stay pending, and chains verified before, cached or on open connections, go on being
# accepted though those CRLs revoke them).
MAX_INTERMEDIATES = 64
# How many trust domains' intermediates it remembers. Only a trust domain with a bundle has
# chains verified, so the federation (the operator's choice) bounds them already; this is a
# backstop. Past it the trust domain noted least recently goes, and one whose intermediates
# vouch for a CRL in force only after every other: the set cannot tell which trust domain is
# its own, but ours verifies chains (our workloads' peers) and its CAs' CRLs apply.
MAX_INTERMEDIATE_TRUST_DOMAINS = 256
# Seconds the wall clock may move ahead of the monotonic one between two staleness readings
# before the difference counts as a sleep of the host: verifiers read the two a moment apart,
# from many threads, and a thread preempted between them hands over a pair some ms apart.
READING_GAP = 1.0


def cert_key(trust_domain: str, cert: x509.Certificate) -> CertKey:
    """The revocation key of ``cert``, a certificate of a chain verified in ``trust_domain``."""
    return trust_domain, tbs_names(cert.tbs_certificate_bytes)[0], format(cert.serial_number, "x")


class RevocationSet:
    """Thread-safe set of revoked serials and jtis. ``version`` bumps on every change.

    A set fed by a stream (a Workload API source) also knows how fresh it is: ``updated_at`` is
    when the last full-state update arrived (wall clock), and ``staleness(mono)`` how long it has
    been since the set was last known to be complete. A set nobody feeds is as current as its
    owner says (0). Staleness is an interval, so the feed's loss and every staleness reading are
    on the monotonic clock (``Clock.monotonic``): on the wall clock, an NTP step back after the
    feed was lost kept the set fresh for as long as the step, and verifiers accepted meanwhile.
    """

    def __init__(self, items: Iterable[Revoked] = ()) -> None:
        self._lock = threading.Lock()
        self._serials: Mapping[str, float] = MappingProxyType({})  # whoever the issuer
        self._issued: Mapping[CertKey, float] = MappingProxyType({})  # of one issuer (CRLs)
        self._jtis: Mapping[str, float] = MappingProxyType({})
        # (trust domain, issuer name) -> its CRLs' nextUpdate: past it, what they do not list
        # may have been revoked since.
        self._crl_until: Mapping[tuple[str, bytes], float] = MappingProxyType({})
        # CRLs of no bundle authority, and the intermediate CAs (trust domain, DER) of chains
        # verified so far: a CRL one of them signed revokes its certificates (svid._crl).
        self._pending: tuple[Vouchable, ...] = ()
        # trust domain -> its intermediates (DER), in the order they were noted; trust domains
        # in the order they last noted one (least recent first).
        self._intermediates: dict[str, dict[bytes, None]] = {}
        self._vouching: frozenset[str] = frozenset()  # trust domains with a CRL vouched for
        self._last_noted: str | None = None  # the last trust domain of _intermediates
        self.version = 0
        self.updated_at: float | None = None
        # Feed state: None = not fed (static); otherwise when the feed was last known live
        # (monotonic clock), math.inf while it is (live now), -math.inf when it never was.
        self._current_until: float | None = None
        # Since that loss, counted as ElapsedClock counts: a sleep of the host (a suspend, a
        # paused VM) moves the wall clock on but not the monotonic one, and is counted too,
        # once longer than READING_GAP.
        self._lost: ElapsedCount | None = None
        self._lost_lock = threading.Lock()  # its readings, from any verifier's thread
        self.replace(items)

    # --- freshness: the feed says when it is connected and when it is lost ---

    def feed_delivered(self, now: float) -> None:
        """A full-state update arrived on a live feed at ``now`` (wall clock, what
        ``updated_at`` shows): the set is current from now on."""
        self.updated_at = now
        self._current_until = math.inf

    def feed_behind(self, now: float, mono: float, behind: float) -> None:
        """A full-state update arrived on a live feed at ``now`` (wall clock) and ``mono``
        (monotonic clock), from a source that was ``behind`` seconds out of date when it sent
        it (an agent cut off from its server): staleness grows on from ``behind``."""
        self.updated_at = now
        # The count first: a reading between the two sees the state before or the new count.
        self._lost = ElapsedCount(mono, now, start=behind, slack=READING_GAP)
        self._current_until = mono

    def feed_lost(self, mono: float | None, wall: float | None = None) -> None:
        """The feed broke at ``mono`` (monotonic clock; None: it has never delivered), and
        ``wall`` (wall clock, if given): staleness grows from then."""
        if mono is None or self.updated_at is None:
            self._current_until = -math.inf
            self._lost = None
        elif self._current_until is None or self._current_until == math.inf:
            self._lost = ElapsedCount(mono, wall, slack=READING_GAP)
            self._current_until = mono

    def staleness(self, mono: float, wall: float | None = None) -> float:
        """Seconds since the set was last known complete, at ``mono`` (monotonic clock) and
        ``wall`` (wall clock, if given), counted reading by reading as ElapsedClock counts: a
        step back of the wall clock does not shorten it, nor a sleep of the host (which the
        monotonic clock does not count) longer than READING_GAP hide it. 0 while its feed is
        live (or for a set nobody feeds), ``inf`` if its feed never delivered."""
        until, lost = self._current_until, self._lost
        if until is None or until == math.inf:
            return 0.0
        if lost is None:
            return math.inf
        with self._lost_lock:
            return lost.read(mono, wall)

    @staticmethod
    def _split(items: Iterable[Revoked]) -> _Parts:
        serials: dict[str, float] = {}
        issued: dict[CertKey, float] = {}
        jtis: dict[str, float] = {}
        for item in items:
            if item.kind == KIND_X509_SERIAL:
                serial = normalize_serial(item.value)
                if item.issuer is None:
                    _keep(serials, serial, item.expires_at)
                else:
                    _keep(issued, item.issuer.key(serial), item.expires_at)
            elif item.kind == KIND_JWT_ID:
                _keep(jtis, item.value, item.expires_at)
            elif item.kind == KIND_TASK:
                continue  # no credential to refuse: its own are listed by serial and jti
            else:
                raise SvidError(f"unknown revocation kind {item.kind!r}")
        return serials, issued, jtis

    def replace(
        self,
        items: Iterable[Revoked],
        crl_next_update: Mapping[CertIssuer, float] | None = None,
        pending: Sequence[Vouchable] = (),
    ) -> None:
        """Make the set exactly ``items`` (a full-state update from the agent or server), with
        ``crl_next_update`` the nextUpdate of the CRLs that gave its entries, by issuer, and
        ``pending`` the CRLs an intermediate CA may yet vouch for (the entries of those the
        intermediates of chains verified so far vouch for are in the set at once)."""
        with self._lock:
            known = [(td, d) for td, ders in self._intermediates.items() for d in ders]
        vouched, vouched_until = _vouched(pending, known)
        serials, issued, jtis = self._split((*items, *vouched))
        until = {(i.trust_domain, i.name): t for i, t in (crl_next_update or {}).items()}
        for key, t in vouched_until.items():
            until[key] = min(t, until.get(key, t))
        with self._lock:
            self._pending = tuple(pending)
            self._vouching = frozenset(td for td, _ in vouched_until)
            self._crl_until = MappingProxyType(until)
            self._serials, self._issued, self._jtis = (
                MappingProxyType(serials),
                MappingProxyType(issued),
                MappingProxyType(jtis),
            )
            self.version += 1

    def add(self, items: Iterable[Revoked]) -> None:
        parts = self._split(items)
        if not any(parts):
            return
        serials, issued, jtis = parts
        with self._lock:
            self._serials = _merged(self._serials, serials)
            self._issued = _merged(self._issued, issued)
            self._jtis = _merged(self._jtis, jtis)
            self.version += 1

    def note_intermediates(self, trust_domain: str, ders: Sequence[bytes]) -> None:
        """The intermediate CAs (DER) of a chain just verified in ``trust_domain``: a pending
        CRL one of them signed now revokes that CA's certificates (RFC 5280 6.3.3 (f): the
        CRL issuer's certificate validates to the trust anchor). Called before the chain's
        own revocation check, so such a CRL revokes that very chain."""
        remembered = self._intermediates
        known = remembered.get(trust_domain)
        if known is not None and all(d in known for d in ders):
            # The usual case, without the lock: nothing new. Only a trust domain that was not
            # the last to note one is moved (it is in use: the last to go).
            if self._last_noted != trust_domain:
                with self._lock:
                    if trust_domain in remembered:
                        remembered[trust_domain] = remembered.pop(trust_domain)
                        self._last_noted = trust_domain
            return
        with self._lock:
            self._last_noted = trust_domain
            known = remembered.pop(trust_domain, None)
            if known is None:
                known = {}
            remembered[trust_domain] = known  # the most recent
            fresh = [(trust_domain, d) for d in ders if d not in known]
            for _, d in fresh:
                known[d] = None
            while len(known) > MAX_INTERMEDIATES:
                del known[next(iter(known))]
            if len(remembered) > MAX_INTERMEDIATE_TRUST_DOMAINS:
                del remembered[self._least_needed_trust_domain()]
            pending = self._pending
        vouched, vouched_until = _vouched(pending, fresh)
        if not vouched and not vouched_until:
            return
        _, issued, _ = self._split(vouched)
        with self._lock:
            self._vouching |= {td for td, _ in vouched_until}
            self._issued = _merged(self._issued, issued)
            until = dict(self._crl_until)
            for key, t in vouched_until.items():
                until[key] = min(t, until.get(key, t))
            self._crl_until = MappingProxyType(until)
            self.version += 1

    def _least_needed_trust_domain(self) -> str:
        """The trust domain whose intermediates go first (the lock held): the least recently
        noted one whose intermediates vouch for no CRL in force, else the least recent."""
        for td in self._intermediates:
            if td not in self._vouching:
                return td
        return next(iter(self._intermediates))

    def revoke_serial(self, serial: str | int, expires_at: float) -> None:
        self.add([Revoked(KIND_X509_SERIAL, normalize_serial(serial), expires_at)])

    def revoke_jti(self, jti: str, expires_at: float) -> None:
        self.add([Revoked(KIND_JWT_ID, jti, expires_at)])

    def is_serial_revoked(self, serial: str) -> bool:
        """Whether ``serial`` is revoked whoever issued it; ``serial`` must already be
        normalized (``format(cert.serial_number, 'x')``). A CRL's entries are not: they revoke
        one issuer's certificates, which `is_revoked` asks about."""
        return serial in self._serials

    def is_revoked(self, key: CertKey) -> bool:
        """Whether the certificate ``key`` names is revoked: its serial whoever the issuer, or
        its serial under its issuer (a CRL's entry). The serial must already be normalized."""
        if key[2] in self._serials:
            return True
        issued = self._issued
        return bool(issued) and key in issued  # most sets hold no CRL: no tuple to hash then

    def is_jti_revoked(self, jti: str) -> bool:
        return jti in self._jtis

    @property
    def holds_crls(self) -> bool:
        """Whether some of the entries came from CRLs that carry a nextUpdate."""
        return bool(self._crl_until)

    def crl_next_update(self, key: CertKey) -> float | None:
        """The nextUpdate of the CRLs of the issuer of the certificate ``key`` names (None: that
        issuer has given none with one)."""
        return self._crl_until.get((key[0], key[1]))

    def crl_staleness(self, key: CertKey, now: float) -> float:
        """Seconds past the nextUpdate of the CRLs of the issuer of the certificate ``key``
        names (0 before it, or when that issuer has given no CRL)."""
        until = self._crl_until.get((key[0], key[1]))
        return 0.0 if until is None else max(0.0, now - until)

    def prune(self, now: float) -> int:
        """Forget entries no verifier can accept any more (see `MAX_VERIFIER_LEEWAY`); returns
        how many went."""
        with self._lock:
            serials = {k: v for k, v in self._serials.items() if revocation_needed(v, now)}
            issued = {k: v for k, v in self._issued.items() if revocation_needed(v, now)}
            jtis = {k: v for k, v in self._jtis.items() if revocation_needed(v, now)}
            gone = len(self) - len(serials) - len(issued) - len(jtis)
            if gone:
                self._serials, self._jtis = MappingProxyType(serials), MappingProxyType(jtis)
                self._issued = MappingProxyType(issued)
                self.version += 1
            return gone

    def items(self) -> list[Revoked]:
        serials, issued, jtis = self._serials, self._issued, self._jtis
        return (
            [Revoked(KIND_X509_SERIAL, k, v) for k, v in serials.items()]
            + [
                Revoked(KIND_X509_SERIAL, serial, v, issuer=CertIssuer(td, name))
                for (td, name, serial), v in issued.items()
            ]
            + [Revoked(KIND_JWT_ID, k, v) for k, v in jtis.items()]
        )

    def __len__(self) -> int:
        return len(self._serials) + len(self._issued) + len(self._jtis)


def _vouched(
    pending: Sequence[Vouchable], cas: Sequence[tuple[str, bytes]]
) -> tuple[list[Revoked], dict[tuple[str, bytes], float]]:
    """The entries of the ``pending`` CRLs that one of ``cas`` (trust domain, DER) signed, and
    their nextUpdate by (trust domain, issuer name)."""
    found: list[Revoked] = []
    until: dict[tuple[str, bytes], float] = {}
    if not pending:
        return found, until
    for trust_domain, der in cas:
        try:
            ca = x509.load_der_x509_certificate(der)
        except ValueError:
            continue
        for crl in pending:
            vouched = crl.vouched_by(trust_domain, ca)
            if vouched is None:
                continue
            issuer, entries, next_update = vouched
            found.extend(entries)
            # A CRL that lists nothing still promises a newer one by its nextUpdate.
            if next_update is not None:
                key = (issuer.trust_domain, issuer.name)
                until[key] = min(next_update, until.get(key, next_update))
    return found, until


_Parts = tuple[dict[str, float], dict[CertKey, float], dict[str, float]]
_K = TypeVar("_K", str, CertKey)


def _keep(into: dict[_K, float], key: _K, expires_at: float) -> None:
    """Record ``key`` in ``into``, for the later of two expiries when it is there already."""
    into[key] = max(expires_at, into.get(key, expires_at))


def _merged(old: Mapping[_K, float], new: dict[_K, float]) -> Mapping[_K, float]:
    merged = dict(old)
    for key, expires_at in new.items():
        _keep(merged, key, expires_at)
    return MappingProxyType(merged)


def check_max_staleness(seconds: float | None) -> float | None:
    """A verifier's ``max_revocation_staleness``: None (off) or a positive number of seconds."""
    if seconds is None:
        return None
    if isinstance(seconds, bool) or not seconds > 0 or math.isinf(seconds):  # NaN fails `> 0`
        raise ValueError(
            f"max_revocation_staleness must be a positive number of seconds or None, got {seconds}"
        )
    return float(seconds)


def refuse_if_stale_crl(
    revocations: RevocationSet, keys: Iterable[CertKey], now: float, max_staleness: float
) -> None:
    """Raise StaleRevocationsError when a certificate of ``keys`` has an issuer whose CRLs are
    past their nextUpdate by more than ``max_staleness``.

    Only that issuer's certificates: one CA's CRL lapsing says nothing of another's (and a
    federated trust domain could otherwise deny service to ours by letting its CRL lapse). The
    CRL's entries keep revoking meanwhile; a fresh CRL lifts the refusal.
    """
    if not revocations.holds_crls:  # most sets hold none: nothing to look up per certificate
        return
    for key in keys:
        staleness = revocations.crl_staleness(key, now)
        if staleness > max_staleness:
            raise StaleRevocationsError(
                f"the CRL of the issuer of certificate serial {key[2]} (trust domain {key[0]}) "
                f"is {staleness:.1f}s past its nextUpdate (max_revocation_staleness "
                f"{max_staleness:g}s): refusing rather than accepting a certificate it may have "
                "revoked since"
            )


def fresh_for(
    revocations: RevocationSet,
    mono: float,
    max_staleness: float | None,
    wall: float | None = None,
) -> float | None:
    """Seconds a verifier with ``max_staleness`` still accepts before ``revocations`` is too
    old (0: it refuses now), at ``mono`` (monotonic clock) and ``wall`` (wall clock, see
    `RevocationSet.staleness`); None when it has no such setting."""
    if max_staleness is None:
        return None
    return max(0.0, max_staleness - revocations.staleness(mono, wall))


def crl_fresh_for(
    revocations: RevocationSet, keys: Iterable[CertKey], now: float, max_staleness: float
) -> float:
    """Seconds until refuse_if_stale_crl refuses the certificates ``keys`` (0: it does now;
    inf while none of their issuers' CRLs carries a nextUpdate)."""
    left = math.inf
    if not revocations.holds_crls:
        return left
    next_update = revocations.crl_next_update
    for key in keys:
        until = next_update(key)
        if until is not None:
            left = min(left, until + max_staleness - now)
    return max(0.0, left)


def refuse_if_stale(
    revocations: RevocationSet, mono: float, max_staleness: float, wall: float | None = None
) -> None:
    """Raise StaleRevocationsError when ``revocations`` is older than ``max_staleness`` at
    ``mono`` (monotonic clock) and ``wall`` (wall clock, see `RevocationSet.staleness`)."""
    staleness = revocations.staleness(mono, wall)
    if staleness > max_staleness:
        age = "never received" if math.isinf(staleness) else f"{staleness:.1f}s old"
        raise StaleRevocationsError(
            f"revocation data is {age} (max_revocation_staleness {max_staleness:g}s): is the "
            "local agent down? Refusing rather than accepting a credential that may be revoked"
        )
