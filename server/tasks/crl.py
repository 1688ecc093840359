"""The signed X.509 CRLs agents put in the Workload API `crl` fields.

Built from the revocation list's X.509 serials: one set of CRLs per CA the server holds the key
of (the active CA, and a retired one while its leaves live), each signed by that CA and listing
only the serials it issued. A CRL revokes only its issuer's certificates (RFC 5280 4.1.2.2,
5.2.3: serials are unique per issuer), as OpenSSL, Go and svid apply it, so a serial listed by
another CA's CRL revoked nothing. A revocation recorded before issuers were (issuer '') is
listed in every CA's CRL: which CA issued it is unknown, and leaving it out would un-revoke it;
serials are random, so it names no other CA's certificate. Rebuilt when the revocation list or the
CA changes, and once half their validity has passed (see CrlCache.due): a CRL past its
nextUpdate is refused by relying parties that check it (OpenSSL does), however quiet the
revocation list has been.

A CRL's thisUpdate is backdated as SVIDs' notBefore is (BACKDATE_SECONDS): a relying party whose
clock is a few seconds behind the server refuses a CRL from its future ("CRL is not yet valid"),
and with it every certificate the CRL covers, after every revocation (each one signs the CRLs
again). A serial is listed while its certificate may still be valid to such a relying party:
through BACKDATE_SECONDS past its expiry, so the backdated CRL leaves no window in which a
revoked certificate is taken; past that no verifier takes the certificate, revoked or not. (The
revocation list keeps it a while longer, as it keeps a `jti`, for verifiers that allow some
leeway past a JWT's `exp`; X.509 verifiers allow none.)

The listed serials are split over as many CRLs as it takes to keep each under CRL_MAX_BYTES:
one CRL of every serial can outgrow a Sync message (and gRPC's 4 MiB limit with it). The CRLs
of one build share their CRL number and together are the revocation list; a relying party
uses every one it is given, as svid's verifier does (a serial listed in any of them is
revoked).
"""

from __future__ import annotations

import datetime
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, field

from cryptography import x509
from cryptography.hazmat.primitives.hashes import SHA256
from cryptography.hazmat.primitives.serialization import Encoding

from server.ca.signer import BACKDATE_SECONDS
from server.datastore.records import REVOKED_X509_SERIAL, Revocation

# Signs a CRL with the CA key (server.ca.signer.X509Signer.sign_crl): the key never leaves the CA.
SignCrl = Callable[[x509.CertificateRevocationListBuilder], x509.CertificateRevocationList]
# How long a CRL stays authoritative when nothing changes; agents get a new one on every change,
# and one re-signed once this much of it has passed (half: an agent out of touch for a while
# still holds one that is current).
CRL_VALIDITY = 3600
REFRESH_AFTER = CRL_VALIDITY // 2
# Half a Sync message (server.sync_messages.MAX_BYTES): a CRL, the bundle and whatever else the
# message holds fit in one. About 13,000 serials.
CRL_MAX_BYTES = 512 * 1024
# A CRL's size besides its entries, past the issuer name: version, algorithm identifiers, dates,
# extensions, an RSA-4096 signature and the headers around them come to about 750 bytes.
_CRL_OVERHEAD = 1024
_MICROSECONDS = 1_000_000
# Names each CA certificate in the cache's key.
_FINGERPRINT = SHA256()


def _utc(ts: float) -> datetime.datetime:
    return datetime.datetime.fromtimestamp(int(ts), tz=datetime.UTC)


