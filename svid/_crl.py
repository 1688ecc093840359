"""Revoked serials from CA-signed DER CRLs, trusted only once a bundle authority's signature holds.

A CRL names its issuer by a distinguished name, not a SPIFFE ID, so the issuer's trust domain is
the one whose bundle holds an authority with that exact subject whose key verifies the CRL. A CRL
no authority vouches for is dropped: anyone could otherwise revoke (deny service to) anything.

Its entries revoke only that issuer's certificates: serials are unique per issuer, not across
issuers (RFC 5280 4.1.2.2, 5.2.3), so each entry is keyed by (trust domain, issuer name, serial).
The trust domain is part of the key because a name is whatever each trust domain's operator
chose: a federated CA that takes our CA's name still signs only for its own trust domain. The
signing key is not, as RFC 5280 lets a CA sign its CRLs with another key than its certificates.
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field

from cryptography import x509
from cryptography.exceptions import UnsupportedAlgorithm
from cryptography.hazmat.primitives.asymmetric import ec, rsa

from svid._bundle import X509Bundle
from svid._der import tbs_names
from svid._revocation import KIND_X509_SERIAL, CertIssuer, Revoked
from svid._spiffe_id import TrustDomain


@dataclass(frozen=True, slots=True)
class CrlResult:
    """Revocations from the CRLs that verified, and one message per CRL that did not.

    ``next_update``: by when each issuer promised a newer CRL (the earliest nextUpdate of its
    CRLs); an issuer whose CRLs carry none is absent.
    """

    revoked: tuple[Revoked, ...]
    rejected: tuple[str, ...]
    next_update: Mapping[CertIssuer, float] = field(default_factory=dict)


def _can_sign_crls(cert: x509.Certificate) -> bool:
    try:
        usage = cert.extensions.get_extension_for_class(x509.KeyUsage).value
    except x509.ExtensionNotFound:
        return True
    except (ValueError, x509.DuplicateExtension):  # DuplicateExtension is no ValueError
        return False
    return usage.crl_sign


def _issuers(
    crl: x509.CertificateRevocationList, bundles: Mapping[TrustDomain, X509Bundle]
) -> list[CertIssuer]:
    """The issuer ``crl`` speaks for in each trust domain that holds an authority of its name
    whose key verifies it (an authority two trust domains share speaks for both)."""
    issuer = crl.issuer.public_bytes()
    found: list[CertIssuer] = []
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
                    # The subject as the authority's own bytes have it: those are what the
                    # certificates it issued carry as their issuer (svid._verify_x509 chains
                    # them by these bytes).
                    name = tbs_names(authority.tbs_certificate_bytes)[1]
                    found.append(CertIssuer(td.name, name))
                    break
            except (ValueError, TypeError, UnsupportedAlgorithm):
                continue
    return found


def revoked_from_crls(
    crls: Iterable[bytes], bundles: Mapping[TrustDomain, X509Bundle]
) -> CrlResult:
    """The revoked serials of every CRL in ``crls`` signed by an authority in ``bundles``, each
    limited to the certificates of the CRL's issuer.

    Entries carry no expiry of their own (a CRL lists serials, not certificates), so they are kept
    until the next full-state update drops them; a CRL past its nextUpdate still counts (dropping
    it would un-revoke), and its staleness is its issuer's (RevocationSet.crl_staleness).
    """
    revoked: list[Revoked] = []
    rejected: list[str] = []
    next_updates: dict[CertIssuer, float] = {}
    for n, der in enumerate(crls):
        try:
            crl = x509.load_der_x509_crl(der)
            issuers = _issuers(crl, bundles)
            if not issuers:
                rejected.append(
                    f"CRL {n} (issuer {crl.issuer.rfc4514_string()}) is not signed by any "
                    "authority of a known trust domain"
                )
                continue
            serials = [format(entry.serial_number, "x") for entry in crl]
            revoked.extend(
                Revoked(KIND_X509_SERIAL, serial, math.inf, issuer=issuer)
                for issuer in issuers
                for serial in serials
            )
            next_update = crl.next_update_utc
            if next_update is not None:
                for issuer in issuers:
                    until = next_update.timestamp()
                    next_updates[issuer] = min(until, next_updates.get(issuer, until))
        except (ValueError, x509.InvalidVersion) as exc:  # InvalidVersion is no ValueError
            rejected.append(f"CRL {n} is not a readable DER CRL: {exc}")
    return CrlResult(tuple(revoked), tuple(rejected), next_updates)
