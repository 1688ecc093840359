"""Revoked serials from CA-signed DER CRLs, trusted only once a bundle authority's signature holds.

A CRL names its issuer by a distinguished name, not a SPIFFE ID, so the issuer's trust domain is
the one whose bundle holds an authority with that exact subject whose key verifies the CRL. A CRL
no authority vouches for is dropped: anyone could otherwise revoke (deny service to) anything.
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Mapping
from dataclasses import dataclass

from cryptography import x509
from cryptography.exceptions import UnsupportedAlgorithm
from cryptography.hazmat.primitives.asymmetric import ec, rsa

from svid._bundle import X509Bundle
from svid._revocation import KIND_X509_SERIAL, Revoked
from svid._spiffe_id import TrustDomain


@dataclass(frozen=True, slots=True)
class CrlResult:
    """Revocations from the CRLs that verified, and one message per CRL that did not."""

    revoked: tuple[Revoked, ...]
    rejected: tuple[str, ...]


def _can_sign_crls(cert: x509.Certificate) -> bool:
    try:
        usage = cert.extensions.get_extension_for_class(x509.KeyUsage).value
    except x509.ExtensionNotFound:
        return True
    except (ValueError, x509.DuplicateExtension):  # DuplicateExtension is no ValueError
        return False
    return usage.crl_sign


def _issuer_trust_domain(
    crl: x509.CertificateRevocationList, bundles: Mapping[TrustDomain, X509Bundle]
) -> TrustDomain | None:
    issuer = crl.issuer.public_bytes()
    for td, bundle in bundles.items():
        for authority in bundle.authorities:
            if authority.subject.public_bytes() != issuer or not _can_sign_crls(authority):
                continue
            try:
                key = authority.public_key()
            except (ValueError, UnsupportedAlgorithm):
                continue  # an authority whose key cannot be read vouches for nothing
            if not isinstance(key, ec.EllipticCurvePublicKey | rsa.RSAPublicKey):
                continue
            try:
                if crl.is_signature_valid(key):
                    return td
            except (ValueError, TypeError, UnsupportedAlgorithm):
                continue
    return None


def revoked_from_crls(
    crls: Iterable[bytes], bundles: Mapping[TrustDomain, X509Bundle]
) -> CrlResult:
    """The revoked serials of every CRL in ``crls`` signed by an authority in ``bundles``.

    Entries carry no expiry of their own (a CRL lists serials, not certificates), so they are kept
    until the next full-state update drops them.
    """
    revoked: list[Revoked] = []
    rejected: list[str] = []
    for n, der in enumerate(crls):
        try:
            crl = x509.load_der_x509_crl(der)
            td = _issuer_trust_domain(crl, bundles)
            if td is None:
                rejected.append(
                    f"CRL {n} (issuer {crl.issuer.rfc4514_string()}) is not signed by any "
                    "authority of a known trust domain"
                )
                continue
            revoked.extend(
                Revoked(KIND_X509_SERIAL, format(entry.serial_number, "x"), math.inf)
                for entry in crl
            )
        except (ValueError, x509.InvalidVersion) as exc:  # InvalidVersion is no ValueError
            rejected.append(f"CRL {n} is not a readable DER CRL: {exc}")
    return CrlResult(tuple(revoked), tuple(rejected))