def _entry_size(serial: int) -> int:
    """The most one CRL entry takes in DER: a SEQUENCE of the serial INTEGER (a sign byte over
    its magnitude) and the revocation date (a GeneralizedTime at worst), with their headers."""
    return 2 + (2 + serial.bit_length() // 8 + 1) + 17


def next_number(previous: int, now: float) -> int:
    """The CRL number of a build at `now`: its time in microseconds, above `previous` (RFC 5280
    5.2.3: a relying party keeps the highest number it saw). Seconds let a burst of builds in
    one second (one per revocation) run the number ahead of the clock, and a restarted server,
    or another one sharing the CA, started again below it; a build signs a CRL, which takes far
    longer than a microsecond, so each build's number is its own time and the next server's
    build, later, numbers higher. Across servers that holds as far as their clocks agree."""
    return max(previous + 1, int(now * _MICROSECONDS))


def listed_serials(revocations: Iterable[Revocation], now: float) -> list[Revocation]:
    """The X.509 serial revocations a CRL built at `now` lists: those whose certificate is still
    valid to a relying party as far behind as the CRL's thisUpdate (a verifier takes a
    certificate through its notAfter second)."""
    since = now - BACKDATE_SECONDS
    return [r for r in revocations if r.kind == REVOKED_X509_SERIAL and r.expires_at >= since]


def key_id(ca: x509.Certificate) -> str:
    """A CA certificate's subject key id in hex, as revocations record their issuer; '' for
    one without (it signs CRLs of the issuer-less revocations only)."""
    try:
        return ca.extensions.get_extension_for_class(x509.SubjectKeyIdentifier).value.digest.hex()
    except x509.ExtensionNotFound:
        return ""


def issued_by(revocations: Iterable[Revocation], issuer: str) -> list[Revocation]:
    """The revocations a CA of key id `issuer` lists: its own, and those of no recorded
    issuer (see the module's docstring)."""
    return [r for r in revocations if r.issuer in ("", issuer)]


@dataclass
class _Entries:
    """Revoked-certificate entries by (serial, revocation time), kept from one build to the
    next: a CRL is rebuilt on every new revocation, and making its entries was most of a build."""

    made: dict[tuple[int, int], x509.RevokedCertificate] = field(default_factory=dict)

    def take(self, items: Sequence[tuple[int, int]]) -> list[x509.RevokedCertificate]:
        made: dict[tuple[int, int], x509.RevokedCertificate] = {}
        for key in items:
            found = self.made.get(key)
            if found is None:
                serial, revoked_at = key
                found = (
                    x509.RevokedCertificateBuilder()
                    .serial_number(serial)
                    .revocation_date(_utc(revoked_at))
                    .build()
                )
            made[key] = found
        self.made = made  # only what this build listed: a long-gone serial is not kept
        return list(made.values())


def build_crls(
    issuer: x509.Certificate,
    sign: SignCrl,
    revocations: Iterable[Revocation],
    now: float,
    number: int,
    *,
    max_bytes: int = CRL_MAX_BYTES,
    entries: _Entries | None = None,
) -> tuple[bytes, ...]:
    """DER CRLs listing every still-valid revoked X.509 serial (hex in the list) `issuer` issued
    once, with its revocation time, in serial order; each at most `max_bytes`. No CRL when
    nothing is listed."""
    mine = issued_by(listed_serials(revocations, now), key_id(issuer))
    listed = {int(r.value, 16): int(r.revoked_at or now) for r in mine}
    items = sorted(listed.items())
    revoked = (entries or _Entries()).take(items)
    extensions: list[x509.Extension[x509.ExtensionType]] = [
        x509.Extension(x509.CRLNumber.oid, False, x509.CRLNumber(number))
    ]
    try:
        ski = issuer.extensions.get_extension_for_class(x509.SubjectKeyIdentifier).value
        aki = x509.AuthorityKeyIdentifier.from_issuer_subject_key_identifier(ski)
        extensions.append(x509.Extension(aki.oid, False, aki))
    except x509.ExtensionNotFound:
        pass
    room = max_bytes - _CRL_OVERHEAD - len(issuer.subject.public_bytes())
    out: list[bytes] = []
    start, size = 0, 0
    for n, (serial, _) in enumerate(items):
        cost = _entry_size(serial)
        if n > start and size + cost > room:
            out.append(_signed(issuer, sign, now, extensions, revoked[start:n]))
            start, size = n, 0
        size += cost
    if start < len(items):
        out.append(_signed(issuer, sign, now, extensions, revoked[start:]))
    return tuple(out)


def _signed(
    issuer: x509.Certificate,
    sign: SignCrl,
    now: float,
    extensions: list[x509.Extension[x509.ExtensionType]],
    revoked: list[x509.RevokedCertificate],
) -> bytes:
    # The builder's add_revoked_certificate copies its list on every call: a 100,000-serial CRL
    # took a minute that way. Handing it the whole list is linear.
    builder = x509.CertificateRevocationListBuilder(
        issuer_name=issuer.subject,
        last_update=_utc(now - BACKDATE_SECONDS),
        next_update=_utc(now + CRL_VALIDITY),
        extensions=extensions,
        revoked_certificates=revoked,
    )
    return sign(builder).public_bytes(Encoding.DER)


@dataclass
class CrlCache:
    """One build of CRLs per (serials revoked, CA certificates): each CA's, one after the
    other. The number grows with every rebuild, and all CRLs of one build carry the same
    number."""

    number: int = 0
    max_bytes: int = CRL_MAX_BYTES
    _key: tuple[object, ...] | None = None
    _ders: tuple[bytes, ...] = ()
    _built_at: float = 0.0
    # When the CRLs every agent holds were built. A build a snapshot asked for (half their
    # validity passed) reaches that agent alone: had it counted, the refresh that sends the
    # others theirs would wait half a validity more, past their CRL's nextUpdate. Only a build
    # for new serials (every agent is sent it: server.node_api) or a refresh (given) moves it.
    _given_at: float = 0.0
    _entries: dict[bytes, _Entries] = field(default_factory=dict)
    # The serials of the list last given (by identity: the state hands on one tuple until the
    # list changes), so that a change of no serial (a JWT-SVID revoked, a task's end) signs
    # and sends every agent no new CRL.
    _seen: tuple[Revocation, ...] | None = None
    _serials: tuple[Revocation, ...] = ()

    def due(self, now: float) -> bool:
        """Whether the CRLs list something and those every agent holds have passed
        REFRESH_AFTER: they are to be signed again (``get``) and sent to every agent, then
        ``given`` (nothing to refresh while nothing is listed)."""
        return self._past_refresh(self._given_at, now)

    def _past_refresh(self, since: float, now: float) -> bool:
        return bool(self._ders) and now - since >= REFRESH_AFTER

    def given(self) -> None:
        """Every agent is sent the CRLs last built (TaskService.refresh_crl)."""
        self._given_at = self._built_at

    def get(
        self,
        issuers: Sequence[tuple[x509.Certificate, SignCrl]],
        revocations: tuple[Revocation, ...],
        now: float,
    ) -> tuple[bytes, ...]:
        """The CRLs of each of `issuers` (a CA certificate and what signs with its key)."""
        names = tuple(cert.fingerprint(_FINGERPRINT) for cert, _ in issuers)
        if revocations is not self._seen:
            self._seen = revocations
            self._serials = tuple(r for r in revocations if r.kind == REVOKED_X509_SERIAL)
        cache_key: tuple[object, ...] = (self._serials, names)
        if cache_key != self._key or self._past_refresh(self._built_at, now):
            if self._key is None or self._key[0] != self._serials:
                self._given_at = now
            self.number = next_number(self.number, now)
            entries = {name: self._entries.get(name) or _Entries() for name in names}
            self._ders = tuple(
                der
                for name, (issuer, sign) in zip(names, issuers, strict=True)
                for der in build_crls(
                    issuer,
                    sign,
                    self._serials,  # the serials only: each CA's build scans no other kind
                    now,
                    self.number,
                    max_bytes=self.max_bytes,
                    entries=entries[name],
                )
            )
            self._entries = entries  # a CA no longer given takes its entries with it
            self._key = cache_key
            self._built_at = now
        return self._ders
