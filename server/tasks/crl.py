"""The signed X.509 CRL agents put in the Workload API `crl` fields.

Built from the revocation list's X.509 serials and signed by the active X.509 CA key, so any
relying party holding the trust bundle can check it. Rebuilt only when the revocation list or
the CA changes.
"""

from __future__ import annotations

import datetime
from collections.abc import Callable, Iterable
from dataclasses import dataclass

from cryptography import x509
from cryptography.hazmat.primitives.serialization import Encoding

from server.datastore.records import REVOKED_X509_SERIAL, Revocation

# Signs a CRL with the CA key (server.ca.signer.X509Signer.sign_crl): the key never leaves the CA.
SignCrl = Callable[[x509.CertificateRevocationListBuilder], x509.CertificateRevocationList]
# How long a CRL stays authoritative when nothing changes; agents get a new one on every change.
CRL_VALIDITY = 3600


def _utc(ts: float) -> datetime.datetime:
    return datetime.datetime.fromtimestamp(int(ts), tz=datetime.UTC)


def build_crl(
    issuer: x509.Certificate,
    sign: SignCrl,
    revocations: Iterable[Revocation],
    now: float,
    number: int,
) -> bytes:
    """A DER CRL listing every revoked X.509 serial (hex in the list) with its revocation time."""
    builder = (
        x509.CertificateRevocationListBuilder()
        .issuer_name(issuer.subject)
        .last_update(_utc(now))
        .next_update(_utc(now + CRL_VALIDITY))
        .add_extension(x509.CRLNumber(number), critical=False)
    )
    try:
        ski = issuer.extensions.get_extension_for_class(x509.SubjectKeyIdentifier).value
        builder = builder.add_extension(
            x509.AuthorityKeyIdentifier.from_issuer_subject_key_identifier(ski), critical=False
        )
    except x509.ExtensionNotFound:
        pass
    for item in revocations:
        if item.kind != REVOKED_X509_SERIAL:
            continue
        builder = builder.add_revoked_certificate(
            x509.RevokedCertificateBuilder()
            .serial_number(int(item.value, 16))
            .revocation_date(_utc(item.revoked_at or now))
            .build()
        )
    return sign(builder).public_bytes(Encoding.DER)


@dataclass
class CrlCache:
    """One CRL per (revocation list, CA certificate); the number grows with every rebuild."""

    number: int = 0
    _key: tuple[object, ...] | None = None
    _der: bytes = b""

    def get(
        self,
        issuer: x509.Certificate,
        sign: SignCrl,
        revocations: tuple[Revocation, ...],
        now: float,
    ) -> bytes:
        cache_key: tuple[object, ...] = (revocations, issuer.serial_number)
        if cache_key != self._key:
            # Monotonic across restarts too: a relying party keeps the highest number it saw.
            self.number = max(self.number + 1, int(now))
            self._der = build_crl(issuer, sign, revocations, now, self.number)
            self._key = cache_key
        return self._der
