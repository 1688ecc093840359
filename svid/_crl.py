"""Revoked serials from CA-signed DER CRLs, trusted only once a bundle authority's signature holds.

A CRL names its issuer by a distinguished name, not a SPIFFE ID, so the issuer's trust domain is
the one whose bundle holds an authority with that exact subject whose key verifies the CRL. A CRL
no authority vouches for is dropped: anyone could otherwise revoke (deny service to) anything.
So is one signed as no certificate may be (svid._x509.signature_hash_problem: SHA-1, say),
whoever signed it.

Its entries revoke only that issuer's certificates: serials are unique per issuer, not across
issuers (RFC 5280 4.1.2.2, 5.2.3), so each entry is keyed by (trust domain, issuer name, serial).
The trust domain is part of the key because a name is whatever each trust domain's operator
chose: a federated CA that takes our CA's name still signs only for its own trust domain. The
signing key is not, as RFC 5280 lets a CA sign its CRLs with another key than its certificates.

A CRL may also come from an intermediate CA (a server under an upstream CA signs its leaves,
and so its CRLs, with a CA that is not in the bundle): RFC 5280 6.3.3 (f) takes it once the
CRL issuer's own certificate validates to the trust anchor, and OpenSSL finds that certificate
in the chain it is verifying. Such a CRL is kept aside (``CrlResult.pending``) until a chain
verified in a trust domain carries a CA of its name whose key verifies it (RevocationSet
.note_intermediates); its entries then revoke that CA's certificates in that trust domain.
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
from svid._x509 import signature_hash_problem


@dataclass(frozen=True, slots=True)
class CrlResult:
    """Revocations from the CRLs that verified, and one message per CRL that did not.

    ``next_update``: by when each issuer promised a newer CRL (the earliest nextUpdate of its
    CRLs); an issuer whose CRLs carry none is absent.
    """

    revoked: tuple[Revoked, ...]
    rejected: tuple[str, ...]
    next_update: Mapping[CertIssuer, float] = field(default_factory=dict)
    # The CRLs no bundle authority signed, for an intermediate CA of a verified chain to vouch
    # for (PendingCrl); each is in ``rejected`` too, until one does.
    pending: tuple[PendingCrl, ...] = ()


@dataclass(frozen=True, slots=True, eq=False)
class PendingCrl:
    """A readable CRL whose issuer is no bundle authority: possibly an intermediate CA's. Its
    signature algorithm is one accepted (_signature_problem): only its signer is unknown."""

    crl: x509.CertificateRevocationList

    def vouched_by(
        self, trust_domain: str, ca: x509.Certificate
    ) -> tuple[CertIssuer, tuple[Revoked, ...], float | None] | None:
        """The issuer this CRL speaks for, its entries, as revoking the certificates of ``ca``
        in ``trust_domain``, and its nextUpdate; None unless ``ca`` (a CA of a chain verified
        in that trust domain) is its issuer: its subject, allowed to sign CRLs, and its key
        verifies the signature."""
        issuer = _issuer_of(self.crl, ca, trust_domain)
        if issuer is None:
            return None
        next_update = self.crl.next_update_utc
        return (
            issuer,
            _entries(self.crl, [issuer]),
            None if next_update is None else next_update.timestamp(),
        )


def _signature_problem(crl: x509.CertificateRevocationList) -> str | None:
    """Why ``crl`` is refused whoever signed it (as a certificate would be: a SHA-1 signature,
    an RSA-PSS one whose MGF1 hash is another), or None. An algorithm cryptography cannot
    name is None here too: no key verifies it, so it is dropped as signed by no authority."""
    try:
        hash_alg = crl.signature_hash_algorithm
        parameters = crl.signature_algorithm_parameters
    except (ValueError, UnsupportedAlgorithm):
        return None
    if hash_alg is None:
        return None  # EdDSA: no EC or RSA key (the only ones that vouch) verifies it
    return signature_hash_problem(hash_alg, parameters)


def _can_sign_crls(cert: x509.Certificate) -> bool:
    try:
        usage = cert.extensions.get_extension_for_class(x509.KeyUsage).value
    except x509.ExtensionNotFound:
        return True
    except (ValueError, x509.DuplicateExtension, x509.UnsupportedGeneralNameType):
        return False  # neither of the last two is a ValueError: a CA unreadable signs nothing
    return usage.crl_sign


def _issuers(
    crl: x509.CertificateRevocationList, bundles: Mapping[TrustDomain, X509Bundle]
) -> list[CertIssuer]:
    """The issuer ``crl`` speaks for in each trust domain that holds an authority of its name
    whose key verifies it (an authority two trust domains share speaks for both)."""
    found: list[CertIssuer] = []
    for td, bundle in bundles.items():
        for authority in bundle.authorities:
            issuer = _issuer_of(crl, authority, td.name)
            if issuer is not None:
                found.append(issuer)
                break
    return found


def _issuer_of(
    crl: x509.CertificateRevocationList, ca: x509.Certificate, trust_domain: str
) -> CertIssuer | None:
    """The issuer ``crl`` speaks for when ``ca`` signed it: ``ca``'s name, in ``trust_domain``."""
    if ca.subject.public_bytes() != crl.issuer.public_bytes() or not _can_sign_crls(ca):
        return None
    try:
        key = ca.public_key()
    except (ValueError, UnsupportedAlgorithm):
        return None  # a CA whose key cannot be read vouches for nothing
    if not isinstance(key, ec.EllipticCurvePublicKey | rsa.RSAPublicKey):
        return None
    try:
        if not crl.is_signature_valid(key):
            return None
    except (ValueError, TypeError, UnsupportedAlgorithm):
        return None
    # The subject as the CA's own bytes have it: those are what the certificates it issued
    # carry as their issuer (svid._verify_x509 chains them by these bytes).
    return CertIssuer(trust_domain, tbs_names(ca.tbs_certificate_bytes)[1])


def _entries(crl: x509.CertificateRevocationList, issuers: list[CertIssuer]) -> tuple[Revoked, ...]:
    serials = [format(entry.serial_number, "x") for entry in crl]
    return tuple(
        Revoked(KIND_X509_SERIAL, serial, math.inf, issuer=issuer)
        for issuer in issuers
        for serial in serials
    )


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
    pending: list[PendingCrl] = []
    next_updates: dict[CertIssuer, float] = {}
    for n, der in enumerate(crls):
        try:
            crl = x509.load_der_x509_crl(der)
            problem = _signature_problem(crl)
            if problem is not None:
                # Never pending: no intermediate CA's key makes such a signature worth more.
                rejected.append(f"CRL {n} (issuer {crl.issuer.rfc4514_string()}) is {problem}")
                continue
            issuers = _issuers(crl, bundles)
            if not issuers:
                rejected.append(
                    f"CRL {n} (issuer {crl.issuer.rfc4514_string()}) is not signed by any "
                    "authority of a known trust domain, nor yet by an intermediate CA of a "
                    "verified chain"
                )
                pending.append(PendingCrl(crl))
                continue
            revoked.extend(_entries(crl, issuers))
            next_update = crl.next_update_utc
            if next_update is not None:
                for issuer in issuers:
                    until = next_update.timestamp()
                    next_updates[issuer] = min(until, next_updates.get(issuer, until))
        except (ValueError, x509.InvalidVersion) as exc:  # InvalidVersion is no ValueError
            rejected.append(f"CRL {n} is not a readable DER CRL: {exc}")
    return CrlResult(tuple(revoked), tuple(rejected), next_updates, tuple(pending))
